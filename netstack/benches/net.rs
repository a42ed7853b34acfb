//! Host side: netstack's figures, printed (no harness): a simulated guest
//! (smoltcp, in process) streams a body through netstack's HTTP path to an
//! upstream on 127.0.0.1 that echoes it back as it arrives, at MTU 1500 and
//! 65520; then short HTTP requests, one connection each, against the same
//! upstream reached directly; then HTTPS side by side, spliced by SNI
//! (pass-through) and terminated by netstack (its CA's leaf, cached after
//! the first connection; a verified TLS session of its own upstream):
//! throughput of one streamed connection, and the p50 of short requests
//! on a kept-alive connection and on a new connection each.
//! Then requests held for a person (`approval = "ask"`): the memory each
//! held request costs the process (counted by this binary's allocator:
//! the guest's sockets are made before counting starts), and the time
//! from `Live::approve` to each held request reaching the upstream.
//! Run: `cargo bench -p netstack --bench net`
//! (`-- --mib N` for another size; default 1024 MiB each way; `-- --held`
//! for the held-request figures alone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use audit::AuditLog;
use netstack::host::HostName;
use netstack::policy::Policy;
use netstack::sim::Guest;
use netstack::stack::{Config, NetStack, Resolver};
use smoltcp::socket::{tcp, udp};

const NAME: &str = "bench.example";

/// Counts the bytes live on the heap, for the held-request figure.
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator (which
// upholds GlobalAlloc's contract); the counter is only arithmetic beside it.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as given.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as for dealloc and alloc.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::SeqCst)
}

/// Upstream: for each request, a 200 whose body is the request's body,
/// streamed back as it arrives (or "ok" for a body-less request).
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut r = BufReader::with_capacity(256 * 1024, stream.try_clone().unwrap());
                let mut w = stream;
                let mut len = 0u64;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                if len == 0 {
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                    return;
                }
                let _ = w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes());
                let mut buf = vec![0u8; 256 * 1024];
                let cap = buf.len() as u64;
                let mut left = len;
                while left > 0 {
                    let n = r.read(&mut buf[..left.min(cap) as usize]).unwrap();
                    if n == 0 {
                        return;
                    }
                    w.write_all(&buf[..n]).unwrap();
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

type Net = NetStack<std::io::Sink>;

fn netstack(mtu: usize, upstream: SocketAddr) -> Net {
    let mut resolver = Resolver::default();
    resolver.overrides.insert((HostName::parse(NAME).unwrap(), 80), upstream);
    let policy = Policy::from_toml(&format!("version = 1\n[[rule]]\nallow = \"{NAME}\"\n")).unwrap();
    NetStack::new(Config { mtu, ..Config::default() }, policy, resolver, AuditLog::new(std::io::sink()).shared())
}

fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// One poll round of both sides on the real clock.
fn round(net: &mut Net, guest: &mut Guest, start: Instant) {
    guest.poll(ms(start));
    while let Some(f) = guest.pop_frame() {
        net.push_frame(f);
    }
    net.poll(ms(start));
    while let Some(f) = net.pop_frame() {
        guest.push_frame(f);
    }
}

fn resolve(net: &mut Net, guest: &mut Guest, start: Instant) -> std::net::Ipv4Addr {
    let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
    let mut s = udp::Socket::new(buf(), buf());
    s.bind((netstack::sim::GUEST_IP, 5353)).unwrap();
    let h = guest.sockets.add(s);
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (std::net::Ipv4Addr::new(10, 0, 2, 2), 53)).unwrap();
    for _ in 0..100 {
        round(net, guest, start);
        if let Ok((d, _)) = guest.sockets.get_mut::<udp::Socket>(h).recv() {
            let n = d.len();
            return std::net::Ipv4Addr::new(d[n - 4], d[n - 3], d[n - 2], d[n - 1]);
        }
    }
    panic!("no DNS answer");
}

/// CPU seconds used by this process so far (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

fn stream(mtu: usize, bytes: u64, upstream: SocketAddr) {
    let mut net = netstack(mtu, upstream);
    let mut guest = Guest::new(mtu);
    let start = Instant::now();
    let addr = resolve(&mut net, &mut guest, start);
    let buf = || tcp::SocketBuffer::new(vec![0; 1 << 20]);
    let mut socket = tcp::Socket::new(buf(), buf());
    socket.connect(guest.iface.context(), (addr, 80), 40000).unwrap();
    let h = guest.sockets.add(socket);
    let head = format!("POST /stream HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {bytes}\r\n\r\n");
    let chunk = vec![b'z'; 256 * 1024];
    let (mut head_sent, mut sent, mut received) = (0usize, 0u64, 0u64);
    let mut rx = vec![0u8; 1 << 20];
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    // The response head is ~40 bytes more than the body.
    while received < bytes + 38 {
        round(&mut net, &mut guest, start);
        let s = guest.sockets.get_mut::<tcp::Socket>(h);
        let before = (sent, received);
        if s.can_send() {
            if head_sent < head.len() {
                head_sent += s.send_slice(&head.as_bytes()[head_sent..]).unwrap_or(0);
            } else if sent < bytes {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                sent += s.send_slice(&chunk[..n]).unwrap_or(0) as u64;
            }
        }
        while s.can_recv() {
            received += s.recv_slice(&mut rx).unwrap_or(0) as u64;
        }
        if (sent, received) != before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(10) {
            panic!("stalled at {sent} sent, {received} received");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "| MTU {mtu} | {:.0} MiB each way | {:.2} s | {:.2} Gbit/s each way | {:.2} CPU-s per GiB (both ways, all threads) |",
        bytes as f64 / (1 << 20) as f64,
        secs,
        bytes as f64 * 8.0 / secs / 1e9,
        cpu / (2.0 * gib)
    );
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn short_requests(n: usize, upstream: SocketAddr) {
    short_requests_with(n, upstream, None);
}

/// Short requests with `live` live rules in force (none of them matching
/// the request, so every one is looked at: the worst case), against the
/// static policy alone (`None`).
fn short_requests_with(n: usize, upstream: SocketAddr, live: Option<usize>) {
    let mut net = netstack(1500, upstream);
    if let Some(count) = live {
        let mut rules = netstack::live::LiveRules::default();
        for i in 0..count {
            let action = if i % 2 == 0 { "allow" } else { "deny" };
            let spec = netstack::live::RuleSpec {
                action: action.into(),
                host: format!("h{i}.example.net"),
                methods: vec![],
                path: None,
                for_secs: Some(3600),
                uses: None,
                until_exit: false,
                graphql_mutations: vec![],
            };
            rules.add(&spec, 0, None, None).unwrap();
        }
        net = net.with_live(netstack::live::Live::new("bench", rules));
    }
    let mut guest = Guest::new(1500);
    let start = Instant::now();
    let addr = resolve(&mut net, &mut guest, start);
    let req = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
    let mut via = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let buf = || tcp::SocketBuffer::new(vec![0; 16 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 80), 20000 + (i % 20000) as u16).unwrap();
        let h = guest.sockets.add(socket);
        let mut sent = false;
        let mut got = Vec::new();
        loop {
            round(&mut net, &mut guest, start);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if !sent && s.can_send() {
                s.send_slice(req.as_bytes()).unwrap();
                sent = true;
            }
            let mut b = [0u8; 512];
            while s.can_recv() {
                let k = s.recv_slice(&mut b).unwrap_or(0);
                got.extend_from_slice(&b[..k]);
            }
            if got.ends_with(b"ok") {
                s.close();
                break;
            }
        }
        via.push(t.elapsed().as_secs_f64() * 1e6);
        // Let the close finish before the socket is dropped.
        for _ in 0..4 {
            round(&mut net, &mut guest, start);
        }
        guest.sockets.remove(h);
    }
    let total = t0.elapsed().as_secs_f64();
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(upstream).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        direct.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50v, p50d) = (percentile(&mut via, 0.5), percentile(&mut direct, 0.5));
    let what = match live {
        None => "static policy".to_string(),
        Some(k) => format!("{k} live rules"),
    };
    println!(
        "| {n} short requests, one connection each, {what} | {:.0} requests/s through netstack | p50 {:.0} us through netstack, {:.0} us direct: {:.0} us added | p99 {:.0} us through netstack |",
        n as f64 / total,
        p50v,
        p50d,
        p50v - p50d,
        percentile(&mut via, 0.99)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    if args.iter().any(|a| a == "--held") {
        for n in [1, 16, 200] {
            held_requests(n);
        }
        return;
    }
    let upstream = echo_server();
    println!("netstack figures (in-process simulated guest, upstream on 127.0.0.1)\n");
    println!("| path | size | time | throughput | CPU |");
    println!("|---|---|---|---|---|");
    for mtu in [1500, 65520] {
        stream(mtu, mib << 20, upstream);
    }
    println!();
    short_requests(2000, upstream);
    for live in [1, 100, 10_000] {
        short_requests_with(2000, upstream, Some(live));
    }
    short_requests(2000, upstream);
    println!();
    for n in [1, 16, 200] {
        held_requests(n);
    }
    println!();
    tls::figures((mib / 4).max(16));
}

/// An upstream that answers each request "ok" and sends the time its
/// request line arrived.
fn timing_server() -> (SocketAddr, std::sync::mpsc::Receiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let _ = tx.send(Instant::now());
                while r.read_line(&mut line).unwrap_or(0) > 0 && !line.ends_with("\r\n\r\n") {}
                let mut w = stream;
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            });
        }
    });
    (addr, rx)
}

/// `n` guest requests to a host no rule allows, held on one question
/// (`approval = "ask"`): the heap each costs while it waits, and the time
/// from the approval to the first and the last of them at the upstream.
fn held_requests(n: usize) {
    use netstack::live::{Grant, Live, LiveRules};
    let (upstream, arrived) = timing_server();
    let mut resolver = Resolver::default();
    resolver.overrides.insert((HostName::parse(NAME).unwrap(), 80), upstream);
    let policy = Policy::from_toml("version = 1\napproval = \"ask\"\n").unwrap();
    let live = Live::with_hold("bench", LiveRules::default(), 600_000);
    let mut net = NetStack::new(Config::default(), policy, resolver, AuditLog::new(std::io::sink()).shared())
        .with_live(live.clone());
    let mut guest = Guest::new(1500);
    let start = Instant::now();
    let addr = resolve(&mut net, &mut guest, start);
    let req = format!("GET /held HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
    // The guest's side is made first, so that what is counted below is
    // netstack's (and the little the guest's sockets add in flight).
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let buf = || tcp::SocketBuffer::new(vec![0; 4096]);
            guest.sockets.add(tcp::Socket::new(buf(), buf()))
        })
        .collect();
    for _ in 0..4 {
        round(&mut net, &mut guest, start);
    }
    let before = live_bytes();
    for (i, h) in handles.iter().enumerate() {
        let s = guest.sockets.get_mut::<tcp::Socket>(*h);
        s.connect(guest.iface.context(), (addr, 80), 30000 + i as u16).unwrap();
    }
    let mut sent = vec![false; n];
    let waiting = |live: &Live| live.questions().first().map_or(0, |q| q.waiting);
    let deadline = Instant::now() + Duration::from_secs(60);
    while waiting(&live) < n {
        assert!(Instant::now() < deadline, "only {} of {n} requests were held", waiting(&live));
        round(&mut net, &mut guest, start);
        for (i, h) in handles.iter().enumerate() {
            let s = guest.sockets.get_mut::<tcp::Socket>(*h);
            if !sent[i] && s.can_send() {
                s.send_slice(req.as_bytes()).unwrap();
                sent[i] = true;
            }
        }
    }
    for _ in 0..20 {
        round(&mut net, &mut guest, start);
    }
    let per_held = (live_bytes() - before) as f64 / n as f64;
    let questions = live.questions().len();
    let id = live.questions()[0].id;
    let approved = Instant::now();
    live.approve(id, Grant::Once, 0).unwrap();
    let mut times = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while times.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} approved requests arrived", times.len());
        round(&mut net, &mut guest, start);
        while let Ok(t) = arrived.try_recv() {
            times.push(t.duration_since(approved).as_secs_f64() * 1e3);
        }
    }
    println!(
        "| {n} held request{} on {questions} question | {:.1} KiB of heap each while held | approve to the first at the upstream {:.2} ms, to the last {:.2} ms |",
        if n == 1 { "" } else { "s" },
        per_held / 1024.0,
        times[0],
        times[n - 1]
    );
}

/// HTTPS: pass-through against terminated, in one run.
mod tls {
    use super::*;
    use std::sync::Arc;

    use netstack::ca::Authority;
    use netstack::credential::Credentials;
    use netstack::terminate::Termination;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A root and an upstream certificate for NAME.
    fn pki() -> (CertificateDer<'static>, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "bench root");
        let root = params.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(params, root_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![NAME.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        (root.der().clone(), leaf.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// TLS upstream: per request, a 200 echoing the body as it arrives
    /// ("ok" without one); keeps connections alive.
    fn upstream(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> SocketAddr {
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
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = config.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_nodelay(true);
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut r = BufReader::with_capacity(256 * 1024, rustls::StreamOwned::new(conn, tcp));
                    loop {
                        let mut len = 0u64;
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        if len == 0 {
                            let w = r.get_mut();
                            if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .and_then(|_| w.flush())
                                .is_err()
                            {
                                return;
                            }
                            continue;
                        }
                        let _ = r
                            .get_mut()
                            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes());
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut left = len;
                        while left > 0 {
                            let want = left.min(buf.len() as u64) as usize;
                            let n = match r.read(&mut buf[..want]) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if r.get_mut().write_all(&buf[..n]).is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                        let _ = r.get_mut().flush();
                    }
                });
            }
        });
        addr
    }

    struct Setup {
        net: Net,
        guest: Guest,
        start: Instant,
        addr: std::net::Ipv4Addr,
        client: Arc<ClientConfig>,
        port: u16,
    }

    fn setup(terminated: bool, mtu: usize, root: &CertificateDer<'static>, up: SocketAddr) -> Setup {
        let mut resolver = Resolver::default();
        resolver.overrides.insert((HostName::parse(NAME).unwrap(), 443), up);
        let mode = if terminated { "terminate" } else { "passthrough" };
        let policy =
            Policy::from_toml(&format!("version = 1\nhttps = \"{mode}\"\n[[rule]]\nallow = \"{NAME}\"\n")).unwrap();
        let ca = Arc::new(Authority::generate().unwrap());
        let mut upstream_roots = RootCertStore::empty();
        upstream_roots.add(root.clone()).unwrap();
        let termination = Arc::new(Termination::new(ca.clone(), upstream_roots, Credentials::default()).unwrap());
        let mut net = NetStack::new(
            Config { mtu, ..Config::default() },
            policy,
            resolver,
            AuditLog::new(std::io::sink()).shared(),
        )
        .terminating(termination);
        let mut guest = Guest::new(mtu);
        let start = Instant::now();
        let addr = resolve(&mut net, &mut guest, start);
        // The guest trusts the upstream's root when spliced, netstack's CA
        // when terminated.
        let mut roots = RootCertStore::empty();
        roots.add(if terminated { ca.cert_der().clone() } else { root.clone() }).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Setup { net, guest, start, addr, client: Arc::new(client), port: 30000 }
    }

    /// One guest TLS connection.
    struct Session {
        h: smoltcp::iface::SocketHandle,
        tls: ClientConnection,
        wire: Vec<u8>,
        rx: Vec<u8>,
    }

    impl Setup {
        fn open(&mut self, buffer: usize) -> Session {
            let buf = || tcp::SocketBuffer::new(vec![0; buffer]);
            let mut socket = tcp::Socket::new(buf(), buf());
            self.port = if self.port >= 60000 { 30000 } else { self.port + 1 };
            socket.connect(self.guest.iface.context(), (self.addr, 443), self.port).unwrap();
            let h = self.guest.sockets.add(socket);
            let tls = ClientConnection::new(self.client.clone(), ServerName::try_from(NAME).unwrap()).unwrap();
            Session { h, tls, wire: Vec::new(), rx: vec![0; buffer] }
        }

        /// One round: frames both ways, TLS bytes in and out; plaintext
        /// received is appended to `got` (counted only if `count_only`).
        fn round(&mut self, s: &mut Session, got: &mut Vec<u8>, received: &mut u64) {
            round(&mut self.net, &mut self.guest, self.start);
            let sock = self.guest.sockets.get_mut::<tcp::Socket>(s.h);
            while s.tls.wants_write() && s.wire.len() < 1 << 20 {
                s.tls.write_tls(&mut s.wire).unwrap();
            }
            if sock.can_send() && !s.wire.is_empty() {
                let n = sock.send_slice(&s.wire).unwrap_or(0);
                s.wire.drain(..n);
            }
            while sock.can_recv() {
                let n = sock.recv_slice(&mut s.rx).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let mut data = &s.rx[..n];
                while !data.is_empty() {
                    s.tls.read_tls(&mut data).unwrap();
                    s.tls.process_new_packets().unwrap();
                    let mut plain = [0u8; 64 * 1024];
                    while let Ok(k @ 1..) = s.tls.reader().read(&mut plain) {
                        *received += k as u64;
                        if got.len() < 4096 {
                            got.extend_from_slice(&plain[..k.min(4096)]);
                        }
                    }
                }
            }
        }

        fn close(&mut self, s: Session) {
            self.guest.sockets.get_mut::<tcp::Socket>(s.h).close();
            for _ in 0..4 {
                round(&mut self.net, &mut self.guest, self.start);
            }
            self.guest.sockets.remove(s.h);
        }

        /// One short request on `s`; its time in microseconds.
        fn request(&mut self, s: &mut Session) -> f64 {
            let t = Instant::now();
            let req = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
            s.tls.writer().write_all(req.as_bytes()).unwrap();
            let (mut got, mut n) = (Vec::new(), 0u64);
            while !got.ends_with(b"ok") {
                self.round(s, &mut got, &mut n);
                assert!(t.elapsed() < Duration::from_secs(10), "no answer: {}", String::from_utf8_lossy(&got));
            }
            t.elapsed().as_secs_f64() * 1e6
        }
    }

    /// Streams `bytes` up and back on one connection; (Gbit/s each way,
    /// CPU-s per GiB).
    fn throughput(s: &mut Setup, bytes: u64) -> (f64, f64) {
        let mut session = s.open(1 << 20);
        let head = format!("POST /stream HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {bytes}\r\n\r\n");
        session.tls.writer().write_all(head.as_bytes()).unwrap();
        let chunk = vec![b'z'; 64 * 1024];
        let (mut sent, mut received) = (0u64, 0u64);
        let mut got = Vec::new();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let mut last = (Instant::now(), 0u64, 0u64);
        while received < bytes + 38 {
            if sent < bytes && session.wire.len() < 256 * 1024 {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                let k = session.tls.writer().write(&chunk[..n]).unwrap_or(0);
                sent += k as u64;
            }
            s.round(&mut session, &mut got, &mut received);
            if (sent, received) != (last.1, last.2) {
                last = (Instant::now(), sent, received);
            } else if last.0.elapsed() > Duration::from_secs(10) {
                panic!("stalled at {sent} sent, {received} received");
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        s.close(session);
        (bytes as f64 * 8.0 / secs / 1e9, cpu / (2.0 * bytes as f64 / (1u64 << 30) as f64))
    }

    /// p50 of `n` short requests: on one kept-alive connection, and on a
    /// new connection each (handshakes included).
    fn latency(s: &mut Setup, n: usize) -> (f64, f64) {
        let mut session = s.open(64 * 1024);
        s.request(&mut session); // handshake, leaf minted and cached
        let mut kept: Vec<f64> = (0..n).map(|_| s.request(&mut session)).collect();
        s.close(session);
        let mut fresh = Vec::with_capacity(n / 4);
        for _ in 0..n / 4 {
            let mut session = s.open(64 * 1024);
            fresh.push(s.request(&mut session));
            s.close(session);
        }
        (percentile(&mut kept, 0.5), percentile(&mut fresh, 0.5))
    }

    pub fn figures(mib: u64) {
        let (root, cert, key) = pki();
        let up = upstream(cert, key);
        let mut rows = Vec::new();
        for terminated in [false, true] {
            let mut s = setup(terminated, 65520, &root, up);
            let (gbits, cpu) = throughput(&mut s, mib << 20);
            let (kept, fresh) = latency(&mut s, 1000);
            rows.push((terminated, gbits, cpu, kept, fresh));
        }
        println!("| HTTPS, MTU 65520 | {mib} MiB each way | requests on a kept-alive connection, p50 | one connection per request, p50 |");
        println!("|---|---|---|---|");
        for (terminated, gbits, cpu, kept, fresh) in &rows {
            let what = if *terminated { "terminated by netstack" } else { "spliced by SNI (pass-through)" };
            println!("| {what} | {gbits:.2} Gbit/s each way, {cpu:.2} CPU-s per GiB | {kept:.0} us | {fresh:.0} us |");
        }
        let (p, t) = (&rows[0], &rows[1]);
        println!(
            "| terminated vs pass-through | {:.2}x throughput | {:+.0} us added | {:+.0} us added |",
            t.1 / p.1,
            t.3 - p.3,
            t.4 - p.4
        );
    }
}
