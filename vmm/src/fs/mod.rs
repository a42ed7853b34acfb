//! Host side: sharing a host folder with the guest (issue 5, in progress):
//! the filesystem policy and the resolver that keeps every access inside
//! the shared folder. The virtio file-sharing device that will serve the
//! guest through them is not written yet.

pub mod policy;
pub mod share;
