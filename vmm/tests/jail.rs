//! Host side, tests: the VMM's jail on real threads — each thread kind runs
//! the work it does in a VM under its own seccomp filter (and the file
//! server under Landlock), and a forbidden call stops the thread, stops
//! the VM with the reason, and ends the process if the stop does not
//! finish. The jail is process-wide once enabled, so the violation cases
//! run in child processes (this test binary, re-run for one case).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vmm::control::{Stop, StopReason};
use vmm::threads::{self, PanicReport, PathRule, Reach, ThreadKind};

/// The exit code the child processes give the jail for its last resort.
const CHILD_EXIT: i32 = 77;

fn jail() -> Arc<Stop> {
    static ONCE: Once = Once::new();
    let stop = Arc::new(Stop::default());
    ONCE.call_once(|| {
        threads::enable_jail(stop.clone(), libc::SIGRTMIN(), None).unwrap();
    });
    stop
}

/// Runs `f` on a thread confined as `kind` (Landlock to `reach`) and
/// returns its result; fails the test, naming the call, if the thread hit
/// its filter.
fn confined<T: Send + 'static>(kind: ThreadKind, reach: Reach, f: impl FnOnce() -> T + Send + 'static) -> T {
    let stop = jail();
    let h = threads::spawn(kind, &format!("test-{}", kind.as_str()), PanicReport::to(&stop), reach, f).unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !h.is_finished() {
        if let Some((k, nr)) = threads::violation() {
            let k = k.map_or("helper", |k| k.as_str());
            panic!("a {k} thread hit its filter: system call {nr} ({:?})", vmm::seccomp_filters::syscall_name(nr));
        }
        assert!(Instant::now() < until, "the {} thread did not finish", kind.as_str());
        std::thread::sleep(Duration::from_millis(5));
    }
    match h.join().unwrap() {
        Some(v) => v,
        None => panic!("the {} thread failed: {:?}", kind.as_str(), stop.reason()),
    }
}

fn status_field(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default().trim().to_string()
}

#[test]
fn each_kind_runs_its_work_under_its_filter() {
    // vCPU: block I/O on a disk image, the console log rotated.
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 8192]).unwrap();
    let d = disk.clone();
    let dir = t.path().to_path_buf();
    let seccomp = confined(ThreadKind::Vcpu, Reach::Only(vec![PathRule { path: dir, write: true }]), move || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&d).unwrap();
        f.write_all_at(b"sector", 512).unwrap();
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b, 512).unwrap();
        f.sync_data().unwrap();
        std::fs::rename(&d, d.with_extension("old")).unwrap();
        let etc = std::fs::read("/etc/hostname").map_err(|e| e.raw_os_error());
        // (/proc too is a path it does not reach.)
        let proc = std::fs::read("/proc/thread-self/status").map_err(|e| e.raw_os_error());
        (b, proc, etc)
    });
    assert_eq!(&seccomp.0, b"sector");
    assert_eq!(seccomp.1, Err(Some(libc::EACCES)), "a vCPU reaches the sandbox's directory only");
    assert_eq!(seccomp.2, Err(Some(libc::EACCES)), "a vCPU reaches the sandbox's directory only");

    // Network: resolving, connecting, a thread of its own (the connect
    // threads), non-blocking sockets.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"pong").unwrap();
    });
    let system: Vec<PathRule> = ["/etc", "/run", "/usr/lib", "/lib", "/lib64"]
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| PathRule { path: p.into(), write: false })
        .collect();
    let home = std::env::var("HOME").unwrap_or("/root".into());
    let (got, resolved, home_read) = confined(ThreadKind::Net, Reach::Only(system), move || {
        let resolved = ("localhost", 80).to_socket_addrs().map(|a| a.count()).map_err(|e| e.to_string());
        let home_read = std::fs::read_dir(&home).map(|_| ()).map_err(|e| e.raw_os_error());
        let got = std::thread::spawn(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_nonblocking(false).unwrap();
            let mut b = Vec::new();
            s.read_to_end(&mut b).unwrap();
            b
        })
        .join()
        .unwrap();
        (got, resolved, home_read)
    });
    assert_eq!(got, b"pong");
    assert!(resolved.as_ref().is_ok_and(|n| *n > 0), "the host resolver works: {resolved:?}");
    assert_eq!(home_read, Err(Some(libc::EACCES)), "netstack cannot read the user's files");
    server.join().unwrap();

    // Control channel: accepting the host's connections to its socket.
    let sock = t.path().join("control.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"hello").unwrap();
    });
    // (It may not open any file at all: its filter has no openat.)
    let before = euid();
    let (got, worker_euid) = confined(ThreadKind::Vsock, Reach::Only(vec![]), move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        s.set_nonblocking(false).unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b).unwrap();
        (b, euid())
    });
    assert_eq!(got, b"hello");
    if before == 0 {
        assert_eq!(worker_euid, threads::NOBODY, "as root, the control channel's worker runs as nobody");
    } else {
        assert_eq!(worker_euid, before, "not root: the user stays");
    }
    assert_eq!(euid(), before, "the rest of the process keeps its user");
    client.join().unwrap();

    // Control: threads, unix sockets, the sandbox's state files.
    let state = t.path().join("state");
    let ok = confined(ThreadKind::Control, Reach::Unconfined, move || {
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("last.tmp"), "x").unwrap();
        std::fs::rename(state.join("last.tmp"), state.join("last")).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || (&a).write_all(b"y").unwrap()).join().unwrap();
        let mut buf = [0u8; 1];
        b.read_exact(&mut buf).unwrap();
        let seccomp = status_field("Seccomp:");
        (std::fs::read_to_string(state.join("last")).unwrap() + std::str::from_utf8(&buf).unwrap(), seccomp)
    });
    assert_eq!(ok.0, "xy");
    assert_eq!(ok.1, "2", "the thread runs under a seccomp filter");
}

#[test]
fn the_file_server_reaches_its_folder_and_nothing_else() {
    let t = tempfile::tempdir().unwrap();
    let share = t.path().join("work");
    let ro = t.path().join("ro");
    let outside = t.path().join("secret");
    for d in [&share, &ro] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(&outside, "host secret").unwrap();
    std::fs::write(ro.join("doc"), "read me").unwrap();
    let paths = vec![PathRule { path: share.clone(), write: true }, PathRule { path: ro.clone(), write: false }];
    let (s, o, r) = (share.clone(), outside.clone(), ro.clone());
    let result = confined(ThreadKind::Fs, Reach::Only(paths), move || {
        use std::os::unix::fs::{symlink, PermissionsExt};
        // What the file server does in its folder.
        std::fs::create_dir_all(s.join("a/b")).unwrap();
        std::fs::write(s.join("a/b/f"), "data").unwrap();
        std::fs::rename(s.join("a/b/f"), s.join("a/g")).unwrap();
        symlink("g", s.join("a/link")).unwrap();
        std::fs::File::open(s.join("a/g")).unwrap().set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
        let listed = std::fs::read_dir(s.join("a")).unwrap().count();
        std::fs::remove_file(s.join("a/link")).unwrap();
        let read_only = std::fs::read_to_string(r.join("doc")).unwrap();
        let ro_write = std::fs::write(r.join("new"), "x").map_err(|e| e.raw_os_error());
        // Anything else on the host: refused whatever the path.
        let outside_read = std::fs::read(&o).map_err(|e| e.raw_os_error());
        let etc = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
        let escape = std::fs::read(s.join("../secret")).map_err(|e| e.raw_os_error());
        (listed, read_only, ro_write, outside_read, etc, escape)
    });
    assert_eq!(result.0, 3, "b/, g and link");
    assert_eq!(result.1, "read me");
    assert_eq!(result.2, Err(Some(libc::EACCES)), "a read-only folder stays read-only");
    assert_eq!(result.3, Err(Some(libc::EACCES)), "a file beside the folder is out of reach");
    assert_eq!(result.4, Err(Some(libc::EACCES)), "/etc is out of reach");
    assert_eq!(result.5, Err(Some(libc::EACCES)), "`..` does not lead out");
    assert_eq!(std::fs::read_to_string(share.join("a/g")).unwrap(), "data");
    assert_eq!(threads::landlock_state(), threads::LandlockState::Enforced);
}

#[test]
fn hardening_sets_no_new_privs_and_drops_capabilities() {
    let (nnp, eff, bnd, root) = std::thread::spawn(|| {
        threads::harden_process().unwrap();
        (status_field("NoNewPrivs:"), status_field("CapEff:"), status_field("CapBnd:"), is_root())
    })
    .join()
    .unwrap();
    assert_eq!(nnp, "1");
    let eff = u64::from_str_radix(&eff, 16).unwrap();
    let bnd = u64::from_str_radix(&bnd, 16).unwrap();
    assert_eq!(eff & !threads::KEPT_CAPABILITIES, 0, "only the kept capabilities are effective");
    if root {
        let bounding = threads::KEPT_CAPABILITIES | threads::SWITCH_USER;
        assert_eq!(bnd & !bounding, 0, "nothing else can come back either");
        assert_eq!(eff, threads::KEPT_CAPABILITIES, "root keeps what the file server needs");
    }
    // The rest of the process is untouched (a thread's own sets).
    assert_ne!(status_field("NoNewPrivs:"), "", "status readable");
}

/// The calling thread's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (from /proc, no libc call).
fn is_root() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = s.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
    uid.split_whitespace().nth(1) == Some("0")
}

/// The violations: (kind, what the thread does, the call its filter
/// traps; None where the thread has every signal blocked at that moment:
/// glibc does, around the clone of a new thread or process, and a trap
/// that cannot be handled kills the whole process with SIGSYS).
const VIOLATIONS: &[(&str, &str, Option<&str>)] = &[
    ("vcpu", "tty-ioctl", Some("ioctl")),
    ("vcpu", "spawn", None),
    ("network", "spawn", None),
    ("network", "tty-ioctl", Some("ioctl")),
    // A thread netstack started itself (a connect thread) has the
    // network filter but no kind of its own: "helper".
    ("network", "helper-tty-ioctl", Some("ioctl")),
    ("file server", "inet-socket", Some("socket")),
    ("control channel", "tty-ioctl", Some("ioctl")),
    ("control", "inet-socket", Some("socket")),
];

#[test]
fn a_confined_thread_that_panics_stops_the_vm_with_its_message_even_with_backtraces_on() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "violation_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SBX_JAIL_CHILD", "vcpu/panic")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let case = format!("{:?}\nstdout {stdout}\nstderr {stderr}", out.status);
    assert_eq!(out.status.code(), Some(0), "{case}");
    assert!(stdout.contains("PANIC REPORTED: VMM thread victim failed: vcpu panicked: a bug in a device"), "{case}");
    assert!(stderr.contains("sbx: vcpu thread 'victim' panicked at"), "{case}");
    assert!(!stderr.contains("made system call"), "the backtrace is not attempted: {case}");
}

#[test]
fn a_forbidden_call_stops_the_thread_and_the_vm_and_at_last_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = VIOLATIONS
        .iter()
        .map(|(kind, action, _)| {
            let child = Command::new(&exe)
                .args(["--exact", "violation_child", "--ignored", "--nocapture", "--test-threads=1"])
                .env("SBX_JAIL_CHILD", format!("{kind}/{action}"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (child, Instant::now())
        })
        .collect();
    for ((child, started), (kind, action, call)) in children.into_iter().zip(VIOLATIONS) {
        let out = child.wait_with_output().unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let case = format!("{kind}/{action}: {:?}\nstdout {stdout}\nstderr {stderr}", out.status);
        assert!(!stdout.contains("STILL ALIVE"), "{case}");
        let Some(call) = call else {
            // Signals blocked: the kernel kills the process at once.
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{case}");
            assert!(!stdout.contains("STOPPED"), "{case}");
            continue;
        };
        let kind = if action.starts_with("helper") { "helper" } else { kind };
        // The thread's own words, from the signal handler.
        assert!(stderr.contains(&format!("a {kind} thread made system call")), "{case}");
        assert!(stderr.contains(&format!("({call})")), "{case}");
        // The VM's stop reason, as the child saw it.
        assert!(stdout.contains(&format!("STOPPED: A {kind} thread of the VMM made system call")), "{case}");
        assert!(stdout.contains("THREAD PARKED"), "the thread never returned to its code: {case}");
        // The last resort: the process ends with the code it was given.
        assert_eq!(out.status.code(), Some(CHILD_EXIT), "{case}");
        assert!(took >= threads::VIOLATION_GRACE, "{case}");
        assert!(took < threads::VIOLATION_GRACE * 4, "{case}: {took:?}");
    }
}

/// One violation case (run by the test above in a process of its own).
#[test]
#[ignore = "a child of a_forbidden_call_stops_the_thread_and_the_vm_and_at_last_the_process"]
fn violation_child() {
    let case = std::env::var("SBX_JAIL_CHILD").expect("run by its parent test");
    let (kind, action) = case.split_once('/').unwrap();
    let kind = ThreadKind::ALL.into_iter().find(|k| k.as_str() == kind).unwrap();
    let stop = Arc::new(Stop::default());
    threads::enable_jail(stop.clone(), libc::SIGRTMIN(), Some(CHILD_EXIT)).unwrap();
    let action = action.to_string();
    let h = threads::spawn(kind, "victim", PanicReport::to(&stop), Reach::Unconfined, move || match action.as_str() {
        "spawn" => drop(Command::new("/bin/true").status()),
        "tty-ioctl" => drop(std::io::IsTerminal::is_terminal(&std::io::stdin())),
        "inet-socket" => drop(TcpListener::bind("127.0.0.1:0")),
        "panic" => panic!("a bug in a device"),
        "helper-tty-ioctl" => {
            // Parked, the helper never ends: not joined.
            let _ = std::thread::spawn(|| std::io::IsTerminal::is_terminal(&std::io::stdin()));
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown action {other}"),
    })
    .unwrap();
    assert!(stop.wait(Some(Duration::from_secs(30))), "the VM was not stopped");
    if let Some(StopReason::ThreadPanicked { .. }) = stop.reason() {
        // A panic is no violation: the thread ends, nothing is parked.
        println!("PANIC REPORTED: {}", stop.reason().unwrap());
        assert_eq!(h.join().unwrap(), None);
        assert!(threads::violation().is_none());
        return;
    }
    if let Some(StopReason::SyscallForbidden { .. }) = stop.reason() {
        println!("STOPPED: {}", stop.reason().unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    if !h.is_finished() {
        println!("THREAD PARKED");
    }
    let _ = std::io::stdout().flush();
    // The jail's watcher ends the process after its grace.
    std::thread::sleep(threads::VIOLATION_GRACE * 3);
    println!("STILL ALIVE");
}
