//! Host side: the network policy — which hosts the guest may reach, and
//! why each request was allowed or refused. Pure functions of validated
//! inputs ([`HostName`]); the guest's bytes never reach this module raw.
//!
//! # Format (TOML)
//!
//! ```toml
//! version = 1
//! preset = "balanced"          # optional: locked (default), balanced, open
//! https = "terminate"          # the default; "passthrough" splices every host
//!
//! [[rule]]
//! allow = "api.example.com"    # exactly one of allow / deny
//!
//! [[rule]]
//! allow = "*.example.org"      # subdomains only, NOT example.org itself
//! ports = [443]                # default: 80 and 443
//!
//! [[rule]]
//! allow = "files.example.net"
//! methods = ["GET", "HEAD"]    # checked per request (HTTP; HTTPS terminated), see below
//! path_prefix = "/public/"
//!
//! [[rule]]
//! deny = "upload.example.org"
//!
//! [[rule]]
//! allow = "wiki.corp.example"
//! addresses = ["10.0.0.5"]     # allow rules only: non-public upstreams
//!
//! [[rule]]
//! allow = "pinned.example.com"
//! passthrough = true           # allow rules only: spliced by SNI, not terminated
//!
//! [[credential]]               # a secret sbx keeps (`sbx secret set anthropic`)
//! name = "anthropic"
//! hosts = ["api.anthropic.com"]
//! header = "x-api-key"         # the header that carries it
//! scheme = "Bearer"            # optional: the value is `Bearer <secret>`
//! env = "ANTHROPIC_API_KEY"    # optional: the guest's variable for the placeholder
//! ```
//!
//! This is the network part of a sandbox's policy document (version 1:
//! the keys above at the top level; version 2: the same keys in a
//! `[network]` table). The document itself (with its `[files]` table for
//! the shared folders) belongs to sbx (`sbx/src/policy_doc.rs`), which
//! parses it once with positions kept and hands this part over as a
//! [`NetworkSection`] to [`Policy::from_section`]; its errors
//! ([`Located`]) carry the byte span of the offending value, so that sbx
//! names the line and column. [`Policy::from_toml`] reads a version 1
//! network-only file (tests, tools).
//!
//! Semantics: rules from the preset come first, then the file's, in order.
//! A request is denied if any deny rule matches, else allowed if any allow
//! rule matches, else denied (default deny). `*.example.org` matches names
//! strictly below example.org; list `example.org` too for the apex. `*`
//! alone matches every name. `methods` and `path_prefix` are checked on
//! each request netstack can read: plain HTTP, and HTTPS it terminates
//! (below). Where it cannot read them (HTTPS spliced by SNI), an allow
//! rule that has them never allows the connection and a deny rule that
//! has them denies it outright — both fail closed.
//!
//! HTTPS: netstack terminates TLS (with the per-installation CA of
//! [`crate::ca`], which the guest trusts: sbx gives it to the guest, which
//! puts it in its trust store) for every allowed host by default
//! (`https = "terminate"`, [`Policy::terminates`]); the requests inside are
//! then checked like plain HTTP, rule by rule, over HTTP/1.1 only (ALPN):
//! each request's Host must be the name the SNI gave (and the address was
//! resolved for), so neither an HTTP/2 connection reused for another name
//! (coalescing) nor a Host other than the SNI (domain fronting) reaches
//! another tenant of the same front end.
//!
//! Passthrough (splicing the guest's bytes by SNI, never decrypting) is an
//! explicit opt-in, for clients that pin certificates and so refuse
//! netstack's leaf: `https = "passthrough"` for every host, or
//! `passthrough = true` on an allow rule for the hosts it matches. It is
//! weaker: only the ClientHello's server name is checked (every handshake
//! record the guest sends before encryption starts, [`crate::tls`]), and
//! what is sent inside the encrypted session is not seen; a front end
//! shared by many tenants (a CDN, `*.googleapis.com`, `*.cloudfront.net`)
//! routes by the encrypted Host header, so a spliced connection to an
//! allowed name can reach any other tenant of that front end (domain
//! fronting). Use it only for hosts that need it.
//!
//! A host with a credential or a rule with `methods` or `path_prefix` is
//! terminated whatever `https` and `passthrough` say (a rule cannot have
//! both `passthrough` and `methods`/`path_prefix`). Where netstack cannot
//! terminate (a stack given no CA, as in some tests), HTTPS is spliced,
//! and to a host with method/path rules fails closed as described above.
//!
//! Credentials (`[[credential]]`, [`crate::credential`]): the guest gets a
//! placeholder in `env`; netstack puts the real value in `header` only on
//! requests to `hosts` over a terminated connection, and refuses a request
//! that carries a placeholder to any other host. A wildcard in `hosts`
//! (`*.corp.example`) is refused where others can own names below it (a
//! top-level domain, `*.co.uk`, `*.github.io`, `*.s3.amazonaws.com`: see
//! [`crate::credential::shared_suffix`]); list those hosts instead. Agents come with theirs,
//! and with the hosts they need: data, in `agents/presets.toml`
//! ([`crate::preset`]; `sbx policy show --agent NAME` lists them); a
//! file's credential of the same name replaces the agent's.
//!
//! Paths: `path_prefix` is compared, as a plain string prefix, with the
//! request's normalised path ([`crate::http::normalize_path`]): query and
//! fragment dropped, `%XX` escapes of unreserved characters decoded, dot
//! segments (`.`, `..`, `%2e%2e`) resolved, `//` collapsed; so
//! `/public/../private` is `/private` and does not match `/public/`. The
//! path is case-sensitive (`/Public/` is not `/public/`; an upstream that
//! ignores case may need deny rules for each spelling); the hex digits of
//! escapes are not. The prefix itself is normalised when the file is read
//! and must not contain `?` or `#`. `/public` also matches `/publicity`:
//! end the prefix with `/` for a directory. A request to a host and port
//! that any path rule names is refused outright if its target cannot be
//! normalised safely (an encoded `/` or `\`, `%00`, a bad or double
//! escape, `..` above the root, a backslash, `..;`).
//!
//! Upstream addresses: an allowed name is resolved on the host when the
//! guest connects, as an absolute name (the host's /etc/hosts, then its
//! resolver for `name.`: never the host's search domains, so `api` is
//! not `api.corp.example`), and netstack connects only to a global unicast address
//! (the first one in the answer; never loopback, private, link-local
//! including cloud metadata at 169.254.169.254, CGNAT, unique-local,
//! multicast, documentation, benchmarking or other reserved ranges, nor
//! the IPv4-mapped forms of those) — unless an allow rule whose name and
//! port match lists the address in `addresses`, or `sbx run --resolve`
//! maps the name to it. The address checked is the address connected to
//! (one resolution per connection).

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::credential::{self, CredentialRule, FileCredential};
use crate::host::{self, HostName};
use crate::http::{self, PathError};
use crate::live::{self, Approval, AskRule};
use crate::preset;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Bad policy file: {0}")]
    Toml(String),
    #[error("Policy version {0} is not supported (expected 1)")]
    Version(i64),
    #[error("Unknown preset '{0}' (expected locked, balanced or open)")]
    Preset(String),
    #[error("Rule {0}: give exactly one of 'allow', 'deny' or 'ask' (ask rules take ports, methods and path only)")]
    RuleAction(usize),
    #[error("Rule {0}: bad host pattern '{1}': {2}")]
    Pattern(usize, String, String),
    #[error("Rule {0}: bad method '{1}'")]
    Method(usize, String),
    #[error("Rule {0}: path_prefix must start with '/'")]
    PathPrefix(usize),
    #[error("Rule {0}: path_prefix must not contain '?' or '#' (only the path is matched)")]
    PathPrefixQuery(usize),
    #[error("Rule {0}: path_prefix '{1}' cannot be normalised: {2}")]
    PathPrefixForm(usize, String, PathError),
    #[error("Rule {0}: bad address '{1}' (expected an IP address such as 10.0.0.5 or fd00::5)")]
    Address(usize, String),
    #[error("Rule {0}: 'addresses' can only be given on an allow rule")]
    AddressOnDeny(usize),
    #[error("Rule {0}: port 0 is not a port")]
    Port(usize),
    #[error("Unknown agent '{0}'")]
    Agent(String),
    #[error("{0}")]
    Presets(&'static preset::Error),
    #[error("Bad credential: {0}")]
    Credential(#[from] credential::Error),
    #[error("Unknown https mode '{0}' (expected passthrough or terminate)")]
    Https(String),
    #[error("Rule {0}: 'passthrough' can only be given on an allow rule")]
    PassthroughOnDeny(usize),
    #[error(
        "Rule {0}: 'passthrough' cannot be combined with 'methods' or 'path_prefix' (those are checked only on terminated TLS); give them in separate rules"
    )]
    PassthroughNarrowed(usize),
    #[error("Rule {0}: {1}")]
    Ask(usize, live::Error),
    #[error("Rule {0}: 'path' patterns are for ask rules (use path_prefix on allow and deny rules)")]
    PathOnAllowDeny(usize),
    #[error("Rule {0}: 'graphql_mutations' are for ask rules")]
    GraphqlOnAllowDeny(usize),
    #[error("Unknown approval '{0}' (expected ask or deny)")]
    Approval(String),
    #[error("Unknown include '{0}' (expected ask:github or ask:gitlab)")]
    Include(String),
    #[error("Admin rule {0}: give exactly one of 'deny' or 'ask' (the admin policy has no allow rules; ask rules take path, deny rules path_prefix)")]
    AdminAction(usize),
}

/// What netstack does with HTTPS to an allowed host that has neither a
/// credential nor a method/path rule (those are always terminated), when
/// it has a CA to terminate with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Https {
    /// Spliced by SNI, never decrypted: opt-in (`https = "passthrough"`),
    /// open to domain fronting (see the module docs).
    Passthrough,
    /// Terminated: every request checked and logged like plain HTTP
    /// (the default; an allow rule's `passthrough` exempts its hosts).
    #[default]
    Terminate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every name.
    Any,
    Exact(HostName),
    /// `*.parent`: names strictly below parent.
    Below(HostName),
}

impl Pattern {
    pub fn parse(raw: &str) -> Result<Pattern, host::Error> {
        if raw == "*" {
            return Ok(Pattern::Any);
        }
        match raw.strip_prefix("*.") {
            Some(parent) => Ok(Pattern::Below(HostName::parse(parent)?)),
            None => Ok(Pattern::Exact(HostName::parse(raw)?)),
        }
    }

    pub fn matches(&self, host: &HostName) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(h) => h == host,
            Pattern::Below(parent) => host.is_strictly_below(parent),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(h) => write!(f, "{h}"),
            Pattern::Below(h) => write!(f, "*.{h}"),
        }
    }
}

/// Where a rule came from, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Preset(&'static str),
    File(usize),
    /// What an agent needs to work (`sbx run claude` reaches its API).
    Agent(&'static str),
    /// `sbx run --allow HOST`.
    CommandLine,
    /// Rule N of the machine's admin policy (`/etc/sbx/policy.toml`, read
    /// by sbx): see [`AdminLayer`].
    Admin(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub pattern: Pattern,
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    /// The path prefix, normalised ([`http::normalize_path`]).
    pub path_prefix: Option<String>,
    /// Allow rules only: non-global upstream addresses this rule's names
    /// may connect to (canonical: no IPv4-mapped IPv6 forms).
    pub addresses: Vec<IpAddr>,
    /// Allow rules only: HTTPS to the names it matches is spliced by SNI
    /// instead of terminated (see [`Policy::terminates`]).
    pub passthrough: bool,
    pub origin: Origin,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.action == Action::Allow { "allow" } else { "deny" };
        match &self.origin {
            Origin::Preset(p) => write!(f, "preset {p}: ")?,
            Origin::File(i) => write!(f, "rule {i}: ")?,
            Origin::Agent(a) => write!(f, "agent {a}: ")?,
            Origin::CommandLine => write!(f, "--allow: ")?,
            Origin::Admin(i) => write!(f, "{ADMIN_ASK_ORIGIN} {i}: ")?,
        }
        write!(f, "{verb} {}", self.pattern)?;
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        write!(f, " ports {}", ports.join(","))?;
        if !self.methods.is_empty() {
            write!(f, " methods {}", self.methods.join(","))?;
        }
        if let Some(p) = &self.path_prefix {
            write!(f, " path {p}")?;
        }
        if !self.addresses.is_empty() {
            let addrs: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
            write!(f, " addresses {}", addrs.join(","))?;
        }
        if self.passthrough {
            write!(f, " passthrough")?;
        }
        Ok(())
    }
}

/// What is being asked: a validated name, a port, and for plain HTTP the
/// method and request target (path rules see it normalised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub host: &'a HostName,
    pub port: u16,
    /// `None` for HTTPS (SNI only: method and path are not visible).
    /// The target as sent, or already normalised: it is normalised (again,
    /// idempotently) before path rules are compared with it.
    pub http: Option<(&'a str, &'a str)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided, or None for the default deny.
    pub rule: Option<Rule>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.action, &self.rule) {
            (Action::Allow, Some(r)) => write!(f, "allowed by {r}"),
            (Action::Deny, Some(r)) => write!(f, "denied by {r}"),
            (_, None) => write!(f, "denied: no rule allows it (default deny)"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    allow: Option<String>,
    deny: Option<String>,
    /// Held for a person's yes ([`crate::live`]).
    ask: Option<String>,
    /// A path pattern (ask rules; see [`crate::live::PathPattern`]).
    path: Option<String>,
    /// GraphQL mutations an ask rule holds ([`crate::graphql`]).
    graphql_mutations: Option<Vec<String>>,
    ports: Option<Vec<u16>>,
    methods: Option<Vec<String>>,
    path_prefix: Option<String>,
    addresses: Option<Vec<String>>,
    passthrough: Option<bool>,
}

/// The network part of a policy document as written: every key of a
/// version 1 document but `version` (the keys of `[network]` in version
/// 2). sbx (`sbx/src/policy_doc.rs`) reads the document once, with
/// positions kept, and hands this over to [`Policy::from_section`]; the
/// spans are byte ranges in that document.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    preset: Option<Spanned<String>>,
    #[serde(default)]
    rule: Vec<Spanned<FileRule>>,
    https: Option<Spanned<String>>,
    #[serde(default)]
    credential: Vec<Spanned<FileCredential>>,
    /// "ask" or "deny" (default): see [`crate::live`].
    approval: Option<Spanned<String>>,
    /// Ask presets: "ask:github", "ask:gitlab".
    #[serde(default)]
    include: Vec<Spanned<String>>,
}

/// The keys of a [`NetworkSection`] (so that a document reader can tell
/// a misplaced network key from an unknown one).
pub const NETWORK_KEYS: &[&str] = &["preset", "rule", "https", "credential", "approval", "include"];

/// The policy version [`Policy::from_toml`] reads.
pub const VERSION: i64 = 1;

/// An [`enum@Error`] and where in the document it is: the byte range of the
/// offending value (a rule's or credential's whole table for the checks
/// that span it), when known.
#[derive(Debug, Error)]
#[error("{error}")]
pub struct Located {
    pub error: Error,
    pub span: Option<Range<usize>>,
}

impl Located {
    fn at(span: Range<usize>) -> impl FnOnce(Error) -> Located {
        move |error| Located { error, span: Some(span) }
    }
}

/// A `[[rule]]` table, checked: an ask rule or an allow/deny rule.
enum Parsed {
    Ask(AskRule),
    Rule(Rule),
}

/// Checks rule `n` (1-based) of the file.
fn file_rule(n: usize, r: FileRule) -> Result<Parsed, Error> {
    if let Some(host) = r.ask {
        if r.allow.is_some() || r.deny.is_some() || r.path_prefix.is_some() || r.addresses.is_some() {
            return Err(Error::RuleAction(n));
        }
        let methods = r.methods.unwrap_or_default();
        let mut ask = AskRule::parse(&host, r.ports, methods, r.path.as_deref(), format!("rule {n}"))
            .map_err(|e| Error::Ask(n, e))?;
        if let Some(names) = &r.graphql_mutations {
            ask = ask.with_graphql(names).map_err(|e| Error::Ask(n, e))?;
        }
        return Ok(Parsed::Ask(ask));
    }
    if r.path.is_some() {
        return Err(Error::PathOnAllowDeny(n));
    }
    if r.graphql_mutations.is_some() {
        return Err(Error::GraphqlOnAllowDeny(n));
    }
    let (action, raw) = match (r.allow, r.deny) {
        (Some(a), None) => (Action::Allow, a),
        (None, Some(d)) => (Action::Deny, d),
        _ => return Err(Error::RuleAction(n)),
    };
    let pattern = Pattern::parse(&raw).map_err(|e| Error::Pattern(n, raw.clone(), e.to_string()))?;
    let ports = r.ports.unwrap_or_else(|| DEFAULT_PORTS.to_vec());
    if ports.contains(&0) {
        return Err(Error::Port(n));
    }
    let methods = r.methods.unwrap_or_default();
    for m in &methods {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::Method(n, m.clone()));
        }
    }
    let path_prefix = r.path_prefix.map(|p| normal_prefix(n, &p)).transpose()?;
    let mut addresses = Vec::new();
    for raw in r.addresses.unwrap_or_default() {
        let addr: IpAddr = raw.parse().map_err(|_| Error::Address(n, raw.clone()))?;
        addresses.push(addr.to_canonical());
    }
    if action == Action::Deny && !addresses.is_empty() {
        return Err(Error::AddressOnDeny(n));
    }
    let passthrough = r.passthrough.unwrap_or(false);
    if passthrough && action == Action::Deny {
        return Err(Error::PassthroughOnDeny(n));
    }
    if passthrough && (!methods.is_empty() || path_prefix.is_some()) {
        return Err(Error::PassthroughNarrowed(n));
    }
    let origin = Origin::File(n);
    Ok(Parsed::Rule(Rule { action, pattern, ports, methods, path_prefix, addresses, passthrough, origin }))
}

const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// The balanced preset: the agents' APIs and the common package registries.
const BALANCED: &[&str] = &[
    "api.anthropic.com",
    "statsig.anthropic.com",
    "api.openai.com",
    "chatgpt.com",
    "generativelanguage.googleapis.com",
    "oauth2.googleapis.com",
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "proxy.golang.org",
    "sum.golang.org",
    "github.com",
    "api.github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
    "deb.debian.org",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    /// HTTPS to hosts without credentials or method/path rules.
    pub https: Https,
    /// Which secrets go to which hosts, in which header.
    pub credentials: Vec<CredentialRule>,
    /// What happens to a request no rule allows ([`crate::live`]).
    pub approval: Approval,
    /// Rules that hold matching requests for a person ([`crate::live`]).
    pub asks: Vec<AskRule>,
}

fn preset_rules(name: &'static str) -> Vec<Rule> {
    let names: Vec<&str> = match name {
        "balanced" => BALANCED.to_vec(),
        "open" => vec!["*"],
        _ => vec![],
    };
    names
        .into_iter()
        .filter_map(|n| Pattern::parse(n).ok())
        .map(|pattern| allow_rule(pattern, Origin::Preset(name)))
        .collect()
}

fn preset_name(name: &str) -> Result<&'static str, Error> {
    ["locked", "balanced", "open"].into_iter().find(|p| *p == name).ok_or_else(|| Error::Preset(name.to_string()))
}

/// The credential bindings an agent comes with (its preset's, origin
/// `agent NAME`; none for an agent sbx does not know).
pub fn agent_credentials(agent: &str) -> Vec<CredentialRule> {
    preset::find(agent).map(|p| p.credentials()).unwrap_or_default()
}

fn allow_rule(pattern: Pattern, origin: Origin) -> Rule {
    Rule {
        action: Action::Allow,
        pattern,
        ports: DEFAULT_PORTS.to_vec(),
        methods: vec![],
        path_prefix: None,
        addresses: vec![],
        passthrough: false,
        origin,
    }
}

impl Policy {
    /// The default for an agent: deny everything but what the agent needs.
    pub fn for_agent(agent: &str) -> Result<Policy, Error> {
        let presets = preset::embedded().map_err(Error::Presets)?;
        let preset = presets.find(agent).ok_or_else(|| Error::Agent(agent.to_string()))?;
        let origin = Origin::Agent(preset.name.as_str());
        let rules = preset.network.hosts.iter().map(|p| allow_rule(p.clone(), origin.clone())).collect();
        let credentials = preset.credentials();
        Ok(Policy { rules, https: Https::default(), credentials, approval: Approval::default(), asks: Vec::new() })
    }

    /// Adds what an agent needs, after the rules already there (a deny
    /// rule of the file still wins: deny beats allow).
    pub fn add_agent(&mut self, agent: &str) -> Result<(), Error> {
        let extra = Policy::for_agent(agent)?;
        self.rules.extend(extra.rules);
        for c in extra.credentials {
            if !self.credentials.iter().any(|have| have.name == c.name) {
                self.credentials.push(c);
            }
        }
        Ok(())
    }

    /// Adds an allow rule for `pattern` on ports 80 and 443
    /// (`sbx run --allow`).
    pub fn allow(&mut self, pattern: &str) -> Result<(), Error> {
        let p = Pattern::parse(pattern).map_err(|e| Error::Pattern(0, pattern.to_string(), e.to_string()))?;
        self.rules.push(allow_rule(p, Origin::CommandLine));
        Ok(())
    }

    /// A preset alone.
    pub fn preset(name: &str) -> Result<Policy, Error> {
        Ok(Policy {
            rules: preset_rules(preset_name(name)?),
            https: Https::default(),
            credentials: Vec::new(),
            approval: Approval::default(),
            asks: Vec::new(),
        })
    }

    /// A whole version 1 network policy file (no `[files]`: that is the
    /// policy document's, `sbx/src/policy_doc.rs`).
    pub fn from_toml(text: &str) -> Result<Policy, Error> {
        let with_input = |mut e: toml::de::Error| {
            e.set_input(Some(text));
            Error::Toml(e.to_string())
        };
        let mut root = toml::de::DeTable::parse(text).map_err(with_input)?;
        let span = root.span();
        let Some(version) = root.get_mut().remove("version") else {
            return Err(Error::Toml("missing field `version`".into()));
        };
        let version: i64 =
            serde::Deserialize::deserialize(toml::de::ValueDeserializer::from(version)).map_err(with_input)?;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let rest = Spanned::new(span, root.into_inner());
        let section = NetworkSection::deserialize(toml::de::Deserializer::from(rest)).map_err(with_input)?;
        Policy::from_section(section).map_err(|l| l.error)
    }

    /// The network part of a policy document, read by its owner (sbx);
    /// errors say where.
    pub fn from_section(file: NetworkSection) -> Result<Policy, Located> {
        let preset = match &file.preset {
            Some(p) => preset_name(p.get_ref()).map_err(Located::at(p.span()))?,
            None => "locked",
        };
        let mut rules = preset_rules(preset);
        let mut asks = Vec::new();
        for inc in &file.include {
            let preset = inc.get_ref().strip_prefix("ask:").and_then(live::ask_preset);
            asks.extend(preset.ok_or_else(|| Error::Include(inc.get_ref().clone())).map_err(Located::at(inc.span()))?);
        }
        for (i, r) in file.rule.into_iter().enumerate() {
            let span = r.span();
            let rule = file_rule(i + 1, r.into_inner()).map_err(Located::at(span))?;
            match rule {
                Parsed::Ask(ask) => asks.push(ask),
                Parsed::Rule(rule) => rules.push(rule),
            }
        }
        let https = match &file.https {
            None => Https::Terminate,
            Some(h) => match h.get_ref().as_str() {
                "terminate" => Https::Terminate,
                "passthrough" => Https::Passthrough,
                other => return Err(Located::at(h.span())(Error::Https(other.to_string()))),
            },
        };
        if file.credential.len() > credential::MAX_CREDENTIALS {
            let span = file.credential[credential::MAX_CREDENTIALS].span();
            return Err(Located::at(span)(credential::Error::TooMany.into()));
        }
        let mut credentials: Vec<CredentialRule> = Vec::new();
        for (i, raw) in file.credential.into_iter().enumerate() {
            let span = raw.span();
            let c = CredentialRule::parse(raw.into_inner(), Origin::File(i + 1))
                .map_err(|e| Located::at(span.clone())(e.into()))?;
            if credentials.iter().any(|have| have.name == c.name) {
                return Err(Located::at(span)(credential::Error::Duplicate(c.name).into()));
            }
            credentials.push(c);
        }
        let approval = match &file.approval {
            None => Approval::default(),
            Some(a) => Approval::parse(a.get_ref())
                .ok_or_else(|| Error::Approval(a.get_ref().clone()))
                .map_err(Located::at(a.span()))?,
        };
        Ok(Policy { rules, https, credentials, approval, asks })
    }

    /// Whether netstack terminates TLS to `host` on `port` (given a CA):
    /// always if the host has a credential or a rule for it has `methods`
    /// or `path_prefix`; else unless `https = "passthrough"` or an allow
    /// rule matching name and port has `passthrough = true` (the opt-in
    /// for clients that pin certificates; see the module docs for what
    /// splicing cannot check).
    pub fn terminates(&self, host: &HostName, port: u16) -> bool {
        let matching = |r: &&Rule| r.pattern.matches(host) && r.ports.contains(&port);
        let must = self.credentials.iter().any(|c| c.bound_to(host))
            || self.rules.iter().filter(matching).any(|r| !r.methods.is_empty() || r.path_prefix.is_some());
        must || (self.https == Https::Terminate
            && !self.rules.iter().filter(matching).any(|r| r.action == Action::Allow && r.passthrough))
    }

    /// Whether a terminated connection to `host` on `port` is worth
    /// accepting: some request to it could be allowed (an allow rule
    /// matches name and port) and no deny rule refuses every request
    /// (one without methods and path). Each request is then decided
    /// on its own ([`Policy::decide`]).
    pub fn reachable(&self, host: &HostName, port: u16) -> Decision {
        let matching = |r: &&Rule| r.pattern.matches(host) && r.ports.contains(&port);
        let blanket = |r: &&Rule| r.action == Action::Deny && r.methods.is_empty() && r.path_prefix.is_none();
        if let Some(rule) = self.rules.iter().filter(matching).find(blanket) {
            return Decision { action: Action::Deny, rule: Some(rule.clone()) };
        }
        match self.rules.iter().filter(matching).find(|r| r.action == Action::Allow) {
            Some(rule) => Decision { action: Action::Allow, rule: Some(rule.clone()) },
            None => Decision { action: Action::Deny, rule: None },
        }
    }

    /// Every rule that matches `req`, in order.
    pub fn explain(&self, req: &Request<'_>) -> Vec<&Rule> {
        let path = req.http.map(|(_, target)| http::normalize_path(target));
        self.rules.iter().filter(|r| rule_matches(r, req, path.as_ref())).collect()
    }

    /// Whether any rule for `host` on `port` has a path prefix: requests
    /// there must have a target that normalises ([`http::normalize_path`]),
    /// or they are refused before the policy decides.
    pub fn has_path_rules(&self, host: &HostName, port: u16) -> bool {
        self.rules.iter().any(|r| r.path_prefix.is_some() && r.pattern.matches(host) && r.ports.contains(&port))
    }

    /// The non-global upstream addresses that `host` on `port` may connect
    /// to: the `addresses` of every allow rule whose name and ports match
    /// (canonical forms, in rule order).
    pub fn permitted_addresses(&self, host: &HostName, port: u16) -> Vec<IpAddr> {
        self.rules
            .iter()
            .filter(|r| r.action == Action::Allow && r.pattern.matches(host) && r.ports.contains(&port))
            .flat_map(|r| r.addresses.iter().copied())
            .collect()
    }

    /// Whether DNS should resolve `host`: some request to it could be
    /// allowed (an allow rule matches the name) and no deny rule refuses
    /// the name on every port without narrowing.
    pub fn resolvable(&self, host: &HostName) -> Decision {
        let blanket_deny = self.rules.iter().find(|r| {
            r.action == Action::Deny
                && r.pattern.matches(host)
                && r.methods.is_empty()
                && r.path_prefix.is_none()
                && DEFAULT_PORTS.iter().all(|p| r.ports.contains(p))
        });
        if let Some(rule) = blanket_deny {
            return Decision { action: Action::Deny, rule: Some(rule.clone()) };
        }
        match self.rules.iter().find(|r| r.action == Action::Allow && r.pattern.matches(host)) {
            Some(rule) => Decision { action: Action::Allow, rule: Some(rule.clone()) },
            None => Decision { action: Action::Deny, rule: None },
        }
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let matched = self.explain(req);
        let pick = |a: Action| matched.iter().find(|r| r.action == a).map(|r| (*r).clone());
        match (pick(Action::Deny), pick(Action::Allow)) {
            (Some(rule), _) => Decision { action: Action::Deny, rule: Some(rule) },
            (None, Some(rule)) => Decision { action: Action::Allow, rule: Some(rule) },
            (None, None) => Decision { action: Action::Deny, rule: None },
        }
    }
}

/// A rule of the machine's admin policy as its file gives it: `deny` or
/// `ask` (never allow: the admin layer only narrows), with the same
/// `ports`, `methods`, `path_prefix` (deny) and `path` (ask) as a
/// sandbox's policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRule {
    deny: Option<String>,
    ask: Option<String>,
    ports: Option<Vec<u16>>,
    methods: Option<Vec<String>>,
    path_prefix: Option<String>,
    path: Option<String>,
}

/// The network part of the machine's admin policy, which every sandbox on
/// the host obeys whatever its user asks: its deny rules win over every
/// other rule (the user's file, `--allow`, presets, agents, live allows,
/// `sbx approve --always`, `--learn`) and its ask rules hold requests even
/// to hosts the user allows, and no live allow lifts them (each held
/// request needs a person's yes, once: [`crate::live`]). Evaluated by
/// [`crate::live::judge`] before anything else; replaced whole while a
/// sandbox runs ([`crate::live::Live::set_admin`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminLayer {
    /// Deny rules, origin [`Origin::Admin`].
    pub denies: Vec<Rule>,
    /// Ask rules, origin "admin policy rule N".
    pub asks: Vec<AskRule>,
    /// The SHA-256 (hex) of the file it was read from, for the audit log.
    pub sha256: String,
}

/// How every admin rule's text begins: the origin of an admin ask rule
/// (see [`AskRule::is_admin`]) and what [`Origin::Admin`] displays.
pub const ADMIN_ASK_ORIGIN: &str = "admin policy rule";

impl AdminLayer {
    /// The layer of `rules` (numbered from 1 in file order), every field
    /// checked as for a sandbox's policy file.
    pub fn parse(rules: Vec<AdminRule>, sha256: String) -> Result<AdminLayer, Error> {
        let mut layer = AdminLayer { sha256, ..AdminLayer::default() };
        for (i, r) in rules.into_iter().enumerate() {
            let n = i + 1;
            let methods = r.methods.unwrap_or_default();
            match (r.deny, r.ask) {
                (Some(raw), None) => {
                    if r.path.is_some() {
                        return Err(Error::PathOnAllowDeny(n));
                    }
                    let pattern = Pattern::parse(&raw).map_err(|e| Error::Pattern(n, raw.clone(), e.to_string()))?;
                    let ports = r.ports.unwrap_or_else(|| DEFAULT_PORTS.to_vec());
                    if ports.is_empty() || ports.contains(&0) {
                        return Err(Error::Port(n));
                    }
                    if let Some(m) = methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
                    {
                        return Err(Error::Method(n, m.clone()));
                    }
                    let path_prefix = r.path_prefix.map(|p| normal_prefix(n, &p)).transpose()?;
                    layer.denies.push(Rule {
                        action: Action::Deny,
                        pattern,
                        ports,
                        methods,
                        path_prefix,
                        addresses: vec![],
                        passthrough: false,
                        origin: Origin::Admin(n),
                    });
                }
                (None, Some(host)) => {
                    if r.path_prefix.is_some() {
                        return Err(Error::RuleAction(n));
                    }
                    let origin = format!("{ADMIN_ASK_ORIGIN} {n}");
                    let ask = AskRule::parse(&host, r.ports, methods, r.path.as_deref(), origin)
                        .map_err(|e| Error::Ask(n, e))?;
                    layer.asks.push(ask);
                }
                _ => return Err(Error::AdminAction(n)),
            }
        }
        Ok(layer)
    }

    /// The first admin deny rule that matches `req` (narrowed ones as
    /// deny rules do: fail closed where method or path cannot be read).
    pub fn deny_for(&self, req: &Request<'_>) -> Option<&Rule> {
        let path = req.http.map(|(_, target)| http::normalize_path(target));
        self.denies.iter().find(|r| rule_matches(r, req, path.as_ref()))
    }

    /// The first admin deny rule that refuses every request to `host` on
    /// `port` (no methods, no path).
    pub fn blanket_deny(&self, host: &HostName, port: u16) -> Option<&Rule> {
        self.denies.iter().find(|r| {
            r.methods.is_empty() && r.path_prefix.is_none() && r.pattern.matches(host) && r.ports.contains(&port)
        })
    }

    /// The first admin deny rule that refuses `host` on ports 80 and 443
    /// without narrowing (its name then does not resolve).
    pub fn name_deny(&self, host: &HostName) -> Option<&Rule> {
        self.denies.iter().find(|r| {
            r.methods.is_empty()
                && r.path_prefix.is_none()
                && r.pattern.matches(host)
                && DEFAULT_PORTS.iter().all(|p| r.ports.contains(p))
        })
    }

    /// Whether some admin rule for `host` on `port` must see each request
    /// (a narrowed deny, or an ask rule): the connection is terminated.
    pub fn needs_requests(&self, host: &HostName, port: u16) -> bool {
        let here = |p: &Pattern, ports: &[u16]| p.matches(host) && ports.contains(&port);
        self.denies.iter().any(|r| (!r.methods.is_empty() || r.path_prefix.is_some()) && here(&r.pattern, &r.ports))
            || self.asks.iter().any(|a| here(&a.pattern, &a.ports))
    }

    /// The admin rule that a live allow of `pattern` on `ports` (no
    /// methods, no path: a blanket grant) would run into: an admin deny
    /// or ask rule that matches a name the pattern names on one of those
    /// ports. Used to refuse `sbx policy allow` early with a clear
    /// message; [`crate::live::judge`] is the guarantee either way.
    pub fn conflict(&self, pattern: &Pattern, ports: &[u16]) -> Option<String> {
        let overlaps = |p: &Pattern| match (p, pattern) {
            (Pattern::Any, _) | (_, Pattern::Any) => true,
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Below(a), Pattern::Exact(b)) | (Pattern::Exact(b), Pattern::Below(a)) => b.is_strictly_below(a),
            (Pattern::Below(a), Pattern::Below(b)) => a == b || a.is_strictly_below(b) || b.is_strictly_below(a),
        };
        let on_ports = |theirs: &[u16]| theirs.iter().any(|p| ports.contains(p));
        if let Some(r) = self.denies.iter().find(|r| overlaps(&r.pattern) && on_ports(&r.ports)) {
            return Some(r.to_string());
        }
        self.asks.iter().find(|a| overlaps(&a.pattern) && on_ports(&a.ports)).map(|a| a.to_string())
    }
}

/// A rule's path prefix, normalised like request paths.
fn normal_prefix(n: usize, raw: &str) -> Result<String, Error> {
    if !raw.starts_with('/') {
        return Err(Error::PathPrefix(n));
    }
    if raw.contains(['?', '#']) {
        return Err(Error::PathPrefixQuery(n));
    }
    http::normalize_path(raw).map_err(|e| Error::PathPrefixForm(n, raw.to_string(), e))
}

/// `path`: the request's normalised path (HTTP only).
fn rule_matches(rule: &Rule, req: &Request<'_>, path: Option<&Result<String, PathError>>) -> bool {
    if !rule.pattern.matches(req.host) || !rule.ports.contains(&req.port) {
        return false;
    }
    let narrowed = !rule.methods.is_empty() || rule.path_prefix.is_some();
    match req.http {
        Some((method, _)) => {
            let path_matches = match (rule.path_prefix.as_deref(), path) {
                (None, _) => true,
                (Some(prefix), Some(Ok(path))) => path.starts_with(prefix),
                // A path that cannot be normalised: an allow with a path
                // never allows it, a deny with a path always denies it.
                (Some(_), _) => rule.action == Action::Deny,
            };
            (rule.methods.is_empty() || rule.methods.iter().any(|m| m == method)) && path_matches
        }
        // HTTPS: a narrowed allow cannot be checked (never allows); a
        // narrowed deny cannot be checked either (always denies).
        None => !narrowed || rule.action == Action::Deny,
    }
}

#[cfg(test)]
mod agent_tests {
    use super::*;

    fn req(host: &str, port: u16) -> (HostName, u16) {
        (HostName::parse(host).unwrap(), port)
    }

    #[test]
    fn an_agent_reaches_its_api_and_nothing_else() {
        let p = Policy::for_agent("claude").unwrap();
        let (h, port) = req("api.anthropic.com", 443);
        let d = p.decide(&Request { host: &h, port, http: None });
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.to_string(), "allowed by agent claude: allow api.anthropic.com ports 80,443");
        let (h, port) = req("api.openai.com", 443);
        assert_eq!(p.decide(&Request { host: &h, port, http: None }).action, Action::Deny);
        assert!(Policy::for_agent("shell").unwrap().rules.is_empty(), "shell: deny everything");
        assert!(matches!(Policy::for_agent("nope"), Err(Error::Agent(_))));
    }

    #[test]
    fn allow_flags_add_rules_but_file_denies_still_win() {
        let mut p = Policy::from_toml("version = 1\n[[rule]]\ndeny = \"bad.example.com\"\n").unwrap();
        p.allow("*.example.com").unwrap();
        p.allow("example.com").unwrap();
        let (h, port) = req("x.example.com", 80);
        let d = p.decide(&Request { host: &h, port, http: Some(("GET", "/")) });
        assert_eq!(d.to_string(), "allowed by --allow: allow *.example.com ports 80,443");
        let (h, port) = req("bad.example.com", 443);
        assert_eq!(p.decide(&Request { host: &h, port, http: None }).action, Action::Deny);
        assert!(p.allow("127.0.0.1").is_err(), "no IP literals");
        assert!(p.allow("").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn https(p: &Policy, h: &str) -> Action {
        p.decide(&Request { host: &host(h), port: 443, http: None }).action
    }

    fn http(p: &Policy, h: &str, method: &str, path: &str) -> Action {
        p.decide(&Request { host: &host(h), port: 80, http: Some((method, path)) }).action
    }

    const FILE: &str = r#"
        version = 1
        [[rule]]
        allow = "*.example.com"
        [[rule]]
        allow = "exact.org"
        ports = [443]
        [[rule]]
        deny = "bad.example.com"
        [[rule]]
        allow = "files.net"
        methods = ["GET", "HEAD"]
        path_prefix = "/public/"
        [[rule]]
        allow = "api.io"
        [[rule]]
        deny = "api.io"
        methods = ["POST"]
    "#;

    #[test]
    fn wildcards_match_subdomains_only_on_label_boundaries() {
        let p = Policy::from_toml(FILE).unwrap();
        assert_eq!(https(&p, "a.example.com"), Action::Allow);
        assert_eq!(https(&p, "a.b.example.com"), Action::Allow);
        assert_eq!(https(&p, "A.Example.COM."), Action::Allow, "case and trailing dot are normalised");
        assert_eq!(https(&p, "example.com"), Action::Deny, "the apex is not below itself");
        assert_eq!(https(&p, "evilexample.com"), Action::Deny);
        assert_eq!(https(&p, "example.com.evil.com"), Action::Deny);
    }

    #[test]
    fn deny_beats_allow_and_default_is_deny() {
        let p = Policy::from_toml(FILE).unwrap();
        let d = p.decide(&Request { host: &host("bad.example.com"), port: 443, http: None });
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.rule.as_ref().unwrap().origin, Origin::File(3));
        assert!(d.to_string().contains("denied by rule 3: deny bad.example.com"), "{d}");
        let none = p.decide(&Request { host: &host("other.net"), port: 443, http: None });
        assert_eq!(none, Decision { action: Action::Deny, rule: None });
        assert!(none.to_string().contains("default deny"));
    }

    #[test]
    fn ports_narrow_rules() {
        let p = Policy::from_toml(FILE).unwrap();
        assert_eq!(https(&p, "exact.org"), Action::Allow);
        assert_eq!(http(&p, "exact.org", "GET", "/"), Action::Deny, "port 80 not listed");
        let odd = p.decide(&Request { host: &host("a.example.com"), port: 8080, http: None });
        assert_eq!(odd.action, Action::Deny);
    }

    #[test]
    fn methods_and_paths_narrow_http_and_fail_closed_for_https() {
        let p = Policy::from_toml(FILE).unwrap();
        assert_eq!(http(&p, "files.net", "GET", "/public/a"), Action::Allow);
        assert_eq!(http(&p, "files.net", "POST", "/public/a"), Action::Deny);
        assert_eq!(http(&p, "files.net", "GET", "/private"), Action::Deny);
        assert_eq!(https(&p, "files.net"), Action::Deny, "a narrowed allow cannot allow HTTPS");
        assert_eq!(http(&p, "api.io", "GET", "/"), Action::Allow);
        assert_eq!(http(&p, "api.io", "POST", "/"), Action::Deny);
        assert_eq!(https(&p, "api.io"), Action::Deny, "a narrowed deny denies HTTPS outright");
    }

    #[test]
    fn path_rules_match_the_normalised_path() {
        let p = Policy::from_toml(FILE).unwrap();
        for allowed in ["/public/a", "/public/./a", "/public//a", "/public/x/../a", "/%70ublic/a", "/public/a?x=../.."]
        {
            assert_eq!(http(&p, "files.net", "GET", allowed), Action::Allow, "{allowed}");
        }
        for denied in [
            "/public/../private",
            "/public/%2e%2e/private",
            "/public/.%2E/private",
            "/public/..%2Fprivate",
            "/public/%2F../private",
            "/public/..;/private",
            "/public\\..\\private",
            "/public/../../private",
            "/public/%00",
            "/PUBLIC/a",
            "/private?/public/",
        ] {
            assert_eq!(http(&p, "files.net", "GET", denied), Action::Deny, "{denied}");
        }
        let deny_admin = Policy::from_toml(
            "version = 1\n[[rule]]\nallow = \"a.com\"\n[[rule]]\ndeny = \"a.com\"\npath_prefix = \"/admin/\"\n",
        )
        .unwrap();
        for denied in [
            "/admin/x",
            "/x/../admin/x",
            "/%61dmin/x",
            "//admin/x",
            "/./admin/x",
            "/admin%2Fx",
            "/a/%2e%2e/%2e%2e/admin/",
        ] {
            assert_eq!(http(&deny_admin, "a.com", "GET", denied), Action::Deny, "{denied}");
        }
        assert_eq!(http(&deny_admin, "a.com", "GET", "/administrator"), Action::Allow);
        assert!(deny_admin.has_path_rules(&host("a.com"), 80));
        assert!(!deny_admin.has_path_rules(&host("b.com"), 80));
        assert!(p.has_path_rules(&host("files.net"), 443) && !p.has_path_rules(&host("api.io"), 80));
    }

    #[test]
    fn path_prefixes_are_normalised_when_read() {
        let p = |prefix: &str| {
            Policy::from_toml(&format!("version = 1\n[[rule]]\nallow = \"a.com\"\npath_prefix = \"{prefix}\"\n"))
        };
        assert_eq!(p("/a/./b/%7e/").unwrap().rules[0].path_prefix.as_deref(), Some("/a/b/~/"));
        assert!(matches!(p("/a?b"), Err(Error::PathPrefixQuery(1))));
        assert!(matches!(p("/a%2fb"), Err(Error::PathPrefixForm(1, _, PathError::EncodedSlash))));
        assert!(matches!(p("/.."), Err(Error::PathPrefixForm(1, _, PathError::AboveRoot))));
        assert!(matches!(p("a"), Err(Error::PathPrefix(1))));
    }

    #[test]
    fn addresses_widen_allow_rules_only() {
        let text = "version = 1\n[[rule]]\nallow = \"wiki.corp\"\nports = [80]\naddresses = [\"10.0.0.5\", \"::ffff:192.168.1.1\", \"fd00::5\"]\n[[rule]]\nallow = \"*.corp\"\n";
        let p = Policy::from_toml(text).unwrap();
        let want: Vec<IpAddr> = ["10.0.0.5", "192.168.1.1", "fd00::5"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(p.permitted_addresses(&host("wiki.corp"), 80), want, "mapped forms are canonical");
        assert!(p.permitted_addresses(&host("wiki.corp"), 443).is_empty(), "port not listed");
        assert!(p.permitted_addresses(&host("other.corp"), 80).is_empty());
        assert!(p.rules[0].to_string().ends_with("addresses 10.0.0.5,192.168.1.1,fd00::5"), "{}", p.rules[0]);
        let err = |t: &str| Policy::from_toml(t).unwrap_err();
        assert!(matches!(
            err("version = 1\n[[rule]]\nallow = \"a.com\"\naddresses = [\"10.0.0\"]\n"),
            Error::Address(1, _)
        ));
        assert!(matches!(
            err("version = 1\n[[rule]]\nallow = \"a.com\"\naddresses = [\"a.com\"]\n"),
            Error::Address(1, _)
        ));
        assert!(matches!(
            err("version = 1\n[[rule]]\ndeny = \"a.com\"\naddresses = [\"10.0.0.5\"]\n"),
            Error::AddressOnDeny(1)
        ));
    }

    #[test]
    fn explain_lists_every_matching_rule_in_order() {
        let p = Policy::from_toml(FILE).unwrap();
        let h = host("bad.example.com");
        let why: Vec<String> =
            p.explain(&Request { host: &h, port: 443, http: None }).iter().map(|r| r.to_string()).collect();
        assert_eq!(why, vec!["rule 1: allow *.example.com ports 80,443", "rule 3: deny bad.example.com ports 80,443"]);
    }

    #[test]
    fn names_resolve_when_some_request_could_be_allowed() {
        let p = Policy::from_toml(FILE).unwrap();
        let r = |h: &str| p.resolvable(&host(h)).action;
        assert_eq!(r("a.example.com"), Action::Allow);
        assert_eq!(r("files.net"), Action::Allow, "a narrowed allow still needs the name");
        assert_eq!(r("bad.example.com"), Action::Deny, "blanket deny");
        assert_eq!(r("api.io"), Action::Allow, "a narrowed deny does not hide the name");
        assert_eq!(r("nowhere.org"), Action::Deny);
    }

    #[test]
    fn urls_parse_strictly() {
        let t = Target::parse_url("https://API.example.com/v1/x").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.https, t.path.as_str()), ("api.example.com", 443, true, "/v1/x"));
        let t = Target::parse_url("http://example.com:8080").unwrap();
        assert_eq!((t.port, t.path.as_str()), (8080, "/"));
        for bad in [
            "ftp://x.com",
            "http://127.1/",
            "http://[::1]/",
            "http://user@x.com/",
            "http://x.com:0/",
            "http://x.com:99999",
        ] {
            assert!(Target::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presets() {
        assert_eq!(https(&Policy::preset("locked").unwrap(), "api.anthropic.com"), Action::Deny);
        let balanced = Policy::preset("balanced").unwrap();
        assert_eq!(https(&balanced, "api.anthropic.com"), Action::Allow);
        assert_eq!(https(&balanced, "registry.npmjs.org"), Action::Allow);
        assert_eq!(https(&balanced, "evil.com"), Action::Deny);
        assert_eq!(https(&Policy::preset("open").unwrap(), "evil.com"), Action::Allow);
        assert!(matches!(Policy::preset("loose"), Err(Error::Preset(_))));
        let with_file = Policy::from_toml("version = 1\npreset = \"open\"\n[[rule]]\ndeny = \"evil.com\"\n").unwrap();
        assert_eq!(https(&with_file, "evil.com"), Action::Deny);
        assert_eq!(https(&with_file, "good.com"), Action::Allow);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let err = |t: &str| Policy::from_toml(t).unwrap_err().to_string();
        assert!(err("version = 2").contains("version 2"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\ndeny = \"b.com\"").contains("Rule 1: give exactly one"));
        assert!(err("version = 1\n[[rule]]\nports = [80]").contains("Rule 1"));
        assert!(err("version = 1\n[[rule]]\nallow = \"127.0.0.1\"").contains("IP address"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\nmethods = [\"get\"]").contains("bad method"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\npath_prefix = \"x\"").contains("path_prefix"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\nports = [0]").contains("port 0"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\ncolour = 1").contains("Bad policy file"));
        assert!(err("version = 1\npreset = \"x\"").contains("Unknown preset"));
    }
}

/// A URL as `sbx policy explain` takes it: `http(s)://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: HostName,
    pub port: u16,
    pub https: bool,
    pub path: String,
}

impl Target {
    pub fn parse_url(url: &str) -> Result<Target, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("URL '{url}' must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err("URLs with user information are not accepted".into());
        }
        let (name, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && !h.starts_with('[') => {
                (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("Bad port '{p}'"))?)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = HostName::parse(name).map_err(|e| e.to_string())?;
        Ok(Target { host, port, https, path })
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    const FILE: &str = r#"
        version = 1
        [[rule]]
        allow = "*.example.com"
        [[rule]]
        allow = "files.example.org"
        methods = ["GET"]
        [[rule]]
        deny = "bad.example.com"
        [[credential]]
        name = "corp"
        hosts = ["api.example.com", "*.corp.example"]
        header = "Authorization"
        scheme = "Bearer"
        env = "CORP_TOKEN"
    "#;

    #[test]
    fn credentials_and_method_path_rules_decide_what_is_terminated() {
        // With https = "passthrough" (opt-in), hosts with neither a
        // credential nor a method/path rule are spliced.
        let p = Policy::from_toml(&FILE.replace("version = 1", "version = 1\nhttps = \"passthrough\"")).unwrap();
        assert_eq!(p.https, Https::Passthrough);
        assert!(p.terminates(&host("api.example.com"), 443), "credential");
        assert!(p.terminates(&host("x.corp.example"), 443), "credential, wildcard");
        assert!(p.terminates(&host("files.example.org"), 443), "method rule");
        assert!(!p.terminates(&host("www.example.com"), 443), "neither: passthrough");
        let all = Policy::from_toml(&FILE.replace("version = 1", "version = 1\nhttps = \"terminate\"")).unwrap();
        assert!(all.terminates(&host("www.example.com"), 443));
        let p = Policy::from_toml(FILE).unwrap();
        let c = &p.credentials[0];
        assert_eq!(
            (c.name.as_str(), c.header.as_str(), c.scheme.as_deref()),
            ("corp", "authorization", Some("Bearer"))
        );
        assert_eq!(
            c.to_string(),
            "credential corp: hosts api.example.com,*.corp.example header authorization scheme Bearer"
        );
    }

    #[test]
    fn termination_is_the_default_and_passthrough_an_explicit_opt_in() {
        let p = Policy::from_toml(FILE).unwrap();
        assert_eq!(p.https, Https::Terminate);
        assert!(p.terminates(&host("www.example.com"), 443), "no credential, no L7 rule: terminated all the same");
        for agent in ["claude", "codex", "gemini", "shell"] {
            assert_eq!(Policy::for_agent(agent).unwrap().https, Https::Terminate, "{agent}");
        }
        for preset in ["locked", "balanced", "open"] {
            let p = Policy::preset(preset).unwrap();
            assert_eq!(p.https, Https::Terminate, "{preset}");
            assert!(p.terminates(&host("registry.npmjs.org"), 443), "{preset}");
        }
        // Per rule: its names on its ports are spliced; a credential or a
        // method/path rule still terminates.
        let text = format!(
            "{FILE}\n[[rule]]\nallow = \"pinned.example.com\"\nports = [443]\npassthrough = true\n[[rule]]\nallow = \"*.corp.example\"\npassthrough = true\n"
        );
        let p = Policy::from_toml(&text).unwrap();
        assert!(!p.terminates(&host("pinned.example.com"), 443));
        assert!(p.terminates(&host("www.example.com"), 443));
        assert!(p.terminates(&host("x.corp.example"), 443), "the credential wins");
        assert!(p.rules.iter().any(|r| r.to_string() == "rule 4: allow pinned.example.com ports 443 passthrough"));
        let err = |t: &str| Policy::from_toml(t).unwrap_err();
        assert!(matches!(
            err("version = 1\n[[rule]]\ndeny = \"a.com\"\npassthrough = true\n"),
            Error::PassthroughOnDeny(1)
        ));
        let narrowed = err("version = 1\n[[rule]]\nallow = \"a.com\"\nmethods = [\"GET\"]\npassthrough = true\n");
        assert!(matches!(narrowed, Error::PassthroughNarrowed(1)), "{narrowed}");
    }

    #[test]
    fn a_terminated_host_is_reachable_when_some_request_could_be_allowed() {
        let p = Policy::from_toml(FILE).unwrap();
        let r = |h: &str| p.reachable(&host(h), 443).action;
        assert_eq!(r("files.example.org"), Action::Allow, "a narrowed allow: each request decides");
        assert_eq!(r("api.example.com"), Action::Allow);
        assert_eq!(r("bad.example.com"), Action::Deny, "blanket deny");
        assert_eq!(r("nowhere.net"), Action::Deny, "default deny");
        let get = Request { host: &host("files.example.org"), port: 443, http: Some(("GET", "/")) };
        assert_eq!(p.decide(&get).action, Action::Allow, "HTTPS requests are decided like HTTP once terminated");
        let post = Request { host: &host("files.example.org"), port: 443, http: Some(("POST", "/")) };
        assert_eq!(p.decide(&post).action, Action::Deny);
    }

    #[test]
    fn agents_bring_their_credentials_and_files_override_them() {
        let claude = Policy::for_agent("claude").unwrap();
        let c = &claude.credentials[0];
        assert_eq!(
            (c.name.as_str(), c.header.as_str(), c.env.as_deref()),
            ("anthropic", "x-api-key", Some("ANTHROPIC_API_KEY"))
        );
        assert!(claude.terminates(&host("api.anthropic.com"), 443));
        let codex = &Policy::for_agent("codex").unwrap().credentials[0];
        assert_eq!((codex.header.as_str(), codex.scheme.as_deref()), ("authorization", Some("Bearer")));
        assert_eq!(Policy::for_agent("gemini").unwrap().credentials[0].header, "x-goog-api-key");
        assert!(Policy::for_agent("shell").unwrap().credentials.is_empty());
        let mut p = Policy::from_toml(
            "version = 1\n[[credential]]\nname = \"anthropic\"\nhosts = [\"proxy.example.com\"]\nheader = \"x-key\"\n",
        )
        .unwrap();
        p.add_agent("claude").unwrap();
        assert_eq!(p.credentials.len(), 1, "the file's credential of that name wins");
        assert_eq!(p.credentials[0].header, "x-key");
    }

    #[test]
    fn copilot_opencode_and_aider_reach_their_apis_with_their_keys() {
        let allowed = |agent: &str, h: &str| {
            let p = Policy::for_agent(agent).unwrap();
            let (h, port) = (HostName::parse(h).unwrap(), 443);
            p.decide(&Request { host: &h, port, http: None }).action == Action::Allow
        };
        for h in ["github.com", "api.github.com", "api.githubcopilot.com", "api.individual.githubcopilot.com"] {
            assert!(allowed("copilot", h), "copilot {h}");
        }
        assert!(!allowed("copilot", "copilot-telemetry.githubusercontent.com"), "no telemetry");
        assert!(!allowed("copilot", "api.anthropic.com"));
        for agent in ["opencode", "aider"] {
            assert!(allowed(agent, "api.anthropic.com") && allowed(agent, "api.openai.com"), "{agent}");
            assert!(allowed(agent, "pypi.org"), "{agent}: the registries, like every agent");
            assert!(!allowed(agent, "github.com"), "{agent}");
        }
        assert!(allowed("opencode", "models.dev") && !allowed("aider", "models.dev"));
        let copilot = Policy::for_agent("copilot").unwrap();
        let c = &copilot.credentials[0];
        assert_eq!(
            (c.name.as_str(), c.header.as_str(), c.scheme.as_deref(), c.env.as_deref()),
            ("github", "authorization", Some("Bearer"), Some("COPILOT_GITHUB_TOKEN"))
        );
        assert!(copilot.terminates(&host("api.github.com"), 443));
        assert!(copilot.terminates(&host("api.individual.githubcopilot.com"), 443));
        for agent in ["opencode", "aider"] {
            let p = Policy::for_agent(agent).unwrap();
            let names: Vec<_> = p.credentials.iter().map(|c| (c.name.as_str(), c.env.as_deref())).collect();
            assert_eq!(
                names,
                [("anthropic", Some("ANTHROPIC_API_KEY")), ("openai", Some("OPENAI_API_KEY"))],
                "{agent}"
            );
        }
    }

    #[test]
    fn bad_credentials_and_modes_name_the_problem() {
        let err = |t: &str| Policy::from_toml(t).unwrap_err().to_string();
        assert!(err("version = 1\nhttps = \"sometimes\"").contains("https mode"));
        let cred = |body: &str| format!("version = 1\n[[credential]]\n{body}\n");
        assert!(err(&cred("name = \"a\"\nhosts = [\"*\"]\nheader = \"x\"")).contains("every host"));
        assert!(err(&cred("name = \"a\"\nhosts = [\"a.com\"]\nheader = \"Host\"")).contains("frames or routes"));
        assert!(err(&cred("name = \"a\"\nhosts = [\"a.com\"]")).contains("Bad policy file"));
        let twice = format!(
            "{}[[credential]]\nname = \"a\"\nhosts = [\"b.com\"]\nheader = \"x\"\n",
            cred("name = \"a\"\nhosts = [\"a.com\"]\nheader = \"x\"")
        );
        assert!(err(&twice).contains("defined twice"));
    }
}
