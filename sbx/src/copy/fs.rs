//! Host side: the file system calls `sbx cp` needs relative to directory
//! descriptors (openat, mkdirat, renameat2, unlinkat, fstatat), so that a
//! name is resolved below a directory sbx holds open and a symbolic link
//! put in the way (by the guest, in a shared folder) is never followed.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// openat(2) with O_CLOEXEC added.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string for the call; `dir` is
    // an open descriptor borrowed for it.
    let fd =
        check(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A directory below `dir`, never through a symbolic link.
pub fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid string and borrowed descriptor, as above.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(|_| ())
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid string and borrowed descriptor, as above.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
}

/// Renames `from` to `to` in `dir`: the entry `to` is replaced (a link
/// there is replaced, not followed) with `replace`, else EEXIST if there
/// is one (renameat2's RENAME_NOREPLACE, or link+unlink where the file
/// system has no such rename).
pub fn rename(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr, replace: bool) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    let fd = dir.as_raw_fd();
    if replace {
        // SAFETY: valid strings and borrowed descriptor, as above.
        return check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(|_| ());
    }
    // SAFETY: as above.
    match check(unsafe { libc::renameat2(fd, f.as_ptr(), fd, t.as_ptr(), libc::RENAME_NOREPLACE) }) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) => {
            // SAFETY: as above; linkat without AT_SYMLINK_FOLLOW links the entry itself.
            check(unsafe { libc::linkat(fd, f.as_ptr(), fd, t.as_ptr(), 0) })?;
            unlinkat(dir, from)
        }
        r => r.map(|_| ()),
    }
}

/// What a name below `dir` is, without following a link: (S_IFMT bits, mode).
pub fn lstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<(libc::mode_t, libc::mode_t)> {
    let c = cstr(name)?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid string, borrowed descriptor and a stat to fill.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok((st.st_mode & libc::S_IFMT, st.st_mode))
}
