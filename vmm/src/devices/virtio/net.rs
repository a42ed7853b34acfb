//! Host side: virtio-net (virtio 1.x, section 5.1) whose only peer is
//! netstack, in this process: the guest's network is netstack's and
//! nothing else (no TAP device, no host namespace). A worker thread owns
//! netstack and, once the driver is up, both queues: it moves the guest's
//! frames (untrusted: size-checked here, classified by netstack) into
//! netstack and netstack's frames into the guest's receive buffers. The
//! vCPU thread only kicks it when the guest notifies a queue.
//!
//! Bounds: a transmitted frame over the MTU (plus Ethernet header) is
//! dropped and counted; at most one frame waits for a receive buffer here
//! (netstack queues the rest, bounded); every descriptor chain is read and
//! written through vm-memory's checked accesses.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use netstack::stack::NetStack;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, ActivateError, Ctl, Interrupt, VirtioDevice, Worker, VIRTIO_F_VERSION_1};

pub const DEVICE_TYPE_NET: u32 = 1;

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;

/// struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Poll interval while connections are open (netstack pumps upstream
/// sockets when polled) or a frame waits for a receive buffer.
const BUSY_POLL_MS: i32 = 1;
/// Otherwise: netstack's timers (TCP retransmits, idle limits) are coarse.
const IDLE_POLL_MS: i32 = 50;

/// Frames moved and dropped, for tests and figures.
#[derive(Default, Debug)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_dropped: AtomicU64,
}

pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    worker: Worker,
    pub counters: Arc<NetCounters>,
}

impl Net {
    /// A NIC with address `mac` whose peer is `stack` (MTU `mtu`).
    pub fn new<W: Write + Send + 'static>(mac: [u8; 6], mtu: u16, stack: NetStack<W>) -> std::io::Result<Net> {
        let counters = Arc::new(NetCounters::default());
        let for_thread = counters.clone();
        let worker = Worker::spawn("virtio-net", move |kick, ctl| {
            let mut w = NetWorker {
                stack,
                active: None,
                pending: None,
                kick,
                ctl,
                counters: for_thread,
                max_frame: usize::from(mtu) + 14,
            };
            w.run();
        })?;
        Ok(Net { mac, mtu, worker, counters })
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "net"
    }
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_MTU
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is ours to choose (no VIRTIO_NET_F_CTRL_MAC_ADDR).
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.worker.activate("net", 2, mem, queues, interrupt)
    }
    fn queue_notify(&mut self, _index: u16) {
        self.worker.kick();
    }
    fn notify_event(&self) -> Option<EventFd> {
        self.worker.notify_event()
    }
    fn reset(&mut self) {
        self.worker.send(Ctl::Reset);
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<dyn Interrupt>,
}

struct NetWorker<W: Write> {
    stack: NetStack<W>,
    active: Option<Active>,
    /// A frame for the guest that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    kick: Arc<EventFd>,
    ctl: Receiver<Ctl>,
    counters: Arc<NetCounters>,
    max_frame: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl<W: Write> NetWorker<W> {
    fn run(&mut self) {
        loop {
            let busy = self.pending.is_some() || self.stack.connections() > 0;
            self.wait(if busy { BUSY_POLL_MS } else { IDLE_POLL_MS });
            while let Ok(c) = self.ctl.try_recv() {
                match c {
                    Ctl::Activate { mem, queues, interrupt } => {
                        self.active = Some(Active { mem, queues, interrupt });
                        self.pending = None;
                    }
                    Ctl::Reset => {
                        self.active = None;
                        self.pending = None;
                    }
                    Ctl::Shutdown => return,
                }
            }
            self.step();
        }
    }

    /// Waits for a kick or `timeout_ms`, then clears the kick.
    fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd { fd: self.kick.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is a valid pollfd for the duration of the call, and
        // the count (1) matches.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        let _ = self.kick.read();
    }

    /// One round: guest frames in, protocols run, frames out to the guest.
    fn step(&mut self) {
        let mut signal = false;
        if let Some(a) = self.active.as_mut() {
            signal |= transmit(a, &mut self.stack, self.max_frame, &self.counters);
        }
        self.stack.poll(unix_ms());
        if let Some(a) = self.active.as_mut() {
            signal |= receive(a, &mut self.stack, &mut self.pending, &self.counters);
            if signal {
                a.interrupt.signal_used_queue();
            }
        }
    }
}

/// Moves every frame the guest queued for transmission into netstack.
/// Returns whether the guest wants an interrupt.
fn transmit<W: Write>(a: &mut Active, stack: &mut NetStack<W>, max_frame: usize, c: &NetCounters) -> bool {
    let mem = &a.mem;
    let Some(q) = a.queues.get_mut(TX) else { return false };
    let mut used = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match read_frame(mem, chain, max_frame) {
            Some(frame) => {
                c.tx_frames.fetch_add(1, Ordering::Relaxed);
                stack.push_frame(frame);
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
fn read_frame(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, max_frame: usize) -> Option<Vec<u8>> {
    let limit = HDR_LEN + max_frame;
    let mut bytes = Vec::new();
    for d in chain.take(usize::from(QUEUE_SIZE)) {
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let start = bytes.len();
        if start + len > limit {
            return None;
        }
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], d.addr()).ok()?;
    }
    if bytes.len() < HDR_LEN + 14 {
        return None;
    }
    Some(bytes.split_off(HDR_LEN))
}

/// Fills the guest's receive buffers with netstack's frames. Returns
/// whether the guest wants an interrupt.
fn receive<W: Write>(a: &mut Active, stack: &mut NetStack<W>, pending: &mut Option<Vec<u8>>, c: &NetCounters) -> bool {
    let mem = &a.mem;
    let Some(q) = a.queues.get_mut(RX) else { return false };
    let mut used = false;
    while let Some(frame) = pending.take().or_else(|| stack.pop_frame()) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            *pending = Some(frame);
            break;
        };
        let head = chain.head_index();
        let written = match write_frame(mem, chain, &frame) {
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
fn write_frame(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, frame: &[u8]) -> Option<u32> {
    let mut hdr = [0u8; HDR_LEN];
    // num_buffers: the frame is in this one chain.
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    let total = HDR_LEN + frame.len();
    let mut src = hdr.iter().chain(frame.iter()).copied();
    let mut done = 0usize;
    let mut chunk = Vec::new();
    for d in chain.take(usize::from(QUEUE_SIZE)) {
        if done == total {
            break;
        }
        if !d.is_write_only() {
            return None;
        }
        let n = (d.len() as usize).min(total - done);
        chunk.clear();
        chunk.extend(src.by_ref().take(n));
        mem.write_slice(&chunk, d.addr()).ok()?;
        done += n;
    }
    (done == total).then_some(total as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use netstack::audit::AuditLog;
    use netstack::policy::Policy;
    use netstack::stack::{Config, Resolver};
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];

    fn stack() -> NetStack<Vec<u8>> {
        NetStack::new(
            Config::default(),
            Policy::preset("locked").unwrap(),
            Resolver::default(),
            AuditLog::new(Vec::new()).shared(),
        )
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

    #[test]
    fn a_guest_frame_reaches_netstack_and_its_answer_the_guest() {
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
        let mut net = Net::new([2, 0x73, 0x62, 0x78, 0, 2], 1500, stack()).unwrap();
        let irq = Arc::new(Count::default());
        net.activate(mem.clone(), vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()], irq.clone()).unwrap();
        net.queue_notify(TX as u16);
        let used_idx =
            |q: &MockSplitQueue<GuestMemoryMmap>| mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap();
        wait_for("the TX chain to be used", || used_idx(&txq) == 1);
        wait_for("the ARP reply", || used_idx(&rxq) == 1);
        let len: u32 = mem.read_obj(rxq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(len as usize, HDR_LEN + 42, "header and a 42-byte ARP reply");
        let mut reply = vec![0u8; len as usize];
        mem.read_slice(&mut reply, GuestAddress(0x50_000)).unwrap();
        assert_eq!(&reply[10..12], &[1, 0], "num_buffers is 1");
        let eth = &reply[HDR_LEN..];
        assert_eq!(&eth[0..6], &GUEST_MAC, "sent to the guest");
        assert_eq!(&eth[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&eth[28..32], &[10, 0, 2, 2], "the gateway's address");
        assert!(irq.count() >= 1);
        assert_eq!(net.counters.tx_frames.load(Ordering::SeqCst), 1);
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
        let mut net = Net::new([2, 0, 0, 0, 0, 1], 1500, stack()).unwrap();
        net.activate(
            mem.clone(),
            vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
            Arc::new(Count::default()),
        )
        .unwrap();
        net.queue_notify(TX as u16);
        wait_for("four drops", || net.counters.tx_dropped.load(Ordering::SeqCst) == 4);
        assert_eq!(net.counters.tx_frames.load(Ordering::SeqCst), 0);
        // Reset and drop (the worker thread ends) do not hang.
        net.reset();
    }

    #[test]
    fn config_space_has_the_mac_link_and_mtu() {
        let net = Net::new([2, 1, 2, 3, 4, 5], 1500, stack()).unwrap();
        let mut c = [0u8; 12];
        net.read_config(0, &mut c);
        assert_eq!(&c[0..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        let mut past = [0xffu8; 4];
        net.read_config(10, &mut past);
        assert_eq!(&past[2..], &[0, 0]);
    }
}
