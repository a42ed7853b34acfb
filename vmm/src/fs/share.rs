//! Host side: a shared folder as the file server will see it. Every access
//! the guest asks for is resolved here, one name at a time, beneath a
//! directory already resolved, with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`:
//!
//! - names are single components (no `/`, `.`, `..`, NUL; at most 255
//!   bytes), so `..` cannot climb out;
//! - symbolic links are never followed on the host (the guest's kernel
//!   follows them in the guest, through further lookups), so no link,
//!   planted by the guest or already there, leads outside or around the
//!   policy; the guest may only create links whose target stays inside the
//!   folder and on a path it could write;
//! - no mount point inside the folder is crossed, no `/proc` magic link is
//!   followed;
//! - devices, FIFOs and sockets are refused; hard links are never created;
//! - the policy ([`FsPolicy`]) is applied to the path of every entry:
//!   hidden ones do not exist for the guest, read-only ones refuse writes,
//!   creation, removal and renames.
//!
//! Every refusal is a [`Refused`] whose text goes to the sandbox's audit log.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use super::policy::{Access, FsPolicy};

pub const MAX_NAME: usize = 255;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// A resolved entry: an O_PATH descriptor, its path from the root, its
/// kind and what the guest may do with it.
#[derive(Debug)]
pub struct Entry {
    pub fd: OwnedFd,
    pub rel: PathBuf,
    pub kind: Kind,
    pub access: Access,
    dev_ino: (u64, u64),
}

pub struct Share {
    root: Entry,
    policy: FsPolicy,
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

/// openat2(2) confined beneath `dir`.
fn openat2(dir: RawFd, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
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

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; zeroed is a valid value to be filled.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open and st a valid stat to write.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
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

/// Calls a `*at` function of libc with a checked name; maps errors.
fn at(rel: &Path, f: impl FnOnce(&CString) -> libc::c_int) -> Result<(), Refused> {
    let name = rel.file_name().unwrap_or_default();
    let c = CString::new(name.as_bytes()).map_err(|_| Refused::BadName(name.to_os_string()))?;
    if f(&c) != 0 {
        return Err(Refused::Io(rel.to_path_buf(), io::Error::last_os_error()));
    }
    Ok(())
}

impl Share {
    /// Opens the folder at `path` to share under `policy`.
    pub fn open(path: &Path, policy: FsPolicy) -> io::Result<Share> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: c is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        let root = Entry {
            fd,
            rel: PathBuf::new(),
            kind: Kind::Dir,
            access: Access::ReadWrite,
            dev_ino: (st.st_dev, st.st_ino),
        };
        Ok(Share { root, policy })
    }

    pub fn root(&self) -> &Entry {
        &self.root
    }

    fn dir_fd(dir: &Entry) -> Result<RawFd, Refused> {
        if dir.kind != Kind::Dir {
            return Err(Refused::Io(dir.rel.clone(), io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        Ok(dir.fd.as_raw_fd())
    }

    /// The entry `name` in `dir`.
    pub fn lookup(&self, dir: &Entry, name: &OsStr) -> Result<Entry, Refused> {
        check_name(name)?;
        let rel = dir.rel.join(name);
        let fd = openat2(Self::dir_fd(dir)?, name, libc::O_PATH, 0).map_err(|e| self.io(&rel, e))?;
        let st = fstat(&fd).map_err(|e| Refused::Io(rel.clone(), e))?;
        let kind = kind_of(&st).ok_or_else(|| Refused::Special(rel.clone()))?;
        let access = self.policy.access(&rel, kind == Kind::Dir);
        if access == Access::Hidden {
            return Err(Refused::Hidden(rel));
        }
        Ok(Entry { fd, rel, kind, access, dev_ino: (st.st_dev, st.st_ino) })
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
    pub fn list(&self, dir: &Entry) -> Result<Vec<(OsString, Kind)>, Refused> {
        let fd = openat2(Self::dir_fd(dir)?, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| self.io(&dir.rel, e))?;
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
                out.push((name, e.kind));
            }
        }
        // SAFETY: d is an open DIR stream, closed once.
        unsafe { libc::closedir(d) };
        Ok(out)
    }

    /// Opens a file for reading or writing. The entry is opened again by
    /// name under its parent and must still be the same file.
    pub fn open_file(&self, parent: &Entry, entry: &Entry, write: bool) -> Result<OwnedFd, Refused> {
        if entry.kind != Kind::File {
            return Err(Refused::Special(entry.rel.clone()));
        }
        if write && entry.access != Access::ReadWrite {
            return Err(Refused::ReadOnly(entry.rel.clone()));
        }
        let name = entry.rel.file_name().unwrap_or_default();
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
        let fd = openat2(Self::dir_fd(parent)?, name, flags, 0).map_err(|e| self.io(&entry.rel, e))?;
        let st = fstat(&fd).map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        if (st.st_dev, st.st_ino) != entry.dev_ino || kind_of(&st) != Some(Kind::File) {
            return Err(Refused::Escape(entry.rel.clone()));
        }
        Ok(fd)
    }

    /// The path a new name in `dir` would have, if the guest may create it.
    fn writable_name(&self, dir: &Entry, name: &OsStr, is_dir: bool) -> Result<PathBuf, Refused> {
        check_name(name)?;
        let rel = dir.rel.join(name);
        match self.policy.access(&rel, is_dir) {
            Access::Hidden => Err(Refused::Hidden(rel)),
            Access::ReadOnly => Err(Refused::ReadOnly(rel)),
            Access::ReadWrite if dir.access != Access::ReadWrite => Err(Refused::ReadOnly(rel)),
            Access::ReadWrite => Ok(rel),
        }
    }

    /// Creates a new file (it must not exist); returns it open for writing.
    /// Set-id bits are never given.
    pub fn create(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<(Entry, OwnedFd), Refused> {
        let rel = self.writable_name(dir, name, false)?;
        let fd = openat2(Self::dir_fd(dir)?, name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode & 0o777)
            .map_err(|e| self.io(&rel, e))?;
        let entry = self.lookup(dir, name)?;
        Ok((entry, fd))
    }

    pub fn mkdir(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<Entry, Refused> {
        let rel = self.writable_name(dir, name, true)?;
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory, the name a valid C string.
        at(&rel, |c| unsafe { libc::mkdirat(dfd, c.as_ptr(), (mode & 0o777) as libc::mode_t) })?;
        self.lookup(dir, name)
    }

    /// Removes a file, link or empty directory.
    pub fn remove(&self, dir: &Entry, name: &OsStr) -> Result<(), Refused> {
        let entry = self.lookup(dir, name)?;
        if entry.access != Access::ReadWrite || dir.access != Access::ReadWrite {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let flags = if entry.kind == Kind::Dir { libc::AT_REMOVEDIR } else { 0 };
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory, the name a valid C string.
        at(&entry.rel, |c| unsafe { libc::unlinkat(dfd, c.as_ptr(), flags) })
    }

    /// Renames within the folder; both the old and the new path must be
    /// writable (so a read-only or hidden file can neither be moved away
    /// nor replaced).
    pub fn rename(&self, from_dir: &Entry, from: &OsStr, to_dir: &Entry, to: &OsStr) -> Result<(), Refused> {
        let entry = self.lookup(from_dir, from)?;
        if entry.access != Access::ReadWrite || from_dir.access != Access::ReadWrite {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let new_rel = self.writable_name(to_dir, to, entry.kind == Kind::Dir)?;
        // A directory carries its subtree: it may not take protected paths
        // (.git/config) away, nor arrive where they would be.
        if entry.kind == Kind::Dir && (self.policy.protects_below(&entry.rel) || self.policy.protects_below(&new_rel)) {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let (ffd, tfd) = (Self::dir_fd(from_dir)?, Self::dir_fd(to_dir)?);
        let to_c = CString::new(to.as_bytes()).map_err(|_| Refused::BadName(to.to_os_string()))?;
        // SAFETY: both descriptors are open directories, both names valid C
        // strings that outlive the call.
        at(&entry.rel, |c| unsafe { libc::renameat(ffd, c.as_ptr(), tfd, to_c.as_ptr()) }).map_err(|e| match e {
            Refused::Io(_, io) => Refused::Io(new_rel.clone(), io),
            other => other,
        })
    }

    /// Hard links are never made: one would let a path the policy protects
    /// be changed through another name.
    pub fn link(&self, _entry: &Entry, dir: &Entry, name: &OsStr) -> Result<(), Refused> {
        Err(Refused::HardLink(dir.rel.join(name)))
    }

    /// Creates a symbolic link whose target, read from where the link is,
    /// stays inside the folder on a path the guest may write: the host
    /// user's own tools follow links, so a link must not lead them out.
    pub fn symlink(&self, dir: &Entry, name: &OsStr, target: &OsStr) -> Result<Entry, Refused> {
        let rel = self.writable_name(dir, name, false)?;
        let refused = || Refused::LinkTarget(rel.clone(), target.to_os_string());
        let mut resolved: Vec<&OsStr> = dir.rel.iter().collect();
        for c in Path::new(target).components() {
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
        if target.is_empty() || self.policy.access(&resolved, false) != Access::ReadWrite {
            return Err(refused());
        }
        let t = CString::new(target.as_bytes()).map_err(|_| refused())?;
        let dfd = Self::dir_fd(dir)?;
        // SAFETY: dfd is an open directory; both strings are valid.
        at(&rel, |c| unsafe { libc::symlinkat(t.as_ptr(), dfd, c.as_ptr()) })?;
        self.lookup(dir, name)
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
        let share = Share::open(&w, FsPolicy::default()).unwrap();
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
        let fd = s.open_file(&src, &f, false).unwrap();
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
            assert!(s.open_file(s.root(), &e, false).is_err(), "{name} opened");
        }
        // The confined open itself refuses to follow any of them.
        for name in ["abs-link", "rel-link", "env-link", "proc-link"] {
            let e = openat2(s.root().fd.as_raw_fd(), os(name), libc::O_RDONLY, 0).unwrap_err();
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
        let names: Vec<OsString> = s.list(s.root()).unwrap().into_iter().map(|(n, _)| n).collect();
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
        assert!(s.open_file(&git, &config, false).is_ok(), "readable");
        assert!(matches!(s.open_file(&git, &config, true), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(&git, os("config")), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.rename(&git, os("config"), s.root(), os("c")), Err(Refused::ReadOnly(_))));
        let hooks = s.lookup(&git, os("hooks")).unwrap();
        assert!(matches!(s.create(&hooks, os("post-checkout"), 0o755), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(&hooks, os("pre-commit")), Err(Refused::ReadOnly(_))));
        // Nothing can be moved over a read-only path or into hooks.
        s.create(s.root(), os("evil"), 0o755).unwrap();
        assert!(matches!(s.rename(s.root(), os("evil"), &hooks, os("pre-push")), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.rename(s.root(), os("evil"), &git, os("config")), Err(Refused::ReadOnly(_))));
        // Nor can the directory holding them move, or another take its place.
        assert!(matches!(s.rename(s.root(), os(".git"), s.root(), os("git2")), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.rename(&git, os("hooks"), s.root(), os("h")), Err(Refused::ReadOnly(_))));
        let decoy = s.mkdir(s.root(), os("decoy"), 0o755).unwrap();
        s.create(&decoy, os("config"), 0o644).unwrap();
        fs::rename(t.path().join("work/.git"), t.path().join("real-git")).unwrap();
        assert!(matches!(s.rename(s.root(), os("decoy"), s.root(), os(".git")), Err(Refused::ReadOnly(_))));
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
        for target in [
            "/etc/passwd",
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
        s.rename(&src, os("new.rs"), s.root(), os("moved.rs")).unwrap();
        assert!(w.join("moved.rs").exists());
        s.remove(s.root(), os("moved.rs")).unwrap();
        assert!(!w.join("moved.rs").exists());
    }

    #[test]
    fn special_files_are_refused() {
        let (t, s) = tree();
        let fifo = CString::new(t.path().join("work/pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = s.lookup(s.root(), os("pipe")).unwrap_err();
        assert!(matches!(e, Refused::Special(_)), "{e}");
        assert!(!s.list(s.root()).unwrap().iter().any(|(n, _)| n == "pipe"));
    }
}
