//! Host side: the sandbox's audit log (crate `sbx-audit`, lib `audit`;
//! used by netstack, the VMM's file server and the CLI) — one JSON object
//! per line, each carrying the SHA-256 of the line before it, so that
//! editing, removing or reordering any line is detected by [`verify`]. Only the last line can
//! be changed unnoticed unless its hash is kept elsewhere: `verify` returns
//! it for that purpose.
//!
//! The guest is hostile and decides how many events there are, so what it
//! can make the host write is bounded, and what matters most is kept
//! apart from what it can make the host write in bulk:
//! - Every event is aggregated by kind: per kind, the first few in a
//!   [`DENY_INTERVAL_MS`] window (from the kind's first event) are written
//!   whole, the rest only counted, into one `{"event":"suppressed",...}`
//!   line written when the window is over (at the next event after it, or
//!   at [`AuditLog::tick`]) or at [`AuditLog::flush_suppressed`] (the VMM's
//!   end; also on drop). The summary counts the events it stands for
//!   (`count`), and names where they went: up to [`MAX_TARGETS`] `targets`
//!   (the `host`, `sni`, `name` or `dst` of each, cut at [`MAX_TARGET`]
//!   bytes) with their counts, `other_targets` for the rest, and the sums
//!   of their `bytes_up` / `bytes_down`. Written whole per window:
//!   - refusals (see [`refusal_kind`]): [`DENY_BURST`] of each kind; leak
//!     attempts (a refusal with a `leak` field) are a kind of their own,
//!     so that other refusals cannot use up their burst;
//!   - allowed changes to shared files (see [`change_kind`]):
//!     [`CHANGE_BURST`] per operation (an `npm install` writes thousands);
//!   - allowed DNS answers: [`DNS_BURST`];
//!   - allowed HTTP requests, and allowed TLS connections (each apart):
//!     [`REQUEST_BURST`];
//!   - anything else (connection ends, upstream errors, the log's own
//!     notes), by event and decision (see [`allowed_kind`]):
//!     [`ROUTINE_BURST`].
//!
//!   Kinds are named by the host's code, never by what the guest sends;
//!   past [`MAX_KINDS`] kinds at once, refusals share [`OTHER_KIND`] and
//!   the rest [`OTHER_ALLOWED_KIND`]. So whatever the guest does, the log
//!   grows by at most (burst + 1) lines a window for each of at most
//!   2 × ([`MAX_KINDS`] + 1) kinds. In bytes: a DNS line is under 1 KiB,
//!   a request under 2 × [`MAX_FIELD`] + 1 KiB (its path, normalised),
//!   a summary under [`MAX_TARGETS`] × ([`MAX_TARGET`] + 16) + 512; a guest
//!   sending long requests as fast as it can makes about 4 MiB a minute of
//!   request lines, so the kept files hold minutes of its worst and hours
//!   of ordinary work — and refusals are kept apart regardless (next).
//! - Evidence is kept apart: every refusal line written whole, and every
//!   summary of refusals, is also written to a second hash-chained file,
//!   `audit-evidence.log` next to `audit.log` (see [`evidence_path`]),
//!   which is never rotated. Each of its lines carries `main_seq`, the
//!   `seq` of the same event in the main log (null if that write failed),
//!   so that [`evidence_report`] can show the refusals whose main lines
//!   were rotated away. Routine traffic never goes there, so no amount of
//!   it can push a refusal or a leak attempt out. The file keeps the
//!   OLDEST: up to [`EVIDENCE_CAP`] bytes of refusals; leak attempts may
//!   use [`EVIDENCE_LEAK_ROOM`] more (so that a flood of plain refusals
//!   cannot crowd out the first leak attempts); past that, refusals are
//!   only counted, by kind. The first one not kept writes one
//!   `{"event":"evidence_full"}` line (at most once a run), and each
//!   [`AuditLog::flush_suppressed`]
//!   after some were not kept writes one `{"event":"evidence_counted"}` line
//!   (`lines`, and `refusals` by kind), also to the main log; these notes
//!   (and those of [`open`]) use [`EVIDENCE_NOTE_ROOM`] more, past which
//!   nothing is written. The file therefore never exceeds
//!   `EVIDENCE_CAP + EVIDENCE_LEAK_ROOM + EVIDENCE_NOTE_ROOM` bytes
//!   (9.06 MiB), across runs. Why a file and not keeping refusals back
//!   when rotating: a rotated file's lines are chained to each other, and
//!   keeping some of them would need a second chain anyway; a separate
//!   file, opened once by [`open`] (before the VMM's threads are confined),
//!   only ever appended to, is the simplest thing that verifies.
//! - [`AuditFile`] rotates `audit.log` at [`FILE_CAP`] bytes into
//!   `audit.log.1`, `.2`, … keeping [`KEEP_FILES`] files in all, oldest
//!   dropped. The chain runs on across files: the first line of a new file
//!   links to the last of the one before, and `seq` goes on.
//!   [`verify_files`] checks the set, oldest first; once files were
//!   dropped it verifies from the first line of the oldest file kept.
//!   [`verify_evidence`] checks the evidence file, which must start its
//!   chain (seq 1).
//! - A last line cut short (crash, disk full) is reported by the verifier
//!   as a [`TornTail`], not as a broken chain; [`open`] cuts it off (and
//!   logs that it did) before continuing, in either file. A line that
//!   fails half-written while the VMM runs is cut back at once by
//!   [`AuditFile`]. Either file whose chain does not verify is kept aside
//!   (`….broken-<ms>`), never overwritten, and its chain starts anew with a
//!   line saying why (in both files).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

mod event;
pub use event::{
    ConnEnd, Decision, Dns, Event, Exchange, FileOp, Nullable, Reclaimed, Refused, RefusedAddr, Timeout, Upstream,
};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Size past which `audit.log` is rotated (before the line that would
/// cross it).
pub const FILE_CAP: u64 = 8 << 20;
/// Files kept, the current one included: at most `KEEP_FILES * FILE_CAP`
/// bytes of audit log per sandbox (the evidence file apart).
pub const KEEP_FILES: usize = 4;
/// Refusals of one kind written whole per window.
pub const DENY_BURST: u32 = 32;
/// Allowed changes to shared files of one operation (create, write,
/// delete, ...) written whole per window (an `npm install` writes
/// thousands: the first ones whole, the rest counted).
pub const CHANGE_BURST: u32 = 600;
/// Allowed DNS answers written whole per window (the rest counted, by
/// name).
pub const DNS_BURST: u32 = 300;
/// Allowed HTTP requests written whole per window, and as many allowed
/// TLS connections (the rest counted, by host, with their bytes).
pub const REQUEST_BURST: u32 = 120;
/// Events of any other one kind (connection ends, upstream errors, the
/// log's own notes) written whole per window.
pub const ROUTINE_BURST: u32 = 300;
/// The aggregation window of every kind, from its first event.
pub const DENY_INTERVAL_MS: u64 = 60_000;
/// Kinds counted apart at once, refusals and the rest each; further kinds
/// share [`OTHER_KIND`] or [`OTHER_ALLOWED_KIND`].
pub const MAX_KINDS: usize = 64;
/// The kind of refusals beyond [`MAX_KINDS`] kinds.
pub const OTHER_KIND: &str = "other";
/// The kind of other events beyond [`MAX_KINDS`] kinds.
pub const OTHER_ALLOWED_KIND: &str = "other/allow";
/// Longest part (event, op, class) of a kind, in bytes.
const MAX_KIND_PART: usize = 32;
/// Destinations named in one summary; the rest are counted together.
pub const MAX_TARGETS: usize = 32;
/// Longest destination named in a summary, in bytes (a DNS name's).
pub const MAX_TARGET: usize = 255;
/// Longest string value written whole (bytes); longer ones are cut and
/// say by how much.
pub const MAX_FIELD: usize = 16 * 1024;
/// Longest line written or read (bytes, without its end).
pub const MAX_LINE: usize = 1 << 20;
/// Bytes of refusals the evidence file keeps (the oldest).
pub const EVIDENCE_CAP: u64 = 8 << 20;
/// Bytes past [`EVIDENCE_CAP`] that only leak attempts may use.
pub const EVIDENCE_LEAK_ROOM: u64 = 1 << 20;
/// Bytes past those two for the evidence file's own notes (full, counted,
/// torn tail cut, restarted).
pub const EVIDENCE_NOTE_ROOM: u64 = 64 << 10;
/// Keys the log writes itself: an event's own are dropped.
const RESERVED: [&str; 4] = ["seq", "ts", "prev", "main_seq"];

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

/// How events are aggregated (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Refusals of one kind written whole per window.
    pub burst: u32,
    /// Allowed file changes of one operation written whole per window.
    pub change_burst: u32,
    /// Allowed DNS answers written whole per window.
    pub dns_burst: u32,
    /// Allowed HTTP requests (and apart, TLS connections) per window.
    pub request_burst: u32,
    /// Any other event of one kind per window.
    pub routine_burst: u32,
    /// Window length, milliseconds.
    pub interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            burst: DENY_BURST,
            change_burst: CHANGE_BURST,
            dns_burst: DNS_BURST,
            request_burst: REQUEST_BURST,
            routine_burst: ROUTINE_BURST,
            interval_ms: DENY_INTERVAL_MS,
        }
    }
}

/// The kind a refusal is counted under, or None if `fields` is not a
/// refusal. Refusals are: any `"decision":"deny"` (network `dns`, `http`,
/// `tls`, `upstream`; `file` with its `op`; `…/leak` when it has a `leak`
/// field), dropped frames (`"event":"refused"`, by the first word of
/// `what`: TCP, UDP, ICMP, IPv6, malformed, …) and malformed DNS queries
/// (`dns` with an `error`). Kinds are made only of names the host's code
/// picks, never of addresses or paths the guest picks, and each part is
/// cut at `MAX_KIND_PART` bytes.
pub fn refusal_kind(fields: &Map<String, Value>) -> Option<String> {
    let field = |k: &str| fields.get(k).and_then(Value::as_str);
    let event = field("event").unwrap_or("?");
    let class = if field("decision") == Some("deny") {
        match field("op") {
            _ if fields.contains_key("leak") => "leak".into(),
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

/// Whether a kind [`refusal_kind`] named is a leak attempt's.
pub fn is_leak_kind(kind: &str) -> bool {
    kind.ends_with("/leak")
}

/// The aggregation kind of an allowed change to a shared file (`file`
/// events the policy allowed, by `op`), if `fields` is one.
pub fn change_kind(fields: &Map<String, Value>) -> Option<String> {
    let field = |k: &str| fields.get(k).and_then(Value::as_str);
    (field("event") == Some("file") && field("decision") != Some("deny"))
        .then(|| format!("file/{}/allow", cut(field("op").unwrap_or("?"), MAX_KIND_PART)))
}

/// The aggregation kind of an event that is neither a refusal nor a
/// change: `dns/allow`, `http/allow`, `tls/allow`; otherwise the event and
/// its decision (`upstream/allow`), `error` if it has one and no decision
/// (`upstream/error`), or the event alone (`conn_end`, `torn_tail`).
pub fn allowed_kind(fields: &Map<String, Value>) -> String {
    let field = |k: &str| fields.get(k).and_then(Value::as_str);
    let event = cut(field("event").unwrap_or("?"), MAX_KIND_PART);
    match (event, field("decision")) {
        ("dns" | "http" | "tls", _) => format!("{event}/allow"),
        (_, Some(decision)) => format!("{event}/{}", cut(decision, MAX_KIND_PART)),
        _ if fields.contains_key("error") => format!("{event}/error"),
        _ => event.to_string(),
    }
}

/// What an event is aggregated as, which sets its burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Refusal,
    Change,
    Dns,
    Request,
    Routine,
}

fn classify(event: &Event) -> (String, Class) {
    if let Some(kind) = event.refusal_kind() {
        return (kind, Class::Refusal);
    }
    if let Some(kind) = event.change_kind() {
        return (kind, Class::Change);
    }
    let class = match event.name() {
        Some("dns") => Class::Dns,
        Some("http" | "tls") => Class::Request,
        _ => Class::Routine,
    };
    (event.allowed_kind(), class)
}

impl Limits {
    fn burst_of(&self, class: Class) -> u32 {
        match class {
            Class::Refusal => self.burst,
            Class::Change => self.change_burst,
            Class::Dns => self.dns_burst,
            Class::Request => self.request_burst,
            Class::Routine => self.routine_burst,
        }
    }
}

/// Where an event went, for the summaries: its host, SNI, name or
/// address, the first there is.
fn target_of(fields: &Map<String, Value>) -> Option<&str> {
    ["host", "sni", "name", "dst"].iter().find_map(|k| fields.get(*k).and_then(Value::as_str))
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
    /// Where the suppressed events went, at most [`MAX_TARGETS`] named.
    targets: BTreeMap<String, u64>,
    other_targets: u64,
    bytes_up: u64,
    bytes_down: u64,
}

impl Window {
    fn new(start_ms: u64) -> Window {
        Window {
            start_ms,
            written: 0,
            suppressed: 0,
            targets: BTreeMap::new(),
            other_targets: 0,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// Counts a suppressed event.
    fn count(&mut self, fields: &Map<String, Value>) {
        self.suppressed += 1;
        if let Some(target) = target_of(fields).map(|t| cut(t, MAX_TARGET)) {
            if let Some(n) = self.targets.get_mut(target) {
                *n += 1;
            } else if self.targets.len() < MAX_TARGETS {
                self.targets.insert(target.to_string(), 1);
            } else {
                self.other_targets += 1;
            }
        }
        let bytes = |k: &str| fields.get(k).and_then(Value::as_u64).unwrap_or(0);
        self.bytes_up = self.bytes_up.saturating_add(bytes("bytes_up"));
        self.bytes_down = self.bytes_down.saturating_add(bytes("bytes_down"));
    }
}

/// A window's summary: the events of `kind` it counted.
struct Summary {
    kind: String,
    count: u64,
    line: Map<String, Value>,
}

/// Counts events per kind and window; deterministic in the times given.
#[derive(Debug)]
struct Aggregator {
    /// The kind past [`MAX_KINDS`].
    other: &'static str,
    windows: BTreeMap<String, Window>,
}

impl Aggregator {
    fn new(other: &'static str) -> Aggregator {
        Aggregator { other, windows: BTreeMap::new() }
    }

    /// The kind an event of `kind` at `now_ms` is written under (at most
    /// `burst` a window), or None if it is only counted.
    fn admit(&mut self, kind: String, burst: u32, now_ms: u64, fields: &Map<String, Value>) -> Option<String> {
        let kind = if self.windows.len() < MAX_KINDS || self.windows.contains_key(&kind) {
            kind
        } else {
            self.other.to_string()
        };
        let w = match self.windows.get_mut(&kind) {
            Some(w) => w,
            None => self.windows.entry(kind.clone()).or_insert(Window::new(now_ms)),
        };
        if w.written < burst {
            w.written += 1;
            Some(kind)
        } else {
            w.count(fields);
            None
        }
    }

    /// Ends the windows that are over at `now_ms` (all of them if `all`);
    /// the summaries of those that suppressed anything, by kind.
    fn end_windows(&mut self, now_ms: u64, interval: u64, all: bool) -> Vec<Summary> {
        let mut summaries = Vec::new();
        self.windows.retain(|kind, w| {
            let end = w.start_ms.saturating_add(interval);
            if !all && now_ms < end {
                return true;
            }
            if w.suppressed > 0 {
                let mut line = Map::new();
                line.insert("event".into(), json!("suppressed"));
                line.insert("kind".into(), json!(kind));
                line.insert("count".into(), json!(w.suppressed));
                line.insert("from_ms".into(), json!(w.start_ms));
                line.insert("interval_ms".into(), json!(end.min(now_ms).saturating_sub(w.start_ms)));
                if !w.targets.is_empty() {
                    line.insert("targets".into(), json!(std::mem::take(&mut w.targets)));
                }
                if w.other_targets > 0 {
                    line.insert("other_targets".into(), json!(w.other_targets));
                }
                if w.bytes_up > 0 || w.bytes_down > 0 {
                    line.insert("bytes_up".into(), json!(w.bytes_up));
                    line.insert("bytes_down".into(), json!(w.bytes_down));
                }
                summaries.push(Summary { kind: kind.clone(), count: w.suppressed, line });
            }
            false
        });
        summaries
    }
}

/// `fields` (without the log's own keys, strings bounded) after the
/// chain's `seq`, `ts`, `prev` (and in the evidence file `main_seq`).
fn chained_line(
    seq: u64,
    prev: &str,
    unix_ms: u64,
    main_seq: Option<Value>,
    fields: &Map<String, Value>,
) -> Result<String, Error> {
    let mut obj = Map::new();
    obj.insert("seq".into(), Value::from(seq));
    obj.insert("ts".into(), Value::from(unix_ms));
    obj.insert("prev".into(), Value::from(prev));
    if let Some(main_seq) = main_seq {
        obj.insert("main_seq".into(), main_seq);
    }
    for (k, v) in fields {
        obj.insert(k.clone(), v.clone());
    }
    let line = Value::Object(obj).to_string();
    if line.len() > MAX_LINE {
        return Err(Error::TooLong { bytes: line.len() });
    }
    Ok(line)
}

/// One write for the line and its end: a process killed in between
/// cannot leave half a line that breaks the chain.
fn write_whole(out: &mut dyn Write, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

/// How much the evidence file keeps (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvidenceCap {
    /// Bytes of refusals kept (the oldest).
    pub cap: u64,
    /// Bytes past `cap` for leak attempts only.
    pub leak_room: u64,
    /// Bytes past those for the file's own notes.
    pub note_room: u64,
}

impl Default for EvidenceCap {
    fn default() -> Self {
        EvidenceCap { cap: EVIDENCE_CAP, leak_room: EVIDENCE_LEAK_ROOM, note_room: EVIDENCE_NOTE_ROOM }
    }
}

impl EvidenceCap {
    /// The most the evidence file ever holds.
    pub fn total(&self) -> u64 {
        self.cap.saturating_add(self.leak_room).saturating_add(self.note_room)
    }
}

/// Whether (and as what) a line goes to the evidence file too.
enum Keep<'a> {
    No,
    /// Stands for `count` refusals of `kind`.
    Refusal {
        kind: &'a str,
        count: u64,
    },
    /// The log's own note.
    Note,
}

/// The evidence file's chain and what it could not keep.
struct Evidence {
    out: Box<dyn Write + Send>,
    prev: String,
    seq: u64,
    /// Bytes in the file.
    size: u64,
    cap: EvidenceCap,
    /// The `evidence_full` line was written (or the file was full already).
    full_noted: bool,
    /// Refusals not kept since the last `evidence_counted` line, by kind.
    not_kept: BTreeMap<String, u64>,
    lines_not_kept: u64,
}

impl Evidence {
    fn keep(
        &mut self,
        fields: &Map<String, Value>,
        main_seq: Option<u64>,
        unix_ms: u64,
        keep: &Keep,
    ) -> Result<(), Error> {
        let c = self.cap;
        let (limit, refusal) = match keep {
            Keep::No => return Ok(()),
            Keep::Refusal { kind, count } if is_leak_kind(kind) => {
                (c.cap.saturating_add(c.leak_room), Some((*kind, *count)))
            }
            Keep::Refusal { kind, count } => (c.cap, Some((*kind, *count))),
            Keep::Note => (c.total(), None),
        };
        if self.append(fields, main_seq, unix_ms, limit)? {
            return Ok(());
        }
        let Some((kind, count)) = refusal else { return Ok(()) };
        let kind = if self.not_kept.len() < MAX_KINDS || self.not_kept.contains_key(kind) { kind } else { OTHER_KIND };
        let n = self.not_kept.entry(kind.to_string()).or_default();
        *n = n.saturating_add(count);
        self.lines_not_kept += 1;
        if !self.full_noted {
            self.full_noted = true;
            let mut note = Map::new();
            note.insert("event".into(), json!("evidence_full"));
            note.insert("cap".into(), json!(c.cap));
            note.insert(
                "note".into(),
                json!("the oldest refusals are kept here; further ones are only counted (evidence_counted) and are in the main log while it keeps them"),
            );
            self.append(&note, None, unix_ms, c.total())?;
        }
        Ok(())
    }

    /// Appends a line if the file stays within `limit` bytes.
    fn append(
        &mut self,
        fields: &Map<String, Value>,
        main_seq: Option<u64>,
        unix_ms: u64,
        limit: u64,
    ) -> Result<bool, Error> {
        let line = chained_line(self.seq + 1, &self.prev, unix_ms, Some(json!(main_seq)), fields)?;
        let bytes = line.len() as u64 + 1;
        if self.size.saturating_add(bytes) > limit {
            return Ok(false);
        }
        write_whole(&mut *self.out, &line)?;
        self.size += bytes;
        self.prev = line_hash(&line);
        self.seq += 1;
        Ok(true)
    }

    /// The `evidence_counted` note of the refusals not kept since the last.
    fn take_counted(&mut self) -> Option<Map<String, Value>> {
        if self.lines_not_kept == 0 {
            return None;
        }
        let refusals: Map<String, Value> =
            std::mem::take(&mut self.not_kept).into_iter().map(|(k, n)| (k, Value::from(n))).collect();
        let mut note = Map::new();
        note.insert("event".into(), json!("evidence_counted"));
        note.insert("cap".into(), json!(self.cap.cap));
        note.insert("lines".into(), json!(std::mem::take(&mut self.lines_not_kept)));
        note.insert("refusals".into(), Value::Object(refusals));
        Some(note)
    }
}

/// Appends chained lines to `out` (and refusals also to the evidence
/// file, if it has one: see [`AuditLog::with_evidence`]).
pub struct AuditLog<W: Write> {
    out: W,
    prev: String,
    seq: u64,
    limits: Limits,
    refusals: Aggregator,
    allowed: Aggregator,
    evidence: Option<Evidence>,
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
            limits: Limits::default(),
            refusals: Aggregator::new(OTHER_KIND),
            allowed: Aggregator::new(OTHER_ALLOWED_KIND),
            evidence: None,
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
        self.limits = limits;
        self
    }

    /// The same log also writing its refusals to the evidence file `out`
    /// ([`open`] does this), which holds `size` bytes and whose chain
    /// continues from `resumed` (None: a new chain), within `cap`.
    pub fn with_evidence(
        mut self,
        out: Box<dyn Write + Send>,
        resumed: Option<&Verified>,
        size: u64,
        cap: EvidenceCap,
    ) -> Self {
        self.evidence = Some(Evidence {
            out,
            prev: resumed.map_or_else(|| GENESIS.to_string(), |v| v.last_hash.clone()),
            seq: resumed.map_or(0, |v| v.last_seq),
            size,
            cap,
            full_noted: size >= cap.cap,
            not_kept: BTreeMap::new(),
            lines_not_kept: 0,
        });
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

    /// Appends one event (its JSON object: see [`Event`]) with its
    /// sequence number, time and the previous line's hash. Keys `seq`,
    /// `ts`, `prev` and `main_seq` are the log's own. Events may only be
    /// counted (see the module's notes); summaries of windows over by
    /// `unix_ms` are written first.
    pub fn record(&mut self, event: &Event, unix_ms: u64) -> Result<(), Error> {
        let Some(fields) = event.fields() else {
            return Err(Error::NotAnObject);
        };
        self.tick(unix_ms)?;
        let (kind, class) = classify(event);
        let burst = self.limits.burst_of(class);
        let aggregator = if class == Class::Refusal { &mut self.refusals } else { &mut self.allowed };
        let Some(kind) = aggregator.admit(kind, burst, unix_ms, &fields) else {
            return Ok(());
        };
        let keep = if class == Class::Refusal { Keep::Refusal { kind: &kind, count: 1 } } else { Keep::No };
        self.write_line(fields, unix_ms, keep)
    }

    /// Writes the summaries of the aggregation windows over by `unix_ms`
    /// (otherwise written at the next event), for a caller with a clock.
    pub fn tick(&mut self, unix_ms: u64) -> Result<(), Error> {
        self.end_windows(unix_ms, false)
    }

    /// Ends every aggregation window, writing the summaries of events
    /// counted and not yet written, and the count of refusals the evidence
    /// file could not keep. Call when the VMM ends (dropping the log does
    /// it too, at the latest time recorded).
    pub fn flush_suppressed(&mut self, unix_ms: u64) -> Result<(), Error> {
        self.end_windows(unix_ms, true)?;
        match self.evidence.as_mut().and_then(Evidence::take_counted) {
            Some(note) => self.write_line(note, unix_ms, Keep::Note),
            None => Ok(()),
        }
    }

    fn end_windows(&mut self, unix_ms: u64, all: bool) -> Result<(), Error> {
        self.last_ms = self.last_ms.max(unix_ms);
        let interval = self.limits.interval_ms;
        for s in self.refusals.end_windows(unix_ms, interval, all) {
            self.write_line(s.line, unix_ms, Keep::Refusal { kind: &s.kind, count: s.count })?;
        }
        for s in self.allowed.end_windows(unix_ms, interval, all) {
            self.write_line(s.line, unix_ms, Keep::No)?;
        }
        Ok(())
    }

    /// The log's own note (from [`open`]): written whole, to both files.
    fn record_note(&mut self, event: Value, unix_ms: u64) -> Result<(), Error> {
        let Value::Object(fields) = event else { return Err(Error::NotAnObject) };
        self.write_line(fields, unix_ms, Keep::Note)
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

    fn write_line(&mut self, fields: Map<String, Value>, unix_ms: u64, keep: Keep) -> Result<(), Error> {
        let mut bounded = Map::new();
        for (k, mut v) in fields {
            if !RESERVED.contains(&k.as_str()) {
                bound_strings(&mut v);
                bounded.insert(k, v);
            }
        }
        let main = self.write_main(&bounded, unix_ms);
        let main_seq = main.is_ok().then_some(self.seq);
        let kept = match &mut self.evidence {
            Some(evidence) => evidence.keep(&bounded, main_seq, unix_ms, &keep),
            None => Ok(()),
        };
        if matches!(main, Err(Error::Io(_))) || matches!(kept, Err(Error::Io(_))) {
            self.failed.store(true, Ordering::SeqCst);
        }
        main.and(kept)
    }

    fn write_main(&mut self, fields: &Map<String, Value>, unix_ms: u64) -> Result<(), Error> {
        let line = chained_line(self.seq + 1, &self.prev, unix_ms, None, fields)?;
        write_whole(&mut self.out, &line)?;
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

/// Checks lines one at a time, as [`verify_files`] does, for readers that
/// need each line's place or read as lines are appended (`sbx audit
/// verify`, `sbx log --follow`). Read side only: writes nothing.
pub struct LineChecker(Chain);

impl LineChecker {
    /// `late_start`: the first line may continue a chain whose start was
    /// rotated away (a main log's oldest file), else it must be seq 1.
    pub fn new(late_start: bool) -> LineChecker {
        LineChecker(Chain::new(late_start))
    }

    /// Checks one whole line (without its line end) against the lines
    /// before it: its seq, or why it breaks the chain.
    pub fn check(&mut self, line: &str) -> Result<u64, String> {
        self.0.check(line)?;
        Ok(self.0.v.last_seq)
    }

    /// What the lines checked so far end with (`torn_tail` is never set).
    pub fn verified(&self) -> &Verified {
        &self.0.v
    }
}

/// The hash the next line's `prev` carries for `line` (without its end):
/// what an anchor keeps.
pub fn hash_of_line(line: &str) -> String {
    line_hash(line)
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

/// The evidence file of the log at `path`: `audit-evidence.log` for
/// `audit.log`, in the same directory.
pub fn evidence_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-evidence.{}", ext.to_string_lossy()),
        None => format!("{stem}-evidence"),
    };
    path.with_file_name(name)
}

/// Checks the evidence file `file` (see [`evidence_path`]) as one chain
/// from seq 1: it is never rotated, so its head may not be missing. A
/// partial last line is reported in [`Verified::torn_tail`]. Errors name
/// the file.
pub fn verify_evidence(file: &Path) -> Result<Verified, Error> {
    let in_file = |e: Error| Error::InFile { file: file.to_path_buf(), source: Box::new(e) };
    let f = File::open(file).map_err(|e| in_file(e.into()))?;
    let mut chain = Chain::new(false);
    chain.feed(BufReader::new(f), true).map_err(in_file)?;
    Ok(chain.v)
}

/// The evidence file checked, and what of it the kept main log no longer
/// has (see [`evidence_report`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceReport {
    pub file: PathBuf,
    pub verified: Verified,
    /// Its lines (as in the file, each with its line end) whose event is
    /// not in the kept main log: rotated away, written when the main log
    /// could not be, from before the main log restarted, or the evidence
    /// file's own notes.
    pub older: Vec<u8>,
    /// How many lines `older` holds.
    pub older_lines: u64,
}

impl fmt::Display for EvidenceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.verified)?;
        match self.older_lines {
            0 => write!(f, "; each of its refusals is also in the kept audit log"),
            n => write!(f, "; {n} of its lines (refusals kept as evidence) are no longer in the kept audit log"),
        }
    }
}

/// Verifies the evidence file of the log at `path` (None if there is
/// none) and picks out its lines that the main log, as `main` verified
/// it, no longer holds: those whose `main_seq` is outside `main`'s
/// range (or null), and every line before the last note of the main
/// log's restart (their `main_seq` is of the chain kept aside).
pub fn evidence_report(path: &Path, main: &Verified) -> Result<Option<EvidenceReport>, Error> {
    let file = evidence_path(path);
    if !file.is_file() {
        return Ok(None);
    }
    let verified = verify_evidence(&file)?;
    let in_file = |e: Error| Error::InFile { file: file.clone(), source: Box::new(e) };
    let mut input = BufReader::new(File::open(&file).map_err(|e| in_file(e.into()))?);
    // Only the lines verified: the VMM may be appending.
    let mut lines: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut restart = 0;
    for _ in 0..verified.lines {
        let mut buf = Vec::new();
        (&mut input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| in_file(e.into()))?;
        let v: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
        if v["event"] == "log_restarted" && v["log"] == "main" {
            restart = lines.len();
        }
        let in_main =
            main.lines > 0 && v["main_seq"].as_u64().is_some_and(|s| (main.first_seq..=main.last_seq).contains(&s));
        lines.push((buf, in_main));
    }
    let mut older = Vec::new();
    let mut older_lines = 0;
    for (i, (line, in_main)) in lines.into_iter().enumerate() {
        if i < restart || !in_main {
            older.extend_from_slice(&line);
            older_lines += 1;
        }
    }
    Ok(Some(EvidenceReport { file, verified, older, older_lines }))
}

/// An audit log opened by [`open`], and what had to be done first.
pub struct Opened<W: Write> {
    pub log: AuditLog<W>,
    /// What the chain continues from (None: a new chain).
    pub resumed: Option<Verified>,
    /// What the evidence file's chain continues from (None: a new chain).
    pub evidence: Option<Verified>,
    /// For the user: a torn tail cut, a broken log kept aside.
    pub notes: Vec<String>,
}

/// Cuts a verified file's torn tail off, saying so in `notes` and `events`.
fn cut_torn_tail(
    file: &Path,
    v: &Verified,
    log: &str,
    notes: &mut Vec<String>,
    events: &mut Vec<Value>,
) -> Result<(), Error> {
    if let Some(torn) = &v.torn_tail {
        OpenOptions::new().write(true).open(file)?.set_len(torn.offset)?;
        notes.push(format!("{}: {torn}; cut off before continuing", file.display()));
        events.push(json!({"event": "torn_tail", "log": log, "file": file.display().to_string(),
            "offset": torn.offset, "bytes": torn.bytes, "action": "cut off"}));
    }
    Ok(())
}

/// Renames `files` aside (`….broken-<now_ms>`), saying why in `notes`
/// and `events`.
fn keep_aside(
    files: &[PathBuf],
    e: &Error,
    log: &str,
    now_ms: u64,
    notes: &mut Vec<String>,
    events: &mut Vec<Value>,
) -> Result<(), Error> {
    let mut kept = Vec::new();
    for file in files {
        let aside = with_suffix(file, &format!(".broken-{now_ms}"));
        fs::rename(file, &aside)?;
        kept.push(aside.display().to_string());
    }
    notes.push(format!("{e}; kept as {} and started a new log", kept.join(", ")));
    events.push(json!({"event": "log_restarted", "log": log, "reason": e.to_string(), "kept_as": kept}));
    Ok(())
}

/// Opens the log at `path` (and its rotated files, and its evidence file)
/// for appending, continuing their chains, the evidence file kept within
/// [`EvidenceCap::default`]. A torn last line is cut off first, and a line
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
    open_with(path, rotation, EvidenceCap::default(), now_ms, wrap)
}

/// [`open`], the evidence file kept within `evidence`.
pub fn open_with<W: Write>(
    path: &Path,
    rotation: Rotation,
    evidence: EvidenceCap,
    now_ms: u64,
    wrap: impl FnOnce(AuditFile) -> W,
) -> Result<Opened<W>, Error> {
    let files = log_files(path)?;
    let mut notes = Vec::new();
    let mut events = Vec::new();
    let resumed = match verify_files(&files) {
        Ok(_) if files.is_empty() => None,
        Ok(v) => {
            if let Some(last) = files.last() {
                cut_torn_tail(last, &v, "main", &mut notes, &mut events)?;
            }
            Some(v)
        }
        Err(e) => {
            keep_aside(&files, &e, "main", now_ms, &mut notes, &mut events)?;
            None
        }
    };
    let evidence_file = evidence_path(path);
    let evidence_resumed = match evidence_file.is_file().then(|| verify_evidence(&evidence_file)) {
        None => None,
        Some(Ok(v)) => {
            cut_torn_tail(&evidence_file, &v, "evidence", &mut notes, &mut events)?;
            Some(v)
        }
        Some(Err(e)) => {
            keep_aside(std::slice::from_ref(&evidence_file), &e, "evidence", now_ms, &mut notes, &mut events)?;
            None
        }
    };
    // Never rotated: it keeps the oldest and then only counts.
    let kept = AuditFile::open(&evidence_file, Rotation { cap: u64::MAX, keep: 2 })?;
    let size = kept.size;
    let out = wrap(AuditFile::open(path, rotation)?);
    let log = match &resumed {
        Some(v) => AuditLog::resume(out, v),
        None => AuditLog::new(out),
    };
    let mut log = log.with_evidence(Box::new(kept), evidence_resumed.as_ref(), size, evidence);
    for event in events {
        log.record_note(event, now_ms)?;
    }
    Ok(Opened { log, resumed, evidence: evidence_resumed, notes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Serialize)]
    struct Http<'a> {
        event: &'a str,
        method: &'a str,
        host: &'a str,
        decision: &'a str,
    }

    /// `event` as the untyped event it serialises to (these tests check
    /// the log itself, on any object, and on what is not one).
    fn ev<T: Serialize>(event: T) -> Event {
        Event::Untyped(serde_json::to_value(event).unwrap())
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
            log.record(&ev(Http { event: "http", method: "GET", host, decision }), 1000 + i as u64).unwrap();
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

    /// The log's file, every byte written to it also kept in memory (the
    /// lines rotated away included), for counting.
    struct Tee(AuditFile, Arc<Mutex<Vec<u8>>>);

    impl Write for Tee {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    /// Events of `kind` in `lines`: written whole (as `is_kind` says) and
    /// counted in summaries.
    fn written_and_counted(lines: &[Value], kind: &str, is_kind: &dyn Fn(&Value) -> bool) -> (u64, u64) {
        let whole = lines.iter().filter(|l| is_kind(l)).count() as u64;
        let counted = lines
            .iter()
            .filter(|l| l["event"] == "suppressed" && l["kind"] == kind)
            .map(|l| l["count"].as_u64().unwrap())
            .sum();
        (whole, counted)
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
        log.record(&ev(Http { event: "http", method: "POST", host: "a.com", decision: "allow" }), 2000).unwrap();
        let mut all = first;
        all.extend_from_slice(log.get_ref());
        assert_eq!(verify(&all[..]).unwrap().lines, 4);
    }

    #[test]
    fn reserved_keys_cannot_be_forged_and_non_objects_are_refused() {
        let mut log = AuditLog::new(Vec::new());
        let forged = json!({"event": "x", "seq": 99, "prev": "ff", "main_seq": 1});
        log.record(&ev(forged), 1).unwrap();
        assert_eq!(verify(&log.get_ref()[..]).unwrap().lines, 1);
        assert!(matches!(log.record(&ev("a string"), 1), Err(Error::NotAnObject)));
    }

    #[test]
    fn long_strings_are_cut_saying_so() {
        let mut log = AuditLog::new(Vec::new());
        log.record(&ev(json!({"event": "file", "op": "write", "path": "é".repeat(MAX_FIELD)})), 1).unwrap();
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
        let leak = json!({"event": "http", "host": "a.com", "decision": "deny", "leak": "gh", "op": "x"});
        assert_eq!(kind(leak).as_deref(), Some("http/leak"), "leak attempts have a burst of their own");
        assert!(is_leak_kind("http/leak") && !is_leak_kind("http/deny"));
        assert_eq!(kind(json!({"event": "file", "op": "write", "decision": "allow"})), None);
        assert_eq!(kind(json!({"event": "http", "host": "a.com", "decision": "allow"})), None);
        assert_eq!(kind(json!({"event": "upstream", "error": "refused"})), None);
        let long = kind(json!({"event": "file", "op": "x".repeat(1000), "decision": "deny"})).unwrap();
        assert!(long.len() <= 2 * MAX_KIND_PART + 10, "{long}");
    }

    #[test]
    fn a_loop_of_refusals_writes_a_burst_then_one_summary_per_window() {
        let limits = Limits { burst: 5, change_burst: 5, interval_ms: 1000, ..Limits::default() };
        let mut log = AuditLog::new(Vec::new()).with_limits(limits);
        // 10 000 refusals over 10 windows, each followed by an allowed write.
        for i in 0..10_000u64 {
            log.record(&ev(file_deny(&format!("/w/.env{i}"))), i).unwrap();
            if i % 1000 == 0 {
                log.record(&ev(json!({"event": "file", "op": "write", "path": "/w/a", "decision": "allow"})), i)
                    .unwrap();
            }
        }
        log.flush_suppressed(10_000).unwrap();
        let lines = lines_of(log.get_ref());
        let count = |pred: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| pred(l)).count();
        assert_eq!(count(&|l| l["decision"] == "allow"), 10, "one allowed change a window: under its burst");
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
            log.record(&ev(event), 1_000 + i / 100).unwrap();
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
        let mut log = AuditLog::new(Vec::new()).with_limits(Limits {
            burst: 2,
            change_burst: 2,
            interval_ms: 100,
            ..Limits::default()
        });
        for t in 0..50 {
            log.record(&ev(json!({"event": "refused", "what": "IPv6"})), t).unwrap();
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
        let limits = Limits { burst: 1, change_burst: 1, interval_ms: 60_000, ..Limits::default() };
        {
            let file = AuditFile::open(&dir.log(), Rotation::default()).unwrap();
            let log = AuditLog::new(file).with_limits(limits).shared();
            for t in 0..10 {
                log.lock().unwrap().record(&ev(file_deny("/w/.env")), 500 + t).unwrap();
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
        // Every request written whole: this is about rotation.
        let limits = Limits { request_burst: u32::MAX, ..Limits::default() };
        let mut log = AuditLog::new(AuditFile::open(&dir.log(), rotation).unwrap()).with_limits(limits);
        let event = |i: u64| json!({"event": "http", "method": "GET", "host": format!("h{i}.example")});
        for i in 0..1000 {
            log.record(&ev(event(i)), i).unwrap();
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
                log.record(
                    &ev(json!({"event": "dns", "name": format!("n{i}.com"), "decision": "allow"})),
                    run * 1000 + i,
                )
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
        log.record(&ev(json!({"event": "http", "host": "exfil.example", "decision": "allow"})), 1).unwrap();
        let mut now = 2;
        for i in 0..20_000u64 {
            let op = if i % 2 == 0 { "create" } else { "delete" };
            let path = format!("/work/project/node_modules/some-package/lib/file-{i}.js");
            log.record(&ev(json!({"event": "file", "op": op, "path": path, "decision": "allow"})), now).unwrap();
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
    fn a_dns_flood_cannot_push_a_refusal_out_of_the_kept_files() {
        // Old API only: fails on the code that wrote every allowed answer.
        let dir = TempDir::new();
        let path = dir.log();
        let opened = open(&path, Rotation::default(), 1, |f| f).unwrap();
        let mut log = opened.log;
        let refusal = json!({"event": "dns", "name": "exfil.evil.example", "decision": "deny", "rule": null});
        log.record(&ev(refusal), 1).unwrap();
        // 200 000 answers in three minutes (~180 bytes a line whole: over
        // the 32 MiB kept).
        for i in 0..200_000u64 {
            let name = format!("n{i}.allowed-registry.example.com");
            let event = json!({"event": "dns", "name": name, "decision": "allow", "rule": "*.example.com",
                "answer": "10.0.2.100"});
            log.record(&ev(event), 2 + i / 1000).unwrap();
        }
        drop(log);
        let files = log_files(&path).unwrap();
        assert!(total_size(&files) <= KEEP_FILES as u64 * FILE_CAP);
        let text: String = files.iter().map(|f| fs::read_to_string(f).unwrap()).collect();
        assert!(text.contains("exfil.evil.example"), "the refusal is still in the kept files");
        assert_eq!(verify_files(&files).unwrap().first_seq, 1, "nothing rotated away");
    }

    fn leak(host: &str) -> Value {
        json!({"event": "http", "method": "POST", "host": host, "path": "/upload", "decision": "deny", "leak": "github",
            "reason": format!("the placeholder of credential 'github' was sent to {host} (leak attempt)")})
    }

    #[test]
    fn a_guest_flood_keeps_every_refusal_and_leak_attempt_as_verifiable_evidence() {
        let dir = TempDir::new();
        let path = dir.log();
        // Small main files, so that the flood does rotate the first
        // refusals out of them: only the evidence file keeps those.
        let rotation = Rotation { cap: 1 << 20, keep: 2 };
        let all = Arc::new(Mutex::new(Vec::new()));
        let tee = all.clone();
        let opened = open(&path, rotation, 1, move |f| Tee(f, tee)).unwrap();
        assert!(opened.notes.is_empty() && opened.evidence.is_none());
        let mut log = opened.log;
        let refusals = |t: u64, n: u64| {
            vec![
                json!({"event": "dns", "name": format!("exfil-{n}.evil.example"), "decision": "deny", "rule": null}),
                json!({"event": "refused", "what": format!("TCP to 192.0.2.{n}:22")}),
                file_deny(&format!("/work/.env-{n}")),
                leak(&format!("paste-{n}.evil.example")),
            ]
            .into_iter()
            .map(move |e| (e, t))
        };
        for (e, t) in refusals(1, 1) {
            log.record(&ev(e), t).unwrap();
        }
        // 200 000 allowed answers and 5 000 long allowed requests (each
        // with its connection's end) over 20 minutes, from 40 hosts.
        let long_path = format!("/search?q={}", "x".repeat(8000));
        let (mut now, mut requests, mut bytes_up) = (10u64, 0u64, 0u64);
        for i in 0..200_000u64 {
            let name = format!("n{i}.registry.example.com");
            log.record(&ev(json!({"event": "dns", "name": name, "decision": "allow", "answer": "10.0.2.100"})), now)
                .unwrap();
            if i % 40 == 0 {
                let host = format!("h{}.example.com", requests % 40);
                let up = 8000 + requests;
                let request = json!({"event": "http", "method": "GET", "host": host, "path": long_path,
                    "decision": "allow", "status": 200, "bytes_up": up, "bytes_down": 100});
                log.record(&ev(request), now).unwrap();
                log.record(
                    &ev(json!({"event": "conn_end", "dst": "10.0.2.100:80", "name": host,
                    "bytes_up": up, "bytes_down": 100})),
                    now,
                )
                .unwrap();
                requests += 1;
                bytes_up += up;
            }
            now += 6;
        }
        for (e, t) in refusals(now, 2) {
            log.record(&ev(e), t).unwrap();
        }
        log.flush_suppressed(now).unwrap();
        drop(log);
        assert_eq!(requests, 5000);

        // Bounded: the main files by their rotation, the evidence by its cap.
        let files = log_files(&path).unwrap();
        assert!(total_size(&files) <= 2 << 20, "{}", total_size(&files));
        let evidence = evidence_path(&path);
        assert_eq!(evidence, dir.0.join("audit-evidence.log"));
        assert!(fs::metadata(&evidence).unwrap().len() <= EvidenceCap::default().total());

        // The first refusals were rotated out of the main files ...
        let main = verify_files(&files).unwrap();
        assert!(main.first_seq > 1, "{main}");
        let kept: String = files.iter().map(|f| fs::read_to_string(f).unwrap()).collect();
        assert!(!kept.contains("exfil-1.evil.example") && kept.contains("exfil-2.evil.example"));
        // ... and are all in the evidence file, verified, shown as older.
        let report = evidence_report(&path, &main).unwrap().unwrap();
        assert_eq!(report.verified.torn_tail, None);
        let older = String::from_utf8(report.older.clone()).unwrap();
        for marker in ["exfil-1.evil.example", "192.0.2.1:22", "/work/.env-1", "paste-1.evil.example"] {
            assert!(older.contains(marker), "{marker} is kept as evidence");
        }
        assert_eq!(report.older_lines, 4, "{older}");
        assert!(report.to_string().contains("4 of its lines"), "{report}");
        let text = fs::read_to_string(&evidence).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 8, "refusals only: {text}");
        assert!(lines.iter().all(|l| l["decision"] == "deny" || l["event"] == "refused"));
        assert_eq!(lines.iter().filter(|l| l["leak"] == "github").count(), 2);
        // Each evidence line names its line in the main log.
        let main_lines = lines_of(&all.lock().unwrap());
        for l in &lines {
            let seq = l["main_seq"].as_u64().unwrap();
            let m = &main_lines[seq as usize - 1];
            assert_eq!((m["seq"].as_u64(), &m["event"], &m["reason"]), (Some(seq), &l["event"], &l["reason"]));
        }

        // Every event written or counted; no more than a burst a window.
        let windows = now / DENY_INTERVAL_MS + 1;
        let dns = written_and_counted(&main_lines, "dns/allow", &|l| l["event"] == "dns" && l["decision"] == "allow");
        let http =
            written_and_counted(&main_lines, "http/allow", &|l| l["event"] == "http" && l["decision"] == "allow");
        let ends = written_and_counted(&main_lines, "conn_end", &|l| l["event"] == "conn_end");
        assert_eq!(dns.0 + dns.1, 200_000);
        assert_eq!((http.0 + http.1, ends.0 + ends.1), (5000, 5000));
        assert!(dns.0 <= windows * DNS_BURST as u64 && http.0 <= windows * REQUEST_BURST as u64, "{dns:?} {http:?}");
        assert!(ends.0 <= windows * ROUTINE_BURST as u64);
        // The summaries say where the requests went, and how much.
        let summaries: Vec<&Value> =
            main_lines.iter().filter(|l| l["event"] == "suppressed" && l["kind"] == "http/allow").collect();
        for s in &summaries {
            let named: u64 = s["targets"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
            assert_eq!(named + s["other_targets"].as_u64().unwrap_or(0), s["count"].as_u64().unwrap(), "{s}");
            assert_eq!(s["targets"].as_object().unwrap().len(), MAX_TARGETS.min(40));
        }
        let up_whole: u64 = main_lines
            .iter()
            .filter(|l| l["event"] == "http" && l["decision"] == "allow")
            .map(|l| l["bytes_up"].as_u64().unwrap())
            .sum();
        let up_counted: u64 = summaries.iter().map(|s| s["bytes_up"].as_u64().unwrap()).sum();
        assert_eq!(up_whole + up_counted, bytes_up);
        // Written in all (rotated away included): within the documented
        // rate, where writing each line whole would be over 76 MB.
        let written = all.lock().unwrap().len() as u64;
        let per_window = DNS_BURST as u64 * 1024
            + REQUEST_BURST as u64 * (2 * MAX_FIELD as u64 + 1024)
            + ROUTINE_BURST as u64 * 1024
            + 3 * (MAX_TARGETS * (MAX_TARGET + 16) + 512) as u64;
        assert!(written <= windows * per_window, "{written} bytes");
        assert!(written < 30 << 20, "{written} bytes");
    }

    #[test]
    fn the_evidence_file_keeps_the_oldest_refusals_and_counts_the_rest() {
        let dir = TempDir::new();
        let path = dir.log();
        let cap = EvidenceCap { cap: 16 << 10, leak_room: 4 << 10, note_room: 4 << 10 };
        let events = 2000u64;
        let mut now = 0;
        for run in 0..2 {
            let opened = open_with(&path, Rotation::default(), cap, now, |f| f).unwrap();
            assert_eq!(opened.evidence.is_some(), run == 1);
            let mut log = opened.log;
            for _ in 0..events {
                // 600 a minute: a burst whole in each window, the rest counted.
                log.record(&ev(file_deny(&format!("/work/secret-{now}"))), now).unwrap();
                now += 100;
            }
            log.record(&ev(leak("paste.evil.example")), now).unwrap();
            log.flush_suppressed(now).unwrap();
        }
        let evidence = evidence_path(&path);
        assert!(fs::metadata(&evidence).unwrap().len() <= cap.total());
        let v = verify_evidence(&evidence).unwrap();
        assert_eq!((v.first_seq, v.torn_tail), (1, None));
        let lines = lines_of(&fs::read(&evidence).unwrap());
        // The oldest kept, in order.
        assert_eq!(lines[0]["path"], "/work/secret-0");
        assert_eq!(lines[1]["path"], "/work/secret-100");
        assert_eq!(lines.iter().filter(|l| l["event"] == "evidence_full").count(), 1);
        // The first leak attempt is kept though the refusals filled the cap.
        let leaks: Vec<&Value> = lines.iter().filter(|l| l["leak"] == "github").collect();
        assert_eq!(leaks.len(), 2, "both runs' leak attempts have room");
        assert!(lines.iter().position(|l| l["event"] == "evidence_full").unwrap() < lines.len() - 3);
        // Kept whole + kept in summaries + counted = every refusal.
        let kind = "file/open/deny";
        let (whole, summarised) = written_and_counted(&lines, kind, &|l| l["decision"] == "deny" && l["op"] == "open");
        let counted: Vec<&Value> = lines.iter().filter(|l| l["event"] == "evidence_counted").collect();
        assert_eq!(counted.len(), 2, "one a run");
        let not_kept: u64 = counted.iter().map(|c| c["refusals"][kind].as_u64().unwrap()).sum();
        assert_eq!(whole + summarised + not_kept, 2 * events);
        assert!(not_kept > events, "the second run found the file full: {not_kept}");
        // The main log has the same notes.
        let main = fs::read_to_string(&path).unwrap();
        assert_eq!(main.matches("\"evidence_counted\"").count(), 2);
        assert!(verify_files(&log_files(&path).unwrap()).is_ok());
    }

    #[test]
    fn the_evidence_chain_catches_tampering_and_its_torn_tail_is_cut() {
        let dir = TempDir::new();
        let path = dir.log();
        let write = |t: u64, names: &[&str]| {
            let mut log = open(&path, Rotation::default(), t, |f| f).unwrap().log;
            for (i, n) in names.iter().enumerate() {
                log.record(&ev(json!({"event": "dns", "name": n, "decision": "deny"})), t + i as u64).unwrap();
            }
        };
        write(1, &["a.evil.example", "b.evil.example", "c.evil.example"]);
        let evidence = evidence_path(&path);
        let text = fs::read_to_string(&evidence).unwrap();
        let main = verify_files(&log_files(&path).unwrap()).unwrap();
        assert_eq!(verify_evidence(&evidence).unwrap().lines, 3);
        assert_eq!(evidence_report(&path, &main).unwrap().unwrap().older_lines, 0);

        // Edited, removed, beheaded: caught, naming the file.
        let lines: Vec<&str> = text.lines().collect();
        let edited = text.replacen("a.evil.example", "a.good.example", 1);
        let removed = format!("{}\n{}\n", lines[0], lines[2]);
        let beheaded = format!("{}\n{}\n", lines[1], lines[2]);
        for (bad, line) in [(edited, 2), (removed, 2), (beheaded, 1)] {
            fs::write(&evidence, bad).unwrap();
            let err = verify_evidence(&evidence).unwrap_err();
            assert!(
                matches!(&err, Error::InFile { file, source } if *file == evidence
                    && matches!(**source, Error::Broken { line: l, .. } if l == line)),
                "{err}"
            );
            assert!(evidence_report(&path, &main).is_err(), "sbx log --audit refuses it");
        }

        // A torn tail: reported, then cut on open, saying so in both files.
        let mut torn = text.clone().into_bytes();
        torn.extend_from_slice(b"{\"seq\":4,\"ts\":9,\"pre");
        fs::write(&evidence, &torn).unwrap();
        let v = verify_evidence(&evidence).unwrap();
        assert_eq!(v.torn_tail, Some(TornTail { offset: text.len() as u64, bytes: 20 }));
        let opened = open(&path, Rotation::default(), 50, |f| f).unwrap();
        assert!(opened.notes.len() == 1 && opened.notes[0].contains("audit-evidence.log"), "{:?}", opened.notes);
        drop(opened);
        let v = verify_evidence(&evidence).unwrap();
        assert_eq!((v.lines, v.torn_tail), (4, None));
        let last = lines_of(&fs::read(&evidence).unwrap()).pop().unwrap();
        assert_eq!(
            (&last["event"], &last["log"], last["bytes"].as_u64()),
            (&json!("torn_tail"), &json!("evidence"), Some(20))
        );
        assert!(fs::read_to_string(&path).unwrap().contains("\"torn_tail\""));

        // A broken evidence file is kept aside, and a new chain says why.
        fs::write(&evidence, text.replacen("b.evil.example", "b.good.example", 1)).unwrap();
        let opened = open(&path, Rotation::default(), 77, |f| f).unwrap();
        assert!(opened.evidence.is_none() && opened.notes[0].contains("broken-77"), "{:?}", opened.notes);
        drop(opened);
        assert!(dir.0.join("audit-evidence.log.broken-77").is_file());
        let lines = lines_of(&fs::read(&evidence).unwrap());
        assert_eq!((&lines[0]["event"], &lines[0]["log"]), (&json!("log_restarted"), &json!("evidence")));
        assert!(verify_evidence(&evidence).is_ok());
    }

    #[test]
    fn evidence_from_before_the_main_log_restarted_is_shown_as_older() {
        let dir = TempDir::new();
        let path = dir.log();
        {
            let mut log = open(&path, Rotation::default(), 1, |f| f).unwrap().log;
            log.record(&ev(leak("paste.evil.example")), 2).unwrap();
            log.record(&ev(json!({"event": "dns", "name": "ok.example", "decision": "allow"})), 3).unwrap();
        }
        // The main log is tampered with: kept aside, a new chain (seq 1
        // again, so the old main_seq would look as if still there).
        let text = fs::read_to_string(&path).unwrap().replacen("paste.evil", "paste.good", 1);
        fs::write(&path, text).unwrap();
        {
            let mut log = open(&path, Rotation::default(), 10, |f| f).unwrap().log;
            log.record(&ev(json!({"event": "refused", "what": "UDP to 192.0.2.9:53"})), 11).unwrap();
        }
        let main = verify_files(&log_files(&path).unwrap()).unwrap();
        let report = evidence_report(&path, &main).unwrap().unwrap();
        let older = String::from_utf8(report.older).unwrap();
        assert!(older.contains("paste.evil.example"), "{older}");
        assert!(!older.contains("192.0.2.9"), "that one is in the kept main log");
    }

    #[test]
    fn every_kind_of_allowed_event_is_aggregated_naming_where_it_went() {
        let limits =
            Limits { dns_burst: 3, request_burst: 4, routine_burst: 5, interval_ms: 1000, ..Limits::default() };
        let mut log = AuditLog::new(Vec::new()).with_limits(limits);
        let sink = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        log = log.with_evidence(Box::new(Shared(sink.clone())), None, 0, EvidenceCap::default());
        for i in 0..1000u64 {
            let host = format!("h{}.example", i % 40);
            log.record(&ev(json!({"event": "http", "host": host, "decision": "allow", "bytes_up": 10})), i).unwrap();
            log.record(&ev(json!({"event": "tls", "sni": host, "decision": "allow"})), i).unwrap();
            log.record(&ev(json!({"event": "dns", "name": host, "decision": "allow"})), i).unwrap();
            log.record(&ev(json!({"event": "upstream", "dst": "192.0.2.1:443", "error": "refused"})), i).unwrap();
            log.record(&ev(json!({"event": "conn_end", "dst": "192.0.2.1:443", "name": host})), i).unwrap();
        }
        log.flush_suppressed(1000).unwrap();
        let lines = lines_of(log.get_ref());
        let by = |kind: &str, burst: u64, is: &dyn Fn(&Value) -> bool| {
            let (whole, counted) = written_and_counted(&lines, kind, is);
            assert_eq!((whole, whole + counted), (burst, 1000), "{kind}");
            let s = lines.iter().find(|l| l["event"] == "suppressed" && l["kind"] == kind).unwrap();
            let named: u64 = s["targets"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
            assert_eq!(named + s["other_targets"].as_u64().unwrap_or(0), counted, "{s}");
            s.clone()
        };
        let http = by("http/allow", 4, &|l| l["event"] == "http");
        assert_eq!(http["targets"].as_object().unwrap().len(), MAX_TARGETS);
        // Named: the first 32 hosts counted (h4..h35); the rest are h36..h39
        // (25 each) and h0..h3 (written whole first, then 24 each).
        assert_eq!(
            (http["other_targets"].as_u64(), http["bytes_up"].as_u64()),
            (Some(4 * 25 + 4 * 24), Some(996 * 10))
        );
        by("tls/allow", 4, &|l| l["event"] == "tls");
        by("dns/allow", 3, &|l| l["event"] == "dns");
        let upstream = by("upstream/error", 5, &|l| l["event"] == "upstream");
        assert_eq!(upstream["targets"]["192.0.2.1:443"].as_u64(), Some(995));
        by("conn_end", 5, &|l| l["event"] == "conn_end");
        assert!(sink.lock().unwrap().is_empty(), "nothing routine goes to the evidence file");
        assert!(verify(&log.get_ref()[..]).is_ok());
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
        assert!(log.record(&ev(json!({"event": "http", "host": "a.example"})), 1).is_err());
        assert!(log.failed() && flag.load(Ordering::SeqCst), "the disk is full: fail closed");
    }
}
