//! Host side: the devices a guest can touch. Every access arrives from the
//! guest through the bus and is untrusted: offsets and sizes are checked,
//! nothing panics.

pub mod bus;
pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
