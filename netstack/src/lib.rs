//! Host side: sbx's userspace network stack, the guest's only network
//! (deny by default, HTTP by Host, HTTPS by SNI, every decision logged).
//! Not built yet: see the netstack issue. Nothing in sbx uses it so far,
//! and the guest has no network device until it exists.
#![forbid(unsafe_code)]
