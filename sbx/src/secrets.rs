//! Host side: the credentials sbx keeps for sandboxes (`sbx secret`) and
//! the per-installation CA netstack terminates TLS with. Both live in
//! sbx's config folder ([`config_dir`], 0700), never in a sandbox: a
//! secret is a 0600 file holding its value, or the name of an environment
//! variable to read at `sbx run` time; the CA is `ca/ca.pem` (public, what
//! guests trust) and `ca/ca-key.pem` (0600). At `sbx run` each credential
//! the policy binds gets a fresh random placeholder, which is all the
//! guest sees ([`for_run`]); netstack swaps in the value on the way out.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use netstack::ca::Authority;
use netstack::credential::{self, Credential, CredentialRule, Credentials, Secret};
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
fn private_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::Io(dir.to_path_buf(), e))
}

/// Writes `text` to `path` as a new 0600 file, replacing it atomically.
fn write_private(path: &Path, text: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let io = |e| Error::Io(tmp.clone(), e);
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(text).and_then(|_| f.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

/// Reads a file that must be private (no group or other access).
fn read_private(path: &Path, limit: u64) -> Result<String, Error> {
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

/// Stores secret `name`.
pub fn set(dir: &Path, name: &str, source: &Source) -> Result<(), Error> {
    check_name(name)?;
    let body = zeroize::Zeroizing::new(match source {
        Source::Value(s) => format!("{SECRET_MAGIC}\nvalue {}\n", s.expose()),
        Source::Env(var) if valid_env_name(var) => format!("{SECRET_MAGIC}\nenv {var}\n"),
        Source::Env(var) => return Err(Error::EnvName(var.clone())),
    });
    private_dir(dir)?;
    private_dir(&secrets_dir(dir))?;
    write_private(&secrets_dir(dir).join(name), body.as_bytes())
}

/// Reads secret `name`'s source.
pub fn get(dir: &Path, name: &str) -> Result<Source, Error> {
    check_name(name)?;
    let path = secrets_dir(dir).join(name);
    if !path.is_file() {
        return Err(Error::NotFound(name.to_string()));
    }
    let text = zeroize::Zeroizing::new(read_private(&path, MAX_SECRET_FILE)?);
    let mut lines = text.lines();
    let corrupt = || Error::Corrupt(path.clone());
    if lines.next() != Some(SECRET_MAGIC) {
        return Err(corrupt());
    }
    match lines.next().and_then(|l| l.split_once(' ')) {
        Some(("value", v)) => Ok(Source::Value(Secret::new(v)?)),
        Some(("env", v)) if valid_env_name(v) => Ok(Source::Env(v.to_string())),
        _ => Err(corrupt()),
    }
}

/// Removes secret `name`.
pub fn remove(dir: &Path, name: &str) -> Result<(), Error> {
    check_name(name)?;
    let path = secrets_dir(dir).join(name);
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(name.to_string())),
        r => r.map_err(|e| Error::Io(path, e)),
    }
}

/// The stored secrets' names, sorted, each with where its value comes
/// from ("stored" or "$VAR").
pub fn list(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let d = secrets_dir(dir);
    let entries = match fs::read_dir(&d) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|e| Error::Io(d.clone(), e))?,
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if !credential::valid_name(&name) {
            continue;
        }
        let from = match get(dir, &name) {
            Ok(Source::Value(_)) => "stored".to_string(),
            Ok(Source::Env(var)) => format!("${var}"),
            Err(e) => format!("unreadable: {e}"),
        };
        out.push((name, from));
    }
    out.sort();
    Ok(out)
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
/// (credentials the policy binds whose secret is unknown).
pub struct ForRun {
    pub credentials: Credentials,
    pub guest_env: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Binds each of `rules` to its stored secret. `expose`: credentials whose
/// real value is put in the guest's environment instead (no injection).
pub fn for_run(dir: &Path, rules: &[CredentialRule], expose: &[String]) -> Result<ForRun, Error> {
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
        let source = match get(dir, &rule.name) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => {
                notes.push(format!(
                    "no secret '{}' (for {}): `sbx secret set {}` to have netstack add it",
                    rule.name,
                    rule.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "),
                    rule.name
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        let secret = resolve(&rule.name, source)?;
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

/// `sbx secret set|ls|rm`.
pub fn command(cmd: &crate::cli::SecretCommand) -> Result<(), Box<dyn std::error::Error>> {
    use crate::cli::SecretCommand;
    let dir = config_dir();
    match cmd {
        SecretCommand::Set { name, from_env } => {
            check_name(name)?;
            let source = match from_env {
                Some(var) => Source::Env(var.clone()),
                None => Source::Value(read_secret(name)?),
            };
            set(&dir, name, &source)?;
            eprintln!("sbx: secret '{name}' stored in {}", secrets_dir(&dir).display());
        }
        SecretCommand::Ls { policy } => {
            let rules = bindings(policy.as_deref())?;
            for (name, from) in list(&dir)? {
                let bound: Vec<String> = rules
                    .iter()
                    .filter(|r| r.name == name)
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
                println!("{name}\t{from}\t{bound}");
            }
        }
        SecretCommand::Rm { name } => remove(&dir, name)?,
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

    #[test]
    fn secrets_are_private_files_listed_by_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cfg");
        set(&d, "anthropic", &Source::Value(Secret::new("sk-ant-123").unwrap())).unwrap();
        set(&d, "openai", &Source::Env("MY_OPENAI_KEY".into())).unwrap();
        let file = d.join("secrets/anthropic");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let listed = list(&d).unwrap();
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
        let run = for_run(d, &rules, &[]).unwrap();
        let (var, value) = &run.guest_env[0];
        assert_eq!(var, "ANTHROPIC_API_KEY");
        assert!(value.starts_with("sbx-placeholder-anthropic-") && !value.contains("sk-ant"));
        assert_eq!(run.credentials.iter().count(), 1);
        let codex = Policy::for_agent("codex").unwrap().credentials;
        let none = for_run(d, &codex, &[]).unwrap();
        assert!(none.credentials.is_empty() && none.notes[0].contains("sbx secret set openai"));
        let exposed = for_run(d, &rules, &["anthropic".to_string()]).unwrap();
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
