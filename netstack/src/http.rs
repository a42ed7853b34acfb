//! Host side: a strict, bounded parser for HTTP/1.x request heads sent by
//! the guest (untrusted). It accepts only what it can police unambiguously:
//! CRLF line endings, one Host that is a name (not an address), origin-form
//! targets, one clear body framing. Everything else is refused with a
//! reason, never guessed at: request smuggling lives in the ambiguities.
//!
//! Framing rules (where an upstream might read the bytes differently):
//! Transfer-Encoding only as one exact lower-case `chunked`, never on an
//! HTTP/1.0 request and never with Content-Length; no body on GET or HEAD;
//! no header whose name only differs from Host, Content-Length or
//! Transfer-Encoding by `_` for `-`. Chunked bodies are checked as they pass
//! ([`BodyScanner`]): strict hex sizes, extensions of token characters only,
//! bounded well-formed trailers without framing or routing fields.
//!
//! Paths: [`normalize_path`] gives the form path rules are matched against,
//! or refuses targets that cannot be normalised safely.

use thiserror::Error;

use crate::host::{self, HostName};

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;
/// Largest Content-Length accepted (bodies are streamed, not buffered).
pub const MAX_CONTENT_LENGTH: u64 = 1 << 40;

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("Request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("Request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("Request head has a line not ended by CRLF")]
    BadLineEnding,
    #[error("Malformed request line")]
    BadRequestLine,
    #[error("Malformed method")]
    BadMethod,
    #[error("Request target must be a path starting with '/'")]
    BadTarget,
    #[error("Only HTTP/1.1 and HTTP/1.0 are accepted")]
    BadVersion,
    #[error("Malformed header field name")]
    BadHeaderName,
    #[error("Malformed header field value")]
    BadHeaderValue,
    #[error("Folded header lines (obs-fold) are refused")]
    ObsFold,
    #[error("Request has no Host header")]
    MissingHost,
    #[error("Request has more than one Host header")]
    DuplicateHost,
    #[error("Bad Host: {0}")]
    BadHost(String),
    #[error("Both Content-Length and Transfer-Encoding: ambiguous framing")]
    ConflictingFraming,
    #[error("More than one Content-Length")]
    DuplicateContentLength,
    #[error("Malformed Content-Length")]
    BadContentLength,
    #[error("Transfer-Encoding other than a single 'chunked'")]
    UnsupportedTransferEncoding,
    #[error("CONNECT is refused: no tunnels")]
    Connect,
    #[error("Protocol upgrades (e.g. WebSocket) are refused")]
    Upgrade,
    #[error("HTTP/2 is refused: netstack speaks HTTP/1.1 only")]
    Http2Preface,
    #[error("Malformed chunked body")]
    BadChunk,
    #[error("Transfer-Encoding on an HTTP/1.0 request")]
    TransferEncodingHttp10,
    #[error("A body on a GET or HEAD request")]
    BodyOnGetOrHead,
    #[error("Header name that reads as Host, Content-Length or Transfer-Encoding with '_' for '-'")]
    UnderscoreHeader,
    #[error("Malformed chunk extension")]
    BadChunkExtension,
    #[error("Malformed trailer field")]
    BadTrailer,
    #[error("Trailer section larger than {MAX_TRAILERS} fields or {MAX_TRAILER_BYTES} bytes")]
    TrailersTooLarge,
    #[error("Framing or routing field (Host, Content-Length, Transfer-Encoding) in a trailer")]
    ForbiddenTrailer,
}

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path and query, as sent (origin-form).
    pub target: String,
    pub http10: bool,
    pub host: HostName,
    /// The port in the Host header, if any.
    pub host_port: Option<u16>,
    pub body: Body,
    pub keep_alive: bool,
    /// All fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (and may still fit).
    Incomplete,
    /// A whole head of `len` bytes; the body (if any) follows it.
    Complete(RequestHead, usize),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses the head at the start of `buf`.
pub fn parse_request_head(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.starts_with(HTTP2_PREFACE) || (buf.len() < HTTP2_PREFACE.len() && HTTP2_PREFACE.starts_with(buf)) {
        return if buf.len() >= HTTP2_PREFACE.len() { Err(Error::Http2Preface) } else { Ok(Parsed::Incomplete) };
    }
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let end = match window.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => i + 4,
        None if buf.len() >= MAX_HEAD => return Err(Error::TooLarge),
        None => {
            // Refuse bad line endings as soon as they are visible.
            check_line_endings(window, false)?;
            return Ok(Parsed::Incomplete);
        }
    };
    let head = &buf[..end];
    check_line_endings(head, true)?;
    let text = std::str::from_utf8(&head[..end - 4]).map_err(|_| Error::BadHeaderValue)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(Error::BadRequestLine)?;
    let (method, target, http10) = parse_request_line(request_line)?;

    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(Error::TooManyHeaders);
        }
        if line.starts_with([' ', '\t']) {
            return Err(Error::ObsFold);
        }
        let (name, value) = line.split_once(':').ok_or(Error::BadHeaderName)?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(Error::BadHeaderName);
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Error::BadHeaderValue);
        }
        headers.push((name.to_ascii_lowercase(), value.to_string()));
    }

    if headers.iter().any(|(k, _)| k.contains('_') && is_framing_field(k)) {
        return Err(Error::UnderscoreHeader);
    }
    let values = |n: &'static str| headers.iter().filter(move |(k, _)| k == n).map(|(_, v)| v.as_str());
    if values("upgrade").next().is_some() {
        return Err(Error::Upgrade);
    }
    let (host, host_port) = match values("host").collect::<Vec<_>>()[..] {
        [] => return Err(Error::MissingHost),
        [h] => parse_authority(h)?,
        _ => return Err(Error::DuplicateHost),
    };
    let lengths: Vec<&str> = values("content-length").collect();
    let encodings: Vec<&str> = values("transfer-encoding").collect();
    let body = match (&lengths[..], &encodings[..]) {
        ([], []) => Body::None,
        ([_, ..], [_, ..]) => return Err(Error::ConflictingFraming),
        ([l], []) => {
            if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 15 {
                return Err(Error::BadContentLength);
            }
            let n: u64 = l.parse().map_err(|_| Error::BadContentLength)?;
            if n > MAX_CONTENT_LENGTH {
                return Err(Error::BadContentLength);
            }
            if n == 0 {
                Body::None
            } else {
                Body::Length(n)
            }
        }
        ([_, _, ..], []) => return Err(Error::DuplicateContentLength),
        // HTTP/1.0 has no chunked coding: an HTTP/1.0 upstream would read
        // the chunks as the next request.
        ([], [_, ..]) if http10 => return Err(Error::TransferEncodingHttp10),
        // Exactly `chunked`: an upstream comparing case-sensitively would
        // not see `Chunked` and would read the body as the next request.
        ([], [te]) if *te == "chunked" => Body::Chunked,
        ([], _) => return Err(Error::UnsupportedTransferEncoding),
    };
    if body != Body::None && (method == "GET" || method == "HEAD") {
        return Err(Error::BodyOnGetOrHead);
    }
    let connection: Vec<String> =
        values("connection").flat_map(|v| v.split(',')).map(|t| t.trim().to_ascii_lowercase()).collect();
    let keep_alive =
        if http10 { connection.iter().any(|t| t == "keep-alive") } else { !connection.iter().any(|t| t == "close") };
    let head = RequestHead { method, target, http10, host, host_port, body, keep_alive, headers };
    Ok(Parsed::Complete(head, end))
}

/// True for Host, Content-Length and Transfer-Encoding, also when spelt
/// with `_` for `-` (which some gateways, CGI among them, equate).
fn is_framing_field(lower_name: &str) -> bool {
    let dashed = lower_name.replace('_', "-");
    matches!(dashed.as_str(), "host" | "content-length" | "transfer-encoding")
}

/// Every CR must be followed by LF and every LF preceded by CR. With
/// `complete`, a trailing lone CR is an error too.
fn check_line_endings(bytes: &[u8], complete: bool) -> Result<(), Error> {
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\r' => match bytes.get(i + 1) {
                Some(b'\n') => {}
                None if !complete => {}
                _ => return Err(Error::BadLineEnding),
            },
            b'\n' if i == 0 || bytes[i - 1] != b'\r' => return Err(Error::BadLineEnding),
            _ => {}
        }
    }
    Ok(())
}

fn parse_request_line(line: &str) -> Result<(String, String, bool), Error> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::BadRequestLine);
    };
    if method.is_empty() || method.len() > 32 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Error::BadMethod);
    }
    if method == "CONNECT" {
        return Err(Error::Connect);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::BadTarget);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(Error::BadVersion),
    };
    Ok((method.to_string(), target.to_string(), http10))
}

fn parse_authority(value: &str) -> Result<(HostName, Option<u16>), Error> {
    let bad = |e: host::Error| Error::BadHost(e.to_string());
    if value.starts_with('[') {
        return Err(bad(host::Error::IpLiteral(value.chars().take(80).collect())));
    }
    match value.rsplit_once(':') {
        Some((name, port)) => {
            let port: u16 =
                port.parse().ok().filter(|p| *p > 0).ok_or_else(|| Error::BadHost(format!("bad port in '{value}'")))?;
            Ok((HostName::parse(name).map_err(bad)?, Some(port)))
        }
        None => Ok((HostName::parse(value).map_err(bad)?, None)),
    }
}

/// Why a request target cannot be matched against path rules: each is a
/// spelling that upstreams are known to read differently, so a host with
/// path rules refuses it.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the target is not a path starting with '/' (origin-form)")]
    NotOriginForm,
    #[error("the target has a character that is not printable ASCII")]
    BadCharacter,
    #[error("the target has a backslash")]
    Backslash,
    #[error("the target has a malformed percent escape")]
    BadEscape,
    #[error("the target has an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("the target has an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("the target has an encoded control character (e.g. %00)")]
    EncodedControl,
    #[error("the target has a double-encoded escape (%25 then two hex digits)")]
    DoubleEncoded,
    #[error("the target has path parameters (';'), which servers read differently ('/admin;x/users' is /admin/users to some)")]
    PathParams,
    #[error("the target climbs above the root with '..'")]
    AboveRoot,
}

/// RFC 3986 unreserved characters: escaping them changes nothing.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One path segment with escapes of unreserved characters decoded and
/// every other escape kept, in upper case.
fn decode_segment(raw: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let hex = |j: usize| raw.get(j).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::EncodedBackslash),
                    0..0x20 | 0x7f => return Err(PathError::EncodedControl),
                    b'%' if hex(i + 3).is_some() && hex(i + 4).is_some() => return Err(PathError::DoubleEncoded),
                    v if is_unreserved(v) => out.push(v as char),
                    v => out.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b.is_ascii_graphic() => {
                out.push(b as char);
                i += 1;
            }
            _ => return Err(PathError::BadCharacter),
        }
    }
    Ok(out)
}

/// The path that path rules are matched against, from a request target:
/// the query and fragment dropped, escapes of unreserved characters
/// (`%41` is `A`, `%2e` is `.`) decoded, other escapes kept in upper case
/// (`%3f` is `%3F`), empty segments collapsed (`//` is `/`), dot segments
/// (`.`, `..`, also escaped) resolved. A trailing `/` is kept, and a path
/// ending in a dot segment ends in `/` (`/a/b/..` is `/a/`).
///
/// Case: the path itself is case-sensitive (`/Public` is not `/public`);
/// the hex digits of an escape are not (`%2e` is `%2E`).
///
/// Refused ([`PathError`]): anything but a path starting with `/`,
/// characters that are not printable ASCII, backslashes (raw or `%5C`),
/// an encoded `/` (`%2F`), encoded control characters (`%00`), malformed
/// escapes, double escapes (`%252e`), path parameters (`;` raw or `%3B`:
/// Tomcat, Jetty and Spring read `/admin;x/users` as `/admin/users`, and
/// `..;` as `..`) and `..` above the root.
pub fn normalize_path(target: &str) -> Result<String, PathError> {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let Some(path) = target.as_bytes()[..end].strip_prefix(b"/") else {
        return Err(PathError::NotOriginForm);
    };
    let mut segments: Vec<String> = Vec::new();
    let mut ends_in_slash = true;
    for raw in path.split(|b| *b == b'/') {
        let segment = decode_segment(raw)?;
        if segment.contains(';') || segment.contains("%3B") {
            return Err(PathError::PathParams);
        }
        match segment.as_str() {
            "" | "." => ends_in_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                ends_in_slash = true;
            }
            _ => {
                segments.push(segment);
                ends_in_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if ends_in_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Longest chunk-size line (size and extensions) or trailer line accepted
/// in a chunked body, CRLF included.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Most hex digits in a chunk size (60 bits: far past any real chunk, and
/// no upstream's integer overflows on it).
pub const MAX_CHUNK_DIGITS: usize = 15;
/// Most trailer fields after the last chunk.
pub const MAX_TRAILERS: usize = 32;
/// Most bytes in the trailer section (its lines, CRLFs included).
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;

/// Finds where a request body ends as its bytes pass by, so that the next
/// request on the connection is parsed (and checked) from its first byte.
/// Chunked bodies are checked strictly on the way (they pass unchanged, so
/// every upstream must read them the same way): a chunk-size line is 1 to
/// [`MAX_CHUNK_DIGITS`] hex digits, then optional `;name` or `;name=value`
/// extensions of token characters only (no whitespace, no quoted strings),
/// then CRLF; chunk data is followed by exactly CRLF; trailers are at most
/// [`MAX_TRAILERS`] well-formed `name: value` fields in
/// [`MAX_TRAILER_BYTES`], none of them Host, Content-Length or
/// Transfer-Encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyScanner {
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Inside chunk data, bytes left (then CRLF).
    ChunkData(u64),
    /// The CRLF after chunk data; how many of its bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty one: the line so
    /// far, the fields and bytes seen before it.
    Trailer {
        line: Vec<u8>,
        fields: usize,
        bytes: usize,
    },
    Done,
}

/// Checks a chunk-size line without its CRLF; returns the chunk's size.
fn chunk_size_line(text: &[u8]) -> Result<u64, Error> {
    let mut parts = text.split(|c| *c == b';');
    let digits = parts.next().unwrap_or_default();
    if digits.is_empty() || digits.len() > MAX_CHUNK_DIGITS || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Error::BadChunk);
    }
    for ext in parts {
        let (name, value) = match ext.iter().position(|c| *c == b'=') {
            Some(i) => (&ext[..i], Some(&ext[i + 1..])),
            None => (ext, None),
        };
        let token = |t: &[u8]| !t.is_empty() && t.iter().all(|c| is_tchar(*c));
        if !token(name) || value.is_some_and(|v| !token(v)) {
            return Err(Error::BadChunkExtension);
        }
    }
    // At most 15 hex digits: always fits.
    let digits = std::str::from_utf8(digits).map_err(|_| Error::BadChunk)?;
    u64::from_str_radix(digits, 16).map_err(|_| Error::BadChunk)
}

/// Checks a non-empty trailer line without its CRLF.
fn trailer_line(text: &[u8]) -> Result<(), Error> {
    if text.starts_with(b" ") || text.starts_with(b"\t") {
        return Err(Error::BadTrailer);
    }
    let colon = text.iter().position(|c| *c == b':').ok_or(Error::BadTrailer)?;
    let (name, value) = (&text[..colon], &text[colon + 1..]);
    if name.is_empty() || !name.iter().all(|c| is_tchar(*c)) {
        return Err(Error::BadTrailer);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Error::BadTrailer);
    }
    // Token characters are ASCII.
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    if is_framing_field(&name) {
        return Err(Error::ForbiddenTrailer);
    }
    Ok(())
}

impl BodyScanner {
    pub fn new(body: Body) -> BodyScanner {
        match body {
            Body::None | Body::Length(0) => BodyScanner::Done,
            Body::Length(n) => BodyScanner::Length(n),
            Body::Chunked => BodyScanner::ChunkSize(Vec::new()),
        }
    }

    pub fn is_done(&self) -> bool {
        *self == BodyScanner::Done
    }

    /// Consumes body bytes from the front of `data`; returns how many
    /// belong to the body (the rest is the next request).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Error> {
        let mut used = 0;
        while used < data.len() && !self.is_done() {
            let rest = &data[used..];
            match self {
                BodyScanner::Length(n) | BodyScanner::ChunkData(n) => {
                    let take = (*n).min(rest.len() as u64);
                    *n -= take;
                    used += take as usize;
                    if *n == 0 {
                        *self = match self {
                            BodyScanner::Length(_) => BodyScanner::Done,
                            _ => BodyScanner::ChunkEnd(0),
                        };
                    }
                }
                BodyScanner::ChunkEnd(seen) => {
                    let want = if *seen == 0 { b'\r' } else { b'\n' };
                    if rest[0] != want {
                        return Err(Error::BadChunk);
                    }
                    used += 1;
                    *seen += 1;
                    if *seen == 2 {
                        *self = BodyScanner::ChunkSize(Vec::new());
                    }
                }
                BodyScanner::ChunkSize(line) => {
                    let Some(text) = take_line(line, rest, &mut used, Error::BadChunk)? else { continue };
                    *self = match chunk_size_line(text)? {
                        0 => BodyScanner::Trailer { line: Vec::new(), fields: 0, bytes: 0 },
                        n => BodyScanner::ChunkData(n),
                    };
                }
                BodyScanner::Trailer { line, fields, bytes } => {
                    let Some(text) = take_line(line, rest, &mut used, Error::BadTrailer)? else { continue };
                    if text.is_empty() {
                        *self = BodyScanner::Done;
                        continue;
                    }
                    trailer_line(text)?;
                    *fields += 1;
                    *bytes += text.len() + 2;
                    if *fields > MAX_TRAILERS || *bytes > MAX_TRAILER_BYTES {
                        return Err(Error::TrailersTooLarge);
                    }
                    line.clear();
                }
                BodyScanner::Done => {}
            }
        }
        Ok(used)
    }
}

impl BodyScanner {
    /// As [`BodyScanner::feed`], also handing each run of the body's
    /// content (a Content-Length body's bytes, or chunk data without the
    /// chunked framing) to `content`, in order.
    pub fn feed_content(&mut self, data: &[u8], mut content: impl FnMut(&[u8])) -> Result<usize, Error> {
        self.feed_parts(data, |is_content, bytes| {
            if is_content {
                content(bytes)
            }
        })
    }

    /// As [`BodyScanner::feed`], handing every byte used to `part`, in
    /// order and in runs: `true` with body content (a Content-Length
    /// body's bytes, or chunk data), `false` with chunked framing (size
    /// lines with their extensions, the CRLF after data, trailers). A run
    /// of framing is handed on whole (not a byte at a time) once the content
    /// after it starts or `data` ends. On an error, what was used before it
    /// has been handed on.
    pub fn feed_parts(&mut self, data: &[u8], mut part: impl FnMut(bool, &[u8])) -> Result<usize, Error> {
        let mut used = 0;
        // Start of the framing run not handed on yet.
        let mut framing = 0;
        let result = (|| {
            while used < data.len() && !self.is_done() {
                let rest = &data[used..];
                let n = match self {
                    BodyScanner::Length(k) | BodyScanner::ChunkData(k) => {
                        let take = (*k).min(rest.len() as u64) as usize;
                        if framing < used {
                            part(false, &data[framing..used]);
                        }
                        part(true, &rest[..take]);
                        let n = self.feed(&rest[..take])?;
                        framing = used + n;
                        n
                    }
                    // Framing: a byte at a time, so that data is never
                    // passed over unseen.
                    _ => self.feed(&rest[..1])?,
                };
                if n == 0 {
                    break;
                }
                used += n;
            }
            Ok(used)
        })();
        if framing < used {
            part(false, &data[framing..used]);
        }
        result
    }
}

/// Moves one byte of `rest` into `line` (at most [`MAX_CHUNK_LINE`]);
/// returns the line without its CRLF once it is complete. A bare CR or LF
/// is `bad`.
fn take_line<'l>(line: &'l mut Vec<u8>, rest: &[u8], used: &mut usize, bad: Error) -> Result<Option<&'l [u8]>, Error> {
    let b = rest[0];
    *used += 1;
    let after_cr = line.last() == Some(&b'\r');
    line.push(b);
    if line.len() > MAX_CHUNK_LINE || (after_cr && b != b'\n') || (b == b'\n' && !after_cr) {
        return Err(bad);
    }
    Ok((b == b'\n').then(|| &line[..line.len() - 2]))
}

/// Longest response head tracked; past it the response is passed on
/// untracked (its status logged as unknown).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Watches the upstream's byte stream (never changing it) to find where
/// each response ends and what its status was, so that each request's
/// audit line gets its status and size.
#[derive(Debug, Default)]
pub struct ResponseTracker {
    head: Vec<u8>,
    body: Option<(u16, BodyScanner, u64)>,
    until_close: Option<(u16, u64)>,
    lost: bool,
}

/// A response that ended: status (None if it could not be read) and the
/// bytes it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Option<u16>,
    pub bytes: u64,
}

/// What a run of upstream bytes is ([`ResponseTracker::feed_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A response head (status line and fields).
    Head,
    /// Body content: a Content-Length or until-close body, or chunk data
    /// without its framing.
    Content,
    /// Chunked framing: size lines with their extensions, the CRLF after
    /// chunk data, the trailer section.
    Framing,
    /// Bytes that could not be read as responses (once lost).
    Unknown,
}

/// What [`ResponseTracker::feed_parts`] reports, with offsets into the
/// bytes fed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// The bytes `from..to` are a run of this part.
    Run(Part, usize, usize),
    /// A response head ends before offset `at` (an informational one too);
    /// `coded` names a content or transfer coding other than `identity`
    /// and one `chunked` that its body carries, if any.
    HeadEnd { at: usize, informational: bool, coded: Option<String> },
    /// A response ends before offset `at`.
    End { at: usize },
}

impl ResponseTracker {
    /// Feeds bytes from upstream; `head_request` says, for each response
    /// that starts, whether it answers a HEAD (no body). Returns the
    /// responses that completed.
    pub fn feed(&mut self, data: &[u8], head_request: impl FnMut() -> bool) -> Vec<Response> {
        self.feed_parts(data, head_request, |_| {})
    }

    /// As [`ResponseTracker::feed`], telling `mark` what each byte is
    /// and where heads and responses end (every byte of `data` is in
    /// exactly one [`Mark::Run`]).
    pub fn feed_parts(
        &mut self,
        data: &[u8],
        mut head_request: impl FnMut() -> bool,
        mut mark: impl FnMut(Mark),
    ) -> Vec<Response> {
        let mut done = Vec::new();
        let all = data;
        let mut data = data;
        let at = |rest: &[u8]| all.len() - rest.len();
        while !data.is_empty() && !self.lost {
            if let Some((_, n)) = self.until_close.as_mut() {
                *n += data.len() as u64;
                mark(Mark::Run(Part::Content, at(data), all.len()));
                return done;
            }
            if let Some((status, scanner, n)) = self.body.as_mut() {
                let from = at(data);
                let mut marked = from;
                let fed = scanner.feed_parts(data, |is_content, bytes| {
                    // `bytes` is a run of `data`, in order.
                    let part = if is_content { Part::Content } else { Part::Framing };
                    mark(Mark::Run(part, marked, marked + bytes.len()));
                    marked += bytes.len();
                });
                match fed {
                    Ok(used) => {
                        *n += used as u64;
                        data = &data[used..];
                        if scanner.is_done() {
                            done.push(Response { status: Some(*status), bytes: *n });
                            self.body = None;
                            mark(Mark::End { at: from + used });
                        }
                    }
                    Err(_) => {
                        // What was used before the error was marked; the
                        // rest is unknown.
                        data = &all[marked..];
                        self.lost = true;
                    }
                }
                continue;
            }
            // Reading a response head.
            let start = self.head.len().saturating_sub(3);
            let take = data.len().min(MAX_RESPONSE_HEAD + 4 - self.head.len().min(MAX_RESPONSE_HEAD));
            self.head.extend_from_slice(&data[..take]);
            match self.head[start..].windows(4).position(|w| w == b"\r\n\r\n") {
                None if self.head.len() >= MAX_RESPONSE_HEAD => {
                    mark(Mark::Run(Part::Head, at(data), at(data) + take));
                    data = &data[take..];
                    self.lost = true;
                }
                None => {
                    mark(Mark::Run(Part::Head, at(data), at(data) + take));
                    return done;
                }
                Some(i) => {
                    let head_len = start + i + 4;
                    let consumed = take - (self.head.len() - head_len);
                    mark(Mark::Run(Part::Head, at(data), at(data) + consumed));
                    data = &data[consumed..];
                    let head = std::mem::take(&mut self.head);
                    let Some((status, body, coded)) = parse_response_head(&head[..head_len]) else {
                        self.lost = true;
                        break;
                    };
                    let informational = (100..200).contains(&status) && status != 101;
                    mark(Mark::HeadEnd { at: at(data), informational, coded });
                    if informational {
                        continue;
                    }
                    let no_body = head_request() || status == 204 || status == 304;
                    match (no_body, body) {
                        (true, _) | (false, Some(Body::None)) => {
                            done.push(Response { status: Some(status), bytes: head_len as u64 });
                            mark(Mark::End { at: at(data) });
                        }
                        (false, Some(b)) => self.body = Some((status, BodyScanner::new(b), head_len as u64)),
                        (false, None) => self.until_close = Some((status, head_len as u64)),
                    }
                }
            }
        }
        if !data.is_empty() {
            mark(Mark::Run(Part::Unknown, at(data), all.len()));
        }
        done
    }

    /// True once the upstream's bytes could not be read as responses
    /// (garbage, a head over [`MAX_RESPONSE_HEAD`], a malformed chunked
    /// body): nothing more is tracked.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// True while part of a response head has come, not its end.
    pub fn head_partial(&self) -> bool {
        !self.head.is_empty() && !self.lost
    }

    /// True while a response's body is passing.
    pub fn in_response(&self) -> bool {
        self.body.is_some() || self.until_close.is_some()
    }

    /// The upstream closed: a response that ran until close ends here.
    pub fn close(&mut self) -> Option<Response> {
        self.until_close.take().map(|(status, bytes)| Response { status: Some(status), bytes })
    }
}

/// Status and framing of a response head (None for the framing: until
/// close), and any coding of its body other than `identity` and one
/// `chunked` (named, for the refusal).
fn parse_response_head(head: &[u8]) -> Option<(u16, Option<Body>, Option<String>)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok().filter(|s| (100..600).contains(s))?;
    let mut length = None;
    let mut chunked = false;
    let mut coded: Option<String> = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().to_ascii_lowercase();
        if k == "content-length" {
            length = v.parse::<u64>().ok();
        } else if k == "transfer-encoding" {
            if v.contains("chunked") {
                chunked = true;
            }
            if v != "chunked" && coded.is_none() {
                coded = Some(format!("Transfer-Encoding: {}", cut_field(&v)));
            }
        } else if k == "content-encoding" && v.split(',').any(|c| !c.trim().is_empty() && c.trim() != "identity") {
            coded.get_or_insert_with(|| format!("Content-Encoding: {}", cut_field(&v)));
        }
    }
    let body =
        if chunked { Some(Body::Chunked) } else { length.map(|n| if n == 0 { Body::None } else { Body::Length(n) }) };
    Some((status, body, coded))
}

/// An upstream's field value as named in a refusal: at most 64 characters.
fn cut_field(v: &str) -> String {
    v.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (RequestHead, usize) {
        match parse_request_head(raw.as_bytes()) {
            Ok(Parsed::Complete(h, n)) => (h, n),
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn err(raw: &str) -> Error {
        match parse_request_head(raw.as_bytes()) {
            Err(e) => e,
            other => panic!("{raw:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn a_plain_get() {
        let raw = "GET /a/b?c=d HTTP/1.1\r\nHost: Example.COM\r\nAccept: */*\r\n\r\nBODY";
        let (h, n) = ok(raw);
        assert_eq!(n, raw.len() - 4);
        assert_eq!((h.method.as_str(), h.target.as_str()), ("GET", "/a/b?c=d"));
        assert_eq!(h.host.as_str(), "example.com");
        assert_eq!((h.host_port, h.body, h.keep_alive, h.http10), (None, Body::None, true, false));
        assert_eq!(h.headers[1], ("accept".to_string(), "*/*".to_string()));
    }

    #[test]
    fn bodies_and_connection_handling() {
        let (h, _) = ok("POST / HTTP/1.1\r\nHost: a.com:8080\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!((h.body, h.host_port, h.keep_alive), (Body::Length(12), Some(8080), false));
        let (h, _) = ok("POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, Body::Chunked);
        let (h, _) = ok("GET / HTTP/1.0\r\nHost: a.com\r\n\r\n");
        assert!(!h.keep_alive && h.http10);
        let (h, _) = ok("GET / HTTP/1.0\r\nHost: a.com\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        for part in ["", "GET / HT", "GET / HTTP/1.1\r\nHost: a.com\r\n", "GET / HTTP/1.1\r", "PRI * HTTP/2"] {
            assert_eq!(parse_request_head(part.as_bytes()), Ok(Parsed::Incomplete), "{part:?}");
        }
    }

    #[test]
    fn smuggling_framings_are_refused() {
        let h = "POST / HTTP/1.1\r\nHost: a.com\r\n";
        assert_eq!(
            err(&format!("{h}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")),
            Error::ConflictingFraming
        );
        assert_eq!(err(&format!("{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\n")), Error::DuplicateContentLength);
        assert_eq!(err(&format!("{h}Content-Length: 5, 5\r\n\r\n")), Error::BadContentLength);
        assert_eq!(err(&format!("{h}Content-Length: +5\r\n\r\n")), Error::BadContentLength);
        assert_eq!(err(&format!("{h}Content-Length: 99999999999999999999\r\n\r\n")), Error::BadContentLength);
        assert_eq!(err(&format!("{h}Transfer-Encoding: gzip, chunked\r\n\r\n")), Error::UnsupportedTransferEncoding);
        assert_eq!(
            err(&format!("{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n")),
            Error::UnsupportedTransferEncoding
        );
        assert_eq!(err(&format!("{h}Transfer-Encoding : chunked\r\n\r\n")), Error::BadHeaderName);
        assert_eq!(err(&format!("{h}X: a\r\n folded\r\n\r\n")), Error::ObsFold);
        assert_eq!(err("GET / HTTP/1.1\nHost: a.com\n\n"), Error::BadLineEnding);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a.com\rX: y\r\n\r\n"), Error::BadLineEnding);
        assert_eq!(err("GET / HTTP/1.1\r\nX: a\0b\r\nHost: a.com\r\n\r\n"), Error::BadHeaderValue);
    }

    #[test]
    fn framings_upstreams_may_read_differently_are_refused() {
        let post = "POST / HTTP/1.1\r\nHost: a.com\r\n";
        // Only one exact, lower-case `chunked`.
        for te in ["Chunked", "CHUNKED", "chunked, chunked", "identity", "chunked;q=1", "\"chunked\"", "x-chunked"] {
            let raw = format!("{post}Transfer-Encoding: {te}\r\n\r\n");
            assert_eq!(err(&raw), Error::UnsupportedTransferEncoding, "{te}");
        }
        // HTTP/1.0 has no chunked coding.
        assert_eq!(
            err("POST / HTTP/1.0\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Error::TransferEncodingHttp10
        );
        let (h, _) = ok("POST / HTTP/1.0\r\nHost: a.com\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(h.body, Body::Length(3), "HTTP/1.0 with a length is fine");
        // Both framings, in either order.
        assert_eq!(
            err(&format!("{post}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")),
            Error::ConflictingFraming
        );
        // No bodies on GET or HEAD; an explicit zero length is no body.
        for method in ["GET", "HEAD"] {
            for framing in ["Content-Length: 1", "Transfer-Encoding: chunked"] {
                let raw = format!("{method} / HTTP/1.1\r\nHost: a.com\r\n{framing}\r\n\r\n");
                assert_eq!(err(&raw), Error::BodyOnGetOrHead, "{raw:?}");
            }
            let (h, _) = ok(&format!("{method} / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 0\r\n\r\n"));
            assert_eq!(h.body, Body::None);
        }
        let (h, _) = ok("DELETE / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(h.body, Body::Length(2));
        // Underscore spellings that CGI-style gateways equate with the real one.
        for name in ["Content_Length", "Transfer_Encoding", "HOST_"] {
            let raw = format!("{post}Content-Length: 1\r\n{name}: 5\r\n\r\n");
            let want = if name == "HOST_" { None } else { Some(Error::UnderscoreHeader) };
            assert_eq!(parse_request_head(raw.as_bytes()).err(), want, "{name}");
        }
        assert!(ok(&format!("{post}X_Custom: 1\r\n\r\n")).0.body == Body::None);
    }

    #[test]
    fn paths_are_normalised_for_matching() {
        for (target, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/b?x=/../c#f", "/a/b"),
            ("/a?", "/a"),
            ("/public/../private", "/private"),
            ("/public/./x", "/public/x"),
            ("/public/x/..", "/public/"),
            ("/public/x/.", "/public/x/"),
            ("/public//x", "/public/x"),
            ("//public", "/public"),
            ("/public/%2e%2e/private", "/private"),
            ("/public/%2E%2e/private", "/private"),
            ("/public/.%2e/private", "/private"),
            ("/public/%2e/x", "/public/x"),
            ("/%41%62%7e%2D%5f", "/Ab~-_"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%3Fb", "/a%3Fb"),
            ("/a%20b", "/a%20b"),
            ("/%C3%A9", "/%C3%A9"),
            ("/...", "/..."),
            ("/a/..b", "/a/..b"),
            ("/100%25", "/100%25"),
            ("/Public", "/Public"),
        ] {
            assert_eq!(normalize_path(target).as_deref(), Ok(want), "{target}");
        }
        // Normalising is idempotent.
        for t in ["/a/./b/../c//d/", "/%7e%2e%2F"] {
            if let Ok(once) = normalize_path(t) {
                assert_eq!(normalize_path(&once), Ok(once.clone()), "{t}");
            }
        }
        for (target, want) in [
            ("*", PathError::NotOriginForm),
            ("http://a.com/", PathError::NotOriginForm),
            ("", PathError::NotOriginForm),
            ("?/public/", PathError::NotOriginForm),
            ("/a b", PathError::BadCharacter),
            ("/a\u{e9}", PathError::BadCharacter),
            ("/public\\..\\private", PathError::Backslash),
            ("/public/%5c../private", PathError::EncodedBackslash),
            ("/public%2F..%2Fprivate", PathError::EncodedSlash),
            ("/public/%2f", PathError::EncodedSlash),
            ("/a%00", PathError::EncodedControl),
            ("/a%0d%0a", PathError::EncodedControl),
            ("/a%7F", PathError::EncodedControl),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%+1", PathError::BadEscape),
            ("/public/%252e%252e/private", PathError::DoubleEncoded),
            ("/public/..;/private", PathError::PathParams),
            ("/admin;jsessionid=1/users", PathError::PathParams),
            ("/public/.;x/y", PathError::PathParams),
            ("/public/..%3b/private", PathError::PathParams),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
            ("/public/../../private", PathError::AboveRoot),
        ] {
            assert_eq!(normalize_path(target), Err(want), "{target}");
        }
    }

    #[test]
    fn hosts_must_be_one_valid_name() {
        assert_eq!(err("GET / HTTP/1.1\r\n\r\n"), Error::MissingHost);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n"), Error::DuplicateHost);
        for bad in ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]", "a.com:0", "a.com:x", "a b"] {
            assert!(matches!(err(&format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n")), Error::BadHost(_)), "{bad}");
        }
    }

    #[test]
    fn tunnels_upgrades_and_other_protocols_are_refused() {
        assert_eq!(err("CONNECT a.com:443 HTTP/1.1\r\nHost: a.com\r\n\r\n"), Error::Connect);
        assert_eq!(
            err("GET /ws HTTP/1.1\r\nHost: a.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            Error::Upgrade
        );
        assert_eq!(err("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Error::Http2Preface);
        assert_eq!(err("GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET * HTTP/1.1\r\nHost: a.com\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET / HTTP/2\r\nHost: a.com\r\n\r\n"), Error::BadVersion);
        assert_eq!(err("get / HTTP/1.1\r\nHost: a.com\r\n\r\n"), Error::BadMethod);
        assert_eq!(err("GET  / HTTP/1.1\r\nHost: a.com\r\n\r\n"), Error::BadRequestLine);
    }

    #[test]
    fn sizes_are_bounded() {
        let big = format!("GET / HTTP/1.1\r\nHost: a.com\r\nX: {}\r\n\r\n", "a".repeat(100 * 1024));
        assert_eq!(err(&big), Error::TooLarge);
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(err(&endless), Error::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: v\r\n")).collect();
        assert_eq!(err(&format!("GET / HTTP/1.1\r\nHost: a.com\r\n{many}\r\n")), Error::TooManyHeaders);
    }

    #[test]
    fn a_pipelined_second_request_is_left_for_the_next_parse() {
        let first = "GET /1 HTTP/1.1\r\nHost: a.com\r\n\r\n";
        let both = format!("{first}GET /2 HTTP/1.1\r\nHost: evil.com\r\n\r\n");
        let (h, n) = ok(&both);
        assert_eq!((h.target.as_str(), n), ("/1", first.len()));
        let (h2, _) = ok(&both[n..]);
        assert_eq!((h2.target.as_str(), h2.host.as_str()), ("/2", "evil.com"));
    }

    #[test]
    fn body_scanner_finds_the_end_of_bodies() {
        let mut s = BodyScanner::new(Body::Length(5));
        assert_eq!(s.feed(b"abc"), Ok(3));
        assert_eq!(s.feed(b"deGET /"), Ok(2));
        assert!(s.is_done());

        let chunked = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        let body_len = chunked.len() - b"GET /next".len();
        let mut s = BodyScanner::new(Body::Chunked);
        assert_eq!(s.feed(chunked), Ok(body_len));
        assert!(s.is_done());
        // The same, a byte at a time.
        let mut s = BodyScanner::new(Body::Chunked);
        let used: usize = chunked[..body_len].iter().map(|b| s.feed(&[*b]).unwrap()).sum();
        assert_eq!(used, body_len);
        assert!(s.is_done());
        assert!(BodyScanner::new(Body::None).is_done());
    }

    #[test]
    fn bad_chunked_bodies_are_refused() {
        for bad in [&b"x\r\n"[..], b"4\nWiki", b"4\r\nWikiX\r\n", b"-1\r\n", b"4 \r\n", b"fffffffffffffffff\r\n"] {
            let mut s = BodyScanner::new(Body::Chunked);
            assert_eq!(s.feed(bad), Err(Error::BadChunk), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut s = BodyScanner::new(Body::Chunked);
        assert_eq!(s.feed(&[b'1'; MAX_CHUNK_LINE + 1]), Err(Error::BadChunk));
        let mut s = BodyScanner::new(Body::Chunked);
        assert_eq!(s.feed(&[b'1'; MAX_CHUNK_DIGITS + 1]), Ok(MAX_CHUNK_DIGITS + 1), "waits for the line end");
        assert_eq!(s.feed(b"\r\n"), Err(Error::BadChunk), "too many digits");
        for bad in [&b"0x5\r\n"[..], b"\r\n", b" 5\r\n", b"5\r\r\n", b"5\rX\n", b"+5\r\n"] {
            let mut s = BodyScanner::new(Body::Chunked);
            assert_eq!(s.feed(bad), Err(Error::BadChunk), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunk_extensions_are_token_characters_only() {
        let body = |line: &str| {
            let mut s = BodyScanner::new(Body::Chunked);
            s.feed(format!("{line}\r\nabc\r\n0\r\n\r\n").as_bytes()).map(|_| s.is_done())
        };
        for good in ["3", "3;a", "3;a=b", "3;a=b;c", "3;name=val!#$%&'*+-.^_`|~"] {
            assert_eq!(body(good), Ok(true), "{good}");
        }
        for bad in
            ["3;", "3;;a", "3; a", "3;a =b", "3;a= b", "3;a=", "3;=b", "3;a=\"b\"", "3;a=b c", "3;a\tb", "3;a=b;"]
        {
            assert_eq!(body(bad), Err(Error::BadChunkExtension), "{bad:?}");
        }
        // Whitespace after the size, a bare CR inside an extension (a line
        // end for lax parsers).
        assert_eq!(body("3 ;a"), Err(Error::BadChunk));
        assert_eq!(body("3;a\rb"), Err(Error::BadChunk));
        // The whole line is bounded too.
        let long = format!("3;{}", "a".repeat(MAX_CHUNK_LINE));
        assert_eq!(body(&long), Err(Error::BadChunk));
    }

    #[test]
    fn trailers_are_bounded_and_well_formed() {
        let body = |trailers: &str| {
            let mut s = BodyScanner::new(Body::Chunked);
            s.feed(format!("1\r\nx\r\n0\r\n{trailers}\r\nNEXT").as_bytes()).map(|n| (n, s.is_done()))
        };
        let ok_trailers = "X-Sum: abc\r\nX-Empty:\r\nX-Tab:\tv\r\n";
        let (n, done) = body(ok_trailers).unwrap();
        assert!(done);
        assert_eq!(n, "1\r\nx\r\n0\r\n".len() + ok_trailers.len() + 2, "stops before the next request");
        for (bad, want) in [
            ("Content-Length: 5\r\n", Error::ForbiddenTrailer),
            ("transfer-encoding: chunked\r\n", Error::ForbiddenTrailer),
            ("Host: evil.com\r\n", Error::ForbiddenTrailer),
            ("Content_Length: 5\r\n", Error::ForbiddenTrailer),
            ("no colon\r\n", Error::BadTrailer),
            (": v\r\n", Error::BadTrailer),
            ("X Y: v\r\n", Error::BadTrailer),
            (" X: folded\r\n", Error::BadTrailer),
            ("X: a\x00b\r\n", Error::BadTrailer),
            ("X: a\rb\r\n", Error::BadTrailer),
            ("X: a\nb\r\n", Error::BadTrailer),
        ] {
            assert_eq!(body(bad), Err(want), "{bad:?}");
        }
        let many: String = (0..=MAX_TRAILERS).map(|i| format!("X{i}: v\r\n")).collect();
        assert_eq!(body(&many), Err(Error::TrailersTooLarge));
        let big: String = (0..10).map(|i| format!("X{i}: {}\r\n", "v".repeat(MAX_CHUNK_LINE - 10))).collect();
        assert_eq!(body(&big), Err(Error::TrailersTooLarge));
    }

    #[test]
    fn responses_are_delimited_and_their_status_read() {
        let stream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc\
HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n\
HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
        let mut t = ResponseTracker::default();
        let all = t.feed(stream, || false);
        let statuses: Vec<Option<u16>> = all.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![Some(200), Some(404), Some(204)], "the last one still awaits its body");
        assert_eq!(t.feed(b"123456789", || false), vec![Response { status: Some(200), bytes: 47 }]);
        // The same, a byte at a time; HEAD answers carry no body.
        let mut t = ResponseTracker::default();
        let mut seen = Vec::new();
        for b in stream.iter() {
            seen.extend(t.feed(&[*b], || false));
        }
        assert_eq!(seen, all);
        assert_eq!(all[0].bytes, 41);
        let mut t = ResponseTracker::default();
        let head_only = t.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 201 Created\r\n\r\n", || true);
        assert_eq!(head_only.iter().map(|r| r.status).collect::<Vec<_>>(), vec![Some(200), Some(201)]);
        // Until-close bodies end at close.
        let mut t = ResponseTracker::default();
        assert!(t.feed(b"HTTP/1.0 200 OK\r\n\r\nsome body", || false).is_empty());
        assert_eq!(t.close(), Some(Response { status: Some(200), bytes: 28 }));
        // Garbage stops tracking without panicking.
        let mut t = ResponseTracker::default();
        assert!(t.feed(b"SSH-2.0-x\r\n\r\nmore", || false).is_empty());
        assert!(t.feed(&vec![b'a'; 2 * MAX_RESPONSE_HEAD], || false).is_empty());
    }

    #[test]
    fn every_response_byte_is_marked_once_with_what_it_is() {
        let stream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n\r\nfgGARBAGE";
        for step in [1, 3, stream.len()] {
            let mut t = ResponseTracker::default();
            let (mut parts, mut ends, mut codings, mut covered) = (Vec::new(), 0, Vec::new(), 0);
            for (i, piece) in stream.chunks(step).enumerate() {
                let base = i * step;
                t.feed_parts(
                    piece,
                    || false,
                    |m| match m {
                        Mark::Run(part, from, to) => {
                            assert_eq!(base + from, covered, "runs are contiguous and in order");
                            covered = base + to;
                            parts.extend(std::iter::repeat_n(part, to - from));
                        }
                        Mark::End { .. } => ends += 1,
                        Mark::HeadEnd { coded, .. } => codings.push(coded),
                    },
                );
            }
            assert_eq!(covered, stream.len());
            let of = |part: Part| -> String {
                stream.iter().zip(&parts).filter(|(_, p)| **p == part).map(|(b, _)| *b as char).collect()
            };
            assert_eq!(of(Part::Content), "abcdefg", "step {step}");
            assert_eq!(of(Part::Framing), "3;e=1\r\n\r\n2\r\n\r\n0\r\nX-T: 1\r\n\r\n");
            assert!(of(Part::Head).ends_with("\r\n\r\nGARBAGE"), "what follows is the next head, so far");
            assert_eq!(of(Part::Unknown), "");
            assert_eq!(ends, 2);
            assert_eq!(codings, vec![None, None, Some("Content-Encoding: gzip".to_string())]);
        }
    }

    #[test]
    fn prefixes_and_corruptions_of_a_head_parse_within_their_bytes() {
        // A cheap deterministic stand-in for the fuzzer: every prefix and
        // every single-byte corruption of a valid head.
        let base = b"POST /x HTTP/1.1\r\nHost: a.com\r\nContent-Length: 3\r\n\r\nabc".to_vec();
        let head_len = base.len() - 3;
        // Every prefix short of the blank line waits for more; with it, the
        // head is whole, and the body is not part of it.
        for i in 0..head_len {
            assert_eq!(parse_request_head(&base[..i]), Ok(Parsed::Incomplete), "{i}");
        }
        for i in head_len..=base.len() {
            let Ok(Parsed::Complete(head, n)) = parse_request_head(&base[..i]) else { panic!("{i}") };
            assert_eq!((n, head.method.as_str(), head.target.as_str()), (head_len, "POST", "/x"));
            assert_eq!((head.host.as_str(), head.body), ("a.com", Body::Length(3)));
        }
        // A corrupted head, when whole, ends with its blank line inside the
        // bytes given and parses the same from its own bytes alone: what
        // follows it never changes it.
        for i in 0..base.len() {
            for b in [0u8, b'\r', b'\n', b' ', b':', 0xff, b'A'] {
                let mut m = base.clone();
                m[i] = b;
                let got = parse_request_head(&m);
                if let Ok(Parsed::Complete(_, n)) = &got {
                    assert!(*n <= m.len() && m[..*n].ends_with(b"\r\n\r\n"), "{m:?}");
                    assert_eq!(parse_request_head(&m[..*n]), got, "{m:?}");
                }
                if i >= head_len {
                    // Only the body changed.
                    assert_eq!(got, parse_request_head(&base), "{m:?}");
                }
            }
        }
    }
}
