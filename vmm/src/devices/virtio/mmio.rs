//! Host side: the virtio-mmio transport, version 2 (virtio 1.x, section
//! 4.2.2), as a [`BusDevice`]. Every register access comes from the guest
//! (untrusted): only aligned 32-bit register accesses are honoured, queue
//! registers only while the driver sets up (FEATURES_OK, not DRIVER_OK),
//! queues are checked with `virtio-queue` before the device is activated,
//! and nothing panics. The guest learns of the device from the kernel
//! command line (`virtio_mmio.device=4K@ADDR:IRQ`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::{virtio_config as cfg, virtio_mmio as mmio};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;

// Not in virtio-bindings: the magic ("virt", virtio 1.x 4.2.2), the
// version of the modern interface, and our vendor ID.
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5853_4253; // "SBSX"

// Register offsets, status bits and interrupt bits: virtio-bindings'
// (linux/virtio_mmio.h, virtio_config.h).
const REG_MAGIC: u64 = mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = mmio::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = mmio::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = mmio::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = mmio::VIRTIO_MMIO_QUEUE_READY as u64;
/// Where the driver notifies a queue (its index is the value written).
pub const REG_QUEUE_NOTIFY: u64 = mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = mmio::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const CONFIG_SPACE: u64 = mmio::VIRTIO_MMIO_CONFIG as u64;

pub const STATUS_ACKNOWLEDGE: u32 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = cfg::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = cfg::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = cfg::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_NEEDS_RESET: u32 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = cfg::VIRTIO_CONFIG_S_FAILED;

const INT_USED_RING: u32 = mmio::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = mmio::VIRTIO_MMIO_INT_CONFIG;

/// Raises the device's interrupt: sets the status bit the guest reads and
/// writes the irqfd bound to the device's GSI.
pub struct IrqfdInterrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
}

impl IrqfdInterrupt {
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter still means "interrupt pending".
        let _ = self.irqfd.write(1);
    }
}

impl Interrupt for IrqfdInterrupt {
    fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }
    fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqfdInterrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irqfd: EventFd) -> MmioTransport {
        let queues = device.queue_max_sizes().iter().filter_map(|max| Queue::new(*max).ok()).collect();
        let interrupt = Arc::new(IrqfdInterrupt { status: Arc::new(AtomicU32::new(0)), irqfd });
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The selected queue, while the driver may still set queues up.
    fn setup_queue(&mut self) -> Option<&mut Queue> {
        let setting_up = self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if !setting_up {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits only ever get added, never removed, short of a reset.
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // The driver reads FEATURES_OK back and gives up.
                self.status |= value & !STATUS_FEATURES_OK & !STATUS_DRIVER_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if new & STATUS_DRIVER_OK != 0 && !self.activated {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let ready: Vec<&Queue> = self.queues.iter().filter(|q| q.ready()).collect();
        let all_valid = ready.iter().all(|q| q.is_valid(&self.mem));
        if ready.is_empty() || !all_valid {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        // The device gets its own copies; the transport keeps the
        // registers the driver wrote, for reads and a later reset.
        let queues: Vec<Queue> = ready.into_iter().filter_map(|q| Queue::try_from(q.state()).ok()).collect();
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        match self.device.activate(self.mem.clone(), queues, interrupt) {
            Ok(()) => self.activated = true,
            Err(_) => self.status |= STATUS_NEEDS_RESET,
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map(|q| q.max_size() as u32).unwrap_or(0),
            REG_QUEUE_READY => self.queues.get(self.queue_sel as usize).map(|q| q.ready() as u32).unwrap_or(0),
            REG_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.setup_queue() {
                    // virtio-queue refuses sizes over the maximum or not a
                    // power of two; the queue then stays invalid.
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.setup_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY if self.activated && (v as usize) < self.queues.len() => {
                self.device.queue_notify(v as u16);
            }
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.setup_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER_OK == 0 || self.activated {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Seen {
        activated_with: Option<usize>,
        notified: Vec<u16>,
        acked: u64,
        config: Vec<u8>,
        resets: usize,
    }

    struct Dummy {
        seen: Arc<Mutex<Seen>>,
        fail_activation: bool,
    }

    impl VirtioDevice for Dummy {
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn ack_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _offset: u64, data: &[u8]) {
            self.seen.lock().unwrap().config.extend_from_slice(data);
        }
        fn activate(&mut self, _: GuestMemoryMmap, q: Vec<Queue>, i: Arc<dyn Interrupt>) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::Failed("dummy", "asked to".into()));
            }
            self.seen.lock().unwrap().activated_with = Some(q.len());
            i.signal_used_queue();
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.seen.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
        }
    }

    fn transport(fail: bool) -> (MmioTransport, Arc<Mutex<Seen>>, EventFd) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy { seen: seen.clone(), fail_activation: fail }),
            mem,
            irq.try_clone().unwrap(),
        );
        (t, seen, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The driver's side of the handshake, as Linux's virtio_mmio does it.
    fn handshake(t: &mut MmioTransport, features_hi: u32, queue_addr: u64) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, features_hi);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, 1);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, 128);
        for (lo, hi, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, queue_addr),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, queue_addr + 0x1000),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, queue_addr + 0x2000),
        ] {
            w(t, lo, addr as u32);
            w(t, hi, (addr >> 32) as u32);
        }
        w(t, REG_QUEUE_READY, 1);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport(false);
        assert_eq!((r(&mut t, REG_MAGIC), r(&mut t, REG_VERSION), r(&mut t, REG_DEVICE_ID)), (MAGIC, 2, 2));
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 in the high word");
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        let mut cfg = [0u8; 3];
        t.read(CONFIG_SPACE + 4, &mut cfg);
        assert_eq!(cfg, [4, 5, 6]);
    }

    #[test]
    fn a_full_handshake_activates_the_device_and_notifies_reach_it() {
        let (mut t, seen, irq) = transport(false);
        handshake(&mut t, 1, 0x10000);
        assert!(t.is_activated(), "status {:#x}", t.status());
        let s = seen.lock().unwrap();
        assert_eq!((s.activated_with, s.acked), (Some(1), VIRTIO_F_VERSION_1 | 1));
        drop(s);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert!(irq.read().unwrap() >= 1, "the irqfd fired");
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        w(&mut t, REG_QUEUE_NOTIFY, 9);
        assert_eq!(seen.lock().unwrap().notified, vec![0], "notify for a missing queue ignored");
        // Reset: the device is told, everything starts over.
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!((t.status(), seen.lock().unwrap().resets), (0, 1));
    }

    #[test]
    fn a_driver_without_version_1_is_refused() {
        let (mut t, seen, _) = transport(false);
        handshake(&mut t, 0, 0x10000);
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        assert!(!t.is_activated());
        assert_eq!(seen.lock().unwrap().activated_with, None);
    }

    #[test]
    fn queues_outside_guest_memory_or_oversized_never_activate() {
        // Rings past the end of the 1 MiB of guest memory.
        let (mut t, seen, _) = transport(false);
        handshake(&mut t, 1, 0xff000);
        assert!(!t.is_activated());
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(seen.lock().unwrap().activated_with, None);
        // Rings at a 64-bit address far away.
        let (mut t, _, _) = transport(false);
        handshake(&mut t, 1, 0x7fff_0000_0000);
        assert!(!t.is_activated());
        // A queue size over the maximum is not taken.
        let (mut t, _, _) = transport(false);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(&mut t, REG_QUEUE_NUM, 4096);
        assert_eq!(t.queues[0].size(), 256, "a size over the maximum is not taken");
        w(&mut t, REG_QUEUE_NUM, 100);
        assert_eq!(t.queues[0].size(), 256, "a size that is not a power of two is not taken");
        w(&mut t, REG_QUEUE_NUM, 64);
        assert_eq!(t.queues[0].size(), 64);
    }

    #[test]
    fn a_failing_device_asks_for_reset() {
        let (mut t, _, _) = transport(true);
        handshake(&mut t, 1, 0x10000);
        assert!(!t.is_activated());
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let (mut t, seen, _) = transport(false);
        // Odd sizes and unaligned offsets read as zero and write nothing.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(REG_STATUS, &[1, 0]);
        t.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(t.status(), 0);
        // Queue registers before FEATURES_OK are ignored.
        w(&mut t, REG_QUEUE_NUM, 128);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // Status bits cannot be taken away without a reset.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Out-of-window offsets and big config accesses do not panic.
        for off in [0x0fd, 0x2000, u64::MAX - 8] {
            let mut big = [0u8; 8];
            t.read(off, &mut big);
            t.write(off, &big);
        }
        assert!(seen.lock().unwrap().config.len() <= 24);
        assert_eq!(seen.lock().unwrap().notified, Vec::<u16>::new(), "no notify before activation");
    }
}
