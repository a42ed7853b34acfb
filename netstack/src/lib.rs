//! Host side: sbx's userspace network stack, the guest's only network
//! (deny by default, HTTP by Host, HTTPS by SNI, every decision logged).
//!
//! So far: validated host names ([`host`]), the policy ([`policy`]),
//! strict parsers for what the guest sends first on ports 80 and 443
//! ([`http`] request heads, [`tls`] ClientHello SNI), DNS queries and
//! answers with names bound to synthetic addresses ([`dns`]), and the
//! hash-chained audit log ([`audit`]): all pure, tested without a VM; and
//! [`stack`], the frame interface on smoltcp that plays gateway (ARP,
//! ping) and DNS server and drops (and logs) everything it does not serve.
//! Still to come: TCP termination on 80/443 with Host/SNI checks and
//! forwarding to upstream sockets. The guest has no network device until
//! virtio-net exists.
#![forbid(unsafe_code)]

pub mod audit;
pub mod dns;
pub mod host;
pub mod http;
pub mod policy;
pub mod stack;
pub mod tls;
