//! Host side: published ports (`sbx ports NAME --publish HOST:GUEST`,
//! `sbx run -p HOST:GUEST`) — a TCP service the guest listens on, reached
//! from the host's 127.0.0.1:HOST and nowhere else.
//!
//! Direction: the only way *into* the guest. A host program connects to
//! 127.0.0.1:HOST; netstack accepts it and opens a TCP connection into the
//! guest — a smoltcp client socket from the gateway's address (an
//! ephemeral port of [`LOCAL_PORTS`]) to the guest's address and GUEST —
//! and splices bytes both ways. The guest sees a connection from the
//! gateway; nothing special is needed in the guest (a service listening
//! on 0.0.0.0:GUEST). The guest's answers pass the frame classifier of
//! [`crate::stack`] only for the exact (guest port, local port) of an open
//! forward (`Forwarder::passes`); every other TCP to the gateway is
//! refused as before.
//!
//! Loopback only: listeners are bound to 127.0.0.1 by [`bind_loopback`]
//! and [`Ports::publish`] refuses any listener whose local address is not
//! 127.0.0.1 (so a listener handed over by another process cannot widen
//! it); [`parse_mapping`] refuses a host address other than loopback.
//! Anyone on the host who can reach 127.0.0.1 can connect (as with any
//! loopback service): the guest's service must not trust it blindly.
//!
//! The jail: the network thread never binds or listens (its seccomp
//! filter allows neither `listen` nor a bind that could widen anything).
//! Listeners are bound un-jailed — by `sbx run` before any thread is
//! confined (persisted ports, `-p`), or by the `sbx ports` command itself
//! and handed to the running sandbox over its admin socket (SCM_RIGHTS) —
//! and the network thread only accepts on them (`accept4`).
//!
//! Audited: a line per publish and unpublish (`"event": "publish"` /
//! `"unpublish"`), per accepted connection (`"port_forward"`: host port,
//! guest port, peer) and per end (`"port_forward_end"`: bytes each way,
//! why); refusals for the cap once per [`crate::limits::BURST_MS`].
//!
//! Limits: at most [`MAX_PUBLISHED`] ports; at most
//! [`MAX_FORWARDS_PER_PORT`] forwarded connections per port (more are
//! accepted and closed at once, counted); each with the guest socket's
//! [`crate::stack::TCP_BUFFER`] buffers and at most [`FORWARD_CHUNK`]
//! bytes waiting in netstack each way (the host socket is read only when
//! the guest socket has room, the guest socket only when the host took
//! what waited); the guest's handshake within
//! [`crate::limits::GUEST_HANDSHAKE_MS`]; a forward with nothing moving
//! either way for [`FORWARD_IDLE_MS`] is reset.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use thiserror::Error;

use crate::conn::Waker;
use crate::limits::{BURST_MS, GUEST_HANDSHAKE_MS};
use crate::stack::TCP_BUFFER;

/// Most ports published at once.
pub const MAX_PUBLISHED: usize = 32;
/// Most forwarded connections of one published port at once.
pub const MAX_FORWARDS_PER_PORT: usize = 16;
/// A forward with no byte either way for this long is reset.
pub const FORWARD_IDLE_MS: u64 = 10 * 60 * 1000;
/// Bytes read at a time, and the most waiting in netstack each way.
pub const FORWARD_CHUNK: usize = 16 * 1024;
/// Connections accepted from one listener per poll.
const ACCEPTS_PER_POLL: usize = 8;
/// The gateway's ports that forwards connect from.
pub const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// The host address every listener is bound to.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Bytes of the persisted ports file read back.
pub const MAX_PORTS_FILE: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Host address '{0}' is not loopback: ports are published on 127.0.0.1 only (use HOSTPORT:GUESTPORT or 127.0.0.1:HOSTPORT:GUESTPORT)")]
    NotLoopback(String),
    #[error("Bad port mapping '{0}': use HOSTPORT:GUESTPORT (e.g. 18080:8000), ports 1-65535")]
    Mapping(String),
    #[error("Host port {0} is already in use on 127.0.0.1: stop what listens there, or publish another host port")]
    InUse(u16),
    #[error("Cannot listen on 127.0.0.1:{0}: {1}")]
    Bind(u16, io::Error),
    #[error("The listener handed over for host port {0} is not a TCP socket listening on 127.0.0.1:{0}")]
    BadListener(u16),
    #[error("Host port {0} is already published (to guest port {1}); unpublish it first")]
    AlreadyPublished(u16, u16),
    #[error("Host port {0} is not published (see `sbx ports NAME`)")]
    NotPublished(u16),
    #[error("{MAX_PUBLISHED} ports are published (the limit); unpublish one first")]
    TooMany,
    #[error("The published ports file is not valid: {0} (remove it to start over)")]
    File(String),
}

/// Parses `HOSTPORT:GUESTPORT`, or `ADDR:HOSTPORT:GUESTPORT` where ADDR
/// must be loopback (127.0.0.1 or localhost): `(host port, guest port)`.
pub fn parse_mapping(raw: &str) -> Result<(u16, u16), Error> {
    let parts: Vec<&str> = raw.rsplitn(3, ':').collect();
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| Error::Mapping(raw.into()));
    match parts.as_slice() {
        [guest, host] => Ok((port(host)?, port(guest)?)),
        [guest, host, addr] => {
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            let loopback = addr == "localhost" || addr.parse::<Ipv4Addr>().is_ok_and(|a| a == LOOPBACK);
            if !loopback {
                return Err(Error::NotLoopback(addr.chars().take(80).collect()));
            }
            Ok((port(host)?, port(guest)?))
        }
        _ => Err(Error::Mapping(raw.into())),
    }
}

/// Listens on 127.0.0.1:`host_port` (and no other address), non-blocking.
pub fn bind_loopback(host_port: u16) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind((LOOPBACK, host_port)).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => Error::InUse(host_port),
        _ => Error::Bind(host_port, e),
    })?;
    listener.set_nonblocking(true).map_err(|e| Error::Bind(host_port, e))?;
    Ok(listener)
}

/// One published port, as listed and persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortsFile {
    version: u32,
    ports: Vec<Mapping>,
}

/// The persisted form of `ports` (for `ports.json`).
pub fn to_json(ports: &[Mapping]) -> String {
    serde_json::to_string(&PortsFile { version: 1, ports: ports.to_vec() }).unwrap_or_default()
}

/// Reads a persisted ports file, checked as user input.
pub fn from_json(text: &[u8]) -> Result<Vec<Mapping>, Error> {
    if text.len() > MAX_PORTS_FILE {
        return Err(Error::File(format!("longer than {MAX_PORTS_FILE} bytes")));
    }
    let file: PortsFile = serde_json::from_slice(text).map_err(|e| Error::File(e.to_string()))?;
    if file.version != 1 {
        return Err(Error::File(format!("version {} (this sbx reads version 1)", file.version)));
    }
    if file.ports.len() > MAX_PUBLISHED {
        return Err(Error::TooMany);
    }
    let mut seen = BTreeMap::new();
    for m in &file.ports {
        if m.host_port == 0 || m.guest_port == 0 {
            return Err(Error::File("port 0".into()));
        }
        if let Some(g) = seen.insert(m.host_port, m.guest_port) {
            return Err(Error::AlreadyPublished(m.host_port, g));
        }
    }
    Ok(file.ports)
}

pub(crate) enum Change {
    Add(Mapping, TcpListener),
    Remove(u16),
}

#[derive(Default)]
struct PortsState {
    published: BTreeMap<u16, u16>,
    changes: Vec<Change>,
    dirty: bool,
}

/// The sandbox's published ports, shared between whoever steers them (the
/// admin socket's thread) and the stack that serves them
/// ([`crate::stack::NetStack::with_ports`]), which applies each change at
/// its next poll (woken for it).
#[derive(Default)]
pub struct Ports {
    state: Mutex<PortsState>,
    waker: Mutex<Option<Waker>>,
}

impl Ports {
    pub fn new() -> Arc<Ports> {
        Arc::new(Ports::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PortsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            w();
        }
    }

    pub(crate) fn set_waker(&self, waker: Waker) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    /// Publishes `listener` (which must be a TCP socket listening on
    /// 127.0.0.1:`host_port`) to the guest's `guest_port`.
    pub fn publish(&self, host_port: u16, guest_port: u16, listener: TcpListener) -> Result<(), Error> {
        if let Some(g) = self.state().published.get(&host_port) {
            return Err(Error::AlreadyPublished(host_port, *g));
        }
        let local = listener.local_addr().map_err(|_| Error::BadListener(host_port))?;
        let listening = rustix::net::sockopt::socket_acceptconn(&listener).unwrap_or(false);
        let stream = rustix::net::sockopt::socket_type(&listener).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
        if local != SocketAddr::from((LOOPBACK, host_port)) || !listening || !stream || guest_port == 0 {
            return Err(Error::BadListener(host_port));
        }
        listener.set_nonblocking(true).map_err(|e| Error::Bind(host_port, e))?;
        {
            let mut s = self.state();
            if let Some(g) = s.published.get(&host_port) {
                return Err(Error::AlreadyPublished(host_port, *g));
            }
            if s.published.len() >= MAX_PUBLISHED {
                return Err(Error::TooMany);
            }
            s.published.insert(host_port, guest_port);
            s.changes.push(Change::Add(Mapping { host_port, guest_port }, listener));
            s.dirty = true;
        }
        self.wake();
        Ok(())
    }

    /// Stops listening on `host_port` and ends its forwarded connections.
    pub fn unpublish(&self, host_port: u16) -> Result<u16, Error> {
        let guest = {
            let mut s = self.state();
            let guest = s.published.remove(&host_port).ok_or(Error::NotPublished(host_port))?;
            s.changes.push(Change::Remove(host_port));
            s.dirty = true;
            guest
        };
        self.wake();
        Ok(guest)
    }

    /// The published ports, by host port.
    pub fn list(&self) -> Vec<Mapping> {
        self.state().published.iter().map(|(&host_port, &guest_port)| Mapping { host_port, guest_port }).collect()
    }

    /// The persisted form if anything changed since the last call.
    pub fn take_dirty(&self) -> Option<String> {
        let mut s = self.state();
        if !std::mem::take(&mut s.dirty) {
            return None;
        }
        let list: Vec<Mapping> = s.published.iter().map(|(&h, &g)| Mapping { host_port: h, guest_port: g }).collect();
        Some(to_json(&list))
    }

    pub(crate) fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut self.state().changes)
    }
}

struct Listening {
    map: Mapping,
    listener: TcpListener,
    id: u64,
    /// Refusals for [`MAX_FORWARDS_PER_PORT`] not yet audited, and when
    /// the last such line was written.
    refused: u64,
    refused_logged: Option<u64>,
}

struct Forward {
    map: Mapping,
    id: u64,
    peer: SocketAddr,
    stream: TcpStream,
    socket: SocketHandle,
    local_port: u16,
    /// Bytes from the host waiting for the guest socket, and the reverse.
    to_guest: Vec<u8>,
    to_host: Vec<u8>,
    host_eof: bool,
    fin_sent: bool,
    host_shut: bool,
    established: bool,
    last_active: u64,
    bytes_to_guest: u64,
    bytes_to_host: u64,
    /// Why it ends, once it must.
    end: Option<&'static str>,
}

/// A stack's published ports and their forwarded connections (see the
/// module docs).
pub(crate) struct Forwarder {
    ports: Arc<Ports>,
    guest: Ipv4Addr,
    gateway: Ipv4Addr,
    listening: Vec<Listening>,
    forwards: Vec<Forward>,
    next_local: u16,
    pub(crate) events: Vec<audit::Event>,
}

fn peer_text(a: &SocketAddr) -> String {
    a.to_string()
}

impl Forwarder {
    pub(crate) fn new(ports: Arc<Ports>, guest: Ipv4Addr, gateway: Ipv4Addr) -> Forwarder {
        Forwarder {
            ports,
            guest,
            gateway,
            listening: Vec::new(),
            forwards: Vec::new(),
            next_local: *LOCAL_PORTS.start(),
            events: Vec::new(),
        }
    }

    pub(crate) fn set_waker(&self, waker: Waker) {
        self.ports.set_waker(waker);
    }

    /// The host ports listened on now (for tests and `counters`).
    pub(crate) fn listening(&self) -> Vec<(Mapping, SocketAddr)> {
        self.listening.iter().filter_map(|l| Some((l.map, l.listener.local_addr().ok()?))).collect()
    }

    pub(crate) fn open(&self) -> usize {
        self.forwards.len()
    }

    /// True if a TCP segment from the guest's `src`:`src_port` to the
    /// gateway's `dst_port` belongs to an open forward.
    pub(crate) fn passes(&self, src: Ipv4Addr, src_port: u16, dst_port: u16) -> bool {
        src == self.guest && self.forwards.iter().any(|f| f.map.guest_port == src_port && f.local_port == dst_port)
    }

    /// Applies the publishes and unpublishes asked since the last poll.
    pub(crate) fn apply_changes(&mut self, sockets: &mut SocketSet<'static>, ids: &mut u64) {
        for change in self.ports.take_changes() {
            match change {
                Change::Add(map, listener) => {
                    self.listening.push(Listening { map, listener, id: *ids, refused: 0, refused_logged: None });
                    *ids += 1;
                    self.events.push(audit::Event::Untyped(
                        serde_json::json!({"event": "publish", "host": format!("{LOOPBACK}:{}", map.host_port),
                        "host_port": map.host_port, "guest_port": map.guest_port}),
                    ));
                }
                Change::Remove(host_port) => {
                    let before = self.listening.len();
                    // Dropping the listener closes it.
                    self.listening.retain(|l| l.map.host_port != host_port);
                    if before != self.listening.len() {
                        for f in self.forwards.iter_mut().filter(|f| f.map.host_port == host_port) {
                            f.end.get_or_insert("unpublished");
                            sockets.get_mut::<tcp::Socket>(f.socket).abort();
                        }
                        self.events.push(audit::Event::Untyped(
                            serde_json::json!({"event": "unpublish", "host_port": host_port}),
                        ));
                    }
                }
            }
        }
    }

    fn local_port(&mut self) -> Option<u16> {
        let span = (*LOCAL_PORTS.end() - *LOCAL_PORTS.start()) as usize + 1;
        for _ in 0..span {
            let p = self.next_local;
            self.next_local = if p == *LOCAL_PORTS.end() { *LOCAL_PORTS.start() } else { p + 1 };
            if !self.forwards.iter().any(|f| f.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    /// Accepts host connections and opens each one's connection into the
    /// guest.
    pub(crate) fn accept(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'static>, now: u64, ids: &mut u64) {
        for li in 0..self.listening.len() {
            for _ in 0..ACCEPTS_PER_POLL {
                let (stream, peer) = match self.listening[li].listener.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let map = self.listening[li].map;
                let open = self.forwards.iter().filter(|f| f.map.host_port == map.host_port).count();
                let local_port = if open < MAX_FORWARDS_PER_PORT { self.local_port() } else { None };
                let Some(local_port) = local_port else {
                    // Closed at once: the host's client is told now, not
                    // left in the backlog.
                    drop(stream);
                    let l = &mut self.listening[li];
                    l.refused += 1;
                    if l.refused_logged.is_none_or(|t| now.saturating_sub(t) >= BURST_MS) {
                        l.refused_logged = Some(now);
                        self.events.push(audit::Event::Refused(audit::Refused {
                            what: "forwarded connection".into(),
                            host_port: Some(map.host_port),
                            guest_port: Some(map.guest_port),
                            peer: Some(peer_text(&peer)),
                            count: Some(std::mem::take(&mut l.refused)),
                            limit: Some("forwards_per_port".into()),
                            reason: Some(format!(
                                "{MAX_FORWARDS_PER_PORT} connections to this port are open (the limit); close some"
                            )),
                            ..Default::default()
                        }));
                    }
                    continue;
                };
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let buf = || tcp::SocketBuffer::new(vec![0; TCP_BUFFER]);
                let mut socket = tcp::Socket::new(buf(), buf());
                socket.set_timeout(Some(smoltcp::time::Duration::from_millis(GUEST_HANDSHAKE_MS)));
                if socket.connect(iface.context(), (self.guest, map.guest_port), (self.gateway, local_port)).is_err() {
                    continue;
                }
                let socket = sockets.add(socket);
                self.events.push(audit::Event::Untyped(
                    serde_json::json!({"event": "port_forward", "host_port": map.host_port,
                    "guest_port": map.guest_port, "peer": peer_text(&peer)}),
                ));
                self.forwards.push(Forward {
                    map,
                    id: *ids,
                    peer,
                    stream,
                    socket,
                    local_port,
                    to_guest: Vec::new(),
                    to_host: Vec::new(),
                    host_eof: false,
                    fin_sent: false,
                    host_shut: false,
                    established: false,
                    last_active: now,
                    bytes_to_guest: 0,
                    bytes_to_host: 0,
                    end: None,
                });
                *ids += 1;
            }
        }
    }

    /// Moves bytes both ways, without blocking, within the buffers.
    pub(crate) fn serve(&mut self, sockets: &mut SocketSet<'static>, now: u64) {
        let mut buf = vec![0u8; FORWARD_CHUNK];
        for f in self.forwards.iter_mut().filter(|f| f.end.is_none()) {
            let socket = sockets.get_mut::<tcp::Socket>(f.socket);
            if socket.state() == tcp::State::Established && !f.established {
                f.established = true;
                socket.set_timeout(None);
            }
            let before = (f.bytes_to_guest, f.bytes_to_host);
            // Host to guest: read only what the guest socket has room for.
            let room = socket.send_capacity().saturating_sub(socket.send_queue()).min(FORWARD_CHUNK);
            if f.established && f.to_guest.is_empty() && !f.host_eof && socket.may_send() && room > 0 {
                match f.stream.read(&mut buf[..room]) {
                    Ok(0) => f.host_eof = true,
                    Ok(n) => f.to_guest.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(_) => f.end = Some("host connection failed"),
                }
            }
            while !f.to_guest.is_empty() && socket.can_send() {
                match socket.send_slice(&f.to_guest) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        f.to_guest.drain(..n);
                        f.bytes_to_guest += n as u64;
                    }
                }
            }
            if f.host_eof && f.to_guest.is_empty() && !f.fin_sent {
                socket.close();
                f.fin_sent = true;
            }
            // Guest to host: take from the guest only what the host took.
            loop {
                if f.to_host.is_empty() && socket.can_recv() {
                    match socket.recv_slice(&mut buf) {
                        Ok(n) if n > 0 => f.to_host.extend_from_slice(&buf[..n]),
                        _ => {}
                    }
                }
                if f.to_host.is_empty() {
                    break;
                }
                match f.stream.write(&f.to_host) {
                    Ok(0) => break,
                    Ok(n) => {
                        f.to_host.drain(..n);
                        f.bytes_to_host += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        f.end = Some("host connection failed");
                        break;
                    }
                }
            }
            if f.established && !socket.may_recv() && f.to_host.is_empty() && !f.host_shut {
                let _ = f.stream.shutdown(Shutdown::Write);
                f.host_shut = true;
            }
            if (f.bytes_to_guest, f.bytes_to_host) != before {
                f.last_active = now;
            }
            let state = socket.state();
            let drained = f.to_host.is_empty() && !socket.can_recv();
            if f.end.is_none()
                && matches!(state, tcp::State::Closed | tcp::State::TimeWait)
                && (drained || !f.established)
            {
                f.end = Some(match (f.established, f.host_shut || f.fin_sent) {
                    (false, _) => "the guest refused or did not answer",
                    (true, true) => "closed",
                    (true, false) => "reset by the guest",
                });
            }
            if f.end.is_none() && now.saturating_sub(f.last_active) > FORWARD_IDLE_MS {
                f.end = Some("idle");
            }
            if f.end.is_some_and(|e| e != "closed") {
                socket.abort();
            }
        }
    }

    /// Forgets ended forwards (after the round's last interface poll, so
    /// that a reset decided this round went out).
    pub(crate) fn sweep(&mut self, sockets: &mut SocketSet<'static>) {
        let mut i = 0;
        while i < self.forwards.len() {
            if self.forwards[i].end.is_some() {
                let f = self.forwards.swap_remove(i);
                sockets.remove(f.socket);
                self.events.push(audit::Event::Untyped(
                    serde_json::json!({"event": "port_forward_end", "host_port": f.map.host_port,
                    "guest_port": f.map.guest_port, "peer": peer_text(&f.peer), "bytes_to_guest": f.bytes_to_guest,
                    "bytes_to_host": f.bytes_to_host, "reason": f.end}),
                ));
            } else {
                i += 1;
            }
        }
    }

    /// When the next idle limit could fire.
    pub(crate) fn due(&self) -> Option<u64> {
        self.forwards.iter().map(|f| f.last_active.saturating_add(FORWARD_IDLE_MS + 1)).min()
    }

    /// The host sockets and what each waits for: `(id, fd, read, write)`.
    pub(crate) fn interests(&self, sockets: &SocketSet<'static>, out: &mut Vec<(u64, RawFd, bool, bool)>) {
        for l in &self.listening {
            out.push((l.id, l.listener.as_raw_fd(), true, false));
        }
        for f in self.forwards.iter().filter(|f| f.end.is_none()) {
            let s = sockets.get::<tcp::Socket>(f.socket);
            let read = f.established && f.to_guest.is_empty() && !f.host_eof && s.send_queue() < s.send_capacity();
            out.push((f.id, f.stream.as_raw_fd(), read, !f.to_host.is_empty()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::sim::{pump, Guest, GUEST_IP};
    use crate::stack::{Config, NetStack, Resolver};
    use audit::AuditLog;
    use std::net::IpAddr;

    type Net = NetStack<Vec<u8>>;

    fn net(ports: &Arc<Ports>) -> Net {
        NetStack::new(
            Config::default(),
            Policy::preset("locked").unwrap(),
            Resolver::default(),
            AuditLog::new(Vec::new()).shared(),
        )
        .with_ports(ports.clone(), GUEST_IP)
    }

    fn audit(net: &Net) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        net.audit_text(&mut out);
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn events<'a>(log: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
        log.iter().filter(|e| e["event"] == name).collect()
    }

    /// A guest TCP listener on `port`.
    fn guest_listen(guest: &mut Guest, port: u16) -> SocketHandle {
        let buf = || tcp::SocketBuffer::new(vec![0; 64 * 1024]);
        let mut s = tcp::Socket::new(buf(), buf());
        s.listen(port).unwrap();
        guest.sockets.add(s)
    }

    /// Publishes a fresh loopback port to `guest_port`; the host port.
    fn publish(ports: &Ports, guest_port: u16) -> u16 {
        let l = bind_loopback(0).unwrap();
        let port = l.local_addr().unwrap().port();
        ports.publish(port, guest_port, l).unwrap();
        port
    }

    fn settle(net: &mut Net, guest: &mut Guest, now: &mut u64) {
        for _ in 0..5 {
            pump(net, guest, now);
        }
    }

    /// What the host client can read now (non-blocking), and whether it saw
    /// the end.
    fn host_read(c: &mut TcpStream) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return (got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return (got, false),
                Err(_) => return (got, true),
            }
        }
    }

    #[test]
    fn a_host_connection_to_the_published_port_reaches_the_guest_and_bytes_go_both_ways() {
        let ports = Ports::new();
        let (mut net, mut guest, mut now) = (net(&ports), Guest::new(1500), 0);
        let listener = guest_listen(&mut guest, 8000);
        let host_port = publish(&ports, 8000);
        settle(&mut net, &mut guest, &mut now);
        // Bound to 127.0.0.1 only.
        let published = net.published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].1, SocketAddr::from((LOOPBACK, host_port)));

        let mut client = TcpStream::connect((LOOPBACK, host_port)).unwrap();
        client.set_nonblocking(true).unwrap();
        client.write_all(b"ping from the host").unwrap();
        settle(&mut net, &mut guest, &mut now);
        let mut buf = [0u8; 64];
        let s = guest.sockets.get_mut::<tcp::Socket>(listener);
        assert_eq!(s.state(), tcp::State::Established);
        let remote = s.remote_endpoint().unwrap();
        assert_eq!(remote.addr, smoltcp::wire::IpAddress::Ipv4(Config::default().gateway), "from the gateway");
        let n = s.recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping from the host");
        s.send_slice(b"pong from the guest").unwrap();
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(host_read(&mut client), (b"pong from the guest".to_vec(), false));

        // Ends both ways: the host's FIN reaches the guest, the guest's the host.
        client.shutdown(Shutdown::Write).unwrap();
        settle(&mut net, &mut guest, &mut now);
        let s = guest.sockets.get_mut::<tcp::Socket>(listener);
        assert!(!s.may_recv(), "the host's end reached the guest");
        s.send_slice(b"bye").unwrap();
        s.close();
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(host_read(&mut client), (b"bye".to_vec(), true));
        assert_eq!(net.forwards(), 0);

        let log = audit(&net);
        let publish = events(&log, "publish");
        assert_eq!(publish.len(), 1);
        assert_eq!(
            (publish[0]["host_port"].as_u64(), publish[0]["guest_port"].as_u64()),
            (Some(host_port as u64), Some(8000))
        );
        assert_eq!(publish[0]["host"], format!("127.0.0.1:{host_port}"));
        let accepted = events(&log, "port_forward");
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0]["peer"], client.local_addr().unwrap().to_string());
        assert_eq!(accepted[0]["guest_port"], 8000);
        let end = events(&log, "port_forward_end");
        assert_eq!(end.len(), 1);
        assert_eq!((end[0]["bytes_to_guest"].as_u64(), end[0]["bytes_to_host"].as_u64()), (Some(18), Some(22)));
        assert_eq!(end[0]["reason"], "closed");
    }

    #[test]
    fn unpublish_closes_the_listener_and_its_connections() {
        let ports = Ports::new();
        let (mut net, mut guest, mut now) = (net(&ports), Guest::new(1500), 0);
        let _l = guest_listen(&mut guest, 8000);
        let host_port = publish(&ports, 8000);
        settle(&mut net, &mut guest, &mut now);
        let mut client = TcpStream::connect((LOOPBACK, host_port)).unwrap();
        client.set_nonblocking(true).unwrap();
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(net.forwards(), 1);
        assert_eq!(ports.unpublish(host_port).unwrap(), 8000);
        settle(&mut net, &mut guest, &mut now);
        assert!(net.published().is_empty());
        assert_eq!(net.forwards(), 0);
        assert!(host_read(&mut client).1, "the open connection ended");
        let e = TcpStream::connect((LOOPBACK, host_port)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "nothing listens any more");
        let log = audit(&net);
        assert_eq!(events(&log, "unpublish").len(), 1);
        assert_eq!(events(&log, "port_forward_end")[0]["reason"], "unpublished");
    }

    #[test]
    fn guest_frames_to_the_gateway_pass_only_for_an_open_forward() {
        let ports = Ports::new();
        let (mut net, mut guest, mut now) = (net(&ports), Guest::new(1500), 0);
        // A guest connection to the gateway's own port: refused, as before.
        let buf = || tcp::SocketBuffer::new(vec![0; 4096]);
        let mut s = tcp::Socket::new(buf(), buf());
        s.connect(guest.iface.context(), (Config::default().gateway, 50000), (GUEST_IP, 8000)).unwrap();
        let h = guest.sockets.add(s);
        let _host_port = publish(&ports, 8000);
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Closed, "reset");
        assert!(events(&audit(&net), "refused").iter().any(|e| e["what"] == "TCP to 10.0.2.2:50000"));
    }

    #[test]
    fn forwards_per_port_are_capped_and_the_one_over_is_closed_and_audited() {
        let ports = Ports::new();
        let mut net = net(&ports);
        let host_port = publish(&ports, 8000);
        net.poll(1);
        // No guest answers: every forward waits in its handshake.
        let mut clients: Vec<TcpStream> =
            (0..MAX_FORWARDS_PER_PORT + 1).map(|_| TcpStream::connect((LOOPBACK, host_port)).unwrap()).collect();
        for t in 2..10 {
            net.poll(t);
        }
        assert_eq!(net.forwards(), MAX_FORWARDS_PER_PORT);
        let last = clients.last_mut().unwrap();
        last.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        assert!(matches!(last.read(&mut [0u8; 1]), Ok(0) | Err(_)), "the one over the cap is closed");
        let log = audit(&net);
        let refused = events(&log, "refused");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0]["limit"], "forwards_per_port");
        assert_eq!(events(&log, "port_forward").len(), MAX_FORWARDS_PER_PORT);
    }

    #[test]
    fn an_idle_forward_is_reset_after_its_limit() {
        let ports = Ports::new();
        let (mut net, mut guest, mut now) = (net(&ports), Guest::new(1500), 0);
        let _l = guest_listen(&mut guest, 8000);
        let host_port = publish(&ports, 8000);
        settle(&mut net, &mut guest, &mut now);
        let mut client = TcpStream::connect((LOOPBACK, host_port)).unwrap();
        client.set_nonblocking(true).unwrap();
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(net.forwards(), 1);
        let due = net.poll_at(now).unwrap();
        assert!(due <= now + FORWARD_IDLE_MS + 1);
        now += FORWARD_IDLE_MS;
        settle(&mut net, &mut guest, &mut now);
        assert_eq!(net.forwards(), 0);
        assert!(host_read(&mut client).1);
        assert_eq!(events(&audit(&net), "port_forward_end")[0]["reason"], "idle");
    }

    #[test]
    fn the_listener_is_among_the_stacks_interests() {
        let ports = Ports::new();
        let mut net = net(&ports);
        publish(&ports, 8000);
        net.poll(1);
        let mut out = Vec::new();
        net.upstream_interests(&mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].2 && !out[0].3, "readable: a connection to accept");
    }

    #[test]
    fn mappings_are_parsed_and_only_loopback_is_accepted() {
        assert_eq!(parse_mapping("18080:8000").unwrap(), (18080, 8000));
        assert_eq!(parse_mapping("127.0.0.1:18080:8000").unwrap(), (18080, 8000));
        assert_eq!(parse_mapping("localhost:1:2").unwrap(), (1, 2));
        for raw in ["0.0.0.0:18080:8000", "192.168.1.5:1:2", "[::]:1:2", "example.com:1:2", "127.0.0.2:1:2"] {
            let e = parse_mapping(raw).unwrap_err();
            assert!(matches!(e, Error::NotLoopback(_)), "{raw}: {e}");
            assert!(e.to_string().contains("127.0.0.1 only"), "{e}");
        }
        for raw in ["", "8000", "0:8000", "18080:0", "x:1", "1:65536", "1:2:3:4"] {
            assert!(parse_mapping(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn listeners_are_loopback_only_and_a_port_in_use_is_named() {
        let l = bind_loopback(0).unwrap();
        assert_eq!(l.local_addr().unwrap().ip(), IpAddr::V4(LOOPBACK));
        let port = l.local_addr().unwrap().port();
        let e = bind_loopback(port).unwrap_err();
        assert!(matches!(e, Error::InUse(p) if p == port), "{e}");
        assert!(e.to_string().contains(&format!("Host port {port} is already in use")), "{e}");
    }

    #[test]
    fn publish_refuses_a_listener_not_on_loopback_or_not_the_port_named() {
        let ports = Ports::new();
        let wide = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let p = wide.local_addr().unwrap().port();
        assert!(matches!(ports.publish(p, 80, wide), Err(Error::BadListener(_))));
        let l = bind_loopback(0).unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(matches!(ports.publish(p + 1, 80, l), Err(Error::BadListener(_))));
        // A connected socket is not a listener.
        let l = bind_loopback(0).unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let as_listener = TcpListener::from(std::os::fd::OwnedFd::from(s));
        let p = as_listener.local_addr().unwrap().port();
        assert!(matches!(ports.publish(p, 80, as_listener), Err(Error::BadListener(_))));
        assert!(ports.list().is_empty());
        let l = bind_loopback(0).unwrap();
        let p = l.local_addr().unwrap().port();
        ports.publish(p, 80, l).unwrap();
        let again = bind_loopback(0).unwrap();
        assert!(matches!(ports.publish(p, 81, again), Err(Error::AlreadyPublished(..))));
        assert_eq!(ports.list(), vec![Mapping { host_port: p, guest_port: 80 }]);
        assert!(matches!(ports.unpublish(p + 1), Err(Error::NotPublished(_))));
    }

    #[test]
    fn the_persisted_file_round_trips_and_bad_files_are_refused() {
        let list = vec![Mapping { host_port: 18080, guest_port: 8000 }, Mapping { host_port: 2222, guest_port: 22 }];
        assert_eq!(from_json(to_json(&list).as_bytes()).unwrap(), list);
        for bad in [
            &b"{}"[..],
            b"{\"version\":2,\"ports\":[]}",
            b"{\"version\":1,\"ports\":[{\"host_port\":0,\"guest_port\":1}]}",
            b"{\"version\":1,\"ports\":[{\"host_port\":1,\"guest_port\":1},{\"host_port\":1,\"guest_port\":2}]}",
            b"{\"version\":1,\"ports\":[],\"x\":1}",
        ] {
            assert!(from_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
