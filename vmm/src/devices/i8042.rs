//! Host side: the part of the i8042 keyboard controller a guest uses to
//! reset the machine (command 0xFE on port 0x64, `reboot=k`). The VM ends
//! when it sees it; guest-init reboots to power off.

use std::sync::Arc;

use super::BusDevice;
use crate::control::{Stop, StopReason};

pub const BASE: u64 = 0x60;
pub const LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

pub struct I8042 {
    stop: Arc<Stop>,
}

impl I8042 {
    pub fn new(stop: Arc<Stop>) -> I8042 {
        I8042 { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET] {
            self.stop.request(StopReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_stops_the_vm() {
        let stop = Arc::new(Stop::default());
        let mut dev = I8042::new(stop.clone());
        dev.write(0, &[CMD_RESET]);
        dev.write(COMMAND_OFFSET, &[0xfd]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET, 0]);
        assert!(stop.reason().is_none());
        let mut st = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut st);
        assert_eq!(st, [0]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET]);
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
    }
}
