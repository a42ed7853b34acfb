//! Host side: KVM plumbing tested with tiny hand-assembled guests (a few
//! bytes of real-mode or long-mode code). Milliseconds each, even where
//! guest kernel mode is emulated. Skipped, with the reason printed, where
//! /dev/kvm is missing.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::cpuid::{self, CpuTemplate};
use vmm::arch::regs;
use vmm::vstate::Vm;

const CODE: u64 = 0x10_0000;
const PORT: u16 = 0x500;

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is not available to this user");
    }
    ok
}

/// Runs the vCPU until HLT, collecting 32-bit (or 8-bit) OUTs to PORT.
fn run_collecting(vcpu: &mut VcpuFd) -> Vec<u32> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(PORT, data) => {
                let mut b = [0u8; 4];
                b[..data.len()].copy_from_slice(data);
                out.push(u32::from_le_bytes(b));
            }
            VcpuExit::Hlt => return out,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest did not halt");
}

/// A long-mode vCPU (our GDT, page tables, registers) at CODE.
fn long_mode_vm(code: &[u8], template: Option<CpuTemplate>) -> (Vm, VcpuFd) {
    let vm = Vm::new(64 << 20).unwrap();
    vm.memory.write_slice(code, GuestAddress(CODE)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    if let Some(t) = template {
        let mut entries: Vec<kvm_cpuid_entry2> = vm.supported_cpuid().unwrap().as_slice().to_vec();
        cpuid::apply(&mut entries, t, 0, 1, None);
        vcpu.set_cpuid2(&CpuId::from_entries(&entries).unwrap()).unwrap();
    }
    regs::setup_sregs(&vm.memory, &vcpu).unwrap();
    regs::setup_regs(&vcpu, CODE).unwrap();
    regs::setup_fpu(&vcpu).unwrap();
    (vm, vcpu)
}

#[test]
fn real_mode_guest_writes_a_port_and_halts() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(64 << 20).unwrap();
    // mov al, 0x2a ; mov dx, 0x500 ; out dx, al ; add al, 1 ; out dx, al ; hlt
    let code = [0xb0, 0x2a, 0xba, 0x00, 0x05, 0xee, 0x04, 0x01, 0xee, 0xf4];
    vm.memory.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let r = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&r).unwrap();
    assert_eq!(run_collecting(&mut vcpu), vec![0x2a, 0x2b]);
}

#[test]
fn long_mode_guest_runs_under_our_page_tables() {
    if !kvm_available() {
        return;
    }
    // mov rax, [0x3ff000]: read through the 2 MiB identity mapping
    // (second large page), then out dx, eax; also report CR0 and EFER.LMA
    // via cs.l: mov rax, cr0 ; out dx, eax ; hlt
    let mut code = vec![];
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x05]); // mov dx, 0x500
    code.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0xf0, 0x3f, 0x00]); // mov rax, [0x3ff000]
    code.push(0xef); // out dx, eax
    code.extend_from_slice(&[0x0f, 0x20, 0xc0]); // mov rax, cr0
    code.push(0xef);
    code.push(0xf4);
    let (vm, mut vcpu) = long_mode_vm(&code, None);
    vm.memory.write_obj(0xfeed_beefu32, GuestAddress(0x3f_f000)).unwrap();
    let out = run_collecting(&mut vcpu);
    assert_eq!(out[0], 0xfeed_beef);
    assert_eq!(out[1] & 0x8000_0001, 0x8000_0001, "paging and protection on");
}

/// What the guest kernel reads with CPUID under the portable template: the
/// vendor and signature we set everywhere; XSAVE/POPCNT hidden where KVM
/// honours leaf 1. kvm_pvm rewrites leaves 1, 7 and 0xd with host values
/// (measured), which is why the guest kernel's `sbx_pvm` switch drops
/// those features itself (kernel-config/patches/0001).
#[test]
fn portable_template_reaches_guest_kernel_mode() {
    if !kvm_available() {
        return;
    }
    // mov eax, 1 ; xor ecx, ecx ; cpuid ; mov dx, 0x500 ; out dx, eax (signature) ;
    // mov eax, ecx ; out ; xor eax, eax ; cpuid ; mov eax, ebx ; mov dx, 0x500 ; out ; hlt
    // (cpuid overwrites edx, so the port is loaded after each cpuid)
    let code = [
        0xb8, 0x01, 0x00, 0x00, 0x00, 0x31, 0xc9, 0x0f, 0xa2, 0x66, 0xba, 0x00, 0x05, 0xef, 0x89, 0xc8, 0xef, 0x31,
        0xc0, 0x0f, 0xa2, 0x89, 0xd8, 0x66, 0xba, 0x00, 0x05, 0xef, 0xf4,
    ];
    let (_vm, mut vcpu) = long_mode_vm(&code, Some(CpuTemplate::Portable));
    let out = run_collecting(&mut vcpu);
    assert_eq!(out.len(), 3);
    assert_eq!((out[0] >> 8) & 0xf, 0xf, "family from the template, got signature {:#x}", out[0]);
    assert_eq!(&out[2].to_le_bytes(), b"Genu");
    if cpuid::host_is_pvm() {
        eprintln!(
            "note: kvm_pvm host: leaf 1 ECX is the host's ({:#x}); the guest kernel hides it with sbx_pvm",
            out[1]
        );
    } else {
        assert_eq!(out[1] & (1 << 26), 0, "XSAVE visible in leaf 1 ECX {:#x}", out[1]);
        assert_eq!(out[1] & (1 << 23), 0, "POPCNT visible");
    }
}
