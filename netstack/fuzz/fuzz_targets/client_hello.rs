//! Host side: fuzzes the TLS ClientHello/SNI parser with guest bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netstack::tls::{parse_client_hello, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::ServerName(_, len)) = parse_client_hello(data) {
        assert!(len <= data.len());
    }
});
