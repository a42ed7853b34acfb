//! Host side: builds a microVM ready to boot, as one readable sequence of
//! small steps (`build_microvm_for_boot`). Inputs are the user's files
//! (kernel, initramfs) and options; nothing here runs guest code.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::bootparams::{self, Initrd};
use crate::arch::cpuid::{self, CpuTemplate};
use crate::arch::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, MMIO_HOLE_START, VIRTIO_IRQ_BASE, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE,
};
use crate::arch::{mptable, regs};
use crate::control::Stop;
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{SerialDevice, COM1, COM2, PORT_LEN};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{FrameBackend, Net};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::Bus;
use crate::vstate::{self, Vm};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] vstate::Error),
    #[error("Cannot open kernel {0}: {1}")]
    OpenKernel(PathBuf, std::io::Error),
    #[error("Cannot load kernel {0}: {1} (sbx boots an uncompressed ELF vmlinux)")]
    LoadKernel(PathBuf, linux_loader::loader::Error),
    #[error("Initramfs of {0} MiB does not fit in guest memory above the kernel")]
    InitrdTooLarge(u64),
    #[error("Cannot write the initramfs to guest memory: {0}")]
    WriteInitrd(vm_memory::GuestMemoryError),
    #[error("Bad kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("Cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error(transparent)]
    BootParams(#[from] bootparams::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error("Cannot place a device on the bus: {0}")]
    Bus(#[from] crate::devices::bus::Error),
    #[error("Cannot set the vCPU's CPUID: {0}")]
    Cpuid(String),
    #[error("Guest memory must be at least 64 MiB, got {0} MiB")]
    TooLittleMemory(u64),
    #[error("vCPU count must be 1 to {max}, got {0}", max = mptable::MAX_CPUS)]
    BadCpuCount(u8),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::Error),
    #[error("Too many virtio devices: at most {VIRTIO_MAX_DEVICES}")]
    TooManyDevices,
    #[error("Cannot start the network device: {0}")]
    Net(std::io::Error),
    #[error("Cannot start the control channel: {0}")]
    Vsock(std::io::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// What to boot and how.
pub struct VmSpec {
    pub kernel: PathBuf,
    /// The initramfs, already assembled (image plus job).
    pub initrd: Vec<u8>,
    /// Kernel command line (see `kernel_cmdline`).
    pub cmdline: String,
    pub mem_mib: u64,
    pub cpus: u8,
    pub template: CpuTemplate,
    /// virtio-blk disks, in order: the guest sees /dev/vda, /dev/vdb...
    pub disks: Vec<Disk>,
    /// The guest's network: a virtio-net NIC whose peer is this backend.
    pub net: Option<GuestNet>,
    /// The control channel: a vsock device whose host end is this
    /// listening Unix socket (each client a session with guest-init).
    pub control: Option<std::os::unix::net::UnixListener>,
    /// Shared folders: virtio-fs devices, each with its file server.
    pub shares: Vec<Fs>,
}

/// The guest's NIC and the frame backend behind it (sbx's: netstack).
pub struct GuestNet {
    pub mac: [u8; 6],
    pub mtu: u16,
    pub backend: Box<dyn FrameBackend>,
    /// The host paths the NIC's worker (netstack) may reach.
    pub reach: crate::threads::Reach,
}

/// A host file the guest sees as a virtio-blk disk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// The disk's serial number in the guest (GET_ID), at most 20 bytes.
    pub id: String,
}

/// Where the guest's serial ports go.
pub struct Sinks {
    /// COM1: the program's terminal.
    pub program: Box<dyn Write + Send>,
    /// COM2: the kernel console.
    pub console: Box<dyn Write + Send>,
}

/// A VM ready for its first KVM_RUN.
pub struct MicroVm {
    pub vm: Vm,
    pub vcpus: Vec<VcpuFd>,
    pub pio: Bus,
    pub mmio: Bus,
    pub stop: Arc<Stop>,
}

/// Console on COM2 (a log); COM1 is the program's terminal.
pub const SBX_CONSOLE: &str = "console=ttyS1 8250.nr_uarts=2";

/// The kernel command line for a guest; `pvm` adds the kvm_pvm switch of
/// kernel-config/patches. `extra` is appended as is.
pub fn kernel_cmdline(pvm: bool, kernel_log: bool, extra: &str) -> String {
    kernel_cmdline_with_console(SBX_CONSOLE, pvm, kernel_log, extra)
}

/// As `kernel_cmdline`, with other console arguments (for other VMMs).
pub fn kernel_cmdline_with_console(console: &str, pvm: bool, kernel_log: bool, extra: &str) -> String {
    let mut c = String::from(console);
    c.push_str(
        // Power-off is a reset through the keyboard controller; a panic
        // resets at once. Timers: kvm-clock/TSC, nothing to calibrate.
        // The initramfs goes to ramfs, not tmpfs: plain page cache, less
        // kernel work per unpacked page.
        " reboot=k panic=-1 rdinit=/init rootfstype=ramfs \
         tsc=reliable no_timer_check mitigations=off \
         cryptomgr.notests random.trust_bootloader=on",
    );
    c.push_str(if kernel_log { " loglevel=8" } else { " quiet" });
    if pvm {
        // noreplace-smp: with one vCPU the kernel would otherwise rewrite
        // every LOCK prefix through runtime text patching, seconds of
        // emulated work there (boot profile); the prefixes cost nothing.
        c.push_str(" sbx_pvm noreplace-smp");
        // An unknown NAME=value goes to PID 1's environment: guest-init (a
        // static glibc program with threads) must keep AVX off too, or its
        // copies get 16-byte holes (protocol::NO_AVX_TUNABLES).
        c.push_str(" GLIBC_TUNABLES=");
        c.push_str(protocol::NO_AVX_TUNABLES);
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c
}

/// Takes the spec by value: the initramfs buffer is freed once it is in
/// guest memory, so it does not count against the VMM's own memory. `stop`
/// is the VM's stop switch, made by the caller so that a stop requested
/// while the VM is being built (a signal) is not lost.
pub fn build_microvm_for_boot(mut spec: VmSpec, sinks: Sinks, stop: Arc<Stop>) -> Result<MicroVm> {
    check_spec(&spec)?;
    let vm = Vm::new(spec.mem_mib << 20)?;
    vm.setup_irqchip()?;
    let entry = load_kernel(&vm, &spec.kernel)?;
    let initrd = load_initrd(&vm, &std::mem::take(&mut spec.initrd), entry)?;
    let mut pio = Bus::new();
    attach_serial_ports(&vm, &mut pio, sinks)?;
    attach_i8042(&mut pio, &stop)?;
    let mut mmio = VirtioMmio { stop: stop.clone(), ..VirtioMmio::default() };
    attach_block_devices(&vm, &mut mmio, &spec.disks)?;
    if let Some(net) = spec.net.take() {
        attach_net_device(&vm, &mut mmio, net)?;
    }
    if let Some(listener) = spec.control.take() {
        attach_vsock_device(&vm, &mut mmio, listener)?;
    }
    attach_fs_devices(&vm, &mut mmio, std::mem::take(&mut spec.shares))?;
    let cmdline_size = load_kernel_cmdline(&vm, &format!("{}{}", spec.cmdline, mmio.cmdline))?;
    write_boot_params(&vm, cmdline_size, initrd)?;
    let vcpus = create_vcpus(&vm, &spec, entry)?;
    Ok(MicroVm { vm, vcpus, pio, mmio: mmio.bus, stop })
}

/// The MMIO bus with its virtio devices, and how the kernel command line
/// declares them (`virtio_mmio.device=4K@ADDR:IRQ`, in order).
#[derive(Default)]
struct VirtioMmio {
    bus: Bus,
    count: u32,
    cmdline: String,
    /// The VM's stop switch, for devices whose worker fails.
    stop: Arc<Stop>,
}

/// Puts `device` behind a virtio-mmio transport at the next free window
/// and interrupt line.
fn attach_virtio_device(vm: &Vm, mmio: &mut VirtioMmio, device: Box<dyn VirtioDevice>) -> Result<()> {
    if mmio.count >= VIRTIO_MAX_DEVICES {
        return Err(Error::TooManyDevices);
    }
    let base = VIRTIO_MMIO_BASE + u64::from(mmio.count) * MMIO_LEN;
    let irq = VIRTIO_IRQ_BASE + mmio.count;
    register_queue_notify(vm, device.as_ref(), base);
    device.attach_stop(&mmio.stop);
    let transport = MmioTransport::new(device, vm.memory.clone(), vm.irqfd(irq)?);
    mmio.bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
    mmio.cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    mmio.count += 1;
    Ok(())
}

/// Lets KVM turn the device's queue notifications into writes to its
/// eventfd (ioeventfd, one per queue index), where the device has one and
/// the host's KVM takes it. Otherwise (or for queues where registering
/// failed) notifications stay MMIO exits, handled by the transport.
fn register_queue_notify(vm: &Vm, device: &dyn VirtioDevice, base: u64) {
    let Some(event) = device.notify_event() else { return };
    let addr = kvm_ioctls::IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
    for index in 0..device.queue_max_sizes().len() as u32 {
        if vm.fd.register_ioevent(&event, &addr, index).is_err() {
            return;
        }
    }
}

/// The guest's only NIC, backed by the caller's frame backend.
fn attach_net_device(vm: &Vm, mmio: &mut VirtioMmio, net: GuestNet) -> Result<()> {
    let device = Net::new(net.mac, net.mtu, net.backend, net.reach).map_err(Error::Net)?;
    attach_virtio_device(vm, mmio, Box::new(device.device))
}

/// The control channel to guest-init.
fn attach_vsock_device(vm: &Vm, mmio: &mut VirtioMmio, listener: std::os::unix::net::UnixListener) -> Result<()> {
    let device = Vsock::new(listener).map_err(Error::Vsock)?;
    attach_virtio_device(vm, mmio, Box::new(device.device))
}

/// The shared folders, each its own virtio-fs device (mounted by tag).
fn attach_fs_devices(vm: &Vm, mmio: &mut VirtioMmio, shares: Vec<Fs>) -> Result<()> {
    for fs in shares {
        attach_virtio_device(vm, mmio, Box::new(fs.device))?;
    }
    Ok(())
}

/// The disks, in order (/dev/vda first).
fn attach_block_devices(vm: &Vm, mmio: &mut VirtioMmio, disks: &[Disk]) -> Result<()> {
    for disk in disks {
        let block = Block::open(&disk.path, disk.read_only, &disk.id)?;
        attach_virtio_device(vm, mmio, Box::new(block.device))?;
    }
    Ok(())
}

fn check_spec(spec: &VmSpec) -> Result<()> {
    if spec.mem_mib < 64 {
        return Err(Error::TooLittleMemory(spec.mem_mib));
    }
    if spec.cpus == 0 || spec.cpus > mptable::MAX_CPUS {
        return Err(Error::BadCpuCount(spec.cpus));
    }
    Ok(())
}

/// Loads the ELF vmlinux at its physical addresses; returns its entry.
fn load_kernel(vm: &Vm, path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| Error::OpenKernel(path.to_path_buf(), e))?;
    let loaded = Elf::load(&vm.memory, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| Error::LoadKernel(path.to_path_buf(), e))?;
    Ok(loaded.kernel_load.0)
}

/// Puts the initramfs at the top of low memory, page aligned, above the
/// kernel image.
fn load_initrd(vm: &Vm, initrd: &[u8], kernel_entry: u64) -> Result<Option<Initrd>> {
    if initrd.is_empty() {
        return Ok(None);
    }
    let too_large = || Error::InitrdTooLarge((initrd.len() as u64) >> 20);
    let size = u32::try_from(initrd.len()).map_err(|_| too_large())?;
    let top = vm.mem_bytes().min(MMIO_HOLE_START);
    let addr = top.checked_sub(initrd.len() as u64).ok_or_else(too_large)? & !0xfff;
    // The kernel image sits at its entry and takes well under 64 MiB.
    if addr < kernel_entry + (64 << 20) {
        return Err(too_large());
    }
    vm.memory.write_slice(initrd, GuestAddress(addr)).map_err(Error::WriteInitrd)?;
    Ok(Some(Initrd { addr, size }))
}

/// Writes the command line; returns its size with the terminating NUL.
fn load_kernel_cmdline(vm: &Vm, text: &str) -> Result<u32> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(Error::Cmdline)?;
    cmdline.insert_str(text).map_err(Error::Cmdline)?;
    load_cmdline(&vm.memory, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(Error::WriteCmdline)?;
    Ok(text.len() as u32 + 1)
}

fn write_boot_params(vm: &Vm, cmdline_size: u32, initrd: Option<Initrd>) -> Result<()> {
    let params = bootparams::build(vm.mem_bytes(), cmdline_size, initrd, true)?;
    bootparams::write(&vm.memory, &params, true)?;
    Ok(())
}

/// COM1 (a program run on the serial port, for guests without the control
/// channel) and COM2 (kernel console), each interrupting through an irqfd
/// on its legacy IRQ.
fn attach_serial_ports(vm: &Vm, pio: &mut Bus, sinks: Sinks) -> Result<()> {
    let com1 = Arc::new(Mutex::new(SerialDevice::new(vm.irqfd(COM1.1)?, sinks.program)));
    pio.insert(com1, COM1.0, PORT_LEN)?;
    let com2 = Arc::new(Mutex::new(SerialDevice::new(vm.irqfd(COM2.1)?, sinks.console)));
    pio.insert(com2, COM2.0, PORT_LEN)?;
    Ok(())
}

fn attach_i8042(pio: &mut Bus, stop: &Arc<Stop>) -> Result<()> {
    pio.insert(Arc::new(Mutex::new(I8042::new(stop.clone()))), i8042::BASE, i8042::LEN)?;
    Ok(())
}

/// Creates every vCPU with the CPU template; the boot vCPU also gets the
/// long-mode state for the kernel's entry. Writes the MP table to match.
fn create_vcpus(vm: &Vm, spec: &VmSpec, entry: u64) -> Result<Vec<VcpuFd>> {
    let supported = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(spec.cpus as usize);
    for id in 0..spec.cpus {
        let vcpu = vm.create_vcpu(id)?;
        let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
        cpuid::apply(&mut entries, spec.template, id, spec.cpus, vstate::tsc_khz(&vcpu));
        let cpuid = CpuId::from_entries(&entries).map_err(|e| Error::Cpuid(format!("{e:?}")))?;
        vcpu.set_cpuid2(&cpuid).map_err(|e| Error::Cpuid(e.to_string()))?;
        if id == 0 {
            let leaf1 = entries.iter().find(|e| e.function == 1).copied().unwrap_or_default();
            mptable::setup(&vm.memory, spec.cpus, leaf1.eax, leaf1.edx)?;
        }
        regs::setup_msrs(&vcpu)?;
        if id == 0 {
            regs::setup_regs(&vcpu, entry)?;
            regs::setup_sregs(&vm.memory, &vcpu)?;
            regs::setup_fpu(&vcpu)?;
        }
        regs::setup_lint(&vcpu)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_the_pvm_switch_only_when_asked() {
        let plain = kernel_cmdline(false, false, "");
        assert!(!plain.contains("sbx_pvm"));
        assert!(plain.contains("console=ttyS1") && plain.contains("reboot=k") && plain.contains(" quiet"));
        let pvm = kernel_cmdline(true, true, "foo=1");
        assert!(pvm.contains(" sbx_pvm") && pvm.ends_with(" foo=1") && pvm.contains("loglevel=8"));
        assert!(pvm.contains(" GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,") && !plain.contains("GLIBC_TUNABLES"));
        assert!(plain.len() < CMDLINE_MAX / 2);
    }
}
