//! Host side: the guest-facing network. Ethernet frames from the guest
//! (untrusted) come in through [`NetStack::push_frame`], frames for the
//! guest go out through [`NetStack::pop_frame`]; smoltcp runs the protocols
//! in between. netstack plays the gateway (ARP, ping) and the DNS server.
//! Before smoltcp sees a frame it is classified with checked views: only
//! ARP, ICMP to the gateway, DNS to the gateway and TCP to ports 80/443
//! of addresses netstack handed out go further; everything else is dropped
//! and logged. No host socket is ever opened for a dropped frame.
//! The one exception going the other way: the guest's side of a
//! connection netstack opened into it for a published port
//! ([`crate::forward`]), passed for that connection's exact ports only.
//!
//! TCP to ports 80 and 443 of those addresses is terminated here and
//! handled per connection by [`crate::conn`]. With [`NetStack::with_live`],
//! DNS and connections are judged with the sandbox's live rules, and held
//! requests wait for a person ([`crate::live`]): the live state's clock is
//! this stack's, its audit events are written here each poll, and
//! [`NetStack::poll_at`] wakes for the next grant or hold to end.
//!
//! Upstream connections never reach the host's own network by accident:
//! a name resolved on the host is connected to only at a global unicast
//! address ([`classify_ip`]), unless `--resolve` ([`Resolver::overrides`])
//! or a policy rule's `addresses` names the address (see [`crate::conn`]).
//!
//! Limits: at most [`MAX_QUEUED_FRAMES`] frames wait in each direction
//! (more are dropped, as a full NIC would), frames are at most the MTU;
//! at most [`MAX_CONNS`] TCP connections (each SYN of a burst gets a
//! listener up to that cap; then the oldest idle connection is reclaimed,
//! else the SYN is reset, counted and audited once per burst, see
//! [`crate::limits`]), each with [`TCP_BUFFER`] socket buffers, the buffers of
//! [`crate::conn::MAX_BUFFERED`] and at most [`crate::conn::MAX_IN_FLIGHT`]
//! requests awaiting responses; at most [`crate::conn::MAX_CONNECT_THREADS`]
//! connect threads at once; a connection idle for [`IDLE_MS`] is reset,
//! and the time limits of [`crate::limits`] end one whose upstream or
//! guest stalls. [`NetStack::counters`] says how many are open, held,
//! refused, reclaimed and timed out.
//! Everything else that grows with guest input is bounded where it is
//! parsed: [`MAX_NAMES`] bound names, the DNS socket's `DNS_QUEUE` messages,
//! heads and chunk lines in [`crate::http`], the ClientHello record in
//! [`crate::tls`]; audit events are written out every poll.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use smoltcp::iface::{Config as IfaceConfig, Interface, Route, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpProtocol,
    Ipv4Cidr, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
};

use crate::conn::{Conn, ConnectSlots, Lookup, Resolve, MAX_CANDIDATES, MAX_CONNECT_THREADS};
use crate::dns::{self, NameTable};
use crate::forward::{Forwarder, Ports};
use crate::host::HostName;
use crate::limits::{Burst, NetCounters, Watch, GUEST_HANDSHAKE_MS};
use crate::live::{self, Live, LiveRules};
use crate::policy::Policy;
use crate::terminate::Termination;
use audit::{Decision, Dns, Event, SharedLog};

/// Frames waiting in one direction before more are dropped.
pub const MAX_QUEUED_FRAMES: usize = 1024;
/// Names the guest may have bound to synthetic addresses.
pub const MAX_NAMES: usize = 4096;
const DNS_PORT: u16 = 53;
const DNS_TTL: u32 = 60;
/// Most guest TCP connections at once (listeners included).
pub const MAX_CONNS: usize = 256;
/// A connection with no bytes either way for this long is reset.
pub const IDLE_MS: u64 = 10 * 60 * 1000;
/// While every connect thread is taken, how often [`NetStack::poll_at`]
/// asks for a look at connections waiting for one.
pub const SLOT_RECHECK_MS: u64 = 1000;
const LISTENERS_PER_PORT: usize = 4;
/// Each guest socket's receive and send buffer.
pub const TCP_BUFFER: usize = 64 * 1024;
/// DNS messages queued in each direction on the DNS socket.
const DNS_QUEUE: usize = 64;
/// Bytes taken from a guest socket at a time: a connection's inbox holds
/// at most [`crate::conn::MAX_BUFFERED`] plus this.
const READ_CHUNK: usize = 16 * 1024;
const POLICED_PORTS: [u16; 2] = [80, 443];

/// Upstream addresses: an override table (like curl's --resolve, for tests
/// and local services; used as given, whatever the address), then, if
/// enabled, the host's resolver (run on the connection's connect thread,
/// never in the poll loop; its answers are checked, see
/// [`crate::conn::choose_upstream`]) for the absolute name only, never
/// with the host's search domains ([`system_lookup`]).
#[derive(Default)]
pub struct Resolver {
    pub overrides: HashMap<(HostName, u16), SocketAddr>,
    pub system: bool,
}

impl Resolve for Resolver {
    /// The override, else the first global unicast address.
    fn resolve(&self, name: &HostName, port: u16) -> Option<SocketAddr> {
        match self.lookup(name, port) {
            Lookup::Override(a) => Some(a),
            Lookup::Resolved(all) => all.into_iter().find(|a| is_global_unicast(a.ip())),
            Lookup::NotFound => None,
        }
    }

    /// The override, else every address the host's resolver gives (IPv4
    /// first, at most [`MAX_CANDIDATES`]).
    fn lookup(&self, name: &HostName, port: u16) -> Lookup {
        if let Some(a) = self.overrides.get(&(name.clone(), port)) {
            return Lookup::Override(*a);
        }
        if !self.system {
            return Lookup::NotFound;
        }
        let hosts = read_hosts_file(Path::new(HOSTS_FILE));
        system_lookup(name, port, hosts.as_deref(), |absolute, port| {
            (absolute, port).to_socket_addrs().map(|found| found.take(MAX_CANDIDATES).collect())
        })
    }
}

/// The host's table of static names, read before its resolver.
pub const HOSTS_FILE: &str = "/etc/hosts";
/// The most of [`HOSTS_FILE`] that is read.
pub const MAX_HOSTS_FILE: u64 = 1 << 20;

/// [`HOSTS_FILE`]'s text (its first [`MAX_HOSTS_FILE`] bytes), if readable.
fn read_hosts_file(path: &Path) -> Option<String> {
    let mut text = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_HOSTS_FILE).read_to_end(&mut text).ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// The addresses a hosts file (`hosts`, in /etc/hosts syntax) gives
/// `name`, in file order.
fn hosts_entries(hosts: &str, name: &HostName) -> Vec<IpAddr> {
    let mut found = Vec::new();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(Ok(addr)) = fields.next().map(str::parse::<IpAddr>) else { continue };
        if fields.any(|f| HostName::parse(f).is_ok_and(|h| h == *name)) && found.len() < MAX_CANDIDATES {
            found.push(addr);
        }
    }
    found
}

/// The host's answer for `name`: the hosts file's entries for it (as the
/// host's own lookup reads them first), else `getaddrinfo`'s for the
/// absolute name, `name.` — with its trailing dot, so that the resolver
/// never tries the host's search domains (`api` must not become
/// `api.corp.example`, nor `foo.internal` `foo.internal.corp.example`).
/// IPv4 first.
pub fn system_lookup(
    name: &HostName,
    port: u16,
    hosts: Option<&str>,
    getaddrinfo: impl FnOnce(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
) -> Lookup {
    let from_file = hosts.map(|h| hosts_entries(h, name)).unwrap_or_default();
    let mut all: Vec<SocketAddr> = if from_file.is_empty() {
        match getaddrinfo(&format!("{name}."), port) {
            Ok(found) => found.into_iter().take(MAX_CANDIDATES).collect(),
            Err(_) => return Lookup::NotFound,
        }
    } else {
        from_file.into_iter().map(|ip| SocketAddr::new(ip, port)).collect()
    };
    all.sort_by_key(|a| !a.is_ipv4());
    Lookup::Resolved(all)
}

/// What kind of address an upstream address is. Only [`AddrClass::Global`]
/// is connected to unless the address is explicitly permitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    /// Global unicast: the public Internet.
    Global,
    /// 0.0.0.0/8 ("this network"), `::`.
    Unspecified,
    /// 127.0.0.0/8, `::1`.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16.
    Private,
    /// 100.64.0.0/10 (carrier-grade NAT).
    SharedCgnat,
    /// 169.254.0.0/16 (cloud metadata lives at 169.254.169.254), fe80::/10.
    LinkLocal,
    /// fc00::/7, and the deprecated site-local fec0::/10.
    UniqueLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
    /// 3fff::/20.
    Documentation,
    /// 198.18.0.0/15 (netstack's own synthetic addresses), 2001:2::/48.
    Benchmarking,
    /// Everything else that is not global unicast: 192.0.0.0/24,
    /// 192.88.99.0/24, 240.0.0.0/4, IPv4-compatible `::a.b.c.d`,
    /// 64:ff9b:1::/48, 2001::/23, 6to4 2002::/16, and all IPv6 outside
    /// 2000::/3.
    Reserved,
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrClass::Global => "global unicast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "shared (CGNAT)",
            AddrClass::LinkLocal => "link-local",
            AddrClass::UniqueLocal => "unique local",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Documentation => "documentation",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Reserved => "reserved",
        })
    }
}

/// Whether `a` is in `base/len`.
fn in_v4(a: Ipv4Addr, base: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(a) & mask == u32::from_be_bytes(base) & mask
}

fn in_v6(a: Ipv6Addr, base: [u16; 8], len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(a) & mask == u128::from(Ipv6Addr::from(base)) & mask
}

fn classify_v4(a: Ipv4Addr) -> AddrClass {
    const TABLE: &[([u8; 4], u32, AddrClass)] = &[
        ([0, 0, 0, 0], 8, AddrClass::Unspecified),
        ([10, 0, 0, 0], 8, AddrClass::Private),
        ([100, 64, 0, 0], 10, AddrClass::SharedCgnat),
        ([127, 0, 0, 0], 8, AddrClass::Loopback),
        ([169, 254, 0, 0], 16, AddrClass::LinkLocal),
        ([172, 16, 0, 0], 12, AddrClass::Private),
        ([192, 0, 0, 0], 24, AddrClass::Reserved),
        ([192, 0, 2, 0], 24, AddrClass::Documentation),
        ([192, 88, 99, 0], 24, AddrClass::Reserved),
        ([192, 168, 0, 0], 16, AddrClass::Private),
        ([198, 18, 0, 0], 15, AddrClass::Benchmarking),
        ([198, 51, 100, 0], 24, AddrClass::Documentation),
        ([203, 0, 113, 0], 24, AddrClass::Documentation),
        ([224, 0, 0, 0], 4, AddrClass::Multicast),
        ([255, 255, 255, 255], 32, AddrClass::Broadcast),
        ([240, 0, 0, 0], 4, AddrClass::Reserved),
    ];
    TABLE.iter().find(|(base, len, _)| in_v4(a, *base, *len)).map_or(AddrClass::Global, |(_, _, c)| *c)
}

fn classify_v6(a: Ipv6Addr) -> AddrClass {
    if a.is_unspecified() {
        return AddrClass::Unspecified;
    }
    if a.is_loopback() {
        return AddrClass::Loopback;
    }
    // IPv4-mapped ::ffff:a.b.c.d and NAT64 64:ff9b::a.b.c.d reach the IPv4
    // address inside: judged as that address.
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if in_v6(a, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return classify_v4(Ipv4Addr::from(u128::from(a) as u32));
    }
    const TABLE: &[([u16; 8], u32, AddrClass)] = &[
        // IPv4-compatible ::a.b.c.d (deprecated).
        ([0, 0, 0, 0, 0, 0, 0, 0], 96, AddrClass::Reserved),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, AddrClass::Multicast),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::UniqueLocal),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, AddrClass::UniqueLocal),
        ([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32, AddrClass::Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, AddrClass::Documentation),
        ([0x2001, 0x0002, 0, 0, 0, 0, 0, 0], 48, AddrClass::Benchmarking),
        // IETF protocol assignments, Teredo, ORCHID.
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, AddrClass::Reserved),
        // 6to4: reaches whatever IPv4 address is inside through a relay.
        ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, AddrClass::Reserved),
    ];
    if let Some((_, _, c)) = TABLE.iter().find(|(base, len, _)| in_v6(a, *base, *len)) {
        return *c;
    }
    // Global unicast is 2000::/3; the rest (64:ff9b:1::/48, 100::/64,
    // 5f00::/16 are outside it) is not assigned for it.
    if in_v6(a, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        AddrClass::Global
    } else {
        AddrClass::Reserved
    }
}

/// What kind of address `ip` is (IPv4-mapped and NAT64 forms judged by the
/// IPv4 address inside).
pub fn classify_ip(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

/// True if netstack may connect to `ip` without an explicit permission.
pub fn is_global_unicast(ip: IpAddr) -> bool {
    classify_ip(ip) == AddrClass::Global
}

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
pub(crate) struct Frames {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
    pub(crate) mtu: usize,
}

impl Frames {
    pub(crate) fn new(mtu: usize) -> Frames {
        Frames { rx: VecDeque::new(), tx: VecDeque::new(), mtu }
    }
}

pub(crate) struct RxToken(Vec<u8>);
pub(crate) struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

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
    /// Dropped, and this TCP reset goes back so that the guest's connect
    /// fails at once ("connection refused") instead of retrying for
    /// minutes. Only ever one reset per SYN: no amplification.
    Refuse(String, Vec<u8>),
}

pub struct NetStack<W: Write> {
    cfg: Config,
    iface: Interface,
    frames: Frames,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    names: NameTable,
    policy: Policy,
    /// The audit log could not be written: everything new is refused.
    audit_failed: bool,
    resolver: Arc<dyn Resolve>,
    audit: SharedLog<W>,
    listeners: Vec<(SocketHandle, u16)>,
    /// Guest connections: socket, connection, last active (ms), id, and
    /// its time limits' clocks.
    conns: Vec<(SocketHandle, Conn, u64, u64, Watch)>,
    /// The next connection's id (never reused: it names the connection's
    /// upstream socket to an event loop, [`NetStack::upstream_interests`]).
    next_conn_id: u64,
    /// Connect threads running for this stack's connections.
    connect_slots: Arc<ConnectSlots>,
    /// TLS termination and credentials, if given ([`NetStack::terminating`]).
    termination: Option<Arc<Termination>>,
    /// Live rules and held requests ([`NetStack::with_live`]).
    live: Option<Arc<Live>>,
    now_ms: u64,
    /// SYNs to each policed port queued since the last poll: each gets a
    /// listener if the connection cap allows.
    syns: [usize; POLICED_PORTS.len()],
    counters: NetCounters,
    burst: Burst,
    /// Published ports ([`NetStack::with_ports`]).
    forwarder: Option<Forwarder>,
}

impl<W: Write> NetStack<W> {
    pub fn new(cfg: Config, policy: Policy, resolver: Resolver, audit: SharedLog<W>) -> NetStack<W> {
        NetStack::with_resolver(cfg, policy, Arc::new(resolver), audit)
    }

    /// As [`NetStack::new`], with any resolver (its `Override` answers are
    /// used as given, its `Resolved` ones checked).
    pub fn with_resolver(cfg: Config, policy: Policy, resolver: Arc<dyn Resolve>, audit: SharedLog<W>) -> NetStack<W> {
        let mut frames = Frames::new(cfg.mtu);
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
        let udp_buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; DNS_QUEUE],
                vec![0; DNS_QUEUE * dns::MAX_UDP_MESSAGE],
            )
        };
        let mut dns_socket = udp::Socket::new(udp_buffer(), udp_buffer());
        // Binding a fresh socket to a fixed port cannot fail.
        let _ = dns_socket.bind((cfg.gateway, DNS_PORT));
        let dns = sockets.add(dns_socket);
        let mut net = NetStack {
            cfg,
            iface,
            frames,
            sockets,
            dns,
            names: NameTable::new(MAX_NAMES),
            policy,
            audit_failed: false,
            resolver,
            audit,
            listeners: Vec::new(),
            conns: Vec::new(),
            next_conn_id: 0,
            connect_slots: ConnectSlots::new(MAX_CONNECT_THREADS),
            termination: None,
            live: None,
            now_ms: 0,
            syns: [0; POLICED_PORTS.len()],
            counters: NetCounters::default(),
            burst: Burst::default(),
            forwarder: None,
        };
        net.replenish_listeners();
        net
    }

    /// The same stack, terminating TLS where the policy says so (every
    /// allowed host unless it opts into passthrough; see
    /// [`crate::terminate`]) and injecting the credentials given. Without
    /// it, HTTPS is only ever spliced by SNI (tests, benchmarks).
    pub fn terminating(mut self, termination: Arc<Termination>) -> NetStack<W> {
        self.termination = Some(termination);
        self
    }

    /// The same stack, judging with `live`'s rules and holding requests
    /// for a person ([`crate::live`]).
    pub fn with_live(mut self, live: Arc<Live>) -> NetStack<W> {
        self.live = Some(live);
        self
    }

    /// The same stack, serving `ports`' published ports into the guest at
    /// `guest` ([`crate::forward`]).
    pub fn with_ports(mut self, ports: Arc<Ports>, guest: Ipv4Addr) -> NetStack<W> {
        self.forwarder = Some(Forwarder::new(ports, guest, self.cfg.gateway));
        self
    }

    /// The published ports listened on now and each listener's address.
    pub fn published(&self) -> Vec<(crate::forward::Mapping, SocketAddr)> {
        self.forwarder.as_ref().map(|f| f.listening()).unwrap_or_default()
    }

    /// Forwarded connections into the guest open now.
    pub fn forwards(&self) -> usize {
        self.forwarder.as_ref().map_or(0, |f| f.open())
    }

    /// The audit lines written so far (tests).
    #[cfg(test)]
    pub(crate) fn audit_text(&self, out: &mut Vec<u8>)
    where
        W: AsRef<[u8]>,
    {
        out.extend_from_slice(self.audit.lock().unwrap().get_ref().as_ref());
    }

    /// Open guest TCP connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Connect threads running now (at most [`MAX_CONNECT_THREADS`]).
    pub fn connect_threads(&self) -> usize {
        self.connect_slots.running()
    }

    /// This sandbox's network counters now (see [`crate::limits`]).
    pub fn counters(&self) -> NetCounters {
        let mut c = self.counters;
        c.open = self.conns.len();
        c.held = self
            .conns
            .iter()
            .filter(|(h, conn, ..)| {
                let a = conn.activity();
                a.in_flight > 0 || a.to_guest > 0 || self.sockets.get::<tcp::Socket>(*h).send_queue() > 0
            })
            .count();
        c.connect_threads = self.connect_slots.running();
        c.connect_busy = self.connect_slots.busy() as u64;
        c
    }

    /// A frame from the guest. Frames beyond the queue limit are dropped.
    pub fn push_frame(&mut self, frame: Vec<u8>) {
        match self.classify(&frame) {
            Verdict::Pass if self.frames.rx.len() < MAX_QUEUED_FRAMES => {
                if let Some(i) = syn_port(&frame).and_then(|p| POLICED_PORTS.iter().position(|&q| q == p)) {
                    self.syns[i] += 1;
                }
                self.frames.rx.push_back(frame)
            }
            Verdict::Pass => {}
            Verdict::Drop(what) => self.log(Event::Refused(audit::Refused { what, ..Default::default() })),
            Verdict::Refuse(what, reset) => {
                if self.frames.tx.len() < MAX_QUEUED_FRAMES {
                    self.frames.tx.push_back(reset);
                }
                self.log(Event::Refused(audit::Refused { what, reset: Some(true), ..Default::default() }));
            }
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

    /// Calls `waker` (from another thread) whenever a connect thread ends:
    /// the stack then has its result to take ([`NetStack::poll`]).
    pub fn set_waker(&self, waker: crate::conn::Waker) {
        if let Some(l) = &self.live {
            l.set_waker(waker.clone());
        }
        if let Some(f) = &self.forwarder {
            f.set_waker(waker.clone());
        }
        self.connect_slots.set_waker(waker);
    }

    /// When [`NetStack::poll`] must run next if no frame, upstream socket
    /// or connect thread calls for it sooner (see
    /// [`NetStack::upstream_interests`], [`NetStack::set_waker`]): TCP
    /// timers, idle limits, and while every connect thread is taken, a
    /// look every [`SLOT_RECHECK_MS`] (a connection waiting for one gives
    /// up after [`crate::conn::MAX_CONNECT_WAIT`]). None: nothing is due.
    pub fn poll_at(&mut self, now_ms: u64) -> Option<u64> {
        let now = Instant::from_millis(now_ms as i64);
        // Rounded up: a timer due within a millisecond is due at the next
        // one (polling before it would find nothing to do, again and again).
        let smol = self.iface.poll_at(now, &self.sockets).map(|t| (t.total_micros().max(0) as u64).div_ceil(1000));
        let idle = self.conns.iter().map(|c| c.2.saturating_add(IDLE_MS + 1)).min();
        let slots = (self.connect_slots.running() >= MAX_CONNECT_THREADS).then(|| now_ms + SLOT_RECHECK_MS);
        let limits = self
            .conns
            .iter()
            .filter_map(|(h, conn, _, _, watch)| {
                watch.due(conn.activity(), self.sockets.get::<tcp::Socket>(*h).send_queue())
            })
            .min();
        let live = self.live.as_ref().and_then(|l| l.next_due());
        let forwards = self.forwarder.as_ref().and_then(|f| f.due());
        [smol, idle, slots, limits, live, forwards].into_iter().flatten().min()
    }

    /// The upstream sockets and whether each has work for
    /// [`NetStack::poll`] when readable or writable:
    /// `(connection id, fd, read, write)`.
    pub fn upstream_interests(&self, out: &mut Vec<(u64, RawFd, bool, bool)>) {
        for (_, conn, _, id, _) in &self.conns {
            if let Some((fd, read, write)) = conn.upstream_interest() {
                out.push((*id, fd, read, write));
            }
        }
        if let Some(f) = &self.forwarder {
            f.interests(&self.sockets, out);
        }
    }

    /// Runs the protocols up to `now_ms` (milliseconds on any monotonic
    /// clock; tests drive it by hand).
    pub fn poll(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if let Some(l) = &self.live {
            l.tick(now_ms);
        }
        let now = Instant::from_millis(now_ms as i64);
        self.make_room_for_syns();
        if let Some(f) = self.forwarder.as_mut() {
            f.apply_changes(&mut self.sockets, &mut self.next_conn_id);
            f.accept(&mut self.iface, &mut self.sockets, now_ms, &mut self.next_conn_id);
        }
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        self.syns = [0; POLICED_PORTS.len()];
        self.serve_dns();
        self.accept();
        self.serve_tcp();
        if let Some(f) = self.forwarder.as_mut() {
            f.serve(&mut self.sockets, now_ms);
        }
        self.replenish_listeners();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        self.sweep_closed();
        if let Some(f) = self.forwarder.as_mut() {
            f.sweep(&mut self.sockets);
            let events = std::mem::take(&mut f.events);
            for e in events {
                self.log(e);
            }
        }
        for e in self.live.as_ref().map(|l| l.take_events()).unwrap_or_default() {
            self.log(Event::Untyped(e));
        }
    }

    /// Forgets connections whose sockets are closed, after the last
    /// interface poll of the round (so that a reset decided this round
    /// went out to the guest first).
    fn sweep_closed(&mut self) {
        let mut events = Vec::new();
        let mut i = 0;
        while i < self.conns.len() {
            let state = self.sockets.get::<tcp::Socket>(self.conns[i].0).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                let (h, mut conn, ..) = self.conns.swap_remove(i);
                events.extend(conn.end_events());
                self.sockets.remove(h);
            } else {
                i += 1;
            }
        }
        for e in events {
            self.log(e);
        }
    }

    fn replenish_listeners(&mut self) {
        for port in POLICED_PORTS {
            self.listen_on(port, LISTENERS_PER_PORT);
        }
    }

    /// Listeners on `port` up to `want`, within [`MAX_CONNS`]; how many
    /// there are.
    fn listen_on(&mut self, port: u16, want: usize) -> usize {
        let mut have = self.listeners.iter().filter(|(_, p)| *p == port).count();
        while have < want && self.listeners.len() + self.conns.len() < MAX_CONNS {
            let buf = || tcp::SocketBuffer::new(vec![0; TCP_BUFFER]);
            let mut socket = tcp::Socket::new(buf(), buf());
            // A handshake the guest never completes holds no slot for
            // long (lifted once established, see `serve_tcp`).
            socket.set_timeout(Some(smoltcp::time::Duration::from_millis(GUEST_HANDSHAKE_MS)));
            // Listening on a fixed, non-zero port cannot fail.
            let _ = socket.listen(port);
            let h = self.sockets.add(socket);
            self.listeners.push((h, port));
            have += 1;
        }
        have
    }

    /// Before smoltcp sees this round's frames: a listener for each SYN
    /// queued (a burst of connects is not refused for want of the few
    /// listeners kept ready); at the cap, the oldest idle connections are
    /// reclaimed for them; SYNs still without one are refused (smoltcp
    /// resets them), counted and audited once per burst.
    fn make_room_for_syns(&mut self) {
        for (i, port) in POLICED_PORTS.into_iter().enumerate() {
            let want = self.syns[i];
            if want == 0 {
                continue;
            }
            let have = self.listeners.iter().filter(|(_, p)| *p == port).count();
            let free = MAX_CONNS.saturating_sub(self.listeners.len() + self.conns.len());
            let short = want.saturating_sub(have + free);
            if short > 0 {
                self.reclaim_idle(short);
            }
            let have = self.listen_on(port, want);
            let refused = want.saturating_sub(have) as u64;
            if refused > 0 {
                self.counters.refused_for_limit += refused;
                if let Some(event) = self.burst.refused(self.now_ms, refused) {
                    self.log(event);
                }
            }
        }
    }

    /// Closes up to `n` idle connections, least recently active first.
    /// Their sockets go at once (no reset now: the guest's next segment on
    /// one gets it).
    fn reclaim_idle(&mut self, n: usize) {
        let mut idle: Vec<(u64, usize)> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, (h, conn, ..))| {
                let s = self.sockets.get::<tcp::Socket>(*h);
                conn.is_idle() && s.send_queue() == 0 && s.recv_queue() == 0
            })
            .map(|(i, c)| (c.2, i))
            .collect();
        idle.sort_unstable();
        let mut gone: Vec<usize> = idle.into_iter().take(n).map(|(_, i)| i).collect();
        gone.sort_unstable();
        let mut events = Vec::new();
        for i in gone.into_iter().rev() {
            let (h, mut conn, ..) = self.conns.swap_remove(i);
            events.push(Event::Reclaimed(audit::Reclaimed {
                dst: conn.dst.to_string(),
                port: conn.port,
                reason: format!("idle, and {MAX_CONNS} connections were open (the limit)"),
            }));
            events.extend(conn.end_events());
            self.sockets.remove(h);
            self.counters.reclaimed += 1;
        }
        for e in events {
            self.log(e);
        }
    }

    /// Turns listeners that got a connection into connections.
    fn accept(&mut self) {
        let mut i = 0;
        while i < self.listeners.len() {
            let (h, port) = self.listeners[i];
            let socket = self.sockets.get_mut::<tcp::Socket>(h);
            if socket.is_listening() {
                i += 1;
                continue;
            }
            self.listeners.swap_remove(i);
            match socket.local_endpoint().map(|e| e.addr) {
                Some(IpAddress::Ipv4(dst)) => {
                    let name = self.names.name_of(dst).cloned();
                    let conn = Conn::with_slots(port, dst, name, self.connect_slots.clone())
                        .with_termination(self.termination.clone())
                        .with_live(self.live.clone());
                    self.conns.push((h, conn, self.now_ms, self.next_conn_id, Watch::new(self.now_ms)));
                    self.next_conn_id += 1;
                    self.counters.accepted += 1;
                    self.counters.peak_open = self.counters.peak_open.max(self.conns.len());
                }
                _ => {
                    self.sockets.remove(h);
                }
            }
        }
    }

    fn serve_tcp(&mut self) {
        let mut events = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        for (h, conn, last_active, _, watch) in self.conns.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(*h);
            if socket.timeout().is_some() && socket.state() != tcp::State::SynReceived {
                socket.set_timeout(None);
            }
            let before = (conn.bytes_up, conn.bytes_down);
            conn.poll_connect(&self.policy, &self.resolver);
            conn.poll_held(&self.policy, &self.resolver);
            while conn.wants_guest_bytes() && socket.can_recv() {
                match socket.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        *last_active = self.now_ms;
                        conn.from_guest(&buf[..n], &self.policy, &self.resolver);
                    }
                }
            }
            conn.pump_upstream(!socket.may_recv());
            // A response may have freed an in-flight place.
            conn.resume(&self.policy, &self.resolver);
            if let Some(limit) = watch.check(self.now_ms, conn.activity(), socket.send_queue()) {
                events.push(Event::Timeout(audit::Timeout {
                    limit: limit.name().to_string(),
                    limit_ms: limit.limit_ms(),
                    dst: conn.dst.to_string(),
                    port: conn.port,
                    name: self.names.name_of(conn.dst).map(|n| n.to_string()),
                    reason: limit.to_string(),
                }));
                self.counters.timed_out += 1;
                if !conn.time_out(&limit) {
                    socket.abort();
                }
            }
            let out = conn.to_guest();
            while !out.is_empty() && socket.can_send() {
                match socket.send_slice(out) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        watch.written += n as u64;
                        out.drain(..n);
                    }
                }
            }
            if (conn.bytes_up, conn.bytes_down) != before {
                *last_active = self.now_ms;
            }
            events.append(&mut conn.events);
            let abort = conn.is_reset() || self.now_ms.saturating_sub(*last_active) > IDLE_MS;
            if abort {
                socket.abort();
            } else if conn.finished() {
                socket.close();
            }
        }
        for e in events {
            self.log(e);
        }
    }

    fn log(&mut self, event: Event) {
        let mut log = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.record(&event, self.now_ms) {
            eprintln!("netstack: {e}");
        }
        // Fail closed: once the audit trail cannot be written (a full
        // disk), nothing new is allowed that it would have recorded.
        if log.failed() && !self.audit_failed {
            drop(log);
            self.audit_failed = true;
            eprintln!("netstack: the audit log cannot be written; every new request is refused from now on");
            if let Ok(none) = Policy::from_toml("version = 1\n") {
                self.policy = none;
            }
            if let Some(l) = &self.live {
                l.fail();
            }
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
            EthernetProtocol::Ipv4 => self.classify_ipv4(eth.src_addr(), eth.payload()),
            EthernetProtocol::Ipv6 => Verdict::Drop("IPv6".into()),
            other => Verdict::Drop(format!("ethertype {other}")),
        }
    }

    fn classify_ipv4(&self, guest_mac: EthernetAddress, packet: &[u8]) -> Verdict {
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
                // The guest's side of a forwarded connection into it.
                Ok(tcp)
                    if to_gateway
                        && self
                            .forwarder
                            .as_ref()
                            .is_some_and(|f| f.passes(ip.src_addr(), tcp.src_port(), tcp.dst_port())) =>
                {
                    Verdict::Pass
                }
                Ok(tcp) => {
                    let what = format!("TCP to {dst}:{}", tcp.dst_port());
                    match self.reset_for(guest_mac, &ip, &tcp) {
                        Some(reset) => Verdict::Refuse(what, reset),
                        None => Verdict::Drop(what),
                    }
                }
                Err(_) => Verdict::Drop("malformed TCP".into()),
            },
            other => Verdict::Drop(format!("IP protocol {other}")),
        }
    }

    /// The RST+ACK answering a SYN (and only a SYN) from the guest, as if
    /// from the address and port it tried.
    fn reset_for(&self, guest_mac: EthernetAddress, ip: &Ipv4Packet<&[u8]>, tcp: &TcpPacket<&[u8]>) -> Option<Vec<u8>> {
        if !tcp.syn() || tcp.ack() || tcp.rst() {
            return None;
        }
        let (from, to) = (IpAddress::Ipv4(ip.dst_addr()), IpAddress::Ipv4(ip.src_addr()));
        let rst = TcpRepr {
            src_port: tcp.dst_port(),
            dst_port: tcp.src_port(),
            control: TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            // The SYN takes one sequence number, its payload (if any) more.
            ack_number: Some(tcp.seq_number() + 1 + tcp.payload().len()),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip_repr = Ipv4Repr {
            src_addr: ip.dst_addr(),
            dst_addr: ip.src_addr(),
            next_header: IpProtocol::Tcp,
            payload_len: rst.buffer_len(),
            hop_limit: 64,
        };
        let eth_repr = EthernetRepr {
            src_addr: EthernetAddress(self.cfg.gateway_mac),
            dst_addr: guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let caps = ChecksumCapabilities::default();
        let mut frame = vec![0u8; eth_repr.buffer_len() + ip_repr.buffer_len() + rst.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth_repr.emit(&mut eth);
        let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut ipp, &caps);
        rst.emit(&mut TcpPacket::new_unchecked(ipp.payload_mut()), &from, &to, &caps);
        Some(frame)
    }

    fn serve_dns(&mut self) {
        let mut replies: Vec<(Vec<u8>, smoltcp::wire::IpEndpoint)> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            while let Ok((data, meta)) = socket.recv() {
                let query = match dns::parse_query(data) {
                    Ok(q) => q,
                    Err(e) => {
                        events.push(Event::Dns(Dns { error: Some(e.to_string()), ..Dns::default() }));
                        continue;
                    }
                };
                let (reply, event) = answer(&query, &self.policy, self.live.as_deref(), &mut self.names);
                replies.push((reply, meta.endpoint));
                events.push(Event::Dns(event));
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

/// The destination port of a TCP SYN (without ACK) in an Ethernet frame.
fn syn_port(frame: &[u8]) -> Option<u16> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
}

/// The answer to one query and its audit line.
fn answer(query: &dns::Query, policy: &Policy, live: Option<&Live>, names: &mut NameTable) -> (Vec<u8>, Dns) {
    let Some(host) = query.host() else {
        let event = Dns {
            name: Some(query.raw_name.clone()),
            decision: Some(Decision::Deny),
            reason: Some("not a host name (IP literal or malformed)".into()),
            ..Dns::default()
        };
        return (dns::answer_empty(query, dns::RCODE_REFUSED), event);
    };
    let decision = match live {
        Some(l) => l.judge_resolvable(policy, &host),
        None => live::judge_resolvable(policy, &LiveRules::default(), &host, 0),
    };
    let rule = decision.rule.clone();
    if !decision.allowed() {
        let event =
            Dns { name: Some(host.to_string()), decision: Some(Decision::Deny), rule: Some(rule), ..Dns::default() };
        return (dns::answer_empty(query, dns::RCODE_REFUSED), event);
    }
    let reply = match (query.qtype, names.bind(&host)) {
        (dns::TYPE_A, Some(addr)) => {
            let event = Dns {
                name: Some(host.to_string()),
                decision: Some(Decision::Allow),
                rule: Some(rule),
                answer: Some(addr.to_string()),
                ..Dns::default()
            };
            return (dns::answer_a(query, addr, DNS_TTL), event);
        }
        (dns::TYPE_A, None) => dns::answer_empty(query, dns::RCODE_SERVFAIL),
        // The name exists, but only over IPv4.
        _ => dns::answer_empty(query, 0),
    };
    let event = Dns {
        name: Some(host.to_string()),
        decision: Some(Decision::Allow),
        rule: Some(rule),
        qtype: Some(query.qtype),
        ..Dns::default()
    };
    (reply, event)
}

#[cfg(test)]
mod resilience;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{pump, Guest, GUEST_IP};
    use audit::AuditLog;
    use smoltcp::socket::icmp;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};

    type Net = NetStack<Vec<u8>>;

    fn net(policy: &str) -> Net {
        NetStack::new(
            Config::default(),
            Policy::from_toml(policy).unwrap(),
            Resolver::default(),
            AuditLog::new(Vec::new()).shared(),
        )
    }

    fn audit(net: &Net) -> String {
        String::from_utf8(net.audit.lock().unwrap().get_ref().clone()).unwrap()
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
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(1500), 0);
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
        assert_eq!(audit::verify(log.as_bytes()).unwrap().lines, 4);
    }

    #[test]
    fn the_gateway_answers_ping() {
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(1500), 0);
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
        let (mut net, mut guest, mut now) = (net(POLICY), Guest::new(1500), 0);
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

    // ---- TCP: real upstream servers on 127.0.0.1, started by the tests ----

    #[test]
    fn an_unreachable_upstream_is_a_502_and_other_connections_go_on() {
        let (up, count) = http_upstream();
        // A loopback port nobody listens on (tests only talk to loopback):
        // the connect thread reports the refusal, the guest gets a 502.
        let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let policy = "version = 1\n[[rule]]\nallow = \"*.example.com\"\n";
        let mut net = net_with(policy, &[("api.example.com", 80, up), ("dead.example.com", 80, dead)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let live = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let gone = a_record(&resolve(&mut net, &mut guest, "dead.example.com", &mut now));
        let (got, _) = exchange(
            &mut net,
            &mut guest,
            &mut now,
            (gone, 80),
            b"GET / HTTP/1.1\r\nHost: dead.example.com\r\n\r\n",
            |g| contains(g, "unreachable"),
        );
        assert!(contains(&got, "502 Bad Gateway"), "{}", String::from_utf8_lossy(&got));
        let (got, _) = exchange(
            &mut net,
            &mut guest,
            &mut now,
            (live, 80),
            b"GET /ok HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            |g| contains(g, "echo GET /ok"),
        );
        assert!(contains(&got, "echo GET /ok 0"));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An HTTP/1.1 upstream: answers "echo METHOD PATH BODYLEN", or 2 MiB
    /// for /big; keeps connections alive. Counts requests.
    fn http_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut w = stream;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let (method, path) =
                            (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if h == "\r\n" || h.is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        seen.fetch_add(1, Ordering::SeqCst);
                        let reply = if path == "/big" {
                            vec![b'x'; 2 << 20]
                        } else {
                            format!("echo {method} {path} {len}").into_bytes()
                        };
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", reply.len());
                        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(&reply)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    /// A TCP upstream that echoes everything back; counts connections.
    fn echo_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                seen.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    fn net_with(policy: &str, routes: &[(&str, u16, SocketAddr)]) -> Net {
        let mut resolver = Resolver::default();
        for (name, port, addr) in routes {
            resolver.overrides.insert((HostName::parse(name).unwrap(), *port), *addr);
        }
        NetStack::new(
            Config::default(),
            Policy::from_toml(policy).unwrap(),
            resolver,
            AuditLog::new(Vec::new()).shared(),
        )
    }

    fn a_record(reply: &[u8]) -> Ipv4Addr {
        let n = reply.len();
        Ipv4Addr::new(reply[n - 4], reply[n - 3], reply[n - 2], reply[n - 1])
    }

    /// Connects from the guest, sends `data`, and collects what comes back
    /// until `done` says so, the connection ends, or 10 s pass.
    fn exchange(
        net: &mut Net,
        guest: &mut Guest,
        now: &mut u64,
        to: (Ipv4Addr, u16),
        data: &[u8],
        done: impl Fn(&[u8]) -> bool,
    ) -> (Vec<u8>, tcp::State) {
        exchange_for(net, guest, now, to, data, done, std::time::Duration::from_secs(10))
    }

    /// As `exchange`, waiting at most `limit` (for connections expected to
    /// get nothing).
    fn exchange_for(
        net: &mut Net,
        guest: &mut Guest,
        now: &mut u64,
        to: (Ipv4Addr, u16),
        data: &[u8],
        done: impl Fn(&[u8]) -> bool,
        limit: std::time::Duration,
    ) -> (Vec<u8>, tcp::State) {
        let buf = || tcp::SocketBuffer::new(vec![0; 256 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        static PORT: AtomicUsize = AtomicUsize::new(49152);
        let local = PORT.fetch_add(1, Ordering::SeqCst) as u16;
        socket.connect(guest.iface.context(), to, local).unwrap();
        let h = guest.sockets.add(socket);
        let mut sent = 0;
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + limit;
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            pump(net, guest, now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap_or(0);
            }
            while s.can_recv() {
                let n = s.recv_slice(&mut rx).unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&rx[..n]);
            }
            let state = s.state();
            if done(&got) || (state == tcp::State::Closed && sent > 0) || std::time::Instant::now() > deadline {
                if state != tcp::State::Closed {
                    s.close();
                    pump(net, guest, now);
                }
                return (got, state);
            }
            if matches!(state, tcp::State::CloseWait) {
                s.close();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    const HTTP_POLICY: &str = "version = 1\n[[rule]]\nallow = \"*.example.com\"\n[[rule]]\ndeny = \"api.example.com\"\nmethods = [\"DELETE\"]\n";

    fn contains(hay: &[u8], needle: &str) -> bool {
        String::from_utf8_lossy(hay).contains(needle)
    }

    #[test]
    fn http_requests_are_checked_one_by_one_and_forwarded() {
        let (up, count) = http_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        // Keep-alive: GET, then a POST with a body, then a denied DELETE
        // pipelined behind them.
        let reqs = b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n\
POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\nhello\
DELETE /c HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), reqs, |g| {
            contains(g, "403 Forbidden") && contains(g, "\n\n") || contains(g, "rule 2")
        });
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("echo GET /a 0") && text.contains("echo POST /b 5"), "{text}");
        assert!(text.contains("403 Forbidden") && text.contains("denied by rule 2: deny api.example.com"), "{text}");
        assert_eq!(count.load(Ordering::SeqCst), 2, "the denied request never went upstream");
        let log = audit(&net);
        assert!(log.contains("\"method\":\"DELETE\"") && log.contains("\"decision\":\"deny\""), "{log}");
        let post = log.lines().find(|l| l.contains("\"method\":\"POST\"")).expect("POST logged");
        let post_request = "POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\nhello";
        let post_response = "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\necho POST /b 5";
        assert!(post.contains("\"status\":200"), "{post}");
        assert!(post.contains(&format!("\"bytes_up\":{},", post_request.len())), "{post}");
        assert!(post.contains(&format!("\"bytes_down\":{},", post_response.len())), "{post}");
        assert!(audit::verify(log.as_bytes()).is_ok());
    }

    #[test]
    fn large_bodies_stream_both_ways() {
        let (up, count) = http_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let mut req =
            format!("POST /up HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: {}\r\n\r\n", 1 << 20).into_bytes();
        req.extend(vec![b'u'; 1 << 20]);
        req.extend_from_slice(b"GET /big HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n");
        let big = 2usize << 20;
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), &req, |g| g.len() >= big + 60);
        let text = String::from_utf8_lossy(&got[..got.len().min(200)]).to_string();
        assert!(text.contains("echo POST /up 1048576"), "{text}");
        assert!(got.len() > big && got.ends_with(b"xxxx"), "got {} bytes", got.len());
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_host_other_than_the_resolved_name_is_refused_before_any_upstream() {
        let (up, count) = http_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up), ("other.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        for head in [
            "GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let (got, _) =
                exchange(&mut net, &mut guest, &mut now, (addr, 80), head.as_bytes(), |g| contains(g, "refused"));
            assert!(contains(&got, "403 Forbidden"), "{head:?}: {}", String::from_utf8_lossy(&got));
        }
        let mut huge = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX: ".to_vec();
        huge.extend(vec![b'a'; 100 * 1024]);
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), &huge, |g| contains(g, "refused"));
        assert!(contains(&got, "larger than"), "{}", String::from_utf8_lossy(&got));
        assert_eq!(count.load(Ordering::SeqCst), 0, "no upstream request for a refused one");
    }

    #[test]
    fn tls_is_spliced_only_for_the_resolved_allowed_sni() {
        let (up, count) = echo_upstream();
        let policy = "version = 1\n[[rule]]\nallow = \"*.example.com\"\n";
        let mut net = net_with(policy, &[("api.example.com", 443, up), ("www.example.com", 443, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let mut hello = crate::tls::tests::hello(&[crate::tls::tests::sni_ext(&["api.example.com"])]);
        // TLS 1.2: the client's ChangeCipherSpec, then encrypted bytes.
        hello.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        hello.extend_from_slice(b"opaque application data");
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 443), &hello, |g| g.len() >= hello.len());
        assert_eq!(got, hello, "bytes pass through untouched");
        assert_eq!(count.load(Ordering::SeqCst), 1);

        let wrong = crate::tls::tests::hello(&[crate::tls::tests::sni_ext(&["www.example.com"])]);
        let missing = crate::tls::tests::hello(&[]);
        for (what, bytes) in
            [("wrong SNI", wrong), ("no SNI", missing), ("not TLS", b"GET / HTTP/1.1\r\n\r\n".to_vec())]
        {
            let (got, state) = exchange(&mut net, &mut guest, &mut now, (addr, 443), &bytes, |_| false);
            assert!(got.is_empty() && state == tcp::State::Closed, "{what}: reset");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "no upstream for refused handshakes");
        let log = audit(&net);
        assert!(log.contains("SNI is not the name") && log.contains("no SNI"), "{log}");
    }

    #[test]
    fn a_spliced_connection_is_reset_when_a_later_hello_names_another_server() {
        use crate::tls::tests::{hello, sni_ext};
        let (up, count) = echo_upstream();
        let policy = "version = 1\nhttps = \"passthrough\"\n[[rule]]\nallow = \"*.example.com\"\n";
        let mut net = net_with(policy, &[("api.example.com", 443, up), ("www.example.com", 443, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let versions = [0u8, 43, 0, 3, 2, 3, 4]; // supported_versions: TLS 1.3
        let first = [hello(&[sni_ext(&["api.example.com"]), versions.to_vec()]), vec![20, 3, 3, 0, 1, 1]].concat();
        let retry = hello(&[sni_ext(&["www.example.com"]), versions.to_vec()]);
        // In one go: refused before any upstream connection.
        let both = [first.clone(), retry.clone()].concat();
        let (got, state) = exchange(&mut net, &mut guest, &mut now, (addr, 443), &both, |_| false);
        assert!(got.is_empty() && state == tcp::State::Closed, "reset");
        assert_eq!(count.load(Ordering::SeqCst), 0);
        // Spliced first, the retried hello later: reset, never forwarded.
        let buf = || tcp::SocketBuffer::new(vec![0; 64 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 443), 40123).unwrap();
        let h = guest.sockets.add(socket);
        let mut got = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        let (mut sent_first, mut sent_retry) = (false, false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() && !sent_first {
                assert_eq!(s.send_slice(&first).unwrap(), first.len());
                sent_first = true;
            }
            while s.can_recv() {
                let n = s.recv_slice(&mut rx).unwrap_or(0);
                got.extend_from_slice(&rx[..n]);
            }
            if got.len() >= first.len() && !sent_retry {
                assert_eq!(got, first, "the first flight is spliced");
                assert_eq!(s.send_slice(&retry).unwrap(), retry.len());
                sent_retry = true;
            }
            if s.state() == tcp::State::Closed || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(sent_retry);
        assert_eq!(guest.sockets.get_mut::<tcp::Socket>(h).state(), tcp::State::Closed, "reset");
        assert_eq!(got, first, "the retried hello never reached the upstream (nothing more echoed)");
        let log = audit(&net);
        assert!(log.contains("later handshake record refused") && log.contains("names another server"), "{log}");
    }

    #[test]
    fn other_ports_and_unresolved_addresses_are_refused_with_a_reset() {
        let (up, count) = echo_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 22, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        for to in [(addr, 22), (addr, 8080), (Ipv4Addr::new(198, 18, 9, 9), 80), (Ipv4Addr::new(127, 0, 0, 1), 80)] {
            let quick = std::time::Duration::from_millis(300);
            let (got, state) = exchange_for(&mut net, &mut guest, &mut now, to, b"x", |_| false, quick);
            // Refused at once with a reset, not left to time out.
            assert!(got.is_empty() && state == tcp::State::Closed, "{to:?}: {state}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert!(audit(&net).contains("\"reset\":true"));
        let log = audit(&net);
        for what in [
            format!("TCP to {addr}:22"),
            format!("TCP to {addr}:8080"),
            "TCP to 198.18.9.9:80".into(),
            "TCP to 127.0.0.1:80".into(),
        ] {
            assert!(log.contains(&what), "{what} not logged");
        }
        assert_eq!(net.connections(), 0);
    }

    /// A real TLS handshake and request, end to end through the splice:
    /// a rustls client in the guest, a rustls server upstream on loopback
    /// with a certificate made for this test.
    #[test]
    fn a_real_tls_session_passes_through_the_splice() {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use std::io::Write as _;

        let key = rcgen::generate_simple_self_signed(vec!["api.example.com".to_string()]).unwrap();
        let cert = key.cert.der().clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der())),
                )
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(server_cfg).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /secret HTTP/1.1"));
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello secure").unwrap();
            tls.flush().unwrap();
        });

        let policy = "version = 1\n[[rule]]\nallow = \"api.example.com\"\nports = [443]\n";
        let mut net = net_with(policy, &[("api.example.com", 443, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let mut client =
            rustls::ClientConnection::new(client_cfg, ServerName::try_from("api.example.com").unwrap()).unwrap();
        client.writer().write_all(b"GET /secret HTTP/1.1\r\nHost: api.example.com\r\n\r\n").unwrap();

        let buf = || tcp::SocketBuffer::new(vec![0; 64 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 443), 40443).unwrap();
        let h = guest.sockets.add(socket);
        let mut outgoing: Vec<u8> = Vec::new();
        let mut plain = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !String::from_utf8_lossy(&plain).contains("hello secure") {
            assert!(std::time::Instant::now() < deadline, "no TLS response; audit: {}", audit(&net));
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            while client.wants_write() {
                client.write_tls(&mut outgoing).unwrap();
            }
            if s.can_send() && !outgoing.is_empty() {
                let n = s.send_slice(&outgoing).unwrap();
                outgoing.drain(..n);
            }
            let mut rx = vec![0u8; 64 * 1024];
            while s.can_recv() {
                let n = s.recv_slice(&mut rx).unwrap();
                let mut data = &rx[..n];
                while !data.is_empty() {
                    client.read_tls(&mut data).unwrap();
                    client.process_new_packets().unwrap();
                }
            }
            let mut chunk = [0u8; 4096];
            while let Ok(n) = client.reader().read(&mut chunk) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&chunk[..n]);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(String::from_utf8_lossy(&plain).starts_with("HTTP/1.1 200 OK"));
        let log = audit(&net);
        assert!(
            log.contains("\"event\":\"tls\"")
                && log.contains("\"sni\":\"api.example.com\"")
                && log.contains("\"decision\":\"allow\"")
        );
    }

    // ---- Boundaries: addresses, paths, framing, bounds ----

    #[test]
    fn addresses_are_classified() {
        use AddrClass::*;
        for (addr, want) in [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("10.0.0.1", Private),
            ("10.255.255.255", Private),
            ("11.0.0.1", Global),
            ("100.63.255.255", Global),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("100.128.0.1", Global),
            ("127.0.0.1", Loopback),
            ("127.1.2.3", Loopback),
            ("169.254.169.254", LinkLocal),
            ("169.255.0.1", Global),
            ("172.15.255.255", Global),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Global),
            ("192.0.0.8", Reserved),
            ("192.0.2.1", Documentation),
            ("192.88.99.1", Reserved),
            ("192.167.255.255", Global),
            ("192.168.1.1", Private),
            ("192.169.0.1", Global),
            ("198.17.255.255", Global),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("198.20.0.1", Global),
            ("198.51.100.1", Documentation),
            ("203.0.113.1", Documentation),
            ("223.255.255.255", Global),
            ("224.0.0.1", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("255.255.255.255", Broadcast),
            ("1.1.1.1", Global),
            ("93.184.216.34", Global),
            ("::", Unspecified),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:100.64.0.1", SharedCgnat),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:1.1.1.1", Global),
            ("::127.0.0.1", Reserved),
            ("::1.1.1.1", Reserved),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::169.254.169.254", LinkLocal),
            ("64:ff9b::1.1.1.1", Global),
            ("64:ff9b:1::1", Reserved),
            ("100::1", Reserved),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", UniqueLocal),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("3fff:1000::1", Global),
            ("2001:2::1", Benchmarking),
            ("2001::1", Reserved),
            ("2001:10::1", Reserved),
            ("2002:a00:1::1", Reserved),
            ("5f00::1", Reserved),
            ("4000::1", Reserved),
            ("1fff:ffff::1", Reserved),
            ("2606:4700:4700::1111", Global),
            ("2001:4860:4860::8888", Global),
            ("2a00:1450::1", Global),
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(classify_ip(ip), want, "{addr}");
            assert_eq!(is_global_unicast(ip), want == Global, "{addr}");
        }
    }

    fn net_resolving(policy: &str, resolver: Arc<dyn Resolve>) -> Net {
        NetStack::with_resolver(
            Config::default(),
            Policy::from_toml(policy).unwrap(),
            resolver,
            AuditLog::new(Vec::new()).shared(),
        )
    }

    #[test]
    fn resolved_non_global_addresses_are_refused_unless_a_rule_names_them() {
        use crate::conn::test_support::TestResolver;
        use crate::conn::Lookup;
        // The "resolver" answers with a loopback server: only an override
        // or a rule's `addresses` may reach it.
        let (up, count) = http_upstream();
        let held = TestResolver::new(Lookup::Resolved(vec![up]), true);
        let policy = "version = 1\n[[rule]]\nallow = \"api.example.com\"\n";
        let mut net = net_resolving(policy, held.clone());
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let get = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), get, |g| contains(g, "\n\n"));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway"), "{text}");
        assert!(text.contains(&format!("{}: loopback", up.ip())) && text.contains("no global unicast"), "{text}");
        // TLS: a reset.
        let hello = crate::tls::tests::hello(&[crate::tls::tests::sni_ext(&["api.example.com"])]);
        let (got, state) = exchange(&mut net, &mut guest, &mut now, (addr, 443), &hello, |_| false);
        assert!(got.is_empty() && state == tcp::State::Closed);
        assert_eq!(count.load(Ordering::SeqCst), 0, "the loopback server was never reached");
        let log = audit(&net);
        let refusals: Vec<&str> = log.lines().filter(|l| l.contains("\"event\":\"upstream\"")).collect();
        assert_eq!(refusals.len(), 2, "{log}");
        for line in refusals {
            assert!(line.contains("\"decision\":\"deny\"") && line.contains("\"class\":\"loopback\""), "{line}");
        }
        assert_eq!(held.lookups.load(Ordering::SeqCst), 2, "one lookup per connection");
        assert_eq!(held.resolves.load(Ordering::SeqCst), 0);

        // A rule naming the address permits it (and only for its ports).
        let named =
            format!("{policy}[[rule]]\nallow = \"api.example.com\"\nports = [80]\naddresses = [\"{}\"]\n", up.ip());
        let mut net = net_resolving(&named, TestResolver::new(Lookup::Resolved(vec![up]), true));
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), get, |g| contains(g, "echo GET / 0"));
        assert!(contains(&got, "echo GET / 0"), "{}", String::from_utf8_lossy(&got));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let (got, state) = exchange(&mut net, &mut guest, &mut now, (addr, 443), &hello, |_| false);
        assert!(got.is_empty() && state == tcp::State::Closed, "port 443 is not in the rule");
        pump(&mut net, &mut guest, &mut now);
        assert!(audit(&net).contains(&format!("\"upstream\":\"{up}\"")), "the address connected to is logged");
    }

    #[test]
    fn the_host_resolver_is_asked_for_absolute_names_only() {
        let name = HostName::parse("api").unwrap();
        let mut asked = Vec::new();
        let answer = |asked: &mut Vec<String>, hosts: Option<&str>| {
            system_lookup(&name, 443, hosts, |n, port| {
                asked.push(n.to_string());
                Ok(vec![SocketAddr::new("2001:4860::1".parse().unwrap(), port), "8.8.8.8:443".parse().unwrap()])
            })
        };
        let got = answer(&mut asked, None);
        assert_eq!(asked, vec!["api.".to_string()], "a trailing dot: no search domain is tried");
        let want: Vec<SocketAddr> = vec!["8.8.8.8:443".parse().unwrap(), "[2001:4860::1]:443".parse().unwrap()];
        assert_eq!(got, Lookup::Resolved(want), "IPv4 first");
        // A hosts file's entries come first and the resolver is not asked;
        // names are compared whole (no `api.corp.example` for `api`).
        let hosts = "# comment\n127.0.0.1 localhost\n10.1.2.3 api.corp.example\n10.0.0.7\tAPI. other # api\n::1 api\n";
        asked.clear();
        let got = answer(&mut asked, Some(hosts));
        assert!(asked.is_empty(), "{asked:?}");
        assert_eq!(got, Lookup::Resolved(vec!["10.0.0.7:443".parse().unwrap(), "[::1]:443".parse().unwrap()]));
        let missing =
            system_lookup(&name, 80, None, |_, _| Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no")));
        assert_eq!(missing, Lookup::NotFound);
        // This host's real hosts file and resolver: `localhost` still
        // resolves (from the file: glibc does not find `localhost.` there).
        let localhost =
            Resolver { system: true, ..Resolver::default() }.lookup(&HostName::parse("localhost").unwrap(), 80);
        let Lookup::Resolved(found) = localhost else { panic!("{localhost:?}") };
        assert!(!found.is_empty() && found.iter().all(|a| a.ip().is_loopback()), "{found:?}");
    }

    #[test]
    fn the_host_resolver_never_connects_to_loopback() {
        // `localhost` through the host's real resolver: loopback only.
        let policy = "version = 1\n[[rule]]\nallow = \"localhost\"\n";
        let resolver = Resolver { system: true, ..Resolver::default() };
        let mut net = NetStack::new(
            Config::default(),
            Policy::from_toml(policy).unwrap(),
            resolver,
            AuditLog::new(Vec::new()).shared(),
        );
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "localhost", &mut now));
        let get = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), get, |g| contains(g, "\n\n"));
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("502") && text.contains("localhost resolves to no global unicast address"), "{text}");
        assert!(audit(&net).contains("\"class\":\"loopback\""));
    }

    #[test]
    fn path_rules_see_the_normalised_path_and_refuse_ambiguous_targets() {
        let (up, count) = http_upstream();
        let policy =
            "version = 1\n[[rule]]\nallow = \"files.example.com\"\nmethods = [\"GET\"]\npath_prefix = \"/public/\"\n";
        let mut net = net_with(policy, &[("files.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "files.example.com", &mut now));
        let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: files.example.com\r\n\r\n").into_bytes();
        for (target, reason) in [
            ("/public/../private", "default deny"),
            ("/public/%2e%2E/private", "default deny"),
            ("/public//..//private", "default deny"),
            ("/public/%2F..%2Fprivate", "encoded '/'"),
            ("/public/..%5Cprivate", "encoded backslash"),
            ("/public/..\\private", "backslash"),
            ("/public/%00", "control character"),
            ("/public/%zz", "malformed percent escape"),
            ("/public/../../private", "above the root"),
            ("/public/..;/private", "path parameters"),
            ("/public;x/../private", "path parameters"),
            ("/public/%252e%252e/private", "double-encoded"),
        ] {
            let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), &get(target), |g| contains(g, "\n\n"));
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 403") && text.contains(reason), "{target}: {text}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 0, "nothing refused went upstream");
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), &get("/public/./a//b?x=/../"), |g| {
            contains(g, "echo GET")
        });
        assert!(contains(&got, "echo GET /public/./a//b?x=/../ 0"), "forwarded as sent");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let log = audit(&net);
        assert!(log.contains("\"normalized_path\":\"/public/a/b\""), "{log}");
        assert!(log.contains("\"path\":\"/public/../private\"") && log.contains("\"normalized_path\":\"/private\""));
    }

    #[test]
    fn framings_upstreams_could_misread_never_reach_them() {
        let (up, count) = http_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let h = "Host: api.example.com\r\n";
        for (req, reason) in [
            (format!("GET / HTTP/1.1\r\n{h}Content-Length: 5\r\n\r\nhello"), "body on a GET"),
            (format!("HEAD / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "body on a GET"),
            (format!("POST / HTTP/1.0\r\n{h}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "HTTP/1.0"),
            (format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"), "single 'chunked'"),
            (format!("POST / HTTP/1.1\r\n{h}Transfer_Encoding: chunked\r\nContent-Length: 1\r\n\r\nx"), "'_'"),
        ] {
            let (got, _) =
                exchange(&mut net, &mut guest, &mut now, (addr, 80), req.as_bytes(), |g| contains(g, "\n\n"));
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 403") && text.contains(reason), "{req:?}: {text}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 0);
        // A chunked body goes up as it is checked: a bad extension or a
        // framing trailer stops it before its bytes leave. (This upstream
        // does not know chunked: a forwarded chunk line would be counted as
        // another request.)
        for (body, reason) in [
            ("3;a=\"x\"\r\nabc\r\n0\r\n\r\n", "chunk extension"),
            ("3\r\nabc\r\n0\r\nContent-Length: 9\r\n\r\n", "trailer"),
        ] {
            let before = count.load(Ordering::SeqCst);
            let req = format!("POST /c HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n{body}");
            let (got, _) =
                exchange(&mut net, &mut guest, &mut now, (addr, 80), req.as_bytes(), |g| contains(g, "refused"));
            let text = String::from_utf8_lossy(&got);
            assert!(text.contains("echo POST /c 0") && text.contains("403") && text.contains(reason), "{text}");
            assert_eq!(count.load(Ordering::SeqCst), before + 1, "only the head went upstream: {text}");
        }
    }

    /// An upstream that reads and counts requests as they come but answers
    /// them only once `open` is set (one response per request, in order).
    fn gated_upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (count, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (seen, gate) = (count.clone(), open.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (seen, gate) = (seen.clone(), gate.clone());
                let (tx, rx) = std::sync::mpsc::channel::<String>();
                let mut w = stream.try_clone().unwrap();
                std::thread::spawn(move || {
                    for path in rx {
                        while !gate.load(Ordering::SeqCst) {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        let body = format!("done {path}");
                        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        if w.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        seen.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(path);
                    }
                });
            }
        });
        (addr, count, open)
    }

    #[test]
    fn pipelined_requests_wait_in_the_guest_socket_while_responses_are_due() {
        use crate::conn::MAX_IN_FLIGHT;
        let (up, count, open) = gated_upstream();
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let req = |i: usize, pad: usize| {
            format!("GET /{i} HTTP/1.1\r\nHost: api.example.com\r\nX-Pad: {}\r\n\r\n", "p".repeat(pad)).into_bytes()
        };
        // First more pipelined requests than may be in flight, then (once
        // netstack has stopped reading) 40 KiB more.
        let first: Vec<u8> = (0..20).flat_map(|i| req(i, 1)).collect();
        let second: Vec<u8> = (20..60).flat_map(|i| req(i, 1000)).collect();
        let total = 60;
        let buf = || tcp::SocketBuffer::new(vec![0; 256 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 80), 41080).unwrap();
        let h = guest.sockets.add(socket);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let send_all = |net: &mut Net, guest: &mut Guest, now: &mut u64, data: &[u8], until: &dyn Fn(&Net) -> bool| {
            let mut sent = 0;
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "sent {sent}, upstream saw {}",
                    count.load(Ordering::SeqCst)
                );
                pump(net, guest, now);
                let s = guest.sockets.get_mut::<tcp::Socket>(h);
                if s.can_send() && sent < data.len() {
                    sent += s.send_slice(&data[sent..]).unwrap_or(0);
                }
                if sent == data.len() && s.send_queue() == 0 && until(net) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        send_all(&mut net, &mut guest, &mut now, &first, &|net| net.conns[0].1.in_flight() == MAX_IN_FLIGHT);
        send_all(&mut net, &mut guest, &mut now, &second, &|_| true);
        // The upstream does not answer: nothing beyond the limit goes up,
        // and what came since waits, unread, in netstack's socket.
        for _ in 0..100 {
            pump(&mut net, &mut guest, &mut now);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), MAX_IN_FLIGHT);
        let (sh, conn, ..) = &net.conns[0];
        assert_eq!(conn.in_flight(), MAX_IN_FLIGHT);
        assert!(!conn.wants_guest_bytes());
        let unread = net.sockets.get::<tcp::Socket>(*sh).recv_queue();
        assert_eq!(unread, second.len(), "backpressure: the guest's later bytes wait in the socket");
        // Answers free places: every request goes through, in order.
        open.store(true, Ordering::SeqCst);
        let mut got = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        let want = format!("done /{}", total - 1);
        while !contains(&got, &want) {
            assert!(std::time::Instant::now() < deadline, "{}", got.len());
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            while let Ok(n @ 1..) = s.recv_slice(&mut rx) {
                got.extend_from_slice(&rx[..n]);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), total);
        let text = String::from_utf8_lossy(&got);
        let bodies: Vec<&str> =
            text.split("HTTP/1.1 200 OK").skip(1).filter_map(|r| r.split("\r\n\r\n").nth(1)).collect();
        let want: Vec<String> = (0..total).map(|i| format!("done /{i}")).collect();
        assert_eq!(bodies, want);
    }

    #[test]
    fn a_closed_guest_connection_cancels_its_pending_connect() {
        use crate::conn::test_support::TestResolver;
        use crate::conn::Lookup;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let held = TestResolver::new(Lookup::Override(listener.local_addr().unwrap()), false);
        let mut net = net_resolving(HTTP_POLICY, held.clone());
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let buf = || tcp::SocketBuffer::new(vec![0; 4096]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 80), 41081).unwrap();
        let h = guest.sockets.add(socket);
        let mut sent = false;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while held.lookups.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline);
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() && !sent {
                s.send_slice(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n").unwrap();
                sent = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(net.connect_threads(), 1);
        guest.sockets.get_mut::<tcp::Socket>(h).abort();
        while net.connections() > 0 {
            assert!(std::time::Instant::now() < deadline);
            pump(&mut net, &mut guest, &mut now);
        }
        held.release();
        while net.connect_threads() > 0 {
            assert!(std::time::Instant::now() < deadline, "the connect thread must end");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(listener.accept().is_err(), "no upstream connection after the guest left");
    }

    #[test]
    fn responses_that_cannot_be_delimited_end_the_connection() {
        // The upstream answers the first request with something that is not
        // HTTP, then reads on: a second request must not reach it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let extra = Arc::new(AtomicUsize::new(0));
        let later = extra.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            s.write_all(b"SSH-2.0-not-http\r\n\r\n").unwrap();
            let mut rest = [0u8; 1024];
            while let Ok(n @ 1..) = s.read(&mut rest) {
                later.fetch_add(n, Ordering::SeqCst);
            }
        });
        let mut net = net_with(HTTP_POLICY, &[("api.example.com", 80, up)]);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.example.com", &mut now));
        let buf = || tcp::SocketBuffer::new(vec![0; 4096]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (addr, 80), 41082).unwrap();
        let h = guest.sockets.add(socket);
        let mut step = 0;
        let mut got = Vec::new();
        let mut rx = [0u8; 4096];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            assert!(std::time::Instant::now() < deadline, "step {step}: {}", String::from_utf8_lossy(&got));
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            while let Ok(n @ 1..) = s.recv_slice(&mut rx) {
                got.extend_from_slice(&rx[..n]);
            }
            if step == 0 && s.can_send() {
                s.send_slice(b"GET /1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n").unwrap();
                step = 1;
            } else if step == 1 && contains(&got, "SSH-2.0") && s.can_send() {
                s.send_slice(b"GET /2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n").unwrap();
                step = 2;
            } else if step == 2 && !s.may_recv() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(extra.load(Ordering::SeqCst), 0, "the second request never went upstream");
        assert!(audit(&net).contains("could not be delimited"));
    }

    #[test]
    fn an_event_loop_learns_when_to_run_the_stack() {
        let (addr, _) = http_upstream();
        let mut net = net_with("version = 1\n[[rule]]\nallow = \"up.example.com\"\n", &[("up.example.com", 80, addr)]);
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        net.set_waker(Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        let mut guest = Guest::new(1500);
        let mut now = 0;
        let ip = a_record(&resolve(&mut net, &mut guest, "up.example.com", &mut now));
        let buf = || tcp::SocketBuffer::new(vec![0; 64 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        socket.connect(guest.iface.context(), (ip, 80), 49000).unwrap();
        let h = guest.sockets.add(socket);
        pump(&mut net, &mut guest, &mut now);
        let request = b"GET /x HTTP/1.1\r\nHost: up.example.com\r\n\r\n";
        guest.sockets.get_mut::<tcp::Socket>(h).send_slice(request).unwrap();
        pump(&mut net, &mut guest, &mut now);
        // The connect runs on its thread; its end is signalled, not polled for.
        let started = std::time::Instant::now();
        while wakes.load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "the connect thread never woke us");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // (Whether the round before already took the connect's result
        // depends on the thread's timing: only what follows is checked.)
        let mut interests = Vec::new();
        pump(&mut net, &mut guest, &mut now);
        net.upstream_interests(&mut interests);
        assert_eq!(interests.len(), 1);
        let (id, _, read, write) = interests[0];
        assert!(read && !write, "the request went out; the response is awaited");
        // The response arrives on that socket; each round then moves it on.
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("echo GET /x 0") {
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "no response");
            std::thread::sleep(std::time::Duration::from_millis(1));
            pump(&mut net, &mut guest, &mut now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            let mut b = [0u8; 4096];
            while let Ok(n @ 1..) = s.recv_slice(&mut b) {
                got.extend_from_slice(&b[..n]);
            }
        }
        // Quiet: nothing due now (no busy polling), the idle limit ahead.
        let at = net.poll_at(now).expect("an open connection's idle limit");
        assert!(at > now && at <= now + IDLE_MS + 1, "{at} vs {now}");
        interests.clear();
        net.upstream_interests(&mut interests);
        assert_eq!(interests.iter().map(|i| i.0).collect::<Vec<_>>(), vec![id], "the same id while it lives");
    }

    // ---- held requests (crate::live) ----

    use crate::live::{Answer, Grant, Live, LiveRules};

    const ASK: &str = "version = 1\napproval = \"ask\"\n[[rule]]\ndeny = \"bad.example.com\"\n";

    fn held_net(routes: &[(&str, u16, SocketAddr)], hold_ms: u64) -> (Net, Arc<Live>) {
        let live = Live::with_hold("sb", LiveRules::default(), hold_ms);
        (net_with(ASK, routes).with_live(live.clone()), live)
    }

    /// A guest connection to `to` with `data` sent.
    fn open_and_send(
        net: &mut Net,
        guest: &mut Guest,
        now: &mut u64,
        to: (Ipv4Addr, u16),
        data: &[u8],
    ) -> SocketHandle {
        let buf = || tcp::SocketBuffer::new(vec![0; 64 * 1024]);
        let mut socket = tcp::Socket::new(buf(), buf());
        static PORT: AtomicUsize = AtomicUsize::new(40100);
        let local = PORT.fetch_add(1, Ordering::SeqCst) as u16;
        socket.connect(guest.iface.context(), to, local).unwrap();
        let h = guest.sockets.add(socket);
        let mut sent = 0;
        for _ in 0..1000 {
            pump(net, guest, now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap_or(0);
            }
            if sent == data.len() {
                pump(net, guest, now);
                return h;
            }
        }
        panic!("could not send");
    }

    /// Pumps (real time passing for the connect threads) until `done`
    /// holds for what each connection received, or 10 s pass.
    fn collect(
        net: &mut Net,
        guest: &mut Guest,
        now: &mut u64,
        hs: &[SocketHandle],
        done: impl Fn(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        collect_for(net, guest, now, hs, done, std::time::Duration::from_secs(10))
    }

    /// What comes back within a short while (for connections expected to
    /// get nothing: a property, not a timing).
    fn settle(net: &mut Net, guest: &mut Guest, now: &mut u64, hs: &[SocketHandle]) -> Vec<Vec<u8>> {
        collect_for(net, guest, now, hs, |_| false, std::time::Duration::from_millis(300))
    }

    fn collect_for(
        net: &mut Net,
        guest: &mut Guest,
        now: &mut u64,
        hs: &[SocketHandle],
        done: impl Fn(&[Vec<u8>]) -> bool,
        limit: std::time::Duration,
    ) -> Vec<Vec<u8>> {
        let mut got = vec![Vec::new(); hs.len()];
        let deadline = std::time::Instant::now() + limit;
        let mut rx = vec![0u8; 64 * 1024];
        while !done(&got) && std::time::Instant::now() < deadline {
            pump(net, guest, now);
            for (i, h) in hs.iter().enumerate() {
                let s = guest.sockets.get_mut::<tcp::Socket>(*h);
                while s.can_recv() {
                    match s.recv_slice(&mut rx) {
                        Ok(n) if n > 0 => got[i].extend_from_slice(&rx[..n]),
                        _ => break,
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn held_requests_wait_on_one_question_and_go_upstream_once_each_when_approved() {
        let (up, count) = http_upstream();
        let (mut net, live) = held_net(&[("held.example.com", 80, up)], 60_000);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let reply = resolve(&mut net, &mut guest, "held.example.com", &mut now);
        assert_eq!(reply[3] & 0xf, 0, "a held name resolves");
        let addr = a_record(&reply);
        let denied = resolve(&mut net, &mut guest, "bad.example.com", &mut now);
        assert_eq!(denied[3] & 0xf, dns::RCODE_REFUSED, "a denied name does not");
        let req = b"GET /x HTTP/1.1\r\nHost: held.example.com\r\n\r\n";
        let a = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        let b = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        let waiting = settle(&mut net, &mut guest, &mut now, &[a, b]);
        assert!(waiting.iter().all(Vec::is_empty), "nothing comes back while held");
        let qs = live.questions();
        assert_eq!(qs.len(), 1, "one question for both");
        assert_eq!(
            (qs[0].count, qs[0].waiting, qs[0].method.as_deref(), qs[0].path.as_deref()),
            (2, 2, Some("GET"), Some("/x"))
        );
        assert_eq!(count.load(Ordering::SeqCst), 0, "nothing went upstream");
        assert_eq!(net.connect_threads(), 0, "not even a connect");
        live.approve(qs[0].id, Grant::Once, 1000).unwrap();
        let got = collect(&mut net, &mut guest, &mut now, &[a, b], |g| g.iter().all(|g| contains(g, "echo GET /x")));
        assert!(got.iter().all(|g| contains(g, "echo GET /x 0")), "{got:?}");
        assert_eq!(count.load(Ordering::SeqCst), 2, "each held request went upstream once");
        let log = audit(&net);
        assert!(
            log.contains("\"decision\":\"held\"")
                && log.contains("\"answer\":\"approved\"")
                && log.contains("\"by_uid\":1000"),
            "{log}"
        );
        assert!(live.rules().0.list().is_empty(), "--once remembers nothing");
        // A new connection asks again.
        let c = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        settle(&mut net, &mut guest, &mut now, &[c]);
        assert_eq!(live.questions().iter().filter(|q| q.answer == Answer::Pending).count(), 1);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_rejected_or_timed_out_request_gets_the_deny_answer_and_nothing_goes_upstream() {
        let (up, count) = http_upstream();
        let (mut net, live) = held_net(&[("held.example.com", 80, up)], 5_000);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "held.example.com", &mut now));
        let req = b"GET /x HTTP/1.1\r\nHost: held.example.com\r\n\r\n";
        let a = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        let id = live.questions()[0].id;
        live.reject(id, 1000).unwrap();
        let got = collect(&mut net, &mut guest, &mut now, &[a], |g| contains(&g[0], "\n\n") || contains(&g[0], "}\n"));
        let text = String::from_utf8_lossy(&got[0]).to_string();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden") && text.contains("application/json"), "{text}");
        let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
        assert_eq!(body["error"], "sbx_denied");
        assert_eq!(body["host"], "held.example.com");
        assert_eq!(body["ask"], "sbx policy allow sb held.example.com");
        assert!(body["reason"].as_str().unwrap().contains("rejected by uid 1000"), "{body}");
        // Time-out: the clock passes the hold (the fake clock: pump adds 1 ms a round).
        let b = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        now += 5_000;
        let got = collect(&mut net, &mut guest, &mut now, &[b], |g| contains(&g[0], "}\n"));
        assert!(contains(&got[0], "403 Forbidden") && contains(&got[0], "nobody answered in time"), "{got:?}");
        assert_eq!(count.load(Ordering::SeqCst), 0);
        let log = audit(&net);
        assert!(log.contains("\"answer\":\"rejected\"") && log.contains("\"answer\":\"timed out\""), "{log}");
    }

    #[test]
    fn approval_after_the_guest_went_away_sends_nothing_and_a_grant_lets_later_requests_through() {
        let (up, count) = http_upstream();
        let (mut net, live) = held_net(&[("held.example.com", 80, up)], 60_000);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "held.example.com", &mut now));
        let req = b"GET /x HTTP/1.1\r\nHost: held.example.com\r\n\r\n";
        let a = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), req);
        guest.sockets.get_mut::<tcp::Socket>(a).abort();
        for _ in 0..5 {
            pump(&mut net, &mut guest, &mut now);
        }
        assert_eq!(net.connections(), 0, "the held connection ended with the guest's");
        let q = &live.questions()[0];
        assert_eq!(q.waiting, 0);
        live.approve(q.id, Grant::ForSecs(600), 1000).unwrap();
        settle(&mut net, &mut guest, &mut now, &[]);
        assert_eq!(count.load(Ordering::SeqCst), 0, "nobody waited: nothing went upstream");
        // The grant: the next connection goes through without asking.
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), req, |g| contains(g, "echo GET /x"));
        assert!(contains(&got, "echo GET /x 0"));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// An upstream that records each request's method, target and body
    /// and answers "ok".
    /// ("METHOD TARGET", body) of each request an upstream received.
    type Seen = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

    fn recording_upstream() -> (SocketAddr, Seen) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut w = stream;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if h == "\r\n" || h.is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        let what = line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                        log.lock().unwrap().push((what, body));
                        if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Sends `data` on the guest connection `h`.
    fn send_more(net: &mut Net, guest: &mut Guest, now: &mut u64, h: SocketHandle, data: &[u8]) {
        let mut sent = 0;
        for _ in 0..1000 {
            pump(net, guest, now);
            let s = guest.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap_or(0);
            }
            if sent == data.len() {
                pump(net, guest, now);
                return;
            }
        }
        panic!("could not send");
    }

    #[test]
    fn graphql_mutations_are_held_reads_go_through_and_an_unreadable_body_is_held() {
        let (up, seen) = recording_upstream();
        let policy = "version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\"]\n";
        let live = Live::with_hold("sb", LiveRules::default(), 600_000);
        let mut net = net_with(policy, &[("api.github.com", 80, up)]).with_live(live.clone());
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.github.com", &mut now));
        let post = |body: &[u8]| {
            let mut r = format!(
                "POST /graphql HTTP/1.1\r\nHost: api.github.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        };
        // A read goes straight through, body intact.
        let read = br#"{"query": "query { viewer { login } }"}"#.to_vec();
        let (got, _) =
            exchange(&mut net, &mut guest, &mut now, (addr, 80), &post(&read), |g| contains(g, "\r\n\r\nok"));
        assert!(contains(&got, "200 OK"), "{got:?}");
        assert_eq!(seen.lock().unwrap().clone(), vec![("POST /graphql".to_string(), read)]);
        assert!(live.questions().is_empty(), "a read asks nothing");
        // A mutation, in several TCP segments: nothing is decided (or sent)
        // before the whole body is there; then it is held.
        let pad = "x".repeat(4000);
        let merge = serde_json::to_vec(&serde_json::json!({
            "query": "mutation M($id: ID!) { a: mergePullRequest(input: {pullRequestId: $id}) { clientMutationId } }",
            "variables": { "id": "PR_1", "pad": pad },
        }))
        .unwrap();
        let whole = post(&merge);
        let cut = whole.len() - 1000;
        let c = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), &whole[..cut]);
        assert!(settle(&mut net, &mut guest, &mut now, &[c])[0].is_empty());
        assert!(live.questions().is_empty(), "not judged before the body is whole");
        send_more(&mut net, &mut guest, &mut now, c, &whole[cut..]);
        assert!(settle(&mut net, &mut guest, &mut now, &[c])[0].is_empty(), "nothing comes back while held");
        let qs = live.questions();
        assert_eq!(qs.len(), 1, "{qs:?}");
        assert_eq!(
            (qs[0].method.as_deref(), qs[0].path.as_deref(), qs[0].detail.as_deref()),
            (Some("POST"), Some("/graphql"), Some("mutation mergePullRequest"))
        );
        assert!(qs[0].key.rule.as_deref().unwrap().contains("ask:github graphql merge"), "{:?}", qs[0].key);
        assert_eq!(seen.lock().unwrap().len(), 1, "nothing went upstream");
        live.approve(qs[0].id, Grant::Once, 1000).unwrap();
        let got = collect(&mut net, &mut guest, &mut now, &[c], |g| contains(&g[0], "\r\n\r\nok"));
        assert!(contains(&got[0], "200 OK"), "{got:?}");
        let sent = seen.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "the approved mutation went upstream once");
        assert_eq!(sent[1], ("POST /graphql".to_string(), merge), "with its body intact");
        // Too large to read: held, not forwarded unasked.
        let big = format!("{{\"query\": \"query {{ a }}\", \"pad\": \"{}\"}}", "y".repeat(crate::graphql::MAX_BODY));
        let d = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), &post(big.as_bytes())[..8000]);
        assert!(settle(&mut net, &mut guest, &mut now, &[d])[0].is_empty());
        let pending: Vec<_> = live.questions().into_iter().filter(|q| q.answer == Answer::Pending).collect();
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].detail.as_deref().unwrap().contains("more than"), "{:?}", pending[0].detail);
        assert_eq!(seen.lock().unwrap().len(), 2, "nothing more went upstream");
        let log = audit(&net);
        assert!(log.contains("\"graphql\":\"mutation mergePullRequest\""), "{log}");
    }

    #[test]
    fn a_lasting_approval_of_a_graphql_mutation_grants_that_mutation_only() {
        let (up, seen) = recording_upstream();
        let policy = "version = 1\npreset = \"balanced\"\n[[rule]]\nask = \"api.github.com\"\nmethods = [\"POST\"]\n\
                      path = \"/graphql\"\ngraphql_mutations = [\"*\"]\n";
        let live = Live::with_hold("sb", LiveRules::default(), 600_000);
        let mut net = net_with(policy, &[("api.github.com", 80, up)]).with_live(live.clone());
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "api.github.com", &mut now));
        let post = |query: &str| {
            let body = serde_json::to_vec(&serde_json::json!({ "query": query })).unwrap();
            let mut r = format!(
                "POST /graphql HTTP/1.1\r\nHost: api.github.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        };
        let create = "mutation { createIssue(input: {repositoryId: \"R\", title: \"t\"}) { issue { id } } }";
        let delete = "mutation { deleteRepository(input: {repositoryId: \"R\"}) { clientMutationId } }";
        let pending = |live: &Live| live.questions().into_iter().filter(|q| q.answer == Answer::Pending).count();
        // createIssue is asked; approved for 10 minutes.
        let c = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), &post(create));
        assert!(settle(&mut net, &mut guest, &mut now, &[c])[0].is_empty(), "held");
        let q = live.questions();
        assert_eq!((q.len(), q[0].detail.as_deref()), (1, Some("mutation createIssue")), "{q:?}");
        live.approve(q[0].id, Grant::ForSecs(600), 1000).unwrap();
        let got = collect(&mut net, &mut guest, &mut now, &[c], |g| contains(&g[0], "\r\n\r\nok"));
        assert!(contains(&got[0], "200 OK"), "{got:?}");
        // On the same kept-alive connection, deleteRepository is not "the
        // same kind" of request as the one approved: it is asked.
        send_more(&mut net, &mut guest, &mut now, c, &post(delete));
        assert!(
            settle(&mut net, &mut guest, &mut now, &[c])[0].is_empty(),
            "deleteRepository on that connection is held"
        );
        assert_eq!(pending(&live), 1);
        let first_delete = live.questions().into_iter().find(|q| q.answer == Answer::Pending).unwrap().id;
        live.reject(first_delete, 1000).unwrap();
        // Another createIssue goes at once, nothing asked.
        let (got, _) =
            exchange(&mut net, &mut guest, &mut now, (addr, 80), &post(create), |g| contains(g, "\r\n\r\nok"));
        assert!(contains(&got, "200 OK"), "{got:?}");
        assert_eq!(pending(&live), 0);
        // deleteRepository, to the same host and path, is still asked.
        let d = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), &post(delete));
        assert!(settle(&mut net, &mut guest, &mut now, &[d])[0].is_empty(), "deleteRepository is held");
        let q: Vec<_> = live.questions().into_iter().filter(|q| q.answer == Answer::Pending).collect();
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].detail.as_deref(), Some("mutation deleteRepository"));
        // So is a request with both, and a read is unaffected.
        let both =
            "mutation { createIssue(input: {}) { issue { id } } deleteRepository(input: {}) { clientMutationId } }";
        let b = open_and_send(&mut net, &mut guest, &mut now, (addr, 80), &post(both));
        assert!(
            settle(&mut net, &mut guest, &mut now, &[b])[0].is_empty(),
            "createIssue does not carry deleteRepository"
        );
        let (got, _) = exchange(&mut net, &mut guest, &mut now, (addr, 80), &post("query { viewer { login } }"), |g| {
            contains(g, "\r\n\r\nok")
        });
        assert!(contains(&got, "200 OK"), "{got:?}");
        let sent: Vec<String> =
            seen.lock().unwrap().iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert!(sent.iter().all(|b| !b.contains("deleteRepository")), "{sent:?}");
        let log = audit(&net);
        assert!(log.contains("graphql mutation createIssue on api.github.com:80/graphql"), "{log}");
    }

    #[test]
    fn explain_and_enforcement_are_one_decision() {
        use crate::live::{judge, RuleSpec, Verdict};
        let (up, _) = http_upstream();
        let policy = "version = 1\napproval = \"ask\"\n[[rule]]\nallow = \"*.example.com\"\n\
            [[rule]]\ndeny = \"b.example.com\"\nmethods = [\"DELETE\"]\n\
            [[rule]]\nallow = \"files.example.net\"\nmethods = [\"GET\"]\npath_prefix = \"/pub/\"\n\
            [[rule]]\nask = \"c.example.com\"\nmethods = [\"POST\"]\npath = \"/repos/*/merge\"\n";
        let names = [
            "a.example.com",
            "b.example.com",
            "c.example.com",
            "d.example.com",
            "e.example.org",
            "files.example.net",
            "f.example.org",
        ];
        let routes: Vec<(&str, u16, SocketAddr)> = names.iter().map(|n| (*n, 80, up)).collect();
        let live = Live::with_hold("sb", LiveRules::default(), 600_000);
        let rule = |action: &str, host: &str| RuleSpec {
            action: action.into(),
            host: host.into(),
            methods: vec![],
            path: None,
            for_secs: None,
            uses: None,
            until_exit: false,
            graphql_mutations: vec![],
        };
        live.add_rule(&rule("deny", "d.example.com"), None).unwrap();
        live.add_rule(&rule("allow", "e.example.org:80"), None).unwrap();
        let mut net = net_with(policy, &routes).with_live(live.clone());
        let static_policy = Policy::from_toml(policy).unwrap();
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let cases = [
            ("a.example.com", "GET", "/"),
            ("b.example.com", "DELETE", "/x"),
            ("b.example.com", "GET", "/x"),
            ("c.example.com", "POST", "/repos/r/merge"),
            ("c.example.com", "POST", "/repos/r/other"),
            ("d.example.com", "GET", "/"),
            ("e.example.org", "GET", "/"),
            ("files.example.net", "GET", "/pub/a"),
            ("files.example.net", "GET", "/pub/../priv"),
            ("f.example.org", "GET", "/"),
        ];
        for (h, method, path) in cases {
            let name = HostName::parse(h).unwrap();
            // What `sbx policy explain` says (the same function, the same rules).
            let (rules, clock) = live.rules();
            let said = judge(
                &static_policy,
                &rules,
                &crate::policy::Request { host: &name, port: 80, http: Some((method, path)) },
                clock,
            )
            .verdict;
            // What the stack does.
            let reply = resolve(&mut net, &mut guest, h, &mut now);
            let done = if reply[3] & 0xf != 0 {
                "deny"
            } else {
                let questions = live.questions().len();
                let req = format!("{method} {path} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0\r\n\r\n");
                let c = open_and_send(&mut net, &mut guest, &mut now, (a_record(&reply), 80), req.as_bytes());
                let got = collect_for(
                    &mut net,
                    &mut guest,
                    &mut now,
                    &[c],
                    |g| contains(&g[0], "echo ") || contains(&g[0], "}\n"),
                    std::time::Duration::from_millis(1500),
                );
                guest.sockets.get_mut::<tcp::Socket>(c).abort();
                if contains(&got[0], "echo ") {
                    "allow"
                } else if contains(&got[0], "403 Forbidden") {
                    "deny"
                } else if got[0].is_empty() && live.questions().len() == questions + 1 {
                    "ask"
                } else {
                    "other"
                }
            };
            let want = match said {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
                Verdict::Ask(_) => "ask",
            };
            assert_eq!(done, want, "{method} {h}{path}");
        }
    }

    #[test]
    fn a_held_tls_connection_is_spliced_once_approved_and_reset_when_rejected() {
        let (up, count) = echo_upstream();
        let (mut net, live) = held_net(&[("tls.example.com", 443, up)], 60_000);
        let (mut guest, mut now) = (Guest::new(1500), 0);
        let addr = a_record(&resolve(&mut net, &mut guest, "tls.example.com", &mut now));
        let mut hello = crate::tls::tests::hello(&[crate::tls::tests::sni_ext(&["tls.example.com"])]);
        // The client's ChangeCipherSpec ends what the splice watches.
        hello.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        hello.extend_from_slice(b"opaque application data");
        let a = open_and_send(&mut net, &mut guest, &mut now, (addr, 443), &hello);
        assert!(settle(&mut net, &mut guest, &mut now, &[a])[0].is_empty());
        assert_eq!(count.load(Ordering::SeqCst), 0, "no upstream while held");
        let q = live.questions()[0].clone();
        assert_eq!((q.key.port, q.method.as_deref()), (443, None), "SNI only: no method or path");
        live.approve(q.id, Grant::Once, 0).unwrap();
        let got = collect(&mut net, &mut guest, &mut now, &[a], |g| g[0].len() >= hello.len());
        assert_eq!(got[0], hello, "spliced, bytes untouched, once approved");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let b = open_and_send(&mut net, &mut guest, &mut now, (addr, 443), &hello);
        let id = live.questions().iter().find(|q| q.answer == Answer::Pending).map(|q| q.id).unwrap();
        live.reject(id, 0).unwrap();
        for _ in 0..20 {
            pump(&mut net, &mut guest, &mut now);
        }
        let s = guest.sockets.get_mut::<tcp::Socket>(b);
        assert_eq!(s.state(), tcp::State::Closed, "a rejected TLS connection is reset");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
