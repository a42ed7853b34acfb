//! Host side: the FUSE wire protocol (as carried by virtio-fs), parsed from
//! the guest's bytes (untrusted) into typed requests, and replies encoded.
//! Only what the file server answers is modelled; every length is checked
//! and nothing here panics on any input. Layouts follow the kernel's
//! `include/uapi/linux/fuse.h` (7.31 and later), little-endian.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version we speak.
pub const KERNEL_MINOR: u32 = 31;
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// fuse_attr.
pub const ATTR_LEN: usize = 88;
/// Where fuse_entry_out's attributes start (after nodeid, generation,
/// entry_valid, attr_valid and their nanoseconds).
pub const ENTRY_ATTR_OFFSET: usize = 40;
/// fuse_entry_out.
pub const ENTRY_OUT_LEN: usize = ENTRY_ATTR_OFFSET + ATTR_LEN;
/// Where fuse_attr_out's attributes start (after attr_valid, its
/// nanoseconds and padding).
pub const ATTR_OUT_ATTR_OFFSET: usize = 16;
/// fuse_attr_out.
pub const ATTR_OUT_LEN: usize = ATTR_OUT_ATTR_OFFSET + ATTR_LEN;
/// fuse_open_out.
pub const OPEN_OUT_LEN: usize = 16;
/// fuse_init_out (7.23 and later).
pub const INIT_OUT_LEN: usize = 64;
/// fuse_forget_one, the entries of a BATCH_FORGET.
const FORGET_ONE_LEN: usize = 16;
/// fuse_dirent before its name (ino, off, namelen, type).
pub const DIRENT_LEN: usize = 24;
/// Directory entries (and their names) are padded to this.
const DIRENT_ALIGN: usize = 8;
/// The smallest directory entry: a one-byte name, padded.
pub const MIN_DIRENT_LEN: usize = align_dirent(DIRENT_LEN + 1);
/// A dirent's type is the mode's type bits (`S_IFMT`) shifted down by
/// this: the `DT_*` value.
const DIRENT_TYPE_SHIFT: u32 = 12;

macro_rules! opcodes {
    ($($(#[$doc:meta])* $name:ident = $n:literal,)*) => {
        /// The request opcodes (`enum fuse_opcode`) the server knows; any
        /// other is answered ENOSYS ([`Op::Unknown`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Opcode {
            $($(#[$doc])* $name = $n,)*
        }

        impl Opcode {
            pub fn from_u32(v: u32) -> Option<Opcode> {
                match v {
                    $($n => Some(Opcode::$name),)*
                    _ => None,
                }
            }
        }
    };
}

opcodes! {
    Lookup = 1,
    Forget = 2,
    GetAttr = 3,
    SetAttr = 4,
    ReadLink = 5,
    Symlink = 6,
    MkNod = 8,
    MkDir = 9,
    Unlink = 10,
    RmDir = 11,
    Rename = 12,
    Link = 13,
    Open = 14,
    Read = 15,
    Write = 16,
    StatFs = 17,
    Release = 18,
    Fsync = 20,
    SetXattr = 21,
    GetXattr = 22,
    ListXattr = 23,
    RemoveXattr = 24,
    Flush = 25,
    Init = 26,
    OpenDir = 27,
    ReadDir = 28,
    ReleaseDir = 29,
    FsyncDir = 30,
    Access = 34,
    Create = 35,
    Interrupt = 36,
    Destroy = 38,
    BatchForget = 42,
    Fallocate = 43,
    ReadDirPlus = 44,
    /// RENAME with flags.
    Rename2 = 45,
    Lseek = 46,
    SyncFs = 50,
}

impl From<Opcode> for u32 {
    fn from(o: Opcode) -> u32 {
        o as u32
    }
}

// INIT flags.
pub const ASYNC_READ: u32 = 1 << 0;
pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
pub const BIG_WRITES: u32 = 1 << 5;
pub const AUTO_INVAL_DATA: u32 = 1 << 12;
pub const DO_READDIRPLUS: u32 = 1 << 13;
pub const READDIRPLUS_AUTO: u32 = 1 << 14;
pub const PARALLEL_DIROPS: u32 = 1 << 18;
pub const MAX_PAGES: u32 = 1 << 22;
pub const CACHE_SYMLINKS: u32 = 1 << 23;

// SETATTR valid bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

pub const RENAME_NOREPLACE: u32 = 1;
pub const GETATTR_FH: u32 = 1;

/// The fixed header of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A time SETATTR sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// The host's clock now (`FATTR_*TIME_NOW`).
    Now,
    /// Seconds and nanoseconds, as the guest gave them.
    At(u64, u32),
}

/// What SETATTR changes: each field is there only if its `FATTR_*` bit
/// was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// The handle it is asked through (`FATTR_FH`).
    pub fh: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

impl SetAttr {
    /// fuse_setattr_in: `valid` says which fields are meant.
    fn parse(a: &mut Args<'_>) -> Option<SetAttr> {
        let valid = a.u32()?;
        a.u32()?; // padding
        let fh = a.u64()?;
        let size = a.u64()?;
        a.u64()?; // lock_owner
        let (atime, mtime, _ctime) = (a.u64()?, a.u64()?, a.u64()?);
        let (atimensec, mtimensec, _ctimensec) = (a.u32()?, a.u32()?, a.u32()?);
        let mode = a.u32()?;
        a.u32()?; // unused
        let (uid, gid) = (a.u32()?, a.u32()?);
        let is = |bit: u32| valid & bit != 0;
        let time = |set: u32, now: u32, secs: u64, nsec: u32| {
            is(set).then_some(if is(now) { SetTime::Now } else { SetTime::At(secs, nsec) })
        };
        Some(SetAttr {
            mode: is(FATTR_MODE).then_some(mode),
            uid: is(FATTR_UID).then_some(uid),
            gid: is(FATTR_GID).then_some(gid),
            size: is(FATTR_SIZE).then_some(size),
            fh: is(FATTR_FH).then_some(fh),
            atime: time(FATTR_ATIME, FATTR_ATIME_NOW, atime, atimensec),
            mtime: time(FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtimensec),
        })
    }
}

/// How a file is opened: the access mode (`O_ACCMODE` bits) of the
/// guest's open flags. The other flags are the guest kernel's business
/// (it truncates and appends through other requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAccess {
    ReadOnly,
    WriteOnly,
    /// `O_RDWR`, and the access mode 3 (which Linux gives to `ioctl`-only
    /// opens): taken as asking for the most.
    ReadWrite,
}

impl OpenAccess {
    fn from_flags(flags: u32) -> OpenAccess {
        match flags as i32 & libc::O_ACCMODE {
            libc::O_RDONLY => OpenAccess::ReadOnly,
            libc::O_WRONLY => OpenAccess::WriteOnly,
            _ => OpenAccess::ReadWrite,
        }
    }

    /// True if the file may be written through this handle.
    pub fn writes(self) -> bool {
        self != OpenAccess::ReadOnly
    }
}

/// A request, its arguments checked for shape (names are plain bytes
/// here; the share checks what they may name).
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Destroy,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget(Vec<(u64, u64)>),
    /// With the handle of an open file, when asked through one.
    GetAttr {
        fh: Option<u64>,
    },
    SetAttr(SetAttr),
    ReadLink,
    Symlink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    MkNod {
        name: &'a OsStr,
    },
    MkDir {
        name: &'a OsStr,
        mode: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    RmDir {
        name: &'a OsStr,
    },
    Rename {
        new_dir: u64,
        old: &'a OsStr,
        new: &'a OsStr,
        flags: u32,
    },
    Link {
        old_node: u64,
        name: &'a OsStr,
    },
    Open {
        access: OpenAccess,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    StatFs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
    },
    Flush {
        fh: u64,
    },
    OpenDir,
    ReadDir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    ReleaseDir {
        fh: u64,
    },
    FsyncDir {
        fh: u64,
    },
    /// ACCESS: only whether write access is asked matters (the guest's
    /// kernel checks the mode bits itself).
    Access {
        write: bool,
    },
    Create {
        name: &'a OsStr,
        access: OpenAccess,
        mode: u32,
    },
    Interrupt,
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    /// Extended attributes are not offered.
    Xattr,
    SyncFs,
    /// Anything else: answered ENOSYS.
    Unknown(u32),
}

impl Op<'_> {
    /// Requests the kernel expects no reply to.
    pub fn no_reply(&self) -> bool {
        matches!(self, Op::Forget { .. } | Op::BatchForget(_) | Op::Interrupt)
    }

    /// Requests that may change the shared folder (or open a file to).
    pub fn changes(&self) -> bool {
        match self {
            Op::Open { access } | Op::Create { access, .. } => access.writes() || matches!(self, Op::Create { .. }),
            Op::SetAttr(_)
            | Op::Symlink { .. }
            | Op::MkNod { .. }
            | Op::MkDir { .. }
            | Op::Unlink { .. }
            | Op::RmDir { .. }
            | Op::Rename { .. }
            | Op::Link { .. }
            | Op::Write { .. }
            | Op::Fallocate { .. } => true,
            _ => false,
        }
    }

    /// A short name, for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Init { .. } => "init",
            Op::Destroy => "destroy",
            Op::Lookup { .. } => "lookup",
            Op::Forget { .. } | Op::BatchForget(_) => "forget",
            Op::GetAttr { .. } => "getattr",
            Op::SetAttr(_) => "setattr",
            Op::ReadLink => "readlink",
            Op::Symlink { .. } => "symlink",
            Op::MkNod { .. } => "mknod",
            Op::MkDir { .. } => "mkdir",
            Op::Unlink { .. } => "unlink",
            Op::RmDir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Open { .. } => "open",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::StatFs => "statfs",
            Op::Release { .. } => "release",
            Op::Fsync { .. } => "fsync",
            Op::Flush { .. } => "flush",
            Op::OpenDir => "opendir",
            Op::ReadDir { plus: false, .. } => "readdir",
            Op::ReadDir { plus: true, .. } => "readdirplus",
            Op::ReleaseDir { .. } => "releasedir",
            Op::FsyncDir { .. } => "fsyncdir",
            Op::Access { .. } => "access",
            Op::Create { .. } => "create",
            Op::Interrupt => "interrupt",
            Op::Lseek { .. } => "lseek",
            Op::Fallocate { .. } => "fallocate",
            Op::Xattr => "xattr",
            Op::SyncFs => "syncfs",
            Op::Unknown(_) => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header, or the header's length disagrees: there is
    /// no request to answer.
    BadHeader,
    /// The header is sound but the arguments are not: answer EINVAL.
    BadArgs(InHeader),
}

/// Bounded reading of little-endian fields and NUL-terminated names.
struct Args<'a>(&'a [u8]);

impl<'a> Args<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    /// A NUL-terminated, non-empty name.
    fn name(&mut self) -> Option<&'a OsStr> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let name = self.take(end)?;
        self.take(1)?;
        (!name.is_empty()).then(|| OsStr::from_bytes(name))
    }
}

/// Parses one request (header and arguments) from the bytes the guest
/// made readable.
pub fn parse(bytes: &[u8]) -> Result<(InHeader, Op<'_>), ParseError> {
    let mut a = Args(bytes);
    let (Some(len), Some(opcode), Some(unique), Some(nodeid), Some(uid), Some(gid), Some(pid)) =
        (a.u32(), a.u32(), a.u64(), a.u64(), a.u32(), a.u32(), a.u32())
    else {
        return Err(ParseError::BadHeader);
    };
    a.u32().ok_or(ParseError::BadHeader)?; // total_extlen, padding
    if len as usize != bytes.len() {
        return Err(ParseError::BadHeader);
    }
    let h = InHeader { len, opcode, unique, nodeid, uid, gid, pid };
    let op = parse_op(opcode, &mut a).ok_or(ParseError::BadArgs(h))?;
    Ok((h, op))
}

fn parse_op<'a>(opcode: u32, a: &mut Args<'a>) -> Option<Op<'a>> {
    let Some(code) = Opcode::from_u32(opcode) else { return Some(Op::Unknown(opcode)) };
    Some(match code {
        Opcode::Lookup => Op::Lookup { name: a.name()? },
        Opcode::Forget => Op::Forget { nlookup: a.u64()? },
        Opcode::GetAttr => {
            let flags = a.u32()?;
            a.u32()?;
            let fh = a.u64()?;
            Op::GetAttr { fh: (flags & GETATTR_FH != 0).then_some(fh) }
        }
        Opcode::SetAttr => Op::SetAttr(SetAttr::parse(a)?),
        Opcode::ReadLink => Op::ReadLink,
        Opcode::Symlink => Op::Symlink { name: a.name()?, target: a.name()? },
        Opcode::MkNod => {
            let (_mode, _rdev, _umask) = (a.u32()?, a.u32()?, a.u32()?);
            a.u32()?; // padding
            Op::MkNod { name: a.name()? }
        }
        Opcode::MkDir => {
            let mode = a.u32()?;
            a.u32()?; // umask: the kernel applied it already
            Op::MkDir { name: a.name()?, mode }
        }
        Opcode::Unlink => Op::Unlink { name: a.name()? },
        Opcode::RmDir => Op::RmDir { name: a.name()? },
        Opcode::Rename => Op::Rename { new_dir: a.u64()?, old: a.name()?, new: a.name()?, flags: 0 },
        Opcode::Rename2 => {
            let new_dir = a.u64()?;
            let flags = a.u32()?;
            a.u32()?;
            Op::Rename { new_dir, old: a.name()?, new: a.name()?, flags }
        }
        Opcode::Link => Op::Link { old_node: a.u64()?, name: a.name()? },
        Opcode::Open => Op::Open { access: OpenAccess::from_flags(a.u32()?) },
        Opcode::Read | Opcode::ReadDir | Opcode::ReadDirPlus => {
            let (fh, offset, size) = (a.u64()?, a.u64()?, a.u32()?);
            match code {
                Opcode::Read => Op::Read { fh, offset, size },
                _ => Op::ReadDir { fh, offset, size, plus: code == Opcode::ReadDirPlus },
            }
        }
        Opcode::Write => {
            let (fh, offset, size) = (a.u64()?, a.u64()?, a.u32()?);
            let (_write_flags, _lock_owner, _flags) = (a.u32()?, a.u64()?, a.u32()?);
            a.u32()?; // padding
            let data = a.take(size as usize)?;
            Op::Write { fh, offset, data }
        }
        Opcode::StatFs => Op::StatFs,
        Opcode::Release => Op::Release { fh: a.u64()? },
        Opcode::Fsync => Op::Fsync { fh: a.u64()? },
        Opcode::Flush => Op::Flush { fh: a.u64()? },
        Opcode::Init => Op::Init { major: a.u32()?, minor: a.u32()?, max_readahead: a.u32()?, flags: a.u32()? },
        Opcode::OpenDir => Op::OpenDir,
        Opcode::ReleaseDir => Op::ReleaseDir { fh: a.u64()? },
        Opcode::FsyncDir => Op::FsyncDir { fh: a.u64()? },
        Opcode::Access => Op::Access { write: a.u32()? as i32 & libc::W_OK != 0 },
        Opcode::Create => {
            let (flags, mode) = (a.u32()?, a.u32()?);
            a.u32()?; // umask, applied by the kernel
            a.u32()?;
            Op::Create { name: a.name()?, access: OpenAccess::from_flags(flags), mode }
        }
        Opcode::Interrupt => Op::Interrupt,
        Opcode::Destroy => Op::Destroy,
        Opcode::BatchForget => {
            let count = a.u32()?;
            a.u32()?;
            // The count cannot claim more entries than the request holds.
            if count as usize > a.0.len() / FORGET_ONE_LEN {
                return None;
            }
            let mut v = Vec::with_capacity(count as usize);
            for _ in 0..count {
                v.push((a.u64()?, a.u64()?));
            }
            Op::BatchForget(v)
        }
        Opcode::Fallocate => {
            let (fh, offset, length, mode) = (a.u64()?, a.u64()?, a.u64()?, a.u32()?);
            Op::Fallocate { fh, offset, length, mode }
        }
        Opcode::Lseek => {
            let (fh, offset, whence) = (a.u64()?, a.u64()?, a.u32()?);
            Op::Lseek { fh, offset, whence }
        }
        Opcode::SetXattr | Opcode::GetXattr | Opcode::ListXattr | Opcode::RemoveXattr => Op::Xattr,
        Opcode::SyncFs => Op::SyncFs,
    })
}

/// Little-endian output.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// The attributes the guest sees of an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (u64, u32),
    pub mtime: (u64, u32),
    pub ctime: (u64, u32),
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

impl Attr {
    pub fn encode(&self, o: &mut Out) {
        o.u64(self.ino).u64(self.size).u64(self.blocks);
        o.u64(self.atime.0).u64(self.mtime.0).u64(self.ctime.0);
        o.u32(self.atime.1).u32(self.mtime.1).u32(self.ctime.1);
        o.u32(self.mode).u32(self.nlink).u32(self.uid).u32(self.gid);
        o.u32(0).u32(self.blksize).u32(0); // rdev, blksize, flags
    }
}

/// fuse_entry_out.
pub fn entry_out(o: &mut Out, nodeid: u64, attr: &Attr, valid_secs: u64) {
    o.u64(nodeid).u64(0).u64(valid_secs).u64(valid_secs).u32(0).u32(0);
    attr.encode(o);
}

/// fuse_attr_out.
pub fn attr_out(o: &mut Out, attr: &Attr, valid_secs: u64) {
    o.u64(valid_secs).u32(0).u32(0);
    attr.encode(o);
}

/// What the server answers to INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    /// Timestamp granularity, nanoseconds.
    pub time_gran: u32,
    pub max_pages: u16,
}

impl InitOut {
    /// fuse_init_out ([`INIT_OUT_LEN`] bytes).
    pub fn encode(&self, o: &mut Out) {
        o.u32(self.major).u32(self.minor).u32(self.max_readahead).u32(self.flags);
        o.u16(self.max_background).u16(self.congestion_threshold);
        o.u32(self.max_write).u32(self.time_gran);
        o.u16(self.max_pages).u16(0); // map_alignment
        o.zeros(32); // flags2 and unused (later versions)
    }
}

/// Figures of the shared folder's filesystem, as STATFS answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// fuse_statfs_out (a fuse_kstatfs).
pub fn statfs_out(o: &mut Out, st: &StatFs) {
    o.u64(st.blocks).u64(st.bfree).u64(st.bavail).u64(st.files).u64(st.ffree);
    o.u32(st.bsize).u32(st.namelen).u32(st.frsize).u32(0); // padding
    o.zeros(24); // spare
}

/// fuse_write_out: the bytes written.
pub fn write_out(o: &mut Out, size: u32) {
    o.u32(size).u32(0); // padding
}

/// FOPEN_DIRECT_IO: the guest's kernel sends this handle's reads and
/// writes straight from the caller's buffers, bypassing its page cache.
pub const FOPEN_DIRECT_IO: u32 = 1;

/// fuse_open_out.
pub fn open_out(o: &mut Out, fh: u64, open_flags: u32) {
    o.u64(fh).u32(open_flags).u32(0);
}

/// `len` rounded up to a whole number of [`DIRENT_ALIGN`]s.
const fn align_dirent(len: usize) -> usize {
    len.div_ceil(DIRENT_ALIGN) * DIRENT_ALIGN
}

/// Space one directory entry takes (fuse_dirent, name padded to 8).
pub fn dirent_len(name_len: usize, plus: bool) -> usize {
    let padded = align_dirent(DIRENT_LEN + name_len);
    if plus {
        ENTRY_OUT_LEN + padded
    } else {
        padded
    }
}

/// fuse_dirent: the guest's d_type is the mode's type bits >> 12.
pub fn dirent(o: &mut Out, ino: u64, next_offset: u64, name: &[u8], mode: u32) {
    let start = o.0.len();
    o.u64(ino).u64(next_offset).u32(name.len() as u32).u32((mode & libc::S_IFMT) >> DIRENT_TYPE_SHIFT);
    o.bytes(name);
    let len = o.0.len() - start;
    o.zeros(align_dirent(len) - len);
}

/// A reply: header (with `error` as a negative errno) and body.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut o = Out(Vec::with_capacity(OUT_HEADER_LEN + body.len()));
    o.u32((OUT_HEADER_LEN + body.len()) as u32).u32(error as u32).u64(unique);
    o.bytes(body);
    o.0
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A request as the guest's kernel lays it out.
    /// `opcode` is a number, so that tests may send unknown ones too
    /// (`Opcode::X as u32` for known ones).
    pub fn request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let mut o = Out::default();
        o.u32((IN_HEADER_LEN + args.len()) as u32).u32(opcode).u64(unique).u64(nodeid);
        o.u32(1000).u32(1000).u32(42).u32(0);
        o.bytes(args);
        o.0
    }

    #[test]
    fn requests_parse_into_typed_ops() {
        let r = request(Opcode::Lookup as u32, 7, ROOT_ID, b"src\0");
        let (h, op) = parse(&r).unwrap();
        assert_eq!((h.unique, h.nodeid, h.opcode), (7, ROOT_ID, Opcode::Lookup as u32));
        assert_eq!(op, Op::Lookup { name: OsStr::new("src") });
        let mut args = Out::default();
        args.u64(3).u64(4096).u32(5).u32(0).u64(0).u32(0).u32(0).bytes(b"hello");
        let r = request(Opcode::Write as u32, 8, 9, &args.0);
        assert_eq!(parse(&r).unwrap().1, Op::Write { fh: 3, offset: 4096, data: b"hello" });
        let mut args = Out::default();
        args.u64(5).bytes(b"a\0b\0");
        assert_eq!(
            parse(&request(Opcode::Rename as u32, 9, ROOT_ID, &args.0)).unwrap().1,
            Op::Rename { new_dir: 5, old: OsStr::new("a"), new: OsStr::new("b"), flags: 0 }
        );
    }

    #[test]
    fn malformed_requests_are_refused_not_trusted() {
        // Too short for a header, or a header whose length lies.
        assert_eq!(parse(&[0u8; 10]), Err(ParseError::BadHeader));
        let mut r = request(Opcode::Lookup as u32, 1, ROOT_ID, b"x\0");
        r[0] = 200;
        assert_eq!(parse(&r), Err(ParseError::BadHeader));
        // Names without NUL, empty names, writes claiming more data than
        // sent, batch forgets claiming more entries than sent.
        for (op, args) in
            [(Opcode::Lookup, b"noterm".to_vec()), (Opcode::Lookup, b"\0".to_vec()), (Opcode::Symlink, b"a\0".to_vec())]
        {
            assert!(matches!(parse(&request(op as u32, 1, ROOT_ID, &args)), Err(ParseError::BadArgs(_))), "{op:?}");
        }
        let mut args = Out::default();
        args.u64(3).u64(0).u32(1 << 30).u32(0).u64(0).u32(0).u32(0).bytes(b"short");
        assert!(matches!(parse(&request(Opcode::Write as u32, 1, ROOT_ID, &args.0)), Err(ParseError::BadArgs(_))));
        let mut args = Out::default();
        args.u32(u32::MAX).u32(0).u64(1).u64(1);
        assert!(matches!(
            parse(&request(Opcode::BatchForget as u32, 1, ROOT_ID, &args.0)),
            Err(ParseError::BadArgs(_))
        ));
        // Random bytes: a request is taken only with a header that tells
        // its true length, and then holds what its bytes say (names and
        // data inside the request, names non-empty without NUL, unknown
        // opcodes as Unknown). (The fuzz target `fuse_parse` does more.)
        let mut x: u32 = 12345;
        for len in 0..400 {
            let mut r: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if len >= IN_HEADER_LEN && !x.is_multiple_of(8) {
                // A true length, and every opcode up to SYNCFS and past it.
                r[0..4].copy_from_slice(&(len as u32).to_le_bytes());
                r[4..8].copy_from_slice(&(x % (Opcode::SyncFs as u32 + 2)).to_le_bytes());
            }
            let sound = len >= IN_HEADER_LEN && r[0..4] == (len as u32).to_le_bytes();
            let inside = |b: &[u8]| {
                let (p, start) = (b.as_ptr() as usize, r.as_ptr() as usize + IN_HEADER_LEN);
                p >= start && p + b.len() <= r.as_ptr() as usize + r.len()
            };
            let name_ok = |n: &OsStr| !n.is_empty() && !n.as_bytes().contains(&0) && inside(n.as_bytes());
            match parse(&r) {
                Err(ParseError::BadHeader) => assert!(!sound, "{r:?}"),
                Err(ParseError::BadArgs(h)) => {
                    assert!(sound && Opcode::from_u32(h.opcode).is_some());
                    assert_eq!((h.len as usize, h.unique), (len, u64::from_le_bytes(r[8..16].try_into().unwrap())));
                }
                Ok((h, op)) => {
                    assert!(sound);
                    assert_eq!(h.opcode, u32::from_le_bytes(r[4..8].try_into().unwrap()));
                    assert_eq!(h.nodeid, u64::from_le_bytes(r[16..24].try_into().unwrap()));
                    match op {
                        Op::Unknown(n) => assert!(n == h.opcode && Opcode::from_u32(n).is_none()),
                        Op::Lookup { name } | Op::MkDir { name, .. } | Op::Create { name, .. } => {
                            assert!(name_ok(name))
                        }
                        Op::Symlink { name, target } => assert!(name_ok(name) && name_ok(target)),
                        Op::Rename { old, new, .. } => assert!(name_ok(old) && name_ok(new)),
                        Op::Write { data, .. } => assert!(inside(data)),
                        _ => assert!(Opcode::from_u32(h.opcode).is_some()),
                    }
                }
            }
        }
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes() {
        let mut o = Out::default();
        dirent(&mut o, 5, 1, b"abc", libc::S_IFREG);
        assert_eq!(o.0.len(), dirent_len(3, false));
        assert_eq!(o.0.len() % 8, 0);
        let type_at = DIRENT_LEN - 4;
        assert_eq!(u32::from_le_bytes(o.0[type_at..DIRENT_LEN].try_into().unwrap()), libc::DT_REG as u32);
        let mut o = Out::default();
        entry_out(&mut o, 2, &Attr::default(), 1);
        assert_eq!(o.0.len(), ENTRY_OUT_LEN);
        let mut o = Out::default();
        open_out(&mut o, 1, FOPEN_DIRECT_IO);
        assert_eq!(o.0.len(), OPEN_OUT_LEN);
        let mut o = Out::default();
        attr_out(&mut o, &Attr::default(), 1);
        assert_eq!(o.0.len(), ATTR_OUT_LEN);
        let mut o = Out::default();
        let init = InitOut {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR,
            max_readahead: 0,
            flags: 0,
            max_background: 0,
            congestion_threshold: 0,
            max_write: 0,
            time_gran: 0,
            max_pages: 0,
        };
        init.encode(&mut o);
        assert_eq!(o.0.len(), INIT_OUT_LEN);
        let mut o = Out::default();
        statfs_out(&mut o, &StatFs::default());
        assert_eq!(o.0.len(), 80, "fuse_kstatfs");
        assert_eq!(MIN_DIRENT_LEN, dirent_len(1, false));
    }

    #[test]
    fn flags_and_bits_become_typed_values() {
        // SETATTR: only what `valid` names is there; a time is now or given.
        let mut args = Out::default();
        args.u32(FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_ATIME_NOW | FATTR_MTIME).u32(0);
        args.u64(9).u64(100).u64(0); // fh (not meant: no FATTR_FH), size, lock_owner
        args.u64(1).u64(2).u64(3).u32(4).u32(5).u32(6); // times
        args.u32(0o644).u32(0).u32(1000).u32(1000).u32(0); // mode, unused, uid, gid, unused
        let want = SetAttr {
            mode: Some(0o644),
            size: Some(100),
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::At(2, 5)),
            ..SetAttr::default()
        };
        assert_eq!(parse(&request(Opcode::SetAttr as u32, 1, ROOT_ID, &args.0)).unwrap().1, Op::SetAttr(want));
        // OPEN and CREATE: the access mode; ACCESS: whether writing is asked.
        for (flags, access) in [
            (libc::O_RDONLY | libc::O_NOFOLLOW, OpenAccess::ReadOnly),
            (libc::O_WRONLY | libc::O_TRUNC, OpenAccess::WriteOnly),
            (libc::O_RDWR, OpenAccess::ReadWrite),
            (libc::O_ACCMODE, OpenAccess::ReadWrite),
        ] {
            let mut args = Out::default();
            args.u32(flags as u32).u32(0);
            assert_eq!(parse(&request(Opcode::Open as u32, 1, ROOT_ID, &args.0)).unwrap().1, Op::Open { access });
        }
        for (mask, write) in [(libc::R_OK | libc::X_OK, false), (libc::W_OK, true)] {
            let mut args = Out::default();
            args.u32(mask as u32).u32(0);
            assert_eq!(parse(&request(Opcode::Access as u32, 1, ROOT_ID, &args.0)).unwrap().1, Op::Access { write });
        }
    }

    #[test]
    fn opcodes_are_the_kernels_numbers() {
        for n in 0..100u32 {
            if let Some(op) = Opcode::from_u32(n) {
                assert_eq!(u32::from(op), n);
            }
        }
        assert_eq!((Opcode::Lookup as u32, Opcode::Init as u32, Opcode::SyncFs as u32), (1, 26, 50));
        assert_eq!(Opcode::from_u32(7), None, "no opcode 7 (SYMLINK is 6, MKNOD 8)");
    }
}
