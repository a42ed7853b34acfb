//! Host side: the boot vCPU's initial state for the kernel's 64-bit entry —
//! long mode with the identity page tables, flat segments, the zero page in
//! RSI, and sane FPU/MSR/LAPIC values.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{segment, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};
use super::paging::write_identity_tables;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("Cannot {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// General registers: entry point, boot stack, zero page in RSI.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| Error::Kvm("set vCPU registers", e))
}

/// Writes the GDT, a null IDT and page tables; puts the vCPU in long mode.
pub fn setup_sregs<M: GuestMemory>(mem: &M, vcpu: &VcpuFd) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("get special registers", e))?;
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = segment(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.cr3 = write_identity_tables(mem)?;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| Error::Kvm("set special registers", e))
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("set FPU state", e))
}

/// MSRs a freshly reset CPU would have, as the kernel expects at entry.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs { set: 0, wanted: entries.len() })?;
    let set = vcpu.set_msrs(&msrs).map_err(|e| Error::Kvm("set boot MSRs", e))?;
    if set != entries.len() {
        return Err(Error::Msrs { set, wanted: entries.len() });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as the MP table says.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::Kvm("get the local APIC", e))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| Error::Kvm("set the local APIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_changes_only_bits_8_to_10() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 1] = 0x05; // mode 5 plus vector 0x30
        regs[APIC_LVT0 + 2] = 0x01; // mask bit (16)
        set_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let v = u32::from_le_bytes([
            regs[APIC_LVT0] as u8,
            regs[APIC_LVT0 + 1] as u8,
            regs[APIC_LVT0 + 2] as u8,
            regs[APIC_LVT0 + 3] as u8,
        ]);
        assert_eq!(v, 0x0001_0730);
    }
}
