//! Host side: virtio devices. A device (what it does with its queues) is
//! kept apart from the transport the guest reaches it through
//! ([`mmio::MmioTransport`]); a device knows nothing of MMIO. Queues are
//! `virtio-queue`'s, so descriptor chains from the guest (untrusted) are
//! walked with its bounds checks.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit every device must offer and the driver must accept: the
/// modern (virtio 1.x) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

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
}

/// Copies a device's config space at `offset` into `data`; bytes past its
/// end (or an offset that overflows) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
    }
}

/// What a device's worker thread is told by the device (on the vCPU
/// thread).
pub enum Ctl {
    Activate { mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<dyn Interrupt> },
    Reset,
    Shutdown,
}

/// The device's side of a worker thread that does the device's work: a
/// control channel and a kick eventfd (which KVM may write directly, as an
/// ioeventfd). Dropping it stops and joins the thread.
pub struct Worker {
    kick: Arc<EventFd>,
    ctl: Sender<Ctl>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` running `body(kick, control)`.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(Arc<EventFd>, Receiver<Ctl>) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (ctl, rx) = mpsc::channel();
        let for_thread = kick.clone();
        let thread = thread::Builder::new().name(name.into()).spawn(move || body(for_thread, rx))?;
        Ok(Worker { kick, ctl, thread: Some(thread) })
    }

    /// Hands the device's ready queues to the thread, if there are at
    /// least the `needed` ones.
    pub fn activate(
        &self,
        device: &'static str,
        needed: usize,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() < needed {
            return Err(ActivateError::QueueCount(device, needed, queues.len()));
        }
        self.send(Ctl::Activate { mem, queues, interrupt });
        Ok(())
    }

    pub fn send(&self, c: Ctl) {
        let _ = self.ctl.send(c);
        self.kick();
    }

    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// The kick eventfd, for KVM to write (see `VirtioDevice::notify_event`).
    pub fn notify_event(&self) -> Option<EventFd> {
        self.kick.try_clone().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.send(Ctl::Shutdown);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
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
