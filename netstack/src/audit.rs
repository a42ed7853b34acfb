//! Host side: the sandbox's audit log — one JSON object per line, each
//! carrying the SHA-256 of the line before it, so that editing, removing
//! or reordering any line is detected by [`verify`]. Only the last line can
//! be changed unnoticed unless its hash is kept elsewhere: `verify` returns
//! it for that purpose.

use std::io::{self, BufRead, Write};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    #[error("Audit log line {line}: {reason}")]
    Broken { line: u64, reason: String },
}

/// One log, one chain, written from several threads (the network and
/// each shared folder).
pub type SharedLog<W> = Arc<Mutex<AuditLog<W>>>;

/// Appends chained lines to `out`.
pub struct AuditLog<W: Write> {
    out: W,
    prev: String,
    seq: u64,
}

impl<W: Write> AuditLog<W> {
    /// A new log.
    pub fn new(out: W) -> Self {
        AuditLog { out, prev: GENESIS.to_string(), seq: 0 }
    }

    /// Continues a log whose verified last line hash and count are known.
    pub fn resume(out: W, last: &Verified) -> Self {
        AuditLog { out, prev: last.last_hash.clone(), seq: last.lines }
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
    /// `prev` are the log's own.
    pub fn record<E: Serialize>(&mut self, event: &E, unix_ms: u64) -> Result<(), Error> {
        let Value::Object(fields) = serde_json::to_value(event).map_err(|_| Error::NotAnObject)? else {
            return Err(Error::NotAnObject);
        };
        let mut obj = Map::new();
        obj.insert("seq".into(), Value::from(self.seq + 1));
        obj.insert("ts".into(), Value::from(unix_ms));
        obj.insert("prev".into(), Value::from(self.prev.clone()));
        for (k, v) in fields {
            if !matches!(k.as_str(), "seq" | "ts" | "prev") {
                obj.insert(k, v);
            }
        }
        let line = Value::Object(obj).to_string();
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

/// What a verified log ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub lines: u64,
    pub last_hash: String,
}

/// Checks every line's chain link and sequence number.
pub fn verify<R: BufRead>(input: R) -> Result<Verified, Error> {
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    for line in input.lines() {
        let line = line?;
        n += 1;
        let broken = |reason: String| Error::Broken { line: n, reason };
        let v: Value = serde_json::from_str(&line).map_err(|e| broken(format!("not JSON: {e}")))?;
        if v.get("seq").and_then(Value::as_u64) != Some(n) {
            return Err(broken(format!("sequence number is not {n}")));
        }
        if v.get("prev").and_then(Value::as_str) != Some(prev.as_str()) {
            return Err(broken("does not follow the line before it (edited, removed or reordered)".into()));
        }
        prev = line_hash(&line);
    }
    Ok(Verified { lines: n, last_hash: prev })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Http<'a> {
        event: &'a str,
        method: &'a str,
        host: &'a str,
        decision: &'a str,
    }

    fn sample() -> Vec<u8> {
        let mut log = AuditLog::new(Vec::new());
        for (i, host) in ["a.com", "b.com", "evil.com"].iter().enumerate() {
            let decision = if *host == "evil.com" { "deny" } else { "allow" };
            log.record(&Http { event: "http", method: "GET", host, decision }, 1000 + i as u64).unwrap();
        }
        log.out
    }

    #[test]
    fn a_written_log_verifies() {
        let bytes = sample();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().next().unwrap().contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(text.contains("\"host\":\"evil.com\"") && text.contains("\"seq\":3"));
        let v = verify(&bytes[..]).unwrap();
        assert_eq!(v.lines, 3);
        assert_eq!(v.last_hash, line_hash(text.lines().last().unwrap()));
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
        all.extend_from_slice(&log.out);
        assert_eq!(verify(&all[..]).unwrap().lines, 4);
    }

    #[test]
    fn reserved_keys_cannot_be_forged_and_non_objects_are_refused() {
        let mut log = AuditLog::new(Vec::new());
        let forged = serde_json::json!({"event": "x", "seq": 99, "prev": "ff"});
        log.record(&forged, 1).unwrap();
        assert_eq!(verify(&log.out[..]).unwrap().lines, 1);
        assert!(matches!(log.record(&"a string", 1), Err(Error::NotAnObject)));
    }
}
