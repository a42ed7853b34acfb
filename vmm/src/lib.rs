//! Host side: the sbx virtual machine monitor — a KVM microVM that boots an
//! uncompressed vmlinux with guest-init as PID 1. `build_microvm_for_boot`
//! assembles the VM, `runner::run` runs it. The guest is hostile: every
//! access it makes to a device is bounded and checked.
//!
//! `unsafe` is denied here but in `sys` (the libc calls) and `vstate`
//! (KVM's own `unsafe` API: registering guest memory, the `kvm_run`
//! union); every block says why it is sound (`// SAFETY:`).
#![deny(unsafe_code)]
// Threads start at `threads::spawn`/`spawn_helper` only (clippy.toml).
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

// Elsewhere, instead of the obscure errors a port would meet first
// (kvm-bindings' x86 types, the syscall numbers), the one error that
// names the cure: the modules are left out there.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "vmm is x86_64-only: its seccomp tables (vmm/src/seccomp_filters.rs) and boot code (vmm/src/arch/) are \
     written for x86_64. Build for x86_64 (--target x86_64-unknown-linux-gnu), or port those two first."
);

#[cfg(target_arch = "x86_64")]
pub mod arch;
#[cfg(target_arch = "x86_64")]
pub mod builder;
#[cfg(target_arch = "x86_64")]
pub mod control;
#[cfg(target_arch = "x86_64")]
pub mod devices;
#[cfg(target_arch = "x86_64")]
pub mod fs;
#[cfg(target_arch = "x86_64")]
pub mod metrics;
#[cfg(target_arch = "x86_64")]
pub mod runner;
#[cfg(target_arch = "x86_64")]
pub mod seccomp_filters;
#[cfg(target_arch = "x86_64")]
pub mod snapshot;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
pub(crate) mod sys;
#[cfg(target_arch = "x86_64")]
pub mod threads;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
pub mod vstate;
