//! Host side: sharing host folders with the guest. The policy decides what
//! the guest may see and change, the share resolves every access inside
//! the folder, the FUSE protocol is parsed from the guest's bytes and the
//! server answers it (behind the virtio-fs device,
//! `devices::virtio::fs`).
//!
//! No `unsafe` here: the system calls are made through `crate::sys`.

#![forbid(unsafe_code)]

pub mod autorun;
pub mod fuse;
pub mod gitconfig;
pub mod policy;
pub mod quota;
pub mod server;
pub mod share;
