//! Host side: a strict, bounded scanner for the GraphQL requests the guest
//! (untrusted) sends, so that ask rules can hold GraphQL *mutations* (the
//! `mergePullRequest` of `gh pr merge`) without asking for every read.
//! It does not validate GraphQL; it finds each operation's type and, for
//! mutations, the names of the fields of its first-level selection set
//! (aliases resolved: `a: mergePullRequest(...)` is `mergePullRequest`).
//! Anything it cannot read with certainty is an [`enum@Error`], and an ask
//! rule treats an error as "might be a listed mutation" (fail closed).
//!
//! Input: a request body, JSON ([`scan_body`]): one object `{"query":
//! "...", "operationName": ..., "variables": ...}` or a batch (array) of
//! them, at most [`MAX_BODY`] bytes and [`MAX_BATCH`] objects. The JSON is
//! decoded first (so `\u006dutation` is `mutation`); a duplicated key, a
//! missing or non-string `query` (persisted queries, form bodies, raw
//! `application/graphql` bodies) is an error. Or the `query=` parameter
//! of a request target (`GET /graphql?query=...`, [`scan_target`]),
//! `%`-decoded (`+` as space); a second `query=` is an error.
//!
//! The document is lexed as the GraphQL spec says (ignored commas,
//! whitespace, BOM and `#` comments; punctuators; `...`; names; numbers;
//! strings with their escapes and `"""` block strings, so a `}` or the
//! word `mutation` inside a string changes nothing). Operation
//! definitions (`query`/`mutation`/`subscription`, or the `{ ... }`
//! shorthand, a query) and fragment definitions are recognised at the top
//! level; arguments, variable definitions, directives and nested
//! selection sets are skipped by balanced `()`/`[]`/`{}` (at most
//! [`MAX_DEPTH`] deep, [`MAX_TOKENS`] tokens in all). A fragment spread or
//! inline fragment (`...`) among a mutation's first-level selections
//! makes that mutation [`Operation::opaque`]: its fields are unknown, and
//! an ask rule asks. `operationName` is not used to pick one operation: if
//! any operation of the document is a listed mutation, the request is
//! asked (the safe answer, whichever one the server runs).
//!
//! Framing the caller sees and reports as errors ([`Error::Chunked`],
//! [`Error::Encoded`], [`Error::TooLarge`]): a chunked body (no length to
//! wait for), a `Content-Encoding` (compressed), a body over [`MAX_BODY`].

use serde::Deserialize;
use thiserror::Error;

/// Largest body (or `query=` parameter) scanned; a larger one is not read
/// and counts as a possible mutation. Small enough that a request head
/// and such a body fit in [`crate::conn::MAX_BUFFERED`].
pub const MAX_BODY: usize = 128 * 1024;
/// Most requests in one batch (JSON array).
pub const MAX_BATCH: usize = 64;
/// Most tokens lexed in one body, all documents together.
pub const MAX_TOKENS: usize = 65_536;
/// Deepest nesting of `()`, `[]` and `{}` in a document.
pub const MAX_DEPTH: usize = 64;
/// Most operation and fragment definitions, all documents together.
pub const MAX_DEFINITIONS: usize = 256;
/// Most first-level fields of one mutation.
pub const MAX_FIELDS: usize = 256;
/// Longest mutation name pattern in a rule, and most patterns per rule.
pub const MAX_PATTERN: usize = 128;
pub const MAX_PATTERNS: usize = 256;

const _: () = assert!(MAX_BODY + crate::http::MAX_HEAD <= crate::conn::MAX_BUFFERED);

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    #[error("the GraphQL body is {0} bytes, more than {MAX_BODY}")]
    TooLarge(u64),
    #[error("the GraphQL body is chunked (no Content-Length to wait for)")]
    Chunked,
    #[error("the GraphQL body is encoded ({0})")]
    Encoded(String),
    #[error("the body is not a GraphQL JSON request: {0}")]
    Json(String),
    #[error("the GraphQL request has no \"query\" string (persisted queries are not readable)")]
    NoQuery,
    #[error("the GraphQL batch is empty")]
    EmptyBatch,
    #[error("the GraphQL batch has {0} requests, more than {MAX_BATCH}")]
    BatchTooLarge(usize),
    #[error("the target has more than one query= parameter")]
    DuplicateParam,
    #[error("the query= parameter is not %-encoded UTF-8")]
    BadParam,
    #[error("GraphQL: unexpected character at byte {0}")]
    Char(usize),
    #[error("GraphQL: unterminated string at byte {0}")]
    UnterminatedString(usize),
    #[error("GraphQL: bad escape in a string at byte {0}")]
    BadEscape(usize),
    #[error("GraphQL: bad number at byte {0}")]
    BadNumber(usize),
    #[error("GraphQL: more than {MAX_TOKENS} tokens")]
    TooManyTokens,
    #[error("GraphQL: nested more than {MAX_DEPTH} deep")]
    TooDeep,
    #[error("GraphQL: unbalanced brackets")]
    Unbalanced,
    #[error("GraphQL: the document ends too early")]
    Truncated,
    #[error("GraphQL: unexpected '{0}'")]
    Unexpected(String),
    #[error("GraphQL: a selection set is empty")]
    EmptySelection,
    #[error("GraphQL: the document defines no operation")]
    NoOperation,
    #[error("GraphQL: more than {MAX_DEFINITIONS} definitions")]
    TooManyDefinitions,
    #[error("GraphQL: a mutation selects more than {MAX_FIELDS} fields")]
    TooManyFields,
}

/// An operation's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Query,
    Mutation,
    Subscription,
}

/// One operation definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub kind: Kind,
    pub name: Option<String>,
    /// Mutations: the first-level field names (not aliases), in order.
    pub fields: Vec<String>,
    /// Mutations: a fragment spread or inline fragment is among the
    /// first-level selections, so the fields are not all known.
    pub opaque: bool,
}

/// What a scan found: every operation of the request, or why it is unclear.
pub type Scan = Result<Vec<Operation>, Error>;

#[derive(Deserialize)]
struct Payload {
    query: Option<String>,
    #[serde(rename = "operationName")]
    #[allow(dead_code)]
    operation_name: Option<String>,
}

/// Scans a JSON request body (see the module docs).
pub fn scan_body(body: &[u8]) -> Scan {
    if body.len() > MAX_BODY {
        return Err(Error::TooLarge(body.len() as u64));
    }
    let json = |e: serde_json::Error| Error::Json(e.to_string().chars().take(120).collect());
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    // A struct (not a Value) so that a duplicated "query" is an error.
    let payloads: Vec<Payload> = match first {
        Some(b'[') => serde_json::from_slice(body).map_err(json)?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(json)?],
        _ => return Err(Error::Json("not a JSON object or array".into())),
    };
    if payloads.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if payloads.len() > MAX_BATCH {
        return Err(Error::BatchTooLarge(payloads.len()));
    }
    let mut lexer_budget = Budget { tokens: 0, definitions: 0 };
    let mut ops = Vec::new();
    for p in payloads {
        let q = p.query.ok_or(Error::NoQuery)?;
        ops.extend(scan_document(&q, &mut lexer_budget)?);
    }
    Ok(ops)
}

/// Scans the `query=` parameter of a request target: None if it has none.
pub fn scan_target(target: &str) -> Option<Scan> {
    let q = target.split_once('?')?.1.split('#').next().unwrap_or("");
    let mut found: Option<Scan> = None;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match form_decode(k) {
            Some(k) if k == "query" => {}
            Some(_) => continue,
            None => return Some(Err(Error::BadParam)),
        }
        if found.is_some() {
            return Some(Err(Error::DuplicateParam));
        }
        found = Some(match v.len() > 3 * MAX_BODY {
            true => Err(Error::TooLarge(v.len() as u64)),
            false => match form_decode(v) {
                Some(doc) if doc.len() > MAX_BODY => Err(Error::TooLarge(doc.len() as u64)),
                Some(doc) => scan_document(&doc, &mut Budget { tokens: 0, definitions: 0 }),
                None => Err(Error::BadParam),
            },
        });
    }
    found
}

/// `%XX` and `+` decoded; None if an escape is bad or the result not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Punct(u8),
    Spread,
    Name(&'a str),
    /// A number or a string (its value is never needed).
    Value,
}

impl Tok<'_> {
    fn text(&self) -> String {
        match self {
            Tok::Punct(c) => (*c as char).to_string(),
            Tok::Spread => "...".into(),
            Tok::Name(n) => n.chars().take(40).collect(),
            Tok::Value => "a value".into(),
        }
    }
}

struct Budget {
    tokens: usize,
    definitions: usize,
}

struct Lexer<'a, 'b> {
    src: &'a str,
    pos: usize,
    peeked: Option<Option<Tok<'a>>>,
    budget: &'b mut Budget,
}

fn name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn name_continue(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl<'a> Lexer<'a, '_> {
    fn byte(&self, at: usize) -> Option<u8> {
        self.src.as_bytes().get(at).copied()
    }

    fn peek(&mut self) -> Result<Option<Tok<'a>>, Error> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        Ok(self.peeked.flatten())
    }

    fn next(&mut self) -> Result<Option<Tok<'a>>, Error> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex(),
        }
    }

    /// The next token, which must exist.
    fn need(&mut self) -> Result<Tok<'a>, Error> {
        self.next()?.ok_or(Error::Truncated)
    }

    fn lex(&mut self) -> Result<Option<Tok<'a>>, Error> {
        let b = self.src.as_bytes();
        loop {
            match self.byte(self.pos) {
                None => return Ok(None),
                Some(b' ' | b'\t' | b'\n' | b'\r' | b',') => self.pos += 1,
                Some(0xEF) if b[self.pos..].starts_with("\u{feff}".as_bytes()) => self.pos += 3,
                Some(b'#') => {
                    while !matches!(self.byte(self.pos), None | Some(b'\n' | b'\r')) {
                        self.pos += 1;
                    }
                }
                Some(_) => break,
            }
        }
        self.budget.tokens += 1;
        if self.budget.tokens > MAX_TOKENS {
            return Err(Error::TooManyTokens);
        }
        let start = self.pos;
        let c = b[start];
        let tok = match c {
            b'!' | b'$' | b'&' | b'(' | b')' | b':' | b'=' | b'@' | b'[' | b']' | b'{' | b'|' | b'}' => {
                self.pos += 1;
                Tok::Punct(c)
            }
            b'.' if b[start..].starts_with(b"...") => {
                self.pos += 3;
                Tok::Spread
            }
            c if name_start(c) => {
                while self.byte(self.pos).is_some_and(name_continue) {
                    self.pos += 1;
                }
                Tok::Name(&self.src[start..self.pos])
            }
            b'-' | b'0'..=b'9' => {
                self.number()?;
                Tok::Value
            }
            b'"' if b[start..].starts_with(b"\"\"\"") => {
                self.block_string()?;
                Tok::Value
            }
            b'"' => {
                self.string()?;
                Tok::Value
            }
            _ => return Err(Error::Char(start)),
        };
        Ok(Some(tok))
    }

    fn digits(&mut self) -> usize {
        let from = self.pos;
        while self.byte(self.pos).is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - from
    }

    fn number(&mut self) -> Result<(), Error> {
        let start = self.pos;
        if self.byte(self.pos) == Some(b'-') {
            self.pos += 1;
        }
        if self.digits() == 0 {
            return Err(Error::BadNumber(start));
        }
        if self.byte(self.pos) == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(Error::BadNumber(start));
            }
        }
        if matches!(self.byte(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.byte(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(Error::BadNumber(start));
            }
        }
        // The spec: a number is not followed by a name start or '.'.
        match self.byte(self.pos) {
            Some(b) if name_start(b) || b == b'.' => Err(Error::BadNumber(start)),
            _ => Ok(()),
        }
    }

    fn string(&mut self) -> Result<(), Error> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.byte(self.pos) {
                None | Some(b'\n' | b'\r') => return Err(Error::UnterminatedString(start)),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    let at = self.pos;
                    match self.byte(at + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
                        Some(b'u') if self.byte(at + 2) == Some(b'{') => {
                            self.pos += 3;
                            let from = self.pos;
                            while self.byte(self.pos).is_some_and(|b| b.is_ascii_hexdigit()) {
                                self.pos += 1;
                            }
                            if self.pos == from || self.pos - from > 8 || self.byte(self.pos) != Some(b'}') {
                                return Err(Error::BadEscape(at));
                            }
                            self.pos += 1;
                        }
                        Some(b'u') => {
                            let hex = self.src.as_bytes().get(at + 2..at + 6);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(Error::BadEscape(at));
                            }
                            self.pos += 6;
                        }
                        _ => return Err(Error::BadEscape(at)),
                    }
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn block_string(&mut self) -> Result<(), Error> {
        let start = self.pos;
        self.pos += 3;
        let b = self.src.as_bytes();
        loop {
            let rest = &b[self.pos.min(b.len())..];
            if rest.is_empty() {
                return Err(Error::UnterminatedString(start));
            }
            if rest.starts_with(b"\\\"\"\"") {
                self.pos += 4;
            } else if rest.starts_with(b"\"\"\"") {
                self.pos += 3;
                return Ok(());
            } else {
                self.pos += 1;
            }
        }
    }
}

// --------------------------------------------------------------- parser

fn closer(open: u8) -> u8 {
    match open {
        b'(' => b')',
        b'[' => b']',
        _ => b'}',
    }
}

/// Skips to the end of a bracket whose opener `open` was just read, at
/// nesting `depth` (the opener's own level, counted).
fn skip_balanced(lx: &mut Lexer<'_, '_>, open: u8, depth: usize) -> Result<(), Error> {
    let mut stack = vec![closer(open)];
    if depth > MAX_DEPTH {
        return Err(Error::TooDeep);
    }
    while let Some(&want) = stack.last() {
        match lx.need()? {
            Tok::Punct(c @ (b'(' | b'[' | b'{')) => {
                if depth + stack.len() > MAX_DEPTH {
                    return Err(Error::TooDeep);
                }
                stack.push(closer(c));
            }
            Tok::Punct(c @ (b')' | b']' | b'}')) if c == want => {
                stack.pop();
            }
            Tok::Punct(b')' | b']' | b'}') => return Err(Error::Unbalanced),
            _ => {}
        }
    }
    Ok(())
}

/// `( ... )` if one comes next.
fn skip_parens(lx: &mut Lexer<'_, '_>, depth: usize) -> Result<(), Error> {
    if lx.peek()? == Some(Tok::Punct(b'(')) {
        lx.next()?;
        skip_balanced(lx, b'(', depth)?;
    }
    Ok(())
}

/// Directives (`@name(args)`) while they come.
fn skip_directives(lx: &mut Lexer<'_, '_>, depth: usize) -> Result<(), Error> {
    while lx.peek()? == Some(Tok::Punct(b'@')) {
        lx.next()?;
        match lx.need()? {
            Tok::Name(_) => {}
            t => return Err(Error::Unexpected(t.text())),
        }
        skip_parens(lx, depth)?;
    }
    Ok(())
}

fn expect_open_brace(lx: &mut Lexer<'_, '_>) -> Result<(), Error> {
    match lx.need()? {
        Tok::Punct(b'{') => Ok(()),
        t => Err(Error::Unexpected(t.text())),
    }
}

/// A selection set not looked into, its `{` just read; it must not be empty.
fn skip_selection(lx: &mut Lexer<'_, '_>) -> Result<(), Error> {
    if lx.peek()? == Some(Tok::Punct(b'}')) {
        return Err(Error::EmptySelection);
    }
    skip_balanced(lx, b'{', 1)
}

/// A mutation's selection set, its `{` just read: its first-level fields.
fn mutation_fields(lx: &mut Lexer<'_, '_>, op: &mut Operation) -> Result<(), Error> {
    loop {
        match lx.need()? {
            Tok::Punct(b'}') if op.fields.is_empty() && !op.opaque => return Err(Error::EmptySelection),
            Tok::Punct(b'}') => return Ok(()),
            Tok::Spread => {
                // A fragment: which fields it selects is not followed.
                op.opaque = true;
                return skip_balanced(lx, b'{', 1);
            }
            Tok::Name(first) => {
                let field = match lx.peek()? {
                    Some(Tok::Punct(b':')) => {
                        lx.next()?;
                        match lx.need()? {
                            Tok::Name(n) => n,
                            t => return Err(Error::Unexpected(t.text())),
                        }
                    }
                    _ => first,
                };
                if op.fields.len() >= MAX_FIELDS {
                    return Err(Error::TooManyFields);
                }
                op.fields.push(field.to_string());
                skip_parens(lx, 2)?;
                skip_directives(lx, 2)?;
                if lx.peek()? == Some(Tok::Punct(b'{')) {
                    lx.next()?;
                    skip_balanced(lx, b'{', 2)?;
                }
            }
            t => return Err(Error::Unexpected(t.text())),
        }
    }
}

/// Every operation of one GraphQL document.
fn scan_document(doc: &str, budget: &mut Budget) -> Scan {
    let mut lx = Lexer { src: doc, pos: 0, peeked: None, budget };
    let mut ops = Vec::new();
    while let Some(tok) = lx.next()? {
        lx.budget.definitions += 1;
        if lx.budget.definitions > MAX_DEFINITIONS {
            return Err(Error::TooManyDefinitions);
        }
        let kind = match tok {
            Tok::Punct(b'{') => {
                skip_selection(&mut lx)?;
                ops.push(Operation { kind: Kind::Query, name: None, fields: Vec::new(), opaque: false });
                continue;
            }
            Tok::Name("query") => Kind::Query,
            Tok::Name("mutation") => Kind::Mutation,
            Tok::Name("subscription") => Kind::Subscription,
            Tok::Name("fragment") => {
                // fragment NAME on TYPE @directives { ... }
                for want in [None, Some("on"), None] {
                    match (lx.need()?, want) {
                        (Tok::Name(n), Some(w)) if n == w => {}
                        (Tok::Name(_), None) => {}
                        (t, _) => return Err(Error::Unexpected(t.text())),
                    }
                }
                skip_directives(&mut lx, 1)?;
                expect_open_brace(&mut lx)?;
                skip_selection(&mut lx)?;
                continue;
            }
            t => return Err(Error::Unexpected(t.text())),
        };
        let mut op = Operation { kind, name: None, fields: Vec::new(), opaque: false };
        if let Some(Tok::Name(n)) = lx.peek()? {
            op.name = Some(n.chars().take(128).collect());
            lx.next()?;
        }
        skip_parens(&mut lx, 1)?;
        skip_directives(&mut lx, 1)?;
        expect_open_brace(&mut lx)?;
        match kind {
            Kind::Mutation => mutation_fields(&mut lx, &mut op)?,
            _ => skip_selection(&mut lx)?,
        }
        ops.push(op);
    }
    if ops.is_empty() {
        return Err(Error::NoOperation);
    }
    Ok(ops)
}

// ------------------------------------------------------------ patterns

/// A mutation name in an ask rule: exact, `prefix*`, `*suffix` or `*`
/// (every mutation); compared without regard to case (fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    raw: String,
}

impl NamePattern {
    pub fn parse(raw: &str) -> Result<NamePattern, String> {
        let core = raw.strip_prefix('*').or_else(|| raw.strip_suffix('*')).unwrap_or(raw);
        let ok = raw.len() <= MAX_PATTERN
            && (raw == "*"
                || (!core.is_empty()
                    && core.bytes().all(name_continue)
                    && (raw.starts_with('*') || core.bytes().next().is_some_and(name_start))));
        match ok {
            true => Ok(NamePattern { raw: raw.to_string() }),
            false => Err(format!(
                "bad GraphQL mutation name '{}' (a name such as mergePullRequest, optionally with one '*' \
                 at its start or end, or '*' for every mutation; at most {MAX_PATTERN} bytes)",
                raw.chars().take(60).collect::<String>()
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// [`NamePattern::matches`] with case compared (a live allow: the
    /// name the person approved, as the server reads it).
    pub fn matches_case(&self, field: &str) -> bool {
        let r = self.raw.as_str();
        if r == "*" {
            true
        } else if let Some(p) = r.strip_suffix('*') {
            field.starts_with(p)
        } else if let Some(s) = r.strip_prefix('*') {
            field.ends_with(s)
        } else {
            field == r
        }
    }

    pub fn matches(&self, field: &str) -> bool {
        let (f, r) = (field.to_ascii_lowercase(), self.raw.to_ascii_lowercase());
        if r == "*" {
            true
        } else if let Some(p) = r.strip_suffix('*') {
            f.starts_with(p)
        } else if let Some(s) = r.strip_prefix('*') {
            f.ends_with(s)
        } else {
            f == r
        }
    }
}

/// The first-level fields of every mutation of `scan`, each once, in
/// order; None if they are not all known (`scan` is an error, or a
/// fragment is among a mutation's fields).
pub fn known_mutations(scan: &Scan) -> Option<Vec<String>> {
    // A set beside the list: up to MAX_TOKENS names, never a square of them.
    let (mut out, mut seen) = (Vec::new(), std::collections::HashSet::new());
    for op in scan.as_ref().ok()?.iter().filter(|o| o.kind == Kind::Mutation) {
        if op.opaque {
            return None;
        }
        for f in &op.fields {
            if seen.insert(f.as_str()) {
                out.push(f.clone());
            }
        }
    }
    Some(out)
}

/// Why a rule listing `names` asks about `scan`: the listed mutations
/// found (`"mutation mergePullRequest"`), or what could not be read; None
/// if no mutation of the request is listed.
pub fn asked(scan: &Scan, names: &[NamePattern]) -> Option<String> {
    let ops = match scan {
        Ok(ops) => ops,
        Err(e) => return Some(format!("unreadable: {e}")),
    };
    let (mut found, mut seen): (Vec<&str>, std::collections::HashSet<&str>) = Default::default();
    for op in ops.iter().filter(|o| o.kind == Kind::Mutation) {
        if op.opaque && seen.insert("") {
            found.push("(a fragment: fields unknown)");
        }
        for f in &op.fields {
            if !seen.contains(f.as_str()) && names.iter().any(|n| n.matches(f)) {
                seen.insert(f);
                found.push(f);
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    let mut text = String::from("mutation");
    for f in found {
        if text.len() > 160 {
            text += " ...";
            break;
        }
        text.push(' ');
        text += f;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(query: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "query": query, "variables": {"a": 1} })).unwrap()
    }

    /// (kind, fields, opaque) of one operation.
    type Op = (Kind, Vec<String>, bool);

    /// Each operation, or the error.
    fn ops(b: &[u8]) -> Result<Vec<Op>, Error> {
        scan_body(b).map(|v| v.into_iter().map(|o| (o.kind, o.fields, o.opaque)).collect())
    }

    fn m(fields: &[&str]) -> Op {
        (Kind::Mutation, fields.iter().map(|s| s.to_string()).collect(), false)
    }

    fn q() -> Op {
        (Kind::Query, vec![], false)
    }

    #[test]
    fn operations_and_first_level_mutation_fields_are_found() {
        let table: &[(&str, Vec<Op>)] = &[
            ("mutation { mergePullRequest(input: {pullRequestId: \"x\"}) { clientMutationId } }", vec![m(&["mergePullRequest"])]),
            ("mutation M($id: ID!) { a: mergePullRequest(input: {pullRequestId: $id}) { pullRequest { id } } }", vec![m(&["mergePullRequest"])]),
            ("mutation{x:deleteRef(input:{refId:\"r\"}){clientMutationId},updateRef(input:{}){__typename}}", vec![m(&["deleteRef", "updateRef"])]),
            ("{ viewer { login } }", vec![q()]),
            ("query { viewer { login } }", vec![q()]),
            // The word mutation in strings and comments is nothing.
            ("query Q { search(query: \"mutation { deleteRef }\") { n } } # mutation { deleteRef }", vec![q()]),
            ("query { a(s: \"\"\"block } \\\"\"\" mutation { deleteRef } \"\"\") { b } }", vec![q()]),
            ("# comment\nmutation @dir(a: [1, 2.5e3, -3]) { \u{feff}addStar(input: {starrableId: \"\\u00e9 \\u{1F600}\"}) { x } }", vec![m(&["addStar"])]),
            ("query A { a } mutation B { mergeBranch(input: {}) { x } }", vec![q(), m(&["mergeBranch"])]),
            ("fragment F on Mutation { deleteRef { x } } mutation { ...F }", vec![(Kind::Mutation, vec![], true)]),
            ("mutation { ... on Mutation { deleteRef { x } } }", vec![(Kind::Mutation, vec![], true)]),
            ("mutation { createIssue(input: {}) @include(if: true) { issue { id } } }", vec![m(&["createIssue"])]),
            ("subscription { s }", vec![(Kind::Subscription, vec![], false)]),
        ];
        for (doc, want) in table {
            assert_eq!(ops(&body(doc)).as_ref(), Ok(want), "{doc}");
        }
        // The JSON escape is decoded before the document is lexed.
        let esc = br#"{"query": "\u006dutation { \u006dergePullRequest(input: {}) { x } }"}"#;
        assert_eq!(ops(esc), Ok(vec![m(&["mergePullRequest"])]));
        // A batch with one mutation among queries.
        let batch = format!(
            "[{}, {}]",
            String::from_utf8(body("{ viewer { login } }")).unwrap(),
            String::from_utf8(body("mutation { deleteRef(input: {}) { x } }")).unwrap()
        );
        assert_eq!(ops(batch.as_bytes()), Ok(vec![q(), m(&["deleteRef"])]));
    }

    #[test]
    fn what_cannot_be_read_with_certainty_is_an_error() {
        let deep = format!("query {}{}", "{ a ".repeat(MAX_DEPTH + 2), "}".repeat(MAX_DEPTH + 2));
        let wide = format!("mutation {{ {} }}", "a ".repeat(MAX_FIELDS + 1));
        let table: &[(&[u8], Error)] = &[
            (b"", Error::Json("not a JSON object or array".into())),
            (b"query=mutation", Error::Json("not a JSON object or array".into())),
            (b"{\"variables\": {}}", Error::NoQuery),
            (b"[]", Error::EmptyBatch),
            (&body(""), Error::NoOperation),
            (&body("mutation { deleteRef(input: {) }"), Error::Unbalanced),
            (&body("mutation { deleteRef(input: {}) "), Error::Truncated),
            (&body("mutation { }"), Error::EmptySelection),
            (&body("Mutation { deleteRef }"), Error::Unexpected("Mutation".into())),
            (&body("mutation { deleteRef(a: \"open) }"), Error::UnterminatedString(24)),
            (&body("mutation { deleteRef(a: \"\\x\") }"), Error::BadEscape(25)),
            (&body("mutation { deleteRef(a: 01x) }"), Error::BadNumber(24)),
            (&body("mutation { ; }"), Error::Char(11)),
            (&body(&deep), Error::TooDeep),
            (&body(&wide), Error::TooManyFields),
        ];
        for (b, want) in table {
            assert_eq!(scan_body(b).as_ref(), Err(want), "{}", String::from_utf8_lossy(b));
        }
        let dup = br#"{"query": "{ a }", "query": "mutation { deleteRef { x } }"}"#;
        assert!(matches!(scan_body(dup), Err(Error::Json(e)) if e.contains("duplicate")));
        assert!(matches!(scan_body(&vec![b' '; MAX_BODY + 1]), Err(Error::TooLarge(_))));
        let many = format!("[{}]", vec!["{\"query\":\"{a}\"}"; MAX_BATCH + 1].join(","));
        assert_eq!(scan_body(many.as_bytes()), Err(Error::BatchTooLarge(MAX_BATCH + 1)));
        let tokens = format!("{{ f(a: [{}]) }}", "[]".repeat(MAX_TOKENS / 2));
        assert_eq!(scan_body(&body(&tokens)), Err(Error::TooManyTokens));
    }

    #[test]
    fn the_query_parameter_of_a_get_is_scanned_the_same_way() {
        let t = "/graphql?operationName=x&query=mutation+%7B+mergePullRequest%28input%3A%7B%7D%29%7Bx%7D%7D";
        assert_eq!(scan_target(t).unwrap().unwrap()[0].fields, vec!["mergePullRequest"]);
        assert_eq!(scan_target("/graphql?query=%7Bviewer%7Blogin%7D%7D").unwrap().unwrap()[0].kind, Kind::Query);
        assert_eq!(scan_target("/graphql"), None);
        assert_eq!(scan_target("/graphql?a=b"), None);
        assert_eq!(scan_target("/graphql?query=%7Ba%7D&query=%7Bb%7D"), Some(Err(Error::DuplicateParam)));
        assert_eq!(scan_target("/graphql?query=%zz"), Some(Err(Error::BadParam)));
    }

    #[test]
    fn rules_ask_for_listed_mutations_and_for_anything_unclear() {
        let names: Vec<NamePattern> =
            ["mergePullRequest", "delete*", "*Destroy"].iter().map(|n| NamePattern::parse(n).unwrap()).collect();
        let ask = |doc: &str| asked(&scan_body(&body(doc)), &names);
        assert_eq!(
            ask("mutation { a: mergePullRequest(input: {}) { x } }").as_deref(),
            Some("mutation mergePullRequest")
        );
        assert_eq!(ask("mutation { DELETEREF(input: {}) { x } }").as_deref(), Some("mutation DELETEREF"));
        assert_eq!(ask("mutation { noteDestroy(input: {}) { x } }").as_deref(), Some("mutation noteDestroy"));
        assert_eq!(ask("mutation { addStar(input: {}) { x } }"), None, "an unlisted mutation");
        assert_eq!(ask("{ viewer { login } }"), None, "a read");
        assert_eq!(ask("query { search(q: \"mutation { mergePullRequest }\") { n } }"), None);
        // operationName is not trusted to pick the query.
        let both = br#"{"query": "query A { a } mutation B { mergePullRequest { x } }", "operationName": "A"}"#;
        assert!(asked(&scan_body(both), &names).is_some());
        assert!(ask("mutation { ...F } fragment F on Mutation { addStar { x } }").unwrap().contains("fragment"));
        assert!(ask("mutation { mergePullRequest(").unwrap().starts_with("unreadable"));
        assert!(asked(&Err(Error::Chunked), &names).unwrap().contains("chunked"));
        let every = [NamePattern::parse("*").unwrap()];
        assert!(asked(&scan_body(&body("mutation { addStar { x } }")), &every).is_some());
        for bad in ["", "**", "a*b", "merge-pr", "1abc", "*a*", "a b"] {
            assert!(NamePattern::parse(bad).is_err(), "{bad}");
        }
    }
}
