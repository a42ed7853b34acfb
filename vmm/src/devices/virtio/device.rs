//! Host side: the one [`VirtioDevice`] every threaded device is. A device
//! declares what the transport asks of it ([`Spec`]: name, device ID,
//! queue sizes, the queues it needs, features, the thread it runs on), its
//! config space (bytes, and what a driver's write does to them:
//! [`ConfigWrite`]), and a [`QueueHandler`] that does its work on a
//! [`Worker`] thread; [`WorkerDevice`] does the rest the same way for all:
//! activation hands the ready queues to the worker, notifications kick
//! it (or KVM writes its eventfd directly), reset takes the queues back,
//! a panic of the worker stops the VM.
//!
//! Runs on the vCPU thread (the transport's calls) with the driver's
//! values (untrusted): config accesses are bounded to the config bytes,
//! activation with fewer queues than needed is refused.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{QueueHandler, Worker};
use super::{read_config_bytes, ActivateError, Interrupt, VirtioDevice};
use crate::control::Stop;
use crate::threads::{Reach, ThreadKind};

/// What a threaded device is, for the transport and its thread.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name for errors and logs.
    pub name: &'static str,
    /// Virtio device ID (`virtio_ids`).
    pub device_type: u32,
    /// Largest size of each queue; their number is the queue count.
    pub queue_sizes: &'static [u16],
    /// Queues that must be ready at activation (the rest may be unused).
    pub queues_needed: usize,
    /// Features offered (with [`super::VIRTIO_F_VERSION_1`]).
    pub features: u64,
    /// The worker thread's kind (its seccomp filter) and name.
    pub kind: ThreadKind,
    pub thread: &'static str,
}

/// What a driver's write to config space does: the config bytes, the
/// offset and the bytes written (untrusted). Devices whose config is
/// read-only use [`read_only_config`].
pub type ConfigWrite = Box<dyn FnMut(&mut [u8], u64, &[u8]) + Send>;

/// Config space the driver cannot change.
pub fn read_only_config() -> ConfigWrite {
    Box::new(|_, _, _| {})
}

/// A threaded virtio device: its declaration, its config space and its
/// worker. Dropping it stops and joins the worker.
pub struct WorkerDevice {
    spec: Spec,
    config: Vec<u8>,
    on_write: ConfigWrite,
    worker: Worker,
}

impl WorkerDevice {
    /// Starts `handler` on its own thread (`spec.kind`, reaching the host
    /// paths `reach` allows once the jail is on).
    pub fn spawn(
        spec: Spec,
        config: Vec<u8>,
        on_write: ConfigWrite,
        reach: Reach,
        handler: impl QueueHandler,
    ) -> std::io::Result<WorkerDevice> {
        let worker = Worker::spawn(spec.kind, spec.thread, reach, handler)?;
        Ok(WorkerDevice { spec, config, on_write, worker })
    }

    /// Whether the worker thread has ended (stopped, or its handler
    /// panicked).
    pub fn is_finished(&self) -> bool {
        self.worker.is_finished()
    }
}

impl VirtioDevice for WorkerDevice {
    fn name(&self) -> &'static str {
        self.spec.name
    }
    fn device_type(&self) -> u32 {
        self.spec.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.spec.queue_sizes
    }
    fn features(&self) -> u64 {
        self.spec.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (self.on_write)(&mut self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.worker.activate(self.spec.name, self.spec.queues_needed, mem, queues, interrupt)
    }
    fn queue_notify(&mut self, _index: u16) {
        self.worker.kick();
    }
    fn notify_event(&self) -> Option<EventFd> {
        self.worker.notify_event()
    }
    fn reset(&mut self) {
        self.worker.reset();
    }
    fn attach_stop(&self, stop: &Arc<Stop>) {
        self.worker.attach_stop(stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt;
    use crate::devices::virtio::worker::{Active, Wake};
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Seen {
        activated: AtomicUsize,
        queues: AtomicUsize,
        resets: AtomicUsize,
        kicks: AtomicUsize,
    }

    /// Counts what reaches it.
    struct Dummy(Arc<Seen>);

    impl QueueHandler for Dummy {
        fn activated(&mut self, a: &mut Active) {
            self.0.activated.fetch_add(1, Ordering::SeqCst);
            self.0.queues.store(a.queues.len(), Ordering::SeqCst);
        }
        fn reset(&mut self) {
            self.0.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool {
            if wake.queues && active.is_some() {
                self.0.kicks.fetch_add(1, Ordering::SeqCst);
            }
            false
        }
    }

    const SIZES: &[u16] = &[8, 16];

    fn device(on_write: ConfigWrite) -> (WorkerDevice, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let spec = Spec {
            name: "dummy",
            device_type: 42,
            queue_sizes: SIZES,
            queues_needed: 2,
            features: VIRTIO_F_VERSION_1 | 1,
            kind: ThreadKind::Vsock,
            thread: "virtio-dummy",
        };
        (WorkerDevice::spawn(spec, vec![1, 2, 3, 4], on_write, Reach::Unconfined, Dummy(seen.clone())).unwrap(), seen)
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn queues(n: usize) -> Vec<Queue> {
        (0..n).map(|_| Queue::new(8).unwrap()).collect()
    }

    #[test]
    fn declares_what_its_spec_says() {
        let (d, _) = device(read_only_config());
        assert_eq!((d.name(), d.device_type(), d.queue_max_sizes()), ("dummy", 42, SIZES));
        assert_eq!(d.features(), VIRTIO_F_VERSION_1 | 1);
        assert!(d.notify_event().is_some(), "threaded devices take notifications by eventfd");
    }

    #[test]
    fn activation_hands_the_queues_over_and_reset_takes_them_back() {
        let (mut d, seen) = device(read_only_config());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        assert_eq!(
            d.activate(mem.clone(), queues(1), irq.clone()),
            Err(ActivateError::QueueCount("dummy", 2, 1)),
            "fewer queues than needed"
        );
        d.activate(mem, queues(2), irq).unwrap();
        wait_for("activation", || seen.activated.load(Ordering::SeqCst) == 1);
        assert_eq!(seen.queues.load(Ordering::SeqCst), 2);
        // The activation round is a queue wake; a notification is another.
        wait_for("the first round", || seen.kicks.load(Ordering::SeqCst) == 1);
        d.queue_notify(1);
        wait_for("the kick", || seen.kicks.load(Ordering::SeqCst) == 2);
        d.reset();
        wait_for("the reset", || seen.resets.load(Ordering::SeqCst) == 1);
        drop(d);
    }

    #[test]
    fn config_reads_are_bounded_and_writes_go_through_the_hook() {
        let (mut ro, _) = device(read_only_config());
        ro.write_config(0, &[9, 9]);
        let mut c = [0xffu8; 6];
        ro.read_config(0, &mut c);
        assert_eq!(c, [1, 2, 3, 4, 0, 0], "read-only, and past the end reads as zero");
        ro.read_config(u64::MAX, &mut c[..2]);
        assert_eq!(&c[..2], &[0, 0]);
        // A hook that lets the driver change byte 1 only.
        let (mut rw, _) = device(Box::new(|config: &mut [u8], offset, data: &[u8]| {
            if offset == 1 && data.len() == 1 {
                config[1] = data[0];
            }
        }));
        rw.write_config(1, &[7]);
        rw.write_config(2, &[7]);
        rw.read_config(0, &mut c[..4]);
        assert_eq!(&c[..4], &[1, 7, 3, 4]);
    }
}
