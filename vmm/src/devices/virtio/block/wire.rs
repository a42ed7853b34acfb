//! Host side: virtio-blk's wire layout (virtio 1.x, section 5.2.6), as
//! the guest (untrusted) writes it: the request header ([`outhdr`], its
//! fields as named byte ranges, checked at compile time against
//! virtio-bindings' `virtio_blk_outhdr`), the request types and status
//! bytes, and the config space the device offers. Decoding is bounded: a
//! short header is refused ([`OutHdr::parse`] is None), nothing panics.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

pub(super) const T_IN: u32 = VIRTIO_BLK_T_IN;
pub(super) const T_OUT: u32 = VIRTIO_BLK_T_OUT;
pub(super) const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
pub(super) const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;

pub(super) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The config space offered: `capacity`, `size_max`, `seg_max`.
pub(super) const CONFIG_LEN: usize = offset_of!(virtio_blk_config, seg_max) + 4;

/// struct virtio_blk_outhdr, the request header, as it is on the wire
/// (little endian): where each field is.
pub mod outhdr {
    use std::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    /// `ioprio` in the header; the spec's `reserved`: ignored.
    pub const RESERVED: Range<usize> = 4..8;
    pub const SECTOR: Range<usize> = 8..16;
    pub const LEN: usize = 16;
}

// The declared layout is the kernel's (virtio-bindings').
const _: () = assert!(size_of::<virtio_blk_outhdr>() == outhdr::LEN);
const _: () = assert!(offset_of!(virtio_blk_outhdr, type_) == outhdr::TYPE.start);
const _: () = assert!(offset_of!(virtio_blk_outhdr, ioprio) == outhdr::RESERVED.start);
const _: () = assert!(offset_of!(virtio_blk_outhdr, sector) == outhdr::SECTOR.start);

/// A request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHdr {
    pub kind: u32,
    pub sector: u64,
}

impl OutHdr {
    /// The header at the start of `b`; None if `b` is shorter than one.
    pub fn parse(b: &[u8]) -> Option<OutHdr> {
        let b = b.get(..outhdr::LEN)?;
        let kind = u32::from_le_bytes(b.get(outhdr::TYPE)?.try_into().ok()?);
        let sector = u64::from_le_bytes(b.get(outhdr::SECTOR)?.try_into().ok()?);
        Some(OutHdr { kind, sector })
    }
}

/// struct virtio_blk_config up to `seg_max`.
pub(super) fn config_bytes(sectors: u64, size_max: u32, seg_max: u32) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
    put(offset_of!(virtio_blk_config, capacity), &sectors.to_le_bytes());
    put(offset_of!(virtio_blk_config, size_max), &size_max.to_le_bytes());
    put(offset_of!(virtio_blk_config, seg_max), &seg_max.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_read_through_its_declared_layout() {
        let mut h = [0u8; outhdr::LEN + 4];
        h[outhdr::TYPE].copy_from_slice(&T_GET_ID.to_le_bytes());
        h[outhdr::RESERVED].copy_from_slice(&u32::MAX.to_le_bytes());
        h[outhdr::SECTOR].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(OutHdr::parse(&h), Some(OutHdr { kind: T_GET_ID, sector: 0x0102_0304_0506_0708 }));
        assert_eq!(OutHdr::parse(&h[..outhdr::LEN - 1]), None, "a short header is refused");
    }

    #[test]
    fn a_known_header_decodes_and_a_short_one_is_refused() {
        // type IN (0), ioprio 7 (ignored), sector 0x1122334455667788.
        let h = [0, 0, 0, 0, 7, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11];
        assert_eq!(OutHdr::parse(&h), Some(OutHdr { kind: T_IN, sector: 0x1122_3344_5566_7788 }));
        assert_eq!(OutHdr::parse(&[]), None);
        assert_eq!(OutHdr::parse(&h[..8]), None);
    }

    #[test]
    fn the_config_space_is_capacity_size_max_and_seg_max() {
        let c = config_bytes(0x0102_0304_0506_0708, 4 << 20, 254);
        assert_eq!(c.len(), CONFIG_LEN);
        assert_eq!(&c[0..8], &0x0102_0304_0506_0708u64.to_le_bytes(), "capacity in sectors");
        assert_eq!(&c[8..12], &(4u32 << 20).to_le_bytes(), "size_max");
        assert_eq!(&c[12..16], &254u32.to_le_bytes(), "seg_max");
    }
}
