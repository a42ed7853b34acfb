//! Host side: the boundary between the guest's NIC and what is behind it.
//! vmm's virtio-net device (`vmm::devices::virtio::net`) moves the guest's
//! Ethernet frames to and from a [`FrameBackend`] and knows nothing else
//! of it; netstack implements one (`netstack::backend::NetBackend`). The
//! trait lives in its own crate so that neither of the two depends on the
//! other: vmm stays free of the network stack, netstack of KVM, and the
//! CLI only wires one to the other (it is not in the data path).
//!
//! Trust: every frame passed to [`FrameBackend::send_to_backend`] comes
//! from the guest and is untrusted; the device has only checked its size
//! (at least [`ETH_HDR_LEN`] bytes, at most the MTU plus that).
#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::time::Instant;

/// The Ethernet header every frame starts with (no VLAN tag, no FCS).
pub const ETH_HDR_LEN: usize = 14;

/// A host descriptor a handler waits on, and for what. `key` names it to
/// the handler; a new descriptor needs a new key (a closed descriptor's
/// number can come back as another one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub key: u64,
    pub fd: RawFd,
    pub read: bool,
    pub write: bool,
}

/// The other end of the guest's NIC: where the guest's frames go and
/// where frames for it come from. The device's worker thread owns it and
/// calls it from that thread only. It is run by events: after frames
/// arrive, when one of its [`FrameBackend::interests`] is ready, and at
/// its [`FrameBackend::next_deadline`]; it must not need anything else.
pub trait FrameBackend: Send + 'static {
    /// A frame the guest sent (untrusted): an Ethernet frame, at least
    /// [`ETH_HDR_LEN`] bytes and at most the MTU plus that.
    fn send_to_backend(&mut self, frame: Vec<u8>);
    /// The next frame for the guest, if one is ready.
    fn receive(&mut self) -> Option<Vec<u8>>;
    /// Runs the backend's protocols, timers and host I/O up to `now`.
    fn poll(&mut self, now: Instant);
    /// When [`FrameBackend::poll`] must run next even if nothing else
    /// happens; None: only when something does.
    fn next_deadline(&mut self, now: Instant) -> Option<Instant>;
    /// Host descriptors whose readiness means `poll` has work (keys are
    /// the backend's own, at most the device worker's limit,
    /// `vmm::devices::virtio::worker::MAX_INTEREST_KEY`).
    fn interests(&mut self, out: &mut Vec<Interest>);
}
