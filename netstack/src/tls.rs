//! Host side: reads the server name (SNI) from the first TLS record the
//! guest sends on port 443, without decrypting anything. Bounded and
//! strict: one handshake record holding a whole ClientHello, exactly one
//! host_name, no Encrypted Client Hello (its outer name would not be the
//! real destination). Everything else is refused: the connection is then
//! reset, fail closed.

use thiserror::Error;

use crate::host::HostName;

/// A TLS record header plus the largest plaintext record.
pub const MAX_RECORD: usize = 5 + (1 << 14);

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST: u8 = 0;

#[derive(Debug, Error, PartialEq, Eq)]
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
    let name = server_name(body)?;
    Ok(Parsed::ServerName(name, 5 + len))
}

fn server_name(body: &[u8]) -> Result<HostName, Error> {
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
    found.ok_or(Error::NoSni)
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
}
