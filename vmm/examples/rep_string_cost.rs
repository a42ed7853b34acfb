//! Host side: measures how fast the host's KVM runs string instructions in
//! guest kernel mode (on kvm_pvm they are emulated): 1 MiB with rep stosq,
//! rep stosb, rep movsq and a plain store loop. The figures behind the
//! kernel's REP_GOOD choice under sbx_pvm (kernel-config/patches/0001).
//! Run: cargo run --release -p vmm --example rep_string_cost

use kvm_ioctls::VcpuExit;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::regs;
use vmm::vstate::Vm;

fn time(code: &[u8], label: &str) {
    let vm = Vm::new(64 << 20).unwrap();
    vm.memory.write_slice(code, GuestAddress(0x100000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    regs::setup_sregs(&vm.memory, &vcpu).unwrap();
    regs::setup_regs(&vcpu, 0x100000).unwrap();
    let t = Instant::now();
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        e => panic!("{label}: unexpected exit {e:?}"),
    }
    println!("{label:>16}: {:8.1} ms", t.elapsed().as_secs_f64() * 1000.0);
}

fn main() {
    // 1 MiB at 0x200000.
    // rep stosq: mov rdi, 0x200000 ; mov rcx, 131072 ; xor eax,eax ; rep stosq ; hlt
    let mut c = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xc7, 0xc1, 0x00, 0x00, 0x02, 0x00, 0x31, 0xc0, 0xf3, 0x48,
        0xab, 0xf4,
    ];
    time(&c, "rep stosq 1MiB");
    // rep stosb
    c = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xc7, 0xc1, 0x00, 0x00, 0x10, 0x00, 0x31, 0xc0, 0xf3, 0xaa,
        0xf4,
    ];
    time(&c, "rep stosb 1MiB");
    // rep movsq 1MiB from 0x200000 to 0x300000
    c = vec![
        0x48, 0xc7, 0xc6, 0x00, 0x00, 0x20, 0x00, 0x48, 0xc7, 0xc7, 0x00, 0x00, 0x30, 0x00, 0x48, 0xc7, 0xc1, 0x00,
        0x00, 0x02, 0x00, 0xf3, 0x48, 0xa5, 0xf4,
    ];
    time(&c, "rep movsq 1MiB");
    // loop: mov [rdi],rax ; mov [rdi+8],rax ; mov [rdi+16],rax; mov [rdi+24],rax ; add rdi,32 ; dec rcx ; jnz
    c = vec![
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xc7, 0xc1, 0x00, 0x80, 0x00, 0x00, 0x31, 0xc0, 0x48, 0x89,
        0x07, 0x48, 0x89, 0x47, 0x08, 0x48, 0x89, 0x47, 0x10, 0x48, 0x89, 0x47, 0x18, 0x48, 0x83, 0xc7, 0x20, 0x48,
        0xff, 0xc9, 0x75, 0xe9, 0xf4,
    ];
    time(&c, "movq loop 1MiB");
}
