//! Host side: end-to-end test of steering a running sandbox — live policy
//! and approval. A real guest's curl requests to hosts no rule allows are
//! held (nothing goes upstream) until `sbx approve` or `sbx reject` from
//! the host; an ask rule holds a DELETE to an allowed host; a `--uses 1`
//! grant lets one request through; a live `sbx policy deny` stops a host
//! that was allowed, and the live rules outlive the run. The upstream on
//! the host's loopback records every request it got. One sandbox; a second
//! short boot checks that the rules persist.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sbx_tests::upstream::Upstream;
use sbx_tests::{text, Sbx};

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn a_person_steers_a_running_sandbox() {
    let sbx = Sbx::new();
    let up = Upstream::start(Duration::from_secs(900));
    let port = up.port;
    let conf = tempfile::tempdir().unwrap();
    let policy = conf.path().join("ask.toml");
    std::fs::write(
        &policy,
        "version = 1\napproval = \"ask\"\n\
         [[rule]]\nask = \"api.e2e.test\"\nmethods = [\"DELETE\"]\npath = \"/items/*\"\n\
         [[rule]]\nallow = \"api.e2e.test\"\n",
    )
    .unwrap();
    let script = "
        echo \"a=$(curl -s http://held.e2e.test/a)\"
        echo \"d1=$(curl -s -X DELETE http://api.e2e.test/items/1)\"
        echo \"b=$(curl -s http://other.e2e.test/b)\"
        echo \"d2=$(curl -s -X DELETE http://api.e2e.test/items/2)\"
        echo \"u1=$(curl -s http://uses.e2e.test/1)\"
        echo \"u2=$(curl -s http://uses.e2e.test/2)\"
        echo ready_for_deny
        i=0; while curl -s http://api.e2e.test/ok | grep -q echo && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
        echo \"after_deny=$(curl -s http://api.e2e.test/ok; echo \" rc=$?\")\"
        exit 0
    ";
    let mut args = vec!["run", "shell", "--name", "live", "--timeout", "900", "--approval-wait", "120"];
    let resolves: Vec<String> = ["api", "held", "other", "uses"]
        .iter()
        .flat_map(|h| ["--resolve".to_string(), format!("{h}.e2e.test:80:127.0.0.1:{port}")])
        .collect();
    args.extend(resolves.iter().map(String::as_str));
    let mut child = sbx
        .cmd()
        .args(&args)
        .arg("--policy")
        .arg(&policy)
        .args(["--", "sh", "-c", script])
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
    sbx.wait_running("live");
    let ok = |args: &[&str]| {
        let out = sbx.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "sbx {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    // Only the owner reaches the steering socket (the guest has no path
    // to host UNIX sockets at all).
    use std::os::unix::fs::PermissionsExt;
    let sock = sbx.home.path().join("sandboxes/live/admin.sock");
    assert_eq!(std::fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    ok(&["policy", "allow", "live", "uses.e2e.test", "--uses", "1"]);

    // Answer each question as it comes; deny api.e2e.test live once the
    // guest says it is ready.
    let mut lines = Vec::new();
    let mut answered = Vec::new();
    let mut denied = false;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !lines.iter().any(|l: &String| l.starts_with("after_deny=")) {
        assert!(Instant::now() < deadline, "the guest never finished: {lines:?}");
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        if !denied && lines.iter().any(|l| l == "ready_for_deny") {
            ok(&["policy", "deny", "live", "api.e2e.test"]);
            denied = true;
        }
        for (id, what, method) in sbx.waiting("live") {
            let answer: &[&str] = match (what.as_str(), method.as_str()) {
                ("held.e2e.test:80/a", "GET") => &["--once"],
                ("api.e2e.test:80/items/1", "DELETE") => &["--for", "10m"],
                ("other.e2e.test:80/b", "GET") | ("uses.e2e.test:80/2", "GET") => &[],
                other => panic!("unexpected question {other:?} (lines so far: {lines:?})"),
            };
            if answer.is_empty() {
                ok(&["reject", "live", &id]);
            } else {
                ok(&[&["approve", "live", &id][..], answer].concat());
            }
            answered.push(what);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = child.wait().unwrap();
    let stderr = errs.join().unwrap();
    let out = lines.join("\n") + "\n";
    eprintln!("stdout:\n{out}\nstderr:\n{stderr}");
    assert_eq!(status.code(), Some(0));
    assert!(out.contains("a=echo GET /a\n"), "approved once, it went through");
    assert!(out.contains("d1=echo DELETE /items/1\n"), "the ask rule held it until approved");
    let line = |k: &str| lines.iter().find(|l| l.starts_with(k)).cloned().unwrap_or_default();
    assert!(line("b=").contains("\"error\":\"sbx_denied\"") && line("b=").contains("rejected by uid"), "rejected");
    assert!(out.contains("d2=echo DELETE /items/2\n"), "the --for grant covers the next DELETE, unasked");
    assert!(out.contains("u1=echo GET /1\n"), "the --uses 1 grant let one through");
    assert!(line("u2=").contains("\"error\":\"sbx_denied\""), "and then no more");
    let after = line("after_deny=");
    assert!(!after.contains("echo") && !after.ends_with(" rc=0"), "a live deny stops an allowed host: {after}");
    answered.sort();
    assert_eq!(
        answered,
        ["api.e2e.test:80/items/1", "held.e2e.test:80/a", "other.e2e.test:80/b", "uses.e2e.test:80/2"],
        "one question each, none for what a grant covered"
    );
    assert!(stderr.contains("sbx: request held: GET held.e2e.test:80/a"), "said on stderr, no pty");
    let got: Vec<String> = up.requests().into_iter().filter(|r| !r.ends_with(" /ok")).collect();
    assert_eq!(got, ["GET /a", "DELETE /items/1", "DELETE /items/2", "GET /1"], "the upstream got each once");

    // The live rules outlive the run: listed with where they came from,
    // and in force at the next run.
    let ls = ok(&["policy", "ls", "live"]);
    assert!(ls.contains("deny api.e2e.test") && ls.contains("DELETE"), "{ls}");
    let again = sbx
        .cmd()
        .args(&args)
        .arg("--policy")
        .arg(&policy)
        .args(["--", "sh", "-c", "echo \"ok=$(curl -s http://api.e2e.test/ok; echo \" rc=$?\")\""])
        .output()
        .unwrap();
    let again = text(&again.stdout);
    assert!(again.contains("ok=") && !again.contains("echo") && !again.contains(" rc=0"), "still denied: {again}");
    ok(&["policy", "reset", "live"]);
    assert!(!ok(&["policy", "ls", "live"]).contains("live #"));

    // Every step is in the audit log, whose chain verifies.
    let log = ok(&["log", "live", "--audit", "--json"]);
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
    assert!(has(&|v| v["event"] == "approval" && v["decision"] == "held" && v["host"] == "held.e2e.test"), "{log}");
    assert!(has(&|v| v["event"] == "approval" && v["answer"] == "approved" && v["by_uid"].is_u64()), "{log}");
    assert!(has(&|v| v["event"] == "approval" && v["answer"] == "rejected" && v["host"] == "other.e2e.test"), "{log}");
    assert!(has(&|v| v["event"] == "live" && v["change"] == "added"), "{log}");
    assert!(has(&|v| v["event"] == "live" && v["change"] == "used up"), "{log}");
    let verify = sbx.cmd().args(["audit", "verify", "live"]).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stdout));
}

/// A free port on the host's loopback (bound, then let go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.0 GET to `addr`; the answer, or the error.
fn http_get(addr: std::net::SocketAddr) -> Result<String, std::io::Error> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `sbx ports`: a guest service published live on the host's 127.0.0.1,
/// reached there (and audited), never on the host's other addresses;
/// unpublished live.
#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn a_published_port_reaches_the_guests_service_on_loopback_only() {
    let sbx = Sbx::new();
    let script = "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html
        busybox httpd -p 8000 -h /tmp/www && echo serving; sleep 600";
    let mut child = sbx
        .cmd()
        .args(["run", "shell", "--name", "ports", "--timeout", "900", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sbx.wait_running("ports");
    let run = |args: &[&str]| sbx.cmd().args(args).output().unwrap();
    let host_port = free_port();
    let out = run(&["ports", "ports", "--publish", "0.0.0.0:18080:8000"]);
    assert!(!out.status.success() && text(&out.stderr).contains("127.0.0.1 only"), "{}", text(&out.stderr));
    let out = run(&["ports", "ports", "--publish", &format!("{host_port}:8000")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls = text(&run(&["ports", "ports"]).stdout);
    assert!(ls.contains(&format!("127.0.0.1:{host_port}")) && ls.contains("8000"), "{ls}");
    // The guest's httpd may still be starting.
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    let deadline = Instant::now() + Duration::from_secs(120);
    let answer = loop {
        match http_get(loopback) {
            Ok(a) if a.contains("hello-from-guest") => break a,
            other => assert!(Instant::now() < deadline, "never answered: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    // The host's own non-loopback address (the route out; no packet sent).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    if probe.connect("192.0.2.1:9").is_ok() {
        let ip = probe.local_addr().unwrap().ip();
        if !ip.is_loopback() && !ip.is_unspecified() {
            let wide = std::net::SocketAddr::new(ip, host_port);
            assert!(http_get(wide).is_err(), "reachable on {wide}: published beyond loopback");
        }
    }
    assert!(run(&["ports", "ports", "--unpublish", &host_port.to_string()]).status.success());
    assert!(http_get(loopback).is_err(), "unpublished, nothing listens");
    let log = text(&run(&["log", "ports", "--audit", "--json"]).stdout);
    assert!(log.contains("\"event\":\"publish\"") && log.contains("\"event\":\"unpublish\""), "{log}");
    assert!(log.contains("\"event\":\"port_forward\"") && log.contains("\"peer\":\"127.0.0.1:"), "{log}");
    assert!(run(&["stop", "ports"]).status.success());
    let _ = child.wait();
}
