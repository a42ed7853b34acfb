//! Host side: `sbx audit verify|anchor|export` and the reader behind
//! `sbx log --audit --json|--follow`. Reads the hash-chained logs the
//! `audit` crate (`sbx-audit`) writes (a sandbox's `audit.log`, its
//! rotated files and `audit-evidence.log`; `secrets-audit.log`; an anchors file),
//! offline, never writing to them. Everything in them past sbx's own keys
//! is the guest's to choose: printed escaped for the terminal unless
//! machine output is asked for. See docs/audit.md for what each check
//! proves and what it cannot.
//!
//! Anchors: [`anchor`] appends a sandbox's chain heads (main log and
//! evidence file: seq and hash of the last line, and the time) to an
//! anchors file outside sbx's state and the sandbox's workspace, itself a
//! hash chain. [`check_anchors`] then finds, for each anchor of that log:
//! the whole log deleted, its end cut back past the anchor (truncation, or
//! the newest files deleted), the anchored line changed (history
//! rewritten, or a restarted chain), and older files missing while fewer
//! than `audit::KEEP_FILES` are kept (rotation drops the oldest
//! only once that many exist; an anchored seq older than the first kept
//! line is otherwise expected). It cannot see lines appended after the
//! last anchor being dropped, nor anything done by someone who can also
//! rewrite the anchors file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use audit::{self as log, LineChecker, TornTail, Verified, MAX_LINE};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::escape::{self, Layout};
use crate::sandbox::{self, Sandbox};

/// The export format's schema name and version.
pub const SCHEMA: &str = "sbx-audit/1";
/// The OCSF schema version the `ocsf` export follows.
pub const OCSF_VERSION: &str = "1.1.0";
/// Exit code of `sbx audit verify` for a broken chain or failed anchor.
pub const EXIT_BROKEN: u8 = 1;
/// Exit code of `sbx audit verify` for bad input.
pub const EXIT_BAD_INPUT: u8 = 2;
/// How often `--follow` looks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// Largest anchors file read.
const MAX_ANCHORS_FILE: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("There is no audit log at {0} (nothing was recorded yet, or it was deleted)")]
    NoLog(PathBuf),
    #[error("{0}")]
    Broken(Break),
    #[error("The anchors file {0} does not verify: {1} (it was edited; keep it where only you can write)")]
    AnchorsBroken(PathBuf, Break),
    #[error("Refusing to keep anchors in {0}: it is inside {1}, which {2} can write (keep them elsewhere)")]
    AnchorsInside(PathBuf, PathBuf, &'static str),
    #[error("Cannot write the anchors file {0}: {1}")]
    AnchorWrite(PathBuf, String),
    #[error(
        "Cannot reach the system log at {0}: {1} (is a syslog daemon or systemd-journald running? name its \
         socket with --to syslog:PATH)"
    )]
    Syslog(PathBuf, io::Error),
    #[error("Bad --format '{0}': expected jsonl or ocsf")]
    Format(String),
    #[error("Give a sandbox name or --all, not both")]
    Which,
    #[error("Cannot write to stdout: {0}")]
    Stdout(io::Error),
}

/// Where a chain breaks: the first line that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub file: PathBuf,
    /// Line number in `file`, from 1.
    pub line: u64,
    /// The line's own `seq`, if it has one that parses.
    pub seq: Option<u64>,
    pub why: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seq = self.seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
        write!(f, "{} line {}{seq}: {}", self.file.display(), self.line, self.why)
    }
}

/// The seq a line says it has, if it parses that far.
fn seq_of(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(line).ok()?.get("seq")?.as_u64()
}

/// One file of a walked chain: its seq range (None: empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    pub file: PathBuf,
    pub seqs: Option<(u64, u64)>,
}

/// A chain walked: what it ends with, per file, the hashes of the seqs
/// asked for, a torn tail.
#[derive(Debug, Clone)]
pub struct Walked {
    pub verified: Verified,
    pub files: Vec<FileRange>,
    pub hashes: BTreeMap<u64, String>,
    pub torn_tail: Option<(PathBuf, TornTail)>,
}

/// Verifies `files` (oldest first) as one chain, calling `each` with every
/// verified line; keeps the hash of each seq in `wanted`. `late_start`:
/// the first may continue a chain rotated away (a main log).
pub fn walk(
    files: &[PathBuf],
    late_start: bool,
    wanted: &BTreeSet<u64>,
    each: &mut dyn FnMut(&str),
) -> Result<Walked, Error> {
    let mut checker = LineChecker::new(late_start);
    let mut ranges = Vec::new();
    let mut hashes = BTreeMap::new();
    let mut torn_tail = None;
    for (i, file) in files.iter().enumerate() {
        let f = File::open(file).map_err(|e| Error::Io(file.clone(), e))?;
        let mut input = BufReader::new(f);
        let (mut n, mut offset, mut first) = (0u64, 0u64, None);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let got = (&mut input)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::Io(file.clone(), e))?;
            if got == 0 {
                break;
            }
            n += 1;
            let broken =
                |why: String, buf: &[u8]| Error::Broken(Break { file: file.clone(), line: n, seq: seq_of(buf), why });
            if buf.last() != Some(&b'\n') {
                if got > MAX_LINE {
                    return Err(broken(format!("longer than {MAX_LINE} bytes"), &[]));
                }
                if i + 1 != files.len() {
                    return Err(broken("partial line (no line end) before the last file of the log".into(), &buf));
                }
                torn_tail = Some((file.clone(), TornTail { offset, bytes: got as u64 }));
                break;
            }
            buf.pop();
            let line = std::str::from_utf8(&buf).map_err(|_| broken("not UTF-8".into(), &buf))?;
            let seq = checker.check(line).map_err(|why| broken(why, line.as_bytes()))?;
            first.get_or_insert(seq);
            if wanted.contains(&seq) {
                hashes.insert(seq, log::hash_of_line(line));
            }
            each(line);
            offset += got as u64;
        }
        let last = checker.verified().last_seq;
        ranges.push(FileRange { file: file.clone(), seqs: first.map(|f| (f, last)) });
    }
    Ok(Walked { verified: checker.verified().clone(), files: ranges, hashes, torn_tail })
}

// ---- Anchors ----

/// One anchor of one log, as kept in the anchors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The anchors file's line number.
    pub line: u64,
    /// The audit log's path (`…/audit.log`).
    pub log: String,
    /// When it was taken (unix ms).
    pub ts: u64,
    /// The main chain's head: seq and hash (None: the log was empty).
    pub main: Option<(u64, String)>,
    /// The evidence chain's head.
    pub evidence: Option<(u64, String)>,
}

/// Reads `file`'s anchors of the log at `log_path` (all of them if None),
/// after verifying the anchors file's own chain.
pub fn read_anchors(file: &Path, log_path: Option<&Path>) -> Result<Vec<Anchor>, Error> {
    let meta = fs::metadata(file).map_err(|e| Error::Io(file.to_path_buf(), e))?;
    if meta.len() > MAX_ANCHORS_FILE {
        return Err(Error::Io(file.to_path_buf(), io::Error::other("larger than sbx reads")));
    }
    let mut lines = Vec::new();
    walk(&[file.to_path_buf()], false, &BTreeSet::new(), &mut |l| lines.push(l.to_string())).map_err(|e| match e {
        Error::Broken(b) => Error::AnchorsBroken(file.to_path_buf(), b),
        e => e,
    })?;
    let head = |v: &Value| Some((v.get("seq")?.as_u64()?, v.get("hash")?.as_str()?.to_string()));
    let want = log_path.map(|p| p.display().to_string());
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
        if v["event"] != "anchor" {
            continue;
        }
        let log = v["log"].as_str().unwrap_or("").to_string();
        if want.as_ref().is_some_and(|w| *w != log) {
            continue;
        }
        out.push(Anchor {
            line: i as u64 + 1,
            log,
            ts: v["ts"].as_u64().unwrap_or(0),
            main: head(&v["main"]),
            evidence: head(&v["evidence"]),
        });
    }
    Ok(out)
}

/// The log's path as anchors name it: absolute, its folder canonical.
fn anchor_name(log_path: &Path) -> PathBuf {
    let dir = log_path.parent().and_then(|d| crate::folders::canonical_lenient(d).ok());
    match (dir, log_path.file_name()) {
        (Some(d), Some(n)) => d.join(n),
        _ => log_path.to_path_buf(),
    }
}

/// Appends the heads of the log at `log_path` (verified first) to the
/// anchors file `to` (made 0600 if new), under an exclusive lock, the line
/// chained to the file's last. Returns the anchor line's fields.
pub fn anchor(log_path: &Path, sandbox_name: &str, to: &Path, now_ms: u64) -> Result<Value, Error> {
    let files = log::log_files(log_path).map_err(|e| Error::Io(log_path.to_path_buf(), e))?;
    let main = walk(&files, true, &BTreeSet::new(), &mut |_| {})?;
    let evidence_file = log::evidence_path(log_path);
    let evidence = if evidence_file.is_file() {
        Some(walk(&[evidence_file], false, &BTreeSet::new(), &mut |_| {})?)
    } else {
        None
    };
    let head =
        |w: &Walked| (w.verified.lines > 0).then(|| json!({"seq": w.verified.last_seq, "hash": w.verified.last_hash}));
    let current = main.files.iter().rev().find(|f| f.seqs.is_some()).map(|f| f.file.display().to_string());
    let event = json!({
        "event": "anchor",
        "sandbox": sandbox_name,
        "log": anchor_name(log_path).display().to_string(),
        "file": current,
        "files": main.files.len(),
        "first_seq": main.verified.first_seq,
        "main": head(&main),
        "evidence": evidence.as_ref().and_then(head),
        "time": crate::secrets::format_utc(now_ms / 1000),
    });
    let write_err = |e: String| Error::AnchorWrite(to.to_path_buf(), e);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode_0600()
        .open(to)
        .map_err(|e| Error::Io(to.to_path_buf(), e))?;
    let _lock = Lock::exclusive(&f).map_err(|e| Error::Io(to.to_path_buf(), e))?;
    let verified = log::verify_files(&[to.to_path_buf()]).map_err(|e| write_err(e.to_string()))?;
    if verified.torn_tail.is_some() || (verified.lines > 0 && verified.first_seq != 1) {
        return Err(write_err(format!("{verified}: fix or move it first")));
    }
    let mut chained = if verified.lines == 0 { log::AuditLog::new(f) } else { log::AuditLog::resume(f, &verified) };
    chained.record(&log::Event::Untyped(event.clone()), now_ms).map_err(|e| write_err(e.to_string()))?;
    chained.flush_suppressed(now_ms).map_err(|e| write_err(e.to_string()))?;
    Ok(event)
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// An exclusive flock(2) on a file, released on drop: two `sbx` appending
/// anchors at once would otherwise break the file's chain.
struct Lock(i32);

impl Lock {
    fn exclusive(f: &File) -> io::Result<Lock> {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        // SAFETY: flock takes no pointers; fd is open for the lock's life
        // (the Lock is dropped before the file).
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Lock(fd))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; unlocking an fd we locked.
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

/// What the anchors say of a log: each finding, for the user.
pub fn check_anchors(
    anchors: &[Anchor],
    main: Option<&Walked>,
    evidence: Option<&Walked>,
    anchors_file: &Path,
) -> Vec<String> {
    let mut findings = Vec::new();
    for a in anchors {
        let at = format!(
            "anchor of {} ({} line {})",
            crate::secrets::format_utc(a.ts / 1000),
            anchors_file.display(),
            a.line
        );
        if let Some((seq, hash)) = &a.main {
            match main.filter(|m| m.verified.lines > 0) {
                None => findings.push(format!("the audit log is gone: the {at} has it up to seq {seq} (deleted)")),
                Some(m) if *seq > m.verified.last_seq => findings.push(format!(
                    "the audit log ends at seq {} but the {at} has it up to seq {seq}: lines were cut off its end or its newest files deleted",
                    m.verified.last_seq
                )),
                Some(m) if *seq >= m.verified.first_seq => {
                    if m.hashes.get(seq) != Some(hash) {
                        findings.push(format!(
                            "seq {seq} is not the line the {at} saw: the history was rewritten (or the log restarted after a break: see its .broken-* files)"
                        ));
                    }
                }
                Some(m) if m.files.len() < log::KEEP_FILES => findings.push(format!(
                    "the audit log starts at seq {} and the {at} has seq {seq}, yet only {} of the {} files rotation keeps are there: older files were deleted",
                    m.verified.first_seq,
                    m.files.len(),
                    log::KEEP_FILES
                )),
                // Rotated away, as expected: nothing left to compare.
                Some(_) => {}
            }
        }
        if let Some((seq, hash)) = &a.evidence {
            match evidence.filter(|e| e.verified.lines > 0) {
                None => findings.push(format!("the evidence file is gone: the {at} has it up to seq {seq} (deleted)")),
                Some(e) if *seq > e.verified.last_seq => findings.push(format!(
                    "the evidence file ends at seq {} but the {at} has it up to seq {seq}: lines were cut off its end",
                    e.verified.last_seq
                )),
                Some(e) if e.hashes.get(seq) != Some(hash) => {
                    findings.push(format!("evidence seq {seq} is not the line the {at} saw: the history was rewritten"))
                }
                Some(_) => {}
            }
        }
    }
    findings
}

// ---- sbx audit verify ----

/// What `sbx audit verify` checks: a sandbox's logs, or files.
fn log_of(target: &str) -> Result<(PathBuf, Option<Sandbox>), Error> {
    let path = Path::new(target);
    if target.contains('/') || path.is_file() {
        return Ok((path.to_path_buf(), None));
    }
    let sb = Sandbox::open(&sandbox::home(), target)?;
    Ok((sb.audit_log(), Some(sb)))
}

fn is_evidence_file(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("-evidence"))
}

/// `sbx audit verify NAME|FILE [--anchors FILE]`: 0 intact, 1 broken, 2
/// bad input; what it found on stdout (escaped), errors on stderr.
pub fn verify(target: &str, anchors: Option<&Path>) -> ExitCode {
    let mut out = io::stdout().lock();
    match verify_report(target, anchors) {
        Ok((lines, ok)) => {
            for l in lines {
                let _ = writeln!(out, "{}", escape::escape(l.as_bytes(), Layout::Line));
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_BROKEN)
            }
        }
        Err(Error::Broken(b)) => {
            let _ = writeln!(out, "BROKEN: {}", escape::escape(b.to_string().as_bytes(), Layout::Line));
            ExitCode::from(EXIT_BROKEN)
        }
        Err(e @ Error::AnchorsBroken(..)) => {
            let _ = writeln!(out, "BROKEN: {}", escape::escape(e.to_string().as_bytes(), Layout::Line));
            ExitCode::from(EXIT_BROKEN)
        }
        Err(e) => {
            eprintln!("sbx: {}", escape::escape(e.to_string().as_bytes(), Layout::Line));
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// The report's lines and whether all is intact.
fn verify_report(target: &str, anchors_file: Option<&Path>) -> Result<(Vec<String>, bool), Error> {
    let (path, _) = log_of(target)?;
    let mut report = Vec::new();
    let anchors = match anchors_file {
        Some(f) => read_anchors(f, Some(&anchor_name(&path)))?,
        None => Vec::new(),
    };
    let main_wanted: BTreeSet<u64> = anchors.iter().filter_map(|a| a.main.as_ref().map(|m| m.0)).collect();
    let ev_wanted: BTreeSet<u64> = anchors.iter().filter_map(|a| a.evidence.as_ref().map(|m| m.0)).collect();
    let say = |what: &Path, w: &Walked| {
        let mut s = format!("{}: {}", what.display(), w.verified);
        if let Some((f, t)) = &w.torn_tail {
            s.push_str(&format!("; {}: {t}", f.display()));
        }
        s
    };
    if is_evidence_file(&path) {
        if !path.is_file() {
            return Err(Error::NoLog(path));
        }
        let w = walk(std::slice::from_ref(&path), false, &BTreeSet::new(), &mut |_| {})?;
        report.push(say(&path, &w));
        return Ok((report, true));
    }
    let files = log::log_files(&path).map_err(|e| Error::Io(path.clone(), e))?;
    let evidence_file = log::evidence_path(&path);
    if files.is_empty() && anchors.is_empty() && !evidence_file.is_file() {
        return Err(Error::NoLog(path));
    }
    let main = if files.is_empty() { None } else { Some(walk(&files, true, &main_wanted, &mut |_| {})?) };
    if let Some(m) = &main {
        report.push(say(&path, m));
        for f in &m.files {
            let range = f.seqs.map_or("empty".to_string(), |(a, b)| format!("seq {a} to {b}"));
            report.push(format!("  {}: {range}", f.file.display()));
        }
        if m.verified.first_seq > 1 && m.files.len() < log::KEEP_FILES {
            report.push(format!(
                "  note: it starts at seq {} with only {} files: rotation keeps {}, so older files may have been deleted",
                m.verified.first_seq,
                m.files.len(),
                log::KEEP_FILES
            ));
        }
    } else {
        report.push(format!("{}: missing", path.display()));
    }
    let evidence = if evidence_file.is_file() {
        let w = walk(std::slice::from_ref(&evidence_file), false, &ev_wanted, &mut |_| {})?;
        report.push(say(&evidence_file, &w));
        Some(w)
    } else {
        None
    };
    let mut ok = true;
    if let Some(f) = anchors_file {
        let findings = check_anchors(&anchors, main.as_ref(), evidence.as_ref(), f);
        if anchors.is_empty() {
            report.push(format!("{}: no anchor of this log", f.display()));
        } else if findings.is_empty() {
            let last = anchors.last().map(|a| crate::secrets::format_utc(a.ts / 1000)).unwrap_or_default();
            report.push(format!(
                "{}: {} anchors agree (the latest of {last}; lines after it are not covered)",
                f.display(),
                anchors.len()
            ));
        }
        for finding in findings {
            ok = false;
            report.push(format!("BROKEN: {finding}"));
        }
    }
    Ok((report, ok))
}

/// `sbx audit anchor NAME --to FILE`.
pub fn anchor_command(name: &str, to: &Path) -> Result<(), Error> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    check_anchor_place(to, &sb)?;
    let event = anchor(&sb.audit_log(), name, to, sandbox::now_unix_ms())?;
    let seq = |k: &str| event[k]["seq"].as_u64().map_or("empty".to_string(), |s| format!("seq {s}"));
    eprintln!("sbx: anchored '{name}' in {}: audit log {}, evidence {}", to.display(), seq("main"), seq("evidence"));
    Ok(())
}

/// The anchors file must be out of sbx's state and the sandbox's
/// workspace (the guest writes there).
pub fn check_anchor_place(to: &Path, sb: &Sandbox) -> Result<(), Error> {
    let place = crate::folders::canonical_lenient(to).map_err(|e| Error::Io(to.to_path_buf(), e))?;
    let home = sandbox::home();
    let state = crate::folders::canonical_lenient(&home).map_err(|e| Error::Io(home.clone(), e))?;
    if place.starts_with(&state) {
        return Err(Error::AnchorsInside(place, state, "whoever can change the audit logs"));
    }
    if place.starts_with(&sb.settings.workspace) {
        return Err(Error::AnchorsInside(place, sb.settings.workspace.clone(), "the sandbox's guest"));
    }
    Ok(())
}

/// The anchors file `sbx run` appends to when it ends: $SBX_AUDIT_ANCHORS.
pub fn anchors_from_env() -> Option<PathBuf> {
    std::env::var_os("SBX_AUDIT_ANCHORS").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// At the end of `sbx run`: anchors the sandbox's log if asked for (a
/// failure is said, not fatal: the run is over).
pub fn anchor_after_run(sb: &Sandbox) {
    let Some(to) = anchors_from_env() else { return };
    let r = check_anchor_place(&to, sb)
        .and_then(|_| anchor(&sb.audit_log(), &sb.settings.name, &to, sandbox::now_unix_ms()));
    if let Err(e) = r {
        eprintln!("sbx: SBX_AUDIT_ANCHORS: {}", escape::escape(e.to_string().as_bytes(), Layout::Line));
    }
}

// ---- sbx log --audit (--json, --follow) ----

/// Follows a main log as it is appended to and rotated, verifying each
/// line against the one before.
pub struct Follower {
    path: PathBuf,
    checker: LineChecker,
    /// The file being read, its identity, and the lines read from it.
    cur: Option<(File, PathBuf, (u64, u64), u64)>,
    partial: Vec<u8>,
    started: bool,
}

fn identity(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// The seq of a file's first line (None: empty or unreadable).
fn first_seq(file: &Path) -> Option<u64> {
    let mut buf = Vec::new();
    BufReader::new(File::open(file).ok()?).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).ok()?;
    seq_of(buf.strip_suffix(b"\n")?)
}

impl Follower {
    pub fn new(path: &Path) -> Follower {
        Follower {
            path: path.to_path_buf(),
            checker: LineChecker::new(true),
            cur: None,
            partial: Vec::new(),
            started: false,
        }
    }

    /// Where the chain goes on: the oldest file at the start, then the one
    /// whose first line is the next seq, or the current file once it is
    /// new and empty.
    fn next_file(&mut self) -> Result<Option<PathBuf>, Error> {
        let files = log::log_files(&self.path).map_err(|e| Error::Io(self.path.clone(), e))?;
        if !self.started {
            self.started = !files.is_empty();
            return Ok(files.first().cloned());
        }
        let want = self.checker.verified().last_seq + 1;
        if let Some(f) = files.iter().find(|f| first_seq(f) == Some(want)) {
            return Ok(Some(f.clone()));
        }
        match fs::metadata(&self.path) {
            Ok(m) if m.len() == 0 => Ok(Some(self.path.clone())),
            Ok(_) => Err(Error::Broken(Break {
                file: self.path.clone(),
                line: 1,
                seq: first_seq(&self.path),
                why: format!("seq {want} and on are in no file: rotated away before they were read, or removed"),
            })),
            Err(_) => Ok(None),
        }
    }

    /// Reads what is new, calling `out` with each verified line.
    pub fn poll(&mut self, out: &mut dyn FnMut(&str) -> Result<(), Error>) -> Result<(), Error> {
        loop {
            if self.cur.is_none() {
                let Some(file) = self.next_file()? else { return Ok(()) };
                let f = File::open(&file).map_err(|e| Error::Io(file.clone(), e))?;
                let id = identity(&f.metadata().map_err(|e| Error::Io(file.clone(), e))?);
                self.cur = Some((f, file, id, 0));
                self.partial.clear();
            }
            // Whether the file is still the current one, seen BEFORE reading
            // it: once renamed, the writer has moved on, so what is read
            // after this is all it will ever hold.
            let id = self.cur.as_ref().map(|c| c.2);
            let still_current = fs::metadata(&self.path).ok().map(|m| identity(&m)) == id;
            self.read_new(out)?;
            if still_current {
                return Ok(());
            }
            if let Some((_, file, _, n)) = &self.cur {
                if !self.partial.is_empty() {
                    return Err(Error::Broken(Break {
                        file: file.clone(),
                        line: n + 1,
                        seq: None,
                        why: "partial line (no line end) before the last file of the log".into(),
                    }));
                }
            }
            self.cur = None;
        }
    }

    fn read_new(&mut self, out: &mut dyn FnMut(&str) -> Result<(), Error>) -> Result<(), Error> {
        let Some((f, file, _, n)) = &mut self.cur else { return Ok(()) };
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let got = f.read(&mut chunk).map_err(|e| Error::Io(file.clone(), e))?;
            if got == 0 {
                return Ok(());
            }
            self.partial.extend_from_slice(&chunk[..got]);
            while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let line = &line[..line.len() - 1];
                *n += 1;
                let broken =
                    |why: String| Error::Broken(Break { file: file.clone(), line: *n, seq: seq_of(line), why });
                let text = std::str::from_utf8(line).map_err(|_| broken("not UTF-8".into()))?;
                self.checker.check(text).map_err(broken)?;
                out(text)?;
            }
            if self.partial.len() > MAX_LINE {
                let n = *n + 1;
                return Err(Error::Broken(Break {
                    file: file.clone(),
                    line: n,
                    seq: None,
                    why: format!("longer than {MAX_LINE} bytes"),
                }));
            }
        }
    }

    /// What the lines read so far end with.
    pub fn verified(&self) -> &Verified {
        self.checker.verified()
    }
}

/// `sbx log NAME --audit [--json] [--follow]`: the evidence file's lines
/// the kept log no longer has, then the log's, each verified; escaped for
/// the terminal, or with `json` exactly as written. `--follow` goes on as
/// lines are appended, across rotation, until `stop` is set (a signal) or,
/// with `until_stopped`, until the sandbox is not running and all is read.
pub fn print_log(
    name: &str,
    json_out: bool,
    follow: bool,
    until_stopped: bool,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let path = sb.audit_log();
    let files = log::log_files(&path).map_err(|e| Error::Io(path.clone(), e))?;
    if files.is_empty() && !follow {
        return Err(Error::NoLog(path));
    }
    let mut stdout = io::stdout().lock();
    let mut emit = |line: &str| -> Result<(), Error> {
        let r = if json_out {
            writeln!(stdout, "{line}")
        } else {
            writeln!(stdout, "{}", escape::escape(line.as_bytes(), Layout::JsonLines).trim_end_matches('\n'))
        };
        r.and_then(|_| stdout.flush()).map_err(Error::Stdout)
    };
    if !json_out {
        eprintln!("sbx: escaped for the terminal (guest-chosen text shown as \\u escapes); --json for the verified lines exactly");
    }
    if !files.is_empty() {
        let verified =
            log::verify_files(&files).map_err(|e| Error::Io(path.clone(), io::Error::other(e.to_string())))?;
        if verified.first_seq > 1 || verified.torn_tail.is_some() {
            eprintln!("sbx: {}: {verified}", path.display());
        }
        if let Some(evidence) = log::evidence_report(&path, &verified)
            .map_err(|e| Error::Io(path.clone(), io::Error::other(e.to_string())))?
        {
            if evidence.older_lines > 0 || evidence.verified.torn_tail.is_some() {
                eprintln!("sbx: {evidence}");
            }
            for line in String::from_utf8_lossy(&evidence.older).lines() {
                emit(line)?;
            }
        }
    }
    let mut follower = Follower::new(&path);
    loop {
        follower.poll(&mut emit)?;
        if !follow || stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if until_stopped && sb.running_pid().is_none() {
            // One more read: the VMM may have written its last lines.
            follower.poll(&mut emit)?;
            return Ok(());
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

/// A flag set by SIGINT or SIGTERM, for `--follow` to end in order.
pub fn stop_on_signals() -> std::sync::Arc<AtomicBool> {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // (No jail in `sbx audit`; a thread that cannot start leaves the
    // signals blocked, as it always did.)
    let _ = crate::signals::forward(&[libc::SIGINT, libc::SIGTERM], move |_| flag.store(true, Ordering::SeqCst));
    stop
}

// ---- sbx audit export ----

/// The OCSF fields of one line (see docs/audit.md for the mapping).
pub fn to_ocsf(v: &Map<String, Value>, context: &Value) -> Value {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let event = s("event").unwrap_or("");
    let denied = s("decision") == Some("deny") || event == "refused" || (event == "dns" && v.contains_key("error"));
    let (class_uid, class_name, category_uid, category_name) = match event {
        "dns" => (4003, "DNS Activity", 4, "Network Activity"),
        "http" => (4002, "HTTP Activity", 4, "Network Activity"),
        "tls" | "upstream" | "conn_end" | "refused" => (4001, "Network Activity", 4, "Network Activity"),
        "file" => (1001, "File System Activity", 1, "System Activity"),
        _ => (0, "Base Event", 0, "Uncategorized"),
    };
    // activity_id per class: 4001 1 Open, 2 Close, 5 Refuse, 6 Traffic;
    // 4002 by method; 4003 1 Query; 1001 1 Create 2 Read 3 Update 4 Delete
    // 5 Rename 6 Set Attributes; 99 Other, 0 Unknown.
    let activity_id = match event {
        "refused" => 5,
        "tls" | "upstream" if denied => 5,
        "tls" | "upstream" => 1,
        "conn_end" => 2,
        "dns" => 1,
        "http" => match s("method").unwrap_or("") {
            "CONNECT" => 1,
            "DELETE" => 2,
            "GET" => 3,
            "HEAD" => 4,
            "OPTIONS" => 5,
            "POST" => 6,
            "PUT" => 7,
            "TRACE" => 8,
            _ => 99,
        },
        "file" => match s("op").unwrap_or("") {
            "create" | "mkdir" | "mknod" | "symlink" | "link" => 1,
            "open" | "read" | "readdir" | "lookup" => 2,
            "write" | "truncate" | "fallocate" => 3,
            "unlink" | "rmdir" | "delete" => 4,
            "rename" => 5,
            "setattr" | "chmod" | "chown" | "setxattr" | "removexattr" => 6,
            _ => 99,
        },
        _ => 0,
    };
    let ts = v.get("ts").and_then(Value::as_u64).unwrap_or(0);
    let (severity_id, severity) = if s("leak").is_some() || v.contains_key("leak") {
        (4, "High")
    } else if denied {
        (3, "Medium")
    } else {
        (1, "Informational")
    };
    let mut o = Map::new();
    o.insert("class_uid".into(), json!(class_uid));
    o.insert("class_name".into(), json!(class_name));
    o.insert("category_uid".into(), json!(category_uid));
    o.insert("category_name".into(), json!(category_name));
    o.insert("activity_id".into(), json!(activity_id));
    o.insert("type_uid".into(), json!(class_uid * 100 + activity_id));
    o.insert("time".into(), json!(ts));
    o.insert("severity_id".into(), json!(severity_id));
    o.insert("severity".into(), json!(severity));
    if v.contains_key("decision") || denied {
        let (id, name) = if denied { (2, "Blocked") } else { (1, "Allowed") };
        o.insert("disposition_id".into(), json!(id));
        o.insert("disposition".into(), json!(name));
        o.insert("action_id".into(), json!(id));
        o.insert("action".into(), json!(if denied { "Denied" } else { "Allowed" }));
    }
    if let Some(reason) = s("reason") {
        o.insert("status_detail".into(), json!(reason));
    }
    o.insert(
        "metadata".into(),
        json!({
            "product": {"name": "sbx", "vendor_name": "sbx", "version": env!("CARGO_PKG_VERSION")},
            "version": OCSF_VERSION,
            "uid": format!("{}:{}", context["sandbox"].as_str().unwrap_or(""), v.get("seq").cloned().unwrap_or(Value::Null)),
            "log_name": context["log"],
            "labels": [SCHEMA],
        }),
    );
    // The guest's side is the source; where it went the destination.
    let dst = s("dst").map(|d| match d.rsplit_once(':') {
        Some((ip, port)) if port.parse::<u16>().is_ok() => {
            json!({"ip": ip.trim_matches(['[', ']']), "port": port.parse::<u16>().unwrap_or(0)})
        }
        _ => json!({"ip": d}),
    });
    if (4001..=4003).contains(&class_uid) {
        o.insert("src_endpoint".into(), json!({"hostname": context["sandbox"], "type": "Virtual Machine"}));
        let mut d = dst.unwrap_or_else(|| json!({}));
        if let Some(host) = s("host").or(s("sni")).or(s("name")) {
            d["hostname"] = json!(host);
        }
        o.insert("dst_endpoint".into(), d);
    }
    match event {
        "http" => {
            o.insert(
                "http_request".into(),
                json!({"http_method": s("method"), "url": {"hostname": s("host"), "path": s("path")}}),
            );
        }
        "dns" => {
            o.insert("query".into(), json!({"hostname": s("name"), "type": v.get("qtype")}));
            if let Some(a) = s("answer") {
                o.insert("answers".into(), json!([{"rdata": a}]));
            }
        }
        "tls" => {
            o.insert("tls".into(), json!({"sni": s("sni")}));
        }
        "conn_end" => {
            o.insert("traffic".into(), json!({"bytes_out": v.get("bytes_up"), "bytes_in": v.get("bytes_down")}));
        }
        "file" => {
            o.insert("file".into(), json!({"path": s("path"), "name": s("path").and_then(|p| p.rsplit('/').next())}));
            o.insert("actor".into(), json!({"app_name": context["agent"]}));
        }
        _ => {}
    }
    o.insert("device".into(), json!({"hostname": context["sandbox"], "type": "Virtual Machine"}));
    o.insert("unmapped".into(), json!({"sbx": context, "line": Value::Object(v.clone())}));
    Value::Object(o)
}

/// Whether an audit event is a refusal (a deny, a leak attempt, a
/// refused exchange or change).
fn is_refusal(v: &Map<String, Value>) -> bool {
    v.get("decision").is_some_and(|d| d == "deny")
        || v.contains_key("leak")
        || v.get("outcome").is_some_and(|o| o == "refused")
        || v.get("change").is_some_and(|c| c == "refused")
}

/// One exported record in `format`, and whether it is a refusal.
fn export_record(line: &str, format: &str, context: &Value) -> Option<(String, bool)> {
    let Ok(Value::Object(v)) = serde_json::from_str::<Value>(line) else { return None };
    let refused = is_refusal(&v);
    let rec = match format {
        "ocsf" => to_ocsf(&v, context).to_string(),
        _ => {
            let mut rec = context.as_object().cloned().unwrap_or_default();
            rec.insert("event".into(), Value::Object(v));
            Value::Object(rec).to_string()
        }
    };
    Some((rec, refused))
}

/// The system log socket `--to syslog` sends to (journald listens there too).
pub const SYSLOG_SOCKET: &str = "/dev/log";
/// Largest syslog message sent (a datagram each); a longer record is
/// sent as a marker naming its sandbox and sequence number, never cut.
pub const MAX_SYSLOG_MESSAGE: usize = 60 * 1024;
/// `authpriv` (10): audit records may name what a person was asked.
const SYSLOG_FACILITY: u8 = 10;

/// Where `--to` sends: `syslog` or `syslog:PATH`, else a folder or `-`.
fn syslog_target(to: &str) -> Option<PathBuf> {
    match to {
        "syslog" => Some(PathBuf::from(SYSLOG_SOCKET)),
        t => t.strip_prefix("syslog:").map(PathBuf::from),
    }
}

/// One record as an RFC 5424 message for `/dev/log`: severity notice for
/// a refusal, info else; app name `sbx`, msgid `audit`; the record (JSON:
/// every control character escaped by the encoder) as the message.
pub fn syslog_message(record: &str, refused: bool, sandbox: &str, now_unix: u64) -> Vec<u8> {
    let pri = SYSLOG_FACILITY * 8 + if refused { 5 } else { 6 };
    let ts = crate::secrets::format_utc(now_unix);
    let pid = std::process::id();
    let body = if record.len() > MAX_SYSLOG_MESSAGE - 256 {
        let seq =
            serde_json::from_str::<Value>(record).ok().and_then(|v| v["event"]["seq"].as_u64().or(v["seq"].as_u64()));
        json!({"schema": SCHEMA, "sandbox": sandbox, "sbx_too_long_for_syslog": record.len(), "seq": seq}).to_string()
    } else {
        record.to_string()
    };
    format!("<{pri}>1 {ts} - sbx {pid} audit - {body}").into_bytes()
}

/// Where exported records go.
enum Sink {
    Out(Box<dyn Write>),
    Syslog(std::os::unix::net::UnixDatagram, PathBuf),
}

impl Sink {
    fn send(&mut self, rec: &str, refused: bool, sandbox: &str) -> io::Result<()> {
        match self {
            Sink::Out(w) => writeln!(w, "{rec}"),
            Sink::Syslog(sock, _) => {
                sock.send(&syslog_message(rec, refused, sandbox, crate::secrets::now_unix())).map(|_| ())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Out(w) => w.flush(),
            Sink::Syslog(..) => Ok(()),
        }
    }
}

/// `sbx audit export NAME|--all --format jsonl|ocsf --to DIR|-|syslog[:PATH]`: every
/// verified line of each sandbox (the evidence file's lines the kept log
/// no longer has first), with the sandbox, agent and workspace; a broken
/// chain stops the export (exit 1), naming the line.
pub fn export(name: Option<&str>, all: bool, format: &str, to: &str) -> Result<ExitCode, Error> {
    if !matches!(format, "jsonl" | "ocsf") {
        return Err(Error::Format(format.into()));
    }
    let home = sandbox::home();
    let sandboxes = match (name, all) {
        (Some(n), false) => vec![Sandbox::open(&home, n)?],
        (None, true) => Sandbox::list(&home)?,
        _ => return Err(Error::Which),
    };
    for sb in sandboxes {
        let path = sb.audit_log();
        let files = log::log_files(&path).map_err(|e| Error::Io(path.clone(), e))?;
        let mut out = if let Some(socket) = syslog_target(to) {
            let sock = std::os::unix::net::UnixDatagram::unbound().map_err(|e| Error::Syslog(socket.clone(), e))?;
            sock.connect(&socket).map_err(|e| Error::Syslog(socket.clone(), e))?;
            Sink::Syslog(sock, socket)
        } else if to == "-" {
            Sink::Out(Box::new(io::stdout().lock()))
        } else {
            let dir = Path::new(to);
            fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
            let ext = if format == "ocsf" { "ocsf.jsonl" } else { "jsonl" };
            let file = dir.join(format!("{}.{ext}", sb.settings.name));
            Sink::Out(Box::new(io::BufWriter::new(File::create(&file).map_err(|e| Error::Io(file.clone(), e))?)))
        };
        let mut context = json!({
            "schema": SCHEMA,
            "sandbox": sb.settings.name,
            "agent": sb.settings.agent,
            "workspace": sb.settings.workspace.display().to_string(),
            "log": "evidence",
        });
        let mut failed = None;
        let name = sb.settings.name.clone();
        let mut write = |line: &str, context: &Value, out: &mut Sink| {
            if let Some((rec, refused)) = export_record(line, format, context) {
                if let Err(e) = out.send(&rec, refused, &name) {
                    failed.get_or_insert(e);
                }
            }
        };
        let main = if files.is_empty() { None } else { Some(walk(&files, true, &BTreeSet::new(), &mut |_| {})?) };
        if let Some(m) = &main {
            if let Some(ev) = log::evidence_report(&path, &m.verified)
                .map_err(|e| Error::Io(path.clone(), io::Error::other(e.to_string())))?
            {
                for line in String::from_utf8_lossy(&ev.older).lines() {
                    write(line, &context, &mut out);
                }
            }
            context["log"] = json!("main");
            // Walked again, each line written once verified (a line appended
            // since the first walk is verified too).
            walk(&files, true, &BTreeSet::new(), &mut |line| write(line, &context, &mut out))?;
        }
        if let Some(e) = failed {
            return Err(match out {
                Sink::Syslog(_, socket) => Error::Syslog(socket, e),
                Sink::Out(_) => Error::Stdout(e),
            });
        }
        out.flush().map_err(Error::Stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `sbx audit …`.
pub fn command(cmd: &crate::cli::AuditCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use crate::cli::AuditCommand;
    match cmd {
        AuditCommand::Verify { target, anchors } => Ok(verify(target, anchors.as_deref())),
        AuditCommand::Anchor { name, to } => {
            anchor_command(name, to)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { name, all, format, to } => match export(name.as_deref(), *all, format, to) {
            Err(Error::Broken(b)) => {
                eprintln!("sbx: not exported: {}", escape::escape(b.to_string().as_bytes(), Layout::Line));
                Ok(ExitCode::from(EXIT_BROKEN))
            }
            r => Ok(r?),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit::Rotation;

    /// Writes `hosts` as allowed requests to the log at `path` (continuing
    /// it), rotated at `cap` bytes.
    fn append(path: &Path, hosts: &[&str], cap: u64) {
        let rotation = Rotation { cap, keep: log::KEEP_FILES };
        let mut opened = log::open(path, rotation, 1, |f| f).unwrap();
        assert!(opened.notes.is_empty(), "{:?}", opened.notes);
        for (i, h) in hosts.iter().enumerate() {
            opened
                .log
                .record(
                    &log::Event::Untyped(json!({"event": "http", "method": "GET", "host": h, "decision": "allow"})),
                    10 + i as u64,
                )
                .unwrap();
        }
        opened
            .log
            .record(&log::Event::Untyped(json!({"event": "dns", "name": "x.test", "decision": "deny"})), 100)
            .unwrap();
    }

    fn report(path: &Path, anchors: &Path) -> (Vec<String>, bool) {
        verify_report(path.to_str().unwrap(), Some(anchors)).unwrap()
    }

    fn broken(lines: &[String], what: &str) -> bool {
        lines.iter().any(|l| l.starts_with("BROKEN: ") && l.contains(what))
    }

    fn hosts(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}.test")).collect()
    }

    #[test]
    fn anchors_catch_deletion_truncation_and_rewritten_history() {
        let t = tempfile::tempdir().unwrap();
        let (dir, anchors) = (t.path().join("sb"), t.path().join("anchors.log"));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let names = hosts("a", 6);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        append(&path, &names, u64::MAX);
        anchor(&path, "sb", &anchors, 1_000).unwrap();
        let (lines, ok) = report(&path, &anchors);
        assert!(ok && lines.iter().any(|l| l.contains("1 anchors agree")), "{lines:?}");
        let intact = fs::read_to_string(&path).unwrap();

        // Cut back past the anchor: the chain itself still verifies.
        let kept: String = intact.lines().take(4).map(|l| format!("{l}\n")).collect();
        fs::write(&path, &kept).unwrap();
        assert!(log::verify_files(std::slice::from_ref(&path)).is_ok());
        let (lines, ok) = report(&path, &anchors);
        assert!(!ok && broken(&lines, "ends at seq 4") && broken(&lines, "cut off its end"), "{lines:?}");

        // A whole new history of the same length.
        fs::remove_file(&path).unwrap();
        fs::remove_file(log::evidence_path(&path)).unwrap();
        let mut other = names.clone();
        other[2] = "rewritten.test";
        append(&path, &other, u64::MAX);
        let (lines, ok) = report(&path, &anchors);
        assert!(!ok && broken(&lines, "history was rewritten"), "{lines:?}");

        // The files deleted.
        fs::remove_file(&path).unwrap();
        fs::remove_file(log::evidence_path(&path)).unwrap();
        let (lines, ok) = report(&path, &anchors);
        assert!(!ok && broken(&lines, "audit log is gone") && broken(&lines, "evidence file is gone"), "{lines:?}");

        // The main log back as it was: only the evidence file is missing.
        fs::write(&path, &intact).unwrap();
        let (lines, _) = report(&path, &anchors);
        assert!(!broken(&lines, "audit log") && broken(&lines, "evidence file is gone"), "{lines:?}");

        // The anchors file's own chain is checked (all but its last line:
        // hence a second anchor here).
        anchor(&dir.join("other.log"), "other", &anchors, 2_000).unwrap();
        let text = fs::read_to_string(&anchors).unwrap().replacen("\"seq\":7", "\"seq\":3", 1);
        fs::write(&anchors, text).unwrap();
        assert!(matches!(verify_report(path.to_str().unwrap(), Some(&anchors)), Err(Error::AnchorsBroken(..))));
    }

    #[test]
    fn rotation_is_expected_but_deleted_old_files_are_not() {
        let t = tempfile::tempdir().unwrap();
        let (dir, anchors) = (t.path().join("sb"), t.path().join("anchors.log"));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let cap = 300; // about two lines a file
        let first = hosts("a", 2);
        append(&path, &first.iter().map(String::as_str).collect::<Vec<_>>(), cap);
        anchor(&path, "sb", &anchors, 1_000).unwrap();
        // Enough to rotate the anchored lines away: KEEP_FILES files kept.
        let more = hosts("b", 20);
        append(&path, &more.iter().map(String::as_str).collect::<Vec<_>>(), cap);
        let files = log::log_files(&path).unwrap();
        assert_eq!(files.len(), log::KEEP_FILES);
        let (lines, ok) = report(&path, &anchors);
        assert!(ok, "rotated away as rotation does: {lines:?}");
        anchor(&path, "sb", &anchors, 2_000).unwrap();
        assert!(report(&path, &anchors).1);
        // The oldest kept file deleted: the set is short of a full one.
        fs::remove_file(&files[0]).unwrap();
        let (lines, ok) = report(&path, &anchors);
        assert!(!ok && broken(&lines, "older files were deleted"), "{lines:?}");
        // A file in the middle deleted: the chain itself breaks, naming where.
        fs::remove_file(&files[2]).unwrap();
        match verify_report(path.to_str().unwrap(), None) {
            Err(Error::Broken(b)) => {
                assert_eq!((b.file.clone(), b.line), (files[3].clone(), 1), "{b}");
                assert!(b.seq.is_some() && b.why.contains("sequence number"), "{b}");
            }
            r => panic!("{:?}", r.map(|r| r.0)),
        }
    }

    #[test]
    fn a_broken_line_is_named_by_file_line_and_seq() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.log");
        let names = hosts("a", 5);
        append(&path, &names.iter().map(String::as_str).collect::<Vec<_>>(), u64::MAX);
        let text = fs::read_to_string(&path).unwrap().replacen("a1.test", "b1.test", 1);
        fs::write(&path, text).unwrap();
        match verify_report(path.to_str().unwrap(), None) {
            Err(Error::Broken(b)) => {
                assert_eq!((b.file, b.line, b.seq), (path.clone(), 3, Some(3)));
                assert!(b.why.contains("does not follow the line before it"));
            }
            r => panic!("{:?}", r.map(|r| r.0)),
        }
        assert!(matches!(verify_report(t.path().join("none.log").to_str().unwrap(), None), Err(Error::NoLog(_))));
    }

    #[test]
    fn following_reads_every_line_once_across_rotations_and_stops_at_a_break() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.log");
        let rotation = Rotation { cap: 400, keep: log::KEEP_FILES };
        let mut opened = log::open(&path, rotation, 1, |f| f).unwrap();
        let mut follower = Follower::new(&path);
        let mut seen: Vec<u64> = Vec::new();
        let mut collect = |l: &str| -> Result<(), Error> {
            seen.push(serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap());
            Ok(())
        };
        follower.poll(&mut collect).unwrap();
        let mut written = 0;
        for round in 0..6 {
            // About one rotation a round: fewer than KEEP_FILES between polls.
            for i in 0..3 {
                let host = format!("h{round}-{i}.test");
                opened
                    .log
                    .record(&log::Event::Untyped(json!({"event": "http", "host": host, "decision": "allow"})), 5)
                    .unwrap();
                written += 1;
            }
            follower.poll(&mut collect).unwrap();
        }
        assert_eq!(seen, (1..=written).collect::<Vec<u64>>());
        assert!(log::log_files(&path).unwrap().len() > 1, "it rotated");
        // Lines rotated away before they were read are a gap, not a skip.
        let mut late = Follower::new(&path);
        let mut none = |_: &str| -> Result<(), Error> { Ok(()) };
        late.poll(&mut none).unwrap();
        for i in 0..40 {
            opened
                .log
                .record(
                    &log::Event::Untyped(json!({"event": "http", "host": format!("x{i}.test"), "decision": "allow"})),
                    5,
                )
                .unwrap();
        }
        let e = late.poll(&mut none).err().unwrap();
        assert!(matches!(&e, Error::Broken(b) if b.why.contains("rotated away before they were read")), "{e}");
        // A forged line appended breaks the chain where it is.
        let mut follower = Follower::new(&path);
        follower.poll(&mut none).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "{}", json!({"seq": 999, "ts": 1, "prev": "00", "event": "forged"})).unwrap();
        let e = follower.poll(&mut none).err().unwrap();
        assert!(matches!(&e, Error::Broken(b) if b.seq == Some(999) && b.file == path), "{e}");
    }

    #[test]
    fn a_syslog_message_is_never_cut_a_record_too_long_becomes_a_marker() {
        let rec = json!({"schema": SCHEMA, "sandbox": "g", "event": {"seq": 7, "event": "http"}}).to_string();
        let m = String::from_utf8(syslog_message(&rec, false, "g", 86_400)).unwrap();
        assert!(m.starts_with("<86>1 1970-01-02T00:00:00Z - sbx ") && m.ends_with(&format!(" audit - {rec}")), "{m}");
        let long = json!({"event": {"seq": 9, "path": "x".repeat(MAX_SYSLOG_MESSAGE)}}).to_string();
        let m = syslog_message(&long, true, "g", 0);
        assert!(m.len() < MAX_SYSLOG_MESSAGE && m.starts_with(b"<85>1 "));
        let text = String::from_utf8(m).unwrap();
        let marker: Value = serde_json::from_str(text.rsplit(" - ").next().unwrap()).unwrap();
        assert_eq!(
            (marker["seq"].as_u64(), marker["sbx_too_long_for_syslog"].as_u64()),
            (Some(9), Some(long.len() as u64))
        );
    }

    #[test]
    fn each_event_kind_maps_to_its_ocsf_class() {
        let context = json!({"schema": SCHEMA, "sandbox": "sb", "agent": "claude", "workspace": "/w", "log": "main"});
        let cases = [
            (
                json!({"event": "dns", "name": "a.test", "decision": "allow", "answer": "1.2.3.4"}),
                4003,
                1,
                Some("Allowed"),
            ),
            (json!({"event": "dns", "name": "b.test", "decision": "deny"}), 4003, 1, Some("Blocked")),
            (
                json!({"event": "http", "method": "POST", "host": "a.test", "path": "/x", "dst": "1.2.3.4:80", "decision": "allow"}),
                4002,
                6,
                Some("Allowed"),
            ),
            (
                json!({"event": "http", "method": "GET", "host": "a.test", "decision": "deny", "leak": "gh"}),
                4002,
                3,
                Some("Blocked"),
            ),
            (
                json!({"event": "tls", "sni": "a.test", "dst": "1.2.3.4:443", "decision": "allow"}),
                4001,
                1,
                Some("Allowed"),
            ),
            (
                json!({"event": "upstream", "dst": "1.2.3.4:443", "decision": "deny", "error": "cert"}),
                4001,
                5,
                Some("Blocked"),
            ),
            (json!({"event": "refused", "what": "TCP to 1.2.3.4:22"}), 4001, 5, Some("Blocked")),
            (json!({"event": "conn_end", "dst": "1.2.3.4:443", "bytes_up": 1, "bytes_down": 2}), 4001, 2, None),
            (json!({"event": "file", "op": "write", "path": "/w/a.rs", "decision": "allow"}), 1001, 3, Some("Allowed")),
            (
                json!({"event": "file", "op": "open", "path": "/w/.env", "decision": "deny", "reason": "hidden"}),
                1001,
                2,
                Some("Blocked"),
            ),
            (json!({"event": "file", "op": "unlink", "path": "/w/x", "decision": "allow"}), 1001, 4, Some("Allowed")),
            (json!({"event": "run", "agent": "claude"}), 0, 0, None),
        ];
        for (mut line, class, activity, disposition) in cases {
            line["seq"] = json!(7);
            line["ts"] = json!(1_700_000_000_000u64);
            let o = to_ocsf(line.as_object().unwrap(), &context);
            assert_eq!((o["class_uid"].as_u64(), o["activity_id"].as_u64()), (Some(class), Some(activity)), "{line}");
            assert_eq!(o["type_uid"].as_u64(), Some(class * 100 + activity));
            assert_eq!(o["disposition"].as_str(), disposition, "{line}");
            assert_eq!(o["time"], 1_700_000_000_000u64);
            assert_eq!(o["metadata"]["product"]["name"], "sbx");
            assert_eq!(o["metadata"]["version"], OCSF_VERSION);
            assert_eq!(o["metadata"]["uid"], "sb:7");
            assert_eq!(o["unmapped"]["line"], line, "the original line, whole");
            assert_eq!(o["unmapped"]["sbx"]["workspace"], "/w");
        }
        let leak = to_ocsf(json!({"event": "http", "decision": "deny", "leak": "gh"}).as_object().unwrap(), &context);
        assert_eq!(leak["severity"], "High");
        let http = to_ocsf(
            json!({"event": "http", "method": "GET", "host": "a.test", "path": "/p", "dst": "1.2.3.4:80"})
                .as_object()
                .unwrap(),
            &context,
        );
        assert_eq!(http["dst_endpoint"], json!({"ip": "1.2.3.4", "port": 80, "hostname": "a.test"}));
        assert_eq!(http["http_request"]["url"]["path"], "/p");
        assert_eq!(http["src_endpoint"]["hostname"], "sb");
        let rec: Value =
            serde_json::from_str(&export_record(r#"{"seq":1,"event":"dns"}"#, "jsonl", &context).unwrap().0).unwrap();
        assert_eq!(
            (rec["schema"].as_str(), rec["agent"].as_str(), rec["event"]["event"].as_str()),
            (Some(SCHEMA), Some("claude"), Some("dns"))
        );
    }
}
