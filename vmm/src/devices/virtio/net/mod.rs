//! Host side: virtio-net (virtio 1.x, section 5.1) whose only peer is a
//! [`FrameBackend`] in this process (sbx's is netstack's
//! `netstack::backend::NetBackend`; the trait is the `frame-backend`
//! crate's, so that vmm does not depend on netstack): the guest's network
//! is the backend's and nothing else (no TAP device, no host namespace).
//! A worker thread ([`super::worker`]) owns the backend and, once the
//! driver is up, both queues: it moves the guest's frames (untrusted:
//! size-checked here, judged by the backend) into the backend and the
//! backend's frames into the guest's receive buffers. It wakes only when
//! the guest notifies a queue, when one of the backend's host descriptors
//! is ready (an upstream socket, a finished connect), or at the backend's
//! next deadline (its protocol timers): never to poll.
//!
//! Bounds: a transmitted frame over the MTU (plus Ethernet header) is
//! dropped and counted; at most one frame waits for a receive buffer here
//! (the backend queues the rest, bounded); every descriptor chain is read
//! and written through vm-memory's checked accesses. The header and config
//! layouts are declared in `wire.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use zerocopy::IntoBytes;

use super::chain::Chain;
use super::device::{read_only_config, Spec, WorkerDevice};
use super::worker::{Active, Interest, QueueHandler, Wake};
use super::VIRTIO_F_VERSION_1;
use crate::threads::{Reach, ThreadKind};

mod wire;

use wire::config_bytes;
pub use wire::{NetHdr, HDR_LEN};

pub const DEVICE_TYPE_NET: u32 = VIRTIO_ID_NET;

/// The Ethernet header every frame starts with.
pub use frame_backend::ETH_HDR_LEN;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE, QUEUE_SIZE];
const RX: usize = 0;
const TX: usize = 1;

/// The backend boundary (its own crate, so that vmm and netstack do not
/// depend on each other): re-exported where the device is.
pub use frame_backend::FrameBackend;

/// Frames moved and dropped, for tests and figures.
#[derive(Default, Debug)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_dropped: AtomicU64,
}

/// The NIC: the device, and its counters.
pub struct Net {
    pub device: WorkerDevice,
    pub counters: Arc<NetCounters>,
}

impl Net {
    /// A NIC with address `mac` (MTU `mtu`) whose frames go to `backend`,
    /// its worker reaching the host paths `reach` allows (once the jail
    /// is on).
    pub fn new(mac: [u8; 6], mtu: u16, backend: Box<dyn FrameBackend>, reach: Reach) -> std::io::Result<Net> {
        let (handler, counters) = handler(mtu, backend);
        let spec = Spec {
            name: "net",
            device_type: DEVICE_TYPE_NET,
            queue_sizes: QUEUE_SIZES,
            queues_needed: 2,
            features: VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU,
            kind: ThreadKind::Net,
            thread: "virtio-net",
        };
        // The MAC is ours to choose (no VIRTIO_NET_F_CTRL_MAC_ADDR).
        let device = WorkerDevice::spawn(spec, config_bytes(mac, mtu), read_only_config(), reach, handler)?;
        Ok(Net { device, counters })
    }
}

/// The worker's part: the backend, and a frame that found no receive
/// buffer yet.
struct NetHandler {
    backend: Box<dyn FrameBackend>,
    pending: Option<Vec<u8>>,
    counters: Arc<NetCounters>,
    max_frame: usize,
}

/// The worker's part alone, to drive by hand (the fuzz targets, `vmm/fuzz`),
/// and its counters.
#[doc(hidden)]
pub fn queue_handler(mtu: u16, backend: Box<dyn FrameBackend>) -> (impl QueueHandler, Arc<NetCounters>) {
    handler(mtu, backend)
}

fn handler(mtu: u16, backend: Box<dyn FrameBackend>) -> (NetHandler, Arc<NetCounters>) {
    let counters = Arc::new(NetCounters::default());
    let max_frame = usize::from(mtu) + ETH_HDR_LEN;
    (NetHandler { backend, pending: None, counters: counters.clone(), max_frame }, counters)
}

impl QueueHandler for NetHandler {
    fn activated(&mut self, _: &mut Active) {
        self.pending = None;
    }

    fn reset(&mut self) {
        self.pending = None;
    }

    fn interests(&mut self, out: &mut Vec<Interest>) {
        self.backend.interests(out);
    }

    /// One round: guest frames in, the backend's protocols run, frames out
    /// to the guest.
    fn handle(&mut self, mut active: Option<&mut Active>, wake: &Wake) -> bool {
        let mut signal = false;
        if let Some(a) = active.as_deref_mut().filter(|_| wake.queues) {
            signal |= transmit(a, self.backend.as_mut(), self.max_frame, &self.counters);
        }
        self.backend.poll(Instant::now());
        if let Some(a) = active {
            signal |= receive(a, self.backend.as_mut(), &mut self.pending, &self.counters);
        }
        signal
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        self.backend.next_deadline(Instant::now())
    }
}

/// Moves every frame the guest queued for transmission into the backend.
/// Returns whether the guest wants an interrupt.
fn transmit(a: &mut Active, backend: &mut dyn FrameBackend, max_frame: usize, c: &NetCounters) -> bool {
    let mem = &a.mem;
    let Some(q) = a.queues.get_mut(TX) else { return false };
    let mut used = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let chain = Chain::walk(chain, usize::from(QUEUE_SIZE));
        let head = chain.head;
        match read_frame(mem, &chain, max_frame) {
            Some(frame) => {
                c.tx_frames.fetch_add(1, Ordering::Relaxed);
                backend.send_to_backend(frame);
            }
            None => {
                c.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if q.add_used(mem, head, 0).is_err() {
            break;
        }
        used = true;
    }
    used && q.needs_notification(mem).unwrap_or(true)
}

/// The frame in a transmit chain (after the virtio-net header), or None
/// if the chain is malformed, outside guest memory or over the limit.
fn read_frame(mem: &GuestMemoryMmap, chain: &Chain, max_frame: usize) -> Option<Vec<u8>> {
    chain.readable_only().ok()?;
    let mut bytes = chain.read_all(mem, HDR_LEN + max_frame).ok()?;
    if bytes.len() < HDR_LEN + ETH_HDR_LEN {
        return None;
    }
    Some(bytes.split_off(HDR_LEN))
}

/// Fills the guest's receive buffers with the backend's frames. Returns
/// whether the guest wants an interrupt.
fn receive(a: &mut Active, backend: &mut dyn FrameBackend, pending: &mut Option<Vec<u8>>, c: &NetCounters) -> bool {
    let mem = &a.mem;
    let Some(q) = a.queues.get_mut(RX) else { return false };
    let mut used = false;
    while let Some(frame) = pending.take().or_else(|| backend.receive()) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            *pending = Some(frame);
            break;
        };
        let chain = Chain::walk(chain, usize::from(QUEUE_SIZE));
        let head = chain.head;
        let written = match write_frame(mem, &chain, &frame) {
            Some(n) => {
                c.rx_frames.fetch_add(1, Ordering::Relaxed);
                n
            }
            None => {
                c.rx_dropped.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        if q.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used && q.needs_notification(mem).unwrap_or(true)
}

/// Writes header and frame into a receive chain; the bytes written, or
/// None if the chain cannot hold them or is not writable guest memory.
fn write_frame(mem: &GuestMemoryMmap, chain: &Chain, frame: &[u8]) -> Option<u32> {
    chain.writable_only().ok()?;
    // num_buffers: the frame is in this one chain.
    let hdr = NetHdr { num_buffers: 1.into(), ..NetHdr::default() };
    chain.write_all(mem, &[hdr.as_bytes(), frame]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use crate::devices::virtio::VirtioDevice;
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x02];

    #[derive(Default)]
    struct Seen {
        sent: Vec<Vec<u8>>,
        polls: usize,
        deadline: Option<Instant>,
    }

    /// A backend that answers each frame with the frame sent back (MACs
    /// swapped), turns bytes arriving on its "upstream" socket into frames,
    /// and sends a frame when its deadline passes.
    struct Fake {
        seen: Arc<Mutex<Seen>>,
        to_guest: VecDeque<Vec<u8>>,
        upstream: Option<UnixStream>,
    }

    fn frame_to_guest(payload: &[u8]) -> Vec<u8> {
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    impl FrameBackend for Fake {
        fn send_to_backend(&mut self, frame: Vec<u8>) {
            let mut answer = frame.clone();
            answer[0..6].copy_from_slice(&frame[6..12]);
            answer[6..12].copy_from_slice(&frame[0..6]);
            self.to_guest.push_back(answer);
            self.seen.lock().unwrap().sent.push(frame);
        }
        fn receive(&mut self) -> Option<Vec<u8>> {
            self.to_guest.pop_front()
        }
        fn poll(&mut self, now: Instant) {
            let mut seen = self.seen.lock().unwrap();
            seen.polls += 1;
            if seen.deadline.is_some_and(|d| d <= now) {
                seen.deadline = None;
                self.to_guest.push_back(frame_to_guest(b"timer"));
            }
            let mut buf = [0u8; 256];
            if let Some(up) = self.upstream.as_mut() {
                match up.read(&mut buf) {
                    Ok(0) => self.upstream = None,
                    Ok(n) => self.to_guest.push_back(frame_to_guest(&buf[..n])),
                    Err(_) => {}
                }
            }
        }
        fn next_deadline(&mut self, _: Instant) -> Option<Instant> {
            self.seen.lock().unwrap().deadline
        }
        fn interests(&mut self, out: &mut Vec<Interest>) {
            if let Some(up) = &self.upstream {
                out.push(Interest { key: 1, fd: up.as_raw_fd(), read: true, write: false });
            }
        }
    }

    fn fake(upstream: Option<UnixStream>) -> (Box<dyn FrameBackend>, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        (Box::new(Fake { seen: seen.clone(), to_guest: VecDeque::new(), upstream }), seen)
    }

    /// An ARP request from the guest for the gateway, with the header.
    fn arp_who_has_gateway() -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 2, 2]);
        f
    }

    fn chain(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
    }

    /// The frame in used receive entry `i` (buffers of 2 KiB from
    /// 0x50_000), after its header.
    fn received(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> Vec<u8> {
        let at = q.used_addr().unchecked_add(4 + 8 * i);
        let (id, len): (u32, u32) = (mem.read_obj(at).unwrap(), mem.read_obj(at.unchecked_add(4)).unwrap());
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(0x50_000 + 2048 * u64::from(id))).unwrap();
        assert_eq!(&bytes[10..12], &[1, 0], "num_buffers is 1");
        bytes.split_off(HDR_LEN)
    }

    #[test]
    fn a_guest_frame_reaches_the_backend_and_its_answer_the_guest() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_000), 16);
        // TX: header and frame split over two descriptors.
        let frame = arp_who_has_gateway();
        mem.write_slice(&frame, GuestAddress(0x40_000)).unwrap();
        txq.add_desc_chains(
            &[chain(0x40_000, 10, VRING_DESC_F_NEXT, 1), chain(0x40_00a, frame.len() as u32 - 10, 0, 0)],
            0,
        )
        .unwrap();
        // RX: one 2 KiB buffer.
        rxq.add_desc_chains(&[chain(0x50_000, 2048, VRING_DESC_F_WRITE, 0)], 0).unwrap();
        let (backend, seen) = fake(None);
        let mut net = Net::new([2, 0x73, 0x62, 0x78, 0, 2], 1500, backend, Reach::Unconfined).unwrap();
        let irq = Arc::new(Count::default());
        net.device
            .activate(mem.clone(), vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()], irq.clone())
            .unwrap();
        net.device.queue_notify(TX as u16);
        wait_for("the TX chain to be used", || used_idx(&mem, &txq) == 1);
        wait_for("the answer", || used_idx(&mem, &rxq) == 1);
        assert_eq!(seen.lock().unwrap().sent, vec![frame[HDR_LEN..].to_vec()], "the frame without its header");
        let eth = received(&mem, &rxq, 0);
        assert_eq!(eth.len(), 42, "a 42-byte ARP frame");
        assert_eq!(&eth[0..6], &GUEST_MAC, "sent to the guest");
        assert_eq!(&eth[12..14], &[0x08, 0x06], "ARP");
        assert!(irq.count() >= 1);
        assert_eq!(net.counters.tx_frames.load(Ordering::SeqCst), 1);
        assert_eq!(net.counters.rx_frames.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn upstream_readiness_and_deadlines_wake_the_worker_and_nothing_polls() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_000), 16);
        let bufs: Vec<RawDescriptor> =
            (0..4).map(|i| chain(0x50_000 + 2048 * i, 2048, VRING_DESC_F_WRITE, 0)).collect();
        rxq.add_desc_chains(&bufs, 0).unwrap();
        let (mine, mut theirs) = UnixStream::pair().unwrap();
        mine.set_nonblocking(true).unwrap();
        let (backend, seen) = fake(Some(mine));
        let mut net = Net::new(GUEST_MAC, 1500, backend, Reach::Unconfined).unwrap();
        let irq = Arc::new(Count::default());
        net.device
            .activate(mem.clone(), vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()], irq.clone())
            .unwrap();
        wait_for("the activation round", || seen.lock().unwrap().polls >= 1);
        // Idle: nothing runs the backend.
        let polls = seen.lock().unwrap().polls;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen.lock().unwrap().polls, polls, "an idle NIC does not poll");
        // Upstream bytes: the backend runs and its frame reaches the guest.
        theirs.write_all(b"from upstream").unwrap();
        wait_for("the upstream frame", || used_idx(&mem, &rxq) == 1);
        assert_eq!(&received(&mem, &rxq, 0)[14..], b"from upstream");
        // A deadline: the backend runs then, by itself.
        let set_at = Instant::now();
        seen.lock().unwrap().deadline = Some(set_at + Duration::from_millis(30));
        // (The new deadline is read after the next round.)
        net.device.queue_notify(RX as u16);
        wait_for("the timer frame", || used_idx(&mem, &rxq) == 2);
        assert!(set_at.elapsed() >= Duration::from_millis(30), "not before its deadline");
        assert_eq!(&received(&mem, &rxq, 1)[14..], b"timer");
        assert!(irq.count() >= 2);
        let polls = seen.lock().unwrap().polls;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen.lock().unwrap().polls, polls, "idle again");
    }

    #[test]
    fn bad_transmit_chains_are_dropped_not_fatal() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_000), 16);
        txq.add_desc_chains(
            &[
                // Over the MTU.
                chain(0x40_000, 9000, 0, 0),
                // Device-writable in a transmit chain.
                chain(0x40_000, 100, VRING_DESC_F_WRITE, 0),
                // Shorter than a header and an Ethernet header.
                chain(0x40_000, 20, 0, 0),
                // Outside guest memory.
                chain((1 << 20) - 8, 100, 0, 0),
            ],
            0,
        )
        .unwrap();
        let (backend, seen) = fake(None);
        let mut net = Net::new([2, 0, 0, 0, 0, 1], 1500, backend, Reach::Unconfined).unwrap();
        net.device
            .activate(
                mem.clone(),
                vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
                Arc::new(Count::default()),
            )
            .unwrap();
        net.device.queue_notify(TX as u16);
        wait_for("four drops", || net.counters.tx_dropped.load(Ordering::SeqCst) == 4);
        assert_eq!(net.counters.tx_frames.load(Ordering::SeqCst), 0);
        assert!(seen.lock().unwrap().sent.is_empty(), "nothing reached the backend");
        // Reset and drop (the worker thread ends) do not hang.
        net.device.reset();
    }

    #[test]
    fn config_space_has_the_mac_link_and_mtu() {
        let net = Net::new([2, 1, 2, 3, 4, 5], 1500, fake(None).0, Reach::Unconfined).unwrap();
        let mut c = [0u8; 12];
        net.device.read_config(0, &mut c);
        assert_eq!(&c[0..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP as u16);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        let mut past = [0xffu8; 4];
        net.device.read_config(10, &mut past);
        assert_eq!(&past[2..], &[0, 0]);
    }
}
