//! Guest side: the control channel's server. guest-init listens on vsock
//! port [`CONTROL_PORT`] (the host's VMM is the only peer a vsock can
//! have: this is not the guest's network) and runs one session per
//! connection, on its own thread: a program with argv, env, cwd and user,
//! on a new pseudo-terminal (size, resizes, signals to its process group)
//! or on pipes, its output streamed back, then how it ended.
//!
//! PID 1's main loop reaps every child; a session's child is handed to
//! its session through [`deliver`]. Frames from the host are parsed with
//! the bounded reader of `protocol::session`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use protocol::session::{Frame, Open, Reader, MAX_DATA};

use crate::sys::{self, Ended};

pub const CONTROL_PORT: u32 = 1024;
/// How long a session waits, after its program ended, for output still
/// buffered or held open by the program's own children.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Input from the host held for a program that is not reading it; past
/// this the session stops reading from the host.
const MAX_PENDING_INPUT: usize = 1 << 20;
/// Exits of unknown children kept for a session that registers late.
const MAX_UNCLAIMED: usize = 1024;
/// Without a pipe to be woken through (none could be made), how often a
/// session looks whether its program has ended.
const EXIT_POLL_FALLBACK_MS: i32 = 50;

#[derive(Default)]
struct Registry {
    /// Sessions waiting for their program's end: where to send it, and the
    /// write end of the pipe that wakes the session's poll.
    waiting: HashMap<libc::pid_t, (Sender<Ended>, Option<File>)>,
    unclaimed: HashMap<libc::pid_t, Ended>,
}

/// How a session learns that its program ended: the exit, and a pipe that
/// becomes readable once it is there, so that the session can sleep in
/// poll(2) without a timeout (each wake-up of an idle guest is emulated
/// kernel work on kvm_pvm hosts).
struct Watch {
    exited: Receiver<Ended>,
    ready: Option<OwnedFd>,
}

fn notify(w: &Option<File>) {
    if let Some(mut f) = w.as_ref() {
        let _ = f.write(&[1]);
    }
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// Tells the session that started `pid` how it ended (called by the main
/// loop for every reaped child that is not the main program).
pub fn deliver(pid: libc::pid_t, ended: Ended) {
    let mut r = registry().lock().unwrap_or_else(|p| p.into_inner());
    match r.waiting.remove(&pid) {
        Some((tx, wake)) => {
            let _ = tx.send(ended);
            notify(&wake);
        }
        None if r.unclaimed.len() < MAX_UNCLAIMED => {
            r.unclaimed.insert(pid, ended);
        }
        None => {}
    }
}

fn watch(pid: libc::pid_t) -> Watch {
    let (tx, rx) = mpsc::channel();
    let (ready, wake) = match sys::pipe() {
        Ok((r, w)) => (Some(r), Some(File::from(w))),
        Err(_) => (None, None),
    };
    let mut r = registry().lock().unwrap_or_else(|p| p.into_inner());
    match r.unclaimed.remove(&pid) {
        Some(e) => {
            let _ = tx.send(e);
            notify(&wake);
        }
        None => {
            r.waiting.insert(pid, (tx, wake));
        }
    }
    Watch { exited: rx, ready }
}

/// How PID 1 follows the main session (`sbx run`'s program).
pub struct Main {
    /// The main program's pid once started, or why it could not start.
    pub started: Receiver<Result<libc::pid_t, String>>,
    /// The main session has sent its last frame.
    pub done: Receiver<()>,
}

#[derive(Clone)]
struct MainSenders {
    started: Sender<Result<libc::pid_t, String>>,
    done: Sender<()>,
}

/// Only one session per boot may be the main one.
static MAIN_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts listening; sessions get `base_env` (then their own).
pub fn start(base_env: Vec<(String, String)>) -> Result<Main, String> {
    let listener =
        sys::vsock_listen(CONTROL_PORT).map_err(|e| format!("Cannot listen on vsock port {CONTROL_PORT}: {e}"))?;
    let (started_tx, started) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let senders = MainSenders { started: started_tx, done: done_tx };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || loop {
            match sys::accept(&listener) {
                Ok(conn) => {
                    let (env, main) = (base_env.clone(), senders.clone());
                    let _ = std::thread::Builder::new().name("session".into()).spawn(move || session(conn, env, main));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        })
        .map_err(|e| format!("Cannot start the control thread: {e}"))?;
    Ok(Main { started, done })
}

struct User {
    uid: libc::uid_t,
    gid: libc::gid_t,
    home: String,
    name: String,
}

/// "" (root), a name from /etc/passwd, or `UID[:GID]`.
fn lookup_user(spec: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries: Vec<User> = passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(User {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5)?.to_string(),
            })
        })
        .collect();
    let spec = if spec.is_empty() { "root" } else { spec };
    if let Some(u) = entries.into_iter().find(|u| u.name == spec || u.uid.to_string() == spec) {
        return Ok(u);
    }
    let (uid, gid) = spec.split_once(':').unwrap_or((spec, spec));
    match (uid.parse(), gid.parse()) {
        (Ok(uid), Ok(gid)) => Ok(User { uid, gid, home: "/".into(), name: spec.into() }),
        _ => Err(format!("No user '{spec}' in the guest")),
    }
}

/// A started program and the descriptors its session relays.
struct Running {
    pid: libc::pid_t,
    /// Where the host's input goes (pty master or stdin pipe).
    input: Option<File>,
    /// (descriptor, is stderr) for each output still open.
    outputs: Vec<(File, bool)>,
    /// The pty master, for resizes.
    pty: Option<OwnedFd>,
    /// Input from the host not yet taken by the program.
    pending: Vec<u8>,
    /// The host's input has ended: once `pending` is written, close the
    /// input (pipes) or send the terminal's end-of-file character.
    input_eof: bool,
}

fn start_program(open: &Open, base_env: &[(String, String)]) -> Result<Running, String> {
    if open.argv.is_empty() {
        return Err("No command given".into());
    }
    let user = lookup_user(&open.user)?;
    let mut env = base_env.to_vec();
    env.retain(|(k, _)| k != "HOME" && k != "USER");
    env.push(("HOME".into(), user.home.clone()));
    env.push(("USER".into(), user.name.clone()));
    for (k, v) in &open.env {
        env.retain(|(old, _)| old != k);
        env.push((k.clone(), v.clone()));
    }
    let cwd = if open.cwd.is_empty() { user.home.clone() } else { open.cwd.clone() };
    let exec = sys::Exec::new(&open.argv, &env, &cwd)
        .map_err(|e| format!("Cannot run '{}': {e}", open.argv[0]))?
        .run_as(user.uid, user.gid);
    let start_err = |e: io::Error| format!("Cannot start '{}': {e}", open.argv[0]);
    match open.tty {
        Some((rows, cols)) => {
            let (master, slave) = sys::open_pty(rows, cols).map_err(|e| format!("Cannot open a terminal: {e}"))?;
            let pid = sys::spawn_on_tty(&exec, &slave).map_err(start_err)?;
            drop(slave);
            sys::set_nonblocking(&master).map_err(|e| e.to_string())?;
            let output = File::from(master.try_clone().map_err(|e| e.to_string())?);
            let input = File::from(master.try_clone().map_err(|e| e.to_string())?);
            Ok(Running {
                pid,
                input: Some(input),
                outputs: vec![(output, false)],
                pty: Some(master),
                pending: Vec::new(),
                input_eof: false,
            })
        }
        None => {
            let pipe = || sys::pipe().map_err(|e| format!("Cannot make a pipe: {e}"));
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let pid = sys::spawn(&exec, [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()], false)
                .map_err(start_err)?;
            for fd in [&out_r, &err_r, &in_w] {
                sys::set_nonblocking(fd).map_err(|e| e.to_string())?;
            }
            Ok(Running {
                pid,
                input: Some(File::from(in_w)),
                outputs: vec![(File::from(out_r), false), (File::from(err_r), true)],
                pty: None,
                pending: Vec::new(),
                input_eof: false,
            })
        }
    }
}

fn send(sock: &mut File, f: &Frame) -> bool {
    sock.write_all(&f.encode()).is_ok()
}

/// Reads until the client's Open frame.
fn read_open(sock: &mut File, reader: &mut Reader) -> Result<Option<Open>, String> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.next_frame() {
            Ok(Some(Frame::Open(o))) => return Ok(Some(o)),
            Ok(Some(_)) => return Err("The first frame must open a session".into()),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => reader.feed(&buf[..n]),
        }
    }
}

fn session(conn: OwnedFd, base_env: Vec<(String, String)>, main: MainSenders) {
    let mut sock = File::from(conn);
    let mut reader = Reader::default();
    let open = match read_open(&mut sock, &mut reader) {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(msg) => {
            send(&mut sock, &Frame::Error(msg));
            return;
        }
    };
    if open.main && MAIN_TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        send(&mut sock, &Frame::Error("This sandbox's main program is already running".into()));
        return;
    }
    let mut run = match start_program(&open, &base_env) {
        Ok(r) => r,
        Err(msg) => {
            send(&mut sock, &Frame::Error(msg.clone()));
            if open.main {
                let _ = main.started.send(Err(msg));
            }
            return;
        }
    };
    // Watch before PID 1 can reap it as the main program.
    let exited = watch(run.pid);
    if open.main {
        let _ = main.started.send(Ok(run.pid));
    }
    if !send(&mut sock, &Frame::Started { pid: run.pid as u32 }) {
        sys::kill_group(run.pid, libc::SIGHUP);
    }
    let end = relay(&mut sock, &mut reader, &mut run, &exited);
    let last = match end {
        Ended::Exited(c) => Frame::Exit(c),
        Ended::Signaled(s) => Frame::Killed(s),
    };
    send(&mut sock, &last);
    if open.main {
        let _ = main.done.send(());
    }
}

/// Moves bytes between the host and the program until it has ended and
/// its output is drained; returns how it ended.
fn relay(sock: &mut File, reader: &mut Reader, run: &mut Running, watch: &Watch) -> Ended {
    let mut buf = vec![0u8; MAX_DATA];
    let mut client_gone = false;
    let mut ended: Option<(Ended, Instant)> = None;
    loop {
        if ended.is_none() {
            ended = watch.exited.try_recv().ok().map(|e| (e, Instant::now()));
        }
        if let Some((_, at)) = &ended {
            if run.outputs.is_empty() || at.elapsed() > DRAIN_GRACE {
                break;
            }
        }
        // Input the program has not taken yet bounds what is read from the
        // host (whose further sends then wait on vsock credit), so neither
        // side can block the other: every descriptor here is non-blocking.
        let take_input = !client_gone && run.pending.len() < MAX_PENDING_INPUT;
        let mut fds = vec![(sock.as_raw_fd(), if take_input { libc::POLLIN } else { 0 })];
        let input_fd = run.input.as_ref().filter(|_| !run.pending.is_empty()).map(|f| f.as_raw_fd()).unwrap_or(-1);
        fds.push((input_fd, libc::POLLOUT));
        fds.extend(run.outputs.iter().map(|(f, _)| (f.as_raw_fd(), libc::POLLIN)));
        // Until the program ends, sleep until something happens (its end
        // makes `ready` readable); then no longer than the drain grace.
        let timeout = match (&ended, &watch.ready) {
            (Some((_, at)), _) => DRAIN_GRACE.saturating_sub(at.elapsed()).as_millis() as i32 + 1,
            (None, Some(ready)) => {
                fds.push((ready.as_raw_fd(), libc::POLLIN));
                -1
            }
            (None, None) => EXIT_POLL_FALLBACK_MS,
        };
        let revents = sys::poll(&fds, timeout);
        if revents[1] != 0 {
            feed_program(run);
        }
        if take_input && revents[0] != 0 {
            match sock.read(&mut buf) {
                Ok(n) if n > 0 => {
                    reader.feed(&buf[..n]);
                    if !handle_input(reader, run) {
                        client_gone = true;
                    }
                }
                _ => client_gone = true,
            }
            if client_gone {
                // Nobody to report to: end the program as a hangup would.
                sys::kill_group(run.pid, libc::SIGHUP);
            }
        }
        let mut closed = Vec::new();
        for (i, (f, is_err)) in run.outputs.iter_mut().enumerate() {
            if revents.get(i + 2).copied().unwrap_or(0) == 0 && ended.is_none() {
                continue;
            }
            match f.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let frame = if *is_err { Frame::Stderr(data) } else { Frame::Stdout(data) };
                    if !client_gone && !send(sock, &frame) {
                        client_gone = true;
                        sys::kill_group(run.pid, libc::SIGHUP);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: the terminal's last user is gone.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            run.outputs.remove(i);
        }
    }
    ended.map(|(e, _)| e).unwrap_or(Ended::Signaled(libc::SIGKILL))
}

/// Writes what the program's input takes now; at the host's end of
/// input, once everything is written, closes it (pipes) or types the
/// terminal's end-of-file character (VEOF, ^D).
fn feed_program(run: &mut Running) {
    let Some(input) = run.input.as_mut() else {
        run.pending.clear();
        return;
    };
    while !run.pending.is_empty() {
        match input.write(&run.pending) {
            Ok(0) => break,
            Ok(n) => {
                run.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // The program closed its input: what is left goes nowhere.
            Err(_) => {
                run.input = None;
                run.pending.clear();
                return;
            }
        }
    }
    if run.input_eof && run.pending.is_empty() {
        if run.pty.is_some() {
            run.pending.push(4);
            run.input_eof = false;
            feed_program(run);
            // One ^D is enough; later input is still for the terminal.
        } else {
            run.input = None;
        }
    }
}

/// Applies the host's frames; false if the host broke the protocol.
fn handle_input(reader: &mut Reader, run: &mut Running) -> bool {
    loop {
        match reader.next_frame() {
            Ok(None) => return true,
            Err(_) => return false,
            Ok(Some(f)) => match f {
                Frame::Stdin(data) if !run.input_eof => {
                    if run.input.is_some() {
                        run.pending.extend_from_slice(&data);
                        feed_program(run);
                    }
                }
                Frame::StdinEof => {
                    run.input_eof = true;
                    feed_program(run);
                }
                Frame::Resize { rows, cols } => {
                    if let Some(pty) = &run.pty {
                        // The kernel sends SIGWINCH to the foreground group.
                        let _ = sys::set_winsize(pty, rows, cols);
                    }
                }
                Frame::Signal(sig) if (1..=64).contains(&sig) => sys::kill_group(run.pid, sig),
                _ => return false,
            },
        }
    }
}
