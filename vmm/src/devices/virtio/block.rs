//! Host side: virtio-blk (virtio 1.x, section 5.2) backed by a host file.
//! Requests are served on the vCPU thread that notified the queue. Every
//! descriptor chain comes from the guest (untrusted): its shape, the
//! direction of each buffer, its sizes and the sector range are checked
//! before any host I/O, a bad request fails with IOERR (or is returned
//! unused when it has no status byte), nothing panics. A read-only disk is
//! opened read-only on the host, so no guest request can change it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{read_config_bytes, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const DEVICE_TYPE_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 256;
/// Data segments per request we tell the driver it may use.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request (bounds the bounce buffer).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// The bounce buffer between the disk file and guest memory.
const BOUNCE_BYTES: usize = 64 * 1024;
/// Length of the GET_ID answer.
const ID_BYTES: usize = 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot open disk {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("Disk {0} is smaller than one sector")]
    Empty(PathBuf),
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

pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    interrupt: Option<Arc<dyn Interrupt>>,
    buf: Vec<u8>,
    /// Failed requests by cause (for tests and figures).
    pub refusals: Vec<Refusal>,
}

impl Block {
    /// A disk backed by `path`; `id` is what GET_ID returns (truncated to
    /// 20 bytes). The host file is opened read-only when `read_only`.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, Error> {
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
        Ok(Block {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
            id: idb,
            mem: None,
            queue: None,
            interrupt: None,
            buf: vec![0u8; BOUNCE_BYTES],
            refusals: Vec::new(),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&(MAX_REQUEST_BYTES as u32).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Serves every available request; signals the guest if it wants it.
    pub fn process_queue(&mut self) {
        let (Some(mem), Some(mut queue)) = (self.mem.clone(), self.queue.take()) else { return };
        let mut used_any = false;
        loop {
            let chain = match queue.iter(&mem) {
                Ok(mut it) => it.next(),
                // The avail ring cannot be read: nothing more to do.
                Err(_) => None,
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            // The iterator ends a chain that loops or leaves the table;
            // at most queue-size descriptors are collected.
            let descs: Vec<(GuestAddress, u32, bool)> =
                chain.take(QUEUE_SIZE as usize + 1).map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
            let used_len = match self.serve(&mem, &descs) {
                Ok(len) => len,
                Err((refusal, len)) => {
                    if self.refusals.len() < 1024 {
                        self.refusals.push(refusal);
                    }
                    len
                }
            };
            // A used ring we cannot write to: the guest broke its own queue.
            if queue.add_used(&mem, head, used_len).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            if let Some(i) = &self.interrupt {
                i.signal_used_queue();
            }
        }
        self.queue = Some(queue);
    }

    /// Serves one request. Ok: bytes written into the chain; Err: why it
    /// failed and the bytes written (the status byte, if there is one).
    fn serve(&mut self, mem: &GuestMemoryMmap, descs: &[(GuestAddress, u32, bool)]) -> Result<u32, (Refusal, u32)> {
        let Some(&(status_addr, status_len, true)) = descs.last().filter(|_| descs.len() >= 2) else {
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
        let (hdr_addr, hdr_len, hdr_writable) = descs[0];
        if hdr_writable || hdr_len < 16 {
            return fail(mem, Refusal::BadHeader);
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, hdr_addr).is_err() {
            return fail(mem, Refusal::GuestMemory);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
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
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32, bool)],
        sector: u64,
        to_guest: bool,
    ) -> Result<u32, Refusal> {
        if data.iter().any(|d| d.2 != to_guest) {
            return Err(Refusal::BadDirection);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
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
        for &(addr, len, _) in data {
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

    fn get_id(&self, mem: &GuestMemoryMmap, data: &[(GuestAddress, u32, bool)]) -> Result<u32, Refusal> {
        let &[(addr, len, true)] = data else { return Err(Refusal::BadDirection) };
        let n = (len as usize).min(ID_BYTES);
        mem.write_slice(&self.id[..n], addr).map_err(|_| Refusal::GuestMemory)?;
        Ok(n as u32)
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "block"
    }
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_SEG_MAX | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the block config is writable (no WCE feature offered).
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount("block", 1, queues.len()));
        }
        self.queue = queues.pop();
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        Ok(())
    }
    fn queue_notify(&mut self, _index: u16) {
        self.process_queue();
    }
    fn reset(&mut self) {
        self.queue = None;
        self.mem = None;
        self.interrupt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const HDR: u64 = 0x10_000;
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;
    const MEM: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn disk(sectors: u64, read_only: bool) -> (tempfile::NamedTempFile, Block) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        let b = Block::open(f.path(), read_only, "sbx-test-disk").unwrap();
        (f, b)
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Puts one request chain on a fresh queue, runs the device, returns
    /// (status byte, used length, interrupts).
    fn run(b: &mut Block, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32, usize) {
        let mock = MockSplitQueue::create(m, GuestAddress(0x40_000), 16);
        let mut chained = descs.to_vec();
        let n = chained.len();
        for (i, d) in chained.iter_mut().enumerate() {
            let sd = SplitDescriptor::from(*d);
            let flags = if i + 1 < n { sd.flags() | VRING_DESC_F_NEXT as u16 } else { sd.flags() };
            *d = RawDescriptor::from(SplitDescriptor::new(sd.addr().0, sd.len(), flags, i as u16 + 1));
        }
        mock.add_desc_chains(&chained, 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let irq = Arc::new(Count::default());
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        b.activate(m.clone(), vec![q], irq.clone()).unwrap();
        b.queue_notify(0);
        let used_len: u32 = m.read_obj(mock.used_addr().unchecked_add(8)).unwrap();
        let status: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
        (status, used_len, irq.count())
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
        let (_f, b) = disk(8, true);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut past = [0xffu8; 8];
        b.read_config(12, &mut past);
        assert_eq!(&past[4..], &[0, 0, 0, 0], "past the end reads as zero");
        b.read_config(u64::MAX, &mut past);
        assert_ne!(b.features() & F_RO, 0);
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
        b.activate(m.clone(), vec![q], Arc::new(Count::default())).unwrap();
        b.queue_notify(0);
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
}
