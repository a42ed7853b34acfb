//! Host side: OAuth secrets (an agent's subscription sign-in) in sbx's
//! config folder, for [`netstack::oauth`]: the real access and refresh
//! tokens and their expiry stay on the host; a sandbox's guest gets
//! placeholders in its credential file. `oauth/NAME` (0600, folder 0700)
//! holds one JSON object (`"magic": "sbx-oauth 1"`, agent, tokens,
//! expiry in Unix ms, the last exchange's time in Unix ms (netstack's rate
//! limit, [`oauth::MIN_EXCHANGE_INTERVAL_MS`]), scopes, subscription
//! type; for Codex the account id and the `id_token`'s claims, never the
//! `id_token` itself: [`netstack::oauth`] says why). [`import`] takes an
//! agent's own credential file (Claude Code's `~/.claude/.credentials.json`,
//! `claudeAiOauth`; Codex's `~/.codex/auth.json`, `tokens`); [`FileStore`]
//! is the store netstack refreshes through: an exclusive lock on
//! `oauth/NAME.lock` around read, exchange and atomic write, so that the
//! sandboxes of one host refresh one secret one at a time and the
//! rotated tokens are written once. Import and every refresh are lines in
//! `secrets-audit.log` (name, agent, action, expiry, sandbox; never a
//! token).
//!
//! The guest's credential file ([`for_run`], at [`guest_path`]) is the
//! agent's own shape with placeholders: Claude Code's
//! `~/.claude/.credentials.json` (`claudeAiOauth`: `accessToken`,
//! `refreshToken`, `expiresAt`, `scopes`, `subscriptionType`), or Codex's
//! `~/.codex/auth.json` ([`codex_auth_file`]: `OPENAI_API_KEY` null,
//! `tokens` with a synthetic unsigned `id_token` carrying the kept claims,
//! the placeholders and the real `account_id`, and `last_refresh`, the
//! secret's last exchange (RFC 3339), so Codex's own schedule, a refresh
//! after 8 days, holds).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use netstack::credential::Secret;
use netstack::oauth::{self, OAuthSession, TokenStore, Tokens};
use serde_json::{json, Map, Value};
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
    /// Codex's `tokens.account_id` (its `ChatGPT-Account-Id`; not secret).
    pub account_id: Option<String>,
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
                exchanged_at_ms: 0,
                id_claims: Map::new(),
            };
            let scopes = o["scopes"]
                .as_array()
                .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).map(str::to_string).collect());
            let subscription = o["subscriptionType"].as_str().map(str::to_string);
            Ok((tokens, Meta { agent: agent.into(), scopes, subscription, account_id: None }))
        }
        "codex" => {
            let t = &v["tokens"];
            let id_claims = match t["id_token"].as_str() {
                Some(jwt) => oauth::id_claims(jwt).map_err(|_| corrupt(path))?,
                None => Map::new(),
            };
            let access = text_secret(&t["access_token"], path)?;
            // Codex's access token is a JWT too: its `exp`, if readable.
            let expires_at_ms = jwt_exp_ms(access.expose()).unwrap_or(0);
            let tokens = Tokens {
                access,
                refresh: text_secret(&t["refresh_token"], path)?,
                expires_at_ms,
                exchanged_at_ms: v["last_refresh"]
                    .as_str()
                    .and_then(secrets::parse_rfc3339)
                    .map_or(0, |s| s.saturating_mul(1000)),
                id_claims,
            };
            let account_id = t["account_id"].as_str().map(str::to_string).or_else(|| {
                tokens.id_claims.get(oauth::OPENAI_AUTH_CLAIM)?.get("chatgpt_account_id")?.as_str().map(str::to_string)
            });
            let subscription = tokens
                .id_claims
                .get(oauth::OPENAI_AUTH_CLAIM)
                .and_then(|a| a.get("chatgpt_plan_type"))
                .and_then(Value::as_str)
                .map(str::to_string);
            Ok((tokens, Meta { agent: agent.into(), scopes: Vec::new(), subscription, account_id }))
        }
        _ => Err(Error::NotFound(format!(
            "{agent} (an agent with an OAuth sign-in: {})",
            agents_with_oauth().join(", ")
        ))),
    }
}

/// The `exp` claim (Unix seconds) of a JWT, in Unix ms.
fn jwt_exp_ms(jwt: &str) -> Option<u64> {
    let payload = Zeroizing::new(oauth::unbase64url(jwt.split('.').nth(1)?)?);
    let v: Value = serde_json::from_slice(&payload).ok()?;
    v["exp"].as_u64().filter(|s| *s <= u64::MAX / 1000).map(|s| s * 1000)
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
            "exchanged_at_ms": tokens.exchanged_at_ms, "id_claims": tokens.id_claims,
            "scopes": meta.scopes, "subscription": meta.subscription, "account_id": meta.account_id})
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
        exchanged_at_ms: v["exchanged_at_ms"].as_u64().unwrap_or(0),
        id_claims: match &v["id_claims"] {
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            _ => return Err(corrupt(&path)),
        },
    };
    let meta = Meta {
        agent: v["agent"].as_str().ok_or_else(|| corrupt(&path))?.to_string(),
        scopes: v["scopes"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        subscription: v["subscription"].as_str().map(str::to_string),
        account_id: v["account_id"].as_str().map(str::to_string),
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

/// Where in the guest's home `agent`'s credential file goes (its
/// preset's `credentials_file`, `agents/presets.toml`), if it has an
/// OAuth sign-in.
pub fn guest_path(agent: &str) -> Option<&'static str> {
    oauth::provider(agent).map(|p| p.credentials_file.as_str())
}

/// The agents with an OAuth sign-in netstack handles (their presets'
/// `[agent.oauth]`), for errors and help.
pub fn agents_with_oauth() -> Vec<&'static str> {
    crate::agents::names().into_iter().filter(|a| oauth::provider(a).is_some()).collect()
}

/// Claude Code's credential file (`~/.claude/.credentials.json`) for the
/// guest: the session's placeholders and the real expiry.
pub fn claude_credentials_file(s: &OAuthSession, scopes: &[String], subscription: Option<&str>) -> String {
    json!({"claudeAiOauth": {"accessToken": s.access_placeholder, "refreshToken": s.refresh_placeholder,
        "expiresAt": s.expires_at_ms(), "scopes": scopes, "subscriptionType": subscription}})
    .to_string()
}

/// Codex's `auth.json` for the guest: placeholders, a synthetic unsigned
/// `id_token` with the kept claims ([`oauth::synthetic_id_token`]), the
/// account id, and `last_refresh` the secret's last exchange (`now_secs`
/// if none is known).
pub fn codex_auth_file(s: &OAuthSession, tokens: &Tokens, account_id: Option<&str>, now_secs: u64) -> String {
    let last = match tokens.exchanged_at_ms / 1000 {
        0 => now_secs,
        t => t,
    };
    json!({"OPENAI_API_KEY": null, "tokens": {"id_token": oauth::synthetic_id_token(&tokens.id_claims),
        "access_token": s.access_placeholder, "refresh_token": s.refresh_placeholder, "account_id": account_id},
        "last_refresh": secrets::format_utc(last)})
    .to_string()
}

/// For `sbx run AGENT` with OAuth secret `name`: the session netstack
/// serves (bind it with `netstack::credential::Credential::oauth`), the
/// guest's credential file in the secret's agent's shape (placeholders
/// only) and where in the guest's home it goes ([`guest_path`]).
pub fn for_run(dir: &Path, name: &str, sandbox: &str) -> Result<(Arc<OAuthSession>, String, &'static str), Error> {
    let (tokens, meta) = read(dir, name)?;
    let provider = oauth::provider(&meta.agent).ok_or_else(|| Error::NotFound(meta.agent.clone()))?;
    let store = Arc::new(FileStore { dir: dir.to_path_buf(), sandbox: sandbox.to_string() });
    let session = Arc::new(OAuthSession::new(name, provider, tokens.clone(), store)?);
    let file = match meta.agent.as_str() {
        "codex" => codex_auth_file(&session, &tokens, meta.account_id.as_deref(), secrets::now_unix()),
        _ => claude_credentials_file(&session, &meta.scopes, meta.subscription.as_deref()),
    };
    Ok((session, file, provider.credentials_file.as_str()))
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
        let (session, file, guest) = for_run(&cfg, &name, "sb1").unwrap();
        assert_eq!(guest, ".claude/.credentials.json");
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
            exchanged_at_ms: 7,
            id_claims: Map::new(),
        };
        store.update(&name, &mut |_| Ok(Some(new.clone()))).unwrap();
        let stored = read(&cfg, &name).unwrap().0;
        assert_eq!(stored.refresh.expose(), "sk-ant-ort01-ssss");
        assert_eq!(stored.exchanged_at_ms, 7, "the rate limit's time is kept in the file, for every sandbox");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!cfg.join("oauth/claude-oauth.new").exists());
        let log = fs::read_to_string(cfg.join(secrets::SECRETS_AUDIT_LOG)).unwrap();
        assert!(log.contains("oauth-import"), "{log}");
        assert!(!log.contains("sk-ant-"), "{log}");
        // An agent file readable by others is refused.
        fs::set_permissions(&from, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(import(&cfg, "claude", &from, None), Err(Error::Exposed(..))));
    }

    fn jwt(payload: &Value, signature: &str) -> String {
        let part = |v: &Value| oauth::base64url(v.to_string().as_bytes());
        format!("{}.{}.{signature}", part(&json!({"alg": "RS256", "typ": "JWT"})), part(payload))
    }

    /// Codex's `parse_id_token`: three non-empty parts, the payload
    /// base64url without padding, a JSON object.
    fn codex_parse_id_token(t: &str) -> Value {
        let parts: Vec<&str> = t.split('.').collect();
        assert!(parts.len() == 3 && parts.iter().all(|p| !p.is_empty()), "{t}");
        assert!(!parts[1].contains('='), "{t}");
        serde_json::from_slice(&oauth::unbase64url(parts[1]).unwrap()).unwrap()
    }

    const ID_SIGNATURE: &str = "b3BlbmFpLXJzYS1zaWduYXR1cmUtb3Zlci10aGUtaWQtdG9rZW4";

    #[test]
    fn codex_gets_a_codex_shaped_auth_json_with_placeholders_and_a_synthetic_id_token() {
        let d = tempfile::tempdir().unwrap();
        let id_token = jwt(
            &json!({"email": "u@example.com", "sub": "auth0|abc", "aud": ["app_EMoamEEZ73f0CkXaXp7hrann"],
                "https://api.openai.com/auth": {"chatgpt_plan_type": "pro", "chatgpt_account_id": "acc-123",
                "chatgpt_user_id": "user-9"}}),
            ID_SIGNATURE,
        );
        let access = jwt(&json!({"exp": 1_900_000_000u64, "scp": ["openid"]}), "YWNjZXNzLXNpZw");
        let refresh = "rt_real-refresh-token-0001";
        let codex = json!({"OPENAI_API_KEY": null, "tokens": {"id_token": id_token, "access_token": access,
            "refresh_token": refresh, "account_id": "acc-123"}, "last_refresh": "2025-06-01T10:20:30.123456Z"});
        let from = d.path().join("auth.json");
        fs::write(&from, codex.to_string()).unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = d.path().join("cfg");
        let name = import(&cfg, "codex", &from, None).unwrap();
        assert_eq!(name, "codex-oauth");
        // The store keeps the claims and the account, not the id_token.
        let stored = fs::read_to_string(cfg.join("oauth/codex-oauth")).unwrap();
        assert!(!stored.contains(&id_token) && !stored.contains(ID_SIGNATURE), "{stored}");
        let (tokens, meta) = read(&cfg, &name).unwrap();
        assert_eq!(meta.account_id.as_deref(), Some("acc-123"));
        assert_eq!(meta.subscription.as_deref(), Some("pro"));
        assert_eq!(tokens.expires_at_ms, 1_900_000_000_000, "the access token's exp");
        assert_eq!(tokens.exchanged_at_ms, secrets::parse_rfc3339("2025-06-01T10:20:30Z").unwrap() * 1000);

        let (session, file, guest) = for_run(&cfg, &name, "sb1").unwrap();
        assert_eq!(guest, ".codex/auth.json");
        for real in [access.as_str(), refresh, id_token.as_str(), ID_SIGNATURE] {
            assert!(!file.contains(real), "{real} in the guest's file: {file}");
        }
        // Codex's AuthDotJson: OPENAI_API_KEY, tokens (TokenData), last_refresh.
        let v: Value = serde_json::from_str(&file).unwrap();
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["OPENAI_API_KEY", "last_refresh", "tokens"]);
        assert!(v["OPENAI_API_KEY"].is_null(), "ChatGPT mode, not an API key");
        assert_eq!(v["last_refresh"], "2025-06-01T10:20:30Z");
        let t = &v["tokens"];
        assert_eq!(t["access_token"], session.access_placeholder.as_str());
        assert_eq!(t["refresh_token"], session.refresh_placeholder.as_str());
        assert_eq!(t["account_id"], "acc-123");
        let id = t["id_token"].as_str().unwrap();
        assert!(id.ends_with(&format!(".{}", oauth::SYNTHETIC_SIGNATURE)), "unsigned: {id}");
        let claims = codex_parse_id_token(id);
        let auth = &claims["https://api.openai.com/auth"];
        assert_eq!(
            (claims["email"].as_str(), auth["chatgpt_plan_type"].as_str()),
            (Some("u@example.com"), Some("pro"))
        );
        assert_eq!(
            (auth["chatgpt_account_id"].as_str(), auth["chatgpt_user_id"].as_str()),
            (Some("acc-123"), Some("user-9"))
        );
        assert!(claims.get("sub").is_none() && claims.get("aud").is_none(), "only Codex's claims: {claims}");
        // A malformed id_token is refused at import.
        let bad = json!({"tokens": {"id_token": "not-a-jwt", "access_token": "a", "refresh_token": "r"}});
        fs::write(&from, bad.to_string()).unwrap();
        assert!(matches!(import(&cfg, "codex", &from, None), Err(Error::Corrupt(..))));
    }
}
