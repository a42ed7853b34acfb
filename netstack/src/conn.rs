//! Host side: one guest TCP connection to port 80 or 443 of an address
//! netstack handed out, terminated here. Port 80: every request head is
//! parsed and checked (Host must be the name bound to the address, then the
//! policy by method and path) before a byte goes upstream; bodies are
//! tracked so that the next request on a kept-alive connection is checked
//! too. Port 443: the ClientHello's SNI must be that name and allowed, then
//! bytes are spliced without decrypting. Refused: HTTP 403 naming the rule,
//! or a reset for TLS; no upstream socket is opened for a refused request.
//!
//! Bounds: [`MAX_BUFFERED`] bytes wait in each direction; reading stops
//! until they drain (backpressure on both sides).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::host::HostName;
use crate::http::{self, BodyScanner, Parsed, ResponseTracker};
use crate::policy::{Action, Policy, Request};
use crate::tls;

/// Bytes buffered in each direction before reading pauses.
pub const MAX_BUFFERED: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where upstream connections go: name and port to a socket address.
/// Called on a connection's own thread: it may block.
pub trait Resolve: Send + Sync {
    fn resolve(&self, name: &HostName, port: u16) -> Option<SocketAddr>;
}

#[derive(Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head / ClientHello.
    Head,
    /// Passing a request body upstream.
    Body(BodyScanner),
    /// TLS allowed: bytes pass both ways untouched.
    Splice,
    /// Resolving and connecting upstream on a helper thread (so that a
    /// slow upstream never stalls other connections); what the guest sends
    /// meanwhile waits in the buffers.
    Connecting(Receiver<Result<TcpStream, String>>, Box<Phase>),
    /// A refusal is being written; then the connection closes.
    Refusing,
    /// Reset: nothing more passes.
    Reset,
}

pub struct Conn {
    pub port: u16,
    pub dst: Ipv4Addr,
    name: Option<HostName>,
    phase: Phase,
    inbox: Vec<u8>,
    upstream: Option<TcpStream>,
    to_upstream: Vec<u8>,
    to_guest: Vec<u8>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    upstream_eof: bool,
    upstream_shut: bool,
    /// A 403 waiting for the responses to earlier, allowed requests.
    refusal: Option<Vec<u8>>,
    /// Allowed requests awaiting their response: audit line, HEAD?, bytes up.
    pending: VecDeque<(Value, bool, u64)>,
    responses: ResponseTracker,
    pub events: Vec<Value>,
}

/// A short plain-text response that closes the connection.
fn plain_response(status: &str, text: &str) -> Vec<u8> {
    let body = format!("sbx: {text}\n");
    let len = body.len();
    format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}")
        .into_bytes()
}

fn forbidden(reason: &str) -> Vec<u8> {
    plain_response("403 Forbidden", &format!("request refused: {reason}"))
}

fn bad_gateway(reason: &str) -> Vec<u8> {
    plain_response("502 Bad Gateway", &format!("upstream unreachable: {reason}"))
}

/// Resolves and connects on a helper thread; the result arrives on the
/// returned channel.
fn connect(name: &HostName, port: u16, resolver: &Arc<dyn Resolve>) -> Receiver<Result<TcpStream, String>> {
    let (tx, rx) = mpsc::channel();
    let (name, resolver) = (name.clone(), resolver.clone());
    let spawned = std::thread::Builder::new().name("netstack-connect".into()).spawn(move || {
        let result = (|| {
            let addr = resolver.resolve(&name, port).ok_or_else(|| format!("cannot resolve {name}"))?;
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })();
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Err(format!("cannot start a connect thread: {e}")));
        return rx;
    }
    rx
}

impl Conn {
    pub fn new(port: u16, dst: Ipv4Addr, name: Option<HostName>) -> Conn {
        Conn {
            port,
            dst,
            name,
            phase: Phase::Head,
            inbox: Vec::new(),
            upstream: None,
            to_upstream: Vec::new(),
            to_guest: Vec::new(),
            bytes_up: 0,
            bytes_down: 0,
            upstream_eof: false,
            upstream_shut: false,
            refusal: None,
            pending: VecDeque::new(),
            responses: ResponseTracker::default(),
            events: Vec::new(),
        }
    }

    /// Room for more bytes from the guest.
    pub fn wants_guest_bytes(&self) -> bool {
        matches!(self.phase, Phase::Head | Phase::Body(_) | Phase::Splice | Phase::Connecting(..))
            && self.inbox.len() < MAX_BUFFERED
            && self.to_upstream.len() < MAX_BUFFERED
    }

    pub fn from_guest(&mut self, data: &[u8], policy: &Policy, resolver: &Arc<dyn Resolve>) {
        self.inbox.extend_from_slice(data);
        self.process(policy, resolver);
    }

    /// Bytes waiting for the guest.
    pub fn to_guest(&mut self) -> &mut Vec<u8> {
        &mut self.to_guest
    }

    pub fn is_reset(&self) -> bool {
        matches!(self.phase, Phase::Reset)
    }

    /// True when everything for the guest is written and nothing more will
    /// come: the guest socket can be closed.
    pub fn finished(&self) -> bool {
        self.to_guest.is_empty()
            && self.refusal.is_none()
            && (matches!(self.phase, Phase::Refusing) || self.upstream_eof)
    }

    /// Refuses the current request. HTTP: a 403 naming the reason, sent
    /// after the responses to requests already allowed on this connection
    /// (their bytes still go upstream, which is then half-closed; the 403
    /// follows its last byte). TLS: a reset.
    fn refuse(&mut self, reason: String) {
        self.inbox.clear();
        if self.port == 80 {
            self.refusal = Some(forbidden(&reason));
            self.phase = Phase::Refusing;
            self.release_refusal();
        } else {
            self.to_upstream.clear();
            self.phase = Phase::Reset;
        }
    }

    /// Queues the 403 once nothing more can come from upstream.
    fn release_refusal(&mut self) {
        if self.upstream.is_none() || self.upstream_eof {
            if let Some(r) = self.refusal.take() {
                self.to_guest.extend_from_slice(&r);
            }
        }
    }

    fn process(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        loop {
            match &mut self.phase {
                Phase::Refusing | Phase::Reset | Phase::Connecting(..) => return,
                Phase::Splice => {
                    self.to_upstream.append(&mut self.inbox);
                    return;
                }
                Phase::Body(scanner) => match scanner.feed(&self.inbox) {
                    Ok(n) => {
                        self.to_upstream.extend(self.inbox.drain(..n));
                        if let Some(p) = self.pending.back_mut() {
                            p.2 += n as u64;
                        }
                        if scanner.is_done() {
                            self.phase = Phase::Head;
                        } else {
                            return;
                        }
                    }
                    Err(e) => {
                        self.events.push(json!({"event": "http", "decision": "deny", "reason": e.to_string()}));
                        self.refuse(e.to_string());
                        return;
                    }
                },
                Phase::Head if self.inbox.is_empty() => return,
                Phase::Head if self.port == 80 => {
                    if !self.http_head(policy, resolver) {
                        return;
                    }
                }
                Phase::Head => {
                    self.tls_hello(policy, resolver);
                    return;
                }
            }
        }
    }

    /// Handles one request head; false when no progress can be made.
    fn http_head(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) -> bool {
        let (head, len) = match http::parse_request_head(&self.inbox) {
            Ok(Parsed::Incomplete) => return false,
            Ok(Parsed::Complete(head, len)) => (head, len),
            Err(e) => {
                self.events.push(json!({"event": "http", "decision": "deny", "reason": e.to_string()}));
                self.refuse(e.to_string());
                return false;
            }
        };
        let mut event = json!({"event": "http", "method": head.method, "host": head.host.as_str(),
            "path": head.target, "dst": self.dst.to_string()});
        let refusal = if self.name.as_ref() != Some(&head.host) {
            Some(format!(
                "Host '{}' is not the name this address was resolved for ({})",
                head.host,
                self.name.as_ref().map(|n| n.as_str()).unwrap_or("none")
            ))
        } else if head.host_port.is_some_and(|p| p != self.port) {
            Some("Host names another port".into())
        } else {
            self.judge(policy, &head.host, Some((&head.method, &head.target)), &mut event)
        };
        if let Some(reason) = refusal {
            self.deny(event, reason);
            return false;
        }
        event["decision"] = json!("allow");
        // Logged when its response ends, with status and sizes.
        self.pending.push_back((event, head.method == "HEAD", len as u64));
        self.to_upstream.extend(self.inbox.drain(..len));
        let next = Phase::Body(BodyScanner::new(head.body));
        if self.upstream.is_none() {
            self.phase = Phase::Connecting(connect(&head.host, self.port, resolver), Box::new(next));
            return false;
        }
        self.phase = next;
        true
    }

    /// The policy's decision for this request, noted in `event`; the
    /// refusal text if it is denied.
    fn judge(&self, policy: &Policy, host: &HostName, http: Option<(&str, &str)>, event: &mut Value) -> Option<String> {
        let decision = policy.decide(&Request { host, port: self.port, http });
        event["rule"] = json!(decision.rule.as_ref().map(|r| r.to_string()));
        (decision.action == Action::Deny).then(|| decision.to_string())
    }

    /// Logs a refused request and refuses it.
    fn deny(&mut self, mut event: Value, reason: String) {
        event["decision"] = json!("deny");
        event["reason"] = json!(reason);
        self.events.push(event);
        self.refuse(reason);
    }

    fn tls_hello(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        let sni = match tls::parse_client_hello(&self.inbox) {
            Ok(tls::Parsed::Incomplete) => return,
            Ok(tls::Parsed::ServerName(name, _)) => name,
            Err(e) => {
                self.events.push(
                    json!({"event": "tls", "dst": self.dst.to_string(), "decision": "deny", "reason": e.to_string()}),
                );
                self.refuse(e.to_string());
                return;
            }
        };
        let mut event = json!({"event": "tls", "sni": sni.as_str(), "dst": self.dst.to_string()});
        let refusal = if self.name.as_ref() != Some(&sni) {
            Some("SNI is not the name this address was resolved for".to_string())
        } else {
            self.judge(policy, &sni, None, &mut event)
        };
        if let Some(reason) = refusal {
            self.deny(event, reason);
            return;
        }
        event["decision"] = json!("allow");
        self.events.push(event);
        self.to_upstream.append(&mut self.inbox);
        self.phase = Phase::Connecting(connect(&sni, self.port, resolver), Box::new(Phase::Splice));
    }

    /// Takes the result of a pending upstream connect, if it is there.
    pub fn poll_connect(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        let Phase::Connecting(rx, _) = &self.phase else { return };
        let result = match rx.try_recv() {
            Err(TryRecvError::Empty) => return,
            Ok(r) => r,
            Err(TryRecvError::Disconnected) => Err("connect thread ended".into()),
        };
        let next = match std::mem::replace(&mut self.phase, Phase::Reset) {
            Phase::Connecting(_, next) => *next,
            other => other,
        };
        match result {
            Ok(stream) => {
                self.upstream = Some(stream);
                self.phase = next;
                self.process(policy, resolver);
            }
            Err(e) => {
                self.events.push(json!({"event": "upstream", "dst": self.dst.to_string(),
                    "name": self.name.as_ref().map(|n| n.as_str()), "error": e}));
                self.to_upstream.clear();
                self.inbox.clear();
                if self.port == 80 {
                    self.to_guest.extend_from_slice(&bad_gateway(&e));
                    self.phase = Phase::Refusing;
                } else {
                    self.phase = Phase::Reset;
                }
            }
        }
    }

    /// Moves bytes to and from the upstream socket without blocking.
    pub fn pump_upstream(&mut self, guest_closed: bool) {
        let Some(up) = self.upstream.as_mut() else { return };
        while !self.to_upstream.is_empty() {
            match up.write(&self.to_upstream) {
                Ok(0) => break,
                Ok(n) => {
                    self.bytes_up += n as u64;
                    self.to_upstream.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.phase = Phase::Reset;
                    return;
                }
            }
        }
        let done_sending = guest_closed || matches!(self.phase, Phase::Refusing);
        if done_sending && self.to_upstream.is_empty() && self.inbox.is_empty() && !self.upstream_shut {
            let _ = up.shutdown(Shutdown::Write);
            self.upstream_shut = true;
        }
        let mut buf = [0u8; 16 * 1024];
        let mut fresh = Vec::new();
        while self.to_guest.len() < MAX_BUFFERED && !self.upstream_eof {
            match up.read(&mut buf) {
                Ok(0) => self.upstream_eof = true,
                Ok(n) => {
                    self.bytes_down += n as u64;
                    self.to_guest.extend_from_slice(&buf[..n]);
                    fresh.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.upstream_eof = true;
                }
            }
        }
        self.track_responses(&fresh);
        if self.upstream_eof {
            if let Some(r) = self.responses.close() {
                self.response_done(r);
            }
        }
        self.release_refusal();
    }

    /// Matches responses from upstream to the requests they answer.
    fn track_responses(&mut self, data: &[u8]) {
        if self.port != 80 {
            return;
        }
        // The next response head answers the first pending request, or the
        // second if the first one's response is still under way.
        let mut index = usize::from(self.responses.in_response());
        let pending = &self.pending;
        let done = self.responses.feed(data, || {
            let head = pending.get(index).is_some_and(|p| p.1);
            index += 1;
            head
        });
        for r in done {
            self.response_done(r);
        }
    }

    fn response_done(&mut self, r: http::Response) {
        if let Some((mut event, _, up)) = self.pending.pop_front() {
            event["status"] = json!(r.status);
            event["bytes_up"] = json!(up);
            event["bytes_down"] = json!(r.bytes);
            self.events.push(event);
        }
    }

    /// The lines logged when the connection ends: requests that got no
    /// (complete) response, then the connection's totals.
    pub fn end_events(&mut self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .pending
            .drain(..)
            .map(|(mut e, _, up)| {
                e["status"] = Value::Null;
                e["bytes_up"] = json!(up);
                e
            })
            .collect();
        out.push(json!({"event": "conn_end", "dst": self.dst.to_string(), "port": self.port,
            "name": self.name.as_ref().map(|n| n.as_str()), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}));
        out
    }
}
