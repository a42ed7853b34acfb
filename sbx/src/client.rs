//! Host side: the client end of the control channel — what `sbx exec`
//! does. It connects to a running VMM's control socket (the VMM relays it
//! to guest-init over vsock), opens a session, relays the user's terminal
//! or pipes and signals, and returns how the program ended. Frames from
//! the guest are parsed with protocol::session's bounded reader.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use protocol::session::{Frame, Open, Reader, MAX_DATA};

use thiserror::Error;
use vmm::threads::{Reach, ThreadKind};

use crate::termfilter::TerminalFilter;
use crate::terminal;

/// Why a session could not be run to its end.
#[derive(Debug, Error)]
pub enum Error {
    #[error("The sandbox stopped before the session opened")]
    StoppedBeforeOpen,
    #[error("The guest did not accept the session (is it still booting?)")]
    NotAccepted,
    #[error("Cannot reach the sandbox's control socket {0}: {1}")]
    Connect(std::path::PathBuf, io::Error),
    #[error("Cannot use the session: {0}")]
    Io(io::Error),
    #[error("From the guest: {0}")]
    Protocol(String),
    #[error("Unexpected frame from the guest: {0}")]
    Unexpected(String),
    #[error("The sandbox closed the session before the program ended (was it stopped?)")]
    Closed,
    #[error("Lost the session: {0}")]
    Lost(io::Error),
    #[error("Cannot start the session's thread: {0}")]
    Thread(#[source] vmm::threads::JailError),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Killed(i32),
    /// guest-init could not run it; the message says why.
    Failed(String),
}

/// Where signal handlers find the session to send to (None until it is
/// open).
pub type Writer = Arc<Mutex<Option<Arc<Mutex<UnixStream>>>>>;

/// Sends a frame to the session in `w`, if there is one.
pub fn send_to(w: &Writer, f: &Frame) -> bool {
    let session = w.lock().unwrap_or_else(|p| p.into_inner()).clone();
    session.is_some_and(|s| send(&s, f))
}

/// A resize frame for the user's terminal now.
pub fn resize_frame() -> Option<Frame> {
    terminal::size(1).map(|(rows, cols)| Frame::Resize { rows, cols })
}

/// Connects and opens a session, retrying while guest-init is not
/// listening yet (the guest still booting) for up to `wait`, unless
/// `give_up` says the guest is gone.
fn open_session(
    socket: &Path,
    open: &Open,
    wait: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<(UnixStream, Reader), Error> {
    // A wait too long to represent is no deadline at all.
    let deadline = Instant::now().checked_add(wait);
    let in_time = || deadline.is_none_or(|d| Instant::now() < d);
    loop {
        if give_up() {
            return Err(Error::StoppedBeforeOpen);
        }
        let attempt = (|| -> io::Result<Option<(UnixStream, Reader)>> {
            let mut s = UnixStream::connect(socket)?;
            s.write_all(&Frame::Open(open.clone()).encode())?;
            // The first frame tells whether guest-init took the session; a
            // close before it means nobody was listening in the guest.
            let mut reader = Reader::default();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            reader.feed(&buf[..n]);
            Ok(Some((s, reader)))
        })();
        match attempt {
            Ok(Some(session)) => return Ok(session),
            Ok(None) | Err(_) if in_time() => thread::sleep(Duration::from_millis(250)),
            Ok(None) => return Err(Error::NotAccepted),
            Err(e) => return Err(Error::Connect(socket.to_path_buf(), e)),
        }
    }
}

/// Opens a session in pipe mode (no terminal, no stdin relayed) for a
/// caller that speaks the frames itself (`sbx cp`): the stream and the
/// reader holding what arrived with the first frame.
pub fn open_pipes(socket: &Path, mut open: Open, wait: Duration) -> Result<(UnixStream, Reader), Error> {
    open.tty = None;
    open_session(socket, &open, wait, &|| false)
}

/// As [`open_pipes`], giving up early when `give_up` says so (the VM
/// has ended).
pub fn open_pipes_until(
    socket: &Path,
    mut open: Open,
    wait: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<(UnixStream, Reader), Error> {
    open.tty = None;
    open_session(socket, &open, wait, give_up)
}

fn send(w: &Mutex<UnixStream>, f: &Frame) -> bool {
    w.lock().unwrap_or_else(|p| p.into_inner()).write_all(&f.encode()).is_ok()
}

/// `sbx exec`: runs a session to its end, signals to this process going
/// to the program (SIGWINCH as a resize). Call before starting threads.
pub fn exec(socket: &Path, open: Open, interactive: bool, wait: Duration) -> Result<Outcome, Error> {
    let writer = Writer::default();
    let for_signals = writer.clone();
    let blocked = crate::signals::block(&[libc::SIGWINCH, libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    blocked
        .forward(move |event| {
            let frame = match event {
                crate::signals::Event::Signal(libc::SIGWINCH) => resize_frame(),
                crate::signals::Event::Signal(sig) => Some(Frame::Signal(sig)),
                crate::signals::Event::Deadline => None,
            };
            if let Some(f) = frame {
                send_to(&for_signals, &f);
            }
            None
        })
        .map_err(Error::Thread)?;
    let input = Input::start().map_err(Error::Thread)?;
    run_session(socket, open, interactive, wait, &writer, &|| false, input).map(|(o, _)| o)
}

/// Runs a session to its end; `writer` is filled in once it is open, for
/// the caller's signal handling. With `interactive`, the user's terminal
/// is put in raw mode (restored on return) and gives the session its
/// size. `input` takes the user's input to the session once it is open.
/// Returns how it ended and when its first output arrived.
pub fn run_session(
    socket: &Path,
    mut open: Open,
    interactive: bool,
    wait: Duration,
    writer: &Writer,
    give_up: &dyn Fn() -> bool,
    input: Input,
) -> Result<(Outcome, Option<Instant>), Error> {
    if interactive {
        open.tty = Some(terminal::size(1).unwrap_or((24, 80)));
    }
    let (stream, mut reader) = open_session(socket, &open, wait, give_up)?;
    let w = Arc::new(Mutex::new(stream.try_clone().map_err(Error::Io)?));
    *writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
    let raw = if interactive { terminal::RawMode::enter(0).ok() } else { None };
    input.forward_to(w);
    let mut first_output = None;
    let mut filters = OutputFilters::for_terminals();
    let outcome = read_output(stream, &mut reader, &mut first_output, &mut filters);
    filters.finish();
    drop(raw);
    let dropped = filters.dropped();
    if dropped > 0 {
        eprintln!(
            "sbx: removed {dropped} escape sequence(s) from the program's output that would have reached beyond \
             the terminal (clipboard, file transfer, terminal control; see sbx/src/termfilter.rs)"
        );
    }
    outcome.map(|o| (o, first_output))
}

/// The input forwarder: a thread of its own, confined as
/// [`ThreadKind::Session`] once the jail is on (it reads standard input
/// and writes to the session's socket: no path, no new socket, no
/// thread), that copies the user's input into Stdin frames once it is
/// given the session (`Input::forward_to`); end of input is StdinEof.
/// Started before the session opens: in `sbx run`, before the main thread
/// confines itself (a confined thread cannot start one of another kind).
/// Dropped unused, the thread ends without reading.
pub struct Input(mpsc::Sender<Arc<Mutex<UnixStream>>>);

impl Input {
    pub fn start() -> Result<Input, vmm::threads::JailError> {
        let (tx, rx) = mpsc::channel::<Arc<Mutex<UnixStream>>>();
        vmm::threads::spawn_confined(ThreadKind::Session, "stdin", Reach::Only(Vec::new()), move || {
            let Ok(w) = rx.recv() else { return };
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        send(&w, &Frame::StdinEof);
                        return;
                    }
                    Ok(n) => {
                        if !send(&w, &Frame::Stdin(buf[..n].to_vec())) {
                            return;
                        }
                    }
                }
            }
        })?;
        Ok(Input(tx))
    }

    /// From now on the user's input goes to `w`.
    fn forward_to(self, w: Arc<Mutex<UnixStream>>) {
        let _ = self.0.send(w);
    }
}

/// The session's stdout and stderr filters: one for each that is a
/// terminal (output piped or redirected stays the program's, byte for
/// byte).
struct OutputFilters {
    stdout: Option<TerminalFilter>,
    stderr: Option<TerminalFilter>,
}

impl OutputFilters {
    fn for_terminals() -> OutputFilters {
        OutputFilters {
            stdout: terminal::is_tty(1).then(TerminalFilter::default),
            stderr: terminal::is_tty(2).then(TerminalFilter::default),
        }
    }

    fn pass(filter: &mut Option<TerminalFilter>, out: &mut dyn Write, data: &[u8]) {
        let _ = match filter {
            Some(f) => out.write_all(&f.feed(data)),
            None => out.write_all(data),
        };
    }

    /// Writes what the filters still hold (the start of a sequence that
    /// the output ended in).
    fn finish(&mut self) {
        if let Some(f) = &mut self.stdout {
            let _ = io::stdout().write_all(&f.finish());
            let _ = io::stdout().flush();
        }
        if let Some(f) = &mut self.stderr {
            let _ = io::stderr().write_all(&f.finish());
        }
    }

    fn dropped(&self) -> u64 {
        self.stdout.as_ref().map_or(0, |f| f.dropped()) + self.stderr.as_ref().map_or(0, |f| f.dropped())
    }
}

fn read_output(
    mut stream: UnixStream,
    reader: &mut Reader,
    first_output: &mut Option<Instant>,
    filters: &mut OutputFilters,
) -> Result<Outcome, Error> {
    let mut out = io::stdout().lock();
    let mut err = io::stderr();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(f) = reader.next_frame().map_err(|e| Error::Protocol(e.to_string()))? {
            match f {
                Frame::Started { .. } => {}
                Frame::Stdout(d) => {
                    first_output.get_or_insert_with(Instant::now);
                    OutputFilters::pass(&mut filters.stdout, &mut out, &d);
                    let _ = out.flush();
                }
                Frame::Stderr(d) => {
                    first_output.get_or_insert_with(Instant::now);
                    OutputFilters::pass(&mut filters.stderr, &mut err, &d);
                }
                Frame::Exit(c) => return Ok(Outcome::Exited(c)),
                Frame::Killed(s) => return Ok(Outcome::Killed(s)),
                Frame::Error(m) => return Ok(Outcome::Failed(m)),
                other => return Err(Error::Unexpected(crate::escape::line(&format!("{other:?}")))),
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(Error::Closed),
            Ok(n) => reader.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Lost(e)),
        }
    }
}
