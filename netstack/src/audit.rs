//! Host side: the sandbox's audit log — one JSON object per line, each
//! carrying the SHA-256 of the line before it, so that editing, removing
//! or reordering any line is detected by [`verify`]. Only the last line can
//! be changed unnoticed unless its hash is kept elsewhere: `verify` returns
//! it for that purpose.
//!
//! The guest is hostile and decides how many events there are, so what it
//! can make the host write is bounded three ways:
//! - Refusals (see [`refusal_kind`]) are aggregated: per kind, the first
//!   [`DENY_BURST`] in a [`DENY_INTERVAL_MS`] window are written whole, the
//!   rest only counted, into one `{"event":"suppressed",...}` line written
//!   when the window is over (at the next event after it) or at
//!   [`AuditLog::flush_suppressed`] (the VMM's end; also on drop).
//! - Changes to shared files (see [`change_kind`]) are aggregated the same
//!   way past [`CHANGE_BURST`] a window per operation, so that a guest
//!   churning files cannot push older lines (a request it made) out of
//!   the files kept within minutes. Network requests are always written
//!   (each needs a connection, and connections are bounded).
//! - [`AuditFile`] rotates `audit.log` at [`FILE_CAP`] bytes into
//!   `audit.log.1`, `.2`, … keeping [`KEEP_FILES`] files in all, oldest
//!   dropped. The chain runs on across files: the first line of a new file
//!   links to the last of the one before, and `seq` goes on.
//!   [`verify_files`] checks the set, oldest first; once files were
//!   dropped it verifies from the first line of the oldest file kept.
//! - A last line cut short (crash, disk full) is reported by the verifier
//!   as a [`TornTail`], not as a broken chain; [`open`] cuts it off (and
//!   logs that it did) before continuing. A line that fails half-written
//!   while the VMM runs is cut back at once by [`AuditFile`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Size past which `audit.log` is rotated (before the line that would
/// cross it).
pub const FILE_CAP: u64 = 8 << 20;
/// Files kept, the current one included: at most `KEEP_FILES * FILE_CAP`
/// bytes of audit log per sandbox.
pub const KEEP_FILES: usize = 4;
/// Refusals of one kind written whole per window.
pub const DENY_BURST: u32 = 32;
/// Allowed changes to shared files of one operation (create, write,
/// delete, ...) written whole per window (an `npm install` writes
/// thousands: the first ones whole, the rest counted).
pub const CHANGE_BURST: u32 = 600;
/// The aggregation window of each kind of refusal, from its first refusal.
pub const DENY_INTERVAL_MS: u64 = 60_000;
/// Kinds of refusal counted apart; further kinds share [`OTHER_KIND`].
pub const MAX_KINDS: usize = 64;
/// The kind of refusals beyond [`MAX_KINDS`] kinds.
pub const OTHER_KIND: &str = "other";
/// Longest part (event, op, class) of a refusal kind, in bytes.
const MAX_KIND_PART: usize = 32;
/// Longest string value written whole (bytes); longer ones are cut and
/// say by how much.
pub const MAX_FIELD: usize = 16 * 1024;
/// Longest line written or read (bytes, without its end).
pub const MAX_LINE: usize = 1 << 20;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn line_hash(line: &str) -> String {
    hex(&Sha256::digest(line.as_bytes()))
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot write the audit log: {0}")]
    Io(#[from] io::Error),
    #[error("Audit event must serialise to a JSON object")]
    NotAnObject,
    #[error("Audit event of {bytes} bytes is over the {MAX_LINE}-byte line limit")]
    TooLong { bytes: usize },
    #[error("Audit log line {line}: {reason}")]
    Broken { line: u64, reason: String },
    #[error("{}: {source}", file.display())]
    InFile {
        file: PathBuf,
        #[source]
        source: Box<Error>,
    },
}

/// One log, one chain, written from several threads (the network and
/// each shared folder).
pub type SharedLog<W> = Arc<Mutex<AuditLog<W>>>;

/// How refusals are aggregated (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Refusals of one kind written whole per window.
    pub burst: u32,
    /// Allowed file changes of one operation written whole per window.
    pub change_burst: u32,
    /// Window length, milliseconds.
    pub interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { burst: DENY_BURST, change_burst: CHANGE_BURST, interval_ms: DENY_INTERVAL_MS }
    }
}

/// The kind a refusal is counted under, or None if `fields` is not a
/// refusal. Refusals are: any `"decision":"deny"` (network `dns`, `http`,
/// `tls`; `file` with its `op`), dropped frames (`"event":"refused"`, by
/// the first word of `what`: TCP, UDP, ICMP, IPv6, malformed, …) and
/// malformed DNS queries (`dns` with an `error`). Kinds are made only of
/// names the host's code picks, never of addresses or paths the guest
/// picks, and each part is cut at [`MAX_KIND_PART`] bytes.
pub fn refusal_kind(fields: &Map<String, Value>) -> Option<String> {
    let field = |k: &str| fields.get(k).and_then(Value::as_str);
    let event = field("event").unwrap_or("?");
    let class = if field("decision") == Some("deny") {
        match field("op") {
            Some(op) => format!("{}/deny", cut(op, MAX_KIND_PART)),
            None => "deny".into(),
        }
    } else if event == "refused" {
        cut(field("what").and_then(|w| w.split_whitespace().next()).unwrap_or("?"), MAX_KIND_PART).to_string()
    } else if event == "dns" && fields.contains_key("error") {
        "error".into()
    } else {
        return None;
    };
    Some(format!("{}/{class}", cut(event, MAX_KIND_PART)))
}

/// The aggregation kind of an allowed change to a shared file (`file`
/// events the policy allowed, by `op`), if `fields` is one.
pub fn change_kind(fields: &Map<String, Value>) -> Option<String> {
    let field = |k: &str| fields.get(k).and_then(Value::as_str);
    (field("event") == Some("file") && field("decision") != Some("deny"))
        .then(|| format!("file/{}/allow", cut(field("op").unwrap_or("?"), MAX_KIND_PART)))
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// String values over [`MAX_FIELD`] bytes cut, saying how much was cut.
fn bound_strings(v: &mut Value) {
    match v {
        Value::String(s) if s.len() > MAX_FIELD => {
            let kept = cut(s, MAX_FIELD).len();
            let dropped = s.len() - kept;
            s.truncate(kept);
            s.push_str(&format!("…[{dropped} more bytes]"));
        }
        Value::Array(items) => items.iter_mut().for_each(bound_strings),
        Value::Object(m) => m.values_mut().for_each(bound_strings),
        _ => {}
    }
}

/// One kind's current window.
#[derive(Debug)]
struct Window {
    start_ms: u64,
    written: u32,
    suppressed: u64,
}

/// Counts refusals per kind and window; deterministic in the times given.
#[derive(Debug, Default)]
struct Aggregator {
    limits: Limits,
    windows: BTreeMap<String, Window>,
}

impl Aggregator {
    /// Whether an event of `kind` at `now_ms` is written (at most `burst`
    /// a window); counted if not.
    fn admit(&mut self, kind: String, burst: u32, now_ms: u64) -> bool {
        let kind = if self.windows.len() < MAX_KINDS || self.windows.contains_key(&kind) {
            kind
        } else {
            OTHER_KIND.to_string()
        };
        let w = self.windows.entry(kind).or_insert(Window { start_ms: now_ms, written: 0, suppressed: 0 });
        if w.written < burst {
            w.written += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Ends the windows that are over at `now_ms` (all of them if `all`);
    /// the summary events of those that suppressed anything, by kind.
    fn end_windows(&mut self, now_ms: u64, all: bool) -> Vec<Value> {
        let interval = self.limits.interval_ms;
        let mut summaries = Vec::new();
        self.windows.retain(|kind, w| {
            let end = w.start_ms.saturating_add(interval);
            if !all && now_ms < end {
                return true;
            }
            if w.suppressed > 0 {
                summaries.push(json!({
                    "event": "suppressed",
                    "kind": kind,
                    "count": w.suppressed,
                    "from_ms": w.start_ms,
                    "interval_ms": end.min(now_ms).saturating_sub(w.start_ms),
                }));
            }
            false
        });
        summaries
    }
}

/// Appends chained lines to `out`.
pub struct AuditLog<W: Write> {
    out: W,
    prev: String,
    seq: u64,
    aggregator: Aggregator,
    /// The latest time given, for the summaries written on drop.
    last_ms: u64,
    /// Set when a line could not be written (disk full, I/O error): those
    /// who write here then refuse what they would have to record (see
    /// [`AuditLog::failure_flag`]).
    failed: Arc<AtomicBool>,
}

impl<W: Write> AuditLog<W> {
    /// A new log.
    pub fn new(out: W) -> Self {
        AuditLog {
            out,
            prev: GENESIS.to_string(),
            seq: 0,
            aggregator: Aggregator::default(),
            last_ms: 0,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Continues a log whose verified last line hash and sequence number
    /// are known.
    pub fn resume(out: W, last: &Verified) -> Self {
        let mut log = AuditLog::new(out);
        log.prev = last.last_hash.clone();
        log.seq = last.last_seq;
        log
    }

    /// The same log with other aggregation limits (tests).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.aggregator.limits = limits;
        self
    }

    /// The log made shareable between threads.
    pub fn shared(self) -> SharedLog<W> {
        Arc::new(Mutex::new(self))
    }

    /// The sink the log writes to.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Appends one event (any serialisable struct or map) with its sequence
    /// number, time and the previous line's hash. Keys `seq`, `ts` and
    /// `prev` are the log's own. Refusals may only be counted (see the
    /// module's notes); summaries of windows over by `unix_ms` are written
    /// first.
    pub fn record<E: Serialize>(&mut self, event: &E, unix_ms: u64) -> Result<(), Error> {
        let Value::Object(fields) = serde_json::to_value(event).map_err(|_| Error::NotAnObject)? else {
            return Err(Error::NotAnObject);
        };
        self.tick(unix_ms)?;
        let limits = self.aggregator.limits;
        let aggregated = refusal_kind(&fields)
            .map(|k| (k, limits.burst))
            .or_else(|| change_kind(&fields).map(|k| (k, limits.change_burst)));
        if let Some((kind, burst)) = aggregated {
            if !self.aggregator.admit(kind, burst, unix_ms) {
                return Ok(());
            }
        }
        self.write_line(Value::Object(fields), unix_ms)
    }

    /// Writes the summaries of the aggregation windows over by `unix_ms`
    /// (otherwise written at the next event), for a caller with a clock.
    pub fn tick(&mut self, unix_ms: u64) -> Result<(), Error> {
        self.last_ms = self.last_ms.max(unix_ms);
        for summary in self.aggregator.end_windows(unix_ms, false) {
            self.write_line(summary, unix_ms)?;
        }
        Ok(())
    }

    /// Ends every aggregation window, writing the summaries of refusals
    /// counted and not yet written. Call when the VMM ends (dropping the
    /// log does it too, at the latest time recorded).
    pub fn flush_suppressed(&mut self, unix_ms: u64) -> Result<(), Error> {
        self.last_ms = self.last_ms.max(unix_ms);
        for summary in self.aggregator.end_windows(unix_ms, true) {
            self.write_line(summary, unix_ms)?;
        }
        Ok(())
    }

    /// True once a line could not be written: fail closed from then on.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The flag [`AuditLog::failed`] reads, for writers on other threads
    /// (the file servers) to refuse changes they could no longer record.
    pub fn failure_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    fn write_line(&mut self, event: Value, unix_ms: u64) -> Result<(), Error> {
        let result = self.write_line_unflagged(event, unix_ms);
        if matches!(result, Err(Error::Io(_))) {
            self.failed.store(true, Ordering::SeqCst);
        }
        result
    }

    fn write_line_unflagged(&mut self, event: Value, unix_ms: u64) -> Result<(), Error> {
        let Value::Object(fields) = event else { return Err(Error::NotAnObject) };
        let mut obj = Map::new();
        obj.insert("seq".into(), Value::from(self.seq + 1));
        obj.insert("ts".into(), Value::from(unix_ms));
        obj.insert("prev".into(), Value::from(self.prev.clone()));
        for (k, mut v) in fields {
            if !matches!(k.as_str(), "seq" | "ts" | "prev") {
                bound_strings(&mut v);
                obj.insert(k, v);
            }
        }
        let line = Value::Object(obj).to_string();
        if line.len() > MAX_LINE {
            return Err(Error::TooLong { bytes: line.len() });
        }
        // One write for the line and its end: a process killed in between
        // cannot leave half a line that breaks the chain.
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.out.write_all(&bytes)?;
        self.out.flush()?;
        self.prev = line_hash(&line);
        self.seq += 1;
        Ok(())
    }
}

impl<W: Write> Drop for AuditLog<W> {
    fn drop(&mut self) {
        // Nowhere to report an error to: the log was the place.
        let _ = self.flush_suppressed(self.last_ms);
    }
}

/// When [`AuditFile`] rotates and how many files it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Size past which the file is rotated (before the line crossing it;
    /// a single line longer than this gets a file of its own).
    pub cap: u64,
    /// Files kept, the current one included (at least 2).
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation { cap: FILE_CAP, keep: KEEP_FILES }
    }
}

/// `path` with `.suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The `n`th rotated file of `path` (`audit.log.n`).
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    with_suffix(path, &format!(".{n}"))
}

/// The rotated files of `path` there are, by number, lowest first.
fn rotated_files(path: &Path) -> io::Result<Vec<(usize, PathBuf)>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(prefix) = path.file_name().and_then(|n| n.to_str()).map(|n| format!("{n}.")) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = number.parse::<usize>() {
                found.push((n, dir.join(&name)));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The files of the log at `path`, oldest first: `audit.log.N`, …,
/// `audit.log.1`, `audit.log` (those there are).
pub fn log_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(path)?.into_iter().rev().map(|(_, p)| p).collect();
    if path.is_file() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

fn ignore_not_found(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The audit log's file, appended to, rotated at line boundaries (see
/// [`Rotation`]). Lines are what [`AuditLog`] writes: each ends with `\n`.
/// A line whose write fails part-way is cut back off the file, so that the
/// next line starts clean and the chain stays verifiable.
pub struct AuditFile {
    path: PathBuf,
    file: File,
    rotation: Rotation,
    /// Bytes in the current file.
    size: u64,
    /// Bytes of an unfinished line at the file's end.
    pending: u64,
    /// A part-written line could not be cut back: write nothing after it.
    torn: bool,
}

impl AuditFile {
    /// Opens `path` for appending (creating it). Its last line must be
    /// whole: [`open`] sees to that.
    pub fn open(path: &Path, rotation: Rotation) -> io::Result<AuditFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(AuditFile { path: path.to_path_buf(), file, rotation, size, pending: 0, torn: false })
    }

    /// `audit.log.(keep-1)` and older dropped, each other `.n` moved to
    /// `.n+1`, the current file to `.1`, and a new current file. A step
    /// cut short leaves a gap in the numbers, never a file out of order.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.rotation.keep.max(2);
        for (n, old) in rotated_files(&self.path)? {
            if n >= keep - 1 {
                ignore_not_found(fs::remove_file(old))?;
            }
        }
        for n in (1..keep - 1).rev() {
            ignore_not_found(fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)))?;
        }
        ignore_not_found(fs::rename(&self.path, rotated(&self.path, 1)))?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        self.pending = 0;
        Ok(())
    }

    /// Cuts an unfinished line off the file's end.
    fn cut_pending(&mut self) -> io::Result<()> {
        if self.pending > 0 {
            if let Err(e) = self.file.set_len(self.size - self.pending) {
                self.torn = true;
                return Err(e);
            }
            self.size -= self.pending;
            self.pending = 0;
        }
        self.torn = false;
        Ok(())
    }
}

impl Write for AuditFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.torn {
            self.cut_pending()?;
        }
        if self.pending == 0 && self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.rotation.cap {
            self.rotate()?;
        }
        match self.file.write(buf) {
            Ok(n) => {
                self.size += n as u64;
                match buf[..n].iter().rposition(|&b| b == b'\n') {
                    Some(i) => self.pending = (n - i - 1) as u64,
                    None => self.pending += n as u64,
                }
                Ok(n)
            }
            Err(e) => {
                let _ = self.cut_pending();
                Err(e)
            }
        }
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf) {
                Ok(0) => {
                    let _ = self.cut_pending();
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Bytes at the end of a log that are not a whole line (no line end): a
/// write cut short by a crash or a full disk. Not verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Where the partial line starts (in the last file).
    pub offset: u64,
    /// Its length.
    pub bytes: u64,
}

impl fmt::Display for TornTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "torn last line: {} bytes at offset {} have no line end (a write cut short) and are not verified",
            self.bytes, self.offset
        )
    }
}

/// What a verified log ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Whole lines verified.
    pub lines: u64,
    /// The first verified line's sequence number: 1, or more when older
    /// files were rotated away (0 for an empty log).
    pub first_seq: u64,
    /// The last line's sequence number (0 for an empty log).
    pub last_seq: u64,
    /// The last line's hash (for keeping elsewhere).
    pub last_hash: String,
    /// A partial line after the last whole one, if any.
    pub torn_tail: Option<TornTail>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lines {
            0 => write!(f, "empty log")?,
            _ if self.first_seq > 1 => write!(
                f,
                "chain verified from seq {} (older lines rotated away) to seq {}",
                self.first_seq, self.last_seq
            )?,
            _ => write!(f, "chain verified: seq 1 to {}", self.last_seq)?,
        }
        if let Some(t) = &self.torn_tail {
            write!(f, "; {t}")?;
        }
        Ok(())
    }
}

/// Checks lines one after another, across files.
struct Chain {
    /// The first line may continue a chain whose start was rotated away.
    late_start: bool,
    v: Verified,
}

impl Chain {
    fn new(late_start: bool) -> Chain {
        let v = Verified { lines: 0, first_seq: 0, last_seq: 0, last_hash: GENESIS.into(), torn_tail: None };
        Chain { late_start, v }
    }

    /// Checks every line of `input`; a partial last line is a torn tail if
    /// `last` (the log's last file), a break otherwise.
    fn feed<R: BufRead>(&mut self, mut input: R, last: bool) -> Result<(), Error> {
        let mut buf = Vec::new();
        let (mut n, mut offset) = (0u64, 0u64);
        loop {
            buf.clear();
            let got = (&mut input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
            if got == 0 {
                return Ok(());
            }
            n += 1;
            let broken = |reason: String| Error::Broken { line: n, reason };
            if buf.pop() != Some(b'\n') {
                if got > MAX_LINE {
                    return Err(broken(format!("longer than {MAX_LINE} bytes")));
                }
                if !last {
                    return Err(broken("partial line (no line end) before the last file of the log".into()));
                }
                self.v.torn_tail = Some(TornTail { offset, bytes: got as u64 });
                return Ok(());
            }
            let line = std::str::from_utf8(&buf).map_err(|_| broken("not UTF-8".into()))?;
            self.check(line).map_err(broken)?;
            offset += got as u64;
        }
    }

    fn check(&mut self, line: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let seq = v.get("seq").and_then(Value::as_u64);
        let prev = v.get("prev").and_then(Value::as_str);
        let seq = if self.v.lines == 0 {
            match seq {
                Some(1) if prev != Some(GENESIS) => {
                    return Err("does not start the chain (edited, removed or reordered)".into())
                }
                Some(1) => 1,
                Some(s) if s > 1 && self.late_start && prev.is_some() => s,
                _ => return Err("sequence number is not 1".into()),
            }
        } else {
            let want = self.v.last_seq + 1;
            if seq != Some(want) {
                return Err(format!("sequence number is not {want}"));
            }
            if prev != Some(self.v.last_hash.as_str()) {
                return Err("does not follow the line before it (edited, removed or reordered)".into());
            }
            want
        };
        if self.v.lines == 0 {
            self.v.first_seq = seq;
        }
        self.v.last_seq = seq;
        self.v.last_hash = line_hash(line);
        self.v.lines += 1;
        Ok(())
    }
}

/// Checks every line's chain link and sequence number, from the chain's
/// start. A partial last line is reported in [`Verified::torn_tail`].
pub fn verify<R: BufRead>(input: R) -> Result<Verified, Error> {
    let mut chain = Chain::new(false);
    chain.feed(input, true)?;
    Ok(chain.v)
}

/// Checks a rotated log's files (as [`log_files`] lists them, oldest
/// first) as one chain. The oldest may start past seq 1, when older files
/// were rotated away: it is trusted to link to them ([`Verified::first_seq`]
/// says so). Errors name the file.
pub fn verify_files(files: &[PathBuf]) -> Result<Verified, Error> {
    let mut chain = Chain::new(true);
    for (i, file) in files.iter().enumerate() {
        let in_file = |e: Error| Error::InFile { file: file.clone(), source: Box::new(e) };
        let f = File::open(file).map_err(|e| in_file(e.into()))?;
        chain.feed(BufReader::new(f), i + 1 == files.len()).map_err(in_file)?;
    }
    Ok(chain.v)
}

/// An audit log opened by [`open`], and what had to be done first.
pub struct Opened<W: Write> {
    pub log: AuditLog<W>,
    /// What the chain continues from (None: a new chain).
    pub resumed: Option<Verified>,
    /// For the user: a torn tail cut, a broken log kept aside.
    pub notes: Vec<String>,
}

/// Opens the log at `path` (and its rotated files) for appending,
/// continuing its chain. A torn last line is cut off first, and a line
/// saying so starts the continuation. A set of files whose chain does not
/// verify is kept aside (each file renamed `….broken-<now_ms>`), never
/// overwritten, and a new chain starts with a line saying why. `wrap` makes
/// the sink the log writes to from the file.
pub fn open<W: Write>(
    path: &Path,
    rotation: Rotation,
    now_ms: u64,
    wrap: impl FnOnce(AuditFile) -> W,
) -> Result<Opened<W>, Error> {
    let files = log_files(path)?;
    let mut notes = Vec::new();
    let mut events = Vec::new();
    let resumed = match verify_files(&files) {
        Ok(_) if files.is_empty() => None,
        Ok(v) => {
            if let (Some(torn), Some(last)) = (&v.torn_tail, files.last()) {
                OpenOptions::new().write(true).open(last)?.set_len(torn.offset)?;
                notes.push(format!("{}: {torn}; cut off before continuing", last.display()));
                events.push(json!({"event": "torn_tail", "file": last.display().to_string(),
                    "offset": torn.offset, "bytes": torn.bytes, "action": "cut off"}));
            }
            Some(v)
        }
        Err(e) => {
            let mut kept = Vec::new();
            for file in &files {
                let aside = with_suffix(file, &format!(".broken-{now_ms}"));
                fs::rename(file, &aside)?;
                kept.push(aside.display().to_string());
            }
            notes.push(format!("{e}; kept as {} and started a new log", kept.join(", ")));
            events.push(json!({"event": "log_restarted", "reason": e.to_string(), "kept_as": kept}));
            None
        }
    };
    let out = wrap(AuditFile::open(path, rotation)?);
    let mut log = match &resumed {
        Some(v) => AuditLog::resume(out, v),
        None => AuditLog::new(out),
    };
    for event in events {
        log.record(&event, now_ms)?;
    }
    Ok(Opened { log, resumed, notes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Serialize)]
    struct Http<'a> {
        event: &'a str,
        method: &'a str,
        host: &'a str,
        decision: &'a str,
    }

    /// A directory removed at the end of the test.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("netstack-audit-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn log(&self) -> PathBuf {
            self.0.join("audit.log")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Vec<u8> {
        let mut log = AuditLog::new(Vec::new());
        for (i, host) in ["a.com", "b.com", "evil.com"].iter().enumerate() {
            let decision = if *host == "evil.com" { "deny" } else { "allow" };
            log.record(&Http { event: "http", method: "GET", host, decision }, 1000 + i as u64).unwrap();
        }
        log.get_ref().clone()
    }

    fn file_deny(path: &str) -> Value {
        json!({"event": "file", "op": "open", "path": path, "decision": "deny", "reason": "hidden"})
    }

    fn lines_of(bytes: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(bytes).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn total_size(files: &[PathBuf]) -> u64 {
        files.iter().map(|f| fs::metadata(f).unwrap().len()).sum()
    }

    #[test]
    fn a_written_log_verifies() {
        let bytes = sample();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().next().unwrap().contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(text.contains("\"host\":\"evil.com\"") && text.contains("\"seq\":3"));
        let v = verify(&bytes[..]).unwrap();
        assert_eq!((v.lines, v.first_seq, v.last_seq, &v.torn_tail), (3, 1, 3, &None));
        assert_eq!(v.last_hash, line_hash(text.lines().last().unwrap()));
        assert_eq!(v.to_string(), "chain verified: seq 1 to 3");
    }

    #[test]
    fn edits_removals_and_reordering_are_caught() {
        let text = String::from_utf8(sample()).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replacen("\"deny\"", "\"allow\"", 1);
        // The edit is in line 3, the last: only its hash shows it.
        let v = verify(edited.as_bytes()).unwrap();
        assert_ne!(v.last_hash, verify(text.as_bytes()).unwrap().last_hash);

        let edited_first = text.replacen("a.com", "x.com", 1);
        assert!(matches!(verify(edited_first.as_bytes()), Err(Error::Broken { line: 2, .. })));

        let removed = format!("{}\n{}\n", lines[0], lines[2]);
        assert!(matches!(verify(removed.as_bytes()), Err(Error::Broken { line: 2, .. })));

        // A lone log must start the chain: its head cannot just go.
        let beheaded = format!("{}\n{}\n", lines[1], lines[2]);
        assert!(matches!(verify(beheaded.as_bytes()), Err(Error::Broken { line: 1, .. })));

        let swapped = format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2]);
        assert!(matches!(verify(swapped.as_bytes()), Err(Error::Broken { line: 1, .. })));

        assert!(matches!(verify(&b"not json\n"[..]), Err(Error::Broken { line: 1, .. })));
    }

    #[test]
    fn a_resumed_log_keeps_the_chain() {
        let first = sample();
        let v = verify(&first[..]).unwrap();
        let mut log = AuditLog::resume(Vec::new(), &v);
        log.record(&Http { event: "http", method: "POST", host: "a.com", decision: "allow" }, 2000).unwrap();
        let mut all = first;
        all.extend_from_slice(log.get_ref());
        assert_eq!(verify(&all[..]).unwrap().lines, 4);
    }

    #[test]
    fn reserved_keys_cannot_be_forged_and_non_objects_are_refused() {
        let mut log = AuditLog::new(Vec::new());
        let forged = json!({"event": "x", "seq": 99, "prev": "ff"});
        log.record(&forged, 1).unwrap();
        assert_eq!(verify(&log.get_ref()[..]).unwrap().lines, 1);
        assert!(matches!(log.record(&"a string", 1), Err(Error::NotAnObject)));
    }

    #[test]
    fn long_strings_are_cut_saying_so() {
        let mut log = AuditLog::new(Vec::new());
        log.record(&json!({"event": "file", "op": "write", "path": "é".repeat(MAX_FIELD)}), 1).unwrap();
        let line = &lines_of(log.get_ref())[0];
        let path = line["path"].as_str().unwrap();
        assert!(path.len() < MAX_FIELD + 64 && path.ends_with(&format!("…[{} more bytes]", MAX_FIELD)), "{path}");
        assert!(verify(&log.get_ref()[..]).is_ok());
    }

    #[test]
    fn refusal_kinds_are_named_by_the_host_not_the_guest() {
        let kind = |v: Value| refusal_kind(v.as_object().unwrap());
        assert_eq!(kind(file_deny("/w/.env")).as_deref(), Some("file/open/deny"));
        assert_eq!(kind(json!({"event": "dns", "name": "x.com", "decision": "deny"})).as_deref(), Some("dns/deny"));
        assert_eq!(kind(json!({"event": "refused", "what": "TCP to 1.2.3.4:22"})).as_deref(), Some("refused/TCP"));
        assert_eq!(kind(json!({"event": "refused", "what": "TCP to 5.6.7.8:9"})).as_deref(), Some("refused/TCP"));
        assert_eq!(kind(json!({"event": "dns", "error": "truncated"})).as_deref(), Some("dns/error"));
        assert_eq!(kind(json!({"event": "file", "op": "write", "decision": "allow"})), None);
        assert_eq!(kind(json!({"event": "http", "host": "a.com", "decision": "allow"})), None);
        assert_eq!(kind(json!({"event": "upstream", "error": "refused"})), None);
        let long = kind(json!({"event": "file", "op": "x".repeat(1000), "decision": "deny"})).unwrap();
        assert!(long.len() <= 2 * MAX_KIND_PART + 10, "{long}");
    }

    #[test]
    fn a_loop_of_refusals_writes_a_burst_then_one_summary_per_window() {
        let limits = Limits { burst: 5, change_burst: 5, interval_ms: 1000 };
        let mut log = AuditLog::new(Vec::new()).with_limits(limits);
        // 10 000 refusals over 10 windows, each followed by an allowed write.
        for i in 0..10_000u64 {
            log.record(&file_deny(&format!("/w/.env{i}")), i).unwrap();
            if i % 1000 == 0 {
                log.record(&json!({"event": "file", "op": "write", "path": "/w/a", "decision": "allow"}), i).unwrap();
            }
        }
        log.flush_suppressed(10_000).unwrap();
        let lines = lines_of(log.get_ref());
        let count = |pred: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| pred(l)).count();
        assert_eq!(count(&|l| l["decision"] == "allow"), 10, "allowed events are always written");
        assert_eq!(count(&|l| l["decision"] == "deny"), 10 * 5);
        let summaries: Vec<&Value> = lines.iter().filter(|l| l["event"] == "suppressed").collect();
        assert_eq!(summaries.len(), 10);
        for (w, s) in summaries.iter().enumerate() {
            assert_eq!(s["kind"], "file/open/deny");
            assert_eq!((s["count"].as_u64(), s["interval_ms"].as_u64()), (Some(995), Some(1000)), "{s}");
            assert_eq!(s["from_ms"].as_u64(), Some(w as u64 * 1000));
        }
        // The last window's summary came from the flush; each window's
        // summary precedes the next window's first refusal.
        assert_eq!(summaries[9]["ts"].as_u64(), Some(10_000));
        let total: u64 = summaries.iter().map(|s| s["count"].as_u64().unwrap()).sum();
        assert_eq!(total + 50, 10_000, "every refusal is written or counted");
        assert_eq!(verify(&log.get_ref()[..]).unwrap().lines, lines.len() as u64);
    }

    #[test]
    fn refusals_are_bounded_by_kind_and_the_kinds_too() {
        let mut log = AuditLog::new(Vec::new());
        // A guest that varies what it is refused: many ports, many ops.
        for i in 0..100_000u64 {
            let event = if i % 2 == 0 {
                json!({"event": "refused", "what": format!("TCP to 10.0.0.{}:{}", i % 250, i % 65000)})
            } else {
                json!({"event": "file", "op": format!("op{}", i % 500), "decision": "deny"})
            };
            log.record(&event, 1_000 + i / 100).unwrap();
        }
        let before = log.get_ref().len();
        log.flush_suppressed(2_000).unwrap();
        let lines = lines_of(log.get_ref());
        let kinds: std::collections::BTreeSet<&str> =
            lines.iter().filter(|l| l["event"] == "suppressed").map(|l| l["kind"].as_str().unwrap()).collect();
        assert!(kinds.contains("refused/TCP") && kinds.contains(OTHER_KIND), "{kinds:?}");
        assert!(kinds.len() <= MAX_KINDS + 1);
        // All within one window: at most a burst and a summary per kind.
        assert!(lines.len() <= (MAX_KINDS + 1) * (DENY_BURST as usize + 1), "{}", lines.len());
        // ~300 KB for 100 000 refusals, instead of ~14 MB.
        assert!(before < (MAX_KINDS + 1) * DENY_BURST as usize * 200, "{before} bytes for 100 000 refusals");
        let total: u64 = lines.iter().filter_map(|l| l["count"].as_u64()).sum();
        let written = lines.iter().filter(|l| l["event"] != "suppressed").count() as u64;
        assert_eq!(total + written, 100_000);
        assert!(verify(&log.get_ref()[..]).is_ok());
    }

    #[test]
    fn a_tick_writes_the_summaries_of_windows_over() {
        let mut log = AuditLog::new(Vec::new()).with_limits(Limits { burst: 2, change_burst: 2, interval_ms: 100 });
        for t in 0..50 {
            log.record(&json!({"event": "refused", "what": "IPv6"}), t).unwrap();
        }
        log.tick(99).unwrap();
        assert_eq!(lines_of(log.get_ref()).len(), 2, "the window is not over");
        log.tick(100).unwrap();
        let lines = lines_of(log.get_ref());
        assert_eq!((lines.len(), &lines[2]["kind"], lines[2]["count"].as_u64()), (3, &json!("refused/IPv6"), Some(48)));
        log.tick(1000).unwrap();
        log.flush_suppressed(1000).unwrap();
        assert_eq!(lines_of(log.get_ref()).len(), 3, "nothing more to say");
    }

    #[test]
    fn summaries_are_written_when_the_log_is_dropped() {
        let dir = TempDir::new();
        let limits = Limits { burst: 1, change_burst: 1, interval_ms: 60_000 };
        {
            let file = AuditFile::open(&dir.log(), Rotation::default()).unwrap();
            let log = AuditLog::new(file).with_limits(limits).shared();
            for t in 0..10 {
                log.lock().unwrap().record(&file_deny("/w/.env"), 500 + t).unwrap();
            }
        }
        let bytes = fs::read(dir.log()).unwrap();
        let lines = lines_of(&bytes);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["event"], "suppressed");
        assert_eq!((lines[1]["count"].as_u64(), lines[1]["interval_ms"].as_u64()), (Some(9), Some(9)));
        assert!(verify(&bytes[..]).is_ok());
    }

    #[test]
    fn the_log_is_rotated_at_its_cap_and_the_chain_runs_across_files() {
        let dir = TempDir::new();
        let rotation = Rotation { cap: 4096, keep: 3 };
        let mut log = AuditLog::new(AuditFile::open(&dir.log(), rotation).unwrap());
        let event = |i: u64| json!({"event": "http", "method": "GET", "host": format!("h{i}.example")});
        for i in 0..1000 {
            log.record(&event(i), i).unwrap();
        }
        drop(log);
        let files = log_files(&dir.log()).unwrap();
        assert_eq!(files, vec![rotated(&dir.log(), 2), rotated(&dir.log(), 1), dir.log()]);
        for f in &files {
            assert!(fs::metadata(f).unwrap().len() <= 4096, "{}", f.display());
        }
        assert!(total_size(&files) <= 3 * 4096);
        // The current file's first line links to the last of the one before.
        let before = fs::read_to_string(&files[1]).unwrap();
        let now = fs::read_to_string(&files[2]).unwrap();
        let (last, first) = (before.lines().last().unwrap(), now.lines().next().unwrap());
        let first: Value = serde_json::from_str(first).unwrap();
        assert_eq!(first["prev"].as_str(), Some(line_hash(last).as_str()));
        let last: Value = serde_json::from_str(last).unwrap();
        assert_eq!(first["seq"].as_u64(), Some(last["seq"].as_u64().unwrap() + 1));

        let v = verify_files(&files).unwrap();
        assert_eq!(v.last_seq, 1000);
        assert!(v.first_seq > 1 && v.lines == 1001 - v.first_seq, "{v:?}");
        assert!(v.to_string().contains(&format!("from seq {} (older lines rotated away)", v.first_seq)));

        // An edit in a rotated file is caught, and named.
        let edited = fs::read_to_string(&files[0]).unwrap().replacen(".example", ".exampel", 2);
        fs::write(&files[0], edited).unwrap();
        let err = verify_files(&files).unwrap_err();
        assert!(
            matches!(&err, Error::InFile { file, source } if *file == files[0]
            && matches!(**source, Error::Broken { line: 2, .. })),
            "{err}"
        );
        assert!(err.to_string().contains("Audit log line 2"), "{err}");
    }

    #[test]
    fn a_reopened_log_continues_the_rotated_set() {
        let dir = TempDir::new();
        let rotation = Rotation { cap: 2048, keep: 4 };
        let boxed = |f: AuditFile| Box::new(f) as Box<dyn Write + Send>;
        for run in 0..5u64 {
            let opened = open(&dir.log(), rotation, run * 1000, boxed).unwrap();
            assert!(opened.notes.is_empty(), "{:?}", opened.notes);
            assert_eq!(opened.resumed.map(|v| v.last_seq).unwrap_or(0), run * 100);
            let mut log = opened.log;
            for i in 0..100 {
                log.record(&json!({"event": "dns", "name": format!("n{i}.com"), "decision": "allow"}), run * 1000 + i)
                    .unwrap();
            }
        }
        let files = log_files(&dir.log()).unwrap();
        assert_eq!(files.len(), 4);
        assert!(total_size(&files) <= 4 * 2048);
        let v = verify_files(&files).unwrap();
        assert_eq!((v.last_seq, &v.torn_tail), (500, &None));
        assert!(v.first_seq > 1);
    }

    #[test]
    fn a_torn_last_line_is_reported_and_cut_on_resume() {
        let dir = TempDir::new();
        let mut bytes = sample();
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(b"{\"seq\":4,\"ts\":17,\"pr");
        fs::write(dir.log(), &bytes).unwrap();

        let v = verify(&bytes[..]).unwrap();
        assert_eq!((v.lines, v.last_seq), (3, 3));
        assert_eq!(v.torn_tail, Some(TornTail { offset: whole, bytes: 20 }));
        assert!(v.to_string().contains("torn last line: 20 bytes"), "{v}");
        assert_eq!(verify_files(&log_files(&dir.log()).unwrap()).unwrap(), v);

        // Torn and edited in the middle: still broken.
        let edited = String::from_utf8_lossy(&bytes).replacen("a.com", "x.com", 1);
        assert!(matches!(verify(edited.as_bytes()), Err(Error::Broken { line: 2, .. })));

        let opened = open(&dir.log(), Rotation::default(), 5000, |f| f).unwrap();
        assert_eq!(opened.notes.len(), 1);
        assert!(opened.notes[0].contains("torn last line"), "{:?}", opened.notes);
        drop(opened.log);
        let bytes = fs::read(dir.log()).unwrap();
        let v = verify(&bytes[..]).unwrap();
        assert_eq!((v.lines, &v.torn_tail), (4, &None));
        let last = &lines_of(&bytes)[3];
        assert_eq!((last["event"].as_str(), last["bytes"].as_u64()), (Some("torn_tail"), Some(20)));
    }

    #[test]
    fn a_partial_line_before_the_last_file_is_a_break() {
        let dir = TempDir::new();
        let text = String::from_utf8(sample()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        fs::write(rotated(&dir.log(), 1), format!("{}\n{}", lines[0], lines[1])).unwrap();
        fs::write(dir.log(), format!("{}\n", lines[2])).unwrap();
        let err = verify_files(&log_files(&dir.log()).unwrap()).unwrap_err();
        assert!(err.to_string().contains("partial line"), "{err}");
    }

    #[test]
    fn a_broken_set_is_kept_aside_and_a_new_chain_says_why() {
        let dir = TempDir::new();
        let text = String::from_utf8(sample()).unwrap().replacen("a.com", "x.com", 1);
        fs::write(dir.log(), text).unwrap();
        let opened = open(&dir.log(), Rotation::default(), 77, |f| f).unwrap();
        assert!(opened.resumed.is_none());
        assert!(opened.notes[0].contains("Audit log line 2") && opened.notes[0].contains("broken-77"));
        drop(opened.log);
        assert!(dir.0.join("audit.log.broken-77").is_file());
        let bytes = fs::read(dir.log()).unwrap();
        assert_eq!(lines_of(&bytes)[0]["event"], "log_restarted");
        assert_eq!(verify(&bytes[..]).unwrap().lines, 1);
    }

    #[test]
    fn a_line_cut_short_while_running_is_cut_back() {
        let dir = TempDir::new();
        let mut file = AuditFile::open(&dir.log(), Rotation::default()).unwrap();
        file.write_all(b"{\"whole\":1}\n").unwrap();
        assert_eq!(file.write(b"{\"half").unwrap(), 6);
        file.cut_pending().unwrap();
        file.write_all(b"{\"whole\":2}\n").unwrap();
        assert_eq!(fs::read_to_string(dir.log()).unwrap(), "{\"whole\":1}\n{\"whole\":2}\n");
    }

    #[test]
    fn over_long_lines_are_refused_when_read() {
        let mut text = vec![b'x'; MAX_LINE + 10];
        text.push(b'\n');
        let err = verify(&text[..]).unwrap_err();
        assert!(matches!(&err, Error::Broken { line: 1, reason } if reason.contains("longer than")), "{err}");
    }

    #[test]
    fn file_churn_cannot_push_older_lines_out_of_the_kept_files() {
        let dir = TempDir::new();
        let path = dir.log();
        // Kept: 2 MiB. Five minutes of a guest making and removing files
        // as fast as it can (20 000 lines whole would be over 3 MiB).
        let rotation = Rotation { cap: 1 << 20, keep: 2 };
        let file = AuditFile::open(&path, rotation).unwrap();
        let mut log = AuditLog::new(file);
        log.record(&json!({"event": "http", "host": "exfil.example", "decision": "allow"}), 1).unwrap();
        let mut now = 2;
        for i in 0..20_000u64 {
            let op = if i % 2 == 0 { "create" } else { "delete" };
            let path = format!("/work/project/node_modules/some-package/lib/file-{i}.js");
            log.record(&json!({"event": "file", "op": op, "path": path, "decision": "allow"}), now).unwrap();
            now += 15;
        }
        log.flush_suppressed(now).unwrap();
        drop(log);
        let files = log_files(&path).unwrap();
        let text: String = files.iter().map(|f| fs::read_to_string(f).unwrap()).collect();
        assert!(text.contains("exfil.example"), "the request is still in the kept files");
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let counted: u64 =
            lines.iter().filter(|v| v["event"] == "suppressed").filter_map(|v| v["count"].as_u64()).sum();
        let whole = lines.iter().filter(|v| v["event"] == "file").count() as u64;
        assert_eq!(counted + whole, 20_000, "every change is written or counted");
        assert!(whole <= 2 * 600 * 6, "{whole} written whole");
        assert!(verify_files(&files).unwrap().first_seq == 1, "nothing rotated away");
    }

    #[test]
    fn a_write_that_fails_is_flagged_for_those_who_must_fail_closed() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut log = AuditLog::new(Full);
        let flag = log.failure_flag();
        assert!(!log.failed() && !flag.load(Ordering::SeqCst));
        assert!(log.record(&json!({"event": "http", "host": "a.example"}), 1).is_err());
        assert!(log.failed() && flag.load(Ordering::SeqCst), "the disk is full: fail closed");
    }
}
