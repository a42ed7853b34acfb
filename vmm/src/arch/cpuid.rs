//! Host side: CPU templates — what CPUID the guest sees (KVM_SET_CPUID2).
//!
//! `host` passes through what KVM supports. `portable` hides every feature
//! whose instructions the kvm_pvm emulator cannot run in guest kernel mode
//! (../shared/PLATFORM.md: XSAVE family, CX16, POPCNT, SMAP/SMEP, ...) and
//! presents an Intel vendor (AMD's FXSAVE_LEAK workaround runs x87
//! instructions the emulator lacks), plus only the KVM paravirt features
//! that need no hypercall. It is chosen automatically where kvm_pvm is
//! loaded; it is also a safe, migratable baseline elsewhere.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    Host,
    Portable,
}

impl FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "portable" => Ok(CpuTemplate::Portable),
            _ => Err(format!("Unknown CPU template '{s}' (expected host or portable)")),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Portable => "portable",
        })
    }
}

/// True where the host's KVM emulates guest kernel mode (kvm_pvm).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The template to use when the user did not choose one.
pub fn auto_template() -> CpuTemplate {
    if host_is_pvm() {
        CpuTemplate::Portable
    } else {
        CpuTemplate::Host
    }
}

mod leaf1 {
    pub const ECX_PCLMULQDQ: u32 = 1 << 1;
    pub const ECX_DTES64: u32 = 1 << 2;
    pub const ECX_MONITOR: u32 = 1 << 3;
    pub const ECX_DSCPL: u32 = 1 << 4;
    pub const ECX_VMX: u32 = 1 << 5;
    pub const ECX_SMX: u32 = 1 << 6;
    pub const ECX_EST: u32 = 1 << 7;
    pub const ECX_TM2: u32 = 1 << 8;
    pub const ECX_SSSE3: u32 = 1 << 9;
    pub const ECX_SDBG: u32 = 1 << 11;
    pub const ECX_FMA: u32 = 1 << 12;
    pub const ECX_CX16: u32 = 1 << 13;
    pub const ECX_XTPR: u32 = 1 << 14;
    pub const ECX_PDCM: u32 = 1 << 15;
    pub const ECX_PCID: u32 = 1 << 17;
    pub const ECX_DCA: u32 = 1 << 18;
    pub const ECX_SSE41: u32 = 1 << 19;
    pub const ECX_SSE42: u32 = 1 << 20;
    pub const ECX_X2APIC: u32 = 1 << 21;
    pub const ECX_MOVBE: u32 = 1 << 22;
    pub const ECX_POPCNT: u32 = 1 << 23;
    pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const ECX_AES: u32 = 1 << 25;
    pub const ECX_XSAVE: u32 = 1 << 26;
    pub const ECX_OSXSAVE: u32 = 1 << 27;
    pub const ECX_AVX: u32 = 1 << 28;
    pub const ECX_F16C: u32 = 1 << 29;
    pub const ECX_RDRAND: u32 = 1 << 30;
    pub const ECX_HYPERVISOR: u32 = 1 << 31;
    pub const EDX_MCE: u32 = 1 << 7;
    pub const EDX_MCA: u32 = 1 << 14;
    pub const EDX_PSN: u32 = 1 << 18;
    pub const EDX_DS: u32 = 1 << 21;
    pub const EDX_ACPI: u32 = 1 << 22;
    pub const EDX_HTT: u32 = 1 << 28;
    pub const EDX_TM: u32 = 1 << 29;
    pub const EDX_PBE: u32 = 1 << 31;
}

/// Leaf 1 ECX bits the portable template removes.
const PORTABLE_HIDDEN_1_ECX: u32 = leaf1::ECX_PCLMULQDQ
    | leaf1::ECX_DTES64
    | leaf1::ECX_MONITOR
    | leaf1::ECX_DSCPL
    | leaf1::ECX_VMX
    | leaf1::ECX_SMX
    | leaf1::ECX_EST
    | leaf1::ECX_TM2
    | leaf1::ECX_SSSE3
    | leaf1::ECX_SDBG
    | leaf1::ECX_FMA
    | leaf1::ECX_CX16
    | leaf1::ECX_XTPR
    | leaf1::ECX_PDCM
    | leaf1::ECX_PCID
    | leaf1::ECX_DCA
    | leaf1::ECX_SSE41
    | leaf1::ECX_SSE42
    | leaf1::ECX_MOVBE
    | leaf1::ECX_POPCNT
    | leaf1::ECX_AES
    | leaf1::ECX_XSAVE
    | leaf1::ECX_OSXSAVE
    | leaf1::ECX_AVX
    | leaf1::ECX_F16C
    | leaf1::ECX_RDRAND;
const PORTABLE_HIDDEN_1_EDX: u32 =
    leaf1::EDX_MCE | leaf1::EDX_MCA | leaf1::EDX_PSN | leaf1::EDX_DS | leaf1::EDX_ACPI | leaf1::EDX_TM | leaf1::EDX_PBE;

/// Extended leaf 0x80000001: what the portable template keeps.
const EXT1_ECX_LAHF_LM: u32 = 1 << 0;
const EXT1_EDX_KEEP: u32 = (1 << 11) /* SYSCALL */ | (1 << 20) /* NX */ | (1 << 26) /* 1G pages */ | (1 << 29) /* LM */
    | 0x0183_f3ff /* the leaf-1 EDX mirror bits: FPU..PAT, PSE36, MMX, FXSR */;
/// Invariant TSC, the only power-management bit kept.
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;
const MAX_PORTABLE_EXT_LEAF: u32 = 0x8000_0008;

/// KVM paravirt features (leaf 0x40000001 EAX) that work without
/// hypercalls: kvm-clock (both MSR sets), no-op io_delay, stable clock bit.
const KVM_FEATURES_NO_HYPERCALL: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Family 15, model 0x6b, stepping 1 (as QEMU's qemu64): a model with no
/// model-specific quirks in Linux.
const PORTABLE_SIGNATURE: u32 = 0x0006_0fb1;
const INTEL_VENDOR: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e]; // "Genu" "ineI" "ntel"
const BRAND: &[u8; 48] = b"sbx portable vCPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// TSC frequency leaf: tsc_hz = ecx * ebx / eax.
const TSC_LEAF: u32 = 0x15;
const TSC_CRYSTAL_HZ: u32 = 1_000_000;

/// Applies `template` and the per-vCPU fields (APIC ids, counts) to the
/// CPUID entries KVM supports.
pub fn apply(entries: &mut Vec<kvm_cpuid_entry2>, template: CpuTemplate, vcpu_id: u8, cpus: u8, tsc_khz: Option<u32>) {
    if template == CpuTemplate::Portable {
        portable(entries, tsc_khz);
    }
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (u32::from(vcpu_id) << 24) | (u32::from(cpus) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= leaf1::ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= leaf1::EDX_HTT;
                } else {
                    e.edx &= !leaf1::EDX_HTT;
                }
            }
            // x2APIC topology: the x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = u32::from(vcpu_id),
            _ => {}
        }
    }
}

fn portable(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: Option<u32>) {
    // Leaves that describe hidden features, or AMD/Intel specifics a
    // portable vCPU does not have.
    let dropped = |f: u32| {
        matches!(f, 0x6 | 0xd | 0xf | 0x10 | 0x12 | 0x14 | 0x19 | 0x1d | 0x1e)
            || (f > MAX_PORTABLE_EXT_LEAF && f < 0x8fff_ffff)
    };
    entries.retain(|e| !dropped(e.function));
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != TSC_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: TSC_LEAF,
            eax: 1000,
            ebx: khz,
            ecx: TSC_CRYSTAL_HZ,
            ..Default::default()
        });
    }
    for e in entries.iter_mut() {
        match e.function {
            0 => {
                e.ebx = INTEL_VENDOR[0];
                e.edx = INTEL_VENDOR[1];
                e.ecx = INTEL_VENDOR[2];
                if tsc_khz.is_some() {
                    e.eax = e.eax.max(TSC_LEAF);
                }
            }
            1 => {
                e.eax = PORTABLE_SIGNATURE;
                e.ecx = (e.ecx & !PORTABLE_HIDDEN_1_ECX) | leaf1::ECX_TSC_DEADLINE | leaf1::ECX_X2APIC;
                e.edx &= !PORTABLE_HIDDEN_1_EDX;
            }
            7 => {
                // FSGSBASE, BMI, AVX2/512, SMEP, SMAP, ERMS, INVPCID, RDSEED,
                // CLFLUSHOPT, CLWB, UMIP, PKU, RDPID, FSRM, ...: all hidden.
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
                if e.index != 0 {
                    e.eax = 0;
                }
            }
            KVM_CPUID_FEATURES => {
                e.eax &= KVM_FEATURES_NO_HYPERCALL;
                e.edx = 0;
            }
            0x8000_0000 => e.eax = e.eax.min(MAX_PORTABLE_EXT_LEAF),
            0x8000_0001 => {
                e.ecx &= EXT1_ECX_LAHF_LM;
                e.edx &= EXT1_EDX_KEEP;
            }
            0x8000_0002..=0x8000_0004 => {
                let off = ((e.function - 0x8000_0002) * 16) as usize;
                let word =
                    |i: usize| u32::from_le_bytes(BRAND[off + i * 4..off + i * 4 + 4].try_into().unwrap_or_default());
                (e.eax, e.ebx, e.ecx, e.edx) = (word(0), word(1), word(2), word(3));
            }
            0x8000_0007 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx &= EXT7_EDX_INVARIANT_TSC;
            }
            0x8000_0008 => {
                // Keep address sizes; hide AMD extras (CLZERO, RDPRU, ...).
                e.ebx = 0;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    /// A CPUID list like KVM reports on an AMD EPYC host with AVX-512.
    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65), // AuthenticAMD
            entry(1, 0, 0x00a0_0f11, 0x0000_0800, 0xfefa_3203, 0x178b_fbff),
            entry(7, 0, 0, 0xf1bf_07ab, 0x0040_5fce, 0x0000_0010),
            entry(7, 1, 0, 0, 0, 0),
            entry(0xb, 0, 1, 1, 0x100, 0),
            entry(0xd, 0, 0x7, 0x340, 0x340, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(KVM_CPUID_FEATURES, 0, 0x0100_7fff, 0, 0, 0),
            entry(0x8000_0000, 0, 0x8000_0021, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
            entry(0x8000_0002, 0, 0x2044_4d41, 0x43595045, 0, 0), // "AMD EPYC"
            entry(0x8000_0003, 0, 0, 0, 0, 0),
            entry(0x8000_0004, 0, 0, 0, 0, 0),
            entry(0x8000_0007, 0, 0, 0, 0, 0x100),
            entry(0x8000_0008, 0, 0x3030, 0x791e_f257, 0x1f, 0),
            entry(0x8000_001f, 0, 0x1, 0, 0, 0),
            entry(0x8000_0021, 0, 0x45, 0, 0, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        entries.iter().copied().find(|e| e.function == function && e.index == index)
    }

    #[test]
    fn portable_hides_what_the_pvm_emulator_cannot_run() {
        let mut e = amd_host();
        apply(&mut e, CpuTemplate::Portable, 0, 1, Some(2_450_000));
        let l1 = find(&e, 1, 0).unwrap();
        for bit in [
            leaf1::ECX_XSAVE,
            leaf1::ECX_OSXSAVE,
            leaf1::ECX_AVX,
            leaf1::ECX_CX16,
            leaf1::ECX_POPCNT,
            leaf1::ECX_RDRAND,
            leaf1::ECX_SSE42,
            leaf1::ECX_MOVBE,
        ] {
            assert_eq!(l1.ecx & bit, 0, "bit {bit:#x} still visible");
        }
        assert_ne!(l1.ecx & leaf1::ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & leaf1::ECX_HYPERVISOR, 0);
        let l7 = find(&e, 7, 0).unwrap();
        assert_eq!((l7.ebx, l7.ecx, l7.edx), (0, 0, 0), "SMEP, SMAP, AVX2, ... hidden");
        assert!(find(&e, 0xd, 0).is_none(), "no XSAVE leaf");
        assert!(find(&e, 0x8000_001f, 0).is_none() && find(&e, 0x8000_0021, 0).is_none());
        assert_eq!(find(&e, 0x8000_0000, 0).unwrap().eax, MAX_PORTABLE_EXT_LEAF);
        let ext1 = find(&e, 0x8000_0001, 0).unwrap();
        assert_eq!(ext1.ecx, EXT1_ECX_LAHF_LM);
        assert_eq!(ext1.edx & (1 << 27), 0, "RDTSCP hidden");
        assert_ne!(ext1.edx & (1 << 29), 0, "long mode kept");
        assert_eq!(find(&e, KVM_CPUID_FEATURES, 0).unwrap().eax, KVM_FEATURES_NO_HYPERCALL & 0x0100_7fff);
    }

    #[test]
    fn portable_is_intel_with_a_known_tsc_frequency() {
        let mut e = amd_host();
        apply(&mut e, CpuTemplate::Portable, 0, 1, Some(2_450_000));
        let l0 = find(&e, 0, 0).unwrap();
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&vendor, b"GenuineIntel");
        assert!(l0.eax >= TSC_LEAF);
        let tsc = find(&e, TSC_LEAF, 0).unwrap();
        // The kernel computes (ecx / 1000) * ebx / eax kHz.
        assert_eq!((tsc.ecx / 1000) * tsc.ebx / tsc.eax, 2_450_000);
        let l1 = find(&e, 1, 0).unwrap();
        let family = (l1.eax >> 8) & 0xf;
        assert_eq!(family, 0xf);
        let brand: Vec<u8> = (0x8000_0002..=0x8000_0004u32)
            .filter_map(|f| find(&e, f, 0))
            .flat_map(|x| [x.eax, x.ebx, x.ecx, x.edx])
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert!(brand.starts_with(b"sbx portable vCPU"));
    }

    #[test]
    fn host_template_keeps_features_but_sets_topology() {
        let mut e = amd_host();
        apply(&mut e, CpuTemplate::Host, 3, 4, None);
        let l1 = find(&e, 1, 0).unwrap();
        assert_ne!(l1.ecx & leaf1::ECX_AVX, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical count");
        assert_ne!(l1.edx & leaf1::EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 0).unwrap().edx, 3);
        assert!(find(&e, 0xd, 0).is_some());
    }

    #[test]
    fn template_names_parse() {
        assert_eq!("host".parse::<CpuTemplate>(), Ok(CpuTemplate::Host));
        assert_eq!("portable".parse::<CpuTemplate>(), Ok(CpuTemplate::Portable));
        assert!("fast".parse::<CpuTemplate>().unwrap_err().contains("fast"));
    }
}
