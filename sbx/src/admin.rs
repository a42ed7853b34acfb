//! Host side: a sandbox's admin endpoint and the commands that use it —
//! `sbx policy allow|deny|ls|rm|reset`, `sbx approvals`, `sbx approve`,
//! `sbx reject` (the live rules and held requests of `netstack::live`).
//!
//! Transport: `admin.sock`, a UNIX socket in the sandbox's directory
//! (itself 0700), mode 0600, served by a control thread of the running
//! `sbx run` ([`serve`], confined like the other control threads). Each
//! connection carries one request: a line of JSON ([`Req`], parsed
//! strictly, at most [`MAX_REQUEST`] bytes) and gets one line back
//! ([`Reply`]). The peer's uid (SO_PEERCRED) must be the sandbox owner's
//! (the uid sbx runs as) or root; anyone else is told so and nothing is
//! done. When the sandbox is not running, the commands edit its persisted
//! live rules (`live-policy.json`) directly, with the same checks.
//!
//! A new question is told on `sbx run`'s stderr in one line only when the
//! session has no pty (`--no-tty`, or stdin/stdout not a terminal): a
//! TUI's screen is never written over; with a pty, `sbx approvals` (from
//! another terminal) is the way to see what waits. The socket is bound in
//! the sandbox's 0700 directory and then made 0600, so no other user can
//! reach it even in between.
//!
//! The guest can never reach the socket: its only ways out of the VM are
//! netstack (which speaks TCP to ports 80/443 of names and never opens a
//! host UNIX socket: upstreams are TCP only, by address), the vsock control
//! channel (guest-init's session protocol, answered by sbx, which connects
//! to the guest and never the other way) and the shared folders, whose
//! file server refuses to create or open sockets and never exposes the
//! sandbox's own directory (it is not shared). A socket file in a shared
//! folder would not help either: connecting to a UNIX socket is done by
//! the host kernel for a host process, never by the file server.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use netstack::live::{Answer, Grant, Live, LiveRules, RuleSpec};
use netstack::policy::Policy;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::escape;
use crate::sandbox::{self, Sandbox};

/// The socket's file name in the sandbox directory.
pub const SOCKET: &str = "admin.sock";
/// The persisted live rules' file name in the sandbox directory.
pub const LIVE_FILE: &str = "live-policy.json";
/// Bytes of one request line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Bytes of one reply line (`sbx policy ls` of 10,000 rules fits).
pub const MAX_REPLY: usize = 8 << 20;
/// How long one connection may take to send its request or read the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for the socket of a sandbox that is running
/// but still starting (marked running before its network and this socket
/// are up).
pub const START_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("Cannot reach sandbox '{0}' at {1}: {2} (is it still starting? try again)")]
    Connect(String, PathBuf, io::Error),
    #[error("The admin socket of sandbox '{0}' did not answer properly: {1}")]
    Reply(String, String),
    #[error("{0}")]
    Refused(String),
    #[error("Cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("Cannot write {0}: {1}")]
    Write(PathBuf, io::Error),
    #[error("Bad duration '{0}': use a number with s, m, h or d (e.g. 90s, 10m, 2h)")]
    Duration(String),
}

/// One request to the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Req {
    /// `sbx policy allow|deny`.
    Add { rule: RuleSpec },
    /// `sbx policy ls`.
    Ls {},
    /// `sbx policy rm`.
    Rm { id: u64 },
    /// `sbx policy reset`.
    Reset {},
    /// `sbx approvals`.
    Approvals {},
    /// `sbx approve`.
    Approve { id: u64, grant: Grant },
    /// `sbx reject`.
    Reject { id: u64 },
    /// `sbx ports NAME --publish`: the listener on 127.0.0.1:`host_port`
    /// comes with the request (SCM_RIGHTS), bound by the command.
    Publish { host_port: u16, guest_port: u16 },
    /// `sbx ports NAME --unpublish`.
    Unpublish { host_port: u16 },
    /// `sbx ports NAME`.
    Ports {},
}

/// The answer: `ok` with text to print, or an error naming the problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub ok: bool,
    pub text: String,
}

/// The uid this process runs as (the sandbox's owner).
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of `stream` (SO_PEERCRED).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the call; cred and len point to
    // writable memory of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Listens on the sandbox's admin socket (0600; any stale file removed).
pub fn listen(dir: &Path) -> io::Result<UnixListener> {
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads the persisted live rules (none if there is no file), checked as
/// user input; notes for what was dropped.
pub fn load(dir: &Path, now_ms: u64) -> Result<LiveRules, Error> {
    let path = dir.join(LIVE_FILE);
    let text = match std::fs::File::open(&path) {
        Ok(f) => {
            let mut text = Vec::new();
            f.take(netstack::live::MAX_LIVE_FILE as u64 + 1)
                .read_to_end(&mut text)
                .map_err(|e| Error::Read(path.clone(), e.to_string()))?;
            text
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LiveRules::default()),
        Err(e) => return Err(Error::Read(path, e.to_string())),
    };
    let (rules, expired) = LiveRules::from_json(&text, now_ms).map_err(|e| Error::Read(path.clone(), e.to_string()))?;
    if expired > 0 {
        eprintln!("sbx: {expired} live grants of this sandbox had expired and are gone");
    }
    Ok(rules)
}

/// Writes the persisted live rules (0600, atomically).
pub fn save(dir: &Path, json: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LIVE_FILE);
    let tmp = dir.join(format!("{LIVE_FILE}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(json.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::Write(path.clone(), e))
}

/// Does what `req` asks of `live` on behalf of `uid`; the text to print.
/// `policy`: the static rules the sandbox runs with, if known.
pub fn execute(req: &Req, live: &Live, policy: Option<&Policy>, uid: u32) -> Result<String, String> {
    match req {
        Req::Add { rule } => {
            // Said at once; the admin rule wins at each decision anyway.
            if rule.action == "allow" {
                let (pattern, ports) = netstack::live::parse_host_port(&rule.host).map_err(|e| e.to_string())?;
                if let Some(admin_rule) = live.admin().conflict(&pattern, &ports) {
                    return Err(format!(
                        "refused: the machine's admin policy ({}) has {admin_rule}, which no live allow can lift                          (ask the machine's administrator)",
                        crate::machine_policy::PATH
                    ));
                }
            }
            let id = live.add_rule(rule, Some(uid)).map_err(|e| e.to_string())?;
            Ok(format!("live rule #{id} added: {}", rule_scope(live, id)))
        }
        Req::Rm { id } => {
            live.remove_rule(*id, Some(uid)).map(|_| format!("live rule #{id} removed")).map_err(|e| e.to_string())
        }
        Req::Reset {} => {
            live.reset(Some(uid));
            Ok("live rules reset".into())
        }
        Req::Ls {} => Ok(ls_text(live, policy)),
        Req::Approvals {} => Ok(approvals_text(live)),
        Req::Approve { id, grant } => match live.approve(*id, *grant, uid).map_err(|e| e.to_string())? {
            Some(rule) => Ok(format!("question #{id} approved; live rule #{rule} added: {}", rule_scope(live, rule))),
            None if *grant == Grant::Once => Ok(format!("question #{id} approved once")),
            None => Ok(format!(
                "question #{id} approved once only: no lasting grant for a question of an admin ask rule, \
                 or of a GraphQL request whose mutations could not all be read"
            )),
        },
        Req::Reject { id } => {
            live.reject(*id, uid).map(|_| format!("question #{id} rejected")).map_err(|e| e.to_string())
        }
        Req::Publish { .. } | Req::Unpublish { .. } | Req::Ports {} => {
            Err("ports are steered by `sbx ports`, not with the live rules".into())
        }
    }
}

/// What live rule `id` opens or shuts, and for how long, in words.
fn rule_scope(live: &Live, id: u64) -> String {
    let (rules, now) = live.rules();
    match rules.list().iter().find(|r| r.id == id) {
        Some(r) => format!("{} ({})", r.scope(), r.limit_text(now)),
        None => "already gone".into(),
    }
}

fn ls_text(live: &Live, policy: Option<&Policy>) -> String {
    let mut out = String::from(
        "precedence: admin deny > live deny > static deny > admin ask > live allow > ask rules > static allow > default\n",
    );
    let admin = live.admin();
    if !admin.sha256.is_empty() {
        out += &format!("  admin policy {} (sha256 {}):\n", crate::machine_policy::PATH, admin.sha256);
    }
    for r in &admin.denies {
        out += &format!("  admin  {r}\n");
    }
    for a in &admin.asks {
        out += &format!("  admin  {a}\n");
    }
    let (rules, now) = live.rules();
    for r in rules.list() {
        let by = r.by_uid.map(|u| format!(", by uid {u}")).unwrap_or_default();
        let note = r.note.as_deref().map(|n| format!(", {n}")).unwrap_or_default();
        out += &format!("  #{:<5} {r} ({}{by}{note})\n", r.id, r.limit_text(now));
    }
    match policy {
        Some(p) => {
            for r in &p.rules {
                out += &format!("  {:<6} {r}\n", layer(&r.origin));
            }
            for a in &p.asks {
                let layer = if a.origin.starts_with("ask:") { "preset" } else { "file" };
                out += &format!("  {layer:<6} {a}\n");
            }
            let default = match p.approval {
                netstack::live::Approval::Ask => "held for a person (approval = ask)",
                netstack::live::Approval::Deny => "denied",
            };
            out += &format!("  default: {default}\n");
        }
        None => out += "  (the sandbox is not running: its static rules are those of its next `sbx run`)\n",
    }
    out
}

/// The layer a static rule came from, for `sbx policy ls`.
pub fn layer(origin: &netstack::policy::Origin) -> &'static str {
    use netstack::policy::Origin;
    match origin {
        Origin::Preset(_) => "preset",
        Origin::File(_) => "file",
        Origin::Agent(_) => "agent",
        Origin::CommandLine => "flag",
        Origin::Admin(_) => "admin",
    }
}

fn approvals_text(live: &Live) -> String {
    let qs = live.questions();
    if qs.is_empty() {
        return "nothing waits\n".into();
    }
    let now = live.now();
    let mut out = format!(
        "{:<5} {:<9} {:<40} {:<7} {:>6} {:>5}  ASKED BY\n",
        "ID", "STATE", "HOST:PORT", "METHOD", "AGO", "COUNT"
    );
    for q in qs {
        let state = match q.answer {
            Answer::Pending => "waiting".to_string(),
            Answer::Approved { by } => format!("yes:{by}"),
            Answer::Rejected { by } => format!("no:{by}"),
            Answer::TimedOut => "timed-out".into(),
            Answer::Gone => "gone".into(),
        };
        let what = format!("{}:{}{}", q.key.host, q.key.port, q.path.as_deref().unwrap_or(""));
        // What a GraphQL ask rule found goes last, after the fixed fields.
        let mut asked_by = q.key.rule.as_deref().unwrap_or("default (approval = ask)").to_string();
        if let Some(d) = &q.detail {
            asked_by += &format!(" ({})", escape::line(d));
        }
        out += &format!(
            "{:<5} {:<9} {:<40} {:<7} {:>5}s {:>5}  {}\n",
            q.id,
            state,
            escape::line(&what),
            q.method.as_deref().unwrap_or("TLS"),
            now.saturating_sub(q.first_ms) / 1000,
            q.count,
            asked_by
        );
    }
    out
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes, and the one
/// descriptor that may come with it (SCM_RIGHTS; any more are closed).
fn read_request(stream: &UnixStream) -> (Result<Req, String>, Option<std::os::fd::OwnedFd>) {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut line = Vec::new();
    let mut fd = None;
    let mut buf = [0u8; 4096];
    loop {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let got =
            rustix::net::recvmsg(stream, &mut [io::IoSliceMut::new(&mut buf)], &mut cmsg, RecvFlags::CMSG_CLOEXEC);
        for msg in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                for f in fds {
                    fd.get_or_insert(f);
                }
            }
        }
        let n = match got {
            Ok(m) => m.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return (Err(format!("cannot read the request: {e}")), fd),
        };
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end + 1);
            break;
        }
        if n == 0 || line.len() > MAX_REQUEST {
            break;
        }
    }
    (parse_request(line), fd)
}

/// Checks and parses one request line.
fn parse_request(line: Vec<u8>) -> Result<Req, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request refused: longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("request refused: it must be one line of JSON ending in a newline".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("request refused: not a valid request: {e}"))
}

/// A running sandbox's published ports, for [`handle_with_ports`]: the
/// ports and how to keep them after a change.
pub struct PortsCtx<'a> {
    pub ports: &'a netstack::forward::Ports,
    pub keep: &'a dyn Fn(&netstack::forward::Ports) -> Result<(), String>,
}

/// Does a ports request (`fd`: the listener a publish came with).
fn execute_ports(req: &Req, ctx: Option<&PortsCtx>, fd: Option<std::os::fd::OwnedFd>) -> Result<String, String> {
    let Some(ctx) = ctx else {
        return Err("this sandbox has no network: no port can be published".into());
    };
    let text = match req {
        Req::Publish { host_port, guest_port } => {
            let fd = fd.ok_or("publish refused: the listener must come with the request (use `sbx ports`)")?;
            ctx.ports.publish(*host_port, *guest_port, std::net::TcpListener::from(fd)).map_err(|e| e.to_string())?;
            format!("127.0.0.1:{host_port} -> guest port {guest_port}: published")
        }
        Req::Unpublish { host_port } => {
            let guest = ctx.ports.unpublish(*host_port).map_err(|e| e.to_string())?;
            format!("127.0.0.1:{host_port} -> guest port {guest}: unpublished")
        }
        _ => return Ok(crate::ports::list_text(&ctx.ports.list())),
    };
    match (ctx.keep)(ctx.ports) {
        Ok(()) => Ok(text),
        Err(e) => Err(format!("{text}, but it is not kept: {e}")),
    }
}

/// Answers one connection: the peer checked, the request read and done,
/// and `keep` called after a change, before the reply (so that "added"
/// means kept). Returns whether the live rules changed.
pub fn handle(
    stream: UnixStream,
    live: &Live,
    policy: Option<&Policy>,
    owner: u32,
    keep: &dyn Fn(&Live) -> Result<(), String>,
) -> bool {
    handle_with_ports(stream, live, None, policy, owner, keep)
}

/// [`handle`], with the sandbox's published ports.
pub fn handle_with_ports(
    stream: UnixStream,
    live: &Live,
    ports: Option<&PortsCtx>,
    policy: Option<&Policy>,
    owner: u32,
    keep: &dyn Fn(&Live) -> Result<(), String>,
) -> bool {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    // Read (bounded) before anything is answered, so that the peer is
    // told why even when it is refused; nothing of it is acted on then.
    let (request, mut fd) = read_request(&stream);
    let (result, changed) = match (peer_uid(&stream), request) {
        (Err(e), _) => (Err(format!("cannot tell who is asking: {e}")), false),
        (Ok(uid), _) if uid != owner && uid != 0 => {
            (Err(format!("refused: uid {uid} is not this sandbox's owner (uid {owner}) or root")), false)
        }
        (Ok(_), Ok(req @ (Req::Publish { .. } | Req::Unpublish { .. } | Req::Ports {}))) => {
            (execute_ports(&req, ports, fd.take()), false)
        }
        (Ok(uid), Ok(req)) => {
            let changed = matches!(req, Req::Add { .. } | Req::Rm { .. } | Req::Reset {} | Req::Approve { .. });
            (execute(&req, live, policy, uid), changed)
        }
        (Ok(_), Err(e)) => (Err(e), false),
    };
    let result = match result {
        Ok(text) if changed => match keep(live) {
            Ok(()) => Ok(text),
            Err(e) => Err(format!("{text}, but it is not kept: {e}")),
        },
        other => other,
    };
    let reply = match result {
        Ok(text) => Reply { ok: true, text },
        Err(text) => Reply { ok: false, text },
    };
    let mut line = serde_json::to_string(&reply).unwrap_or_default();
    line.push('\n');
    let _ = (&stream).write_all(line.as_bytes());
    changed
}

/// Serves the admin socket for as long as the process runs; persists the
/// live rules to `dir` after each change.
pub fn serve(listener: UnixListener, live: Arc<Live>, policy: Policy, dir: PathBuf) {
    serve_with_ports(listener, live, None, policy, dir)
}

/// [`serve`], with the sandbox's published ports (kept in `dir` too).
pub fn serve_with_ports(
    listener: UnixListener,
    live: Arc<Live>,
    ports: Option<Arc<netstack::forward::Ports>>,
    policy: Policy,
    dir: PathBuf,
) {
    let owner = own_uid();
    let keep_ports = |p: &netstack::forward::Ports| match p.take_dirty() {
        Some(json) => crate::ports::save(&dir, &json).map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let ctx = ports.as_deref().map(|ports| PortsCtx { ports, keep: &keep_ports });
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, say: not a busy loop.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // The stack's clock moves only when it runs: a grant `--for` a
        // time counts from now, not from the guest's last packet.
        live.tick(sandbox::now_unix_ms());
        let keep = |live: &Live| match live.take_dirty() {
            Some(json) => save(&dir, &json).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        handle_with_ports(stream, &live, ctx.as_ref(), Some(&policy), owner, &keep);
    }
}

/// Connects to the admin socket at `path`; while it is not there yet but
/// its sandbox runs (starting), tries again for up to [`START_WAIT`].
fn connect_starting(name: &str, path: &Path) -> Result<UnixStream, Error> {
    let started = std::time::Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
                    && started.elapsed() < START_WAIT
                    && path.parent().and_then(sandbox::running_pid_in).is_some() =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(Error::Connect(name.into(), path.into(), e)),
        }
    }
}

/// Sends `req` to the admin socket at `path`; the reply.
pub fn request(name: &str, path: &Path, req: &Req) -> Result<Reply, Error> {
    request_with_fd(name, path, req, None)
}

/// [`request`], `fd` going with the request's first bytes (SCM_RIGHTS).
pub fn request_with_fd(
    name: &str,
    path: &Path,
    req: &Req,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Reply, Error> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let stream = connect_starting(name, path)?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT * 2));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut line = serde_json::to_string(req).map_err(|e| Error::Reply(name.into(), e.to_string()))?;
    line.push('\n');
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        cmsg.push(SendAncillaryMessage::ScmRights(&fds));
        sent = rustix::net::sendmsg(&stream, &[io::IoSlice::new(line.as_bytes())], &mut cmsg, SendFlags::NOSIGNAL)
            .map_err(|e| Error::Connect(name.into(), path.into(), e.into()))?;
    }
    (&stream).write_all(&line.as_bytes()[sent..]).map_err(|e| Error::Connect(name.into(), path.into(), e))?;
    let mut back = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY as u64))
        .read_until(b'\n', &mut back)
        .map_err(|e| Error::Reply(name.into(), e.to_string()))?;
    serde_json::from_slice(&back).map_err(|e| Error::Reply(name.into(), e.to_string()))
}

/// Runs `req` for sandbox `name`: through its admin socket if it runs,
/// else on its persisted live rules. Prints the reply (escaped).
pub fn command(name: &str, req: Req) -> Result<ExitCode, Error> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let reply =
        if sb.running_pid().is_some() { request(name, &sb.dir().join(SOCKET), &req)? } else { offline(&sb, &req)? };
    if !reply.ok {
        return Err(Error::Refused(escape::escape(reply.text.as_bytes(), escape::Layout::Line)));
    }
    let mut out = io::stdout().lock();
    let _ = out.write_all(escape::escape(reply.text.as_bytes(), escape::Layout::Lines).as_bytes());
    if !reply.text.ends_with('\n') {
        let _ = writeln!(out);
    }
    Ok(ExitCode::SUCCESS)
}

/// `req` on a stopped sandbox's persisted live rules.
fn offline(sb: &Sandbox, req: &Req) -> Result<Reply, Error> {
    let now = sandbox::now_unix_ms();
    if matches!(req, Req::Reset {}) {
        // Also the cure for a file that cannot be read back.
        return match std::fs::remove_file(sb.dir().join(LIVE_FILE)) {
            Ok(()) => Ok(Reply { ok: true, text: "live rules reset".into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Reply { ok: true, text: "live rules reset".into() }),
            Err(e) => Err(Error::Write(sb.dir().join(LIVE_FILE), e)),
        };
    }
    let rules = load(sb.dir(), now)?;
    let live = Live::new(&sb.settings.name, rules);
    live.tick(now);
    // The machine's admin rules refuse here as in a running sandbox (and
    // at the next run's decisions, whatever is kept).
    if let Some(machine) = crate::machine_policy::load(Path::new(crate::machine_policy::PATH))
        .map_err(|e| Error::Refused(e.to_string()))?
    {
        live.set_admin(machine.network, "loaded");
    }
    let result = match req {
        Req::Add { rule } if rule.until_exit => {
            Err(format!("sandbox '{}' is not running: an --until-exit rule would end at once", sb.settings.name))
        }
        Req::Approve { .. } | Req::Reject { .. } => {
            Err(format!("sandbox '{}' is not running: nothing waits for an answer", sb.settings.name))
        }
        _ => execute(req, &live, None, own_uid()),
    };
    if result.is_ok() {
        if let Some(json) = live.take_dirty() {
            save(sb.dir(), &json)?;
        }
    }
    Ok(match result {
        Ok(text) => Reply { ok: true, text },
        Err(text) => Reply { ok: false, text },
    })
}

/// `10m`, `90s`, `2h`, `1d`, or plain seconds.
pub fn parse_duration(raw: &str) -> Result<u64, Error> {
    let bad = || Error::Duration(raw.to_string());
    let (digits, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|s| *s > 0).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netstack::host::HostName;
    use netstack::live::QKey;

    fn spec(host: &str) -> RuleSpec {
        RuleSpec {
            action: "allow".into(),
            host: host.into(),
            methods: vec![],
            path: None,
            for_secs: None,
            uses: None,
            until_exit: false,
            graphql_mutations: vec![],
        }
    }

    fn ask(path: &Path, line: &[u8]) -> Reply {
        let s = UnixStream::connect(path).unwrap();
        (&s).write_all(line).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = String::new();
        BufReader::new(&s).read_line(&mut back).unwrap();
        serde_json::from_str(&back).unwrap()
    }

    /// A served socket in a fresh directory, owned by `owner`.
    fn served(owner: u32) -> (tempfile::TempDir, Arc<Live>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = listen(dir.path()).unwrap();
        let live = Live::new("sb", LiveRules::default());
        let l = live.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                handle(s, &l, None, owner, &|_| Ok(()));
            }
        });
        (dir, live)
    }

    #[test]
    fn the_socket_is_0600_and_answers_its_owner() {
        let (dir, live) = served(own_uid());
        let path = dir.path().join(SOCKET);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = request("sb", &path, &Req::Add { rule: spec("api.example.com:443") }).unwrap();
        assert!(r.ok && r.text.contains("#1"), "{r:?}");
        assert_eq!(live.rules().0.list().len(), 1);
        let r = request("sb", &path, &Req::Ls {}).unwrap();
        assert!(r.text.contains("live #1: allow api.example.com ports 443"), "{}", r.text);
        assert!(request("sb", &path, &Req::Rm { id: 1 }).unwrap().ok);
        assert!(!request("sb", &path, &Req::Rm { id: 1 }).unwrap().ok, "gone");
    }

    #[test]
    fn a_request_waits_for_a_starting_sandboxs_socket_and_not_for_a_stopped_one() {
        let home = tempfile::tempdir().unwrap();
        let settings = sandbox::Settings {
            name: "sb".into(),
            agent: "shell".into(),
            workspace: home.path().to_path_buf(),
            created_unix: 0,
        };
        let sb = Sandbox::open_or_create(home.path(), settings).unwrap();
        let path = sb.dir().join(SOCKET);
        // Not running, no socket: refused at once, the cure named.
        let e = request("sb", &path, &Req::Ls {}).unwrap_err().to_string();
        assert!(e.contains("Cannot reach sandbox 'sb'"), "{e}");
        // Running, its socket made a moment later (as `sbx run` does after
        // marking the sandbox running): the request gets through.
        let running = sb.mark_running().unwrap();
        let (dir, live) = (sb.dir().to_path_buf(), Live::new("sb", LiveRules::default()));
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let listener = listen(&dir).unwrap();
            let (s, _) = listener.accept().unwrap();
            handle(s, &live, None, own_uid(), &|_| Ok(()));
        });
        let r = request("sb", &path, &Req::Ls {}).unwrap();
        assert!(r.ok, "{r:?}");
        server.join().unwrap();
        drop(running);
    }

    /// Connects to `sock` as uid `uid` (a perl child) and sends a request;
    /// what it printed.
    fn as_uid(uid: u32, sock: &Path) -> String {
        use std::os::unix::process::CommandExt;
        let script = r#"use Socket; socket(S, PF_UNIX, SOCK_STREAM, 0) or die;
            connect(S, sockaddr_un($ARGV[0])) or do { print "connect: $!\n"; exit 0 };
            syswrite S, qq({"op":"add","rule":{"action":"allow","host":"a.com"}}\n); my $r = <S>; print $r;"#;
        let out =
            std::process::Command::new("perl").arg("-e").arg(script).arg(sock).uid(uid).gid(uid).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    #[test]
    fn another_uid_is_refused_and_nothing_is_done() {
        let me = own_uid();
        if me == 0 && Path::new("/usr/bin/perl").exists() {
            // Root: another uid (nobody) cannot even connect to the 0600
            // socket; let in by the file mode, it is refused by its uid.
            let (dir, live) = served(0);
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let sock = dir.path().join(SOCKET);
            let out = as_uid(65534, &sock);
            assert!(out.contains("connect: Permission denied"), "{out}");
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
            let out = as_uid(65534, &sock);
            assert!(out.contains("uid 65534 is not this sandbox's owner (uid 0) or root"), "{out}");
            assert!(live.rules().0.list().is_empty());
            return;
        }
        let (dir, live) = served(me + 1);
        let r = request("sb", &dir.path().join(SOCKET), &Req::Add { rule: spec("a.com") }).unwrap();
        assert!(!r.ok && r.text.contains(&format!("uid {me} is not this sandbox's owner")), "{r:?}");
        assert!(live.rules().0.list().is_empty());
    }

    #[test]
    fn oversized_garbage_and_unknown_requests_are_refused_with_a_clear_error() {
        let (dir, live) = served(own_uid());
        let path = dir.path().join(SOCKET);
        let mut big = vec![b' '; MAX_REQUEST + 10];
        big.push(b'\n');
        let r = ask(&path, &big);
        assert!(!r.ok && r.text.contains("longer than 65536 bytes"), "{r:?}");
        for (line, want) in [
            (&b"garbage\n"[..], "not a valid request"),
            (b"{\"op\":\"ls\",\"x\":1}\n", "not a valid request"),
            (b"{\"op\":\"format_disk\"}\n", "not a valid request"),
            (b"{\"op\":\"ls\"}", "ending in a newline"),
            (b"{\"op\":\"add\",\"rule\":{\"action\":\"allow\",\"host\":\"127.0.0.1\"}}\n", "IP address"),
            (b"{\"op\":\"add\",\"rule\":{\"action\":\"allow\",\"host\":\"a.com\",\"for_secs\":0}}\n", "--for must be"),
            (b"{\"op\":\"approve\",\"id\":7,\"grant\":\"once\"}\n", "no question #7"),
        ] {
            let r = ask(&path, line);
            assert!(!r.ok && r.text.contains(want), "{}: {r:?}", String::from_utf8_lossy(line));
        }
        assert!(live.rules().0.list().is_empty());
    }

    #[test]
    fn approvals_list_and_answer_held_questions() {
        let (dir, live) = served(own_uid());
        let path = dir.path().join(SOCKET);
        live.tick(1_000);
        let key = QKey { host: HostName::parse("x.com").unwrap(), port: 443, rule: None, mutations: None };
        let t = live.hold(key, None, Some(("POST", "/v1/things"))).unwrap();
        let r = request("sb", &path, &Req::Approvals {}).unwrap();
        assert!(
            r.text.contains("x.com:443/v1/things") && r.text.contains("waiting") && r.text.contains("POST"),
            "{}",
            r.text
        );
        let r = request("sb", &path, &Req::Approve { id: t.id, grant: Grant::Always }).unwrap();
        assert!(r.ok && r.text.contains("live rule #1"), "{r:?}");
        assert_eq!(live.answer(t.id), Answer::Approved { by: own_uid() });
    }

    #[test]
    fn approvals_show_the_graphql_mutations_after_the_fixed_fields() {
        let live = Live::new("sb", LiveRules::default());
        let key = QKey {
            host: HostName::parse("api.github.com").unwrap(),
            port: 443,
            rule: Some("r".into()),
            mutations: None,
        };
        live.hold_detail(key, None, Some(("POST", "/graphql")), Some("mutation mergePullRequest")).unwrap();
        let text = approvals_text(&live);
        let line = text.lines().nth(1).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[1..4], &["waiting", "api.github.com:443/graphql", "POST"], "{text}");
        assert!(line.ends_with("r (mutation mergePullRequest)"), "{text}");
    }

    #[test]
    fn approving_a_graphql_question_names_the_scope_of_the_grant() {
        let live = Live::new("sb", LiveRules::default());
        let ask = netstack::live::AskRule::parse(
            "api.github.com",
            None,
            vec!["POST".into()],
            Some("/graphql"),
            "rule 1".into(),
        )
        .and_then(|a| a.with_graphql(&["*".into()]))
        .unwrap();
        let key = QKey {
            host: HostName::parse("api.github.com").unwrap(),
            port: 443,
            rule: Some(ask.to_string()),
            mutations: Some(vec!["createIssue".into()]),
        };
        let http = Some(("POST", "/graphql"));
        let t = live.hold_graphql(
            key.clone(),
            Some(ask.clone()),
            http,
            Some("mutation createIssue"),
            Some(vec!["createIssue".into()]),
        );
        let grant = Grant::ForSecs(600);
        let text = execute(&Req::Approve { id: t.unwrap().id, grant }, &live, None, 1000).unwrap();
        assert!(
            text.contains("graphql mutation createIssue on api.github.com:443/graphql (POST) (600 s left)"),
            "{text}"
        );
        assert!(ls_text(&live, None).contains("graphql mutations createIssue"));
        // Mutations not all known: said so, not a silent once.
        let key = QKey { mutations: None, ..key };
        let t = live.hold_graphql(key, Some(ask), http, Some("unreadable: chunked"), None);
        let text = execute(&Req::Approve { id: t.unwrap().id, grant }, &live, None, 1000).unwrap();
        assert!(text.contains("approved once only"), "{text}");
    }

    #[test]
    fn persisted_rules_round_trip_and_a_hostile_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let live = Live::new("sb", LiveRules::default());
        live.add_rule(&spec("a.com"), None).unwrap();
        save(dir.path(), &live.persisted()).unwrap();
        let mode = std::fs::metadata(dir.path().join(LIVE_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(dir.path(), 0).unwrap().list().len(), 1);
        std::fs::write(dir.path().join(LIVE_FILE), b"{\"version\":1,\"next_id\":2,\"rules\":[{\"id\":1}]}").unwrap();
        let e = load(dir.path(), 0).unwrap_err().to_string();
        assert!(e.contains(LIVE_FILE) && e.contains("sbx policy reset"), "{e}");
    }

    #[test]
    fn a_grant_counts_from_now_though_the_stack_was_idle_and_changes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let listener = listen(dir.path()).unwrap();
        // The stack last ran at ms 5 (it runs only when something happens).
        let live = Live::new("sb", LiveRules::default());
        live.tick(5);
        let (l, d) = (live.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || serve(listener, l, Policy::from_toml("version = 1\n").unwrap(), d));
        let rule = RuleSpec { for_secs: Some(600), ..spec("a.com") };
        assert!(request("sb", &dir.path().join(SOCKET), &Req::Add { rule }).unwrap().ok);
        let before = sandbox::now_unix_ms();
        match live.rules().0.list()[0].limit {
            netstack::live::Limit::Until(t) => assert!(t >= before + 590_000, "from now, not from ms 5: {t}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(load(dir.path(), before).unwrap().list().len(), 1, "kept at once");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        for bad in ["", "0s", "10x", "m", "-1m", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_live_allow_the_admin_policy_denies_is_refused_and_ls_names_each_layer() {
        let admin = crate::machine_policy::parse(
            Path::new(crate::machine_policy::PATH),
            b"version = 1\n[[rule]]\ndeny = \"evil.example\"\n[[rule]]\nask = \"api.github.com\"\nmethods = [\"DELETE\"]\n",
        )
        .unwrap();
        let live = Live::new("sb", LiveRules::default());
        live.set_admin(admin.network, "loaded");
        for host in ["evil.example", "EVIL.example:443", "*.example", "api.github.com"] {
            let e = execute(&Req::Add { rule: spec(host) }, &live, None, 0).unwrap_err();
            assert!(e.contains("admin policy") && e.contains(crate::machine_policy::PATH), "{host}: {e}");
        }
        assert!(live.rules().0.list().is_empty(), "nothing was added");
        assert!(execute(&Req::Add { rule: spec("good.example") }, &live, None, 0).is_ok());
        let deny = RuleSpec { action: "deny".into(), ..spec("evil.example") };
        assert!(execute(&Req::Add { rule: deny }, &live, None, 0).is_ok(), "a live deny narrows: allowed");
        let mut policy = Policy::from_toml(
            "version = 1\npreset = \"balanced\"\ninclude = [\"ask:github\"]\n[[rule]]\nallow = \"a.example\"\n[[rule]]\nask = \"b.example\"\n",
        )
        .unwrap();
        policy.add_agent("claude").unwrap();
        policy.allow("c.example").unwrap();
        let ls = execute(&Req::Ls {}, &live, Some(&policy), 0).unwrap();
        for line in [
            "  admin  admin policy rule 1: deny evil.example ports 80,443",
            "  admin  admin policy rule 2: ask api.github.com ports 80,443 methods DELETE",
            "  preset preset balanced: allow api.anthropic.com ports 80,443",
            "  file   rule 1: allow a.example ports 80,443",
            "  agent  agent claude: allow console.anthropic.com ports 80,443",
            "  flag   --allow: allow c.example ports 80,443",
            "  file   rule 2: ask b.example ports 80,443",
            "  preset ask:github merge: ask api.github.com ports 80,443 methods PUT path /repos/*/*/pulls/*/merge",
        ] {
            assert!(ls.lines().any(|l| l == line), "{line:?} not in\n{ls}");
        }
        assert!(ls.contains("live #1: allow good.example") && ls.contains("admin deny > live deny"), "{ls}");
    }
}
