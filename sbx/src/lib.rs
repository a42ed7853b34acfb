//! Host side: the `sbx` command line's library — everything only the CLI
//! uses, kept out of the VMM: sandbox state on disk, the control channel's
//! client, the user's terminal and signals, which folders may be shared,
//! escaping guest text for the terminal, kernel symbols for profiles.

pub mod client;
pub mod escape;
pub mod folders;
pub mod sandbox;
pub mod signals;
pub mod symbols;
pub mod terminal;
