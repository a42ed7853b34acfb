//! Host side: the boot GDT (flat 64-bit code, data, TSS) and the KVM segment
//! registers that match it.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from flags (access byte and granularity nibble, as in
/// Linux's GDT_ENTRY), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

/// The KVM segment register for GDT entry `index` (selector = index * 8).
pub fn segment(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let cs = segment(BOOT_GDT[1], CODE_INDEX);
        assert_eq!(cs.selector, 0x8);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s, cs.g), (1, 0, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment(BOOT_GDT[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 0x3, 1, 0));
        let tss = segment(BOOT_GDT[3], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 1));
        assert_eq!(tss.limit, 0xffff_ffff);
    }

    #[test]
    fn entry_packs_base_and_limit() {
        // Byte granularity: the limit is taken as is.
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.selector, 40);
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
