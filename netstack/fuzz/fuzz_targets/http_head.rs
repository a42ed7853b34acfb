//! Host side: fuzzes the HTTP request-head parser and the body scanner with
//! guest bytes: they must never panic, and a complete head never claims
//! more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netstack::http::{parse_request_head, BodyScanner, Parsed, ResponseTracker};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(head, len)) = parse_request_head(data) {
        assert!(len <= data.len());
        let mut body = BodyScanner::new(head.body);
        if let Ok(n) = body.feed(&data[len..]) {
            assert!(n <= data.len() - len);
        }
    }
    let mut t = ResponseTracker::default();
    let _ = t.feed(data, || data.len() % 2 == 0);
});
