//! Host side: the agent presets — what sbx knows of each agent `sbx run
//! AGENT` starts — read from data, `agents/presets.toml` at the
//! repository root (its header comments give the format), embedded here
//! at build time ([`EMBEDDED`]) and parsed once, strictly ([`embedded`]).
//! This module is the file's one reader: no agent's name or host is in
//! netstack's code.
//!
//! What each [`Preset`] holds and who uses it:
//! - [`AgentNetwork`]: the hosts it may reach, its credential bindings and
//!   its OAuth sign-in, if any: [`crate::policy::Policy::for_agent`] and
//!   [`crate::policy::Policy::add_agent`] build rules of origin
//!   [`Origin::Agent`] from them; [`crate::oauth::provider`] reads the
//!   sign-in;
//! - the rest (image, program, state directory, memory, environment):
//!   sbx's `agents` module. netstack checks it all the same, so that the
//!   file has one strict reader.
//!
//! The file is trusted (it is sbx's own, built in), but it is read as if
//! it were not: every key not in the format is refused
//! ([`Error::UnknownKey`], naming the agent and the key), every count and
//! length has a named limit (the `MAX_*` constants), every host goes
//! through [`Pattern::parse`] (names, never IP literals; `*` alone is
//! refused), every credential through [`CredentialRule::parse`], and each
//! refusal is its own [`enum@Error`] variant naming the agent. A bad embedded
//! file fails its unit test (`embedded_presets_are_todays_tables`) at
//! build time and, if shipped anyway, every [`embedded`] caller gets the
//! error: no agent starts, nothing is allowed.

use std::sync::OnceLock;

use serde::Deserialize;
use thiserror::Error;

use crate::credential::{self, CredentialRule, FileCredential};
use crate::host::HostName;
use crate::oauth::Provider;
use crate::policy::{Origin, Pattern};

/// The presets file, as built in.
pub const EMBEDDED: &str = include_str!("../../agents/presets.toml");

/// Largest presets file read, bytes.
pub const MAX_FILE: usize = 256 * 1024;
/// Most agents in a file.
pub const MAX_AGENTS: usize = 32;
/// Longest agent or image name.
pub const MAX_NAME: usize = 32;
/// Most hosts of one agent (`hosts`), and most `registries`.
pub const MAX_HOSTS: usize = 64;
/// Most credential bindings of one agent.
pub const MAX_CREDENTIALS: usize = 8;
/// Most environment settings of one agent.
pub const MAX_ENV: usize = 32;
/// Longest text value (a program, a path, an environment setting).
pub const MAX_TEXT: usize = 256;
/// Most guest memory an agent may ask for by default, MiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The keys of the file's top level.
pub const TOP_KEYS: &[&str] = &["registries", "agent"];
/// The keys of an `[[agent]]` table.
pub const AGENT_KEYS: &[&str] =
    &["name", "image", "program", "state_dir", "memory_mib", "env", "hosts", "registries", "credential", "oauth"];
/// The keys of `memory_mib`.
pub const MEMORY_KEYS: &[&str] = &["default", "min"];
/// The keys of an `[[agent.credential]]` table.
pub const CREDENTIAL_KEYS: &[&str] = &["name", "hosts", "header", "scheme", "env"];
/// The keys of an `[agent.oauth]` table.
pub const OAUTH_KEYS: &[&str] = &["api_hosts", "token_hosts", "token_path", "id_token", "credentials_file"];

/// The origin a preset's credentials are parsed with; [`Preset::credentials`]
/// gives them their agent's.
const PARSE_ORIGIN: Origin = Origin::Agent("agent preset");

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("agent presets: the file is {0} bytes, over the limit of {MAX_FILE}")]
    TooLarge(usize),
    #[error("agent presets: not TOML: {0}")]
    Toml(String),
    #[error("agent presets: unknown top-level key '{0}' (expected one of: registries, agent)")]
    UnknownTopKey(String),
    #[error("agent presets: 'agent' must be an array of tables ([[agent]])")]
    AgentsShape,
    #[error("agent presets: no [[agent]] tables")]
    NoAgents,
    #[error("agent presets: more than {MAX_AGENTS} agents")]
    TooManyAgents,
    #[error("agent presets: agent {0} has no name (give name = \"...\")")]
    Unnamed(usize),
    #[error("agent presets: agent name '{0}' must be 1 to {MAX_NAME} of a-z, 0-9 and '-', starting with a letter")]
    AgentName(String),
    #[error("agent presets: agent '{0}' is defined twice")]
    DuplicateAgent(String),
    #[error("agent presets: agent '{agent}': unknown key '{key}' (expected one of: {expected})")]
    UnknownKey { agent: String, key: String, expected: String },
    #[error("agent presets: agent '{agent}': {message}")]
    Shape { agent: String, message: String },
    #[error("agent presets: 'registries': {0}")]
    RegistriesShape(String),
    #[error("agent presets: agent '{agent}': image '{image}' must be 1 to {MAX_NAME} of a-z, 0-9 and '-'")]
    Image { agent: String, image: String },
    #[error(
        "agent presets: agent '{agent}': '{key}' must be 1 to {MAX_TEXT} characters, none of them control characters"
    )]
    Text { agent: String, key: String },
    #[error("agent presets: agent '{agent}': '{key}' has more than {max} entries")]
    TooMany { agent: String, key: String, max: usize },
    #[error("agent presets: agent '{agent}': '{key}': bad host '{host}': {reason}")]
    Host { agent: String, key: String, host: String, reason: String },
    #[error("agent presets: agent '{agent}': '{key}': '*' would allow every host; name the hosts")]
    AnyHost { agent: String, key: String },
    #[error("agent presets: 'registries': bad host '{host}': {reason}")]
    RegistryHost { host: String, reason: String },
    #[error("agent presets: more than {MAX_HOSTS} registries")]
    TooManyRegistries,
    #[error("agent presets: agent '{agent}': env entry '{entry}' must be KEY=value (KEY of A-Z, a-z, 0-9 and '_', not starting with a digit)")]
    Env { agent: String, entry: String },
    #[error("agent presets: agent '{agent}': memory_mib needs 0 < min <= default <= {MAX_MEMORY_MIB} (got default {default}, min {min})")]
    Memory { agent: String, default: u64, min: u64 },
    #[error("agent presets: agent '{agent}': {error}")]
    Credential { agent: String, error: credential::Error },
    #[error("agent presets: agent '{agent}': oauth token_path '{path}' must start with '/' and hold no '?' or '#'")]
    TokenPath { agent: String, path: String },
    #[error("agent presets: agent '{agent}': oauth '{key}' must list 1 to {MAX_HOSTS} hosts")]
    OAuthHosts { agent: String, key: String },
    #[error("agent presets: agent '{agent}': oauth credentials_file '{path}' must be a path below the home (relative, no '.' or '..' parts)")]
    CredentialsFile { agent: String, path: String },
}

/// The network part of a preset: what the agent needs to work at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentNetwork {
    /// Allowed on ports 80 and 443: the agent's own hosts, then, if it
    /// has `registries = true`, the file's registries.
    pub hosts: Vec<Pattern>,
    /// Its credential bindings, checked (origin: see [`Preset::credentials`]).
    pub credentials: Vec<CredentialRule>,
    /// Its subscription sign-in, if netstack handles one ([`crate::oauth`]).
    pub oauth: Option<Provider>,
}

/// One agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    pub name: String,
    /// The image in `target/sbx/images/` (`cargo xtask image NAME`).
    pub image: String,
    /// The program `sbx run NAME` starts; None: the image's shell.
    pub program: Option<String>,
    /// Its state on the sandbox's own disk, kept from run to run.
    pub state_dir: Option<String>,
    /// Guest memory by default and at the least, MiB.
    pub default_memory_mib: u64,
    pub min_memory_mib: u64,
    /// Settings in its environment, in file order.
    pub env: Vec<(String, String)>,
    pub network: AgentNetwork,
}

impl Preset {
    /// Its credential bindings with origin `agent NAME`.
    pub fn credentials(&'static self) -> Vec<CredentialRule> {
        let origin = Origin::Agent(self.name.as_str());
        self.network.credentials.iter().map(|c| CredentialRule { origin: origin.clone(), ..c.clone() }).collect()
    }
}

/// Every agent of a presets file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presets {
    pub agents: Vec<Preset>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMemory {
    default: u64,
    min: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOAuth {
    api_hosts: Vec<String>,
    token_hosts: Vec<String>,
    token_path: String,
    id_token: bool,
    credentials_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    name: String,
    image: String,
    program: Option<String>,
    state_dir: Option<String>,
    memory_mib: FileMemory,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    registries: bool,
    #[serde(default)]
    credential: Vec<FileCredential>,
    oauth: Option<FileOAuth>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT && !s.chars().any(char::is_control)
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_TEXT
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Refuses a key of `table` not in `allowed`; `prefix` names the table
/// (`credential.`) in the error.
fn check_keys(agent: &str, prefix: &str, table: &toml::Table, allowed: &[&str]) -> Result<(), Error> {
    match table.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Error::UnknownKey {
            agent: agent.to_string(),
            key: format!("{prefix}{k}"),
            expected: allowed.join(", "),
        }),
        None => Ok(()),
    }
}

/// Checks the keys of an agent's nested tables (where they are tables:
/// a wrong type is the deserializer's refusal).
fn check_agent_keys(agent: &str, table: &toml::Table) -> Result<(), Error> {
    check_keys(agent, "", table, AGENT_KEYS)?;
    if let Some(toml::Value::Table(m)) = table.get("memory_mib") {
        check_keys(agent, "memory_mib.", m, MEMORY_KEYS)?;
    }
    if let Some(toml::Value::Table(o)) = table.get("oauth") {
        check_keys(agent, "oauth.", o, OAUTH_KEYS)?;
    }
    if let Some(toml::Value::Array(creds)) = table.get("credential") {
        for c in creds {
            if let toml::Value::Table(c) = c {
                check_keys(agent, "credential.", c, CREDENTIAL_KEYS)?;
            }
        }
    }
    Ok(())
}

fn host_patterns(agent: &str, key: &str, raw: &[String]) -> Result<Vec<Pattern>, Error> {
    if raw.len() > MAX_HOSTS {
        return Err(Error::TooMany { agent: agent.to_string(), key: key.to_string(), max: MAX_HOSTS });
    }
    raw.iter()
        .map(|h| match Pattern::parse(h) {
            Ok(Pattern::Any) => Err(Error::AnyHost { agent: agent.to_string(), key: key.to_string() }),
            Ok(p) => Ok(p),
            Err(e) => Err(Error::Host {
                agent: agent.to_string(),
                key: key.to_string(),
                host: h.clone(),
                reason: e.to_string(),
            }),
        })
        .collect()
}

fn oauth_hosts(agent: &str, key: &str, raw: &[String]) -> Result<Vec<HostName>, Error> {
    if raw.is_empty() || raw.len() > MAX_HOSTS {
        return Err(Error::OAuthHosts { agent: agent.to_string(), key: format!("oauth.{key}") });
    }
    raw.iter()
        .map(|h| {
            HostName::parse(h).map_err(|e| Error::Host {
                agent: agent.to_string(),
                key: format!("oauth.{key}"),
                host: h.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn oauth(agent: &str, o: FileOAuth) -> Result<Provider, Error> {
    let api_hosts = oauth_hosts(agent, "api_hosts", &o.api_hosts)?;
    let token_hosts = oauth_hosts(agent, "token_hosts", &o.token_hosts)?;
    let p = &o.token_path;
    if !valid_text(p) || !p.starts_with('/') || p.contains(['?', '#']) {
        return Err(Error::TokenPath { agent: agent.to_string(), path: p.clone() });
    }
    let f = &o.credentials_file;
    let below_home = valid_text(f)
        && !f.starts_with('/')
        && f.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if !below_home {
        return Err(Error::CredentialsFile { agent: agent.to_string(), path: f.clone() });
    }
    Ok(Provider {
        agent: agent.to_string(),
        api_hosts,
        token_hosts,
        token_path: o.token_path,
        id_token: o.id_token,
        credentials_file: o.credentials_file,
    })
}

fn agent(a: FileAgent, registries: &[Pattern]) -> Result<Preset, Error> {
    let name = a.name;
    if !valid_name(&a.image) {
        return Err(Error::Image { agent: name, image: a.image });
    }
    for (key, value) in [("program", &a.program), ("state_dir", &a.state_dir)] {
        if value.as_deref().is_some_and(|v| !valid_text(v)) {
            return Err(Error::Text { agent: name, key: key.to_string() });
        }
    }
    let m = a.memory_mib;
    if m.min == 0 || m.min > m.default || m.default > MAX_MEMORY_MIB {
        return Err(Error::Memory { agent: name, default: m.default, min: m.min });
    }
    if a.env.len() > MAX_ENV {
        return Err(Error::TooMany { agent: name, key: "env".into(), max: MAX_ENV });
    }
    let mut env = Vec::new();
    for entry in a.env {
        match entry.split_once('=') {
            Some((k, v)) if valid_env_key(k) && v.len() <= MAX_TEXT && !v.chars().any(char::is_control) => {
                env.push((k.to_string(), v.to_string()))
            }
            _ => return Err(Error::Env { agent: name, entry }),
        }
    }
    let mut hosts = host_patterns(&name, "hosts", &a.hosts)?;
    if a.registries {
        hosts.extend(registries.iter().cloned());
    }
    if a.credential.len() > MAX_CREDENTIALS {
        return Err(Error::TooMany { agent: name, key: "credential".into(), max: MAX_CREDENTIALS });
    }
    let mut credentials: Vec<CredentialRule> = Vec::new();
    for raw in a.credential {
        let c = CredentialRule::parse(raw, PARSE_ORIGIN)
            .map_err(|error| Error::Credential { agent: name.clone(), error })?;
        if credentials.iter().any(|have| have.name == c.name) {
            return Err(Error::Credential { agent: name, error: credential::Error::Duplicate(c.name) });
        }
        credentials.push(c);
    }
    let oauth = a.oauth.map(|o| oauth(&name, o)).transpose()?;
    Ok(Preset {
        name,
        image: a.image,
        program: a.program,
        state_dir: a.state_dir,
        default_memory_mib: m.default,
        min_memory_mib: m.min,
        env,
        network: AgentNetwork { hosts, credentials, oauth },
    })
}

impl Presets {
    /// Parses and checks a presets file (the format: `agents/presets.toml`).
    pub fn parse(text: &str) -> Result<Presets, Error> {
        if text.len() > MAX_FILE {
            return Err(Error::TooLarge(text.len()));
        }
        let mut top: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Toml(e.to_string()))?;
        if let Some(k) = top.keys().find(|k| !TOP_KEYS.contains(&k.as_str())) {
            return Err(Error::UnknownTopKey(k.clone()));
        }
        let raw_registries: Vec<String> = match top.remove("registries") {
            None => Vec::new(),
            Some(v) => v.try_into().map_err(|e: toml::de::Error| Error::RegistriesShape(e.message().to_string()))?,
        };
        if raw_registries.len() > MAX_HOSTS {
            return Err(Error::TooManyRegistries);
        }
        let mut registries = Vec::new();
        for h in &raw_registries {
            match Pattern::parse(h) {
                Ok(Pattern::Any) => {
                    return Err(Error::RegistryHost { host: h.clone(), reason: "'*' would allow every host".into() })
                }
                Ok(p) => registries.push(p),
                Err(e) => return Err(Error::RegistryHost { host: h.clone(), reason: e.to_string() }),
            }
        }
        let tables = match top.remove("agent") {
            None => return Err(Error::NoAgents),
            Some(toml::Value::Array(a)) => a,
            Some(_) => return Err(Error::AgentsShape),
        };
        if tables.is_empty() {
            return Err(Error::NoAgents);
        }
        if tables.len() > MAX_AGENTS {
            return Err(Error::TooManyAgents);
        }
        let mut agents: Vec<Preset> = Vec::new();
        for (i, t) in tables.into_iter().enumerate() {
            let toml::Value::Table(table) = t else { return Err(Error::AgentsShape) };
            let name = match table.get("name") {
                Some(toml::Value::String(s)) => s.clone(),
                _ => return Err(Error::Unnamed(i + 1)),
            };
            if !valid_name(&name) {
                return Err(Error::AgentName(name));
            }
            if agents.iter().any(|a| a.name == name) {
                return Err(Error::DuplicateAgent(name));
            }
            check_agent_keys(&name, &table)?;
            let file: FileAgent = toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Shape { agent: name.clone(), message: e.message().to_string() })?;
            agents.push(agent(file, &registries)?);
        }
        Ok(Presets { agents })
    }

    /// The agent called `name`.
    pub fn find(&self, name: &str) -> Option<&Preset> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// The agents' names, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.agents.iter().map(|a| a.name.as_str()).collect()
    }
}

static PRESETS: OnceLock<Result<Presets, Error>> = OnceLock::new();

/// The built-in presets ([`EMBEDDED`]), parsed on first use.
pub fn embedded() -> Result<&'static Presets, &'static Error> {
    PRESETS.get_or_init(|| Presets::parse(EMBEDDED)).as_ref()
}

/// The built-in agent called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    embedded().ok()?.find(name)
}

#[cfg(test)]
mod tests;
