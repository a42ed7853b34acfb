//! Host side: sbx's userspace network stack, the guest's only network
//! (deny by default, HTTP by Host, HTTPS by SNI, every decision logged).
//!
//! What works, tested in-process against a smoltcp guest and real upstream
//! servers on 127.0.0.1 (no VM):
//! - [`stack`]: Ethernet frames in and out; gateway (ARP, ping); DNS served
//!   through the policy, allowed names bound to synthetic addresses
//!   ([`dns`]); TCP to ports 80/443 of those addresses terminated; every
//!   other frame dropped and logged, with no host socket opened;
//! - [`conn`]: per connection, every HTTP request head checked ([`http`]:
//!   strict, bounded; Host must be the name bound to the address; policy by
//!   method and path; 403 naming the rule) and forwarded with its body
//!   framing tracked, each response's status and size read (never changed)
//!   for the request's audit line; TLS allowed by SNI ([`tls`]) and
//!   terminated by default ([`terminate`], leaves minted by the
//!   per-installation CA of [`ca`]) so that the same checks apply inside
//!   (each request's Host must be the SNI's name), with a verified TLS
//!   session of netstack's own upstream; spliced by SNI only where the
//!   policy opts in (`passthrough`, for clients that pin certificates;
//!   every plaintext handshake record checked) or no CA was given;
//! - [`credential`]: secrets bound to hosts and a header, injected in place
//!   of a placeholder on terminated connections only; placeholders sent
//!   elsewhere refused as leak attempts; echoed values masked;
//! - [`oauth`]: subscription sign-ins whose access and refresh tokens stay
//!   on the host: the access token injected like a key, refreshes
//!   performed by netstack and written back to the host store;
//! - [`live`]: live rules, held requests a person approves, time-boxed
//!   grants, ask rules, and the one decision function ([`live::judge`]);
//! - [`forward`]: published ports, the one way into the guest: a host
//!   connection to 127.0.0.1:HOSTPORT (loopback only) spliced into a TCP
//!   connection netstack opens to the guest's GUESTPORT, bounded, audited;
//! - [`preset`]: the agent presets, data (`agents/presets.toml`): each
//!   agent's hosts, credentials and sign-in, and what sbx starts;
//! - [`policy`] (documented TOML, presets, explain) and [`host`] (names,
//!   never IP literals). The hash-chained audit log, its verifier and the
//!   typed events the stack records are the `audit` crate's (`sbx-audit`).
//!
//! - [`limits`]: per-connection time limits (a hostile upstream or guest
//!   holds at most its own connection, for a named time), the connection
//!   cap and the per-sandbox [`limits::NetCounters`];
//! - [`sim`]: the in-process simulated guest used by the tests and by
//!   `cargo bench -p netstack --bench net`.
//!
//! Fuzz targets for the parsers: `fuzz/` (cargo-fuzz, built in CI).
//!
//! The virtio-net device that feeds it guest frames is the VMM's; it talks
//! to a [`frame_backend::FrameBackend`], which [`backend::NetBackend`]
//! implements over [`stack::NetStack`] (the CLI only wires the two).
#![forbid(unsafe_code)]

pub mod backend;
pub mod ca;
pub mod conn;
pub mod credential;
pub mod dns;
pub mod forward;
pub mod graphql;
pub mod host;
pub mod http;
pub mod limits;
pub mod live;
pub mod oauth;
pub mod policy;
pub mod preset;
pub mod sim;
pub mod stack;
pub mod terminate;
pub mod tls;
