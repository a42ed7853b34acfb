//! Host side: the one place the VMM starts threads ([`spawn`]) and jails
//! them. Each thread has a [`ThreadKind`] saying what it runs (a vCPU, a
//! device worker, the VM's supervisor, the control threads, and beside
//! the VM the signal thread, the violation watcher and the input forwarder, started with
//! [`spawn_confined`]); once [`enable_jail`] has been
//! called, every thread is confined before its work starts: Landlock to
//! the paths it was given (the file server: its shared folder; netstack:
//! the resolver's files, [`resolver_reach`]) and to no abstract UNIX
//! socket made outside it, its capabilities cut to its kind's (the
//! network threads: none; the control channel: nobody's), then its
//! kind's seccomp filter ([`crate::seccomp_filters`]). The process as a
//! whole is hardened first ([`harden_process`]: no core dumps, not
//! dumpable, `no_new_privs`, capabilities). A thread that makes
//! a call its filter forbids is stopped on the spot (it never returns to
//! its code: [`forbidden_syscall`]) and the VM stops with the reason
//! ([`StopReason::SyscallForbidden`]); should the orderly stop not finish
//! within [`VIOLATION_GRACE`] (the stopped thread may hold a lock), the
//! process exits.
//!
//! A thread that panics stops the VM with a reason
//! ([`StopReason::ThreadPanicked`]) through its [`PanicReport`], instead of
//! leaving the guest waiting forever on a device that is gone.

use std::any::Any;
use std::cell::Cell;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::BpfProgram;

use crate::control::{Stop, StopReason};
use crate::seccomp_filters;
use crate::sys;

/// What a VMM thread runs; each kind has its own seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU (KVM_RUN and its exits, the serial console's log).
    Vcpu,
    /// The virtio-net worker: netstack, its upstream connections and the
    /// threads that open them.
    Net,
    /// A virtio-fs worker: the file server of one shared folder.
    Fs,
    /// The virtio-vsock worker: the control channel.
    Vsock,
    /// `sbx run`'s control threads: its main thread's session with the
    /// guest's program and the end of the run (state files, reports, the
    /// audit log), the admin socket, the admin policy's watcher, the file
    /// servers' statistics, a clone sandbox's setup.
    Control,
    /// A virtio-blk worker: reads, writes and flushes of one disk file
    /// opened before it starts.
    Block,
    /// Waits for something to happen and tells the others: `sbx run`'s
    /// signal thread (sigwait, a frame written to the session's socket,
    /// the terminal's size, the stop asked for) and the jail's violation
    /// watcher. Opens nothing, creates no socket, starts no thread.
    Signals,
    /// The client side of a session in `sbx run`'s process: the user's
    /// input read and written to the session's socket, both open before
    /// it starts. Opens nothing, creates no socket, starts no thread.
    Session,
    /// The VM's own thread once its vCPUs run (`runner::run`): waits for
    /// the stop, kicks the vCPUs out of KVM_RUN and joins them, reads
    /// /proc/self/smaps for the figures at the end, and drops the VM, its
    /// guest memory and its devices (which stops and joins their
    /// workers). Opens files read-only only (and reaches /proc/self
    /// only: [`supervisor_reach`]), creates no socket, starts no thread.
    Supervisor,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::Net,
        ThreadKind::Fs,
        ThreadKind::Vsock,
        ThreadKind::Control,
        ThreadKind::Block,
        ThreadKind::Signals,
        ThreadKind::Session,
        ThreadKind::Supervisor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Net => "network",
            ThreadKind::Fs => "file server",
            ThreadKind::Vsock => "control channel",
            ThreadKind::Control => "control",
            ThreadKind::Block => "block",
            ThreadKind::Signals => "signals",
            ThreadKind::Session => "session",
            ThreadKind::Supervisor => "supervisor",
        }
    }

    /// Its number in thread-local and atomic cells (0 is "none").
    fn code(self) -> u8 {
        ThreadKind::ALL.iter().position(|k| *k == self).map_or(0, |i| i as u8 + 1)
    }

    fn from_code(code: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.get((code as usize).checked_sub(1)?).copied()
    }
}

/// The unprivileged user (and group) a root VMM's control-channel worker
/// becomes.
pub const NOBODY: u32 = 65534;

/// The Landlock ABI whose rights cover connecting to pathname UNIX
/// sockets (`LANDLOCK_ACCESS_FS_RESOLVE_UNIX`, Linux 7.1).
const LANDLOCK_ABI_UNIX_PATHS: u32 = 9;

/// The files glibc's resolver reads (strace of getaddrinfo: the NSS
/// configuration, host.conf, resolv.conf, hosts; gai.conf to sort
/// addresses, services and protocols for named ports, ld.so.cache and
/// mdns.allow where an NSS module is loaded): the network threads may
/// read these files, not the rest of /etc.
pub const RESOLVER_FILES: &[&str] = &[
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ld.so.cache",
    "/etc/mdns.allow",
];
/// Where the NSS modules (libnss_*.so) and the libraries they load are:
/// the network threads may read (and map) them.
pub const LIBRARY_DIRS: &[&str] = &["/usr/lib", "/usr/lib64", "/lib", "/lib64"];

/// How deep the directory of resolv.conf's target must be (`/`, `run`,
/// `resolvconf`) to be allowed whole: never all of /run or /etc.
pub const MANAGER_DIR_COMPONENTS: usize = 3;

/// What the network threads may read for the host resolver: each of
/// [`RESOLVER_FILES`] there is (a rule on a file follows its symlink: the
/// target is what is allowed), the [`LIBRARY_DIRS`], and, when
/// /etc/resolv.conf is a link out of /etc (systemd-resolved's
/// /run/systemd/resolve/stub-resolv.conf, resolvconf's, NetworkManager's),
/// the directory of its target if it is one of the manager's own (at
/// least [`MANAGER_DIR_COMPONENTS`] deep): the manager replaces that file (a new
/// one, which a rule on the old one would not cover) whenever the
/// network changes. Nothing else of /etc or /run: not /etc/shadow, not
/// the sockets there.
///
/// A file of /etc itself replaced while the sandbox runs (an editor's
/// new /etc/hosts, a DHCP client rewriting a plain /etc/resolv.conf) is
/// out of reach until the next run: glibc then finds no hosts file, or
/// no resolv.conf (and asks 127.0.0.1).
pub fn resolver_reach() -> Vec<PathRule> {
    let ro = |p: PathBuf| PathRule { path: p, write: false };
    let mut rules: Vec<PathRule> = RESOLVER_FILES.iter().map(PathBuf::from).filter(|p| p.exists()).map(ro).collect();
    let managed = std::fs::canonicalize("/etc/resolv.conf")
        .ok()
        .and_then(|t| t.parent().map(PathBuf::from))
        // A manager's own directory (/run/x/...), never a whole /etc or
        // /run: else only the file.
        .filter(|dir| dir.components().count() >= MANAGER_DIR_COMPONENTS);
    rules.extend(managed.map(ro));
    rules.extend(LIBRARY_DIRS.iter().map(PathBuf::from).filter(|p| p.exists()).map(ro));
    rules
}

/// This process's /proc directory, which the [`ThreadKind::Supervisor`]
/// thread reads (smaps, for the memory figures at the end of a run).
pub const PROC_SELF: &str = "/proc/self";

/// What the VM's [`ThreadKind::Supervisor`] thread may reach: this
/// process's /proc directory, read-only (a rule on /proc/self follows
/// the link: /proc/PID, this process's own), and nothing else of the
/// host.
pub fn supervisor_reach() -> Reach {
    Reach::Only(vec![PathRule { path: PathBuf::from(PROC_SELF), write: false }])
}

/// The violation watcher's thread name.
pub const WATCHER: &str = "seccomp-watch";

/// How long the VM has to stop in order after a thread made a forbidden
/// call before the process exits.
pub const VIOLATION_GRACE: Duration = Duration::from_secs(10);

/// A path a confined thread may use, and whether it may change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    pub path: PathBuf,
    pub write: bool,
}

/// Which host paths a thread can reach (Landlock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Reach {
    /// Landlock is not used: the thread's other limits apply.
    #[default]
    Unconfined,
    /// These paths only (none: no path at all).
    Only(Vec<PathRule>),
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Filter(#[from] seccomp_filters::Error),
    #[error("Cannot install the SIGSYS handler for seccomp violations: {0}")]
    Handler(io::Error),
    #[error("Cannot start the seccomp violation watcher: {0}")]
    Watcher(io::Error),
    #[error("Cannot set no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("Cannot turn core dumps off (RLIMIT_CORE 0): {0}")]
    CoreLimit(io::Error),
    #[error("Cannot make the process non-dumpable (PR_SET_DUMPABLE 0): {0}")]
    Dumpable(io::Error),
    #[error("Cannot drop capabilities: {0}")]
    Capabilities(io::Error),
    #[error("Cannot make a {kind} thread an unprivileged user: {source}")]
    Identity { kind: &'static str, source: io::Error },
    #[error("The jail is already set up")]
    AlreadyEnabled,
    #[error("Cannot install the seccomp filter of a {kind} thread: {source}")]
    Seccomp { kind: &'static str, source: seccompiler::Error },
    #[error("Cannot start the {name} thread: {source}")]
    Thread { name: String, source: io::Error },
    #[error("The {name} thread ended before it was confined")]
    NotConfined { name: String },
    #[error("Cannot start the {name} thread from a confined thread: it could not be confined as its own kind (start it before confining the thread that starts it)")]
    FromConfined { name: String },
    #[error("Cannot confine a {kind} thread with Landlock to {paths}: {message}")]
    Landlock { kind: &'static str, paths: String, message: String },
}

/// Whether Landlock confined the threads given paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockState {
    /// No thread was confined yet.
    Unused,
    Enforced,
    /// The kernel enforces only part of the rights asked for (an older
    /// Landlock ABI).
    Partial,
    /// The kernel has no Landlock: the paths are not confined.
    Unavailable,
}

struct Jail {
    programs: Vec<(ThreadKind, Vec<BpfProgram>)>,
}

static JAIL: OnceLock<Jail> = OnceLock::new();
/// The write end of the violation watcher's socket (-1: none).
static VIOLATION_FD: AtomicI32 = AtomicI32::new(-1);
static VIOLATION_KIND: AtomicU8 = AtomicU8::new(0);
static VIOLATION_NR: AtomicI64 = AtomicI64::new(-1);
static LANDLOCK: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// The calling thread's kind, once confined (read by the SIGSYS
    /// handler: a const-initialised cell without destructor).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// What the jail did to this process: for reports and tests.
pub fn landlock_state() -> LandlockState {
    match LANDLOCK.load(Ordering::SeqCst) {
        1 => LandlockState::Enforced,
        2 => LandlockState::Partial,
        3 => LandlockState::Unavailable,
        _ => LandlockState::Unused,
    }
}

/// [`VIOLATION_KIND`] of a thread not started by [`spawn`] (one that a
/// confined thread started itself, e.g. netstack's connect threads, which
/// inherit its filter but not its kind).
const UNKNOWN_KIND: u8 = u8::MAX;

/// The kernel's Landlock ABI version; None where the kernel has none (the
/// paths are then not confined: say so).
pub fn landlock_abi() -> Option<u32> {
    sys::landlock_abi()
}

/// The first seccomp violation, if any: the thread's kind (None: a thread
/// a confined thread started itself) and the system call.
pub fn violation() -> Option<(Option<ThreadKind>, i64)> {
    let code = VIOLATION_KIND.load(Ordering::SeqCst);
    if code == 0 {
        return None;
    }
    Some((ThreadKind::from_code(code), VIOLATION_NR.load(Ordering::SeqCst)))
}

/// Capabilities a root VMM keeps: acting on the shared folders' files
/// whoever owns them (reading and writing them, their modes and times,
/// their owner). Everything else goes, from the bounding set too.
pub const KEPT_CAPABILITIES: u64 = 1 << CAP_CHOWN | 1 << CAP_DAC_OVERRIDE | 1 << CAP_FOWNER;
/// Kept permitted (not effective) by [`harden_process`] only so that the
/// control channel's worker can become nobody; every confined thread
/// loses them, and no filter allows capset or setuid.
pub const SWITCH_USER: u64 = 1 << CAP_SETGID | 1 << CAP_SETUID;
const CAP_SETGID: u64 = 6;
const CAP_SETUID: u64 = 7;
/// Capability numbers (linux/capability.h).
const CAP_CHOWN: u64 = 0;
const CAP_DAC_OVERRIDE: u64 = 1;
const CAP_FOWNER: u64 = 3;

/// Hardens the calling thread before it starts any other (and before the
/// process reads any secret): no core dumps (RLIMIT_CORE 0, soft and
/// hard, and not dumpable: a crash leaves no memory image in the working
/// directory, and other processes of the user can neither ptrace the
/// VMM nor read its memory through /proc), `no_new_privs`, and when it
/// has capabilities (sbx run as root) all but [`KEPT_CAPABILITIES`]
/// dropped. Threads started afterwards inherit all of it.
///
/// Not dumpable, the process's /proc files belong to root; its own
/// threads still read them (status, smaps, mountinfo, cgroup: the kernel
/// lets a process inspect itself).
pub fn harden_process() -> Result<(), JailError> {
    sys::setrlimit(libc::RLIMIT_CORE, &libc::rlimit { rlim_cur: 0, rlim_max: 0 }).map_err(JailError::CoreLimit)?;
    sys::set_dumpable(false).map_err(JailError::Dumpable)?;
    sys::set_no_new_privs().map_err(JailError::NoNewPrivs)?;
    let (effective, permitted, inheritable) = sys::capabilities().map_err(JailError::Capabilities)?;
    if effective | permitted | inheritable != 0 {
        sys::restrict_capabilities(KEPT_CAPABILITIES, SWITCH_USER).map_err(JailError::Capabilities)?;
    }
    Ok(())
}

/// Turns the jail on for every thread [`spawn`] starts from now on (and
/// those that call [`confine_current`]): builds each kind's filter for
/// this process, installs the SIGSYS handler and starts the watcher that
/// stops `stop` on a violation (and ends the process with `exit_code`, if
/// given, when the stop does not finish in [`VIOLATION_GRACE`]).
pub fn enable_jail(stop: Arc<Stop>, kick_signal: i32, exit_code: Option<i32>) -> Result<(), JailError> {
    let ctx = seccomp_filters::Context { pid: std::process::id(), kick_signal };
    let mut programs = Vec::new();
    for kind in ThreadKind::ALL {
        programs.push((kind, seccomp_filters::programs(kind, &ctx)?));
    }
    if JAIL.set(Jail { programs }).is_err() {
        return Err(JailError::AlreadyEnabled);
    }
    let (mut rx, tx) = UnixStream::pair().map_err(JailError::Watcher)?;
    // The write end lives for the process.
    VIOLATION_FD.store(std::mem::ManuallyDrop::new(tx).as_raw_fd(), Ordering::SeqCst);
    sys::install_sigsys_handler().map_err(JailError::Handler)?;
    // The watcher under a filter of its own: it reads one byte, asks
    // the stop, sleeps, writes a line and exits.
    spawn_confined(ThreadKind::Signals, WATCHER, Reach::Only(Vec::new()), move || {
        let mut b = [0u8; 1];
        // One byte: a violation. The write end is never closed, so an
        // end of file or an error means nothing can report any more.
        loop {
            match rx.read(&mut b) {
                Ok(1) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => return,
            }
        }
        let (kind, nr) = violation().unwrap_or((None, -1));
        stop.request(StopReason::SyscallForbidden {
            thread: kind.map_or("helper", |k| k.as_str()).to_string(),
            syscall: nr,
            name: seccomp_filters::syscall_name(nr).map(str::to_string),
        });
        thread::sleep(VIOLATION_GRACE);
        if let Some(code) = exit_code {
            sys::write_raw(2, b"sbx: the VM did not stop in order after a seccomp violation; exiting\n");
            sys::exit_now(code)
        }
    })?;
    // A confined thread that panics says so in one line: the default
    // hook's backtrace (RUST_BACKTRACE) reads files and the working
    // directory, which its filter forbids.
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| match ThreadKind::from_code(KIND.with(|k| k.get())) {
        Some(kind) => {
            let name = thread::current().name().unwrap_or("unnamed").to_string();
            eprintln!("sbx: {} thread '{name}' {info}", kind.as_str());
        }
        None => previous(info),
    }));
    Ok(())
}

/// Called by the SIGSYS handler on the thread that made the forbidden call
/// `nr`: records it (the first one), says so on stderr, wakes the watcher
/// and parks the thread for good. Async-signal-safe: atomics, a
/// thread-local cell, write(2) and futex(2) only.
pub fn forbidden_syscall(nr: i64) -> ! {
    let kind = KIND.with(|k| k.get());
    let code = if kind == 0 { UNKNOWN_KIND } else { kind };
    if VIOLATION_KIND.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        VIOLATION_NR.store(nr, Ordering::SeqCst);
    }
    let mut msg = Message::default();
    msg.push(b"\nsbx: a ");
    msg.push(ThreadKind::from_code(kind).map_or("helper", |k| k.as_str()).as_bytes());
    msg.push(b" thread made system call ");
    msg.number(nr);
    if let Some(name) = seccomp_filters::syscall_name(nr) {
        msg.push(b" (");
        msg.push(name.as_bytes());
        msg.push(b")");
    }
    msg.push(b", which its seccomp filter forbids: the sandbox stops\n");
    sys::write_raw(2, msg.bytes());
    sys::write_raw(VIOLATION_FD.load(Ordering::SeqCst), &[1]);
    sys::park_forever()
}

/// A message built without allocating (in a signal handler).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Message {
        Message { buf: [0; 256], len: 0 }
    }
}

impl Message {
    fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn number(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut n = v.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Confines the calling thread as a `kind` thread: Landlock to what
/// `reach` says, then the kind's seccomp filter. Does nothing before
/// [`enable_jail`].
pub fn confine_current(kind: ThreadKind, reach: &Reach) -> Result<(), JailError> {
    let Some(jail) = JAIL.get() else { return Ok(()) };
    if let Reach::Only(paths) = reach {
        landlock_current(kind, paths)?;
    }
    // The control channel's worker needs no file and no privilege: as
    // root it runs as nobody (this thread only; the others keep what
    // writing the sandbox's state needs). The network threads need no
    // capability either (netstack binds no privileged port and serves no
    // other user's file): they lose every one but stay uid 0, because
    // they append to and rotate the audit log in root's sandbox
    // directory (as nobody they could not make its next file); Landlock,
    // not the uid, keeps them from root's files (uid 0 owns /etc/shadow
    // and /root, capabilities or not).
    let identity = |e| JailError::Identity { kind: kind.as_str(), source: e };
    if sys::geteuid() == 0 {
        match kind {
            ThreadKind::Vsock => {
                // CAP_SETUID/SETGID, kept permitted for this ([`harden_process`]).
                sys::restrict_capabilities(KEPT_CAPABILITIES | SWITCH_USER, 0).map_err(identity)?;
                sys::become_user_this_thread(NOBODY, NOBODY).map_err(identity)?;
            }
            ThreadKind::Net => sys::restrict_capabilities(0, 0).map_err(identity)?,
            // A disk worker uses the file it was given, nothing else; the
            // signal thread, the watcher and the input forwarder use the
            // descriptors they hold; the VM's supervisor waits, joins,
            // unmaps and reads its own /proc files (0444, and a process
            // may always inspect itself).
            ThreadKind::Block | ThreadKind::Signals | ThreadKind::Session | ThreadKind::Supervisor => {
                sys::restrict_capabilities(0, 0).map_err(identity)?
            }
            // The other kinds never switch users: gone from this thread.
            _ => sys::restrict_capabilities(KEPT_CAPABILITIES, 0).map_err(identity)?,
        }
    }
    KIND.with(|k| k.set(kind.code()));
    let programs = jail.programs.iter().find(|(k, _)| *k == kind).map(|(_, p)| p.as_slice()).unwrap_or_default();
    for p in programs {
        seccompiler::apply_filter(p).map_err(|source| JailError::Seccomp { kind: kind.as_str(), source })?;
    }
    Ok(())
}

/// Landlock: the calling thread may reach `paths` only (read, or read and
/// write), whatever path it is given; and it cannot connect to an abstract
/// UNIX socket (`@name`: D-Bus's, X11's, any other program's) made outside
/// its own domain (`LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`, ABI 6).
///
/// Pathname UNIX sockets (ssh-agent's, D-Bus's /run/user/UID/bus,
/// docker.sock): Landlock covers connect(2) to them only from ABI 9
/// (Linux 7.1, `LANDLOCK_ACCESS_FS_RESOLVE_UNIX`), asked for where the
/// kernel has it: a thread then connects only to sockets under the paths
/// it may write (the control socket in the sandbox's directory). Below
/// ABI 9 (Linux 6.18 has 7) the seccomp filters are what holds: no
/// kind but the control threads may create a UNIX socket (the network
/// kind's attempt is answered EACCES), and the control threads' one
/// connect is the main session's to the control socket; the rest is the
/// host's file permissions.
fn landlock_current(kind: ThreadKind, paths: &[PathRule]) -> Result<(), JailError> {
    let fail = |message: String| JailError::Landlock {
        kind: kind.as_str(),
        paths: if paths.is_empty() {
            "no path".to_string()
        } else {
            paths.iter().map(|p| p.path.display().to_string()).collect::<Vec<_>>().join(", ")
        },
        message,
    };
    // The rights of ABI 6, and of ABI 9 (pathname sockets) where the
    // kernel has them: an older kernel is not reported as enforcing only
    // part of what was asked for a right it never had (ABIs 7 and 8 add
    // no right to the file system's).
    let abi = if sys::landlock_abi().is_some_and(|v| v >= LANDLOCK_ABI_UNIX_PATHS) { ABI::V9 } else { ABI::V6 };
    let (rw, ro): (Vec<_>, Vec<_>) = paths.iter().partition(|p| p.write);
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::AbstractUnixSocket))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(rw.iter().map(|p| &p.path), AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(ro.iter().map(|p| &p.path), AccessFs::from_read(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| fail(e.to_string()))?;
    let state = match status.ruleset {
        RulesetStatus::FullyEnforced => 1,
        RulesetStatus::PartiallyEnforced => 2,
        _ => 3,
    };
    // The weakest state any thread got is what is reported.
    LANDLOCK.fetch_max(state, Ordering::SeqCst);
    Ok(())
}

#[derive(Default)]
struct ReportInner {
    stop: Option<Arc<Stop>>,
    /// A panic that happened before the VM's stop switch was known.
    pending: Option<StopReason>,
}

/// Where a thread's panic goes: the VM's stop switch. Devices are made
/// before the VM (and its [`Stop`]) exist, so the switch can be attached
/// later ([`PanicReport::attach`]); a panic before that is kept and
/// requested on attachment.
#[derive(Clone, Default)]
pub struct PanicReport(Arc<Mutex<ReportInner>>);

impl PanicReport {
    /// Reports straight to `stop`.
    pub fn to(stop: &Arc<Stop>) -> PanicReport {
        let r = PanicReport::default();
        r.attach(stop);
        r
    }

    /// From now on, reports go to `stop` (and one kept so far goes now).
    pub fn attach(&self, stop: &Arc<Stop>) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = inner.pending.take() {
            stop.request(reason);
        }
        inner.stop = Some(stop.clone());
    }

    fn report(&self, reason: StopReason) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &inner.stop {
            Some(stop) => stop.request(reason),
            None => inner.pending = inner.pending.take().or(Some(reason)),
        }
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// Starts thread `name` of `kind` running `f`, confined as its kind
/// ([`confine_current`]; `reach` for Landlock). If `f` panics, or the
/// thread cannot be confined (then `f` does not run), `report` stops the
/// VM naming the thread; the thread's result is then None.
pub fn spawn<T, F>(
    kind: ThreadKind,
    name: &str,
    report: PanicReport,
    reach: Reach,
    f: F,
) -> io::Result<JoinHandle<Option<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let thread_name = name.to_string();
    start(name, move || {
        if let Err(e) = confine_current(kind, &reach) {
            report.report(StopReason::ThreadPanicked { thread: thread_name, message: e.to_string() });
            return None;
        }
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => Some(v),
            Err(payload) => {
                let message = format!("{} panicked: {}", kind.as_str(), panic_message(payload.as_ref()));
                report.report(StopReason::ThreadPanicked { thread: thread_name, message });
                None
            }
        }
    })
}

/// Starts helper thread `name` running `f`, of no kind: it is not confined
/// by [`spawn`] (a thread keeps the seccomp filter of the thread that
/// starts it, so a helper started from a confined thread stays confined).
/// A thread that confines itself first thing with a kind of its own
/// (`sbx run`'s `fs-stats`; the `vm` thread, as the supervisor, once its
/// vCPUs run), and the
/// CLI's threads in processes that have no jail (`sbx cp`'s sender):
/// a thread of `sbx run` that confines itself at once is
/// [`spawn_confined`]'s.
pub fn spawn_helper<T, F>(name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    start(name, f)
}

/// Starts thread `name` running `f`, confined as `kind` first thing
/// ([`confine_current`]: Landlock to `reach`, its capabilities, its
/// kind's seccomp filter), and returns once it is; if it cannot be, the
/// error, and `f` never runs. For the threads that run beside the VM
/// rather than in it and have no [`PanicReport`] (`sbx run`'s signal
/// thread and input forwarder, the violation watcher); its result is
/// `f`'s (None only where confining failed). Not confined before
/// [`enable_jail`], as [`confine_current`].
///
/// A thread started by a confined thread keeps that thread's filters
/// and Landlock domain and adds its own: it can do only what both allow.
pub fn spawn_confined<T, F>(
    kind: ThreadKind,
    name: &str,
    reach: Reach,
    f: F,
) -> Result<JoinHandle<Option<T>>, JailError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // No filter allows adding one (seccomp(2), Landlock): a confined
    // thread's new thread could never be confined as another kind.
    if JAIL.get().is_some() && KIND.with(|k| k.get()) != 0 {
        return Err(JailError::FromConfined { name: name.to_string() });
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = start(name, move || {
        let confined = confine_current(kind, &reach);
        let ok = confined.is_ok();
        let _ = tx.send(confined);
        ok.then(f)
    })
    .map_err(|source| JailError::Thread { name: name.to_string(), source })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(JailError::NotConfined { name: name.to_string() }),
    }
}

/// The threads of this process not under a seccomp filter (the
/// `Seccomp:` field of /proc/self/task/TID/status is not 2): their ids
/// and names. For tests and reports: once `sbx run`'s VM runs, only a
/// thread documented as such may be in it (docs/jail.md).
pub fn unfiltered_threads() -> io::Result<Vec<(u32, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let dir = entry?.path();
        let Some(tid) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A thread that ended meanwhile has no files left: not counted.
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else { continue };
        let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim);
        if mode != Some("2") {
            let name = status.lines().find_map(|l| l.strip_prefix("Name:")).map(str::trim).unwrap_or_default();
            found.push((tid, name.to_string()));
        }
    }
    Ok(found)
}

/// The one place threads of vmm and sbx start (clippy.toml).
#[allow(clippy::disallowed_methods)]
fn start<T, F>(name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    thread::Builder::new().name(name.into()).spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_stops_the_vm_with_its_name_and_message() {
        let stop = Arc::new(Stop::default());
        let h = spawn(ThreadKind::Fs, "virtio-test", PanicReport::to(&stop), Reach::Unconfined, || -> u32 {
            panic!("queue handler failed")
        })
        .unwrap();
        assert_eq!(h.join().unwrap(), None);
        match stop.reason() {
            Some(StopReason::ThreadPanicked { thread, message }) => {
                assert_eq!(thread, "virtio-test");
                assert!(message.contains("queue handler failed"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_panic_before_the_vm_exists_is_kept_for_it() {
        let report = PanicReport::default();
        let h = spawn(ThreadKind::Vcpu, "early", report.clone(), Reach::Unconfined, || {
            panic!("{}", String::from("early failure"))
        })
        .unwrap();
        assert_eq!(h.join().unwrap(), None::<()>);
        let stop = Arc::new(Stop::default());
        assert!(!stop.is_requested());
        report.attach(&stop);
        assert!(matches!(stop.reason(), Some(StopReason::ThreadPanicked { .. })));
    }

    #[test]
    fn a_thread_that_returns_gives_its_value_and_stops_nothing() {
        let stop = Arc::new(Stop::default());
        let h = spawn(ThreadKind::Fs, "fine", PanicReport::to(&stop), Reach::Unconfined, || 7).unwrap();
        assert_eq!(h.join().unwrap(), Some(7));
        assert!(!stop.is_requested());
    }
}
