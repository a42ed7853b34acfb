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

use serde::Deserialize;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::host::HostName;
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

#[derive(Debug, Error, PartialEq, Eq)]
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
}

impl Credential {
    pub fn new(rule: CredentialRule, placeholder: String, secret: Secret) -> Credential {
        Credential { rule, placeholder, secret }
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
        Zeroizing::new(match &self.rule.scheme {
            Some(s) => format!("{s} {}", self.secret.expose()),
            None => self.secret.expose().to_string(),
        })
    }
}

/// What happens to a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Forward the head as it is.
    Unchanged,
    /// Forward this head instead: the named credentials were injected.
    Injected { head: Zeroizing<Vec<u8>>, credentials: Vec<String> },
    /// The placeholder of this credential went to a host it is not bound
    /// to: refuse the request.
    Leak { credential: String },
}

/// The credentials of one sandbox run.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    list: Vec<Credential>,
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.len() >= needle.len() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Credentials {
    pub fn new(list: Vec<Credential>) -> Credentials {
        Credentials { list }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
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
        self.list.iter().map(|c| c.placeholder.len()).max().unwrap_or(0)
    }

    /// The first credential not bound to `host` whose placeholder is in
    /// `bytes`.
    pub fn leaked_to(&self, host: &HostName, bytes: &[u8]) -> Option<&Credential> {
        self.list.iter().find(|c| !c.rule.bound_to(host) && find(bytes, c.placeholder.as_bytes()))
    }

    /// Decides what becomes of a request head (`raw`, as parsed by
    /// [`crate::http::parse_request_head`]) to `host`. `terminated`: the
    /// request came over a TLS connection netstack terminated (the only
    /// place a secret is ever put).
    pub fn rewrite(&self, host: &HostName, raw: &[u8], terminated: bool) -> Rewrite {
        if let Some(c) = self.leaked_to(host, raw) {
            return Rewrite::Leak { credential: c.rule.name.clone() };
        }
        if !terminated {
            return Rewrite::Unchanged;
        }
        let bound: Vec<&Credential> = self.list.iter().filter(|c| c.rule.bound_to(host)).collect();
        if bound.is_empty() || !bound.iter().any(|c| find(raw, c.placeholder.as_bytes())) {
            return Rewrite::Unchanged;
        }
        // The parser checked the head: UTF-8, CRLF lines, one empty line
        // at its end.
        let Ok(text) = std::str::from_utf8(raw) else { return Rewrite::Unchanged };
        let Some(body) = text.strip_suffix("\r\n\r\n") else { return Rewrite::Unchanged };
        let mut out = Zeroizing::new(Vec::with_capacity(raw.len() + 256));
        let mut injected: Vec<String> = Vec::new();
        for (i, line) in body.split("\r\n").enumerate() {
            let replaced = (i > 0).then(|| line.split_once(':')).flatten().and_then(|(name, value)| {
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
        out.extend_from_slice(b"\r\n");
        if injected.is_empty() {
            return Rewrite::Unchanged;
        }
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
/// (before the piece that completes it is forwarded).
#[derive(Debug, Default)]
pub struct LeakScanner {
    tail: Vec<u8>,
}

impl LeakScanner {
    /// The first credential not bound to `host` whose placeholder ends in
    /// `piece`.
    pub fn scan<'c>(&mut self, creds: &'c Credentials, host: &HostName, piece: &[u8]) -> Option<&'c Credential> {
        let keep = creds.longest_placeholder().saturating_sub(1);
        if keep == 0 || piece.is_empty() {
            return None;
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(piece);
        let found = creds.leaked_to(host, &window);
        let from = window.len().saturating_sub(keep);
        self.tail = window.split_off(from);
        found
    }
}

/// Masks real secret values in what upstream sends back (an endpoint that
/// echoes request headers would otherwise hand the guest the value it
/// never had): each occurrence is overwritten with `*` of the same length,
/// so response framing is unchanged. A value split across reads is caught
/// by holding back the bytes that could start one, until the next read,
/// the end of the response or the end of the stream releases them.
#[derive(Debug, Default)]
pub struct Scrubber {
    held: Vec<u8>,
}

impl Scrubber {
    /// Scrubs `data` (appended to what was held); returns what may go to
    /// the guest now.
    pub fn feed(&mut self, creds: &Credentials, data: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        for c in &creds.list {
            let s = c.secret.expose().as_bytes();
            let mut i = 0;
            while i + s.len() <= buf.len() {
                if &buf[i..i + s.len()] == s {
                    buf[i..i + s.len()].fill(b'*');
                    i += s.len();
                } else {
                    i += 1;
                }
            }
        }
        // Hold back the longest end of `buf` that starts some secret.
        let mut hold = 0;
        for c in &creds.list {
            let s = c.secret.expose().as_bytes();
            for n in (1..=s.len().saturating_sub(1).min(buf.len())).rev() {
                if n > hold && buf.ends_with(&s[..n]) {
                    hold = n;
                    break;
                }
            }
        }
        self.held = buf.split_off(buf.len() - hold);
        buf
    }

    /// Releases what was held (the response or the stream ended: a value
    /// cannot continue there).
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.held.len()
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

    #[test]
    fn the_bound_header_gets_the_real_value_on_a_terminated_connection_only() {
        let head = "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key: sbx-placeholder-anthropic-0001\r\nContent-Length: 2\r\n\r\n";
        let Rewrite::Injected { head: out, credentials } = rewrite("api.anthropic.com", head, true) else {
            panic!("not injected")
        };
        assert_eq!(credentials, vec!["anthropic".to_string()]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(text, head.replace("sbx-placeholder-anthropic-0001", "sk-real-anthropic"));
        assert_eq!(rewrite("api.anthropic.com", head, false), Rewrite::Unchanged, "never over plain HTTP");
        // A scheme: exactly `Bearer <placeholder>`, the scheme in any case.
        let bearer =
            "GET / HTTP/1.1\r\nHost: api.openai.com\r\nauthorization: bearer sbx-placeholder-openai-0002\r\n\r\n";
        let Rewrite::Injected { head: out, .. } = rewrite("api.openai.com", bearer, true) else { panic!() };
        assert!(String::from_utf8_lossy(&out).contains("authorization: Bearer sk-real-openai\r\n"));
        let bare = "GET / HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: sbx-placeholder-openai-0002\r\n\r\n";
        assert_eq!(rewrite("api.openai.com", bare, true), Rewrite::Unchanged, "scheme missing: not replaced");
    }

    #[test]
    fn the_placeholder_elsewhere_is_not_replaced_and_to_another_host_is_a_leak() {
        for unchanged in [
            "GET /?k=sbx-placeholder-anthropic-0001 HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Other: sbx-placeholder-anthropic-0001\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key: x sbx-placeholder-anthropic-0001\r\n\r\n",
        ] {
            assert_eq!(rewrite("api.anthropic.com", unchanged, true), Rewrite::Unchanged, "{unchanged:?}");
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
        assert_eq!(s.feed(&c, b"key=sk-real-anthropic;"), b"key=*****************;");
        let mut out = s.feed(&c, b"head sk-real-");
        assert_eq!(s.held(), "sk-real-".len());
        out.extend(s.feed(&c, b"openai tail"));
        assert_eq!(String::from_utf8(out).unwrap(), "head ************** tail");
        let mut out = s.feed(&c, b"ends with sk");
        out.extend(s.flush());
        assert_eq!(out, b"ends with sk", "released at the end");
        assert_eq!(s.feed(&c, b"plain"), b"plain");
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
