//! Host side: end-to-end test of the guest's network — a real guest whose
//! only NIC is netstack, fetching from a test server on the host's
//! loopback through a name the test maps (`--resolve`), and failing to
//! reach everything the policy does not allow; an allowed upstream that
//! misbehaves (a flood into a reader that reads nothing, a head that never
//! ends, requests never answered) does not starve the next request. One
//! boot, many checks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbx_tests::{text, Sbx};

/// An HTTP server on 127.0.0.1 that answers every request with `body` and
/// counts the requests; it stops by itself after `for_how_long`.
fn upstream(body: &'static str, for_how_long: Duration) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + for_how_long;
        while Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // Read the request head.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ =
                write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = conn.flush();
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
        }
    });
    (port, count)
}

/// What the misbehaving upstream saw.
#[derive(Default)]
struct Stalls {
    /// Bytes of the 2 GiB answer the guest's connection took.
    flood_bytes: AtomicU64,
    /// Requests that got no answer at all.
    hung: AtomicUsize,
    /// Ordinary requests answered.
    ok: AtomicUsize,
}

/// The flood's size: 2 GiB, as fast as the socket takes it.
const FLOOD: u64 = 2 << 30;

/// An allowed upstream on 127.0.0.1 that misbehaves by path: `/flood`
/// answers 2 GiB as fast as the socket takes it, `/nohead` starts a head
/// and never ends it (a byte a second), `/hang` accepts and never answers,
/// `/ok` answers "ok-after-stalls". A thread per connection (at most 100);
/// everything stops by itself after `for_how_long`.
fn misbehaving_upstream(for_how_long: Duration) -> (u16, Arc<Stalls>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(Stalls::default());
    let seen = stats.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + for_how_long;
        let threads = Arc::new(AtomicUsize::new(0));
        while Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if threads.load(Ordering::SeqCst) >= 100 {
                continue;
            }
            threads.fetch_add(1, Ordering::SeqCst);
            let (stats, threads) = (seen.clone(), threads.clone());
            std::thread::spawn(move || {
                conn.set_nonblocking(false).unwrap();
                let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                conn.set_read_timeout(Some(left())).unwrap();
                conn.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let path = first.split(' ').nth(1).unwrap_or("").to_string();
                match path.as_str() {
                    "/flood" => {
                        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {FLOOD}\r\n\r\n");
                        let chunk = vec![b'f'; 64 * 1024];
                        let mut sent = 0u64;
                        // Until the guest's stall stops the writes for 5 s.
                        while sent < FLOOD && Instant::now() < deadline {
                            match conn.write(&chunk) {
                                Ok(n) => {
                                    sent += n as u64;
                                    stats.flood_bytes.store(sent, Ordering::SeqCst);
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(_) => break,
                            }
                        }
                    }
                    "/nohead" => {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nX-Never-Ends: ");
                        while Instant::now() < deadline && conn.write_all(b"x").is_ok() {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    "/hang" => {
                        stats.hung.fetch_add(1, Ordering::SeqCst);
                        let mut rest = Vec::new();
                        let _ = reader.read_to_end(&mut rest);
                    }
                    _ => {
                        stats.ok.fetch_add(1, Ordering::SeqCst);
                        let body = "ok-after-stalls";
                        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        let mut rest = Vec::new();
                        let _ = reader.read_to_end(&mut rest);
                    }
                }
                threads.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, stats)
}

/// Builds tests/guest/stall.c, a static guest program, into `dir`.
fn build_stall(dir: &std::path::Path) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/stall.c");
    let gcc =
        std::process::Command::new("gcc").args(["-O2", "-static", "-o"]).arg(dir.join("stall")).arg(&src).output();
    let gcc = gcc.expect("gcc: the e2e tests build a static guest program with it");
    assert!(gcc.status.success(), "gcc {}: {}", src.display(), text(&gcc.stderr));
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn the_guest_reaches_what_the_policy_allows_and_nothing_else() {
    let sbx = Sbx::new();
    let (port, requests) = upstream("sbx-upstream-says-hi", Duration::from_secs(900));
    let (bad_port, stalls) = misbehaving_upstream(Duration::from_secs(900));
    build_stall(sbx.work.path());
    let script = "
        echo \"resolv=$(cat /etc/resolv.conf)\"
        echo \"allowed=$(wget -qO- http://allowed.test/page)\"
        wget -qO- http://denied.test/page; echo \"denied_rc=$?\"
        wget -qO- http://allowed.test:8080/ 2>&1; echo \"port8080_rc=$?\"
        wget -qO- http://10.0.2.2:22/ 2>&1; echo \"port22_rc=$?\"
        busybox nslookup example.com 1.1.1.1 >/dev/null 2>&1; echo \"outside_dns_rc=$?\"
        wget -qO- http://localhost./ 2>&1; echo \"host_loopback_rc=$?\"
        i=0; while [ $i -lt 200 ]; do wget -qO- http://10.0.2.2:8080/ >/dev/null 2>&1; i=$((i+1)); done
        echo refusals_done
        # A misbehaving allowed upstream: a 2 GiB answer never read, a head
        # that never ends, 40 requests never answered, all held open; then
        # an ordinary request to the same host must still be served.
        # (busybox's own wget -T crashes on an answer it could read, so the
        # time limit is timeout's.)
        ip=$(nslookup bad.test 2>/dev/null | awk '/^Address/ {a=$NF} END {print a}')
        ./stall \"$ip\" bad.test 40 300 > /tmp/stall.out 2>&1 &
        i=0; while ! grep -q stalled /tmp/stall.out && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
        echo \"stall=$(cat /tmp/stall.out)\"
        sleep 10
        echo \"after=$(timeout 60 wget -qO- http://bad.test/ok 2>&1)\"
        # The head that never ends is cut at its time limit (30 s).
        sleep 40
        exit 0
    ";
    let map = |name: &str| format!("{name}:80:127.0.0.1:{port}");
    let child = sbx
        .cmd()
        .args([
            "run",
            "shell",
            "--name",
            "net",
            "--timeout",
            "600",
            "--allow",
            "allowed.test",
            "--allow",
            "localhost",
            "--resolve",
            &map("allowed.test"),
            "--resolve",
            &map("denied.test"),
            "--allow",
            "bad.test",
            "--resolve",
            &format!("bad.test:80:127.0.0.1:{bad_port}"),
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The VMM's peak memory (VmHWM of the sbx process, which is the VMM),
    // sampled until it ends: a figure for BENCHMARKS.md, not a check.
    let status_file = format!("/proc/{}/status", child.id());
    let sampler = std::thread::spawn(move || {
        let mut peak = String::new();
        while let Ok(status) = std::fs::read_to_string(&status_file) {
            if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
                peak = line.trim_start_matches("VmHWM:").trim().to_string();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    eprintln!("peak VMM RSS (VmHWM): {}", sampler.join().unwrap());
    let flood = stalls.flood_bytes.load(Ordering::SeqCst);
    eprintln!(
        "the upstream sent {flood} bytes into the stalled reader; {} requests hung",
        stalls.hung.load(Ordering::SeqCst)
    );
    let stdout = text(&out.stdout);
    eprintln!("stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("resolv=nameserver 10.0.2.2"), "netstack is the guest's DNS server");
    assert!(stdout.contains("allowed=sbx-upstream-says-hi\n"), "the allowed name reaches the loopback server");
    assert!(stdout.contains("denied_rc=1\n"), "the denied name does not");
    assert!(stdout.contains("Connection refused") && stdout.contains("port8080_rc=1\n"), "port 8080 is refused");
    assert!(stdout.contains("port22_rc=1\n"), "port 22 of the gateway is refused");
    assert!(stdout.contains("outside_dns_rc=1\n"), "an outside resolver is unreachable");
    assert!(stdout.contains("host_loopback_rc=1\n"), "an allowed name the host resolves to loopback is refused");
    assert!(stdout.contains("refusals_done\n"));
    assert_eq!(requests.load(Ordering::SeqCst), 1, "only the allowed request reached the upstream");
    assert!(stdout.contains("stall=stalled connected=40 refused=0\n"), "a burst of 40 connects is served whole");
    assert!(stdout.contains("after=ok-after-stalls\n"), "a stalled upstream and reader do not starve the next request");
    assert_eq!(stalls.ok.load(Ordering::SeqCst), 1);
    // The user sees it: `sbx ls` shows the run's connection counters
    // (open/held/refused for limits/timed out), the audit log each limit.
    let ls = text(&sbx.cmd().arg("ls").output().unwrap().stdout);
    let figures = ls.lines().find(|l| l.starts_with("net ")).and_then(|l| l.split_whitespace().nth(4)).unwrap_or("");
    let timed_out: u64 = figures.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(ls.contains("NET open/held/lim/tmo") && timed_out >= 1, "{ls}");
    assert!(
        flood > 0 && flood < 64 << 20,
        "backpressure: {flood} bytes of 2 GiB went out while the guest read nothing"
    );

    // The audit log (hash chain verified by `sbx log --network`) shows
    // each decision.
    let log = sbx.cmd().args(["log", "net", "--network"]).output().unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    let log = text(&log.stdout);
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().any(f);
    assert!(
        has(&|v| v["event"] == "http"
            && v["host"] == "allowed.test"
            && v["path"] == "/page"
            && v["status"] == 200
            && v["decision"] == "allow"),
        "{log}"
    );
    assert!(has(&|v| v["event"] == "dns" && v["name"] == "denied.test" && v["decision"] == "deny"), "{log}");
    assert!(has(&|v| v["event"] == "refused" && v["what"].as_str().is_some_and(|w| w.ends_with(":8080"))), "{log}");
    assert!(has(&|v| v["event"] == "refused" && v["what"] == "TCP to 10.0.2.2:22"), "{log}");
    assert!(has(&|v| v["event"] == "timeout" && v["limit"] == "response_head"), "{log}");
    assert!(has(&|v| v["event"] == "refused" && v["what"] == "UDP to 1.1.1.1:53"), "{log}");
    // No host network: the host's resolver said loopback, netstack refused.
    assert!(
        has(&|v| v["event"] == "upstream"
            && v["name"] == "localhost"
            && v["decision"] == "deny"
            && v["refused"].as_array().is_some_and(|r| r.iter().any(|a| a["class"] == "loopback"))),
        "{log}"
    );
    // A guest refused 200 times in a loop: a few lines in full, the rest
    // counted in a summary line (written at the latest when the VM ends).
    let refused: Vec<u64> = lines
        .iter()
        .filter(|v| v["event"] == "refused" && v["what"].as_str().is_some_and(|w| w.starts_with("TCP")))
        .filter_map(|v| v["ts"].as_u64())
        .collect();
    let summarised: u64 = lines
        .iter()
        .filter(|v| v["event"] == "suppressed" && v["kind"] == "refused/TCP")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    // At most 32 lines in full per kind and minute.
    let span = refused.iter().max().unwrap_or(&0) - refused.iter().min().unwrap_or(&0);
    let allowed = 32 * (span / 60_000 + 2) as usize;
    assert!(refused.len() <= allowed && refused.len() < 150, "refusals are aggregated: {} lines", refused.len());
    assert!(refused.len() as u64 + summarised >= 202, "every refusal is counted: {} + {summarised}", refused.len());

    // An edited line breaks the chain, and sbx says where.
    let path = sbx.home.path().join("sandboxes/net/audit.log");
    let edited = std::fs::read_to_string(&path).unwrap().replacen("denied.test", "allowed.test", 1);
    std::fs::write(&path, edited).unwrap();
    let log = sbx.cmd().args(["log", "net", "--network"]).output().unwrap();
    assert!(!log.status.success());
    assert!(text(&log.stderr).contains("Audit log line"), "{}", text(&log.stderr));
}
