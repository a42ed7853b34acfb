//! Host side: the contract of kvm_pvm's native guest-kernel mode (issue 15,
//! stage 1), pinned down by tiny hand-assembled long-mode guests that run in
//! milliseconds and re-check every fact a native-mode guest kernel would
//! rely on, on every CI run. The guests are untrusted code we wrote; the
//! host side only reads their registers and memory. Every test is skipped
//! (with the reason printed) where the host has no kvm_pvm; under
//! `SBX_E2E_REQUIRED` with kvm_pvm present, none may be skipped. Figures:
//! `cargo test -p vmm --test pvm_native -- --nocapture`. The design these
//! facts lead to is in kernel-config/pvm-native.md.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_ioapic_state, kvm_ioapic_state__bindgen_ty_1, kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_msr_entry,
    kvm_userspace_memory_region, Msrs, KVM_IRQCHIP_IOAPIC, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

// ---------------------------------------------------------------------------
// The host: is this a kvm_pvm host with native mode?

/// MSR of kvm_pvm's native-mode control word: bit 0 runs guest kernel code
/// natively (hardware CPL3) instead of through KVM's instruction emulator.
const MSR_PVM_CTL: u32 = 0x4b56_4d10;
/// MSR that reads "PVM" (0x4d5650) on a kvm_pvm host.
const MSR_PVM_SIG: u32 = 0x4b56_4d11;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Every test holds this: the figures are timings, and two guests running
/// at once on a 2-core machine would skew each other's.
static SERIAL: Mutex<()> = Mutex::new(());

/// `Some(lock)` where the tests can run; `None` after printing why not.
fn pvm_host() -> Option<MutexGuard<'static, ()>> {
    let required = std::env::var_os("SBX_E2E_REQUIRED").is_some();
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIPPED: no kvm_pvm on this host (/sys/module/kvm_pvm): native guest-kernel mode is kvm_pvm's");
        return None;
    }
    let native = std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native").unwrap_or_default();
    let why = if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        Some("kvm_pvm is loaded but /dev/kvm is not available to this user".to_string())
    } else if native.trim() != "Y" {
        Some(format!("kvm_pvm is loaded with pvm_native={:?}: native mode is off on this host", native.trim()))
    } else {
        None
    };
    match why {
        Some(why) if required => panic!("SBX_E2E_REQUIRED and kvm_pvm present, but {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
        None => Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner())),
    }
}

// ---------------------------------------------------------------------------
// A tiny x86-64 assembler: each method emits one instruction's machine code,
// its encoding spelled out in the comment. Labels are resolved at the end
// (rel32 jumps, abs64 addresses).

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
#[allow(dead_code)]
enum R {
    Rax = 0,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}
use R::*;

/// Condition codes for `jcc`: the low nibble of 0F 8x.
const B: u8 = 0x2; // below (CF=1)
const AE: u8 = 0x3; // above or equal (CF=0)
const Z: u8 = 0x4;
const NZ: u8 = 0x5;

struct Asm {
    base: u64,
    b: Vec<u8>,
    labels: HashMap<String, usize>,
    rel32: Vec<(usize, String)>,
    abs64: Vec<(usize, String)>,
    fresh: usize,
}

/// Code that emits some instructions.
type Emit = fn(&mut Asm);

/// Assembled code: bytes to load at `base` (a guest virtual address) and
/// the addresses of its labels.
struct Code {
    base: u64,
    bytes: Vec<u8>,
    labels: HashMap<String, usize>,
}

impl Code {
    fn addr(&self, label: &str) -> u64 {
        self.base + *self.labels.get(label).unwrap_or_else(|| panic!("no label {label}")) as u64
    }
    fn has(&self, label: &str) -> bool {
        self.labels.contains_key(label)
    }
}

impl Asm {
    fn new(base: u64) -> Asm {
        Asm { base, b: Vec::new(), labels: HashMap::new(), rel32: Vec::new(), abs64: Vec::new(), fresh: 0 }
    }
    fn raw(&mut self, bytes: &[u8]) {
        self.b.extend_from_slice(bytes);
    }
    /// Pads with `hlt` (F4) up to `off`: running into padding halts.
    fn org(&mut self, off: usize) {
        assert!(self.b.len() <= off, "code overlaps offset {off:#x}");
        self.b.resize(off, 0xf4);
    }
    fn label(&mut self, name: &str) {
        assert!(self.labels.insert(name.to_string(), self.b.len()).is_none(), "label {name} twice");
    }
    fn fresh(&mut self) -> String {
        self.fresh += 1;
        format!(".L{}", self.fresh)
    }
    fn finish(mut self) -> Code {
        for (at, l) in &self.rel32 {
            let target = *self.labels.get(l).unwrap_or_else(|| panic!("no label {l}")) as i64;
            let rel = i32::try_from(target - (*at as i64 + 4)).expect("rel32");
            self.b[*at..*at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        for (at, l) in &self.abs64 {
            let target = self.base + *self.labels.get(l).unwrap_or_else(|| panic!("no label {l}")) as u64;
            self.b[*at..*at + 8].copy_from_slice(&target.to_le_bytes());
        }
        Code { base: self.base, bytes: self.b, labels: self.labels }
    }

    // REX prefix 0100WRXB: W = 64-bit operand, R extends ModRM.reg, B
    // extends ModRM.rm (or the opcode's register). Omitted when it would be
    // a plain 0x40.
    fn rex(&mut self, w: bool, reg: u8, rm: u8) {
        let rex = 0x40 | (u8::from(w) << 3) | ((reg >> 3) << 2) | (rm >> 3);
        if rex != 0x40 {
            self.b.push(rex);
        }
    }
    // ModRM for [base + disp32]: mod=10; base rsp/r12 needs a SIB byte (0x24).
    fn mem(&mut self, reg: u8, base: R, disp: i32) {
        let base = base as u8;
        self.b.push(0x80 | ((reg & 7) << 3) | (base & 7));
        if base & 7 == 4 {
            self.b.push(0x24);
        }
        self.raw(&disp.to_le_bytes());
    }
    // ModRM for a register operand: mod=11.
    fn modrm_reg(&mut self, reg: u8, rm: u8) {
        self.b.push(0xc0 | ((reg & 7) << 3) | (rm & 7));
    }

    /// movabs r64, imm64: REX.W B8+r io
    fn mov_ri(&mut self, r: R, imm: u64) {
        self.rex(true, 0, r as u8);
        self.b.push(0xb8 + (r as u8 & 7));
        self.raw(&imm.to_le_bytes());
    }
    /// movabs r64, <address of label>
    fn mov_rl(&mut self, r: R, label: &str) {
        self.mov_ri(r, 0);
        self.abs64.push((self.b.len() - 8, label.to_string()));
    }
    /// mov r/m64, r64: REX.W 89 /r
    fn mov_rr(&mut self, dst: R, src: R) {
        self.rex(true, src as u8, dst as u8);
        self.b.push(0x89);
        self.modrm_reg(src as u8, dst as u8);
    }
    /// mov r64, [base+disp32]: REX.W 8B /r
    fn load(&mut self, dst: R, base: R, disp: i32) {
        self.rex(true, dst as u8, base as u8);
        self.b.push(0x8b);
        self.mem(dst as u8, base, disp);
    }
    /// mov [base+disp32], r64: REX.W 89 /r
    fn store(&mut self, base: R, disp: i32, src: R) {
        self.rex(true, src as u8, base as u8);
        self.b.push(0x89);
        self.mem(src as u8, base, disp);
    }
    /// mov [base+disp32], r32: 89 /r (a 32-bit MMIO register write)
    fn store32(&mut self, base: R, disp: i32, src: R) {
        self.rex(false, src as u8, base as u8);
        self.b.push(0x89);
        self.mem(src as u8, base, disp);
    }
    /// add qword [base+disp32], imm32: REX.W 81 /0 id
    fn add_mi(&mut self, base: R, disp: i32, imm: i32) {
        self.rex(true, 0, base as u8);
        self.b.push(0x81);
        self.mem(0, base, disp);
        self.raw(&imm.to_le_bytes());
    }
    /// inc qword [base+disp32]: REX.W FF /0
    fn inc_m(&mut self, base: R, disp: i32) {
        self.rex(true, 0, base as u8);
        self.b.push(0xff);
        self.mem(0, base, disp);
    }
    // Group-1 ALU with imm32: REX.W 81 /ext id (add 0, and 4, sub 5, cmp 7)
    fn alu_ri(&mut self, ext: u8, r: R, imm: i32) {
        self.rex(true, 0, r as u8);
        self.b.push(0x81);
        self.modrm_reg(ext, r as u8);
        self.raw(&imm.to_le_bytes());
    }
    fn add_ri(&mut self, r: R, imm: i32) {
        self.alu_ri(0, r, imm);
    }
    fn sub_ri(&mut self, r: R, imm: i32) {
        self.alu_ri(5, r, imm);
    }
    fn cmp_ri(&mut self, r: R, imm: i32) {
        self.alu_ri(7, r, imm);
    }
    /// add r/m64, r64: REX.W 01 /r
    fn add_rr(&mut self, dst: R, src: R) {
        self.rex(true, src as u8, dst as u8);
        self.b.push(0x01);
        self.modrm_reg(src as u8, dst as u8);
    }
    /// or r/m64, r64: REX.W 09 /r
    fn or_rr(&mut self, dst: R, src: R) {
        self.rex(true, src as u8, dst as u8);
        self.b.push(0x09);
        self.modrm_reg(src as u8, dst as u8);
    }
    /// cmp r/m64, r64: REX.W 39 /r (flags of a - b)
    fn cmp_rr(&mut self, a: R, b: R) {
        self.rex(true, b as u8, a as u8);
        self.b.push(0x39);
        self.modrm_reg(b as u8, a as u8);
    }
    /// test r/m64, r64: REX.W 85 /r
    fn test_rr(&mut self, a: R, b: R) {
        self.rex(true, b as u8, a as u8);
        self.b.push(0x85);
        self.modrm_reg(b as u8, a as u8);
    }
    /// test r/m64, imm32: REX.W F7 /0 id
    fn test_ri(&mut self, r: R, imm: i32) {
        self.rex(true, 0, r as u8);
        self.b.push(0xf7);
        self.modrm_reg(0, r as u8);
        self.raw(&imm.to_le_bytes());
    }
    /// shl r64, imm8: REX.W C1 /4 ib
    fn shl_ri(&mut self, r: R, n: u8) {
        self.rex(true, 0, r as u8);
        self.b.push(0xc1);
        self.modrm_reg(4, r as u8);
        self.b.push(n);
    }
    /// inc r64: REX.W FF /0
    fn inc(&mut self, r: R) {
        self.rex(true, 0, r as u8);
        self.b.push(0xff);
        self.modrm_reg(0, r as u8);
    }
    /// dec r64: REX.W FF /1
    fn dec(&mut self, r: R) {
        self.rex(true, 0, r as u8);
        self.b.push(0xff);
        self.modrm_reg(1, r as u8);
    }
    /// jcc rel32: 0F 80+cc cd
    fn jcc(&mut self, cc: u8, label: &str) {
        self.raw(&[0x0f, 0x80 | cc]);
        self.rel32.push((self.b.len(), label.to_string()));
        self.raw(&[0; 4]);
    }
    /// jmp rel32: E9 cd
    fn jmp(&mut self, label: &str) {
        self.b.push(0xe9);
        self.rel32.push((self.b.len(), label.to_string()));
        self.raw(&[0; 4]);
    }
    /// jmp r64: FF /4
    fn jmp_r(&mut self, r: R) {
        self.rex(false, 0, r as u8);
        self.b.push(0xff);
        self.modrm_reg(4, r as u8);
    }
    /// push r64: 50+r (41 prefix for r8-r15)
    fn push(&mut self, r: R) {
        self.rex(false, 0, r as u8);
        self.b.push(0x50 + (r as u8 & 7));
    }
    /// pop r64: 58+r
    fn pop(&mut self, r: R) {
        self.rex(false, 0, r as u8);
        self.b.push(0x58 + (r as u8 & 7));
    }
    /// push imm32 (sign-extended to 64 bits): 68 id
    fn push_i(&mut self, imm: i32) {
        self.b.push(0x68);
        self.raw(&imm.to_le_bytes());
    }
    /// mov r64, crN: 0F 20 /r (ModRM.reg = N)
    fn mov_from_cr(&mut self, r: R, cr: u8) {
        self.rex(false, 0, r as u8);
        self.raw(&[0x0f, 0x20]);
        self.modrm_reg(cr, r as u8);
    }
    /// mov crN, r64: 0F 22 /r
    fn mov_to_cr(&mut self, cr: u8, r: R) {
        self.rex(false, 0, r as u8);
        self.raw(&[0x0f, 0x22]);
        self.modrm_reg(cr, r as u8);
    }
    /// `mov al, code ; out 0x80, al` (B0 ib ; E6 80): a checkpoint the host
    /// sees as an I/O exit with the code as data.
    fn checkpoint(&mut self, code: u8) {
        self.raw(&[0xb0, code, 0xe6, 0x80]);
    }
    /// rdtsc (0F 31) ; shl rdx, 32 ; or rax, rdx ; mov dst, rax
    fn rdtsc_to(&mut self, dst: R) {
        self.raw(&[0x0f, 0x31]);
        self.shl_ri(Rdx, 32);
        self.or_rr(Rax, Rdx);
        if dst != Rax {
            self.mov_rr(dst, Rax);
        }
    }
    /// wrmsr(msr, val): mov rcx, msr ; mov rax, lo ; mov rdx, hi ; wrmsr (0F 30)
    fn wrmsr(&mut self, msr: u32, val: u64) {
        self.mov_ri(Rcx, u64::from(msr));
        self.mov_ri(Rax, val & 0xffff_ffff);
        self.mov_ri(Rdx, val >> 32);
        self.raw(&[0x0f, 0x30]);
    }
    /// rdmsr(msr) into edx:eax: mov rcx, msr ; rdmsr (0F 32)
    fn rdmsr(&mut self, msr: u32) {
        self.mov_ri(Rcx, u64::from(msr));
        self.raw(&[0x0f, 0x32]);
    }
    /// `mov r, n ; L: dec r ; jnz L`: 2n instructions of straight-line work.
    fn count_down(&mut self, r: R, n: u64) {
        self.mov_ri(r, n);
        let l = self.fresh();
        self.label(&l);
        self.dec(r);
        self.jcc(NZ, &l);
    }
    /// rdtsc around a `count_down(Rcx, n)`: start in `t0`, end in `t1`.
    fn timed_loop(&mut self, t0: R, t1: R, n: u64) {
        self.rdtsc_to(t0);
        self.count_down(Rcx, n);
        self.rdtsc_to(t1);
    }
    fn hlt(&mut self) {
        self.b.push(0xf4);
    }
    fn cli(&mut self) {
        self.b.push(0xfa);
    }
    fn sti(&mut self) {
        self.b.push(0xfb);
    }
    fn stc(&mut self) {
        self.b.push(0xf9);
    }
    fn int3(&mut self) {
        self.b.push(0xcc);
    }
    /// int imm8: CD ib
    fn int_n(&mut self, n: u8) {
        self.raw(&[0xcd, n]);
    }
    fn ud2(&mut self) {
        self.raw(&[0x0f, 0x0b]);
    }
    fn syscall(&mut self) {
        self.raw(&[0x0f, 0x05]);
    }
    /// sysretq: REX.W 0F 07 (to CS = STAR[63:48]+16, RIP = RCX, RFLAGS = R11)
    fn sysretq(&mut self) {
        self.raw(&[0x48, 0x0f, 0x07]);
    }
    /// iretq: REX.W CF
    fn iretq(&mut self) {
        self.raw(&[0x48, 0xcf]);
    }
    fn ret(&mut self) {
        self.b.push(0xc3);
    }
    fn pushfq(&mut self) {
        self.b.push(0x9c);
    }
    fn popfq(&mut self) {
        self.b.push(0x9d);
    }
    /// vmmcall (AMD's hypercall): 0F 01 D9
    fn vmmcall(&mut self) {
        self.raw(&[0x0f, 0x01, 0xd9]);
    }
    /// swapgs: 0F 01 F8
    fn swapgs(&mut self) {
        self.raw(&[0x0f, 0x01, 0xf8]);
    }
    /// invlpg [base]: 0F 01 /7
    fn invlpg(&mut self, base: R) {
        self.rex(false, 0, base as u8);
        self.raw(&[0x0f, 0x01]);
        self.mem(7, base, 0);
    }
    /// cpuid: 0F A2
    fn cpuid(&mut self) {
        self.raw(&[0x0f, 0xa2]);
    }
    /// `in al, imm8`: E4 ib
    fn in_al(&mut self, port: u8) {
        self.raw(&[0xe4, port]);
    }
    /// Enter user mode at `label` with `sysretq` (RFLAGS 0x202, user stack).
    fn sysret_to(&mut self, label: &str) {
        self.mov_rl(Rcx, label);
        self.mov_ri(R11, 0x202);
        self.mov_ri(Rsp, KBASE + USTACK_TOP);
        self.sysretq();
    }
    /// Ends user-mode code: `mov r14, H_EXIT ; int3` (a DPL-3 gate), the
    /// handler then stops at checkpoint CP_EXIT (from kernel mode).
    fn user_exit(&mut self) {
        self.mov_ri(R14, H_EXIT);
        self.int3();
    }
}

// ---------------------------------------------------------------------------
// The guest's machine: 4 MiB of RAM, mapped at the top of the address space
// (KBASE, as Linux maps its kernel image) and at a lower-half alias (LOW).

const KBASE: u64 = 0xffff_ffff_8000_0000;
const LOW: u64 = 0x0000_4000_0000_0000;
const MEM: usize = 4 << 20;
// Guest-physical layout (virtual = KBASE + physical).
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
/// What the exception handler records (see `emit_runtime`).
const REC: u64 = 0x4000;
/// Scratch results written by test code.
const RES: u64 = 0x5000;
const CODE: u64 = 0x10000;
const KSTACK_TOP: u64 = 0x48000;
const RSP0_TOP: u64 = 0x58000;
const IST1_TOP: u64 = 0x60000;
const USTACK_TOP: u64 = 0x78000;
/// A page whose first word reads DATA_MAGIC.
const DATA: u64 = 0x80000;
const DATA_MAGIC: u64 = 0x5ec2_e7da_7a00_0001;
const PT_POOL: u64 = 0x100000;
/// KBASE + [0, MAPPED_END) is mapped; the rest of that 2 MiB is not.
const MAPPED_END: u64 = 0x1f0000;
const UNMAPPED: u64 = KBASE + 0x1f8000;
const NONCANONICAL: u64 = 0x8000_0000_0000_0000;
const APIC_VA: u64 = KBASE + 0x1ff000;
const APIC_GPA: u64 = 0xfee0_0000;
// Selectors, as Linux's GDT has them.
const KERNEL_CS: u64 = 0x10;
const KERNEL_DS: u64 = 0x18;
const USER_DS: u64 = 0x2b;
const USER_CS: u64 = 0x33;
const TSS_SEL: u16 = 0x40;

const PTE_P: u64 = 1;
const PTE_W: u64 = 2;
const PTE_U: u64 = 4;
const PTE_PCD_PWT: u64 = 0x18;

/// Handler behaviour, chosen by the guest in R14 before an event.
/// After recording: set the native bit again (`wrmsr MSR_PVM_CTL, 1`).
const H_NATIVE: u64 = 1;
/// Return to kernel code without `iretq`: switch to the interrupted stack,
/// `popfq`, `sti` if the frame had IF, `ret`.
const H_RET: u64 = 2;
/// Stop: checkpoint CP_EXIT from the handler (how user-mode code ends a test).
const H_EXIT: u64 = 4;
const CP_EXIT: u8 = 0xe0;
const CP_RUNAWAY: u8 = 0xee;
const RUNAWAY: u64 = 500;
// R13 != 0: time a loop of R13 iterations in the handler (and, with
// H_NATIVE, one of 128 * R13 after the wrmsr). R15 != 0: resume at R15
// instead of the frame's RIP.

struct Opts {
    /// The host sets MSR_PVM_CTL bit 0 before the first KVM_RUN.
    native: bool,
    /// Leaf PTEs of the kernel mapping have U=1 (native mode needs it).
    user_bit: bool,
    rsp0: u64,
    ist1_vectors: Vec<u8>,
    irqchip: bool,
    /// The page-table root has bit 12 set (native mode needs it).
    cr3_bit12: bool,
    /// IDT gates aimed at a label of the test's own instead of the stub.
    gates: Vec<(u8, &'static str)>,
    /// MSR_LSTAR, if not the label "lstar".
    lstar: Option<u64>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            native: true,
            user_bit: true,
            rsp0: KBASE + RSP0_TOP,
            ist1_vectors: vec![],
            irqchip: false,
            cr3_bit12: true,
            gates: vec![],
            lstar: None,
        }
    }
}

/// One event as the handler recorded it.
#[derive(Debug, Clone, Copy, Default)]
struct Event {
    vector: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    /// Where the frame's RIP word was (the frame's address).
    frame: u64,
    cr2: u64,
    /// MSR_PVM_CTL as the guest read it on entry to the handler.
    ctl: u64,
    /// TSC around the handler's timed loops (0 if none).
    loop1: (u64, u64),
    loop2: (u64, u64),
    /// CR3 in the handler.
    cr3: u64,
}

const REC_SLOT: u64 = 0x80;
/// Offset in REC of a word the host sets to 1 where the VM has an
/// in-kernel LAPIC (the handler then sends EOIs).
const REC_APIC: u64 = 8;
const REC_SLOTS: u64 = 30;

#[derive(Debug, PartialEq)]
enum Exit {
    Out(u16, u8),
    In(u16),
    Hlt,
    Shutdown,
    Internal(u32),
    Other(String),
}

struct Guest {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    code: Code,
    tsc_khz: u64,
    runs: u64,
    /// Longest a KVM_RUN may take before the watchdog ends it.
    limit: Duration,
}

/// KVM_INTERRUPT: _IOW(KVMIO, 0x86, struct kvm_interrupt).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;

/// Exception vectors whose frame carries an error code.
fn has_error_code(v: u16) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Emits the IDT stubs (at code offset 0x6000, 16 bytes per vector) and
/// the common handler (0x7000) every guest uses: it records the event
/// (see `Event`) in REC, then acts on R13/R14/R15 (see H_NATIVE, H_RET).
fn emit_runtime(a: &mut Asm) {
    a.org(0x6000);
    for v in 0..256u16 {
        a.org(0x6000 + 16 * v as usize);
        a.label(&format!("stub{v}"));
        if !has_error_code(v) {
            a.push_i(0); // a zero error code, so every frame looks alike
        }
        a.push_i(i32::from(v));
        a.jmp("common");
    }
    a.org(0x7000);
    a.label("common");
    // Stack: [vec, err, rip, cs, rflags, rsp, ss]; save what we clobber.
    a.push(Rax);
    a.push(Rbx);
    a.push(Rcx);
    a.push(Rdx);
    // rbx = REC + 0x80 + 0x80 * min(count, 30); count += 1
    a.mov_ri(Rbx, KBASE + REC);
    a.load(Rax, Rbx, 0);
    a.inc_m(Rbx, 0);
    // A fault that recurs forever (resumed at the faulting instruction)
    // stops here instead of spinning inside KVM_RUN.
    a.cmp_ri(Rax, RUNAWAY as i32);
    a.jcc(B, "not_runaway");
    a.label("runaway");
    a.checkpoint(CP_RUNAWAY);
    a.jmp("runaway");
    a.label("not_runaway");
    a.cmp_ri(Rax, REC_SLOTS as i32);
    a.jcc(B, "rec_ok");
    a.mov_ri(Rax, REC_SLOTS);
    a.label("rec_ok");
    a.shl_ri(Rax, 7);
    a.add_rr(Rbx, Rax);
    a.add_ri(Rbx, REC_SLOT as i32);
    for i in 0..7 {
        a.load(Rax, Rsp, 32 + 8 * i);
        a.store(Rbx, 8 * i, Rax);
    }
    a.mov_rr(Rax, Rsp);
    a.add_ri(Rax, 48);
    a.store(Rbx, 56, Rax); // the frame's address (its RIP word)
    a.mov_from_cr(Rax, 2);
    a.store(Rbx, 64, Rax);
    a.rdmsr(MSR_PVM_CTL);
    a.store(Rbx, 72, Rax);
    a.mov_from_cr(Rax, 3);
    a.store(Rbx, 112, Rax);
    // EOI to the local APIC for external interrupts (vectors >= 0x20),
    // where the VM has one (REC_APIC set by the host).
    a.load(Rax, Rsp, 32);
    a.cmp_ri(Rax, 0x20);
    a.jcc(B, "no_eoi");
    a.mov_ri(Rax, KBASE + REC);
    a.load(Rax, Rax, REC_APIC as i32);
    a.test_rr(Rax, Rax);
    a.jcc(Z, "no_eoi");
    a.mov_ri(Rax, APIC_VA);
    a.mov_ri(Rcx, 0);
    a.store32(Rax, 0xb0, Rcx);
    a.label("no_eoi");
    a.test_rr(R13, R13);
    a.jcc(Z, "no_loop1");
    a.rdtsc_to(Rax);
    a.store(Rbx, 80, Rax);
    a.mov_rr(Rcx, R13);
    a.label("loop1");
    a.dec(Rcx);
    a.jcc(NZ, "loop1");
    a.rdtsc_to(Rax);
    a.store(Rbx, 88, Rax);
    a.label("no_loop1");
    a.test_ri(R14, H_NATIVE as i32);
    a.jcc(Z, "no_native");
    a.wrmsr(MSR_PVM_CTL, 1);
    a.test_rr(R13, R13);
    a.jcc(Z, "no_native");
    a.rdtsc_to(Rax);
    a.store(Rbx, 96, Rax);
    a.mov_rr(Rcx, R13);
    a.shl_ri(Rcx, 7); // 128 times as many, native
    a.label("loop2");
    a.dec(Rcx);
    a.jcc(NZ, "loop2");
    a.rdtsc_to(Rax);
    a.store(Rbx, 104, Rax);
    a.label("no_native");
    a.test_ri(R14, H_EXIT as i32);
    a.jcc(Z, "no_exit");
    a.checkpoint(CP_EXIT);
    a.hlt();
    a.label("no_exit");
    a.test_rr(R15, R15);
    a.jcc(Z, "no_resume");
    a.store(Rsp, 48, R15); // resume at R15
    a.label("no_resume");
    a.test_ri(R14, H_RET as i32);
    a.jcc(NZ, "ret_path");
    a.pop(Rdx);
    a.pop(Rcx);
    a.pop(Rbx);
    a.pop(Rax);
    a.add_ri(Rsp, 16); // vector and error code
    a.iretq();

    // Back to kernel code without iretq. Put [rflags, rip] below the
    // interrupted RSP, switch to it, popfq, (sti), ret.
    a.label("ret_path");
    a.load(Rax, Rsp, 72); // interrupted rsp
    a.sub_ri(Rax, 16);
    a.load(Rbx, Rsp, 64);
    a.store(Rax, 0, Rbx); // rflags
    a.load(Rbx, Rsp, 48);
    a.store(Rax, 8, Rbx); // rip
    a.store(Rsp, 72, Rax);
    a.load(Rbx, Rsp, 64);
    a.test_ri(Rbx, 0x200);
    a.jcc(NZ, "ret_sti");
    a.pop(Rdx);
    a.pop(Rcx);
    a.pop(Rbx);
    a.pop(Rax);
    a.load(Rsp, Rsp, 40); // the interrupted stack, less 16
    a.popfq();
    a.ret();
    a.label("ret_sti");
    a.pop(Rdx);
    a.pop(Rcx);
    a.pop(Rbx);
    a.pop(Rax);
    a.load(Rsp, Rsp, 40);
    a.popfq();
    a.sti();
    a.ret();
}

/// Assembles a guest: `body` emits the code from label "start" (kernel
/// mode, CS 0x10, on the kernel stack); the IDT stubs and the common
/// handler follow.
fn program(body: impl FnOnce(&mut Asm)) -> Code {
    let mut a = Asm::new(KBASE + CODE);
    a.label("start");
    body(&mut a);
    a.hlt();
    emit_runtime(&mut a);
    let code = a.finish();
    assert!(code.bytes.len() <= 0x8000);
    code
}

fn gdt_entries() -> [u64; 10] {
    let tss = KBASE + TSS;
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x20 user code, 32-bit
        0x00cf_f300_0000_ffff, // 0x28 user data
        0x00af_fb00_0000_ffff, // 0x30 user code, 64-bit
        0,
        // 0x40: 64-bit TSS, limit 0x67
        0x0000_8900_0000_0067 | ((tss & 0xff_ffff) << 16) | (((tss >> 24) & 0xff) << 56),
        tss >> 32,
    ]
}

impl Guest {
    fn new(code: Code, opts: &Opts) -> Guest {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
        for (slot, region) in mem.iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Guest keeps for as long as the VM fd (both are its fields);
            // there is one region, so slots cannot overlap.
            unsafe { vm.set_user_memory_region(mr) }.expect("KVM_SET_USER_MEMORY_REGION");
        }
        if opts.irqchip {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        }
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");

        if let Ok(dir) = std::env::var("SBX_PVM_DUMP") {
            // For `objdump -D -b binary -mi386:x86-64 --adjust-vma=0xffffffff80010000`.
            let name = std::thread::current().name().unwrap_or("guest").replace("::", "_");
            let _ = std::fs::write(format!("{dir}/{name}.bin"), &code.bytes);
        }
        mem.write_slice(&code.bytes, GuestAddress(CODE)).unwrap();
        mem.write_obj(DATA_MAGIC, GuestAddress(DATA)).unwrap();
        mem.write_obj(u64::from(opts.irqchip), GuestAddress(REC + REC_APIC)).unwrap();
        for (i, e) in gdt_entries().iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        // TSS: RSP0 at +4, IST1 at +0x24, I/O map base at +0x66 beyond the
        // limit (no I/O bitmap: every port is denied to CPL 3 at IOPL 0).
        mem.write_obj(opts.rsp0, GuestAddress(TSS + 4)).unwrap();
        mem.write_obj(KBASE + IST1_TOP, GuestAddress(TSS + 0x24)).unwrap();
        mem.write_obj(0x68u16, GuestAddress(TSS + 0x66)).unwrap();
        for v in 0..256u64 {
            let target = match opts.gates.iter().find(|(g, _)| u64::from(*g) == v) {
                Some((_, label)) => code.addr(label),
                None => code.addr(&format!("stub{v}")),
            };
            let ist = u64::from(opts.ist1_vectors.contains(&(v as u8)));
            let dpl = if v == 3 { 3 } else { 0 }; // int3 allowed from user mode, as in Linux
            let lo = (target & 0xffff)
                | (KERNEL_CS << 16)
                | (ist << 32)
                | ((0x8e | (dpl << 5)) << 40) // present, 64-bit interrupt gate
                | (((target >> 16) & 0xffff) << 48);
            mem.write_obj(lo, GuestAddress(IDT + 16 * v)).unwrap();
            mem.write_obj(target >> 32, GuestAddress(IDT + 16 * v + 8)).unwrap();
        }
        let root = if opts.cr3_bit12 { PT_POOL + 0x1000 } else { PT_POOL };
        let mut pt = PageTables::new(&mem, root);
        let leaf = PTE_P | PTE_W | if opts.user_bit { PTE_U } else { 0 };
        for gpa in (0..MAPPED_END).step_by(4096) {
            pt.map(KBASE + gpa, gpa, leaf);
            pt.map(LOW + gpa, gpa, PTE_P | PTE_W | PTE_U);
        }
        pt.map(APIC_VA, APIC_GPA, PTE_P | PTE_W | PTE_U | PTE_PCD_PWT);

        let mut sregs = vcpu.get_sregs().unwrap();
        let seg = |selector: u64, type_: u8, l: u8, db: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: selector as u16,
            type_,
            present: 1,
            dpl: 0,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = seg(KERNEL_CS, 0xb, 1, 0);
        sregs.ss = seg(KERNEL_DS, 0x3, 0, 1);
        sregs.ds = seg(0, 0x3, 0, 1);
        sregs.es = sregs.ds;
        sregs.fs = sregs.ds;
        sregs.gs = sregs.ds;
        sregs.tr = kvm_bindings::kvm_segment {
            base: KBASE + TSS,
            limit: 0x67,
            selector: TSS_SEL,
            type_: 0xb,
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.gdt.base = KBASE + GDT;
        sregs.gdt.limit = (8 * gdt_entries().len() - 1) as u16;
        sregs.idt.base = KBASE + IDT;
        sregs.idt.limit = 0xfff;
        sregs.cr0 = 0x8005_0033; // PG WP AM NE ET MP PE
        sregs.cr3 = root;
        sregs.cr4 = 0x620; // OSXMMEXCPT OSFXSR PAE
        sregs.efer = 0xd01; // NXE LMA LME SCE
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: code.addr("start"),
            rsp: KBASE + KSTACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).unwrap();
        let lstar = opts.lstar.unwrap_or(if code.has("lstar") { code.addr("lstar") } else { 0 });
        let mut msrs = vec![
            (MSR_STAR, (0x23 << 48) | (KERNEL_CS << 32)),
            (MSR_LSTAR, lstar),
            (MSR_SFMASK, 0x4_7700), // TF DF IF IOPL AC NT, as Linux
            (MSR_KERNEL_GS_BASE, 0),
        ];
        if opts.native {
            msrs.push((MSR_PVM_CTL, 1));
        }
        for (idx, val) in msrs {
            assert!(set_msr(&vcpu, idx, val), "KVM_SET_MSRS {idx:#x}={val:#x} refused");
        }
        let tsc_khz = u64::from(vcpu.get_tsc_khz().expect("KVM_GET_TSC_KHZ"));
        Guest { _kvm: kvm, vm, vcpu, mem, code, tsc_khz, runs: 0, limit: RUN_LIMIT }
    }

    fn run(&mut self) -> (Exit, Duration) {
        loop {
            let t = Instant::now();
            let mut internal = false;
            self.runs += 1;
            let watchdog = Watchdog::arm(self.limit);
            let result = self.vcpu.run();
            let fired = watchdog.disarm();
            let exit = match result {
                Ok(VcpuExit::IoOut(port, data)) => Exit::Out(port, data[0]),
                Ok(VcpuExit::IoIn(port, data)) => {
                    data.fill(0xff);
                    Exit::In(port)
                }
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::Shutdown) => Exit::Shutdown,
                Ok(VcpuExit::InternalError) => {
                    internal = true;
                    Exit::Internal(0)
                }
                Ok(VcpuExit::Intr) | Err(_) if fired => Exit::Other(format!("no exit within {:?}", self.limit)),
                Ok(VcpuExit::Intr) => continue,
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
            };
            let exit = if internal {
                // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, so
                // `internal` is the union member KVM filled in; plain data.
                Exit::Internal(unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror })
            } else {
                exit
            };
            return (exit, t.elapsed());
        }
    }

    /// Runs to checkpoint `code` (an `out 0x80` of that value); returns the
    /// wall time of the last KVM_RUN.
    fn until(&mut self, code: u8) -> Duration {
        let (exit, dt) = self.run();
        if exit != Exit::Out(0x80, code) {
            panic!("expected checkpoint {code:#x}, got {exit:?}\n{}", self.describe());
        }
        dt
    }

    /// Runs and expects exactly `want`.
    fn expect(&mut self, want: Exit) {
        let (exit, _) = self.run();
        if exit != want {
            panic!("expected {want:?}, got {exit:?}\n{}", self.describe());
        }
    }

    fn describe(&self) -> String {
        let r = self.vcpu.get_regs().unwrap();
        let s = self.vcpu.get_sregs().unwrap();
        let ev = self.events();
        format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} cr3={:#x} ctl={:#x}\nevents: {ev:#x?}\nkvm-pvm log: {}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector,
            s.ss.selector,
            s.cr3,
            get_msr(&self.vcpu, MSR_PVM_CTL).unwrap_or(0),
            pvm_log_tail()
        )
    }

    fn regs(&self) -> kvm_bindings::kvm_regs {
        self.vcpu.get_regs().unwrap()
    }

    fn read(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn events(&self) -> Vec<Event> {
        let n = self.read(REC).min(REC_SLOTS);
        (0..n)
            .map(|i| {
                let s = REC + REC_SLOT + REC_SLOT * i;
                let w = |k: u64| self.read(s + 8 * k);
                Event {
                    vector: w(0),
                    err: w(1),
                    rip: w(2),
                    cs: w(3),
                    rflags: w(4),
                    rsp: w(5),
                    ss: w(6),
                    frame: w(7),
                    cr2: w(8),
                    ctl: w(9),
                    loop1: (w(10), w(11)),
                    loop2: (w(12), w(13)),
                    cr3: w(14),
                }
            })
            .collect()
    }

    fn event_count(&self) -> u64 {
        self.read(REC)
    }

    fn us(&self, cycles: u64) -> f64 {
        cycles as f64 * 1000.0 / self.tsc_khz as f64
    }
}

/// Longest a single KVM_RUN may take: a guest stuck inside KVM (a fault
/// loop, a lost interrupt, a `hlt` nobody wakes) fails its test instead
/// of hanging the suite.
const RUN_LIMIT: Duration = Duration::from_secs(10);

/// Interrupts this thread's KVM_RUN (a signal makes it return EINTR) if
/// not disarmed within the limit.
struct Watchdog {
    cancel: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn watchdog_signal() -> libc::c_int {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    let sig = vmm_sys_util::signal::SIGRTMIN() + 3;
    REGISTERED.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(sig, ignore_signal).expect("register the watchdog signal")
    });
    sig
}

impl Watchdog {
    fn arm(limit: Duration) -> Watchdog {
        let sig = watchdog_signal();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let (cancel, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(limit) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return false;
            }
            // SAFETY: `me` is the test thread blocked in KVM_RUN: it lives
            // until it has joined this thread (disarm), so the id is
            // valid; the signal's handler does nothing.
            unsafe { libc::pthread_kill(me, sig) };
            true
        });
        Watchdog { cancel, thread }
    }
    /// Whether it fired.
    fn disarm(self) -> bool {
        drop(self.cancel);
        self.thread.join().unwrap_or(true)
    }
}

/// The last kvm-pvm lines of the kernel log (for failure messages).
fn pvm_log_tail() -> String {
    let out = std::process::Command::new("dmesg").output().map(|o| o.stdout).unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("kvm-pvm")).collect();
    lines[lines.len().saturating_sub(6)..].join("\n  ")
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
    let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]).unwrap();
    vcpu.set_msrs(&msrs).map(|n| n == 1).unwrap_or(false)
}

fn get_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).unwrap();
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// 4-level page tables built in guest memory from PT_POOL up.
struct PageTables<'a> {
    mem: &'a GuestMemoryMmap,
    root: u64,
    next: u64,
}

impl<'a> PageTables<'a> {
    fn new(mem: &'a GuestMemoryMmap, root: u64) -> PageTables<'a> {
        Self::at(mem, root, PT_POOL + 0x2000)
    }
    /// A root at `root`, tables allocated from `next` up.
    fn at(mem: &'a GuestMemoryMmap, root: u64, next: u64) -> PageTables<'a> {
        mem.write_slice(&[0u8; 4096], GuestAddress(root)).unwrap();
        PageTables { mem, root, next }
    }
    /// Maps the 4 KiB page at `va` to `gpa` with `flags` on the leaf; the
    /// levels above are P|W|U (the leaf decides).
    fn map(&mut self, va: u64, gpa: u64, flags: u64) {
        let mut table = self.root;
        for shift in [39, 30, 21] {
            let slot = table + ((va >> shift) & 0x1ff) * 8;
            let e: u64 = self.mem.read_obj(GuestAddress(slot)).unwrap();
            table = if e & PTE_P != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let t = self.next;
                self.next += 0x1000;
                assert!(self.next <= MAPPED_END, "page-table pool exhausted");
                self.mem.write_slice(&[0u8; 4096], GuestAddress(t)).unwrap();
                self.mem.write_obj(t | PTE_P | PTE_W | PTE_U, GuestAddress(slot)).unwrap();
                t
            };
        }
        self.mem.write_obj(gpa | flags, GuestAddress(table + ((va >> 12) & 0x1ff) * 8)).unwrap();
    }
}

/// Cycles per iteration of a `count_down` loop timed with rdtsc.
fn per_iter(t0: u64, t1: u64, n: u64) -> f64 {
    t1.wrapping_sub(t0) as f64 / n as f64
}

/// Native code runs a `dec; jnz` iteration in about one cycle; the
/// emulator needs thousands (1700 to 7000 measured). Native loops are long
/// enough (1M iterations or more) that a host preemption of a few
/// milliseconds inside one stays under the bound.
const NATIVE_MAX_CYCLES_PER_ITER: f64 = 50.0;
const EMULATED_MIN_CYCLES_PER_ITER: f64 = 500.0;
/// Iterations for loops expected to run natively, and emulated.
const N_NATIVE: u64 = 2_000_000;
const N_EMULATED: u64 = 20_000;

// ---------------------------------------------------------------------------
// Switching to native mode, and proof that it is native.

/// The control word, signature and feature MSRs exist; the signature is
/// "PVM". (0x4b564d12/13 are printed only: their meaning is unknown.)
#[test]
fn pvm_msrs_answer_with_the_pvm_signature() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.rdmsr(MSR_PVM_SIG);
        a.mov_rr(R8, Rax);
        a.rdmsr(MSR_PVM_CTL);
        a.mov_rr(R9, Rax);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { native: false, ..Default::default() });
    let host: Vec<Option<u64>> = (0..4).map(|i| get_msr(&g.vcpu, MSR_PVM_CTL + i)).collect();
    g.until(1);
    let r = g.regs();
    eprintln!(
        "pvm MSRs, host view: ctl={:#x?} sig={:#x?} 0x4b564d12={:#x?} 0x4b564d13={:#x?}; guest view: sig={:#x} ctl={:#x}",
        host[0], host[1], host[2], host[3], r.r8, r.r9
    );
    assert_eq!(host[1], Some(0x4d_5650), "host read of the signature MSR");
    assert_eq!(r.r8, 0x4d_5650, "guest rdmsr of the signature MSR");
    assert_eq!(r.r9 & 1, 0, "a new vCPU starts with native mode off");
}

/// KVM_SET_MSRS of MSR_PVM_CTL=1 before KVM_RUN, with the kernel mapped U=1:
/// the same `dec; jnz` loop runs at hardware speed instead of through the
/// emulator, with no exits in between (one KVM_RUN for the whole loop).
#[test]
fn host_msr_write_makes_guest_kernel_code_native() {
    let Some(_host) = pvm_host() else { return };
    let rate = |native: bool, n: u64| {
        let code = program(|a| {
            a.checkpoint(1);
            a.timed_loop(R8, R9, n);
            a.checkpoint(2);
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        g.until(1);
        let runs = g.runs;
        let dt = g.until(2);
        let r = g.regs();
        let cs = g.vcpu.get_sregs().unwrap().cs;
        assert_eq!((cs.selector, cs.dpl), (0x10, 0), "KVM sees guest kernel mode");
        assert_eq!(g.runs - runs, 1, "the loop ran without an exit to the VMM");
        (2.0 * n as f64 / dt.as_secs_f64(), per_iter(r.r8, r.r9, n), get_msr(&g.vcpu, MSR_PVM_CTL))
    };
    let (emulated, emulated_cpi, _) = rate(false, 100_000);
    let (native, native_cpi, ctl) = rate(true, 20_000_000);
    eprintln!(
        "guest kernel loop: emulated {:.2} M instr/s ({emulated_cpi:.0} cycles/iter), native {:.0} M instr/s \
         ({native_cpi:.2} cycles/iter): {:.0}x; host reads ctl={ctl:#x?}",
        emulated / 1e6,
        native / 1e6,
        native / emulated
    );
    assert!(native > 100.0 * emulated, "native {native:.3e} instr/s vs emulated {emulated:.3e}");
    assert!(native_cpi < NATIVE_MAX_CYCLES_PER_ITER && emulated_cpi > EMULATED_MIN_CYCLES_PER_ITER);
}

/// The guest switches itself: `wrmsr MSR_PVM_CTL, 1` from emulated kernel
/// code on a U=1 page is accepted, reads back 1, and the code after it
/// runs natively.
#[test]
fn guest_wrmsr_from_a_user_accessible_page_switches_to_native() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.timed_loop(R8, R9, N_EMULATED);
        a.wrmsr(MSR_PVM_CTL, 1);
        a.rdmsr(MSR_PVM_CTL);
        a.mov_rr(R12, Rax);
        a.timed_loop(R10, R11, N_NATIVE);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { native: false, ..Default::default() });
    g.until(1);
    let r = g.regs();
    let (before, after) = (per_iter(r.r8, r.r9, N_EMULATED), per_iter(r.r10, r.r11, N_NATIVE));
    eprintln!("guest wrmsr to native: {before:.0} cycles/iter before, {after:.2} after; guest reads ctl={:#x}", r.r12);
    assert_eq!(r.r12 & 1, 1, "the guest reads its native bit back");
    assert!(before > EMULATED_MIN_CYCLES_PER_ITER, "before the wrmsr: {before} cycles/iter");
    assert!(after < NATIVE_MAX_CYCLES_PER_ITER, "after the wrmsr: {after} cycles/iter");
}

/// Native mode needs the kernel's pages user-accessible. With U=0 leaves
/// a host-set native bit changes nothing (the code runs on, emulated). A
/// guest wrmsr of the bit from a U=0 page is accepted, and the very next
/// instruction fetch faults: #PF with error code P|U|I (a user-mode fetch
/// from a supervisor page) and CR2 = RIP, delivered to the guest's IDT.
#[test]
fn native_mode_needs_kernel_pages_with_the_user_bit() {
    let Some(_host) = pvm_host() else { return };
    let n = N_EMULATED;
    let code = program(|a| {
        a.timed_loop(R8, R9, n);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { user_bit: false, ..Default::default() });
    g.until(1);
    let r = g.regs();
    let cpi = per_iter(r.r8, r.r9, n);
    eprintln!("host-set native bit, kernel on U=0 pages: {cpi:.0} cycles/iter");
    assert!(cpi > EMULATED_MIN_CYCLES_PER_ITER, "U=0 kernel code ran natively ({cpi} cycles/iter)");

    let code = program(|a| {
        a.mov_rl(R15, "after");
        a.wrmsr(MSR_PVM_CTL, 1);
        a.label("after");
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { native: false, user_bit: false, ..Default::default() });
    g.until(1);
    let ev = g.events();
    eprintln!("wrmsr from a U=0 page: {ev:x?}");
    assert_eq!(ev.len(), 1);
    let after = g.code.addr("after");
    assert_eq!(
        (ev[0].vector, ev[0].err, ev[0].cr2, ev[0].rip),
        (14, 0x15, after, after),
        "#PF(P|U|I) on the next fetch"
    );
    assert_eq!((ev[0].cs, ev[0].ctl & 1), (KERNEL_CS, 1), "a kernel frame; the bit was set");
}

/// Native mode needs a page-table root with bit 12 set (in Linux's KPTI
/// layout, the user half of an 8 KiB PGD pair): with an even root the
/// host-set bit changes nothing and the code runs on, emulated. Native
/// code that loads another odd root (`mov cr3`, trapped) stays native;
/// loading an even root ends native execution.
#[test]
fn native_mode_needs_cr3_bit_12() {
    let Some(_host) = pvm_host() else { return };
    let n = N_EMULATED;
    let code = program(|a| {
        a.timed_loop(R8, R9, n);
        a.wrmsr(MSR_PVM_CTL, 1);
        a.rdmsr(MSR_PVM_CTL);
        a.mov_rr(R12, Rax);
        a.timed_loop(R10, R11, n);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { cr3_bit12: false, ..Default::default() });
    g.until(1);
    let r = g.regs();
    let (host_set, guest_set) = (per_iter(r.r8, r.r9, n), per_iter(r.r10, r.r11, n));
    eprintln!(
        "CR3={:#x}: {host_set:.0} cycles/iter with the host-set bit, {guest_set:.0} after a guest wrmsr (reads {:#x})",
        PT_POOL, r.r12
    );
    assert!(host_set > EMULATED_MIN_CYCLES_PER_ITER && guest_set > EMULATED_MIN_CYCLES_PER_ITER);

    // From the odd root to another odd one, then to an even one.
    const ODD: u64 = 0x1c1000;
    const EVEN: u64 = 0x1d0000;
    let code = program(|a| {
        a.mov_ri(Rax, ODD);
        a.mov_to_cr(3, Rax);
        a.timed_loop(R8, R9, N_NATIVE);
        a.mov_ri(Rax, EVEN);
        a.mov_to_cr(3, Rax);
        a.timed_loop(R10, R11, n);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    for (root, next) in [(ODD, ODD + 0x1000), (EVEN, EVEN + 0x1000)] {
        let mut pt = PageTables::at(&g.mem, root, next);
        for gpa in (0..0x90000).step_by(4096) {
            pt.map(KBASE + gpa, gpa, PTE_P | PTE_W | PTE_U);
        }
    }
    g.until(1);
    let r = g.regs();
    let (odd, even) = (per_iter(r.r8, r.r9, N_NATIVE), per_iter(r.r10, r.r11, n));
    eprintln!("native code switching roots: {odd:.2} cycles/iter on another odd root, {even:.0} on an even one");
    assert!(odd < NATIVE_MAX_CYCLES_PER_ITER && even > EMULATED_MIN_CYCLES_PER_ITER);
}

// ---------------------------------------------------------------------------
// Exceptions in native mode: where the frame goes, what it holds.

/// Kernel-mode #BP, #UD, #GP and #PF raised by native code reach the
/// guest's IDT with a normal 64-bit frame (kernel CS/SS, the interrupted
/// RSP and RIP, #GP's and #PF's error codes, CR2), but the frame is always
/// written at TSS.RSP0, never below the interrupted stack pointer: even
/// when the kernel was running on the RSP0 stack itself, the frame lands
/// above its RSP, on live data. A guest kernel must treat RSP0 as an entry
/// stack it leaves at once (as Linux's KPTI entry stack), never run on it.
#[test]
fn kernel_exceptions_in_native_mode_land_on_tss_rsp0() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        let faults: [(&str, Emit); 4] = [
            ("bp", |a| a.int3()),
            ("ud", |a| a.ud2()),
            ("gp", |a| {
                a.mov_ri(Rax, NONCANONICAL);
                a.label("gp");
                a.load(Rax, Rax, 0);
            }),
            ("pf", |a| {
                a.mov_ri(Rax, UNMAPPED);
                a.label("pf");
                a.load(Rax, Rax, 0);
            }),
        ];
        for (name, fault) in faults {
            a.wrmsr(MSR_PVM_CTL, 1); // handlers return emulated: native again
            a.mov_rl(R15, &format!("{name}_done"));
            if name == "bp" || name == "ud" {
                a.label(name);
            }
            fault(a);
            a.label(&format!("{name}_done"));
        }
        // The same with the kernel running on the RSP0 stack, 0x100 below its top.
        a.wrmsr(MSR_PVM_CTL, 1);
        a.mov_ri(Rsp, KBASE + RSP0_TOP - 0x100);
        a.mov_rl(R15, "on_rsp0_done");
        a.label("on_rsp0");
        a.int3();
        a.label("on_rsp0_done");
        a.mov_ri(Rsp, KBASE + KSTACK_TOP);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let ev = g.events();
    for e in &ev {
        eprintln!("kernel event in native mode: {e:x?}");
    }
    assert_eq!(ev.len(), 5);
    let want = [
        (3, 0, g.code.addr("bp") + 1), // a trap: RIP after int3
        (6, 0, g.code.addr("ud")),
        (13, 0, g.code.addr("gp")),
        (14, 0x4, g.code.addr("pf")), // the U bit: see kernel_page_fault_error_codes
        (3, 0, g.code.addr("on_rsp0") + 1),
    ];
    for (i, (e, (vector, err, rip))) in ev.iter().zip(want).enumerate() {
        assert_eq!((e.vector, e.err, e.rip), (vector, err, rip), "event {i}");
        assert_eq!((e.cs, e.ss), (KERNEL_CS, KERNEL_DS), "event {i}: kernel frame");
        assert_eq!(e.frame, KBASE + RSP0_TOP - 40, "event {i}: frame at TSS.RSP0");
        assert_eq!(e.ctl & 1, 1, "event {i}: the native bit still reads 1 in the handler");
    }
    assert_eq!(ev[3].cr2, UNMAPPED);
    for e in &ev[..4] {
        assert_eq!(e.rsp, KBASE + KSTACK_TOP, "the interrupted RSP");
    }
    assert_eq!(ev[4].rsp, KBASE + RSP0_TOP - 0x100);
    assert!(ev[4].frame > ev[4].rsp, "kernel->kernel frame above the interrupted RSP (x86 pushes below)");
}

/// Error codes of kernel-mode page faults: taken in native mode they carry
/// the U bit (0x4), as hardware reports a fault at CPL3; in emulated mode
/// they do not. The W (0x2) and I/D (0x10) bits are right in both; the
/// frame's CS is the kernel's in both, so a guest kernel must decide
/// "user or kernel fault" from the frame's CS, not from the error code.
#[test]
fn kernel_page_fault_error_codes_carry_the_user_bit_in_native_mode() {
    let Some(_host) = pvm_host() else { return };
    let errs = |native: bool| {
        let code = program(|a| {
            for (i, kind) in ["read", "write", "fetch"].iter().enumerate() {
                if native {
                    a.wrmsr(MSR_PVM_CTL, 1);
                }
                a.mov_rl(R15, &format!("done{i}"));
                a.mov_ri(Rax, UNMAPPED);
                match *kind {
                    "read" => a.load(Rax, Rax, 0),
                    "write" => a.store(Rax, 0, Rax),
                    _ => a.jmp_r(Rax),
                }
                a.label(&format!("done{i}"));
            }
            a.checkpoint(1);
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        g.until(1);
        let ev = g.events();
        assert_eq!(ev.len(), 3, "{ev:x?}");
        for e in &ev {
            assert_eq!((e.vector, e.cs, e.cr2), (14, KERNEL_CS, UNMAPPED), "{e:x?}");
        }
        ev.iter().map(|e| e.err).collect::<Vec<_>>()
    };
    let native = errs(true);
    let emulated = errs(false);
    eprintln!("kernel #PF error codes (read, write, fetch): native {native:#x?}, emulated {emulated:#x?}");
    assert_eq!(native, vec![0x4, 0x6, 0x14]);
    assert_eq!(emulated, vec![0x0, 0x2, 0x10]);
}

/// A gate with IST=1 puts the frame at TSS.IST1 instead of RSP0 (native
/// kernel mode, kernel->kernel), as on hardware.
#[test]
fn gate_ist_moves_the_frame_to_the_ist_stack() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.mov_rl(R15, "bp_done");
        a.int3();
        a.label("bp_done");
        a.wrmsr(MSR_PVM_CTL, 1);
        a.mov_rl(R15, "ud_done");
        a.ud2();
        a.label("ud_done");
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { ist1_vectors: vec![3], ..Default::default() });
    g.until(1);
    let ev = g.events();
    assert_eq!(ev.len(), 2, "{ev:x?}");
    assert_eq!((ev[0].vector, ev[0].frame), (3, KBASE + IST1_TOP - 40), "#BP on IST1");
    assert_eq!((ev[1].vector, ev[1].frame), (6, KBASE + RSP0_TOP - 40), "#UD on RSP0");
}

/// The event stack must be an upper-half address in native mode: with
/// TSS.RSP0 at a lower-half alias of the same (U=1, mapped) memory the
/// first kernel exception (#UD here) is a triple fault (KVM_EXIT_SHUTDOWN;
/// kvm-pvm logs #SS while pushing the frame). In emulated mode the same
/// setup delivers normally, and the kernel->kernel frame goes where x86
/// puts it: on the interrupted stack (no stack switch at the same
/// privilege level), not on RSP0.
#[test]
fn lower_half_event_stack_is_a_triple_fault_in_native_mode() {
    let Some(_host) = pvm_host() else { return };
    for native in [true, false] {
        let code = program(|a| {
            a.mov_rl(R15, "ud_done");
            a.ud2();
            a.label("ud_done");
            a.checkpoint(1);
        });
        let mut g = Guest::new(code, &Opts { native, rsp0: LOW + RSP0_TOP, ..Default::default() });
        if native {
            g.expect(Exit::Shutdown);
        } else {
            g.until(1);
            let ev = g.events();
            assert_eq!((ev.len(), ev[0].frame), (1, KBASE + KSTACK_TOP - 40), "{ev:x?}");
        }
    }
}

/// User-mode #UD, #BP (through a DPL-3 gate), #PF and #GP reach the guest
/// kernel's IDT with user frames (CS 0x33, SS 0x2b, the user RSP) on
/// TSS.RSP0, handlers run with kernel CS, and `iretq` from the handler
/// returns to user mode, which runs natively.
#[test]
fn user_exceptions_reach_the_guest_idt_with_user_frames() {
    let Some(_host) = pvm_host() else { return };
    let n = N_NATIVE;
    let code = program(|a| {
        a.sysret_to("user");
        a.label("user");
        a.mov_rl(R15, "ud_done");
        a.label("ud");
        a.ud2();
        a.label("ud_done");
        a.mov_rl(R15, "bp_done");
        a.label("bp");
        a.int3();
        a.label("bp_done");
        a.mov_rl(R15, "pf_done");
        a.mov_ri(Rax, UNMAPPED);
        a.label("pf");
        a.store(Rax, 0, Rax);
        a.label("pf_done");
        a.mov_rl(R15, "gp_done");
        a.mov_ri(Rax, NONCANONICAL);
        a.label("gp");
        a.load(Rax, Rax, 0);
        a.label("gp_done");
        a.timed_loop(R8, R9, n);
        a.user_exit();
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(CP_EXIT);
    let ev = g.events();
    for e in &ev {
        eprintln!("user event: {e:x?}");
    }
    assert_eq!(ev.len(), 5, "4 faults and the exit");
    let want = [(6, 0, "ud", 0), (3, 0, "bp", 1), (14, 0x6, "pf", 0), (13, 0, "gp", 0)];
    for (e, (vector, err, at, plus)) in ev.iter().zip(want) {
        assert_eq!((e.vector, e.err, e.rip), (vector, err, g.code.addr(at) + plus), "{at}");
        assert_eq!((e.cs, e.ss, e.rsp), (USER_CS, USER_DS, KBASE + USTACK_TOP), "{at}: user frame");
        assert_eq!(e.frame, KBASE + RSP0_TOP - 40, "{at}: on RSP0");
        assert_eq!(e.rflags & 0x200, 0x200, "{at}: user IF in the frame");
    }
    assert_eq!(ev[2].cr2, UNMAPPED);
    let r = g.regs();
    let cpi = per_iter(r.r8, r.r9, n);
    eprintln!("user loop after iretq from the handlers: {cpi:.2} cycles/iter");
    assert!(cpi < NATIVE_MAX_CYCLES_PER_ITER);
}

// ---------------------------------------------------------------------------
// Privilege: what guest user mode may do, and how to keep it from that.

#[derive(Debug, PartialEq, Clone, Copy)]
enum UserMode {
    /// The native bit is set when the kernel enters user mode.
    BitSet,
    /// The kernel never set it (today's emulated kernel).
    NeverSet,
    /// A native kernel clears it (`wrmsr MSR_PVM_CTL, 0`) before `sysretq`.
    ClearedBeforeSysret,
}

/// Privileged instructions in guest user mode. With the native bit set,
/// kvm-pvm runs them for user code as for the kernel: `mov cr3`, `wrmsr`,
/// `cli`, port I/O (the TSS denies every port) and `hlt` all take effect,
/// none faults. That is no guest user/kernel isolation at all. With the
/// bit clear, whether never set or cleared by the native kernel before
/// `sysretq`, each of them (and a user wrmsr that would set the bit) raises
/// #GP(0) as on hardware. So a native-mode guest kernel must clear the bit
/// on every return to user mode. (Cleared from native code, the bit takes
/// the kernel's privileges away at once but not native execution: the
/// `sysretq` after it is a kernel #GP, and the emulated `iretq` that
/// returns from that #GP re-runs the `sysretq`, which then enters user
/// mode; see native_code_keeps_running_after_clearing_the_bit.)
#[test]
fn user_privilege_checks_hold_only_while_the_native_bit_is_clear() {
    let Some(_host) = pvm_host() else { return };
    for mode in [UserMode::BitSet, UserMode::NeverSet, UserMode::ClearedBeforeSysret] {
        let code = program(|a| {
            if mode == UserMode::ClearedBeforeSysret {
                a.wrmsr(MSR_PVM_CTL, 0);
            }
            a.sysret_to("user");
            a.label("user");
            a.mov_ri(Rax, 0);
            a.mov_rl(R15, "cr3");
            a.mov_from_cr(Rax, 3);
            a.label("cr3");
            a.mov_rr(R12, Rax);
            a.mov_rl(R15, "wrmsr");
            a.wrmsr(MSR_KERNEL_GS_BASE, 0x1234);
            a.label("wrmsr");
            a.mov_rl(R15, "cli");
            a.cli();
            a.label("cli");
            a.mov_rl(R15, "in");
            a.in_al(0x71);
            a.label("in");
            a.mov_rl(R15, "hlt");
            a.hlt();
            a.label("hlt");
            a.mov_rl(R15, "set_bit");
            a.wrmsr(MSR_PVM_CTL, 1);
            a.label("set_bit");
            a.user_exit();
        });
        let native = mode != UserMode::NeverSet;
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        let mut reached_vmm = vec![];
        loop {
            match g.run().0 {
                Exit::Out(0x80, CP_EXIT) => break,
                e @ (Exit::In(0x71) | Exit::Hlt) => reached_vmm.push(e),
                e => panic!("{mode:?}: unexpected {e:?}\n{}", g.describe()),
            }
        }
        let ev = g.events();
        let gp: Vec<u64> = ev.iter().filter(|e| e.vector == 13).map(|e| e.rip).collect();
        let gs_base = get_msr(&g.vcpu, MSR_KERNEL_GS_BASE).unwrap();
        eprintln!(
            "{mode:?}: user #GPs at {gp:#x?}; exits {reached_vmm:?}; user read cr3 {:#x}; KERNEL_GS_BASE {gs_base:#x}",
            g.regs().r12
        );
        let exit = ev.last().unwrap();
        assert_eq!((exit.vector, exit.cs), (3, USER_CS), "{mode:?}: still user mode at the end");
        if mode == UserMode::BitSet {
            assert!(gp.is_empty(), "no #GP with the bit set: {gp:#x?}");
            assert_eq!(reached_vmm, vec![Exit::In(0x71), Exit::Hlt], "user port I/O and hlt reach the VMM");
            assert_eq!(g.regs().r12, PT_POOL + 0x1000, "user read CR3");
            assert_eq!(gs_base, 0x1234, "user wrote an MSR");
            assert_eq!(exit.rflags & 0x200, 0, "user cli cleared the guest's IF");
        } else {
            let at = |l: &str, len: u64| g.code.addr(l) - len;
            let mut want =
                vec![at("cr3", 3), at("wrmsr", 2), at("cli", 1), at("in", 2), at("hlt", 1), at("set_bit", 2)];
            let mut user_gp: Vec<&Event> = ev.iter().filter(|e| e.vector == 13).collect();
            if mode == UserMode::ClearedBeforeSysret {
                // The kernel's own sysretq, run natively without privileges.
                let sysret = user_gp.remove(0);
                assert_eq!((sysret.cs, sysret.rip), (KERNEL_CS, at("user", 3)), "the kernel sysretq: {sysret:x?}");
                want.insert(0, sysret.rip);
            }
            assert_eq!(gp, want, "{mode:?}: each privileged instruction #GPs");
            assert!(user_gp.iter().all(|e| e.err == 0 && e.cs == USER_CS));
            assert!(reached_vmm.is_empty());
            assert_eq!(gs_base, 0);
            assert_eq!(exit.rflags & 0x200, 0x200);
        }
    }
}

/// `syscall` from guest user mode jumps to LSTAR with RCX/R11 set as on
/// hardware but does not enter guest kernel mode, native bit set or not:
/// the code at LSTAR runs with the user CS (0x33), on the user stack. With
/// the bit set it may run privileged instructions (as any user code then);
/// with it clear, `mov rax, cr3` there is a user #GP. So a kernel with
/// isolation cannot enter through `syscall`; it must enter through an
/// exception (as patch 0001 does: LSTAR at an unmapped address, #PF).
#[test]
fn syscall_reaches_lstar_without_entering_kernel_mode() {
    let Some(_host) = pvm_host() else { return };
    for native in [true, false] {
        let code = program(|a| {
            a.sysret_to("user");
            a.label("user");
            a.syscall();
            a.label("after_syscall");
            a.hlt();
            a.label("lstar");
            a.mov_rr(R9, R11);
            a.mov_rr(R10, Rcx);
            a.mov_rl(R15, "lstar_cr3");
            a.mov_from_cr(Rax, 3);
            a.label("lstar_cr3");
            a.user_exit();
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        g.until(CP_EXIT);
        let ev = g.events();
        let r = g.regs();
        eprintln!("syscall, native bit {native}: rcx={:#x} r11={:#x} events {ev:x?}", r.r10, r.r9);
        assert_eq!((r.r10, r.r9 & 0x200), (g.code.addr("after_syscall"), 0x200), "RCX, R11 as on hardware");
        let exit = ev.last().unwrap();
        assert_eq!((exit.vector, exit.cs, exit.rsp), (3, USER_CS, KBASE + USTACK_TOP), "LSTAR code ran in user mode");
        if native {
            assert_eq!(ev.len(), 1, "mov cr3 allowed");
        } else {
            assert_eq!(ev.len(), 2);
            assert_eq!((ev[0].vector, ev[0].cs, ev[0].rip), (13, USER_CS, g.code.addr("lstar_cr3") - 3), "#GP");
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers, and the ways back into kernel code and to user mode.

/// An exception handler starts emulated, whether the event came from
/// native kernel code or from user mode, although the guest still reads
/// the bit as 1; one `wrmsr MSR_PVM_CTL, 1` makes it native again.
#[test]
fn handlers_start_emulated_until_the_guest_sets_the_bit_again() {
    let Some(_host) = pvm_host() else { return };
    let n = N_EMULATED;
    let code = program(|a| {
        a.mov_ri(R13, n);
        a.mov_ri(R14, H_NATIVE | H_RET);
        a.mov_rl(R15, "kernel_done");
        a.ud2();
        a.label("kernel_done");
        a.mov_ri(R14, 0);
        a.sysret_to("user");
        a.label("user");
        a.mov_rl(R15, "user_done");
        a.mov_ri(R14, H_NATIVE);
        a.ud2();
        a.label("user_done");
        a.mov_ri(R13, 0);
        a.user_exit();
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(CP_EXIT);
    let ev = g.events();
    assert_eq!(ev.len(), 3);
    for (e, from) in ev[..2].iter().zip(["kernel", "user"]) {
        let (before, after) = (per_iter(e.loop1.0, e.loop1.1, n), per_iter(e.loop2.0, e.loop2.1, 128 * n));
        eprintln!("handler for a #UD from {from} mode: {before:.0} cycles/iter on entry, {after:.2} after wrmsr");
        assert_eq!(e.ctl & 1, 1, "the guest reads the bit as set");
        assert!(before > EMULATED_MIN_CYCLES_PER_ITER, "{from}: emulated on entry ({before})");
        assert!(after < NATIVE_MAX_CYCLES_PER_ITER, "{from}: native after the wrmsr ({after})");
    }
}

/// Back to interrupted kernel code: `iretq` run by the emulator (a handler
/// that has not set the bit again) works, and the kernel code then runs on
/// emulated until the next wrmsr. A native `iretq` to CS 0x10 raises
/// #GP(0x10) (the selector: hardware checks it against the host's GDT); the
/// #GP handler's return re-runs that iretq emulated, which then succeeds.
#[test]
fn iretq_to_kernel_code_works_only_emulated() {
    let Some(_host) = pvm_host() else { return };
    let n = N_EMULATED;
    let code = program(|a| {
        // 1. A #UD whose handler returns with an emulated iretq.
        a.mov_rl(R15, "ud_done");
        a.ud2();
        a.label("ud_done");
        a.timed_loop(R8, R9, n);
        // 2. A native iretq to kernel code, through a frame built by hand.
        a.wrmsr(MSR_PVM_CTL, 1);
        a.mov_ri(R15, 0);
        a.mov_rr(Rax, Rsp);
        a.push_i(KERNEL_DS as i32);
        a.push(Rax);
        a.push_i(2);
        a.push_i(KERNEL_CS as i32);
        a.mov_rl(Rax, "iret_target");
        a.push(Rax);
        a.label("iret");
        a.iretq();
        a.label("iret_target");
        a.timed_loop(R10, R11, n);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let ev = g.events();
    let r = g.regs();
    let (after_ud, after_iret) = (per_iter(r.r8, r.r9, n), per_iter(r.r10, r.r11, n));
    eprintln!("after the handler's iretq: {after_ud:.0} cycles/iter; after the redone iretq: {after_iret:.0}; {ev:x?}");
    assert_eq!(ev.len(), 2);
    assert_eq!((ev[1].vector, ev[1].err, ev[1].rip, ev[1].cs), (13, 0x10, g.code.addr("iret"), KERNEL_CS));
    assert!(after_ud > EMULATED_MIN_CYCLES_PER_ITER && after_iret > EMULATED_MIN_CYCLES_PER_ITER);
}

/// Back to interrupted kernel code natively, without iretq: the handler
/// sets the bit, writes [RFLAGS, RIP] below the interrupted RSP, switches
/// to that stack, `popfq`, `ret`. The kernel code continues natively with
/// its arithmetic flags restored (CF here). (IF is not restored by popfq
/// at hardware CPL 3: the handler uses `sti` when the frame had IF; see
/// the interrupt tests.)
#[test]
fn kernel_code_resumes_natively_through_popfq_and_ret() {
    let Some(_host) = pvm_host() else { return };
    let n = N_NATIVE;
    let code = program(|a| {
        a.mov_ri(R14, H_NATIVE | H_RET);
        a.mov_rl(R15, "resumed");
        a.stc();
        a.ud2();
        a.label("resumed");
        a.pushfq();
        a.pop(R12);
        a.timed_loop(R8, R9, n);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let r = g.regs();
    let cpi = per_iter(r.r8, r.r9, n);
    eprintln!("after the popfq/ret return: {cpi:.2} cycles/iter, flags {:#x}", r.r12);
    assert_eq!(g.events().len(), 1);
    assert_eq!(r.r12 & 1, 1, "CF restored");
    assert_eq!(r.rsp, KBASE + KSTACK_TOP, "the interrupted stack, balanced");
    assert!(cpi < NATIVE_MAX_CYCLES_PER_ITER);
}

/// Clearing the bit from native kernel code (`wrmsr MSR_PVM_CTL, 0`) does
/// not leave native execution: the code runs on natively, but privileged
/// instructions now raise #GP (a kernel #GP, CS 0x10) instead of being
/// emulated for it. Only that event brings the vCPU back to the emulator.
#[test]
fn native_code_keeps_running_after_clearing_the_bit() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.wrmsr(MSR_PVM_CTL, 0);
        a.timed_loop(R8, R9, N_NATIVE);
        a.mov_rl(R15, "cr3_done");
        a.mov_from_cr(Rax, 3);
        a.label("cr3_done");
        a.timed_loop(R10, R11, N_EMULATED);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let r = g.regs();
    let (cleared, after_gp) = (per_iter(r.r8, r.r9, N_NATIVE), per_iter(r.r10, r.r11, N_EMULATED));
    let ev = g.events();
    eprintln!("bit cleared from native code: {cleared:.2} cycles/iter, after the #GP {after_gp:.0}; {ev:x?}");
    assert!(cleared < NATIVE_MAX_CYCLES_PER_ITER, "still native");
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].vector, ev[0].cs, ev[0].rip), (13, KERNEL_CS, g.code.addr("cr3_done") - 3), "kernel #GP");
    assert!(after_gp > EMULATED_MIN_CYCLES_PER_ITER, "emulated after the event");
}

/// To user mode from a native kernel with a hand-built `iretq` frame (no
/// event before it): the jump happens, but kvm-pvm does not notice the
/// change of mode. KVM still reports CS 0x10, privileged instructions run,
/// and the next exception has a kernel frame (CS 0x10, SS 0x18) with the
/// user RSP. A native kernel must not enter user mode this way.
#[test]
fn native_iretq_to_user_mode_is_not_noticed() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.wrmsr(MSR_PVM_CTL, 1);
        a.push_i(USER_DS as i32);
        a.mov_ri(Rax, KBASE + USTACK_TOP);
        a.push(Rax);
        a.push_i(0x202);
        a.push_i(USER_CS as i32);
        a.mov_rl(Rax, "user");
        a.push(Rax);
        a.iretq();
        a.label("user");
        a.mov_rl(R15, "user_cr3");
        a.mov_from_cr(Rax, 3);
        a.label("user_cr3");
        a.checkpoint(1);
        a.user_exit();
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let cs = g.vcpu.get_sregs().unwrap().cs;
    assert_eq!(g.regs().rip, g.code.addr("user_cr3") + 4, "the user code runs");
    assert_eq!((cs.selector, cs.dpl), (0x10, 0), "KVM still reports kernel mode");
    g.until(CP_EXIT);
    let ev = g.events();
    eprintln!("native iretq to user mode: {ev:x?}");
    assert_eq!(ev.len(), 1, "mov cr3 ran: {ev:x?}");
    assert_eq!((ev[0].cs, ev[0].ss, ev[0].rsp), (KERNEL_CS, KERNEL_DS, KBASE + USTACK_TOP), "a kernel frame");
}

/// `int n` cannot run in native mode: from native kernel code, and from
/// user code with the bit set, it ends the VM with an emulation failure
/// (KVM_EXIT_INTERNAL_ERROR, suberror 1). From user code with the bit
/// clear it arrives as #UD (as with today's emulated kernel). (Emulated
/// kernel code cannot run `int n` at all: PLATFORM.md.) A native kernel
/// must not use `int n`, must keep the bit clear in user mode, and can
/// offer 32-bit `int 0x80` system calls only through its #UD handler.
#[test]
fn int_n_ends_the_vm_in_native_mode() {
    let Some(_host) = pvm_host() else { return };
    for (native, user) in [(true, false), (true, true), (false, true)] {
        let code = program(|a| {
            if user {
                a.sysret_to("user");
                a.label("user");
                a.mov_rl(R15, "int_done");
                a.label("int");
                a.int_n(0x80);
                a.label("int_done");
                a.user_exit();
            } else {
                a.int_n(0x30);
                a.checkpoint(1);
            }
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        let (exit, _) = g.run();
        let ev = g.events();
        eprintln!("int n (native bit {native}, user mode {user}): {exit:?}, events {ev:x?}");
        if native {
            assert_eq!(exit, Exit::Internal(1), "native {native} user {user}");
        } else {
            assert_eq!(exit, Exit::Out(0x80, CP_EXIT));
            assert_eq!((ev[0].vector, ev[0].cs, ev[0].rip), (6, USER_CS, g.code.addr("int")), "#UD");
        }
    }
}

/// KVM's own hypercalls (`vmmcall`) from native kernel code are refused:
/// KVM sees CPL 3 and returns -KVM_EPERM (-1) in RAX without running them
/// (KVM_HC_VAPIC_POLL_IRQ here, which would return 0). PV features that
/// need hypercalls (kick, send-IPI, yield, the PTP clock) are out.
#[test]
fn kvm_hypercalls_are_refused_in_native_mode() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        a.mov_ri(Rax, 1); // KVM_HC_VAPIC_POLL_IRQ
        a.vmmcall();
        a.mov_rr(R12, Rax);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    g.until(1);
    let rax = g.regs().r12;
    eprintln!("vmmcall from native kernel code: rax={rax:#x} ({})", rax as i64);
    assert_eq!(rax as i64, -1, "-KVM_EPERM");
}

// ---------------------------------------------------------------------------
// External interrupts with KVM's in-kernel LAPIC/IO-APIC, in native mode.

const TIMER_VECTOR: u64 = 0x40;
const IRQFD_VECTOR: u64 = 0x41;
const IRQFD_GSI: u32 = 20;

/// Guest code: software-enable the local APIC (SVR) by MMIO.
fn apic_enable(a: &mut Asm) {
    a.mov_ri(Rbx, APIC_VA);
    a.mov_ri(Rax, 0x1ff);
    a.store32(Rbx, 0xf0, Rax);
}

/// Guest code: the LAPIC timer, divide by 1 (KVM's APIC bus is 1 GHz),
/// `ns` nanoseconds, periodic or one-shot, on TIMER_VECTOR.
fn apic_timer(a: &mut Asm, ns: u64, periodic: bool) {
    a.mov_ri(Rbx, APIC_VA);
    a.mov_ri(Rax, 0xb);
    a.store32(Rbx, 0x3e0, Rax); // TDCR
    a.mov_ri(Rax, TIMER_VECTOR | if periodic { 1 << 17 } else { 0 });
    a.store32(Rbx, 0x320, Rax); // LVT timer
    a.mov_ri(Rax, ns);
    a.store32(Rbx, 0x380, Rax); // TMICT: starts it
}

/// Guest code: spin until at least `R9` events are recorded or the TSC
/// passes `R12`; counts iterations in R8.
fn spin_for_events(a: &mut Asm) {
    let (l, done) = (a.fresh(), a.fresh());
    a.mov_ri(R8, 0);
    a.label(&l);
    a.inc(R8);
    a.mov_ri(Rbx, KBASE + REC);
    a.load(Rax, Rbx, 0);
    a.cmp_rr(Rax, R9);
    a.jcc(AE, &done);
    a.rdtsc_to(Rax);
    a.cmp_rr(Rax, R12);
    a.jcc(B, &l);
    a.label(&done);
}

/// Guest code: R12 = TSC + `ms` milliseconds (R11 = TSC now).
fn deadline(a: &mut Asm, tsc_khz: u64, ms: u64) {
    a.rdtsc_to(R11);
    a.mov_ri(R12, tsc_khz * ms);
    a.add_rr(R12, R11);
}

fn host_tsc_khz() -> u64 {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    u64::from(vcpu.get_tsc_khz().unwrap())
}

fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes([l.regs[off] as u8, l.regs[off + 1] as u8, l.regs[off + 2] as u8, l.regs[off + 3] as u8])
}

/// Whether `vector` is pending in the LAPIC's IRR.
fn irr_pending(g: &Guest, vector: u64) -> bool {
    let l = g.vcpu.get_lapic().unwrap();
    lapic_reg(&l, 0x200 + (vector as usize / 32) * 0x10) & (1 << (vector % 32)) != 0
}

/// The in-kernel LAPIC timer (programmed through MMIO from native code,
/// which works) is NOT delivered while the native bit is set: not to
/// native kernel code with IF=1, not to user code, not even across VM
/// exits; the vector waits in the IRR. Clearing the bit delivers it at
/// once, at the wrmsr. With the bit clear, ticks reach native code, kernel
/// (which then has no privileges, see
/// native_code_keeps_running_after_clearing_the_bit) or user (today's
/// emulated kernel runs user code so).
#[test]
fn lapic_timer_reaches_only_code_running_with_the_bit_clear() {
    let Some(_host) = pvm_host() else { return };
    let khz = host_tsc_khz();
    // Native kernel code, then the same after clearing the bit.
    let code = program(|a| {
        apic_enable(a);
        apic_timer(a, 1_000_000, true); // every 1 ms
        a.mov_ri(R9, 1);
        a.sti();
        a.rdtsc_to(Rsi);
        for _ in 0..3 {
            deadline(a, khz, 2);
            spin_for_events(a);
            a.checkpoint(1); // a VM exit between the spins
        }
        a.rdtsc_to(R10);
        a.checkpoint(2);
        a.wrmsr(MSR_PVM_CTL, 0);
        a.label("cleared");
        a.mov_ri(R9, 4);
        deadline(a, khz, 200);
        spin_for_events(a);
        a.cli();
        a.checkpoint(3);
    });
    let mut g = Guest::new(code, &Opts { irqchip: true, ..Default::default() });
    for _ in 0..3 {
        g.until(1);
    }
    g.until(2);
    let r = g.regs();
    let (native_ms, native_cpi) = (g.us(r.r10 - r.rsi) / 1e3, (r.r10 - r.r11) as f64 / r.r8 as f64);
    let in_native = g.event_count();
    let pending = irr_pending(&g, TIMER_VECTOR);
    g.until(3);
    let after = g.events();
    eprintln!(
        "LAPIC timer (1 ms period): {in_native} deliveries to native kernel code in {:.1} ms of spinning \
         ({native_cpi:.0} cycles/iter), IRR pending: {pending}; after clearing the bit: {:x?}",
        native_ms,
        after.iter().map(|e| (e.vector, e.cs)).collect::<Vec<_>>()
    );
    assert_eq!(in_native, 0, "nothing delivered to native code");
    assert!(pending, "the timer fired: its vector waits in the IRR");
    assert!(native_cpi < 1000.0, "the spin loop was native");
    assert!(after.len() >= 4 && after.iter().all(|e| (e.vector, e.cs) == (TIMER_VECTOR, KERNEL_CS)), "{after:x?}");
    assert_eq!(after[0].rip, g.code.addr("cleared"), "delivered at the wrmsr that cleared the bit");

    // Native code with the bit set (user) and clear (user, kernel).
    for (bit_set, user) in [(true, true), (false, true), (false, false)] {
        let n = N_NATIVE / 2;
        let code = program(|a| {
            apic_enable(a);
            a.sti();
            if !bit_set {
                a.wrmsr(MSR_PVM_CTL, 0);
            }
            apic_timer(a, 5_000_000, true); // every 5 ms: the timed loop ends before the first
            deadline(a, khz, 100);
            if user {
                a.sysret_to("user"); // with IF=1
                a.label("user");
            }
            a.timed_loop(Rsi, Rdi, n);
            a.mov_ri(Rbx, KBASE + REC);
            a.load(R9, Rbx, 0);
            a.add_ri(R9, 3);
            spin_for_events(a);
            a.mov_ri(R14, H_EXIT);
            a.ud2(); // (int3 would end the VM in emulated kernel code)
        });
        let mut g = Guest::new(code, &Opts { irqchip: true, ..Default::default() });
        g.until(CP_EXIT);
        let r = g.regs();
        let cpi = per_iter(r.rsi, r.rdi, n);
        let ev = g.events();
        let ticks: Vec<&Event> = ev.iter().filter(|e| e.vector == TIMER_VECTOR).collect();
        let mode = if user { "user" } else { "kernel" };
        eprintln!(
            "LAPIC timer, {mode} code with the native bit {}: {} deliveries (5 ms period) ({cpi:.2} cycles/iter before)",
            if bit_set { "set" } else { "clear" },
            ticks.len()
        );
        assert!(cpi < NATIVE_MAX_CYCLES_PER_ITER, "the code ran natively");
        if bit_set {
            assert!(ticks.is_empty(), "{ev:x?}");
        } else {
            assert!(ticks.len() >= 3, "{ev:x?}");
            let cs = if user { USER_CS } else { KERNEL_CS };
            assert!(ticks.iter().all(|e| e.cs == cs), "{ev:x?}");
            // The first tick interrupts native code: frame on RSP0. (After an
            // emulated iretq the kernel runs emulated, where a kernel->kernel
            // frame goes on the current stack.)
            assert_eq!(ticks[0].frame, KBASE + RSP0_TOP - 40);
        }
    }
}

/// An irqfd (the way our virtio devices interrupt the guest), routed
/// through the in-kernel IO-APIC, is not delivered to native kernel code
/// with the bit set either, though another host thread signals it; it is
/// delivered at the wrmsr that clears the bit.
#[test]
fn irqfd_reaches_kernel_code_only_outside_native_mode() {
    let Some(_host) = pvm_host() else { return };
    let khz = host_tsc_khz();
    let code = program(|a| {
        apic_enable(a);
        a.mov_ri(R9, 1);
        deadline(a, khz, 100); // the host signals at 20 ms
        a.sti();
        spin_for_events(a);
        a.rdtsc_to(R10);
        a.checkpoint(1);
        a.wrmsr(MSR_PVM_CTL, 0);
        a.label("cleared");
        a.checkpoint(2);
    });
    let mut g = Guest::new(code, &Opts { irqchip: true, ..Default::default() });
    let mut state = kvm_ioapic_state { base_address: 0xfec0_0000, ..Default::default() };
    for (pin, entry) in state.redirtbl.iter_mut().enumerate() {
        // Fixed delivery, physical destination APIC 0, edge; others masked.
        let bits = if pin == IRQFD_GSI as usize { IRQFD_VECTOR } else { 1 << 16 };
        *entry = kvm_ioapic_state__bindgen_ty_1 { bits };
    }
    let chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, pad: 0, chip: kvm_irqchip__bindgen_ty_1 { ioapic: state } };
    g.vm.set_irqchip(&chip).expect("KVM_SET_IRQCHIP");
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.vm.register_irqfd(&evt, IRQFD_GSI).expect("KVM_IRQFD");
    let signaller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        evt.write(1).unwrap();
        evt
    });
    g.until(1);
    let _evt = signaller.join().unwrap();
    let r = g.regs();
    let in_native = g.event_count();
    let pending = irr_pending(&g, IRQFD_VECTOR);
    g.until(2);
    let ev: Vec<(u64, u64)> = g.events().iter().map(|e| (e.vector, e.cs)).collect();
    eprintln!(
        "irqfd: {in_native} deliveries in {:.1} ms of native spinning (signalled at 20 ms), IRR pending {pending}; \
         after clearing the bit: {ev:x?}",
        g.us(r.r10 - r.r11) / 1e3
    );
    assert_eq!(in_native, 0);
    assert!(pending);
    assert_eq!(ev, vec![(IRQFD_VECTOR, KERNEL_CS)]);
    assert_eq!(g.events()[0].rip, g.code.addr("cleared"), "delivered at the wrmsr that cleared the bit");
}

/// `hlt` in native kernel code with IF=1 and the LAPIC timer due in 1 ms
/// never returns: the vCPU is not woken (or woken and not given the
/// interrupt). A native kernel must leave native mode before it idles.
#[test]
fn native_hlt_is_not_woken_by_the_lapic_timer() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        apic_enable(a);
        apic_timer(a, 1_000_000, false);
        a.sti();
        a.hlt();
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts { irqchip: true, ..Default::default() });
    g.limit = Duration::from_millis(300);
    let (exit, dt) = g.run();
    eprintln!("native hlt, timer due in 1 ms: {exit:?} after {dt:?}, events {}", g.event_count());
    assert_eq!(exit, Exit::Other(format!("no exit within {:?}", g.limit)));
    assert_eq!(g.event_count(), 0);
}

/// Without an in-kernel irqchip, an interrupt the VMM injects itself
/// (KVM_INTERRUPT) after kicking the vCPU out of KVM_RUN with a signal
/// does reach native kernel code: the one path found that interrupts
/// native code. (Our VMM uses KVM's in-kernel irqchip.)
#[test]
fn interrupt_injected_by_the_vmm_reaches_native_code() {
    let Some(_host) = pvm_host() else { return };
    let khz = host_tsc_khz();
    let code = program(|a| {
        a.mov_ri(R14, H_NATIVE | H_RET);
        a.mov_ri(R9, 1);
        deadline(a, khz, 2000);
        a.sti();
        spin_for_events(a);
        a.cli();
        a.rdtsc_to(R10);
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    let kick = Watchdog::arm(Duration::from_millis(20));
    let result = g.vcpu.run().map(|e| format!("{e:?}"));
    assert!(kick.disarm(), "kicked");
    assert_eq!(result.map_err(|e| e.errno()), Err(libc::EINTR), "KVM_RUN interrupted by the kick");
    let ready = g.vcpu.get_kvm_run().ready_for_interrupt_injection;
    let irq = kvm_bindings::kvm_interrupt { irq: IRQFD_VECTOR as u32 };
    // SAFETY: KVM_INTERRUPT reads one struct kvm_interrupt, which `irq` is,
    // from a vCPU fd we own; it writes nothing back.
    let rc = unsafe { libc::ioctl(g.vcpu.as_raw_fd(), KVM_INTERRUPT, &irq) };
    assert_eq!(rc, 0, "KVM_INTERRUPT");
    g.until(1);
    let ev = g.events();
    let r = g.regs();
    eprintln!(
        "KVM_INTERRUPT after a kick: ready_for_interrupt_injection={ready}, delivered after {:.1} ms: {ev:x?}",
        g.us(r.r10 - r.r11) / 1e3
    );
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].vector, ev[0].cs, ev[0].rflags & 0x200), (IRQFD_VECTOR, KERNEL_CS, 0x200));
}

/// `pushfq` in native kernel code reads the hardware flags of CPL 3 code:
/// IF=1 even after `cli` (emulated code reads IF=0). A native kernel must
/// keep its own IF state (PARAVIRT irq ops), as `irqs_disabled()` and
/// `local_irq_save/restore` cannot use pushf/popf.
#[test]
fn pushfq_in_native_code_does_not_show_the_guest_if() {
    let Some(_host) = pvm_host() else { return };
    for native in [true, false] {
        let code = program(|a| {
            a.sti();
            a.cli();
            a.pushfq();
            a.pop(R12);
            a.checkpoint(1);
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        g.until(1);
        let flags = g.regs().r12;
        eprintln!("pushfq after cli, native {native}: {flags:#x}");
        assert_eq!(flags & 0x200, if native { 0x200 } else { 0 });
    }
}

/// Page-table updates made by native kernel code with plain stores take
/// effect (after `invlpg`): a page mapped by a PTE store is readable, and
/// unmapped again it faults. (kvm-pvm shadows the guest's page tables; a
/// native kernel's page-fault handler and mmap paths rely on this.)
#[test]
fn page_table_stores_by_native_code_take_effect() {
    let Some(_host) = pvm_host() else { return };
    let code = program(|a| {
        // RBP = the VA of UNMAPPED's PTE, R10 = a PTE for the DATA page.
        a.store(Rbp, 0, R10);
        a.mov_ri(Rdi, UNMAPPED);
        a.invlpg(Rdi);
        a.load(R12, Rdi, 0);
        a.mov_ri(Rax, 0);
        a.store(Rbp, 0, Rax);
        a.invlpg(Rdi);
        a.mov_rl(R15, "unmapped_done");
        a.load(Rax, Rdi, 0);
        a.label("unmapped_done");
        a.checkpoint(1);
    });
    let mut g = Guest::new(code, &Opts::default());
    let mut table = g.vcpu.get_sregs().unwrap().cr3 & !0xfff;
    for shift in [39, 30, 21] {
        table = g.read(table + ((UNMAPPED >> shift) & 0x1ff) * 8) & 0x000f_ffff_ffff_f000;
    }
    let pte = table + ((UNMAPPED >> 12) & 0x1ff) * 8;
    assert_eq!(g.read(pte), 0);
    let mut regs = g.regs();
    (regs.rbp, regs.r10) = (KBASE + pte, DATA | PTE_P | PTE_W | PTE_U);
    g.vcpu.set_regs(&regs).unwrap();
    g.until(1);
    let r = g.regs();
    let ev = g.events();
    eprintln!("native PTE stores: read {:#x} through the new mapping; then {ev:x?}", r.r12);
    assert_eq!(r.r12, DATA_MAGIC, "the mapping made by a native store");
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].vector, ev[0].err, ev[0].cr2), (14, 0x4, UNMAPPED), "unmapped again");
}

// ---------------------------------------------------------------------------
// Costs (figures printed; only loose bounds asserted).

/// Whether an operation must trap in native code (Some(true)), must not
/// (Some(false)), or is only measured (None).
type Traps = Option<bool>;

/// What a privileged instruction costs in native kernel code (it traps to
/// kvm-pvm, which emulates it: tens of microseconds here) against emulated
/// kernel code (about a microsecond per instruction, privileged or not).
/// Also a store to a live page-table entry (the same value), which the
/// host's shadow paging may have to see.
#[test]
fn privileged_instruction_costs() {
    let Some(_host) = pvm_host() else { return };
    type Op = (&'static str, Emit, Traps);
    let ops: [Op; 12] = [
        ("nop", |a| a.raw(&[0x90]), Some(false)),
        ("rdtsc", |a| a.raw(&[0x0f, 0x31]), Some(false)),
        (
            "pushfq; popfq",
            |a| {
                a.pushfq();
                a.popfq();
            },
            Some(false),
        ),
        ("mov rax, cr3", |a| a.mov_from_cr(Rax, 3), Some(true)),
        ("mov cr3, rsi (same root)", |a| a.mov_to_cr(3, Rsi), Some(true)),
        (
            "cli; sti",
            |a| {
                a.cli();
                a.sti();
            },
            Some(true),
        ),
        ("rdmsr LSTAR", |a| a.rdmsr(MSR_LSTAR), Some(true)),
        ("swapgs", |a| a.swapgs(), Some(true)),
        (
            "cpuid",
            |a| {
                a.mov_ri(Rax, 0);
                a.cpuid();
            },
            Some(true),
        ),
        ("invlpg", |a| a.invlpg(Rdi), Some(true)),
        ("store to a live PTE", |a| a.store(R13, 0, R14), None),
        // Last: in emulated code its first run switches the vCPU to native.
        ("wrmsr MSR_PVM_CTL=1", |a| a.wrmsr(MSR_PVM_CTL, 1), Some(true)),
    ];
    // Iterations: many of what runs natively (a preemption must not
    // count), few of what traps or is emulated (tens of us each).
    let iterations = |native: bool, traps: Traps| match (native, traps) {
        (true, Some(false)) => 1_000_000,
        (true, _) => 300,
        (false, _) => 200,
    };
    let measure = |native: bool| -> Vec<f64> {
        let code = program(|a| {
            a.mov_from_cr(Rsi, 3);
            for (k, (_, op, traps)) in ops.iter().enumerate() {
                let n = iterations(native, *traps);
                a.rdtsc_to(R8);
                a.mov_ri(R12, n);
                let l = a.fresh();
                a.label(&l);
                op(a);
                a.dec(R12);
                a.jcc(NZ, &l);
                a.rdtsc_to(R9);
                a.mov_ri(Rbx, KBASE + RES + 16 * k as u64);
                a.store(Rbx, 0, R8);
                a.store(Rbx, 8, R9);
            }
            a.checkpoint(1);
        });
        let mut g = Guest::new(code, &Opts { native, ..Default::default() });
        // The leaf PTE of the DATA page, found by walking the tables.
        let mut table = g.vcpu.get_sregs().unwrap().cr3 & !0xfff;
        let va = KBASE + DATA;
        for shift in [39, 30, 21] {
            table = g.read(table + ((va >> shift) & 0x1ff) * 8) & 0x000f_ffff_ffff_f000;
        }
        let pte = table + ((va >> 12) & 0x1ff) * 8;
        let mut regs = g.regs();
        (regs.r13, regs.r14, regs.rdi) = (KBASE + pte, g.read(pte), va);
        g.vcpu.set_regs(&regs).unwrap();
        g.until(1);
        assert_eq!(g.read(pte), regs.r14);
        ops.iter()
            .enumerate()
            .map(|(k, (_, _, traps))| {
                let k = k as u64;
                g.us(g.read(RES + 16 * k + 8) - g.read(RES + 16 * k)) / iterations(native, *traps) as f64
            })
            .collect()
    };
    let native = measure(true);
    let emulated = measure(false);
    eprintln!("cost per operation (loop overhead included), us: native kernel code | emulated kernel code");
    for (i, (name, _, traps)) in ops.iter().enumerate() {
        let emulated_figure = if i == ops.len() - 1 { "-".to_string() } else { format!("{:.3}", emulated[i]) };
        eprintln!("  {name:<26} {:>9.3} | {emulated_figure:>9}", native[i]);
        assert!(native[i] < 1000.0 && emulated[i] < 1000.0, "{name}: over 1 ms");
        match traps {
            Some(true) => assert!(native[i] > 0.1, "{name} in native code must trap (measured {} us)", native[i]),
            Some(false) => assert!(native[i] < 0.1, "{name} in native code must not trap ({} us)", native[i]),
            None => {}
        }
    }
}

/// An "interrupt window" in native kernel code: since interrupts are held
/// while the bit is set, a native kernel must clear it to let them in.
/// Setting it again from native code is then itself a #GP (the bit clear,
/// privileged instructions fault), whose handler returns to the wrmsr,
/// which runs emulated and makes the code native again: one trap, one
/// event and a few emulated instructions per window.
#[test]
fn interrupt_window_cost() {
    let Some(_host) = pvm_host() else { return };
    let n = 200;
    let code = program(|a| {
        a.rdtsc_to(Rsi);
        a.mov_ri(Rbp, n);
        a.label("again");
        a.wrmsr(MSR_PVM_CTL, 0); // pending interrupts would arrive here
        a.wrmsr(MSR_PVM_CTL, 1); // #GP; re-run emulated by gp_redo's iretq
        a.dec(Rbp);
        a.jcc(NZ, "again");
        a.rdtsc_to(Rdi);
        a.timed_loop(R8, R9, N_NATIVE);
        a.checkpoint(1);

        a.label("gp_redo");
        a.mov_ri(R15, KBASE + REC);
        a.inc_m(R15, 0);
        a.mov_ri(R15, 0);
        a.add_ri(Rsp, 8);
        a.iretq();
    });
    let mut g = Guest::new(code, &Opts { gates: vec![(13, "gp_redo")], ..Default::default() });
    g.until(1);
    let r = g.regs();
    let us = g.us(r.rdi - r.rsi) / n as f64;
    eprintln!("interrupt window (clear the bit, set it again through a #GP): {us:.1} us; {} #GPs", g.event_count());
    assert_eq!(g.event_count(), n, "one #GP per window");
    assert!(per_iter(r.r8, r.r9, N_NATIVE) < NATIVE_MAX_CYCLES_PER_ITER, "native again afterwards");
    assert!(us < 2000.0);
}

/// Round trips user -> guest kernel -> user, 1000 or 300 of them in a user
/// loop, by the ways a kernel can enter and leave:
/// - `syscall` to LSTAR and `sysretq` with the bit set: the fastest, but
///   LSTAR code runs in user mode with every privilege (no isolation);
/// - today's emulated kernel: a #UD or a #PF at an unmapped LSTAR (patch
///   0001), a two- to four-instruction emulated handler, emulated `iretq`;
/// - a native kernel that keeps user mode unprivileged: the #UD or #PF
///   entry, move to the kernel stack, set the bit (native), clear it, then
///   leave native mode through a deliberate #GP (`mov rax, cr3`, or the
///   `sysretq` itself) whose handler returns into the exit path emulated.
#[test]
fn round_trip_costs() {
    let Some(_host) = pvm_host() else { return };
    struct Way {
        name: &'static str,
        native: bool,
        entry: fn(&mut Asm),
        lstar_unmapped: bool,
        gates: Vec<(u8, &'static str)>,
        n: u64,
    }
    let ways = [
        Way {
            name: "syscall/sysretq, bit set (no isolation)",
            native: true,
            entry: |a| a.syscall(),
            lstar_unmapped: false,
            gates: vec![],
            n: 1000,
        },
        Way {
            name: "#UD, emulated handler (today)",
            native: false,
            entry: |a| a.ud2(),
            lstar_unmapped: false,
            gates: vec![(6, "ud_min")],
            n: 300,
        },
        Way {
            name: "#PF syscall, emulated handler (today)",
            native: false,
            entry: |a| a.syscall(),
            lstar_unmapped: true,
            gates: vec![(14, "pf_syscall")],
            n: 300,
        },
        Way {
            name: "#UD, native kernel, user unprivileged",
            native: false,
            entry: |a| a.ud2(),
            lstar_unmapped: false,
            gates: vec![(6, "secure_ud"), (13, "gp_drop")],
            n: 300,
        },
        Way {
            name: "#PF syscall, native kernel, user unprivileged",
            native: false,
            entry: |a| a.syscall(),
            lstar_unmapped: true,
            gates: vec![(14, "pf_secure"), (13, "gp_redo")],
            n: 300,
        },
    ];
    eprintln!("round trip user -> kernel -> user:");
    for way in ways {
        let code = program(|a| {
            a.sysret_to("user");
            a.label("user");
            a.rdtsc_to(Rsi);
            a.mov_ri(Rbp, way.n);
            a.label("again");
            (way.entry)(a);
            a.dec(Rbp);
            a.jcc(NZ, "again");
            a.rdtsc_to(Rdi);
            a.user_exit();

            a.label("lstar");
            a.sysretq();

            a.label("ud_min");
            a.add_mi(Rsp, 0, 2); // past the ud2
            a.iretq();

            a.label("pf_syscall"); // [err, rip, cs, rflags, rsp, ss]
            a.store(Rsp, 8, Rcx); // return where syscall would
            a.store(Rsp, 24, R11); // with the flags syscall saved
            a.add_ri(Rsp, 8);
            a.iretq();

            a.label("secure_ud");
            // Off the entry stack: copy the frame to the kernel stack.
            a.push(Rax);
            a.push(Rbx);
            a.mov_ri(Rbx, KBASE + KSTACK_TOP - 40);
            for i in 0..5 {
                a.load(Rax, Rsp, 16 + 8 * i);
                a.store(Rbx, 8 * i, Rax);
            }
            a.pop(Rbx);
            a.pop(Rax);
            a.mov_ri(Rsp, KBASE + KSTACK_TOP - 40);
            a.push(Rax);
            a.push(Rcx);
            a.push(Rdx);
            a.wrmsr(MSR_PVM_CTL, 1); // native from here
            a.wrmsr(MSR_PVM_CTL, 0); // unprivileged from here
            a.mov_from_cr(Rax, 3); // #GP: gp_drop resumes after it, emulated
            a.pop(Rdx);
            a.pop(Rcx);
            a.pop(Rax);
            a.add_mi(Rsp, 0, 2);
            a.iretq();

            a.label("gp_drop");
            a.add_mi(Rsp, 8, 3); // past the mov from cr3
            a.add_ri(Rsp, 8);
            a.iretq();

            a.label("pf_secure"); // [err, rip, cs, rflags, rsp, ss]
            a.load(R10, Rsp, 32); // the user stack
            a.mov_ri(Rsp, KBASE + KSTACK_TOP);
            a.push(Rax);
            a.push(Rcx);
            a.push(Rdx);
            a.wrmsr(MSR_PVM_CTL, 1);
            a.wrmsr(MSR_PVM_CTL, 0);
            a.pop(Rdx);
            a.pop(Rcx);
            a.pop(Rax);
            a.mov_rr(Rsp, R10);
            a.sysretq(); // #GP: gp_redo returns to it, and it runs emulated

            a.label("gp_redo");
            a.add_ri(Rsp, 8);
            a.iretq();
        });
        let lstar = if way.lstar_unmapped { Some(UNMAPPED) } else { None };
        let mut g =
            Guest::new(code, &Opts { native: way.native, gates: way.gates.clone(), lstar, ..Default::default() });
        g.until(CP_EXIT);
        let r = g.regs();
        let us = g.us(r.rdi - r.rsi) / way.n as f64;
        eprintln!("  {:<46} {us:>8.1} us", way.name);
        assert_eq!(r.rbp, 0, "{}: the loop completed", way.name);
        assert_eq!(g.event_count(), 1, "{}: only the exit went through the recording handler", way.name);
        assert!(us < 2000.0, "{}: {us} us", way.name);
    }
}

// ---------------------------------------------------------------------------
// Isolation restored: user page tables without the kernel (as KPTI).

/// Native mode needs the kernel mapped U=1, so under the kernel's page
/// tables user code could read all of it. Separate user page tables
/// restore the isolation, as KPTI does: user mode runs (natively) on a
/// root that maps only its own pages plus an entry area (IDT, GDT, TSS,
/// the RSP0 stack, the entry code, here also the recording handler); a
/// user read of kernel data is then a #PF. Exceptions from user mode are
/// delivered under the user root (CR3 in the handler is the user root);
/// the entry code switches to the kernel root, moves to the kernel stack,
/// sets the bit and runs natively; the exit clears the bit, leaves native
/// mode through a #GP, copies the frame to the entry stack, switches back
/// to the user root and returns with an emulated `iretq`.
#[test]
fn user_page_tables_without_the_kernel_restore_isolation() {
    let Some(_host) = pvm_host() else { return };
    const USER_ROOT: u64 = 0x1c0000;
    const KERNEL_ROOT: u64 = PT_POOL + 0x1000;
    let (n, trips) = (N_NATIVE, 100);
    let code = program(|a| {
        a.jmp("to_user");

        a.org(0x4000); // user code: its own page
        a.label("user");
        a.timed_loop(Rsi, Rdi, n);
        a.mov_rl(R15, "read_done");
        a.mov_ri(Rax, KBASE + DATA);
        a.load(Rax, Rax, 0); // kernel data: not mapped here
        a.label("read_done");
        a.mov_ri(R15, 0);
        a.mov_ri(R12, 0);
        a.mov_ri(R13, 1); // the first trip times a loop in the kernel
        a.ud2();
        a.mov_ri(R13, 0);
        a.rdtsc_to(R10);
        a.mov_ri(Rbp, trips);
        a.label("again");
        a.ud2(); // into the kernel (kpti_entry) and back
        a.dec(Rbp);
        a.jcc(NZ, "again");
        a.rdtsc_to(R11);
        a.user_exit();

        a.org(0x5000); // the entry area: mapped under both roots
        a.label("to_user");
        a.mov_ri(Rax, USER_ROOT);
        a.mov_to_cr(3, Rax);
        a.wrmsr(MSR_PVM_CTL, 0);
        a.sysret_to("user");

        a.label("kpti_entry"); // #UD from user: on RSP0, user root, emulated
        a.push(Rax);
        a.mov_ri(Rax, KERNEL_ROOT);
        a.mov_to_cr(3, Rax);
        a.push(Rbx); // to the kernel stack
        a.mov_ri(Rbx, KBASE + KSTACK_TOP - 40);
        for i in 0..5 {
            a.load(Rax, Rsp, 16 + 8 * i);
            a.store(Rbx, 8 * i, Rax);
        }
        a.pop(Rbx);
        a.pop(Rax);
        a.mov_ri(Rsp, KBASE + KSTACK_TOP - 40);
        a.push(Rax);
        a.push(Rcx);
        a.push(Rdx);
        a.wrmsr(MSR_PVM_CTL, 1); // native, kernel root
        a.test_rr(R13, R13);
        a.jcc(Z, "no_loop");
        a.timed_loop(R8, R9, n);
        a.label("no_loop");
        a.mov_ri(Rax, KBASE + DATA);
        a.load(R12, Rax, 0);
        a.wrmsr(MSR_PVM_CTL, 0);
        a.mov_from_cr(Rax, 3); // #GP: gp_drop resumes after it, emulated
        a.pop(Rdx);
        a.pop(Rcx);
        a.pop(Rax);
        a.add_mi(Rsp, 0, 2); // past the ud2
        a.push(Rax); // to the entry stack, then the user root
        a.push(Rbx);
        a.mov_ri(Rbx, KBASE + RSP0_TOP - 40);
        for i in 0..5 {
            a.load(Rax, Rsp, 16 + 8 * i);
            a.store(Rbx, 8 * i, Rax);
        }
        a.pop(Rbx);
        a.pop(Rax);
        a.mov_ri(Rsp, KBASE + RSP0_TOP - 40);
        a.push(Rax);
        a.mov_ri(Rax, USER_ROOT);
        a.mov_to_cr(3, Rax);
        a.pop(Rax);
        a.iretq();

        a.label("gp_drop");
        a.add_mi(Rsp, 8, 3); // past the mov from cr3
        a.add_ri(Rsp, 8);
        a.iretq();
    });
    let mut g = Guest::new(code, &Opts { gates: vec![(6, "kpti_entry"), (13, "gp_drop")], ..Default::default() });
    {
        let mut user = PageTables::at(&g.mem, USER_ROOT, USER_ROOT + 0x1000);
        let entry_area = [GDT, IDT, TSS, REC, RSP0_TOP - 0x1000, USTACK_TOP - 0x1000];
        let code_pages = [0x4000, 0x5000, 0x6000, 0x7000].map(|off| CODE + off);
        for gpa in entry_area.into_iter().chain(code_pages) {
            user.map(KBASE + gpa, gpa, PTE_P | PTE_W | PTE_U);
        }
    }
    g.until(CP_EXIT);
    let r = g.regs();
    let ev = g.events();
    let (user_cpi, kernel_cpi) = (per_iter(r.rsi, r.rdi, n), per_iter(r.r8, r.r9, n));
    let trip = g.us(r.r11 - r.r10) / trips as f64;
    eprintln!(
        "user page tables: user loop {user_cpi:.2} cycles/iter, kernel loop {kernel_cpi:.2}; kernel read {:#x}; \
         round trip {trip:.1} us; events {:x?}",
        r.r12,
        ev.iter().map(|e| (e.vector, e.err, e.cs, e.cr2, e.cr3)).collect::<Vec<_>>()
    );
    let pf: Vec<&Event> = ev.iter().filter(|e| e.vector == 14).collect();
    assert_eq!(pf.len(), 1, "{ev:x?}");
    assert_eq!((pf[0].cs, pf[0].err, pf[0].cr2, pf[0].cr3), (USER_CS, 0x4, KBASE + DATA, USER_ROOT), "user #PF");
    assert_eq!(r.r12, DATA_MAGIC, "the kernel read its data");
    assert_eq!(r.rbp, 0, "all round trips done");
    assert!(user_cpi < NATIVE_MAX_CYCLES_PER_ITER, "user mode native on its own root");
    assert!(kernel_cpi < NATIVE_MAX_CYCLES_PER_ITER, "kernel native on the kernel root");
    let exit = ev.last().unwrap();
    assert_eq!((exit.vector, exit.cs, exit.cr3), (3, USER_CS, USER_ROOT));
}
