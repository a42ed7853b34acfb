//! Host side: an address-range bus (one for port I/O, one for MMIO) that
//! dispatches guest accesses to the device owning the range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus. Offsets are relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("Bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("Bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Shared)>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Puts `device` at [base, base + len).
    pub fn insert(&mut self, device: Shared, base: u64, len: u64) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { base, len })?;
        let clash_before = self.devices.range(..end).next_back().is_some_and(|(b, (l, _))| b + l > base);
        if clash_before {
            return Err(Error::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Shared)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        if offset.checked_add(size as u64)? <= *len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Reads from the device at `addr`; false if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                // A poisoned lock means a device thread panicked; keep serving.
                dev.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device for tests: reads as its offset; records writes.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0x41])]);
        assert!(!bus.read(0x3f7, &mut d));
        assert!(!bus.read(0x400, &mut d));
    }

    #[test]
    fn accesses_straddling_the_end_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x10).unwrap();
        assert!(bus.write(0x100c, &[0; 4]));
        assert!(!bus.write(0x100d, &[0; 4]));
        assert!(!bus.write(u64::MAX, &[0; 4]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(d(), 0x10f, 1), Err(Error::Overlap { base: 0x10f, len: 1 }));
        assert_eq!(bus.insert(d(), 0xf8, 9), Err(Error::Overlap { base: 0xf8, len: 9 }));
        assert_eq!(bus.insert(d(), 0x50, 0), Err(Error::BadRange { base: 0x50, len: 0 }));
        assert_eq!(bus.insert(d(), u64::MAX, 2), Err(Error::BadRange { base: u64::MAX, len: 2 }));
        bus.insert(d(), 0xf0, 0x10).unwrap();
        bus.insert(d(), 0x110, 0x10).unwrap();
    }
}
