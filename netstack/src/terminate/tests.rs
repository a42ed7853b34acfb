//! Host side, tests only: TLS termination end to end in process — a
//! simulated guest (smoltcp) running a rustls client that trusts the
//! installation's CA, netstack in between, and rustls upstream servers on
//! 127.0.0.1 with certificates from a test root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};
use smoltcp::socket::{tcp, udp};

use super::Termination;
use crate::ca::Authority;
use crate::credential::{tests::rule, Credential, Credentials, Secret};
use crate::host::HostName;
use crate::policy::Policy;
use crate::sim::{pump, Guest, GUEST_IP};
use crate::stack::{Config, NetStack, Resolver};
use audit::{AuditLog, SharedLog};

type Net = NetStack<Vec<u8>>;

const SECRET: &str = "sk-real-secret-value-0123456789";
const PLACEHOLDER: &str = "sbx-placeholder-anthropic-00112233445566778899aabbccddeeff";
/// Every name the test upstream's certificate covers.
const NAMES: &[&str] = &["api.example.com", "other.example.com", "files.example.org", "plain.example.com"];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test root and a server certificate it signed for `names`.
fn test_pki(names: &[&str]) -> (CertificateDer<'static>, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.distinguished_name.push(rcgen::DnType::CommonName, "netstack test root");
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root_params, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (root.der().clone(), leaf.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}

/// What the upstream received: each request's head and body.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Reads one request (head, then a Content-Length or chunked body) from
/// `r`; None at the end of the stream.
fn read_request<R: BufRead>(r: &mut R) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(v) = lower.split("content-length:").nth(1) {
        let n: usize = v.split("\r\n").next()?.trim().parse().ok()?;
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some((head, body))
}

/// A TLS upstream on 127.0.0.1 presenting `cert`: answers each request
/// "ok METHOD PATH BODYLEN", or, for /echo, with the request head it got
/// (an upstream that reflects headers). Keeps connections alive.
fn tls_upstream(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> (SocketAddr, Seen) {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, log) = (config.clone(), log.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = BufReader::new(StreamOwned::new(conn, tcp));
                while let Some((head, body)) = read_request(&mut tls) {
                    let line = head.lines().next().unwrap_or("").to_string();
                    let mut parts = line.split(' ');
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let reply =
                        if path == "/echo" { head.clone() } else { format!("ok {method} {path} {}", body.len()) };
                    let out = reflect(path, &head).unwrap_or_else(|| {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}", reply.len()).into_bytes()
                    });
                    log.lock().unwrap().push((head, body));
                    let w = tls.get_mut();
                    if w.write_all(&out).and_then(|_| w.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// What a reflecting upstream last received in an x-api-key field, for
/// `/r/stored` (an upstream that keeps what it was sent: shared by every
/// connection, like a paste service's storage).
static STORED: Mutex<String> = Mutex::new(String::new());

/// The x-api-key field of a request head ("" if none).
fn api_key(head: &str) -> String {
    let line = head.lines().find(|l| l.to_ascii_lowercase().starts_with("x-api-key:")).unwrap_or("x-api-key:");
    line["x-api-key:".len()..].trim().to_string()
}

/// A reflecting upstream's answers under /r/, whole responses: the key it
/// was sent, in slices, framings and encodings of the guest's choosing.
/// - `/r/piece/A/B`: bytes A..B of the key;
/// - `/r/chunked/N`: `key=` and the key, chunked with a chunk boundary
///   after N bytes of it;
/// - `/r/range`: the key, or the slice a `Range: bytes=A-B` asks for (206);
/// - `/r/b64/K`: base64 of K bytes of junk then the key;
/// - `/r/hex`, `/r/pct`, `/r/json`: hex, all-percent-escaped, JSON
///   `\u00xx`-escaped punctuation;
/// - `/r/gzip`: the key, labelled `Content-Encoding: gzip`;
/// - `/r/stored`: the key some earlier request (any connection) carried.
fn reflect(path: &str, head: &str) -> Option<Vec<u8>> {
    let rest = path.strip_prefix("/r/")?;
    let mut key = api_key(head);
    if !key.is_empty() {
        *STORED.lock().unwrap() = key.clone();
    }
    let ok = |status: &str, extra: &str, body: &[u8]| {
        let mut out = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(body);
        out
    };
    let args: Vec<usize> = rest.split('/').skip(1).filter_map(|a| a.parse().ok()).collect();
    let kb = key.as_bytes();
    Some(match rest.split('/').next()? {
        "piece" => ok("200 OK", "", &kb[args[0].min(kb.len())..args[1].min(kb.len())]),
        "chunked" => {
            let (a, b) = kb.split_at(args[0].min(kb.len()));
            let first = [b"key=", a].concat();
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for c in [&first[..], b] {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        "range" => {
            let range =
                head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string));
            match range.and_then(|r| r.split_once('-').map(|(a, b)| (a.parse::<usize>(), b.parse::<usize>()))) {
                Some((Ok(a), Ok(b))) => ok("206 Partial Content", "", &kb[a.min(kb.len())..(b + 1).min(kb.len())]),
                _ => ok("200 OK", "", kb),
            }
        }
        "b64" => {
            let mut input = vec![b'#'; args[0]];
            input.extend_from_slice(kb);
            while !input.len().is_multiple_of(3) {
                input.push(b'#');
            }
            ok("200 OK", "", &crate::credential::base64_groups(&input, crate::credential::B64_STD))
        }
        "hex" => ok("200 OK", "", kb.iter().map(|b| format!("{b:02x}")).collect::<String>().as_bytes()),
        "pct" => ok("200 OK", "", kb.iter().map(|b| format!("%{b:02X}")).collect::<String>().as_bytes()),
        "json" => {
            let esc: String = key
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\u{:04x}", c as u32) })
                .collect();
            ok("200 OK", "Content-Type: application/json\r\n", format!("{{\"key\":\"{esc}\"}}").as_bytes())
        }
        "gzip" => ok("200 OK", "Content-Encoding: gzip\r\n", kb),
        "stored" => {
            key = STORED.lock().unwrap().clone();
            ok("200 OK", "", key.as_bytes())
        }
        _ => return None,
    })
}

/// A plain HTTP upstream (port 80 tests): answers "plain PATH" and keeps
/// what it got.
fn plain_upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut w = tcp.try_clone().unwrap();
                let mut r = BufReader::new(tcp);
                while let Some((head, body)) = read_request(&mut r) {
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    log.lock().unwrap().push((head, body));
                    let reply = format!("plain {path}");
                    let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}", reply.len());
                    if w.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

struct Setup {
    net: Net,
    guest: Guest,
    now: u64,
    log: SharedLog<Vec<u8>>,
    ca: Arc<Authority>,
}

impl Setup {
    /// netstack with `policy`, upstreams at `routes`, the test root trusted
    /// upstream, and the `anthropic` credential bound to api.example.com.
    fn new(policy: &str, routes: &[(&str, u16, SocketAddr)], upstream_root: &CertificateDer<'static>) -> Setup {
        let creds = Credentials::new(vec![Credential::new(
            rule("anthropic", &["api.example.com"], "x-api-key", None),
            PLACEHOLDER.into(),
            Secret::new(SECRET).unwrap(),
        )]);
        Setup::with_credentials(policy, routes, upstream_root, creds)
    }

    fn with_credentials(
        policy: &str,
        routes: &[(&str, u16, SocketAddr)],
        upstream_root: &CertificateDer<'static>,
        creds: Credentials,
    ) -> Setup {
        let mut resolver = Resolver::default();
        for (name, port, addr) in routes {
            resolver.overrides.insert((HostName::parse(name).unwrap(), *port), *addr);
        }
        let ca = Arc::new(Authority::generate().unwrap());
        let mut roots = RootCertStore::empty();
        roots.add(upstream_root.clone()).unwrap();
        let termination = Arc::new(Termination::new(ca.clone(), roots, creds).unwrap());
        let log = AuditLog::new(Vec::new()).shared();
        let net = NetStack::new(Config::default(), Policy::from_toml(policy).unwrap(), resolver, log.clone())
            .terminating(termination);
        Setup { net, guest: Guest::new(1500), now: 0, log, ca }
    }

    pub(super) fn audit(&self) -> String {
        String::from_utf8(self.log.lock().unwrap().get_ref().clone()).unwrap()
    }

    /// The address DNS gives the guest for `name`.
    fn resolve(&mut self, name: &str) -> Ipv4Addr {
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
        let mut s = udp::Socket::new(buf(), buf());
        s.bind((GUEST_IP, 40000)).unwrap();
        let h = self.guest.sockets.add(s);
        let q = crate::dns::tests_support::query(7, name, crate::dns::TYPE_A);
        self.guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (Ipv4Addr::new(10, 0, 2, 2), 53)).unwrap();
        pump(&mut self.net, &mut self.guest, &mut self.now);
        let reply = self.guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, _)| d.to_vec()).expect("DNS reply");
        self.guest.sockets.remove(h);
        let n = reply.len();
        assert_eq!(reply[3] & 0xf, 0, "{name} must resolve");
        Ipv4Addr::new(reply[n - 4], reply[n - 3], reply[n - 2], reply[n - 1])
    }

    /// A guest TLS session to `addr`:443 for `sni`, offering `alpn`,
    /// trusting the installation's CA: sends `request` once the handshake
    /// is done, collects plaintext until `done` or the end.
    fn https(
        &mut self,
        addr: Ipv4Addr,
        sni: &str,
        alpn: &[&[u8]],
        request: &[u8],
        done: &dyn Fn(&str) -> bool,
    ) -> Outcome {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert_der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut client =
            ClientConnection::new(Arc::new(config), ServerName::try_from(sni.to_string()).unwrap()).unwrap();
        self.drive(addr, 443, Some(&mut client), request, done)
    }

    /// Plain bytes to `addr`:`port`.
    fn plain(&mut self, addr: Ipv4Addr, port: u16, request: &[u8], done: &dyn Fn(&str) -> bool) -> Outcome {
        self.drive(addr, port, None, request, done)
    }

    fn drive(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        mut client: Option<&mut ClientConnection>,
        request: &[u8],
        done: &dyn Fn(&str) -> bool,
    ) -> Outcome {
        static LOCAL_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(30000);
        let buf = || tcp::SocketBuffer::new(vec![0; 256 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        let local = LOCAL_PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        socket.connect(self.guest.iface.context(), (addr, port), local).unwrap();
        let h = self.guest.sockets.add(socket);
        let mut out: Vec<u8> = if client.is_none() { request.to_vec() } else { Vec::new() };
        let mut plain_left: &[u8] = if client.is_some() { request } else { &[] };
        let mut got = Vec::new();
        let mut error = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            pump(&mut self.net, &mut self.guest, &mut self.now);
            let s = self.guest.sockets.get_mut::<tcp::Socket>(h);
            if let Some(c) = client.as_deref_mut() {
                if !plain_left.is_empty() && out.len() < 256 * 1024 {
                    let n = c.writer().write(plain_left).unwrap_or(0);
                    plain_left = &plain_left[n..];
                }
                while c.wants_write() {
                    c.write_tls(&mut out).unwrap();
                }
            }
            if s.can_send() && !out.is_empty() {
                let n = s.send_slice(&out).unwrap_or(0);
                out.drain(..n);
            }
            while s.can_recv() {
                let n = s.recv_slice(&mut rx).unwrap_or(0);
                if n == 0 {
                    break;
                }
                match client.as_deref_mut() {
                    Some(c) => {
                        let mut data = &rx[..n];
                        while !data.is_empty() && error.is_none() {
                            if c.read_tls(&mut data).unwrap_or(0) == 0 {
                                break;
                            }
                            if let Err(e) = c.process_new_packets() {
                                error = Some(e);
                            }
                        }
                    }
                    None => got.extend_from_slice(&rx[..n]),
                }
            }
            if let Some(c) = client.as_deref_mut() {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = c.reader().read(&mut chunk) {
                    got.extend_from_slice(&chunk[..n]);
                }
            }
            let state = s.state();
            let text = String::from_utf8_lossy(&got).to_string();
            let closed = matches!(state, tcp::State::Closed | tcp::State::CloseWait | tcp::State::TimeWait);
            if done(&text) || error.is_some() || closed || Instant::now() > deadline {
                let alpn = client.as_deref().and_then(|c| c.alpn_protocol()).map(|p| p.to_vec());
                s.close();
                pump(&mut self.net, &mut self.guest, &mut self.now);
                return Outcome { text, error, alpn };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

struct Outcome {
    text: String,
    error: Option<rustls::Error>,
    alpn: Option<Vec<u8>>,
}

fn get(host: &str, path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").into_bytes()
}

fn responded(t: &str) -> bool {
    t.contains("\r\n\r\n")
        && (t.contains("ok ") || t.contains("sbx:") || t.contains("plain ") || t.contains("x-api-key"))
}

const POLICY: &str = r#"
version = 1
https = "terminate"
[[rule]]
allow = "*.example.com"
[[rule]]
allow = "files.example.org"
methods = ["GET"]
path_prefix = "/public/"
[[rule]]
deny = "files.example.org"
methods = ["POST"]
"#;

fn setup() -> (Setup, Seen, Ipv4Addr) {
    let (root, cert, key) = test_pki(NAMES);
    let (up, seen) = tls_upstream(cert, key);
    let routes: Vec<(&str, u16, SocketAddr)> = NAMES.iter().map(|n| (*n, 443, up)).collect();
    let mut s = Setup::new(POLICY, &routes, &root);
    let addr = s.resolve("api.example.com");
    (s, seen, addr)
}

#[test]
fn the_guest_talks_http_through_terminated_tls_and_the_bound_host_gets_the_real_key() {
    let (mut s, seen, addr) = setup();
    let req = get("api.example.com", "/v1/messages", &format!("x-api-key: {PLACEHOLDER}\r\n"));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| responded(t));
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.text.starts_with("HTTP/1.1 200 OK") && out.text.ends_with("ok GET /v1/messages 0"), "{}", out.text);
    assert_eq!(out.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].0.contains(&format!("x-api-key: {SECRET}\r\n")), "{}", heads[0].0);
    assert!(!heads[0].0.contains(PLACEHOLDER));
    let log = s.audit();
    let line = log.lines().find(|l| l.contains("\"path\":\"/v1/messages\"")).expect("request logged");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        (v["credential"].as_str(), v["status"].as_u64(), v["tls"].as_str()),
        (Some("anthropic"), Some(200), Some("terminated"))
    );
    assert!(log.contains("\"terminated\":true") && log.contains("\"alpn\":\"http/1.1\""), "{log}");
    assert!(!log.contains(SECRET), "the secret is never in the audit log");
    assert!(audit::verify(log.as_bytes()).is_ok());
}

#[test]
fn an_echoing_upstream_never_hands_the_guest_the_secret() {
    let (mut s, _seen, addr) = setup();
    let req = get("api.example.com", "/echo", &format!("x-api-key: {PLACEHOLDER}\r\n"));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| {
        t.contains("x-api-key: ") && t.ends_with("\r\n\r\n")
    });
    assert!(out.text.contains(&format!("x-api-key: {}\r\n", "*".repeat(SECRET.len()))), "{}", out.text);
    assert!(!out.text.contains(SECRET));
}

#[test]
fn the_placeholder_is_replaced_nowhere_else_and_refused_on_other_hosts() {
    let (mut s, seen, addr) = setup();
    // On the bound host, elsewhere than its header: passed unchanged.
    let req = get("api.example.com", &format!("/q?key={PLACEHOLDER}"), &format!("x-other: {PLACEHOLDER}\r\n"));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| responded(t));
    assert!(out.text.contains("ok GET"), "{}", out.text);
    let head = seen.lock().unwrap().last().unwrap().0.clone();
    assert!(head.contains(&format!("x-other: {PLACEHOLDER}")) && !head.contains(SECRET), "{head}");
    let before = seen.lock().unwrap().len();
    // To another allowed host: refused, logged as a leak attempt.
    let other = s.resolve("other.example.com");
    for (req, what) in [
        (get("other.example.com", "/", &format!("x-api-key: {PLACEHOLDER}\r\n")), "header"),
        (get("other.example.com", &format!("/?k={PLACEHOLDER}"), ""), "url"),
    ] {
        let out = s.https(other, "other.example.com", &[b"http/1.1"], &req, &|t| responded(t));
        assert!(out.text.starts_with("HTTP/1.1 403") && out.text.contains("leak attempt"), "{what}: {}", out.text);
    }
    // In a body, also chunked and split across chunks.
    let body = format!("{{\"stolen\":\"{PLACEHOLDER}\"}}");
    let post = format!("POST /x HTTP/1.1\r\nHost: other.example.com\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let out = s.https(other, "other.example.com", &[b"http/1.1"], post.as_bytes(), &|t| responded(t));
    assert!(out.text.contains("403") && out.text.contains("in a body"), "{}", out.text);
    let (a, b) = PLACEHOLDER.split_at(20);
    let chunked = format!(
        "POST /c HTTP/1.1\r\nHost: other.example.com\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let out = s.https(other, "other.example.com", &[b"http/1.1"], chunked.as_bytes(), &|t| t.contains("403"));
    assert!(out.text.contains("in a body"), "{}", out.text);
    let bodies: Vec<Vec<u8>> = seen.lock().unwrap()[before..].iter().map(|(_, b)| b.clone()).collect();
    assert!(
        bodies.iter().all(|b| !String::from_utf8_lossy(b).contains(PLACEHOLDER)),
        "the placeholder never left whole"
    );
    assert!(seen.lock().unwrap()[before..].iter().all(|(h, _)| !h.contains(PLACEHOLDER)));
    let log = s.audit();
    assert_eq!(log.matches("\"leak\":\"anthropic\"").count(), 4, "{log}");
}

#[test]
fn plain_http_to_the_bound_host_never_gets_the_secret() {
    let (root, _, _) = test_pki(NAMES);
    let (up, seen) = plain_upstream();
    let mut s = Setup::new(POLICY, &[("api.example.com", 80, up), ("other.example.com", 80, up)], &root);
    let addr = s.resolve("api.example.com");
    let out =
        s.plain(addr, 80, &get("api.example.com", "/", &format!("x-api-key: {PLACEHOLDER}\r\n")), &|t| responded(t));
    assert!(out.text.contains("plain /"), "{}", out.text);
    assert!(seen.lock().unwrap()[0].0.contains(PLACEHOLDER), "forwarded unchanged");
    let other = s.resolve("other.example.com");
    let out =
        s.plain(other, 80, &get("other.example.com", "/", &format!("x-api-key: {PLACEHOLDER}\r\n")), &|t| responded(t));
    assert!(out.text.contains("403") && out.text.contains("leak attempt"), "{}", out.text);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn host_must_equal_sni_also_on_a_second_request() {
    let (mut s, seen, addr) = setup();
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &get("other.example.com", "/", ""), &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 403") && out.text.contains("not the name"), "{}", out.text);
    // Keep-alive: the first request goes, the second (another host) is refused.
    let two = [get("api.example.com", "/1", ""), get("other.example.com", "/2", "")].concat();
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &two, &|t| t.contains("403"));
    assert!(out.text.contains("ok GET /1 0") && out.text.contains("403 Forbidden"), "{}", out.text);
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|(h, _)| h.lines().next().unwrap().to_string()).collect();
    assert_eq!(paths, vec!["GET /1 HTTP/1.1".to_string()]);
    // An SNI other than the name the address was resolved for: reset
    // before any handshake.
    let out = s.https(addr, "other.example.com", &[b"http/1.1"], &get("other.example.com", "/", ""), &|_| false);
    assert!(out.text.is_empty());
    assert!(s.audit().contains("SNI is not the name"));
}

#[test]
fn method_and_path_rules_apply_to_https() {
    let (mut s, seen, _) = setup();
    let files = s.resolve("files.example.org");
    let out = s.https(files, "files.example.org", &[b"http/1.1"], &get("files.example.org", "/public/a", ""), &|t| {
        responded(t)
    });
    assert!(out.text.contains("ok GET /public/a 0"), "{}", out.text);
    for req in [
        get("files.example.org", "/private", ""),
        get("files.example.org", "/public/../private", ""),
        b"POST /public/a HTTP/1.1\r\nHost: files.example.org\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        b"PUT /public/a HTTP/1.1\r\nHost: files.example.org\r\nContent-Length: 1\r\n\r\nx".to_vec(),
    ] {
        let out = s.https(files, "files.example.org", &[b"http/1.1"], &req, &|t| responded(t));
        assert!(out.text.starts_with("HTTP/1.1 403"), "{}: {}", String::from_utf8_lossy(&req), out.text);
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "refused requests never went upstream");
}

#[test]
fn an_upstream_whose_certificate_does_not_verify_is_a_502() {
    let (root, _, _) = test_pki(NAMES);
    // Signed by another root, and one for the wrong name by the right root.
    let (_, stranger_cert, stranger_key) = test_pki(NAMES);
    let (bad, bad_seen) = tls_upstream(stranger_cert, stranger_key);
    let mut s = Setup::new(POLICY, &[("api.example.com", 443, bad)], &root);
    let addr = s.resolve("api.example.com");
    let req = get("api.example.com", "/", &format!("x-api-key: {PLACEHOLDER}\r\n"));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 502") && out.text.contains("upstream TLS failed"), "{}", out.text);
    assert!(out.text.contains("UnknownIssuer") || out.text.contains("invalid peer certificate"), "{}", out.text);
    assert!(bad_seen.lock().unwrap().is_empty(), "no request reached it");
    let log = s.audit();
    assert!(
        log.contains("\"event\":\"upstream\"") && log.contains("upstream certificate or handshake refused"),
        "{log}"
    );
    assert!(!log.contains(SECRET));
}

#[test]
fn an_upstream_certificate_for_another_name_is_refused() {
    let (root, wrong_cert, wrong_key) = test_pki(&["elsewhere.example.net"]);
    let (up, seen) = tls_upstream(wrong_cert, wrong_key);
    let mut s = Setup::new(POLICY, &[("api.example.com", 443, up)], &root);
    let addr = s.resolve("api.example.com");
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &get("api.example.com", "/", ""), &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 502") && out.text.contains("not valid for name"), "{}", out.text);
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn the_guest_gets_http1_whatever_it_offers() {
    let (mut s, _, addr) = setup();
    let out =
        s.https(addr, "api.example.com", &[b"h2", b"http/1.1"], &get("api.example.com", "/", ""), &|t| responded(t));
    assert_eq!(out.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(out.text.contains("ok GET / 0"), "{}", out.text);
    // h2 alone: no common protocol, the handshake fails (and is logged).
    let out = s.https(addr, "api.example.com", &[b"h2"], &get("api.example.com", "/", ""), &|t| responded(t));
    assert!(out.error.is_some() && out.text.is_empty(), "{:?} {}", out.error, out.text);
    // No ALPN at all: HTTP/1.1 as always; an HTTP/2 preface is refused.
    let out = s.https(addr, "api.example.com", &[], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 403") && out.text.contains("HTTP/2"), "{}", out.text);
    assert!(s.audit().contains("guest TLS failed"));
}

#[test]
fn sizes_framing_and_chunked_bodies_through_tls() {
    let (mut s, seen, addr) = setup();
    let huge = get("api.example.com", "/", &format!("x-pad: {}\r\n", "a".repeat(crate::http::MAX_HEAD)));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &huge, &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 403") && out.text.contains("larger than"), "{}", out.text);
    let too_long = b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 99999999999999\r\n\r\n";
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], too_long, &|t| responded(t));
    assert!(out.text.contains("403") && out.text.contains("Content-Length"), "{}", out.text);
    let smuggle =
        b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], smuggle, &|t| responded(t));
    assert!(out.text.contains("403") && out.text.contains("ambiguous"), "{}", out.text);
    assert!(seen.lock().unwrap().is_empty());
    // Chunked bodies pass, with the key injected in the head, and a
    // kept-alive second request follows.
    let chunked = format!(
        "POST /up HTTP/1.1\r\nHost: api.example.com\r\nx-api-key: {PLACEHOLDER}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nGET /after HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
    );
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], chunked.as_bytes(), &|t| t.contains("ok GET /after"));
    assert!(out.text.contains("ok POST /up 11") && out.text.contains("ok GET /after 0"), "{}", out.text);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got[0].1, b"hello world");
    assert!(got[0].0.contains(SECRET) && !got[1].0.contains(SECRET), "only the request that carried the placeholder");
    // A large body streams through both TLS sessions.
    let big = vec![b'b'; 3 << 20];
    let mut post =
        format!("POST /big HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    post.extend_from_slice(&big);
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &post, &|t| t.contains("ok POST /big"));
    assert!(out.text.contains(&format!("ok POST /big {}", big.len())), "{}", out.text);
}

#[test]
fn passthrough_hosts_are_still_spliced_and_l7_hosts_fail_closed_without_a_ca() {
    // https = passthrough: other.example.com (no credential, no L7 rule)
    // is spliced, so the guest sees the upstream's own certificate.
    let (root, cert, key) = test_pki(NAMES);
    let (up, _) = tls_upstream(cert, key);
    let policy = POLICY.replace("https = \"terminate\"", "https = \"passthrough\"");
    let routes: Vec<(&str, u16, SocketAddr)> = NAMES.iter().map(|n| (*n, 443, up)).collect();
    let mut s = Setup::new(&policy, &routes, &root);
    let other = s.resolve("other.example.com");
    let out =
        s.https(other, "other.example.com", &[b"http/1.1"], &get("other.example.com", "/", ""), &|t| responded(t));
    assert!(out.error.is_some(), "our CA does not vouch for a spliced upstream: {}", out.text);
    let api = s.resolve("api.example.com");
    let out = s.https(api, "api.example.com", &[b"http/1.1"], &get("api.example.com", "/", ""), &|t| responded(t));
    assert!(out.text.contains("ok GET / 0"), "a credential host is terminated: {}", out.text);
    let p = Policy::from_toml(&policy).unwrap();
    assert!(!p.terminates(&HostName::parse("other.example.com").unwrap(), 443));
    assert!(p.terminates(&HostName::parse("files.example.org").unwrap(), 443), "method/path rules");
    // Per rule: `passthrough = true` splices its host only.
    let policy = format!(
        "{}[[rule]]\nallow = \"other.example.com\"\npassthrough = true\n",
        POLICY.replace("https = \"terminate\"\n", "")
    );
    let mut s = Setup::new(&policy, &routes, &root);
    let other = s.resolve("other.example.com");
    let out =
        s.https(other, "other.example.com", &[b"http/1.1"], &get("other.example.com", "/", ""), &|t| responded(t));
    assert!(out.error.is_some(), "spliced: the guest sees the upstream's certificate: {}", out.text);
    let plain = s.resolve("plain.example.com");
    let out =
        s.https(plain, "plain.example.com", &[b"http/1.1"], &get("plain.example.com", "/", ""), &|t| responded(t));
    assert!(out.text.contains("ok GET / 0"), "every other host is terminated: {}", out.text);
}

#[test]
fn every_host_is_terminated_by_default_and_each_request_must_name_the_sni() {
    // No `https` line: other.example.com has no credential and no
    // method/path rule, and is terminated all the same.
    let (root, cert, key) = test_pki(NAMES);
    let (up, seen) = tls_upstream(cert, key);
    let policy = POLICY.replace("https = \"terminate\"\n", "");
    assert!(!policy.contains("https"));
    let routes: Vec<(&str, u16, SocketAddr)> = NAMES.iter().map(|n| (*n, 443, up)).collect();
    let mut s = Setup::new(&policy, &routes, &root);
    let other = s.resolve("other.example.com");
    let out = s.https(other, "other.example.com", &[b"h2", b"http/1.1"], &get("other.example.com", "/", ""), &|t| {
        responded(t)
    });
    assert!(out.text.contains("ok GET / 0"), "terminated with netstack's leaf: {:?} {}", out.error, out.text);
    assert_eq!(out.alpn.as_deref(), Some(&b"http/1.1"[..]), "HTTP/1.1 only: no h2 coalescing");
    // Domain fronting: the SNI names an allowed host, the Host another
    // tenant of the same front end.
    let out = s.https(other, "other.example.com", &[b"http/1.1"], &get("api.example.com", "/", ""), &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 403") && out.text.contains("not the name"), "{}", out.text);
    // The same on the second request of a kept-alive connection.
    let two = [get("other.example.com", "/1", ""), get("api.example.com", "/2", "")].concat();
    let out = s.https(other, "other.example.com", &[b"http/1.1"], &two, &|t| t.contains("403"));
    assert!(out.text.contains("ok GET /1 0") && out.text.contains("403 Forbidden"), "{}", out.text);
    // An absolute-form target naming another authority is refused too.
    let abs = b"GET https://api.example.com/ HTTP/1.1\r\nHost: other.example.com\r\n\r\n";
    let out = s.https(other, "other.example.com", &[b"http/1.1"], abs, &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 403"), "{}", out.text);
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|(h, _)| h.lines().next().unwrap().to_string()).collect();
    assert_eq!(paths, vec!["GET / HTTP/1.1".to_string(), "GET /1 HTTP/1.1".to_string()]);
    let log = s.audit();
    assert!(log.contains("\"sni\":\"other.example.com\"") && log.contains("\"terminated\":true"), "{log}");
}

/// The bodies of the responses in `raw` (the guest's plaintext), chunked
/// ones de-chunked: what the guest's HTTP client hands its program.
fn bodies(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.find("\r\n\r\n") {
        let head = rest[..end].to_ascii_lowercase();
        rest = &rest[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            let mut body = String::new();
            while let Some((size, after)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16).unwrap_or(0);
                rest = after;
                if n == 0 {
                    rest = rest.split_once("\r\n\r\n").map_or("", |(_, r)| r);
                    break;
                }
                body.push_str(&rest[..n.min(rest.len())]);
                rest = rest.get(n + 2..).unwrap_or("");
            }
            out.push(body);
        } else {
            let n = head
                .split("content-length:")
                .nth(1)
                .and_then(|v| v.split("\r\n").next())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(rest.len());
            out.push(rest[..n.min(rest.len())].to_string());
            rest = &rest[n.min(rest.len())..];
        }
    }
    out
}

/// The longest run of SECRET's bytes that `text` holds.
fn longest_piece(text: &str) -> usize {
    let s = SECRET.as_bytes();
    (1..=s.len()).rev().find(|&n| s.windows(n).any(|w| text.as_bytes().windows(n).any(|t| t == w))).unwrap_or(0)
}

fn with_key(path: &str) -> Vec<u8> {
    get("api.example.com", path, &format!("x-api-key: {PLACEHOLDER}\r\n"))
}

/// Bypass 1: a value split across pipelined responses on one connection,
/// each piece shorter than MIN_PIECE (the old scrubber released the held
/// prefix at the end of each response).
#[test]
fn a_secret_split_across_pipelined_responses_is_masked() {
    let (mut s, _, addr) = setup();
    let cuts = [0, 7, 14, 21, 28, SECRET.len()];
    let req: Vec<u8> = cuts.windows(2).flat_map(|c| with_key(&format!("/r/piece/{}/{}", c[0], c[1]))).collect();
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| bodies(t).len() == 5);
    let got = bodies(&out.text);
    assert_eq!(got.len(), 5, "{}", out.text);
    let joined = got.concat();
    assert_eq!(joined.len(), SECRET.len(), "lengths unchanged: {joined}");
    assert!(longest_piece(&joined) < crate::credential::MIN_PIECE, "{joined}");
    // The first response's 7 bytes leave unmasked when they went out
    // before the rest came (the residue, shorter than a piece), masked
    // when the responses arrived together: either is safe, which one is
    // the scheduler's.
    let first = &joined[..7];
    assert!(first == &SECRET[..7] || first.bytes().all(|b| b == b'*'), "{joined}");
    assert!(joined[7..].bytes().all(|b| b == b'*'), "{joined}");
    let log = s.audit();
    assert!(log.contains("\"leak\":\"anthropic\"") && log.contains("echoed"), "{log}");
    assert!(!log.contains(SECRET));
}

/// Bypass 2: a chunk boundary inside the value.
#[test]
fn a_chunk_boundary_inside_the_value_does_not_hide_it() {
    let (mut s, _, addr) = setup();
    for cut in [1, 10, 20, 30] {
        let out = s.https(addr, "api.example.com", &[b"http/1.1"], &with_key(&format!("/r/chunked/{cut}")), &|t| {
            t.ends_with("0\r\n\r\n")
        });
        let got = bodies(&out.text);
        assert_eq!(got, vec![format!("key={}", "*".repeat(SECRET.len()))], "cut {cut}: {}", out.text);
    }
}

/// Bypass 3: pieces on different connections: by Range (now dropped
/// upstream, so the whole value comes back and is masked), and from an
/// upstream that stored the value, to a connection that injected nothing.
#[test]
fn pieces_on_other_connections_are_masked_too() {
    let (mut s, seen, addr) = setup();
    let mut joined = String::new();
    for (a, b) in [(0, 15), (16, 30)] {
        let req = get("api.example.com", "/r/range", &format!("x-api-key: {PLACEHOLDER}\r\nRange: bytes={a}-{b}\r\n"));
        let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| bodies(t).len() == 1);
        assert!(out.text.starts_with("HTTP/1.1 200"), "the Range never reached the upstream: {}", out.text);
        joined.push_str(&bodies(&out.text).concat());
    }
    assert!(longest_piece(&joined) == 0, "{joined}");
    assert!(seen.lock().unwrap().iter().all(|(h, _)| !h.to_ascii_lowercase().contains("range:")));
    // A second connection without the credential: its responses are
    // scrubbed as well.
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &get("api.example.com", "/r/stored", ""), &|t| {
        bodies(t).len() == 1
    });
    assert_eq!(bodies(&out.text), vec!["*".repeat(SECRET.len())], "{}", out.text);
    // Pieces of at least MIN_PIECE bytes are masked wherever they are.
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &with_key("/r/piece/3/11"), &|t| bodies(t).len() == 1);
    assert_eq!(bodies(&out.text), vec!["*".repeat(8)]);
    let log = s.audit();
    let echoes: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["leak"] == "anthropic")
        .filter_map(|v| v["echoes"].as_u64())
        .collect();
    assert_eq!(echoes, vec![1, 2, 3, 4], "counted across the sandbox's connections: {log}");
    assert!(!log.contains(SECRET));
}

/// Bypass 4: the value sent back re-encoded, or compressed.
#[test]
fn re_encoded_values_are_masked_and_coded_bodies_refused() {
    let (mut s, seen, addr) = setup();
    let encodings: Vec<(String, String)> = vec![
        (
            "/r/b64/0".into(),
            String::from_utf8(crate::credential::base64_groups(
                format!("{SECRET}#").as_bytes(),
                crate::credential::B64_STD,
            ))
            .unwrap(),
        ),
        ("/r/b64/1".into(), String::new()),
        ("/r/b64/2".into(), String::new()),
        ("/r/hex".into(), SECRET.bytes().map(|b| format!("{b:02x}")).collect()),
        ("/r/pct".into(), SECRET.bytes().map(|b| format!("%{b:02X}")).collect()),
        ("/r/json".into(), SECRET.replace('-', "\\u002d")),
    ];
    for (path, plain) in &encodings {
        let out = s.https(addr, "api.example.com", &[b"http/1.1"], &with_key(path), &|t| bodies(t).len() == 1);
        let body = bodies(&out.text).concat();
        let stars = body.bytes().filter(|b| *b == b'*').count();
        // All but at most the few characters that also depend on the
        // bytes around the value.
        assert!(stars + 4 >= body.len().saturating_sub(10), "{path}: {body}");
        if !plain.is_empty() {
            assert!(!body.contains(&plain[..plain.len() / 2]), "{path}: {body}");
        }
    }
    // Compression: never asked for, and refused when it comes anyway.
    let req = get("api.example.com", "/r/gzip", &format!("x-api-key: {PLACEHOLDER}\r\nAccept-Encoding: gzip, br\r\n"));
    let out = s.https(addr, "api.example.com", &[b"http/1.1"], &req, &|t| responded(t));
    assert!(out.text.starts_with("HTTP/1.1 502") && out.text.contains("Content-Encoding: gzip"), "{}", out.text);
    assert!(!out.text.contains(SECRET) && !out.text.contains("200 OK"));
    let head = seen.lock().unwrap().last().unwrap().0.to_ascii_lowercase();
    assert!(head.contains("accept-encoding: identity\r\n") && !head.contains("br"), "{head}");
    assert!(s.audit().contains("cannot be searched"));
}

/// A placeholder in a chunk extension or a trailer of a request body to a
/// host it is not bound to is a leak attempt, like one in the body.
#[test]
fn a_placeholder_in_chunk_extensions_or_trailers_is_a_leak() {
    let (mut s, seen, _) = setup();
    let other = s.resolve("other.example.com");
    for framing in
        [format!("1;k={PLACEHOLDER}\r\nx\r\n0\r\n\r\n"), format!("1\r\nx\r\n0\r\nX-T: {PLACEHOLDER}\r\n\r\n")]
    {
        let req = format!("POST /c HTTP/1.1\r\nHost: other.example.com\r\nTransfer-Encoding: chunked\r\n\r\n{framing}");
        let out = s.https(other, "other.example.com", &[b"http/1.1"], req.as_bytes(), &|t| responded(t));
        assert!(out.text.contains("403") && out.text.contains("leak attempt"), "{framing:?}: {}", out.text);
    }
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|(h, b)| !h.contains(PLACEHOLDER) && !String::from_utf8_lossy(b).contains(PLACEHOLDER)));
    assert_eq!(s.audit().matches("\"leak\":\"anthropic\"").count(), 2);
}

mod oauth;
