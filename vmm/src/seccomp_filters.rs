//! Host side: the seccomp filter of each VMM thread kind — the system calls
//! (and, where it matters, their arguments) that a vCPU, a device worker,
//! the network stack, the file server, the VM's supervisor (the thread
//! that waits for the stop and ends the run), the control threads, and the
//! threads beside the VM (`sbx run`'s signal thread and the violation
//! watcher, its input forwarder) may make.
//! Installed by [`crate::threads`] on every thread it starts, before the
//! thread touches guest memory or guest bytes; any other call traps
//! (SIGSYS), the thread is stopped and the VM with it (see
//! [`crate::threads::enable_jail`]).
//!
//! Built with `seccompiler` from plain tables here, so that a reviewer
//! reads one list per kind. Each list is what that kind's code (and the
//! Rust and glibc runtime under it) calls, found by reading the code and
//! by tracing a full run of every kind (`strace -f`, README "Jail").
//!
//! Whatever the kind, these stay out: executing programs (execve), new
//! processes (`clone` without `CLONE_THREAD`; `clone3`, whose flags a
//! filter cannot read, answers ENOSYS so that glibc falls back to
//! `clone`), ptrace and process_vm_*, mount and namespaces, module and
//! kexec loading, bpf, perf_event_open, keyctl, userfaultfd, io_uring,
//! setuid and capabilities, signals to other processes, terminal input
//! injection (`TIOCSTI`), and executable memory outside the network kind
//! (whose host resolver may load NSS modules).
//!
//! UNIX sockets, kind by kind (issue 26: reaching ssh-agent, D-Bus or
//! docker.sock): the network threads create none — glibc's resolver
//! tries nscd's socket (/var/run/nscd/socket) and NSS modules may try
//! systemd's or avahi's, so `socket(AF_UNIX)` is answered EACCES, not
//! trapped, and glibc goes on to the files and DNS (its wake socket is a
//! socketpair made before the thread starts); the control channel
//! creates no socket and connects nowhere (it accepts on the control
//! socket, bound before it starts); the control threads create UNIX
//! sockets for one connect, the main session's to the control socket,
//! and bind and listen on none. vCPUs, file servers, disks, the VM's
//! supervisor, the signal thread and the input forwarder create no
//! socket.
//! Seccomp cannot read connect's path: where the kernel has Landlock ABI
//! 9 the path is confined too, and abstract sockets are Landlock's on
//! every kind ([`crate::threads`]).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::threads::ThreadKind;

/// The target this build's filters are for.
#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// KVM's ioctl type (`KVMIO`): a vCPU may make KVM calls only.
const KVMIO: u64 = 0xAE;

/// A system call with its name, for the tables and for messages.
macro_rules! sys {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name))),*] };
}

type Sys = &'static [(i64, &'static str)];

/// Every thread: the Rust and glibc runtime (memory, futexes, signals'
/// return, thread exit, time), reading and writing descriptors it holds
/// (eventfds, stderr), closing them.
const BASE: Sys = sys!(
    SYS_futex,
    SYS_exit,
    SYS_exit_group,
    SYS_restart_syscall,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_munmap,
    SYS_madvise,
    SYS_brk,
    SYS_mremap,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_gettid,
    SYS_getpid,
    SYS_getuid,
    SYS_geteuid,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_close,
    SYS_read,
    SYS_write,
    SYS_writev,
    SYS_getrandom,
);

/// The console log's rotation on the vCPU thread (the serial ports are
/// served there). virtio-blk's I/O is its own kind's ([`BLOCK`]).
const VCPU: Sys = sys!(
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_openat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_fcntl,
);

/// A virtio-blk worker: reads, writes and flushes of the disk file it
/// was given (`read_exact_at`, `write_all_at`, `sync_data`).
const BLOCK: Sys = sys!(SYS_pread64, SYS_pwrite64, SYS_fdatasync);

/// A device worker's event loop (epoll, its timer, eventfds).
const WORKER: Sys = sys!(SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl, SYS_timerfd_settime, SYS_fcntl);

/// Appending to the audit log and rotating it (any thread that records
/// file or network decisions).
const AUDIT: Sys = sys!(
    SYS_openat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_fsync,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_lseek
);

/// The file server: everything it does to the shared folders (Landlock
/// keeps the paths to them), and the git shadow.
const FILES: Sys = sys!(
    SYS_openat,
    SYS_openat2,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_fstatfs,
    SYS_statfs,
    SYS_getdents64,
    SYS_lseek,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_syncfs,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rmdir,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_symlink,
    SYS_symlinkat,
    SYS_link,
    SYS_linkat,
    SYS_readlink,
    SYS_readlinkat,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_utimensat,
    SYS_memfd_create,
    SYS_flock,
    SYS_copy_file_range,
    SYS_sendfile,
    SYS_dup,
    SYS_dup3,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
);

/// Sockets the thread already holds.
const SOCKET_IO: Sys = sys!(
    SYS_recvfrom,
    SYS_sendto,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_recvmmsg,
    SYS_sendmmsg,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_poll,
    SYS_ppoll,
);

/// netstack's connect threads: the host resolver (glibc's: files, DNS,
/// perhaps NSS modules) and the upstream connection; accepting on the
/// published ports' listeners (bound to 127.0.0.1 before the jail, or by
/// `sbx ports` and handed over: the network thread never listens); and an
/// OAuth refresh written back to the host's store (`flock` on its lock
/// file, in the one folder Landlock gives them for it).
const NET: Sys = sys!(
    SYS_accept4,
    SYS_flock,
    SYS_connect,
    SYS_bind,
    SYS_uname,
    SYS_pread64,
    SYS_access,
    SYS_faccessat,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_ftruncate,
);

/// The control channel's device: the host's connections to its socket.
const VSOCK: Sys = sys!(SYS_accept4);

/// The control threads (`sbx run`'s main thread once the VM runs, the
/// admin socket's, the admin policy's watcher, `fs-stats`, a clone's
/// setup): the session with the guest's program, the terminal, the
/// sandbox's state files, the audit log, the end of the run. The VM's
/// own thread is the supervisor ([`SUPERVISOR`]), not one of these.
const CONTROL: Sys = sys!(
    SYS_connect,
    SYS_accept4,
    SYS_socketpair,
    SYS_pipe2,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_timerfd_create,
    SYS_dup2,
    SYS_rt_sigaction,
    SYS_rt_sigtimedwait,
    SYS_uname,
    SYS_prlimit64,
    SYS_getrusage,
    SYS_sysinfo,
    SYS_getcwd,
    SYS_getppid,
    SYS_wait4,
);

/// The signal thread and the violation watcher: waiting for a signal
/// (sigwait and sigtimedwait are `rt_sigtimedwait`), and the sockets
/// they hold (the session's, the watcher's; std's socket reads are
/// `recvfrom`).
const SIGNALS: Sys = sys!(SYS_rt_sigtimedwait, SYS_recvfrom, SYS_sendto);

/// The input forwarder: standard input read (BASE's `read`), written to
/// the session's socket it holds.
const SESSION: Sys = sys!(SYS_recvfrom, SYS_sendto);

/// The VM's supervisor (`runner::run` once the vCPUs run): what reading
/// /proc/self/smaps takes besides BASE's `read` and `close` (std's
/// `read_to_string`: the file's size, `statx` or `fstat`/`newfstatat`
/// where glibc makes fstat one, and its position, `lseek`); `openat`
/// itself is allowed read-only only ([`allow_read_only_open`]). The rest
/// of its work is BASE's: waiting for the stop and joining threads
/// (`futex`), sleeping between kicks (`clock_nanosleep`, `nanosleep`),
/// the devices' stop eventfds (`write`), the guest memory and the
/// devices' buffers unmapped (`munmap`, `madvise`), their descriptors
/// closed, messages on stderr (`write`), its own end (`exit`,
/// `madvise`, `munmap`, `rt_sigprocmask`, `sigaltstack`).
const SUPERVISOR: Sys = sys!(SYS_statx, SYS_fstat, SYS_newfstatat, SYS_lseek);

/// The names of calls the tables do not list but messages may name.
const OTHER_NAMES: Sys = sys!(
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_clone,
    SYS_clone3,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_unshare,
    SYS_setns,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_keyctl,
    SYS_add_key,
    SYS_userfaultfd,
    SYS_io_uring_setup,
    SYS_setuid,
    SYS_setgid,
    SYS_setresuid,
    SYS_capset,
    SYS_kill,
    SYS_tgkill,
    SYS_tkill,
    SYS_socket,
    SYS_ioctl,
    SYS_mmap,
    SYS_mprotect,
    SYS_prctl,
    SYS_open,
    SYS_chmod,
    SYS_chown,
    SYS_seccomp,
    SYS_landlock_create_ruleset,
    SYS_landlock_add_rule,
    SYS_landlock_restrict_self,
);

/// The name of system call `nr` (for the message that names a violation).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    [BASE, VCPU, BLOCK, WORKER, AUDIT, FILES, SOCKET_IO, NET, VSOCK, CONTROL, SIGNALS, SESSION, SUPERVISOR, OTHER_NAMES]
        .iter()
        .flat_map(|t| t.iter())
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.strip_prefix("SYS_").unwrap_or(name))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot build the seccomp filter of the {kind} threads: {source}")]
    Build { kind: &'static str, source: seccompiler::BackendError },
    #[error("Cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile { kind: &'static str, source: seccompiler::BackendError },
}

/// What a filter depends on at run time.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// This process's id: signals may go to its own threads only.
    pub pid: u32,
    /// The signal that kicks a vCPU out of KVM_RUN.
    pub kick_signal: i32,
}

/// A syscall's rules as they are built: None is "always allowed".
#[derive(Default)]
struct Rules(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl Rules {
    fn allow(&mut self, table: Sys) {
        for (nr, _) in table {
            self.0.insert(*nr, None);
        }
    }

    /// Allows `nr` when all of `conds` hold (added to the call's other
    /// rules; a call already always allowed stays so).
    fn allow_if(&mut self, nr: i64, conds: Vec<Cond>) {
        let rule = SeccompRule::new(conds).expect("a rule with conditions");
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
    }

    fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0.into_iter().map(|(nr, rules)| (nr, rules.unwrap_or_default())).collect()
    }
}

fn eq(arg: u8, value: u64) -> Cond {
    Cond::new(arg, Len::Dword, Op::Eq, value).expect("a valid condition")
}

/// `arg & mask == value`.
fn masked(arg: u8, mask: u64, value: u64) -> Cond {
    Cond::new(arg, Len::Qword, Op::MaskedEq(mask), value).expect("a valid condition")
}

fn allow_ioctls(r: &mut Rules, requests: &[u64]) {
    for &req in requests {
        r.allow_if(libc::SYS_ioctl, vec![eq(1, req)]);
    }
}

fn allow_sockets(r: &mut Rules, domains: &[libc::c_int]) {
    for &d in domains {
        r.allow_if(libc::SYS_socket, vec![eq(0, d as u64)]);
    }
}

/// Memory mappings: never executable unless `exec`.
fn allow_memory(r: &mut Rules, exec: bool) {
    if exec {
        r.allow(sys!(SYS_mmap, SYS_mprotect));
    } else {
        let no_exec = libc::PROT_EXEC as u64;
        r.allow_if(libc::SYS_mmap, vec![masked(2, no_exec, 0)]);
        r.allow_if(libc::SYS_mprotect, vec![masked(2, no_exec, 0)]);
    }
}

/// `fcntl(fd, F_GETFD)` only: std's debug builds check that a
/// descriptor is open before closing it (`OwnedFd`'s drop).
fn allow_fd_check(r: &mut Rules) {
    r.allow_if(libc::SYS_fcntl, vec![eq(1, libc::F_GETFD as u64)]);
}

/// The `open` flags that make, change or write a file: with none of
/// them, and the access mode `O_RDONLY`, an `openat` only reads
/// (`O_TMPFILE` needs write access, so the access mode keeps it out).
const WRITING_OPEN_FLAGS: u64 = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;

/// `openat(dir, path, flags)` only read-only: no write access, no file
/// made, truncated or appended to.
/// std's `File::open` is `O_RDONLY | O_CLOEXEC`. Compared on the low 32
/// bits (flags are an `int`).
fn allow_read_only_open(r: &mut Rules) {
    let read_only =
        Cond::new(2, Len::Dword, Op::MaskedEq(WRITING_OPEN_FLAGS), libc::O_RDONLY as u64).expect("a valid condition");
    r.allow_if(libc::SYS_openat, vec![read_only]);
}

/// Starting threads (never processes): `clone` with `CLONE_THREAD`.
fn allow_threads(r: &mut Rules) {
    let thread = libc::CLONE_THREAD as u64;
    r.allow_if(libc::SYS_clone, vec![masked(0, thread, thread)]);
    // Answered ENOSYS by the second filter ([`NO_CLONE3`]); allowed here
    // so that the answer is that, not a violation.
    r.allow(sys!(SYS_clone3));
}

/// The rules of thread kind `kind`.
fn rules(kind: ThreadKind, ctx: &Context) -> Rules {
    let mut r = Rules::default();
    r.allow(BASE);
    // Naming the thread (std does, at its start).
    r.allow_if(libc::SYS_prctl, vec![eq(0, libc::PR_SET_NAME as u64)]);
    r.allow_if(libc::SYS_prctl, vec![eq(0, libc::PR_GET_NAME as u64)]);
    // Installing the next filter (seccompiler sets it first; it only ever
    // takes privileges away).
    r.allow_if(libc::SYS_prctl, vec![eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]);
    // abort() (a failed allocation, a panic while panicking) raises
    // SIGABRT on the thread itself.
    r.allow_if(libc::SYS_tgkill, vec![eq(0, ctx.pid as u64), eq(2, libc::SIGABRT as u64)]);
    let nonblocking = [libc::FIONBIO, libc::FIOCLEX];
    match kind {
        ThreadKind::Vcpu => {
            allow_memory(&mut r, false);
            r.allow(VCPU);
            r.allow_if(libc::SYS_ioctl, vec![masked(1, 0xff00, KVMIO << 8)]);
        }
        ThreadKind::Fs => {
            allow_memory(&mut r, false);
            r.allow(WORKER);
            r.allow(AUDIT);
            r.allow(FILES);
            allow_ioctls(&mut r, &nonblocking);
        }
        ThreadKind::Net => {
            allow_memory(&mut r, true);
            r.allow(WORKER);
            r.allow(AUDIT);
            r.allow(SOCKET_IO);
            r.allow(NET);
            // AF_UNIX is allowed here only so that the first program's
            // EACCES is the answer rather than a trap ([`programs`]).
            allow_sockets(&mut r, &[libc::AF_INET, libc::AF_INET6, libc::AF_UNIX]);
            allow_ioctls(&mut r, &[libc::FIONBIO, libc::FIOCLEX, libc::FIONREAD]);
            allow_threads(&mut r);
        }
        ThreadKind::Vsock => {
            allow_memory(&mut r, false);
            r.allow(WORKER);
            r.allow(SOCKET_IO);
            r.allow(VSOCK);
            allow_ioctls(&mut r, &[libc::FIONBIO, libc::FIOCLEX, libc::FIONREAD]);
        }
        ThreadKind::Block => {
            allow_memory(&mut r, false);
            r.allow(WORKER);
            r.allow(BLOCK);
        }
        ThreadKind::Control => {
            allow_memory(&mut r, false);
            r.allow(WORKER);
            r.allow(AUDIT);
            r.allow(FILES);
            r.allow(SOCKET_IO);
            r.allow(CONTROL);
            allow_sockets(&mut r, &[libc::AF_UNIX]);
            allow_ioctls(
                &mut r,
                &[
                    libc::FIONBIO,
                    libc::FIOCLEX,
                    libc::FIONREAD,
                    libc::TCGETS,
                    libc::TCSETS,
                    libc::TCSETSW,
                    libc::TCSETSF,
                    libc::TIOCGWINSZ,
                    libc::TIOCGPGRP,
                ],
            );
            allow_threads(&mut r);
            // The vCPU kick, to this process's own threads only.
            r.allow_if(libc::SYS_tgkill, vec![eq(0, ctx.pid as u64), eq(2, ctx.kick_signal as u64)]);
        }
        ThreadKind::Signals => {
            allow_memory(&mut r, false);
            allow_fd_check(&mut r);
            r.allow(SIGNALS);
            // The terminal's size, for a resize frame (SIGWINCH).
            allow_ioctls(&mut r, &[libc::TIOCGWINSZ]);
        }
        ThreadKind::Session => {
            allow_memory(&mut r, false);
            allow_fd_check(&mut r);
            r.allow(SESSION);
        }
        ThreadKind::Supervisor => {
            allow_memory(&mut r, false);
            allow_fd_check(&mut r);
            allow_read_only_open(&mut r);
            r.allow(SUPERVISOR);
            // The vCPU kick, to this process's own threads only.
            r.allow_if(libc::SYS_tgkill, vec![eq(0, ctx.pid as u64), eq(2, ctx.kick_signal as u64)]);
        }
    }
    r
}

/// What the network kind's `socket(AF_UNIX, ..)` returns.
pub const NO_UNIX_SOCKET: i32 = libc::EACCES;

/// The filter programs of thread kind `kind`, in the order to install
/// them: for the network kind the one that answers `socket(AF_UNIX)` with
/// [`NO_UNIX_SOCKET`], the one that answers `clone3` with ENOSYS, then the allow-list
/// (anything else traps; installing filters is not allowed, so it comes
/// last).
pub fn programs(kind: ThreadKind, ctx: &Context) -> Result<Vec<BpfProgram>, Error> {
    let name = kind.as_str();
    let build = |source| Error::Build { kind: name, source };
    let compile = |source| Error::Compile { kind: name, source };
    let mut programs = Vec::new();
    if kind == ThreadKind::Net {
        // No UNIX socket, with an answer glibc's resolver takes as "no
        // nscd, no such service" (an errno outranks the allow-list's
        // allow, which keeps this call from trapping).
        let no_unix = SeccompFilter::new(
            BTreeMap::from([(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![eq(0, libc::AF_UNIX as u64)]).expect("a rule with a condition")],
            )]),
            SeccompAction::Allow,
            SeccompAction::Errno(NO_UNIX_SOCKET as u32),
            ARCH,
        )
        .map_err(build)?;
        programs.push(no_unix.try_into().map_err(compile)?);
    }
    let allow = SeccompFilter::new(rules(kind, ctx).into_map(), SeccompAction::Trap, SeccompAction::Allow, ARCH)
        .map_err(build)?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(build)?;
    programs.push(no_clone3.try_into().map_err(compile)?);
    programs.push(allow.try_into().map_err(compile)?);
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context { pid: std::process::id(), kick_signal: libc::SIGRTMIN() }
    }

    #[test]
    fn every_kind_compiles_and_names_are_found() {
        for kind in ThreadKind::ALL {
            let p = programs(kind, &ctx()).unwrap();
            // The network kind's no-UNIX-socket program comes first.
            assert_eq!(p.len(), if kind == ThreadKind::Net { 3 } else { 2 }, "{kind:?}");
            let allow = p.last().unwrap();
            assert!(allow.len() > 10 && allow.len() < 4096, "{kind:?}: {} instructions", allow.len());
        }
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn no_kind_may_execute_fork_trace_mount_or_load_code() {
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_kill,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_seccomp,
        ];
        for kind in ThreadKind::ALL {
            let r = rules(kind, &ctx());
            for nr in forbidden {
                assert!(!r.0.contains_key(&nr), "{kind:?} allows {:?}", syscall_name(nr));
            }
            // clone only with CLONE_THREAD, where at all.
            if let Some(rules) = r.0.get(&libc::SYS_clone) {
                assert!(rules.as_ref().is_some_and(|v| v.len() == 1), "{kind:?}: clone is conditional");
            }
        }
        let only_net_creates_inet_sockets = ThreadKind::ALL.iter().filter(|k| {
            rules(**k, &ctx()).0.get(&libc::SYS_socket).is_some_and(|r| r.as_ref().is_some_and(|v| v.len() > 1))
        });
        assert_eq!(only_net_creates_inet_sockets.collect::<Vec<_>>(), [&ThreadKind::Net]);
    }

    #[test]
    fn unix_sockets_only_where_a_kind_needs_them() {
        let has = |kind, nr| rules(kind, &ctx()).0.contains_key(&nr);
        // The control channel accepts on a socket bound before it starts:
        // it creates none, connects nowhere.
        for nr in [libc::SYS_socket, libc::SYS_socketpair, libc::SYS_connect, libc::SYS_bind, libc::SYS_listen] {
            assert!(!has(ThreadKind::Vsock, nr), "control channel allows {:?}", syscall_name(nr));
        }
        // No kind binds or listens (the control socket is bound before
        // any confined thread exists).
        for kind in ThreadKind::ALL {
            for nr in [libc::SYS_bind, libc::SYS_listen] {
                if kind != ThreadKind::Net || nr == libc::SYS_listen {
                    assert!(!has(kind, nr), "{kind:?} allows {:?}", syscall_name(nr));
                }
            }
        }
        // The network thread accepts on published ports' listeners, bound
        // before the jail or handed over: it never listens itself.
        assert!(has(ThreadKind::Net, libc::SYS_accept4));
        // vCPUs, file servers and disks create no socket at all.
        for kind in [ThreadKind::Vcpu, ThreadKind::Fs, ThreadKind::Block] {
            assert!(!has(kind, libc::SYS_socket), "{kind:?} creates sockets");
            assert!(!has(kind, libc::SYS_connect), "{kind:?} connects");
        }
    }

    #[test]
    fn block_io_is_the_block_kinds_and_not_the_vcpus() {
        let has = |kind, nr| rules(kind, &ctx()).0.contains_key(&nr);
        let block_only = [
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
        ];
        for nr in block_only {
            assert!(!has(ThreadKind::Vcpu, nr), "a vCPU allows {:?}", syscall_name(nr));
        }
        for nr in [libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync, libc::SYS_epoll_wait] {
            assert!(has(ThreadKind::Block, nr), "a disk worker needs {:?}", syscall_name(nr));
        }
        // The disk file is open before the worker starts: it opens,
        // renames and removes nothing, and makes no KVM call.
        for nr in [libc::SYS_openat, libc::SYS_rename, libc::SYS_unlinkat, libc::SYS_ioctl, libc::SYS_ftruncate] {
            assert!(!has(ThreadKind::Block, nr), "a disk worker allows {:?}", syscall_name(nr));
        }
        // The console's rotation stays the vCPU's.
        for nr in [libc::SYS_openat, libc::SYS_rename] {
            assert!(has(ThreadKind::Vcpu, nr), "a vCPU needs {:?}", syscall_name(nr));
        }
    }

    #[test]
    fn the_threads_beside_the_vm_wait_and_pass_on_and_nothing_else() {
        let has = |kind, nr| rules(kind, &ctx()).0.contains_key(&nr);
        for kind in [ThreadKind::Signals, ThreadKind::Session] {
            // No file opened, made, renamed or removed; no directory read.
            let files = [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_creat,
                libc::SYS_rename,
                libc::SYS_renameat2,
                libc::SYS_unlinkat,
                libc::SYS_mkdirat,
                libc::SYS_getdents64,
                libc::SYS_truncate,
                libc::SYS_ftruncate,
                libc::SYS_fchmod,
                libc::SYS_fchown,
                libc::SYS_symlinkat,
                libc::SYS_linkat,
            ];
            // No socket made, connected, bound or accepted on; no pipe,
            // no descriptor duplicated over another.
            let sockets = [
                libc::SYS_socket,
                libc::SYS_socketpair,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_accept,
                libc::SYS_accept4,
                libc::SYS_pipe2,
                libc::SYS_dup2,
                libc::SYS_dup3,
            ];
            // No thread started, no signal sent but abort()'s, no handler
            // changed, no other process waited for, no filter added.
            let others = [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_wait4,
                libc::SYS_rt_sigaction,
                libc::SYS_tkill,
                libc::SYS_prlimit64,
                libc::SYS_seccomp,
                libc::SYS_landlock_restrict_self,
                libc::SYS_mount,
                libc::SYS_ptrace,
                libc::SYS_execve,
                libc::SYS_execveat,
            ];
            for nr in files.into_iter().chain(sockets).chain(others) {
                assert!(!has(kind, nr), "{kind:?} allows {:?}", syscall_name(nr));
            }
            // tgkill: abort()'s SIGABRT to itself only.
            let tgkill = rules(kind, &ctx()).0.remove(&libc::SYS_tgkill).flatten().unwrap_or_default();
            assert_eq!(tgkill.len(), 1, "{kind:?}: tgkill is SIGABRT's only");
            // What it does: read and write what it holds.
            for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_futex] {
                assert!(has(kind, nr), "{kind:?} needs {:?}", syscall_name(nr));
            }
        }
        // The signal thread waits for signals and asks the terminal's
        // size (TIOCGWINSZ only, not TIOCSTI); the input forwarder does
        // neither.
        assert!(has(ThreadKind::Signals, libc::SYS_rt_sigtimedwait));
        let ioctls = rules(ThreadKind::Signals, &ctx()).0.remove(&libc::SYS_ioctl).flatten().unwrap_or_default();
        assert_eq!(ioctls.len(), 1, "the signal thread's one ioctl");
        for nr in [libc::SYS_rt_sigtimedwait, libc::SYS_ioctl] {
            assert!(!has(ThreadKind::Session, nr), "the input forwarder allows {:?}", syscall_name(nr));
        }
        // Both are far narrower than the control kind they replace.
        let count = |kind| rules(kind, &ctx()).0.len();
        for kind in [ThreadKind::Signals, ThreadKind::Session] {
            assert!(count(kind) * 2 < count(ThreadKind::Control), "{kind:?}: {} calls", count(kind));
        }
    }

    #[test]
    fn the_supervisor_waits_joins_reads_its_own_figures_and_nothing_else() {
        let k = ThreadKind::Supervisor;
        let r = rules(k, &ctx());
        let has = |nr| r.0.contains_key(&nr);
        // What ending a run takes: the wait and the joins, the sleep
        // between kicks, the stop eventfds, unmapping, closing, stderr,
        // smaps read (its size and position), its own end.
        for nr in [
            libc::SYS_futex,
            libc::SYS_clock_nanosleep,
            libc::SYS_write,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_close,
            libc::SYS_read,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_exit,
        ] {
            assert!(has(nr), "the supervisor needs {:?}", syscall_name(nr));
        }
        // No socket, no pipe, no thread, no file made, renamed, removed or
        // changed, no directory read, no ioctl (neither KVM's nor a
        // terminal's), no handler changed, no filter added.
        for nr in [
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_bind,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_pipe2,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_open,
            libc::SYS_openat2,
            libc::SYS_creat,
            libc::SYS_rename,
            libc::SYS_renameat2,
            libc::SYS_unlinkat,
            libc::SYS_mkdirat,
            libc::SYS_ftruncate,
            libc::SYS_fchmod,
            libc::SYS_fchown,
            libc::SYS_pwrite64,
            libc::SYS_getdents64,
            libc::SYS_ioctl,
            libc::SYS_dup2,
            libc::SYS_rt_sigaction,
            libc::SYS_wait4,
            libc::SYS_prlimit64,
            libc::SYS_epoll_wait,
            libc::SYS_execve,
            libc::SYS_seccomp,
            libc::SYS_landlock_restrict_self,
        ] {
            assert!(!has(nr), "the supervisor allows {:?}", syscall_name(nr));
        }
        // openat: read-only only (one rule); tgkill: the vCPU kick and
        // abort()'s SIGABRT, to this process; mmap never executable.
        let conditional = |nr| r.0.get(&nr).and_then(|o| o.as_ref()).map(|v| v.len());
        assert_eq!(conditional(libc::SYS_openat), Some(1), "openat is read-only's");
        assert_eq!(conditional(libc::SYS_tgkill), Some(2), "tgkill: the kick and SIGABRT");
        assert_eq!(conditional(libc::SYS_mmap), Some(1), "mmap without PROT_EXEC");
        // Far narrower than the control kind it replaces on the VM thread.
        let count = |kind| rules(kind, &ctx()).0.len();
        assert!(count(k) * 2 < count(ThreadKind::Control), "{} calls", count(k));
    }
}
