//! Host side: virtio-blk (virtio 1.x, section 5.2) backed by a host file,
//! served on a worker thread of its own kind ([`ThreadKind::Block`]: its
//! seccomp filter has the disk's reads, writes and flush, and the
//! worker's event loop; the vCPUs' filter has no file I/O for it). The
//! file is opened before the thread starts, so the thread reaches no host
//! path (Landlock: none).
//!
//! Every descriptor chain comes from the guest (untrusted): it is walked
//! once, bounded ([`super::chain`]); its shape, the direction of each
//! buffer, its sizes and the sector range are checked before any host
//! I/O; the request header is read through its declared layout
//! ([`outhdr`], checked against virtio-bindings' `virtio_blk_outhdr`; the
//! device's wire layouts are in `wire.rs`). A bad request fails with
//! IOERR (or is returned unused when it has no status byte), nothing
//! panics. A read-only disk is opened read-only on the host, so no guest
//! request can change it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::chain::{Buf, Chain};
use super::device::{read_only_config, Spec, WorkerDevice};
use super::worker::{Active, QueueHandler, Wake};
use super::VIRTIO_F_VERSION_1;
use crate::threads::{Reach, ThreadKind};

mod wire;

use wire::{config_bytes, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
pub use wire::{outhdr, OutHdr};

pub const DEVICE_TYPE_BLOCK: u32 = VIRTIO_ID_BLOCK;
pub const SECTOR_SIZE: u64 = 512;

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Data segments per request we tell the driver it may use.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request (bounds the bounce buffer).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// The bounce buffer between the disk file and guest memory.
const BOUNCE_BYTES: usize = 64 * 1024;
/// Length of the GET_ID answer.
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Failed requests kept for tests and figures.
pub const MAX_REFUSALS_KEPT: usize = 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot open disk {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("Disk {0} is smaller than one sector")]
    Empty(PathBuf),
    #[error("Cannot start the worker thread of disk {0}: {1}")]
    Worker(PathBuf, std::io::Error),
}

/// Why a request failed (counted, and visible in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No device-writable status byte at the end: nothing to report to.
    NoStatus,
    BadHeader,
    BadDirection,
    BadLength,
    OutOfRange,
    ReadOnly,
    GuestMemory,
    HostIo,
    Unsupported,
}

/// A disk: the device, and its size.
pub struct Block {
    pub device: WorkerDevice,
    sectors: u64,
}

impl Block {
    /// A disk backed by `path`; `id` is what GET_ID returns (truncated to
    /// 20 bytes). The host file is opened read-only when `read_only`.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, Error> {
        let handler = BlockHandler::open(path, read_only, id)?;
        let sectors = handler.sectors;
        let features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_FLUSH
            | if read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
        let spec = Spec {
            name: "block",
            device_type: DEVICE_TYPE_BLOCK,
            queue_sizes: QUEUE_SIZES,
            queues_needed: 1,
            features,
            kind: ThreadKind::Block,
            thread: "virtio-block",
        };
        // Nothing in the block config is writable (no WCE feature offered).
        // The file is open already: the thread reaches no host path.
        let device = WorkerDevice::spawn(
            spec,
            config_bytes(sectors, MAX_REQUEST_BYTES as u32, SEG_MAX),
            read_only_config(),
            Reach::Only(Vec::new()),
            handler,
        )
        .map_err(|e| Error::Worker(path.to_path_buf(), e))?;
        Ok(Block { device, sectors })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

/// The worker's part: the disk file and the requests on the one queue.
pub struct BlockHandler {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    /// Failed requests by cause, the first [`MAX_REFUSALS_KEPT`] (for
    /// tests and figures).
    pub refusals: Vec<Refusal>,
}

/// The worker's part alone, to drive by hand (the fuzz targets, `vmm/fuzz`).
#[doc(hidden)]
pub fn queue_handler(path: &Path, read_only: bool, id: &str) -> Result<BlockHandler, Error> {
    BlockHandler::open(path, read_only, id)
}

impl QueueHandler for BlockHandler {
    fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool {
        match active.filter(|_| wake.queues) {
            Some(a) => self.process_queue(a),
            None => false,
        }
    }
}

impl BlockHandler {
    fn open(path: &Path, read_only: bool, id: &str) -> Result<BlockHandler, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::Open(path.to_path_buf(), e))?;
        let len = file.metadata().map_err(|e| Error::Open(path.to_path_buf(), e))?.len();
        if len < SECTOR_SIZE {
            return Err(Error::Empty(path.to_path_buf()));
        }
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(BlockHandler {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
            id: idb,
            buf: vec![0u8; BOUNCE_BYTES],
            refusals: Vec::new(),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves every available request. Returns whether the guest wants
    /// an interrupt.
    fn process_queue(&mut self, a: &mut Active) -> bool {
        let mem = &a.mem;
        let Some(queue) = a.queues.first_mut() else { return false };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            // The iterator ends a chain that loops or leaves the table;
            // at most queue-size descriptors are collected.
            let chain = Chain::walk(chain, usize::from(QUEUE_SIZE) + 1);
            let used_len = match self.serve(mem, &chain.bufs) {
                Ok(len) => len,
                Err((refusal, len)) => {
                    if self.refusals.len() < MAX_REFUSALS_KEPT {
                        self.refusals.push(refusal);
                    }
                    len
                }
            };
            // A used ring we cannot write to: the guest broke its own queue.
            if queue.add_used(mem, chain.head, used_len).is_err() {
                break;
            }
            used_any = true;
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Serves one request. Ok: bytes written into the chain; Err: why it
    /// failed and the bytes written (the status byte, if there is one).
    fn serve(&mut self, mem: &GuestMemoryMmap, descs: &[Buf]) -> Result<u32, (Refusal, u32)> {
        let Some(&Buf { addr: status_addr, len: status_len, writable: true }) =
            descs.last().filter(|_| descs.len() >= 2)
        else {
            return Err((Refusal::NoStatus, 0));
        };
        if status_len < 1 {
            return Err((Refusal::NoStatus, 0));
        }
        let fail = |mem: &GuestMemoryMmap, why: Refusal| {
            let code = if why == Refusal::Unsupported { S_UNSUPP } else { S_IOERR };
            match mem.write_obj(code, status_addr) {
                Ok(()) => Err((why, 1)),
                Err(_) => Err((Refusal::GuestMemory, 0)),
            }
        };
        let first = descs[0];
        if first.writable || (first.len as usize) < outhdr::LEN {
            return fail(mem, Refusal::BadHeader);
        }
        let mut hdr = [0u8; outhdr::LEN];
        if mem.read_slice(&mut hdr, first.addr).is_err() {
            return fail(mem, Refusal::GuestMemory);
        }
        let Some(OutHdr { kind, sector }) = OutHdr::parse(&hdr) else { return fail(mem, Refusal::BadHeader) };
        let data = &descs[1..descs.len() - 1];
        let result = match kind {
            T_IN => self.transfer(mem, data, sector, true),
            T_OUT if self.read_only => Err(Refusal::ReadOnly),
            T_OUT => self.transfer(mem, data, sector, false),
            T_FLUSH => self.file.sync_data().map(|_| 0).map_err(|_| Refusal::HostIo),
            T_GET_ID => self.get_id(mem, data),
            _ => Err(Refusal::Unsupported),
        };
        match result {
            Ok(written) => match mem.write_obj(S_OK, status_addr) {
                Ok(()) => Ok(written + 1),
                Err(_) => Err((Refusal::GuestMemory, 0)),
            },
            Err(why) => fail(mem, why),
        }
    }

    /// Reads (`to_guest`) or writes the data buffers at `sector`; returns
    /// the bytes written to guest memory.
    fn transfer(&mut self, mem: &GuestMemoryMmap, data: &[Buf], sector: u64, to_guest: bool) -> Result<u32, Refusal> {
        if data.iter().any(|d| d.writable != to_guest) {
            return Err(Refusal::BadDirection);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        if total == 0 || total > MAX_REQUEST_BYTES || !total.is_multiple_of(SECTOR_SIZE) {
            return Err(Refusal::BadLength);
        }
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(Refusal::OutOfRange)?;
        let end = start.checked_add(total).ok_or(Refusal::OutOfRange)?;
        if end > self.sectors * SECTOR_SIZE {
            return Err(Refusal::OutOfRange);
        }
        // Through a fixed bounce buffer, a chunk at a time: the VMM's own
        // memory does not grow with the guest's request sizes.
        let mut offset = start;
        for &Buf { addr, len, .. } in data {
            let mut done = 0u64;
            while done < u64::from(len) {
                let n = (u64::from(len) - done).min(BOUNCE_BYTES as u64) as usize;
                let chunk = &mut self.buf[..n];
                let at = addr.checked_add(done).ok_or(Refusal::GuestMemory)?;
                if to_guest {
                    self.file.read_exact_at(chunk, offset).map_err(|_| Refusal::HostIo)?;
                    mem.write_slice(chunk, at).map_err(|_| Refusal::GuestMemory)?;
                } else {
                    mem.read_slice(chunk, at).map_err(|_| Refusal::GuestMemory)?;
                    self.file.write_all_at(chunk, offset).map_err(|_| Refusal::HostIo)?;
                }
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(if to_guest { total as u32 } else { 0 })
    }

    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Buf]) -> Result<u32, Refusal> {
        let &[Buf { addr, len, writable: true }] = data else { return Err(Refusal::BadDirection) };
        let n = (len as usize).min(ID_BYTES);
        mem.write_slice(&self.id[..n], addr).map_err(|_| Refusal::GuestMemory)?;
        Ok(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use crate::devices::virtio::{Interrupt, VirtioDevice};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x10_000;
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;
    const MEM: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn disk_file(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    /// The worker's part, driven by hand on the test's thread.
    fn disk(sectors: u64, read_only: bool) -> (tempfile::NamedTempFile, BlockHandler) {
        let f = disk_file(sectors);
        let b = BlockHandler::open(f.path(), read_only, "sbx-test-disk").unwrap();
        (f, b)
    }

    /// One round of the handler, as its worker runs it after a kick.
    fn kick(b: &mut BlockHandler, active: &mut Active, irq: &Count) {
        if b.handle(Some(active), &Wake { queues: true, ..Wake::default() }) {
            irq.signal_used_queue();
        }
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; outhdr::LEN];
        h[outhdr::TYPE].copy_from_slice(&kind.to_le_bytes());
        h[outhdr::SECTOR].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Puts one request chain on a fresh queue, runs the device, returns
    /// (status byte, used length, interrupts).
    fn run(b: &mut BlockHandler, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32, usize) {
        let mock = MockSplitQueue::create(m, GuestAddress(0x40_000), 16);
        let mut chained = chain_at(0, descs);
        mock.add_desc_chains(&chained, 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let irq = Count::default();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        kick(b, &mut Active { mem: m.clone(), queues: vec![q] }, &irq);
        chained.clear();
        let used_len: u32 = m.read_obj(mock.used_addr().unchecked_add(8)).unwrap();
        let status: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
        (status, used_len, irq.count())
    }

    /// `descs` linked in order, the first at table index `base`.
    fn chain_at(base: u16, descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
        let mut chained = descs.to_vec();
        let n = chained.len();
        for (i, d) in chained.iter_mut().enumerate() {
            let sd = SplitDescriptor::from(*d);
            let flags = if i + 1 < n { sd.flags() | VRING_DESC_F_NEXT as u16 } else { sd.flags() };
            *d = RawDescriptor::from(SplitDescriptor::new(sd.addr().0, sd.len(), flags, base + i as u16 + 1));
        }
        chained
    }

    #[test]
    fn reads_writes_flushes_and_identifies() {
        let (f, mut b) = disk(8, false);
        let m = mem();
        assert_eq!(b.sectors(), 8);
        // Read sectors 2-3.
        header(&m, T_IN, 2);
        let (status, used, irqs) =
            run(&mut b, &m, &[desc(HDR, 16, false), desc(DATA, 1024, true), desc(STATUS, 1, true)]);
        assert_eq!((status, used, irqs), (S_OK, 1025, 1));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&x| x == 2) && got[512..].iter().all(|&x| x == 3));
        // Write sector 5 from two buffers.
        header(&m, T_OUT, 5);
        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (status, used, _) = run(
            &mut b,
            &m,
            &[desc(HDR, 16, false), desc(DATA, 256, false), desc(DATA + 256, 256, false), desc(STATUS, 1, true)],
        );
        assert_eq!((status, used), (S_OK, 1));
        let file = std::fs::read(f.path()).unwrap();
        assert!(file[5 * 512..6 * 512].iter().all(|&x| x == 0xab));
        assert!(file[6 * 512..7 * 512].iter().all(|&x| x == 6), "the next sector is untouched");
        header(&m, T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &[desc(HDR, 16, false), desc(STATUS, 1, true)]).0, S_OK);
        header(&m, T_GET_ID, 0);
        let (status, used, _) = run(&mut b, &m, &[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)]);
        assert_eq!((status, used), (S_OK, 21));
        let mut id = [0u8; 13];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"sbx-test-disk");
        assert!(b.refusals.is_empty(), "{:?}", b.refusals);
    }

    #[test]
    fn config_space_reports_capacity_and_is_bounded() {
        let f = disk_file(8);
        let b = Block::open(f.path(), true, "sbx-test-disk").unwrap();
        let b = &b.device;
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut past = [0xffu8; 8];
        b.read_config(12, &mut past);
        assert_eq!(&past[4..], &[0, 0, 0, 0], "past the end reads as zero");
        b.read_config(u64::MAX, &mut past);
        assert_ne!(b.features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn bad_requests_fail_without_touching_the_disk() {
        let (f, mut b) = disk(8, false);
        let before = std::fs::read(f.path()).unwrap();
        let m = mem();
        m.write_slice(&[0xee; 4096], GuestAddress(DATA)).unwrap();
        let cases: Vec<(u32, u64, Vec<RawDescriptor>, Refusal)> = vec![
            // Past the end of the disk, and a sector number that overflows.
            (T_OUT, 7, vec![desc(HDR, 16, false), desc(DATA, 1024, false), desc(STATUS, 1, true)], Refusal::OutOfRange),
            (
                T_OUT,
                u64::MAX / 256,
                vec![desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)],
                Refusal::OutOfRange,
            ),
            // Not a whole number of sectors; too large; nothing at all.
            (T_OUT, 0, vec![desc(HDR, 16, false), desc(DATA, 100, false), desc(STATUS, 1, true)], Refusal::BadLength),
            (T_IN, 0, vec![desc(HDR, 16, false), desc(DATA, !511, true), desc(STATUS, 1, true)], Refusal::BadLength),
            (T_OUT, 0, vec![desc(HDR, 16, false), desc(STATUS, 1, true)], Refusal::BadLength),
            // A write whose data the device would have to write, a read
            // into a buffer the device may only read.
            (T_OUT, 0, vec![desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)], Refusal::BadDirection),
            (T_IN, 0, vec![desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)], Refusal::BadDirection),
            // A header that is writable or short.
            (T_OUT, 0, vec![desc(HDR, 16, true), desc(DATA, 512, false), desc(STATUS, 1, true)], Refusal::BadHeader),
            (T_OUT, 0, vec![desc(HDR, 8, false), desc(DATA, 512, false), desc(STATUS, 1, true)], Refusal::BadHeader),
            // Data outside guest memory.
            (
                T_OUT,
                0,
                vec![desc(HDR, 16, false), desc(MEM as u64 - 256, 512, false), desc(STATUS, 1, true)],
                Refusal::GuestMemory,
            ),
            (99, 0, vec![desc(HDR, 16, false), desc(STATUS, 1, true)], Refusal::Unsupported),
        ];
        for (kind, sector, descs, why) in cases {
            header(&m, kind, sector);
            b.refusals.clear();
            let (status, used, _) = run(&mut b, &m, &descs);
            let want = if why == Refusal::Unsupported { S_UNSUPP } else { S_IOERR };
            assert_eq!((status, used), (want, 1), "{why:?}");
            assert_eq!(b.refusals, vec![why]);
        }
        // No status byte: returned unused, nothing written.
        header(&m, T_OUT, 0);
        b.refusals.clear();
        let (_, used, _) = run(&mut b, &m, &[desc(HDR, 16, false), desc(DATA, 512, false)]);
        assert_eq!((used, b.refusals.clone()), (0, vec![Refusal::NoStatus]));
        assert_eq!(std::fs::read(f.path()).unwrap(), before, "the disk is unchanged");
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_is_opened_read_only() {
        let (f, mut b) = disk(4, true);
        let m = mem();
        header(&m, T_OUT, 0);
        let (status, _, _) = run(&mut b, &m, &[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]);
        assert_eq!((status, b.refusals.clone()), (S_IOERR, vec![Refusal::ReadOnly]));
        assert!(b.file.write_at(b"x", 0).is_err(), "the host file is read-only");
        drop(f);
    }

    #[test]
    fn a_looping_chain_ends_without_hanging() {
        let (_f, mut b) = disk(4, false);
        let m = mem();
        header(&m, T_IN, 0);
        let mock = MockSplitQueue::create(&m, GuestAddress(0x40_000), 16);
        // 0 -> 1 -> 0 -> ...
        let looping = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 0)),
        ];
        mock.desc_table().store(0, looping[0]).unwrap();
        mock.desc_table().store(1, looping[1]).unwrap();
        m.write_obj(0u16, mock.avail_addr().unchecked_add(4)).unwrap();
        m.write_obj(1u16, mock.avail_addr().unchecked_add(2)).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        kick(&mut b, &mut Active { mem: m.clone(), queues: vec![q] }, &Count::default());
        assert_eq!(b.refusals.len(), 1, "the request failed: {:?}", b.refusals);
    }

    #[test]
    fn opening_a_missing_or_empty_disk_is_a_clear_error() {
        let e = Block::open(Path::new("/nonexistent/disk.img"), true, "x").err().unwrap();
        assert!(e.to_string().contains("Cannot open disk /nonexistent/disk.img"));
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = Block::open(f.path(), true, "x").err().unwrap();
        assert!(e.to_string().contains("smaller than one sector"));
    }

    fn wait_used(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while m.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap() != n {
            assert!(Instant::now() < deadline, "timed out waiting for {n} used chains");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// (id, len) of used ring entry `i`.
    fn used(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
        let at = q.used_addr().unchecked_add(4 + 8 * i);
        (m.read_obj(at).unwrap(), m.read_obj(at.unchecked_add(4)).unwrap())
    }

    #[test]
    fn requests_round_trip_through_the_disks_own_worker() {
        let f = disk_file(8);
        let mut b = Block::open(f.path(), false, "sbx-test-disk").unwrap();
        assert_eq!(b.sectors(), 8);
        let m = mem();
        // Four requests, each with its own header and status byte: write
        // sector 3, read it back, flush, and a read past the end.
        let hdr = |i: u64| HDR + 0x100 * i;
        let status = |i: u64| STATUS + 0x100 * i;
        for (i, (kind, sector)) in [(T_OUT, 3u64), (T_IN, 3), (T_FLUSH, 0), (T_IN, 8)].into_iter().enumerate() {
            let mut h = [0u8; outhdr::LEN];
            h[outhdr::TYPE].copy_from_slice(&kind.to_le_bytes());
            h[outhdr::SECTOR].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(hdr(i as u64))).unwrap();
            m.write_obj(0xffu8, GuestAddress(status(i as u64))).unwrap();
        }
        m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let mut descs = chain_at(0, &[desc(hdr(0), 16, false), desc(DATA, 512, false), desc(status(0), 1, true)]);
        descs.extend(chain_at(3, &[desc(hdr(1), 16, false), desc(DATA + 0x1000, 512, true), desc(status(1), 1, true)]));
        descs.extend(chain_at(6, &[desc(hdr(2), 16, false), desc(status(2), 1, true)]));
        descs.extend(chain_at(8, &[desc(hdr(3), 16, false), desc(DATA + 0x2000, 512, true), desc(status(3), 1, true)]));
        let mock = MockSplitQueue::create(&m, GuestAddress(0x40_000), 16);
        mock.add_desc_chains(&descs, 0).unwrap();
        let irq = Arc::new(Count::default());
        b.device.activate(m.clone(), vec![mock.create_queue().unwrap()], irq.clone()).unwrap();
        b.device.queue_notify(0);
        wait_used(&m, &mock, 4);
        let statuses: Vec<u8> = (0..4).map(|i| m.read_obj(GuestAddress(status(i))).unwrap()).collect();
        assert_eq!(statuses, [S_OK, S_OK, S_OK, S_IOERR], "the read past the end fails with IOERR");
        assert_eq!((0..4).map(|i| used(&m, &mock, i).1).collect::<Vec<_>>(), [1, 513, 1, 1]);
        let mut back = [0u8; 512];
        m.read_slice(&mut back, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(back, [0x5a; 512], "what was written is read back");
        let file = std::fs::read(f.path()).unwrap();
        assert!(file[3 * 512..4 * 512].iter().all(|&x| x == 0x5a), "and is in the host file");
        assert!(file[4 * 512..5 * 512].iter().all(|&x| x == 4), "the next sector is untouched");
        assert!(irq.count() >= 1, "the guest was interrupted");
        b.device.reset();
        drop(b);
    }
}
