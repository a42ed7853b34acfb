//! Host side: reads the server name (SNI) from the first TLS record the
//! guest sends on port 443, without decrypting anything. Bounded and
//! strict: one handshake record holding a whole ClientHello and nothing
//! else, exactly one host_name, no Encrypted Client Hello (its outer name
//! would not be the real destination). Everything else is refused: the
//! connection is then reset, fail closed.
//!
//! A connection that is spliced after that ([`HandshakeWatch`]) has every
//! later record the guest sends parsed while the handshake may still be in
//! plaintext, so that a second ClientHello (the HelloRetryRequest flow of
//! TLS 1.3) cannot name another server: it must be whole in its record,
//! name exactly the same server, and come at most once; a record type the
//! handshake does not allow there resets the connection. TLS 1.2 (no
//! supported_versions offered, or the client's plaintext key exchange
//! seen): watched up to the client's ChangeCipherSpec. TLS 1.3 possible:
//! a handshake record after a ChangeCipherSpec is either TLS 1.2's
//! encrypted Finished or TLS 1.3's second ClientHello; one that starts
//! like a ClientHello (type 1, a length servers accept) is parsed as one
//! and refused if it is not a valid one; once encrypted records
//! (application_data) are seen, only their headers are read (cheap) and a
//! plaintext handshake record may only be that one retried ClientHello.
//! Buffers: one record at most ([`MAX_RECORD`]).

use thiserror::Error;

use crate::host::HostName;

/// A TLS record header plus the largest plaintext record.
pub const MAX_RECORD: usize = 5 + (1 << 14);

/// The largest encrypted record (TLS 1.2's bound; TLS 1.3's is lower).
pub const MAX_CIPHERTEXT_RECORD: usize = 5 + (1 << 14) + 2048;
/// The largest ClientHello message a server reads (OpenSSL's bound is
/// 131396 bytes, Go's and rustls' lower): after a ChangeCipherSpec, a
/// handshake record that starts with a ClientHello header declaring at
/// most this is parsed as a retried ClientHello.
pub const MAX_HELLO_MESSAGE: usize = 1 << 18;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// The client's plaintext messages of a TLS 1.2 handshake after its hello.
const HANDSHAKE_TLS12_FLIGHT: [u8; 3] = [11, 15, 16]; // certificate, certificate_verify, client_key_exchange
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST: u8 = 0;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    #[error("Not a TLS handshake record")]
    NotHandshake,
    #[error("Unsupported TLS record version")]
    BadVersion,
    #[error("TLS record is longer than allowed")]
    RecordTooLong,
    #[error("First handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello does not fit in its first record")]
    Fragmented,
    #[error("Malformed ClientHello")]
    Malformed,
    #[error("ClientHello names no server (no SNI)")]
    NoSni,
    #[error("ClientHello has more than one server name or SNI extension")]
    AmbiguousSni,
    #[error("Encrypted Client Hello is refused: the real server name would be hidden")]
    EncryptedClientHello,
    #[error("Bad server name: {0}")]
    BadName(String),
    #[error("ClientHello shares its record with other handshake data")]
    TrailingHandshake,
    #[error("The retried ClientHello names another server than the first ({0})")]
    RetryNameChanged(String),
    #[error("More than one retried ClientHello")]
    SecondRetry,
    #[error("TLS record of type {0} where the handshake allows none")]
    UnexpectedRecord(u8),
    #[error("Plaintext handshake message of type {0} where the handshake allows none")]
    UnexpectedHandshake(u8),
    #[error("Malformed or empty ChangeCipherSpec, alert or handshake record")]
    BadControlRecord,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    /// The server name, and how many bytes the first record took.
    ServerName(HostName, usize),
}

/// A bounds-checked reader over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.buf.len() {
            return Err(Error::Malformed);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Result<usize, Error> {
        let b = self.take(3)?;
        Ok(((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
    fn vec8(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Reads the SNI from the start of what the guest sent.
pub fn parse_client_hello(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 5 {
        if buf.first().is_some_and(|b| *b != CONTENT_HANDSHAKE) {
            return Err(Error::NotHandshake);
        }
        return Ok(Parsed::Incomplete);
    }
    if buf[0] != CONTENT_HANDSHAKE {
        return Err(Error::NotHandshake);
    }
    // Record versions seen in ClientHellos: TLS 1.0 to 1.2 (1.3 uses 1.2).
    if buf[1] != 3 || !(1..=3).contains(&buf[2]) {
        return Err(Error::BadVersion);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if 5 + len > MAX_RECORD {
        return Err(Error::RecordTooLong);
    }
    if buf.len() < 5 + len {
        return Ok(Parsed::Incomplete);
    }
    let mut record = Reader { buf: &buf[5..5 + len] };
    if record.u8().map_err(|_| Error::Fragmented)? != HANDSHAKE_CLIENT_HELLO {
        return Err(Error::NotClientHello);
    }
    let body_len = record.u24().map_err(|_| Error::Fragmented)?;
    let body = record.take(body_len).map_err(|_| Error::Fragmented)?;
    if !record.buf.is_empty() {
        return Err(Error::TrailingHandshake);
    }
    let (name, _) = server_name(body)?;
    Ok(Parsed::ServerName(name, 5 + len))
}

/// The ClientHello body's server name, and whether it offers
/// supported_versions (so TLS 1.3 may follow).
fn server_name(body: &[u8]) -> Result<(HostName, bool), Error> {
    let mut r = Reader { buf: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session = r.vec8()?;
    if session.len() > 32 {
        return Err(Error::Malformed);
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Error::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(Error::Malformed); // compression methods
    }
    if r.buf.is_empty() {
        return Err(Error::NoSni); // no extensions at all
    }
    let mut exts = Reader { buf: r.vec16()? };
    if !r.buf.is_empty() {
        return Err(Error::Malformed);
    }
    let mut found: Option<HostName> = None;
    let mut seen: Vec<u16> = Vec::new();
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if seen.contains(&kind) {
            return Err(if kind == EXT_SERVER_NAME { Error::AmbiguousSni } else { Error::Malformed });
        }
        seen.push(kind);
        match kind {
            EXT_ENCRYPTED_CLIENT_HELLO => return Err(Error::EncryptedClientHello),
            EXT_SERVER_NAME => {
                let mut list = Reader { buf: data };
                let mut names = Reader { buf: list.vec16()? };
                if !list.buf.is_empty() {
                    return Err(Error::Malformed);
                }
                while !names.buf.is_empty() {
                    let kind = names.u8()?;
                    let name = names.vec16()?;
                    if kind != NAME_TYPE_HOST {
                        continue;
                    }
                    if found.is_some() {
                        return Err(Error::AmbiguousSni);
                    }
                    let text = std::str::from_utf8(name).map_err(|_| Error::BadName("not UTF-8".into()))?;
                    found = Some(HostName::parse(text).map_err(|e| Error::BadName(e.to_string()))?);
                }
            }
            _ => {}
        }
    }
    Ok((found.ok_or(Error::NoSni)?, seen.contains(&EXT_SUPPORTED_VERSIONS)))
}

/// Where a spliced connection's handshake is, as the guest's records
/// show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// TLS 1.3 offered, the version not known yet; `ccs`: the client sent
    /// its ChangeCipherSpec.
    Unknown { ccs: bool },
    /// TLS 1.2 or older: the client's plaintext flight, up to its
    /// ChangeCipherSpec.
    Tls12,
    /// TLS 1.3: encrypted records have begun (early data or the second
    /// flight); one retried ClientHello may still come, unless `retried`.
    Tls13 { retried: bool, ccs: bool },
    /// Encrypted from here on: nothing more is read.
    Done,
}

/// Reads the records the guest sends on a spliced connection after its
/// first ClientHello (see the module docs). Feed it every byte, in order;
/// an error means the connection must be reset.
#[derive(Debug)]
pub struct HandshakeWatch {
    sni: HostName,
    stage: Stage,
    /// The record being read: its header, and its body when it is parsed
    /// (at most [`MAX_RECORD`] bytes).
    record: Vec<u8>,
    /// Body bytes of the current record still to pass unread.
    skip: usize,
}

impl HandshakeWatch {
    /// A watch for the connection whose first record is `first` (a
    /// ClientHello that [`parse_client_hello`] accepted).
    pub fn new(first: &[u8]) -> Result<HandshakeWatch, Error> {
        let Parsed::ServerName(sni, len) = parse_client_hello(first)? else { return Err(Error::Fragmented) };
        let (_, versions) = server_name(&first[9..len])?;
        let stage = if versions { Stage::Unknown { ccs: false } } else { Stage::Tls12 };
        Ok(HandshakeWatch { sni, stage, record: Vec::with_capacity(5), skip: 0 })
    }

    /// True once the guest's records are encrypted: nothing more to read.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Reads the next bytes the guest sent.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() && self.stage != Stage::Done {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = if self.record.len() < 5 { 5 } else { 5 + record_len(&self.record) };
            let n = (want - self.record.len()).min(data.len());
            self.record.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.record.len() == 5 && want == 5 {
                self.header()?;
            } else if self.record.len() == want {
                let record = std::mem::take(&mut self.record);
                self.body(record[0], &record[5..])?;
            }
        }
        Ok(())
    }

    /// A record header is complete: checks it, and either keeps its body
    /// for [`HandshakeWatch::body`] or skips it.
    fn header(&mut self) -> Result<(), Error> {
        let (kind, len) = (self.record[0], record_len(&self.record));
        if self.record[1] != 3 || !(1..=3).contains(&self.record[2]) {
            return Err(Error::BadVersion);
        }
        let skipped = match (kind, self.stage) {
            (CONTENT_APPLICATION_DATA, Stage::Tls12) => return Err(Error::UnexpectedRecord(kind)),
            (CONTENT_APPLICATION_DATA, Stage::Unknown { ccs }) => {
                self.stage = Stage::Tls13 { retried: false, ccs };
                true
            }
            (CONTENT_APPLICATION_DATA, _) => true,
            // TLS 1.2's flight may span records: only its end matters.
            (CONTENT_HANDSHAKE, Stage::Tls12) => true,
            (CONTENT_HANDSHAKE | CONTENT_CHANGE_CIPHER_SPEC | CONTENT_ALERT, _) => false,
            _ => return Err(Error::UnexpectedRecord(kind)),
        };
        let limit = if kind == CONTENT_APPLICATION_DATA { MAX_CIPHERTEXT_RECORD } else { MAX_RECORD };
        if 5 + len > limit {
            return Err(Error::RecordTooLong);
        }
        if !skipped && len == 0 {
            return Err(Error::BadControlRecord); // an empty handshake, ChangeCipherSpec or alert record
        }
        if skipped {
            self.skip = len;
            self.record.clear();
        }
        Ok(())
    }

    /// A whole handshake, ChangeCipherSpec or alert record.
    fn body(&mut self, kind: u8, body: &[u8]) -> Result<(), Error> {
        match kind {
            CONTENT_CHANGE_CIPHER_SPEC => {
                if body != [1] {
                    return Err(Error::BadControlRecord);
                }
                self.stage = match self.stage {
                    Stage::Tls12 => Stage::Done,
                    Stage::Unknown { ccs: false } => Stage::Unknown { ccs: true },
                    Stage::Tls13 { retried, ccs: false } => Stage::Tls13 { retried, ccs: true },
                    _ => return Err(Error::UnexpectedRecord(kind)),
                };
                Ok(())
            }
            CONTENT_ALERT if body.len() == 2 => Ok(()),
            CONTENT_ALERT => Err(Error::BadControlRecord),
            _ => self.handshake(body),
        }
    }

    fn handshake(&mut self, body: &[u8]) -> Result<(), Error> {
        let first = body[0];
        let declared =
            (body.len() >= 4).then(|| ((body[1] as usize) << 16) | ((body[2] as usize) << 8) | body[3] as usize);
        self.stage = match self.stage {
            Stage::Unknown { ccs } => {
                let hello_like = first == HANDSHAKE_CLIENT_HELLO && declared.is_none_or(|n| n <= MAX_HELLO_MESSAGE);
                if hello_like {
                    self.retried_hello(body)?;
                    Stage::Tls13 { retried: true, ccs }
                } else if !ccs && HANDSHAKE_TLS12_FLIGHT.contains(&first) {
                    Stage::Tls12
                } else if ccs {
                    // TLS 1.2's Finished, encrypted.
                    Stage::Done
                } else {
                    return Err(Error::UnexpectedHandshake(first));
                }
            }
            Stage::Tls13 { retried: false, ccs } if first == HANDSHAKE_CLIENT_HELLO => {
                self.retried_hello(body)?;
                Stage::Tls13 { retried: true, ccs }
            }
            Stage::Tls13 { retried: true, .. } if first == HANDSHAKE_CLIENT_HELLO => return Err(Error::SecondRetry),
            _ => return Err(Error::UnexpectedHandshake(first)),
        };
        Ok(())
    }

    /// A second ClientHello: whole in its record, alone, and for the same
    /// single server name.
    fn retried_hello(&self, body: &[u8]) -> Result<(), Error> {
        let mut r = Reader { buf: body };
        r.u8()?;
        let len = r.u24().map_err(|_| Error::Fragmented)?;
        let hello = r.take(len).map_err(|_| Error::Fragmented)?;
        if !r.buf.is_empty() {
            return Err(Error::TrailingHandshake);
        }
        let (name, _) = server_name(hello)?;
        if name != self.sni {
            return Err(Error::RetryNameChanged(name.to_string()));
        }
        Ok(())
    }
}

/// The body length a complete record header declares.
fn record_len(header: &[u8]) -> usize {
    u16::from_be_bytes([header[3], header[4]]) as usize
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn vec16(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = kind.to_be_bytes().to_vec();
        v.extend(vec16(data));
        v
    }

    pub(crate) fn sni_ext(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for n in names {
            list.push(NAME_TYPE_HOST);
            list.extend(vec16(n.as_bytes()));
        }
        ext(EXT_SERVER_NAME, &vec16(&list))
    }

    /// A ClientHello record with the given extensions.
    pub(crate) fn hello(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend(vec16(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]);
        body.extend(vec16(&extensions.concat()));
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend(vec16(&hs));
        rec
    }

    fn name(buf: &[u8]) -> Result<String, Error> {
        match parse_client_hello(buf)? {
            Parsed::ServerName(n, _) => Ok(n.to_string()),
            Parsed::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn reads_the_server_name() {
        let h = hello(&[ext(10, &[0, 2, 0, 29]), sni_ext(&["Api.Example.COM."]), ext(43, &[2, 3, 4])]);
        assert_eq!(name(&h), Ok("api.example.com".into()));
        let mut more = h.clone();
        more.extend_from_slice(b"application data follows");
        assert_eq!(
            parse_client_hello(&more).unwrap(),
            Parsed::ServerName(HostName::parse("api.example.com").unwrap(), h.len())
        );
    }

    #[test]
    fn waits_for_the_whole_record() {
        let h = hello(&[sni_ext(&["a.com"])]);
        for i in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..i]), Ok(Parsed::Incomplete), "{i}");
        }
    }

    #[test]
    fn missing_ambiguous_hidden_or_bad_names_are_refused() {
        assert_eq!(name(&hello(&[ext(10, &[0, 2, 0, 29])])), Err(Error::NoSni));
        assert_eq!(name(&hello(&[sni_ext(&["a.com", "b.com"])])), Err(Error::AmbiguousSni));
        assert_eq!(name(&hello(&[sni_ext(&["a.com"]), sni_ext(&["b.com"])])), Err(Error::AmbiguousSni));
        assert_eq!(name(&hello(&[sni_ext(&["a.com"]), ext(0xfe0d, &[0; 8])])), Err(Error::EncryptedClientHello));
        for bad in ["127.0.0.1", "2130706433", "a..com", ""] {
            assert!(matches!(name(&hello(&[sni_ext(&[bad])])), Err(Error::BadName(_))), "{bad}");
        }
    }

    #[test]
    fn other_protocols_are_refused() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Err(Error::NotHandshake));
        assert_eq!(parse_client_hello(b"G"), Err(Error::NotHandshake));
        assert_eq!(parse_client_hello(b"PRI * HTTP/2.0\r\n"), Err(Error::NotHandshake));
        assert_eq!(parse_client_hello(&[22, 2, 0, 0, 4, 1, 0, 0, 0]), Err(Error::BadVersion));
        assert_eq!(parse_client_hello(&[22, 3, 1, 0x40, 0x01]), Err(Error::RecordTooLong));
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Err(Error::NotClientHello));
        // A ClientHello announcing more bytes than its record holds.
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 4, 1, 0, 1, 0]), Err(Error::Fragmented));
    }

    #[test]
    fn prefixes_and_corruptions_of_a_hello_give_its_name_or_nothing() {
        let h = hello(&[ext(10, &[0, 2, 0, 29]), sni_ext(&["a.example.com"])]);
        // Every prefix waits for the rest of the record; the whole gives
        // the name and the record's length, whatever follows.
        for i in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..i]), Ok(Parsed::Incomplete), "{i}");
        }
        let mut more = h.clone();
        more.extend_from_slice(b"next record");
        assert_eq!(
            parse_client_hello(&more),
            Ok(Parsed::ServerName(HostName::parse("a.example.com").unwrap(), h.len()))
        );
        // A corrupted hello gives a name only from the record it declares,
        // within the bytes given: a name spelt there (a corrupted byte may
        // change its letters, never add to it), parsing the same from the
        // record alone.
        for i in 0..h.len() {
            for b in [0u8, 1, b'b', 0x7f, 0xff] {
                let mut m = h.clone();
                m[i] = b;
                let got = parse_client_hello(&m);
                if let Ok(Parsed::ServerName(name, n)) = &got {
                    assert!(*n <= m.len() && *n == 5 + usize::from(u16::from_be_bytes([m[3], m[4]])), "{m:?}");
                    let text = name.as_str().as_bytes();
                    assert!(m[..*n].windows(text.len()).any(|w| w.eq_ignore_ascii_case(text)), "{name:?} in {m:?}");
                    assert_eq!(parse_client_hello(&m[..*n]), got);
                }
            }
        }
    }

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend(vec16(body));
        r
    }

    const VERSIONS: [u8; 5] = [4, 3, 4, 3, 3]; // supported_versions: TLS 1.3, 1.2

    fn hello13(name: &str) -> Vec<u8> {
        hello(&[sni_ext(&[name]), ext(EXT_SUPPORTED_VERSIONS, &VERSIONS)])
    }

    /// Feeds `records` one after the other, whole and then byte by byte:
    /// both must give the same answer.
    fn watch(first: &[u8], records: &[Vec<u8>]) -> Result<bool, Error> {
        let all = records.concat();
        let mut whole = HandshakeWatch::new(first)?;
        let a = whole.feed(&all).map(|_| whole.is_done());
        let mut bytes = HandshakeWatch::new(first)?;
        let b = all.iter().try_for_each(|byte| bytes.feed(std::slice::from_ref(byte))).map(|_| bytes.is_done());
        assert_eq!(a, b, "whole and byte by byte");
        assert!(bytes.record.capacity() <= MAX_RECORD && bytes.record.len() <= MAX_RECORD);
        a
    }

    const CCS: [u8; 6] = [CONTENT_CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1];

    #[test]
    fn a_retried_client_hello_must_name_the_same_single_server() {
        let first = hello13("a.com");
        let data = record(CONTENT_APPLICATION_DATA, &[0xab; 300]);
        // HelloRetryRequest, middlebox compatibility mode or not, then the
        // encrypted flight: the watch reads headers only, never done.
        assert_eq!(watch(&first, &[CCS.to_vec(), hello13("A.com."), data.clone()]), Ok(false));
        assert_eq!(watch(&first, &[hello13("a.com"), CCS.to_vec(), data.clone()]), Ok(false));
        for (retry, err) in [
            (hello13("b.com"), Error::RetryNameChanged("b.com".into())),
            (hello(&[sni_ext(&["a.com", "b.com"])]), Error::AmbiguousSni),
            (hello(&[sni_ext(&["a.com"]), sni_ext(&["a.com"])]), Error::AmbiguousSni),
            (hello(&[ext(EXT_SUPPORTED_VERSIONS, &VERSIONS)]), Error::NoSni),
            (hello(&[sni_ext(&["a.com"]), ext(EXT_ENCRYPTED_CLIENT_HELLO, &[0; 8])]), Error::EncryptedClientHello),
        ] {
            assert_eq!(watch(&first, std::slice::from_ref(&retry)), Err(err.clone()), "no compatibility CCS");
            assert_eq!(watch(&first, &[CCS.to_vec(), retry.clone()]), Err(err.clone()), "after the CCS");
            // After 0-RTT data the server may still ask for a retry.
            assert_eq!(watch(&first, &[data.clone(), retry]), Err(err), "after early data");
        }
        // At most one retry; no plaintext handshake after it.
        assert_eq!(watch(&first, &[hello13("a.com"), data.clone(), hello13("a.com")]), Err(Error::SecondRetry));
        let finished = record(CONTENT_HANDSHAKE, &[20, 0, 0, 1, 0]);
        assert_eq!(watch(&first, &[data.clone(), finished]), Err(Error::UnexpectedHandshake(20)));
        // A retried hello split over records, or sharing one, is refused.
        let whole = hello13("b.com");
        let (a, b) = whole[5..].split_at(40);
        assert_eq!(
            watch(&first, &[record(CONTENT_HANDSHAKE, a), record(CONTENT_HANDSHAKE, b)]),
            Err(Error::Fragmented)
        );
        assert_eq!(
            watch(&first, &[CCS.to_vec(), record(CONTENT_HANDSHAKE, a), record(CONTENT_HANDSHAKE, b)]),
            Err(Error::Fragmented)
        );
        let mut shared = whole[5..].to_vec();
        shared.extend([16, 0, 0, 0]);
        assert_eq!(watch(&first, &[record(CONTENT_HANDSHAKE, &shared)]), Err(Error::TrailingHandshake));
    }

    #[test]
    fn tls12_is_watched_up_to_the_client_change_cipher_spec() {
        let key_exchange = record(CONTENT_HANDSHAKE, &[16, 0, 0, 3, 2, 0xaa, 0xbb]);
        let encrypted = record(CONTENT_HANDSHAKE, &[0x77; 40]);
        let garbage = b"anything at all, encrypted".to_vec();
        // No supported_versions: TLS 1.2 at most.
        let old = hello(&[sni_ext(&["a.com"])]);
        assert_eq!(watch(&old, std::slice::from_ref(&key_exchange)), Ok(false));
        assert_eq!(watch(&old, &[key_exchange.clone(), CCS.to_vec(), encrypted.clone(), garbage.clone()]), Ok(true));
        assert_eq!(watch(&old, &[CCS.to_vec(), garbage.clone()]), Ok(true), "resumption");
        assert_eq!(
            watch(&old, &[record(CONTENT_APPLICATION_DATA, b"x")]),
            Err(Error::UnexpectedRecord(CONTENT_APPLICATION_DATA)),
            "application data before the CCS"
        );
        // TLS 1.3 offered, 1.2 negotiated: the plaintext key exchange
        // tells, or the encrypted Finished after the CCS.
        let new = hello13("a.com");
        assert_eq!(watch(&new, &[key_exchange, CCS.to_vec(), encrypted.clone(), garbage.clone()]), Ok(true));
        assert_eq!(watch(&new, &[CCS.to_vec(), encrypted, garbage.clone()]), Ok(true), "resumption");
        // An encrypted Finished that starts like a ClientHello too long
        // for any server is encrypted, not a hello.
        let mut big = vec![HANDSHAKE_CLIENT_HELLO, 0x10, 0, 0];
        big.extend([0x55; 36]);
        assert_eq!(watch(&new, &[CCS.to_vec(), record(CONTENT_HANDSHAKE, &big), garbage]), Ok(true));
    }

    #[test]
    fn records_the_handshake_does_not_allow_are_refused() {
        let first = hello13("a.com");
        let bad = |records: &[Vec<u8>]| watch(&first, records).unwrap_err();
        assert_eq!(bad(&[record(24, &[1, 0, 16])]), Error::UnexpectedRecord(24), "heartbeat");
        assert_eq!(bad(&[record(99, &[0])]), Error::UnexpectedRecord(99));
        assert_eq!(bad(&[vec![CONTENT_HANDSHAKE, 2, 0, 0, 1, 1]]), Error::BadVersion);
        assert_eq!(bad(&[vec![CONTENT_HANDSHAKE, 3, 3, 0x40, 1]]), Error::RecordTooLong);
        assert_eq!(bad(&[vec![CONTENT_APPLICATION_DATA, 3, 3, 0x48, 1]]), Error::RecordTooLong);
        assert_eq!(bad(&[record(CONTENT_HANDSHAKE, &[2, 0, 0, 0])]), Error::UnexpectedHandshake(2));
        assert_eq!(bad(&[record(CONTENT_CHANGE_CIPHER_SPEC, &[2])]), Error::BadControlRecord);
        assert_eq!(bad(&[record(CONTENT_HANDSHAKE, &[])]), Error::BadControlRecord);
        assert_eq!(bad(&[record(CONTENT_ALERT, &[2, 40, 0])]), Error::BadControlRecord);
        assert_eq!(bad(&[CCS.to_vec(), CCS.to_vec()]), Error::UnexpectedRecord(CONTENT_CHANGE_CIPHER_SPEC));
        assert_eq!(watch(&first, &[record(CONTENT_ALERT, &[2, 40])]), Ok(false), "a plaintext alert");
        // The first hello itself must be alone in its record.
        let mut shared = first[5..].to_vec();
        shared.extend([1, 0, 0, 0]);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend(vec16(&shared));
        assert_eq!(parse_client_hello(&rec), Err(Error::TrailingHandshake));
    }
}
