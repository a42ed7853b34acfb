//! Host side: subscription sign-ins (OAuth) whose tokens never enter the
//! VM. The real access and refresh tokens live in the host's secret store
//! ([`TokenStore`], sbx's `secrets/`); the guest's credential file holds
//! two placeholders, unguessable and fresh for every run
//! ([`OAuthSession::access_placeholder`], [`OAuthSession::refresh_placeholder`]),
//! and the real expiry.
//!
//! - Access: the OAuth credential is an ordinary [`crate::credential`]
//!   binding (`Authorization: Bearer`, the agent's API hosts) whose value
//!   is the session's current access token: injected, scrubbed from
//!   responses and audited exactly like an API key.
//! - Refresh: a `POST` to the provider's token endpoint ([`Provider`], from
//!   `agents/presets.toml`)
//!   over TLS netstack terminated never goes upstream as the guest sent
//!   it. netstack reads its body (JSON, at most [`MAX_TOKEN_REQUEST`]
//!   bytes, `Content-Length` framing only), requires `grant_type` =
//!   `refresh_token` and `refresh_token` = the session's refresh
//!   placeholder, and then, holding the store's lock for that secret
//!   ([`TokenStore::update`], one lock for every sandbox on the host):
//!   if the stored refresh token is no longer the one the guest's
//!   placeholder stood for (another sandbox refreshed meanwhile), or the
//!   secret's last exchange is under [`MIN_EXCHANGE_INTERVAL_MS`] old
//!   (the rate limit, below), the guest is answered from the store, with
//!   no exchange; otherwise
//!   netstack performs the exchange itself ([`Exchange`]; the guest's
//!   JSON with the real refresh token in place of the placeholder, every
//!   other field as sent), reads the answer (at most
//!   [`MAX_TOKEN_RESPONSE`] bytes, status 200, a JSON object with
//!   `access_token`, optionally `refresh_token` and `expires_in`), and
//!   writes the new tokens back to the store before the lock is
//!   released. The guest gets `{access_token, refresh_token, expires_in,
//!   token_type}` with its placeholders, plus the upstream answer's other
//!   fields save any named `*token*` (and, for Codex, a synthetic
//!   `id_token`: below); a body that would still hold any real token
//!   value is refused.
//!
//! Why netstack does the exchange itself rather than rewriting the
//! request on the way up and the response on the way down: it must be
//! able to answer without an exchange (the store is newer), to serialise
//! exchanges across sandboxes, and to refuse a malformed answer before a
//! byte of it reaches the guest; a rewritten stream can do none of these.
//! Anything unexpected (not JSON, another grant, another placeholder, a
//! non-200 or malformed answer, an unreachable endpoint) gets the guest a
//! JSON error (`{"error":"sbx_oauth","reason":…}`, 400 for its own
//! mistakes, 502 for the endpoint's), never a token; each refresh is an
//! audit line (`"event":"oauth"`, the credential, `"outcome"`
//! `exchanged`/`from_store`/`refused`, the new expiry; never a value).
//! Every refresh answer closes its connection.
//!
//! Rate limit: at most one exchange per secret per
//! [`MIN_EXCHANGE_INTERVAL_MS`], whatever its result, across every
//! sandbox of the host. The time of the last attempt
//! ([`Tokens::exchanged_at_ms`]) is part of the stored secret (sbx keeps
//! it in the secret's file, written under the same lock), so a second
//! sandbox sees it too. A refresh within the interval is answered from
//! the store ([`Outcome::FromStore`]): the tokens an exchange moments ago
//! produced, or, after a failed one, the tokens still held. Without it a
//! hostile guest repeating its (valid) placeholder would have netstack
//! spend the user's refresh token at the provider as fast as it can ask,
//! rotating tokens, and with fields of its own choosing (the guest's
//! `client_id`, `scope` go up as sent) each attempt could be made to
//! fail; failures count for that reason. An interval rather than "only
//! near expiry": the agents also refresh on a 401 (a token revoked
//! early), and Codex's stored expiry may be unknown; a minute is longer
//! than any agent's retry burst and far shorter than any token's life.
//!
//! Codex ([`Provider::id_token`]): its refresh answer and `auth.json`
//! carry an OpenID `id_token`, a JWT whose payload Codex decodes without
//! checking the signature, for the account's email, plan
//! (`https://api.openai.com/auth` → `chatgpt_plan_type`) and ids
//! (`chatgpt_account_id`, `chatgpt_user_id`). The guest never gets the
//! real one: it is a signed identity assertion of the user, which
//! another party might accept as proof of who they are, and the guest
//! needs none of it but those claims. The store keeps the claims alone
//! ([`Tokens::id_claims`], [`id_claims`], a fixed list [`ID_CLAIMS`]),
//! replaced by those of each new real `id_token` an exchange returns; the
//! guest gets [`synthetic_id_token`], an unsigned JWT (`alg` `none`, a
//! fixed non-empty signature part, as Codex requires three non-empty
//! parts) carrying them.
//!
//! The endpoints are data: each agent's `[agent.oauth]` table in
//! `agents/presets.toml` ([`crate::preset`], [`provider`]), taken from
//! the agents' public behaviour, not from a specification.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::conn::{choose_upstream, Resolve};
use crate::credential::Secret;
use crate::host::HostName;

/// Largest token request body accepted from the guest.
pub const MAX_TOKEN_REQUEST: usize = 16 * 1024;
/// Largest token endpoint answer read (head and body).
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Longest wait for the token endpoint (connect, and each read).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Real token values remembered per session for scrubbing (the current
/// ones and those they replaced).
pub const MAX_KNOWN_TOKENS: usize = 8;
/// Longest `expires_in` believed (a year), in seconds.
pub const MAX_EXPIRES_IN: u64 = 365 * 24 * 3600;
/// Shortest time between two exchanges of one secret with its provider
/// (any sandbox, any result); a refresh sooner is answered from the store.
pub const MIN_EXCHANGE_INTERVAL_MS: u64 = 60_000;
/// Largest `id_token` decoded.
pub const MAX_ID_TOKEN: usize = 16 * 1024;
/// The `id_token` claims kept (Codex's `IdClaims`): top-level names, and
/// names inside [`OPENAI_AUTH_CLAIM`]. String values only.
pub const ID_CLAIMS: &[&str] = &["email"];
/// Codex's namespaced claim object in its `id_token`.
pub const OPENAI_AUTH_CLAIM: &str = "https://api.openai.com/auth";
/// The names kept inside [`OPENAI_AUTH_CLAIM`].
pub const OPENAI_AUTH_CLAIMS: &[&str] = &["chatgpt_plan_type", "chatgpt_user_id", "user_id", "chatgpt_account_id"];
/// The signature part of a [`synthetic_id_token`] (base64url of
/// `sbx-unsigned`): not a signature, but Codex wants the part non-empty.
pub const SYNTHETIC_SIGNATURE: &str = "c2J4LXVuc2lnbmVk";

/// An agent's OAuth: where its API is, where it refreshes. Data: the
/// agent's `[agent.oauth]` table in `agents/presets.toml`
/// ([`crate::preset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub agent: String,
    /// Hosts the access token goes to (`Authorization: Bearer`).
    pub api_hosts: Vec<HostName>,
    /// Hosts of the token endpoint.
    pub token_hosts: Vec<HostName>,
    pub token_path: String,
    /// Its sign-in carries an OpenID `id_token` the agent decodes
    /// (Codex): kept as claims, given to the guest synthetic (module docs).
    pub id_token: bool,
    /// The agent's credential file, relative to the home: imported from
    /// the host's, written to the guest's (placeholders only).
    pub credentials_file: String,
}

/// The provider of `agent`: its preset's sign-in, if it has one.
pub fn provider(agent: &str) -> Option<&'static Provider> {
    crate::preset::find(agent)?.network.oauth.as_ref()
}

/// An OAuth secret's real values.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub access: Secret,
    pub refresh: Secret,
    /// Unix milliseconds (0: unknown).
    pub expires_at_ms: u64,
    /// Unix milliseconds of the last exchange attempted with the provider
    /// (0: none known): the rate limit ([`MIN_EXCHANGE_INTERVAL_MS`]).
    pub exchanged_at_ms: u64,
    /// The provider's `id_token` claims the agent reads ([`id_claims`];
    /// not secrets; empty without one).
    pub id_claims: Map<String, Value>,
}

/// The host store of OAuth secrets.
pub trait TokenStore: Send + Sync {
    /// Calls `f` with the stored tokens of `name` under a lock that every
    /// sandbox on the host takes for that name; tokens `f` returns are
    /// stored before the lock is released. Returns the tokens stored
    /// after it.
    fn update(&self, name: &str, f: &mut dyn FnMut(&Tokens) -> Result<Option<Tokens>, Error>) -> Result<Tokens, Error>;
}

/// One POST to a token endpoint: (status, body).
pub trait Exchange: Send + Sync {
    fn post(&self, host: &HostName, path: &str, body: &[u8]) -> Result<(u16, Zeroizing<Vec<u8>>), Error>;
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("the token request must be JSON with a Content-Length of at most {MAX_TOKEN_REQUEST} bytes")]
    RequestFraming,
    #[error("the token request is not a JSON object")]
    RequestJson,
    #[error(
        "only grant_type refresh_token goes to the token endpoint (sign in on the host: sbx secret oauth-import AGENT)"
    )]
    Grant,
    #[error("the refresh_token is not this run's placeholder")]
    Placeholder,
    #[error("the token endpoint answered {0}")]
    Status(u16),
    #[error("the token endpoint's answer is larger than {MAX_TOKEN_RESPONSE} bytes")]
    TooLarge,
    #[error("the token endpoint's answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token endpoint is unreachable: {0}")]
    Unreachable(String),
    #[error("the answer would have carried a real token")]
    WouldLeak,
    #[error("the host's token store: {0}")]
    Store(String),
}

impl Error {
    /// The status the guest gets: 400 for its own request, 502 else.
    pub fn status(&self) -> &'static str {
        match self {
            Error::RequestFraming | Error::RequestJson | Error::Grant | Error::Placeholder => "400 Bad Request",
            _ => "502 Bad Gateway",
        }
    }
}

/// How a refresh was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// netstack performed the exchange; the store has the new tokens.
    Exchanged,
    /// Answered from the store, with no exchange: it was newer than the
    /// guest's tokens, or the secret's last exchange was too recent
    /// ([`MIN_EXCHANGE_INTERVAL_MS`]).
    FromStore,
}

/// One OAuth secret in one sandbox run.
pub struct OAuthSession {
    /// The secret's (and credential's) name.
    pub name: String,
    pub provider: &'static Provider,
    pub access_placeholder: String,
    pub refresh_placeholder: String,
    /// What the guest's placeholders stand for now.
    current: Mutex<Tokens>,
    /// Every real value of this run, for the scrubber (bounded).
    known: Mutex<Vec<Secret>>,
    store: Arc<dyn TokenStore>,
    /// One refresh at a time in this sandbox (the store locks across).
    busy: Mutex<()>,
}

impl std::fmt::Debug for OAuthSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSession").field("name", &self.name).field("agent", &self.provider.agent).finish()
    }
}

/// A fresh placeholder `sbx-oauth-KIND-<32 hex digits>`.
pub fn new_placeholder(kind: &str) -> Result<String, crate::credential::Error> {
    let p = crate::credential::new_placeholder(kind)?;
    Ok(p.replacen(crate::credential::PLACEHOLDER_PREFIX, "sbx-oauth-", 1))
}

impl OAuthSession {
    /// A session for secret `name` whose stored tokens are `tokens`, with
    /// fresh placeholders.
    pub fn new(
        name: &str,
        provider: &'static Provider,
        tokens: Tokens,
        store: Arc<dyn TokenStore>,
    ) -> Result<OAuthSession, crate::credential::Error> {
        Ok(OAuthSession::with_placeholders(
            name,
            provider,
            tokens,
            store,
            new_placeholder("access")?,
            new_placeholder("refresh")?,
        ))
    }

    /// The same with given placeholders (tests).
    pub fn with_placeholders(
        name: &str,
        provider: &'static Provider,
        tokens: Tokens,
        store: Arc<dyn TokenStore>,
        access_placeholder: String,
        refresh_placeholder: String,
    ) -> OAuthSession {
        let known = vec![tokens.access.clone(), tokens.refresh.clone()];
        OAuthSession {
            name: name.to_string(),
            provider,
            access_placeholder,
            refresh_placeholder,
            current: Mutex::new(tokens),
            known: Mutex::new(known),
            store,
            busy: Mutex::new(()),
        }
    }

    /// The access token injected now.
    pub fn access(&self) -> Secret {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).access.clone()
    }

    /// The expiry the guest's tokens have now (Unix ms).
    pub fn expires_at_ms(&self) -> u64 {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).expires_at_ms
    }

    /// Every real value of this run (what responses are scrubbed of).
    pub fn known(&self) -> Vec<Secret> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether `host` is this provider's token endpoint host.
    pub fn is_token_host(&self, host: &HostName) -> bool {
        self.provider.token_hosts.iter().any(|h| host.as_str().eq_ignore_ascii_case(h.as_str()))
    }

    /// Whether a request is a refresh this session answers.
    pub fn is_token_request(&self, host: &HostName, method: &str, path: &str) -> bool {
        method == "POST"
            && self.is_token_host(host)
            && path.split('?').next() == Some(self.provider.token_path.as_str())
    }

    /// Answers the guest's refresh request `body` (see the module docs):
    /// the JSON body for the guest and how it was answered.
    pub fn refresh(
        &self,
        host: &HostName,
        body: &[u8],
        exchange: &dyn Exchange,
        now_ms: u64,
    ) -> Result<(Vec<u8>, Outcome), Error> {
        let request: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(m)) => m,
            _ => return Err(Error::RequestJson),
        };
        if request.get("grant_type").and_then(Value::as_str) != Some("refresh_token") {
            return Err(Error::Grant);
        }
        if request.get("refresh_token").and_then(Value::as_str) != Some(self.refresh_placeholder.as_str()) {
            return Err(Error::Placeholder);
        }
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.current.lock().unwrap_or_else(|e| e.into_inner()).refresh.clone();
        let mut extra = Map::new();
        let mut outcome = Outcome::FromStore;
        let mut failed = None;
        let tokens = self.store.update(&self.name, &mut |stored| {
            if stored.refresh.expose() != held.expose() || too_soon(stored.exchanged_at_ms, now_ms) {
                return Ok(None);
            }
            match self.exchange(host, &request, stored, exchange, now_ms) {
                Ok((tokens, rest)) => {
                    extra = rest;
                    outcome = Outcome::Exchanged;
                    Ok(Some(tokens))
                }
                // The attempt counts for the rate limit: stored, the
                // tokens as they were.
                Err(e) => {
                    failed = Some(e);
                    Ok(Some(Tokens { exchanged_at_ms: now_ms, ..stored.clone() }))
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for s in [&tokens.access, &tokens.refresh] {
                if !known.iter().any(|k| k.expose() == s.expose()) {
                    known.push(s.clone());
                }
            }
            let excess = known.len().saturating_sub(MAX_KNOWN_TOKENS);
            known.drain(..excess);
        }
        let expires_in = tokens.expires_at_ms.saturating_sub(now_ms) / 1000;
        let id_token =
            (self.provider.id_token && !tokens.id_claims.is_empty()).then(|| synthetic_id_token(&tokens.id_claims));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = tokens;
        let mut out = extra;
        out.insert("access_token".into(), json!(self.access_placeholder));
        out.insert("refresh_token".into(), json!(self.refresh_placeholder));
        out.insert("expires_in".into(), json!(expires_in));
        out.entry("token_type").or_insert(json!("Bearer"));
        if let Some(id_token) = id_token {
            out.insert("id_token".into(), json!(id_token));
        }
        let body = serde_json::to_vec(&Value::Object(out)).map_err(|_| Error::Malformed("unserialisable"))?;
        let leaks = self.known().iter().any(|s| {
            let s = s.expose().as_bytes();
            body.windows(s.len()).any(|w| w == s)
        });
        if leaks {
            return Err(Error::WouldLeak);
        }
        Ok((body, outcome))
    }
}

impl OAuthSession {
    /// One exchange of `stored`'s refresh token: the guest's `request` with
    /// the real refresh token in place of the placeholder; the new tokens
    /// (stamped `now_ms`) and the answer's other fields.
    fn exchange(
        &self,
        host: &HostName,
        request: &Map<String, Value>,
        stored: &Tokens,
        exchange: &dyn Exchange,
        now_ms: u64,
    ) -> Result<(Tokens, Map<String, Value>), Error> {
        let mut up = request.clone();
        up.insert("refresh_token".into(), Value::String(stored.refresh.expose().to_string()));
        let up = Zeroizing::new(serde_json::to_vec(&Value::Object(up)).map_err(|_| Error::RequestJson)?);
        let (status, answer) = exchange.post(host, &self.provider.token_path, &up)?;
        if status != 200 {
            return Err(Error::Status(status));
        }
        parse_answer(&answer, stored, self.provider, now_ms)
    }
}

/// Whether an exchange at `last_ms` is too recent for another at `now_ms`
/// ([`MIN_EXCHANGE_INTERVAL_MS`]; a clock set back does not hold it).
pub fn too_soon(last_ms: u64, now_ms: u64) -> bool {
    last_ms != 0 && now_ms >= last_ms && now_ms - last_ms < MIN_EXCHANGE_INTERVAL_MS
}

/// The new tokens in an endpoint's answer, and its other fields (those
/// not naming a token).
fn parse_answer(
    answer: &[u8],
    old: &Tokens,
    provider: &Provider,
    now_ms: u64,
) -> Result<(Tokens, Map<String, Value>), Error> {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(answer) else {
        return Err(Error::Malformed("not a JSON object"));
    };
    let access = match m.remove("access_token") {
        Some(Value::String(s)) => Secret::new(&s).map_err(|_| Error::Malformed("bad access_token"))?,
        _ => return Err(Error::Malformed("no access_token")),
    };
    let refresh = match m.remove("refresh_token") {
        Some(Value::String(s)) => Secret::new(&s).map_err(|_| Error::Malformed("bad refresh_token"))?,
        None | Some(Value::Null) => old.refresh.clone(),
        Some(_) => return Err(Error::Malformed("bad refresh_token")),
    };
    let expires_at_ms = match m.remove("expires_in") {
        Some(v) => {
            let secs = v.as_u64().filter(|s| *s <= MAX_EXPIRES_IN).ok_or(Error::Malformed("bad expires_in"))?;
            now_ms.saturating_add(secs * 1000)
        }
        None => 0,
    };
    let id_claims = match m.remove("id_token") {
        // Unreadable, the claims stay as they were rather than the answer
        // being refused: the exchange has already spent the old refresh
        // token, and the guest needs the claims for display alone.
        Some(Value::String(s)) if provider.id_token => id_claims(&s).unwrap_or_else(|_| old.id_claims.clone()),
        _ => old.id_claims.clone(),
    };
    m.retain(|k, _| !k.to_ascii_lowercase().contains("token") || k == "token_type");
    Ok((Tokens { access, refresh, expires_at_ms, exchanged_at_ms: now_ms, id_claims }, m))
}

/// The exchange over TLS from the host: the name resolved and checked
/// like any upstream ([`choose_upstream`]), the certificate verified
/// against `config`'s roots, one request, `Connection: close`.
pub struct TlsExchange {
    pub config: Arc<rustls::ClientConfig>,
    pub resolver: Arc<dyn Resolve>,
    pub permitted: Vec<std::net::IpAddr>,
}

impl Exchange for TlsExchange {
    fn post(&self, host: &HostName, path: &str, body: &[u8]) -> Result<(u16, Zeroizing<Vec<u8>>), Error> {
        let un = |e: String| Error::Unreachable(e);
        let addr =
            choose_upstream(host, self.resolver.lookup(host, 443), &self.permitted).map_err(|e| un(e.to_string()))?;
        let tcp = TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT).map_err(|e| un(e.to_string()))?;
        tcp.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| un(e.to_string()))?;
        tcp.set_write_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| un(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(host.as_str().to_string()).map_err(|e| un(e.to_string()))?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| un(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut req = Zeroizing::new(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nAccept-Encoding: identity\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                host.as_str(),
                body.len()
            )
            .into_bytes(),
        );
        req.extend_from_slice(body);
        tls.write_all(&req).and_then(|_| tls.flush()).map_err(|e| un(e.to_string()))?;
        let mut raw = Zeroizing::new(Vec::new());
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if raw.len() > MAX_TOKEN_RESPONSE {
                        return Err(Error::TooLarge);
                    }
                }
                // An upstream that closes without close_notify: what came
                // is judged by its framing below.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(un(e.to_string())),
            }
        }
        parse_response(&raw)
    }
}

/// Status and body of a whole HTTP/1.1 response (Content-Length,
/// chunked, or to the end).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Zeroizing<Vec<u8>>), Error> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(Error::Malformed("no response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| Error::Malformed("response head not UTF-8"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 ").or_else(|| l.strip_prefix("HTTP/1.0 ")))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(Error::Malformed("bad status line"))?;
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { return Err(Error::Malformed("bad header line")) };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().map_err(|_| Error::Malformed("bad Content-Length"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            if !v.eq_ignore_ascii_case("chunked") {
                return Err(Error::Malformed("unknown transfer coding"));
            }
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-encoding") && !v.eq_ignore_ascii_case("identity") {
            return Err(Error::Malformed("coded body"));
        }
    }
    let body = if chunked {
        let mut out = Zeroizing::new(Vec::new());
        let mut at = rest;
        loop {
            let nl = at.windows(2).position(|w| w == b"\r\n").ok_or(Error::Malformed("truncated chunk"))?;
            let size = std::str::from_utf8(&at[..nl]).map_err(|_| Error::Malformed("bad chunk size"))?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| Error::Malformed("bad chunk size"))?;
            at = &at[nl + 2..];
            if size == 0 {
                break;
            }
            if at.len() < size + 2 || &at[size..size + 2] != b"\r\n" {
                return Err(Error::Malformed("truncated chunk"));
            }
            out.extend_from_slice(&at[..size]);
            at = &at[size + 2..];
        }
        out
    } else if let Some(n) = length {
        if rest.len() < n {
            return Err(Error::Malformed("truncated body"));
        }
        Zeroizing::new(rest[..n].to_vec())
    } else {
        Zeroizing::new(rest.to_vec())
    };
    Ok((status, body))
}

/// An in-memory [`TokenStore`] (tests, and one-process use).
#[derive(Default)]
pub struct MemoryStore {
    pub tokens: Mutex<std::collections::HashMap<String, Tokens>>,
    /// Updates that stored new tokens.
    pub writes: std::sync::atomic::AtomicUsize,
}

impl TokenStore for MemoryStore {
    fn update(&self, name: &str, f: &mut dyn FnMut(&Tokens) -> Result<Option<Tokens>, Error>) -> Result<Tokens, Error> {
        let mut all = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let stored = all.get(name).ok_or_else(|| Error::Store(format!("no OAuth secret '{name}'")))?;
        match f(stored)? {
            Some(new) => {
                all.insert(name.to_string(), new.clone());
                self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(new)
            }
            None => Ok(stored.clone()),
        }
    }
}

/// The JSON error the guest gets for a refused refresh.
pub fn error_response(e: &Error) -> Vec<u8> {
    let body = json!({"error": "sbx_oauth", "reason": e.to_string()}).to_string();
    format!(
        "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        e.status(),
        body.len()
    )
    .into_bytes()
}

/// The guest's answer to a refresh.
pub fn ok_response(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding (JWT parts).
pub fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64URL[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes base64url, padded or not; `None` for any other character.
pub fn unbase64url(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut n, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = B64URL.iter().position(|a| *a == c)? as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
            n &= (1 << bits) - 1;
        }
    }
    // A lone 6-bit tail is no byte: not base64.
    (bits < 6).then_some(out)
}

/// The claims of a JWT `id_token`'s payload the agent reads ([`ID_CLAIMS`],
/// [`OPENAI_AUTH_CLAIMS`] in [`OPENAI_AUTH_CLAIM`]), its signature not
/// checked (they are kept, not trusted: the guest gets them anyway).
pub fn id_claims(jwt: &str) -> Result<Map<String, Value>, Error> {
    let bad = Error::Malformed("bad id_token");
    if jwt.len() > MAX_ID_TOKEN {
        return Err(bad);
    }
    let mut parts = jwt.split('.');
    let payload = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() && !s.is_empty() => p,
        _ => return Err(bad),
    };
    let payload = Zeroizing::new(unbase64url(payload).ok_or(bad.clone())?);
    let Ok(Value::Object(all)) = serde_json::from_slice::<Value>(&payload) else { return Err(bad) };
    let strings = |from: &Map<String, Value>, names: &[&str]| -> Map<String, Value> {
        names.iter().filter_map(|k| from.get(*k).and_then(Value::as_str).map(|v| (k.to_string(), json!(v)))).collect()
    };
    let mut out = strings(&all, ID_CLAIMS);
    if let Some(Value::Object(auth)) = all.get(OPENAI_AUTH_CLAIM) {
        let auth = strings(auth, OPENAI_AUTH_CLAIMS);
        if !auth.is_empty() {
            out.insert(OPENAI_AUTH_CLAIM.into(), Value::Object(auth));
        }
    }
    Ok(out)
}

/// An unsigned JWT carrying `claims` (header `{"alg":"none","typ":"JWT"}`,
/// signature part [`SYNTHETIC_SIGNATURE`]): the guest's `id_token`.
pub fn synthetic_id_token(claims: &Map<String, Value>) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(Value::Object(claims.clone()).to_string().as_bytes());
    format!("{header}.{payload}.{SYNTHETIC_SIGNATURE}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A token endpoint answering `answer` to every POST, counting them.
    struct Fixed {
        answer: String,
        posts: AtomicUsize,
        last: Mutex<Vec<u8>>,
    }

    impl Exchange for Fixed {
        fn post(&self, _: &HostName, _: &str, body: &[u8]) -> Result<(u16, Zeroizing<Vec<u8>>), Error> {
            self.posts.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().unwrap() = body.to_vec();
            Ok((200, Zeroizing::new(self.answer.clone().into_bytes())))
        }
    }

    fn jwt(payload: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            base64url(br#"{"alg":"RS256","kid":"k1"}"#),
            base64url(payload.to_string().as_bytes())
        )
    }

    /// Codex's `parse_id_token`: three non-empty parts, the payload
    /// base64url without padding, JSON; its claims.
    fn codex_parse_id_token(t: &str) -> Value {
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3, "{t}");
        assert!(parts.iter().all(|p| !p.is_empty()), "{t}");
        assert!(!parts[1].contains('='), "no padding: {t}");
        serde_json::from_slice(&unbase64url(parts[1]).unwrap()).unwrap()
    }

    const REAL_ACCESS: &str = "eyJreal-access-0001";
    const REAL_REFRESH: &str = "rt_real-refresh-0001";
    const NEW_ACCESS: &str = "eyJreal-access-0002";
    const NEW_REFRESH: &str = "rt_real-refresh-0002";
    const REAL_SIGNATURE: &str = "cmVhbC1yc2Etc2lnbmF0dXJlLWJ5LW9wZW5haQ";

    fn codex_session(store: &Arc<MemoryStore>, claims: Map<String, Value>) -> OAuthSession {
        let tokens = Tokens {
            access: Secret::new(REAL_ACCESS).unwrap(),
            refresh: Secret::new(REAL_REFRESH).unwrap(),
            expires_at_ms: 0,
            exchanged_at_ms: 0,
            id_claims: claims,
        };
        store.tokens.lock().unwrap().insert("codex-oauth".into(), tokens.clone());
        OAuthSession::with_placeholders(
            "codex-oauth",
            provider("codex").unwrap(),
            tokens,
            store.clone(),
            format!("sbx-oauth-access-{:032x}", 1),
            format!("sbx-oauth-refresh-{:032x}", 1),
        )
    }

    fn codex_request(s: &OAuthSession) -> Vec<u8> {
        json!({"client_id": "app_EMoamEEZ73f0CkXaXp7hrann", "grant_type": "refresh_token",
            "refresh_token": s.refresh_placeholder, "scope": "openid profile email"})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn base64url_round_trips_every_length() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(200)).collect();
            let text = base64url(&bytes);
            assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'), "{text}");
            assert_eq!(unbase64url(&text).unwrap(), bytes);
        }
        assert_eq!(base64url(b"sbx-unsigned"), SYNTHETIC_SIGNATURE);
        assert!(unbase64url("a").is_none() && unbase64url("ab+c").is_none());
    }

    #[test]
    fn only_the_claims_codex_reads_are_kept() {
        let real = jwt(
            &json!({"email": "u@example.com", "sub": "auth0|x", "aud": ["app"], "exp": 1,
                "https://api.openai.com/auth": {"chatgpt_plan_type": "pro", "chatgpt_account_id": "acc-1",
                "chatgpt_user_id": "user-1", "organizations": [{"id": "org"}]}}),
            REAL_SIGNATURE,
        );
        let claims = id_claims(&real).unwrap();
        assert_eq!(
            Value::Object(claims),
            json!({"email": "u@example.com", "https://api.openai.com/auth":
                {"chatgpt_plan_type": "pro", "chatgpt_account_id": "acc-1", "chatgpt_user_id": "user-1"}})
        );
        for bad in ["", "a.b", "a..c", "a.b.c.d", "a.!!.c", &format!("a.{}.c", base64url(b"[1]"))] {
            assert_eq!(id_claims(bad), Err(Error::Malformed("bad id_token")), "{bad}");
        }
    }

    #[test]
    fn a_codex_refresh_answer_carries_a_synthetic_id_token_with_the_new_claims() {
        let store = Arc::new(MemoryStore::default());
        let old = id_claims(&jwt(
            &json!({"email": "u@example.com",
            "https://api.openai.com/auth": {"chatgpt_plan_type": "plus", "chatgpt_account_id": "acc-1"}}),
            "s",
        ))
        .unwrap();
        let s = codex_session(&store, old);
        let real_id = jwt(
            &json!({"email": "u@example.com", "sub": "auth0|x",
                "https://api.openai.com/auth": {"chatgpt_plan_type": "pro", "chatgpt_account_id": "acc-1"}}),
            REAL_SIGNATURE,
        );
        let up = Fixed {
            answer: json!({"id_token": real_id, "access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH,
                "expires_in": 864000})
            .to_string(),
            posts: AtomicUsize::new(0),
            last: Mutex::new(Vec::new()),
        };
        let host = HostName::parse("auth.openai.com").unwrap();
        let (body, outcome) = s.refresh(&host, &codex_request(&s), &up, 1_000_000).unwrap();
        assert_eq!(outcome, Outcome::Exchanged);
        let text = String::from_utf8(body).unwrap();
        for real in [REAL_ACCESS, REAL_REFRESH, NEW_ACCESS, NEW_REFRESH, REAL_SIGNATURE, real_id.as_str()] {
            assert!(!text.contains(real), "{real} reached the guest: {text}");
        }
        // What Codex's RefreshResponse reads: id_token, access_token, refresh_token.
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["access_token"], s.access_placeholder.as_str());
        assert_eq!(v["refresh_token"], s.refresh_placeholder.as_str());
        let id = v["id_token"].as_str().expect("an id_token");
        assert!(id.ends_with(&format!(".{SYNTHETIC_SIGNATURE}")), "unsigned: {id}");
        let claims = codex_parse_id_token(id);
        assert_eq!(claims["https://api.openai.com/auth"]["chatgpt_plan_type"], "pro", "the new claims");
        assert_eq!(claims["https://api.openai.com/auth"]["chatgpt_account_id"], "acc-1");
        assert_eq!(claims["email"], "u@example.com");
        assert!(claims.get("sub").is_none(), "only what Codex reads: {claims}");
        // Upstream got the real refresh token and Codex's other fields.
        let sent: Value = serde_json::from_slice(&up.last.lock().unwrap()).unwrap();
        assert_eq!(
            (sent["refresh_token"].as_str(), sent["scope"].as_str()),
            (Some(REAL_REFRESH), Some("openid profile email"))
        );
        // The store has the new tokens and claims, stamped.
        let stored = store.tokens.lock().unwrap()["codex-oauth"].clone();
        assert_eq!((stored.access.expose(), stored.refresh.expose()), (NEW_ACCESS, NEW_REFRESH));
        assert_eq!(stored.id_claims["https://api.openai.com/auth"]["chatgpt_plan_type"], "pro");
        assert_eq!(stored.exchanged_at_ms, 1_000_000);
    }

    #[test]
    fn two_refreshes_in_a_row_make_one_exchange() {
        let store = Arc::new(MemoryStore::default());
        let s = codex_session(&store, Map::new());
        let up = Fixed {
            answer: json!({"access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH}).to_string(),
            posts: AtomicUsize::new(0),
            last: Mutex::new(Vec::new()),
        };
        let host = HostName::parse("auth.openai.com").unwrap();
        let t0 = 5_000_000;
        assert_eq!(s.refresh(&host, &codex_request(&s), &up, t0).unwrap().1, Outcome::Exchanged);
        let (body, outcome) = s.refresh(&host, &codex_request(&s), &up, t0 + 1).unwrap();
        assert_eq!(outcome, Outcome::FromStore);
        assert_eq!(up.posts.load(Ordering::SeqCst), 1);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["access_token"], s.access_placeholder.as_str());
        assert!(v.get("id_token").is_none(), "no claims, no id_token: Codex keeps its own");
        assert_eq!(s.access().expose(), NEW_ACCESS);
        // After the interval, the next is exchanged; a clock set back too.
        let late = t0 + MIN_EXCHANGE_INTERVAL_MS;
        let _ = s.refresh(&host, &codex_request(&s), &up, late);
        assert_eq!(up.posts.load(Ordering::SeqCst), 2);
        assert!(!too_soon(late, late - 1) && too_soon(late, late) && !too_soon(0, 1));
    }

    #[test]
    fn an_unreadable_new_id_token_keeps_the_old_claims_and_the_new_tokens() {
        let store = Arc::new(MemoryStore::default());
        let old = id_claims(&jwt(&json!({"email": "u@example.com"}), "s")).unwrap();
        let s = codex_session(&store, old.clone());
        let up = Fixed {
            answer: json!({"id_token": "garbage", "access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH})
                .to_string(),
            posts: AtomicUsize::new(0),
            last: Mutex::new(Vec::new()),
        };
        let host = HostName::parse("auth.openai.com").unwrap();
        let (body, _) = s.refresh(&host, &codex_request(&s), &up, 9_000_000).unwrap();
        let stored = store.tokens.lock().unwrap()["codex-oauth"].clone();
        assert_eq!((stored.refresh.expose(), &stored.id_claims), (NEW_REFRESH, &old));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(codex_parse_id_token(v["id_token"].as_str().unwrap())["email"], "u@example.com");
    }
}
