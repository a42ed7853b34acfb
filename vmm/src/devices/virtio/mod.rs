//! Host side: virtio devices. A device (what it does with its queues) is
//! kept apart from the transport the guest reaches it through
//! ([`mmio::MmioTransport`]); a device knows nothing of MMIO. Queues are
//! `virtio-queue`'s, so descriptor chains from the guest (untrusted) are
//! walked with its bounds checks.
//!
//! One framework for every device: a device is a [`worker::QueueHandler`]
//! (its work on its queues) run on a thread of its own kind by
//! [`worker::Worker`], behind the one [`VirtioDevice`] implementation,
//! [`device::WorkerDevice`] (its declaration, [`device::Spec`], and its
//! config bytes). Chains are read and written through one bounded copier
//! ([`chain::Chain`]). Protocol constants come from `virtio-bindings`
//! where it has them (IDs, feature bits, block request types and status,
//! the MMIO registers).
//!
//! Each device is a folder: `<device>/mod.rs` (its [`worker::QueueHandler`]
//! and [`device::Spec`]) and `<device>/wire.rs`, its declared wire layout
//! (the headers it decodes from the guest and the config space it offers,
//! as zerocopy structs of little-endian fields or named byte ranges,
//! checked at compile time against virtio-bindings' structs where the
//! crate has them; vsock's and virtio-fs's it has not). A header is
//! decoded only through its layout, and a short buffer is refused.

pub mod block;
pub mod chain;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::control::Stop;

/// Feature bit every device must offer and the driver must accept: the
/// modern (virtio 1.x) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("Device {0} needs {1} queues ready, got {2}")]
    QueueCount(&'static str, usize, usize),
    #[error("Device {0} cannot start: {1}")]
    Failed(&'static str, String),
}

/// How a device tells the guest it has used buffers or changed its config.
pub trait Interrupt: Send + Sync {
    fn signal_used_queue(&self);
    fn signal_config_change(&self);
}

pub trait VirtioDevice: Send {
    /// Short name for errors and logs.
    fn name(&self) -> &'static str;
    /// Virtio device ID (2 block, 1 net, 19 vsock, 26 fs...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; their number is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of `features()`, checked
    /// by the transport). Ours behave the same whatever is accepted.
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with its ready queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The guest notified queue `index` (through an MMIO exit).
    fn queue_notify(&mut self, index: u16);
    /// An eventfd the device's own thread waits on for notifications of
    /// any queue: the VMM then registers it with KVM (ioeventfd) so that
    /// notifying never leaves the kernel. None: notifications come
    /// through [`VirtioDevice::queue_notify`] on the vCPU thread.
    fn notify_event(&self) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
    /// Back to the state before activation.
    fn reset(&mut self);
    /// The VM's stop switch, for a device whose worker thread fails
    /// (panics) to stop the VM with the reason.
    fn attach_stop(&self, _stop: &Arc<Stop>) {}
}

/// Copies a device's config space at `offset` into `data`; bytes past its
/// end (or an offset that overflows) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
    }
}

#[cfg(test)]
pub mod test_utils {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::Interrupt;

    /// Counts the interrupts a device raises.
    #[derive(Default)]
    pub struct CountingInterrupt(pub AtomicUsize);

    impl CountingInterrupt {
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Interrupt for CountingInterrupt {
        fn signal_used_queue(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config_change(&self) {}
    }
}
