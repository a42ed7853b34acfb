//! Host side: end-to-end test of the machine's admin policy
//! (`/etc/sbx/policy.toml`, sbx/src/machine_policy.rs). Run in a private
//! mount namespace with a tmpfs over /etc/sbx (root only; the host's is
//! never touched): a forbidden flag refuses `sbx run` before boot; in ONE
//! running sandbox, a host the user allows with `--allow` is denied by the
//! admin rule (named in the answer), `sbx policy allow` of it is refused,
//! and once the admin file is rewritten without the deny the same running
//! sandbox reaches it (hot reload), logged with the new file's SHA-256.
//! The upstream is on the host's loopback.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sbx_tests::upstream::Upstream;
use sbx_tests::{in_private_mount_namespace, text, Sbx};

const ADMIN_DIR: &str = "/etc/sbx";

/// Writes the admin policy as an administrator would: root-owned 0644,
/// replaced atomically.
fn write_admin(text: &str) {
    let tmp = Path::new(ADMIN_DIR).join(".policy.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, Path::new(ADMIN_DIR).join("policy.toml")).unwrap();
}

fn sha256(content: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, content).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().expect("sha256sum");
    text(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx, root (a mount namespace); run by `cargo xtask test`"]
fn the_machines_admin_policy_governs_a_running_sandbox() {
    if !in_private_mount_namespace("the_machines_admin_policy_governs_a_running_sandbox", ADMIN_DIR) {
        return;
    }
    let sbx = Sbx::new();
    let up = Upstream::start(Duration::from_secs(600));
    let port = up.port;
    let first =
        "version = 1\nforbid = [\"expose-secret-to-guest\", \"learn\", \"clone\"]\naudit_copy = \"/etc/sbx/audit\"\n\
         [[rule]]\ndeny = \"blocked.e2e.test\"\nmethods = [\"GET\"]\n";
    std::fs::create_dir_all("/etc/sbx/audit").unwrap();
    write_admin(first);
    let resolve = format!("blocked.e2e.test:80:127.0.0.1:{port}");

    // A forbidden flag: refused before anything boots, the flag named.
    let refused = sbx
        .cmd()
        .args(["run", "shell", "--name", "gov", "--expose-secret-to-guest", "anthropic", "--", "true"])
        .output()
        .unwrap();
    let err = text(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("admin policy") && err.contains("\"expose-secret-to-guest\""), "{err}");
    assert!(!sbx.home.path().join("sandboxes/gov/console.log").exists(), "nothing booted: {err}");
    // Guest-made commits into host repositories: --clone and sbx fetch.
    let cloned = sbx.cmd().args(["run", "shell", "--name", "gov", "--clone", "--", "true"]).output().unwrap();
    let err = text(&cloned.stderr);
    assert!(!cloned.status.success() && err.contains("forbid = [\"clone\"]"), "{err}");
    assert!(!sbx.home.path().join("sandboxes/gov").exists(), "no sandbox made: {err}");
    let fetched = sbx.cmd().args(["fetch", "gov"]).output().unwrap();
    let err = text(&fetched.stderr);
    assert!(!fetched.status.success() && err.contains("forbid = [\"clone\"]"), "{err}");
    // The admin policy's folder is never the guest's to write (running
    // sandboxes reload it): a read-write share of it is refused.
    let share =
        sbx.cmd().args(["run", "shell", "--name", "gov", "--mount", "/etc/sbx:rw", "--", "true"]).output().unwrap();
    let err = text(&share.stderr);
    assert!(!share.status.success() && err.contains("Refusing to share /etc/sbx read-write"), "{err}");
    assert!(!sbx.home.path().join("sandboxes/gov/console.log").exists(), "nothing booted: {err}");

    // One sandbox: the user allows the host; the admin denies its GETs
    // (a narrowed deny: the name resolves, the request gets the 403; a
    // blanket one would be refused at DNS already, as any deny is).
    let script = "
        echo \"first=$(curl -s http://blocked.e2e.test/a)\"
        echo ready
        i=0; while ! curl -s http://blocked.e2e.test/poll | grep -q echo && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
        echo \"after=$(curl -s http://blocked.e2e.test/c)\"
        exit 0
    ";
    let mut child = sbx
        .cmd()
        .args(["run", "shell", "--name", "gov", "--no-tty", "--timeout", "600", "--allow", "blocked.e2e.test"])
        .args(["--resolve", &resolve, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut lines = Vec::new();
    let mut next_line = |want: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(l) = lines.iter().find(|l: &&String| l.starts_with(want)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("no '{want}' line from the guest; so far: {lines:?}"),
            }
        }
    };
    let denied = next_line("first=");
    assert!(denied.contains("sbx_denied") && denied.contains("admin policy rule 1: deny blocked.e2e.test"), "{denied}");
    assert!(denied.contains("the machine's administrator"), "the cure is not `sbx policy allow`: {denied}");
    next_line("ready");

    // The user cannot lift it live; `sbx policy ls` says which layer.
    let allow = sbx.cmd().args(["policy", "allow", "gov", "blocked.e2e.test"]).output().unwrap();
    assert!(!allow.status.success(), "a live allow of an admin-denied host is refused");
    assert!(text(&allow.stderr).contains("admin policy"), "{}", text(&allow.stderr));
    let ls = text(&sbx.cmd().args(["policy", "ls", "gov"]).output().unwrap().stdout);
    assert!(ls.contains("admin  admin policy rule 1: deny blocked.e2e.test"), "{ls}");
    assert!(ls.contains("flag   --allow: allow blocked.e2e.test"), "{ls}");

    // The administrator drops the deny: the running sandbox reaches it.
    let second = "version = 1\nforbid = [\"expose-secret-to-guest\", \"learn\"]\n";
    write_admin(second);
    let after = next_line("after=");
    assert!(after.contains("echo GET /c"), "after the reload: {after}");
    let status = child.wait().unwrap();
    let stderr = errs.join().unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("admin policy /etc/sbx/policy.toml reloaded"), "told without a pty: {stderr}");
    let got = up.requests();
    assert!(!got.contains(&"GET /a".to_string()), "nothing went upstream while denied: {got:?}");
    assert!(got.contains(&"GET /c".to_string()), "{got:?}");

    // The audit log: the run names the admin policy, the reload is logged
    // with the new file's hash, and the chain verifies.
    let log = sbx.cmd().args(["log", "gov", "--audit", "--json"]).output().unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    let lines: Vec<serde_json::Value> = text(&log.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
    assert!(has(&|v| v["event"] == "run" && v["admin_policy_sha256"] == sha256(first)), "{lines:?}");
    assert!(has(&|v| v["event"] == "admin_policy" && v["change"] == "loaded" && v["sha256"] == sha256(first)));
    assert!(
        has(&|v| v["event"] == "admin_policy" && v["change"] == "reloaded" && v["sha256"] == sha256(second)),
        "{lines:?}"
    );
    assert!(sbx.cmd().args(["audit", "verify", "gov"]).status().unwrap().success());
    // The required audit destination got this run's log, the reload in it.
    let copy = std::fs::read_to_string("/etc/sbx/audit/0/gov.jsonl").expect("the run's audit copy");
    assert!(copy.contains("\"reloaded\"") && copy.contains(&sha256(second)), "{copy}");
    assert!(copy.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
}
