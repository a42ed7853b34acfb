//! Host side: `sbx cp` — files and directories between the host and a
//! running sandbox, like cp(1):
//!
//! ```text
//! sbx cp [-r] [-f] [-v] NAME:GUEST_PATH HOST_PATH     out of the guest
//! sbx cp [-r] [-L] [-v] HOST_PATH NAME:GUEST_PATH     into the guest
//! ```
//!
//! An argument is the guest's when it is `NAME:PATH` with NAME a sandbox
//! name and does not start with `/` or `.` (write `./a:b` for a host file
//! named `a:b`). A relative guest path is relative to the workspace. As
//! with cp, an existing directory as the destination receives the source
//! under its own name; anything else is the new name. Directories need
//! `-r`.
//!
//! The transport is a session in pipe mode (as `sbx exec -T`), as the
//! `agent` user unless `--user`, running the guest's `tar` with its path
//! as one argument of the list guest-init executes (no shell):
//! `tar -C DIR -c -f - ./NAME` out, `tar -C DIR -x -o [-k] -f -` in.
//!
//! Out of the guest (the guest is hostile and root), the stream is read
//! by sbx's own tar reader ([`tar`]: strict, bounded: `--max-size`,
//! default 1 GiB of data in all; 100 000 entries; names at most 4096
//! bytes, 128 levels; PAX headers at most 64 KiB) and written only below
//! the destination the user named: each name is resolved from a
//! directory descriptor, component by component, never through a
//! symbolic link (one in the way skips that entry); each file is written
//! to a new temporary file (O_EXCL|O_NOFOLLOW) in its directory and
//! renamed into place, never over an existing one unless `--force` (and
//! then the entry is replaced, a link there is not followed); modes are
//! 0644 or 0755 (executable), directories 0755, no set-id bits, no
//! owners. Symbolic and hard links, devices, FIFOs, absolute names, `..`,
//! names that are not UTF-8 are skipped with a warning. Everything
//! printed that the guest named is escaped (`escape`).
//!
//! Into the guest, sbx makes the tar stream itself from the host path:
//! symbolic links inside it are skipped unless `-L`, special files are
//! skipped; each name below the source is opened from its directory's
//! descriptor without following links (a shared folder the guest can
//! change cannot redirect it). Without `--force`, the guest's tar keeps
//! existing files (`-k`).
//!
//! Exit status: 0 all copied; 1 partly (something was skipped, refused
//! or stopped at a limit: said on stderr); 2 bad usage; 125 sbx could not
//! do it (no sandbox, no session, the destination cannot be written).

#[allow(unsafe_code)]
pub mod fs;
pub mod tar;

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::session::{Frame, Open, Reader, MAX_DATA};
use thiserror::Error;

use crate::cli::CpArgs;
use crate::client;
use crate::escape::{self, Layout};
use crate::sandbox::{self, Sandbox};
use tar::{Limits, TarError, TarReader, TarWriter, What};

/// Exit status: something was skipped or stopped (and said).
pub const EXIT_PARTIAL: u8 = 1;
/// Exit status: bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Guest stderr kept for the message when its tar fails.
const MAX_GUEST_STDERR: usize = 4096;
/// Output taken from the guest after the end-of-archive marker (tar pads
/// to its record size) before the session is dropped.
const MAX_TRAILER: usize = 1 << 20;
/// Warnings printed one by one; the rest are counted.
const MAX_WARNINGS_SHOWN: u64 = 100;

#[derive(Debug, Error)]
pub enum CopyError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("Sandbox '{0}' is not running (start it with `sbx run`)")]
    NotRunning(String),
    #[error(transparent)]
    Session(#[from] client::Error),
    #[error("The guest could not run tar: {0}")]
    Failed(String),
    #[error("Cannot open the destination {0}: {1}")]
    Destination(String, io::Error),
    #[error("Cannot write {0} on the host: {1} (the partial file was removed)")]
    Write(String, io::Error),
    #[error("Cannot read {0}: {1}")]
    Source(String, io::Error),
    #[error("Cannot send the archive to the guest: {0}")]
    Send(io::Error),
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Host(PathBuf),
    Guest { name: String, path: String },
}

/// `NAME:PATH` with a valid sandbox name, not starting with '/' or '.',
/// is the guest's; anything else is a host path.
pub fn parse_place(arg: &OsStr) -> Place {
    let bytes = arg.as_bytes();
    if !bytes.starts_with(b"/") && !bytes.starts_with(b".") {
        if let Some((name, path)) = arg.to_str().and_then(|s| s.split_once(':')) {
            if sandbox::valid_name(name) {
                return Place::Guest { name: name.into(), path: path.into() };
            }
        }
    }
    Place::Host(PathBuf::from(arg))
}

/// A guest path as (directory for `tar -C`, last component).
pub fn split_guest(path: &str) -> Result<(String, String), CopyError> {
    let trimmed = path.trim_end_matches('/');
    let (dir, base) = match trimmed.rsplit_once('/') {
        Some(("", b)) => ("/".to_string(), b),
        Some((d, b)) => (d.to_string(), b),
        None => (".".to_string(), trimmed),
    };
    if base.is_empty() || base == "." || base == ".." {
        return Err(CopyError::Usage(format!(
            "'{}': name a file or directory in the guest (not '/', '.' or '..')",
            escape::line(path)
        )));
    }
    Ok((dir, base.to_string()))
}

fn shown(name: &[u8]) -> String {
    escape::escape(name, Layout::Line)
}

/// Counts and prints warnings (escaped by the caller).
#[derive(Default)]
pub struct Warnings {
    pub count: u64,
    pub lines: Vec<String>,
    pub quiet: bool,
}

impl Warnings {
    pub fn warn(&mut self, text: String) {
        self.count += 1;
        if self.quiet {
            self.lines.push(text);
        } else if self.count <= MAX_WARNINGS_SHOWN {
            eprintln!("sbx: {text}");
        }
    }

    fn summary(&self) {
        if !self.quiet && self.count > MAX_WARNINGS_SHOWN {
            eprintln!("sbx: … and {} more warnings", self.count - MAX_WARNINGS_SHOWN);
        }
    }
}

// ---- out of the guest: extraction below the destination ----

/// Where and how entries are written on the host.
pub struct Extractor {
    /// The directory the copy goes into, held open.
    root: OwnedFd,
    /// The archive's first component (the guest path's last).
    base: String,
    /// The name it gets in `root`.
    top: OsString,
    pub recursive: bool,
    pub force: bool,
    pub verbose: bool,
    pub copied: u64,
}

/// Why extraction stopped.
#[derive(Debug, Error)]
pub enum ExtractError {
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error("{0} is a directory: not copied (use -r)")]
    NotRecursive(String),
    #[error(transparent)]
    Host(CopyError),
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_name() -> OsString {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    OsString::from(format!(".sbx-cp-{}-{n}.tmp", std::process::id()))
}

impl Extractor {
    /// Like cp: into `dest` if it is a directory, else as `dest`.
    pub fn new(dest: &Path, base: &str) -> Result<Extractor, CopyError> {
        let open = |p: &Path| {
            std::fs::File::open(p)
                .and_then(|f| {
                    if f.metadata()?.is_dir() {
                        Ok(OwnedFd::from(f))
                    } else {
                        Err(io::Error::from_raw_os_error(libc::ENOTDIR))
                    }
                })
                .map_err(|e| CopyError::Destination(shown(p.as_os_str().as_bytes()), e))
        };
        let (root, top) = if std::fs::metadata(dest).is_ok_and(|m| m.is_dir()) {
            (open(dest)?, OsString::from(base))
        } else {
            let bytes = dest.as_os_str().as_bytes();
            if bytes.ends_with(b"/") {
                return Err(CopyError::Destination(shown(bytes), io::Error::from_raw_os_error(libc::ENOENT)));
            }
            let name = dest
                .file_name()
                .filter(|n| *n != "." && *n != "..")
                .ok_or_else(|| CopyError::Usage(format!("'{}': name a file or directory on the host", shown(bytes))))?;
            let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (open(parent)?, name.to_os_string())
        };
        Ok(Extractor { root, base: base.into(), top, recursive: false, force: false, verbose: false, copied: 0 })
    }

    /// The host-side components of an archive path, or why it is not one
    /// of ours: it must be the guest path or below it.
    fn host_path(&self, path: &[String]) -> Option<Vec<OsString>> {
        if path.first() != Some(&self.base) {
            return None;
        }
        let mut out = vec![self.top.clone()];
        out.extend(path[1..].iter().map(OsString::from));
        Some(out)
    }

    /// Opens (creating) each directory of `parts` below the root, never
    /// through a link.
    fn walk(&self, parts: &[OsString]) -> io::Result<OwnedFd> {
        let mut dir = self.root.try_clone()?;
        for p in parts {
            dir = match fs::open_dir(dir.as_fd(), p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match fs::mkdirat(dir.as_fd(), p, 0o755) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                        _ => {}
                    }
                    fs::open_dir(dir.as_fd(), p)?
                }
                r => r?,
            };
        }
        Ok(dir)
    }

    fn display(parts: &[OsString]) -> String {
        shown(&parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>().join(&b'/'))
    }

    /// Extracts every entry; warnings for what is skipped.
    pub fn extract<R: Read>(&mut self, tar: &mut TarReader<R>, warn: &mut Warnings) -> Result<(), ExtractError> {
        while let Some(entry) = tar.next_entry()? {
            let name = shown(&entry.name);
            let (path, file) = match entry.what {
                What::Refused(r) => {
                    warn.warn(format!("{name}: {r}"));
                    continue;
                }
                What::Dir { path } => (path, None),
                What::File { path, size, executable } => (path, Some((size, executable))),
            };
            let Some(parts) = self.host_path(&path) else {
                warn.warn(format!("{name}: not below the path asked for: not copied"));
                continue;
            };
            if !self.recursive && (parts.len() > 1 || file.is_none()) {
                if file.is_none() && parts.len() == 1 {
                    return Err(ExtractError::NotRecursive(shown(self.base.as_bytes())));
                }
                warn.warn(format!("{name}: not the file asked for: not copied"));
                continue;
            }
            let shown_parts = Self::display(&parts);
            match file {
                None => match self.walk(&parts) {
                    Ok(_) => {
                        if self.verbose {
                            println!("{shown_parts}/");
                        }
                    }
                    Err(e) => warn.warn(format!("{shown_parts}: {} : not copied", in_the_way(&e))),
                },
                Some((size, executable)) => {
                    let (dirs, last) = parts.split_at(parts.len() - 1);
                    let dir = match self.walk(dirs) {
                        Ok(d) => d,
                        Err(e) => {
                            warn.warn(format!("{shown_parts}: {}: not copied", in_the_way(&e)));
                            continue;
                        }
                    };
                    match self.write_file(dir.as_fd(), &last[0], size, executable, tar, &shown_parts)? {
                        Ok(()) => {
                            self.copied += 1;
                            if self.verbose {
                                println!("{shown_parts}");
                            }
                        }
                        Err(why) => warn.warn(format!("{shown_parts}: {why}")),
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes one file: a temporary file, then renamed into place. The
    /// outer error stops the copy; the inner one skips the file.
    fn write_file<R: Read>(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        size: u64,
        executable: bool,
        tar: &mut TarReader<R>,
        shown_parts: &str,
    ) -> Result<Result<(), String>, ExtractError> {
        let tmp = temp_name();
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = match fs::openat(dir, &tmp, flags, 0o600) {
            Ok(fd) => fd,
            Err(e) => return Ok(Err(format!("cannot create a file beside it: {e}: not copied"))),
        };
        let mut file = std::fs::File::from(fd);
        let fail = |e: ExtractError| {
            let _ = fs::unlinkat(dir, &tmp);
            Err(e)
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = match tar.read_data(&mut buf) {
                Ok(n) => n,
                Err(e) => return fail(e.into()),
            };
            if let Err(e) = file.write_all(&buf[..n]) {
                return fail(ExtractError::Host(CopyError::Write(shown_parts.into(), e)));
            }
            left -= n as u64;
        }
        let mode = if executable { 0o755 } else { 0o644 };
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode)) {
            return fail(ExtractError::Host(CopyError::Write(shown_parts.into(), e)));
        }
        drop(file);
        match fs::rename(dir, &tmp, name, self.force) {
            Ok(()) => Ok(Ok(())),
            Err(e) => {
                let _ = fs::unlinkat(dir, &tmp);
                Ok(Err(if e.kind() == io::ErrorKind::AlreadyExists {
                    "exists: not replaced (--force replaces it)".into()
                } else {
                    format!("cannot put it in place: {e}: not copied")
                }))
            }
        }
    }
}

fn in_the_way(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => "a symbolic link or a file is in the way (not followed)".into(),
        _ => format!("cannot make its directory: {e}"),
    }
}

// ---- into the guest: the archive made from a host path ----

/// Makes the tar stream of a host path.
pub struct Packer<W: Write> {
    pub tar: TarWriter<W>,
    pub follow: bool,
    pub recursive: bool,
    pub verbose: bool,
    pub limits: Limits,
    bytes: u64,
    entries: u64,
}

/// Why packing stopped.
#[derive(Debug, Error)]
pub enum PackError {
    #[error("{0} is a directory: not copied (use -r)")]
    NotRecursive(String),
    #[error("The source holds more than {0} bytes: the rest was not copied (--max-size allows more)")]
    TooLarge(u64),
    #[error("The source holds more than {0} entries: the rest was not copied")]
    TooManyEntries(u64),
    #[error(transparent)]
    Source(CopyError),
    #[error(transparent)]
    Send(io::Error),
}

fn mtime(m: &std::fs::Metadata) -> u64 {
    u64::try_from(m.mtime()).unwrap_or(0)
}

impl<W: Write> Packer<W> {
    pub fn new(out: W, limits: Limits) -> Packer<W> {
        Packer {
            tar: TarWriter::new(out),
            follow: false,
            recursive: false,
            verbose: false,
            limits,
            bytes: 0,
            entries: 0,
        }
    }

    fn count(&mut self, size: u64) -> Result<(), PackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(PackError::TooManyEntries(self.limits.max_entries));
        }
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limits.max_bytes {
            return Err(PackError::TooLarge(self.limits.max_bytes));
        }
        Ok(())
    }

    /// The host path `src` (followed: the user named it) as `top`.
    pub fn pack(&mut self, src: &Path, top: &[u8], warn: &mut Warnings) -> Result<(), PackError> {
        let source = |e| PackError::Source(CopyError::Source(shown(src.as_os_str().as_bytes()), e));
        // O_NONBLOCK: naming a FIFO does not hang the open.
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(src).map_err(source)?;
        let meta = file.metadata().map_err(source)?;
        self.entry(file, &meta, top.to_vec(), 0, warn)
    }

    fn entry(
        &mut self,
        file: std::fs::File,
        meta: &std::fs::Metadata,
        name: Vec<u8>,
        depth: usize,
        warn: &mut Warnings,
    ) -> Result<(), PackError> {
        if meta.is_file() {
            self.count(meta.len())?;
            let mut f = file;
            let short = self
                .tar
                .file(&name, meta.len(), meta.mode() & 0o111 != 0, mtime(meta), &mut f)
                .map_err(PackError::Send)?;
            if short {
                warn.warn(format!("{}: shrank while being copied: padded with zeros", shown(&name)));
            }
            if self.verbose {
                println!("{}", shown(&name));
            }
            return Ok(());
        }
        if !meta.is_dir() {
            warn.warn(format!("{}: not a regular file or directory: not copied", shown(&name)));
            return Ok(());
        }
        if !self.recursive {
            return Err(PackError::NotRecursive(shown(&name)));
        }
        if depth >= tar::MAX_DEPTH || name.len() > tar::MAX_PATH {
            warn.warn(format!("{}: too deep: not copied", shown(&name)));
            return Ok(());
        }
        self.count(0)?;
        self.tar.dir(&name, mtime(meta)).map_err(PackError::Send)?;
        if self.verbose {
            println!("{}/", shown(&name));
        }
        let dir = OwnedFd::from(file);
        // Names listed through the descriptor (the directory we opened,
        // whatever its path leads to now), sorted for a stable archive.
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir)));
        let mut names: Vec<OsString> = match listing {
            Ok(l) => l.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                warn.warn(format!("{}: cannot list it: {e}: not copied", shown(&name)));
                return Ok(());
            }
        };
        names.sort();
        for n in names {
            let mut child = name.clone();
            child.push(b'/');
            child.extend_from_slice(n.as_bytes());
            let shown_child = shown(&child);
            let nofollow = if self.follow { 0 } else { libc::O_NOFOLLOW };
            if !self.follow {
                match fs::lstatat(dir.as_fd(), &n) {
                    Ok((kind, _)) if kind == libc::S_IFLNK => {
                        warn.warn(format!("{shown_child}: a symbolic link: not copied (-L copies what it points to)"));
                        continue;
                    }
                    Ok((kind, _)) if kind != libc::S_IFREG && kind != libc::S_IFDIR => {
                        warn.warn(format!("{shown_child}: not a regular file or directory: not copied"));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn.warn(format!("{shown_child}: {e}: not copied"));
                        continue;
                    }
                }
            }
            // O_NONBLOCK: a FIFO put there meanwhile does not block the open.
            let opened = fs::openat(dir.as_fd(), &n, libc::O_RDONLY | libc::O_NONBLOCK | nofollow, 0)
                .map(std::fs::File::from)
                .and_then(|f| f.metadata().map(|m| (f, m)));
            match opened {
                Ok((f, m)) if m.is_file() || m.is_dir() => self.entry(f, &m, child, depth + 1, warn)?,
                Ok(_) => warn.warn(format!("{shown_child}: not a regular file or directory: not copied")),
                Err(e) => warn.warn(format!("{shown_child}: {e}: not copied")),
            }
        }
        Ok(())
    }
}

// ---- the session ----

/// A pipe-mode session's stdout as a reader; its stderr kept (bounded)
/// and how it ended.
pub struct SessionOut {
    stream: UnixStream,
    reader: Reader,
    pending: Vec<u8>,
    pos: usize,
    pub stderr: Vec<u8>,
    pub outcome: Option<client::Outcome>,
}

impl SessionOut {
    pub fn new(stream: UnixStream, reader: Reader) -> SessionOut {
        SessionOut { stream, reader, pending: Vec::new(), pos: 0, stderr: Vec::new(), outcome: None }
    }

    /// The next frame's worth: stdout into `pending`, false at the end.
    fn pull(&mut self) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.outcome.is_some() {
                return Ok(false);
            }
            match self.reader.next_frame().map_err(|e| io::Error::other(e.to_string()))? {
                Some(Frame::Stdout(d)) => {
                    self.pending = d;
                    self.pos = 0;
                    return Ok(true);
                }
                Some(Frame::Stderr(d)) => {
                    let room = MAX_GUEST_STDERR.saturating_sub(self.stderr.len());
                    self.stderr.extend_from_slice(&d[..d.len().min(room)]);
                }
                Some(Frame::Started { .. }) => {}
                Some(Frame::Exit(c)) => self.outcome = Some(client::Outcome::Exited(c)),
                Some(Frame::Killed(s)) => self.outcome = Some(client::Outcome::Killed(s)),
                Some(Frame::Error(m)) => self.outcome = Some(client::Outcome::Failed(m)),
                Some(other) => {
                    return Err(io::Error::other(format!("unexpected frame {}", escape::line(&format!("{other:?}")))))
                }
                None => match self.stream.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("the sandbox closed the session (was it stopped?)")),
                    Ok(n) => self.reader.feed(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Reads to the program's end, dropping up to MAX_TRAILER of output.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut dropped = self.pending.len() - self.pos;
        while self.pull()? {
            dropped += self.pending.len();
            if dropped > MAX_TRAILER {
                return Err(io::Error::other("the guest kept sending after the archive's end"));
            }
        }
        Ok(())
    }
}

impl Read for SessionOut {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.pending.len() {
            if !self.pull()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Stdin frames of at most MAX_DATA bytes.
struct FrameWriter {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Write for FrameWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_DATA - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_DATA {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.stream.write_all(&Frame::Stdin(std::mem::take(&mut self.buf)).encode())?;
        }
        Ok(())
    }
}

// ---- the command ----

fn usage(text: String) -> Result<ExitCode, CopyError> {
    eprintln!("sbx: {text}");
    eprintln!("Usage: sbx cp [-r] [-f] [-L] [-v] NAME:GUEST_PATH HOST_PATH | HOST_PATH NAME:GUEST_PATH");
    Ok(ExitCode::from(EXIT_USAGE))
}

/// `sbx cp`.
pub fn command(args: CpArgs) -> Result<ExitCode, CopyError> {
    let (from, to) = (parse_place(&args.source), parse_place(&args.dest));
    let (name, guest, host, out) = match (from, to) {
        (Place::Guest { name, path }, Place::Host(h)) => (name, path, h, true),
        (Place::Host(h), Place::Guest { name, path }) => (name, path, h, false),
        (Place::Guest { .. }, Place::Guest { .. }) => {
            return usage("both arguments are in a sandbox: one must be a host path".into())
        }
        (Place::Host(_), Place::Host(_)) => {
            return usage(
                "neither argument is NAME:PATH in a sandbox (a host path with ':' starts with ./ or /)".into(),
            )
        }
    };
    if guest.is_empty() {
        return usage(format!("'{name}:': give a path in the guest"));
    }
    let (dir, base) = match split_guest(&guest) {
        Ok(s) => s,
        Err(CopyError::Usage(u)) => return usage(u),
        Err(e) => return Err(e),
    };
    let sb = Sandbox::open(&sandbox::home(), &name)?;
    if sb.running_pid().is_none() {
        return Err(CopyError::NotRunning(name));
    }
    let limits = Limits { max_bytes: args.max_size, ..Limits::default() };
    let cwd = sb.settings.workspace.to_string_lossy().into_owned();
    let socket = sb.control_socket();
    let wait = Duration::from_secs(args.wait);
    let open = |argv: Vec<&str>| Open {
        argv: argv.into_iter().map(String::from).collect(),
        env: Vec::new(),
        cwd: cwd.clone(),
        user: args.user.clone(),
        tty: None,
        main: false,
    };
    let mut warn = Warnings::default();
    let mut partial = false;
    if out {
        let mut ex = match Extractor::new(&host, &base) {
            Ok(ex) => ex,
            Err(CopyError::Usage(u)) => return usage(u),
            Err(e) => return Err(e),
        };
        ex.recursive = args.recursive;
        ex.force = args.force;
        ex.verbose = args.verbose;
        let member = format!("./{base}");
        let (stream, reader) =
            client::open_pipes(&socket, open(vec!["tar", "-C", &dir, "-c", "-f", "-", &member]), wait)?;
        let mut session = SessionOut::new(stream, reader);
        let result = ex.extract(&mut TarReader::new(&mut session, limits), &mut warn);
        match result {
            Ok(()) => {
                if let Err(e) = session.drain() {
                    warn.warn(format!("after the archive: {e}"));
                }
            }
            Err(ExtractError::Host(e)) => return Err(e),
            Err(e) => {
                eprintln!("sbx: {}", escape::line(&e.to_string()));
                partial = true;
            }
        }
        partial |= guest_end(&session.outcome, &session.stderr, "tar -c")?;
    } else {
        // Into an existing directory (or one the path says is one), else as the name.
        let into = guest.ends_with('/') || {
            let (stream, reader) = client::open_pipes(&socket, open(vec!["test", "-d", &guest]), wait)?;
            let mut s = SessionOut::new(stream, reader);
            s.drain().map_err(|e| CopyError::Session(client::Error::Lost(e)))?;
            s.outcome == Some(client::Outcome::Exited(0))
        };
        let (tar_dir, top) = if into {
            let top = match host.file_name() {
                Some(n) => n.as_bytes().to_vec(),
                None => std::fs::canonicalize(&host)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.as_bytes().to_vec()))
                    .ok_or_else(|| {
                        CopyError::Usage(format!(
                            "'{}': name a file or directory on the host",
                            shown(host.as_os_str().as_bytes())
                        ))
                    })?,
            };
            (guest.clone(), top)
        } else {
            (dir, base.into_bytes())
        };
        let mut argv = vec!["tar", "-C", &tar_dir, "-x", "-o"];
        if !args.force {
            argv.push("-k");
        }
        argv.extend(["-f", "-"]);
        let (stream, reader) = client::open_pipes(&socket, open(argv), wait)?;
        let writer = FrameWriter { stream: stream.try_clone().map_err(CopyError::Send)?, buf: Vec::new() };
        let (src, recursive, follow, verbose) = (host.clone(), args.recursive, args.dereference, args.verbose);
        let sender = vmm::threads::spawn_helper("copy-send", move || {
            let mut w = Warnings { quiet: true, ..Warnings::default() };
            let mut p = Packer::new(writer, limits);
            (p.recursive, p.follow, p.verbose) = (recursive, follow, verbose);
            let r = p.pack(&src, &top, &mut w);
            // End the archive whatever happened, so the guest keeps what came.
            let end = p.tar.finish().and_then(|mut fw| {
                fw.flush()?;
                fw.stream.write_all(&Frame::StdinEof.encode())
            });
            (r, end, w)
        })
        .map_err(CopyError::Send)?;
        let mut session = SessionOut::new(stream, reader);
        let drained = session.drain();
        if session.outcome.is_some() {
            // The guest's tar has ended: a send still under way stops.
            let _ = session.stream.shutdown(std::net::Shutdown::Both);
        }
        let (r, end, w) = sender
            .join()
            .unwrap_or_else(|_| (Err(PackError::Send(io::Error::other("panicked"))), Ok(()), Warnings::default()));
        for l in w.lines {
            warn.warn(l);
        }
        match r {
            Ok(()) => {}
            Err(PackError::Source(e)) => return Err(e),
            Err(PackError::Send(e)) if session.outcome.is_none() => return Err(CopyError::Send(e)),
            Err(PackError::Send(_)) => partial = true,
            Err(e) => {
                eprintln!("sbx: {e}");
                partial = true;
            }
        }
        if let Err(e) = end.and(drained) {
            if session.outcome.is_none() {
                return Err(CopyError::Send(e));
            }
        }
        partial |= guest_end(&session.outcome, &session.stderr, "tar -x")?;
    }
    warn.summary();
    Ok(if partial || warn.count > 0 { ExitCode::from(EXIT_PARTIAL) } else { ExitCode::SUCCESS })
}

/// How the guest's tar ended: true (partial) if it failed, its stderr shown escaped.
fn guest_end(outcome: &Option<client::Outcome>, stderr: &[u8], what: &str) -> Result<bool, CopyError> {
    let said = || {
        if !stderr.is_empty() {
            eprintln!("sbx: the guest's {what} said: {}", escape::escape(stderr, Layout::Line));
        }
    };
    match outcome {
        Some(client::Outcome::Exited(0)) | None => Ok(false),
        Some(client::Outcome::Exited(c)) => {
            said();
            eprintln!("sbx: the guest's {what} exited with status {c}");
            Ok(true)
        }
        Some(client::Outcome::Killed(s)) => {
            said();
            eprintln!("sbx: the guest's {what} was killed by signal {s}");
            Ok(true)
        }
        Some(client::Outcome::Failed(m)) => Err(CopyError::Failed(escape::line(m))),
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::tar::tests::{archive, header};
    use super::*;
    use std::os::unix::fs::symlink;

    fn run(
        dest: &Path,
        base: &str,
        bytes: &[u8],
        recursive: bool,
        force: bool,
    ) -> (Result<(), ExtractError>, Warnings, u64) {
        let mut ex = Extractor::new(dest, base).unwrap();
        ex.recursive = recursive;
        ex.force = force;
        let mut w = Warnings { quiet: true, ..Warnings::default() };
        let mut tar = TarReader::new(bytes, Limits::default());
        let r = ex.extract(&mut tar, &mut w);
        (r, w, ex.copied)
    }

    fn no_temp_files(dir: &Path) {
        for e in walk(dir) {
            assert!(!e.to_string_lossy().contains(".sbx-cp-"), "left behind: {e:?}");
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn guest_and_host_arguments_are_told_apart() {
        assert_eq!(parse_place(OsStr::new("box:/etc/x")), Place::Guest { name: "box".into(), path: "/etc/x".into() });
        assert_eq!(parse_place(OsStr::new("./box:x")), Place::Host("./box:x".into()));
        assert_eq!(parse_place(OsStr::new("/a:b")), Place::Host("/a:b".into()));
        assert_eq!(parse_place(OsStr::new("no space:x")), Place::Host("no space:x".into()));
        assert_eq!(split_guest("/work/d/").unwrap(), ("/work".into(), "d".into()));
        assert_eq!(split_guest("/f").unwrap(), ("/".into(), "f".into()));
        assert_eq!(split_guest("rel").unwrap(), (".".into(), "rel".into()));
        for bad in ["/", "/a/..", ".", "a/."] {
            assert!(matches!(split_guest(bad), Err(CopyError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn a_single_file_lands_as_named_with_a_safe_mode() {
        let d = tempfile::tempdir().unwrap();
        let mut h = header(b"./f", b'0', 2);
        // Set-uid, group and other write in the archive: not kept.
        h[100..108].copy_from_slice(b"0006777\0");
        super::tar::tests::seal(&mut h);
        let a = archive(&[(h, b"hi")]);
        let (r, w, n) = run(&d.path().join("out"), "f", &a, false, false);
        r.unwrap();
        assert_eq!((w.count, n), (0, 1));
        assert_eq!(std::fs::read(d.path().join("out")).unwrap(), b"hi");
        let mode = std::fs::metadata(d.path().join("out")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        // Into an existing directory: under the guest's name.
        let (r, _, _) = run(d.path(), "f", &a, false, false);
        r.unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"hi");
        no_temp_files(d.path());
    }

    #[test]
    fn existing_files_are_kept_without_force_and_replaced_not_followed_with_it() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, b"safe").unwrap();
        symlink(&target, d.path().join("f")).unwrap();
        let a = archive(&[(header(b"f", b'0', 4), b"evil")]);
        let (r, w, n) = run(d.path(), "f", &a, false, false);
        r.unwrap();
        assert_eq!((w.count, n), (1, 0));
        assert!(w.lines[0].contains("exists: not replaced"), "{:?}", w.lines);
        assert_eq!(std::fs::read(&target).unwrap(), b"safe");
        let (r, w, n) = run(d.path(), "f", &a, false, true);
        r.unwrap();
        assert_eq!((w.count, n), (0, 1));
        assert_eq!(std::fs::read(&target).unwrap(), b"safe", "the link was replaced, not written through");
        assert!(std::fs::symlink_metadata(d.path().join("f")).unwrap().is_file());
        no_temp_files(d.path());
    }

    #[test]
    fn a_symlink_at_the_destination_is_never_written_through() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // The top directory, and a directory below it, are links out.
        std::fs::create_dir(d.path().join("top")).unwrap();
        symlink(outside.path(), d.path().join("top/sub")).unwrap();
        let a = archive(&[
            (header(b"top/", b'5', 0), b""),
            (header(b"top/sub/", b'5', 0), b""),
            (header(b"top/sub/x", b'0', 1), b"x"),
            (header(b"top/ok", b'0', 1), b"y"),
        ]);
        let (r, w, n) = run(d.path(), "top", &a, true, true);
        r.unwrap();
        assert_eq!(n, 1);
        assert_eq!(w.count, 2, "{:?}", w.lines);
        assert!(w.lines.iter().all(|l| l.contains("symbolic link or a file is in the way")), "{:?}", w.lines);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(std::fs::read(d.path().join("top/ok")).unwrap(), b"y");

        let d2 = tempfile::tempdir().unwrap();
        symlink(outside.path(), d2.path().join("top")).unwrap();
        let (r, w, n) = run(d2.path(), "top", &a, true, true);
        r.unwrap();
        assert_eq!((n, w.count), (0, 4));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn hostile_entries_are_skipped_with_escaped_warnings() {
        let d = tempfile::tempdir().unwrap();
        let a = archive(&[
            (header(b"top/", b'5', 0), b""),
            (header(b"/etc/passwd", b'0', 1), b"x"),
            (header(b"top/../../x", b'0', 1), b"x"),
            (header(b"top/link", b'2', 0), b""),
            (header(b"other/f", b'0', 1), b"x"),
            (header(b"top/\x1b]52;c;x\x07", b'0', 1), b"z"),
        ]);
        let (r, w, n) = run(d.path(), "top", &a, true, false);
        r.unwrap();
        assert_eq!(n, 1, "the odd but valid name is a file");
        assert_eq!(w.count, 4, "{:?}", w.lines);
        assert!(w.lines.iter().all(|l| !l.contains('\x1b')));
        assert!(w.lines[0].starts_with("/etc/passwd: an absolute name"));
        assert!(!d.path().join("other").exists() && !d.path().parent().unwrap().join("x").exists());
        assert!(std::fs::symlink_metadata(d.path().join("top/link")).is_err());
    }

    #[test]
    fn directories_need_recursive_and_a_truncated_file_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let a = archive(&[(header(b"top/", b'5', 0), b""), (header(b"top/f", b'0', 1), b"x")]);
        let (r, _, _) = run(d.path(), "top", &a, false, false);
        assert!(matches!(r, Err(ExtractError::NotRecursive(_))));
        assert!(!d.path().join("top").exists());

        let a = archive(&[(header(b"top/", b'5', 0), b""), (header(b"top/f", b'0', 5000), &[1u8; 5000])]);
        let (r, _, n) = run(d.path(), "top", &a[..3000], true, false);
        assert!(matches!(r, Err(ExtractError::Tar(TarError::Truncated(_)))));
        assert_eq!(n, 0);
        assert!(!d.path().join("top/f").exists());
        no_temp_files(d.path());
    }

    #[test]
    fn over_limit_archives_stop_and_keep_what_came_before() {
        let d = tempfile::tempdir().unwrap();
        let a = archive(&[
            (header(b"top/", b'5', 0), b""),
            (header(b"top/a", b'0', 600), &[1u8; 600]),
            (header(b"top/b", b'0', 600), &[1u8; 600]),
        ]);
        let mut ex = Extractor::new(d.path(), "top").unwrap();
        ex.recursive = true;
        let mut w = Warnings { quiet: true, ..Warnings::default() };
        let mut tar = TarReader::new(&a[..], Limits { max_bytes: 1000, max_entries: 10 });
        let r = ex.extract(&mut tar, &mut w);
        assert!(matches!(r, Err(ExtractError::Tar(TarError::TooLarge(1000)))));
        assert!(d.path().join("top/a").exists() && !d.path().join("top/b").exists());
    }

    #[test]
    fn packing_skips_links_and_special_files_and_round_trips() {
        let src = tempfile::tempdir().unwrap();
        let top = src.path().join("proj");
        std::fs::create_dir_all(top.join("sub")).unwrap();
        std::fs::write(top.join("a.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(top.join("a.sh"), std::fs::Permissions::from_mode(0o4775)).unwrap();
        std::fs::write(top.join("sub/b"), b"bee").unwrap();
        symlink("/etc/passwd", top.join("link")).unwrap();
        let fifo = std::ffi::CString::new(top.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

        let mut w = Warnings { quiet: true, ..Warnings::default() };
        let mut p = Packer::new(Vec::new(), Limits::default());
        assert!(matches!(p.pack(&top, b"proj", &mut w), Err(PackError::NotRecursive(_))));
        let mut p = Packer::new(Vec::new(), Limits::default());
        p.recursive = true;
        p.pack(&top, b"proj", &mut w).unwrap();
        assert_eq!(w.count, 2, "{:?}", w.lines);
        let bytes = p.tar.finish().unwrap();

        let dest = tempfile::tempdir().unwrap();
        let (r, w2, n) = run(dest.path(), "proj", &bytes, true, false);
        r.unwrap();
        assert_eq!((n, w2.count), (2, 0));
        assert_eq!(std::fs::read(dest.path().join("proj/sub/b")).unwrap(), b"bee");
        let mode = std::fs::metadata(dest.path().join("proj/a.sh")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(!dest.path().join("proj/link").exists() && !dest.path().join("proj/fifo").exists());

        // With -L the link's target is copied as a file.
        let mut p = Packer::new(Vec::new(), Limits::default());
        (p.recursive, p.follow) = (true, true);
        let mut w = Warnings { quiet: true, ..Warnings::default() };
        p.pack(&top, b"proj", &mut w).unwrap();
        let bytes = p.tar.finish().unwrap();
        let dest = tempfile::tempdir().unwrap();
        run(dest.path(), "proj", &bytes, true, false).0.unwrap();
        assert!(std::fs::symlink_metadata(dest.path().join("proj/link")).unwrap().is_file());

        // A FIFO named as the source is refused, not waited on.
        let mut p = Packer::new(Vec::new(), Limits::default());
        let before = w.count;
        p.pack(&top.join("fifo"), b"fifo", &mut w).unwrap();
        assert_eq!(w.count, before + 1);

        // Over the size cap: stopped.
        let mut p = Packer::new(Vec::new(), Limits { max_bytes: 5, max_entries: 100 });
        p.recursive = true;
        assert!(matches!(p.pack(&top, b"proj", &mut w), Err(PackError::TooLarge(5))));
    }
}
