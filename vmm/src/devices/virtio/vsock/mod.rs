//! Host side: virtio-vsock (virtio 1.x, section 5.10), the control channel
//! to guest-init — not the guest's network. The VMM listens on a Unix
//! socket (the sandbox's `control.sock`); each client connection becomes a
//! vsock stream from the host (CID 2) to guest-init's port, bytes relayed
//! both ways with virtio-vsock's credit flow control. Connections only go
//! host to guest: the guest cannot open one to the host (it gets a reset).
//!
//! Everything from the guest is untrusted: packets are parsed into a
//! checked header (its declared layout is in `wire.rs`), the addresses must be the guest's CID and a connection
//! the host opened, the payload must fit the credit we advertised (or the
//! connection is reset), lengths are bounded. At most [`MAX_CONNS`]
//! connections; each buffers at most [`BUF_ALLOC`] bytes from the guest.
//!
//! The device's worker ([`super::worker`]) wakes only for a queue
//! notification, a new client, or a client socket that has bytes the
//! guest has credit and buffers for, or room for bytes waiting for it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::QueueT;

use super::chain::Chain;
use super::device::{read_only_config, Spec, WorkerDevice};
use super::worker::{Active, Interest, QueueHandler, Wake};
use super::VIRTIO_F_VERSION_1;
use crate::threads::{Reach, ThreadKind};

mod wire;

use wire::{
    config_bytes, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
pub use wire::{Hdr, HDR_LEN};

pub const DEVICE_TYPE_VSOCK: u32 = VIRTIO_ID_VSOCK;
pub const HOST_CID: u64 = 2;
/// What the guest's CID is; any value above 2 would do.
pub const GUEST_CID: u64 = 3;
/// Where guest-init listens.
pub const CONTROL_PORT: u32 = 1024;
/// Bytes of the guest's data we hold for one connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
pub const MAX_CONNS: usize = 64;
/// Largest payload read from a guest packet (the spec's 64 KiB).
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;
/// rx, tx, event (the event queue is never used: no transport resets
/// are ever sent).
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE];
const RX: usize = 0;
const TX: usize = 1;
const FIRST_HOST_PORT: u32 = 0x4000_0000;
/// Control packets waiting for receive buffers before connections are
/// reset instead.
const MAX_CONTROL_QUEUE: usize = 1024;

/// The control channel's device.
pub struct Vsock {
    pub device: WorkerDevice,
}

impl Vsock {
    /// A vsock device whose host end is `listener` (non-blocking).
    pub fn new(listener: UnixListener) -> std::io::Result<Vsock> {
        listener.set_nonblocking(true)?;
        let spec = Spec {
            name: "vsock",
            device_type: DEVICE_TYPE_VSOCK,
            queue_sizes: QUEUE_SIZES,
            // rx and tx are needed; the event queue is never used.
            queues_needed: 2,
            features: VIRTIO_F_VERSION_1,
            kind: ThreadKind::Vsock,
            thread: "virtio-vsock",
        };
        let config = config_bytes(GUEST_CID);
        // It only accepts on a socket it already holds: no host path.
        let reach = Reach::Only(Vec::new());
        let device = WorkerDevice::spawn(spec, config, read_only_config(), reach, VsockWorker::new(listener))?;
        Ok(Vsock { device })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    guest_port: u32,
    state: State,
    /// The guest's receive buffer and how much of what we sent it has
    /// consumed: our send credit.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes of the guest's that we passed on to the client, and the
    /// count we last told the guest.
    fwd_cnt: u32,
    fwd_reported: u32,
    /// The guest's bytes waiting for the client to read them.
    out: Vec<u8>,
    /// The client will send no more.
    client_eof: bool,
    /// The guest will send no more.
    guest_eof: bool,
    /// The guest reset the connection: drop it without a reset of ours.
    guest_reset: bool,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The worker's key for the listening socket; a connection's is its host
/// port plus one (host ports are not reused while their connection lives).
const KEY_LISTENER: u64 = 0;

struct VsockWorker {
    listener: UnixListener,
    active: bool,
    conns: BTreeMap<u32, Conn>,
    next_port: u32,
    /// Control packets (no payload) for the guest.
    control: VecDeque<Hdr>,
    /// The guest had no receive buffer last time: do not read clients
    /// until it kicks.
    rx_full: bool,
    buf: Vec<u8>,
}

/// The worker's part alone, to drive by hand (the fuzz targets, `vmm/fuzz`).
#[doc(hidden)]
pub fn queue_handler(listener: UnixListener) -> std::io::Result<impl QueueHandler> {
    listener.set_nonblocking(true)?;
    Ok(VsockWorker::new(listener))
}

impl VsockWorker {
    fn new(listener: UnixListener) -> VsockWorker {
        VsockWorker {
            listener,
            active: false,
            conns: BTreeMap::new(),
            next_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            rx_full: false,
            buf: vec![0u8; MAX_PKT_PAYLOAD],
        }
    }

    /// One round of work, in an order that makes progress each time.
    /// Returns whether the guest wants an interrupt.
    fn step(&mut self, a: &mut Active) -> bool {
        self.accept_clients();
        let mut signal = self.process_tx(a);
        self.flush_to_clients();
        self.reap();
        signal |= self.fill_rx(a);
        signal
    }

    fn hdr(&self, host_port: u32, guest_port: u32, op: u16) -> Hdr {
        let fwd_cnt = self.conns.get(&host_port).map(|c| c.fwd_cnt).unwrap_or(0);
        host_hdr(host_port, guest_port, op, fwd_cnt)
    }

    fn queue_control(&mut self, h: Hdr) {
        if self.control.len() < MAX_CONTROL_QUEUE {
            self.control.push_back(h);
        }
    }

    fn accept_clients(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                continue; // dropped: the client sees the connection close
            }
            let port = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_HOST_PORT);
            self.conns.insert(
                port,
                Conn {
                    stream,
                    guest_port: CONTROL_PORT,
                    state: State::Connecting,
                    peer_buf_alloc: 0,
                    peer_fwd_cnt: 0,
                    tx_cnt: 0,
                    fwd_cnt: 0,
                    fwd_reported: 0,
                    out: Vec::new(),
                    client_eof: false,
                    guest_eof: false,
                    guest_reset: false,
                },
            );
            let h = self.hdr(port, CONTROL_PORT, OP_REQUEST);
            self.queue_control(h);
        }
    }

    /// Packets from the guest. Returns whether the guest wants an interrupt.
    fn process_tx(&mut self, a: &mut Active) -> bool {
        let mut packets = Vec::new();
        let mut used = false;
        if let Some(q) = a.queues.get_mut(TX) {
            while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
                let chain = Chain::walk(chain, usize::from(QUEUE_SIZE));
                let head = chain.head;
                if let Ok(bytes) = chain.readable_only().and_then(|_| chain.read_all(&a.mem, HDR_LEN + MAX_PKT_PAYLOAD))
                {
                    packets.push(bytes);
                }
                if q.add_used(&a.mem, head, 0).is_err() {
                    break;
                }
                used = true;
            }
        }
        let signal = used && a.queues.get_mut(TX).is_some_and(|q| q.needs_notification(&a.mem).unwrap_or(true));
        for p in packets {
            self.handle_packet(&p);
        }
        signal
    }

    fn handle_packet(&mut self, bytes: &[u8]) {
        let Some(h) = Hdr::parse(bytes) else { return };
        let payload = &bytes[HDR_LEN..];
        if h.src_cid != GUEST_CID || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM || h.len as usize != payload.len() {
            return;
        }
        let key = h.dst_port;
        let known = self.conns.get(&key).is_some_and(|c| c.guest_port == h.src_port);
        if !known {
            // Nobody listens on the host; never answer a reset with one.
            if h.op != OP_RST {
                let mut r = self.hdr(h.dst_port, h.src_port, OP_RST);
                r.fwd_cnt = 0;
                self.queue_control(r);
            }
            return;
        }
        let mut reply = None;
        let mut reset = false;
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match (h.op, &c.state) {
                (OP_RESPONSE, State::Connecting) => c.state = State::Established,
                (OP_RW, State::Established) => {
                    // The guest must stay within the credit we gave.
                    if c.out.len() + payload.len() > BUF_ALLOC as usize {
                        reset = true;
                    } else {
                        c.out.extend_from_slice(payload);
                    }
                }
                (OP_CREDIT_UPDATE, _) => {}
                (OP_CREDIT_REQUEST, State::Established) => reply = Some(OP_CREDIT_UPDATE),
                (OP_SHUTDOWN, State::Established) => {
                    if h.flags & SHUTDOWN_SEND != 0 {
                        c.guest_eof = true;
                    }
                    if h.flags & SHUTDOWN_RCV != 0 {
                        c.client_eof = true;
                    }
                }
                (OP_RST, _) => {
                    c.guest_eof = true;
                    c.client_eof = true;
                    c.guest_reset = true;
                }
                _ => reset = true,
            }
        }
        if reset {
            self.reset_conn(key);
        } else if let Some(op) = reply {
            let h = self.hdr(key, h.src_port, op);
            self.queue_control(h);
        }
    }

    fn reset_conn(&mut self, key: u32) {
        if let Some(c) = self.conns.remove(&key) {
            let r = self.hdr(key, c.guest_port, OP_RST);
            self.queue_control(r);
        }
    }

    /// Writes the guest's bytes to the clients; tells the guest about the
    /// room made once a quarter of its credit is back.
    fn flush_to_clients(&mut self) {
        let mut updates = Vec::new();
        let mut dead = Vec::new();
        for (port, c) in self.conns.iter_mut() {
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(0) => break,
                    Ok(n) => {
                        c.out.drain(..n);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        dead.push(*port);
                        break;
                    }
                }
            }
            if c.out.is_empty() && c.guest_eof {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            if c.fwd_cnt.wrapping_sub(c.fwd_reported) >= BUF_ALLOC / 4 {
                c.fwd_reported = c.fwd_cnt;
                updates.push((*port, c.guest_port));
            }
        }
        for (port, guest_port) in updates {
            let h = self.hdr(port, guest_port, OP_CREDIT_UPDATE);
            self.queue_control(h);
        }
        for port in dead {
            self.reset_conn(port);
        }
    }

    /// Fills the guest's receive buffers: control packets first, then the
    /// clients' bytes within each connection's credit. Returns whether the
    /// guest wants an interrupt.
    fn fill_rx(&mut self, a: &mut Active) -> bool {
        let mut used = false;
        while let Some(q) = a.queues.get_mut(RX) {
            let before = q.next_avail();
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                self.rx_full = !self.control.is_empty() || self.conns.values().any(|c| c.state == State::Established);
                break;
            };
            let chain = Chain::walk(chain, usize::from(QUEUE_SIZE));
            let head = chain.head;
            let capacity = chain.writable_only().map_or(0, |w| w.iter().map(|b| u64::from(b.len)).sum::<u64>());
            let room = usize::try_from(capacity).unwrap_or(usize::MAX).saturating_sub(HDR_LEN).min(MAX_PKT_PAYLOAD);
            let Some((hdr, len)) = self.next_packet(room) else {
                // Nothing to send: give the buffer back.
                if let Some(q) = a.queues.get_mut(RX) {
                    q.set_next_avail(before);
                }
                break;
            };
            // A chain that cannot hold the packet: returned empty.
            let written = chain.write_all(&a.mem, &[&hdr.bytes(), &self.buf[..len]]).unwrap_or(0);
            let Some(q) = a.queues.get_mut(RX) else { break };
            if q.add_used(&a.mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used && a.queues.get_mut(RX).is_some_and(|q| q.needs_notification(&a.mem).unwrap_or(true))
    }

    /// The next packet for the guest, its payload in `self.buf[..len]`.
    fn next_packet(&mut self, room: usize) -> Option<(Hdr, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        if room == 0 {
            return None;
        }
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for port in ports {
            let Some(c) = self.conns.get_mut(&port) else { continue };
            if c.state != State::Established || c.client_eof {
                continue;
            }
            let max = room.min(c.credit() as usize);
            if max == 0 {
                continue;
            }
            match c.stream.read(&mut self.buf[..max]) {
                Ok(0) => {
                    c.client_eof = true;
                    let mut h = host_hdr(port, c.guest_port, OP_SHUTDOWN, c.fwd_cnt);
                    h.flags = SHUTDOWN_SEND;
                    return Some((h, 0));
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    let mut h = host_hdr(port, c.guest_port, OP_RW, c.fwd_cnt);
                    h.len = n as u32;
                    return Some((h, n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    c.client_eof = true;
                    let h = host_hdr(port, c.guest_port, OP_RST, c.fwd_cnt);
                    c.guest_eof = true;
                    // Our reset is the last word: drop it silently.
                    c.guest_reset = true;
                    return Some((h, 0));
                }
            }
        }
        None
    }

    /// Drops connections that are over on both sides and fully flushed
    /// (or reset by the guest), telling the guest unless it reset them.
    fn reap(&mut self) {
        let over: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.guest_reset || (c.client_eof && c.guest_eof && c.out.is_empty()))
            .map(|(p, _)| *p)
            .collect();
        for port in over {
            if let Some(c) = self.conns.remove(&port) {
                if !c.guest_reset {
                    let r = self.hdr(port, c.guest_port, OP_RST);
                    self.queue_control(r);
                }
            }
        }
    }
}

impl QueueHandler for VsockWorker {
    fn activated(&mut self, _: &mut Active) {
        self.active = true;
        self.rx_full = false;
    }

    fn reset(&mut self) {
        self.active = false;
        self.conns.clear();
        self.control.clear();
    }

    /// New clients (they wait in the backlog until the driver is up), a
    /// client's bytes when they could be sent, room for the guest's bytes.
    fn interests(&mut self, out: &mut Vec<Interest>) {
        if !self.active {
            return;
        }
        out.push(Interest { key: KEY_LISTENER, fd: self.listener.as_raw_fd(), read: true, write: false });
        for (port, c) in &self.conns {
            out.push(Interest {
                key: u64::from(*port) + 1,
                fd: c.stream.as_raw_fd(),
                read: c.state == State::Established && !c.client_eof && c.credit() > 0 && !self.rx_full,
                write: !c.out.is_empty(),
            });
        }
    }

    fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool {
        if wake.queues {
            // The guest may have posted receive buffers.
            self.rx_full = false;
        }
        match active {
            Some(a) => self.step(a),
            None => false,
        }
    }

    /// The VM is over: pass on what the guest sent last.
    fn stop(&mut self, active: Option<&mut Active>) -> bool {
        match active {
            Some(a) => self.step(a),
            None => false,
        }
    }
}

/// A packet header from the host end of a connection.
fn host_hdr(host_port: u32, guest_port: u32, op: u16, fwd_cnt: u32) -> Hdr {
    Hdr {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: host_port,
        dst_port: guest_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    /// The guest's side of the device, driven by hand: receive buffers it
    /// posts, packets it sends.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        rx_seen: u16,
        tx_posted: u16,
    }

    const RX_BUFS: u64 = 0x80_000;
    const TX_BUFS: u64 = 0xc0_000;

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Guest<'a> {
            let rxq = MockSplitQueue::create(mem, GuestAddress(0x10_000), 16);
            let txq = MockSplitQueue::create(mem, GuestAddress(0x20_000), 16);
            // 16 receive buffers of 4 KiB, as Linux posts them.
            let descs: Vec<RawDescriptor> = (0..16)
                .map(|i| {
                    RawDescriptor::from(SplitDescriptor::new(RX_BUFS + i * 4096, 4096, VRING_DESC_F_WRITE as u16, 0))
                })
                .collect();
            rxq.add_desc_chains(&descs, 0).unwrap();
            Guest { mem, rxq, txq, rx_seen: 0, tx_posted: 0 }
        }

        /// Packets the device put in the receive queue since last time.
        fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
            let used: u16 = self.mem.read_obj(self.rxq.used_addr().unchecked_add(2)).unwrap();
            let mut out = Vec::new();
            while self.rx_seen != used {
                let slot = u64::from(self.rx_seen % 16);
                let elem = self.rxq.used_addr().unchecked_add(4 + slot * 8);
                let id: u32 = self.mem.read_obj(elem).unwrap();
                let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(RX_BUFS + u64::from(id) * 4096)).unwrap();
                let h = Hdr::parse(&bytes).unwrap();
                out.push((h, bytes[HDR_LEN..].to_vec()));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }

        fn send(&mut self, h: Hdr, payload: &[u8]) {
            let addr = TX_BUFS + u64::from(self.tx_posted) * 4096;
            let mut bytes = h.bytes().to_vec();
            bytes.extend_from_slice(payload);
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            let d = RawDescriptor::from(SplitDescriptor::new(addr, bytes.len() as u32, 0, 0));
            self.txq.add_desc_chains(&[d], self.tx_posted).unwrap();
            self.tx_posted += 1;
        }
    }

    fn from_guest(to_port: u32, op: u16, len: u32) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: CONTROL_PORT,
            dst_port: to_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// The worker's handler, driven by hand (`step`), with its queues.
    struct Driven {
        w: VsockWorker,
        a: Active,
    }

    impl Driven {
        fn step(&mut self) {
            self.w.handle(Some(&mut self.a), &Wake { queues: true, ..Wake::default() });
        }
    }

    impl std::ops::Deref for Driven {
        type Target = VsockWorker;
        fn deref(&self) -> &VsockWorker {
            &self.w
        }
    }

    fn setup(mem: &GuestMemoryMmap) -> (Driven, Guest<'_>, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut w = VsockWorker::new(listener);
        let g = Guest::new(mem);
        let queues = vec![g.rxq.create_queue().unwrap(), g.txq.create_queue().unwrap()];
        let mut a = Active { mem: mem.clone(), queues };
        w.activated(&mut a);
        (Driven { w, a }, g, path, dir)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_client_connection_becomes_a_stream_to_guest_init() {
        let m = mem();
        let (mut w, mut g, path, _dir) = setup(&m);
        let mut client = UnixStream::connect(&path).unwrap();
        w.step();
        let got = g.received();
        assert_eq!(got.len(), 1);
        let (req, _) = got[0];
        assert_eq!((req.op, req.dst_port, req.dst_cid, req.src_cid), (OP_REQUEST, CONTROL_PORT, GUEST_CID, HOST_CID));
        let host_port = req.src_port;
        // Guest-init accepts; the client's bytes reach it.
        g.send(from_guest(host_port, OP_RESPONSE, 0), &[]);
        w.step();
        client.write_all(b"hello guest").unwrap();
        w.step();
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.len, got[0].1.as_slice()), (OP_RW, 11, &b"hello guest"[..]));
        // The guest's bytes reach the client.
        g.send(from_guest(host_port, OP_RW, 9), b"hi client");
        w.step();
        let mut buf = [0u8; 9];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi client");
        // The guest ends its side: the client reads end of file.
        let mut shut = from_guest(host_port, OP_SHUTDOWN, 0);
        shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        g.send(shut, &[]);
        w.step();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(w.conns.is_empty(), "the connection is gone");
        assert_eq!(g.received().last().map(|p| p.0.op), Some(OP_RST));
    }

    #[test]
    fn the_guest_cannot_exceed_its_credit_or_reach_the_host() {
        let m = mem();
        let (mut w, mut g, path, _dir) = setup(&m);
        let _client = UnixStream::connect(&path).unwrap();
        w.step();
        let host_port = g.received()[0].0.src_port;
        g.send(from_guest(host_port, OP_RESPONSE, 0), &[]);
        w.step();
        // A guest connecting to the host (nobody listens there) is reset.
        g.send(from_guest(5555, OP_REQUEST, 0), &[]);
        // A packet claiming another CID, or a length it does not carry,
        // is ignored.
        let mut spoofed = from_guest(host_port, OP_RW, 3);
        spoofed.src_cid = 7;
        g.send(spoofed, b"abc");
        g.send(from_guest(host_port, OP_RW, 100), b"abc");
        w.step();
        let got = g.received();
        assert!(got.iter().any(|(h, _)| h.op == OP_RST && h.dst_port == CONTROL_PORT && h.src_port == 5555));
        assert_eq!(w.conns.len(), 1, "the real connection is untouched");
        assert!(w.conns.values().all(|c| c.out.is_empty()));
        // Over the credit we gave: the connection is reset.
        let chunk = vec![7u8; 60 * 1024];
        for _ in 0..5 {
            g.send(from_guest(host_port, OP_RW, chunk.len() as u32), &chunk);
        }
        w.step();
        assert!(w.conns.is_empty(), "a guest over its credit is cut off");
    }
}
