//! Host side: the `sbx` command line's library — everything only the CLI
//! uses, kept out of the VMM: the commands (`run` as plan, launch, finish;
//! `commands` for the rest), the sandbox policy document, sandbox state on
//! disk, the control channel's client, the user's terminal and signals,
//! which folders may be shared, escaping guest text for the terminal,
//! kernel symbols for profiles, the secrets and CA netstack uses, the
//! sandbox's resource limits (cgroup v2), the audit trail's commands
//! (verify, anchor, export, follow), the machine's admin policy
//! (`/etc/sbx/policy.toml`).
//!
//! `unsafe` is denied but in the modules allowed below, each for libc
//! calls std does not wrap (every block says why it is sound, `// SAFETY:`):
//! `admin` (euid, the peer's uid by SO_PEERCRED), `audit` (flock), `copy::fs`
//! (the *at calls), `secrets` (terminal echo off), `signals` (sigwait,
//! kill), `terminal` (raw mode, window size).
#![deny(unsafe_code)]
// Threads start at vmm's `threads::spawn`/`spawn_helper` only (clippy.toml).
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

#[allow(unsafe_code)]
pub mod admin;
pub mod agents;
#[allow(unsafe_code)]
pub mod audit;
// Its doc comments are clap's help text, plain text (`UID[:GID]`), not
// Markdown links.
#[allow(rustdoc::broken_intra_doc_links)]
pub mod cli;
pub mod client;
pub mod clone;
pub mod commands;
pub mod copy;
pub mod escape;
pub mod folders;
pub mod learn;
pub mod limits;
pub mod machine_policy;
pub mod oauth_secrets;
pub mod policy_doc;
pub mod ports;
pub mod run;
pub mod sandbox;
#[allow(unsafe_code)]
pub mod secrets;
#[allow(unsafe_code)]
pub mod signals;
pub mod symbols;
pub mod termfilter;
#[allow(unsafe_code)]
pub mod terminal;
