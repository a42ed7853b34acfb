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
//!   creation, removal and renames; inside any `.git` only what git writes
//!   while it works is writable;
//! - git directories the guest makes (`git init`, `git clone`) are kept
//!   out of the folder, in a shadow directory of the sandbox's own
//!   ([`Share::with_git_shadow`]): the guest sees `sub/.git` as usual, the
//!   host's git never finds it and never runs its configuration or hooks;
//!   and no directory of the folder may hold both a `HEAD` and a git
//!   `config` (a bare repository the host's git would also obey);
//! - a symbolic link the guest makes is followed, on the host, through the
//!   links already there, as the user's tools would follow it: it must
//!   end inside the folder on a path the guest may write, and its target
//!   may climb (`..`) only before its first name, so no link made later
//!   can turn it outward;
//! - permission bits the guest sets never give group or others write
//!   access, nor set-id bits;
//! - at set-up, what the host's own git configs and `.envrc` files name
//!   for the host's tools to run or load (a `core.hooksPath`, an
//!   `include.path`, a `PATH_add` directory) is made read-only
//!   ([`autorun`]), and so are the integrator's own files in the folder
//!   ([`Share::with_read_only_paths`]); the directories above such a path
//!   can be neither moved nor removed, so it cannot be made again;
//! - a host repository's git configuration is read with its secrets
//!   (tokens in URLs, extra headers) taken out ([`gitconfig`]); it is
//!   read-only, so the guest never writes the view back.
//!
//! Every refusal is a [`Refused`] whose text goes to the sandbox's audit log.

use std::collections::VecDeque;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::policy::{
    self, is_git_dir_name, is_one_of, same_name, Access, FsPolicy, GIT_DIR, GIT_SHADOWED, GIT_WRITABLE_DIRS,
};
use super::{autorun, gitconfig};
use crate::sys;

pub const MAX_NAME: usize = 255;
/// Longest symbolic link target accepted or returned.
pub const MAX_LINK: usize = 4095;
/// Longest path from the folder's root the guest may reach (as Linux's
/// PATH_MAX): what the server keeps per entry is bounded by it.
pub const MAX_PATH: usize = 4096;
/// Most links followed while checking where a new link leads (as the
/// kernel's own limit).
const MAX_LINK_HOPS: usize = 40;
/// Names that make a directory holding `HEAD` a git directory whose
/// configuration or hooks git would read.
const GIT_CONFIG_NAMES: &[&str] = &["config", "commondir", "config.worktree", "hooks"];
/// The file that marks a git directory.
const GIT_HEAD: &str = "HEAD";
/// Most names read when looking for another case of a name in a directory
/// (a larger directory is taken to hold it: refused, not searched).
const MAX_CASE_SCAN: usize = 100_000;
/// Most entries searched for climbing links when a directory moves up.
const MAX_MOVE_SCAN: usize = 10_000;

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
    #[error(
        "A new git directory {0} would be read by the host's git (which runs what its config names); \
         sbx keeps guest-made repositories outside the folder, and this share has no place for them"
    )]
    GitDir(PathBuf),
    #[error(
        "{0} would make its directory a bare git repository (HEAD beside a git config), which the host's git obeys"
    )]
    BareRepo(PathBuf),
    #[error("Path too long: {0}")]
    TooLong(PathBuf),
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
            Refused::Escape(_)
            | Refused::Special(_)
            | Refused::LinkTarget(..)
            | Refused::GitDir(_)
            | Refused::BareRepo(_) => libc::EACCES,
            Refused::TooLong(_) => libc::ENAMETOOLONG,
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
            | Refused::GitDir(p)
            | Refused::BareRepo(p)
            | Refused::TooLong(p)
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
    /// In a guest-made git directory, kept in the shadow (see
    /// [`Share::with_git_shadow`]).
    shadow: bool,
    /// The host git directory this entry is in (or is): the number of
    /// components of its path. A `.git`, or any directory holding `HEAD`,
    /// `objects` and `refs` (a bare repository), which git would use as
    /// one; the innermost counts.
    git_root: Option<usize>,
}

/// Where a name of a directory lives on the host: in the directory itself,
/// or, for a `.git` the guest makes where the host has none, in that
/// directory's shadow container.
struct Place {
    fd: Arc<OwnedFd>,
    dev: u64,
    shadow: bool,
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
    /// Where guest-made git directories are kept (outside the folder).
    shadow: Option<PathBuf>,
    /// Shadow containers made so far (for the workspace quota).
    containers_made: AtomicU64,
    /// What the set-up could not resolve, for the user (see [`autorun`]).
    notes: Vec<String>,
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

/// openat2(2) confined beneath `dir`.
fn openat2(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    sys::openat2(dir, &c, flags | libc::O_CLOEXEC | libc::O_NOFOLLOW, mode, RESOLVE)
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    sys::fstat(fd)
}

/// The entry `name` in directory `dir` itself (a link is not followed).
fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    sys::fstatat(dir, &c, libc::AT_SYMLINK_NOFOLLOW)
}

/// The target of the link `name` in directory `dir` (at most [`MAX_LINK`]
/// bytes).
fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; MAX_LINK + 1];
    let n = sys::readlinkat(dir, &c, &mut buf)?;
    buf.truncate(n);
    Ok(OsString::from_vec(buf))
}

/// An anonymous in-memory file holding `bytes`, positioned at its start.
fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    let fd = sys::memfd_create(c"sbx-view", libc::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    std::io::Seek::rewind(&mut file)?;
    Ok(OwnedFd::from(file))
}

/// True if git would take the directory `fd` for a git directory: it holds
/// `HEAD`, `objects` and `refs` (any case: on a case-folding filesystem git
/// finds them in any).
fn looks_like_git_dir(fd: Option<BorrowedFd<'_>>) -> bool {
    fd.is_some_and(|fd| ["HEAD", "objects", "refs"].iter().all(|n| stat_at(fd, OsStr::new(n)).is_ok()))
}

/// The number of components of `rel`.
fn depth(rel: &Path) -> usize {
    rel.components().count()
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

/// Calls a `*at` function (of [`sys`]) with the entry's name; maps errors.
fn at(rel: &Path, f: impl FnOnce(&CStr) -> io::Result<()>) -> Result<(), Refused> {
    let name = rel.file_name().unwrap_or_default();
    let c = CString::new(name.as_bytes()).map_err(|_| Refused::BadName(name.to_os_string()))?;
    f(&c).map_err(|e| Refused::Io(rel.to_path_buf(), e))
}

/// What one listed name costs besides its bytes (for byte limits).
pub const LISTED_COST: usize = std::mem::size_of::<Listed>();

/// A name in a directory listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: OsString,
    pub kind: Kind,
    pub ino: u64,
}

/// The permission bits the guest may give: no set-id or sticky bits, no
/// write access for group or others (the host user's other tools, and
/// other users, must not find a file the guest made writable to all).
pub const GUEST_MODE_BITS: u32 = 0o755;

/// How a rename treats an existing target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
}

impl Share {
    /// Opens the folder at `path` to share under `policy`; `read_only`
    /// makes every path in it read-only. A writable folder's paths that
    /// the host's tools run or load, as the host's own configs and
    /// `.envrc` files name them ([`autorun::scan`]), are read-only too;
    /// what could not be resolved is in [`Share::notes`].
    pub fn open(path: &Path, policy: FsPolicy, read_only: bool) -> io::Result<Share> {
        let mut policy = policy;
        let mut read_only = read_only;
        let mut notes = Vec::new();
        if !read_only {
            let found = autorun::scan(path);
            for rel in &found.paths {
                if let Err(e) = policy.add_read_only_path(rel) {
                    // Not one rule can stand for it: all of the folder.
                    notes.push(format!("{e}: the whole folder is read-only"));
                    read_only = true;
                }
            }
            if found.whole_folder {
                notes.push(format!(
                    "{}: the host's tools run what is at the folder's top (a PATH entry or hooks directory); \
                     the whole folder is read-only",
                    path.display()
                ));
                read_only = true;
            }
            notes.extend(found.notes);
        }
        let c = cstr(path.as_os_str())?;
        let fd = sys::open(&c, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)?;
        let st = fstat(fd.as_fd())?;
        let root = Entry {
            rel: PathBuf::new(),
            kind: Kind::Dir,
            access: if read_only { Access::ReadOnly } else { Access::ReadWrite },
            parent: None,
            dir: Some(Arc::new(fd)),
            dev_ino: (st.st_dev, st.st_ino),
            shadow: false,
            git_root: None,
        };
        let mut root = root;
        if looks_like_git_dir(root.dir.as_ref().map(|d| d.as_fd())) {
            root.git_root = Some(0);
        }
        let euid = sys::geteuid();
        let owner = (st.st_uid, st.st_gid);
        let chown_to = (euid == 0 && owner.0 != 0).then_some(owner);
        let containers_made = AtomicU64::new(0);
        Ok(Share {
            root,
            path: path.to_path_buf(),
            policy,
            read_only,
            chown_to,
            owner,
            shadow: None,
            containers_made,
            notes,
        })
    }

    /// What the set-up could not resolve statically (an `.envrc` word
    /// with a variable, an unknown `use`), or widened: one line each,
    /// for the user.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Makes these host paths read-only to the guest, if they are in the
    /// folder (others are ignored): a file the integrator reads at start
    /// (a `--policy` or `--upstream-ca` file) must not be the guest's to
    /// change. Both the path as given and the path its links resolve to
    /// on the host are covered, with all that is below them; the
    /// directories above them can be neither renamed, removed nor
    /// replaced, and the paths can be neither removed, replaced nor
    /// created (see [`FsPolicy::add_read_only_path`]). Call before the
    /// share is served.
    pub fn with_read_only_paths(mut self, host_paths: &[PathBuf]) -> Result<Share, policy::Error> {
        let mut roots = vec![self.path.clone()];
        if let Ok(c) = std::fs::canonicalize(&self.path) {
            roots.push(c);
        }
        for p in host_paths {
            let mut candidates = vec![p.clone()];
            if let Ok(c) = std::fs::canonicalize(p) {
                candidates.push(c);
            }
            for c in &candidates {
                for root in &roots {
                    if let Ok(rel) = c.strip_prefix(root) {
                        if rel.as_os_str().is_empty() {
                            self.read_only = true;
                            self.root.access = Access::ReadOnly;
                        } else {
                            self.policy.add_read_only_path(rel)?;
                        }
                    }
                }
            }
        }
        Ok(self)
    }

    /// Keeps the git directories the guest makes in `dir` (which must be
    /// outside every shared folder: the sandbox's own state), one
    /// container per folder directory, named by its device and inode, so
    /// that it follows the directory through renames and across runs. A
    /// `.git` the host already has stays the one the guest sees. Without
    /// this, the guest cannot make a `.git` at all.
    pub fn with_git_shadow(mut self, dir: PathBuf) -> Share {
        self.shadow = Some(dir);
        self
    }

    /// The shadow containers this share has made (each a directory in the
    /// sandbox's state, kept across runs): the workspace quota counts them.
    pub fn shadow_containers_made(&self) -> u64 {
        self.containers_made.load(Ordering::Relaxed)
    }

    /// Where `name` in `dir` lives (see [`Place`]); `create`: make the
    /// shadow container if it is needed and not there yet.
    fn place(&self, dir: &Entry, name: &OsStr, create: bool) -> Result<Place, Refused> {
        let fd = match (&dir.dir, dir.kind) {
            (Some(fd), Kind::Dir) => fd.clone(),
            _ => return Err(Refused::errno_at(&dir.rel, libc::ENOTDIR)),
        };
        let here = Place { fd, dev: dir.dev_ino.0, shadow: dir.shadow };
        let Some(root) = self.shadow.as_ref().filter(|_| Self::shadowable(dir, name)) else { return Ok(here) };
        match stat_at(here.fd.as_fd(), name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            _ => return Ok(here),
        }
        let container = root.join(format!("{}-{}", dir.dev_ino.0, dir.dev_ino.1));
        if create {
            let new = std::fs::symlink_metadata(&container).is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&container)
                .map_err(|e| Refused::Io(dir.rel.join(name), e))?;
            if new {
                self.containers_made.fetch_add(1, Ordering::Relaxed);
            }
        }
        let fd = match std::fs::File::open(&container) {
            Ok(f) => OwnedFd::from(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(here),
            Err(e) => return Err(Refused::Io(dir.rel.join(name), e)),
        };
        let st = fstat(fd.as_fd()).map_err(|e| Refused::Io(dir.rel.join(name), e))?;
        Ok(Place { fd: Arc::new(fd), dev: st.st_dev, shadow: true })
    }

    /// Names of `dir` the guest's own live in the shadow when the host has
    /// none: a `.git` (outside host git directories), and in a host git
    /// directory the state of a rebase or cherry-pick in progress.
    fn shadowable(dir: &Entry, name: &OsStr) -> bool {
        if dir.shadow {
            return false;
        }
        let in_git_root = dir.git_root == Some(depth(&dir.rel));
        name == GIT_DIR && dir.git_root.is_none() || in_git_root && GIT_SHADOWED.iter().any(|n| name == *n)
    }

    /// True if `entry` may be neither moved nor removed: a host git
    /// directory, or one of the directories git keeps in it.
    fn pinned(&self, entry: &Entry) -> bool {
        if entry.shadow || entry.kind != Kind::Dir {
            return false;
        }
        let d = depth(&entry.rel);
        let git_dir_child = entry.git_root == Some(d.saturating_sub(1))
            && d > 0
            && entry.name().to_str().is_some_and(|n| is_one_of(n, GIT_WRITABLE_DIRS) || is_one_of(n, GIT_SHADOWED));
        entry.git_root == Some(d) || git_dir_child || self.policy.protects_below(&entry.rel)
    }

    pub fn root(&self) -> &Entry {
        &self.root
    }

    /// The folder's owner on the host (uid, gid): the guest's agent user
    /// stands for it.
    pub fn owner(&self) -> (u32, u32) {
        self.owner
    }

    fn dir_fd(dir: &Entry) -> Result<BorrowedFd<'_>, Refused> {
        match (&dir.dir, dir.kind) {
            (Some(fd), Kind::Dir) => Ok(fd.as_fd()),
            _ => Err(Refused::errno_at(&dir.rel, libc::ENOTDIR)),
        }
    }

    /// True if `name` exists in the host directory `fd`, in this spelling
    /// or (on a case-folding filesystem, or made so) another case.
    fn has_any_case(fd: BorrowedFd<'_>, name: &str) -> bool {
        if stat_at(fd, OsStr::new(name)).is_ok() {
            return true;
        }
        let Ok(dup) = openat2(fd, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0) else { return false };
        let Ok(names) = sys::Dir::from_fd(dup) else { return false };
        let mut seen = 0;
        for n in names {
            seen += 1;
            if seen > MAX_CASE_SCAN || n.to_str().is_some_and(|n| same_name(n, name)) {
                return true;
            }
        }
        false
    }

    fn parent_fd(entry: &Entry) -> Result<BorrowedFd<'_>, Refused> {
        entry.parent.as_ref().map(|p| p.as_fd()).ok_or_else(|| Refused::errno_at(&entry.rel, libc::EBUSY))
    }

    /// What the guest may do with `rel`, of `kind`, with host link count
    /// `nlink`.
    fn access_of(&self, rel: &Path, kind: Kind, nlink: u64, shadow: bool, git_root: Option<usize>) -> Access {
        let policy = if shadow {
            self.policy.access_in_shadow(rel, kind == Kind::Dir)
        } else {
            self.policy.access_at(rel, kind == Kind::Dir, git_root)
        };
        match policy {
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
        if rel.as_os_str().len() > MAX_PATH {
            return Err(Refused::TooLong(rel));
        }
        let place = self.place(dir, name, false)?;
        let dfd = place.fd.as_fd();
        let st = stat_at(dfd, name).map_err(|e| Refused::Io(rel.clone(), e))?;
        if st.st_dev != place.dev {
            return Err(Refused::Escape(rel));
        }
        let kind = kind_of(&st).ok_or_else(|| Refused::Special(rel.clone()))?;
        let own = if kind == Kind::Dir {
            let fd = openat2(dfd, name, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| self.io(&rel, e))?;
            let again = fstat(fd.as_fd()).map_err(|e| Refused::Io(rel.clone(), e))?;
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
                return Err(Refused::errno_at(&rel, libc::ESTALE));
            }
            Some(Arc::new(fd))
        } else {
            None
        };
        // The innermost git directory: this one, if git would take it for
        // one; else its directory's.
        let git_root = if place.shadow {
            None
        } else if name.to_str().is_some_and(is_git_dir_name) || looks_like_git_dir(own.as_ref().map(|d| d.as_fd())) {
            Some(depth(&rel))
        } else {
            dir.git_root
        };
        let access = self.access_of(&rel, kind, st.st_nlink, place.shadow, git_root);
        if access == Access::Hidden {
            return Err(Refused::Hidden(rel));
        }
        let dev_ino = (st.st_dev, st.st_ino);
        Ok(Entry { rel, kind, access, parent: Some(place.fd), dir: own, dev_ino, shadow: place.shadow, git_root })
    }

    /// The entry's attributes now; an entry replaced on the host since it
    /// was looked up is stale (ENOENT), never the new file.
    pub fn stat(&self, entry: &Entry) -> Result<libc::stat, Refused> {
        let st = match (&entry.dir, &entry.parent) {
            (Some(fd), _) => fstat(fd.as_fd()),
            (None, Some(p)) => stat_at(p.as_fd(), entry.name()),
            (None, None) => return Err(Refused::errno_at(&entry.rel, libc::ESTALE)),
        }
        .map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        if (st.st_dev, st.st_ino) != entry.dev_ino {
            return Err(Refused::errno_at(&entry.rel, libc::ENOENT));
        }
        let mut st = st;
        if self.redacted(entry) {
            st.st_size = self.redacted_view(entry)?.len() as libc::off_t;
        }
        Ok(st)
    }

    /// True if the guest reads `entry` with secrets taken out.
    fn redacted(&self, entry: &Entry) -> bool {
        let names: Vec<&str> = entry.rel.iter().filter_map(|n| n.to_str()).collect();
        let rest = entry.git_root.and_then(|n| names.get(n..));
        entry.kind == Kind::File && !entry.shadow && rest.is_some_and(policy::is_git_config_in)
    }

    /// A git config file as the guest reads it (see [`gitconfig`]).
    fn redacted_view(&self, entry: &Entry) -> Result<Vec<u8>, Refused> {
        use std::io::Read;
        let fd = self.open_real(entry, false)?;
        let mut text = Vec::new();
        std::fs::File::from(fd)
            .take(gitconfig::MAX_CONFIG as u64 + 1)
            .read_to_end(&mut text)
            .map_err(|e| Refused::Io(entry.rel.clone(), e))?;
        if text.len() > gitconfig::MAX_CONFIG {
            return Err(Refused::errno_at(&entry.rel, libc::EFBIG));
        }
        Ok(gitconfig::redact(&text))
    }

    /// The same entry known under a new path (after a rename): its policy
    /// is that of the new path.
    pub fn relocated(&self, entry: &Entry, rel: PathBuf) -> Entry {
        let nlink = self.stat(entry).map(|s| s.st_nlink).unwrap_or(1);
        // Renames never move an entry into or out of a git directory, so it
        // keeps its git root unless it is one (then it moved with it).
        let git_root = match entry.git_root {
            Some(n) if n == depth(&entry.rel) => Some(depth(&rel)),
            other => other,
        };
        let access = self.access_of(&rel, entry.kind, nlink, entry.shadow, git_root);
        Entry { rel, access, git_root, ..entry.clone() }
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
        self.list_within(dir, usize::MAX)
    }

    /// Like [`Share::list`], giving up (ENOMEM) once the names read pass
    /// `max_bytes` (each counted with [`LISTED_COST`] bytes more), before
    /// the whole of a huge directory is held.
    pub fn list_within(&self, dir: &Entry, max_bytes: usize) -> Result<Vec<Listed>, Refused> {
        let fd = self.open_dir(dir)?;
        let names = sys::Dir::from_fd(fd).map_err(|e| Refused::Io(dir.rel.clone(), e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for name in names {
            if name == "." || name == ".." {
                continue;
            }
            bytes = bytes.saturating_add(name.len() + LISTED_COST);
            if bytes > max_bytes {
                return Err(Refused::errno_at(&dir.rel, libc::ENOMEM));
            }
            if let Ok(e) = self.lookup(dir, &name) {
                out.push(Listed { name, kind: e.kind, ino: e.ino() });
            }
        }
        if self.shadow.is_some() {
            for name in [GIT_DIR].iter().chain(GIT_SHADOWED) {
                let name = OsStr::new(name);
                if Self::shadowable(dir, name) && !out.iter().any(|l| l.name == name) {
                    if let Ok(e) = self.lookup(dir, name) {
                        out.push(Listed { name: name.into(), kind: e.kind, ino: e.ino() });
                    }
                }
            }
        }
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
        if !write && self.redacted(entry) {
            let view = self.redacted_view(entry)?;
            return memfd_with(&view).map_err(|e| Refused::Io(entry.rel.clone(), e));
        }
        self.open_real(entry, write)
    }

    /// The file itself, opened again by name under its directory.
    fn open_real(&self, entry: &Entry, write: bool) -> Result<OwnedFd, Refused> {
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
        let fd = openat2(Self::parent_fd(entry)?, entry.name(), flags, 0).map_err(|e| self.io(&entry.rel, e))?;
        let st = fstat(fd.as_fd()).map_err(|e| Refused::Io(entry.rel.clone(), e))?;
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
        read_link_at(Self::parent_fd(entry)?, entry.name()).map_err(|e| Refused::Io(entry.rel.clone(), e))
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
                at(&entry.rel, |c| sys::utimensat(pfd, c, &times, libc::AT_SYMLINK_NOFOLLOW))
            }
            Kind::Dir | Kind::File => {
                let fd = if entry.kind == Kind::Dir { self.open_dir(entry)? } else { self.open_file(entry, true)? };
                sys::futimens(fd.as_fd(), &times).map_err(|e| Refused::Io(entry.rel.clone(), e))
            }
        }
    }

    /// Changes permission bits; set-id bits and write access for group or
    /// others are never given.
    pub fn chmod(&self, entry: &Entry, mode: u32) -> Result<(), Refused> {
        self.check_writable(entry)?;
        // A host git directory (and what else may not be moved) keeps its
        // mode too: the user's git must still be able to enter it.
        if self.pinned(entry) {
            return Err(Refused::ReadOnly(entry.rel.clone()));
        }
        let fd = match entry.kind {
            Kind::Dir => self.open_dir(entry)?,
            Kind::File => self.open_file(entry, true)?,
            Kind::Symlink => return Err(Refused::errno_at(&entry.rel, libc::EOPNOTSUPP)),
        };
        sys::fchmod(fd.as_fd(), (mode & GUEST_MODE_BITS) as libc::mode_t).map_err(|e| Refused::Io(entry.rel.clone(), e))
    }

    /// The path a new name in `dir` would have, if the guest may create it
    /// there, in `place` (from [`Share::place`]).
    fn writable_name(&self, dir: &Entry, name: &OsStr, is_dir: bool, place: &Place) -> Result<PathBuf, Refused> {
        check_name(name)?;
        let rel = dir.rel.join(name);
        if rel.as_os_str().len() > MAX_PATH {
            return Err(Refused::TooLong(rel));
        }
        // `.GIT` and the like too: on a case-folding filesystem the host's
        // git would find them as `.git`.
        if name.to_str().is_some_and(is_git_dir_name) && (!place.shadow || name != GIT_DIR) {
            return Err(Refused::GitDir(rel));
        }
        let kind = if is_dir { Kind::Dir } else { Kind::File };
        match self.access_of(&rel, kind, 1, place.shadow, if place.shadow { None } else { dir.git_root }) {
            Access::Hidden => return Err(Refused::Hidden(rel)),
            Access::ReadOnly => return Err(Refused::ReadOnly(rel)),
            Access::ReadWrite if dir.access != Access::ReadWrite => return Err(Refused::ReadOnly(rel)),
            Access::ReadWrite => {}
        }
        if place.shadow {
            return Ok(rel);
        }
        // But in a git directory itself, no directory may come to hold both
        // HEAD and a git config (any case): git would take it for a bare
        // repository and obey that config.
        let is_git_root = dir.git_root == Some(depth(&dir.rel));
        let fd = place.fd.as_fd();
        let is = |a: &str| name.to_str().is_some_and(|n| same_name(n, a));
        let bare = if is(GIT_HEAD) {
            GIT_CONFIG_NAMES.iter().any(|n| Self::has_any_case(fd, n))
        } else {
            GIT_CONFIG_NAMES.iter().any(|n| is(n)) && Self::has_any_case(fd, GIT_HEAD)
        };
        if bare && !is_git_root {
            return Err(Refused::BareRepo(rel));
        }
        Ok(rel)
    }

    /// Gives a new entry to the folder's owner when running as root.
    fn give_to_owner(&self, dfd: BorrowedFd<'_>, rel: &Path) -> Result<(), Refused> {
        let Some((uid, gid)) = self.chown_to else { return Ok(()) };
        at(rel, |c| sys::fchownat(dfd, c, uid, gid, libc::AT_SYMLINK_NOFOLLOW))
    }

    /// Creates a new file (it must not exist); returns it open for writing.
    /// Set-id bits are never given.
    pub fn create(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<(Entry, OwnedFd), Refused> {
        let place = self.place(dir, name, true)?;
        let rel = self.writable_name(dir, name, false, &place)?;
        let dfd = place.fd.as_fd();
        let fd = openat2(dfd, name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode & GUEST_MODE_BITS)
            .map_err(|e| self.io(&rel, e))?;
        self.give_to_owner(dfd, &rel)?;
        let entry = self.lookup(dir, name)?;
        Ok((entry, fd))
    }

    pub fn mkdir(&self, dir: &Entry, name: &OsStr, mode: u32) -> Result<Entry, Refused> {
        let place = self.place(dir, name, true)?;
        let rel = self.writable_name(dir, name, true, &place)?;
        let dfd = place.fd.as_fd();
        at(&rel, |c| sys::mkdirat(dfd, c, (mode & GUEST_MODE_BITS) as libc::mode_t))?;
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
        if self.pinned(&entry) {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let flags = if dir_expected { libc::AT_REMOVEDIR } else { 0 };
        let dfd = Self::parent_fd(&entry)?;
        at(&entry.rel, |c| sys::unlinkat(dfd, c, flags))?;
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
        if entry.access != Access::ReadWrite || from_dir.access != Access::ReadWrite || self.pinned(&entry) {
            return Err(Refused::ReadOnly(entry.rel));
        }
        let place = self.place(to_dir, to, true)?;
        let new_rel = self.writable_name(to_dir, to, entry.kind == Kind::Dir, &place)?;
        // Nothing moves between the folder and the shadow: a guest-made
        // git directory would bring its config into the folder.
        if place.shadow != entry.shadow {
            return Err(Refused::errno_at(&entry.rel, libc::EXDEV));
        }
        // Nor into or out of a host git directory: what is data there (a
        // bare repository built in `objects/`) would be a repository the
        // host's git obeys outside, and a repository moved in would become
        // writable. Tools copy instead (EXDEV), through the checked paths.
        if !entry.shadow && entry.git_root.is_some() != to_dir.git_root.is_some() {
            return Err(Refused::errno_at(&entry.rel, libc::EXDEV));
        }
        // What the new name replaces must be writable too.
        match self.lookup(to_dir, to) {
            Ok(old) if old.access != Access::ReadWrite || self.pinned(&old) => return Err(Refused::ReadOnly(old.rel)),
            Err(e @ (Refused::Hidden(_) | Refused::Special(_) | Refused::Escape(_))) => return Err(e),
            _ => {}
        }
        // A directory carries its subtree: it may not arrive where
        // protected paths would be.
        if entry.kind == Kind::Dir && self.policy.protects_below(&new_rel) {
            return Err(Refused::ReadOnly(entry.rel));
        }
        // A link is followed from where it will be; a directory moved up
        // must not hold links whose `..` would then climb out.
        if !entry.shadow {
            self.check_move(&entry, &to_dir.rel, &new_rel)?;
        }
        let (ffd, tfd) = (Self::parent_fd(&entry)?, place.fd.as_fd());
        let to_c = CString::new(to.as_bytes()).map_err(|_| Refused::BadName(to.to_os_string()))?;
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
        };
        at(&entry.rel, |c| sys::renameat2(ffd, c, tfd, &to_c, flags)).map_err(|e| match e {
            Refused::Io(_, io) => Refused::Io(new_rel.clone(), io),
            other => other,
        })?;
        Ok(Entry { parent: Some(place.fd), ..self.relocated(&entry, new_rel) })
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
        let place = self.place(dir, name, true)?;
        let rel = self.writable_name(dir, name, false, &place)?;
        let refused = || Refused::LinkTarget(rel.clone(), target.to_os_string());
        if target.is_empty() || target.len() > MAX_LINK {
            return Err(refused());
        }
        // No links in host git directories (git makes none there).
        if !place.shadow && dir.git_root.is_some() {
            return Err(refused());
        }
        if !place.shadow && !self.link_allowed(&dir.rel, Path::new(target)) {
            return Err(refused());
        }
        let t = CString::new(target.as_bytes()).map_err(|_| refused())?;
        let dfd = place.fd.as_fd();
        at(&rel, |c| sys::symlinkat(&t, dfd, c))?;
        self.give_to_owner(dfd, &rel)?;
        self.lookup(dir, name)
    }

    /// True if a link in `dir` to `target` may be there: followed on the
    /// host, it ends inside the folder, on a path the guest may write, in
    /// no git directory.
    fn link_allowed(&self, dir: &Path, target: &Path) -> bool {
        let Some(dest) = self.link_destination(dir, target) else { return false };
        let in_git = dest.iter().any(|n| n.to_str().is_none_or(is_git_dir_name));
        let writable =
            [Kind::File, Kind::Dir].iter().all(|&k| self.access_of(&dest, k, 1, false, None) == Access::ReadWrite);
        writable && !in_git && !self.policy.protects_below(&dest)
    }

    /// Checks a move of `entry` to `new_rel` (in `to_dir`): a link must be
    /// allowed from its new place; a directory moved up may not hold links
    /// that climb (`..`) further than their new depth allows (searched to
    /// a bound; a larger tree is refused with EXDEV: tools copy instead).
    fn check_move(&self, entry: &Entry, to_dir: &Path, new_rel: &Path) -> Result<(), Refused> {
        match entry.kind {
            Kind::Symlink => {
                let target = self.readlink(entry)?;
                if !self.link_allowed(to_dir, Path::new(&target)) {
                    return Err(Refused::LinkTarget(new_rel.to_path_buf(), target));
                }
                Ok(())
            }
            Kind::Dir if depth(new_rel) < depth(&entry.rel) => {
                let fd = Self::dir_fd(entry)?;
                let mut budget = MAX_MOVE_SCAN;
                if self.links_stay_inside(fd, depth(new_rel), &mut budget) {
                    Ok(())
                } else {
                    Err(Refused::errno_at(&entry.rel, libc::EXDEV))
                }
            }
            _ => Ok(()),
        }
    }

    /// True if every link below the directory `fd` (which will be at
    /// `depth` components) climbs at most to the folder's root; false too
    /// past `budget` entries.
    fn links_stay_inside(&self, fd: BorrowedFd<'_>, depth: usize, budget: &mut usize) -> bool {
        let Ok(dup) = openat2(fd, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0) else { return false };
        let Ok(names) = sys::Dir::from_fd(dup) else { return false };
        for name in names {
            if name == "." || name == ".." {
                continue;
            }
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let Ok(st) = stat_at(fd, &name) else { continue };
            match kind_of(&st) {
                Some(Kind::Symlink) => {
                    let Ok(target) = read_link_at(fd, &name) else { return false };
                    let climbs = Path::new(&target).components().filter(|c| *c == Component::ParentDir).count();
                    if Path::new(&target).is_absolute() && !Path::new(&target).starts_with(&self.path) || climbs > depth
                    {
                        return false;
                    }
                }
                Some(Kind::Dir) => {
                    let Ok(sub) = openat2(fd, &name, libc::O_PATH | libc::O_DIRECTORY, 0) else { return false };
                    if !self.links_stay_inside(sub.as_fd(), depth + 1, budget) {
                        return false;
                    }
                }
                _ => {}
            }
        }
        true
    }

    /// Where a new link in `dir` (from the root) to `target` leads on the
    /// host, as the user's tools would follow it through the links already
    /// there; None if it leads outside the folder (or across a mount
    /// point), climbs (`..`) after a name, or follows too many links. Past
    /// a name that does not exist (yet), the rest is taken as written:
    /// whatever is made there later is checked when it is made.
    fn link_destination(&self, dir: &Path, target: &Path) -> Option<PathBuf> {
        let mut named = false;
        for c in target.components() {
            match c {
                Component::Normal(_) => named = true,
                Component::ParentDir if named => return None,
                _ => {}
            }
        }
        let mut cur: Vec<OsString> = Vec::new();
        let mut todo: VecDeque<OsString> = VecDeque::new();
        self.follow(dir, target, &mut cur, &mut todo)?;
        let (mut hops, mut real) = (0, true);
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                cur.pop()?;
                continue;
            }
            if real {
                match self.stat_below(&cur, &name) {
                    // Across a mount point: somewhere else.
                    Some(st) if st.st_dev != self.root.dev_ino.0 => return None,
                    Some(st) if kind_of(&st) == Some(Kind::Symlink) => {
                        hops += 1;
                        if hops > MAX_LINK_HOPS {
                            return None;
                        }
                        let there: PathBuf = cur.iter().collect();
                        let link = self.read_link_below(&cur, &name)?;
                        self.follow(&there, Path::new(&link), &mut cur, &mut todo)?;
                        continue;
                    }
                    Some(st) => real = kind_of(&st) == Some(Kind::Dir),
                    None => real = false,
                }
            }
            cur.push(name);
        }
        Some(cur.iter().collect())
    }

    /// Starts following `target` from `dir`: `cur` becomes where it starts
    /// (the root for an absolute target into the folder, which has the
    /// same path in the guest), and its names go first in `todo`. None for
    /// an absolute target elsewhere.
    fn follow(&self, dir: &Path, target: &Path, cur: &mut Vec<OsString>, todo: &mut VecDeque<OsString>) -> Option<()> {
        let rest = if target.is_absolute() {
            cur.clear();
            target.strip_prefix(&self.path).ok()?
        } else {
            *cur = dir.iter().map(OsStr::to_os_string).collect();
            target
        };
        let mut names = Vec::new();
        for c in rest.components() {
            match c {
                Component::Normal(n) => names.push(n.to_os_string()),
                Component::ParentDir => names.push("..".into()),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        for n in names.into_iter().rev() {
            todo.push_front(n);
        }
        Some(())
    }

    /// The directory at `names` from the root (no links followed), if it
    /// is there.
    fn open_below(&self, names: &[OsString]) -> Option<OwnedFd> {
        let root = Self::dir_fd(&self.root).ok()?;
        let path: PathBuf = names.iter().collect();
        let path = if names.is_empty() { OsStr::new(".") } else { path.as_os_str() };
        openat2(root, path, libc::O_PATH | libc::O_DIRECTORY, 0).ok()
    }

    /// The entry `name` in the directory at `names`, if it is there.
    fn stat_below(&self, names: &[OsString], name: &OsStr) -> Option<libc::stat> {
        let fd = self.open_below(names)?;
        stat_at(fd.as_fd(), name).ok()
    }

    fn read_link_below(&self, names: &[OsString], name: &OsStr) -> Option<OsString> {
        let fd = self.open_below(names)?;
        read_link_at(fd.as_fd(), name).ok()
    }

    /// Filesystem figures of the folder's host filesystem.
    pub fn statfs(&self) -> Result<libc::statvfs, Refused> {
        let fd = self.open_dir(&self.root)?;
        sys::fstatvfs(fd.as_fd()).map_err(|e| Refused::Io(PathBuf::new(), e))
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
            let e = openat2(s.root().dir.as_ref().unwrap().as_fd(), os(name), libc::O_RDONLY, 0).unwrap_err();
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
            Err(Refused::GitDir(_))
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
        assert!(s.symlink(&src, os("ok-up"), os("../src/main.rs")).is_ok());
        let abs_inside = w.join("src/main.rs");
        assert!(s.symlink(s.root(), os("ok-abs"), abs_inside.as_os_str()).is_ok(), "absolute, into the folder");
        for target in [
            "/etc/passwd",
            &format!("{}/../outside-secret", w.display()),
            &format!("{}/.env", w.display()),
            "../outside-secret",
            "../../x",
            "src/../../outside-secret",
            "src/../src/main.rs",
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
        sys::mkfifo(&fifo, 0o644).unwrap();
        let e = s.lookup(s.root(), os("pipe")).unwrap_err();
        assert!(matches!(e, Refused::Special(_)), "{e}");
        assert!(!s.list(s.root()).unwrap().iter().any(|l| l.name == "pipe"));
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn in_the_hosts_git_directory_only_what_git_writes_is_writable() {
        let (t, s) = tree();
        let w = t.path().join("work");
        let git = s.lookup(s.root(), os(".git")).unwrap();
        // What git writes while it works.
        for name in ["index.lock", "HEAD.lock", "COMMIT_EDITMSG", "ORIG_HEAD"] {
            s.create(&git, os(name), 0o644).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        s.rename(&git, os("index.lock"), &git, os("index"), RenameMode::Replace).unwrap();
        let objects = s.mkdir(&git, os("objects"), 0o755).unwrap();
        let ab = s.mkdir(&objects, os("ab"), 0o755).unwrap();
        s.create(&ab, os("cdef"), 0o444).unwrap();
        let refs = s.mkdir(&git, os("refs"), 0o755).unwrap();
        s.mkdir(&refs, os("heads"), 0o755).unwrap();
        // What would make the host's git run or read something else.
        for name in ["config.worktree", "commondir", "config.lock", "description"] {
            assert!(matches!(s.create(&git, os(name), 0o644), Err(Refused::ReadOnly(_))), "{name}");
        }
        for name in ["worktrees", "modules", "info", "branches"] {
            assert!(matches!(s.mkdir(&git, os(name), 0o755), Err(Refused::ReadOnly(_))), "{name}");
        }
        let info = s.mkdir(&objects, os("info"), 0o755).unwrap();
        assert!(matches!(s.create(&info, os("alternates"), 0o644), Err(Refused::ReadOnly(_))));
        s.create(&info, os("commit-graph"), 0o644).unwrap();
        // A file made elsewhere cannot be moved in as config either.
        s.create(s.root(), os("evil"), 0o644).unwrap();
        assert!(matches!(
            s.rename(s.root(), os("evil"), &git, os("commondir"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        // The git directory stays where it is; its read-only parts too.
        assert!(matches!(s.remove(s.root(), os(".git"), true), Err(Refused::ReadOnly(_))));
        assert!(!w.join(".git/commondir").exists() && !w.join(".git/worktrees").exists());
        // The same rules hold in a nested repository the host has.
        fs::create_dir_all(w.join("sub/.git")).unwrap();
        let sub = s.lookup(s.root(), os("sub")).unwrap();
        let subgit = s.lookup(&sub, os(".git")).unwrap();
        assert!(matches!(s.create(&subgit, os("config"), 0o644), Err(Refused::ReadOnly(_))));
        assert!(matches!(
            s.rename(&sub, os(".git"), s.root(), os("moved"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        // A .git file (a link to a git directory) is read-only too.
        fs::write(w.join("sub2.git"), "").unwrap();
        fs::create_dir_all(w.join("wt")).unwrap();
        fs::write(w.join("wt/.git"), "gitdir: /somewhere\n").unwrap();
        let wt = s.lookup(s.root(), os("wt")).unwrap();
        let gitfile = s.lookup(&wt, os(".git")).unwrap();
        assert!(matches!(s.open_file(&gitfile, true), Err(Refused::ReadOnly(_))));
    }

    #[test]
    fn guest_made_git_directories_live_in_the_shadow() {
        let (t, s) = tree();
        let shadow = t.path().join("state/gitdirs");
        let s = s.with_git_shadow(shadow.clone());
        let w = t.path().join("work");
        // `git init` in a folder the host has no repository in.
        let proj = s.mkdir(s.root(), os("proj"), 0o755).unwrap();
        let git = s.mkdir(&proj, os(".git"), 0o755).unwrap();
        let (config, _) = s.create(&git, os("config"), 0o644).unwrap();
        assert_eq!(config.access, Access::ReadWrite, "the guest's own repository is all its own");
        let hooks = s.mkdir(&git, os("hooks"), 0o755).unwrap();
        s.create(&hooks, os("pre-commit"), 0o755).unwrap();
        s.create(&git, os("HEAD"), 0o644).unwrap();
        assert!(!w.join("proj/.git").exists(), "the host's git finds no repository here");
        let names: Vec<OsString> = s.list(&proj).unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec![OsString::from(".git")], "the guest sees it");
        let again = s.lookup(&proj, os(".git")).unwrap();
        assert!(again.shadow && s.lookup(&again, os("config")).is_ok());
        // It stays across runs (a new share on the same folder and shadow).
        let s2 = Share::open(&w, FsPolicy::default(), false).unwrap().with_git_shadow(shadow.clone());
        let proj2 = s2.lookup(s2.root(), os("proj")).unwrap();
        assert!(s2.lookup(&proj2, os(".git")).is_ok());
        // And follows its folder through a rename.
        s.rename(s.root(), os("proj"), s.root(), os("renamed"), RenameMode::Replace).unwrap();
        let renamed = s.lookup(s.root(), os("renamed")).unwrap();
        let git = s.lookup(&renamed, os(".git")).unwrap();
        // Nothing moves between the shadow and the folder.
        let e = s.rename(&renamed, os(".git"), s.root(), os("bare"), RenameMode::Replace).unwrap_err();
        assert_eq!(e.errno(), libc::EXDEV);
        let e = s.rename(&git, os("config"), s.root(), os("config"), RenameMode::Replace).unwrap_err();
        assert_eq!(e.errno(), libc::EXDEV);
        // The host's own .git is still the one seen where there is one.
        let host_git = s.lookup(s.root(), os(".git")).unwrap();
        assert!(!host_git.shadow && matches!(s.create(&host_git, os("commondir"), 0o644), Err(Refused::ReadOnly(_))));
        // rm -rf of the guest's repository.
        s.remove(&git, os("config"), false).unwrap();
        let hooks = s.lookup(&git, os("hooks")).unwrap();
        s.remove(&hooks, os("pre-commit"), false).unwrap();
        s.remove(&git, os("hooks"), true).unwrap();
        s.remove(&git, os("HEAD"), false).unwrap();
        s.remove(&renamed, os(".git"), true).unwrap();
        assert!(s.lookup(&renamed, os(".git")).is_err());
        // Without a shadow, a new .git is refused with a reason.
        let (t2, plain) = tree();
        let d = plain.mkdir(plain.root(), os("d"), 0o755).unwrap();
        let e = plain.mkdir(&d, os(".git"), 0o755).unwrap_err();
        assert!(matches!(e, Refused::GitDir(_)) && e.errno() == libc::EACCES, "{e}");
        assert!(matches!(plain.create(&d, os(".git"), 0o644), Err(Refused::GitDir(_))));
        for name in [".GIT", ".Git"] {
            assert!(matches!(s.mkdir(s.root(), os(name), 0o755), Err(Refused::GitDir(_))), "{name}");
        }
        assert!(!t2.path().join("work/d/.git").exists());
    }

    #[test]
    fn no_directory_becomes_a_bare_repository() {
        let (t, s) = tree();
        let w = t.path().join("work");
        let a = s.mkdir(s.root(), os("a"), 0o755).unwrap();
        s.mkdir(&a, os("objects"), 0o755).unwrap();
        s.mkdir(&a, os("refs"), 0o755).unwrap();
        s.create(&a, os("HEAD"), 0o644).unwrap();
        for name in ["config", "commondir"] {
            assert!(matches!(s.create(&a, os(name), 0o644), Err(Refused::BareRepo(_))), "{name}");
        }
        assert!(matches!(s.mkdir(&a, os("hooks"), 0o755), Err(Refused::BareRepo(_))));
        assert!(matches!(s.symlink(&a, os("config"), os("../src/main.rs")), Err(Refused::BareRepo(_))));
        // The other order: config first, then HEAD (made or moved in).
        let b = s.mkdir(s.root(), os("b"), 0o755).unwrap();
        s.create(&b, os("config"), 0o644).unwrap();
        assert!(matches!(s.create(&b, os("HEAD"), 0o644), Err(Refused::BareRepo(_))));
        assert!(matches!(s.rename(&a, os("HEAD"), &b, os("HEAD"), RenameMode::Replace), Err(Refused::BareRepo(_))));
        assert!(!w.join("a/config").exists() && !w.join("b/HEAD").exists());
        // Ordinary projects are not touched: a config folder, hooks in src.
        s.mkdir(s.root(), os("config"), 0o755).unwrap();
        let src = s.lookup(s.root(), os("src")).unwrap();
        s.mkdir(&src, os("hooks"), 0o755).unwrap();
    }

    #[test]
    fn new_links_are_followed_through_the_links_already_there() {
        let (t, s) = tree();
        let w = t.path().join("work");
        fs::create_dir_all(t.path().join("outside-dir")).unwrap();
        symlink("../outside-dir", w.join("out")).unwrap();
        symlink("src", w.join("in")).unwrap();
        symlink("loop2", w.join("loop1")).unwrap();
        symlink("loop1", w.join("loop2")).unwrap();
        symlink(".git", w.join("gitlink")).unwrap();
        // Through a host link that leads outside: refused, though the text
        // looks inside.
        for target in ["out/x", "out", "./out/../x", "loop1", "loop1/x", "gitlink/config", "in/../.env"] {
            let r = s.symlink(s.root(), os("bad"), os(target));
            assert!(matches!(r, Err(Refused::LinkTarget(..))), "{target:?}: {r:?}");
        }
        // Through a host link that stays inside: fine.
        s.symlink(s.root(), os("ok1"), os("in/main.rs")).unwrap();
        // A chain the guest builds: `d/b -> ..` is the root, so `x -> d/b/..`
        // would be the folder's parent; a `..` after a name is refused.
        let d = s.mkdir(s.root(), os("d"), 0o755).unwrap();
        s.symlink(&d, os("b"), os("..")).unwrap();
        let r = s.symlink(s.root(), os("x"), os("d/b/.."));
        assert!(matches!(r, Err(Refused::LinkTarget(..))), "{r:?}");
        s.symlink(s.root(), os("ok2"), os("d/b/src/main.rs")).unwrap();
        // An absolute target into the folder is followed the same way.
        let abs = w.join("out/x");
        assert!(matches!(s.symlink(s.root(), os("bad"), abs.as_os_str()), Err(Refused::LinkTarget(..))));
        assert!(!w.join("bad").exists() && !w.join("x").exists());
    }

    #[test]
    fn the_guest_never_makes_host_files_writable_to_others() {
        let (t, s) = tree();
        let w = t.path().join("work");
        let (f, _) = s.create(s.root(), os("f"), 0o666).unwrap();
        assert_eq!(mode_of(&w.join("f")) & 0o022, 0);
        s.chmod(&f, 0o6777).unwrap();
        assert_eq!(mode_of(&w.join("f")), 0o755);
        let d = s.mkdir(s.root(), os("d"), 0o1777).unwrap();
        assert_eq!(mode_of(&w.join("d")) & 0o7022, 0);
        s.chmod(&d, 0o777).unwrap();
        assert_eq!(mode_of(&w.join("d")), 0o755);
    }

    #[test]
    fn the_guest_reads_git_config_without_its_secrets() {
        let (t, s) = tree();
        let conf = "[remote \"origin\"]\n\turl = https://me:tok-SECRET@example.com/r.git\n[http]\n\textraheader = Authorization: Basic SECRET2\n";
        fs::write(t.path().join("work/.git/config"), conf).unwrap();
        let git = s.lookup(s.root(), os(".git")).unwrap();
        let config = s.lookup(&git, os("config")).unwrap();
        let mut seen = String::new();
        use std::io::Read;
        fs::File::from(s.open_file(&config, false).unwrap()).read_to_string(&mut seen).unwrap();
        assert!(!seen.contains("SECRET") && seen.contains("url = https://example.com/r.git"), "{seen}");
        assert_eq!(s.stat(&config).unwrap().st_size as usize, seen.len(), "the size the guest sees is the view's");
        assert_eq!(
            fs::read_to_string(t.path().join("work/.git/config")).unwrap(),
            conf,
            "the host's file is untouched"
        );
        assert!(matches!(s.open_file(&config, true), Err(Refused::ReadOnly(_))));
    }

    fn write_via(s: &Share, e: &Entry, text: &str) {
        use std::io::Write;
        fs::File::from(s.open_file(e, true).unwrap()).write_all(text.as_bytes()).unwrap();
    }

    /// The user (or a prompt) runs `git status` in `dir` on the host.
    fn host_git_status(dir: &Path) {
        let _ = std::process::Command::new("git")
            .arg("status")
            .current_dir(dir)
            .env_remove("GIT_DIR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    #[test]
    fn no_bare_repository_is_built_in_git_objects_and_brought_out() {
        let (t, s) = tree();
        let w = t.path().join("work");
        let marker = t.path().join("PWNED");
        let git = s.lookup(s.root(), os(".git")).unwrap();
        let objects = s.mkdir(&git, os("objects"), 0o755).unwrap();
        let evil = s.mkdir(&objects, os("evil"), 0o755).unwrap();
        s.mkdir(&evil, os("objects"), 0o755).unwrap();
        s.mkdir(&evil, os("refs"), 0o755).unwrap();
        let (head, _) = s.create(&evil, os("HEAD"), 0o644).unwrap();
        write_via(&s, &head, "ref: refs/heads/main\n");
        // A config beside HEAD: refused in .git/objects too (any case).
        for name in ["config", "CONFIG", "commondir"] {
            let e = s.create(&evil, os(name), 0o644).unwrap_err();
            assert!(matches!(e, Refused::BareRepo(_) | Refused::ReadOnly(_)), "{name}: {e}");
        }
        // Neither moved out nor reached by a link.
        let e = s.rename(&objects, os("evil"), s.root(), os("tools"), RenameMode::Replace).unwrap_err();
        assert!(matches!(e, Refused::ReadOnly(_)), "it is a git directory itself now: {e}");
        s.mkdir(&objects, os("plain"), 0o755).unwrap();
        let e = s.rename(&objects, os("plain"), s.root(), os("tools"), RenameMode::Replace).unwrap_err();
        assert_eq!(e.errno(), libc::EXDEV, "nothing moves out of a git directory: {e}");
        for target in [".git/objects/evil", ".git", "./.git/objects", ".GIT/objects"] {
            assert!(matches!(s.symlink(s.root(), os("tools"), os(target)), Err(Refused::LinkTarget(..))), "{target}");
        }
        // Git's own directories stay put (alternates cannot be planted by
        // moving objects/ out and back).
        let e = s.rename(&git, os("objects"), s.root(), os("x"), RenameMode::Replace).unwrap_err();
        assert!(matches!(e, Refused::ReadOnly(_)), "{e}");
        assert!(matches!(s.remove(&git, os("objects"), true), Err(Refused::ReadOnly(_))));
        // No links inside a host git directory.
        assert!(matches!(s.symlink(&objects, os("l"), os("evil")), Err(Refused::LinkTarget(..))));
        fs::create_dir_all(w.join("tools")).unwrap();
        host_git_status(&w.join("tools"));
        assert!(!marker.exists(), "the host's git ran the guest's fsmonitor");
    }

    #[test]
    fn a_host_repository_cannot_be_moved_into_git_objects_and_written() {
        let (t, s) = tree();
        let w = t.path().join("work");
        fs::create_dir_all(w.join("sub/.git/hooks")).unwrap();
        fs::write(w.join("sub/.git/config"), "[core]\n").unwrap();
        let git = s.lookup(s.root(), os(".git")).unwrap();
        let objects = s.mkdir(&git, os("objects"), 0o755).unwrap();
        let e = s.rename(s.root(), os("sub"), &objects, os("sub"), RenameMode::Replace).unwrap_err();
        assert_eq!(e.errno(), libc::EXDEV);
        // And the innermost repository's rules apply wherever a path is.
        assert_eq!(s.policy.access(Path::new(".git/objects/sub/.git/config"), false), Access::ReadOnly);
        assert_eq!(fs::read_to_string(w.join("sub/.git/config")).unwrap(), "[core]\n");
    }

    #[test]
    fn host_bare_repositories_are_git_directories_too() {
        let (t, s) = tree();
        let w = t.path().join("work");
        for d in ["backup.git/objects", "backup.git/refs/heads", "backup.git/hooks"] {
            fs::create_dir_all(w.join(d)).unwrap();
        }
        fs::write(w.join("backup.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        fs::write(w.join("backup.git/config"), "[core]\n\tbare = true\n\turl = https://u:tok-SECRET@h/r\n").unwrap();
        let b = s.lookup(s.root(), os("backup.git")).unwrap();
        let config = s.lookup(&b, os("config")).unwrap();
        assert!(s.check_writable(&config).is_err(), "its config is read-only");
        let hooks = s.lookup(&b, os("hooks")).unwrap();
        assert!(s.create(&hooks, os("post-receive"), 0o755).is_err(), "no hooks planted");
        let refs = s.lookup(&b, os("refs")).unwrap();
        let heads = s.lookup(&refs, os("heads")).unwrap();
        s.create(&heads, os("topic"), 0o644).expect("refs stay writable");
        assert!(matches!(
            s.rename(s.root(), os("backup.git"), s.root(), os("moved"), RenameMode::Replace),
            Err(Refused::ReadOnly(_))
        ));
        let mut seen = String::new();
        use std::io::Read;
        fs::File::from(s.open_file(&config, false).unwrap()).read_to_string(&mut seen).unwrap();
        assert!(!seen.contains("SECRET"), "its config is read without secrets: {seen}");
        // A guest's rebase in progress lives in the shadow, never where
        // the host's `git rebase --continue` would run its todo list.
        let (t2, s2) = tree();
        let s2 = s2.with_git_shadow(t2.path().join("state"));
        let git = s2.lookup(s2.root(), os(".git")).unwrap();
        let rebase = s2.mkdir(&git, os("rebase-merge"), 0o755).unwrap();
        s2.create(&rebase, os("git-rebase-todo"), 0o644).unwrap();
        assert!(!t2.path().join("work/.git/rebase-merge").exists());
        assert!(s2.list(&git).unwrap().iter().any(|l| l.name == "rebase-merge"), "the guest sees it");
        fs::create_dir_all(t2.path().join("work/.git/sequencer")).unwrap();
        let seq = s2.lookup(&git, os("sequencer")).unwrap();
        assert!(!seq.shadow && s2.create(&seq, os("todo"), 0o644).is_err(), "the host's own is read-only");
    }

    #[test]
    fn every_rule_holds_for_names_in_another_case() {
        let (t, s) = tree();
        let w = t.path().join("work");
        fs::write(w.join(".ENV"), "TOKEN=secret").unwrap();
        fs::write(w.join("ID_ED25519"), "key").unwrap();
        fs::create_dir_all(w.join(".GIT/OBJECTS/INFO")).unwrap();
        fs::write(w.join(".GIT/CONFIG"), "[remote \"o\"]\n\turl = https://u:tok-SECRET@h/r\n").unwrap();
        for name in [".ENV", "ID_ED25519"] {
            assert!(matches!(s.lookup(s.root(), os(name)), Err(Refused::Hidden(_))), "{name}");
            assert!(!s.list(s.root()).unwrap().iter().any(|l| l.name == name), "{name} listed");
        }
        for name in [".Env.Local", "Id_Rsa", "X.PEM"] {
            assert!(matches!(s.create(s.root(), os(name), 0o644), Err(Refused::Hidden(_))), "{name}");
        }
        let git = s.lookup(s.root(), os(".GIT")).unwrap();
        let config = s.lookup(&git, os("CONFIG")).unwrap();
        assert!(matches!(s.open_file(&config, true), Err(Refused::ReadOnly(_))));
        let mut seen = String::new();
        use std::io::Read;
        fs::File::from(s.open_file(&config, false).unwrap()).read_to_string(&mut seen).unwrap();
        assert!(!seen.contains("SECRET"), "read without its secrets: {seen}");
        let objects = s.lookup(&git, os("OBJECTS")).unwrap();
        let info = s.lookup(&objects, os("INFO")).unwrap();
        assert!(matches!(s.create(&info, os("ALTERNATES"), 0o644), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.create(s.root(), os(".ENVRC"), 0o644), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.mkdir(s.root(), os(".Husky"), 0o755), Err(Refused::ReadOnly(_))));
        assert!(!w.join(".GIT/OBJECTS/INFO/ALTERNATES").exists() && !w.join(".ENVRC").exists());
    }

    /// A share of `work` in a fresh temporary directory, opened after
    /// `setup` made its host files.
    fn share_after(setup: impl FnOnce(&Path)) -> (tempfile::TempDir, Share) {
        let t = tempfile::tempdir().unwrap();
        let w = t.path().join("work");
        fs::create_dir_all(w.join(".git/hooks")).unwrap();
        fs::write(w.join(".git/config"), "[core]\n").unwrap();
        setup(&w);
        let share = Share::open(&w, FsPolicy::default(), false).unwrap();
        (t, share)
    }

    /// Looks up a path from the root, name by name.
    fn at_path(s: &Share, path: &str) -> Entry {
        let mut e = s.root().clone();
        for n in path.split('/').filter(|n| !n.is_empty()) {
            e = s.lookup(&e, os(n)).unwrap_or_else(|r| panic!("{path}: {r}"));
        }
        e
    }

    /// Creating `path` (its directory must exist) is refused as read-only.
    fn assert_create_refused(s: &Share, path: &str) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let d = at_path(s, dir);
        let r = s.create(&d, os(name), 0o755);
        assert!(matches!(r, Err(Refused::ReadOnly(_))), "{path}: {:?}", r.map(|e| e.0.rel));
        let r = s.mkdir(&d, os(name), 0o755);
        assert!(matches!(r, Err(Refused::ReadOnly(_))), "{path} (mkdir): {:?}", r.map(|e| e.rel));
    }

    #[test]
    fn hook_managers_files_are_read_only() {
        let (t, s) = share_after(|w| {
            fs::create_dir_all(w.join(".husky/_")).unwrap();
            fs::write(w.join(".husky/pre-commit"), "npx lint-staged\n").unwrap();
            fs::write(w.join(".pre-commit-config.yaml"), "repos: []\n").unwrap();
            fs::write(w.join("lefthook.yml"), "source_dir: ci/hooks\npre-commit:\n").unwrap();
            fs::create_dir_all(w.join("ci/hooks")).unwrap();
        });
        let husky = at_path(&s, ".husky");
        let hook = s.lookup(&husky, os("pre-commit")).unwrap();
        assert!(matches!(s.open_file(&hook, true), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.remove(&husky, os("pre-commit"), false), Err(Refused::ReadOnly(_))));
        for path in [".husky/_/pre-commit", ".husky/pre-push", "lefthook.yaml", "ci/hooks/x"] {
            assert_create_refused(&s, path);
        }
        for name in [".githooks", ".lefthook", ".lefthook-local"] {
            assert!(matches!(s.mkdir(s.root(), os(name), 0o755), Err(Refused::ReadOnly(_))), "{name}");
        }
        for name in [".pre-commit-config.yaml", "lefthook.yml"] {
            let e = s.lookup(s.root(), os(name)).unwrap();
            assert!(matches!(s.open_file(&e, true), Err(Refused::ReadOnly(_))), "{name}");
        }
        // Neither replaced by a directory moved there.
        let d = s.mkdir(s.root(), os("d"), 0o755).unwrap();
        s.create(&d, os("pre-commit"), 0o755).unwrap();
        let r = s.rename(s.root(), os("d"), s.root(), os(".husky"), RenameMode::Replace);
        assert!(matches!(r, Err(Refused::ReadOnly(_))), "{r:?}");
        assert_eq!(fs::read_to_string(t.path().join("work/.husky/pre-commit")).unwrap(), "npx lint-staged\n");
    }

    #[test]
    fn what_the_hosts_git_config_names_is_read_only() {
        let (t, s) = share_after(|w| {
            fs::write(
                w.join(".git/config"),
                "[core]\n\thooksPath = tools/hooks\n\tfsmonitor = scripts/fsmon.sh\n\
                 [include]\n\tpath = ../shared.gitconfig\n\
                 [includeIf \"gitdir:/nowhere/\"]\n\tpath = ../cond.gitconfig\n\
                 [filter \"x\"]\n\tclean = ./bin/clean --opt %f\n\
                 [remote \"origin\"]\n\turl = .\n",
            )
            .unwrap();
            fs::write(
                w.join("shared.gitconfig"),
                "[core]\n\teditor = sh tools/ed.sh\n[include]\n\tpath = nested.inc\n",
            )
            .unwrap();
            fs::write(w.join("nested.inc"), "[alias]\n\tx = !./al.sh\n[hook \"lint\"]\n\tcommand = ci/lint\n").unwrap();
            for d in ["tools/hooks", "scripts", "bin", "ci", "src"] {
                fs::create_dir_all(w.join(d)).unwrap();
            }
        });
        for path in [
            "tools/hooks/pre-commit",
            "tools/hooks",
            "scripts/fsmon.sh",
            "cond.gitconfig",
            "bin/clean",
            "tools/ed.sh",
            "al.sh",
            "ci/lint",
        ] {
            assert_create_refused(&s, path);
        }
        for name in ["shared.gitconfig", "nested.inc"] {
            let e = s.lookup(s.root(), os(name)).unwrap();
            assert!(matches!(s.open_file(&e, true), Err(Refused::ReadOnly(_))), "{name}");
        }
        // The hooks directory stays where it is, and so does what holds it.
        let tools = at_path(&s, "tools");
        for (dir, name) in [(s.root(), "tools"), (&tools, "hooks")] {
            let r = s.rename(dir, os(name), s.root(), os("moved"), RenameMode::Replace);
            assert!(matches!(r, Err(Refused::ReadOnly(_))), "{name}: {r:?}");
        }
        assert!(matches!(s.remove(&tools, os("hooks"), true), Err(Refused::ReadOnly(_))));
        // `url = .` is not a command: the folder stays writable.
        s.create(&at_path(&s, "src"), os("main.rs"), 0o644).unwrap();
        assert!(!t.path().join("work/tools/hooks/pre-commit").exists());
    }

    #[test]
    fn what_an_envrc_runs_is_read_only() {
        let (t, s) = share_after(|w| {
            fs::write(
                w.join(".envrc"),
                "# direnv\nPATH_add bin\npath_add PATH \"$PWD/tools/bin\"\nsource_env_if_exists .envrc.private\n\
                 dotenv_if_exists local.env\nuse flake\nlayout node && watch_file nix/devshell.toml\n\
                 export PATH=$PWD/scripts:$PATH\nPATH_add $SOMEVAR/x\n",
            )
            .unwrap();
            fs::write(w.join("local.env"), "PATH=./dotbin:$PATH\nNAME=x/y\n").unwrap();
            fs::create_dir_all(w.join("sub")).unwrap();
            fs::write(w.join("sub/.envrc"), "PATH_add ../sub-bin\nsource_up .envrc.up\n").unwrap();
            for d in ["tools", "node_modules", "nix", "x", "src"] {
                fs::create_dir_all(w.join(d)).unwrap();
            }
        });
        for path in [
            "bin",
            "tools/bin",
            ".envrc.private",
            "flake.nix",
            "flake.lock",
            "node_modules/.bin",
            "nix/devshell.toml",
            "scripts",
            "dotbin",
            "sub-bin",
            ".envrc.up",
        ] {
            assert_create_refused(&s, path);
        }
        let env = s.lookup(s.root(), os("local.env")).unwrap();
        assert!(matches!(s.open_file(&env, true), Err(Refused::ReadOnly(_))));
        // What cannot be known is said, and the rest is writable.
        assert!(s.notes().iter().any(|n| n.contains("$SOMEVAR/x")), "{:?}", s.notes());
        s.create(&at_path(&s, "x"), os("y"), 0o644).unwrap();
        s.create(&at_path(&s, "src"), os("lib.rs"), 0o644).unwrap();
        assert!(!t.path().join("work/bin").exists());
        // A PATH entry at the folder's top: all of it is read-only.
        let (_t2, s2) = share_after(|w| fs::write(w.join(".envrc"), "PATH_add .\n").unwrap());
        assert!(matches!(s2.create(s2.root(), os("git"), 0o755), Err(Refused::ReadOnly(_))));
        assert!(s2.notes().iter().any(|n| n.contains("whole folder")), "{:?}", s2.notes());
    }

    #[test]
    fn extra_read_only_paths_cannot_be_replaced() {
        let t = tempfile::tempdir().unwrap();
        let w = t.path().join("work");
        fs::create_dir_all(w.join("conf/sbx")).unwrap();
        fs::write(w.join("conf/sbx/policy.toml"), "[net]\n").unwrap();
        fs::write(t.path().join("ca.pem"), "outside").unwrap();
        let s = Share::open(&w, FsPolicy::default(), false)
            .unwrap()
            .with_read_only_paths(&[w.join("conf/sbx/policy.toml"), w.join("conf/ca.crt"), t.path().join("ca.pem")])
            .unwrap();
        let sbx = at_path(&s, "conf/sbx");
        let file = s.lookup(&sbx, os("policy.toml")).unwrap();
        assert!(matches!(s.open_file(&file, true), Err(Refused::ReadOnly(_))));
        assert!(matches!(s.chmod(&file, 0o600), Err(Refused::ReadOnly(_))));
        // Not deleted (to be made again), nor moved away.
        assert!(matches!(s.remove(&sbx, os("policy.toml"), false), Err(Refused::ReadOnly(_))));
        let r = s.rename(&sbx, os("policy.toml"), &sbx, os("old.toml"), RenameMode::Replace);
        assert!(matches!(r, Err(Refused::ReadOnly(_))), "{r:?}");
        // Its directories neither renamed (to make the path again) nor
        // removed, nor replaced by a directory moved over them.
        let conf = at_path(&s, "conf");
        for (dir, name) in [(s.root(), "conf"), (&conf, "sbx")] {
            let r = s.rename(dir, os(name), s.root(), os("elsewhere"), RenameMode::Replace);
            assert!(matches!(r, Err(Refused::ReadOnly(_))), "{name}: {r:?}");
            assert!(matches!(s.remove(dir, os(name), true), Err(Refused::ReadOnly(_))), "{name}");
        }
        let decoy = s.mkdir(s.root(), os("decoy"), 0o755).unwrap();
        let inner = s.mkdir(&decoy, os("sbx"), 0o755).unwrap();
        s.create(&inner, os("policy.toml"), 0o644).unwrap();
        for (dir, name) in [(s.root(), "conf"), (&conf, "sbx")] {
            let from = if name == "conf" { (s.root(), "decoy") } else { (&decoy, "sbx") };
            let r = s.rename(from.0, os(from.1), dir, os(name), RenameMode::Replace);
            assert!(matches!(r, Err(Refused::ReadOnly(_))), "over {name}: {r:?}");
        }
        // A path not there yet cannot be made, in any case.
        assert_create_refused(&s, "conf/ca.crt");
        assert!(matches!(s.create(&conf, os("CA.CRT"), 0o644), Err(Refused::ReadOnly(_))));
        assert_eq!(fs::read_to_string(w.join("conf/sbx/policy.toml")).unwrap(), "[net]\n");
        // Writable around it.
        s.create(&sbx, os("other.toml"), 0o644).unwrap();
        s.create(s.root(), os("ca.pem.txt"), 0o644).unwrap();
    }

    #[test]
    fn a_link_is_checked_again_where_it_moves() {
        let (t, s) = tree();
        let w = t.path().join("work");
        let d = s.mkdir(s.root(), os("d"), 0o755).unwrap();
        s.symlink(&d, os("l"), os("../src/main.rs")).unwrap();
        // From d/ it is the folder's src/main.rs; from the root, outside.
        let e = s.rename(&d, os("l"), s.root(), os("l"), RenameMode::Replace).unwrap_err();
        assert!(matches!(e, Refused::LinkTarget(..)), "{e}");
        // A directory holding it may not move up either (EXDEV: copied
        // through the checked paths instead); down is fine.
        let outer = s.mkdir(s.root(), os("outer"), 0o755).unwrap();
        let e = s.rename(s.root(), os("d"), &outer, os("d"), RenameMode::Replace);
        assert!(e.is_ok(), "moving down keeps its links inside: {e:?}");
        let e = s.rename(&outer, os("d"), s.root(), os("d2"), RenameMode::Replace);
        assert!(e.is_ok(), "back to depth 1 is where it was made");
        let deep = s.mkdir(&outer, os("deep"), 0o755).unwrap();
        s.symlink(&deep, os("up2"), os("../../src/main.rs")).unwrap();
        let e = s.rename(&outer, os("deep"), s.root(), os("deep"), RenameMode::Replace).unwrap_err();
        assert_eq!(e.errno(), libc::EXDEV);
        assert!(fs::canonicalize(w.join("outer/deep/up2")).unwrap().starts_with(&w));
    }
}
