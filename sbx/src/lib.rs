//! Host side: the `sbx` command line's library — everything only the CLI
//! uses, kept out of the VMM: the commands (`run` as plan, launch, finish;
//! `commands` for the rest), the sandbox policy document, sandbox state on
//! disk, the control channel's client, the user's terminal and signals,
//! which folders may be shared, escaping guest text for the terminal,
//! kernel symbols for profiles, the secrets and CA netstack uses, the
//! sandbox's resource limits (cgroup v2), the audit trail's commands
//! (verify, anchor, export, follow).

pub mod admin;
pub mod agents;
pub mod audit;
pub mod cli;
pub mod client;
pub mod commands;
pub mod copy;
pub mod escape;
pub mod folders;
pub mod learn;
pub mod limits;
pub mod netback;
pub mod policy_doc;
pub mod ports;
pub mod run;
pub mod sandbox;
pub mod secrets;
pub mod signals;
pub mod symbols;
pub mod termfilter;
pub mod terminal;
