//! Host side, for tests and benchmarks only: a simulated guest — smoltcp on
//! the other side of netstack's frame queues, in the same process and on
//! the same (manual) clock, so network tests are deterministic and need no
//! VM, no TAP device and no privileges.

use std::io::Write;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};

use crate::stack::{Frames, NetStack};

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x15];
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// A guest at 10.0.2.15/24 with its default route via netstack's gateway.
pub struct Guest {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub(crate) frames: Frames,
}

impl Guest {
    pub fn new(mtu: usize) -> Guest {
        let mut frames = Frames::new(mtu);
        let hw = HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC));
        let mut iface = Interface::new(IfaceConfig::new(hw), &mut frames, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(Ipv4Cidr::new(GUEST_IP, 24)));
        });
        // A fresh route table always has room for one route.
        let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2));
        Guest { iface, frames, sockets: SocketSet::new(Vec::new()) }
    }

    /// Runs the guest's protocols at `now_ms`.
    pub fn poll(&mut self, now_ms: u64) {
        self.iface.poll(Instant::from_millis(now_ms as i64), &mut self.frames, &mut self.sockets);
    }

    /// A frame the guest sent.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.frames.tx.pop_front()
    }

    /// A frame for the guest.
    pub fn push_frame(&mut self, frame: Vec<u8>) {
        self.frames.rx.push_back(frame);
    }
}

/// Moves frames both ways and polls both sides (the clock advancing 1 ms
/// a round) until nothing moves, at most 200 rounds.
pub fn pump<W: Write>(net: &mut NetStack<W>, guest: &mut Guest, now: &mut u64) {
    for _ in 0..200 {
        *now += 1;
        guest.poll(*now);
        let mut moved = false;
        while let Some(f) = guest.pop_frame() {
            net.push_frame(f);
            moved = true;
        }
        net.poll(*now);
        while let Some(f) = net.pop_frame() {
            guest.push_frame(f);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}
