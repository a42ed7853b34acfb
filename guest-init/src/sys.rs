//! Guest side: thin safe wrappers over the Linux calls PID 1 needs. The only
//! module of guest-init with `unsafe`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// mount(2) with no data string.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    mount_with_data(source, target, fstype, flags, None)
}

/// mount(2) with an optional data (options) string.
pub fn mount_with_data(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let d = data.map(cstr).transpose()?;
    let dp = d.as_ref().map(|d| d.as_ptr().cast::<libc::c_void>()).unwrap_or(std::ptr::null());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for
    // the data) that outlive the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, dp) })?;
    Ok(())
}

/// Moves the mount at `from` to `to` (mount --move).
pub fn move_mount(from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid NUL-terminated strings; fstype and data may be null
    // for MS_MOVE.
    check(unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) })?;
    Ok(())
}

/// chroot(2).
pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: p is a valid NUL-terminated string.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live byte slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// How the program's terminal should behave.
pub enum TtyMode {
    /// Cooked, echoing: a person types at it.
    Interactive,
    /// Lines pass through unchanged (no echo, no CR/LF rewriting); ^D still
    /// ends input so the host can signal end of file.
    Passthrough,
}

pub fn configure_tty(fd: &OwnedFd, mode: TtyMode, rows: u16, cols: u16) -> io::Result<()> {
    // SAFETY: termios is plain data; zeroed is a valid value to be filled.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor, t is a valid termios to write.
    check(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) })?;
    t.c_cflag |= libc::CS8 | libc::CREAD | libc::CLOCAL;
    t.c_lflag |= libc::ICANON | libc::ISIG | libc::IEXTEN;
    match mode {
        TtyMode::Interactive => {
            t.c_lflag |= libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHOCTL | libc::ECHOKE;
            t.c_iflag |= libc::ICRNL;
            t.c_oflag |= libc::OPOST | libc::ONLCR;
        }
        TtyMode::Passthrough => {
            t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ECHOCTL);
            // The host sends no signals on this path: ^C is just a byte.
            t.c_lflag &= !libc::ISIG;
            t.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IGNCR | libc::IXON);
            t.c_oflag &= !libc::OPOST;
        }
    }
    // SAFETY: fd is open, t is a valid termios.
    check(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) })?;
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Waits until everything written to the terminal has been sent.
pub fn tcdrain(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fd is an open descriptor.
    check(unsafe { libc::tcdrain(fd.as_raw_fd()) })?;
    Ok(())
}

/// A program ready to be started.
pub struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    /// Run as this (uid, gid) instead of root.
    ids: Option<(libc::uid_t, libc::gid_t)>,
}

impl Exec {
    pub fn new(argv: &[String], env: &[(String, String)], cwd: &str) -> io::Result<Exec> {
        let argv = argv.iter().map(|a| cstr(a)).collect::<io::Result<Vec<_>>>()?;
        let path = resolve_in_path(argv.first().map(|a| a.to_bytes()).unwrap_or_default(), env)?;
        let envp = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect::<io::Result<Vec<_>>>()?;
        Ok(Exec { path, argv, envp, cwd: cstr(cwd)?, ids: None })
    }

    /// Runs the program as `uid`/`gid` with no supplementary groups.
    pub fn run_as(mut self, uid: libc::uid_t, gid: libc::gid_t) -> Exec {
        self.ids = (uid != 0 || gid != 0).then_some((uid, gid));
        self
    }
}

fn resolve_in_path(prog: &[u8], env: &[(String, String)]) -> io::Result<CString> {
    let not_found = || io::Error::new(io::ErrorKind::NotFound, "command not found");
    if prog.is_empty() {
        return Err(not_found());
    }
    if prog.contains(&b'/') {
        return CString::new(prog).map_err(|_| not_found());
    }
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let mut candidate = dir.as_bytes().to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(prog);
        if std::fs::metadata(OsStr::from_bytes(&candidate)).map(|m| m.is_file()).unwrap_or(false) {
            return CString::new(candidate).map_err(|_| not_found());
        }
    }
    Err(not_found())
}

/// Forks a child that becomes a session leader with `tty` as its controlling
/// terminal and stdio, then executes `exec`. Returns the child's pid.
pub fn spawn_on_tty(exec: &Exec, tty: &OwnedFd) -> io::Result<libc::pid_t> {
    let fd = tty.as_raw_fd();
    spawn(exec, [fd, fd, fd], true)
}

/// Forks a child that becomes a session (and process group) leader with
/// `stdio` as its standard input, output and error (the first also as its
/// controlling terminal if `ctty`), drops to the Exec's user, then
/// executes it. Returns the child's pid. Everything the child needs is
/// prepared before the fork, so the child only makes async-signal-safe
/// calls: safe in a process with other threads.
pub fn spawn(exec: &Exec, stdio: [libc::c_int; 3], ctty: bool) -> io::Result<libc::pid_t> {
    let mut argv: Vec<*const libc::c_char> = exec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = exec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: the child below calls only async-signal-safe functions on
    // memory prepared before the fork.
    let pid = check(unsafe { libc::fork() })?;
    if pid == 0 {
        // SAFETY: async-signal-safe calls on valid descriptors and strings;
        // the child never returns into Rust code (execve or _exit).
        unsafe {
            libc::setsid();
            if ctty {
                libc::ioctl(stdio[0], libc::TIOCSCTTY, 0);
            }
            // Move the descriptors above 2 first so that dup2 cannot
            // clobber one still needed.
            let high: [libc::c_int; 3] = stdio.map(|fd| libc::fcntl(fd, libc::F_DUPFD, 3));
            for (i, fd) in high.iter().enumerate() {
                libc::dup2(*fd, i as libc::c_int);
            }
            for fd in high {
                libc::close(fd);
            }
            let mut sigs: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut sigs);
            libc::sigprocmask(libc::SIG_SETMASK, &sigs, std::ptr::null_mut());
            if let Some((uid, gid)) = exec.ids {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    libc::_exit(126);
                }
            }
            if libc::chdir(exec.cwd.as_ptr()) != 0 {
                libc::chdir(c"/".as_ptr());
            }
            // Every other descriptor was opened close-on-exec.
            libc::execve(exec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            // 127: as a shell reports a command it could not run.
            libc::_exit(127);
        }
    }
    Ok(pid)
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A new pseudo-terminal of `rows` x `cols`: (master, slave).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: a valid NUL-terminated path.
    let master = owned(unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the valid pointer.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let slave = owned(unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    set_winsize(&master, rows, cols)?;
    Ok((master, slave))
}

pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((owned(fds[0])?, owned(fds[1])?))
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// A vsock stream socket listening on `port` for the host.
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = owned(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: libc::VMADDR_CID_ANY,
        svm_zero: [0; 4],
    };
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
    // SAFETY: listen(2) takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// Accepts one connection (close-on-exec).
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed.
    owned(unsafe {
        libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
    })
}

/// Sends `sig` to the process group `pgid`.
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) takes no pointers; a negative pid names a group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Waits until one of `fds` is ready for `events` (or `timeout_ms`);
/// returns the revents of each.
pub fn poll(fds: &[(libc::c_int, libc::c_short)], timeout_ms: i32) -> Vec<libc::c_short> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|&(fd, events)| libc::pollfd { fd, events, revents: 0 }).collect();
    // SAFETY: p is a valid array of p.len() pollfd structures.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    p.iter().map(|x| x.revents).collect()
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

/// Waits for any child; `None` when there are no children left.
pub fn wait_any() -> Option<(libc::pid_t, Ended)> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid int to write.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
        let ended = if libc::WIFEXITED(status) {
            Ended::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Ended::Signaled(libc::WTERMSIG(status))
        } else {
            continue;
        };
        return Some((pid, ended));
    }
}

/// Sends a signal to every process but PID 1.
pub fn kill_all(sig: libc::c_int) {
    // SAFETY: kill(-1, sig) has no memory arguments.
    unsafe { libc::kill(-1, sig) };
}

/// Reaps children that have already ended, without blocking.
pub fn reap_ended() {
    // SAFETY: a null status pointer is allowed.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// FIFREEZE, _IOWR('X', 119, int): not in the libc crate for this target.
const FIFREEZE: libc::c_ulong = 0xc004_5877;

/// Freezes the filesystem `fd` is on: everything written reaches the disk
/// and, for ext4, the journal is emptied and the disk marked clean.
pub fn freeze(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: FIFREEZE takes no pointer argument; fd is open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE, 0) })?;
    Ok(())
}

/// Ends the VM. The VMM sees the reset (reboot=k: keyboard controller) and
/// exits; a plain power-off would only halt without ACPI.
pub fn reboot() -> ! {
    // SAFETY: no memory arguments; PID 1 holds CAP_SYS_BOOT.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reached if reboot failed: nothing else to do but stop here.
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

/// Blocks the signals PID 1 must not die of while it waits for children.
pub fn block_terminal_signals() {
    // SAFETY: sigset manipulation on a local, valid set.
    unsafe {
        let mut sigs: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut sigs);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGTSTP, libc::SIGTTOU, libc::SIGTTIN]
        {
            libc::sigaddset(&mut sigs, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut());
    }
}

/// A socket to configure network interfaces with.
pub fn config_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data;
    // the kernel reads an AF_INET sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// Interface ioctl that takes an address.
fn if_ioctl_addr(sock: &OwnedFd, name: &str, req: libc::c_ulong, addr: std::net::Ipv4Addr) -> io::Result<()> {
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: r is a valid ifreq for this request; sock is open.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), req, &mut r) })?;
    Ok(())
}

pub fn if_set_addr(sock: &OwnedFd, name: &str, addr: std::net::Ipv4Addr) -> io::Result<()> {
    if_ioctl_addr(sock, name, libc::SIOCSIFADDR, addr)
}

pub fn if_set_netmask(sock: &OwnedFd, name: &str, mask: std::net::Ipv4Addr) -> io::Result<()> {
    if_ioctl_addr(sock, name, libc::SIOCSIFNETMASK, mask)
}

/// Brings an interface up.
pub fn if_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    // SAFETY: r is a valid ifreq; SIOCGIFFLAGS fills ifru_flags.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r) })?;
    // SAFETY: SIOCGIFFLAGS just set the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: r is a valid ifreq with the flags to set.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r) })?;
    Ok(())
}

/// struct rtentry as the x86-64 kernel lays it out (not in the libc crate
/// for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds the default route through `gateway`.
pub fn add_default_route(sock: &OwnedFd, gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(any),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(any),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: rt is a valid rtentry with no device name pointer; sock is open.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) })?;
    Ok(())
}
