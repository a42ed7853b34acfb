//! Host side, tests only: a hostile upstream and a flooding guest against
//! the stack, on the simulated guest ([`crate::sim`]) and loopback
//! upstreams started here. Each case must hold at most its own connection:
//! an ordinary request to the same host succeeds meanwhile, and every
//! limit's slot comes back when its time-out fires.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};

use super::*;
use crate::sim::{pump, Guest, GUEST_IP};
use audit::AuditLog;

type Net = NetStack<Vec<u8>>;

const HOST: &str = "api.example.com";
const POLICY: &str = "version = 1\n[[rule]]\nallow = \"*.example.com\"\n";

/// A misbehaving HTTP upstream, by path: `/big` answers 2 GiB as fast as
/// the socket takes it, `/nohead` a head that never ends (then silence),
/// `/hang` reads the request and never answers; anything else gets a
/// short "ok PATH". Counts what it wrote for `/big` and what it served.
struct Hostile {
    addr: SocketAddr,
    big_written: Arc<AtomicU64>,
    served: Arc<AtomicUsize>,
    hung: Arc<AtomicUsize>,
    /// The `/big` socket's send buffer, as the kernel reports it.
    send_buffer: Arc<AtomicU64>,
}

fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).ok()
}

/// Blocks until the peer goes away.
fn hold(s: &mut TcpStream) {
    let mut b = [0u8; 1024];
    while let Ok(1..) = s.read(&mut b) {}
}

fn hostile_upstream() -> Hostile {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (big_written, served, hung) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let send_buffer = Arc::new(AtomicU64::new(0));
    let (b, s, h, sb) = (big_written.clone(), served.clone(), hung.clone(), send_buffer.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (big, served, hung, sndbuf) = (b.clone(), s.clone(), h.clone(), sb.clone());
            std::thread::spawn(move || {
                let mut stream = stream;
                while let Some(head) = read_head(&mut stream) {
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    match path.as_str() {
                        "/big" => {
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n");
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut left: u64 = 2 << 30;
                            while left > 0 {
                                let size = rustix::net::sockopt::socket_send_buffer_size(&stream).unwrap_or(0);
                                sndbuf.fetch_max(size as u64, Ordering::SeqCst);
                                let n = chunk.len().min(left as usize);
                                match stream.write(&chunk[..n]) {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => {
                                        big.fetch_add(k as u64, Ordering::SeqCst);
                                        left -= k as u64;
                                    }
                                }
                            }
                        }
                        "/nohead" => {
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nX-Never-Ends: ");
                            hold(&mut stream);
                            return;
                        }
                        "/hang" => {
                            hung.fetch_add(1, Ordering::SeqCst);
                            hold(&mut stream);
                            return;
                        }
                        _ => {
                            let body = format!("ok {path}");
                            let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            if stream.write_all(reply.as_bytes()).is_err() {
                                return;
                            }
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    Hostile { addr, big_written, served, hung, send_buffer }
}

fn net_to(addr: SocketAddr) -> Net {
    let mut resolver = Resolver::default();
    resolver.overrides.insert((HostName::parse(HOST).unwrap(), 80), addr);
    NetStack::new(Config::default(), Policy::from_toml(POLICY).unwrap(), resolver, AuditLog::new(Vec::new()).shared())
}

fn audit(net: &Net) -> String {
    String::from_utf8(net.audit.lock().unwrap().get_ref().clone()).unwrap()
}

/// The synthetic address the guest's DNS query for [`HOST`] gets.
fn resolve(net: &mut Net, guest: &mut Guest, now: &mut u64) -> Ipv4Addr {
    let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
    let mut s = udp::Socket::new(buf(), buf());
    s.bind((GUEST_IP, 40999)).unwrap();
    let h = guest.sockets.add(s);
    let q = crate::dns::tests_support::query(7, HOST, dns::TYPE_A);
    guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (Ipv4Addr::new(10, 0, 2, 2), 53)).unwrap();
    pump(net, guest, now);
    let reply = guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, _)| d.to_vec()).expect("a DNS reply");
    guest.sockets.remove(h);
    let n = reply.len();
    Ipv4Addr::new(reply[n - 4], reply[n - 3], reply[n - 2], reply[n - 1])
}

/// A guest connection to port 80 of `addr` with `rx` bytes of receive
/// buffer, `request` queued to go once it is up.
struct Client {
    h: SocketHandle,
    request: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    /// Reads what comes (else the guest's reader reads nothing).
    reads: bool,
}

static NEXT_PORT: AtomicUsize = AtomicUsize::new(50000);

fn client(guest: &mut Guest, addr: Ipv4Addr, path: &str, rx: usize, reads: bool) -> Client {
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; 4096]));
    let port = NEXT_PORT.fetch_add(1, Ordering::SeqCst) as u16;
    socket.connect(guest.iface.context(), (addr, 80), port).unwrap();
    let h = guest.sockets.add(socket);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes();
    Client { h, request, sent: 0, got: Vec::new(), reads }
}

impl Client {
    fn step(&mut self, guest: &mut Guest) {
        let s = guest.sockets.get_mut::<tcp::Socket>(self.h);
        if s.can_send() && self.sent < self.request.len() {
            self.sent += s.send_slice(&self.request[self.sent..]).unwrap_or(0);
        }
        let mut buf = [0u8; 16 * 1024];
        while self.reads && s.can_recv() {
            match s.recv_slice(&mut buf) {
                Ok(n @ 1..) => self.got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        // The other side closed: so does this one, as a program would.
        if self.reads && s.state() == tcp::State::CloseWait {
            s.close();
        }
    }

    fn state(&self, guest: &mut Guest) -> tcp::State {
        guest.sockets.get_mut::<tcp::Socket>(self.h).state()
    }
}

/// `rounds` rounds of frames both ways, each client stepped, the clock
/// moving `ms_per_round` (plus a millisecond a pump) and a millisecond of
/// real time for the upstreams' threads.
fn run(net: &mut Net, guest: &mut Guest, now: &mut u64, clients: &mut [&mut Client], rounds: usize, ms_per_round: u64) {
    for _ in 0..rounds {
        *now += ms_per_round;
        pump(net, guest, now);
        for c in clients.iter_mut() {
            c.step(guest);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The three hostile cases, then an ordinary request to the same host:
/// answered within a few simulated seconds, while the others still hang.
#[test]
fn a_hostile_upstream_never_starves_the_next_ordinary_request() {
    let up = hostile_upstream();
    let mut net = net_to(up.addr);
    let (mut guest, mut now) = (Guest::new(1500), 0);
    let addr = resolve(&mut net, &mut guest, &mut now);

    // 2 GiB into a guest reader that reads nothing.
    let mut big = client(&mut guest, addr, "/big", 64 * 1024, false);
    let mut last = u64::MAX;
    let mut steady = 0;
    while steady < 200 {
        run(&mut net, &mut guest, &mut now, &mut [&mut big], 1, 0);
        let w = up.big_written.load(Ordering::SeqCst);
        steady = if w == last { steady + 1 } else { 0 };
        last = w;
    }
    // A head that never ends, read by a guest that waits.
    let mut nohead = client(&mut guest, addr, "/nohead", 64 * 1024, true);
    // 40 requests the upstream accepts and never answers.
    let mut hung: Vec<Client> = (0..40).map(|_| client(&mut guest, addr, "/hang", 4096, true)).collect();
    let mut all: Vec<&mut Client> = vec![&mut big, &mut nohead];
    all.extend(hung.iter_mut());
    run(&mut net, &mut guest, &mut now, &mut all, 300, 0);
    let states: Vec<String> = all[2..].iter().map(|c| c.state(&mut guest).to_string()).collect();
    assert_eq!(
        up.hung.load(Ordering::SeqCst),
        40,
        "every hanging request reached the upstream: {states:?} {}",
        net.connections()
    );

    // The next ordinary request.
    let mut plain = client(&mut guest, addr, "/plain", 64 * 1024, true);
    let start = now;
    let mut all: Vec<&mut Client> = vec![&mut big, &mut nohead, &mut plain];
    all.extend(hung.iter_mut());
    let mut rounds = 0;
    while !String::from_utf8_lossy(&all[2].got).contains("ok /plain") {
        assert!(rounds < 3000, "no answer after {} simulated ms; audit:\n{}", now - start, audit(&net));
        run(&mut net, &mut guest, &mut now, &mut all, 1, 0);
        rounds += 1;
    }
    assert!(now - start < 5_000, "answered within seconds: {} ms", now - start);
    assert_eq!(up.served.load(Ordering::SeqCst), 1);
    run(&mut net, &mut guest, &mut now, &mut all, 20, 0);
    let held = net.counters();
    assert_eq!((held.open, held.held, held.timed_out), (43, 42, 0), "{held:?}");

    // Backpressure: what netstack took from the upstream for the guest
    // that reads nothing, and what the upstream got to write in all.
    let taken = net.conns.iter().map(|c| c.1.bytes_down).max().unwrap() as usize;
    let bound = crate::limits::stalled_guest_bound(64 * 1024);
    assert!(taken <= bound, "netstack took {taken} bytes for a stalled guest, bound {bound}");
    let written = up.big_written.load(Ordering::SeqCst) as usize;
    let kernel = 2 * crate::limits::UPSTREAM_RCVBUF + up.send_buffer.load(Ordering::SeqCst) as usize;
    assert!(written <= bound + kernel + 64 * 1024, "the upstream wrote {written}; bound {bound} + kernel {kernel}");

    // The limits fire and free every hostile connection: the stalled
    // reader and the endless head are reset, the unanswered requests get
    // a 504 naming the limit; the ordinary connection stays.
    let mut all: Vec<&mut Client> = vec![&mut big, &mut nohead, &mut plain];
    all.extend(hung.iter_mut());
    run(&mut net, &mut guest, &mut now, &mut all, 400, 1000);
    let c = net.counters();
    assert_eq!((c.open, c.held, c.timed_out), (1, 0, 42), "{c:?}");
    // (The stalled reader's own socket may not take netstack's reset,
    // whose sequence number lies past its closed window; its next segment
    // gets another. Either way netstack holds nothing for it now.)
    assert_eq!(nohead.state(&mut guest), tcp::State::Closed, "the endless head was reset");
    for h in &hung {
        let text = String::from_utf8_lossy(&h.got);
        assert!(text.starts_with("HTTP/1.1 504") && text.contains("sent nothing for 300s"), "{text}");
    }
    let log = audit(&net);
    for limit in ["guest_stalled", "response_head", "upstream_idle"] {
        assert!(log.contains(&format!("\"limit\":\"{limit}\"")), "{limit} not audited");
    }
    assert_eq!(log.matches("\"limit\":\"upstream_idle\"").count(), 40);
    assert!(audit::verify(log.as_bytes()).is_ok());
}

/// A guest opening far more connections than the cap: the stack holds at
/// most [`MAX_CONNS`], refuses the rest with one audit line per burst, and
/// reclaims the oldest idle connections for later ones, which are served.
#[test]
fn a_connection_flood_is_capped_and_idle_connections_are_reclaimed() {
    let up = hostile_upstream();
    let mut net = net_to(up.addr);
    let (mut guest, mut now) = (Guest::new(1500), 0);
    let addr = resolve(&mut net, &mut guest, &mut now);
    let flood = MAX_CONNS + 50;
    let mut idle: Vec<Client> = (0..flood).map(|_| client(&mut guest, addr, "/", 1024, true)).collect();
    for c in &mut idle {
        c.request.clear();
    }
    let mut all: Vec<&mut Client> = idle.iter_mut().collect();
    run(&mut net, &mut guest, &mut now, &mut all, 20, 1);
    let c = net.counters();
    assert!(c.open <= MAX_CONNS && c.open >= MAX_CONNS - 2 * LISTENERS_PER_PORT, "{c:?}");
    assert_eq!(c.refused_for_limit as usize, flood - c.open, "{c:?}");
    let established = idle.iter().filter(|c| c.state(&mut guest) == tcp::State::Established).count();
    assert_eq!(established, c.open, "the rest were refused with a reset");
    let log = audit(&net);
    assert_eq!(log.matches("\"limit\":\"connections\"").count(), 1, "one audit line for the burst");

    // Later, a few more: the oldest idle ones make room, and they are served.
    now += 10 * BURST_MS_FOR_TEST;
    let mut fresh: Vec<Client> = (0..5).map(|i| client(&mut guest, addr, &format!("/fresh{i}"), 4096, true)).collect();
    let mut all: Vec<&mut Client> = fresh.iter_mut().collect();
    for _ in 0..3000 {
        if all.iter().all(|c| String::from_utf8_lossy(&c.got).contains("ok /fresh")) {
            break;
        }
        run(&mut net, &mut guest, &mut now, &mut all, 1, 0);
    }
    for c in &fresh {
        assert!(String::from_utf8_lossy(&c.got).contains("ok /fresh"), "{}", String::from_utf8_lossy(&c.got));
    }
    let c2 = net.counters();
    assert!(c2.reclaimed >= 5 && c2.open <= MAX_CONNS, "{c2:?}");
    assert_eq!(c2.refused_for_limit, c.refused_for_limit, "nothing refused while idle ones could go");
    assert!(audit(&net).contains("\"event\":\"reclaimed\""));
}

const BURST_MS_FOR_TEST: u64 = crate::limits::BURST_MS;
