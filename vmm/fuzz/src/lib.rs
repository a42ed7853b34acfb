//! Host side (test harness): what vmm's fuzz targets share. A cursor over
//! the fuzzer's bytes, and guest memory holding virtqueues whose descriptor
//! tables, available rings and buffers the fuzzer writes as a hostile
//! driver would (chains that loop, leave the table, point outside memory,
//! at the rings themselves, indirect tables, heads out of range), with the
//! checks every device must pass on them: each chain made available is
//! returned, no used length exceeds the chain's writable bytes, nothing is
//! written outside the writable buffers of the chains.

use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The fuzzer's bytes, read front to back; past the end every read is 0.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// True when `SBX_FUZZ_TRACE` is set: the targets then say what they did.
pub fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("SBX_FUZZ_TRACE").is_some())
}

/// Counts the interrupts a device raises.
#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize);

impl CountingInterrupt {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl vmm::devices::virtio::Interrupt for CountingInterrupt {
    fn signal_used_queue(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {}
}

/// Guest memory: rings in the first page, then buffers.
pub const MEM_SIZE: u64 = 0x2_0000;
/// Where the rings live: queue `i` at `i * RING_STRIDE`.
pub const RING_AREA_END: u64 = 0x1000;
const RING_STRIDE: u64 = 0x200;
/// Where the fuzzer's buffer bytes go.
pub const DATA: u64 = 0x1000;
pub const DATA_LEN: usize = 0x1_0000;
/// Entries of each queue the fuzzer builds.
pub const QUEUE_SIZE: u16 = 16;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// A buffer address: mostly in the data area, sometimes where a hostile
/// driver would point (rings, the end of memory, beyond it).
fn addr(v: u16) -> u64 {
    if v < 0xf000 {
        return DATA + u64::from(v);
    }
    match v & 0xf {
        0 => 0,
        1 => AVAIL_OFFSET,
        2 => USED_OFFSET,
        3 => MEM_SIZE - u64::from((v >> 4) & 0xff),
        4 => MEM_SIZE,
        5 => u64::MAX - u64::from((v >> 4) & 0xff),
        6 => 1 << 32,
        _ => u64::from(v & 0xfff0) % RING_AREA_END,
    }
}

/// A buffer length: mostly small, sometimes a size that matters.
fn len(v: u16) -> u32 {
    if v & 0x8000 == 0 {
        return u32::from(v);
    }
    [0, 1, 16, 512, 4096, 0x1_0000, 0x40_0000 + 512, u32::MAX][usize::from(v & 7)]
}

/// A chain as the device sees it: its head and its buffers (address,
/// length, device-writable), read by virtio-queue's own iterator.
#[derive(Debug, Clone)]
pub struct Walked {
    pub head: u16,
    pub descs: Vec<(u64, u32, bool)>,
}

impl Walked {
    pub fn writable_bytes(&self) -> u64 {
        self.descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum()
    }

    /// The bytes of the chain's buffers of one direction, in order, read
    /// from `mem` (a snapshot), at most `limit`; None if a buffer needed
    /// is outside guest memory.
    pub fn bytes(&self, mem: &[u8], writable: bool, limit: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for &(a, l, _) in self.descs.iter().filter(|d| d.2 == writable) {
            if out.len() >= limit {
                break;
            }
            let n = (l as usize).min(limit - out.len());
            if n == 0 {
                // Nothing read or written there, wherever it is.
                continue;
            }
            let end = a.checked_add(n as u64).filter(|&e| e <= mem.len() as u64)?;
            out.extend_from_slice(&mem[a as usize..end as usize]);
        }
        Some(out)
    }
}

/// One virtqueue as the fuzzer's driver set it up: descriptor table,
/// available ring and used ring at fixed places of its stride (not
/// virtio-queue's `MockSplitQueue` layout, which in 0.18 puts the used
/// ring over the available ring's upper entries).
pub struct Ring {
    base: u64,
    /// Indirect tables any descriptor names (address, length).
    indirect: Vec<(u64, u64)>,
    /// The chains the device will find, in order.
    pub chains: Vec<Walked>,
}

const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x140;

impl Ring {
    /// Queue `index`: its descriptor table and available ring from the
    /// input (6 bytes a descriptor: address, length, flags, next).
    pub fn new(mem: &GuestMemoryMmap, index: u64, input: &mut Input<'_>) -> Ring {
        let base = index * RING_STRIDE;
        let mut ring = Ring { base, indirect: Vec::new(), chains: Vec::new() };
        let count = input.u8() % (QUEUE_SIZE as u8 + 1);
        for i in 0..u16::from(count) {
            let (a, l, flags, next) = (addr(input.u16()), len(input.u16()), input.u8(), input.u8());
            ring.set_desc(mem, i, a, l, u16::from(flags & 7), u16::from(next));
        }
        let heads = input.u8() % (QUEUE_SIZE as u8 + 1);
        for i in 0..u16::from(heads) {
            let h = input.u8();
            // Now and then a head out of the table.
            let head = if h >= 0xf0 { u16::from(h) << 4 } else { u16::from(h) % QUEUE_SIZE };
            ring.set_avail(mem, i, head);
        }
        // Now and then an index that claims more than the ring holds.
        let idx = if input.u8() == 0xff { input.u16() } else { u16::from(heads) };
        ring.set_avail_idx(mem, idx);
        ring
    }

    /// An empty queue `index`, for a harness to fill.
    pub fn empty(index: u64) -> Ring {
        Ring { base: index * RING_STRIDE, indirect: Vec::new(), chains: Vec::new() }
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        if flags & F_INDIRECT != 0 {
            self.indirect.push((addr, u64::from(len)));
        }
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.base + 16 * u64::from(i % QUEUE_SIZE))).expect("descriptor table");
    }

    /// Puts `head` in available ring entry `i` (modulo the size).
    pub fn set_avail(&self, mem: &GuestMemoryMmap, i: u16, head: u16) {
        let at = self.base + AVAIL_OFFSET + 4 + 2 * u64::from(i % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(at)).expect("avail ring");
    }

    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.base + AVAIL_OFFSET + 2)).expect("avail ring");
    }

    /// A queue the device may own.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.base);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.base + AVAIL_OFFSET);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Reads the chains the device will see (call once the buffers are in
    /// memory).
    pub fn walk(&mut self, mem: &GuestMemoryMmap) {
        let mut q = self.queue();
        self.chains.clear();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs = chain.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect();
            self.chains.push(Walked { head, descs });
        }
    }

    /// The chains a device returns when it takes all it finds, notified
    /// `rounds` times: a round stops at a head outside the table (that
    /// chain cannot be returned), the next goes on after it. Indices into
    /// `chains`.
    pub fn consumed(&self, rounds: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stops = 0;
        for (i, c) in self.chains.iter().enumerate() {
            if c.head >= QUEUE_SIZE {
                stops += 1;
                if stops == rounds {
                    break;
                }
            } else {
                out.push(i);
            }
        }
        out
    }

    /// `consumed(1).len()`: the chains returned after one notification.
    pub fn returnable(&self) -> usize {
        self.consumed(1).len()
    }

    pub fn used_addr(&self) -> u64 {
        self.base + USED_OFFSET
    }

    /// How many chains the device returned (the used ring's index).
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_addr() + 2)).expect("used ring")
    }

    /// (id, len) of the used entries the device wrote.
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let base = self.used_addr();
        let idx = self.used_idx(mem);
        (0..u64::from(idx).min(u64::from(QUEUE_SIZE)))
            .map(|i| {
                let at = base + 4 + 8 * i;
                (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
            })
            .collect()
    }

    fn used_range(&self) -> (u64, u64) {
        let base = self.used_addr();
        (base, base + 4 + 8 * u64::from(QUEUE_SIZE) + 2)
    }

    /// Checks the used ring: the entries are chains `expected` (indices
    /// into `chains`), in order, each with a length within its chain's
    /// writable bytes.
    pub fn check_used(&self, mem: &GuestMemoryMmap, expected: &[usize]) {
        let used = self.used(mem);
        if trace() {
            eprintln!("queue at {:#x}: chains {:?}, used {used:?}", self.base, self.chains);
        }
        assert_eq!(used.len(), expected.len(), "used entries: chains {:?}", self.chains);
        for (i, (&(id, len), &k)) in used.iter().zip(expected).enumerate() {
            let c = &self.chains[k];
            assert_eq!(id, u32::from(c.head), "used entry {i} is chain {k}");
            assert!(u64::from(len) <= c.writable_bytes(), "used length {len} over the writable bytes of {c:?}");
        }
    }
}

/// Copies the fuzzer's bytes into the data area.
pub fn fill_data(mem: &GuestMemoryMmap, bytes: &[u8]) {
    let n = bytes.len().min(DATA_LEN);
    mem.write_slice(&bytes[..n], GuestAddress(DATA)).expect("data area");
}

pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut v, GuestAddress(0)).expect("snapshot");
    v
}

/// The ranges a device may write after `rings` were set up: the writable
/// buffers of their chains and their used rings. None when a writable
/// buffer overlaps the rings or an indirect table (the guest made its own
/// queue change under the device: what the device then reads is not what
/// was walked, and no exact check is possible).
pub fn writable_ranges(rings: &[&Ring]) -> Option<Vec<(u64, u64)>> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for r in rings {
        for c in &r.chains {
            for &(a, l, w) in &c.descs {
                if w && l > 0 {
                    ranges.push((a, a.saturating_add(u64::from(l))));
                }
            }
        }
    }
    let overlaps = |(a, b): (u64, u64), (c, d): (u64, u64)| a < d && c < b;
    let tables: Vec<(u64, u64)> = rings
        .iter()
        .flat_map(|r| r.indirect.iter().map(|&(a, l)| (a, a.saturating_add(l))))
        .chain(std::iter::once((0, RING_AREA_END)))
        .collect();
    if ranges.iter().any(|&r| tables.iter().any(|&t| overlaps(r, t))) {
        if trace() {
            eprintln!("writable buffers over the rings or an indirect table: no exact checks");
        }
        return None;
    }
    ranges.extend(rings.iter().map(|r| r.used_range()));
    Some(ranges)
}

/// True if no writable buffer of the chains overlaps another buffer (nor
/// appears twice, as in a chain that loops or is made available twice),
/// and no buffer overlaps the rings (whose used rings the device writes):
/// only then do the device's reads find what the guest wrote, and is what
/// the device wrote still there to be read back.
pub fn disjoint(rings: &[&Ring]) -> bool {
    let mut ranges: Vec<(u64, u64, bool)> = rings
        .iter()
        .flat_map(|r| r.chains.iter().flat_map(|c| c.descs.iter()))
        .filter(|d| d.1 > 0)
        .map(|&(a, l, w)| (a, a.saturating_add(u64::from(l)), w))
        .chain(std::iter::once((0, RING_AREA_END, true)))
        .collect();
    ranges.sort_unstable();
    let (mut end, mut writable_end) = (0u64, 0u64);
    for (s, e, w) in ranges {
        if s < writable_end || (w && s < end) {
            return false;
        }
        end = end.max(e);
        if w {
            writable_end = writable_end.max(e);
        }
    }
    true
}

/// Asserts that every byte that changed since `before` lies in `allowed`.
pub fn check_writes(mem: &GuestMemoryMmap, before: &[u8], allowed: &[(u64, u64)]) {
    let after = snapshot(mem);
    // By blocks first: the harness's own loops are instrumented too, and
    // cost the fuzzer's time.
    for (k, (a, b)) in before.chunks(64).zip(after.chunks(64)).enumerate() {
        if a == b {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let at = (k * 64 + i) as u64;
            assert!(
                x == y || allowed.iter().any(|&(s, e)| s <= at && at < e),
                "byte {at:#x} written outside the chains' writable buffers {allowed:x?}"
            );
        }
    }
}

/// Where the targets make their files: memory (`/dev/shm`) if there is
/// one, else the temporary directory.
pub fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
