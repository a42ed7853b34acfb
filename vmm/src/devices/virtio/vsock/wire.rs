//! Host side: virtio-vsock's wire layout (virtio 1.x, section 5.10.6;
//! linux/virtio_vsock.h), as the guest (untrusted) writes it: the packet
//! header as a zerocopy struct of little-endian fields ([`RawHdr`]), its
//! type, ops and shutdown flags, and the config space (le64 `guest_cid`).
//! virtio-bindings has no virtio_vsock.h, so they are declared here.
//! Decoding is bounded: a buffer shorter than a header is refused
//! ([`Hdr::parse`] is None), nothing panics.

use std::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const HDR_LEN: usize = 44;
pub(super) const TYPE_STREAM: u16 = 1;
pub(super) const OP_REQUEST: u16 = 1;
pub(super) const OP_RESPONSE: u16 = 2;
pub(super) const OP_RST: u16 = 3;
pub(super) const OP_SHUTDOWN: u16 = 4;
pub(super) const OP_RW: u16 = 5;
pub(super) const OP_CREDIT_UPDATE: u16 = 6;
pub(super) const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more (RCV), send no more (SEND).
pub(super) const SHUTDOWN_RCV: u32 = 1;
pub(super) const SHUTDOWN_SEND: u32 = 2;

/// struct virtio_vsock_hdr as it is on the wire (packed, little endian).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHdr {
    pub src_cid: U64,
    pub dst_cid: U64,
    pub src_port: U32,
    pub dst_port: U32,
    pub len: U32,
    pub type_: U16,
    pub op: U16,
    pub flags: U32,
    pub buf_alloc: U32,
    pub fwd_cnt: U32,
}

const _: () = assert!(size_of::<RawHdr>() == HDR_LEN);

/// struct virtio_vsock_config: the guest's CID.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Config {
    guest_cid: U64,
}

/// The config space offered: the guest's CID.
pub(super) fn config_bytes(guest_cid: u64) -> Vec<u8> {
    Config { guest_cid: guest_cid.into() }.as_bytes().to_vec()
}

/// struct virtio_vsock_hdr, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// The header at the start of `b`; None if `b` is shorter than one.
    pub fn parse(b: &[u8]) -> Option<Hdr> {
        let (r, _) = RawHdr::read_from_prefix(b).ok()?;
        Some(Hdr {
            src_cid: r.src_cid.get(),
            dst_cid: r.dst_cid.get(),
            src_port: r.src_port.get(),
            dst_port: r.dst_port.get(),
            len: r.len.get(),
            kind: r.type_.get(),
            op: r.op.get(),
            flags: r.flags.get(),
            buf_alloc: r.buf_alloc.get(),
            fwd_cnt: r.fwd_cnt.get(),
        })
    }

    /// The header as it goes on the wire.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let r = RawHdr {
            src_cid: self.src_cid.into(),
            dst_cid: self.dst_cid.into(),
            src_port: self.src_port.into(),
            dst_port: self.dst_port.into(),
            len: self.len.into(),
            type_: self.kind.into(),
            op: self.op.into(),
            flags: self.flags.into(),
            buf_alloc: self.buf_alloc.into(),
            fwd_cnt: self.fwd_cnt.into(),
        };
        zerocopy::transmute!(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_guest(to_port: u32, op: u16, len: u32) -> Hdr {
        Hdr { src_cid: 3, dst_cid: 2, src_port: 1024, dst_port: to_port, len, kind: TYPE_STREAM, op, ..Hdr::default() }
    }

    #[test]
    fn headers_round_trip_and_short_ones_are_refused() {
        let h = from_guest(9, OP_RW, 4);
        assert_eq!(Hdr::parse(&h.bytes()), Some(h));
        assert_eq!(Hdr::parse(&h.bytes()[..43]), None);
    }

    #[test]
    fn a_known_header_decodes_and_a_short_one_is_refused() {
        #[rustfmt::skip]
        let b: [u8; HDR_LEN + 2] = [
            3, 0, 0, 0, 0, 0, 0, 0, // src_cid 3
            2, 0, 0, 0, 0, 0, 0, 0, // dst_cid 2
            0x00, 0x04, 0, 0, // src_port 1024
            0x01, 0x00, 0x00, 0x40, // dst_port 0x4000_0001
            5, 0, 0, 0, // len 5
            1, 0, // type STREAM
            5, 0, // op RW
            3, 0, 0, 0, // flags
            0, 0, 4, 0, // buf_alloc 256 KiB
            0x78, 0x56, 0x34, 0x12, // fwd_cnt
            0xaa, 0xbb, // the payload: not the header's
        ];
        let want = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 0x4000_0001,
            len: 5,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0x1234_5678,
        };
        assert_eq!(Hdr::parse(&b), Some(want));
        assert_eq!(want.bytes(), b[..HDR_LEN], "and encodes back to the same bytes");
        assert_eq!(Hdr::parse(&b[..HDR_LEN - 1]), None, "a short header is refused");
        assert_eq!(Hdr::parse(&[]), None);
    }

    #[test]
    fn the_config_space_is_the_guests_cid() {
        assert_eq!(config_bytes(3), 3u64.to_le_bytes());
    }
}
