//! Host side: the KVM VM and its vCPUs — creation, guest memory
//! registration, in-kernel interrupt controllers, and reading why a vCPU
//! stopped. KVM's own `unsafe` (registering guest memory, reading the
//! `kvm_run` union, KVM_GET/SET_XSAVE2 with its caller-sized buffer) lives
//! here; libc calls are in `sys`.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, kvm_xsave, CpuId, Xsave, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::ram_regions;
use crate::sys;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot open /dev/kvm: {0} (is KVM available and readable by this user?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0}, sbx needs 12")]
    ApiVersion(i32),
    #[error("KVM lacks {0}, which sbx needs")]
    MissingCap(&'static str),
    #[error("Cannot {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("Cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
}

type Result<T> = std::result::Result<T, Error>;

pub struct Vm {
    kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    mem_bytes: u64,
}

impl Vm {
    /// Opens KVM, creates a VM and gives it `mem_bytes` of RAM.
    pub fn new(mem_bytes: u64) -> Result<Vm> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in
            [(Cap::Irqchip, "an in-kernel irqchip"), (Cap::Irqfd, "irqfd"), (Cap::UserMemory, "user memory")]
        {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(|e| Error::Kvm("create a VM", e))?;
        let memory = GuestMemoryMmap::from_ranges(&ram_regions(mem_bytes))
            .map_err(|e| Error::Memory(mem_bytes >> 20, e.to_string()))?;
        let vm = Vm { kvm, fd, memory, mem_bytes };
        vm.exclude_memory_from_core_dumps();
        vm.register_memory()?;
        Ok(vm)
    }

    /// Keeps guest RAM out of the VMM's core dumps (a crash must not write
    /// the guest's secrets to the host's disk). It also keeps guest RAM in
    /// mappings of its own, never merged with the VMM's, which the memory
    /// figures rely on. Best effort: a refusal changes neither.
    fn exclude_memory_from_core_dumps(&self) {
        for (addr, len) in self.host_ranges() {
            let _ = sys::madvise_dontdump(addr as usize, len as usize);
        }
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    fn register_memory(&self) -> Result<()> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is a live mmap owned by self.memory, which
            // lives as long as the VM fd (both are fields of Vm, and the VM
            // is dropped with its memory); slots do not overlap since they
            // come from one GuestMemoryMmap.
            unsafe { self.fd.set_user_memory_region(mr) }.map_err(|e| Error::Kvm("register guest memory", e))?;
        }
        Ok(())
    }

    /// Host address ranges of guest RAM (to tell VMM memory from guest memory).
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.memory.iter().map(|r| (r.as_ptr() as u64, r.len())).collect()
    }

    /// In-kernel PIC, IO-APIC and PIT. The TSS address matters only on
    /// Intel VMX; where KVM ignores or refuses it, nothing depends on it.
    pub fn setup_irqchip(&self) -> Result<()> {
        let _ = self.fd.set_tss_address(0xfffb_d000);
        self.fd.create_irq_chip().map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;
        Ok(())
    }

    /// An eventfd that raises `gsi` when written.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Kvm("create an eventfd", kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0))))?;
        self.fd.register_irqfd(&evt, gsi).map_err(|e| Error::Kvm("register an irqfd", e))?;
        Ok(evt)
    }

    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| Error::Kvm("read the supported CPUID", e))
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd> {
        self.fd.create_vcpu(u64::from(id)).map_err(|e| Error::Kvm("create a vCPU", e))
    }

    /// The MSRs this host's KVM saves and restores (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> std::result::Result<Vec<u32>, kvm_ioctls::Error> {
        self.kvm.get_msr_index_list().map(|l| l.as_slice().to_vec())
    }

    /// Bytes of one vCPU's XSAVE area in this VM: KVM_CAP_XSAVE2's size
    /// (which counts the host's AVX-512 and any dynamically enabled state),
    /// never less than the legacy 4 KiB `kvm_xsave`.
    pub fn xsave_size(&self) -> usize {
        let size = usize::try_from(self.fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        size.max(std::mem::size_of::<kvm_xsave>())
    }

    /// The vCPU's whole XSAVE area, `xsave_size()` bytes (KVM_GET_XSAVE2
    /// where KVM has it, else KVM_GET_XSAVE), in KVM's standard
    /// (non-compacted) layout.
    pub fn get_xsave(&self, vcpu: &VcpuFd) -> std::result::Result<Vec<u8>, kvm_ioctls::Error> {
        use zerocopy::IntoBytes;
        if self.fd.check_extension_int(Cap::Xsave2) <= 0 {
            return Ok(vcpu.get_xsave()?.region.as_bytes().to_vec());
        }
        let size = self.xsave_size();
        let mut xsave = Xsave::new(xsave_fam_len(size)).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        // SAFETY: `xsave` holds the 4 KiB kvm_xsave plus xsave_fam_len(size)
        // u32s after it, at least `size` bytes: the size KVM_CAP_XSAVE2
        // reports for this VM, which KVM never writes past. sbx enables no
        // dynamic XSTATE (arch_prctl) that could grow it afterwards.
        unsafe { vcpu.get_xsave2(&mut xsave) }?;
        let mut bytes = xsave.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
        bytes.extend_from_slice(xsave.as_slice().as_bytes());
        bytes.truncate(size);
        Ok(bytes)
    }

    /// Loads an XSAVE area read by `get_xsave` into `vcpu`. Refused (EINVAL)
    /// unless `bytes` is exactly this VM's `xsave_size()`: an area from a
    /// host with other XSAVE features does not fit this one.
    pub fn set_xsave(&self, vcpu: &VcpuFd, bytes: &[u8]) -> std::result::Result<(), kvm_ioctls::Error> {
        use zerocopy::IntoBytes;
        let size = self.xsave_size();
        if bytes.len() != size {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let legacy = std::mem::size_of::<kvm_xsave>();
        let mut xsave = Xsave::new(xsave_fam_len(size)).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        let tail = xsave.as_mut_slice().as_mut_bytes();
        tail[..size - legacy].copy_from_slice(&bytes[legacy..]);
        // SAFETY: `as_mut_fam_struct` only hands out the header; we write the
        // fixed-size 4 KiB region in it and change no length field.
        unsafe { xsave.as_mut_fam_struct() }.xsave.region.as_mut_bytes().copy_from_slice(&bytes[..legacy]);
        // SAFETY: as in get_xsave: the buffer is at least the size KVM
        // reports for this VM, so KVM_SET_XSAVE reads only memory we own.
        unsafe { vcpu.set_xsave2(&xsave) }
    }
}

/// u32 elements after the 4 KiB `kvm_xsave` for an XSAVE area of `size` bytes.
fn xsave_fam_len(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>()).div_ceil(std::mem::size_of::<u32>())
}

/// The suberror of a KVM_EXIT_INTERNAL_ERROR that the vCPU just returned.
pub fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
    // so `internal` is the union member KVM filled in; it is plain data.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Whether the host's KVM offers TSC frequency information.
pub fn tsc_khz(vcpu: &VcpuFd) -> Option<u32> {
    vcpu.get_tsc_khz().ok().filter(|k| *k > 0)
}
