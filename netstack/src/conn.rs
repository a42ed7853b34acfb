//! Host side: one guest TCP connection to port 80 or 443 of an address
//! netstack handed out, terminated here. Port 80: every request head is
//! parsed and checked (Host must be the name bound to the address, then the
//! policy by method and normalised path) before a byte goes upstream;
//! bodies are tracked so that the next request on a kept-alive connection
//! is checked too. Port 443: the ClientHello's SNI must be that name and
//! allowed; then, for a host the policy has netstack terminate (every host
//! but those it opts out, [`Policy::terminates`]), the TLS session ends
//! here ([`crate::terminate`]) and the requests inside are
//! handled exactly like port 80's, with a TLS session of netstack's own to
//! the upstream; there, and only there, credentials are injected
//! ([`crate::credential`]); else (passthrough, or no CA) bytes are spliced
//! without decrypting, every handshake record the guest sends before
//! encryption starts still parsed ([`tls::HandshakeWatch`]: a second
//! ClientHello must name the same server). Refused: HTTP 403 (inside TLS
//! when terminated) with one JSON body whatever the cause,
//! `{"error":"sbx_denied","rule":…,"host":…,"ask":"sbx policy allow NAME
//! HOST","reason":"request refused: …"}`, or a reset for spliced TLS; no
//! upstream socket is opened for a refused request. Decisions are
//! [`crate::live::judge`]'s (live rules, the policy, ask rules); a request
//! to be held waits in `Phase::Held`, unread, until a person answers
//! ([`Conn::poll_held`]). A request a GraphQL ask rule may hold (its
//! head matches one, [`Judgement::needs_body`]) is judged only once its
//! whole body (at most [`crate::graphql::MAX_BODY`]) is in the inbox; a
//! chunked, encoded or larger body is judged unreadable, so held. A credential's placeholder on its way to
//! a host it is not bound to (head or body) is refused as a leak attempt.
//!
//! Upstream: the name is resolved once per connection on a connect thread
//! ([`Resolve::lookup`]) and [`choose_upstream`] picks the address: an
//! override as configured, else the first global unicast address
//! ([`crate::stack::classify_ip`]) or one an allow rule lists in
//! `addresses`; that very address is connected to (no second resolution,
//! so no DNS rebinding). None acceptable: a 502 (a reset for TLS) and an
//! audit line naming each refused address and why.
//!
//! Bounds: [`MAX_BUFFERED`] bytes wait in each direction; reading stops
//! until they drain (backpressure on both sides). At most
//! [`MAX_IN_FLIGHT`] requests per connection await their responses: past
//! that, or once the upstream's responses cannot be delimited, nothing more
//! is read from the guest (its bytes stay in the guest socket's buffer). At
//! most [`MAX_CONNECT_THREADS`] connect threads run at once per stack
//! ([`ConnectSlots`]); a connection waits for a slot up to
//! [`MAX_CONNECT_WAIT`], then gets a 502. A connect thread whose connection
//! went away does not connect; one that already did drops its socket.
//! Time limits per connection (response head, upstream silence, a guest
//! that reads nothing) are the stack's, see [`crate::limits`]
//! ([`Conn::activity`], [`Conn::time_out`]).

use std::collections::VecDeque;
use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit::{Decision, Event, Exchange};
use serde_json::json;

use crate::credential::{LeakScanner, Rewrite, Scrubber};
use crate::graphql;
use crate::host::HostName;
use crate::http::{self, BodyScanner, Parsed, ResponseTracker};
use crate::live::{self, Answer, AskRule, Judgement, Live, LiveRules, QKey, Ticket, Verdict};
use crate::oauth;
use crate::policy::{Policy, Request};
use crate::stack::{classify_ip, AddrClass};
use crate::terminate::{self, GuestTls, Termination, Upstream};
use crate::tls;

/// Bytes buffered in each direction before reading pauses.
pub const MAX_BUFFERED: usize = 256 * 1024;
/// Requests on one connection that may await their responses at once
/// (pipelining); the next one waits, unread, in the guest's socket.
pub const MAX_IN_FLIGHT: usize = 16;
/// Connect threads (resolution and TCP connect) running at once per stack.
pub const MAX_CONNECT_THREADS: usize = 16;
/// How long a connection waits for a connect thread before a 502.
pub const MAX_CONNECT_WAIT: Duration = Duration::from_secs(30);
/// Addresses of one name considered; the rest of the answer is ignored.
pub const MAX_CANDIDATES: usize = 32;
/// Longest TCP connect to an upstream (on its connect thread).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from an upstream socket at a time.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Where a name's upstream addresses came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// An explicit override (`sbx run --resolve`): used as it is, whatever
    /// the address.
    Override(SocketAddr),
    /// The resolver's answer, in its order: each address is checked
    /// ([`choose_upstream`]) before one is used.
    Resolved(Vec<SocketAddr>),
    /// No address.
    NotFound,
}

/// Where upstream connections go: name and port to socket addresses.
/// Called on a connection's own thread: it may block.
pub trait Resolve: Send + Sync {
    /// One address for the name (kept for compatibility; netstack itself
    /// uses [`Resolve::lookup`]).
    fn resolve(&self, name: &HostName, port: u16) -> Option<SocketAddr>;

    /// Every candidate and where it came from. The default treats
    /// [`Resolve::resolve`]'s answer as resolved, so it is checked.
    fn lookup(&self, name: &HostName, port: u16) -> Lookup {
        match self.resolve(name, port) {
            Some(a) => Lookup::Resolved(vec![a]),
            None => Lookup::NotFound,
        }
    }
}

/// Why no upstream connection was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// The resolver has no address for the name.
    Unresolved(String),
    /// Every address is non-global and none is permitted by the policy.
    NotGlobal { name: String, refused: Vec<(IpAddr, AddrClass)> },
    /// The TCP connect to the chosen address failed.
    Connect(SocketAddr, String),
    /// No connect thread became free within [`MAX_CONNECT_WAIT`].
    Busy,
    /// The connect thread could not be started.
    Thread(String),
    /// The connect thread ended without an answer.
    ThreadEnded,
    /// netstack's TLS session to the upstream failed: its certificate did
    /// not verify for the name, or the handshake failed.
    Tls(SocketAddr, String),
    /// The connection went away first (never reported to it).
    Cancelled,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Unresolved(name) => write!(f, "cannot resolve {name}"),
            UpstreamError::NotGlobal { name, refused } => {
                write!(f, "{name} resolves to no global unicast address (")?;
                for (i, (addr, class)) in refused.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{addr}: {class}")?;
                }
                write!(f, "); a policy rule's `addresses` can permit one")
            }
            UpstreamError::Connect(addr, e) => write!(f, "{addr}: {e}"),
            UpstreamError::Busy => write!(
                f,
                "no connect thread free for {}s (at most {MAX_CONNECT_THREADS} run at once)",
                MAX_CONNECT_WAIT.as_secs()
            ),
            UpstreamError::Thread(e) => write!(f, "cannot start a connect thread: {e}"),
            UpstreamError::ThreadEnded => write!(f, "connect thread ended"),
            UpstreamError::Tls(addr, e) => write!(f, "TLS to {addr} failed, nothing was sent: {e}"),
            UpstreamError::Cancelled => write!(f, "connection closed while connecting"),
        }
    }
}

/// Picks the one address to connect to: an override as it is; else the
/// first resolved address (of at most [`MAX_CANDIDATES`]) that is global
/// unicast or listed in `permitted` (compared in canonical form, so
/// `::ffff:10.0.0.5` is `10.0.0.5`). The port is the resolver's.
pub fn choose_upstream(name: &HostName, lookup: Lookup, permitted: &[IpAddr]) -> Result<SocketAddr, UpstreamError> {
    let candidates = match lookup {
        Lookup::Override(addr) => return Ok(addr),
        Lookup::NotFound => return Err(UpstreamError::Unresolved(name.to_string())),
        Lookup::Resolved(c) if c.is_empty() => return Err(UpstreamError::Unresolved(name.to_string())),
        Lookup::Resolved(c) => c,
    };
    let mut refused = Vec::new();
    for addr in candidates.into_iter().take(MAX_CANDIDATES) {
        let ip = addr.ip().to_canonical();
        let class = classify_ip(ip);
        if class == AddrClass::Global || permitted.iter().any(|p| p.to_canonical() == ip) {
            return Ok(SocketAddr::new(ip, addr.port()));
        }
        refused.push((ip, class));
    }
    Err(UpstreamError::NotGlobal { name: name.to_string(), refused })
}

/// Called (on a connect thread) when a connect ends: its result is there
/// to take, and its slot is free (see [`crate::stack::NetStack::set_waker`]).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The stack-wide count of running connect threads, capped.
#[derive(Debug)]
pub struct ConnectSlots {
    running: AtomicUsize,
    cap: usize,
    /// Connections that gave up waiting for a slot ([`UpstreamError::Busy`]).
    busy: AtomicUsize,
    waker: std::sync::Mutex<Option<WakeFn>>,
}

struct WakeFn(Waker);

impl fmt::Debug for WakeFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Waker")
    }
}

/// One running connect thread's place; given back when dropped (after
/// the thread sent its result), waking the stack's event loop.
struct Slot(Arc<ConnectSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        let waker = self.0.waker.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|w| w.0.clone());
        if let Some(wake) = waker {
            wake();
        }
    }
}

impl ConnectSlots {
    /// Room for `cap` connect threads at once.
    pub fn new(cap: usize) -> Arc<ConnectSlots> {
        Arc::new(ConnectSlots {
            running: AtomicUsize::new(0),
            cap,
            busy: AtomicUsize::new(0),
            waker: std::sync::Mutex::new(None),
        })
    }

    /// Calls `waker` each time a connect thread ends.
    pub fn set_waker(&self, waker: Waker) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(WakeFn(waker));
    }

    /// Connect threads running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Connections that got a 502 because no slot became free in time.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.running.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.cap).then_some(n + 1)).ok()?;
        Some(Slot(self.clone()))
    }
}

/// Set when the connection stops waiting for its connect thread (the
/// connection ended, or was refused or reset meanwhile).
#[derive(Debug)]
struct Cancel(Arc<AtomicBool>);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// An OAuth refresh's answer for the guest, how it was answered, the new
/// expiry (Unix ms).
type Refreshed = Result<(Vec<u8>, oauth::Outcome, u64), oauth::Error>;

type Dialled = Result<(Upstream, SocketAddr), UpstreamError>;

/// An upstream connection being set up.
#[derive(Debug)]
enum Dial {
    /// Waiting for a connect slot since the instant given; with the TLS
    /// configuration when netstack speaks TLS upstream.
    Queued { name: HostName, permitted: Vec<IpAddr>, tls: Option<Arc<rustls::ClientConfig>>, since: Instant },
    /// On a connect thread; dropping the dial cancels it.
    Running { rx: Receiver<Dialled>, _cancel: Cancel },
}

#[derive(Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head / ClientHello.
    Head,
    /// Passing a request body upstream.
    Body(BodyScanner),
    /// TLS allowed: bytes pass both ways untouched; the guest's are
    /// watched while its handshake may still be in plaintext.
    Splice(Option<Box<tls::HandshakeWatch>>),
    /// Resolving and connecting upstream on a helper thread (so that a
    /// slow upstream never stalls other connections); what the guest sends
    /// meanwhile waits in the buffers.
    Connecting(Dial, Box<Phase>),
    /// The upstream's responses cannot be delimited any more: no further
    /// request is read; the connection closes when the upstream does.
    Draining,
    /// A refusal is being written; then the connection closes.
    Refusing,
    /// Reset: nothing more passes.
    Reset,
    /// Held for a person's answer ([`crate::live`]): the request head or
    /// ClientHello waits in the inbox, nothing is read or sent upstream.
    Held(Ticket, QKey),
    /// An OAuth refresh is being answered on a helper thread
    /// ([`crate::oauth`]); its request's audit line waits with it. Nothing
    /// more is read; the answer closes the connection.
    Exchanging(Receiver<Refreshed>, Box<Exchange>),
}

pub struct Conn {
    pub port: u16,
    pub dst: Ipv4Addr,
    name: Option<HostName>,
    phase: Phase,
    inbox: Vec<u8>,
    upstream: Option<Upstream>,
    /// TLS termination, if the stack has it.
    termination: Option<Arc<Termination>>,
    /// The guest's TLS session, once terminated: `inbox` and `to_guest`
    /// then hold its plaintext.
    guest_tls: Option<GuestTls>,
    /// Looks for credential placeholders in the current request's body.
    leak_scan: LeakScanner,
    /// A credential was injected on this connection (responses are
    /// scrubbed on every HTTP connection of a sandbox with credentials).
    injected: bool,
    scrubber: Scrubber,
    /// The address connected to, for the audit.
    upstream_addr: Option<SocketAddr>,
    slots: Arc<ConnectSlots>,
    to_upstream: Vec<u8>,
    to_guest: Vec<u8>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    upstream_eof: bool,
    upstream_shut: bool,
    /// A 403 waiting for the responses to earlier, allowed requests.
    refusal: Option<Vec<u8>>,
    /// Allowed requests awaiting their response (at most
    /// [`MAX_IN_FLIGHT`]): audit line, HEAD?, bytes up.
    pending: VecDeque<(Exchange, bool, u64)>,
    /// A request head waits in `inbox` for a free in-flight place.
    stalled: bool,
    responses: ResponseTracker,
    pub events: Vec<Event>,
    /// The sandbox's live rules and questions ([`crate::live`]).
    live: Option<Arc<Live>>,
    /// Questions a person said yes to for this connection (at most
    /// [`MAX_APPROVED`]).
    approved: Vec<QKey>,
    /// Set by `judge`: the request is to be held on this question.
    to_hold: Option<(QKey, Option<AskRule>, Hold)>,
    /// The rule of the last refusal, for the deny answer.
    denied_rule: Option<String>,
}

/// What a request's body (`rest`: the inbox after its head) says for
/// GraphQL ask rules: None while a body of known length is still arriving;
/// chunked, encoded or too large bodies are not awaited (errors, so held).
/// What a GraphQL ask rule found in a request to be held
/// ([`Judgement::detail`], [`Judgement::mutations`]).
#[derive(Debug, Default)]
struct Hold {
    detail: Option<String>,
    mutations: Option<Vec<String>>,
}

fn graphql_body(head: &http::RequestHead, rest: &[u8]) -> Option<graphql::Scan> {
    let coded = head.headers.iter().find(|(k, v)| {
        k == "content-encoding"
            && v.split(',').any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
    });
    if let Some((_, v)) = coded {
        return Some(Err(graphql::Error::Encoded(v.chars().take(40).collect())));
    }
    match head.body {
        http::Body::Chunked => Some(Err(graphql::Error::Chunked)),
        http::Body::Length(n) if n > graphql::MAX_BODY as u64 => Some(Err(graphql::Error::TooLarge(n))),
        http::Body::Length(n) => rest.get(..n as usize).map(graphql::scan_body),
        http::Body::None => Some(graphql::scan_body(b"")),
    }
}

/// Questions remembered as approved on one connection.
pub const MAX_APPROVED: usize = 8;

/// The one deny signal: a 403 with a short JSON body naming the rule, the
/// host and the command that would allow it (`NAME`: the sandbox).
fn denied_response(reason: &str, rule: Option<&str>, host: Option<&str>, sandbox: &str) -> Vec<u8> {
    // The machine's admin rules: no command of the sandbox's user lifts them.
    let ask = match host {
        _ if rule.is_some_and(|r| r.starts_with(crate::policy::ADMIN_ASK_ORIGIN)) => {
            Some("the machine's administrator: its admin policy denies this, no sbx command lifts it".to_string())
        }
        Some(h) => Some(format!("sbx policy allow {sandbox} {h}")),
        None => None,
    };
    let body = json!({"error": "sbx_denied", "rule": rule, "host": host, "ask": ask,
        "reason": format!("request refused: {reason}")})
    .to_string()
        + "\n";
    let len = body.len();
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}"
    )
    .into_bytes()
}

/// A short plain-text response that closes the connection.
fn plain_response(status: &str, text: &str) -> Vec<u8> {
    let body = format!("sbx: {text}\n");
    let len = body.len();
    format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}")
        .into_bytes()
}

fn bad_gateway(e: &UpstreamError) -> Vec<u8> {
    let what = match e {
        UpstreamError::NotGlobal { .. } | UpstreamError::Busy => "upstream refused",
        UpstreamError::Tls(..) => "upstream TLS failed",
        _ => "upstream unreachable",
    };
    plain_response("502 Bad Gateway", &format!("{what}: {e}"))
}

/// Resolves, picks the address and connects on a helper thread holding
/// `slot`; the result arrives on the returned channel. The thread checks
/// the returned cancel flag before connecting.
fn connect(
    name: HostName,
    port: u16,
    permitted: Vec<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    resolver: &Arc<dyn Resolve>,
    slot: Slot,
) -> Dial {
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let (cancelled, resolver) = (cancel.clone(), resolver.clone());
    let spawned = std::thread::Builder::new().name("netstack-connect".into()).spawn(move || {
        let _slot = slot;
        let result = (|| {
            let addr = choose_upstream(&name, resolver.lookup(&name, port), &permitted)?;
            if cancelled.load(Ordering::Acquire) {
                return Err(UpstreamError::Cancelled);
            }
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .map_err(|e| UpstreamError::Connect(addr, e.to_string()))?;
            let _ = stream.set_nodelay(true);
            crate::limits::bound_receive_buffer(&stream);
            let upstream = match &tls {
                Some(config) => terminate::handshake(
                    stream.try_clone().map_err(|e| UpstreamError::Connect(addr, e.to_string()))?,
                    config,
                    &name,
                )
                .map_err(|e| UpstreamError::Tls(addr, e))?,
                None => Upstream::Plain(stream.try_clone().map_err(|e| UpstreamError::Connect(addr, e.to_string()))?),
            };
            stream.set_nonblocking(true).map_err(|e| UpstreamError::Connect(addr, e.to_string()))?;
            Ok((upstream, addr))
        })();
        // The connection may be gone: the stream is then dropped (closed).
        let _ = tx.send(result);
    });
    match spawned {
        Ok(_) => Dial::Running { rx, _cancel: Cancel(cancel) },
        Err(e) => failed(UpstreamError::Thread(e.to_string())),
    }
}

/// A dial that failed before any thread ran.
fn failed(e: UpstreamError) -> Dial {
    let (tx, rx) = mpsc::channel();
    let _ = tx.send(Err(e));
    Dial::Running { rx, _cancel: Cancel(Arc::new(AtomicBool::new(true))) }
}

impl Conn {
    /// A connection with its own connect slots (at most
    /// [`MAX_CONNECT_THREADS`]); the stack shares one set between all its
    /// connections ([`Conn::with_slots`]).
    pub fn new(port: u16, dst: Ipv4Addr, name: Option<HostName>) -> Conn {
        Conn::with_slots(port, dst, name, ConnectSlots::new(MAX_CONNECT_THREADS))
    }

    /// A connection whose connect threads count against `slots`.
    pub fn with_slots(port: u16, dst: Ipv4Addr, name: Option<HostName>, slots: Arc<ConnectSlots>) -> Conn {
        Conn {
            port,
            dst,
            name,
            phase: Phase::Head,
            inbox: Vec::new(),
            upstream: None,
            termination: None,
            guest_tls: None,
            leak_scan: LeakScanner::default(),
            injected: false,
            scrubber: Scrubber::default(),
            upstream_addr: None,
            slots,
            to_upstream: Vec::new(),
            to_guest: Vec::new(),
            bytes_up: 0,
            bytes_down: 0,
            upstream_eof: false,
            upstream_shut: false,
            refusal: None,
            pending: VecDeque::new(),
            stalled: false,
            responses: ResponseTracker::default(),
            events: Vec::new(),
            live: None,
            approved: Vec::new(),
            to_hold: None,
            denied_rule: None,
        }
    }

    /// The same connection, judged with the sandbox's live rules and able
    /// to hold requests for a person ([`crate::live`]).
    pub fn with_live(mut self, live: Option<Arc<Live>>) -> Conn {
        self.live = live;
        self
    }

    /// True while a request waits for a person's answer.
    pub fn is_held(&self) -> bool {
        matches!(self.phase, Phase::Held(..))
    }

    /// The same connection, able to terminate TLS and inject credentials.
    pub fn with_termination(mut self, termination: Option<Arc<Termination>>) -> Conn {
        self.termination = termination;
        self
    }

    /// True where requests are read: port 80, and 443 once terminated.
    fn speaks_http(&self) -> bool {
        self.port == 80 || self.guest_tls.is_some()
    }

    /// True once the guest's TLS session is terminated here.
    pub fn is_terminated(&self) -> bool {
        self.guest_tls.is_some()
    }

    /// Room for more bytes from the guest: the buffers have room, and the
    /// guest's next request head would not exceed [`MAX_IN_FLIGHT`].
    pub fn wants_guest_bytes(&self) -> bool {
        let phase_reads = match self.phase {
            Phase::Head => !self.stalled,
            Phase::Body(_) | Phase::Splice(_) | Phase::Connecting(..) => true,
            Phase::Draining | Phase::Refusing | Phase::Reset | Phase::Held(..) | Phase::Exchanging(..) => false,
        };
        phase_reads && self.inbox.len() < MAX_BUFFERED && self.to_upstream.len() < MAX_BUFFERED
    }

    pub fn from_guest(&mut self, data: &[u8], policy: &Policy, resolver: &Arc<dyn Resolve>) {
        match &mut self.guest_tls {
            Some(tls) => {
                if let Err(e) = tls.receive(data, &mut self.inbox) {
                    self.tls_failed(e);
                    return;
                }
            }
            None => self.inbox.extend_from_slice(data),
        }
        self.process(policy, resolver);
    }

    /// The guest's TLS session failed (its alert is queued): logged, and
    /// the connection closes once the alert is out.
    fn tls_failed(&mut self, e: rustls::Error) {
        self.events.push(Event::Tls(Exchange {
            dst: Some(self.dst.to_string()),
            sni: Some(self.name.as_ref().map(|n| n.to_string())),
            terminated: Some(true),
            decision: Some(Decision::Deny),
            reason: Some(format!("guest TLS failed: {e}")),
            ..Exchange::default()
        }));
        self.inbox.clear();
        self.to_upstream.clear();
        self.refusal = None;
        self.stalled = false;
        self.phase = Phase::Refusing;
    }

    /// Bytes waiting for the guest (encrypted first when terminated).
    pub fn to_guest(&mut self) -> &mut Vec<u8> {
        let done = self.plain_finished();
        match &mut self.guest_tls {
            Some(tls) => {
                tls.send(&mut self.to_guest);
                if done {
                    tls.close();
                }
                tls.wire()
            }
            None => &mut self.to_guest,
        }
    }

    /// Everything for the guest was handed on and nothing more will come.
    fn plain_finished(&self) -> bool {
        self.to_guest.is_empty()
            && self.refusal.is_none()
            && (matches!(self.phase, Phase::Refusing) || self.upstream_eof)
    }

    pub fn is_reset(&self) -> bool {
        matches!(self.phase, Phase::Reset)
    }

    /// Requests awaiting their responses.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// True when everything for the guest is written and nothing more will
    /// come: the guest socket can be closed.
    pub fn finished(&self) -> bool {
        self.plain_finished() && self.guest_tls.as_ref().is_none_or(GuestTls::wire_is_empty)
    }

    /// Refuses the current request. HTTP: a 403 naming the reason, sent
    /// after the responses to requests already allowed on this connection
    /// (their bytes still go upstream, which is then half-closed; the 403
    /// follows its last byte). TLS: a reset.
    fn refuse(&mut self, reason: String) {
        self.inbox.clear();
        self.stalled = false;
        if self.speaks_http() {
            let sandbox = self.live.as_ref().map_or("NAME", |l| l.sandbox.as_str());
            let host = self.name.as_ref().map(|n| n.as_str());
            self.refusal = Some(denied_response(&reason, self.denied_rule.as_deref(), host, sandbox));
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
            let http = self.speaks_http();
            match &mut self.phase {
                Phase::Refusing
                | Phase::Reset
                | Phase::Draining
                | Phase::Connecting(..)
                | Phase::Held(..)
                | Phase::Exchanging(..) => return,
                Phase::Splice(watch) => {
                    let watched = watch.as_mut().map(|w| w.feed(&self.inbox).map(|()| w.is_done()));
                    match watched {
                        Some(Err(e)) => return self.handshake_refused(e),
                        Some(Ok(true)) => *watch = None,
                        _ => {}
                    }
                    self.to_upstream.append(&mut self.inbox);
                    return;
                }
                Phase::Body(scanner) => {
                    // With credentials about, the body's content is
                    // searched for placeholders before it is forwarded.
                    let mut leak: Option<String> = None;
                    let fed = match (&self.termination, &self.name) {
                        (Some(t), Some(host)) if !t.credentials.is_empty() => {
                            let (creds, scan) = (&t.credentials, &mut self.leak_scan);
                            // Content and framing (chunk extensions,
                            // trailers) alike.
                            scanner.feed_parts(&self.inbox, |content, bytes| {
                                if leak.is_none() {
                                    let found = match content {
                                        true => scan.scan(creds, host, bytes),
                                        false => scan.scan_framing(creds, host, bytes),
                                    };
                                    leak = found.map(|c| c.name().to_string());
                                }
                            })
                        }
                        _ => scanner.feed(&self.inbox),
                    };
                    match fed {
                        Ok(n) => {
                            let done = scanner.is_done();
                            if let Some(credential) = leak {
                                self.body_leak(&credential);
                                return;
                            }
                            if done {
                                self.phase = Phase::Head;
                            }
                            self.to_upstream.extend(self.inbox.drain(..n));
                            if let Some(p) = self.pending.back_mut() {
                                p.2 += n as u64;
                            }
                            if !done {
                                return;
                            }
                        }
                        Err(e) => {
                            self.events.push(Event::Http(Exchange {
                                decision: Some(Decision::Deny),
                                reason: Some(e.to_string()),
                                ..Exchange::default()
                            }));
                            self.refuse(e.to_string());
                            return;
                        }
                    }
                }
                Phase::Head if self.inbox.is_empty() => return,
                Phase::Head if http && self.responses.is_lost() => {
                    self.drain();
                    return;
                }
                Phase::Head if http && self.pending.len() >= MAX_IN_FLIGHT => {
                    // Backpressure: this head waits, and nothing more is
                    // read, until a response completes.
                    self.stalled = true;
                    return;
                }
                Phase::Head if http => {
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

    /// Takes up a request head that waited for an in-flight place (or
    /// drains, if responses cannot be tracked any more). Called each poll.
    pub fn resume(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        if self.stalled && (self.pending.len() < MAX_IN_FLIGHT || self.responses.is_lost()) {
            self.stalled = false;
            self.process(policy, resolver);
        }
    }

    /// The upstream's responses can no longer be matched to requests: the
    /// requests already sent get their responses, no further one is read,
    /// and the connection closes after the upstream's last byte.
    fn drain(&mut self) {
        self.events.push(Event::Http(Exchange {
            dst: Some(self.dst.to_string()),
            decision: Some(Decision::Deny),
            reason: Some("upstream responses could not be delimited: no further requests on this connection".into()),
            ..Exchange::default()
        }));
        self.inbox.clear();
        self.stalled = false;
        self.phase = Phase::Draining;
    }

    /// Handles one request head; false when no progress can be made.
    fn http_head(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) -> bool {
        let (head, len) = match http::parse_request_head(&self.inbox) {
            Ok(Parsed::Incomplete) => return false,
            Ok(Parsed::Complete(head, len)) => (head, len),
            Err(e) => {
                self.events.push(Event::Http(Exchange {
                    decision: Some(Decision::Deny),
                    reason: Some(e.to_string()),
                    ..Exchange::default()
                }));
                self.refuse(e.to_string());
                return false;
            }
        };
        let mut event = Exchange {
            method: Some(head.method.clone()),
            host: Some(Some(head.host.to_string())),
            path: Some(head.target.clone()),
            dst: Some(self.dst.to_string()),
            ..Exchange::default()
        };
        let path = http::normalize_path(&head.target);
        if let Ok(p) = &path {
            if *p != head.target {
                event.normalized_path = Some(p.clone());
            }
        }
        if self.guest_tls.is_some() {
            event.tls = Some("terminated".into());
        }
        // A refresh to an OAuth token endpoint: netstack answers it
        // ([`crate::oauth`]) once its whole (small) body is here.
        let session = match (&self.termination, &self.guest_tls) {
            (Some(t), Some(_)) => {
                t.credentials.oauth_for(&head.host, &head.method, path.as_deref().unwrap_or(&head.target)).cloned()
            }
            _ => None,
        };
        let mut oauth_body = None;
        if let Some(session) = &session {
            let n = match head.body {
                http::Body::Length(n) if n <= oauth::MAX_TOKEN_REQUEST as u64 => n as usize,
                _ => {
                    let e = oauth::Error::RequestFraming;
                    event.oauth = Some(session.name.clone());
                    event.decision = Some(Decision::Deny);
                    event.reason = Some(e.to_string());
                    self.events.push(Event::Http(event));
                    self.oauth_answer(oauth::error_response(&e));
                    return false;
                }
            };
            if self.inbox.len() < len + n {
                return false;
            }
            oauth_body = Some(n);
        }
        let rewrite = match &self.termination {
            Some(t) => t.credentials.rewrite(&head.host, &self.inbox[..len], self.guest_tls.is_some()),
            None => Rewrite::Unchanged,
        };
        let refusal = if self.name.as_ref() != Some(&head.host) {
            Some(format!(
                "Host '{}' is not the name this address was resolved for ({})",
                head.host,
                self.name.as_ref().map(|n| n.as_str()).unwrap_or("none")
            ))
        } else if head.host_port.is_some_and(|p| p != self.port) {
            Some("Host names another port".into())
        } else if let Rewrite::Leak { credential } = &rewrite {
            event.leak = Some(credential.to_string());
            Some(format!(
                "the placeholder of credential '{credential}' was sent to {}, which it is not bound to (leak attempt)",
                head.host
            ))
        } else if let (true, Err(e)) = (policy.has_path_rules(&head.host, self.port), &path) {
            Some(format!("path rules apply to {} and {e}", head.host))
        } else {
            // As sent: judged on its normalised path (and query, for ask
            // rules' `?KEY=VALUE`), and its body where a GraphQL ask
            // rule needs it.
            match self.judge_request(policy, &head, len, &mut event) {
                Some(refusal) => refusal,
                // The rest of the body is awaited (still unread).
                None => return false,
            }
        };
        if let Some(reason) = refusal {
            self.deny(Event::Http(event), reason);
            return false;
        }
        if let Some((key, ask, what)) = self.to_hold.take() {
            self.hold(key, ask, Some((&head.method, &head.target)), what, Event::Http(event));
            return false;
        }
        event.decision = Some(Decision::Allow);
        if let (Some(session), Some(n), Some(t)) = (session, oauth_body, self.termination.clone()) {
            let body = zeroize::Zeroizing::new(self.inbox[len..len + n].to_vec());
            self.inbox.drain(..len + n);
            event.oauth = Some(session.name.clone());
            let exchange = oauth::TlsExchange {
                config: t.upstream_config().clone(),
                resolver: resolver.clone(),
                permitted: policy.permitted_addresses(&head.host, self.port),
            };
            let (tx, rx) = mpsc::channel();
            let host = head.host.clone();
            // A connect slot: its end wakes the event loop. None free, or
            // no thread: the channel closes, an error for the guest.
            let Some(slot) = self.slots.try_acquire() else {
                self.phase = Phase::Exchanging(rx, Box::new(event));
                return false;
            };
            let _ = std::thread::Builder::new().name("netstack-oauth".into()).spawn(move || {
                let _slot = slot;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let r = session.refresh(&host, &body, &exchange, now_ms);
                if r.is_ok() {
                    t.credentials.refreshed();
                }
                let _ = tx.send(r.map(|(b, o)| (b, o, session.expires_at_ms())));
            });
            self.phase = Phase::Exchanging(rx, Box::new(event));
            return false;
        }
        let sent = match rewrite {
            Rewrite::Injected { head: injected, credentials } => {
                if !credentials.is_empty() {
                    event.credential = Some(credentials.join(","));
                    self.injected = true;
                }
                self.inbox.drain(..len);
                self.to_upstream.extend_from_slice(&injected);
                injected.len()
            }
            _ => {
                self.to_upstream.extend(self.inbox.drain(..len));
                len
            }
        };
        // Logged when its response ends, with status and sizes.
        self.pending.push_back((event, head.method == "HEAD", sent as u64));
        self.leak_scan = LeakScanner::default();
        let next = Phase::Body(BodyScanner::new(head.body));
        if self.upstream.is_none() {
            self.start_connect(head.host, policy, resolver, next);
            return false;
        }
        self.phase = next;
        true
    }

    /// An OAuth refresh was answered: its audit lines (the request's and
    /// the refresh's, never a value) and the answer, which closes the
    /// connection after the responses before it.
    fn oauth_done(&mut self, result: Refreshed, mut event: Exchange) {
        let credential = event.oauth.clone();
        let sandbox = self.live.as_ref().map(|l| l.sandbox.clone());
        let mut refresh = json!({"event": "oauth", "credential": credential, "host": event.host.clone().flatten(),
            "sandbox": sandbox});
        let response = match result {
            Ok((body, outcome, expires_at_ms)) => {
                refresh["outcome"] = json!(match outcome {
                    oauth::Outcome::Exchanged => "exchanged",
                    oauth::Outcome::FromStore => "from_store",
                });
                refresh["expires_at_ms"] = json!(expires_at_ms);
                event.status = Some(Some(200));
                oauth::ok_response(&body)
            }
            Err(e) => {
                refresh["outcome"] = json!("refused");
                refresh["reason"] = json!(e.to_string());
                event.status = Some(e.status().get(..3).and_then(|s| s.parse::<u16>().ok()));
                oauth::error_response(&e)
            }
        };
        event.bytes_down = Some(response.len() as u64);
        self.events.push(Event::Http(event));
        self.events.push(Event::Untyped(refresh));
        self.oauth_answer(response);
    }

    /// Sends `response` after the responses to earlier requests; then the
    /// connection closes.
    fn oauth_answer(&mut self, response: Vec<u8>) {
        self.inbox.clear();
        self.stalled = false;
        self.refusal = Some(response);
        self.phase = Phase::Refusing;
        self.release_refusal();
    }

    /// A request body carried the placeholder of `credential` to a host it
    /// is not bound to: logged as a leak attempt and refused.
    fn body_leak(&mut self, credential: &str) {
        let host = self.name.as_ref().map(|n| n.as_str()).unwrap_or("?");
        let reason = format!(
            "the placeholder of credential '{credential}' was sent to {host}, which it is not bound to (leak attempt, in a body)"
        );
        self.events.push(Event::Http(Exchange {
            host: Some(Some(host.to_string())),
            dst: Some(self.dst.to_string()),
            decision: Some(Decision::Deny),
            leak: Some(credential.to_string()),
            reason: Some(reason.clone()),
            ..Exchange::default()
        }));
        self.refuse(reason);
    }

    /// Sets off the upstream connection for `name`, then `next`.
    fn start_connect(&mut self, name: HostName, policy: &Policy, resolver: &Arc<dyn Resolve>, next: Phase) {
        let permitted = policy.permitted_addresses(&name, self.port);
        let tls = match (&self.guest_tls, &self.termination) {
            (Some(_), Some(t)) => Some(t.upstream_config().clone()),
            _ => None,
        };
        let dial = Dial::Queued { name, permitted, tls, since: Instant::now() };
        self.phase = Phase::Connecting(dial, Box::new(next));
        self.poll_connect(policy, resolver);
    }

    /// The decision for this request ([`live::judge`]: live rules, the
    /// policy, ask rules), noted in `event`; the refusal text if it is
    /// denied. A request to be held is noted in `to_hold`.
    fn judge(
        &mut self,
        policy: &Policy,
        host: &HostName,
        http: Option<(&str, &str)>,
        event: &mut Exchange,
    ) -> Option<String> {
        let req = Request { host, port: self.port, http };
        let j = match &self.live {
            Some(l) => l.judge(policy, &req),
            None => live::judge(policy, &LiveRules::default(), &req, 0),
        };
        self.verdict(j, event)
    }

    /// [`Conn::judge`] for a request head (`len` bytes at the start of the
    /// inbox). Where a GraphQL ask rule needs the body
    /// ([`Judgement::needs_body`]), it is awaited in the inbox, unread
    /// (None until it is whole; at most [`graphql::MAX_BODY`] bytes, the
    /// wait bounded as a slow head's is), and the request judged with it;
    /// a body that cannot be awaited or read is judged as unreadable
    /// (held). Any other request is judged on its head alone, as before.
    fn judge_request(
        &mut self,
        policy: &Policy,
        head: &http::RequestHead,
        len: usize,
        event: &mut Exchange,
    ) -> Option<Option<String>> {
        let req = Request { host: &head.host, port: self.port, http: Some((&head.method, &head.target)) };
        let judge = |body: Option<&graphql::Scan>| match &self.live {
            Some(l) => l.judge_body(policy, &req, body),
            None => live::judge_body(policy, &LiveRules::default(), &req, body, 0),
        };
        let mut j = judge(None);
        if j.needs_body {
            let scan = graphql_body(head, self.inbox.get(len..).unwrap_or_default())?;
            j = judge(Some(&scan));
        }
        if let Some(d) = &j.detail {
            event.graphql = Some(d.clone());
        }
        Some(self.verdict(j, event))
    }

    /// Acts on a judgement: a use of a live grant counted, an approved
    /// question let through, a question to hold noted.
    fn verdict(&mut self, j: Judgement, event: &mut Exchange) -> Option<String> {
        event.rule = Some(j.rule.clone());
        match j.verdict {
            Verdict::Allow => {
                if let (Some(l), Some(g)) = (&self.live, j.grant) {
                    l.consume(g);
                }
                None
            }
            Verdict::Deny => {
                self.denied_rule = j.rule;
                Some(j.reason)
            }
            Verdict::Ask(key) if self.approved.contains(&key) => {
                event.approved = Some(true);
                None
            }
            Verdict::Ask(_) if self.live.is_none() => Some(format!("{}, but nobody can answer here", j.reason)),
            Verdict::Ask(key) => {
                self.to_hold = Some((key, j.ask, Hold { detail: j.detail, mutations: j.mutations }));
                None
            }
        }
    }

    /// Holds the request (head or ClientHello still in the inbox) on the
    /// question for `key`; denied if the bounds are reached.
    fn hold(&mut self, key: QKey, ask: Option<AskRule>, http: Option<(&str, &str)>, what: Hold, mut event: Event) {
        let Some(live) = self.live.clone() else { return };
        match live.hold_graphql(key.clone(), ask, http, what.detail.as_deref(), what.mutations) {
            Ok(ticket) => {
                if let Some(e) = event.exchange_mut() {
                    e.decision = Some(Decision::Held);
                    e.question = Some(ticket.id);
                }
                self.events.push(event);
                self.phase = Phase::Held(ticket, key);
            }
            Err(reason) => self.deny(event, reason),
        }
    }

    /// Moves a held request along once a person answered (or the time
    /// ran out): approved, it is judged again and goes ahead; otherwise
    /// it gets the deny answer. Called each poll.
    pub fn poll_held(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        let (Phase::Held(ticket, key), Some(live)) = (&self.phase, &self.live) else { return };
        let (id, answer) = (ticket.id, live.answer(ticket.id));
        let reason = match answer {
            Answer::Pending => return,
            Answer::Approved { .. } => {
                if self.approved.len() < MAX_APPROVED && !self.approved.contains(key) {
                    self.approved.push(key.clone());
                }
                if self.approved.contains(key) {
                    self.phase = Phase::Head;
                    self.process(policy, resolver);
                    return;
                }
                "approved, but this connection remembers too many answers".to_string()
            }
            Answer::Rejected { by } => format!("held, then rejected by uid {by}"),
            Answer::TimedOut => "held, and nobody answered in time".to_string(),
            Answer::Gone => "held, and the question is gone".to_string(),
        };
        let event = Exchange {
            dst: Some(self.dst.to_string()),
            host: Some(self.name.as_ref().map(|n| n.to_string())),
            question: Some(id),
            ..Exchange::default()
        };
        let event = if self.speaks_http() { Event::Http(event) } else { Event::Tls(event) };
        self.phase = Phase::Head;
        self.deny(event, reason);
    }

    /// Logs a refused request and refuses it.
    fn deny(&mut self, mut event: Event, reason: String) {
        if let Some(e) = event.exchange_mut() {
            e.decision = Some(Decision::Deny);
            e.reason = Some(reason.clone());
        }
        self.events.push(event);
        self.refuse(reason);
    }

    fn tls_hello(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        let (sni, hello_len) = match tls::parse_client_hello(&self.inbox) {
            Ok(tls::Parsed::Incomplete) => return,
            Ok(tls::Parsed::ServerName(name, len)) => (name, len),
            Err(e) => {
                self.events.push(Event::Tls(Exchange {
                    dst: Some(self.dst.to_string()),
                    decision: Some(Decision::Deny),
                    reason: Some(e.to_string()),
                    ..Exchange::default()
                }));
                self.refuse(e.to_string());
                return;
            }
        };
        let mut event =
            Exchange { sni: Some(Some(sni.to_string())), dst: Some(self.dst.to_string()), ..Exchange::default() };
        let port = self.port;
        let terminates = match &self.live {
            Some(l) => l.terminates(policy, &sni, port),
            None => policy.terminates(&sni, port),
        };
        let terminate = self
            .termination
            .as_ref()
            .is_some_and(|t| terminates || t.credentials.any_bound_to(&sni) || t.credentials.is_token_host(&sni));
        let refusal = if self.name.as_ref() != Some(&sni) {
            Some("SNI is not the name this address was resolved for".to_string())
        } else if terminate {
            let j = match &self.live {
                Some(l) => l.judge_reachable(policy, &sni, port),
                None => live::judge_reachable(policy, &LiveRules::default(), &sni, port, 0),
            };
            self.verdict(j, &mut event)
        } else {
            self.judge(policy, &sni, None, &mut event)
        };
        if let Some(reason) = refusal {
            self.deny(Event::Tls(event), reason);
            return;
        }
        if let Some((key, ask, what)) = self.to_hold.take() {
            self.hold(key, ask, None, what, Event::Tls(event));
            return;
        }
        if terminate {
            self.terminate(sni, event);
            return;
        }
        // Spliced: what follows the hello is watched too, from here on.
        let watch = tls::HandshakeWatch::new(&self.inbox[..hello_len]).and_then(|mut w| {
            w.feed(&self.inbox[hello_len..])?;
            Ok((!w.is_done()).then(|| Box::new(w)))
        });
        let watch = match watch {
            Ok(w) => w,
            Err(e) => return self.deny(Event::Tls(event), e.to_string()),
        };
        event.decision = Some(Decision::Allow);
        event.spliced = Some(true);
        self.events.push(Event::Tls(event));
        self.to_upstream.append(&mut self.inbox);
        self.start_connect(sni, policy, resolver, Phase::Splice(watch));
    }

    /// A spliced connection's later handshake record was refused
    /// ([`tls::HandshakeWatch`]): logged, and the connection reset.
    fn handshake_refused(&mut self, e: tls::Error) {
        self.events.push(Event::Tls(Exchange {
            dst: Some(self.dst.to_string()),
            sni: Some(self.name.as_ref().map(|n| n.to_string())),
            spliced: Some(true),
            decision: Some(Decision::Deny),
            reason: Some(format!("later handshake record refused: {e}")),
            ..Exchange::default()
        }));
        self.refuse(e.to_string());
    }

    /// Ends the guest's TLS session here, with a leaf for `sni`: what it
    /// carries is read as HTTP from now on.
    fn terminate(&mut self, sni: HostName, mut event: Exchange) {
        let Some(t) = &self.termination else { return };
        let session = t
            .authority
            .server_config(&sni)
            .map_err(|e| e.to_string())
            .and_then(|config| GuestTls::new(config).map_err(|e| e.to_string()));
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                self.deny(Event::Tls(event), format!("cannot terminate TLS: {e}"));
                return;
            }
        };
        let hello = std::mem::take(&mut self.inbox);
        let received = session.receive(&hello, &mut self.inbox);
        event.alpn = Some(session.alpn().map(|p| String::from_utf8_lossy(p).into_owned()));
        event.decision = Some(Decision::Allow);
        event.terminated = Some(true);
        self.events.push(Event::Tls(event));
        self.guest_tls = Some(session);
        if let Err(e) = received {
            self.tls_failed(e);
        }
    }

    /// Moves a pending upstream connect along: starts its thread when a
    /// slot is free, takes its result when it is there; then takes up a
    /// request that waited for an in-flight place.
    pub fn poll_connect(&mut self, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        if let Phase::Exchanging(rx, _) = &self.phase {
            let result = match rx.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(r) => r,
                Err(TryRecvError::Disconnected) => Err(oauth::Error::Unreachable("the refresh thread ended".into())),
            };
            let Phase::Exchanging(_, event) = std::mem::replace(&mut self.phase, Phase::Refusing) else { return };
            return self.oauth_done(result, *event);
        }
        let result = match &mut self.phase {
            Phase::Connecting(dial, _) => {
                if let Dial::Queued { name, permitted, tls, since } = dial {
                    match self.slots.try_acquire() {
                        Some(slot) => {
                            let (name, permitted, tls) = (name.clone(), std::mem::take(permitted), tls.take());
                            *dial = connect(name, self.port, permitted, tls, resolver, slot);
                        }
                        None if since.elapsed() >= MAX_CONNECT_WAIT => {
                            self.slots.busy.fetch_add(1, Ordering::AcqRel);
                            *dial = failed(UpstreamError::Busy)
                        }
                        None => return,
                    }
                }
                match dial {
                    Dial::Running { rx, .. } => match rx.try_recv() {
                        Err(TryRecvError::Empty) => return,
                        Ok(r) => Some(r),
                        Err(TryRecvError::Disconnected) => Some(Err(UpstreamError::ThreadEnded)),
                    },
                    Dial::Queued { .. } => return,
                }
            }
            _ => None,
        };
        if let Some(result) = result {
            self.connected(result, policy, resolver);
        }
        self.resume(policy, resolver);
    }

    fn connected(&mut self, result: Dialled, policy: &Policy, resolver: &Arc<dyn Resolve>) {
        let next = match std::mem::replace(&mut self.phase, Phase::Reset) {
            Phase::Connecting(_, next) => *next,
            other => other,
        };
        match result {
            Ok((stream, addr)) => {
                self.upstream = Some(stream);
                self.upstream_addr = Some(addr);
                self.phase = next;
                self.process(policy, resolver);
            }
            Err(e) => {
                let mut event = audit::Upstream {
                    dst: self.dst.to_string(),
                    port: Some(self.port),
                    name: self.name.as_ref().map(|n| n.to_string()),
                    error: e.to_string(),
                    ..audit::Upstream::default()
                };
                if let UpstreamError::Tls(..) = &e {
                    event.decision = Some(Decision::Deny);
                    event.tls = Some("upstream certificate or handshake refused".into());
                }
                if let UpstreamError::NotGlobal { refused, .. } = &e {
                    event.decision = Some(Decision::Deny);
                    event.refused = Some(
                        refused
                            .iter()
                            .map(|(addr, class)| audit::RefusedAddr {
                                addr: addr.to_string(),
                                class: class.to_string(),
                            })
                            .collect(),
                    );
                }
                self.events.push(Event::Upstream(event));
                self.to_upstream.clear();
                self.inbox.clear();
                self.stalled = false;
                if self.speaks_http() {
                    self.to_guest.extend_from_slice(&bad_gateway(&e));
                    self.phase = Phase::Refusing;
                } else {
                    self.phase = Phase::Reset;
                }
            }
        }
    }

    /// The upstream socket and whether [`Conn::pump_upstream`] has work
    /// when it is readable or writable: for an event loop that runs the
    /// stack only when something is ready (not readable once the bytes
    /// for the guest are at their bound: no wake-ups it cannot act on).
    pub fn upstream_interest(&self) -> Option<(RawFd, bool, bool)> {
        let up = self.upstream.as_ref()?;
        let read = self.to_guest.len() < MAX_BUFFERED && !self.upstream_eof;
        let write = !self.to_upstream.is_empty() || up.wants_write();
        Some((up.raw_fd(), read, write))
    }

    /// Moves bytes to and from the upstream socket without blocking.
    pub fn pump_upstream(&mut self, guest_closed: bool) {
        let Some(up) = self.upstream.as_mut() else { return };
        if up.flush_queued().is_err() {
            self.phase = Phase::Reset;
            return;
        }
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
        let done_sending = guest_closed || matches!(self.phase, Phase::Refusing | Phase::Draining);
        if done_sending && self.to_upstream.is_empty() && self.inbox.is_empty() && !self.upstream_shut {
            self.upstream_shut = up.shutdown_write();
        }
        let mut buf = [0u8; READ_CHUNK];
        let mut fresh = Vec::new();
        while self.to_guest.len() + fresh.len() < MAX_BUFFERED && !self.upstream_eof {
            match up.read(&mut buf) {
                Ok(0) => self.upstream_eof = true,
                Ok(n) => {
                    self.bytes_down += n as u64;
                    fresh.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    if e.kind() == ErrorKind::InvalidData {
                        self.events.push(Event::Upstream(audit::Upstream {
                            dst: self.dst.to_string(),
                            name: self.name.as_ref().map(|n| n.to_string()),
                            error: format!("upstream TLS: {e}"),
                            ..audit::Upstream::default()
                        }));
                    }
                    self.upstream_eof = true;
                }
            }
        }
        self.upstream_bytes(&fresh);
        if self.speaks_http() && self.responses.is_lost() && matches!(self.phase, Phase::Head) {
            self.drain();
        }
        if self.upstream_eof {
            let held = self.scrubber.flush();
            self.to_guest.extend(held);
        }
        if self.upstream_eof {
            if let Some(r) = self.responses.close() {
                self.response_done(r);
            }
        }
        self.release_refusal();
    }

    /// Bytes from upstream: responses tracked and, where credentials are
    /// about (any HTTP connection, plain or terminated, of a sandbox with
    /// credentials), scrubbed of secrets ([`Scrubber`]; strictly, coded
    /// bodies refused, for a host a credential is bound to over TLS
    /// terminated here).
    fn upstream_bytes(&mut self, data: &[u8]) {
        let creds = match &self.termination {
            Some(t) if self.speaks_http() && !t.credentials.is_empty() => t.clone(),
            _ => {
                self.to_guest.extend_from_slice(data);
                for r in self.track_responses(data, |_| {}) {
                    self.response_done(r);
                }
                return;
            }
        };
        let creds = &creds.credentials;
        let mut marks = Vec::new();
        let done = self.track_responses(data, |m| marks.push(m));
        // Where identity was asked for (terminated, bound host), a coded
        // body is refused.
        let strict = self.guest_tls.is_some() && self.name.as_ref().is_some_and(|n| creds.any_bound_to(n));
        let out = self.scrubber.feed_marked(creds, data, &marks, strict);
        self.to_guest.extend(out);
        let host = self.name.as_ref().map(|n| n.as_str()).unwrap_or("?");
        for e in self.scrubber.take_echoes(creds) {
            let reason = format!(
                "a response from {host} carried pieces of credential '{}' ({} bytes masked; {} such responses in this sandbox): its value was echoed (leak attempt)",
                e.credential, e.masked, e.echoes
            );
            self.events.push(Event::Http(Exchange {
                host: Some(Some(host.to_string())),
                dst: Some(self.dst.to_string()),
                decision: Some(Decision::Deny),
                leak: Some(e.credential.to_string()),
                masked: Some(e.masked),
                echoes: Some(e.echoes),
                reason: Some(reason),
                ..Exchange::default()
            }));
        }
        if let Some(coding) = self.scrubber.refused().map(str::to_string) {
            if !matches!(self.phase, Phase::Refusing) || !self.upstream_eof {
                self.coded_response(host.to_string(), &coding);
            }
            return;
        }
        for r in done {
            self.response_done(r);
        }
    }

    /// A response from a host a credential is bound to has a coded body
    /// (it was asked for none): a 502 in its place, and nothing more
    /// passes.
    fn coded_response(&mut self, host: String, coding: &str) {
        let reason = format!(
            "the response from {host}, which a credential is bound to, has {coding}; netstack asked for none, and a coded body cannot be searched for echoed secrets"
        );
        self.events.push(Event::Http(Exchange {
            host: Some(Some(host.clone())),
            dst: Some(self.dst.to_string()),
            decision: Some(Decision::Deny),
            reason: Some(reason.clone()),
            ..Exchange::default()
        }));
        self.to_guest.extend_from_slice(&plain_response("502 Bad Gateway", &reason));
        self.upstream_eof = true;
        self.inbox.clear();
        self.to_upstream.clear();
        self.refusal = None;
        self.stalled = false;
        self.phase = Phase::Refusing;
    }

    /// Matches responses from upstream to the requests they answer (what
    /// each byte is goes to `mark`); returns those that completed.
    fn track_responses(&mut self, data: &[u8], mark: impl FnMut(http::Mark)) -> Vec<http::Response> {
        if !self.speaks_http() {
            return Vec::new();
        }
        // The next response head answers the first pending request, or the
        // second if the first one's response is still under way.
        let mut index = usize::from(self.responses.in_response());
        let pending = &self.pending;
        self.responses.feed_parts(
            data,
            || {
                let head = pending.get(index).is_some_and(|p| p.1);
                index += 1;
                head
            },
            mark,
        )
    }

    fn response_done(&mut self, r: http::Response) {
        if let Some((mut event, _, up)) = self.pending.pop_front() {
            event.status = Some(r.status);
            event.bytes_up = Some(up);
            event.bytes_down = Some(r.bytes);
            self.events.push(Event::Http(event));
        }
    }

    /// The lines logged when the connection ends: requests that got no
    /// (complete) response, then the connection's totals.
    pub fn end_events(&mut self) -> Vec<Event> {
        let mut out: Vec<Event> = self
            .pending
            .drain(..)
            .map(|(mut e, _, up)| {
                e.status = Some(None);
                e.bytes_up = Some(up);
                Event::Http(e)
            })
            .collect();
        out.push(Event::ConnEnd(audit::ConnEnd {
            dst: self.dst.to_string(),
            port: self.port,
            name: self.name.as_ref().map(|n| n.to_string()),
            upstream: self.upstream_addr.map(|a| a.to_string()),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
        }));
        out
    }
}

/// What the stack's time limits look at, and what they do ([`crate::limits`]).
impl Conn {
    /// This poll's state, for the stack's time limits.
    pub fn activity(&self) -> crate::limits::Activity {
        crate::limits::Activity {
            in_flight: self.pending.len(),
            head_partial: self.responses.head_partial(),
            reading_upstream: self.upstream.is_some() && self.to_guest.len() < MAX_BUFFERED && !self.upstream_eof,
            bytes_down: self.bytes_down,
            to_guest: self.to_guest.len() + self.guest_tls.as_ref().map_or(0, |t| t.wire_len()),
        }
    }

    /// A time limit fired: the upstream socket is closed. If nothing of a
    /// response is on its way to the guest, it gets a 504 naming the limit
    /// and the connection closes after it (true); else false, and the
    /// caller resets the connection.
    pub fn time_out(&mut self, why: &crate::limits::Timeout) -> bool {
        self.upstream = None;
        self.upstream_eof = true;
        self.inbox.clear();
        self.to_upstream.clear();
        self.stalled = false;
        self.refusal = None;
        for (mut e, _, up) in self.pending.drain(..) {
            e.status = Some(None);
            e.bytes_up = Some(up);
            e.timeout = Some(why.name().to_string());
            self.events.push(Event::Http(e));
        }
        let clean = self.speaks_http()
            && self.to_guest.is_empty()
            && self.guest_tls.as_ref().is_none_or(|t| t.wire_len() == 0)
            && !self.responses.in_response()
            && !self.responses.head_partial()
            && !self.responses.is_lost();
        if clean {
            self.to_guest.extend_from_slice(&plain_response("504 Gateway Timeout", &why.to_string()));
            self.phase = Phase::Refusing;
        } else {
            self.phase = Phase::Reset;
        }
        clean
    }

    /// Nothing in flight, nothing buffered either way, no connect under
    /// way: the connection may be reclaimed for a new one.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.inbox.is_empty()
            && self.to_upstream.is_empty()
            && self.to_guest.is_empty()
            && !self.stalled
            && !matches!(self.phase, Phase::Connecting(..) | Phase::Exchanging(..))
            && self.guest_tls.as_ref().is_none_or(|t| t.wire_len() == 0)
    }
}

/// A resolver for tests: a fixed answer, optionally held back until
/// released; counts its calls.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::sync::{Condvar, Mutex};

    pub(crate) struct TestResolver {
        pub(crate) answer: Lookup,
        open: Mutex<bool>,
        opened: Condvar,
        pub(crate) lookups: AtomicUsize,
        pub(crate) resolves: AtomicUsize,
    }

    impl TestResolver {
        /// Answers at once if `open`, else when [`TestResolver::release`]d.
        pub(crate) fn new(answer: Lookup, open: bool) -> Arc<TestResolver> {
            Arc::new(TestResolver {
                answer,
                open: Mutex::new(open),
                opened: Condvar::new(),
                lookups: AtomicUsize::new(0),
                resolves: AtomicUsize::new(0),
            })
        }

        pub(crate) fn release(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Resolve for TestResolver {
        fn resolve(&self, _: &HostName, _: u16) -> Option<SocketAddr> {
            self.resolves.fetch_add(1, Ordering::SeqCst);
            None
        }

        fn lookup(&self, _: &HostName, _: u16) -> Lookup {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.answer.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TestResolver;
    use super::*;
    use std::net::TcpListener;

    fn name() -> HostName {
        HostName::parse("api.example.com").unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    // Pure: nothing here is connected to.
    #[test]
    fn only_global_or_permitted_resolved_addresses_are_chosen() {
        let n = name();
        let resolved = |v: &[&str]| Lookup::Resolved(v.iter().map(|a| sa(a)).collect());
        // An override is used as it is, loopback included.
        assert_eq!(choose_upstream(&n, Lookup::Override(sa("127.0.0.1:8080")), &[]), Ok(sa("127.0.0.1:8080")));
        // The first acceptable address of the answer, not the first one.
        assert_eq!(
            choose_upstream(&n, resolved(&["10.0.0.5:80", "[fe80::1]:80", "93.184.216.34:80", "1.1.1.1:80"]), &[]),
            Ok(sa("93.184.216.34:80"))
        );
        // None acceptable: each refused address and why.
        let e = choose_upstream(
            &n,
            resolved(&["127.0.0.1:80", "169.254.169.254:80", "[::ffff:10.0.0.1]:80", "[fd00::1]:80", "0.0.0.0:80"]),
            &[],
        )
        .unwrap_err();
        let UpstreamError::NotGlobal { refused, .. } = &e else { panic!("{e:?}") };
        let classes: Vec<AddrClass> = refused.iter().map(|r| r.1).collect();
        use AddrClass::*;
        assert_eq!(classes, vec![Loopback, LinkLocal, Private, UniqueLocal, Unspecified]);
        assert_eq!(refused[2].0, ip("10.0.0.1"), "mapped forms are named canonically");
        let text = e.to_string();
        assert!(text.contains("169.254.169.254: link-local") && text.contains("addresses"), "{text}");
        // A policy rule's addresses permit exactly those, in any spelling.
        let permitted = [ip("10.0.0.5"), ip("::ffff:192.168.1.9")];
        assert_eq!(choose_upstream(&n, resolved(&["127.0.0.1:80", "10.0.0.5:80"]), &permitted), Ok(sa("10.0.0.5:80")));
        assert_eq!(choose_upstream(&n, resolved(&["[::ffff:10.0.0.5]:80"]), &permitted), Ok(sa("10.0.0.5:80")));
        assert_eq!(choose_upstream(&n, resolved(&["192.168.1.9:80"]), &permitted), Ok(sa("192.168.1.9:80")));
        assert!(choose_upstream(&n, resolved(&["10.0.0.6:80"]), &permitted).is_err());
        // Nothing found; and only the first MAX_CANDIDATES count.
        assert_eq!(choose_upstream(&n, Lookup::NotFound, &[]), Err(UpstreamError::Unresolved(n.to_string())));
        assert_eq!(choose_upstream(&n, Lookup::Resolved(vec![]), &[]), Err(UpstreamError::Unresolved(n.to_string())));
        let mut many = vec![sa("10.0.0.1:80"); MAX_CANDIDATES];
        many.push(sa("1.1.1.1:80"));
        assert!(matches!(choose_upstream(&n, Lookup::Resolved(many), &[]), Err(UpstreamError::NotGlobal { .. })));
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";

    fn conn(slots: &Arc<ConnectSlots>) -> Conn {
        Conn::with_slots(80, Ipv4Addr::new(198, 18, 0, 1), Some(name()), slots.clone())
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn connect_threads_are_capped_and_the_rest_wait_for_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let held = TestResolver::new(Lookup::Override(listener.local_addr().unwrap()), false);
        let resolver: Arc<dyn Resolve> = held.clone();
        let policy = Policy::from_toml("version = 1\n[[rule]]\nallow = \"api.example.com\"\n").unwrap();
        let slots = ConnectSlots::new(2);
        let mut conns: Vec<Conn> = (0..3).map(|_| conn(&slots)).collect();
        for c in &mut conns {
            c.from_guest(GET, &policy, &resolver);
        }
        wait_until("two lookups", || held.lookups.load(Ordering::SeqCst) == 2);
        for _ in 0..20 {
            for c in &mut conns {
                c.poll_connect(&policy, &resolver);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(slots.running(), 2, "the cap holds");
        assert_eq!(held.lookups.load(Ordering::SeqCst), 2, "the third connection has no thread yet");
        assert!(conns.iter().all(|c| c.to_guest.is_empty()), "waiting is not failing");
        held.release();
        wait_until("every connection connected", || {
            conns.iter_mut().for_each(|c| c.poll_connect(&policy, &resolver));
            conns.iter().all(|c| c.upstream.is_some())
        });
        assert_eq!(held.lookups.load(Ordering::SeqCst), 3);
        assert_eq!(held.resolves.load(Ordering::SeqCst), 0, "one lookup per connection, nothing else");
        wait_until("slots given back", || slots.running() == 0);
    }

    #[test]
    fn a_connection_that_goes_away_cancels_its_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let held = TestResolver::new(Lookup::Override(listener.local_addr().unwrap()), false);
        let resolver: Arc<dyn Resolve> = held.clone();
        let policy = Policy::from_toml("version = 1\n[[rule]]\nallow = \"api.example.com\"\n").unwrap();
        let slots = ConnectSlots::new(1);
        let mut c = conn(&slots);
        c.from_guest(GET, &policy, &resolver);
        wait_until("the lookup", || held.lookups.load(Ordering::SeqCst) == 1);
        assert_eq!(slots.running(), 1);
        drop(c);
        held.release();
        wait_until("the slot given back", || slots.running() == 0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(listener.accept().is_err(), "no upstream connection for a connection that went away");
    }

    #[test]
    fn a_connection_waits_for_a_slot_and_then_gets_a_502() {
        let held = TestResolver::new(Lookup::NotFound, true);
        let resolver: Arc<dyn Resolve> = held.clone();
        let policy = Policy::from_toml("version = 1\n[[rule]]\nallow = \"api.example.com\"\n").unwrap();
        let slots = ConnectSlots::new(1);
        let taken = slots.try_acquire().unwrap();
        let mut c = conn(&slots);
        c.from_guest(GET, &policy, &resolver);
        // Pretend the wait has run out.
        if let Phase::Connecting(Dial::Queued { since, .. }, _) = &mut c.phase {
            *since = Instant::now() - MAX_CONNECT_WAIT;
        } else {
            panic!("not queued: {:?}", c.phase);
        }
        c.poll_connect(&policy, &resolver);
        let text = String::from_utf8_lossy(&c.to_guest).to_string();
        assert!(text.starts_with("HTTP/1.1 502") && text.contains("no connect thread free"), "{text}");
        assert_eq!(held.lookups.load(Ordering::SeqCst), 0);
        assert!(c.events.iter().any(|e| matches!(e, Event::Upstream(_))));
        drop(taken);
        assert_eq!(slots.running(), 0);
    }
}

#[cfg(test)]
mod admin_deny_tests {
    #[test]
    fn an_admin_deny_points_to_the_administrator_not_to_sbx_policy_allow() {
        let body =
            |rule: &str| String::from_utf8(super::denied_response("x", Some(rule), Some("a.com"), "sb")).unwrap();
        let admin = body("admin policy rule 1: deny a.com ports 80,443");
        assert!(admin.contains("the machine's administrator") && !admin.contains("sbx policy allow"), "{admin}");
        assert!(body("rule 1: deny a.com ports 80,443").contains("sbx policy allow sb a.com"));
    }
}
