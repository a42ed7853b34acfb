//! Host side: the file server behind the virtio-fs device. It answers the
//! guest's FUSE requests (untrusted bytes, parsed by [`super::fuse`]) from
//! one [`Share`], which resolves and checks every access; this module keeps
//! the guest's node and handle numbers, maps owners, and writes one audit
//! line for every change (create, write, delete, rename, chmod, truncate)
//! and every access the policy refuses.
//!
//! Node and handle tables are bounded by what the guest's kernel keeps
//! (nodes are forgotten when it drops them) and by named limits in count
//! and in bytes ([`MAX_NODES`], [`MAX_NODE_PATH_BYTES`], [`MAX_HANDLES`],
//! [`MAX_LISTING_BYTES`]); a request naming a node or handle that does not
//! exist, or a handle with another node than its own, gets an error, never
//! a panic.
//!
//! With a workspace quota ([`FileServer::with_quota`], see [`Quota`]) the
//! growth of files the guest causes and the objects it makes (files,
//! directories, links, git shadow containers: [`OBJECT_COST`] each, a
//! link's target besides) are counted and a request that would pass the
//! quota is refused (EDQUOT), the first of a burst audited. The server
//! follows which host files its handles hold open: a file removed (unlink,
//! rename over it) while open gives its bytes and cost back only when its
//! last handle is released, and writes through those handles keep
//! counting. Without a quota none of this is followed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::fuse::{self, Attr, InitOut, Op, OpenAccess, Out, ParseError, SetAttr, SetTime, StatFs};
use super::policy::{Access, GIT_DIR, GIT_SHADOWED};
use super::quota::{Quota, Refusal, OBJECT_COST};
use super::share::{Entry, Kind, Listed, Refused, RenameMode, Share};
use crate::sys;
use audit::FileOp;

/// Where audit events go (the sandbox's hash-chained log).
pub type AuditSink = Box<dyn FnMut(audit::Event) + Send>;

/// Largest write the guest may send and largest read it gets back.
pub const MAX_WRITE: u32 = 1 << 20;
/// How long the guest may cache names and attributes (seconds): files the
/// user changes on the host show within this time.
const CACHE_SECS: u64 = 1;
/// The guest's agent user, which stands for the folder's owner.
pub const GUEST_UID: u32 = 1000;
pub const GUEST_GID: u32 = 1000;
const NOBODY: u32 = 65534;
/// Open handles the guest may hold at once.
pub const MAX_HANDLES: usize = 65536;
/// Nodes the guest may hold at once (a guest that never forgets cannot
/// grow the VMM's memory without bound).
pub const MAX_NODES: usize = 1 << 20;
/// Bytes of paths the node table may hold at once (each path is at most
/// `share::MAX_PATH`): what a guest that remembers deep paths costs.
pub const MAX_NODE_PATH_BYTES: usize = 64 << 20;
/// Bytes that open directory handles' listings may hold at once, all
/// together: a guest opening huge directories again and again gets
/// ENOMEM, the VMM does not grow.
pub const MAX_LISTING_BYTES: usize = 64 << 20;
/// What one listed name costs besides its bytes.
const LISTED_OVERHEAD: usize = super::share::LISTED_COST;
/// Requests the guest's kernel may have in the background (readahead,
/// writeback) at once, and from how many on it counts as congested.
const MAX_BACKGROUND: u16 = 16;
const CONGESTION_THRESHOLD: u16 = 12;
/// Timestamps are kept to the nanosecond.
const TIME_GRAN_NS: u32 = 1;
/// The guest's page size (a request spans at most `MAX_WRITE` of them).
const GUEST_PAGE_SIZE: u32 = 4096;
/// Mode bits chmod changes: permissions, set-id and sticky bits.
const CHMOD_BITS: u32 = 0o7777;
/// Largest nanoseconds field of a time.
const MAX_NSEC: u32 = 999_999_999;

struct Node {
    entry: Entry,
    lookups: u64,
}

/// A host file by device and inode.
type Inode = (u64, u64);

enum Handle {
    /// `inode`: with a quota, the host file it holds open.
    File {
        file: File,
        node: u64,
        writable: bool,
        wrote: bool,
        inode: Option<Inode>,
    },
    Dir {
        listing: Vec<Listed>,
        node: u64,
        bytes: usize,
    },
}

/// A host file the guest's handles hold open (followed with a quota).
#[derive(Debug, Default)]
struct OpenFile {
    handles: u32,
    /// Removed from the folder (its last link) while open: its bytes and
    /// cost are given back at its last release.
    removed: bool,
}

/// What a removal gives back to the quota.
enum Freed {
    Now(u64),
    /// A file still open: at its last release.
    AtClose(Inode),
}

/// Quota taken before a request that makes a name.
struct Taken {
    /// The new object's cost (nothing for a rename).
    object: u64,
    /// A shadow container's, if the name may be kept in the git shadow.
    container: u64,
    containers_before: u64,
}

impl Handle {
    fn node(&self) -> u64 {
        match self {
            Handle::File { node, .. } | Handle::Dir { node, .. } => *node,
        }
    }
}

pub struct FileServer {
    share: Share,
    /// The folder's path on the host (and in the guest), for audit lines.
    host_root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Bytes of the paths in `nodes` and of the listings in `handles`.
    path_bytes: usize,
    listing_bytes: usize,
    audit: AuditSink,
    /// Set once the audit log could not be written: from then on changes
    /// are refused (EROFS), so that none goes unrecorded.
    audit_failed: Option<Arc<AtomicBool>>,
    /// The workspace quota, shared with the other folders' servers.
    quota: Option<Arc<Quota>>,
    /// With a quota: the host files handles hold open (at most one entry
    /// per handle).
    open_files: HashMap<Inode, OpenFile>,
    /// Requests served, by kind (for figures).
    pub counts: BTreeMap<&'static str, u64>,
}

/// Raises this process's open-file limit to its hard limit: the server
/// holds a descriptor for each directory the guest's kernel remembers.
/// Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let Ok(mut lim) = sys::getrlimit(libc::RLIMIT_NOFILE) else { return 0 };
    if lim.rlim_cur < lim.rlim_max {
        // Raising the soft limit up to the hard one needs no privilege.
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if sys::setrlimit(libc::RLIMIT_NOFILE, &raised).is_ok() {
            lim = raised;
        }
    }
    lim.rlim_cur
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FileServer {
    pub fn new(share: Share, host_root: PathBuf, audit: AuditSink) -> FileServer {
        let root = share.root().clone();
        let mut nodes = HashMap::new();
        nodes.insert(fuse::ROOT_ID, Node { entry: root, lookups: 1 });
        let mut by_path = HashMap::new();
        by_path.insert(PathBuf::new(), fuse::ROOT_ID);
        FileServer {
            share,
            host_root,
            nodes,
            by_path,
            next_node: fuse::ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
            path_bytes: 0,
            listing_bytes: 0,
            audit,
            audit_failed: None,
            quota: None,
            open_files: HashMap::new(),
            counts: BTreeMap::new(),
        }
    }

    /// Answers one request; None when it needs no reply (or has no
    /// readable header to reply to). `room`: bytes the guest gave for the
    /// reply.
    pub fn handle(&mut self, request: &[u8], room: usize) -> Option<Vec<u8>> {
        let (h, op) = match fuse::parse(request) {
            Ok(r) => r,
            Err(ParseError::BadHeader) => return None,
            // Answered where there is room for the answer, as any other.
            Err(ParseError::BadArgs(h)) => {
                return (room >= fuse::OUT_HEADER_LEN).then(|| fuse::reply(h.unique, -libc::EINVAL, &[]))
            }
        };
        let no_reply = op.no_reply();
        // A request whose answer cannot be delivered is not carried out.
        if !no_reply && room < fuse::OUT_HEADER_LEN {
            return None;
        }
        *self.counts.entry(op.name()).or_default() += 1;
        let room = room.saturating_sub(fuse::OUT_HEADER_LEN);
        let result = self.serve(h.nodeid, op, room);
        if no_reply {
            return None;
        }
        Some(match result {
            Ok(body) if body.len() <= room => fuse::reply(h.unique, 0, &body),
            Ok(_) => fuse::reply(h.unique, -libc::ERANGE, &[]),
            Err(errno) => fuse::reply(h.unique, -errno, &[]),
        })
    }

    fn record(&mut self, event: FileOp) {
        (self.audit)(audit::Event::File(event));
    }

    fn path_of(&self, rel: &Path) -> String {
        self.host_root.join(rel).display().to_string()
    }

    /// The errno for a refusal, logging it if the policy refused.
    fn refused(&mut self, op: &str, r: Refused) -> i32 {
        if r.is_policy() {
            let path = r.path().map(|p| self.path_of(p));
            let event = FileOp::denied(op, path, r.to_string());
            self.record(event);
        }
        r.errno()
    }

    /// Like `refused`, for requests that make a name: a hidden name is
    /// refused outright (EACCES), which tells nothing of whether it exists.
    fn refused_create(&mut self, op: &str, r: Refused) -> i32 {
        let hidden = matches!(r, Refused::Hidden(_));
        let errno = self.refused(op, r);
        if hidden {
            libc::EACCES
        } else {
            errno
        }
    }

    fn node(&self, id: u64) -> Result<&Entry, i32> {
        self.nodes.get(&id).map(|n| &n.entry).ok_or(libc::ENOENT)
    }

    /// The handle `fh`, if it is one of node `nodeid`'s: a handle sent
    /// with another node is refused (EBADF), so that what is done and
    /// what is logged concern the same file.
    fn handle_of(&self, fh: u64, nodeid: u64) -> Result<&Handle, i32> {
        self.handles.get(&fh).filter(|h| h.node() == nodeid).ok_or(libc::EBADF)
    }

    fn attr(&self, st: &libc::stat) -> Attr {
        let (owner_uid, owner_gid) = self.share.owner();
        let map = |id: u32, owner: u32, guest: u32| match id {
            _ if id == owner => guest,
            0 => 0,
            _ => NOBODY,
        };
        // The mode is the host's, write bits and all, even on read-only
        // paths: every attempt then reaches the policy here, is refused
        // (EROFS) and is logged, instead of being turned away unseen by
        // the guest's kernel.
        let mode = st.st_mode;
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: (st.st_atime as u64, st.st_atime_nsec as u32),
            mtime: (st.st_mtime as u64, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime as u64, st.st_ctime_nsec as u32),
            mode,
            nlink: st.st_nlink as u32,
            uid: map(st.st_uid, owner_uid, GUEST_UID),
            gid: map(st.st_gid, owner_gid, GUEST_GID),
            blksize: st.st_blksize as u32,
        }
    }

    /// Gives the guest a node for `entry` (one more lookup of it) and its
    /// fuse_entry_out.
    fn remember(&mut self, entry: Entry, out: &mut Out) -> Result<(), i32> {
        let st = self.share.stat(&entry).map_err(|r| r.errno())?;
        let attr = self.attr(&st);
        let id = match self.by_path.get(&entry.rel).copied() {
            Some(id) if self.nodes.get(&id).is_some_and(|n| n.entry.ino() == entry.ino()) => {
                let n = self.nodes.get_mut(&id).ok_or(libc::ENOENT)?;
                n.lookups += 1;
                self.path_bytes = self.path_bytes + entry.rel.as_os_str().len() - n.entry.rel.as_os_str().len();
                n.entry = entry;
                id
            }
            _ if self.nodes.len() >= MAX_NODES => return Err(libc::ENFILE),
            _ if self.path_bytes + entry.rel.as_os_str().len() > MAX_NODE_PATH_BYTES => return Err(libc::ENFILE),
            _ => {
                let id = self.next_node;
                self.next_node += 1;
                self.by_path.insert(entry.rel.clone(), id);
                self.path_bytes += entry.rel.as_os_str().len();
                self.nodes.insert(id, Node { entry, lookups: 1 });
                id
            }
        };
        fuse::entry_out(out, id, &attr, CACHE_SECS);
        Ok(())
    }

    fn forget(&mut self, id: u64, n: u64) {
        if id == fuse::ROOT_ID {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else { return };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let rel = node.entry.rel.clone();
            self.path_bytes -= rel.as_os_str().len();
            self.nodes.remove(&id);
            if self.by_path.get(&rel) == Some(&id) {
                self.by_path.remove(&rel);
            }
        }
    }

    fn new_handle(&mut self, h: Handle) -> Result<u64, i32> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(libc::ENFILE);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        Ok(fh)
    }

    /// Fails closed on `flag`: once it is set (by whoever writes the audit
    /// log, when a line could not be written), every change is refused.
    pub fn fail_closed_on(mut self, flag: Arc<AtomicBool>) -> FileServer {
        self.audit_failed = Some(flag);
        self
    }

    /// Counts the growth of files the guest causes against `quota` (if
    /// any: None leaves the server as it is) and refuses what would pass
    /// it (EDQUOT); see [`Quota`].
    pub fn with_quota(mut self, quota: Option<Arc<Quota>>) -> FileServer {
        self.quota = quota;
        self
    }

    /// A growth the quota refused: audited if it begins a burst; its errno.
    fn over_quota(&mut self, op: &str, path: String, r: Refusal) -> i32 {
        if r.first {
            let event = FileOp {
                quota: Some(r.limit),
                used: Some(r.used),
                asked: Some(r.asked),
                ..FileOp::denied(op, Some(path), r.reason())
            };
            self.record(event);
        }
        libc::EDQUOT
    }

    /// With a quota: the host file `file` is, to follow its handles.
    fn inode_of(&self, file: &File) -> Result<Option<Inode>, i32> {
        if self.quota.is_none() {
            return Ok(None);
        }
        let st = fstat_file(file)?;
        Ok(Some((st.st_dev, st.st_ino)))
    }

    /// A handle on `inode` was made.
    fn opened(&mut self, inode: Option<Inode>) {
        if let Some(i) = inode {
            let o = self.open_files.entry(i).or_default();
            o.handles = o.handles.saturating_add(1);
        }
    }

    /// A handle on `inode` (`file`) is closed: the last of a file removed
    /// while open gives back its bytes and cost.
    fn closed(&mut self, file: &File, inode: Option<Inode>) {
        let Some(i) = inode else { return };
        let Some(o) = self.open_files.get_mut(&i) else { return };
        o.handles = o.handles.saturating_sub(1);
        if o.handles > 0 {
            return;
        }
        let removed = o.removed;
        self.open_files.remove(&i);
        if let Some(q) = self.quota.as_ref().filter(|_| removed) {
            // Its size unknown, only its cost: never more than was there.
            q.give_back(file_size(file).unwrap_or(0).saturating_add(OBJECT_COST));
        }
    }

    /// With a quota: what removing `entry` gives back — its cost, and a
    /// file's bytes at its last link (a file still open: at its last
    /// release). To be settled once the removal is done.
    fn freed_by_removing(&self, entry: &Entry) -> Option<Freed> {
        self.quota.as_ref()?;
        let st = self.share.stat(entry).ok()?;
        let size = st.st_size.max(0) as u64;
        match entry.kind {
            Kind::Dir => Some(Freed::Now(OBJECT_COST)),
            Kind::Symlink => Some(Freed::Now(OBJECT_COST.saturating_add(size))),
            // Another link keeps its blocks (the host's: the guest makes none).
            Kind::File if st.st_nlink != 1 => None,
            Kind::File if self.open_files.contains_key(&(st.st_dev, st.st_ino)) => {
                Some(Freed::AtClose((st.st_dev, st.st_ino)))
            }
            Kind::File => Some(Freed::Now(OBJECT_COST.saturating_add(size))),
        }
    }

    /// A removal is done: gives back what it freed.
    fn settle_freed(&mut self, freed: Option<Freed>) {
        match freed {
            Some(Freed::Now(bytes)) => self.settle_quota(0, bytes, 0),
            Some(Freed::AtClose(i)) => {
                if let Some(o) = self.open_files.get_mut(&i) {
                    o.removed = true;
                }
            }
            None => {}
        }
    }

    /// With a quota: takes what a request making `name` in `dir` may cost
    /// before it is carried out (`cost` for the object, and a shadow
    /// container's if the name may be kept in the git shadow), or refuses
    /// it (EDQUOT, audited as `op`).
    fn take_for_new(&mut self, op: &str, dir: &Entry, name: &OsStr, cost: u64) -> Result<Option<Taken>, i32> {
        let Some(q) = &self.quota else { return Ok(None) };
        let shadowable = name == GIT_DIR || GIT_SHADOWED.iter().any(|n| name == *n);
        let container = if shadowable { OBJECT_COST } else { 0 };
        let taken = Taken { object: cost, container, containers_before: self.share.shadow_containers_made() };
        match q.take(cost.saturating_add(container)) {
            Ok(()) => Ok(Some(taken)),
            Err(r) => {
                let path = self.path_of(&dir.rel.join(name));
                Err(self.over_quota(op, path, r))
            }
        }
    }

    /// After it: gives back the object's cost if it was not `made`, and the
    /// container's if none was made.
    fn settle_new(&self, taken: Option<Taken>, made: bool) {
        let (Some(q), Some(t)) = (&self.quota, taken) else { return };
        let object = if made { 0 } else { t.object };
        let container = if self.share.shadow_containers_made() > t.containers_before { 0 } else { t.container };
        q.give_back(object.saturating_add(container));
    }

    /// After a change that took `taken` bytes of quota for a file of
    /// `before` bytes that now has `after`: what did not grow, and what
    /// shrank, given back.
    fn settle_quota(&self, taken: u64, before: u64, after: u64) {
        if let Some(q) = &self.quota {
            q.give_back(taken.saturating_sub(after.saturating_sub(before)));
            q.give_back(before.saturating_sub(after));
        }
    }

    /// Checks the tables against their bookkeeping (for tests and the fuzz
    /// targets): the byte counts are the sums they stand for and within
    /// their limits, the path index leads to nodes of that path, the root
    /// is there.
    #[doc(hidden)]
    pub fn check_accounting(&self) -> Result<(), String> {
        let paths: usize = self.nodes.values().map(|n| n.entry.rel.as_os_str().len()).sum();
        let listings: usize =
            self.handles.values().map(|h| if let Handle::Dir { bytes, .. } = h { *bytes } else { 0 }).sum();
        if paths != self.path_bytes || listings != self.listing_bytes {
            return Err(format!(
                "path bytes {} (counted {}), listing bytes {} (counted {})",
                paths, self.path_bytes, listings, self.listing_bytes
            ));
        }
        if paths > MAX_NODE_PATH_BYTES
            || listings > MAX_LISTING_BYTES
            || self.nodes.len() > MAX_NODES
            || self.handles.len() > MAX_HANDLES
        {
            return Err("over a limit".into());
        }
        if let Some((p, id)) = self.by_path.iter().find(|(p, id)| self.nodes.get(id).is_none_or(|n| &n.entry.rel != *p))
        {
            return Err(format!("{p:?} indexed as node {id}, which is not that path's"));
        }
        if !self.nodes.contains_key(&fuse::ROOT_ID) || self.by_path.get(Path::new("")) != Some(&fuse::ROOT_ID) {
            return Err("the root node is gone".into());
        }
        // The open files followed are the handles' (and only with a quota).
        let mut open: HashMap<Inode, u32> = HashMap::new();
        for h in self.handles.values() {
            if let Handle::File { inode, .. } = h {
                match (inode, &self.quota) {
                    (Some(i), Some(_)) => *open.entry(*i).or_default() += 1,
                    (None, None) => {}
                    _ => return Err("a file handle followed without a quota, or not followed with one".into()),
                }
            }
        }
        if let Some((i, o)) = self.open_files.iter().find(|(i, o)| open.get(*i) != Some(&o.handles)) {
            return Err(format!("{i:?} counted open {} times, held by {:?} handles", o.handles, open.get(i)));
        }
        if open.len() != self.open_files.len() {
            return Err("a handle's file is not followed".into());
        }
        if let Some(q) = &self.quota {
            if q.used() > q.limit() {
                return Err(format!("quota used {} past its limit {}", q.used(), q.limit()));
            }
        }
        Ok(())
    }

    fn serve(&mut self, nodeid: u64, op: Op<'_>, room: usize) -> Result<Vec<u8>, i32> {
        let mut out = Out::default();
        if op.changes() && self.audit_failed.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(libc::EROFS);
        }
        match op {
            Op::Init { major, minor, max_readahead, flags } => {
                if major != fuse::KERNEL_VERSION {
                    return Err(libc::EPROTO);
                }
                let wanted = fuse::ASYNC_READ
                    | fuse::BIG_WRITES
                    | fuse::AUTO_INVAL_DATA
                    | fuse::DO_READDIRPLUS
                    | fuse::READDIRPLUS_AUTO
                    | fuse::PARALLEL_DIROPS
                    | fuse::MAX_PAGES
                    | fuse::CACHE_SYMLINKS;
                let init = InitOut {
                    major: fuse::KERNEL_VERSION,
                    minor: minor.min(fuse::KERNEL_MINOR),
                    max_readahead: max_readahead.min(MAX_WRITE),
                    flags: flags & wanted,
                    max_background: MAX_BACKGROUND,
                    congestion_threshold: CONGESTION_THRESHOLD,
                    max_write: MAX_WRITE,
                    time_gran: TIME_GRAN_NS,
                    max_pages: (MAX_WRITE / GUEST_PAGE_SIZE) as u16,
                };
                init.encode(&mut out);
            }
            Op::Destroy => {
                for (_, h) in std::mem::take(&mut self.handles) {
                    if let Handle::File { file, inode, .. } = h {
                        self.closed(&file, inode);
                    }
                }
                self.listing_bytes = 0;
                self.nodes.retain(|&id, _| id == fuse::ROOT_ID);
                self.by_path.retain(|p, _| p.as_os_str().is_empty());
                self.path_bytes = 0;
            }
            Op::Lookup { name } => {
                let dir = self.node(nodeid)?.clone();
                let entry = self.share.lookup(&dir, name).map_err(|r| self.refused("lookup", r))?;
                self.remember(entry, &mut out)?;
            }
            Op::Forget { nlookup } => self.forget(nodeid, nlookup),
            Op::BatchForget(list) => {
                for (id, n) in list {
                    self.forget(id, n);
                }
            }
            Op::GetAttr { fh } => {
                let handle = fh.map(|fh| self.handle_of(fh, nodeid)).transpose()?;
                let st = match handle {
                    Some(Handle::File { file, .. }) => fstat_file(file)?,
                    _ => self.share.stat(self.node(nodeid)?).map_err(|r| r.errno())?,
                };
                let attr = self.attr(&st);
                fuse::attr_out(&mut out, &attr, CACHE_SECS);
            }
            Op::SetAttr(s) => {
                self.setattr(nodeid, &s)?;
                let entry = self.node(nodeid)?;
                let st = self.share.stat(entry).map_err(|r| r.errno())?;
                let attr = self.attr(&st);
                fuse::attr_out(&mut out, &attr, CACHE_SECS);
            }
            Op::ReadLink => {
                let entry = self.node(nodeid)?.clone();
                let target = self.share.readlink(&entry).map_err(|r| self.refused("readlink", r))?;
                out.bytes(target.as_bytes());
            }
            Op::Symlink { name, target } => {
                let dir = self.node(nodeid)?.clone();
                let cost = OBJECT_COST.saturating_add(target.len() as u64);
                let taken = self.take_for_new("symlink", &dir, name, cost)?;
                let made = self.share.symlink(&dir, name, target);
                self.settle_new(taken, made.is_ok());
                let entry = made.map_err(|r| self.refused_create("symlink", r))?;
                let event = FileOp {
                    target: Some(target.to_string_lossy().into_owned()),
                    ..FileOp::allowed("symlink", self.path_of(&entry.rel))
                };
                self.record(event);
                self.remember(entry, &mut out)?;
            }
            Op::MkNod { name } => {
                let dir = self.node(nodeid)?;
                let r = Refused::Special(dir.rel.join(name));
                self.refused("mknod", r);
                return Err(libc::EPERM);
            }
            Op::MkDir { name, mode } => {
                let dir = self.node(nodeid)?.clone();
                let taken = self.take_for_new("mkdir", &dir, name, OBJECT_COST)?;
                let made = self.share.mkdir(&dir, name, mode);
                self.settle_new(taken, made.is_ok());
                let entry = made.map_err(|r| self.refused_create("mkdir", r))?;
                let event = FileOp::allowed("mkdir", self.path_of(&entry.rel));
                self.record(event);
                self.remember(entry, &mut out)?;
            }
            Op::Unlink { name } | Op::RmDir { name } => {
                let is_dir = matches!(op, Op::RmDir { .. });
                let dir = self.node(nodeid)?.clone();
                // With a quota, what is removed gives back its cost (and a
                // file its bytes, at its last link and last release).
                let freed = match &self.quota {
                    Some(_) => self.share.lookup(&dir, name).ok().and_then(|e| self.freed_by_removing(&e)),
                    None => None,
                };
                let gone = self.share.remove(&dir, name, is_dir).map_err(|r| self.refused("delete", r))?;
                self.settle_freed(freed);
                let event = FileOp::allowed("delete", self.path_of(&gone.rel));
                self.record(event);
                if let Some(id) = self.by_path.remove(&gone.rel) {
                    self.drop_paths_below(&gone.rel, id);
                }
            }
            Op::Rename { new_dir, old, new, flags } => self.rename(nodeid, new_dir, old, new, flags)?,
            Op::Link { old_node, name } => {
                let (target, dir) = (self.node(old_node)?.clone(), self.node(nodeid)?.clone());
                return match self.share.link(&target, &dir, name) {
                    Err(r) => Err(self.refused("link", r)),
                    Ok(()) => Err(libc::EPERM),
                };
            }
            Op::Open { access } => {
                let entry = self.node(nodeid)?.clone();
                let writable = access.writes();
                let fd = self.share.open_file(&entry, writable).map_err(|r| self.refused("open", r))?;
                let file = File::from(fd);
                let inode = self.inode_of(&file)?;
                let fh = self.new_handle(Handle::File { file, node: nodeid, writable, wrote: false, inode })?;
                self.opened(inode);
                fuse::open_out(&mut out, fh, open_flags(access));
            }
            Op::Read { fh, offset, size } => {
                let Handle::File { file, .. } = self.handle_of(fh, nodeid)? else { return Err(libc::EBADF) };
                let n = (size as usize).min(room).min(MAX_WRITE as usize);
                let mut buf = vec![0u8; n];
                let mut done = 0;
                while done < n {
                    match file.read_at(&mut buf[done..], offset.saturating_add(done as u64)) {
                        Ok(0) => break,
                        Ok(k) => done += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(errno_of(&e)),
                    }
                }
                buf.truncate(done);
                return Ok(buf);
            }
            Op::Write { fh, offset, data } => {
                self.handle_of(fh, nodeid)?;
                let Some(Handle::File { file, node, writable, wrote, .. }) = self.handles.get_mut(&fh) else {
                    return Err(libc::EBADF);
                };
                if !*writable {
                    return Err(libc::EBADF);
                }
                let node = *node;
                // With a quota: the growth past the file's end is taken
                // before anything is written.
                let mut taken = None;
                if let Some(q) = &self.quota {
                    let size = file_size(file)?;
                    let growth = offset.saturating_add(data.len() as u64).saturating_sub(size);
                    if let Err(r) = q.take(growth) {
                        let path = self.nodes.get(&node).map(|n| self.path_of(&n.entry.rel)).unwrap_or_default();
                        return Err(self.over_quota("write", path, r));
                    }
                    taken = Some((growth, size));
                }
                if let Err(e) = file.write_all_at(data, offset) {
                    if let Some((growth, size)) = taken {
                        let now = file_size(file).unwrap_or(size);
                        self.settle_quota(growth, size, now.max(size));
                    }
                    return Err(errno_of(&e));
                }
                let first = !*wrote;
                *wrote = true;
                if first {
                    let path = self.nodes.get(&node).map(|n| self.path_of(&n.entry.rel)).unwrap_or_default();
                    self.record(FileOp::allowed("write", path));
                }
                fuse::write_out(&mut out, data.len() as u32);
            }
            Op::StatFs => {
                let st = self.share.statfs().map_err(|r| r.errno())?;
                // The room left under the quota, if that is less.
                let room = self.quota.as_ref().map_or(u64::MAX, |q| q.remaining() / st.f_frsize.max(1));
                let figures = StatFs {
                    blocks: st.f_blocks,
                    bfree: st.f_bfree.min(room),
                    bavail: st.f_bavail.min(room),
                    files: st.f_files,
                    ffree: st.f_ffree,
                    bsize: st.f_bsize as u32,
                    namelen: super::share::MAX_NAME as u32,
                    frsize: st.f_frsize as u32,
                };
                fuse::statfs_out(&mut out, &figures);
            }
            Op::Release { fh } | Op::ReleaseDir { fh } => {
                self.handle_of(fh, nodeid)?;
                match self.handles.remove(&fh) {
                    Some(Handle::Dir { bytes, .. }) => self.listing_bytes -= bytes,
                    Some(Handle::File { file, inode, .. }) => self.closed(&file, inode),
                    None => {}
                }
            }
            Op::Fsync { fh } => match self.handle_of(fh, nodeid)? {
                Handle::File { file, .. } => file.sync_all().map_err(|e| errno_of(&e))?,
                _ => return Err(libc::EBADF),
            },
            // No locks to drop at close, and writes are never held back:
            // ENOSYS tells the guest's kernel to stop sending FLUSH (two
            // requests fewer for each `echo x > file`).
            Op::Flush { .. } => return Err(libc::ENOSYS),
            Op::FsyncDir { .. } => {}
            Op::OpenDir => {
                let dir = self.node(nodeid)?.clone();
                let room_left = MAX_LISTING_BYTES.saturating_sub(self.listing_bytes);
                let listing = self.share.list_within(&dir, room_left).map_err(|r| self.refused("opendir", r))?;
                let bytes = listing.iter().map(|l| l.name.len() + LISTED_OVERHEAD).sum::<usize>();
                if self.listing_bytes + bytes > MAX_LISTING_BYTES {
                    return Err(libc::ENOMEM);
                }
                let fh = self.new_handle(Handle::Dir { listing, node: nodeid, bytes })?;
                self.listing_bytes += bytes;
                fuse::open_out(&mut out, fh, 0);
            }
            Op::ReadDir { fh, offset, size, plus } => {
                let room = (size as usize).min(room);
                return self.readdir(nodeid, fh, offset, room, plus);
            }
            Op::Access { write } => {
                let entry = self.node(nodeid)?;
                if write && entry.access != Access::ReadWrite {
                    return Err(libc::EROFS);
                }
            }
            Op::Create { name, mode, access } => {
                let dir = self.node(nodeid)?.clone();
                let taken = self.take_for_new("create", &dir, name, OBJECT_COST)?;
                let made = self.share.create(&dir, name, mode);
                self.settle_new(taken, made.is_ok());
                let (entry, fd) = made.map_err(|r| self.refused_create("create", r))?;
                let event = FileOp::allowed("create", self.path_of(&entry.rel));
                self.record(event);
                let rel = entry.rel.clone();
                self.remember(entry, &mut out)?;
                let node = self.by_path.get(&rel).copied().unwrap_or(0);
                // Opened read-write whatever the guest asked (its kernel
                // keeps to its own open mode); its creation is logged, and
                // its first write too.
                let file = File::from(fd);
                let inode = self.inode_of(&file)?;
                let fh = self.new_handle(Handle::File { file, node, writable: true, wrote: false, inode })?;
                self.opened(inode);
                fuse::open_out(&mut out, fh, open_flags(access));
            }
            Op::SyncFs => {
                let fd = self.share.open_dir(self.share.root()).map_err(|r| r.errno())?;
                // Best effort, as the guest's own sync: its result is not reported.
                let _ = sys::syncfs(fd.as_fd());
            }
            Op::Interrupt => {}
            Op::Lseek { .. } | Op::Fallocate { .. } | Op::Xattr | Op::Unknown(_) => return Err(libc::ENOSYS),
        }
        Ok(out.0)
    }

    fn setattr(&mut self, nodeid: u64, s: &SetAttr) -> Result<(), i32> {
        let entry = self.node(nodeid)?.clone();
        let st = self.share.stat(&entry).map_err(|r| r.errno())?;
        let current = self.attr(&st);
        if s.uid.is_some_and(|uid| uid != current.uid) || s.gid.is_some_and(|gid| gid != current.gid) {
            return Err(libc::EPERM);
        }
        let path = self.path_of(&entry.rel);
        // A truncate upward takes its growth from the quota before
        // anything changes; what did not happen is given back after. The
        // sizes are those of the file truncated (through the handle, if
        // one is given), whatever the node now names.
        let counted = self.quota.is_some() && s.size.is_some();
        let before = if counted { self.truncated_size(nodeid, s, &entry)? } else { 0 };
        let growth = s.size.map_or(0, |size| size.saturating_sub(before));
        if let Some(Err(r)) = self.quota.as_ref().map(|q| q.take(growth)) {
            return Err(self.over_quota("truncate", path, r));
        }
        let changed = self.set_attrs(nodeid, s, &entry, &st, path);
        if counted {
            // Not known: taken to have happened (never given back unseen).
            let after = self.truncated_size(nodeid, s, &entry).unwrap_or(before.saturating_add(growth));
            self.settle_quota(growth, before, after);
        }
        changed
    }

    /// The size of the file a SETATTR of `nodeid` truncates (as
    /// `set_attrs` chooses it): its writable handle's, else `entry`'s.
    fn truncated_size(&self, nodeid: u64, s: &SetAttr, entry: &Entry) -> Result<u64, i32> {
        match s.fh.map(|fh| self.handle_of(fh, nodeid)) {
            Some(Ok(Handle::File { file, writable: true, .. })) => file_size(file),
            _ => self.share.stat(entry).map(|st| st.st_size.max(0) as u64).map_err(|r| r.errno()),
        }
    }

    /// SETATTR's changes to `entry` (node `nodeid`, `st` its attributes
    /// before, `path` its path for the audit lines): mode, size, times.
    fn set_attrs(&mut self, nodeid: u64, s: &SetAttr, entry: &Entry, st: &libc::stat, path: String) -> Result<(), i32> {
        // The file to truncate is opened (and so checked) before anything
        // changes: a request refused in part changes nothing.
        let truncate = match s.size {
            None => None,
            Some(size) => {
                let via_handle = match s.fh.map(|fh| self.handle_of(fh, nodeid)) {
                    Some(Ok(Handle::File { file, writable: true, .. })) => Some(file.try_clone()),
                    Some(Err(e)) => return Err(e),
                    _ => None,
                };
                let file = match via_handle {
                    Some(f) => f.map_err(|e| errno_of(&e))?,
                    None => File::from(self.share.open_file(entry, true).map_err(|r| self.refused("truncate", r))?),
                };
                Some((file, size))
            }
        };
        if let Some(mode) = s.mode.filter(|m| (m & CHMOD_BITS) != (st.st_mode & CHMOD_BITS)) {
            self.share.chmod(entry, mode).map_err(|r| self.refused("chmod", r))?;
            let applied = mode & super::share::GUEST_MODE_BITS;
            self.record(FileOp { mode: Some(format!("{applied:o}")), ..FileOp::allowed("chmod", path.clone()) });
        }
        if let Some((file, size)) = truncate {
            file.set_len(size).map_err(|e| errno_of(&e))?;
            self.record(FileOp { size: Some(size), ..FileOp::allowed("truncate", path.clone()) });
        }
        let time = |t: Option<SetTime>| match t {
            None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
            Some(SetTime::At(secs, nsec)) => {
                libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: i64::from(nsec.min(MAX_NSEC)) }
            }
        };
        let (a, m) = (time(s.atime), time(s.mtime));
        if s.atime.is_some() || s.mtime.is_some() {
            self.share.set_times(entry, [a, m]).map_err(|r| self.refused("touch", r))?;
        }
        Ok(())
    }

    fn rename(&mut self, from: u64, to: u64, old: &OsStr, new: &OsStr, flags: u32) -> Result<(), i32> {
        let mode = match flags {
            0 => RenameMode::Replace,
            fuse::RENAME_NOREPLACE => RenameMode::NoReplace,
            _ => return Err(libc::EINVAL),
        };
        let (from_dir, to_dir) = (self.node(from)?.clone(), self.node(to)?.clone());
        let old_rel = from_dir.rel.join(old);
        // The nodes below move with it: their paths may not grow past the
        // table's byte limit.
        let grows = to_dir.rel.join(new).as_os_str().len().saturating_sub(old_rel.as_os_str().len());
        let below = self.nodes.values().filter(|n| n.entry.rel.starts_with(&old_rel)).count();
        if self.path_bytes + grows * below > MAX_NODE_PATH_BYTES {
            return Err(libc::ENOMEM);
        }
        // With a quota: what the new name replaces (not the file itself,
        // under another of its names) gives back as a removal does; a
        // shadow container may be made.
        let freed = match (&self.quota, mode) {
            (Some(_), RenameMode::Replace) => {
                let inode = |e: &Entry| self.share.stat(e).ok().map(|st| (st.st_dev, st.st_ino));
                let moving = self.share.lookup(&from_dir, old).ok().and_then(|e| inode(&e));
                self.share
                    .lookup(&to_dir, new)
                    .ok()
                    .filter(|e| inode(e).is_some_and(|i| Some(i) != moving))
                    .and_then(|e| self.freed_by_removing(&e))
            }
            _ => None,
        };
        let taken = self.take_for_new("rename", &to_dir, new, 0)?;
        let done = self.share.rename(&from_dir, old, &to_dir, new, mode);
        self.settle_new(taken, done.is_ok());
        let moved = done.map_err(|r| self.refused_create("rename", r))?;
        self.settle_freed(freed);
        let event = FileOp { to: Some(self.path_of(&moved.rel)), ..FileOp::allowed("rename", self.path_of(&old_rel)) };
        self.record(event);
        // What the new name replaced is gone; what was under the old name
        // now lives under the new one.
        if let Some(id) = self.by_path.remove(&moved.rel) {
            self.drop_paths_below(&moved.rel, id);
        }
        let new_rel = moved.rel.clone();
        let mut renamed = Vec::new();
        for (&id, n) in &self.nodes {
            if let Ok(rest) = n.entry.rel.strip_prefix(&old_rel) {
                // A stale node of that path (a file removed while the
                // guest still held it) is not the one moved: it keeps
                // its own entry, never the moved one's.
                if rest.as_os_str().is_empty() && n.entry.ino() != moved.ino() {
                    continue;
                }
                renamed.push((id, rest.to_path_buf()));
            }
        }
        for (id, rest) in renamed {
            let Some(n) = self.nodes.get(&id) else { continue };
            let old_path = n.entry.rel.clone();
            let entry = if rest.as_os_str().is_empty() {
                moved.clone()
            } else {
                self.share.relocated(&n.entry, new_rel.join(&rest))
            };
            if self.by_path.get(&old_path) == Some(&id) {
                self.by_path.remove(&old_path);
                self.by_path.insert(entry.rel.clone(), id);
            }
            if let Some(n) = self.nodes.get_mut(&id) {
                self.path_bytes = self.path_bytes + entry.rel.as_os_str().len() - n.entry.rel.as_os_str().len();
                n.entry = entry;
            }
        }
        Ok(())
    }

    /// After `rel` (node `id`) is removed or replaced: paths below it no
    /// longer lead to their nodes.
    fn drop_paths_below(&mut self, rel: &Path, id: u64) {
        let is_dir = self.nodes.get(&id).is_some_and(|n| n.entry.kind == Kind::Dir);
        if is_dir {
            self.by_path.retain(|p, _| !p.starts_with(rel));
        }
    }

    fn readdir(&mut self, dir: u64, fh: u64, offset: u64, room: usize, plus: bool) -> Result<Vec<u8>, i32> {
        let Handle::Dir { listing, .. } = self.handle_of(fh, dir)? else { return Err(libc::EBADF) };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let batch: Vec<Listed> = listing.iter().skip(start).take(room / fuse::MIN_DIRENT_LEN + 1).cloned().collect();
        let parent = self.node(dir)?.clone();
        let mut out = Out::default();
        for (i, item) in batch.into_iter().enumerate() {
            let next = (start + i + 1) as u64;
            let name = item.name.as_bytes();
            if out.0.len() + fuse::dirent_len(name.len(), plus) > room {
                break;
            }
            let type_bits = match item.kind {
                Kind::Dir => libc::S_IFDIR,
                Kind::File => libc::S_IFREG,
                Kind::Symlink => libc::S_IFLNK,
            };
            if plus {
                // An entry gone since the listing is skipped, not an error.
                let Ok(entry) = self.share.lookup(&parent, &item.name) else { continue };
                if self.remember(entry, &mut out).is_err() {
                    continue;
                }
            }
            fuse::dirent(&mut out, item.ino, next, name, type_bits);
        }
        Ok(out.0)
    }
}

/// How the guest's kernel should treat an opened file: a write-only
/// handle (what `>` redirections, `dd of=`, compilers' outputs get) skips
/// the guest's page cache, so its writes go from the caller's buffer to
/// the host without being copied into cache pages first. No one can map
/// a write-only handle, so nothing is lost; other handles keep the cache
/// (mmap and exec need it).
fn open_flags(access: OpenAccess) -> u32 {
    if access == OpenAccess::WriteOnly {
        fuse::FOPEN_DIRECT_IO
    } else {
        0
    }
}

fn fstat_file(file: &File) -> Result<libc::stat, i32> {
    sys::fstat(file.as_fd()).map_err(|e| errno_of(&e))
}

fn file_size(file: &File) -> Result<u64, i32> {
    fstat_file(file).map(|st| st.st_size.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::fuse::tests::request;
    use crate::fs::fuse::Opcode;
    use crate::fs::policy::FsPolicy;
    use crate::fs::quota::OBJECT_COST;
    use serde_json::Value;
    use std::fs;
    use std::sync::{Arc, Mutex};

    /// A guest kernel's side of the conversation, on a host tree.
    struct Guest {
        server: FileServer,
        unique: u64,
        log: Arc<Mutex<Vec<Value>>>,
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Guest {
        fn new() -> Guest {
            let t = tempfile::tempdir().unwrap();
            let w = t.path().join("work");
            fs::create_dir_all(w.join("src")).unwrap();
            fs::create_dir_all(w.join(".git/hooks")).unwrap();
            fs::write(w.join("src/main.rs"), "fn main() {}").unwrap();
            fs::write(w.join(".env"), "TOKEN=secret").unwrap();
            fs::write(w.join(".git/config"), "[core]").unwrap();
            fs::write(t.path().join("outside"), "host secret").unwrap();
            std::os::unix::fs::symlink(t.path().join("outside"), w.join("abs-link")).unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            let sink_log = log.clone();
            let share = Share::open(&w, FsPolicy::default(), false).unwrap();
            let server = FileServer::new(
                share,
                w.clone(),
                Box::new(move |e| sink_log.lock().unwrap().push(serde_json::to_value(&e).unwrap())),
            );
            let mut g = Guest { server, unique: 0, log, _dir: t, root: w };
            // fuse_init_in of a 7.37 kernel: major, minor, max_readahead,
            // flags, then flags2 and unused.
            let mut init = Out::default();
            init.u32(fuse::KERNEL_VERSION).u32(37).u32(1 << 20).u32(fuse::DO_READDIRPLUS | fuse::MAX_PAGES).zeros(48);
            let body = g.call(Opcode::Init, 0, &init.0).unwrap();
            assert_eq!(body.len(), fuse::INIT_OUT_LEN);
            assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), fuse::KERNEL_MINOR);
            g
        }

        /// Sends a request; the reply body or the errno.
        fn call(&mut self, opcode: Opcode, node: u64, args: &[u8]) -> Result<Vec<u8>, i32> {
            self.unique += 1;
            let reply = self.server.handle(&request(opcode.into(), self.unique, node, args), 2 << 20).expect("a reply");
            // fuse_out_header: len, error, unique.
            assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize, reply.len());
            assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), self.unique);
            match i32::from_le_bytes(reply[4..8].try_into().unwrap()) {
                0 => Ok(reply[fuse::OUT_HEADER_LEN..].to_vec()),
                e => Err(-e),
            }
        }

        fn name(name: &str) -> Vec<u8> {
            let mut v = name.as_bytes().to_vec();
            v.push(0);
            v
        }

        /// LOOKUP: (node, mode, uid) or errno.
        fn lookup(&mut self, dir: u64, name: &str) -> Result<(u64, u32, u32), i32> {
            let b = self.call(Opcode::Lookup, dir, &Self::name(name))?;
            Ok(entry_fields(&b))
        }

        fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
            let mut a = Out::default();
            a.u32(flags as u32).u32(0);
            let b = self.call(Opcode::Open, node, &a.0)?;
            Ok(u64::from_le_bytes(b[0..8].try_into().unwrap()))
        }

        fn read(&mut self, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
            let mut a = Out::default();
            a.u64(fh).u64(0).u32(size).u32(0).u64(0).u32(0).u32(0);
            self.call(Opcode::Read, node, &a.0)
        }

        fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<Vec<u8>, i32> {
            let mut a = Out::default();
            a.u64(fh).u64(offset).u32(data.len() as u32).u32(0).u64(0).u32(0).u32(0).bytes(data);
            self.call(Opcode::Write, node, &a.0)
        }

        fn create(&mut self, dir: u64, name: &str) -> Result<(u64, u64), i32> {
            let mut a = Out::default();
            a.u32(libc::O_WRONLY as u32).u32(libc::S_IFREG | 0o644).u32(0o022).u32(0).bytes(&Self::name(name));
            let b = self.call(Opcode::Create, dir, &a.0)?;
            let node = entry_fields(&b).0;
            Ok((node, u64::from_le_bytes(b[fuse::ENTRY_OUT_LEN..fuse::ENTRY_OUT_LEN + 8].try_into().unwrap())))
        }

        fn listing(&mut self, dir: u64, plus: bool) -> Vec<String> {
            let fh = u64::from_le_bytes(self.call(Opcode::OpenDir, dir, &[0u8; 8]).unwrap()[0..8].try_into().unwrap());
            let mut a = Out::default();
            a.u64(fh).u64(0).u32(65536).u32(0).u64(0).u32(0).u32(0);
            let b = self.call(if plus { Opcode::ReadDirPlus } else { Opcode::ReadDir }, dir, &a.0).unwrap();
            let mut names = Vec::new();
            let mut i = 0;
            while i < b.len() {
                // fuse_direntplus is a fuse_entry_out and a fuse_dirent:
                // ino, off, namelen, type, name.
                let d = if plus { i + fuse::ENTRY_OUT_LEN } else { i };
                let len = u32::from_le_bytes(b[d + 16..d + 20].try_into().unwrap()) as usize;
                names.push(String::from_utf8(b[d + fuse::DIRENT_LEN..d + fuse::DIRENT_LEN + len].to_vec()).unwrap());
                i = d + fuse::dirent_len(len, false);
            }
            names.sort();
            names
        }

        fn events(&self) -> Vec<String> {
            self.log.lock().unwrap().iter().map(|v| v.to_string()).collect()
        }

        /// Gives the server a workspace quota of `limit` bytes.
        fn quota(&mut self, limit: u64) -> Arc<Quota> {
            let quota = Arc::new(Quota::new(limit));
            let share = Share::open(&self.root, FsPolicy::default(), false).unwrap();
            let stand_in = FileServer::new(share, self.root.clone(), Box::new(|_| {}));
            let server = std::mem::replace(&mut self.server, stand_in);
            self.server = server.with_quota(Some(quota.clone()));
            quota
        }

        /// A new server on the same folder, with a git shadow in `shadow`
        /// and a workspace quota of `limit` bytes.
        fn quota_with_shadow(&mut self, limit: u64, shadow: PathBuf) -> Arc<Quota> {
            let quota = Arc::new(Quota::new(limit));
            let share = Share::open(&self.root, FsPolicy::default(), false).unwrap().with_git_shadow(shadow);
            let sink_log = self.log.clone();
            let server = FileServer::new(
                share,
                self.root.clone(),
                Box::new(move |e| sink_log.lock().unwrap().push(serde_json::to_value(&e).unwrap())),
            );
            self.server = server.with_quota(Some(quota.clone()));
            quota
        }

        fn mkdir(&mut self, dir: u64, name: &str) -> Result<u64, i32> {
            let mut a = Out::default();
            a.u32(0o755).u32(0o022).bytes(&Self::name(name));
            self.call(Opcode::MkDir, dir, &a.0).map(|b| entry_fields(&b).0)
        }

        fn symlink(&mut self, dir: u64, name: &str, target: &str) -> Result<u64, i32> {
            let mut a = Out::default();
            a.bytes(&Self::name(name)).bytes(&Self::name(target));
            self.call(Opcode::Symlink, dir, &a.0).map(|b| entry_fields(&b).0)
        }

        fn unlink(&mut self, dir: u64, name: &str) -> Result<(), i32> {
            self.call(Opcode::Unlink, dir, &Self::name(name)).map(|_| ())
        }

        fn rmdir(&mut self, dir: u64, name: &str) -> Result<(), i32> {
            self.call(Opcode::RmDir, dir, &Self::name(name)).map(|_| ())
        }

        fn rename(&mut self, dir: u64, old: &str, new: &str) -> Result<(), i32> {
            let mut a = Out::default();
            a.u64(dir).bytes(&Self::name(old)).bytes(&Self::name(new));
            self.call(Opcode::Rename, dir, &a.0).map(|_| ())
        }

        /// RELEASE: fh, flags, release flags, lock owner.
        fn release(&mut self, node: u64, fh: u64) -> Result<(), i32> {
            let mut a = Out::default();
            a.u64(fh).u32(0).u32(0).u64(0);
            self.call(Opcode::Release, node, &a.0).map(|_| ())
        }

        fn truncate(&mut self, node: u64, fh: u64, size: u64) -> Result<(), i32> {
            self.call(Opcode::SetAttr, node, &setattr_args(fuse::FATTR_SIZE | fuse::FATTR_FH, fh, size)).map(|_| ())
        }

        /// STATFS: bavail and frsize.
        fn statfs(&mut self) -> (u64, u64) {
            let b = self.call(Opcode::StatFs, fuse::ROOT_ID, &[]).unwrap();
            // fuse_kstatfs: blocks, bfree, bavail, files, ffree (u64),
            // bsize, namelen, frsize (u32).
            let bavail = u64::from_le_bytes(b[16..24].try_into().unwrap());
            (bavail, u32::from_le_bytes(b[48..52].try_into().unwrap()) as u64)
        }

        fn quota_refusals(&self) -> usize {
            self.events().iter().filter(|e| e.contains("\"decision\":\"deny\"") && e.contains("quota")).count()
        }
    }

    /// Offsets in fuse_attr of mode and uid.
    const ATTR_MODE_AT: usize = 60;
    const ATTR_UID_AT: usize = 68;

    fn entry_fields(b: &[u8]) -> (u64, u32, u32) {
        let node = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let attr = &b[fuse::ENTRY_ATTR_OFFSET..];
        let mode = u32::from_le_bytes(attr[ATTR_MODE_AT..ATTR_MODE_AT + 4].try_into().unwrap());
        let uid = u32::from_le_bytes(attr[ATTR_UID_AT..ATTR_UID_AT + 4].try_into().unwrap());
        (node, mode, uid)
    }

    /// fuse_setattr_in with `valid`, `fh` and `size`, the rest zero.
    fn setattr_args(valid: u32, fh: u64, size: u64) -> Vec<u8> {
        let mut a = Out::default();
        a.u32(valid).u32(0).u64(fh).u64(size);
        a.u64(0).u64(0).u64(0).u64(0); // lock_owner, atime, mtime, ctime
        a.u32(0).u32(0).u32(0).u32(0); // atimensec, mtimensec, ctimensec, mode
        a.u32(0).u32(0).u32(0).u32(0); // unused, uid, gid, unused
        a.0
    }

    #[test]
    fn reads_and_writes_reach_the_host_at_once_and_are_logged() {
        let mut g = Guest::new();
        let (src, mode, uid) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        assert_eq!((mode & libc::S_IFMT, uid), (libc::S_IFDIR, GUEST_UID), "the owner is the agent");
        let (main, _, _) = g.lookup(src, "main.rs").unwrap();
        let fh = g.open(main, libc::O_RDONLY).unwrap();
        assert_eq!(g.read(main, fh, 4096).unwrap(), b"fn main() {}");
        assert_eq!(g.write(main, fh, 0, b"x"), Err(libc::EBADF), "opened read-only");
        let (new, fh) = g.create(src, "new.rs").unwrap();
        g.write(new, fh, 0, b"hello ").unwrap();
        g.write(new, fh, 6, b"world").unwrap();
        assert_eq!(fs::read_to_string(g.root.join("src/new.rs")).unwrap(), "hello world");
        let ev = g.events();
        assert_eq!(ev.iter().filter(|e| e.contains("\"op\":\"create\"")).count(), 1, "{ev:?}");
        assert_eq!(ev.iter().filter(|e| e.contains("\"op\":\"write\"")).count(), 1, "one line per file written");
        assert!(ev.iter().all(|e| e.contains("\"event\":\"file\"")));
        assert!(ev[0].contains(&format!("{}/src/new.rs", g.root.display())), "{ev:?}");
        // Host files belong to the folder's owner (us, or given to it).
        use std::os::unix::fs::MetadataExt;
        let owner = fs::metadata(&g.root).unwrap().uid();
        assert_eq!(fs::metadata(g.root.join("src/new.rs")).unwrap().uid(), owner);
    }

    #[test]
    fn hidden_files_are_absent_and_refusals_logged() {
        let mut g = Guest::new();
        assert_eq!(g.lookup(fuse::ROOT_ID, ".env"), Err(libc::ENOENT));
        assert!(!g.listing(fuse::ROOT_ID, false).contains(&".env".to_string()));
        assert!(!g.listing(fuse::ROOT_ID, true).contains(&".env".to_string()));
        assert_eq!(g.create(fuse::ROOT_ID, ".env.local"), Err(libc::EACCES));
        assert_eq!(g.create(fuse::ROOT_ID, "cert.pem"), Err(libc::EACCES));
        let refused = g.events().into_iter().filter(|e| e.contains("\"decision\":\"deny\"")).count();
        assert_eq!(refused, 3, "{:?}", g.events());
        assert_eq!(fs::read_to_string(g.root.join(".env")).unwrap(), "TOKEN=secret");
        assert!(!g.root.join(".env.local").exists());
    }

    #[test]
    fn read_only_paths_refuse_changes() {
        let mut g = Guest::new();
        let (git, _, _) = g.lookup(fuse::ROOT_ID, ".git").unwrap();
        let (config, _, _) = g.lookup(git, "config").unwrap();
        assert_eq!(g.open(config, libc::O_RDWR), Err(libc::EROFS));
        let a = setattr_args(fuse::FATTR_SIZE, 0, 0);
        assert_eq!(g.call(Opcode::SetAttr, config, &a).map(|_| ()), Err(libc::EROFS));
        let (hooks, _, _) = g.lookup(git, "hooks").unwrap();
        assert_eq!(g.create(hooks, "pre-commit"), Err(libc::EROFS));
        assert_eq!(fs::read_to_string(g.root.join(".git/config")).unwrap(), "[core]");
        assert!(g.events().iter().any(|e| e.contains("Read-only by policy")));
    }

    /// Found by the fs_server fuzz target: a SETATTR refused in part (its
    /// truncate) applied its chmod first, and a git directory's mode could
    /// be changed (the user's git then cannot enter it).
    #[test]
    fn a_git_directory_keeps_its_mode_and_a_refused_setattr_changes_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let mut g = Guest::new();
        let (git, _, _) = g.lookup(fuse::ROOT_ID, ".git").unwrap();
        let mode_of = |g: &Guest, p: &str| fs::metadata(g.root.join(p)).unwrap().permissions().mode() & 0o7777;
        let before = mode_of(&g, ".git");
        let mut a = setattr_args(fuse::FATTR_MODE, 0, 0);
        a[68..72].copy_from_slice(&0o644u32.to_le_bytes());
        assert_eq!(g.call(Opcode::SetAttr, git, &a).map(|_| ()), Err(libc::EROFS));
        let mut both = setattr_args(fuse::FATTR_MODE | fuse::FATTR_SIZE, 0, 0);
        both[68..72].copy_from_slice(&0o600u32.to_le_bytes());
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let src_before = mode_of(&g, "src");
        assert!(g.call(Opcode::SetAttr, src, &both).is_err(), "a directory cannot be truncated");
        assert_eq!((mode_of(&g, ".git"), mode_of(&g, "src")), (before, src_before));
    }

    #[test]
    fn no_request_leads_outside() {
        let mut g = Guest::new();
        for bad in ["..", ".", "a/b", "../outside"] {
            assert_eq!(g.lookup(fuse::ROOT_ID, bad).map(|_| ()), Err(libc::EINVAL), "{bad}");
        }
        // A host link is a link: its target is text, resolved in the
        // guest, never followed here.
        let (link, mode, _) = g.lookup(fuse::ROOT_ID, "abs-link").unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(g.open(link, libc::O_RDONLY), Err(libc::EACCES));
        // No new links out, no hard links, no device nodes.
        let mut a = Out::default();
        a.bytes(b"out\0").bytes(b"../outside\0");
        assert_eq!(g.call(Opcode::Symlink, fuse::ROOT_ID, &a.0).map(|_| ()), Err(libc::EACCES));
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let mut a = Out::default();
        a.u64(src).bytes(b"hard\0");
        assert_eq!(g.call(Opcode::Link, fuse::ROOT_ID, &a.0).map(|_| ()), Err(libc::EPERM));
        let mut a = Out::default();
        let dev_null = libc::makedev(1, 3) as u32;
        a.u32(libc::S_IFCHR | 0o666).u32(dev_null).u32(0).u32(0).bytes(b"null\0");
        assert_eq!(g.call(Opcode::MkNod, fuse::ROOT_ID, &a.0).map(|_| ()), Err(libc::EPERM));
        // Nodes and handles the guest made up.
        assert_eq!(g.call(Opcode::GetAttr, 999, &[0u8; 16]).map(|_| ()), Err(libc::ENOENT));
        assert_eq!(g.read(fuse::ROOT_ID, 12345, 10).map(|_| ()), Err(libc::EBADF));
        assert!(!g.root.join("out").exists() && !g.root.join("null").exists());
    }

    #[test]
    fn renamed_directories_keep_their_nodes_and_policy_follows_paths() {
        let mut g = Guest::new();
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (main, _, _) = g.lookup(src, "main.rs").unwrap();
        let mut a = Out::default();
        a.u64(fuse::ROOT_ID).bytes(b"src\0lib\0");
        g.call(Opcode::Rename, fuse::ROOT_ID, &a.0).unwrap();
        assert!(g.root.join("lib/main.rs").exists());
        let fh = g.open(main, libc::O_RDONLY).unwrap();
        assert_eq!(g.read(main, fh, 100).unwrap(), b"fn main() {}");
        assert_eq!(g.lookup(fuse::ROOT_ID, "src"), Err(libc::ENOENT));
        // A decoy cannot become .git, nor can a file be moved onto hooks.
        let mut a = Out::default();
        a.u64(fuse::ROOT_ID).bytes(b"lib\0.git\0");
        assert_eq!(g.call(Opcode::Rename, fuse::ROOT_ID, &a.0).map(|_| ()), Err(libc::EACCES));
        let ev = g.events();
        assert!(ev.iter().any(|e| e.contains("\"op\":\"rename\"") && e.contains("/lib\"")), "{ev:?}");
    }

    #[test]
    fn forgotten_nodes_are_dropped() {
        let mut g = Guest::new();
        let before = g.server.nodes.len();
        let names = g.listing(fuse::ROOT_ID, true);
        assert!(names.contains(&"src".to_string()));
        assert_eq!(g.server.nodes.len(), before + names.len());
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let mut a = Out::default();
        a.u32(1).u32(0).u64(src).u64(2);
        let forget = request(Opcode::BatchForget as u32, 99, 0, &a.0);
        assert!(g.server.handle(&forget, 4096).is_none(), "forget has no reply");
        assert!(!g.server.nodes.contains_key(&src));
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let now = raise_open_file_limit();
        let lim = sys::getrlimit(libc::RLIMIT_NOFILE).unwrap();
        assert_eq!((now, lim.rlim_cur), (lim.rlim_max, lim.rlim_max));
    }

    /// What is outside the shared folder, beside it: names, kinds, modes,
    /// sizes and contents.
    fn outside(g: &Guest) -> Vec<(std::ffi::OsString, u32, u64, Vec<u8>)> {
        use std::os::unix::fs::PermissionsExt;
        let parent = g.root.parent().unwrap();
        let mut v: Vec<_> = fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "work")
            .map(|e| {
                let md = fs::symlink_metadata(e.path()).unwrap();
                let content = if md.is_file() { fs::read(e.path()).unwrap() } else { Vec::new() };
                (e.file_name(), md.permissions().mode(), md.len(), content)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn garbage_requests_get_well_formed_replies_and_change_nothing_outside() {
        let mut g = Guest::new();
        let before = outside(&g);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let args: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8).collect();
            // Every opcode up to SYNCFS, and unknown ones past it.
            let op = (x % (Opcode::SyncFs as u64 + 2)) as u32;
            let node = if i % 3 == 0 { fuse::ROOT_ID } else { x % 8 };
            let room = (x % 8192) as usize;
            let req = request(op, i, node, &args);
            // A reply exactly when one is due and there is room for it.
            let due = !matches!(fuse::parse(&req), Ok((_, ref op)) if op.no_reply());
            let reply = g.server.handle(&req, room);
            assert_eq!(reply.is_some(), due && room >= fuse::OUT_HEADER_LEN, "{op} room {room}");
            if let Some(r) = reply {
                // fuse_out_header: the reply's length, a negative errno or
                // 0 (an error has no body), the request's unique; within
                // the room given.
                assert!(r.len() >= fuse::OUT_HEADER_LEN && r.len() <= room, "{op}: {} in {room}", r.len());
                assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize, r.len());
                let error = i32::from_le_bytes(r[4..8].try_into().unwrap());
                assert!((-4095..=0).contains(&error) && (error == 0 || r.len() == fuse::OUT_HEADER_LEN), "{op}");
                assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), i);
            }
            g.server.check_accounting().unwrap();
        }
        // The host tree outside is untouched.
        assert_eq!(outside(&g), before);
        assert_eq!(fs::read_to_string(g.root.parent().unwrap().join("outside")).unwrap(), "host secret");
    }

    #[test]
    fn a_handle_sent_with_another_node_is_refused() {
        let mut g = Guest::new();
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (main, _, _) = g.lookup(src, "main.rs").unwrap();
        let (new, fh) = g.create(src, "new.rs").unwrap();
        // The handle is new.rs's; main.rs's node with it is no way in.
        assert_eq!(g.write(main, fh, 0, b"x"), Err(libc::EBADF));
        assert_eq!(g.read(main, fh, 10), Err(libc::EBADF));
        let a = setattr_args(fuse::FATTR_SIZE | fuse::FATTR_FH, fh, 0);
        assert_eq!(
            g.call(Opcode::SetAttr, main, &a).map(|_| ()),
            Err(libc::EBADF),
            "truncate through another's handle"
        );
        assert_eq!(fs::read_to_string(g.root.join("src/main.rs")).unwrap(), "fn main() {}");
        g.write(new, fh, 0, b"ok").unwrap();
        let ev = g.events();
        let writes: Vec<&String> = ev.iter().filter(|e| e.contains("\"op\":\"write\"")).collect();
        assert!(writes.len() == 1 && writes[0].contains("src/new.rs"), "{ev:?}");
        // A directory handle is its directory's only.
        let dh = u64::from_le_bytes(g.call(Opcode::OpenDir, src, &[0u8; 8]).unwrap()[0..8].try_into().unwrap());
        let mut a = Out::default();
        a.u64(dh).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
        assert_eq!(g.call(Opcode::ReadDir, fuse::ROOT_ID, &a.0).map(|_| ()), Err(libc::EBADF));
        assert!(g.call(Opcode::ReadDir, src, &a.0).is_ok());
    }

    #[test]
    fn node_paths_and_listings_are_bounded_in_bytes() {
        let mut g = Guest::new();
        // Deep paths: each node costs its path, the table stops at its
        // byte limit (ENFILE), whatever the depth.
        let mut dir = fuse::ROOT_ID;
        let name = "d".repeat(200);
        let mut made = 0;
        for _ in 0..40 {
            let mut a = Out::default();
            a.u32(0o755).u32(0o022).bytes(&Guest::name(&name));
            match g.call(Opcode::MkDir, dir, &a.0) {
                Ok(b) => dir = entry_fields(&b).0,
                Err(e) => {
                    assert_eq!(e, libc::ENAMETOOLONG, "past the longest path");
                    break;
                }
            }
            made += 1;
        }
        assert!(made > 10 && made < 40, "{made}");
        let bytes: usize = g.server.nodes.values().map(|n| n.entry.rel.as_os_str().len()).sum();
        assert_eq!(g.server.path_bytes, bytes, "the count is kept right");
        g.server.check_accounting().unwrap();
        g.server.path_bytes = MAX_NODE_PATH_BYTES - 2;
        assert_eq!(g.lookup(fuse::ROOT_ID, "src").map(|_| ()), Err(libc::ENFILE));
        g.server.path_bytes = bytes;
        // Listings held open count against one byte limit for all.
        let before = g.server.listing_bytes;
        let fh =
            u64::from_le_bytes(g.call(Opcode::OpenDir, fuse::ROOT_ID, &[0u8; 8]).unwrap()[0..8].try_into().unwrap());
        let held = g.server.listing_bytes - before;
        assert!(held > 0);
        g.server.listing_bytes = MAX_LISTING_BYTES - 1;
        assert_eq!(g.call(Opcode::OpenDir, fuse::ROOT_ID, &[0u8; 8]).map(|_| ()), Err(libc::ENOMEM));
        g.server.listing_bytes = before + held;
        let mut a = Out::default();
        a.u64(fh).u32(0).u32(0).u64(0);
        g.call(Opcode::ReleaseDir, fuse::ROOT_ID, &a.0).unwrap();
        assert_eq!(g.server.listing_bytes, before, "released listings give their bytes back");
    }

    #[test]
    fn changes_are_refused_once_the_audit_log_fails() {
        let mut g = Guest::new();
        let failed = Arc::new(AtomicBool::new(false));
        let server = std::mem::replace(
            &mut g.server,
            FileServer::new(
                Share::open(&g.root, FsPolicy::default(), false).unwrap(),
                g.root.clone(),
                Box::new(|_| {}),
            ),
        );
        g.server = server.fail_closed_on(failed.clone());
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        g.create(src, "before.rs").unwrap();
        failed.store(true, Ordering::SeqCst);
        assert_eq!(g.create(src, "after.rs").map(|_| ()), Err(libc::EROFS));
        let (main, _, _) = g.lookup(src, "main.rs").unwrap();
        assert_eq!(g.open(main, libc::O_RDWR).map(|_| ()), Err(libc::EROFS));
        let fh = g.open(main, libc::O_RDONLY).unwrap();
        assert_eq!(g.read(main, fh, 100).unwrap(), b"fn main() {}", "reading goes on");
        assert!(!g.root.join("src/after.rs").exists());
    }

    #[test]
    fn writes_past_the_workspace_quota_are_refused_and_audited_once_a_burst() {
        let mut g = Guest::new();
        // The new file's own cost, and 10 000 bytes.
        let quota = g.quota(OBJECT_COST + 10_000);
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (big, fh) = g.create(src, "big").unwrap();
        // Up to the quota, exactly.
        g.write(big, fh, 0, &[1; 4096]).unwrap();
        g.write(big, fh, 4096, &[2; 4096]).unwrap();
        g.write(big, fh, 8192, &[3; 1808]).unwrap();
        assert_eq!((quota.used(), g.quota_refusals()), (OBJECT_COST + 10_000, 0));
        assert_eq!(g.statfs().0, 0, "no room left shown");
        // One byte more is refused, changes nothing, and is audited.
        assert_eq!(g.write(big, fh, 10_000, b"x"), Err(libc::EDQUOT));
        assert_eq!(fs::metadata(g.root.join("src/big")).unwrap().len(), 10_000);
        assert_eq!(g.quota_refusals(), 1);
        let ev = g.events();
        let line = ev.iter().find(|e| e.contains("quota")).unwrap();
        assert!(
            line.contains("\"op\":\"write\"") && line.contains("src/big") && line.contains("\"asked\":1"),
            "{line}"
        );
        // The rest of the burst is not audited again; a sparse write far
        // out and a truncate upward are growth too.
        assert_eq!(g.write(big, fh, 1 << 40, b"x"), Err(libc::EDQUOT));
        assert_eq!(g.write(big, fh, u64::MAX, b"x"), Err(libc::EDQUOT));
        assert_eq!(g.truncate(big, fh, 20_000), Err(libc::EDQUOT));
        assert_eq!(g.quota_refusals(), 1);
        // Overwriting is no growth, in a new file or a host one.
        g.write(big, fh, 0, &[9; 4096]).unwrap();
        let (main, _, _) = g.lookup(src, "main.rs").unwrap();
        let mfh = g.open(main, libc::O_RDWR).unwrap();
        g.write(main, mfh, 0, b"fn main(){}\n").unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 10_000);
        // Shrinking gives room back: a new burst is audited again.
        g.truncate(big, fh, 6_000).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 6_000);
        let (_, frsize) = g.statfs();
        assert_eq!(g.statfs().0, 4_000 / frsize.max(1));
        g.write(big, fh, 6_000, &[4; 4_000]).unwrap();
        assert_eq!(g.write(big, fh, 10_000, b"y"), Err(libc::EDQUOT));
        assert_eq!(g.quota_refusals(), 2);
        // Deleting the file (closed) gives its bytes and cost back;
        // deleting a host file makes no room beyond the quota.
        g.release(big, fh).unwrap();
        g.release(main, mfh).unwrap();
        let mut a = Out::default();
        a.bytes(b"big\0");
        g.call(Opcode::Unlink, src, &a.0).unwrap();
        assert_eq!(quota.used(), 0);
        let mut a = Out::default();
        a.bytes(b"main.rs\0");
        g.call(Opcode::Unlink, src, &a.0).unwrap();
        assert_eq!(quota.remaining(), OBJECT_COST + 10_000);
        let (other, fh) = g.create(src, "other").unwrap();
        assert_eq!(g.write(other, fh, 0, &[5; 10_001]), Err(libc::EDQUOT));
        g.write(other, fh, 0, &[5; 10_000]).unwrap();
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn without_a_quota_nothing_is_counted_or_refused() {
        let mut g = Guest::new();
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (big, fh) = g.create(src, "big").unwrap();
        let chunk = vec![7u8; MAX_WRITE as usize];
        for i in 0..3 {
            g.write(big, fh, i * u64::from(MAX_WRITE), &chunk).unwrap();
        }
        g.truncate(big, fh, 1 << 40).unwrap();
        assert_eq!(fs::metadata(g.root.join("src/big")).unwrap().len(), 1 << 40);
        assert_eq!(g.quota_refusals(), 0);
        assert!(g.events().iter().all(|e| !e.contains("deny")), "{:?}", g.events());
    }

    #[test]
    fn one_quota_counts_every_shared_folder() {
        let mut a = Guest::new();
        let mut b = Guest::new();
        let quota = a.quota(8192 + 2 * OBJECT_COST);
        let share = Share::open(&b.root, FsPolicy::default(), false).unwrap();
        let stand_in = FileServer::new(share, b.root.clone(), Box::new(|_| {}));
        let server = std::mem::replace(&mut b.server, stand_in);
        b.server = server.with_quota(Some(quota.clone()));
        let (fa, fha) = a.create(fuse::ROOT_ID, "a").unwrap();
        let (fb, fhb) = b.create(fuse::ROOT_ID, "b").unwrap();
        a.write(fa, fha, 0, &[1; 4096]).unwrap();
        b.write(fb, fhb, 0, &[1; 4096]).unwrap();
        assert_eq!(b.write(fb, fhb, 4096, b"z"), Err(libc::EDQUOT));
        assert_eq!(a.write(fa, fha, 4096, b"z"), Err(libc::EDQUOT));
        assert_eq!(quota.used(), 8192 + 2 * OBJECT_COST);
    }

    #[test]
    fn writes_through_a_handle_to_a_deleted_file_keep_counting() {
        let mut g = Guest::new();
        let quota = g.quota(OBJECT_COST + 10_000);
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (big, fh) = g.create(src, "big").unwrap();
        g.write(big, fh, 0, &[1; 10_000]).unwrap();
        g.unlink(src, "big").unwrap();
        // Gone from the folder but held open: still on the host's disk,
        // still counted, and writes through the handle are growth.
        assert_eq!(quota.used(), OBJECT_COST + 10_000);
        assert_eq!(g.write(big, fh, 10_000, &[2; 4096]), Err(libc::EDQUOT));
        assert!(g.truncate(big, fh, 1 << 30).is_err());
        assert_eq!(g.create(src, "next").map(|_| ()), Err(libc::EDQUOT));
        g.write(big, fh, 0, &[3; 4096]).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 10_000);
        g.server.check_accounting().unwrap();
        // The guest's kernel going away closes it too.
        assert!(g.server.handle(&request(Opcode::Destroy as u32, 999, 0, &[]), 4096).is_some());
        assert_eq!(quota.used(), 0);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn a_truncate_through_a_handle_counts_the_file_it_truncates() {
        let mut g = Guest::new();
        let quota = g.quota(1 << 20);
        let (x, fh) = g.create(fuse::ROOT_ID, "x").unwrap();
        g.unlink(fuse::ROOT_ID, "x").unwrap();
        // A directory made and moved where the removed file was: the
        // file's node is not taken along to name it.
        g.mkdir(fuse::ROOT_ID, "x").unwrap();
        g.rename(fuse::ROOT_ID, "x", "y").unwrap();
        let used = quota.used();
        let _ = g.truncate(x, fh, 4000);
        let Some(Handle::File { file, .. }) = g.server.handles.get(&fh) else { panic!("the handle") };
        let size = file_size(file).unwrap();
        assert_eq!(quota.used(), used + size, "the removed file grew by {size}");
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn the_quota_comes_back_to_zero_once_everything_made_is_gone() {
        let mut g = Guest::new();
        let quota = g.quota(16 * OBJECT_COST);
        let names = ["a", "b", "c", "d"];
        let mut handles: Vec<(u64, u64)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let name = names[(x >> 8) as usize % names.len()];
            let other = names[(x >> 16) as usize % names.len()];
            let pick = (x >> 24) as usize % handles.len().max(1);
            let (offset, len) = ((x >> 32) % 20_000, (x >> 48) as usize % 5_000);
            match x % 10 {
                0 => {
                    if let Ok(h) = g.create(fuse::ROOT_ID, name) {
                        handles.push(h);
                    }
                }
                1 => {
                    if let Some(&(node, fh)) = handles.get(pick) {
                        let _ = g.write(node, fh, offset, &vec![7; len]);
                    }
                }
                2 => {
                    if let Ok((node, _, _)) = g.lookup(fuse::ROOT_ID, name) {
                        if let Ok(fh) = g.open(node, libc::O_RDWR) {
                            handles.push((node, fh));
                        }
                    }
                }
                3 if !handles.is_empty() => {
                    let (node, fh) = handles.swap_remove(pick);
                    g.release(node, fh).unwrap();
                }
                4 => drop(g.unlink(fuse::ROOT_ID, name)),
                5 => drop(g.rename(fuse::ROOT_ID, name, other)),
                6 => drop(g.mkdir(fuse::ROOT_ID, name)),
                7 => drop(g.rmdir(fuse::ROOT_ID, name)),
                8 => drop(g.symlink(fuse::ROOT_ID, name, &"src/".repeat(1 + len % 50))),
                _ => {
                    if let Some(&(node, fh)) = handles.get(pick) {
                        let _ = g.truncate(node, fh, offset);
                    }
                }
            }
            g.server.check_accounting().unwrap();
            // What is counted is what the guest's objects take: those it
            // named, and the removed files its handles hold.
            {
                let mut expect = 0u64;
                for n in names {
                    if let Ok(md) = fs::symlink_metadata(g.root.join(n)) {
                        expect += OBJECT_COST + if md.is_dir() { 0 } else { md.len() };
                    }
                }
                let mut seen = std::collections::HashSet::new();
                for h in g.server.handles.values() {
                    if let Handle::File { file, inode, .. } = h {
                        let st = fstat_file(file).unwrap();
                        if st.st_nlink == 0 && seen.insert(*inode) {
                            expect += OBJECT_COST + st.st_size as u64;
                        }
                    }
                }
                assert_eq!(quota.used(), expect, "step {step}, request kind {}", x % 10);
            }
        }
        // All closed and removed: nothing is counted, nothing given twice.
        for (node, fh) in handles {
            g.release(node, fh).unwrap();
        }
        for name in names {
            let _ = g.unlink(fuse::ROOT_ID, name);
            let _ = g.rmdir(fuse::ROOT_ID, name);
        }
        assert!(names.iter().all(|n| fs::symlink_metadata(g.root.join(n)).is_err()));
        assert_eq!(quota.used(), 0);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn the_last_close_of_a_deleted_file_gives_its_bytes_back() {
        let mut g = Guest::new();
        let quota = g.quota(1 << 20);
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (f, fh) = g.create(src, "f").unwrap();
        g.write(f, fh, 0, &[1; 5000]).unwrap();
        let reader = g.open(f, libc::O_RDONLY).unwrap();
        g.unlink(src, "f").unwrap();
        g.write(f, fh, 5000, &[2; 1000]).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 6000);
        g.server.check_accounting().unwrap();
        g.release(f, fh).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 6000, "another handle still holds it");
        assert_eq!(g.read(f, reader, 10).unwrap(), [1; 10]);
        g.release(f, reader).unwrap();
        assert_eq!(quota.used(), 0, "the last close gives it all back");
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn a_deleted_file_held_open_gives_its_bytes_back_once() {
        let mut g = Guest::new();
        let quota = g.quota(1 << 20);
        let (src, _, _) = g.lookup(fuse::ROOT_ID, "src").unwrap();
        let (keep, kfh) = g.create(src, "keep").unwrap();
        g.write(keep, kfh, 0, &[1; 3000]).unwrap();
        let (f, fh) = g.create(src, "f").unwrap();
        g.write(f, fh, 0, &[1; 5000]).unwrap();
        g.unlink(src, "f").unwrap();
        // Whatever a truncate through its handle does (the deleted node
        // has no attributes left: ENOENT), once closed its bytes and cost
        // have come back once, and the other file stays counted.
        let _ = g.truncate(f, fh, 0);
        g.release(f, fh).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 3000);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn directories_and_empty_files_count_against_the_quota() {
        let mut g = Guest::new();
        let quota = g.quota(100 * OBJECT_COST);
        assert_eq!(quota.max_objects(), 100);
        let (mut made, mut refused) = (0, 0);
        for i in 0..100_000 {
            match g.mkdir(fuse::ROOT_ID, &format!("d{i}")) {
                Ok(_) => made += 1,
                Err(e) => {
                    assert_eq!(e, libc::EDQUOT, "d{i}");
                    refused += 1;
                }
            }
        }
        assert_eq!((made, refused), (100, 99_900));
        let on_host = fs::read_dir(&g.root).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "src").count();
        assert_eq!(on_host, 100 + 3, "the refused ones were not made (beside .git, .env, abs-link)");
        assert_eq!(g.quota_refusals(), 1, "one burst, one audit line");
        assert_eq!(g.create(fuse::ROOT_ID, "empty").map(|_| ()), Err(libc::EDQUOT));
        assert!(!g.root.join("empty").exists());
        // Removing a directory gives its cost back.
        g.rmdir(fuse::ROOT_ID, "d0").unwrap();
        assert_eq!(quota.used(), 99 * OBJECT_COST);
        let (e, fh) = g.create(fuse::ROOT_ID, "empty").unwrap();
        assert_eq!(quota.remaining(), 0);
        g.release(e, fh).unwrap();
        g.unlink(fuse::ROOT_ID, "empty").unwrap();
        assert_eq!(quota.used(), 99 * OBJECT_COST);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn symbolic_links_count_with_their_targets() {
        let mut g = Guest::new();
        let quota = g.quota(OBJECT_COST + 8);
        assert_eq!(g.symlink(fuse::ROOT_ID, "long", "src/main.rs").map(|_| ()), Err(libc::EDQUOT));
        assert!(fs::symlink_metadata(g.root.join("long")).is_err());
        g.symlink(fuse::ROOT_ID, "short", "src").unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 3);
        g.unlink(fuse::ROOT_ID, "short").unwrap();
        assert_eq!(quota.used(), 0);
    }

    #[test]
    fn the_git_shadow_counts_against_the_same_quota() {
        let mut g = Guest::new();
        let shadow = g._dir.path().join("state/gitdirs");
        let head = b"ref: refs/heads/main\n";
        let limit = 4 * OBJECT_COST + head.len() as u64 + 10;
        let quota = g.quota_with_shadow(limit, shadow.clone());
        let sub = g.mkdir(fuse::ROOT_ID, "sub").unwrap();
        let git = g.mkdir(sub, ".git").unwrap();
        // The new .git lives in the shadow, in a container of its own:
        // both count.
        assert!(!g.root.join("sub/.git").exists());
        assert_eq!(fs::read_dir(&shadow).unwrap().count(), 1);
        assert_eq!(quota.used(), 3 * OBJECT_COST);
        let (h, fh) = g.create(git, "HEAD").unwrap();
        g.write(h, fh, 0, head).unwrap();
        assert_eq!(quota.used(), 4 * OBJECT_COST + head.len() as u64);
        // Writes there are refused past the quota as in the folder.
        assert_eq!(g.write(h, fh, head.len() as u64, &[b'x'; 11]), Err(libc::EDQUOT));
        assert_eq!(g.mkdir(git, "objects"), Err(libc::EDQUOT));
        g.write(h, fh, head.len() as u64, &[b'x'; 10]).unwrap();
        assert_eq!(quota.remaining(), 0);
        // Removed, they give back; the container stays, and stays counted.
        g.release(h, fh).unwrap();
        g.unlink(git, "HEAD").unwrap();
        g.rmdir(sub, ".git").unwrap();
        g.rmdir(fuse::ROOT_ID, "sub").unwrap();
        assert_eq!(fs::read_dir(&shadow).unwrap().count(), 1);
        assert_eq!(quota.used(), OBJECT_COST);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn a_rename_over_a_file_gives_back_what_it_replaced() {
        let mut g = Guest::new();
        let quota = g.quota(1 << 20);
        let (a, fa) = g.create(fuse::ROOT_ID, "a").unwrap();
        g.write(a, fa, 0, &[1; 1000]).unwrap();
        let (b, fb) = g.create(fuse::ROOT_ID, "b").unwrap();
        g.write(b, fb, 0, &[2; 500]).unwrap();
        g.release(b, fb).unwrap();
        assert_eq!(quota.used(), 2 * OBJECT_COST + 1500);
        g.rename(fuse::ROOT_ID, "a", "b").unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 1000, "b's bytes and cost came back");
        g.rename(fuse::ROOT_ID, "b", "b").unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 1000, "a rename onto itself replaces nothing");
        // Over a file still open (a's handle, now b's): counted until its
        // last handle closes.
        let (c, fc) = g.create(fuse::ROOT_ID, "c").unwrap();
        g.write(c, fc, 0, &[3; 300]).unwrap();
        g.rename(fuse::ROOT_ID, "c", "b").unwrap();
        assert_eq!(quota.used(), 2 * OBJECT_COST + 1300);
        g.release(a, fa).unwrap();
        assert_eq!(quota.used(), OBJECT_COST + 300);
        // Over an empty directory: its cost.
        g.mkdir(fuse::ROOT_ID, "d").unwrap();
        g.mkdir(fuse::ROOT_ID, "e").unwrap();
        g.rename(fuse::ROOT_ID, "d", "e").unwrap();
        assert_eq!(quota.used(), 2 * OBJECT_COST + 300);
        g.server.check_accounting().unwrap();
    }

    #[test]
    fn no_other_request_grows_the_host_unseen() {
        let mut g = Guest::new();
        let quota = g.quota(1 << 20);
        let (f, fh) = g.create(fuse::ROOT_ID, "f").unwrap();
        let used = quota.used();
        // fallocate (fh, offset, length, mode), copy_file_range, xattrs:
        // not offered, nothing grows.
        let mut a = Out::default();
        a.u64(fh).u64(0).u64(1 << 30).u32(0).u32(0);
        assert_eq!(g.call(Opcode::Fallocate, f, &a.0).map(|_| ()), Err(libc::ENOSYS));
        let mut a = Out::default();
        a.u32(4).u32(0).bytes(b"user.big\0").bytes(&[0; 4]);
        assert_eq!(g.call(Opcode::SetXattr, f, &a.0).map(|_| ()), Err(libc::ENOSYS));
        let copy_file_range = 47;
        let mut a = Out::default();
        a.u64(fh).u64(0).u64(f).u64(fh).u64(1 << 20).u64(1 << 30).u64(0);
        let reply = g.server.handle(&request(copy_file_range, 999, f, &a.0), 4096).unwrap();
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -libc::ENOSYS);
        assert_eq!(fs::metadata(g.root.join("f")).unwrap().len(), 0);
        assert_eq!(quota.used(), used);
    }

    /// The share opened again on the same folder: set-up reads the host's
    /// files as they are now.
    fn reopened(g: &mut Guest) {
        let share = Share::open(&g.root, FsPolicy::default(), false).unwrap();
        let log = g.log.clone();
        g.server = FileServer::new(
            share,
            g.root.clone(),
            Box::new(move |e| log.lock().unwrap().push(serde_json::to_value(&e).unwrap())),
        );
    }

    #[test]
    fn what_host_tools_run_on_their_own_the_guest_cannot_write() {
        let mut g = Guest::new();
        for d in [".husky/_", "tools/hooks", "bin", ".GIT"] {
            fs::create_dir_all(g.root.join(d)).unwrap();
        }
        let config = "[core]\n\thooksPath = tools/hooks\n[include]\n\tpath = ../team.gitconfig\n";
        fs::write(g.root.join(".git/config"), config).unwrap();
        fs::write(g.root.join(".envrc"), "PATH_add bin\n").unwrap();
        fs::write(g.root.join(".ENV"), "TOKEN=secret").unwrap();
        fs::write(g.root.join("ID_ED25519"), "key").unwrap();
        fs::write(g.root.join(".GIT/CONFIG"), "[core]\n").unwrap();
        reopened(&mut g);
        let root = fuse::ROOT_ID;
        let husky = g.lookup(root, ".husky").unwrap().0;
        let underscore = g.lookup(husky, "_").unwrap().0;
        let tools = g.lookup(root, "tools").unwrap().0;
        let hooks = g.lookup(tools, "hooks").unwrap().0;
        let bin = g.lookup(root, "bin").unwrap().0;
        for (dir, name) in [
            (husky, "pre-commit"),
            (underscore, "pre-commit"),
            (hooks, "pre-commit"),
            (bin, "git"),
            (root, "team.gitconfig"),
            (root, ".pre-commit-config.yaml"),
            (root, "lefthook.yml"),
        ] {
            assert_eq!(g.create(dir, name).map(|_| ()), Err(libc::EROFS), "{name}");
        }
        for name in [".ENV", "ID_ED25519"] {
            assert_eq!(g.lookup(root, name).map(|_| ()), Err(libc::ENOENT), "{name}");
        }
        let upper_git = g.lookup(root, ".GIT").unwrap().0;
        let upper_config = g.lookup(upper_git, "CONFIG").unwrap().0;
        assert_eq!(g.open(upper_config, libc::O_RDWR), Err(libc::EROFS));
        assert!(!g.root.join("tools/hooks/pre-commit").exists() && !g.root.join("bin/git").exists());
        assert!(g.events().iter().filter(|e| e.contains("Read-only by policy")).count() >= 7);
    }
}
