//! Host side: netstack's per-connection time limits and per-sandbox
//! counters. A hostile upstream or a hostile guest holds at most its own
//! connection, and only for a named time; every limit frees its slot when
//! it fires, with an audit line saying which one.
//!
//! Time limits of one guest connection (on the stack's clock):
//! - [`RESPONSE_HEAD_MS`]: from the first byte of a response head to its
//!   end (an upstream whose head never ends);
//! - [`UPSTREAM_IDLE_MS`]: a request awaits its response, netstack is
//!   willing to read, and nothing came from upstream for this long (an
//!   upstream that accepts and never answers): a 504 if nothing of the
//!   response reached the guest yet, else a reset;
//! - [`GUEST_STALL_MS`]: bytes wait for the guest and it took none of them
//!   for this long (a reader that reads nothing): reset;
//! - [`GUEST_HANDSHAKE_MS`]: the guest's TCP handshake must complete
//!   within this (a SYN flood that never completes holds no slot longer);
//! - [`crate::stack::IDLE_MS`]: nothing moved either way (kept-alive and
//!   idle).
//!
//! Upstream connect ([`crate::conn::CONNECT_TIMEOUT`]), netstack's TLS
//! handshake upstream ([`crate::terminate::HANDSHAKE_TIMEOUT`], in all)
//! and the wait for a connect thread ([`crate::conn::MAX_CONNECT_WAIT`])
//! run on real time in [`crate::conn`].
//!
//! Memory: the upstream socket is read only while fewer than
//! [`crate::conn::MAX_BUFFERED`] bytes wait for the guest, and bytes move
//! to the guest only as its TCP window opens: what the upstream can push
//! into a guest that reads nothing is bounded by [`stalled_guest_bound`]
//! (plus the kernel's socket buffers, see [`UPSTREAM_RCVBUF`]).
//!
//! Connections: at most [`crate::stack::MAX_CONNS`]; a burst of SYNs gets
//! a listener each (not just the few kept ready), up to that cap; past it
//! the oldest idle connection (nothing in flight, nothing buffered) is
//! reclaimed, else the SYN is refused with a reset, counted, and audited
//! once per [`BURST_MS`].

use std::fmt;

use serde::Serialize;

/// Longest time from the first byte of a response head to its end.
pub const RESPONSE_HEAD_MS: u64 = 30_000;
/// Longest silence of the upstream while a request awaits its response
/// and netstack would read (long enough for slow APIs that answer only
/// when done).
pub const UPSTREAM_IDLE_MS: u64 = 300_000;
/// Longest time bytes wait for a guest that takes none of them.
pub const GUEST_STALL_MS: u64 = 60_000;
/// Longest time from a guest's SYN to the end of its handshake (smoltcp's
/// socket timeout, lifted once the connection is established: smoltcp's
/// would also end idle connections).
pub const GUEST_HANDSHAKE_MS: u64 = 30_000;
/// Refusals for the connection cap are audited once per this long.
pub const BURST_MS: u64 = 1_000;
/// The receive buffer asked of the kernel for each upstream socket
/// (Linux doubles it): caps what sits in the kernel for a stalled guest.
pub const UPSTREAM_RCVBUF: usize = 128 * 1024;

/// Most bytes netstack itself takes from an upstream for a guest that
/// reads nothing, given the guest's receive window: that window, the
/// guest socket's send buffer ([`crate::stack::TCP_BUFFER`]), the bytes
/// waiting for it ([`crate::conn::MAX_BUFFERED`]) and one read.
pub fn stalled_guest_bound(guest_window: usize) -> usize {
    guest_window + crate::stack::TCP_BUFFER + crate::conn::MAX_BUFFERED + crate::conn::READ_CHUNK
}

/// Asks the kernel for an [`UPSTREAM_RCVBUF`] receive buffer on an
/// upstream socket (no autotuning past it). A refusal changes nothing
/// but the bound.
pub(crate) fn bound_receive_buffer(stream: &std::net::TcpStream) {
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(stream, UPSTREAM_RCVBUF);
}

/// Which time limit fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    ResponseHead,
    UpstreamIdle,
    GuestStalled,
}

impl Timeout {
    /// The name in audit lines.
    pub fn name(self) -> &'static str {
        match self {
            Timeout::ResponseHead => "response_head",
            Timeout::UpstreamIdle => "upstream_idle",
            Timeout::GuestStalled => "guest_stalled",
        }
    }

    pub fn limit_ms(self) -> u64 {
        match self {
            Timeout::ResponseHead => RESPONSE_HEAD_MS,
            Timeout::UpstreamIdle => UPSTREAM_IDLE_MS,
            Timeout::GuestStalled => GUEST_STALL_MS,
        }
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.limit_ms() / 1000;
        match self {
            Timeout::ResponseHead => write!(f, "the upstream's response head did not end within {s}s"),
            Timeout::UpstreamIdle => {
                write!(f, "the upstream sent nothing for {s}s while a request awaited its response")
            }
            Timeout::GuestStalled => write!(f, "the guest read none of the bytes waiting for it for {s}s"),
        }
    }
}

/// What a connection is doing, as the time limits need it (from
/// [`crate::conn::Conn::activity`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Requests awaiting their responses.
    pub in_flight: usize,
    /// Part of a response head has come, not its end.
    pub head_partial: bool,
    /// netstack would read the upstream socket now (room for the guest).
    pub reading_upstream: bool,
    /// Bytes read from the upstream so far.
    pub bytes_down: u64,
    /// Bytes waiting for the guest in netstack (not yet in its socket).
    pub to_guest: usize,
}

/// One connection's progress clocks (milliseconds, the stack's clock).
#[derive(Debug, Clone, Default)]
pub(crate) struct Watch {
    head_since: Option<u64>,
    /// Last byte from upstream, or when a request started waiting.
    upstream_at: u64,
    bytes_down: u64,
    in_flight: usize,
    /// Bytes written into the guest socket, and acknowledged by the guest.
    pub(crate) written: u64,
    acked: u64,
    /// Last time the guest took a byte, or had nothing waiting.
    guest_at: u64,
}

impl Watch {
    pub(crate) fn new(now: u64) -> Watch {
        Watch { upstream_at: now, guest_at: now, ..Watch::default() }
    }

    /// Notes this poll's state (`send_queue`: bytes in the guest socket
    /// not yet acknowledged); the limit that fired, if one did.
    pub(crate) fn check(&mut self, now: u64, a: Activity, send_queue: usize) -> Option<Timeout> {
        if a.bytes_down != self.bytes_down || (a.in_flight > 0 && self.in_flight == 0) || !a.reading_upstream {
            self.upstream_at = now;
        }
        self.bytes_down = a.bytes_down;
        self.in_flight = a.in_flight;
        self.head_since = if a.head_partial { Some(self.head_since.unwrap_or(now)) } else { None };
        let acked = self.written.saturating_sub(send_queue as u64);
        if acked != self.acked || a.to_guest + send_queue == 0 {
            self.guest_at = now;
        }
        self.acked = acked;
        if a.to_guest + send_queue > 0 && now.saturating_sub(self.guest_at) > GUEST_STALL_MS {
            return Some(Timeout::GuestStalled);
        }
        if self.head_since.is_some_and(|t| now.saturating_sub(t) > RESPONSE_HEAD_MS) {
            return Some(Timeout::ResponseHead);
        }
        if a.in_flight > 0 && now.saturating_sub(self.upstream_at) > UPSTREAM_IDLE_MS {
            return Some(Timeout::UpstreamIdle);
        }
        None
    }

    /// When the next limit could fire, if one is running.
    pub(crate) fn due(&self, a: Activity, send_queue: usize) -> Option<u64> {
        let guest = (a.to_guest + send_queue > 0).then(|| self.guest_at + GUEST_STALL_MS + 1);
        let head = self.head_since.map(|t| t + RESPONSE_HEAD_MS + 1);
        let up = (a.in_flight > 0 && a.reading_upstream).then(|| self.upstream_at + UPSTREAM_IDLE_MS + 1);
        [guest, head, up].into_iter().flatten().min()
    }
}

/// A sandbox's network counters ([`crate::stack::NetStack::counters`]):
/// for `sbx ls` / `sbx log`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetCounters {
    /// Guest TCP connections open now.
    pub open: usize,
    /// Of those, held: a request awaiting its response, or bytes waiting
    /// for the guest.
    pub held: usize,
    /// Most connections open at once.
    pub peak_open: usize,
    /// Connections accepted so far.
    pub accepted: u64,
    /// SYNs refused because [`crate::stack::MAX_CONNS`] were open.
    pub refused_for_limit: u64,
    /// Idle connections closed to make room for new ones.
    pub reclaimed: u64,
    /// Connections ended by a time limit ([`Timeout`]).
    pub timed_out: u64,
    /// Requests answered 502 because no connect thread was free in time.
    pub connect_busy: u64,
    /// Connect threads running now.
    pub connect_threads: usize,
}

/// Refusals for the connection cap, audited once per burst.
#[derive(Debug, Default)]
pub(crate) struct Burst {
    /// When the current burst's audit line was written, and refusals since.
    logged_at: Option<u64>,
    since: u64,
}

impl Burst {
    /// Counts `n` refusals at `now`; the audit line to write, if this
    /// starts a burst (or ends one that lasted over [`BURST_MS`]).
    pub(crate) fn refused(&mut self, now: u64, n: u64) -> Option<audit::Event> {
        self.since += n;
        match self.logged_at {
            Some(t) if now.saturating_sub(t) < BURST_MS => None,
            _ => {
                self.logged_at = Some(now);
                let count = std::mem::take(&mut self.since);
                Some(audit::Event::Refused(audit::Refused {
                    what: "TCP connection".into(),
                    reason: Some(format!(
                        "{} guest connections are open (the limit); close some, or reuse them (keep-alive)",
                        crate::stack::MAX_CONNS
                    )),
                    limit: Some("connections".into()),
                    count: Some(count),
                    ..Default::default()
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(in_flight: usize, bytes_down: u64, to_guest: usize) -> Activity {
        Activity { in_flight, head_partial: false, reading_upstream: to_guest == 0, bytes_down, to_guest }
    }

    #[test]
    fn each_limit_fires_after_its_time_and_progress_resets_it() {
        // An upstream that never answers.
        let mut w = Watch::new(0);
        assert_eq!(w.check(10, act(1, 0, 0), 0), None);
        assert_eq!(w.due(act(1, 0, 0), 0), Some(10 + UPSTREAM_IDLE_MS + 1));
        assert_eq!(w.check(10 + UPSTREAM_IDLE_MS, act(1, 0, 0), 0), None);
        assert_eq!(w.check(11 + UPSTREAM_IDLE_MS, act(1, 0, 0), 0), Some(Timeout::UpstreamIdle));
        // Bytes from upstream are progress.
        let mut w = Watch::new(0);
        w.check(0, act(1, 0, 0), 0);
        w.check(UPSTREAM_IDLE_MS, act(1, 5, 0), 0);
        assert_eq!(w.check(2 * UPSTREAM_IDLE_MS, act(1, 5, 0), 0), None);
        // A stalled guest is not the upstream's silence; its own limit.
        let mut w = Watch::new(0);
        w.written = 1000;
        for t in [0, 1000, GUEST_STALL_MS] {
            assert_eq!(w.check(t, act(1, 7, MAX), 1000), None);
        }
        assert_eq!(w.check(GUEST_STALL_MS + 1, act(1, 7, MAX), 1000), Some(Timeout::GuestStalled));
        // A guest that takes bytes is not stalled.
        let mut w = Watch::new(0);
        w.written = 1000;
        w.check(0, act(0, 7, MAX), 1000);
        w.check(GUEST_STALL_MS, act(0, 7, MAX), 999);
        assert_eq!(w.check(GUEST_STALL_MS + 2, act(0, 7, MAX), 999), None);
        // A head that never ends, though bytes of it keep coming.
        let mut w = Watch::new(0);
        let head = |b| Activity { head_partial: true, ..act(1, b, 0) };
        w.check(5, head(1), 0);
        assert_eq!(w.check(5 + RESPONSE_HEAD_MS, head(2), 0), None);
        assert_eq!(w.check(6 + RESPONSE_HEAD_MS, head(3), 0), Some(Timeout::ResponseHead));
        // Nothing outstanding, nothing waiting: nothing fires.
        let mut w = Watch::new(0);
        assert_eq!(w.check(u64::MAX / 2, act(0, 0, 0), 0), None);
        assert_eq!(w.due(act(0, 0, 0), 0), None);
    }

    const MAX: usize = crate::conn::MAX_BUFFERED;

    #[test]
    fn cap_refusals_are_audited_once_per_burst() {
        let mut b = Burst::default();
        let first = serde_json::to_value(b.refused(100, 1).expect("the first refusal is logged")).unwrap();
        assert_eq!(first["count"], 1);
        assert!(first["reason"].as_str().unwrap().contains("connections are open"));
        for t in 101..200 {
            assert!(b.refused(t, 10).is_none());
        }
        let next = serde_json::to_value(b.refused(100 + BURST_MS, 1).expect("a later burst")).unwrap();
        assert_eq!(next["count"], 991);
    }
}
