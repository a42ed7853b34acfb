//! Host side: a 16550A UART (vm-superio) on the port I/O bus, its interrupt
//! delivered through an irqfd. Guest writes go to a host sink; host input is
//! queued into its receive FIFO.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1 and COM2: base ports, size, legacy IRQs.
pub const COM1: (u64, u32) = (0x3f8, 4);
pub const COM2: (u64, u32) = (0x2f8, 3);
pub const PORT_LEN: u64 = 8;

/// Raises the UART's interrupt by writing to an eventfd bound as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice { uart: Serial::new(EventFdTrigger(irq), out) }
    }

    /// Queues host input; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            // A failing sink or trigger must not stop the guest.
            let _ = self.uart.write(off, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_the_sink_and_receive_raises_the_irq() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        dev.write(1, &[0x01]); // IER: receive-data interrupt on
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rx = [0u8];
        dev.read(0, &mut rx);
        assert_eq!(rx[0], b'x');
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut dev = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(io::sink()));
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(1 << 40, &[1]);
        dev.write(0, &[1, 2]);
        let big = vec![b'a'; 1000];
        let taken = dev.enqueue_input(&big);
        assert!(taken > 0 && taken < 1000);
        assert_eq!(dev.enqueue_input(&big), 0, "FIFO full");
    }
}
