//! Host side: netstack's figures, printed (no harness): a simulated guest
//! (smoltcp, in process) streams a body through netstack's HTTP path to an
//! upstream on 127.0.0.1 that echoes it back as it arrives, at MTU 1500 and
//! 65520; then short HTTP requests, one connection each, against the same
//! upstream reached directly. Run: `cargo bench -p netstack --bench net`
//! (`-- --mib N` for another size; default 1024 MiB each way).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use netstack::audit::AuditLog;
use netstack::host::HostName;
use netstack::policy::Policy;
use netstack::sim::Guest;
use netstack::stack::{Config, NetStack, Resolver};
use smoltcp::socket::{tcp, udp};

const NAME: &str = "bench.example";

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
    let mut net = netstack(1500, upstream);
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
    println!(
        "| {n} short requests, one connection each | {:.0} requests/s through netstack | p50 {:.0} us through netstack, {:.0} us direct: {:.0} us added | p99 {:.0} us through netstack |",
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
    let upstream = echo_server();
    println!("netstack figures (in-process simulated guest, upstream on 127.0.0.1)\n");
    println!("| path | size | time | throughput | CPU |");
    println!("|---|---|---|---|---|");
    for mtu in [1500, 65520] {
        stream(mtu, mib << 20, upstream);
    }
    println!();
    short_requests(2000, upstream);
}
