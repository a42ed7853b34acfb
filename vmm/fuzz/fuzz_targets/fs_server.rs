//! Host side: fuzzes the whole file server (`vmm::fs::server::FileServer`)
//! with sequences of FUSE requests from a hostile guest kernel, on a fresh
//! host tree for each input: a shared folder (sources, hidden secrets, a
//! host `.git` with a token in its config, read-only files, a file the
//! host also links outside, links that point out) beside files outside it
//! and the sandbox's git shadow. Requests are built from the fuzzer's bytes
//! with the node ids and handles the server handed out, names and link
//! targets that matter, and raw bytes too. After every request:
//!
//! - the reply is well formed: no reply exactly when none is due (FORGET,
//!   BATCH_FORGET, INTERRUPT, a header that cannot be answered); otherwise
//!   its length field is its length, it fits the room the guest gave,
//!   the request's `unique` is echoed, the error is 0 or a negative errno
//!   with no body, and a successful body has its operation's shape
//!   (directory entries parsed and checked: no hidden names, no `/`);
//! - every change to the folder is named by an audit event of that request
//!   (the path changed, or a directory above it), but for later writes
//!   through a handle whose first write was logged; nothing changes on a
//!   read-only share, nor once the audit log has failed;
//! - the server's own accounting of paths and listings is right.
//!
//! And at the end: nothing outside the folder changed (but the shadow),
//! the hidden files are all still there and unchanged, the read-only ones
//! and `.git/hooks` too, no directory holds both `HEAD` and a git config
//! (a bare repository), no `.git` was made in the folder, and no reply
//! carried a secret (the hidden files', the outside file's, the token in
//! `.git/config`) unless the guest had sent it first.
#![no_main]
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmm::fs::fuse::{self, Op, Opcode, ParseError};
use vmm::fs::policy::{Access, FsPolicy};
use vmm::fs::quota::Quota;
use vmm::fs::server::FileServer;
use vmm::fs::share::Share;
use vmm_fuzz::Input;

const SECRET_ENV: &str = "TOKEN=SECRET-ENV-91c2f0d7";
const SECRET_PEM: &str = "SECRET-PEM-55d0aa19";
const SECRET_OUT: &str = "SECRET-OUTSIDE-7f3a6b21";
const SECRET_TOKEN: &str = "SECRET-TOKEN-c4e1d9e0";
const SECRETS: [&str; 4] = ["SECRET-ENV-91c2f0d7", SECRET_PEM, SECRET_OUT, SECRET_TOKEN];
/// Most requests in one input.
const MAX_REQUESTS: usize = 32;
/// Most ids remembered for the fuzzer to pick from.
const MAX_IDS: usize = 64;

/// Names the guest may send, beside raw ones.
const NAMES: &[&str] = &[
    "src",
    "main.rs",
    "lib",
    "mod.rs",
    ".env",
    "key.pem",
    ".envrc",
    ".git",
    "config",
    "HEAD",
    "hooks",
    "objects",
    "refs",
    "hardlinked",
    "abs-link",
    "rel-link",
    "dir-link",
    "sub",
    "docs",
    "readme.md",
    "new",
    "x",
    ".",
    "..",
    "a/b",
    "pre-commit",
    "index",
    ".GIT",
    "Config",
    "commondir",
    "rebase-merge",
    "id_rsa",
    ".ssh",
    "packed-refs",
    "outside",
    "y",
    "HEAD.lock",
    "config.worktree",
    "info",
    "alternates",
];
/// Link targets the guest may ask for, beside raw ones.
const TARGETS: &[&str] = &[
    "src/main.rs",
    "../outside",
    "/etc/passwd",
    "main.rs",
    "..",
    ".git/config",
    "../work/src",
    "sub/../../outside",
    "x",
    ".env",
    "hooks/pre-commit",
    "../../../../../../etc",
    "../shadow",
    "abs-link",
    "rel-link",
    ".git/hooks",
    "new/../..",
    "y",
    ".",
    "../src/main.rs",
];
/// Opcodes to pick from: every known one, and some unknown.
const OPCODES: &[u32] = &[
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 34, 35, 36,
    38, 42, 43, 44, 45, 46, 50, 0, 7, 39, 51, 4096,
];

/// One path of a tree, as the checks compare it (times aside).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: char,
    mode: u32,
    /// Size and a digest of the first 64 KiB, for files.
    size: u64,
    digest: u64,
    /// Link count, for files (a directory's changes with its children).
    nlink: u64,
    uid: u32,
    target: Option<OsString>,
    /// For the outside tree only: change time (ns).
    ctime: i64,
}

fn digest(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::io::Read;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(64 * 1024).read_to_end(&mut buf);
    }
    buf.hash(&mut h);
    h.finish()
}

/// Every path below `root` (not following links), but the names in `skip`
/// at the top.
fn walk(root: &Path, skip: &[&str], with_ctime: bool) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let Ok(md) = std::fs::symlink_metadata(&path) else { continue };
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else {
            'o'
        };
        let file = kind == 'f';
        out.insert(
            rel.clone(),
            Meta {
                kind,
                mode: md.permissions().mode() & 0o7777,
                size: if file { md.len() } else { 0 },
                digest: if file { digest(&path) } else { 0 },
                nlink: if file { md.nlink() } else { 0 },
                uid: md.uid(),
                target: if kind == 'l' { std::fs::read_link(&path).ok().map(PathBuf::into_os_string) } else { None },
                ctime: if with_ctime { md.ctime() * 1_000_000_000 + md.ctime_nsec() } else { 0 },
            },
        );
        if kind == 'd' && out.len() < 10_000 {
            if let Ok(rd) = std::fs::read_dir(&path) {
                for e in rd.flatten() {
                    let name = e.file_name();
                    if rel.as_os_str().is_empty() && skip.iter().any(|s| name == *s) {
                        continue;
                    }
                    todo.push(rel.join(name));
                }
            }
        }
    }
    out
}

/// A host tree: `base/work` is shared; `base/shadow` holds the guest's git
/// directories; the rest of `base` is outside.
struct Tree {
    _dir: tempfile::TempDir,
    base: PathBuf,
    work: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::Builder::new().prefix("sbx-fuzz-fs").tempdir_in(vmm_fuzz::scratch()).unwrap();
        let base = dir.path().to_path_buf();
        let w = base.join("work");
        let mk = |p: &Path| std::fs::create_dir_all(p).unwrap();
        let put = |p: &Path, s: &str| std::fs::write(p, s).unwrap();
        mk(&w.join("src/lib"));
        mk(&w.join(".git/hooks"));
        mk(&w.join(".git/objects"));
        mk(&w.join(".git/refs/heads"));
        mk(&w.join("sub"));
        mk(&w.join("docs"));
        mk(&base.join("outside_dir"));
        mk(&base.join("shadow"));
        put(&w.join("src/main.rs"), "fn main() {}\n");
        put(&w.join("src/lib/mod.rs"), "pub mod x;\n");
        put(&w.join(".env"), SECRET_ENV);
        put(&w.join("sub/.env"), SECRET_ENV);
        put(&w.join("key.pem"), SECRET_PEM);
        put(&w.join(".envrc"), "export X=1\n");
        put(
            &w.join(".git/config"),
            &format!("[remote \"origin\"]\n\turl = https://user:{SECRET_TOKEN}@example.com/r\n"),
        );
        put(&w.join(".git/HEAD"), "ref: refs/heads/main\n");
        put(&w.join("docs/readme.md"), "# docs\n");
        put(&w.join("hardlinked"), "linked twice on the host\n");
        std::fs::hard_link(w.join("hardlinked"), base.join("hard_outside")).unwrap();
        put(&base.join("outside"), SECRET_OUT);
        put(&base.join("outside_dir/f"), SECRET_OUT);
        std::os::unix::fs::symlink(base.join("outside"), w.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../outside", w.join("rel-link")).unwrap();
        std::os::unix::fs::symlink("../outside_dir", w.join("dir-link")).unwrap();
        Tree { _dir: dir, base, work: w }
    }

    fn outside(&self) -> BTreeMap<PathBuf, Meta> {
        let mut m = walk(&self.base, &["work", "shadow"], true);
        // The base directory itself: what the walk saw of it, without the
        // times its children's changes move.
        if let Some(root) = m.get_mut(Path::new("")) {
            root.ctime = 0;
        }
        m
    }

    fn inside(&self) -> BTreeMap<PathBuf, Meta> {
        walk(&self.work, &[], false)
    }
}

/// The guest's side: request building from the fuzzer's bytes, and what
/// the server handed out.
struct Guest<'a> {
    input: Input<'a>,
    nodes: Vec<u64>,
    handles: Vec<u64>,
    unique: u64,
}

impl Guest<'_> {
    fn pick(&mut self, list: &[u64]) -> u64 {
        let b = self.input.u8();
        match b {
            0xff => self.input.u64(),
            0xfe => 0,
            _ => list.get(usize::from(b) % list.len().max(1)).copied().unwrap_or(fuse::ROOT_ID),
        }
    }
    fn node(&mut self) -> u64 {
        let nodes = self.nodes.clone();
        self.pick(&nodes)
    }
    fn fh(&mut self) -> u64 {
        let handles = self.handles.clone();
        self.pick(&handles)
    }
    fn one_of(&mut self, list: &[&str], out: &mut Vec<u8>) {
        let b = self.input.u8();
        if usize::from(b) < list.len() {
            out.extend_from_slice(list[usize::from(b)].as_bytes());
        } else {
            let n = usize::from(b - list.len() as u8) % 64;
            out.extend_from_slice(self.input.bytes(n));
        }
        out.push(0);
    }
    fn name(&mut self, out: &mut Vec<u8>) {
        self.one_of(NAMES, out)
    }
    fn small(&mut self) -> u64 {
        match self.input.u8() {
            b @ 0..=0xef => u64::from(b) * 13,
            b @ 0xf0..=0xfd => 1 << (u64::from(b & 0xf) * 4),
            _ => self.input.u64(),
        }
    }
    fn flags(&mut self) -> u32 {
        match self.input.u8() % 5 {
            0 => libc::O_RDONLY as u32,
            1 => libc::O_WRONLY as u32,
            2 => libc::O_RDWR as u32,
            3 => (libc::O_WRONLY | libc::O_TRUNC | libc::O_APPEND) as u32,
            _ => self.input.u32(),
        }
    }
    fn mode(&mut self) -> u32 {
        match self.input.u8() % 6 {
            0 => 0o644,
            1 => 0o755,
            2 => 0o777,
            3 => 0o4755,
            4 => 0,
            _ => self.input.u32(),
        }
    }

    /// The arguments of `opcode`, laid out as the kernel does.
    fn args(&mut self, opcode: u32) -> Vec<u8> {
        let mut a = Vec::new();
        let u32s = |a: &mut Vec<u8>, v: &[u32]| v.iter().for_each(|x| a.extend_from_slice(&x.to_le_bytes()));
        let u64s = |a: &mut Vec<u8>, v: &[u64]| v.iter().for_each(|x| a.extend_from_slice(&x.to_le_bytes()));
        match Opcode::from_u32(opcode) {
            Some(Opcode::Init) => {
                let major = if self.input.u8() == 0xff { self.input.u32() } else { fuse::KERNEL_VERSION };
                let (minor, ra, flags) = (self.input.u8().into(), self.input.u32(), self.input.u32());
                u32s(&mut a, &[major, minor, ra, flags]);
                a.resize(64, 0);
            }
            Some(Opcode::Lookup | Opcode::Unlink | Opcode::RmDir) => self.name(&mut a),
            Some(Opcode::Forget) => {
                let n = self.small();
                u64s(&mut a, &[n]);
            }
            Some(Opcode::BatchForget) => {
                let count = self.input.u8() % 5;
                u32s(&mut a, &[count.into(), 0]);
                for _ in 0..count {
                    let (node, n) = (self.node(), self.small());
                    u64s(&mut a, &[node, n]);
                }
            }
            Some(Opcode::GetAttr) => {
                let flags = self.input.u8().into();
                let fh = self.fh();
                u32s(&mut a, &[flags, 0]);
                u64s(&mut a, &[fh]);
            }
            Some(Opcode::SetAttr) => {
                let valid = match self.input.u8() {
                    0xff => self.input.u32(),
                    b => u32::from(b) | u32::from(self.input.u8() & 1) << 8,
                };
                let (fh, size) = (self.fh(), self.small());
                let (atime, mtime) = (self.small(), self.small());
                let mode = self.mode();
                let (uid, gid) =
                    if self.input.u8() == 0xff { (self.input.u32(), self.input.u32()) } else { (1000, 1000) };
                u32s(&mut a, &[valid, 0]);
                u64s(&mut a, &[fh, size, 0, atime, mtime, 0]);
                u32s(&mut a, &[self.input.u32(), 0, 0, mode, 0, uid, gid, 0]);
            }
            Some(Opcode::Symlink) => {
                self.name(&mut a);
                self.one_of(TARGETS, &mut a);
            }
            Some(Opcode::MkNod) => {
                let mode = [libc::S_IFREG | 0o644, libc::S_IFIFO | 0o644, libc::S_IFCHR | 0o666]
                    [usize::from(self.input.u8() % 3)];
                u32s(&mut a, &[mode, 0, 0o022, 0]);
                self.name(&mut a);
            }
            Some(Opcode::MkDir) => {
                let mode = self.mode();
                u32s(&mut a, &[mode, 0o022]);
                self.name(&mut a);
            }
            Some(Opcode::Rename) => {
                let to = self.node();
                u64s(&mut a, &[to]);
                self.name(&mut a);
                self.name(&mut a);
            }
            Some(Opcode::Rename2) => {
                let to = self.node();
                let flags = [0, 1, 2, 4][usize::from(self.input.u8() % 4)];
                u64s(&mut a, &[to]);
                u32s(&mut a, &[flags, 0]);
                self.name(&mut a);
                self.name(&mut a);
            }
            Some(Opcode::Link) => {
                let old = self.node();
                u64s(&mut a, &[old]);
                self.name(&mut a);
            }
            Some(Opcode::Open | Opcode::OpenDir) => {
                let flags = self.flags();
                u32s(&mut a, &[flags, 0]);
            }
            Some(Opcode::Read | Opcode::ReadDir | Opcode::ReadDirPlus) => {
                let (fh, offset) = (self.fh(), self.small());
                let size = [0, 1, 24, 100, 4096, 65536, 1 << 20, u32::MAX][usize::from(self.input.u8() % 8)];
                u64s(&mut a, &[fh, offset]);
                u32s(&mut a, &[size, 0]);
                u64s(&mut a, &[0]);
                u32s(&mut a, &[0, 0]);
            }
            Some(Opcode::Write) => {
                let (fh, offset) = (self.fh(), self.small());
                let n = usize::from(self.input.u8());
                let data = self.input.bytes(n);
                let size = if self.input.u8() == 0xff { self.input.u32() } else { data.len() as u32 };
                u64s(&mut a, &[fh, offset]);
                u32s(&mut a, &[size, 0]);
                u64s(&mut a, &[0]);
                u32s(&mut a, &[0, 0]);
                a.extend_from_slice(data);
            }
            Some(Opcode::Release | Opcode::ReleaseDir | Opcode::Fsync | Opcode::FsyncDir | Opcode::Flush) => {
                let fh = self.fh();
                u64s(&mut a, &[fh]);
                u32s(&mut a, &[0, 0]);
                u64s(&mut a, &[0]);
            }
            Some(Opcode::Access) => {
                let mask = self.input.u8() & 7;
                u32s(&mut a, &[mask.into(), 0]);
            }
            Some(Opcode::Create) => {
                let (flags, mode) = (self.flags(), self.mode());
                u32s(&mut a, &[flags, mode | libc::S_IFREG, 0o022, 0]);
                self.name(&mut a);
            }
            Some(Opcode::Lseek | Opcode::Fallocate) => {
                let fh = self.fh();
                u64s(&mut a, &[fh, self.small(), self.small()]);
                u32s(&mut a, &[0, 0]);
            }
            _ => {
                let n = usize::from(self.input.u8() % 64);
                a.extend_from_slice(self.input.bytes(n));
            }
        }
        a
    }

    fn remember(list: &mut Vec<u64>, id: u64) {
        if !list.contains(&id) {
            if list.len() >= MAX_IDS {
                list.remove(1);
            }
            list.push(id);
        }
    }
}

/// What a successful reply's body must be for `op`; None: no fixed size.
fn body_len(op: &Op<'_>) -> Option<usize> {
    Some(match op {
        Op::Init { .. } => fuse::INIT_OUT_LEN,
        Op::Lookup { .. } | Op::MkDir { .. } | Op::Symlink { .. } => fuse::ENTRY_OUT_LEN,
        Op::Create { .. } => fuse::ENTRY_OUT_LEN + fuse::OPEN_OUT_LEN,
        Op::GetAttr { .. } | Op::SetAttr(_) => fuse::ATTR_OUT_LEN,
        Op::Open { .. } | Op::OpenDir => fuse::OPEN_OUT_LEN,
        Op::Write { .. } => 8,
        Op::StatFs => 80,
        Op::Read { .. } | Op::ReadDir { .. } | Op::ReadLink => return None,
        _ => 0,
    })
}

/// The default policy (made once: the harness's own work costs the
/// fuzzer's time).
fn policy() -> &'static FsPolicy {
    static P: std::sync::OnceLock<FsPolicy> = std::sync::OnceLock::new();
    P.get_or_init(FsPolicy::default)
}

fn hidden_name(name: &[u8], is_dir: bool) -> bool {
    let name = Path::new(std::ffi::OsStr::from_bytes(name));
    policy().access(name, is_dir) == Access::Hidden
}

/// Checks a READDIR(PLUS) body; returns the node ids it handed out.
fn check_dirents(body: &[u8], plus: bool, size: u32) -> Vec<u64> {
    assert!(body.len() <= size as usize, "a listing over the size asked");
    let mut nodes = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let d = if plus { i + fuse::ENTRY_OUT_LEN } else { i };
        assert!(d + fuse::DIRENT_LEN <= body.len(), "a truncated dirent");
        if plus {
            nodes.push(u64::from_le_bytes(body[i..i + 8].try_into().unwrap()));
        }
        let namelen = u32::from_le_bytes(body[d + 16..d + 20].try_into().unwrap()) as usize;
        let kind = u32::from_le_bytes(body[d + 20..d + 24].try_into().unwrap());
        assert!(namelen > 0 && namelen <= 255, "dirent name length {namelen}");
        let next = d + fuse::dirent_len(namelen, false);
        assert!(next <= body.len(), "a dirent past the body");
        let name = &body[d + fuse::DIRENT_LEN..d + fuse::DIRENT_LEN + namelen];
        assert!(!name.contains(&b'/') && !name.contains(&0) && name != b"." && name != b"..", "name {name:?}");
        assert!(!hidden_name(name, kind == libc::DT_DIR as u32), "a hidden name listed: {name:?}");
        i = next;
    }
    nodes
}

/// The paths an audit event names, relative to the folder.
fn event_paths(events: &[Value], work: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in events {
        if e.get("decision").and_then(Value::as_str) != Some("allow") {
            continue;
        }
        for key in ["path", "to"] {
            if let Some(p) = e.get(key).and_then(Value::as_str) {
                if let Ok(rel) = Path::new(p).strip_prefix(work) {
                    out.push(rel.to_path_buf());
                }
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let tree = Tree::new();
    let mut guest = Guest { input: Input(data), nodes: vec![fuse::ROOT_ID], handles: Vec::new(), unique: 0 };
    let setup = guest.input.u8();
    let read_only = setup & 1 != 0;
    let log: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = log.clone();
    let share =
        Share::open(&tree.work, FsPolicy::default(), read_only).unwrap().with_git_shadow(tree.base.join("shadow"));
    let failed = Arc::new(AtomicBool::new(false));
    // Half the inputs run under a workspace quota (small enough to be hit),
    // so that check_accounting checks its count against the tree too.
    let quota = (setup & 2 != 0).then(|| Arc::new(Quota::new(64 * 1024 + u64::from(setup >> 2) * 4096)));
    let mut server = FileServer::new(share, tree.work.clone(), Box::new(move |e| sink.lock().unwrap().push(serde_json::to_value(&e).unwrap_or_default())))
        .fail_closed_on(failed.clone())
        .with_quota(quota);

    // SBX_FUZZ_TRACE=1: each request, its answer and its audit events.
    let trace = std::env::var_os("SBX_FUZZ_TRACE").is_some();
    let outside = tree.outside();
    let start = tree.inside();
    let mut before = start.clone();
    let mut sent = Vec::new();
    let mut replies = Vec::new();
    for _ in 0..MAX_REQUESTS {
        if guest.input.is_empty() {
            break;
        }
        let pick = guest.input.u8();
        if pick == 0xff {
            // The audit log fails from now on.
            failed.store(true, Ordering::SeqCst);
            continue;
        }
        let opcode = OPCODES[usize::from(pick) % OPCODES.len()];
        let node = guest.node();
        let room = match guest.input.u8() {
            r @ 0..=0x1f => usize::from(r),
            r @ 0x20..=0x3f => usize::from(r) * 8,
            0x40..=0x7f => 4096,
            _ => 2 << 20,
        };
        let mut args = guest.args(opcode);
        let mangle = guest.input.u8();
        if mangle >= 0xf8 {
            // Cut short, or with bytes to spare.
            let keep = usize::from(mangle & 7) * args.len() / 8;
            args.truncate(keep);
        }
        guest.unique += 1;
        let unique = guest.unique | u64::from(pick) << 56;
        let mut req = Vec::with_capacity(fuse::IN_HEADER_LEN + args.len());
        let len = if mangle == 0xf7 { guest.input.u32() } else { (fuse::IN_HEADER_LEN + args.len()) as u32 };
        for v in [len, opcode] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        req.extend_from_slice(&unique.to_le_bytes());
        req.extend_from_slice(&node.to_le_bytes());
        for v in [1000u32, 1000, 42, 0] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        req.extend_from_slice(&args);
        let parsed = fuse::parse(&req);

        let logged = log.lock().unwrap().len();
        let reply = server.handle(&req, room);
        let events: Vec<Value> = log.lock().unwrap()[logged..].to_vec();

        if trace {
            let error = reply.as_ref().map(|r| i32::from_le_bytes(r[4..8].try_into().unwrap()));
            eprintln!("node {node} room {room}: {parsed:?} -> {error:?}, events {events:?}");
        }
        // The reply.
        let expected = match &parsed {
            Err(ParseError::BadHeader) => false,
            Ok((_, op)) if op.no_reply() => false,
            _ => room >= fuse::OUT_HEADER_LEN,
        };
        match (&reply, expected) {
            (None, false) => {}
            (None, true) => panic!("no reply to {parsed:?} with room {room}"),
            (Some(_), false) => panic!("a reply to {parsed:?} with room {room}"),
            (Some(r), true) => {
                assert!(r.len() >= fuse::OUT_HEADER_LEN && r.len() <= room, "reply of {} in room {room}", r.len());
                assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize, r.len(), "length field");
                assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), unique, "unique echoed");
                let error = i32::from_le_bytes(r[4..8].try_into().unwrap());
                assert!((-4095..=0).contains(&error), "error {error}");
                let body = &r[fuse::OUT_HEADER_LEN..];
                if error != 0 {
                    assert!(body.is_empty(), "an error with a body");
                } else if let Ok((_, op)) = &parsed {
                    if let Some(n) = body_len(op) {
                        assert_eq!(body.len(), n, "body of {op:?}");
                    }
                    match op {
                        Op::Lookup { .. } | Op::MkDir { .. } | Op::Symlink { .. } | Op::Create { .. } => {
                            let id = u64::from_le_bytes(body[0..8].try_into().unwrap());
                            Guest::remember(&mut guest.nodes, id);
                        }
                        _ => {}
                    }
                    match op {
                        Op::Open { .. } | Op::OpenDir => {
                            Guest::remember(&mut guest.handles, u64::from_le_bytes(body[0..8].try_into().unwrap()))
                        }
                        Op::Create { .. } => {
                            let fh = &body[fuse::ENTRY_OUT_LEN..fuse::ENTRY_OUT_LEN + 8];
                            Guest::remember(&mut guest.handles, u64::from_le_bytes(fh.try_into().unwrap()))
                        }
                        Op::Read { size, .. } => assert!(body.len() <= *size as usize, "a read over its size"),
                        Op::ReadDir { size, plus, .. } => {
                            for id in check_dirents(body, *plus, *size) {
                                Guest::remember(&mut guest.nodes, id);
                            }
                        }
                        Op::ReadLink => assert!(!body.is_empty() && body.len() <= 4095 && !body.contains(&0)),
                        Op::Write { data, .. } => {
                            assert_eq!(u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize, data.len())
                        }
                        _ => {}
                    }
                }
            }
        }
        server.check_accounting().unwrap_or_else(|e| panic!("after {parsed:?}: {e}"));

        // Every change is logged.
        let after = tree.inside();
        if after != before {
            let changed: Vec<&PathBuf> =
                before.keys().chain(after.keys()).filter(|p| before.get(*p) != after.get(*p)).collect();
            assert!(!read_only, "a read-only share changed: {changed:?}");
            assert!(!failed.load(Ordering::SeqCst), "a change after the audit log failed: {changed:?} by {parsed:?}");
            if matches!(parsed, Ok((_, Op::Write { .. }))) {
                // A write changes one file's bytes (logged at its handle's
                // first write), nothing else.
                for p in &changed {
                    let (Some(b), Some(a)) = (before.get(*p), after.get(*p)) else {
                        panic!("a write made or removed {p:?}")
                    };
                    assert!(
                        b.kind == 'f' && a.kind == 'f' && (b.mode, b.uid) == (a.mode, a.uid),
                        "a write changed {p:?}"
                    );
                }
            } else {
                let named = event_paths(&events, &tree.work);
                for p in &changed {
                    assert!(named.iter().any(|n| p.starts_with(n)), "{p:?} changed unlogged by {parsed:?}: {events:?}");
                }
            }
        }
        before = after;
        sent.extend_from_slice(&req);
        if let Some(r) = reply {
            replies.push(r);
        }
    }
    drop(server);

    // Nothing outside changed.
    let now = tree.outside();
    if now != outside {
        let diff: Vec<_> = outside.keys().chain(now.keys()).filter(|p| outside.get(*p) != now.get(*p)).collect();
        panic!("outside the folder changed: {diff:?}");
    }
    let end = tree.inside();
    // Hidden files: all there, unchanged (a directory holding one may have
    // moved); read-only files and hooks as they were.
    let hidden = |m: &BTreeMap<PathBuf, Meta>| {
        let mut v: Vec<(u64, u64, u32)> = m
            .iter()
            .filter(|(p, meta)| policy().access(p, meta.kind == 'd') == Access::Hidden)
            .map(|(_, meta)| (meta.digest, meta.size, meta.mode))
            .collect();
        v.sort();
        v
    };
    assert_eq!(hidden(&start), hidden(&end), "hidden files");
    for p in [".env", "key.pem", ".envrc", ".git/config", "hardlinked", ".git/hooks", ".git", ".git/HEAD"] {
        assert_eq!(start.get(Path::new(p)), end.get(Path::new(p)), "{p}");
    }
    let hooks = Path::new(".git/hooks");
    assert!(!end.keys().any(|p| p.starts_with(hooks) && p != hooks), "something made in .git/hooks");
    // No bare repository, no guest-made .git in the folder.
    for (p, meta) in &end {
        if meta.kind != 'd' || p == Path::new(".git") {
            continue;
        }
        let has = |n: &str| {
            std::fs::read_dir(tree.work.join(p))
                .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(n)))
                .unwrap_or(false)
        };
        if has("HEAD") {
            let config = ["config", "commondir", "config.worktree", "hooks"].iter().any(|n| has(n));
            assert!(!config, "{p:?} holds HEAD and a git config");
        }
    }
    for p in end.keys() {
        let git_named = p.iter().any(|n| vmm::fs::policy::is_git_dir_name(&n.to_string_lossy()));
        assert!(!git_named || start.contains_key(p) || p.starts_with(".git"), "{p:?} made in the folder");
    }
    // No secret in a reply unless the guest sent it.
    for s in SECRETS {
        if !contains(&sent, s.as_bytes()) {
            for r in &replies {
                assert!(!contains(r, s.as_bytes()), "secret {s} in a reply");
            }
        }
    }
});
