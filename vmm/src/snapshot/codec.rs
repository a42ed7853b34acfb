//! Host side: the byte format of a saved [`MachineState`], and its bounded
//! decoder. A snapshot file is never trusted blindly: the decoder checks
//! the magic, the version, every length and count against named limits,
//! and the end, and refuses each problem with an error of its own before
//! it allocates anything that large. No `unsafe`: the KVM structs become
//! bytes and back through zerocopy's checked views (kvm-bindings derives
//! them; all their bit patterns are valid).
//!
//! # Format, version 1 (all integers little-endian)
//! ```text
//! magic            8 bytes  "SBXKVMST"
//! version          u32      1
//! vcpu count       u32      1..=MAX_VCPUS
//! VM state:        struct(kvm_irqchip) PIC master, struct(kvm_irqchip) PIC slave,
//!                  struct(kvm_irqchip) IO-APIC, struct(kvm_pit_state2), struct(kvm_clock_data)
//! per vCPU:        u32 tsc_khz,
//!                  struct(kvm_regs), struct(kvm_sregs), struct(kvm_xcrs),
//!                  struct(kvm_debugregs), struct(kvm_lapic_state), struct(kvm_mp_state),
//!                  struct(kvm_vcpu_events),
//!                  u32 xsave length in bytes (a multiple of 4, MIN..=MAX_XSAVE_BYTES), the bytes,
//!                  u32 CPUID entry count (<= MAX_CPUID_ENTRIES), that many kvm_cpuid_entry2,
//!                  u32 MSR count (<= MAX_MSRS), that many kvm_msr_entry (index u32, reserved u32, data u64)
//! nothing after the last vCPU
//! ```
//! `struct(T)` is a u32 byte length, which must be `size_of::<T>()`, then
//! T's bytes as KVM defines them (the x86-64 Linux UAPI layout). A length
//! that differs means another ABI and is refused, as is any other version:
//! a state this build cannot read means a cold boot, never a guess.
//!
//! Not in the format: guest memory and device state (the next stages; see
//! the module docs of [`crate::snapshot`]). The state's integrity against
//! tampering is the snapshot file's (a checksum beside it), not this
//! decoder's: this decoder only guarantees that any bytes decode to a
//! well-formed state or a clear refusal.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVM_MAX_CPUID_ENTRIES,
};
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{MachineState, VcpuState, VmState};

/// The first bytes of every saved state.
pub const MAGIC: [u8; 8] = *b"SBXKVMST";
/// The format this build writes and the only one it reads.
pub const VERSION: u32 = 1;
/// Largest encoded state accepted (one vCPU is about 20 KiB).
pub const MAX_STATE_BYTES: usize = 8 << 20;
/// Most vCPUs in a saved state (vCPU ids are a u8 in this VMM).
pub const MAX_VCPUS: u32 = 256;
/// Most MSRs per vCPU (KVM lists a few hundred at most).
pub const MAX_MSRS: u32 = 1024;
/// Most CPUID entries per vCPU (what KVM_GET_CPUID2 can return here).
pub const MAX_CPUID_ENTRIES: u32 = KVM_MAX_CPUID_ENTRIES as u32;
/// Smallest XSAVE area: the legacy `kvm_xsave`.
pub const MIN_XSAVE_BYTES: u32 = std::mem::size_of::<kvm_xsave>() as u32;
/// Largest XSAVE area (with AMX tiles it is about 11 KiB today).
pub const MAX_XSAVE_BYTES: u32 = 64 << 10;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("Saved KVM state is {len} bytes, more than the {max} this VMM reads: not a state sbx wrote; take the snapshot again")]
    TooLarge { len: usize, max: usize },
    #[error("Saved KVM state does not start with {MAGIC:?} (found {found:?}): not an sbx state file; take the snapshot again")]
    BadMagic { found: Vec<u8> },
    #[error(
        "Saved KVM state has format version {found}, this VMM reads only version {supported}: it was written by \
         another sbx build; take the snapshot again with this one"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("Saved KVM state ends inside {what}: {needed} more bytes needed, {left} left (the file was cut short; take the snapshot again)")]
    Truncated { what: &'static str, needed: usize, left: usize },
    #[error(
        "Saved KVM state's {what} is {found} bytes, this VMM's is {expected}: another KVM ABI; take the snapshot again"
    )]
    SizeMismatch { what: &'static str, found: u32, expected: usize },
    #[error(
        "Saved KVM state claims {count} {what}, more than the {max} this VMM reads: corrupt; take the snapshot again"
    )]
    CountTooLarge { what: &'static str, count: u32, max: u32 },
    #[error("Saved KVM state has no vCPU: corrupt; take the snapshot again")]
    NoVcpus,
    #[error(
        "Saved KVM state's XSAVE area is {len} bytes, not a multiple of 4 of at least {MIN_XSAVE_BYTES}: corrupt; \
         take the snapshot again"
    )]
    XsaveLength { len: u32 },
    #[error(
        "Saved KVM state has {extra} bytes after its last vCPU: corrupt or not this format; take the snapshot again"
    )]
    TrailingBytes { extra: usize },
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Lengths here are bounded by the limits above, far below u32::MAX.
fn put_len(out: &mut Vec<u8>, len: usize) {
    put_u32(out, u32::try_from(len).unwrap_or(u32::MAX));
}

fn put_struct<T: IntoBytes + Immutable>(out: &mut Vec<u8>, v: &T) {
    put_len(out, std::mem::size_of::<T>());
    out.extend_from_slice(v.as_bytes());
}

fn put_vm(out: &mut Vec<u8>, vm: &VmState) {
    put_struct(out, &vm.pic_master);
    put_struct(out, &vm.pic_slave);
    put_struct(out, &vm.ioapic);
    put_struct(out, &vm.pit);
    put_struct(out, &vm.clock);
}

fn put_vcpu(out: &mut Vec<u8>, v: &VcpuState) {
    put_u32(out, v.tsc_khz);
    put_struct(out, &v.regs);
    put_struct(out, &v.sregs);
    put_struct(out, &v.xcrs);
    put_struct(out, &v.debugregs);
    put_struct(out, &v.lapic);
    put_struct(out, &v.mp_state);
    put_struct(out, &v.vcpu_events);
    put_len(out, v.xsave.len());
    out.extend_from_slice(&v.xsave);
    put_len(out, v.cpuid.len());
    out.extend_from_slice(v.cpuid.as_bytes());
    put_len(out, v.msrs.len());
    out.extend_from_slice(v.msrs.as_bytes());
}

pub(super) fn vm_bytes(vm: &VmState) -> Vec<u8> {
    let mut out = Vec::new();
    put_vm(&mut out, vm);
    out
}

pub(super) fn vcpu_bytes(v: &VcpuState) -> Vec<u8> {
    let mut out = Vec::new();
    put_vcpu(&mut out, v);
    out
}

/// Encodes `state` in format [`VERSION`]. A state captured by this VMM
/// always decodes again (its sizes are KVM's, within the limits).
pub fn encode(state: &MachineState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    put_u32(&mut out, VERSION);
    put_len(&mut out, state.vcpus.len());
    put_vm(&mut out, &state.vm);
    for v in &state.vcpus {
        put_vcpu(&mut out, v);
    }
    out
}

/// Reads the input front to back; every read is checked against what is left.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated { what, needed: n - self.rest.len(), left: self.rest.len() });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn structure<T: FromBytes>(&mut self, what: &'static str) -> Result<T, DecodeError> {
        let expected = std::mem::size_of::<T>();
        let len = self.u32(what)?;
        if len as usize != expected {
            return Err(DecodeError::SizeMismatch { what, found: len, expected });
        }
        let bytes = self.take(expected, what)?;
        T::read_from_bytes(bytes).map_err(|_| DecodeError::SizeMismatch { what, found: len, expected })
    }

    /// A count-prefixed array of fixed-size `T`, the count checked first.
    fn array<T: FromBytes>(&mut self, what: &'static str, max: u32) -> Result<Vec<T>, DecodeError> {
        let count = self.u32(what)?;
        if count > max {
            return Err(DecodeError::CountTooLarge { what, count, max });
        }
        let size = std::mem::size_of::<T>();
        // count <= max (a few thousand) and size is a KVM struct's: no overflow.
        let bytes = self.take(count as usize * size, what)?;
        bytes
            .chunks_exact(size)
            .map(|c| {
                T::read_from_bytes(c).map_err(|_| DecodeError::SizeMismatch { what, found: count, expected: size })
            })
            .collect()
    }
}

fn vm_state(r: &mut Reader<'_>) -> Result<VmState, DecodeError> {
    Ok(VmState {
        pic_master: r.structure::<kvm_irqchip>("the master PIC")?,
        pic_slave: r.structure::<kvm_irqchip>("the slave PIC")?,
        ioapic: r.structure::<kvm_irqchip>("the IO-APIC")?,
        pit: r.structure::<kvm_pit_state2>("the PIT")?,
        clock: r.structure::<kvm_clock_data>("kvmclock")?,
    })
}

fn vcpu_state(r: &mut Reader<'_>) -> Result<VcpuState, DecodeError> {
    let tsc_khz = r.u32("the TSC frequency")?;
    let regs = r.structure::<kvm_regs>("the registers")?;
    let sregs = r.structure::<kvm_sregs>("the special registers")?;
    let xcrs = r.structure::<kvm_xcrs>("the XCRs")?;
    let debugregs = r.structure::<kvm_debugregs>("the debug registers")?;
    let lapic = r.structure::<kvm_lapic_state>("the local APIC")?;
    let mp_state = r.structure::<kvm_mp_state>("the MP state")?;
    let vcpu_events = r.structure::<kvm_vcpu_events>("the pending vCPU events")?;
    let len = r.u32("the XSAVE area")?;
    if len > MAX_XSAVE_BYTES {
        return Err(DecodeError::CountTooLarge { what: "XSAVE bytes", count: len, max: MAX_XSAVE_BYTES });
    }
    if len < MIN_XSAVE_BYTES || len % 4 != 0 {
        return Err(DecodeError::XsaveLength { len });
    }
    let xsave = r.take(len as usize, "the XSAVE area")?.to_vec();
    let cpuid = r.array::<kvm_cpuid_entry2>("CPUID entries", MAX_CPUID_ENTRIES)?;
    let msrs = r.array::<kvm_msr_entry>("MSRs", MAX_MSRS)?;
    Ok(VcpuState { cpuid, tsc_khz, regs, sregs, xsave, xcrs, debugregs, lapic, mp_state, vcpu_events, msrs })
}

/// Decodes a state written by [`encode`], refusing anything else.
pub fn decode(bytes: &[u8]) -> Result<MachineState, DecodeError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: MAX_STATE_BYTES });
    }
    let mut r = Reader { rest: bytes };
    let magic = r.take(MAGIC.len(), "the magic")?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic.to_vec() });
    }
    let version = r.u32("the format version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version, supported: VERSION });
    }
    let count = r.u32("the vCPU count")?;
    if count == 0 {
        return Err(DecodeError::NoVcpus);
    }
    if count > MAX_VCPUS {
        return Err(DecodeError::CountTooLarge { what: "vCPUs", count, max: MAX_VCPUS });
    }
    let vm = vm_state(&mut r)?;
    let vcpus = (0..count).map(|_| vcpu_state(&mut r)).collect::<Result<Vec<_>, _>>()?;
    if !r.rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: r.rest.len() });
    }
    Ok(MachineState { vm, vcpus })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with a distinct, non-zero value in every piece.
    fn sample(vcpus: usize) -> MachineState {
        let mut pic_master = kvm_irqchip { chip_id: 0, ..Default::default() };
        pic_master.as_mut_bytes()[8] = 0x20;
        let mut ioapic = kvm_irqchip { chip_id: 2, ..Default::default() };
        ioapic.as_mut_bytes()[100] = 0x77;
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 0x2e9b;
        let clock = kvm_clock_data { clock: 123_456_789, flags: 2, ..Default::default() };
        let vm =
            VmState { pic_master, pic_slave: kvm_irqchip { chip_id: 1, ..Default::default() }, ioapic, pit, clock };
        let vcpu = |i: usize| {
            let mut lapic = kvm_lapic_state::default();
            lapic.regs[0x20] = i as i8;
            let mut regs = kvm_regs { rip: 0x10_0000 + i as u64, rbx: 4, rflags: 2, ..Default::default() };
            regs.r12 = 0x1122_3344_5566_7788;
            let mut sregs = kvm_sregs { cr0: 0x8000_0011, efer: 0x500, ..Default::default() };
            sregs.cs.selector = 8;
            let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
            xcrs.xcrs[0].value = 0xe7;
            VcpuState {
                cpuid: vec![kvm_cpuid_entry2 { function: 0xd, eax: 0xe7, ..Default::default() }; 3],
                tsc_khz: 2_000_000,
                regs,
                sregs,
                xsave: (0..5120u32).map(|b| (b * 7 + i as u32) as u8).collect(),
                xcrs,
                debugregs: kvm_debugregs { dr7: 0x400, ..Default::default() },
                lapic,
                mp_state: kvm_mp_state { mp_state: 0 },
                vcpu_events: kvm_vcpu_events { flags: 4, ..Default::default() },
                msrs: vec![
                    kvm_msr_entry { index: 0xc000_0102, data: 0x0123_4567_89ab_cdef, ..Default::default() },
                    kvm_msr_entry { index: 0x4b56_4d01, data: 0x1001, ..Default::default() },
                ],
            }
        };
        MachineState { vm, vcpus: (0..vcpus).map(vcpu).collect() }
    }

    /// Offset of the count of the first vCPU's `what` (xsave, cpuid, msrs).
    fn offset_of(state: &MachineState, what: &str) -> usize {
        let head = 16 + vm_bytes(&state.vm).len();
        let v = &state.vcpus[0];
        let fixed = vcpu_bytes(v).len()
            - (4 + v.xsave.len())
            - (4 + v.cpuid.len() * std::mem::size_of::<kvm_cpuid_entry2>())
            - (4 + v.msrs.len() * std::mem::size_of::<kvm_msr_entry>());
        match what {
            "xsave" => head + fixed,
            "cpuid" => head + fixed + 4 + v.xsave.len(),
            "msrs" => head + fixed + 4 + v.xsave.len() + 4 + v.cpuid.len() * std::mem::size_of::<kvm_cpuid_entry2>(),
            _ => unreachable!(),
        }
    }

    fn set_u32(bytes: &mut [u8], at: usize, v: u32) {
        bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn snapshot_state_round_trips() {
        for n in [1, 2] {
            let state = sample(n);
            let bytes = encode(&state);
            let back = decode(&bytes).unwrap();
            assert_eq!(back, state);
            assert_eq!(encode(&back), bytes, "encoding is deterministic");
            assert_eq!(back.vcpus[0].regs.r12, 0x1122_3344_5566_7788);
            assert_eq!(back.vm.pit.channels[0].count, 0x2e9b);
            assert_eq!(back.vcpus[n - 1].msrs[1].index, 0x4b56_4d01);
        }
        assert_ne!(sample(1), sample(2), "vCPU count matters to equality");
    }

    #[test]
    fn snapshot_state_truncated_anywhere_is_refused_as_truncated() {
        let bytes = encode(&sample(2));
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Err(DecodeError::Truncated { .. }) => {}
                other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn snapshot_state_wrong_magic_or_version_is_refused() {
        let mut bytes = encode(&sample(1));
        bytes[0] = b'X';
        assert!(matches!(decode(&bytes), Err(DecodeError::BadMagic { .. })));
        let mut bytes = encode(&sample(1));
        set_u32(&mut bytes, 8, 2);
        assert_eq!(decode(&bytes), Err(DecodeError::UnsupportedVersion { found: 2, supported: VERSION }));
        set_u32(&mut bytes, 8, 0);
        assert_eq!(decode(&bytes), Err(DecodeError::UnsupportedVersion { found: 0, supported: VERSION }));
    }

    #[test]
    fn snapshot_state_oversized_counts_are_refused_before_reading() {
        let state = sample(1);
        let good = encode(&state);
        let mut bytes = good.clone();
        set_u32(&mut bytes, 12, MAX_VCPUS + 1);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::CountTooLarge { what: "vCPUs", count: MAX_VCPUS + 1, max: MAX_VCPUS })
        );
        set_u32(&mut bytes, 12, 0);
        assert_eq!(decode(&bytes), Err(DecodeError::NoVcpus));

        let mut bytes = good.clone();
        set_u32(&mut bytes, offset_of(&state, "msrs"), u32::MAX);
        assert_eq!(decode(&bytes), Err(DecodeError::CountTooLarge { what: "MSRs", count: u32::MAX, max: MAX_MSRS }));
        let mut bytes = good.clone();
        set_u32(&mut bytes, offset_of(&state, "cpuid"), MAX_CPUID_ENTRIES + 1);
        assert!(matches!(decode(&bytes), Err(DecodeError::CountTooLarge { what: "CPUID entries", .. })));
        let mut bytes = good.clone();
        set_u32(&mut bytes, offset_of(&state, "xsave"), MAX_XSAVE_BYTES + 4);
        assert!(matches!(decode(&bytes), Err(DecodeError::CountTooLarge { what: "XSAVE bytes", .. })));
        // A count within the limit but past the end is truncation, not a panic.
        let mut bytes = good.clone();
        set_u32(&mut bytes, offset_of(&state, "msrs"), MAX_MSRS);
        assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { what: "MSRs", .. })));
    }

    #[test]
    fn snapshot_state_bad_lengths_and_trailing_bytes_are_refused() {
        let state = sample(1);
        let good = encode(&state);
        let mut bytes = good.clone();
        set_u32(&mut bytes, 16, 511); // the master PIC's struct length
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::SizeMismatch {
                what: "the master PIC",
                found: 511,
                expected: std::mem::size_of::<kvm_irqchip>()
            })
        );
        for len in [MIN_XSAVE_BYTES - 4, MIN_XSAVE_BYTES + 2] {
            let mut bytes = good.clone();
            set_u32(&mut bytes, offset_of(&state, "xsave"), len);
            assert_eq!(decode(&bytes), Err(DecodeError::XsaveLength { len }));
        }
        let mut bytes = good.clone();
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes { extra: 1 }));
        let huge = vec![0u8; MAX_STATE_BYTES + 1];
        assert_eq!(decode(&huge), Err(DecodeError::TooLarge { len: MAX_STATE_BYTES + 1, max: MAX_STATE_BYTES }));
    }
}
