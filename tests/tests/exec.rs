//! Host side: end-to-end test of the control channel — `sbx exec` sessions
//! (vsock to guest-init) beside a running sandbox's first program: pipes,
//! exit status, stdin, users, a terminal with its size and resizes, and
//! interrupts. One boot.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
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

#[test]
fn exec_runs_sessions_beside_the_first_program() {
    let Some(sbx) = Sbx::new() else { return };
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
