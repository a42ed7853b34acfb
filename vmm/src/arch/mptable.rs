//! Host side: the Intel MultiProcessor table (spec 1.4) that tells a guest
//! kernel without ACPI about its vCPUs, the IO-APIC and how the legacy IRQs
//! are wired (identity: ISA IRQ n -> IO-APIC pin n, as KVM routes them).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, IOAPIC_PINS, MPTABLE_ADDR};

/// Most vCPUs the table describes (it must fit in the last KiB of base memory).
pub const MAX_CPUS: u8 = 32;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Too many vCPUs for the MP table: {0} (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("No vCPUs")]
    NoCpus,
    #[error("Cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer and configuration table as they are placed at
/// `base` (the configuration table right after the 16-byte pointer).
/// `cpu_signature` and `cpu_features` are CPUID leaf 1 EAX and EDX.
pub fn build(base: u32, cpus: u8, cpu_signature: u32, cpu_features: u32) -> Result<Vec<u8>, Error> {
    if cpus == 0 {
        return Err(Error::NoCpus);
    }
    if cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus; // after the local APIC ids 0..cpus
    let mut entries: Vec<u8> = Vec::new();
    for id in 0..cpus {
        entries.extend_from_slice(&[0, id, APIC_VERSION, CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 }]);
        entries.extend_from_slice(&cpu_signature.to_le_bytes());
        entries.extend_from_slice(&cpu_features.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming), bus 0, bus irq, IO-APIC, pin
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let mut table: Vec<u8> = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SBX     ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out: Vec<u8> = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(base + 16).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, checksum, features
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at its fixed place in guest memory.
pub fn setup<M: GuestMemory>(mem: &M, cpus: u8, cpu_signature: u32, cpu_features: u32) -> Result<(), Error> {
    let bytes = build(MPTABLE_ADDR as u32, cpus, cpu_signature, cpu_features)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_lengths_are_consistent() {
        for cpus in [1u8, 2, 16, MAX_CPUS] {
            let t = build(0x9fc00, cpus, 0xf61, 0x078b_fbff).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc00 + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            // Walk the entries as Linux's MP parser does.
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            let mut off = 44;
            let (mut procs, mut ioapics, mut ints) = (0, 0, 0);
            for _ in 0..count {
                match cfg[off] {
                    0 => {
                        procs += 1;
                        off += 20
                    }
                    2 => {
                        ioapics += 1;
                        off += 8
                    }
                    3 => {
                        ints += 1;
                        off += 8
                    }
                    1 | 4 => off += 8,
                    t => panic!("bad entry type {t}"),
                }
            }
            assert_eq!(off, len);
            assert_eq!((procs, ioapics, ints), (cpus, 1, IOAPIC_PINS));
            assert!(t.len() <= 1024, "must fit in the last KiB of base memory");
        }
    }

    #[test]
    fn only_cpu_0_boots() {
        let t = build(0, 3, 0, 0).unwrap();
        let flags: Vec<u8> = (0..3).map(|i| t[16 + 44 + i * 20 + 3]).collect();
        assert_eq!(flags, vec![3, 1, 1]);
    }

    #[test]
    fn refuses_bad_cpu_counts() {
        assert!(matches!(build(0, 0, 0, 0), Err(Error::NoCpus)));
        assert!(matches!(build(0, MAX_CPUS + 1, 0, 0), Err(Error::TooManyCpus(_))));
    }
}
