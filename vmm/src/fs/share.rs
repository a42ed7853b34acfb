//! Host side: a shared folder as the file server sees it. Every access the
//! guest asks for is resolved here, one name at a time, beneath a directory
//! already resolved, never through a path string:
//!
//! - names are single components (no `/`, `.`, `..`, NUL; at most 255
//!   bytes), so `..` cannot climb out;
//! - directories are opened with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and
//!   held as `O_PATH` descriptors; other entries are named by (their
//!   directory's descriptor, their name) and checked against the device
//!   and inode first seen, so a file swapped on the host is stale, never
//!   another file;
//! - symbolic links are never followed on the host (the guest's kernel
//!   follows them in the guest, through further lookups), so no link,
//!   planted by the guest or already there, leads outside or around the
//!   policy; the guest may only create links whose target stays inside the
//!   folder and on a path it could write;
//! - no mount point inside the folder is crossed, no `/proc` magic link is
//!   followed;
//! - devices, FIFOs and sockets are refused; hard links are never created,
//!   and a file the host already links elsewhere (link count over one) is
//!   read-only: writing it would change a path the policy cannot see;
//! - the policy ([`FsPolicy`]) is applied to the path of every entry:
//!   hidden ones do not exist for the guest, read-only ones refuse writes,
//!   creation, removal and renames.
//!
//! Every refusal is a [`Refused`] whose text goes to the sandbox's audit log.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::policy::{Access, FsPolicy};

pub const MAX_NAME: usize = 255;
/// Longest symbolic link target accepted or returned.
pub const MAX_LINK: usize = 4095;

/// Why an access was refused, and what the guest is told (an errno).
#[derive(Debug, Error)]
pub enum Refused {
    #[error("Bad name {0:?}")]
    BadName(OsString),
    #[error("Hidden by policy: {0}")]
    Hidden(PathBuf),
    #[error("Read-only by policy: {0}")]
    ReadOnly(PathBuf),
    #[error("Outside the shared folder: {0}")]
    Escape(PathBuf),
    #[error("Special file refused: {0}")]
    Special(PathBuf),
    #[error("Hard links are not allowed: {0}")]
    HardLink(PathBuf),
    #[error("Symbolic link {0} -> {1:?} would lead outside the folder or to a path it may not write")]
    LinkTarget(PathBuf, OsString),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
}

impl Refused {
    /// The errno the guest sees. Hidden paths do not exist.
    pub fn errno(&self) -> i32 {
        match self {
            Refused::BadName(n) if n.len() > MAX_NAME => libc::ENAMETOOLONG,
            Refused::BadName(_) => libc::EINVAL,
            Refused::Hidden(_) => libc::ENOENT,
            Refused::ReadOnly(_) => libc::EROFS,
            Refused::Escape(_) | Refused::Special(_) | Refused::LinkTarget(..) => libc::EACCES,
            Refused::HardLink(_) => libc::EPERM,
            Refused::Io(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// True if this is a policy decision (to be logged), not an ordinary
    /// error such as a missing file.
    pub fn is_policy(&self) -> bool {
        !matches!(self, Refused::Io(..))
    }

    /// The path (from the folder's root) it concerns, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Refused::BadName(_) => None,
            Refused::Hidden(p)
            | Refused::ReadOnly(p)
            | Refused::Escape(p)
            | Refused::Special(p)
            | Refused::HardLink(p)
            | Refused::LinkTarget(p, _)
            | Refused::Io(p, _) => Some(p),
        }
    }

    fn errno_at(rel: &Path, errno: i32) -> Refused {
        Refused::Io(rel.to_path_buf(), io::Error::from_raw_os_error(errno))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// A resolved entry: its path from the root, its kind, what the guest may
/// do with it, and how to reach it again (its directory's descriptor and
/// its name; its own `O_PATH` descriptor if it is a directory).
#[derive(Debug, Clone)]
pub struct Entry {
    pub rel: PathBuf,
    pub kind: Kind,
    pub access: Access,
    parent: Option<Arc<OwnedFd>>,
    dir: Option<Arc<OwnedFd>>,
    dev_ino: (u64, u64),
}

impl Entry {
    fn name(&self) -> &OsStr {
        self.rel.file_name().unwrap_or_default()
    }

    /// The host inode (reported to the guest as its inode number).
    pub fn ino(&self) -> u64 {
        self.dev_ino.1
    }
}

pub struct Share {
    root: Entry,
    /// The folder's absolute path (the same in the guest).
    path: PathBuf,
    policy: FsPolicy,
    read_only: bool,
    /// New entries are given to this owner (uid, gid) when the server runs
    /// as root: they belong to the folder's owner, never to root.
    chown_to: Option<(u32, u32)>,
    owner: (u32, u32),
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

/// openat2(2) confined beneath `dir`.
fn openat2(dir: RawFd, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: open_how is plain data (non-exhaustive in libc); all zeroes
    // is its documented "nothing asked" value, filled in below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.mode = u64::from(mode);
    how.resolve = RESOLVE;
    // SAFETY: c is a valid NUL-terminated string and how a valid open_how
    // of the size given; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; zeroed is a valid value to be filled.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid stat to write; a bad fd is an error return.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The entry `name` in directory `dir` itself (a link is not followed).
fn stat_at(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: stat is plain data; zeroed is a valid value to be filled.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid string, st a valid stat to write.
    if unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn kind_of(st: &libc::stat) -> Option<Kind> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Some(Kind::Dir),
        libc::S_IFREG => Some(Kind::File),
        libc::S_IFLNK => Some(Kind::Symlink),
        _ => None,
    }
}

/// One plain name, as the guest may give it.
fn check_name(name: &OsStr) -> Result<(), Refused> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Refused::BadName(name.to_os_string()));
    }
    Ok(())
}

/// Calls a `*at` function of libc with the entry's name; maps errors.
fn at(rel: &Path, f: impl FnOnce(&CString) -> libc::c_int) -> Result<(), Refused> {
    let name = rel.file_name().unwrap_or_default();
    let c = CString::new(name.as_bytes()).map_err(|_| Refused::BadName(name.to_os_string()))?;
    if f(&c) != 0 {
        return Err(Refused::Io(rel.to_path_buf(), io::Error::last_os_error()));
    }
    Ok(())
}

/// A name in a directory listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: OsString,
    pub kind: Kind,
    pub ino: u64,
}

/// How a rename treats an existing target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
}

impl Share {
    /// Opens the folder at `path` to share under `policy`; `read_only`
    /// makes every path in it read-only.
    pub fn open(path: &Path, policy: FsPolicy, read_only: bool) -> io::Result<Share> {
        let c = cstr(path.as_os_str())?;
        // SAFETY: c is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(fd.as_raw_fd())?;
        let root = Entry {
            rel: PathBuf::new(),
            kind: Kind::Dir,
            access: if read_only { Access::ReadOnly } else { Access::ReadWrite },
            parent: None,
            dir: Some(Arc::new(fd)),
            dev_ino: (st.st_dev, st.st_ino),
        };
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let owner = (st.st_uid, st.st_gid);
        let chown_to = (euid == 0 && owner.0 != 0).then_some(owner);
        Ok(Share { root, path: path.to_path_buf(), policy, read_only, chown_to, owner })
    }

    pub fn root(&self) -> &Entry {
        &self.root
    }

    /// The folder's owner on the host (uid, gid): the guest's agent user
    /// stands for it.
    pub fn owner(&self) -> (u32, u32) {
        self.owner
    }

    fn dir_fd(dir: &Entry) -> Result<RawFd, Refused> {
        match (&dir.dir, dir.kind) {
            (Some(fd), Kind::Dir) => Ok(fd.as_raw_fd()),
            _ => Err(Refused::errno_at(&dir.rel, libc::ENOTDIR)),
        }
    }

    fn parent_fd(entry: &Entry) -> Result<RawFd, Refused> {
        entry.parent.as_ref().map(|p| p.as_raw_fd()).ok_or_else(|| Refused::errno_at(&entry.rel, libc::EBUSY))
    }

    /// What the guest may do with `rel`, of `kind`, with host link count
    /// `nlink`.
    fn access_of(&self, rel: &Path, kind: Kind, nlink: u64) -> Access {
        match self.policy.access(rel, kind == Kind::Dir) {
            Access::Hidden => Access::Hidden,
            _ if self.read_only => Access::ReadOnly,
            Access::ReadWrite if kind == Kind::File && nlink > 1 => Access::ReadOnly,
            a => a,
        }
    }

    /// The entry `name` in `dir`.
    pub fn lookup(&self, dir: &Entry, name: &OsStr) -> Result<Entry, Refused> {
        check_name(name)?;
        let rel = dir.rel.join(name);
        let dfd = Self::dir_fd(dir)?;
        let st = stat_at(dfd, name).map_err(|e| Refused::Io(rel.clone(), e))?;
        if st.st_dev != self.root.dev_ino.0 {
            return Err(Refused::Escape(rel));
        }
        let kind = kind_of(&st).ok_or_else(|| Refused::Special(rel.clone()))?;
        let access = self.access_of(&rel, kind, st.st_nlink);
        if access == Access::Hidden {
            return Err(Refused::Hidden(rel));
        }
        let own = if kind == Kind::Dir {
            let fd = openat2(dfd, name, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| self.io(&rel, e))?;
            let again = fstat(fd.as_raw_fd()).map_err(|e| Refused::Io(rel.clone(), e))?;
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
                return Err(Refused::errno_at(&rel, libc::ESTALE));
            }
            Some(Arc::new(fd))
        } else {
            None
        };
        Ok(Entry { rel, kind, access, parent: dir.dir.clone(), dir: own, dev_ino: (st.st_dev, st.st_ino) })
    }

    /// The entry's attributes now; an entry replaced on the host since it
    /// was looked up is stale (ENOENT), never the new file.
    pub fn stat(&self, entry: &Entry) -> Result<libc::stat, Refused> {
        let st = match (&entry.dir, &entry.parent) {
            (Some(fd), _) => fstat(fd.as_raw_fd()),
            (None, Some(p)) => stat_at(p.as_raw_fd(), entry.name()),
            (None, None) => return Err(Refused::errno_at(&entry.rel, libc::ESTALE)),
        }
        .map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        if (st.st_dev, st.st_ino) != entry.dev_ino {
            return Err(Refused::errno_at(&entry.rel, libc::ENOENT));
        }
        Ok(st)
    }

    /// The same entry known under a new path (after a rename): its policy
    /// is that of the new path.
    pub fn relocated(&self, entry: &Entry, rel: PathBuf) -> Entry {
        let nlink = self.stat(entry).map(|s| s.st_nlink).unwrap_or(1);
        let access = self.access_of(&rel, entry.kind, nlink);
        Entry { rel, access, ..entry.clone() }
    }

    /// openat2's own refusals mean an escape was tried.
    fn io(&self, rel: &Path, e: io::Error) -> Refused {
        match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => Refused::Escape(rel.to_path_buf()),
            _ => Refused::Io(rel.to_path_buf(), e),
        }
    }

    /// The names in `dir` the guest may see (hidden and special ones left
    /// out), with their kinds.
    pub fn list(&self, dir: &Entry) -> Result<Vec<Listed>, Refused> {
        let fd = self.open_dir(dir)?;
        let raw = fd.as_raw_fd();
        // SAFETY: raw is an open directory descriptor; fdopendir takes it
        // over (closedir below closes it), so `fd` must not close it too.
        let d = unsafe { libc::fdopendir(raw) };
        if d.is_null() {
            return Err(Refused::Io(dir.rel.clone(), io::Error::last_os_error()));
        }
        std::mem::forget(fd);
        let mut out = Vec::new();
        loop {
            // SAFETY: d is an open DIR stream.
            let ent = unsafe { libc::readdir64(d) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid dirent whose d_name is
            // NUL-terminated.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let name = OsStr::from_bytes(name.to_bytes()).to_os_string();
            if name == "." || name == ".." {
                continue;
            }
            if let Ok(e) = self.lookup(dir, &name) {
                out.push(Listed { name, kind: e.kind, ino: e.ino() });
            }
        }
        // SAFETY: d is an open DIR stream, closed once.
        unsafe { libc::closedir(d) };
        Ok(out)
    }

    /// A directory opened for reading (listing, fsync, attributes).
    pub fn open_dir(&self, dir: &Entry) -> Result<OwnedFd, Refused> {
        openat2(Self::dir_fd(dir)?, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| self.io(&dir.rel, e))
    }

    /// Opens a file for reading or writing. It is opened again by name
    /// under its directory and must still be the same file.
    pub fn open_file(&self, entry: &Entry, write: bool) -> Result<OwnedFd, Refused> {
        if entry.kind != Kind::File {
            return Err(Refused::Special(entry.rel.clone()));
        }
        if write {
            self.check_writable(entry)?;
        }
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
        let fd = openat2(Self::parent_fd(entry)?, entry.name(), flags, 0).map_err(|e| self.io(&entry.rel, e))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        if (st.st_dev, st.st_ino) != entry.dev_ino || kind_of(&st) != Some(Kind::File) {
            return Err(Refused::errno_at(&entry.rel, libc::ENOENT));
        }
        Ok(fd)
    }

    /// The target of a symbolic link (read, never followed).
    pub fn readlink(&self, entry: &Entry) -> Result<OsString, Refused> {
        if entry.kind != Kind::Symlink {
            return Err(Refused::errno_at(&entry.rel, libc::EINVAL));
        }
        self.stat(entry)?;
        let pfd = Self::parent_fd(entry)?;
        let mut buf = vec![0u8; MAX_LINK + 1];
        let c = cstr(entry.name()).map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        // SAFETY: c is a valid string and buf a writable buffer of the
        // length given.
        let n = unsafe { libc::readlinkat(pfd, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(Refused::Io(entry.rel.clone(), io::Error::last_os_error()));
        }
        buf.truncate(n as usize);
        Ok(OsString::from_vec(buf))
    }

    /// Refuses changes to an entry the guest may only read.
    pub fn check_writable(&self, entry: &Entry) -> Result<(), Refused> {
        match entry.access {
            Access::ReadWrite => Ok(()),
            _ => Err(Refused::ReadOnly(entry.rel.clone())),
        }
    }

    /// Sets access and modification times (None: leave as is; the
    /// `UTIME_NOW` convention of utimensat applies).
    pub fn set_times(&self, entry: &Entry, times: [libc::timespec; 2]) -> Result<(), Refused> {
        self.check_writable(entry)?;
        match entry.kind {
            Kind::Symlink => {
                let pfd = Self::parent_fd(entry)?;
                self.stat(entry)?;
                // SAFETY: pfd is an open directory, the name a valid C
                // string, times two valid timespecs.
                at(&entry.rel, |c| unsafe {
                    libc::utimensat(pfd, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })
            }
            Kind::Dir | Kind::File => {
                let fd = if entry.kind == Kind::Dir { self.open_dir(entry)? } else { self.open_file(entry, true)? };
                // SAFETY: fd is open, times two valid timespecs.
                if unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) } != 0 {
                    return Err(Refused::Io(entry.rel.clone(), io::Error::last_os_error()));
                }
                Ok(())
            }
        }
    }

    /// Changes permission bits; set-id bits are never given.
    pub fn chmod(&self, entry: &Entry, mode: u32) -> Result<(), Refused> {
        self.check_writable(entry)?;
        let fd = match entry.kind {
            Kind::Dir => self.open_dir(entry)?,
            Kind::File => self.open_file(entry, true)?,
            Kind::Symlink => return Err(Refused::errno_at(&entry.rel, libc::EOPNOTSUPP)),
        };
        // SAFETY: fd is open.
        if unsafe { libc::fchmod(fd.as_raw_fd(), (mode & 0o1777) as libc::mode_t) } != 0 {
            return Err(Refused::Io(entry.rel.clone(), io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The path a new name in `dir` would have, if the guest may create it.
    fn writable_name(&self, dir: &Entry, name: &OsStr, is_dir: bool) -> Result<PathBuf, Refused> {
        check_name(name)?;
        let rel = dir.rel.join(name);
        match self.access_of(&rel, if is_dir { Kind::Dir } else { Kind::File }, 1) {
            Access::Hidden => Err(Refused::Hidden(rel)),
            Access::ReadOnly => Err(Refused::ReadOnly(rel)),
            Access::ReadWrite if dir.access != Access::ReadWrite => Err(Refused::ReadOnly(rel)),
            Access::ReadWrite => Ok(rel),
        }
    }

    /// Gives a new entry to the folder's owner when running as root.
    fn give_to_owner(&self, dfd: RawFd, rel: &Path) -> Result<(), Refused> {
        let Some((uid, gid)) = self.chown_to else { return Ok(()) };
        // SAFETY: dfd is an open directory, the name a valid C string.
        at(rel, |c| unsafe { libc::fchownat(dfd, c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
    }

    /// Creates a new file (it must not exist); returns it open for writing.
    /// Set-id bits are never given.
    pub fn create(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<(Entry, OwnedFd), Refused> {
        let rel = self.writable_name(dir, name, false)?;
        let dfd = Self::dir_fd(dir)?;
        let fd = openat2(dfd, name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode & 0o777)
            .map_err(|e| self.io(&rel, e))?;
        self.give_to_owner(dfd, &rel)?;
        let entry = self.lookup(dir, name)?;
        Ok((entry, fd))
    }

    pub fn mkdir(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<Entry, Refused> {
        let rel = self.writable_name(dir, name, true)?;
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory, the name a valid C string.
        at(&rel, |c| unsafe { libc::mkdirat(dfd, c.as_ptr(), (mode & 0o1777) as libc::mode_t) })?;
        self.give_to_owner(dfd, &rel)?;
        self.lookup(dir, name)
    }

    /// Removes a file or link (`dir_expected` false) or an empty directory.
    /// Returns what was removed.
    pub fn remove(&self, dir: &Entry, name: &OsStr, dir_expected: bool) -> Result<Entry, Refused> {
        let entry = self.lookup(dir, name)?;
        if entry.access != Access::ReadWrite || dir.access != Access::ReadWrite {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let flags = if dir_expected { libc::AT_REMOVEDIR } else { 0 };
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory, the name a valid C string.
        at(&entry.rel, |c| unsafe { libc::unlinkat(dfd, c.as_ptr(), flags) })?;
        Ok(entry)
    }

    /// Renames within the folder; both the old and the new path must be
    /// writable (so a read-only or hidden file can neither be moved away
    /// nor replaced). Returns the entry moved, under its new path.
    pub fn rename(
        &self,
        from_dir: &Entry,
        from: &OsStr,
        to_dir: &Entry,
        to: &OsStr,
        mode: RenameMode,
    ) -> Result<Entry, Refused> {
        let entry = self.lookup(from_dir, from)?;
        if entry.access != Access::ReadWrite || from_dir.access != Access::ReadWrite {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let new_rel = self.writable_name(to_dir, to, entry.kind == Kind::Dir)?;
        // What the new name replaces must be writable too.
        match self.lookup(to_dir, to) {
            Ok(old) if old.access != Access::ReadWrite => return Err(Refused::ReadOnly(old.rel)),
            Err(e @ (Refused::Hidden(_) | Refused::Special(_) | Refused::Escape(_))) => return Err(e),
            _ => {}
        }
        // A directory carries its subtree: it may not take protected paths
        // (.git/config) away, nor arrive where they would be.
        if entry.kind == Kind::Dir && (self.policy.protects_below(&entry.rel) || self.policy.protects_below(&new_rel)) {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let (ffd, tfd) = (Self::dir_fd(from_dir)?, Self::dir_fd(to_dir)?);
        let to_c = CString::new(to.as_bytes()).map_err(|_| Refused::BadName(to.to_os_string()))?;
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
        };
        // SAFETY: both descriptors are open directories, both names valid C
        // strings that outlive the call.
        at(&entry.rel, |c| unsafe { libc::renameat2(ffd, c.as_ptr(), tfd, to_c.as_ptr(), flags) }).map_err(
            |e| match e {
                Refused::Io(_, io) => Refused::Io(new_rel.clone(), io),
                other => other,
            },
        )?;
        Ok(Entry { parent: to_dir.dir.clone(), ..self.relocated(&entry, new_rel) })
    }

    /// Hard links are never made: one would let a path the policy protects
    /// be changed through another name.
    pub fn link(&self, _entry: &Entry, dir: &Entry, name: &OsStr) -> Result<(), Refused> {
        Err(Refused::HardLink(dir.rel.join(name)))
    }

    /// Creates a symbolic link whose target, read from where the link is
    /// (or an absolute path into the folder), stays inside the folder on a
    /// path the guest may write: the host user's own tools follow links,
    /// so a link must not lead them out.
    pub fn symlink(&self, dir: &Entry, name: &OsStr, target: &OsStr) -> Result<Entry, Refused> {
        let rel = self.writable_name(dir, name, false)?;
        let refused = || Refused::LinkTarget(rel.clone(), target.to_os_string());
        if target.is_empty() || target.len() > MAX_LINK {
            return Err(refused());
        }
        // The folder has the same path in the guest: an absolute target
        // inside it is read from its root.
        let (start, rest): (Vec<&OsStr>, &Path) = match Path::new(target).strip_prefix(&self.path) {
            Ok(inside) if Path::new(target).is_absolute() => (Vec::new(), inside),
            _ => (dir.rel.iter().collect(), Path::new(target)),
        };
        let mut resolved = start;
        for c in rest.components() {
            match c {
                Component::Normal(n) => resolved.push(n),
                Component::CurDir => {}
                Component::ParentDir => {
                    resolved.pop().ok_or_else(refused)?;
                }
                Component::RootDir | Component::Prefix(_) => return Err(refused()),
            }
        }
        let resolved: PathBuf = resolved.iter().collect();
        if self.access_of(&resolved, Kind::File, 1) != Access::ReadWrite {
            return Err(refused());
        }
        let t = CString::new(target.as_bytes()).map_err(|_| refused())?;
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory; both strings are valid.
        at(&rel, |c| unsafe { libc::symlinkat(t.as_ptr(), dfd, c.as_ptr()) })?;
        self.give_to_owner(dfd, &rel)?;
        self.lookup(dir, name)
    }

    /// Filesystem figures of the folder's host filesystem.
    pub fn statfs(&self) -> Result<libc::statvfs, Refused> {
        let fd = self.open_dir(&self.root)?;
        // SAFETY: statvfs is plain data; zeroed is a valid value to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open, st a valid statvfs to write.
        if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(Refused::Io(PathBuf::new(), io::Error::last_os_error()));
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A host tree: the shared folder, and a secret next to it.
    fn tree() -> (tempfile::TempDir, Share) {
        let t = tempfile::tempdir().unwrap();
        let w = t.path().join("work");
        fs::create_dir_all(w.join("src")).unwrap();
        fs::create_dir_all(w.join(".git/hooks")).unwrap();
        fs::create_dir_all(w.join(".ssh")).unwrap();
        fs::write(w.join("src/main.rs"), "fn main() {}").unwrap();
        fs::write(w.join(".env"), "TOKEN=secret").unwrap();
        fs::write(w.join(".ssh/id_ed25519"), "key").unwrap();
        fs::write(w.join(".git/config"), "[core]").unwrap();
        fs::write(w.join(".git/hooks/pre-commit"), "#!/bin/sh").unwrap();
        fs::write(t.path().join("outside-secret"), "do not read").unwrap();
        // Links already on the host: absolute and relative ways out, and
        // one to a hidden file inside.
        symlink(t.path().join("outside-secret"), w.join("abs-link")).unwrap();
        symlink("../outside-secret", w.join("rel-link")).unwrap();
        symlink(".env", w.join("env-link")).unwrap();
        symlink("/proc/self/root/etc/passwd", w.join("proc-link")).unwrap();
        let share = Share::open(&w, FsPolicy::default(), false).unwrap();
        (t, share)
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn plain_files_resolve_and_read() {
        let (_t, s) = tree();
        let src = s.lookup(s.root(), os("src")).unwrap();
        let f = s.lookup(&src, os("main.rs")).unwrap();
        assert_eq!((f.kind, f.access, f.rel.as_path()), (Kind::File, Access::ReadWrite, Path::new("src/main.rs")));
        let fd = s.open_file(&f, false).unwrap();
        let mut text = String::new();
        use std::io::Read;
        fs::File::from(fd).read_to_string(&mut text).unwrap();
        assert_eq!(text, "fn main() {}");
    }

    #[test]
    fn names_cannot_climb_or_smuggle_paths() {
        let (_t, s) = tree();
        for bad in ["..", ".", "", "a/b", "../outside-secret", "src/../../x", "/etc/passwd", "x\0y"] {
            let e = s.lookup(s.root(), os(bad)).unwrap_err();
            assert!(matches!(e, Refused::BadName(_)), "{bad:?}: {e}");
        }
        let long = "x".repeat(256);
        assert!(matches!(s.lookup(s.root(), os(&long)), Err(Refused::BadName(_))));
    }

    #[test]
    fn symlinks_are_entries_never_followed() {
        let (_t, s) = tree();
        for name in ["abs-link", "rel-link", "env-link", "proc-link"] {
            let e = s.lookup(s.root(), os(name)).unwrap();
            assert_eq!(e.kind, Kind::Symlink, "{name}");
            // Opening one as a file does not follow it.
            assert!(s.open_file(&e, false).is_err(), "{name} opened");
        }
        // The confined open itself refuses to follow any of them.
        for name in ["abs-link", "rel-link", "env-link", "proc-link"] {
            let e = openat2(s.root().dir.as_ref().unwrap().as_raw_fd(), os(name), libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{name}");
        }
        // A symlinked directory is not a directory to resolve beneath.
        let link = s.lookup(s.root(), os("rel-link")).unwrap();
        assert!(s.lookup(&link, os("anything")).is_err());
    }

    #[test]
    fn hidden_paths_do_not_exist_for_the_guest() {
        let (_t, s) = tree();
        for name in [".env", ".ssh"] {
            let e = s.lookup(s.root(), os(name)).unwrap_err();
            assert!(matches!(e, Refused::Hidden(_)), "{name}: {e}");
            assert_eq!(e.errno(), libc::ENOENT);
        }
        let names: Vec<OsString> = s.list(s.root()).unwrap().into_iter().map(|l| l.name).collect();
        assert!(names.contains(&OsString::from("src")) && names.contains(&OsString::from("env-link")));
        assert!(!names.contains(&OsString::from(".env")) && !names.contains(&OsString::from(".ssh")), "{names:?}");
        // Not creatable either, under any spelling the policy covers.
        for name in [".env", ".env.local", "new.pem"] {
            assert!(matches!(s.create(s.root(), os(name), 0o644), Err(Refused::Hidden(_))), "{name}");
        }
        assert!(matches!(s.mkdir(s.root(), os(".aws"), 0o755), Err(Refused::Hidden(_))));
    }

    #[test]
    fn read_only_paths_refuse_every_change() {
        let (t, s) = tree();
        let git = s.lookup(s.root(), os(".git")).unwrap();
        let config = s.lookup(&git, os("config")).unwrap();
        assert_eq!(config.access, Access::ReadOnly);
        assert!(s.open_file(&config, false).is_ok(), "readable");
        assert!(matches!(s.open_file(&config, true), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(&git, os("config"), false), Err(Refused::ReadOnly(_))));
        assert!(matches!(
            s.rename(&git, os("config"), s.root(), os("c"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        let hooks = s.lookup(&git, os("hooks")).unwrap();
        assert!(matches!(s.create(&hooks, os("post-checkout"), 0o755), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(&hooks, os("pre-commit"), false), Err(Refused::ReadOnly(_))));
        // Nothing can be moved over a read-only path or into hooks.
        s.create(s.root(), os("evil"), 0o755).unwrap();
        assert!(matches!(
            s.rename(s.root(), os("evil"), &hooks, os("pre-push"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        assert!(matches!(
            s.rename(s.root(), os("evil"), &git, os("config"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        // Nor can the directory holding them move, or another take its place.
        assert!(matches!(
            s.rename(s.root(), os(".git"), s.root(), os("git2"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        assert!(matches!(
            s.rename(&git, os("hooks"), s.root(), os("h"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        let decoy = s.mkdir(s.root(), os("decoy"), 0o755).unwrap();
        s.create(&decoy, os("config"), 0o644).unwrap();
        fs::rename(t.path().join("work/.git"), t.path().join("real-git")).unwrap();
        assert!(matches!(
            s.rename(s.root(), os("decoy"), s.root(), os(".git"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        fs::rename(t.path().join("real-git"), t.path().join("work/.git")).unwrap();
        let w = t.path().join("work");
        assert_eq!(fs::read_to_string(w.join(".git/config")).unwrap(), "[core]");
        assert!(!w.join(".git/hooks/pre-push").exists() && !w.join(".git/hooks/post-checkout").exists());
    }

    #[test]
    fn writes_stay_inside_and_links_cannot_lead_out() {
        let (t, s) = tree();
        let src = s.lookup(s.root(), os("src")).unwrap();
        let (e, fd) = s.create(&src, os("new.rs"), 0o6755).unwrap();
        use std::io::Write;
        fs::File::from(fd).write_all(b"// new").unwrap();
        let w = t.path().join("work");
        assert_eq!(fs::read_to_string(w.join("src/new.rs")).unwrap(), "// new");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(w.join("src/new.rs")).unwrap().permissions().mode() & 0o7000, 0, "no set-id bits");
        assert_eq!(e.rel, Path::new("src/new.rs"));
        assert!(matches!(s.create(&src, os("new.rs"), 0o644), Err(Refused::Io(..))), "no overwrite by create");
        // Hard links: never.
        assert!(matches!(s.link(&e, s.root(), os("hard")), Err(Refused::HardLink(_))));
        // Symlinks: inside and writable only.
        assert!(s.symlink(&src, os("ok-link"), os("new.rs")).is_ok());
        assert!(s.symlink(s.root(), os("ok-up"), os("src/../src/main.rs")).is_ok());
        let abs_inside = w.join("src/main.rs");
        assert!(s.symlink(s.root(), os("ok-abs"), abs_inside.as_os_str()).is_ok(), "absolute, into the folder");
        for target in [
            "/etc/passwd",
            &format!("{}/../outside-secret", w.display()),
            &format!("{}/.env", w.display()),
            "../outside-secret",
            "../../x",
            "src/../../outside-secret",
            ".env",
            ".git/config",
            ".git/hooks/pre-commit",
            "",
        ] {
            let r = s.symlink(s.root(), os("bad-link"), os(target));
            assert!(matches!(r, Err(Refused::LinkTarget(..))), "{target:?}: {r:?}");
        }
        assert!(!w.join("bad-link").exists());
        // Removing and renaming ordinary files works.
        s.rename(&src, os("new.rs"), s.root(), os("moved.rs"), RenameMode::Replace).unwrap();
        assert!(w.join("moved.rs").exists());
        s.remove(s.root(), os("moved.rs"), false).unwrap();
        assert!(!w.join("moved.rs").exists());
    }

    #[test]
    fn files_the_host_links_elsewhere_are_read_only() {
        let (t, s) = tree();
        fs::hard_link(t.path().join("outside-secret"), t.path().join("work/linked")).unwrap();
        let e = s.lookup(s.root(), os("linked")).unwrap();
        assert_eq!(e.access, Access::ReadOnly);
        assert!(matches!(s.open_file(&e, true), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(s.root(), os("linked"), false), Err(Refused::ReadOnly(_))));
        assert_eq!(fs::read_to_string(t.path().join("outside-secret")).unwrap(), "do not read");
    }

    #[test]
    fn a_rename_may_refuse_to_replace() {
        let (t, s) = tree();
        let src = s.lookup(s.root(), os("src")).unwrap();
        s.create(&src, os("a.rs"), 0o644).unwrap();
        let r = s.rename(&src, os("a.rs"), &src, os("main.rs"), RenameMode::NoReplace);
        assert_eq!(r.unwrap_err().errno(), libc::EEXIST);
        assert_eq!(fs::read_to_string(t.path().join("work/src/main.rs")).unwrap(), "fn main() {}");
        let moved = s.rename(&src, os("a.rs"), s.root(), os("b.rs"), RenameMode::NoReplace).unwrap();
        assert_eq!(moved.rel, Path::new("b.rs"));
        assert_eq!(s.stat(&moved).unwrap().st_size, 0, "the moved entry is reachable by its new name");
    }

    #[test]
    fn special_files_are_refused() {
        let (t, s) = tree();
        let fifo = CString::new(t.path().join("work/pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = s.lookup(s.root(), os("pipe")).unwrap_err();
        assert!(matches!(e, Refused::Special(_)), "{e}");
        assert!(!s.list(s.root()).unwrap().iter().any(|l| l.name == "pipe"));
    }
}
