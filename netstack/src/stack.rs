//! Host side: the guest-facing network. Ethernet frames from the guest
//! (untrusted) come in through [`NetStack::push_frame`], frames for the
//! guest go out through [`NetStack::pop_frame`]; smoltcp runs the protocols
//! in between. netstack plays the gateway (ARP, ping) and the DNS server.
//! Before smoltcp sees a frame it is classified with checked views: only
//! ARP, ICMP to the gateway, DNS to the gateway and TCP to ports 80/443
//! of addresses netstack handed out go further; everything else is dropped
//! and logged. No host socket is ever opened for a dropped frame.
//!
//! Limits: at most [`MAX_QUEUED_FRAMES`] frames wait in each direction
//! (more are dropped, as a full NIC would), frames are at most the MTU.

use std::collections::VecDeque;
use std::io::Write;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config as IfaceConfig, Interface, Route, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr, IpProtocol, Ipv4Cidr, Ipv4Packet,
    TcpPacket, UdpPacket,
};

use crate::audit::AuditLog;
use crate::dns::{self, NameTable};
use crate::policy::{Action, Policy};

/// Frames waiting in one direction before more are dropped.
pub const MAX_QUEUED_FRAMES: usize = 1024;
/// Names the guest may have bound to synthetic addresses.
pub const MAX_NAMES: usize = 4096;
const DNS_PORT: u16 = 53;
const DNS_TTL: u32 = 60;

/// The guest's network as netstack sets it up.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway_mac: [u8; 6],
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gateway_mac: [0x02, 0x73, 0x62, 0x78, 0, 1],
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            prefix_len: 24,
            mtu: 1500,
        }
    }
}

/// The frame queues smoltcp reads from and writes to.
struct Frames {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        if self.0.len() < MAX_QUEUED_FRAMES {
            self.0.push_back(frame);
        }
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

/// What netstack does with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop(String),
}

pub struct NetStack<W: Write> {
    cfg: Config,
    iface: Interface,
    frames: Frames,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    names: NameTable,
    policy: Policy,
    audit: AuditLog<W>,
    now_ms: u64,
}

impl<W: Write> NetStack<W> {
    pub fn new(cfg: Config, policy: Policy, audit: AuditLog<W>) -> NetStack<W> {
        let mut frames = Frames { rx: VecDeque::new(), tx: VecDeque::new(), mtu: cfg.mtu };
        let hw = HardwareAddress::Ethernet(EthernetAddress(cfg.gateway_mac));
        let mut iface = Interface::new(IfaceConfig::new(hw), &mut frames, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(cfg.gateway, cfg.prefix_len)));
        });
        // Accept TCP for the synthetic addresses handed out by DNS: AnyIP
        // with that prefix routed "via" our own address.
        iface.set_any_ip(true);
        iface.routes_mut().update(|routes| {
            let _ = routes.push(Route {
                cidr: IpCidr::Ipv4(Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 15)),
                via_router: cfg.gateway.into(),
                preferred_until: None,
                expires_at: None,
            });
        });
        let mut sockets = SocketSet::new(Vec::new());
        let udp_buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * dns::MAX_UDP_MESSAGE]);
        let mut dns_socket = udp::Socket::new(udp_buffer(), udp_buffer());
        // Binding a fresh socket to a fixed port cannot fail.
        let _ = dns_socket.bind((cfg.gateway, DNS_PORT));
        let dns = sockets.add(dns_socket);
        NetStack { cfg, iface, frames, sockets, dns, names: NameTable::new(MAX_NAMES), policy, audit, now_ms: 0 }
    }

    /// A frame from the guest. Frames beyond the queue limit are dropped.
    pub fn push_frame(&mut self, frame: Vec<u8>) {
        match self.classify(&frame) {
            Verdict::Pass if self.frames.rx.len() < MAX_QUEUED_FRAMES => self.frames.rx.push_back(frame),
            Verdict::Pass => {}
            Verdict::Drop(what) => self.log(serde_json::json!({"event": "refused", "what": what})),
        }
    }

    /// The next frame for the guest.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.frames.tx.pop_front()
    }

    /// The name a synthetic address was handed out for.
    pub fn name_of(&self, addr: Ipv4Addr) -> Option<String> {
        self.names.name_of(addr).map(|n| n.to_string())
    }

    /// Runs the protocols up to `now_ms` (milliseconds on any monotonic
    /// clock; tests drive it by hand).
    pub fn poll(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let now = Instant::from_millis(now_ms as i64);
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        self.serve_dns();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
    }

    fn log(&mut self, event: serde_json::Value) {
        // Losing the audit trail must not be silent, but must not stop the
        // guest's network either: the error goes to the VMM's stderr.
        if let Err(e) = self.audit.record(&event, self.now_ms) {
            eprintln!("netstack: {e}");
        }
    }

    fn classify(&self, frame: &[u8]) -> Verdict {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Verdict::Drop("malformed Ethernet frame".into());
        };
        if frame.len() > self.cfg.mtu + 14 {
            return Verdict::Drop(format!("frame of {} bytes over the MTU", frame.len()));
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => Verdict::Pass,
            EthernetProtocol::Ipv4 => self.classify_ipv4(eth.payload()),
            EthernetProtocol::Ipv6 => Verdict::Drop("IPv6".into()),
            other => Verdict::Drop(format!("ethertype {other}")),
        }
    }

    fn classify_ipv4(&self, packet: &[u8]) -> Verdict {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return Verdict::Drop("malformed IPv4 packet".into());
        };
        let dst = ip.dst_addr();
        let to_gateway = dst == self.cfg.gateway;
        match ip.next_header() {
            IpProtocol::Icmp if to_gateway => Verdict::Pass,
            IpProtocol::Icmp => Verdict::Drop(format!("ICMP to {dst}")),
            IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
                Ok(udp) if to_gateway && udp.dst_port() == DNS_PORT => Verdict::Pass,
                Ok(udp) => Verdict::Drop(format!("UDP to {dst}:{}", udp.dst_port())),
                Err(_) => Verdict::Drop("malformed UDP".into()),
            },
            IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
                Ok(tcp) if matches!(tcp.dst_port(), 80 | 443) && self.names.name_of(dst).is_some() => Verdict::Pass,
                Ok(tcp) => Verdict::Drop(format!("TCP to {dst}:{}", tcp.dst_port())),
                Err(_) => Verdict::Drop("malformed TCP".into()),
            },
            other => Verdict::Drop(format!("IP protocol {other}")),
        }
    }

    fn serve_dns(&mut self) {
        let mut replies: Vec<(Vec<u8>, smoltcp::wire::IpEndpoint)> = Vec::new();
        let mut events: Vec<serde_json::Value> = Vec::new();
        {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            while let Ok((data, meta)) = socket.recv() {
                let query = match dns::parse_query(data) {
                    Ok(q) => q,
                    Err(e) => {
                        events.push(serde_json::json!({"event": "dns", "error": e.to_string()}));
                        continue;
                    }
                };
                let (reply, event) = answer(&query, &self.policy, &mut self.names);
                replies.push((reply, meta.endpoint));
                events.push(event);
            }
        }
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        for (reply, to) in replies {
            // A full send buffer drops the answer; the guest retries.
            let _ = socket.send_slice(&reply, to);
        }
        for e in events {
            self.log(e);
        }
    }
}

/// The answer to one query and its audit line.
fn answer(query: &dns::Query, policy: &Policy, names: &mut NameTable) -> (Vec<u8>, serde_json::Value) {
    let Some(host) = query.host() else {
        let event = serde_json::json!({"event": "dns", "name": query.raw_name, "decision": "deny", "reason": "not a host name (IP literal or malformed)"});
        return (dns::answer_empty(query, dns::RCODE_REFUSED), event);
    };
    let decision = policy.resolvable(&host);
    let rule = decision.rule.as_ref().map(|r| r.to_string());
    if decision.action == Action::Deny {
        let event = serde_json::json!({"event": "dns", "name": host.as_str(), "decision": "deny", "rule": rule});
        return (dns::answer_empty(query, dns::RCODE_REFUSED), event);
    }
    let reply = match (query.qtype, names.bind(&host)) {
        (dns::TYPE_A, Some(addr)) => {
            let event = serde_json::json!({"event": "dns", "name": host.as_str(), "decision": "allow", "rule": rule, "answer": addr.to_string()});
            return (dns::answer_a(query, addr, DNS_TTL), event);
        }
        (dns::TYPE_A, None) => dns::answer_empty(query, dns::RCODE_SERVFAIL),
        // The name exists, but only over IPv4.
        _ => dns::answer_empty(query, 0),
    };
    let event = serde_json::json!({"event": "dns", "name": host.as_str(), "decision": "allow", "rule": rule, "qtype": query.qtype});
    (reply, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::socket::icmp;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x15];
    const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    /// A guest made of smoltcp on the other side of the frame queues.
    struct Guest {
        iface: Interface,
        frames: Frames,
        sockets: SocketSet<'static>,
    }

    impl Guest {
        fn new() -> Guest {
            let mut frames = Frames { rx: VecDeque::new(), tx: VecDeque::new(), mtu: 1500 };
            let hw = HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC));
            let mut iface = Interface::new(IfaceConfig::new(hw), &mut frames, Instant::ZERO);
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::Ipv4(Ipv4Cidr::new(GUEST_IP, 24)));
            });
            iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2)).unwrap();
            Guest { iface, frames, sockets: SocketSet::new(Vec::new()) }
        }
    }

    type Net = NetStack<Vec<u8>>;

    fn net(policy: &str) -> Net {
        NetStack::new(Config::default(), Policy::from_toml(policy).unwrap(), AuditLog::new(Vec::new()))
    }

    /// Moves frames both ways and polls both sides until nothing moves.
    fn pump(net: &mut Net, guest: &mut Guest, now: &mut u64) {
        for _ in 0..200 {
            *now += 1;
            guest.iface.poll(Instant::from_millis(*now as i64), &mut guest.frames, &mut guest.sockets);
            let mut moved = false;
            while let Some(f) = guest.frames.tx.pop_front() {
                net.push_frame(f);
                moved = true;
            }
            net.poll(*now);
            while let Some(f) = net.pop_frame() {
                guest.frames.rx.push_back(f);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn audit(net: &Net) -> String {
        String::from_utf8(net.audit.get_ref().clone()).unwrap()
    }

    /// Asks `name` (type A) over UDP from the guest; returns the reply.
    fn resolve(net: &mut Net, guest: &mut Guest, name: &str, now: &mut u64) -> Vec<u8> {
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
        let mut s = udp::Socket::new(buf(), buf());
        s.bind((GUEST_IP, 40000)).unwrap();
        let h = guest.sockets.add(s);
        let q = crate::dns::tests_support::query(7, name, dns::TYPE_A);
        guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (Ipv4Addr::new(10, 0, 2, 2), 53)).unwrap();
        pump(net, guest, now);
        let reply = guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, _)| d.to_vec()).expect("a DNS reply");
        guest.sockets.remove(h);
        reply
    }

    const POLICY: &str = "version = 1\n[[rule]]\nallow = \"*.example.com\"\n[[rule]]\ndeny = \"bad.example.com\"\n";

    #[test]
    fn dns_answers_allowed_names_with_bound_synthetic_addresses_and_refuses_others() {
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(), 0);
        let ok = resolve(&mut net, &mut guest, "api.example.com", &mut now);
        assert_eq!(ok[3] & 0xf, 0, "NOERROR");
        let addr = Ipv4Addr::new(ok[ok.len() - 4], ok[ok.len() - 3], ok[ok.len() - 2], ok[ok.len() - 1]);
        assert!(NameTable::is_synthetic(addr));
        assert_eq!(net.name_of(addr).as_deref(), Some("api.example.com"));
        for denied in ["bad.example.com", "evilexample.com", "127.0.0.1"] {
            let r = resolve(&mut net, &mut guest, denied, &mut now);
            assert_eq!(r[3] & 0xf, dns::RCODE_REFUSED, "{denied}");
        }
        let log = audit(&net);
        assert!(log.contains("\"name\":\"api.example.com\"") && log.contains(&format!("\"answer\":\"{addr}\"")));
        assert!(log.contains("\"decision\":\"deny\"") && log.contains("deny bad.example.com"));
        assert_eq!(crate::audit::verify(log.as_bytes()).unwrap().lines, 4);
    }

    #[test]
    fn the_gateway_answers_ping() {
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(), 0);
        let buf = || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 512]);
        let mut s = icmp::Socket::new(buf(), buf());
        s.bind(icmp::Endpoint::Ident(0x1234)).unwrap();
        let h = guest.sockets.add(s);
        let repr = Icmpv4Repr::EchoRequest { ident: 0x1234, seq_no: 1, data: b"ping" };
        let caps = guest.frames.capabilities().checksum;
        {
            let socket = guest.sockets.get_mut::<icmp::Socket>(h);
            let payload = socket.send(repr.buffer_len(), IpAddress::Ipv4(Ipv4Addr::new(10, 0, 2, 2))).unwrap();
            repr.emit(&mut Icmpv4Packet::new_unchecked(payload), &caps);
        }
        pump(&mut net, &mut guest, &mut now);
        let (data, from) = guest.sockets.get_mut::<icmp::Socket>(h).recv().expect("an echo reply");
        assert_eq!(from, IpAddress::Ipv4(Ipv4Addr::new(10, 0, 2, 2)));
        let reply = Icmpv4Packet::new_checked(data).unwrap();
        assert_eq!(reply.echo_ident(), 0x1234);
    }

    #[test]
    fn everything_else_is_dropped_and_logged() {
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(), 0);
        // UDP to an outside resolver.
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 2048]);
        let mut s = udp::Socket::new(buf(), buf());
        s.bind((GUEST_IP, 40001)).unwrap();
        let h = guest.sockets.add(s);
        let q = crate::dns::tests_support::query(9, "api.example.com", dns::TYPE_A);
        guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q, (Ipv4Addr::new(8, 8, 8, 8), 53)).unwrap();
        pump(&mut net, &mut guest, &mut now);
        assert!(guest.sockets.get_mut::<udp::Socket>(h).recv().is_err(), "no answer from outside");
        // Raw junk, IPv6 and a truncated IPv4 header.
        net.push_frame(vec![1, 2, 3]);
        let mut v6 = vec![0u8; 60];
        v6[12] = 0x86;
        v6[13] = 0xdd;
        net.push_frame(v6);
        let mut short = vec![0u8; 20];
        short[12] = 0x08;
        net.push_frame(short);
        let log = audit(&net);
        assert!(log.contains("UDP to 8.8.8.8:53"), "{log}");
        assert!(log.contains("malformed Ethernet frame") && log.contains("\"IPv6\"") && log.contains("malformed IPv4"));
        assert!(net.frames.rx.is_empty());
    }
}
