//! Host side: how an x86-64 guest is laid out and started — memory map,
//! GDT, page tables, MP table, boot parameters, CPU template, vCPU registers.
//! Everything here writes guest memory or vCPU state; nothing reads from the
//! guest. No `unsafe` here: guest memory is written through vm-memory's
//! checked accessors, vCPU state through kvm-ioctls' safe calls.

#![forbid(unsafe_code)]

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
