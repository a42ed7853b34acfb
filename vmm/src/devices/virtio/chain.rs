//! Host side: the one bounded copier between a guest's descriptor chain
//! and the device. A chain (untrusted: the guest wrote its table) is
//! walked once, at most a given number of descriptors ([`Chain::walk`]:
//! virtio-queue's iterator already ends a chain that loops or leaves the
//! table; the bound here keeps what is collected to the device's queue
//! size), into its buffers in order. Then:
//!
//! - [`Chain::parts`]: the readable part and the writable part, refused
//!   ([`ChainError::ReadableAfterWritable`]) where a readable buffer comes
//!   after a writable one (the spec's order: the device reads, then writes);
//! - [`Chain::read_all`]: the readable part into a new buffer, refused
//!   ([`ChainError::TooLong`]) — never truncated — past a maximum;
//! - [`Chain::write_all`]: bytes into the writable part, refused
//!   ([`ChainError::NoRoom`]) if they do not fit: nothing is written past
//!   the part, and a partial write is reported as an error, not a length.
//!
//! Every access goes through vm-memory's checked reads and writes
//! ([`ChainError::GuestMemory`] for a buffer outside guest memory); lengths
//! are summed in u64 so no chain overflows them.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

/// Why a chain cannot be used as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChainError {
    #[error("the chain has a device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has device-writable buffers where only readable ones are allowed")]
    UnexpectedWritable,
    #[error("the chain has device-readable buffers where only writable ones are allowed")]
    UnexpectedReadable,
    #[error("the chain's readable part ({len} bytes) is over the {max}-byte limit")]
    TooLong { len: u64, max: u64 },
    #[error("the chain's writable part ({room} bytes) cannot hold {len} bytes")]
    NoRoom { len: u64, room: u64 },
    #[error("a buffer of the chain is outside guest memory")]
    GuestMemory,
}

/// A descriptor chain, walked once: its head and buffers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub bufs: Vec<Buf>,
}

fn total(bufs: &[Buf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

impl Chain {
    /// The first `max_descs` buffers of `chain` (a queue's size: a chain
    /// cannot be longer without looping).
    pub fn walk(chain: DescriptorChain<&GuestMemoryMmap>, max_descs: usize) -> Chain {
        let head = chain.head_index();
        let bufs = chain.take(max_descs).map(|d| Buf { addr: d.addr(), len: d.len(), writable: d.is_write_only() });
        Chain { head, bufs: bufs.collect() }
    }

    /// The readable part, then the writable part.
    pub fn parts(&self) -> Result<(&[Buf], &[Buf]), ChainError> {
        let split = self.bufs.iter().position(|b| b.writable).unwrap_or(self.bufs.len());
        let (readable, writable) = self.bufs.split_at(split);
        if writable.iter().any(|b| !b.writable) {
            return Err(ChainError::ReadableAfterWritable);
        }
        Ok((readable, writable))
    }

    /// The readable part, refused if the chain has a writable part.
    pub fn readable_only(&self) -> Result<&[Buf], ChainError> {
        match self.parts()? {
            (r, []) => Ok(r),
            _ => Err(ChainError::UnexpectedWritable),
        }
    }

    /// The writable part, refused if the chain has a readable part.
    pub fn writable_only(&self) -> Result<&[Buf], ChainError> {
        match self.parts()? {
            ([], w) => Ok(w),
            _ => Err(ChainError::UnexpectedReadable),
        }
    }

    /// Bytes the device may write into the chain.
    pub fn room(&self) -> Result<u64, ChainError> {
        Ok(total(self.parts()?.1))
    }

    /// The readable part's bytes, at most `max` of them (more: refused).
    pub fn read_all(&self, mem: &GuestMemoryMmap, max: usize) -> Result<Vec<u8>, ChainError> {
        read_bufs(mem, self.parts()?.0, max)
    }

    /// Writes `parts` one after the other across the writable part;
    /// returns the bytes written (all of them) or refuses before writing
    /// if they do not fit.
    pub fn write_all(&self, mem: &GuestMemoryMmap, parts: &[&[u8]]) -> Result<u32, ChainError> {
        write_bufs(mem, self.parts()?.1, parts)
    }
}

/// The bytes of `bufs`, at most `max` of them (more: refused).
pub fn read_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], max: usize) -> Result<Vec<u8>, ChainError> {
    let len = total(bufs);
    if len > max as u64 {
        return Err(ChainError::TooLong { len, max: max as u64 });
    }
    let mut out = vec![0u8; len as usize];
    let mut at = 0usize;
    for b in bufs {
        let end = at + b.len as usize;
        mem.read_slice(&mut out[at..end], b.addr).map_err(|_| ChainError::GuestMemory)?;
        at = end;
    }
    Ok(out)
}

/// Writes `parts` one after the other across `bufs` (all of them, or
/// nothing if they do not fit); returns the bytes written.
pub fn write_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], parts: &[&[u8]]) -> Result<u32, ChainError> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let room = total(bufs);
    if len > room || len > u64::from(u32::MAX) {
        return Err(ChainError::NoRoom { len, room });
    }
    let mut bufs = bufs.iter().filter(|b| b.len > 0);
    let (mut addr, mut left) = (GuestAddress(0), 0u64);
    for part in parts {
        let mut part = *part;
        while !part.is_empty() {
            if left == 0 {
                // Enough room was checked above.
                let Some(b) = bufs.next() else { return Err(ChainError::NoRoom { len, room }) };
                (addr, left) = (b.addr, u64::from(b.len));
            }
            let n = (part.len() as u64).min(left) as usize;
            mem.write_slice(&part[..n], addr).map_err(|_| ChainError::GuestMemory)?;
            addr = addr.checked_add(n as u64).ok_or(ChainError::GuestMemory)?;
            left -= n as u64;
            part = &part[n..];
        }
    }
    Ok(len as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    const MEM: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    /// (addr, len, writable) descriptors chained in order.
    fn chain_of(m: &GuestMemoryMmap, descs: &[(u64, u32, bool)], max: usize) -> Chain {
        let q = MockSplitQueue::create(m, GuestAddress(0x40_000), 16);
        let n = descs.len();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i as u16 + 1))
            })
            .collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        Chain::walk(queue.pop_descriptor_chain(m).unwrap(), max)
    }

    #[test]
    fn reads_the_readable_part_and_writes_the_writable_part() {
        let m = mem();
        m.write_slice(b"hello ", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x2000)).unwrap();
        let c = chain_of(&m, &[(0x1000, 6, false), (0x2000, 5, false), (0x3000, 3, true), (0x4000, 8, true)], 16);
        assert_eq!(c.read_all(&m, 11).unwrap(), b"hello world");
        assert_eq!(c.room(), Ok(11));
        assert_eq!(c.write_all(&m, &[b"ab", b"cdefg"]), Ok(7));
        let mut got = [0u8; 4];
        m.read_slice(&mut got[..3], GuestAddress(0x3000)).unwrap();
        m.read_slice(&mut got[3..], GuestAddress(0x4000)).unwrap();
        assert_eq!(&got, b"abcd");
        assert_eq!(c.readable_only(), Err(ChainError::UnexpectedWritable));
        assert_eq!(c.writable_only(), Err(ChainError::UnexpectedReadable));
    }

    #[test]
    fn a_readable_part_over_the_limit_is_refused_not_truncated() {
        let m = mem();
        let c = chain_of(&m, &[(0x1000, 600, false), (0x2000, 600, false)], 16);
        assert_eq!(c.read_all(&m, 1199), Err(ChainError::TooLong { len: 1200, max: 1199 }));
        assert_eq!(c.read_all(&m, 1200).map(|v| v.len()), Ok(1200));
        // Lengths near u32::MAX are refused before any allocation.
        let c = chain_of(&m, &[(0x1000, u32::MAX, false), (0x2000, u32::MAX, false)], 16);
        assert!(matches!(c.read_all(&m, 1 << 20), Err(ChainError::TooLong { len, .. }) if len >= u64::from(u32::MAX)));
    }

    #[test]
    fn more_descriptors_than_the_bound_are_not_walked() {
        let m = mem();
        let descs: Vec<(u64, u32, bool)> = (0..10).map(|i| (0x1000 + i * 0x100, 1, false)).collect();
        let c = chain_of(&m, &descs, 4);
        assert_eq!(c.bufs.len(), 4, "only the first four are collected");
    }

    #[test]
    fn a_write_only_buffer_in_the_read_part_is_refused() {
        let m = mem();
        let c = chain_of(&m, &[(0x1000, 16, false), (0x2000, 16, true), (0x3000, 16, false)], 16);
        assert_eq!(c.parts(), Err(ChainError::ReadableAfterWritable));
        assert_eq!(c.read_all(&m, 1024), Err(ChainError::ReadableAfterWritable));
        assert_eq!(c.write_all(&m, &[b"x"]), Err(ChainError::ReadableAfterWritable));
        let c = chain_of(&m, &[(0x1000, 16, true)], 16);
        assert_eq!(c.readable_only(), Err(ChainError::UnexpectedWritable));
    }

    #[test]
    fn a_writable_part_too_small_is_refused_before_any_write() {
        let m = mem();
        m.write_slice(&[0xee; 8], GuestAddress(0x3000)).unwrap();
        let c = chain_of(&m, &[(0x3000, 4, true), (0x4000, 2, true)], 16);
        assert_eq!(c.write_all(&m, &[b"abcd", b"efg"]), Err(ChainError::NoRoom { len: 7, room: 6 }));
        let mut got = [0u8; 4];
        m.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, [0xee; 4], "nothing was written");
    }

    #[test]
    fn zero_length_buffers_hold_nothing_and_are_skipped() {
        let m = mem();
        let c = chain_of(&m, &[(0x1000, 0, false)], 16);
        assert_eq!(c.read_all(&m, 0), Ok(vec![]));
        assert_eq!(c.write_all(&m, &[b"x"]), Err(ChainError::NoRoom { len: 1, room: 0 }));
        let c = chain_of(&m, &[(0x3000, 0, true), (0x4000, 2, true)], 16);
        assert_eq!(c.write_all(&m, &[b"ab"]), Ok(2));
        let mut got = [0u8; 2];
        m.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(&got, b"ab");
        assert_eq!(c.write_all(&m, &[]), Ok(0));
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let m = mem();
        let c = chain_of(&m, &[(MEM as u64 - 4, 16, false)], 16);
        assert_eq!(c.read_all(&m, 64), Err(ChainError::GuestMemory));
        let c = chain_of(&m, &[(MEM as u64 - 4, 16, true)], 16);
        assert_eq!(c.write_all(&m, &[&[0u8; 16]]), Err(ChainError::GuestMemory));
    }
}
