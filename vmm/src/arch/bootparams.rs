//! Host side: the Linux "zero page" (struct boot_params) for a direct 64-bit
//! boot of vmlinux — e820 map, command line, initramfs, and an RNG seed as
//! setup_data so the guest has entropy without RDRAND or a device.

use std::io::Read;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, SETUP_RNG_SEED};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    CMDLINE_ADDR, EBDA_START, FOUR_GIB, HIMEM_START, MMIO_HOLE_START, SETUP_DATA_ADDR, ZERO_PAGE_ADDR,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// Boot protocol 2.12: setup_data and 64-bit fields are read.
const BOOT_PROTOCOL: u16 = 0x020c;
const LOADER_OTHER: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const RNG_SEED_BYTES: usize = 32;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot write boot parameters to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    #[error("Cannot read a random seed for the guest: {0}")]
    Seed(std::io::Error),
    #[error("Too many e820 entries")]
    E820Full,
}

/// struct setup_data { u64 next; u32 type; u32 len; u8 data[]; }
const SETUP_DATA_HEADER: usize = 16;

fn setup_data_header(kind: u32, len: u32) -> [u8; SETUP_DATA_HEADER] {
    let mut h = [0u8; SETUP_DATA_HEADER];
    h[8..12].copy_from_slice(&kind.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// Where the initramfs was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: u64,
    pub size: u32,
}

/// The e820 map for a guest with `mem_bytes` of RAM: base memory, a
/// reserved hole for the EBDA/MP table and the legacy ROM area, high
/// memory up to the MMIO hole, and the rest above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_bytes > MMIO_HOLE_START {
        map.push((FOUR_GIB, mem_bytes - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// Builds the zero page. `cmdline_size` includes the terminating NUL.
pub fn build(mem_bytes: u64, cmdline_size: u32, initrd: Option<Initrd>, with_seed: bool) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.version = BOOT_PROTOCOL;
    params.hdr.type_of_loader = LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.hdr.ramdisk_size = rd.size;
    }
    if with_seed {
        params.hdr.setup_data = SETUP_DATA_ADDR;
    }
    for (i, (addr, size, kind)) in e820_map(mem_bytes).into_iter().enumerate() {
        let slot = params.e820_table.get_mut(i).ok_or(Error::E820Full)?;
        *slot = boot_e820_entry { addr, size, r#type: kind };
        params.e820_entries = (i + 1) as u8;
    }
    Ok(params)
}

/// Writes the zero page, and the RNG seed it points at when `with_seed`.
pub fn write<M: GuestMemory>(mem: &M, params: &boot_params, with_seed: bool) -> Result<(), Error> {
    if with_seed {
        let mut seed = [0u8; RNG_SEED_BYTES];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)).map_err(Error::Seed)?;
        mem.write_slice(&setup_data_header(SETUP_RNG_SEED, RNG_SEED_BYTES as u32), GuestAddress(SETUP_DATA_ADDR))?;
        mem.write_slice(&seed, GuestAddress(SETUP_DATA_ADDR + SETUP_DATA_HEADER as u64))?;
    }
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_hole() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
        let big = e820_map(5 << 30);
        assert_eq!(big.last().unwrap(), &(FOUR_GIB, (5 << 30) - MMIO_HOLE_START, E820_RAM));
    }

    #[test]
    fn zero_page_lands_where_the_kernel_reads_it() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rd = Initrd { addr: 0x0f00_0000, size: 4096 };
        let p = build(256 << 20, 100, Some(rd), true).unwrap();
        write(&mem, &p, true).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        // Offsets fixed by Documentation/x86/boot.rst.
        let mut raw = vec![0u8; 4096];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(u16::from_le_bytes([raw[0x1fe], raw[0x1ff]]), BOOT_FLAG);
        assert_eq!(&raw[0x202..0x206], b"HdrS");
        assert_eq!(u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()), CMDLINE_ADDR as u32);
        assert_eq!(u32::from_le_bytes(raw[0x218..0x21c].try_into().unwrap()), 0x0f00_0000);
        assert_eq!(raw[0x1e8], back.e820_entries);
        assert_eq!(u64::from_le_bytes(raw[0x250..0x258].try_into().unwrap()), SETUP_DATA_ADDR);
        let sd: [u8; 16] = mem.read_obj(GuestAddress(SETUP_DATA_ADDR)).unwrap();
        assert_eq!(u64::from_le_bytes(sd[0..8].try_into().unwrap()), 0, "last in the list");
        assert_eq!(u32::from_le_bytes(sd[8..12].try_into().unwrap()), SETUP_RNG_SEED);
        assert_eq!(u32::from_le_bytes(sd[12..16].try_into().unwrap()), RNG_SEED_BYTES as u32);
    }
}
