//! Host side: identity page tables for the first GiB (2 MiB pages), enough
//! for the kernel's 64-bit entry; the kernel builds its own right away.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes PML4 -> PDPTE -> PDE mapping [0, 1 GiB) to itself; returns CR3.
pub fn write_identity_tables<M: GuestMemory>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PDE_ADDR | PRESENT_WRITABLE, GuestAddress(PDPTE_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE, GuestAddress(PDE_ADDR + i * 8))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables as the MMU would for a 2 MiB page.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8)).ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem.read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8)).ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)).ok()?;
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_gib_maps_to_itself() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        for va in [0u64, 0x1000, 0x100_0000, 0x3fff_ffff, 0x1234_5678] {
            assert_eq!(translate(&mem, cr3, va), Some(va));
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None);
    }
}
