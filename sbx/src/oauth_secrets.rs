//! Host side: OAuth secrets (an agent's subscription sign-in) in sbx's
//! config folder, for [`netstack::oauth`]: the real access and refresh
//! tokens and their expiry stay on the host; a sandbox's guest gets
//! placeholders in its credential file. `oauth/NAME` (0600, folder 0700)
//! holds one JSON object (`"magic": "sbx-oauth 1"`, agent, tokens,
//! expiry in Unix ms, scopes, subscription type). [`import`] takes an
//! agent's own credential file (Claude Code's `~/.claude/.credentials.json`,
//! `claudeAiOauth`; Codex's `~/.codex/auth.json`, `tokens`); [`FileStore`]
//! is the store netstack refreshes through: an exclusive lock on
//! `oauth/NAME.lock` around read, exchange and atomic write, so that the
//! sandboxes of one host refresh one secret one at a time and the
//! rotated tokens are written once. Import and every refresh are lines in
//! `secrets-audit.log` (name, agent, action, expiry, sandbox; never a
//! token).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use netstack::credential::Secret;
use netstack::oauth::{self, OAuthSession, TokenStore, Tokens};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::secrets::{self, Error};

const OAUTH_MAGIC: &str = "sbx-oauth 1";
/// Largest OAuth secret (or agent credential) file read.
const MAX_OAUTH_FILE: u64 = 64 * 1024;

fn oauth_dir(dir: &Path) -> PathBuf {
    dir.join("oauth")
}

/// What an OAuth secret holds besides its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub agent: String,
    pub scopes: Vec<String>,
    pub subscription: Option<String>,
}

fn corrupt(path: &Path) -> Error {
    Error::Corrupt(path.to_path_buf())
}

fn text_secret(v: &Value, path: &Path) -> Result<Secret, Error> {
    Ok(Secret::new(v.as_str().ok_or_else(|| corrupt(path))?)?)
}

/// Reads an agent's own credential file: its tokens and metadata.
pub fn read_agent_file(agent: &str, path: &Path) -> Result<(Tokens, Meta), Error> {
    let text = Zeroizing::new(secrets::read_private(path, MAX_OAUTH_FILE)?);
    let v: Value = serde_json::from_str(&text).map_err(|_| corrupt(path))?;
    match agent {
        "claude" => {
            let o = &v["claudeAiOauth"];
            let tokens = Tokens {
                access: text_secret(&o["accessToken"], path)?,
                refresh: text_secret(&o["refreshToken"], path)?,
                expires_at_ms: o["expiresAt"].as_u64().unwrap_or(0),
            };
            let scopes = o["scopes"]
                .as_array()
                .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).map(str::to_string).collect());
            let subscription = o["subscriptionType"].as_str().map(str::to_string);
            Ok((tokens, Meta { agent: agent.into(), scopes, subscription }))
        }
        "codex" => {
            let t = &v["tokens"];
            let tokens = Tokens {
                access: text_secret(&t["access_token"], path)?,
                refresh: text_secret(&t["refresh_token"], path)?,
                expires_at_ms: 0,
            };
            Ok((tokens, Meta { agent: agent.into(), scopes: Vec::new(), subscription: None }))
        }
        _ => Err(Error::NotFound(format!("{agent} (an agent with an OAuth sign-in: claude, codex)"))),
    }
}

fn write(dir: &Path, name: &str, tokens: &Tokens, meta: &Meta) -> Result<(), Error> {
    secrets::private_dir(dir)?;
    secrets::private_dir(&oauth_dir(dir))?;
    write_in_place(dir, name, tokens, meta)
}

/// Replaces OAuth secret `name`'s file atomically, with nothing but
/// open, write, fsync and rename in its folder (what netstack's jailed
/// threads may do there: see [`FileStore`]); the caller holds its lock,
/// so the one temporary name is never written by two at once.
fn write_in_place(dir: &Path, name: &str, tokens: &Tokens, meta: &Meta) -> Result<(), Error> {
    let body = Zeroizing::new(
        json!({"magic": OAUTH_MAGIC, "agent": meta.agent, "access": tokens.access.expose(),
            "refresh": tokens.refresh.expose(), "expires_at_ms": tokens.expires_at_ms,
            "scopes": meta.scopes, "subscription": meta.subscription})
        .to_string(),
    );
    let path = oauth_dir(dir).join(name);
    let tmp = oauth_dir(dir).join(format!("{name}.new"));
    let io = |e| Error::Io(tmp.clone(), e);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(body.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
    fs::rename(&tmp, &path).map_err(|e| Error::Io(path.clone(), e))
}

/// Reads OAuth secret `name`.
pub fn read(dir: &Path, name: &str) -> Result<(Tokens, Meta), Error> {
    if !netstack::credential::valid_name(name) {
        return Err(Error::Name(name.to_string()));
    }
    let path = oauth_dir(dir).join(name);
    if !path.is_file() {
        return Err(Error::NotFound(name.to_string()));
    }
    let text = Zeroizing::new(secrets::read_private(&path, MAX_OAUTH_FILE)?);
    let v: Value = serde_json::from_str(&text).map_err(|_| corrupt(&path))?;
    if v["magic"] != OAUTH_MAGIC {
        return Err(corrupt(&path));
    }
    let tokens = Tokens {
        access: text_secret(&v["access"], &path)?,
        refresh: text_secret(&v["refresh"], &path)?,
        expires_at_ms: v["expires_at_ms"].as_u64().unwrap_or(0),
    };
    let meta = Meta {
        agent: v["agent"].as_str().ok_or_else(|| corrupt(&path))?.to_string(),
        scopes: v["scopes"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        subscription: v["subscription"].as_str().map(str::to_string),
    };
    Ok((tokens, meta))
}

fn audit(
    dir: &Path,
    action: &str,
    name: &str,
    agent: &str,
    expires_at_ms: u64,
    sandbox: Option<&str>,
) -> Result<(), Error> {
    let now_ms = secrets::now_unix() * 1000;
    let event = json!({"event": "secret", "action": action, "name": name, "kind": "oauth", "agent": agent,
        "expires_at_ms": expires_at_ms, "sandbox": sandbox});
    secrets::audit_change(dir, &event, now_ms)
}

/// `sbx secret oauth-import AGENT [--from FILE] [--name NAME]`: stores the
/// agent's tokens from its own credential file as OAuth secret `name`
/// (default `AGENT-oauth`); returns the name.
pub fn import(dir: &Path, agent: &str, from: &Path, name: Option<&str>) -> Result<String, Error> {
    let name = name.map_or_else(|| format!("{agent}-oauth"), str::to_string);
    if !netstack::credential::valid_name(&name) {
        return Err(Error::Name(name));
    }
    let (tokens, meta) = read_agent_file(agent, from)?;
    let _lock = lock(dir, &name)?;
    write(dir, &name, &tokens, &meta)?;
    audit(dir, "oauth-import", &name, agent, tokens.expires_at_ms, None)?;
    Ok(name)
}

/// The exclusive lock on OAuth secret `name` (every sandbox of the host),
/// its folder made first.
fn lock(dir: &Path, name: &str) -> Result<fs::File, Error> {
    secrets::private_dir(dir)?;
    secrets::private_dir(&oauth_dir(dir))?;
    lock_in_place(dir, name)
}

/// The lock, in a folder that exists: open and flock only.
fn lock_in_place(dir: &Path, name: &str) -> Result<fs::File, Error> {
    let path = oauth_dir(dir).join(format!("{name}.lock"));
    let io = |e| Error::Io(path.clone(), e);
    let f = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(io)?;
    f.lock().map_err(io)?;
    Ok(f)
}

/// The host store netstack refreshes through, for one sandbox.
pub struct FileStore {
    pub dir: PathBuf,
    pub sandbox: String,
}

impl TokenStore for FileStore {
    fn update(
        &self,
        name: &str,
        f: &mut dyn FnMut(&Tokens) -> Result<Option<Tokens>, oauth::Error>,
    ) -> Result<Tokens, oauth::Error> {
        // This runs on netstack's jailed threads: Landlock lets them
        // reach the oauth folder alone (`oauth_reach`), seccomp lets them
        // open, flock, write, fsync and rename there — no mkdir, chmod or
        // unlink, and not the secrets log in the folder above, so the
        // refresh is recorded in the sandbox's audit log (`"event":
        // "oauth"`, by netstack) and in the secret's file.
        let store = |e: Error| oauth::Error::Store(e.to_string());
        let _lock = lock_in_place(&self.dir, name).map_err(store)?;
        let (stored, meta) = read(&self.dir, name).map_err(store)?;
        match f(&stored)? {
            Some(new) => {
                write_in_place(&self.dir, name, &new, &meta).map_err(store)?;
                Ok(new)
            }
            None => Ok(stored),
        }
    }
}

/// What netstack's threads need of the host for OAuth secrets: the
/// oauth folder, read-write (the store's files and their lock).
pub fn oauth_reach(dir: &Path) -> std::path::PathBuf {
    oauth_dir(dir)
}

/// The OAuth secret `AGENT-oauth` of an agent, if one was imported.
pub fn imported(dir: &Path, agent: &str) -> Option<String> {
    let name = format!("{agent}-oauth");
    oauth::provider(agent)?;
    oauth_dir(dir).join(&name).is_file().then_some(name)
}

/// For `sbx run AGENT` with OAuth secret `name`: the session netstack
/// serves (bind it with `netstack::credential::Credential::oauth`) and the
/// guest's credential file (Claude Code's; path `~/.claude/.credentials.json`).
pub fn for_run(dir: &Path, name: &str, sandbox: &str) -> Result<(Arc<OAuthSession>, String), Error> {
    let (tokens, meta) = read(dir, name)?;
    let provider = oauth::provider(&meta.agent).ok_or_else(|| Error::NotFound(meta.agent.clone()))?;
    let store = Arc::new(FileStore { dir: dir.to_path_buf(), sandbox: sandbox.to_string() });
    let session = Arc::new(OAuthSession::new(name, provider, tokens, store)?);
    let file = oauth::claude_credentials_file(&session, &meta.scopes, meta.subscription.as_deref());
    Ok((session, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CLAUDE_FILE: &str = r#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-aaaa","refreshToken":"sk-ant-ort01-rrrr","expiresAt":1747909518727,"scopes":["user:inference"],"subscriptionType":"max"}}"#;

    #[test]
    fn imported_tokens_stay_on_the_host_and_the_guest_file_has_placeholders() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("credentials.json");
        fs::write(&from, CLAUDE_FILE).unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = d.path().join("cfg");
        let name = import(&cfg, "claude", &from, None).unwrap();
        assert_eq!(name, "claude-oauth");
        let path = cfg.join("oauth/claude-oauth");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (session, file) = for_run(&cfg, &name, "sb1").unwrap();
        assert!(!file.contains("sk-ant-"), "{file}");
        let v: Value = serde_json::from_str(&file).unwrap();
        let o = &v["claudeAiOauth"];
        assert_eq!(o["accessToken"], session.access_placeholder.as_str());
        assert_eq!(o["refreshToken"], session.refresh_placeholder.as_str());
        assert_eq!(o["expiresAt"], 1747909518727u64);
        assert_eq!(o["subscriptionType"], "max");
        assert!(session.access_placeholder.starts_with("sbx-oauth-access-"));
        // A refresh through the store is written back (no temporary file
        // left; the sandbox's audit log records it, netstack's line).
        let store = FileStore { dir: cfg.clone(), sandbox: "sb1".into() };
        let new = Tokens {
            access: Secret::new("sk-ant-oat01-bbbb").unwrap(),
            refresh: Secret::new("sk-ant-ort01-ssss").unwrap(),
            expires_at_ms: 5,
        };
        store.update(&name, &mut |_| Ok(Some(new.clone()))).unwrap();
        assert_eq!(read(&cfg, &name).unwrap().0.refresh.expose(), "sk-ant-ort01-ssss");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!cfg.join("oauth/claude-oauth.new").exists());
        let log = fs::read_to_string(cfg.join(secrets::SECRETS_AUDIT_LOG)).unwrap();
        assert!(log.contains("oauth-import"), "{log}");
        assert!(!log.contains("sk-ant-"), "{log}");
        // An agent file readable by others is refused.
        fs::set_permissions(&from, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(import(&cfg, "claude", &from, None), Err(Error::Exposed(..))));
    }
}
