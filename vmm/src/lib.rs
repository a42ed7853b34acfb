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

pub mod arch;
pub mod builder;
pub mod control;
pub mod devices;
pub mod fs;
pub mod metrics;
pub mod runner;
pub mod seccomp_filters;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub mod threads;
#[allow(unsafe_code)]
pub mod vstate;
