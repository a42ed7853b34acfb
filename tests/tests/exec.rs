//! Host side: end-to-end test of the control channel — `sbx exec` sessions
//! (vsock to guest-init) beside a running sandbox's first program: pipes,
//! exit status, stdin, users, a terminal with its size and resizes, and
//! interrupts; and, in the same boot, that guest processes keep their own
//! extended CPU state (AVX, AVX-512) across context switches, signals and
//! fork (tests/guest/xstate.c, built here with gcc); `sbx cp` both ways.
//! One boot.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::session::{Frame, Open, Reader};
use sbx_tests::{text, Sbx};

/// Speaks the session protocol directly: opens a session on a terminal
/// of `rows` x `cols` and returns the connection.
fn open_raw(socket: &std::path::Path, argv: &[&str], rows: u16, cols: u16) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let open = Open { argv: argv.iter().map(|a| a.to_string()).collect(), tty: Some((rows, cols)), ..Open::default() };
    s.write_all(&Frame::Open(open).encode()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

/// Reads frames until the program's output contains `want` (returns the
/// output so far) or the session ends (returns None with the end frame).
fn read_until(s: &mut UnixStream, r: &mut Reader, out: &mut String, want: &str) -> Result<(), Frame> {
    let mut buf = [0u8; 4096];
    loop {
        while let Some(f) = r.next_frame().unwrap() {
            match f {
                Frame::Stdout(d) => out.push_str(&String::from_utf8_lossy(&d)),
                Frame::Started { .. } => {}
                end => return Err(end),
            }
        }
        if out.contains(want) {
            return Ok(());
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "session closed; output so far: {out:?}");
        r.feed(&buf[..n]);
    }
}

/// Builds tests/guest/xstate.c, a static guest program, into `dir`.
fn build_xstate(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/xstate.c");
    let out = dir.join("xstate");
    let gcc = Command::new("gcc").args(["-O2", "-static", "-o"]).arg(&out).arg(&src).output();
    let gcc = gcc.expect("gcc: the e2e tests build a static guest program with it");
    assert!(gcc.status.success(), "gcc {}: {}", src.display(), text(&gcc.stderr));
    out
}

/// The `key=value` fields of xstate's output line that starts with `what`.
fn fields(output: &str, what: &str) -> HashMap<String, String> {
    let line = output.lines().find(|l| l.starts_with(&format!("{what} ")));
    let line = line.unwrap_or_else(|| panic!("no '{what}' line in:\n{output}"));
    line.split_whitespace().filter_map(|f| f.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn num(f: &HashMap<String, String>, key: &str) -> i64 {
    f.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {key} in {f:?}"))
}

/// Extended CPU state in the guest. Where the guest offers AVX (CPUID's
/// OSXSAVE and XCR0, as programs check), processes holding patterns in
/// every ymm (zmm and k where AVX-512 is offered) register through busy
/// loops, more of them than vCPUs, keep them through hundreds of context
/// switches; a signal handler that clobbers them does not disturb the
/// interrupted code, and its frame carries the state; fork keeps them;
/// compiler-generated AVX2 code in concurrent processes gets the host's
/// checksum. Where AVX is not offered, using it must fault (SIGILL), not
/// run with registers shared between processes (kvm_pvm hosts run guest
/// user code with the host's XCR0: there the kernel must save the state).
fn check_extended_state(sbx: &Sbx, sandbox: &str) {
    let xstate = build_xstate(sbx.work.path());
    let host = Command::new(&xstate).args(["sum", "1"]).output().unwrap();
    let host_sum = fields(&text(&host.stdout), "sum")["checksum"].clone();
    let script = "./xstate probe && ./xstate stress 4 3 && ./xstate signals 2 && ./xstate fork && ./xstate sum 3; \
                  cat /proc/sbx_xstate 2>/dev/null; true";
    let started = Instant::now();
    let out = sbx.run(&["exec", sandbox, "--", "sh", "-c", script], b"");
    let report = text(&out.stdout);
    eprintln!("extended state, {:.1} s in the guest:\n{report}{}", started.elapsed().as_secs_f64(), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let probe = fields(&report, "probe");
    if probe["offered_avx2"] != "1" {
        assert_eq!(probe["vex"], "sigill", "AVX is not offered but runs, unsaved: {probe:?}");
        return;
    }
    let stress = fields(&report, "stress");
    assert_eq!(num(&stress, "reported"), 4, "{stress:?}");
    assert!(num(&stress, "rounds") > 0, "{stress:?}");
    assert!(num(&stress, "switches") >= 100, "too few context switches to mean anything: {stress:?}");
    assert_eq!(num(&stress, "failures"), 0, "vector registers changed across context switches: {stress:?}");
    let signals = fields(&report, "signals");
    assert!(num(&signals, "handled") >= 50, "{signals:?}");
    assert_eq!(num(&signals, "failures"), 0, "a signal handler's registers leaked into its task: {signals:?}");
    assert_eq!(num(&signals, "frames_with_xstate"), num(&signals, "handled"), "{signals:?}");
    assert_eq!(num(&fields(&report, "fork"), "failures"), 0, "fork kept the registers");
    let sum = fields(&report, "sum");
    assert_eq!(num(&sum, "reported"), 3, "{sum:?}");
    assert_eq!(num(&sum, "failures"), 0, "{sum:?}");
    // Each guest process checked its AVX2 results against this scalar one.
    assert_eq!(sum["checksum"], host_sum, "the guest's checksum is the host's");
}

/// `sbx cp` both ways with a running sandbox: files and directories come
/// out through sbx's own tar reader, links the guest made are not
/// followed or made, set-id bits are dropped, a link at the destination
/// is never written through; what goes in arrives whole.
fn check_copy(sbx: &Sbx, sandbox: &str) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cp = |args: &[&str]| {
        let out = sbx.run(&[&["cp"][..], args].concat(), b"");
        (out.status.code(), text(&out.stderr))
    };
    let prep = "mkdir -p /tmp/src/sub && printf hi > /tmp/src/a && printf bee > /tmp/src/sub/b && \
                chmod 4777 /tmp/src/a && ln -s /etc/passwd /tmp/src/link";
    let out = sbx.run(&["exec", sandbox, "-T", "--", "sh", "-c", prep], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = |rel: &str| dir.join(rel).display().to_string();
    let src = format!("{sandbox}:/tmp/src");
    let (code, err) = cp(&[&format!("{src}/a"), &p("a")]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "hi");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.join("a")).unwrap().permissions().mode() & 0o7777, 0o755, "no set-id");
    let (code, err) = cp(&[&src, &p("out")]);
    assert_eq!(code, Some(1), "a directory needs -r: {err}");
    assert!(err.contains("-r") && !dir.join("out").exists(), "{err}");
    let (code, err) = cp(&["-r", &src, &p("out")]);
    assert_eq!(code, Some(1), "the link is skipped, said: {err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("out/sub/b")).unwrap(), "bee");
    assert!(std::fs::symlink_metadata(dir.join("out/link")).is_err(), "no link made on the host");
    let (code, err) = cp(&[&format!("{src}/a"), &p("a")]);
    assert_eq!(code, Some(1), "an existing file is kept: {err}");
    assert!(err.contains("exists: not replaced"), "{err}");
    let outside = dir.join("outside");
    std::os::unix::fs::symlink(&outside, dir.join("out2")).unwrap();
    let (code, _) = cp(&["-r", &src, &p("out2")]);
    assert_ne!(code, Some(0));
    assert!(!outside.exists(), "written through a link at the destination");
    let (code, err) = cp(&["-r", &p("out"), &format!("{sandbox}:/tmp/back")]);
    assert_eq!(code, Some(0), "{err}");
    let out = sbx.run(&["exec", sandbox, "-T", "--", "cat", "/tmp/back/sub/b"], b"");
    assert_eq!(text(&out.stdout), "bee");
    let (code, err) = cp(&["--max-size", "1", &format!("{src}/a"), &p("big")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--max-size"), "{err}");
}

/// The running VMM (process `pid`) is jailed: every thread that touches
/// guest data (vCPUs, device workers, the VM and control threads) runs
/// under a seccomp filter, all have no_new_privs, and none has a
/// capability beyond those acting on the shared files.
fn check_jail(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let root =
        status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().nth(1)) == Some("0");
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else { continue };
        let field = |f: &str| status.lines().find_map(|l| l.strip_prefix(f)).unwrap_or_default().trim().to_string();
        let name = field("Name:");
        let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
        assert_eq!(field("NoNewPrivs:"), "1", "{name}");
        assert_eq!(caps & !0b1011, 0, "{name}: only CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER may be left");
        // As root, the control channel's worker runs as nobody, with nothing.
        let euid = field("Uid:").split_whitespace().nth(1).unwrap_or_default().to_string();
        if name == "virtio-vsock" && root {
            assert_eq!((euid.as_str(), caps), ("65534", 0), "the control channel's worker");
        }
        // Host-only threads: signals (sbx stop), the violation watcher.
        if !matches!(name.as_str(), "signals" | "seccomp-watch" | "stop-grace") && !name.starts_with("kvm-") {
            assert_eq!(field("Seccomp:"), "2", "{name} runs under a seccomp filter");
        }
        seen.push(name);
    }
    for want in ["vcpu0", "virtio-fs", "virtio-net", "virtio-vsock", "vm", "sbx"] {
        assert!(seen.iter().any(|n| n == want), "no {want} thread among {seen:?}");
    }
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn exec_runs_sessions_beside_the_first_program() {
    let sbx = Sbx::new();
    let mut run = sbx
        .cmd()
        .args(["run", "shell", "--name", "ex", "--timeout", "900", "--", "sh", "-c", "echo first; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sbx.wait_running("ex");
    // exec waits for the guest to come up.
    let out = sbx.run(&["exec", "ex", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n", "stderr is kept apart");
    check_jail(run.id());

    let out = sbx.run(&["exec", "ex", "--", "sh", "-c", "cat; echo done"], b"line one\nline two\n");
    assert_eq!(text(&out.stdout), "line one\nline two\ndone\n", "stdin reaches the program, then end of file");

    // A mebibyte of every byte value goes in and comes back out intact
    // (input and output flow at once, neither side blocking the other).
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let out = sbx.run(&["exec", "ex", "--", "cat"], &data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout == data, "cat returned {} bytes, not the same {} bytes", out.stdout.len(), data.len());

    let out = sbx.run(
        &["exec", "ex", "--user", "agent", "-e", "GREETING=hi there", "--", "sh", "-c", "id -u; pwd; echo $GREETING"],
        b"",
    );
    let work = sbx.work.path().canonicalize().unwrap();
    assert_eq!(text(&out.stdout), format!("1000\n{}\nhi there\n", work.display()), "{}", text(&out.stderr));

    let out = sbx.run(&["exec", "ex", "--", "no-such-program"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("Cannot run 'no-such-program'"), "{}", text(&out.stderr));

    // A terminal of a given size, then a resize the program sees.
    let socket = sbx.home.path().join("sandboxes/ex/control.sock");
    let mut s = open_raw(&socket, &["sh", "-c", "stty size; tty; read x; stty size"], 10, 40);
    let (mut r, mut seen) = (Reader::default(), String::new());
    read_until(&mut s, &mut r, &mut seen, "/dev/pts/").unwrap();
    assert!(seen.contains("10 40"), "{seen:?}");
    s.write_all(&Frame::Resize { rows: 30, cols: 100 }.encode()).unwrap();
    s.write_all(&Frame::Stdin(b"\n".to_vec()).encode()).unwrap();
    read_until(&mut s, &mut r, &mut seen, "30 100").unwrap();
    assert_eq!(read_until(&mut s, &mut r, &mut seen, "never"), Err(Frame::Exit(0)));

    // ^C typed on a terminal interrupts the foreground program.
    let mut s = open_raw(&socket, &["sh", "-c", "echo ready; sleep 300; echo not-interrupted"], 24, 80);
    let (mut r, mut seen) = (Reader::default(), String::new());
    read_until(&mut s, &mut r, &mut seen, "ready").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(&Frame::Stdin(vec![3]).encode()).unwrap();
    let end = read_until(&mut s, &mut r, &mut seen, "never");
    assert!(matches!(end, Err(Frame::Killed(2)) | Err(Frame::Exit(130))), "{end:?} {seen:?}");
    assert!(!seen.contains("not-interrupted"));

    // A signal to `sbx exec` itself reaches the program.
    let mut long = sbx
        .cmd()
        .args(["exec", "ex", "-T", "--", "sh", "-c", "echo started; exec sleep 300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    long.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let started = Instant::now();
    assert!(std::process::Command::new("kill").args(["-INT", &long.id().to_string()]).status().unwrap().success());
    let status = long.wait().unwrap();
    assert_eq!(status.code(), Some(130), "killed by SIGINT in the guest");
    assert!(started.elapsed() < Duration::from_secs(60));
    let out = sbx.run(&["exec", "ex", "--", "sh", "-c", "ps -o args | grep -c '^sleep 300' || true"], b"");
    assert_eq!(text(&out.stdout).trim(), "0", "no interrupted program is left running");

    check_extended_state(&sbx, "ex");
    check_copy(&sbx, "ex");

    // The first program ran all along; stopping the sandbox ends it.
    assert!(sbx.cmd().args(["stop", "ex"]).status().unwrap().success());
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    let mut first_out = String::new();
    run.stdout.take().unwrap().read_to_string(&mut first_out).unwrap();
    assert_eq!(first_out, "first\n");
    let out = sbx.run(&["exec", "ex", "--", "true"], b"");
    assert!(text(&out.stderr).contains("is not running"), "{}", text(&out.stderr));
}
