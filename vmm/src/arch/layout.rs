//! Host side: the guest-physical memory map sbx gives every guest (the same
//! low-memory layout as Firecracker's, so the kernel sees nothing unusual).

use vm_memory::GuestAddress;

/// GDT and a null IDT used only until the kernel loads its own.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// RNG seed handed to the kernel as boot-params setup_data.
pub const SETUP_DATA_ADDR: u64 = 0x6000;
/// The "zero page": struct boot_params.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack for the first instructions of the kernel.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables for the first GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line and its largest size.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: base memory ends here; the MP table
/// lives in the last KiB of base memory, where the kernel looks for it.
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// Start of memory above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Guest RAM below 4 GiB ends here; the rest is the MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Local APIC and IO-APIC addresses (fixed by the architecture).
pub const APIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Legacy interrupt lines the IO-APIC routes (KVM's in-kernel IO-APIC).
pub const IOAPIC_PINS: u8 = 24;
/// virtio-mmio windows, 4 KiB each, from here up in the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Their interrupt lines, from here up (1, 3, 4 are the i8042 and UARTs).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most virtio devices: the IRQ lines left up to the last IO-APIC pin.
pub const VIRTIO_MAX_DEVICES: u32 = IOAPIC_PINS as u32 - VIRTIO_IRQ_BASE;

/// The guest RAM regions for `mem_bytes` of memory: below the MMIO hole,
/// and the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(FOUR_GIB), (mem_bytes - MMIO_HOLE_START) as usize),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(FOUR_GIB), (1 << 30) as usize));
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut spans = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (SETUP_DATA_ADDR, 0x1000),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPTE_ADDR, 0x1000),
            (PDE_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
            (MPTABLE_ADDR, 0x400),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        const { assert!(BOOT_STACK_ADDR > ZERO_PAGE_ADDR + 0x1000 && BOOT_STACK_ADDR < PML4_ADDR) };
    }
}
