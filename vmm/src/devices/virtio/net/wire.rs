//! Host side: virtio-net's wire layout (virtio 1.x, section 5.1.6), as the
//! guest (untrusted) writes it: the header before every frame
//! ([`NetHdr`], struct virtio_net_hdr_v1) and the config space the device
//! offers, as zerocopy structs of little-endian fields, checked at compile
//! time against virtio-bindings' layouts. Decoding is bounded: a buffer
//! shorter than a header is refused ([`NetHdr::parse`] is None).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_net::{virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_S_LINK_UP};
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// struct virtio_net_hdr_v1 as it is on the wire. No offload feature is
/// offered, so on transmit only its length matters; on receive the device
/// sets `num_buffers` alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: U16,
    pub gso_size: U16,
    pub csum_start: U16,
    pub csum_offset: U16,
    /// Buffers (chains) the received frame spans.
    pub num_buffers: U16,
}

/// The header's length.
pub const HDR_LEN: usize = size_of::<NetHdr>();

// The declared layout is the kernel's (virtio-bindings').
const _: () = assert!(HDR_LEN == size_of::<virtio_net_hdr_v1>());
const _: () = assert!(offset_of!(NetHdr, gso_size) == offset_of!(virtio_net_hdr_v1, gso_size));
const _: () = assert!(offset_of!(NetHdr, num_buffers) == offset_of!(virtio_net_hdr_v1, num_buffers));

impl NetHdr {
    /// The header at the start of `b`; None if `b` is shorter than one.
    pub fn parse(b: &[u8]) -> Option<NetHdr> {
        NetHdr::read_from_prefix(b).ok().map(|(h, _)| h)
    }
}

/// struct virtio_net_config up to and including `mtu` (the config space
/// offered).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Config {
    mac: [u8; 6],
    status: U16,
    max_virtqueue_pairs: U16,
    mtu: U16,
}

const _: () = assert!(offset_of!(Config, status) == offset_of!(virtio_net_config, status));
const _: () = assert!(offset_of!(Config, max_virtqueue_pairs) == offset_of!(virtio_net_config, max_virtqueue_pairs));
const _: () = assert!(offset_of!(Config, mtu) == offset_of!(virtio_net_config, mtu));

/// The config space: the MAC, the link up, one queue pair, the MTU.
pub(super) fn config_bytes(mac: [u8; 6], mtu: u16) -> Vec<u8> {
    let c =
        Config { mac, status: (VIRTIO_NET_S_LINK_UP as u16).into(), max_virtqueue_pairs: 1.into(), mtu: mtu.into() };
    c.as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_header_decodes_and_a_short_one_is_refused() {
        // flags 1 (NEEDS_CSUM), gso 0, hdr_len 14, gso_size 0x0102,
        // csum_start 34, csum_offset 16, num_buffers 1; then the frame.
        let b = [1, 0, 14, 0, 2, 1, 34, 0, 16, 0, 1, 0, 0xff, 0xff];
        let want = NetHdr {
            flags: 1,
            gso_type: 0,
            hdr_len: 14.into(),
            gso_size: 0x0102.into(),
            csum_start: 34.into(),
            csum_offset: 16.into(),
            num_buffers: 1.into(),
        };
        assert_eq!(NetHdr::parse(&b), Some(want));
        assert_eq!(want.as_bytes(), &b[..HDR_LEN], "and encodes back to the same bytes");
        assert_eq!(NetHdr::parse(&b[..HDR_LEN - 1]), None, "a short header is refused");
        assert_eq!(HDR_LEN, 12);
    }

    #[test]
    fn the_receive_header_says_one_buffer() {
        let h = NetHdr { num_buffers: 1.into(), ..NetHdr::default() };
        assert_eq!(h.as_bytes(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn the_config_space_is_mac_status_pairs_mtu() {
        let c = config_bytes([2, 1, 2, 3, 4, 5], 1500);
        assert_eq!(c, [2, 1, 2, 3, 4, 5, VIRTIO_NET_S_LINK_UP as u8, 0, 1, 0, 0xdc, 0x05]);
    }
}
