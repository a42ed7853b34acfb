//! Host side: the credentials sbx keeps for sandboxes (`sbx secret`) and
//! the per-installation CA netstack terminates TLS with. Both live in
//! sbx's config folder ([`config_dir`], 0700), never in a sandbox: a
//! secret is a 0600 file holding its value, or the name of an environment
//! variable to read at `sbx run` time; the CA is `ca/ca.pem` (public, what
//! guests trust) and `ca/ca-key.pem` (0600). At `sbx run` each credential
//! the policy binds gets a fresh random placeholder, which is all the
//! guest sees ([`for_run`]); netstack swaps in the value on the way out.
//!
//! Governance:
//! - Scope ([`Scope`]): a secret is global (every run), or for one
//!   workspace (the run's canonical workspace path equal to the one
//!   stored: not its parents, not its subfolders) or one sandbox (by
//!   name). For one name, the most specific scope that matches the run
//!   wins: sandbox, then workspace, then global ([`lookup`]). A run whose
//!   workspace and sandbox match no scope of a name does not get it.
//! - Lifetime: a secret may expire (`--expires`, [`parse_expires`]). A
//!   run that would use a secret expiring within [`EXPIRY_WARNING_SECS`]
//!   says so; one that would use an expired secret is refused
//!   ([`Error::Expired`]), naming the cure, `sbx secret rotate NAME`.
//!   [`rotate`] replaces the value at once (one atomic rename), keeping the
//!   scope, and the lifetime's length unless a new expiry is given.
//! - Every change (set, rotate, rm) is appended to a host-side hash-chained
//!   log, `secrets-audit.log` in the config folder ([`SECRETS_AUDIT_LOG`],
//!   written by the `audit` crate, so `sbx audit verify FILE` checks it):
//!   name, action, scope, source kind, expiry; never a value.
//!
//! On disk, `secrets/NAME` is a global secret and `secrets/NAME@…` a
//! scoped one: a file's first two lines are as they always were (magic,
//! `value V` or `env VAR`), metadata lines follow (`scope workspace DIR`,
//! `scope sandbox NAME`, `expires SECS`, `rotated SECS`). Files without
//! them, as earlier versions wrote, load as global secrets that never
//! expire; earlier versions skip the scoped files (their names are not
//! secret names). The scope in a file is checked against its name: a
//! scoped file renamed to another scope's name is refused.
//!
//! Not here: the machine's admin policy; OAuth secrets (subscription
//! sign-ins, refreshed by netstack) are [`crate::oauth_secrets`].

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use netstack::ca::Authority;
use netstack::credential::{self, Credential, CredentialRule, Credentials, Secret};
use sha2::Digest;
use thiserror::Error;

const SECRET_MAGIC: &str = "sbx-secret 1";
/// Largest secret file read.
const MAX_SECRET_FILE: u64 = 8 * 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Bad secret name '{0}': 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit")]
    Name(String),
    #[error("Bad environment variable name '{0}'")]
    EnvName(String),
    #[error("No secret named '{0}' (see `sbx secret ls`)")]
    NotFound(String),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("{0} is readable by others (mode {1:o}): fix it with chmod 600")]
    Exposed(PathBuf, u32),
    #[error("{0} is not a secret file sbx wrote")]
    Corrupt(PathBuf),
    #[error("Cannot read the secret: {0}")]
    Input(io::Error),
    #[error(transparent)]
    Secret(#[from] credential::Error),
    #[error("The CA in {0}: {1}")]
    Ca(PathBuf, netstack::ca::Error),
    #[error("Secret '{name}' is to come from ${var}, which is not set")]
    Unset { name: String, var: String },
    #[error("Bad --scope '{0}': {1}")]
    Scope(String, String),
    #[error("Bad --expires '{0}': {1}")]
    Expires(String, String),
    #[error("Secret '{name}' ({scope}) expired on {when}: give it a new value with `sbx secret rotate {name}`")]
    Expired { name: String, scope: String, when: String },
    #[error("Secret '{name}' comes from ${var}: change the variable, or store a value with `sbx secret set {name}`")]
    RotateEnv { name: String, var: String },
    #[error("The secrets' audit log {0}: {1}")]
    Audit(PathBuf, String),
}

/// sbx's config folder: $SBX_CONFIG, else $XDG_CONFIG_HOME/sbx, else
/// ~/.config/sbx.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SBX_CONFIG") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(d).join("sbx");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".config/sbx")
}

/// Makes `dir` (and its parents) with mode 0700 for the last one.
pub(crate) fn private_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::Io(dir.to_path_buf(), e))
}

/// Writes `text` to `path` as a new 0600 file, replacing it atomically.
pub(crate) fn write_private(path: &Path, text: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let io = |e| Error::Io(tmp.clone(), e);
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(text).and_then(|_| f.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

/// Reads a file that must be private (no group or other access).
pub(crate) fn read_private(path: &Path, limit: u64) -> Result<String, Error> {
    let io = |e| Error::Io(path.to_path_buf(), e);
    let f = fs::File::open(path).map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Exposed(path.to_path_buf(), mode));
    }
    let mut text = String::new();
    f.take(limit).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

// ---- The CA ----

/// The installation's CA: loaded from `dir/ca/`, or made there the first
/// time (key 0600).
pub fn authority(dir: &Path) -> Result<Authority, Error> {
    let ca_dir = dir.join("ca");
    let (cert_path, key_path) = (ca_dir.join("ca.pem"), ca_dir.join("ca-key.pem"));
    if key_path.exists() {
        let key = read_private(&key_path, netstack::ca::MAX_PEM as u64 + 1)?;
        let cert = fs::read_to_string(&cert_path).map_err(|e| Error::Io(cert_path.clone(), e))?;
        return Authority::from_pem(&cert, &key).map_err(|e| Error::Ca(ca_dir, e));
    }
    private_dir(dir)?;
    private_dir(&ca_dir)?;
    let ca = Authority::generate().map_err(|e| Error::Ca(ca_dir.clone(), e))?;
    write_private(&key_path, zeroize::Zeroizing::new(ca.key_pem()).as_bytes())?;
    fs::write(&cert_path, ca.cert_pem()).map_err(|e| Error::Io(cert_path.clone(), e))?;
    Ok(ca)
}

// ---- Secrets ----

/// Where a secret's value comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Stored (0600).
    Value(Secret),
    /// Read from this environment variable at `sbx run`.
    Env(String),
}

/// Which runs get a secret (see the module's notes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    /// Runs whose workspace is this folder (canonical).
    Workspace(PathBuf),
    /// Runs of this sandbox.
    Sandbox(String),
}

impl Scope {
    /// `global`, `workspace`, `workspace=DIR` (canonicalised; the current
    /// folder without DIR) or `sandbox=NAME`.
    pub fn parse(text: &str) -> Result<Scope, Error> {
        let bad = |why: &str| Error::Scope(text.to_string(), why.to_string());
        let (kind, arg) = match text.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (text, None),
        };
        match (kind, arg) {
            ("global", None) => Ok(Scope::Global),
            ("workspace", arg) => {
                let dir = match arg {
                    Some(d) if !d.is_empty() => PathBuf::from(d),
                    Some(_) => return Err(bad("give a folder after 'workspace='")),
                    None => std::env::current_dir().map_err(|e| bad(&e.to_string()))?,
                };
                let dir = dir.canonicalize().map_err(|e| bad(&format!("{}: {e}", dir.display())))?;
                if dir.to_str().is_none_or(|d| d.contains('\n')) {
                    return Err(bad("the folder's path is not UTF-8 or holds a line end"));
                }
                Ok(Scope::Workspace(dir))
            }
            ("sandbox", Some(name)) if crate::sandbox::valid_name(name) => Ok(Scope::Sandbox(name.to_string())),
            ("sandbox", _) => Err(bad("give a sandbox name after 'sandbox=' (see `sbx ls`)")),
            _ => Err(bad("expected global, workspace[=DIR] or sandbox=NAME")),
        }
    }

    /// What the file of secret `name` in this scope is called.
    fn file_name(&self, name: &str) -> String {
        match self {
            Scope::Global => name.to_string(),
            Scope::Workspace(dir) => {
                let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("{name}@workspace-{hex}")
            }
            Scope::Sandbox(sb) => format!("{name}@sandbox-{sb}"),
        }
    }

    /// Whether a run of sandbox `sandbox` on `workspace` gets it.
    pub fn matches(&self, run: &RunScope) -> bool {
        match self {
            Scope::Global => true,
            Scope::Workspace(dir) => *dir == run.workspace,
            Scope::Sandbox(sb) => *sb == run.sandbox,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => write!(f, "global"),
            Scope::Workspace(dir) => write!(f, "workspace={}", dir.display()),
            Scope::Sandbox(sb) => write!(f, "sandbox={sb}"),
        }
    }
}

/// What a run is, for picking the secrets it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunScope {
    /// The workspace, canonical.
    pub workspace: PathBuf,
    pub sandbox: String,
}

/// A stored secret: its source and its governance.
#[derive(Debug, Clone)]
pub struct Stored {
    pub source: Source,
    pub scope: Scope,
    /// Unix seconds after which runs are refused it.
    pub expires: Option<u64>,
    /// Unix seconds of the last set or rotation (None: written by an
    /// earlier version).
    pub rotated: Option<u64>,
}

/// Seconds before expiry from which `sbx run` warns.
pub const EXPIRY_WARNING_SECS: u64 = 7 * 86_400;
/// The host-side log of changes to secrets, in the config folder.
pub const SECRETS_AUDIT_LOG: &str = "secrets-audit.log";
/// Longest lifetime `--expires` takes (days).
const MAX_LIFETIME_DAYS: u64 = 100 * 366;

fn secrets_dir(dir: &Path) -> PathBuf {
    dir.join("secrets")
}

fn check_name(name: &str) -> Result<(), Error> {
    if credential::valid_name(name) {
        Ok(())
    } else {
        Err(Error::Name(name.to_string()))
    }
}

fn valid_env_name(v: &str) -> bool {
    !v.is_empty() && !v.as_bytes()[0].is_ascii_digit() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Stores secret `name` (global, no expiry).
pub fn set(dir: &Path, name: &str, source: &Source) -> Result<(), Error> {
    let stored = Stored { source: source.clone(), scope: Scope::Global, expires: None, rotated: None };
    store(dir, name, &stored)
}

/// Stores secret `name` as `stored` says, replacing the one of its scope.
pub fn store(dir: &Path, name: &str, stored: &Stored) -> Result<(), Error> {
    check_name(name)?;
    let mut body = zeroize::Zeroizing::new(match &stored.source {
        Source::Value(s) => format!("{SECRET_MAGIC}\nvalue {}\n", s.expose()),
        Source::Env(var) if valid_env_name(var) => format!("{SECRET_MAGIC}\nenv {var}\n"),
        Source::Env(var) => return Err(Error::EnvName(var.clone())),
    });
    match &stored.scope {
        Scope::Global => {}
        // UTF-8 without line ends: checked by Scope::parse.
        Scope::Workspace(d) => body.push_str(&format!("scope workspace {}\n", d.display())),
        Scope::Sandbox(sb) => body.push_str(&format!("scope sandbox {sb}\n")),
    }
    if let Some(t) = stored.expires {
        body.push_str(&format!("expires {t}\n"));
    }
    if let Some(t) = stored.rotated {
        body.push_str(&format!("rotated {t}\n"));
    }
    private_dir(dir)?;
    private_dir(&secrets_dir(dir))?;
    write_private(&secrets_dir(dir).join(stored.scope.file_name(name)), body.as_bytes())
}

/// Reads global secret `name`'s source.
pub fn get(dir: &Path, name: &str) -> Result<Source, Error> {
    Ok(get_scoped(dir, name, &Scope::Global)?.source)
}

/// Reads secret `name` of `scope`.
pub fn get_scoped(dir: &Path, name: &str, scope: &Scope) -> Result<Stored, Error> {
    check_name(name)?;
    let path = secrets_dir(dir).join(scope.file_name(name));
    if !path.is_file() {
        return Err(Error::NotFound(name.to_string()));
    }
    let stored = read_file(&path)?;
    if stored.scope != *scope {
        return Err(Error::Corrupt(path));
    }
    Ok(stored)
}

/// Parses a secret file.
fn read_file(path: &Path) -> Result<Stored, Error> {
    let text = zeroize::Zeroizing::new(read_private(path, MAX_SECRET_FILE)?);
    let mut lines = text.lines();
    let corrupt = || Error::Corrupt(path.to_path_buf());
    if lines.next() != Some(SECRET_MAGIC) {
        return Err(corrupt());
    }
    let source = match lines.next().and_then(|l| l.split_once(' ')) {
        Some(("value", v)) => Source::Value(Secret::new(v)?),
        Some(("env", v)) if valid_env_name(v) => Source::Env(v.to_string()),
        _ => return Err(corrupt()),
    };
    let mut stored = Stored { source, scope: Scope::Global, expires: None, rotated: None };
    for line in lines {
        match line.split_once(' ') {
            Some(("scope", rest)) => {
                stored.scope = match rest.split_once(' ') {
                    Some(("workspace", d)) if d.starts_with('/') => Scope::Workspace(PathBuf::from(d)),
                    Some(("sandbox", sb)) if crate::sandbox::valid_name(sb) => Scope::Sandbox(sb.to_string()),
                    _ => return Err(corrupt()),
                }
            }
            Some(("expires", t)) => stored.expires = Some(t.parse().map_err(|_| corrupt())?),
            Some(("rotated", t)) => stored.rotated = Some(t.parse().map_err(|_| corrupt())?),
            _ => return Err(corrupt()),
        }
    }
    Ok(stored)
}

/// Removes global secret `name`.
pub fn remove(dir: &Path, name: &str) -> Result<(), Error> {
    remove_scoped(dir, name, &Scope::Global)
}

/// Removes secret `name` of `scope`.
pub fn remove_scoped(dir: &Path, name: &str, scope: &Scope) -> Result<(), Error> {
    check_name(name)?;
    let path = secrets_dir(dir).join(scope.file_name(name));
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(name.to_string())),
        r => r.map_err(|e| Error::Io(path, e)),
    }
}

/// Replaces secret `name`'s value (of `scope`) with `value` at `now`:
/// the scope kept, `expires` if given, else the same lifetime as before
/// from now (none if it had none). Returns the new entry.
pub fn rotate(
    dir: &Path,
    name: &str,
    scope: &Scope,
    value: Secret,
    expires: Option<u64>,
    now: u64,
) -> Result<Stored, Error> {
    let old = get_scoped(dir, name, scope)?;
    if let Source::Env(var) = &old.source {
        return Err(Error::RotateEnv { name: name.to_string(), var: var.clone() });
    }
    let expires = expires.or_else(|| {
        let lifetime = old.expires?.saturating_sub(old.rotated.unwrap_or(now).min(old.expires?));
        Some(now.saturating_add(lifetime.max(1)))
    });
    let new = Stored { source: Source::Value(value), scope: old.scope, expires, rotated: Some(now) };
    store(dir, name, &new)?;
    Ok(new)
}

/// One line of `sbx secret ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// "stored", "$VAR", or "unreadable: why".
    pub from: String,
    /// The scope as [`Scope`] shows it ("?" if unreadable).
    pub scope: String,
    pub expires: Option<u64>,
    pub rotated: Option<u64>,
}

/// The stored secrets, sorted by name then scope; never a value.
pub fn list(dir: &Path) -> Result<Vec<Listed>, Error> {
    let d = secrets_dir(dir);
    let entries = match fs::read_dir(&d) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|e| Error::Io(d.clone(), e))?,
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(file) = entry.file_name().to_str().map(str::to_string) else { continue };
        let name = file.split_once('@').map_or(file.as_str(), |(n, _)| n).to_string();
        if !credential::valid_name(&name) || file.ends_with(".tmp") {
            continue;
        }
        let listed = match read_file(&entry.path()) {
            Ok(s) if s.scope.file_name(&name) != file => {
                Listed { from: "unreadable: its scope is not its file's".into(), scope: "?".into(), ..blank(&name) }
            }
            Ok(s) => Listed {
                name: name.clone(),
                from: match &s.source {
                    Source::Value(_) => "stored".to_string(),
                    Source::Env(var) => format!("${var}"),
                },
                scope: s.scope.to_string(),
                expires: s.expires,
                rotated: s.rotated,
            },
            Err(e) => Listed { from: format!("unreadable: {e}"), scope: "?".into(), ..blank(&name) },
        };
        out.push(listed);
    }
    out.sort_by(|a, b| (&a.name, &a.scope).cmp(&(&b.name, &b.scope)));
    Ok(out)
}

fn blank(name: &str) -> Listed {
    Listed { name: name.to_string(), from: String::new(), scope: String::new(), expires: None, rotated: None }
}

/// The secret of `name` a run gets: the most specific scope that matches
/// (sandbox, workspace, global), with the scope it came from.
pub fn lookup(dir: &Path, name: &str, run: &RunScope) -> Result<Option<Stored>, Error> {
    let scopes = [Scope::Sandbox(run.sandbox.clone()), Scope::Workspace(run.workspace.clone()), Scope::Global];
    for scope in scopes {
        if !crate::sandbox::valid_name(&run.sandbox) && matches!(scope, Scope::Sandbox(_)) {
            continue;
        }
        match get_scoped(dir, name, &scope) {
            Ok(s) => return Ok(Some(s)),
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The value of a source, now.
fn resolve(name: &str, source: Source) -> Result<Secret, Error> {
    match source {
        Source::Value(s) => Ok(s),
        Source::Env(var) => match std::env::var(&var) {
            Ok(v) => Ok(Secret::new(&v)?),
            Err(_) => Err(Error::Unset { name: name.to_string(), var }),
        },
    }
}

/// What a run gets: the credentials netstack injects (one fresh
/// placeholder each), the guest environment (placeholders; real values
/// only for the credentials named in `expose`), and notes for the user
/// (credentials the policy binds whose secret is unknown, secrets that
/// expire soon).
pub struct ForRun {
    pub credentials: Credentials,
    pub guest_env: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Binds each of `rules` to its stored secret for the run `run` at unix
/// time `now` (see [`lookup`]); refuses an expired one. `expose`:
/// credentials whose real value is put in the guest's environment instead
/// (no injection).
pub fn for_run(
    dir: &Path,
    rules: &[CredentialRule],
    expose: &[String],
    run: &RunScope,
    now: u64,
) -> Result<ForRun, Error> {
    let mut list = Vec::new();
    let mut guest_env = Vec::new();
    let mut notes = Vec::new();
    for name in expose {
        check_name(name)?;
        if !rules.iter().any(|r| &r.name == name) {
            notes.push(format!("--expose-secret-to-guest {name}: no credential of that name in the policy"));
        }
    }
    for rule in rules {
        let Some(stored) = lookup(dir, &rule.name, run)? else {
            notes.push(format!(
                "no secret '{}' for this sandbox and workspace (for {}): `sbx secret set {}` to have netstack add it",
                rule.name,
                rule.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "),
                rule.name
            ));
            continue;
        };
        if let Some(expires) = stored.expires {
            if now >= expires {
                return Err(Error::Expired {
                    name: rule.name.clone(),
                    scope: stored.scope.to_string(),
                    when: format_utc(expires),
                });
            }
            if expires - now <= EXPIRY_WARNING_SECS {
                notes.push(format!(
                    "secret '{}' ({}) expires on {} (in {}): `sbx secret rotate {}` before then",
                    rule.name,
                    stored.scope,
                    format_utc(expires),
                    format_span(expires - now),
                    rule.name
                ));
            }
        }
        let secret = resolve(&rule.name, stored.source)?;
        if expose.contains(&rule.name) {
            if let Some(var) = &rule.env {
                guest_env.push((var.clone(), secret.expose().to_string()));
            }
            notes.push(format!("secret '{}' is in the guest's environment: the agent can read and leak it", rule.name));
            continue;
        }
        let placeholder = credential::new_placeholder(&rule.name)?;
        list.push(Credential::new(rule.clone(), placeholder, secret));
    }
    let credentials = Credentials::new(list);
    guest_env.extend(credentials.guest_env());
    Ok(ForRun { credentials, guest_env, notes })
}

// ---- Time ----

/// Unix seconds now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds as RFC 3339 UTC: `2025-01-31T12:00:00Z`.
pub fn format_utc(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

/// A span of seconds, roughly: "3 days", "5 hours", "12 minutes".
fn format_span(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s.div_ceil(60)),
    }
}

/// An RFC 3339 date (`2025-01-31`, midnight UTC) or date-time
/// (`2025-01-31T12:00:00Z`, `…+02:00`), as unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let num = |s: &str| -> Option<u32> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten() };
    let (date, time) = match text.find(['T', 't', ' ']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d) = (num(y)? as i64, num(m)?, num(d)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m) || d == 0 || d > month_days[m as usize - 1] {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(time) = time {
        let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
            Some(i) => (&time[..i], &time[i..]),
            None => return None,
        };
        let clock = clock.split_once('.').map_or(clock, |(c, _)| c);
        let mut hms = clock.split(':');
        let (h, mi, s) = (num(hms.next()?)?, num(hms.next()?)?, num(hms.next()?)?);
        if hms.next().is_some() || h > 23 || mi > 59 || s > 60 {
            return None;
        }
        secs += i64::from(h * 3600 + mi * 60 + s);
        let off = match offset {
            "Z" | "z" => 0,
            o => {
                let (oh, om) = o[1..].split_once(':')?;
                let (oh, om) = (num(oh)?, num(om)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                let v = i64::from(oh * 3600 + om * 60);
                if o.starts_with('-') {
                    -v
                } else {
                    v
                }
            }
        };
        secs -= off;
    }
    u64::try_from(secs).ok()
}

/// `--expires`: an RFC 3339 date or date-time, or `N` days (`30d`) or
/// hours (`12h`) from `now`; unix seconds, after `now`.
pub fn parse_expires(text: &str, now: u64) -> Result<u64, Error> {
    let bad = |why: &str| Error::Expires(text.to_string(), why.to_string());
    let relative = |n: &str, unit: u64| -> Result<u64, Error> {
        let n: u64 = n.parse().map_err(|_| bad("not a number"))?;
        if n == 0 || n.saturating_mul(unit) > MAX_LIFETIME_DAYS * 86_400 {
            return Err(bad(&format!("give 1 to {MAX_LIFETIME_DAYS} days")));
        }
        Ok(now + n * unit)
    };
    let at = if let Some(n) = text.strip_suffix('d') {
        relative(n, 86_400)?
    } else if let Some(n) = text.strip_suffix('h') {
        relative(n, 3600)?
    } else {
        parse_rfc3339(text)
            .ok_or_else(|| bad("expected an RFC 3339 date (2025-01-31, 2025-01-31T12:00:00Z) or 30d, 12h"))?
    };
    if at <= now {
        return Err(bad("that is not in the future"));
    }
    Ok(at)
}

// ---- The secrets' audit log ----

/// Appends `event` to the config folder's hash-chained secrets log
/// ([`SECRETS_AUDIT_LOG`], 0600), continuing its chain (a torn tail cut,
/// a broken chain kept aside, as for a sandbox's log).
pub fn audit_change(dir: &Path, event: &serde_json::Value, now_ms: u64) -> Result<(), Error> {
    private_dir(dir)?;
    let path = dir.join(SECRETS_AUDIT_LOG);
    let audit = |e: audit::Error| Error::Audit(path.clone(), e.to_string());
    let rotation = audit::Rotation::default();
    let mut opened = audit::open(&path, rotation, now_ms, |f| f).map_err(audit)?;
    for note in &opened.notes {
        eprintln!("sbx: {note}");
    }
    for file in [path.clone(), audit::evidence_path(&path)] {
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).map_err(|e| Error::Io(file.clone(), e))?;
    }
    opened.log.record(&audit::Event::Untyped(event.clone()), now_ms).map_err(audit)?;
    opened.log.flush_suppressed(now_ms).map_err(audit)
}

/// The secrets log's line for a change (never the value).
fn change_event(action: &str, name: &str, stored: Option<&Stored>, scope: &Scope) -> serde_json::Value {
    serde_json::json!({
        "event": "secret",
        "action": action,
        "name": name,
        "scope": scope.to_string(),
        "source": stored.map(|s| match &s.source { Source::Value(_) => "stored".to_string(), Source::Env(v) => format!("${v}") }),
        "expires": stored.and_then(|s| s.expires).map(format_utc),
    })
}

// ---- `sbx secret` ----

/// The hosts each secret is bound to: by the agents' defaults and by the
/// policy file, if given.
fn bindings(policy: Option<&Path>) -> Result<Vec<CredentialRule>, Box<dyn std::error::Error>> {
    let mut rules = Vec::new();
    for agent in crate::agents::names() {
        rules.extend(netstack::policy::agent_credentials(agent));
    }
    if let Some(path) = policy {
        rules.extend(crate::policy_doc::SandboxPolicy::read(path)?.network.credentials);
    }
    Ok(rules)
}

/// `sbx secret set|rotate|ls|rm`.
pub fn command(cmd: &crate::cli::SecretCommand) -> Result<(), Box<dyn std::error::Error>> {
    use crate::cli::SecretCommand;
    let dir = config_dir();
    let now = now_unix();
    let now_ms = crate::sandbox::now_unix_ms();
    match cmd {
        SecretCommand::Set { name, from_env, scope, expires } => {
            check_name(name)?;
            let scope = Scope::parse(scope)?;
            let expires = expires.as_deref().map(|e| parse_expires(e, now)).transpose()?;
            let source = match from_env {
                Some(var) => Source::Env(var.clone()),
                None => Source::Value(read_secret(name)?),
            };
            let stored = Stored { source, scope: scope.clone(), expires, rotated: Some(now) };
            store(&dir, name, &stored)?;
            audit_change(&dir, &change_event("set", name, Some(&stored), &scope), now_ms)?;
            eprintln!("sbx: secret '{name}' ({scope}) stored in {}", secrets_dir(&dir).display());
        }
        SecretCommand::Rotate { name, scope, expires } => {
            check_name(name)?;
            let scope = Scope::parse(scope)?;
            // Before asking for a value: the secret must be there.
            get_scoped(&dir, name, &scope)?;
            let expires = expires.as_deref().map(|e| parse_expires(e, now)).transpose()?;
            let stored = rotate(&dir, name, &scope, read_secret(name)?, expires, now)?;
            audit_change(&dir, &change_event("rotate", name, Some(&stored), &scope), now_ms)?;
            let until = stored.expires.map(|e| format!(", expires {}", format_utc(e))).unwrap_or_default();
            eprintln!("sbx: secret '{name}' ({scope}) rotated{until}; the old value is gone");
        }
        SecretCommand::Ls { policy } => {
            let rules = bindings(policy.as_deref())?;
            for s in list(&dir)? {
                let bound: Vec<String> = rules
                    .iter()
                    .filter(|r| r.name == s.name)
                    .map(|r| {
                        let hosts: Vec<String> = r.hosts.iter().map(|h| h.to_string()).collect();
                        let origin = match &r.origin {
                            netstack::policy::Origin::Agent(a) => format!("agent {a}"),
                            _ => "policy".to_string(),
                        };
                        format!("{} in {} ({origin})", hosts.join(","), r.header)
                    })
                    .collect();
                let bound = if bound.is_empty() { "bound to no host".to_string() } else { bound.join("; ") };
                let expires = match s.expires {
                    Some(t) if t <= now => format!("EXPIRED {}", format_utc(t)),
                    Some(t) => format!("expires {}", format_utc(t)),
                    None => "never expires".to_string(),
                };
                let rotated = s
                    .rotated
                    .map_or("set before rotation was recorded".to_string(), |t| format!("rotated {}", format_utc(t)));
                let line = format!("{}\t{}\t{}\t{expires}\t{rotated}\t{bound}", s.name, s.scope, s.from);
                println!("{}", crate::escape::escape(line.as_bytes(), crate::escape::Layout::Line));
            }
        }
        SecretCommand::Rm { name, scope } => {
            let scope = Scope::parse(scope)?;
            remove_scoped(&dir, name, &scope)?;
            audit_change(&dir, &change_event("rm", name, None, &scope), now_ms)?;
        }
        SecretCommand::OauthImport { agent, from } => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let from = match (from, crate::oauth_secrets::guest_path(agent)) {
                (Some(f), _) => f.clone(),
                (None, Some(file)) => home.join(file),
                (None, None) => {
                    let known = crate::oauth_secrets::agents_with_oauth().join(", ");
                    return Err(format!("No OAuth sign-in known for agent '{agent}' ({known})").into());
                }
            };
            let name = crate::oauth_secrets::import(&dir, agent, &from, None)?;
            eprintln!(
                "sbx: {agent}'s sign-in from {} stored as secret '{name}'; `sbx run {agent}` uses it \
                 (its tokens stay on the host). You may delete {} now.",
                from.display(),
                from.display()
            );
        }
    }
    Ok(())
}

// ---- Reading a secret from the user ----

/// Echo off on a terminal while a secret is typed (restored on drop).
struct NoEcho {
    fd: i32,
    saved: libc::termios,
}

impl NoEcho {
    fn on(fd: i32) -> Option<NoEcho> {
        // SAFETY: termios is plain data; zeroed is valid before tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a descriptor, saved a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
        // SAFETY: fd is a descriptor, quiet a valid termios.
        (unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } == 0).then_some(NoEcho { fd, saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in on() on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// A secret from the terminal (one line, not echoed) or from standard
/// input (all of it).
pub fn read_secret(name: &str) -> Result<Secret, Error> {
    let mut text = zeroize::Zeroizing::new(String::new());
    if crate::terminal::is_tty(0) {
        eprint!("Value for secret '{name}' (not echoed): ");
        let _ = io::stderr().flush();
        let quiet = NoEcho::on(0);
        io::stdin().read_line(&mut text).map_err(Error::Input)?;
        drop(quiet);
        eprintln!();
    } else {
        io::stdin().take(MAX_SECRET_FILE).read_to_string(&mut text).map_err(Error::Input)?;
    }
    Ok(Secret::new(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netstack::policy::Policy;

    fn run_in(workspace: &str, sandbox: &str) -> RunScope {
        RunScope { workspace: PathBuf::from(workspace), sandbox: sandbox.to_string() }
    }

    fn value(v: &str) -> Source {
        Source::Value(Secret::new(v).unwrap())
    }

    fn scoped(v: &str, scope: Scope, expires: Option<u64>) -> Stored {
        Stored { source: value(v), scope, expires, rotated: Some(100) }
    }

    /// The value a run of `run` gets for the claude credential, if any.
    fn value_for(d: &Path, run: &RunScope, now: u64) -> Result<Option<String>, Error> {
        let rules = Policy::for_agent("claude").unwrap().credentials;
        let got = for_run(d, &rules, &["anthropic".to_string()], run, now)?;
        Ok(got.guest_env.into_iter().find(|(k, _)| k == "ANTHROPIC_API_KEY").map(|(_, v)| v))
    }

    #[test]
    fn the_most_specific_matching_scope_wins_and_other_projects_get_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (a, b) = (Scope::Workspace("/proj/a".into()), Scope::Sandbox("shell-b".into()));
        store(d, "anthropic", &scoped("sk-ws-a", a.clone(), None)).unwrap();
        store(d, "anthropic", &scoped("sk-sb-b", b.clone(), None)).unwrap();
        // (workspace, sandbox) -> value, with no global secret.
        let table = [
            ("/proj/a", "shell-a", Some("sk-ws-a")),
            ("/proj/a", "shell-b", Some("sk-sb-b")),
            ("/proj/b", "shell-b", Some("sk-sb-b")),
            ("/proj/a/sub", "x", None),
            ("/proj", "x", None),
            ("/other", "shell-a", None),
        ];
        for (ws, sb, want) in table {
            assert_eq!(value_for(d, &run_in(ws, sb), 0).unwrap().as_deref(), want, "{ws} {sb}");
        }
        // A note, not a value, for the other project.
        let rules = Policy::for_agent("claude").unwrap().credentials;
        let other = for_run(d, &rules, &[], &run_in("/other", "o"), 0).unwrap();
        assert!(other.credentials.is_empty() && other.notes[0].contains("no secret 'anthropic'"), "{:?}", other.notes);
        // With a global one, the others get it; the scoped still win.
        set(d, "anthropic", &value("sk-global")).unwrap();
        assert_eq!(value_for(d, &run_in("/other", "o"), 0).unwrap().as_deref(), Some("sk-global"));
        assert_eq!(value_for(d, &run_in("/proj/a", "x"), 0).unwrap().as_deref(), Some("sk-ws-a"));
        assert_eq!(value_for(d, &run_in("/proj/a", "shell-b"), 0).unwrap().as_deref(), Some("sk-sb-b"));
        let scopes: Vec<String> = list(d).unwrap().into_iter().map(|l| l.scope).collect();
        assert_eq!(scopes, ["global", "sandbox=shell-b", "workspace=/proj/a"]);
        // A scoped file moved to another scope's name is refused.
        let secrets = d.join("secrets");
        fs::rename(
            secrets.join(a.file_name("anthropic")),
            secrets.join(Scope::Workspace("/other".into()).file_name("anthropic")),
        )
        .unwrap();
        assert!(matches!(value_for(d, &run_in("/other", "o"), 0), Err(Error::Corrupt(_))));
    }

    #[test]
    fn scopes_parse_and_old_files_load_as_global_without_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let canon = dir.path().canonicalize().unwrap();
        assert_eq!(Scope::parse("global").unwrap(), Scope::Global);
        assert_eq!(Scope::parse(&format!("workspace={}", dir.path().display())).unwrap(), Scope::Workspace(canon));
        assert_eq!(Scope::parse("sandbox=shell-x").unwrap(), Scope::Sandbox("shell-x".into()));
        for bad in ["sandbox=", "sandbox=../x", "workspace=", "workspace=/no/such/dir", "project", "global=x"] {
            assert!(matches!(Scope::parse(bad), Err(Error::Scope(..))), "{bad}");
        }
        // As an earlier sbx wrote it.
        let d = dir.path().join("cfg");
        fs::create_dir_all(d.join("secrets")).unwrap();
        let old = d.join("secrets/anthropic");
        fs::write(&old, "sbx-secret 1\nvalue sk-old\n").unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o600)).unwrap();
        let s = get_scoped(&d, "anthropic", &Scope::Global).unwrap();
        assert_eq!((s.scope, s.expires, s.rotated), (Scope::Global, None, None));
        assert_eq!(value_for(&d, &run_in("/any", "any"), u64::MAX - 1).unwrap().as_deref(), Some("sk-old"));
        // New files are private too, and the earlier format's two lines lead.
        store(&d, "anthropic", &scoped("sk-new", Scope::Sandbox("s".into()), Some(5))).unwrap();
        let file = d.join("secrets/anthropic@sandbox-s");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&file).unwrap().starts_with("sbx-secret 1\nvalue sk-new\nscope sandbox s\n"));
    }

    #[test]
    fn expiry_parses_warns_then_refuses_naming_the_cure() {
        let now = 1_700_000_000; // 2023-11-14T22:13:20Z
        assert_eq!(format_utc(now), "2023-11-14T22:13:20Z");
        assert_eq!(parse_expires("30d", now).unwrap(), now + 30 * 86_400);
        assert_eq!(parse_expires("12h", now).unwrap(), now + 12 * 3600);
        assert_eq!(parse_expires("2024-02-29", now).unwrap(), 1_709_164_800);
        assert_eq!(parse_expires("2024-02-29T12:00:00Z", now).unwrap(), 1_709_164_800 + 43_200);
        assert_eq!(parse_expires("2024-02-29T14:00:00+02:00", now).unwrap(), 1_709_164_800 + 43_200);
        assert_eq!(parse_expires("2024-02-29T12:00:00.5Z", now).unwrap(), 1_709_164_800 + 43_200);
        assert_eq!(format_utc(1_709_164_800), "2024-02-29T00:00:00Z");
        for bad in ["2023-02-29", "2023-13-01", "2020-01-01", "0d", "xd", "2024-1-1", "2024-01-01T12:00", "tomorrow"] {
            assert!(matches!(parse_expires(bad, now), Err(Error::Expires(..))), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let expires = now + 10 * 86_400;
        store(d, "anthropic", &scoped("sk-1", Scope::Global, Some(expires))).unwrap();
        let rules = Policy::for_agent("claude").unwrap().credentials;
        let run = run_in("/w", "s");
        let quiet = for_run(d, &rules, &[], &run, now).unwrap();
        assert!(quiet.notes.is_empty(), "{:?}", quiet.notes);
        let soon = for_run(d, &rules, &[], &run, expires - 3 * 86_400).unwrap();
        assert_eq!(soon.credentials.iter().count(), 1);
        assert!(soon.notes[0].contains("expires on 2023-11-24T22:13:20Z (in 3 days)"), "{:?}", soon.notes);
        assert!(soon.notes[0].contains("sbx secret rotate anthropic"));
        for late in [expires, expires + 1] {
            let e = for_run(d, &rules, &[], &run, late).err().unwrap();
            assert!(matches!(e, Error::Expired { .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains("'anthropic' (global) expired on") && text.contains("`sbx secret rotate anthropic`"));
        }
    }

    #[test]
    fn rotation_replaces_the_value_keeping_scope_and_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let scope = Scope::Sandbox("s".into());
        // Set at 100, 30 days' life; expired by 40 days.
        store(d, "anthropic", &scoped("sk-old", scope.clone(), Some(100 + 30 * 86_400))).unwrap();
        let late = 100 + 40 * 86_400;
        assert!(matches!(value_for(d, &run_in("/w", "s"), late), Err(Error::Expired { .. })));
        let new = rotate(d, "anthropic", &scope, Secret::new("sk-new").unwrap(), None, late).unwrap();
        assert_eq!(
            (new.scope.clone(), new.expires, new.rotated),
            (scope.clone(), Some(late + 30 * 86_400), Some(late))
        );
        assert_eq!(value_for(d, &run_in("/w", "s"), late).unwrap().as_deref(), Some("sk-new"));
        let text = fs::read_to_string(d.join("secrets/anthropic@sandbox-s")).unwrap();
        assert!(!text.contains("sk-old"), "the old value is gone");
        assert_eq!(fs::read_dir(d.join("secrets")).unwrap().count(), 1, "no copy left behind");
        // A new expiry given; a secret with none keeps none.
        let again = rotate(d, "anthropic", &scope, Secret::new("sk-3").unwrap(), Some(late + 5), late).unwrap();
        assert_eq!(again.expires, Some(late + 5));
        set(d, "openai", &value("sk-o")).unwrap();
        let o = rotate(d, "openai", &Scope::Global, Secret::new("sk-o2").unwrap(), None, late).unwrap();
        assert_eq!(o.expires, None);
        // Only what is there; and not a value that comes from the environment.
        let e = rotate(d, "anthropic", &Scope::Global, Secret::new("x").unwrap(), None, late).err().unwrap();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        set(d, "gh", &Source::Env("GH_TOKEN".into())).unwrap();
        let e = rotate(d, "gh", &Scope::Global, Secret::new("x").unwrap(), None, late).err().unwrap();
        assert!(matches!(e, Error::RotateEnv { .. }), "{e}");
    }

    #[test]
    fn changes_go_to_a_private_hash_chained_log_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cfg");
        let stored = scoped("sk-secret-value", Scope::Sandbox("s".into()), Some(86_400));
        audit_change(&d, &change_event("set", "anthropic", Some(&stored), &stored.scope), 1000).unwrap();
        audit_change(&d, &change_event("rm", "anthropic", None, &Scope::Global), 2000).unwrap();
        let path = d.join(SECRETS_AUDIT_LOG);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let v = audit::verify_files(&audit::log_files(&path).unwrap()).unwrap();
        assert_eq!((v.first_seq, v.last_seq), (1, 2));
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("sk-secret-value"));
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["action"], "set");
        assert_eq!(first["scope"], "sandbox=s");
        assert_eq!(first["expires"], "1970-01-02T00:00:00Z");
        assert_eq!(first["source"], "stored");
    }

    #[test]
    fn secrets_are_private_files_listed_by_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cfg");
        set(&d, "anthropic", &Source::Value(Secret::new("sk-ant-123").unwrap())).unwrap();
        set(&d, "openai", &Source::Env("MY_OPENAI_KEY".into())).unwrap();
        let file = d.join("secrets/anthropic");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let listed: Vec<(String, String)> = list(&d).unwrap().into_iter().map(|l| (l.name, l.from)).collect();
        assert_eq!(
            listed,
            vec![("anthropic".to_string(), "stored".to_string()), ("openai".to_string(), "$MY_OPENAI_KEY".to_string())]
        );
        assert!(!format!("{listed:?}").contains("sk-ant"));
        assert!(matches!(get(&d, "anthropic").unwrap(), Source::Value(s) if s.expose() == "sk-ant-123"));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(get(&d, "anthropic"), Err(Error::Exposed(..))));
        remove(&d, "anthropic").unwrap();
        assert!(matches!(remove(&d, "anthropic"), Err(Error::NotFound(_))));
        assert!(matches!(set(&d, "../x", &Source::Env("A".into())), Err(Error::Name(_))));
        assert!(matches!(set(&d, "x", &Source::Env("A-B".into())), Err(Error::EnvName(_))));
    }

    #[test]
    fn a_run_gets_placeholders_and_notes_never_values() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        set(d, "anthropic", &Source::Value(Secret::new("sk-ant-123").unwrap())).unwrap();
        let rules = Policy::for_agent("claude").unwrap().credentials;
        let run = for_run(d, &rules, &[], &run_in("/w", "s"), 0).unwrap();
        let (var, value) = &run.guest_env[0];
        assert_eq!(var, "ANTHROPIC_API_KEY");
        assert!(value.starts_with("sbx-placeholder-anthropic-") && !value.contains("sk-ant"));
        assert_eq!(run.credentials.iter().count(), 1);
        let codex = Policy::for_agent("codex").unwrap().credentials;
        let none = for_run(d, &codex, &[], &run_in("/w", "s"), 0).unwrap();
        assert!(none.credentials.is_empty() && none.notes[0].contains("sbx secret set openai"));
        let exposed = for_run(d, &rules, &["anthropic".to_string()], &run_in("/w", "s"), 0).unwrap();
        assert_eq!(exposed.guest_env, vec![("ANTHROPIC_API_KEY".into(), "sk-ant-123".into())]);
        assert!(exposed.credentials.is_empty() && exposed.notes[0].contains("can read and leak"));
    }

    #[test]
    fn the_ca_is_made_once_and_its_key_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path()).unwrap();
        let key = dir.path().join("ca/ca-key.pem");
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let again = authority(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(authority(dir.path()), Err(Error::Exposed(..))));
    }
}
