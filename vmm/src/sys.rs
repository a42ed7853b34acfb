//! Host side: thin safe wrappers over the libc calls the VMM makes. The
//! only module of vmm with libc `unsafe` (KVM's own `unsafe` API, guest
//! memory registration and the `kvm_run` union, stays in `vstate.rs`).
//!
//! Every wrapper takes borrowed descriptors (`BorrowedFd`) and names as
//! `&CStr`, returns `io::Result` with the errno of a failed call, and
//! does nothing but the call: what to open, with which flags and
//! resolution rules, is decided by the caller (the confinement of the
//! shared folder is `fs::share`'s). Descriptors the kernel creates come
//! back as `OwnedFd`s, closed once when dropped.
//!
//! To add a call: a wrapper in the section of its kind, its `SAFETY`
//! comment saying why the pointers are valid for the call, and `check`
//! (or `check_size`) for the error return.

use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// A `-1`-on-error return as `io::Result`, the errno taken at once.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The same for calls returning a size (`ssize_t`, `long`).
fn check_size(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Takes ownership of a descriptor a call just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: only called with a descriptor the kernel has just created
    // for this process (checked not to be an error return), which nothing
    // else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// Plain data the kernel fills in.

/// A value of a libc struct made only of integers (and arrays of them),
/// all zeroes: a valid value, and what the kernel expects in fields it is
/// not asked about.
///
/// # Safety
/// Implement only for C structs in which every field is an integer or an
/// array of integers (no pointers, references, enums, bools, floats).
pub unsafe trait PlainData: Sized {
    fn zeroed() -> Self {
        // SAFETY: the implementer promises all-zero bytes are a valid
        // value of every field.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: integers and arrays of integers only (and `timespec`s, which
// are two integers).
unsafe impl PlainData for libc::stat {}
// SAFETY: integers only (and reserved integer arrays).
unsafe impl PlainData for libc::statvfs {}
// SAFETY: three u64s.
unsafe impl PlainData for libc::open_how {}
// SAFETY: two integers.
unsafe impl PlainData for libc::rlimit {}

// Opening.

/// open(2) of an absolute (or working-directory-relative) path.
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: path is a valid NUL-terminated string for the call; no mode
    // is read without O_CREAT, and callers pass none.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags) })?;
    Ok(owned(fd))
}

/// openat2(2): `name` beneath `dir`, with `flags`, `mode` (for O_CREAT)
/// and the `RESOLVE_*` bits in `resolve`, exactly as given.
pub fn openat2(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: u32, resolve: u64) -> io::Result<OwnedFd> {
    let mut how = libc::open_how::zeroed();
    how.flags = flags as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    // SAFETY: name is a valid NUL-terminated string and how a valid
    // open_how of the size given; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = check_size(fd as isize)?;
    Ok(owned(fd as RawFd))
}

/// memfd_create(2): an anonymous in-memory file.
pub fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: name is a valid NUL-terminated string.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    Ok(owned(fd))
}

// Attributes.

/// fstat(2).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = libc::stat::zeroed();
    // SAFETY: st is a valid stat to write.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// fstatat(2) of `name` in `dir`; `flags` as `AT_SYMLINK_NOFOLLOW`.
pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = libc::stat::zeroed();
    // SAFETY: name is a valid string, st a valid stat to write.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// fstatvfs(3): figures of the filesystem holding `fd`.
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = libc::statvfs::zeroed();
    // SAFETY: st is a valid statvfs to write.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// readlinkat(2) into `buf`: the bytes of the target written (a target
/// as long as `buf` may have been cut short).
pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: name is a valid string and buf a writable buffer of the
    // length given.
    check_size(unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

// Changes.

/// mkdirat(2).
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: name is a valid NUL-terminated string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })?;
    Ok(())
}

/// unlinkat(2); `flags` 0 or `AT_REMOVEDIR`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: name is a valid NUL-terminated string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// renameat2(2); `flags` 0 or `RENAME_*`.
pub fn renameat2(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: both names are valid NUL-terminated strings that outlive
    // the call.
    check(unsafe { libc::renameat2(from_dir.as_raw_fd(), from.as_ptr(), to_dir.as_raw_fd(), to.as_ptr(), flags) })?;
    Ok(())
}

/// symlinkat(2): a link `name` in `dir` whose target is `target`.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are valid and NUL-terminated.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// fchownat(2); `flags` as `AT_SYMLINK_NOFOLLOW`.
pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: name is a valid NUL-terminated string.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) })?;
    Ok(())
}

/// fchmod(2).
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: no pointers; a bad descriptor is an error return.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    Ok(())
}

/// futimens(3): access and modification times (`UTIME_NOW`,
/// `UTIME_OMIT` as utimensat's).
pub fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: times points to two valid timespecs.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })?;
    Ok(())
}

/// utimensat(2) of `name` in `dir`; `flags` as `AT_SYMLINK_NOFOLLOW`.
pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2], flags: libc::c_int) -> io::Result<()> {
    // SAFETY: name is a valid string, times two valid timespecs.
    check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) })?;
    Ok(())
}

/// syncfs(2): writes out the filesystem holding `fd`.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: no pointers; a bad descriptor is an error return.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) })?;
    Ok(())
}

/// mkfifo(3) (tests make special files with it).
#[cfg(test)]
pub fn mkfifo(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::mkfifo(path.as_ptr(), mode) })?;
    Ok(())
}

// Directories.

/// An open directory stream (fdopendir(3)); iterating yields the names in
/// it, `.` and `..` included, and ends at the end of the directory or at
/// the first error reading it.
pub struct Dir(std::ptr::NonNull<libc::DIR>);

impl Dir {
    /// Takes over `fd`, an open directory (read, not `O_PATH`). On
    /// failure the descriptor is closed.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Dir> {
        // SAFETY: fd is an open descriptor; on success the stream owns it
        // (it is released from `fd` below, and closedir closes it).
        let d = unsafe { libc::fdopendir(fd.as_raw_fd()) };
        let d = std::ptr::NonNull::new(d).ok_or_else(io::Error::last_os_error)?;
        let _ = fd.into_raw_fd();
        Ok(Dir(d))
    }
}

impl Iterator for Dir {
    type Item = OsString;

    fn next(&mut self) -> Option<OsString> {
        // SAFETY: self.0 is an open DIR stream, used by this thread only
        // (Dir is neither Send nor Sync).
        let ent = unsafe { libc::readdir64(self.0.as_ptr()) };
        if ent.is_null() {
            return None;
        }
        // SAFETY: readdir64 returned a valid dirent, alive until the next
        // call on the stream; its d_name is NUL-terminated. The name is
        // copied out before that.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        Some(OsStr::from_bytes(name.to_bytes()).to_os_string())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: self.0 is an open DIR stream, closed once, here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

// The process.

/// geteuid(2).
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// getrlimit(2) of `resource` (`RLIMIT_*`).
pub fn getrlimit(resource: libc::__rlimit_resource_t) -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit::zeroed();
    // SAFETY: lim is a valid rlimit to write.
    check(unsafe { libc::getrlimit(resource, &mut lim) })?;
    Ok(lim)
}

/// setrlimit(2) of `resource` (`RLIMIT_*`).
pub fn setrlimit(resource: libc::__rlimit_resource_t, lim: &libc::rlimit) -> io::Result<()> {
    // SAFETY: lim is a valid rlimit to read.
    check(unsafe { libc::setrlimit(resource, lim) })?;
    Ok(())
}

// Signals and the end of a thread or the process (the seccomp violation
// path: async-signal-safe calls only).

/// SIGSYS from a seccomp filter ([`crate::threads`]): hands the system
/// call's number to [`crate::threads::forbidden_syscall`], which never
/// returns (the thread stops there).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // for SIGSYS (si_code SYS_SECCOMP) its union holds `_sigsys`:
    // `{ void *_call_addr; int _syscall; unsigned _arch; }` right after
    // the three ints and their padding (offset 16), so `_syscall` is at
    // offset 24 on 64-bit Linux. Read as a plain i32.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    crate::threads::forbidden_syscall(nr as i64)
}

/// Installs the process's SIGSYS handler ([`on_sigsys`]).
pub fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: sigaction is zeroed plain data; the handler is an
    // `extern "C"` function of the SA_SIGINFO signature that lives for the
    // whole process; sa_mask is initialised by sigemptyset.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        check(libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()))?;
    }
    Ok(())
}

/// write(2) of `buf` to `fd`, once, errors ignored (for a signal handler:
/// nothing to do about them there).
pub fn write_raw(fd: RawFd, buf: &[u8]) {
    // SAFETY: buf is valid for reads of its length; a bad fd is an error
    // return.
    let _ = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
}

/// Ends the calling thread's work for good: it waits on a futex nobody
/// wakes (futex is allowed by every filter), never returning to its code.
pub fn park_forever() -> ! {
    static NEVER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        // SAFETY: FUTEX_WAIT on a valid, aligned u32 that lives for the
        // process; a spurious wake-up or EINTR loops back.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                NEVER.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0u32,
                std::ptr::null::<libc::timespec>(),
            );
        }
    }
}

/// _exit(2): ends the process now, running nothing (no destructors, no
/// atexit, no stdio flush: other threads may hold their locks).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Sets `no_new_privs` for the calling thread and those it starts: no
/// exec of theirs can gain privileges (setuid binaries, file caps).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

/// Sets whether the process is dumpable (`PR_SET_DUMPABLE`): not
/// dumpable, it leaves no core file, other processes of its user cannot
/// ptrace it or read its memory (`/proc/PID/mem`), and its `/proc/PID`
/// files belong to root (its own threads still read them).
pub fn set_dumpable(dumpable: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(dumpable), 0, 0, 0) })?;
    Ok(())
}

/// Makes the calling thread (only it: raw system calls, not glibc's
/// process-wide wrappers) user `uid`, group `gid`, with no supplementary
/// groups. From root to another user the thread loses every capability.
pub fn become_user_this_thread(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with size 0 reads no list; setresgid and setresuid
    // take integers only. Each applies to the calling thread alone.
    unsafe {
        check(libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) as libc::c_int)?;
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid) as libc::c_int)?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid) as libc::c_int)?;
    }
    Ok(())
}

/// The Landlock ABI version the kernel offers (None: no Landlock, or
/// disabled at boot).
pub fn landlock_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag
    // the call only returns the ABI version (or an error); nothing is read
    // or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// The capability sets of the calling thread, as capget(2) gives them
/// (64-bit masks: effective, permitted, inheritable).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's effective, permitted and inheritable capabilities.
pub fn capabilities() -> io::Result<(u64, u64, u64)> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid for capget's version 3 layout
    // (one header, two data words) for the duration of the call.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } as libc::c_int)?;
    let join = |f: fn(&CapData) -> u32| (f(&data[1]) as u64) << 32 | f(&data[0]) as u64;
    Ok((join(|d| d.effective), join(|d| d.permitted), join(|d| d.inheritable)))
}

/// Leaves the calling thread (and the threads it starts from now on) only
/// the capabilities in `keep` (bit masks), effective and permitted, plus
/// `also_permitted` permitted only; its bounding set keeps just those; the
/// ambient and inheritable sets are emptied.
pub fn restrict_capabilities(keep: u64, also_permitted: u64) -> io::Result<()> {
    for cap in 0..64u64 {
        if (keep | also_permitted) & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability.
                Some(libc::EINVAL) => break,
                // Without CAP_SETPCAP: nothing in the bounding set is
                // usable without privileges anyway (checked below).
                Some(libc::EPERM) => break,
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    let (_, permitted, _) = capabilities()?;
    let effective = permitted & keep;
    let permitted = permitted & (keep | also_permitted);
    let word = |i: u32| CapData {
        effective: (effective >> (32 * i)) as u32,
        permitted: (permitted >> (32 * i)) as u32,
        inheritable: 0,
    };
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let data = [word(0), word(1)];
    // SAFETY: header and data are valid for capset's version 3 layout for
    // the duration of the call; the kernel only reads data.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } as libc::c_int)?;
    Ok(())
}

// Memory.

/// madvise(2) with `MADV_DONTDUMP`: keeps `len` bytes from `addr` out of
/// core dumps. Safe for any range: this advice changes no contents and no
/// mapping's validity, and a range that is not mapped is an error return.
pub fn madvise_dontdump(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_DONTDUMP only marks the mappings in the range (if any)
    // to be left out of core dumps; no memory is read, written, freed or
    // remapped.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn names_in_a_directory_are_listed_and_errors_carry_the_errno() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), "x").unwrap();
        let path = std::ffi::CString::new(t.path().as_os_str().as_bytes()).unwrap();
        let dir = open(&path, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC).unwrap();
        let st = fstatat(dir.as_fd(), c"a", libc::AT_SYMLINK_NOFOLLOW).unwrap();
        assert_eq!((st.st_mode & libc::S_IFMT, st.st_size), (libc::S_IFREG, 1));
        let e = fstatat(dir.as_fd(), c"missing", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let mut names: Vec<OsString> = Dir::from_fd(dir).unwrap().collect();
        names.sort();
        assert_eq!(names, [".", "..", "a"]);
        // A descriptor that is no directory is refused (and closed).
        let file = open(&std::ffi::CString::new(t.path().join("a").as_os_str().as_bytes()).unwrap(), 0).unwrap();
        assert_eq!(Dir::from_fd(file).err().and_then(|e| e.raw_os_error()), Some(libc::ENOTDIR));
    }

    #[test]
    fn plain_data_starts_zeroed() {
        let lim = libc::rlimit::zeroed();
        assert_eq!((lim.rlim_cur, lim.rlim_max), (0, 0));
        assert!(getrlimit(libc::RLIMIT_NOFILE).unwrap().rlim_max > 0);
    }
}
