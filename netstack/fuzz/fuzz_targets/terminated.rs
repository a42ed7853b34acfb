//! Host side: fuzzes what a guest can send through a TLS connection that
//! netstack terminated: a real TLS 1.3 session (an in-memory rustls
//! client, netstack's own CA) carries the fuzzer's bytes as the guest's
//! plaintext into `conn` (request heads, bodies, credential placeholders),
//! and the credential code sees them directly too (head rewriting, body
//! scanning, response scrubbing). Nothing may panic, a refused request
//! never lets the secret reach the guest, and the secret is never in an
//! audit event.
#![no_main]
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use netstack::ca::Authority;
use netstack::conn::{Conn, Resolve};
use netstack::credential::{Credential, CredentialRule, Credentials, FileCredential, LeakScanner, Scrubber, Secret};
use netstack::host::HostName;
use netstack::policy::{Origin, Policy};
use netstack::terminate::Termination;

const SECRET: &str = "sk-fuzz-secret-0123456789";
const PLACEHOLDER: &str = "sbx-placeholder-key-00112233445566778899aabbccddeeff";

/// Resolves nothing: allowed requests end in a 502, nothing is dialled.
struct Nowhere;
impl Resolve for Nowhere {
    fn resolve(&self, _: &HostName, _: u16) -> Option<SocketAddr> {
        None
    }
}

struct Fixture {
    termination: Arc<Termination>,
    policy: Policy,
    client: Arc<rustls::ClientConfig>,
    resolver: Arc<dyn Resolve>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca = Arc::new(Authority::generate().unwrap());
        let rule = CredentialRule::parse(
            FileCredential {
                name: "key".into(),
                hosts: vec!["api.example.com".into()],
                header: "x-api-key".into(),
                scheme: None,
                env: None,
            },
            Origin::File(1),
        )
        .unwrap();
        let creds = Credentials::new(vec![Credential::new(rule, PLACEHOLDER.into(), Secret::new(SECRET).unwrap())]);
        let termination =
            Arc::new(Termination::new(ca.clone(), rustls::RootCertStore::empty(), creds).unwrap());
        let policy = Policy::from_toml(
            "version = 1\nhttps = \"terminate\"\n[[rule]]\nallow = \"api.example.com\"\nmethods = [\"GET\", \"POST\"]\npath_prefix = \"/v1/\"\n",
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        F_RESOLVER.get_or_init(|| Arc::new(Nowhere));
        Fixture {
            termination,
            policy,
            client: Arc::new(client),
            resolver: F_RESOLVER.get().unwrap().clone(),
        }
    })
}

static F_RESOLVER: OnceLock<Arc<dyn Resolve>> = OnceLock::new();

fn name() -> HostName {
    HostName::parse("api.example.com").unwrap()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let creds = &f.termination.credentials;
    // The credential code on its own.
    let host = name();
    let _ = creds.rewrite(&host, data, true);
    let other = HostName::parse("other.example.com").unwrap();
    let mut scan = LeakScanner::default();
    for piece in data.chunks(7) {
        let _ = scan.scan(creds, &other, piece);
    }
    let mut scrub = Scrubber::default();
    let mut out = Vec::new();
    for piece in data.chunks(5) {
        out.extend(scrub.feed(creds, piece));
    }
    out.extend(scrub.flush());
    assert_eq!(out.len(), data.len(), "scrubbing keeps lengths");
    assert!(!contains(&out, SECRET));

    // Through a terminated connection.
    let mut conn =
        Conn::new(443, Ipv4Addr::new(198, 18, 0, 1), Some(name())).with_termination(Some(f.termination.clone()));
    let server_name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut client = rustls::ClientConnection::new(f.client.clone(), server_name).unwrap();
    let mut plaintext_sent = false;
    for _ in 0..8 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            conn.from_guest(&wire, &f.policy, &f.resolver);
        }
        conn.poll_connect(&f.policy, &f.resolver);
        let back = std::mem::take(conn.to_guest());
        let mut rd = &back[..];
        while !rd.is_empty() {
            if client.read_tls(&mut rd).unwrap_or(0) == 0 || client.process_new_packets().is_err() {
                break;
            }
        }
        if !client.is_handshaking() && !plaintext_sent {
            let _ = client.writer().write_all(data);
            plaintext_sent = true;
        }
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut client.reader(), &mut got);
        assert!(!contains(&got, SECRET), "the secret reached the guest");
    }
    let mut events: Vec<_> = conn.events.drain(..).collect();
    events.extend(conn.end_events());
    for e in events {
        assert!(!e.to_string().contains(SECRET), "the secret in an audit event");
    }
});
