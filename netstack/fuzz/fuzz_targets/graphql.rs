//! Host side: fuzzes the GraphQL scanner that decides whether a guest's
//! GraphQL request holds a mutation an ask rule lists (guest bytes: a
//! request body, a GET's query parameter). Properties: the bounds hold,
//! only mutations list fields, and one document reads the same whether it
//! came as a JSON body or as a `query=` parameter.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netstack::graphql::{scan_body, scan_target, Kind, MAX_BODY, MAX_FIELDS};

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn percent(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ops) = scan_body(data) {
        for op in &ops {
            assert!(op.fields.len() <= MAX_FIELDS);
            if op.kind != Kind::Mutation {
                assert!(op.fields.is_empty() && !op.opaque, "{op:?}");
            }
        }
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let body = format!("{{\"query\":{}}}", json_string(text));
    if body.len() > MAX_BODY {
        return;
    }
    let as_body = scan_body(body.as_bytes());
    let as_get = scan_target(&format!("/graphql?query={}", percent(text))).expect("it has a query parameter");
    assert_eq!(as_body.is_ok(), as_get.is_ok(), "{as_body:?} / {as_get:?}");
    if let (Ok(a), Ok(b)) = (as_body, as_get) {
        assert_eq!(a, b);
    }
});
