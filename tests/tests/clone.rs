//! Host side: end-to-end test of `sbx run --clone` and `sbx fetch`: two
//! sandboxes, each with its own clone of one host repository, commit
//! different changes at the same time; the host fetches both (one from
//! the running sandbox, one by starting the stopped sandbox again, whose
//! clone must have persisted on its disk) into refs/remotes/sbx-NAME/*,
//! and the host's repository (HEAD, index, config, branches, working
//! tree) is as it was. Three boots, two of them at once.

use std::collections::BTreeMap;
use std::fs;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use sbx_tests::{text, Sbx};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=host", "-c", "user.email=host@example.com"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// What the guests must not change: HEAD, the index, the config, the
/// local branches and tags, and every file of the working tree.
fn snapshot(ws: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for f in ["HEAD", "index", "config"] {
        out.insert(format!(".git/{f}"), fs::read(ws.join(".git").join(f)).unwrap());
    }
    out.insert("refs".into(), git(ws, &["for-each-ref", "refs/heads", "refs/tags"]).into_bytes());
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            if name == ".git" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.insert(name, fs::read(e.path()).unwrap());
            }
        }
    }
    walk(ws, "", &mut out);
    out
}

/// The guest's part: where it is, what the clone has, then a branch of
/// its own with one commit, and a file left uncommitted.
fn guest_script(who: &str) -> String {
    format!(
        "set -e; echo \"pwd=$(pwd)\"; echo \"branch=$(git rev-parse --abbrev-ref HEAD)\"; \
         [ -e notes.txt ] && echo untracked=present || echo untracked=absent; \
         [ -e build/out ] && echo ignored=present || echo ignored=absent; \
         echo \"readme=$(cat README)\"; echo \"origin=$(git remote get-url origin)\"; \
         git checkout -q -b feature-{who}; echo {who} > {who}.txt; git add {who}.txt; \
         git -c user.name={who} -c user.email={who}@example.com commit -q -m 'from {who}'; \
         echo guest > guest-only-{who}.txt; echo \"head=$(git rev-parse HEAD)\"; echo committed"
    )
}

fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in: {out}"))
        .to_string()
}

#[test]
#[ignore = "boots guests: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn clone_sandboxes_work_in_parallel_and_are_fetched_as_remotes() {
    let sbx = Sbx::new();
    let top = tempfile::tempdir().unwrap();
    let ws = top.path().canonicalize().unwrap().join("repo");
    fs::create_dir_all(ws.join("build")).unwrap();
    git(&ws, &["init", "-q", "-b", "main"]);
    git(&ws, &["config", "remote.origin.url", "https://me:tok-secret-9@example.com/r.git"]);
    fs::write(ws.join("README"), "hello from the host\n").unwrap();
    fs::write(ws.join(".gitignore"), "build/\n").unwrap();
    git(&ws, &["add", "README", ".gitignore"]);
    git(&ws, &["commit", "-q", "-m", "host"]);
    fs::write(ws.join("notes.txt"), "untracked\n").unwrap();
    fs::write(ws.join("build/out"), "ignored\n").unwrap();
    let host_main = git(&ws, &["rev-parse", "main"]);
    let before = snapshot(&ws);
    let ws_arg = ws.to_str().unwrap();

    // Both at once: a commits and ends; b commits and keeps running.
    let start = |name: &str, script: String| {
        sbx.cmd()
            .args([
                "run",
                "shell",
                "--clone",
                "--name",
                name,
                "--workspace",
                ws_arg,
                "--no-network",
                "--timeout",
                "900",
            ])
            .args(["--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbx run")
    };
    let a = start("a", guest_script("a"));
    let mut b = start("b", format!("{}; exec sleep 900", guest_script("b")));
    let mut b_out = String::new();
    let mut lines = std::io::BufReader::new(b.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        b_out += &line;
        b_out.push('\n');
        if line == "committed" {
            break;
        }
    }
    let a = a.wait_with_output().unwrap();
    let a_out = text(&a.stdout);
    assert!(a.status.success(), "a: {a_out}{}", text(&a.stderr));
    assert!(b_out.contains("committed"), "b: {b_out}");
    for out in [&a_out, &b_out] {
        assert_eq!(field(out, "pwd"), ws_arg, "the clone is at the workspace's path");
        assert_eq!(field(out, "branch"), "main", "the host's branch checked out");
        assert_eq!(field(out, "untracked"), "absent", "untracked files are not copied");
        assert_eq!(field(out, "ignored"), "absent", "ignored files are not copied");
        assert_eq!(field(out, "readme"), "hello from the host");
        assert_eq!(field(out, "origin"), "https://example.com/r.git", "origin without the credentials");
    }
    let (a_head, b_head) = (field(&a_out, "head"), field(&b_out, "head"));
    assert_ne!(a_head, b_head);

    // b is running: fetched beside its program.
    let fetch_b = sbx.run(&["fetch", "b"], b"");
    assert!(fetch_b.status.success(), "fetch b: {}", text(&fetch_b.stderr));
    assert!(
        text(&fetch_b.stdout).contains(&format!("{b_head} refs/remotes/sbx-b/feature-b")),
        "{}",
        text(&fetch_b.stdout)
    );
    // a is stopped: fetch starts it again; its commit persisted on its disk.
    let fetch_a = sbx.run(&["fetch", "a"], b"");
    assert!(fetch_a.status.success(), "fetch a: {}{}", text(&fetch_a.stdout), text(&fetch_a.stderr));
    let stop = sbx.run(&["stop", "b"], b"");
    assert!(stop.status.success(), "stop b: {}", text(&stop.stderr));
    let _ = b.wait();

    assert_eq!(git(&ws, &["rev-parse", "refs/remotes/sbx-a/feature-a"]), a_head);
    assert_eq!(git(&ws, &["rev-parse", "refs/remotes/sbx-b/feature-b"]), b_head);
    assert_eq!(git(&ws, &["rev-parse", "refs/remotes/sbx-a/main"]), host_main);
    assert!(git(&ws, &["for-each-ref", "--format=%(refname)", "refs/remotes/sbx-a"])
        .lines()
        .all(|r| !r.contains("feature-b")));
    assert_eq!(git(&ws, &["show", &format!("{a_head}:a.txt")]), "a");
    assert_eq!(git(&ws, &["log", "-1", "--format=%s", "sbx-b/feature-b"]), "from b");
    // The host's repository and working tree are as they were.
    assert_eq!(snapshot(&ws), before, "the host's HEAD, index, config, branches and files are unchanged");
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), host_main);
    for who in ["a", "b"] {
        assert!(!ws.join(format!("guest-only-{who}.txt")).exists(), "the guest's file stays in its clone");
        assert!(!ws.join(format!("{who}.txt")).exists(), "the guest's commit does not touch the working tree");
    }
    assert!(!ws.join(".git/FETCH_HEAD").exists(), "no FETCH_HEAD written");

    // The audit log: the clone (at a's first run) and the fetch that started a.
    let log = sbx.run(&["log", "a", "--audit", "--json"], b"");
    let log = text(&log.stdout);
    assert!(log.contains("\"event\":\"clone\"") && log.contains("bundle_sha256"), "{log}");
    assert!(log.contains("\"event\":\"fetch\"") && log.contains("refs/heads/feature-a"), "{log}");
    assert!(!log.lines().any(|l| l.contains("\"event\":\"clone\"") && l.contains("\"error\"")), "{log}");
}
