//! Host side: a strict, bounded parser for HTTP/1.x request heads sent by
//! the guest (untrusted). It accepts only what it can police unambiguously:
//! CRLF line endings, one Host that is a name (not an address), origin-form
//! targets, one clear body framing. Everything else is refused with a
//! reason, never guessed at: request smuggling lives in the ambiguities.

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
    #[error("HTTP/2 is refused on port 80")]
    Http2Preface,
    #[error("Malformed chunked body")]
    BadChunk,
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
        ([], [te]) if te.eq_ignore_ascii_case("chunked") => Body::Chunked,
        ([], _) => return Err(Error::UnsupportedTransferEncoding),
    };
    let connection: Vec<String> =
        values("connection").flat_map(|v| v.split(',')).map(|t| t.trim().to_ascii_lowercase()).collect();
    let keep_alive =
        if http10 { connection.iter().any(|t| t == "keep-alive") } else { !connection.iter().any(|t| t == "close") };
    let head = RequestHead { method, target, http10, host, host_port, body, keep_alive, headers };
    Ok(Parsed::Complete(head, end))
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

/// Longest chunk-size or trailer line accepted in a chunked body.
pub const MAX_CHUNK_LINE: usize = 1024;

/// Finds where a request body ends as its bytes pass by, so that the next
/// request on the connection is parsed (and checked) from its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyScanner {
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Inside chunk data, bytes left (then CRLF).
    ChunkData(u64),
    /// The CRLF after chunk data; how many of its bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty one.
    Trailer(Vec<u8>),
    Done,
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
            let trailer = matches!(self, BodyScanner::Trailer(_));
            match self {
                BodyScanner::Length(n) => {
                    let take = (*n).min(rest.len() as u64);
                    *n -= take;
                    used += take as usize;
                    if *n == 0 {
                        *self = BodyScanner::Done;
                    }
                }
                BodyScanner::ChunkData(n) => {
                    let take = (*n).min(rest.len() as u64);
                    *n -= take;
                    used += take as usize;
                    if *n == 0 {
                        *self = BodyScanner::ChunkEnd(0);
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
                BodyScanner::ChunkSize(line) | BodyScanner::Trailer(line) => {
                    let in_trailer = trailer;
                    let b = rest[0];
                    used += 1;
                    line.push(b);
                    if line.len() > MAX_CHUNK_LINE {
                        return Err(Error::BadChunk);
                    }
                    if b != b'\n' {
                        continue;
                    }
                    if !line.ends_with(b"\r\n") {
                        return Err(Error::BadChunk);
                    }
                    let text = &line[..line.len() - 2];
                    let next = if in_trailer {
                        if text.is_empty() {
                            BodyScanner::Done
                        } else {
                            BodyScanner::Trailer(Vec::new())
                        }
                    } else {
                        let digits = text.split(|c| *c == b';').next().unwrap_or_default();
                        let digits = std::str::from_utf8(digits).map_err(|_| Error::BadChunk)?;
                        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
                            return Err(Error::BadChunk);
                        }
                        match u64::from_str_radix(digits, 16).map_err(|_| Error::BadChunk)? {
                            0 => BodyScanner::Trailer(Vec::new()),
                            n => BodyScanner::ChunkData(n),
                        }
                    };
                    *self = next;
                }
                BodyScanner::Done => {}
            }
        }
        Ok(used)
    }
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

impl ResponseTracker {
    /// Feeds bytes from upstream; `head_request` says, for each response
    /// that starts, whether it answers a HEAD (no body). Returns the
    /// responses that completed.
    pub fn feed(&mut self, mut data: &[u8], mut head_request: impl FnMut() -> bool) -> Vec<Response> {
        let mut done = Vec::new();
        while !data.is_empty() && !self.lost {
            if let Some((_, n)) = self.until_close.as_mut() {
                *n += data.len() as u64;
                return done;
            }
            if let Some((status, scanner, n)) = self.body.as_mut() {
                match scanner.feed(data) {
                    Ok(used) => {
                        *n += used as u64;
                        data = &data[used..];
                        if scanner.is_done() {
                            done.push(Response { status: Some(*status), bytes: *n });
                            self.body = None;
                        }
                    }
                    Err(_) => self.lost = true,
                }
                continue;
            }
            // Reading a response head.
            let start = self.head.len().saturating_sub(3);
            let take = data.len().min(MAX_RESPONSE_HEAD + 4 - self.head.len().min(MAX_RESPONSE_HEAD));
            self.head.extend_from_slice(&data[..take]);
            match self.head[start..].windows(4).position(|w| w == b"\r\n\r\n") {
                None if self.head.len() >= MAX_RESPONSE_HEAD => {
                    self.lost = true;
                }
                None => return done,
                Some(i) => {
                    let head_len = start + i + 4;
                    let consumed = take - (self.head.len() - head_len);
                    data = &data[consumed..];
                    let head = std::mem::take(&mut self.head);
                    let Some((status, body)) = parse_response_head(&head[..head_len]) else {
                        self.lost = true;
                        break;
                    };
                    let informational = (100..200).contains(&status) && status != 101;
                    if informational {
                        continue;
                    }
                    let no_body = head_request() || status == 204 || status == 304;
                    match (no_body, body) {
                        (true, _) | (false, Some(Body::None)) => {
                            done.push(Response { status: Some(status), bytes: head_len as u64 })
                        }
                        (false, Some(b)) => self.body = Some((status, BodyScanner::new(b), head_len as u64)),
                        (false, None) => self.until_close = Some((status, head_len as u64)),
                    }
                }
            }
        }
        done
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

/// Status and framing of a response head (None for the framing: until close).
fn parse_response_head(head: &[u8]) -> Option<(u16, Option<Body>)> {
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
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let k = k.trim().to_ascii_lowercase();
        if k == "content-length" {
            length = v.trim().parse::<u64>().ok();
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body =
        if chunked { Some(Body::Chunked) } else { length.map(|n| if n == 0 { Body::None } else { Body::Length(n) }) };
    Some((status, body))
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
        let (h, _) = ok("POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: Chunked\r\n\r\n");
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
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic stand-in for the fuzzer: every prefix and
        // every single-byte corruption of a valid head.
        let base = b"POST /x HTTP/1.1\r\nHost: a.com\r\nContent-Length: 3\r\n\r\nabc".to_vec();
        for i in 0..=base.len() {
            let _ = parse_request_head(&base[..i]);
        }
        for i in 0..base.len() {
            for b in [0u8, b'\r', b'\n', b' ', b':', 0xff, b'A'] {
                let mut m = base.clone();
                m[i] = b;
                let _ = parse_request_head(&m);
            }
        }
    }
}
