//! Host side: netstack as the guest NIC's frame backend (vmm's
//! [`FrameBackend`]). The NIC's worker runs netstack only when something
//! happens: the guest's frames, one of netstack's upstream sockets ready
//! for what netstack wants of it, a connect thread ending (it writes to a
//! wake socket), or netstack's next timer ([`NetStack::poll_at`]). Frames
//! from the guest are untrusted; netstack classifies them.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netstack::limits::NetCounters;
use netstack::stack::NetStack;
use vmm::devices::virtio::net::FrameBackend;
use vmm::devices::virtio::worker::Interest;

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
        let wake = UnixStream::pair().and_then(|(rx, tx)| {
            rx.set_nonblocking(true)?;
            tx.set_nonblocking(true)?;
            Ok((rx, tx))
        });
        let wake = match wake {
            Ok((rx, tx)) => {
                // A full socket is already readable: a failed write loses
                // nothing.
                stack.set_waker(Arc::new(move || {
                    let _ = (&tx).write(&[1]);
                }));
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
    use netstack::audit::AuditLog;
    use netstack::policy::Policy;
    use netstack::stack::{Config, Resolver};

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];

    fn backend() -> NetBackend<Vec<u8>> {
        let stack = NetStack::new(
            Config::default(),
            Policy::preset("locked").unwrap(),
            Resolver::default(),
            AuditLog::new(Vec::new()).shared(),
        );
        NetBackend::new(stack)
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
}
