//! Host side: the KVM state of a paused VM — every vCPU's registers, FPU
//! and extended state, MSRs, local APIC and pending events, and the VM's
//! interrupt controllers, PIT and clock — captured into plain typed values
//! and restored into a brand-new VM. Stage 1 of fast start from a booted
//! snapshot (issue 21). The bytes of a saved state are untrusted input:
//! `codec` decodes them with every length checked.
//!
//! # What is captured
//! - [`VcpuState`]: CPUID (KVM_GET_CPUID2), `kvm_regs`, `kvm_sregs`, the
//!   whole XSAVE area (KVM_GET_XSAVE2 at KVM_CAP_XSAVE2's size, so AVX,
//!   the AVX-512 opmask/ZMM state and anything larger are in it; FPU and
//!   SSE state are part of it, so KVM_GET_FPU is not used), XCRs, debug
//!   registers, the local APIC page, MP state, pending events
//!   (`kvm_vcpu_events`), the TSC frequency, and every MSR of
//!   KVM_GET_MSR_INDEX_LIST that reads back (kvm_pvm's own and KVM's
//!   paravirtual MSRs included: they are in that list).
//! - [`VmState`]: the in-kernel PIC master, PIC slave and IO-APIC
//!   (KVM_GET_IRQCHIP), the PIT (KVM_GET_PIT2) and kvmclock (KVM_GET_CLOCK).
//!
//! # Order
//! Capture, per vCPU (out of KVM_RUN, which `&mut VcpuFd` guarantees):
//! first one KVM_RUN with `immediate_exit` set, so that an I/O or MMIO
//! exit the VMM has just handled is completed (KVM finishes the
//! instruction and moves RIP past it only on the next KVM_RUN; saved
//! before that, a restored guest would run the OUT again); then MP state
//! (reading it lets KVM accept pending INIT/SIPI into the LAPIC state, so
//! it comes before the LAPIC), registers, XSAVE, XCRs, debug registers,
//! LAPIC, MSRs, and the pending events last.
//!
//! Restore into a new VM with the in-kernel irqchip and PIT already
//! created ([`crate::vstate::Vm::setup_irqchip`]): [`VmState::restore`]
//! (irqchip, PIT, clock), then for each new vCPU [`VcpuState::restore`]:
//! CPUID first (which MSRs and XSAVE features are valid depends on it, and
//! KVM refuses CPUID changes once a vCPU has run), the TSC frequency,
//! special registers (EFER and CR4 gate MSRs and XCR0; APIC_BASE is in
//! them and resets the LAPIC, so the LAPIC comes after), registers, XSAVE,
//! XCRs, debug registers, LAPIC (before the MSRs: the TSC-deadline MSR is
//! only kept with the LAPIC timer in that mode), MSRs, MP state, and the
//! pending events last (KVM_SET_REGS drops a pending exception).
//!
//! kvmclock is restored with `KVM_CLOCK_REALTIME` kept (KVM moves the
//! guest's clock on by the wall time that passed since the capture, as
//! after a suspend) and `KVM_CLOCK_TSC_STABLE`/`HOST_TSC` dropped (they
//! describe the capturing host's TSC, and KVM_SET_CLOCK refuses what it
//! cannot honour).
//!
//! # On kvm_pvm (this project's development and CI machines)
//! Measured with `vmm/tests/snapshot_tiny.rs` (a guest run partway,
//! captured at a pending IN, encoded, decoded, restored into a new VM with
//! its memory copied, run to the end): every ioctl above works, and the
//! guest continues exactly. Read back from the new VM, byte for byte equal:
//! regs, sregs, XSAVE (4096 bytes: KVM_CAP_XSAVE2 reports 4096 here, and
//! the host's AVX, AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM components all
//! fit in it and round-trip), XCRs, debug registers, LAPIC, MP state,
//! vCPU events, CPUID (76 entries), PIC master and slave, IO-APIC; the PIT
//! but for `count_load_time` (host ktime, moves); kvmclock moves on (same
//! flags); 40 of the 41 listed MSRs equal, IA32_TSC (0x10) moves on. The
//! list holds KVM's paravirtual MSRs (0x4b564d00-07: kvmclock, async PF,
//! steal time, PV EOI, poll control) and no kvm_pvm-specific one:
//! kvm_pvm's own MSRs (0x4b564df0-ff, the state of PVM's native guest
//! interface) are neither listed nor readable by KVM_GET_MSRS (refused).
//! sbx guests do not use that interface (their kernel mode is emulated),
//! so nothing of theirs is lost; a guest that did would not survive a
//! restore here. IA32_TSC_AUX could not be tested: the guest's WRMSR to
//! it faults on kvm_pvm. On kvm_pvm an OUT in emulated guest kernel mode is
//! already complete when KVM_RUN returns, an IN is not (RAX is written on
//! the next KVM_RUN): [`complete_pending_io`] is what makes the IN case
//! right, and on hardware KVM the OUT case too.
//!
//! # What the next stages need (not here)
//! - Device state: each virtio device's transport registers, queue
//!   addresses and indices, and its own state, from the `WorkerDevice`
//!   framework in `devices/virtio/device.rs` (the worker paused with its
//!   queues quiesced, the state taken on the worker's thread); the UART
//!   and i8042 registers. Irqfds and ioeventfds are re-registered by the
//!   restoring VMM, not saved.
//! - Guest memory: a file per snapshot, mapped copy-on-write
//!   (`MAP_PRIVATE` of the file) into the new VM instead of copied, shared
//!   by every sandbox through the page cache; its header names kernel,
//!   image, VMM build and CPU template, and a mismatch means cold boot.
//!   The state bytes of this module go beside it, with a checksum of both.
//! - Per-sandbox freshness: the guest's RNG reseeded from host entropy
//!   (RNDADDENTROPY then RNDRESEEDCRNG) before anything else runs, the
//!   wall clock set, and the job delivered over the control channel.
//! - The vCPU threads: pausing them (signal, KVM_RUN returns EINTR) and
//!   calling [`VcpuState::capture`] on each vCPU's own thread.

pub mod codec;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::vstate::Vm;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot {0} for the snapshot: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(
        "The snapshot's XSAVE area is {snapshot} bytes, this host's KVM uses {here}: the snapshot comes from a \
         CPU with other extended state; boot cold"
    )]
    XsaveSize { snapshot: usize, here: usize },
    #[error(
        "This host's KVM refused MSR {index:#x} = {value:#x} from the snapshot ({set} of {wanted} in its batch \
         were set): the snapshot needs a host like the one that took it; boot cold"
    )]
    MsrRefused { index: u32, value: u64, set: usize, wanted: usize },
    #[error("The snapshot's TSC runs at {snapshot} kHz, this host's at {here} kHz, and KVM cannot scale it: {err}")]
    TscKhz { snapshot: u32, here: u32, err: kvm_ioctls::Error },
    #[error("The snapshot has {snapshot} vCPUs, the new VM {given}: restore into as many vCPUs as were saved")]
    VcpuCount { snapshot: usize, given: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One vCPU's KVM state. Equal when every byte of every field is equal
/// (the encoding is compared).
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// KVM_GET_CPUID2; empty when the VMM never set one.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// kHz, 0 where KVM does not tell.
    pub tsc_khz: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole XSAVE area, standard layout, `Vm::xsave_size()` bytes.
    pub xsave: Vec<u8>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The MSRs of KVM's save/restore list that read back, in list order.
    pub msrs: Vec<kvm_msr_entry>,
}

/// The VM-wide KVM state. Equal when every byte is (the encoding is
/// compared).
#[derive(Clone, Copy)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A whole VM's KVM state: what the snapshot file's state section holds.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("pit", &self.pit).field("clock", &self.clock).finish_non_exhaustive()
    }
}

impl PartialEq for VcpuState {
    fn eq(&self, other: &Self) -> bool {
        codec::vcpu_bytes(self) == codec::vcpu_bytes(other)
    }
}

impl PartialEq for VmState {
    fn eq(&self, other: &Self) -> bool {
        codec::vm_bytes(self) == codec::vm_bytes(other)
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Completes an I/O or MMIO exit the VMM has handled, without running
/// guest code: KVM_RUN with `immediate_exit` returns EINTR at once, after
/// finishing the pending instruction. Any other result is an error.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<()> {
    vcpu.set_kvm_immediate_exit(1);
    let ran = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match ran {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(Error::Kvm("complete the pending I/O exit (KVM_RUN with immediate_exit)", e)),
        // An exit without running: KVM had something to report first.
        Ok(()) => Err(Error::Kvm(
            "complete the pending I/O exit (KVM_RUN with immediate_exit returned an exit)",
            kvm_ioctls::Error::new(libc::EAGAIN),
        )),
    }
}

/// Reads `indices` in KVM_MAX_MSR_ENTRIES batches; returns the MSRs that
/// read back and the indices KVM refused. KVM_GET_MSRS stops at the first
/// refused MSR of a batch, so the batch is retried after it.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Vec<kvm_msr_entry>, Vec<u32>)> {
    let mut read = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut at = 0;
    while at < indices.len() {
        let batch = &indices[at..indices.len().min(at + KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::Kvm("build an MSR list", errno_e2big()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        read.extend_from_slice(&msrs.as_slice()[..n.min(batch.len())]);
        at += n;
        if n < batch.len() {
            refused.push(batch[n]);
            at += 1;
        }
    }
    Ok((read, refused))
}

fn errno_e2big() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::E2BIG)
}

fn write_msrs(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<()> {
    for batch in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let list = Msrs::from_entries(batch).map_err(|_| Error::Kvm("build an MSR list", errno_e2big()))?;
        let set = vcpu.set_msrs(&list).map_err(kvm("write MSRs"))?;
        if set < batch.len() {
            let e = batch[set];
            return Err(Error::MsrRefused { index: e.index, value: e.data, set, wanted: batch.len() });
        }
    }
    Ok(())
}

impl VcpuState {
    /// Captures a vCPU of `vm` that is out of KVM_RUN (see the module docs
    /// for the order). MSRs KVM lists but refuses to read are left out;
    /// `read_msrs` tells which.
    pub fn capture(vm: &Vm, vcpu: &mut VcpuFd) -> Result<VcpuState> {
        complete_pending_io(vcpu)?;
        let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("read the vCPU's CPUID"))?.as_slice().to_vec();
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let regs = vcpu.get_regs().map_err(kvm("read the registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("read the special registers"))?;
        let xsave = vm.get_xsave(vcpu).map_err(kvm("read the XSAVE area"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("read the XCRs"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("read the debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("read the local APIC"))?;
        let list = vm.msr_index_list().map_err(kvm("read KVM's MSR index list"))?;
        let (msrs, _refused) = read_msrs(vcpu, &list)?;
        let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("read the pending vCPU events"))?;
        Ok(VcpuState { cpuid, tsc_khz, regs, sregs, xsave, xcrs, debugregs, lapic, mp_state, vcpu_events, msrs })
    }

    /// Loads this state into `vcpu`, a new vCPU of `vm` that has not run.
    pub fn restore(&self, vm: &Vm, vcpu: &VcpuFd) -> Result<()> {
        if !self.cpuid.is_empty() {
            let cpuid =
                CpuId::from_entries(&self.cpuid).map_err(|_| Error::Kvm("build a CPUID list", errno_e2big()))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm("set the vCPU's CPUID"))?;
        }
        let here = vcpu.get_tsc_khz().unwrap_or(0);
        if self.tsc_khz != 0 && here != self.tsc_khz {
            vcpu.set_tsc_khz(self.tsc_khz).map_err(|err| Error::TscKhz { snapshot: self.tsc_khz, here, err })?;
        }
        vcpu.set_sregs(&self.sregs).map_err(kvm("set the special registers"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        let size = vm.xsave_size();
        if self.xsave.len() != size {
            return Err(Error::XsaveSize { snapshot: self.xsave.len(), here: size });
        }
        vm.set_xsave(vcpu, &self.xsave).map_err(kvm("set the XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("set the XCRs"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm("set the debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("set the local APIC"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm("set the MP state"))?;
        vcpu.set_vcpu_events(&self.vcpu_events).map_err(kvm("set the pending vCPU events"))?;
        Ok(())
    }
}

fn irqchip(vm: &Vm, chip_id: u32, what: &'static str) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.fd.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl VmState {
    /// Captures the VM-wide state of `vm` (its vCPUs out of KVM_RUN).
    pub fn capture(vm: &Vm) -> Result<VmState> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "read the IO-APIC")?,
            pit: vm.fd.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.fd.get_clock().map_err(kvm("read kvmclock"))?,
        })
    }

    /// Loads this state into `vm`, a new VM whose irqchip and PIT exist.
    pub fn restore(&self, vm: &Vm) -> Result<()> {
        vm.fd.set_irqchip(&self.pic_master).map_err(kvm("set the master PIC"))?;
        vm.fd.set_irqchip(&self.pic_slave).map_err(kvm("set the slave PIC"))?;
        vm.fd.set_irqchip(&self.ioapic).map_err(kvm("set the IO-APIC"))?;
        vm.fd.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        let clock = kvm_clock_data { flags: self.clock.flags & KVM_CLOCK_REALTIME, ..self.clock };
        vm.fd.set_clock(&clock).map_err(kvm("set kvmclock"))?;
        Ok(())
    }
}

impl MachineState {
    /// Captures `vm` and its vCPUs (all out of KVM_RUN), VM state last so
    /// that the clock is read as late as possible.
    pub fn capture(vm: &Vm, vcpus: &mut [VcpuFd]) -> Result<MachineState> {
        let vcpus = vcpus.iter_mut().map(|v| VcpuState::capture(vm, v)).collect::<Result<Vec<_>>>()?;
        Ok(MachineState { vm: VmState::capture(vm)?, vcpus })
    }

    /// Restores into a new `vm` (irqchip and PIT created) and its new
    /// vCPUs, one per saved vCPU, in id order.
    pub fn restore(&self, vm: &Vm, vcpus: &[VcpuFd]) -> Result<()> {
        if vcpus.len() != self.vcpus.len() {
            return Err(Error::VcpuCount { snapshot: self.vcpus.len(), given: vcpus.len() });
        }
        self.vm.restore(vm)?;
        for (state, vcpu) in self.vcpus.iter().zip(vcpus) {
            state.restore(vm, vcpu)?;
        }
        Ok(())
    }
}
