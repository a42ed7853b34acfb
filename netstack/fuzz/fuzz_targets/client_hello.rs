//! Host side: fuzzes the TLS ClientHello/SNI parser, and the watch over the
//! records that follow it on a spliced connection, with guest bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netstack::tls::{parse_client_hello, HandshakeWatch, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::ServerName(_, len)) = parse_client_hello(data) {
        assert!(len <= data.len());
        let mut watch = HandshakeWatch::new(&data[..len]).expect("an accepted hello starts a watch");
        let _ = watch.feed(&data[len..]);
    }
});
