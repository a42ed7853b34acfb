//! Host side: netstack as the guest NIC's frame backend
//! ([`frame_backend::FrameBackend`], the trait vmm's virtio-net device
//! drives; netstack does not depend on vmm, nor vmm on netstack). The
//! NIC's worker runs netstack only when something happens: the guest's
//! frames, one of netstack's upstream sockets ready for what netstack
//! wants of it, a connect thread ending (it writes to a wake socket), or
//! netstack's next timer ([`NetStack::poll_at`]). Frames from the guest
//! are untrusted; netstack classifies them ([`NetStack::push_frame`]).
//!
//! Limits are the stack's: at most [`crate::stack::MAX_QUEUED_FRAMES`]
//! frames wait in each direction (more are dropped, as a full NIC would).
//! This adapter keeps nothing of its own that grows with guest input: the
//! interest list is rebuilt each round from the stack's open connections
//! (at most [`crate::stack::MAX_CONNS`]), and the wake socket is drained
//! into a fixed buffer.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use frame_backend::{FrameBackend, Interest};

use crate::limits::NetCounters;
use crate::stack::NetStack;

/// The worker's key for the wake socket; upstream sockets are their
/// connection's id plus one.
const KEY_WAKE: u64 = 0;
/// Without a wake socket (it could not be made), how often netstack runs
/// while connect threads are out: their results are found that late.
const NO_WAKE_POLL: Duration = Duration::from_millis(10);

/// Milliseconds since the epoch: netstack's clock (its audit lines carry
/// it).
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The wake socket's read end (non-blocking) and the waker that writes to
/// its other end (non-blocking: a full socket is already readable, so a
/// failed write loses nothing, and a connect thread never waits on it).
fn wake_socket() -> std::io::Result<(UnixStream, crate::conn::Waker)> {
    let (rx, tx) = UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    tx.set_nonblocking(true)?;
    let waker: crate::conn::Waker = Arc::new(move || {
        let _ = (&tx).write(&[1]);
    });
    Ok((rx, waker))
}

/// A [`NetStack`] and what the NIC's worker needs to wait on it.
pub struct NetBackend<W: Write> {
    stack: NetStack<W>,
    /// Read end of the wake socket (non-blocking); connect threads write
    /// to the other end when they finish.
    wake: Option<UnixStream>,
    upstreams: Vec<(u64, std::os::fd::RawFd, bool, bool)>,
    /// netstack's connection counters after each round, for `sbx ls`.
    stats: Arc<Mutex<NetCounters>>,
}

impl<W: Write> NetBackend<W> {
    /// `stack` as a frame backend, woken by its connect threads.
    pub fn new(stack: NetStack<W>) -> NetBackend<W> {
        let wake = match wake_socket() {
            Ok((rx, waker)) => {
                stack.set_waker(waker);
                Some(rx)
            }
            Err(e) => {
                eprintln!("sbx: network: no wake socket ({e}); connects are looked for every {NO_WAKE_POLL:?}");
                None
            }
        };
        NetBackend { stack, wake, upstreams: Vec::new(), stats: Arc::default() }
    }

    /// The counters as of the last round (shared; updated by `poll`).
    pub fn stats(&self) -> Arc<Mutex<NetCounters>> {
        self.stats.clone()
    }

    fn drain_wake(&mut self) {
        let Some(rx) = self.wake.as_mut() else { return };
        let mut buf = [0u8; 64];
        loop {
            match rx.read(&mut buf) {
                Ok(n) if n > 0 => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
    }
}

impl<W: Write + Send + 'static> FrameBackend for NetBackend<W> {
    fn send_to_backend(&mut self, frame: Vec<u8>) {
        self.stack.push_frame(frame);
    }

    fn receive(&mut self) -> Option<Vec<u8>> {
        self.stack.pop_frame()
    }

    fn poll(&mut self, _now: Instant) {
        // Drained first: a connect that ends during the poll wakes it again.
        self.drain_wake();
        self.stack.poll(unix_ms());
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.stack.counters();
    }

    fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // At `at` ms exactly (not up to a millisecond before: netstack's
        // clock is whole milliseconds, and a poll before it does nothing).
        let at =
            self.stack.poll_at(wall.as_millis() as u64).map(|at| now + Duration::from_millis(at).saturating_sub(wall));
        let fallback = (self.wake.is_none() && self.stack.connect_threads() > 0).then(|| now + NO_WAKE_POLL);
        at.into_iter().chain(fallback).min()
    }

    fn interests(&mut self, out: &mut Vec<Interest>) {
        if let Some(rx) = &self.wake {
            out.push(Interest { key: KEY_WAKE, fd: rx.as_raw_fd(), read: true, write: false });
        }
        self.upstreams.clear();
        self.stack.upstream_interests(&mut self.upstreams);
        for &(id, fd, read, write) in &self.upstreams {
            out.push(Interest { key: id.saturating_add(1), fd, read, write });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns;
    use crate::policy::Policy;
    use crate::sim::{Guest, GUEST_IP};
    use crate::stack::{Config, Resolver, MAX_QUEUED_FRAMES};
    use audit::{AuditLog, SharedLog};
    use smoltcp::socket::{tcp, udp};
    use std::net::Ipv4Addr;

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn backend() -> NetBackend<Vec<u8>> {
        with_policy(Policy::preset("locked").unwrap()).0
    }

    /// A backend over a stack with `policy`, and the stack's audit log.
    fn with_policy(policy: Policy) -> (NetBackend<Vec<u8>>, SharedLog<Vec<u8>>) {
        let audit = AuditLog::new(Vec::new()).shared();
        let stack = NetStack::new(Config::default(), policy, Resolver::default(), audit.clone());
        (NetBackend::new(stack), audit)
    }

    /// An ARP request from the guest for the gateway.
    fn arp_who_has_gateway() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 2, 2]);
        f
    }

    /// What vmm's net worker does, with a simulated guest on the other
    /// side: only through the trait object the device holds. The guest's
    /// clock advances 1 ms a round; at most 200 rounds, until nothing
    /// moves.
    fn pump(b: &mut dyn FrameBackend, guest: &mut Guest, now: &mut u64) {
        for _ in 0..200 {
            *now += 1;
            guest.poll(*now);
            let mut moved = false;
            while let Some(f) = guest.pop_frame() {
                b.send_to_backend(f);
                moved = true;
            }
            b.poll(Instant::now());
            while let Some(f) = b.receive() {
                guest.push_frame(f);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Asks `name` (type A) from the guest over the backend; the reply.
    fn resolve(b: &mut dyn FrameBackend, guest: &mut Guest, name: &str, now: &mut u64) -> Vec<u8> {
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
        let mut s = udp::Socket::new(buf(), buf());
        s.bind((GUEST_IP, 40000)).unwrap();
        let h = guest.sockets.add(s);
        let q = crate::dns::tests_support::query(7, name, dns::TYPE_A);
        guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (GATEWAY, 53)).unwrap();
        pump(b, guest, now);
        let reply = guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, _)| d.to_vec()).expect("a DNS reply");
        guest.sockets.remove(h);
        reply
    }

    fn policy(toml: &str) -> Policy {
        Policy::from_toml(toml).unwrap()
    }

    #[test]
    fn guest_frames_reach_netstack_and_its_answers_come_back() {
        let mut b = backend();
        b.send_to_backend(arp_who_has_gateway());
        b.poll(Instant::now());
        let reply = b.receive().expect("an ARP reply");
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[28..32], &[10, 0, 2, 2], "the gateway's address");
        assert!(b.receive().is_none());
    }

    #[test]
    fn an_idle_stack_waits_on_its_wake_socket_only_and_has_nothing_due_now() {
        let mut b = backend();
        b.poll(Instant::now());
        let mut interests = Vec::new();
        b.interests(&mut interests);
        assert_eq!(interests.len(), 1, "the wake socket, no upstreams");
        assert_eq!((interests[0].key, interests[0].read, interests[0].write), (KEY_WAKE, true, false));
        let now = Instant::now();
        assert!(b.next_deadline(now).is_none_or(|d| d > now), "nothing to poll for");
    }

    /// The boundary as the device sees it: a guest's DNS queries, as
    /// frames through `dyn FrameBackend`, are judged by netstack's policy
    /// (answered, refused) and audited.
    #[test]
    fn a_guests_dns_queries_through_the_trait_are_judged_answered_and_audited() {
        let (b, audit) = with_policy(policy("version = 1\n[[rule]]\nallow = \"*.example.com\"\n"));
        let mut b: Box<dyn FrameBackend> = Box::new(b);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let ok = resolve(b.as_mut(), &mut guest, "api.example.com", &mut now);
        assert_eq!(ok[3] & 0xf, 0, "NOERROR");
        let addr = Ipv4Addr::new(ok[ok.len() - 4], ok[ok.len() - 3], ok[ok.len() - 2], ok[ok.len() - 1]);
        assert!(crate::dns::NameTable::is_synthetic(addr), "a synthetic address: {addr}");
        let no = resolve(b.as_mut(), &mut guest, "evil.org", &mut now);
        assert_eq!(no[3] & 0xf, dns::RCODE_REFUSED);
        let log = String::from_utf8(audit.lock().unwrap().get_ref().clone()).unwrap();
        assert!(
            log.contains("\"name\":\"api.example.com\"") && log.contains(&format!("\"answer\":\"{addr}\"")),
            "{log}"
        );
        assert!(log.contains("\"name\":\"evil.org\"") && log.contains("\"decision\":\"deny\""), "{log}");
    }

    /// The counters `sbx ls` shows are the stack's after each poll: a
    /// guest connection accepted through the backend is counted there.
    #[test]
    fn each_poll_publishes_the_stacks_counters() {
        let (b, _) = with_policy(policy("version = 1\n[[rule]]\nallow = \"*.example.com\"\n"));
        let stats = b.stats();
        let mut b: Box<dyn FrameBackend> = Box::new(b);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let ok = resolve(b.as_mut(), &mut guest, "api.example.com", &mut now);
        let addr = Ipv4Addr::new(ok[ok.len() - 4], ok[ok.len() - 3], ok[ok.len() - 2], ok[ok.len() - 1]);
        assert_eq!(stats.lock().unwrap().accepted, 0);
        let buf = || tcp::SocketBuffer::new(vec![0; 4096]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 80), 49152).unwrap();
        let h = guest.sockets.add(socket);
        pump(b.as_mut(), &mut guest, &mut now);
        assert_eq!(guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Established);
        let c = *stats.lock().unwrap();
        assert_eq!((c.accepted, c.open), (1, 1), "{c:?}");
    }

    /// Limits hold at the boundary: a guest that sends more frames than
    /// netstack queues before the worker polls gets at most
    /// MAX_QUEUED_FRAMES answers (the rest dropped, as a full NIC would),
    /// and the backend goes on answering afterwards.
    #[test]
    fn a_flood_of_frames_is_bounded_by_the_stacks_queues() {
        let mut b: Box<dyn FrameBackend> = Box::new(backend());
        for _ in 0..MAX_QUEUED_FRAMES + 500 {
            b.send_to_backend(arp_who_has_gateway());
        }
        b.poll(Instant::now());
        let answers = std::iter::from_fn(|| b.receive()).count();
        assert!(answers > 0 && answers <= MAX_QUEUED_FRAMES, "{answers} answers");
        b.send_to_backend(arp_who_has_gateway());
        b.poll(Instant::now());
        assert_eq!(std::iter::from_fn(|| b.receive()).count(), 1, "one request, one answer");
    }

    /// The waker connect threads call never blocks (even with the socket
    /// full), makes the wake socket readable, and the next poll drains it
    /// (so the worker does not come straight back).
    #[test]
    fn the_waker_never_blocks_and_a_poll_drains_the_wake_socket() {
        let (rx, waker) = wake_socket().unwrap();
        for _ in 0..100_000 {
            waker();
        }
        let stack = NetStack::new(
            Config::default(),
            Policy::preset("locked").unwrap(),
            Resolver::default(),
            AuditLog::new(Vec::new()).shared(),
        );
        let mut b = NetBackend { stack, wake: Some(rx), upstreams: Vec::new(), stats: Arc::default() };
        let mut interests = Vec::new();
        b.interests(&mut interests);
        assert_eq!(interests[0].fd, b.wake.as_ref().unwrap().as_raw_fd());
        b.poll(Instant::now());
        let mut byte = [0u8; 1];
        let left = b.wake.as_mut().unwrap().read(&mut byte);
        assert_eq!(left.map_err(|e| e.kind()), Err(ErrorKind::WouldBlock), "drained");
        // Woken again after the poll: readable again.
        waker();
        assert_eq!(b.wake.as_mut().unwrap().read(&mut byte).unwrap(), 1);
    }
}
