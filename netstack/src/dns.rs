//! Host side: the guest's DNS, answered by netstack itself. Queries from
//! the guest are untrusted: parsed strictly and bounded (one question, no
//! compression in it, RFC 1035 sizes). An allowed name gets a synthetic
//! IPv4 address from [`NameTable`], bound to that name for the sandbox's
//! life, so that the guest can only ever reach a name through the address
//! handed out for it (no DNS rebinding, no "connect to any IP"). A denied
//! name gets REFUSED; AAAA gets an empty answer (IPv4 only).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use thiserror::Error;

use crate::host::HostName;

/// Largest DNS message over UDP without EDNS.
pub const MAX_UDP_MESSAGE: usize = 512;
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("DNS message too short or truncated")]
    Truncated,
    #[error("DNS message larger than {MAX_UDP_MESSAGE} bytes")]
    TooLarge,
    #[error("Not a standard query")]
    NotQuery,
    #[error("DNS query must have exactly one question")]
    QuestionCount,
    #[error("Compressed or malformed name in the question")]
    BadName,
    #[error("Query class is not IN")]
    BadClass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    /// The question's name as sent (validated as a host name separately).
    pub raw_name: String,
    pub qtype: u16,
    /// The question section as sent, echoed in the answer.
    question: Vec<u8>,
}

impl Query {
    /// The question's name as a validated host name, if it is one.
    pub fn host(&self) -> Option<HostName> {
        HostName::parse(&self.raw_name).ok()
    }
}

pub fn parse_query(msg: &[u8]) -> Result<Query, Error> {
    if msg.len() > MAX_UDP_MESSAGE {
        return Err(Error::TooLarge);
    }
    if msg.len() < 12 {
        return Err(Error::Truncated);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if is_response || opcode != 0 {
        return Err(Error::NotQuery);
    }
    let counts: Vec<u16> = (0..4).map(|i| u16::from_be_bytes([msg[4 + 2 * i], msg[5 + 2 * i]])).collect();
    // One question; no answers or authority. (An EDNS OPT record in the
    // additional section is allowed and ignored.)
    if counts[0] != 1 || counts[1] != 0 || counts[2] != 0 || counts[3] > 1 {
        return Err(Error::QuestionCount);
    }
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    let mut name_len = 0usize;
    loop {
        let len = *msg.get(pos).ok_or(Error::Truncated)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        // 0xc0: a compression pointer, 0x40/0x80: reserved label types.
        if len > 63 {
            return Err(Error::BadName);
        }
        let label = msg.get(pos..pos + len).ok_or(Error::Truncated)?;
        name_len += len + 1;
        if name_len > 255 {
            return Err(Error::BadName);
        }
        labels.push(label.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect());
        pos += len;
    }
    let tail = msg.get(pos..pos + 4).ok_or(Error::Truncated)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    if qclass != CLASS_IN {
        return Err(Error::BadClass);
    }
    let question = msg[12..pos + 4].to_vec();
    Ok(Query { id, recursion_desired: flags & 0x0100 != 0, raw_name: labels.join("."), qtype, question })
}

fn header(q: &Query, rcode: u8, answers: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA, RD as asked, RA; the rcode.
    let flags: u16 = 0x8000 | 0x0400 | if q.recursion_desired { 0x0100 } else { 0 } | 0x0080 | u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    out
}

/// An answer with one A record.
pub fn answer_a(q: &Query, addr: Ipv4Addr, ttl: u32) -> Vec<u8> {
    let mut out = header(q, 0, 1);
    out.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&addr.octets());
    out
}

/// An answer with no records: rcode 0 means "the name exists, no records
/// of this type" (e.g. AAAA).
pub fn answer_empty(q: &Query, rcode: u8) -> Vec<u8> {
    header(q, rcode, 0)
}

/// Names bound to synthetic addresses in 198.18.0.0/15 (reserved for
/// benchmarking, never routed), stable for the table's life.
pub struct NameTable {
    by_name: HashMap<HostName, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, HostName>,
    capacity: usize,
}

const SYNTHETIC_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Addresses in 198.18.0.0/15, less network and broadcast-looking ends.
const SYNTHETIC_SIZE: usize = (1 << 17) - 2;

impl NameTable {
    pub fn new(capacity: usize) -> NameTable {
        NameTable { by_name: HashMap::new(), by_addr: HashMap::new(), capacity: capacity.min(SYNTHETIC_SIZE) }
    }

    /// The address bound to `name`, binding a new one if needed; None when
    /// the table is full.
    pub fn bind(&mut self, name: &HostName) -> Option<Ipv4Addr> {
        if let Some(a) = self.by_name.get(name) {
            return Some(*a);
        }
        if self.by_name.len() >= self.capacity {
            return None;
        }
        let addr = Ipv4Addr::from(SYNTHETIC_BASE + 1 + self.by_name.len() as u32);
        self.by_name.insert(name.clone(), addr);
        self.by_addr.insert(addr, name.clone());
        Some(addr)
    }

    /// The name an address was handed out for.
    pub fn name_of(&self, addr: Ipv4Addr) -> Option<&HostName> {
        self.by_addr.get(&addr)
    }

    pub fn is_synthetic(addr: Ipv4Addr) -> bool {
        (u32::from(addr) & 0xfffe_0000) == SYNTHETIC_BASE
    }
}

/// Test helpers shared with the stack's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::CLASS_IN;

    /// A query as a resolver would send it.
    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::query;
    use super::*;

    #[test]
    fn parses_a_query_and_answers_it() {
        let q = parse_query(&query(0x1234, "Api.Example.com", TYPE_A)).unwrap();
        assert_eq!((q.id, q.qtype, q.recursion_desired), (0x1234, TYPE_A, true));
        assert_eq!(q.host().unwrap().as_str(), "api.example.com");
        let a = answer_a(&q, Ipv4Addr::new(198, 18, 0, 1), 60);
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0xf, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[198, 18, 0, 1]);
        let r = answer_empty(&q, RCODE_REFUSED);
        assert_eq!((r[3] & 0xf, u16::from_be_bytes([r[6], r[7]])), (RCODE_REFUSED, 0));
        assert_eq!(r[2] & 0x80, 0x80, "a response");
    }

    #[test]
    fn malformed_queries_are_refused_and_the_rest_read_as_sent() {
        assert_eq!(parse_query(&[0; 5]), Err(Error::Truncated));
        assert_eq!(parse_query(&[0; 600]), Err(Error::TooLarge));
        let mut resp = query(1, "a.com", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(Error::NotQuery));
        let mut two = query(1, "a.com", TYPE_A);
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(Error::QuestionCount));
        let mut ptr = query(1, "a.com", TYPE_A);
        ptr[12] = 0xc0;
        assert_eq!(parse_query(&ptr), Err(Error::BadName));
        let mut chaos = query(1, "a.com", TYPE_A);
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert_eq!(parse_query(&chaos), Err(Error::BadClass));
        let long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(parse_query(&query(1, &long, TYPE_A)), Err(Error::BadName));
        // Every prefix of a query is truncated; every corruption is refused
        // or read as what its bytes say, and answered with the question
        // as sent.
        let base = query(7, "x.example.com", TYPE_A);
        for i in 0..base.len() {
            assert_eq!(parse_query(&base[..i]), Err(Error::Truncated), "{i}");
        }
        for i in 0..base.len() {
            for b in [0u8, 63, 64, 0xc0, 0xff, b'.', b'A'] {
                let mut m = base.clone();
                m[i] = b;
                let Ok(q) = parse_query(&m) else { continue };
                assert_eq!(q.id, u16::from_be_bytes([m[0], m[1]]));
                assert!(m[12..].starts_with(&q.question), "{m:?}");
                assert!(q.raw_name.len() <= 255 && q.raw_name.bytes().all(|c| c.is_ascii_graphic()), "{q:?}");
                let a = answer_a(&q, Ipv4Addr::new(198, 18, 0, 1), 60);
                assert_eq!((&a[0..2], &a[12..12 + q.question.len()]), (&m[0..2], &q.question[..]));
                assert_eq!(a.len(), 12 + q.question.len() + 16);
            }
        }
    }

    #[test]
    fn ip_literal_questions_are_not_host_names() {
        let q = parse_query(&query(1, "127.0.0.1", TYPE_A)).unwrap();
        assert!(q.host().is_none());
    }

    #[test]
    fn names_get_stable_synthetic_addresses_until_the_table_is_full() {
        let mut t = NameTable::new(2);
        let a = HostName::parse("a.com").unwrap();
        let b = HostName::parse("b.com").unwrap();
        let addr_a = t.bind(&a).unwrap();
        assert_eq!(t.bind(&a), Some(addr_a), "stable");
        let addr_b = t.bind(&b).unwrap();
        assert_ne!(addr_a, addr_b);
        assert!(NameTable::is_synthetic(addr_a) && NameTable::is_synthetic(addr_b));
        assert_eq!(t.name_of(addr_b), Some(&b));
        assert_eq!(t.bind(&HostName::parse("c.com").unwrap()), None, "full");
        assert_eq!(t.name_of(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert!(!NameTable::is_synthetic(Ipv4Addr::new(198, 20, 0, 1)));
    }
}
