//! Host side: fuzzes netstack's DNS query parser (`netstack::dns`) with the
//! guest's UDP payloads: it must never panic; a query it takes is what its
//! bytes say (the id, the question as sent, a name of at most 255 printable
//! characters, a host name only in canonical form); its answers echo the
//! id and the question, with one A record or none; names bind to synthetic
//! addresses that lead back to them.
#![no_main]
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use netstack::dns::{answer_a, answer_empty, parse_query, NameTable, RCODE_REFUSED};

fuzz_target!(|data: &[u8]| {
    let Ok(q) = parse_query(data) else { return };
    assert_eq!(q.id, u16::from_be_bytes([data[0], data[1]]));
    assert!(q.raw_name.len() <= 255 && q.raw_name.bytes().all(|c| c.is_ascii_graphic()), "{q:?}");
    let a = answer_a(&q, Ipv4Addr::new(198, 18, 0, 1), 60);
    let e = answer_empty(&q, RCODE_REFUSED);
    let question = &e[12..];
    assert!(data[12..].starts_with(question), "the question as sent");
    assert_eq!(&a[12..12 + question.len()], question);
    for (m, answers) in [(&a, 1u16), (&e, 0)] {
        assert_eq!(&m[0..2], &data[0..2], "the id");
        assert_eq!(m[2] & 0x80, 0x80, "a response");
        assert_eq!((u16::from_be_bytes([m[4], m[5]]), u16::from_be_bytes([m[6], m[7]])), (1, answers));
    }
    assert_eq!(a.len(), e.len() + 16, "one A record");
    if let Some(host) = q.host() {
        let name = host.as_str();
        assert!(name.len() <= 253 && !name.ends_with('.') && name == name.to_ascii_lowercase(), "{name}");
        let mut table = NameTable::new(4);
        let addr = table.bind(&host).expect("room for one");
        assert!(NameTable::is_synthetic(addr));
        assert_eq!(table.name_of(addr), Some(&host));
        assert_eq!(table.bind(&host), Some(addr), "bound once");
    }
});
