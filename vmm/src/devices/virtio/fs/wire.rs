//! Host side: virtio-fs's wire layout (virtio 1.x, section 5.11.4): the
//! config space the device offers (struct virtio_fs_config, read by the
//! guest), as a zerocopy struct; virtio-bindings has no virtio_fs.h, so it
//! is declared here. The FUSE messages on the queues are the file
//! server's ([`crate::fs::fuse`]), not this device's.

use std::mem::size_of;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The filesystem tag's room in config space (NUL-padded, not
/// necessarily NUL-terminated).
pub const TAG_LEN: usize = 36;
/// Request queues offered (besides the high-priority queue).
const NUM_REQUEST_QUEUES: u32 = 1;

/// struct virtio_fs_config: `tag[36]`, then `num_request_queues` (le32).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Config {
    tag: [u8; TAG_LEN],
    num_request_queues: U32,
}

const _: () = assert!(size_of::<Config>() == TAG_LEN + 4);

/// The config space for a share mounted by `tag`; None if the tag is
/// empty or longer than [`TAG_LEN`].
pub(super) fn config_bytes(tag: &str) -> Option<Vec<u8>> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return None;
    }
    let mut c = Config { tag: [0; TAG_LEN], num_request_queues: NUM_REQUEST_QUEUES.into() };
    c.tag[..tag.len()].copy_from_slice(tag.as_bytes());
    Some(c.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_is_the_padded_tag_then_one_request_queue() {
        let c = config_bytes("sbx0").unwrap();
        let mut want = [0u8; TAG_LEN + 4];
        want[..4].copy_from_slice(b"sbx0");
        want[TAG_LEN] = 1;
        assert_eq!(c, want);
        let full = "t".repeat(TAG_LEN);
        assert_eq!(&config_bytes(&full).unwrap()[..TAG_LEN], full.as_bytes(), "a full tag has no NUL");
    }

    #[test]
    fn an_empty_or_overlong_tag_is_refused() {
        assert_eq!(config_bytes(""), None);
        assert_eq!(config_bytes(&"t".repeat(TAG_LEN + 1)), None);
    }
}
