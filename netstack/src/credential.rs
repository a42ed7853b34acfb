//! Host side: credentials that never enter the VM. A secret lives on the
//! host; the policy binds it to hosts and one request header
//! ([`CredentialRule`]); the guest only ever sees a random placeholder in
//! its place. On a request to a bound host over a TLS connection netstack
//! terminated, a bound header whose value is exactly the placeholder (after
//! the rule's scheme, e.g. `Bearer`) has it replaced by the real value on
//! the way upstream ([`Credentials::rewrite`]). Nowhere else is anything
//! replaced: a placeholder sent to a host the credential is not bound to
//! (in the target, any header or the body) refuses the request as a leak
//! attempt; a placeholder in another header, the URL or the body of a
//! request to a bound host passes unchanged, as does everything over plain
//! HTTP. Upstream responses that carry a real value back have it masked
//! before the guest sees them ([`Scrubber`]).
//!
//! Echoes. The guest cannot read the secret, but it can ask a bound
//! upstream that reflects what it receives (an echo endpoint, an error
//! message quoting a header, a store it can read back) to send the value
//! back, sliced, framed or encoded as it likes. What netstack guarantees,
//! on every HTTP connection (plain, or TLS it terminated) of a sandbox
//! that has credentials:
//! - no response hands the guest a run of [`MIN_PIECE`] or more
//!   consecutive bytes of any secret, nor of its hex (either case),
//!   percent-encoded (reserved bytes only, or every byte; either case),
//!   JSON-escaped (`\"`, `\/`, `\u00xx`), HTML-escaped or base64
//!   (standard and URL alphabets, at each of the 3 alignments) forms
//!   (`Pieces`): every byte of such a run is `*` (lengths, so framing,
//!   unchanged). A value shorter than `MIN_PIECE` is masked whole;
//! - this holds for what the guest's HTTP client reads, not the raw
//!   bytes: chunked bodies are searched de-chunked (a chunk boundary in
//!   the value hides nothing), chunk extensions and trailers on their own,
//!   heads on their own; the bodies of all responses on a connection are
//!   one stream, so a run split across pipelined responses is masked
//!   except what the earlier response had already released, at most
//!   `MIN_PIECE - 1` bytes of it; pieces split across reads are held back
//!   (at most `MIN_PIECE - 1` bytes per stream, a response head until it
//!   is whole), and released at each response's end;
//! - requests to a bound host over a terminated connection lose
//!   `Accept-Encoding`, `TE`, `Range` and `If-Range` ([`DROPPED_FIELDS`])
//!   and ask for `Accept-Encoding: identity`, so a reflection comes back
//!   whole and searchable; a response from such a host with a content or
//!   transfer coding anyway (gzip, …) is refused before a byte of its
//!   head leaves: a 502 naming the coding, an audit line, and nothing
//!   more on that connection;
//! - each response in which pieces were masked is an audit line
//!   (`"leak"`: the credential's name, `"masked"`: bytes, `"echoes"`: such
//!   responses so far in the whole sandbox, counted across its
//!   connections, [`Credentials::echoes`]); never the value.
//!
//! Cost: the pieces are computed once per sandbox (18 forms of
//! each secret, one `u64` per `MIN_PIECE`-byte run, sorted, behind a
//! prefilter of 16 bits per piece, at most 8 MiB). Each response byte then
//! costs a shift, a multiply and one bit test, plus a binary search over
//! the pieces for the few bytes (about 1 in 16 at most) that pass the
//! prefilter: linear in the response, whatever the secrets' lengths.
//! Responses are parsed once, for the audit and the scrubber alike
//! ([`crate::http::ResponseTracker::feed_parts`]).
//!
//! What remains (an upstream that transforms what it reflects can always
//! win; bind credentials only to hosts that do not):
//! - runs shorter than `MIN_PIECE`: an upstream that lets the guest pick
//!   which few bytes of a request it reflects (a substring parameter, its
//!   own offsets) gives the value away `MIN_PIECE - 1` bytes per response,
//!   on different connections or interleaved with other bytes, unmasked
//!   and unaudited; so does one that puts other bytes between the pieces
//!   (the value across two header fields, a head and a body, two chunk
//!   extensions);
//! - other transformations: other encodings (base32, UTF-16, base64 with
//!   line breaks, `\u` escapes of letters, quoted-printable), case
//!   changes, reversal, compression the upstream applies inside a body
//!   (a zip file, a gzip-encoded JSON field), encryption, hashes that can
//!   be brute-forced piecewise;
//! - a coded body from a host no credential is bound to (one that
//!   received the value from a bound host) passes unsearched, as do
//!   spliced TLS connections (netstack never sees their bytes) and
//!   responses over plain HTTP (whose requests are never rewritten, so
//!   may ask for compression);
//! - a response the tracker cannot delimit is searched as one stream,
//!   its last `MIN_PIECE - 1` bytes held until the upstream closes;
//! - a `MIN_PIECE`-byte run of a secret that is public (a well-known key
//!   prefix such as `sk-proj-`) is masked, and audited as an echo, in any
//!   response on such a connection.
//!
//! Host patterns: `*.suffix` binds a credential to every name below the
//! suffix, so it is refused where others can own names there
//! ([`shared_suffix`]): a single-label suffix (`*.com`, `*.internal`), a
//! common two-label public suffix (`*.co.uk`, `*.com.au`), a hosting
//! platform where each tenant gets a subdomain (`*.github.io`,
//! `*.herokuapp.com`, [`SHARED_SUFFIXES`]), or anything at or below a
//! cloud domain whose names belong to many customers at every depth
//! (`*.s3.amazonaws.com`, `*.blob.core.windows.net`,
//! [`SHARED_AT_ANY_DEPTH`]). A small built-in list, not the whole Public
//! Suffix List: the cure is always to list the hosts themselves.
//!
//! The guest's bytes reach this module only after [`crate::http`] parsed
//! the head (valid UTF-8, CRLF lines, bounded). Secrets are checked when
//! loaded (visible ASCII, at most [`MAX_SECRET`] bytes: they go into a
//! header line and must not be able to end it), are never printed
//! (`Debug` is redacted) and are zeroed when dropped. The audit log names
//! the credential, never its value.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::host::HostName;
use crate::http::{Mark, Part};
use crate::policy::{Origin, Pattern};

/// Longest secret accepted, in bytes.
pub const MAX_SECRET: usize = 4096;
/// Longest credential name.
pub const MAX_NAME: usize = 64;
/// Most credentials in one policy.
pub const MAX_CREDENTIALS: usize = 64;
/// Most hosts one credential is bound to.
pub const MAX_HOSTS: usize = 64;
/// Random bytes in a placeholder (hex-encoded in it).
const PLACEHOLDER_RANDOM: usize = 16;
/// What every placeholder starts with.
pub const PLACEHOLDER_PREFIX: &str = "sbx-placeholder-";

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Error {
    #[error("credential name '{0}' must be 1 to {MAX_NAME} of a-z, 0-9, '-' and '_', starting with a letter or digit")]
    Name(String),
    #[error("credential '{0}' is defined twice")]
    Duplicate(String),
    #[error("more than {MAX_CREDENTIALS} credentials")]
    TooMany,
    #[error("credential '{0}': give 1 to {MAX_HOSTS} hosts")]
    Hosts(String),
    #[error("credential '{0}': bad host pattern '{1}': {2}")]
    Pattern(String, String, String),
    #[error("credential '{0}': '*' would send it to every host; name the hosts")]
    AnyHost(String),
    #[error(
        "credential '{0}': '{1}' would send it to every name under {2}, where others can own names ({3}); list the hosts it is for instead (e.g. 'api.{2}')"
    )]
    SharedSuffix(String, String, String, &'static str),
    #[error("credential '{0}': bad header name '{1}'")]
    Header(String, String),
    #[error("credential '{0}': header '{1}' frames or routes requests and cannot carry a credential")]
    FramingHeader(String, String),
    #[error("credential '{0}': bad scheme '{1}' (a token such as Bearer)")]
    Scheme(String, String),
    #[error("credential '{0}': bad environment variable name '{1}'")]
    Env(String, String),
    #[error("a secret must be 1 to {MAX_SECRET} bytes of visible ASCII (no spaces or line breaks)")]
    BadSecret,
    #[error("no randomness for a placeholder")]
    Random,
}

/// A secret value. Never printed; zeroed when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Checks and wraps a value (surrounding whitespace and one trailing
    /// line break, as `echo` leaves it, are removed first).
    pub fn new(value: &str) -> Result<Secret, Error> {
        let v = value.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r' || c == '\n');
        if v.is_empty() || v.len() > MAX_SECRET || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::BadSecret);
        }
        Ok(Secret(Zeroizing::new(v.to_string())))
    }

    /// The value itself: only for the request that carries it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A credential's binding, from the policy: its name (the secret's, see
/// `sbx secret`), the hosts it goes to, the header that carries it and
/// the scheme before it, and the guest environment variable that holds
/// the placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRule {
    pub name: String,
    pub hosts: Vec<Pattern>,
    /// Lower case.
    pub header: String,
    /// E.g. `Bearer`: the header's value is `Bearer <secret>`.
    pub scheme: Option<String>,
    pub env: Option<String>,
    pub origin: Origin,
}

/// A `[[credential]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCredential {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: String,
    pub scheme: Option<String>,
    pub env: Option<String>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Hosting platforms and shared services whose direct subdomains belong
/// to different tenants (a credential may go to `app.herokuapp.com`, not
/// to `*.herokuapp.com`).
pub const SHARED_SUFFIXES: &[&str] = &[
    "github.io",
    "githubusercontent.com",
    "gitlab.io",
    "bitbucket.io",
    "herokuapp.com",
    "herokudns.com",
    "vercel.app",
    "now.sh",
    "netlify.app",
    "netlify.com",
    "pages.dev",
    "workers.dev",
    "r2.dev",
    "web.app",
    "firebaseapp.com",
    "appspot.com",
    "run.app",
    "cloudfunctions.net",
    "googleusercontent.com",
    "elasticbeanstalk.com",
    "azurewebsites.net",
    "azurestaticapps.net",
    "azureedge.net",
    "cloudapp.net",
    "trafficmanager.net",
    "fastly.net",
    "akamaihd.net",
    "akamaized.net",
    "edgekey.net",
    "edgesuite.net",
    "digitaloceanspaces.com",
    "ondigitalocean.app",
    "onrender.com",
    "fly.dev",
    "railway.app",
    "deno.dev",
    "glitch.me",
    "repl.co",
    "replit.dev",
    "hf.space",
    "pythonanywhere.com",
    "readthedocs.io",
    "surge.sh",
    "blogspot.com",
    "wordpress.com",
    "myshopify.com",
    "ngrok.io",
    "ngrok.app",
    "ngrok-free.app",
    "duckdns.org",
    "ddns.net",
    "dyndns.org",
    "no-ip.org",
    "nip.io",
    "sslip.io",
];

/// Cloud domains whose names belong to many customers at every depth
/// (buckets, functions, regional endpoints): no wildcard at or below them.
pub const SHARED_AT_ANY_DEPTH: &[&str] =
    &["amazonaws.com", "cloudfront.net", "on.aws", "windows.net", "azure.com", "googleapis.com"];

/// First labels of common two-label public suffixes under a country code
/// (`co.uk`, `com.au`, `ne.jp`).
const SECOND_LEVEL_PUBLIC: &[&str] = &["ac", "co", "com", "edu", "gob", "go", "gov", "mil", "ne", "net", "or", "org"];

/// Why a credential must not go to every name below `parent`, if it must
/// not (see the module docs).
pub fn shared_suffix(parent: &HostName) -> Option<&'static str> {
    let name = parent.as_str();
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() == 1 {
        return Some("a top-level domain");
    }
    if labels.len() == 2 && labels[1].len() == 2 && SECOND_LEVEL_PUBLIC.contains(&labels[0]) {
        return Some("a public suffix");
    }
    if SHARED_SUFFIXES.contains(&name) {
        return Some("a hosting platform whose subdomains are its tenants'");
    }
    let shared = |s: &&str| HostName::parse(s).is_ok_and(|s| parent.is_within(&s));
    SHARED_AT_ANY_DEPTH.iter().any(shared).then_some("a cloud domain whose names are its customers'")
}

/// Header fields that frame or route a request: a credential there could
/// change how the upstream reads the bytes.
const FORBIDDEN_HEADERS: &[&str] =
    &["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive"];

/// True for a valid credential name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl CredentialRule {
    /// Checks a table from the policy file.
    pub fn parse(raw: FileCredential, origin: Origin) -> Result<CredentialRule, Error> {
        let name = raw.name;
        if !valid_name(&name) {
            return Err(Error::Name(name));
        }
        if raw.hosts.is_empty() || raw.hosts.len() > MAX_HOSTS {
            return Err(Error::Hosts(name));
        }
        let mut hosts = Vec::new();
        for h in &raw.hosts {
            let p = Pattern::parse(h).map_err(|e| Error::Pattern(name.clone(), h.clone(), e.to_string()))?;
            if p == Pattern::Any {
                return Err(Error::AnyHost(name));
            }
            if let Pattern::Below(parent) = &p {
                if let Some(why) = shared_suffix(parent) {
                    return Err(Error::SharedSuffix(name, h.clone(), parent.to_string(), why));
                }
            }
            hosts.push(p);
        }
        let header = raw.header.to_ascii_lowercase();
        if header.is_empty() || header.len() > 64 || !header.bytes().all(is_tchar) {
            return Err(Error::Header(name, raw.header));
        }
        if FORBIDDEN_HEADERS.contains(&header.replace('_', "-").as_str()) {
            return Err(Error::FramingHeader(name, raw.header));
        }
        if let Some(s) = &raw.scheme {
            if s.is_empty() || s.len() > 32 || !s.bytes().all(is_tchar) {
                return Err(Error::Scheme(name, s.clone()));
            }
        }
        if let Some(e) = &raw.env {
            let ok = !e.is_empty()
                && e.len() <= 128
                && !e.as_bytes()[0].is_ascii_digit()
                && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(Error::Env(name, e.clone()));
            }
        }
        Ok(CredentialRule { name, hosts, header, scheme: raw.scheme, env: raw.env, origin })
    }

    /// Whether the credential goes to `host`.
    pub fn bound_to(&self, host: &HostName) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }
}

impl fmt::Display for CredentialRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.hosts.iter().map(|h| h.to_string()).collect();
        write!(f, "credential {}: hosts {} header {}", self.name, hosts.join(","), self.header)?;
        if let Some(s) = &self.scheme {
            write!(f, " scheme {s}")?;
        }
        Ok(())
    }
}

/// A new placeholder for credential `name`: recognisable, random, and a
/// valid header value (`sbx-placeholder-NAME-<32 hex digits>`).
pub fn new_placeholder(name: &str) -> Result<String, Error> {
    let mut bytes = [0u8; PLACEHOLDER_RANDOM];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).map_err(|_| Error::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{PLACEHOLDER_PREFIX}{name}-{hex}"))
}

/// One active credential: its binding, the placeholder the guest holds and
/// the secret that replaces it.
#[derive(Debug, Clone)]
pub struct Credential {
    pub rule: CredentialRule,
    pub placeholder: String,
    secret: Secret,
    /// A subscription sign-in: the value is the session's current access
    /// token ([`crate::oauth`]).
    pub oauth: Option<Arc<crate::oauth::OAuthSession>>,
}

impl Credential {
    pub fn new(rule: CredentialRule, placeholder: String, secret: Secret) -> Credential {
        Credential { rule, placeholder, secret, oauth: None }
    }

    /// An OAuth credential: `rule` binds the access token (its
    /// placeholder the session's), refreshes go to the session.
    pub fn oauth(rule: CredentialRule, session: Arc<crate::oauth::OAuthSession>) -> Credential {
        Credential {
            rule,
            placeholder: session.access_placeholder.clone(),
            secret: session.access(),
            oauth: Some(session),
        }
    }

    /// The real values responses are scrubbed of.
    fn secrets(&self) -> Vec<Secret> {
        match &self.oauth {
            Some(s) => s.known(),
            None => vec![self.secret.clone()],
        }
    }

    /// Whether `bytes` hold one of this credential's placeholders that
    /// must not go to `host`.
    fn leaks_to(&self, host: &HostName, bytes: &[u8]) -> bool {
        if !self.rule.bound_to(host) && find(bytes, self.placeholder.as_bytes()) {
            return true;
        }
        self.oauth.as_ref().is_some_and(|s| !s.is_token_host(host) && find(bytes, s.refresh_placeholder.as_bytes()))
    }

    pub fn name(&self) -> &str {
        &self.rule.name
    }

    /// The header value the guest sends: `[scheme ]placeholder`.
    fn expected(&self) -> String {
        match &self.rule.scheme {
            Some(s) => format!("{s} {}", self.placeholder),
            None => self.placeholder.clone(),
        }
    }

    fn matches_value(&self, value: &str) -> bool {
        match &self.rule.scheme {
            None => value == self.placeholder,
            Some(s) => value
                .split_once(' ')
                .is_some_and(|(scheme, rest)| scheme.eq_ignore_ascii_case(s) && rest == self.placeholder),
        }
    }

    fn injected_value(&self) -> Zeroizing<String> {
        let current = self.oauth.as_ref().map(|s| s.access());
        let secret = current.as_ref().unwrap_or(&self.secret);
        Zeroizing::new(match &self.rule.scheme {
            Some(s) => format!("{s} {}", secret.expose()),
            None => secret.expose().to_string(),
        })
    }
}

/// Request fields dropped from every request to a bound host over a
/// terminated connection: each lets the guest have a reflecting upstream
/// send the value back compressed (`Accept-Encoding`, `TE`) or in slices
/// of its choice (`Range`, `If-Range`), which the [`Scrubber`] could not
/// see whole.
pub const DROPPED_FIELDS: &[&str] = &["accept-encoding", "te", "range", "if-range"];

/// What happens to a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Forward the head as it is.
    Unchanged,
    /// Forward this head instead: the named credentials (possibly none)
    /// were injected, the fields of [`DROPPED_FIELDS`] dropped and
    /// `Accept-Encoding: identity` added (a request to a bound host over
    /// a terminated connection).
    Injected { head: Zeroizing<Vec<u8>>, credentials: Vec<String> },
    /// The placeholder of this credential went to a host it is not bound
    /// to: refuse the request.
    Leak { credential: String },
}

/// The credentials of one sandbox run, with what the [`Scrubber`]s of all
/// its connections share: the pieces to mask (computed once) and how many
/// echoes of each credential were seen in the whole sandbox.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    list: Vec<Credential>,
    /// Recomputed when an OAuth refresh brings new values
    /// ([`Credentials::refreshed`]).
    pieces: Arc<std::sync::RwLock<Arc<Pieces>>>,
    /// Per credential (same order as `list`): responses, on any
    /// connection of this sandbox, in which pieces of it were masked.
    echoes: Arc<Vec<AtomicU32>>,
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.len() >= needle.len() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Credentials {
    pub fn new(list: Vec<Credential>) -> Credentials {
        let pieces = Arc::new(std::sync::RwLock::new(Arc::new(Pieces::new(&list))));
        let echoes = Arc::new(list.iter().map(|_| AtomicU32::new(0)).collect());
        Credentials { list, pieces, echoes }
    }

    /// These and `extra` (made before any connection: the counts start
    /// again).
    pub fn with(self, extra: Credential) -> Credentials {
        let mut list = self.list;
        list.push(extra);
        Credentials::new(list)
    }

    /// Echoes of credential `name` seen in this sandbox so far (each a
    /// response of which pieces were masked).
    pub fn echoes(&self, name: &str) -> u32 {
        let i = self.list.iter().position(|c| c.rule.name == name);
        i.and_then(|i| self.echoes.get(i)).map_or(0, |n| n.load(Ordering::Relaxed))
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// An OAuth session's values changed: what responses are scrubbed of
    /// is computed again (every connection's scrubber uses it from its
    /// next read on).
    pub fn refreshed(&self) {
        let pieces = Arc::new(Pieces::new(&self.list));
        *self.pieces.write().unwrap_or_else(|e| e.into_inner()) = pieces;
    }

    fn current_pieces(&self) -> Arc<Pieces> {
        self.pieces.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The OAuth session whose token endpoint this request is.
    pub fn oauth_for(&self, host: &HostName, method: &str, path: &str) -> Option<&Arc<crate::oauth::OAuthSession>> {
        self.list.iter().filter_map(|c| c.oauth.as_ref()).find(|s| s.is_token_request(host, method, path))
    }

    /// Whether `host` is some OAuth session's token endpoint host (its TLS
    /// is always terminated).
    pub fn is_token_host(&self, host: &HostName) -> bool {
        self.list.iter().filter_map(|c| c.oauth.as_ref()).any(|s| s.is_token_host(host))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Credential> {
        self.list.iter()
    }

    /// Whether some credential is bound to `host`.
    pub fn any_bound_to(&self, host: &HostName) -> bool {
        self.list.iter().any(|c| c.rule.bound_to(host))
    }

    /// The longest placeholder (what a scan across reads must remember).
    fn longest_placeholder(&self) -> usize {
        let refresh = self.list.iter().filter_map(|c| c.oauth.as_ref()).map(|s| s.refresh_placeholder.len());
        self.list.iter().map(|c| c.placeholder.len()).chain(refresh).max().unwrap_or(0)
    }

    /// The first credential not bound to `host` whose placeholder is in
    /// `bytes`.
    pub fn leaked_to(&self, host: &HostName, bytes: &[u8]) -> Option<&Credential> {
        self.list.iter().find(|c| c.leaks_to(host, bytes))
    }

    /// Decides what becomes of a request head (`raw`, as parsed by
    /// [`crate::http::parse_request_head`]) to `host`. `terminated`: the
    /// request came over a TLS connection netstack terminated (the only
    /// place a secret is ever put). There, every request to a host some
    /// credential is bound to is forwarded without the fields of
    /// [`DROPPED_FIELDS`] and with `Accept-Encoding: identity`, so that what
    /// its upstream reflects comes back whole and uncompressed (where the
    /// [`Scrubber`] can see it), whether or not a credential is injected.
    pub fn rewrite(&self, host: &HostName, raw: &[u8], terminated: bool) -> Rewrite {
        if let Some(c) = self.leaked_to(host, raw) {
            return Rewrite::Leak { credential: c.rule.name.clone() };
        }
        if !terminated {
            return Rewrite::Unchanged;
        }
        let bound: Vec<&Credential> = self.list.iter().filter(|c| c.rule.bound_to(host)).collect();
        if bound.is_empty() {
            return Rewrite::Unchanged;
        }
        // The parser checked the head: UTF-8, CRLF lines, one empty line
        // at its end.
        let Ok(text) = std::str::from_utf8(raw) else { return Rewrite::Unchanged };
        let Some(body) = text.strip_suffix("\r\n\r\n") else { return Rewrite::Unchanged };
        let mut out = Zeroizing::new(Vec::with_capacity(raw.len() + 256));
        let mut injected: Vec<String> = Vec::new();
        for (i, line) in body.split("\r\n").enumerate() {
            let field = (i > 0).then(|| line.split_once(':')).flatten();
            if field.is_some_and(|(name, _)| DROPPED_FIELDS.iter().any(|d| name.eq_ignore_ascii_case(d))) {
                continue;
            }
            let replaced = field.and_then(|(name, value)| {
                let value = value.trim_matches([' ', '\t']);
                let c = bound.iter().find(|c| name.eq_ignore_ascii_case(&c.rule.header) && c.matches_value(value))?;
                Some((name, c))
            });
            match replaced {
                Some((name, c)) => {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(c.injected_value().as_bytes());
                    if !injected.iter().any(|n| n == c.name()) {
                        injected.push(c.name().to_string());
                    }
                }
                None => out.extend_from_slice(line.as_bytes()),
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Accept-Encoding: identity\r\n\r\n");
        Rewrite::Injected { head: out, credentials: injected }
    }

    /// The environment the guest gets: each credential's variable set to
    /// its placeholder.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.list.iter().filter_map(|c| Some((c.rule.env.clone()?, c.placeholder.clone()))).collect()
    }

    /// The header value the guest should send for `name` (tests, docs).
    pub fn expected_header(&self, name: &str) -> Option<String> {
        self.list.iter().find(|c| c.rule.name == name).map(Credential::expected)
    }
}

/// Finds placeholders in a body as it passes in pieces, remembering the
/// end of the previous piece so that one split across pieces is found
/// (before the piece that completes it is forwarded). A chunked body's
/// content ([`LeakScanner::scan`]) and its framing (chunk extensions and
/// trailers, [`LeakScanner::scan_framing`]) are two streams, each
/// remembered on its own, so that a placeholder split across chunks is
/// found in the content and one in an extension or a trailer in the
/// framing.
#[derive(Debug, Default)]
pub struct LeakScanner {
    tail: Vec<u8>,
    framing_tail: Vec<u8>,
}

impl LeakScanner {
    /// The first credential not bound to `host` whose placeholder ends in
    /// `piece` of the body's content.
    pub fn scan<'c>(&mut self, creds: &'c Credentials, host: &HostName, piece: &[u8]) -> Option<&'c Credential> {
        scan_stream(&mut self.tail, creds, host, piece)
    }

    /// The same for `piece` of a chunked body's framing (size lines with
    /// their extensions, trailers).
    pub fn scan_framing<'c>(
        &mut self,
        creds: &'c Credentials,
        host: &HostName,
        piece: &[u8],
    ) -> Option<&'c Credential> {
        scan_stream(&mut self.framing_tail, creds, host, piece)
    }
}

fn scan_stream<'c>(
    tail: &mut Vec<u8>,
    creds: &'c Credentials,
    host: &HostName,
    piece: &[u8],
) -> Option<&'c Credential> {
    let keep = creds.longest_placeholder().saturating_sub(1);
    if keep == 0 || piece.is_empty() {
        return None;
    }
    let mut window = std::mem::take(tail);
    window.extend_from_slice(piece);
    let found = creds.leaked_to(host, &window);
    let from = window.len().saturating_sub(keep);
    *tail = window.split_off(from);
    found
}

/// Shortest run of a secret (or of one of its encodings, `Pieces`) that
/// is masked wherever it appears in a response. Shorter runs pass: a
/// response reveals at most `MIN_PIECE - 1` consecutive bytes of any
/// form of a secret. (A secret shorter than this is masked whole.)
pub const MIN_PIECE: usize = 8;
/// Fewest bits in the prefilter of [`Pieces`].
const MIN_FILTER_BITS: u32 = 16;
/// Most bits in it (8 MiB).
const MAX_FILTER_BITS: u32 = 26;

/// Every [`MIN_PIECE`]-byte run of every form of every secret, to look up
/// a response's last `MIN_PIECE` bytes in one step: each run is a `u64`
/// (its bytes big-endian), kept sorted with the credential it belongs to,
/// behind a one-bit-per-hash prefilter so that a byte that starts no
/// piece costs one multiply, one shift and one bit test. Forms: the value
/// itself; hex (lower and upper case); percent-encoded (unreserved
/// characters kept, the rest `%XX`, or every byte `%XX`, in either case);
/// JSON-escaped (`\"`,
/// `\\`, with and without `\/`, and with every other punctuation
/// character as `\u00xx`, either case); HTML-escaped; base64 (standard and
/// URL alphabets) at each of the three alignments, only the characters
/// that the secret's bytes alone determine. Zeroed when dropped.
#[derive(Default)]
pub(crate) struct Pieces {
    /// Sorted, no duplicates.
    grams: Zeroizing<Vec<u64>>,
    /// The credential (index) each gram belongs to.
    owner: Vec<u16>,
    /// Forms shorter than MIN_PIECE: (length, value, credential).
    short: Zeroizing<Vec<(usize, u64, u16)>>,
    filter: Zeroizing<Vec<u64>>,
    shift: u32,
}

impl fmt::Debug for Pieces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pieces({} pieces, <redacted>)", self.grams.len() + self.short.len())
    }
}

const FILTER_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
pub(crate) const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The base64 characters of `bytes`' complete 3-byte groups.
pub(crate) fn base64_groups(bytes: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 3 * 4);
    for g in bytes.chunks_exact(3) {
        let n = u32::from(g[0]) << 16 | u32::from(g[1]) << 8 | u32::from(g[2]);
        for shift in [18, 12, 6, 0] {
            out.push(alphabet[(n >> shift & 63) as usize]);
        }
    }
    out
}

/// `s` with each byte replaced by `f`'s spelling of it.
fn each(s: &[u8], f: impl Fn(u8) -> String) -> Vec<u8> {
    s.iter().flat_map(|&b| f(b).into_bytes()).collect()
}

/// The spellings of a secret that an upstream commonly sends back.
fn forms(s: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    let json = |b: u8, slash: bool| match b {
        b'"' => "\\\"".to_string(),
        b'\\' => "\\\\".to_string(),
        b'/' if slash => "\\/".to_string(),
        _ => (b as char).to_string(),
    };
    let mut out: Vec<Zeroizing<Vec<u8>>> = vec![
        s.to_vec(),
        each(s, |b| format!("{b:02x}")),
        each(s, |b| format!("{b:02X}")),
        each(s, |b| if unreserved(b) { (b as char).to_string() } else { format!("%{b:02X}") }),
        each(s, |b| if unreserved(b) { (b as char).to_string() } else { format!("%{b:02x}") }),
        each(s, |b| format!("%{b:02X}")),
        each(s, |b| format!("%{b:02x}")),
        each(s, |b| json(b, false)),
        each(s, |b| json(b, true)),
        each(s, |b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("\\u{b:04x}") }),
        each(s, |b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("\\u{b:04X}") }),
        each(s, |b| match b {
            b'&' => "&amp;".into(),
            b'<' => "&lt;".into(),
            b'>' => "&gt;".into(),
            b'"' => "&quot;".into(),
            b'\'' => "&#39;".into(),
            _ => (b as char).to_string(),
        }),
    ]
    .into_iter()
    .map(Zeroizing::new)
    .collect();
    for alphabet in [B64_STD, B64_URL] {
        for k in 0..3 {
            out.push(Zeroizing::new(base64_groups(s.get(k..).unwrap_or_default(), alphabet)));
        }
    }
    out.retain(|f| !f.is_empty());
    out
}

/// `bytes` (at most 8) as a big-endian number.
fn gram(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |w, &b| w << 8 | u64::from(b))
}

impl Pieces {
    fn new(list: &[Credential]) -> Pieces {
        let mut all: Zeroizing<Vec<(u64, u16)>> = Zeroizing::new(Vec::new());
        let mut short = Zeroizing::new(Vec::new());
        for (id, c) in list.iter().enumerate() {
            // At most MAX_CREDENTIALS: fits.
            let id = id as u16;
            for s in c.secrets() {
                for f in forms(s.expose().as_bytes()) {
                    if f.len() < MIN_PIECE {
                        short.push((f.len(), gram(&f), id));
                    } else {
                        all.extend(f.windows(MIN_PIECE).map(|w| (gram(w), id)));
                    }
                }
            }
        }
        all.sort_unstable();
        all.dedup_by_key(|g| g.0);
        short.sort_unstable();
        short.dedup();
        let bits = (all.len() * 16).next_power_of_two().trailing_zeros().clamp(MIN_FILTER_BITS, MAX_FILTER_BITS);
        let mut filter = Zeroizing::new(vec![0u64; 1 << (bits - 6)]);
        let shift = 64 - bits;
        for (g, _) in all.iter() {
            let h = g.wrapping_mul(FILTER_MUL) >> shift;
            filter[(h >> 6) as usize] |= 1 << (h & 63);
        }
        let grams = Zeroizing::new(all.iter().map(|g| g.0).collect());
        let owner = all.iter().map(|g| g.1).collect();
        Pieces { grams, owner, short, filter, shift }
    }

    /// The credential whose piece the last MIN_PIECE bytes `w` are.
    fn lookup(&self, w: u64) -> Option<u16> {
        if self.grams.is_empty() {
            return None;
        }
        let h = w.wrapping_mul(FILTER_MUL) >> self.shift;
        if self.filter[(h >> 6) as usize] & (1 << (h & 63)) == 0 {
            return None;
        }
        self.grams.binary_search(&w).ok().map(|i| self.owner[i])
    }
}

/// The streams of a connection's responses searched on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// Body content (and bytes of unknown structure).
    Text,
    Head,
    Framing,
}

/// The last [`MIN_PIECE`] bytes of one stream of a response and where
/// each of them is in the upstream's byte stream.
#[derive(Default)]
struct Window {
    w: u64,
    /// Bytes pushed so far.
    n: u64,
    at: [u64; MIN_PIECE],
}

impl Window {
    fn push(&mut self, b: u8, at: u64) {
        self.w = self.w << 8 | u64::from(b);
        self.at[(self.n % MIN_PIECE as u64) as usize] = at;
        self.n += 1;
    }

    /// Where the `j`-th last byte is (`j` < MIN_PIECE, < n).
    fn at_back(&self, j: usize) -> u64 {
        self.at[((self.n - 1 - j as u64) % MIN_PIECE as u64) as usize]
    }

    /// The earliest byte a piece completed later could still include.
    fn hold(&self) -> Option<u64> {
        let k = self.n.min(MIN_PIECE as u64 - 1) as usize;
        (k > 0).then(|| self.at_back(k - 1))
    }

    fn reset(&mut self) {
        self.n = 0;
        self.w = 0;
    }
}

/// Masks real secret values, and pieces of them, in what upstream sends
/// back (an endpoint that echoes requests would otherwise hand the guest
/// the value it never had): every byte of every run of at least
/// [`MIN_PIECE`] bytes of a form of a secret (`Pieces`) is overwritten
/// with `*`, so response framing and lengths are unchanged.
///
/// What is searched is what the guest's HTTP client reads, not the raw
/// bytes: given the [`Mark`]s of a [`crate::http::ResponseTracker`], a
/// chunked body is searched without its framing (a value split by chunk
/// boundaries is found), the framing (extensions, trailers) on its own;
/// heads and bodies of all the responses of the connection are one
/// stream (a value split across two responses is found: what the first
/// response released is at most `MIN_PIECE - 1` bytes of it, the rest is
/// masked). A piece split across reads is caught by holding back the
/// last `MIN_PIECE - 1` bytes of each stream until the next read, and a
/// response head until it is whole; the end of each response (and of each
/// informational head) and the end of the stream release everything.
/// What is held is bounded by a response head
/// ([`crate::http::MAX_RESPONSE_HEAD`]) or `MIN_PIECE - 1` chunks' size
/// lines ([`crate::http::MAX_CHUNK_LINE`]).
///
/// With `strict` (a host a credential is bound to) a response whose body
/// has a content or transfer coding (gzip, …) is refused before a byte
/// of its head leaves: it could carry a secret that cannot be searched.
#[derive(Default)]
pub struct Scrubber {
    /// Bytes not released yet; `pending[0]` is byte `base` of the stream.
    pending: Vec<u8>,
    base: u64,
    /// Content, of all the responses: one stream.
    text: Window,
    /// The head being read.
    head: Window,
    /// Chunked framing, while it lasts.
    framing: Window,
    /// Where the head being read started.
    head_from: Option<u64>,
    /// Bytes masked per credential (index) since [`Scrubber::take_echoes`].
    masked: Vec<(u16, u64)>,
    refused: Option<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber(held {}, <redacted>)", self.pending.len())
    }
}

/// One credential's pieces masked since the last
/// [`Scrubber::take_echoes`]: its name, the bytes masked, and the echoes
/// of it now counted in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    pub credential: String,
    pub masked: u64,
    pub echoes: u32,
}

impl Scrubber {
    /// Scrubs `data` as one stream of unknown structure (no framing
    /// known); returns what may go to the guest now.
    pub fn feed(&mut self, creds: &Credentials, data: &[u8]) -> Vec<u8> {
        self.feed_marked(creds, data, &[Mark::Run(Part::Unknown, 0, data.len())], false)
    }

    /// Scrubs `data`, whose structure `marks` gives (from
    /// [`crate::http::ResponseTracker::feed_parts`] on the same bytes;
    /// bytes no mark covers are searched as text); returns what may go to
    /// the guest now. Once refused ([`Scrubber::refused`]), nothing more.
    pub fn feed_marked(&mut self, creds: &Credentials, data: &[u8], marks: &[Mark], strict: bool) -> Vec<u8> {
        if self.refused.is_some() {
            return Vec::new();
        }
        let pieces = creds.current_pieces();
        let pieces = &*pieces;
        let start = self.base + self.pending.len() as u64;
        self.pending.extend_from_slice(data);
        let mut released = self.base;
        let mut cursor = 0;
        for m in marks {
            match m {
                Mark::Run(part, from, to) => {
                    let (from, to) = ((*from).min(data.len()), (*to).min(data.len()));
                    if from > cursor {
                        self.search(pieces, data, start, cursor, from, Part::Unknown);
                    }
                    if *part == Part::Head && self.head_from.is_none() {
                        self.head_from = Some(start + from as u64);
                    }
                    if *part == Part::Unknown {
                        // The tracker gave up (a head too large or
                        // malformed): no head is held whole any more.
                        self.head_from = None;
                        self.head.reset();
                    }
                    self.search(pieces, data, start, from.max(cursor), to, *part);
                    cursor = cursor.max(to);
                }
                Mark::HeadEnd { at, informational, coded } => {
                    let head = self.head_from.take();
                    self.head.reset();
                    if let (true, false, Some(coding)) = (strict, informational, coded) {
                        // Nothing of this head leaves.
                        let keep = head.map_or(start + *at as u64, |h| h.max(self.base));
                        self.pending.truncate((keep - self.base) as usize);
                        self.refused = Some(coding.clone());
                        let out = std::mem::take(&mut self.pending);
                        self.base = keep;
                        return out;
                    }
                    if *informational {
                        released = released.max(start + *at as u64);
                    }
                }
                Mark::End { at } => released = released.max(start + *at as u64),
            }
        }
        if cursor < data.len() {
            self.search(pieces, data, start, cursor, data.len(), Part::Unknown);
        }
        let end = self.base + self.pending.len() as u64;
        let hold = [self.text.hold(), self.framing.hold(), self.head_from].into_iter().flatten().min();
        let upto = hold.map_or(end, |h| h.max(released)).clamp(self.base, end);
        let rest = self.pending.split_off((upto - self.base) as usize);
        self.base = upto;
        std::mem::replace(&mut self.pending, rest)
    }

    /// Searches `data[from..to]` (at stream offset `start`) as `part`,
    /// masking what is still pending.
    fn search(&mut self, pieces: &Pieces, data: &[u8], start: u64, from: usize, to: usize, part: Part) {
        let stream = match part {
            Part::Head => Stream::Head,
            Part::Framing => Stream::Framing,
            Part::Content | Part::Unknown => Stream::Text,
        };
        if stream != Stream::Framing && from < to {
            // Framing is one stream only while it lasts: what it held
            // back is released once something else follows.
            self.framing.reset();
        }
        for (i, &b) in data[from..to].iter().enumerate() {
            let at = start + (from + i) as u64;
            let win = self.window(stream);
            win.push(b, at);
            if win.n >= MIN_PIECE as u64 {
                if let Some(id) = pieces.lookup(win.w) {
                    self.mask(stream, MIN_PIECE, id);
                }
            }
            if !pieces.short.is_empty() {
                let win = self.window(stream);
                let (n, w) = (win.n, win.w);
                for &(len, value, id) in pieces.short.iter() {
                    if n >= len as u64 && w & ((1u64 << (8 * len)) - 1) == value {
                        self.mask(stream, len, id);
                    }
                }
            }
        }
    }

    fn window(&mut self, stream: Stream) -> &mut Window {
        match stream {
            Stream::Text => &mut self.text,
            Stream::Head => &mut self.head,
            Stream::Framing => &mut self.framing,
        }
    }

    /// Masks the last `len` bytes of a stream, those still pending.
    fn mask(&mut self, stream: Stream, len: usize, id: u16) {
        let base = self.base;
        let ats: Vec<u64> = {
            let win = self.window(stream);
            (0..len).map(|j| win.at_back(j)).filter(|at| *at >= base).collect()
        };
        let mut count = 0;
        for at in ats {
            let b = &mut self.pending[(at - base) as usize];
            if *b != b'*' {
                *b = b'*';
                count += 1;
            }
        }
        if count > 0 {
            match self.masked.iter_mut().find(|m| m.0 == id) {
                Some(m) => m.1 += count,
                None => self.masked.push((id, count)),
            }
        }
    }

    /// Releases what was held (the stream ended: nothing can continue it).
    pub fn flush(&mut self) -> Vec<u8> {
        self.base += self.pending.len() as u64;
        std::mem::take(&mut self.pending)
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// The coding for which a response was refused ([`Scrubber::feed_marked`]
    /// with `strict`): nothing more from upstream goes to the guest.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// The credentials pieces of which were masked since the last call,
    /// each counted as one more echo of it in the sandbox.
    pub fn take_echoes(&mut self, creds: &Credentials) -> Vec<Echo> {
        std::mem::take(&mut self.masked)
            .into_iter()
            .filter_map(|(id, masked)| {
                let c = creds.list.get(usize::from(id))?;
                let echoes = creds.echoes.get(usize::from(id)).map_or(0, |n| n.fetch_add(1, Ordering::Relaxed) + 1);
                Some(Echo { credential: c.rule.name.clone(), masked, echoes })
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rule(name: &str, hosts: &[&str], header: &str, scheme: Option<&str>) -> CredentialRule {
        CredentialRule::parse(
            FileCredential {
                name: name.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                header: header.into(),
                scheme: scheme.map(Into::into),
                env: Some("API_KEY".into()),
            },
            Origin::File(1),
        )
        .unwrap()
    }

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn creds() -> Credentials {
        Credentials::new(vec![
            Credential::new(
                rule("anthropic", &["api.anthropic.com"], "x-api-key", None),
                "sbx-placeholder-anthropic-0001".into(),
                Secret::new("sk-real-anthropic").unwrap(),
            ),
            Credential::new(
                rule("openai", &["api.openai.com"], "Authorization", Some("Bearer")),
                "sbx-placeholder-openai-0002".into(),
                Secret::new("sk-real-openai").unwrap(),
            ),
        ])
    }

    fn rewrite(host_name: &str, head: &str, terminated: bool) -> Rewrite {
        creds().rewrite(&host(host_name), head.as_bytes(), terminated)
    }

    /// A terminated request's head as forwarded, without the
    /// `Accept-Encoding: identity` always added, and what was injected.
    fn filtered(host_name: &str, head: &str) -> (String, Vec<String>) {
        let Rewrite::Injected { head: out, credentials } = rewrite(host_name, head, true) else {
            panic!("a bound host's head is always rewritten")
        };
        let text = String::from_utf8(out.to_vec()).unwrap();
        let text = text.strip_suffix("Accept-Encoding: identity\r\n\r\n").expect("identity asked for");
        (format!("{text}\r\n"), credentials)
    }

    #[test]
    fn the_bound_header_gets_the_real_value_on_a_terminated_connection_only() {
        let head = "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key: sbx-placeholder-anthropic-0001\r\nContent-Length: 2\r\n\r\n";
        let Rewrite::Injected { head: out, credentials } = rewrite("api.anthropic.com", head, true) else {
            panic!("not injected")
        };
        assert_eq!(credentials, vec!["anthropic".to_string()]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let want = head.replace("sbx-placeholder-anthropic-0001", "sk-real-anthropic");
        assert_eq!(text, want.replace("\r\n\r\n", "\r\nAccept-Encoding: identity\r\n\r\n"));
        assert_eq!(rewrite("api.anthropic.com", head, false), Rewrite::Unchanged, "never over plain HTTP");
        // A scheme: exactly `Bearer <placeholder>`, the scheme in any case.
        let bearer =
            "GET / HTTP/1.1\r\nHost: api.openai.com\r\nauthorization: bearer sbx-placeholder-openai-0002\r\n\r\n";
        let Rewrite::Injected { head: out, .. } = rewrite("api.openai.com", bearer, true) else { panic!() };
        assert!(String::from_utf8_lossy(&out).contains("authorization: Bearer sk-real-openai\r\n"));
        let bare = "GET / HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: sbx-placeholder-openai-0002\r\n\r\n";
        assert_eq!(filtered("api.openai.com", bare), (bare.to_string(), vec![]), "scheme missing: not replaced");
    }

    #[test]
    fn the_placeholder_elsewhere_is_not_replaced_and_to_another_host_is_a_leak() {
        for unchanged in [
            "GET /?k=sbx-placeholder-anthropic-0001 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Other: sbx-placeholder-anthropic-0001\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key: x sbx-placeholder-anthropic-0001\r\n\r\n",
        ] {
            assert_eq!(filtered("api.anthropic.com", unchanged), (unchanged.to_string(), vec![]), "{unchanged:?}");
        }
        for leak in [
            "GET / HTTP/1.1\r\nHost: evil.example\r\nX-Api-Key: sbx-placeholder-anthropic-0001\r\n\r\n",
            "GET /sbx-placeholder-anthropic-0001 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sbx-placeholder-anthropic-0001\r\n\r\n",
        ] {
            for terminated in [true, false] {
                let host_name = leak.split("Host: ").nth(1).unwrap().split('\r').next().unwrap();
                assert_eq!(
                    rewrite(host_name, leak, terminated),
                    Rewrite::Leak { credential: "anthropic".into() },
                    "{leak:?}"
                );
            }
        }
    }

    #[test]
    fn bodies_are_scanned_across_pieces() {
        let c = creds();
        let evil = host("evil.example");
        let mut s = LeakScanner::default();
        assert!(s.scan(&c, &evil, b"aaaa sbx-placeholder-anthr").is_none());
        assert_eq!(s.scan(&c, &evil, b"opic-0001 bbb").map(|c| c.name()), Some("anthropic"));
        let mut s = LeakScanner::default();
        let bound = host("api.anthropic.com");
        assert!(s.scan(&c, &bound, b"sbx-placeholder-anthropic-0001").is_none(), "its own host");
        let mut s = LeakScanner::default();
        for b in b"xx sbx-placeholder-openai-0002".iter().take(29) {
            assert!(s.scan(&c, &bound, &[*b]).is_none());
        }
        assert_eq!(s.scan(&c, &bound, b"2").map(|c| c.name()), Some("openai"), "a byte at a time");
    }

    #[test]
    fn echoed_secrets_are_masked_even_when_split() {
        let c = creds();
        let mut s = Scrubber::default();
        let mut out = s.feed(&c, b"key=sk-real-anthropic;");
        assert_eq!(s.held(), MIN_PIECE - 1, "what a piece completed later could include");
        out.extend(s.flush());
        assert_eq!(out, b"key=*****************;");
        let mut out = s.feed(&c, b"head sk-rea");
        out.extend(s.feed(&c, b"l-openai tail"));
        out.extend(s.flush());
        assert_eq!(String::from_utf8(out).unwrap(), "head ************** tail");
        let mut out = s.feed(&c, b"ends with sk");
        out.extend(s.flush());
        assert_eq!(out, b"ends with sk", "released at the end");
        let mut out = s.feed(&c, b"plain");
        out.extend(s.flush());
        assert_eq!(out, b"plain");
    }

    #[test]
    fn what_is_held_stays_bounded_when_responses_cannot_be_read() {
        let c = creds();
        let mut t = crate::http::ResponseTracker::default();
        let mut s = Scrubber::default();
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        let endless = [head, vec![b'a'; 4 * crate::http::MAX_RESPONSE_HEAD]].concat();
        for piece in endless.chunks(4096) {
            let mut marks = Vec::new();
            t.feed_parts(piece, || false, |m| marks.push(m));
            out.extend(s.feed_marked(&c, piece, &marks, true));
            assert!(s.held() <= crate::http::MAX_RESPONSE_HEAD + 4096, "held {}", s.held());
        }
        assert!(t.is_lost());
        assert!(s.held() < MIN_PIECE, "once lost, only a piece's worth is held: {}", s.held());
        out.extend(s.flush());
        assert_eq!(out, endless);
    }

    #[test]
    fn wildcards_over_names_others_can_own_are_refused() {
        let parse = |hosts: &[&str]| {
            CredentialRule::parse(
                FileCredential {
                    name: "k".into(),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    header: "x-api-key".into(),
                    scheme: None,
                    env: None,
                },
                Origin::File(1),
            )
        };
        for shared in [
            "*.com",
            "*.internal",
            "*.co.uk",
            "*.com.au",
            "*.github.io",
            "*.herokuapp.com",
            "*.s3.amazonaws.com",
            "*.amazonaws.com",
            "*.s3.us-east-1.amazonaws.com",
            "*.blob.core.windows.net",
            "*.googleapis.com",
            "*.storage.googleapis.com",
            "*.Vercel.App.",
        ] {
            let e = parse(&["api.example.com", shared]).unwrap_err();
            assert!(matches!(e, Error::SharedSuffix(..)), "{shared}: {e}");
            assert!(e.to_string().contains("list the hosts"), "{e}");
        }
        // Names a single owner holds, and exact hosts anywhere, are fine.
        for own in ["*.example.com", "*.corp.example", "*.myapp.herokuapp.com", "*.me.github.io", "*.example.co.uk"] {
            assert!(parse(&[own]).is_ok(), "{own}");
        }
        for exact in ["app.herokuapp.com", "generativelanguage.googleapis.com", "bucket.s3.amazonaws.com", "co.uk"] {
            assert!(parse(&[exact]).is_ok(), "{exact}");
        }
        // The agents' own credentials are bound to exact hosts.
        for agent in ["claude", "codex", "gemini"] {
            let creds = crate::policy::agent_credentials(agent);
            assert_eq!(creds.len(), 1, "{agent}");
            assert!(creds[0].hosts.iter().all(|h| matches!(h, Pattern::Exact(_))), "{agent}");
        }
    }

    #[test]
    fn rules_and_secrets_are_checked() {
        let file = |name: &str, hosts: &[&str], header: &str| FileCredential {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            header: header.into(),
            scheme: None,
            env: None,
        };
        let parse = |f| CredentialRule::parse(f, Origin::File(1));
        assert!(parse(file("a", &["a.com"], "x-api-key")).is_ok());
        assert!(matches!(parse(file("A", &["a.com"], "x")), Err(Error::Name(_))));
        assert!(matches!(parse(file("-a", &["a.com"], "x")), Err(Error::Name(_))));
        assert!(matches!(parse(file("a", &[], "x")), Err(Error::Hosts(_))));
        assert!(matches!(parse(file("a", &["*"], "x")), Err(Error::AnyHost(_))));
        assert!(matches!(parse(file("a", &["127.0.0.1"], "x")), Err(Error::Pattern(..))));
        assert!(matches!(parse(file("a", &["a.com"], "x y")), Err(Error::Header(..))));
        for framing in ["Host", "content-length", "Transfer_Encoding", "connection"] {
            assert!(matches!(parse(file("a", &["a.com"], framing)), Err(Error::FramingHeader(..))), "{framing}");
        }
        let mut f = file("a", &["a.com"], "authorization");
        f.scheme = Some("Bearer x".into());
        assert!(matches!(parse(f), Err(Error::Scheme(..))));
        let mut f = file("a", &["a.com"], "authorization");
        f.env = Some("1X".into());
        assert!(matches!(parse(f), Err(Error::Env(..))));
        assert_eq!(Secret::new("  sk-abc\n").unwrap().expose(), "sk-abc");
        for bad in ["", "a b", "a\r\nX: y", "é", &"a".repeat(MAX_SECRET + 1)] {
            assert!(Secret::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format!("{:?}", Secret::new("sk-abc").unwrap()), "Secret(<redacted>)");
        assert!(!format!("{:?}", creds()).contains("sk-real"), "no secret in Debug");
        let p = new_placeholder("anthropic").unwrap();
        assert!(
            p.starts_with("sbx-placeholder-anthropic-") && p.len() == "sbx-placeholder-anthropic-".len() + 32,
            "{p}"
        );
        assert_ne!(p, new_placeholder("anthropic").unwrap());
    }
}
