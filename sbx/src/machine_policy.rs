//! Host side: the machine's admin policy — `/etc/sbx/policy.toml`, which
//! every sandbox of every user on the host obeys, whatever its user's
//! policy file, flags or live rules say. Read by `sbx run` before anything
//! starts ([`load`]), checked against the run ([`MachinePolicy::check_args`],
//! [`MachinePolicy::check_network`]), its network rules handed to netstack
//! as the admin layer (`netstack::policy::AdminLayer`, judged above every
//! other rule: `netstack::live`), and watched while the sandbox runs
//! ([`Watch`], every [`POLL`]).
//!
//! ```toml
//! version = 1
//!
//! # What no run may use (each refused before boot, the flag named).
//! # Top-level keys come first: after a [[rule]] header, keys are the rule's.
//! forbid = ["expose-secret-to-guest", "allow-any", "no-jail", "passthrough", "learn"]
//! max_preset = "balanced"     # a policy file's preset wider than this is refused
//! max_memory_mib = 4096       # --memory above: refused; a default above: lowered to it
//! max_cpus = 2                # --cpus above: refused
//! max_disk_gib = 32           # --disk-size above: refused (the default lowered to it)
//! audit_copy = "/var/log/sbx" # each run's verified audit log copied to DIR/UID/NAME.jsonl
//!                             # at its end; a run that cannot write there does not start
//!
//! # Network: deny rules win over everything (the user's policy, presets,
//! # agents, --allow, `sbx policy allow`, `sbx approve`, --learn); ask
//! # rules hold a request for a person's yes even when the user allows the
//! # host, and no live grant lifts them (`sbx approve` lets what waits go,
//! # once). Same fields as a sandbox policy's rules; no allow rules.
//! [[rule]]
//! deny = "*.pastebin.com"
//! [[rule]]
//! deny = "files.corp.example"
//! path_prefix = "/hr/"
//! [[rule]]
//! ask = "api.github.com"
//! methods = ["DELETE"]
//! ```
//!
//! `forbid` flags ([`FLAGS`]): `expose-secret-to-guest` (the real secret
//! in the guest), `allow-any` (an allow rule or `--allow` of `*`),
//! `no-jail` (`SBX_NO_JAIL`), `passthrough` (`https = "passthrough"` or an
//! allow rule's `passthrough = true`: HTTPS not inspected), `learn`
//! (`--learn`), `upstream-ca` (`--upstream-ca`: more roots trusted
//! upstream), `resolve` (`--resolve`: names sent to host addresses),
//! `addresses` (allow rules' non-public `addresses`), `mount` (`--mount`:
//! more host folders shared), `clone` (`--clone`, a later run of a sandbox
//! made with it, and `sbx fetch`: guest-made commits into the host's
//! repository).
//!
//! Trust: the file must be a regular file owned by root and not writable
//! by group or others, in a directory likewise (else anyone who can write
//! it, or swap it, sets every user's rules). There is no flag or variable
//! naming another file: a user could point it at an empty one. Fail
//! closed: a file that is present but unreadable, unsafe or invalid makes
//! `sbx run` refuse to start, naming the file and the cure; absent, there
//! is no admin layer.
//!
//! Hot reload: the running `sbx run` looks at the file every [`POLL`]
//! (its size, times, inode, owner and mode; then its bytes' SHA-256) and
//! puts a changed file's network rules in force in the running sandbox at
//! its next decision (a spliced HTTPS connection keeps the decision of its
//! ClientHello), logged in the audit log as `{"event":"admin_policy",
//! "change":"reloaded","sha256":…}`. A changed file that cannot be used
//! (unsafe, invalid, removed) keeps the last good layer in force, logged
//! (`"change":"refused"`) and told on stderr (without a pty); to lift the
//! admin rules from running sandboxes, write a file without them. The
//! other parts (`forbid`, `max_*`) are checked at each `sbx run`: a
//! running sandbox keeps what it started with.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netstack::live::Live;
use netstack::policy::{Action, AdminLayer, AdminRule, Origin, Pattern, Policy};
use serde::Deserialize;
use thiserror::Error;

use crate::cli::RunArgs;

/// Where the admin policy is, and the only place sbx looks.
pub const PATH: &str = "/etc/sbx/policy.toml";
/// Largest admin policy read.
pub const MAX_FILE: u64 = 1 << 20;
/// How often a running sandbox looks at the file.
pub const POLL: Duration = Duration::from_secs(2);
/// `--disk-size`'s default (cli.rs): lowered to the cap, not refused.
const DEFAULT_DISK_GIB: u64 = 16;
/// The presets, narrowest first.
const PRESETS: [&str; 3] = ["locked", "balanced", "open"];

/// The `forbid` flags, with what each refuses.
pub const FLAGS: &[(&str, &str)] = &[
    ("expose-secret-to-guest", "--expose-secret-to-guest"),
    ("allow-any", "allowing every host (--allow '*' or an allow \"*\" rule)"),
    ("no-jail", "running the VMM unjailed (SBX_NO_JAIL)"),
    ("passthrough", "HTTPS passthrough (https = \"passthrough\" or passthrough = true)"),
    ("learn", "--learn"),
    ("upstream-ca", "--upstream-ca"),
    ("resolve", "--resolve"),
    ("addresses", "non-public upstream addresses (an allow rule's addresses)"),
    ("mount", "--mount"),
    ("clone", "git clones of the workspace in the guest and fetching their commits into it (--clone, sbx fetch)"),
];

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "Cannot read the admin policy {0}: {1} (sbx will not run while it cannot: its administrator must fix it or remove it)"
    )]
    Read(PathBuf, std::io::Error),
    #[error("The admin policy {0} is not a regular file (its administrator must replace it with one, or remove it)")]
    NotFile(PathBuf),
    #[error("The admin policy {0} is owned by uid {1}, not root: refused (cure: `chown root:root {0}`)")]
    Owner(PathBuf, u32),
    #[error("The admin policy {0} is writable by group or others (mode {1:o}): refused (cure: `chmod go-w {0}`)")]
    Mode(PathBuf, u32),
    #[error("The folder {0} of the admin policy is not owned by root or is writable by group or others: refused (cure: `chown root:root {0}; chmod go-w {0}`)")]
    Folder(PathBuf),
    #[error("The admin policy {0} is larger than {MAX_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("The admin policy {0} is not valid: {1} (its administrator must fix it; sbx will not run meanwhile)")]
    Invalid(PathBuf, String),
    #[error("The machine's admin policy ({PATH}) forbids {what} (forbid = [\"{flag}\"]): run without it, or ask the machine's administrator")]
    Forbidden { flag: &'static str, what: &'static str },
    #[error("The machine's admin policy ({PATH}) allows presets up to '{max}': the policy's preset '{asked}' is wider (use a narrower preset)")]
    Preset { asked: &'static str, max: &'static str },
    #[error("The machine's admin policy ({PATH}) caps {what} at {max}: {asked} asked (ask for less)")]
    Cap { what: &'static str, asked: u64, max: u64 },
    #[error("The machine's admin policy ({PATH}) requires each run's audit log copied to {0}, which cannot be written: {1} (its administrator must make the folder, e.g. `install -d -m 1733 {2}`, or let this user write it)")]
    AuditCopy(PathBuf, std::io::Error, PathBuf),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[serde(default)]
    rule: Vec<AdminRule>,
    #[serde(default)]
    forbid: Vec<String>,
    max_preset: Option<String>,
    max_memory_mib: Option<u64>,
    max_cpus: Option<u8>,
    max_disk_gib: Option<u64>,
    audit_copy: Option<PathBuf>,
}

/// The admin policy, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePolicy {
    pub path: PathBuf,
    /// The SHA-256 (hex) of the file's bytes.
    pub sha256: String,
    /// The network rules (netstack's admin layer).
    pub network: AdminLayer,
    /// The `forbid` flags, each one of [`FLAGS`].
    pub forbid: Vec<&'static str>,
    pub max_preset: Option<&'static str>,
    pub max_memory_mib: Option<u64>,
    pub max_cpus: Option<u8>,
    pub max_disk_gib: Option<u64>,
    /// `audit_copy = "/var/log/sbx"`: where every run's verified audit
    /// log is copied at its end ([`MachinePolicy::audit_copy_dir`]); a run
    /// that could not write there does not start.
    pub audit_copy: Option<PathBuf>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Root-owned and not writable by group or others.
fn safe(meta: &std::fs::Metadata) -> bool {
    meta.uid() == 0 && meta.mode() & 0o022 == 0
}

/// Reads the admin policy at `path` (the real one is [`PATH`]); None if
/// there is no file. Every refusal names the file and the cure.
pub fn load(path: &Path) -> Result<Option<MachinePolicy>, Error> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Read(path.into(), e)),
    };
    // The file opened is the one checked (fstat): no swap in between.
    let meta = file.metadata().map_err(|e| Error::Read(path.into(), e))?;
    if !meta.is_file() {
        return Err(Error::NotFile(path.into()));
    }
    if meta.uid() != 0 {
        return Err(Error::Owner(path.into(), meta.uid()));
    }
    if !safe(&meta) {
        return Err(Error::Mode(path.into(), meta.mode() & 0o7777));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let dmeta = std::fs::metadata(dir).map_err(|e| Error::Read(dir.into(), e))?;
        if !safe(&dmeta) {
            return Err(Error::Folder(dir.into()));
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(|e| Error::Read(path.into(), e))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(Error::TooLarge(path.into()));
    }
    parse(path, &bytes).map(Some)
}

/// The admin policy in `bytes` (read from `path`, for messages).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<MachinePolicy, Error> {
    let bad = |why: String| Error::Invalid(path.into(), why);
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
    let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if file.version != 1 {
        return Err(bad(format!("version {} is not supported (expected 1)", file.version)));
    }
    let sha256 = sha256_hex(bytes);
    let network = AdminLayer::parse(file.rule, sha256.clone()).map_err(|e| bad(e.to_string()))?;
    let mut forbid = Vec::new();
    for f in &file.forbid {
        let known = FLAGS.iter().find(|(name, _)| name == f).map(|(name, _)| *name);
        let names: Vec<&str> = FLAGS.iter().map(|(n, _)| *n).collect();
        forbid.push(known.ok_or_else(|| bad(format!("unknown forbid flag '{f}' (expected {})", names.join(", "))))?);
    }
    let max_preset = match file.max_preset.as_deref() {
        None => None,
        Some(p) => Some(
            PRESETS
                .into_iter()
                .find(|have| *have == p)
                .ok_or_else(|| bad(format!("unknown max_preset '{p}' (expected locked, balanced or open)")))?,
        ),
    };
    if file.max_memory_mib == Some(0) || file.max_cpus == Some(0) || file.max_disk_gib == Some(0) {
        return Err(bad("a max_ cap of 0 would refuse every run (remove it, or give at least 1)".into()));
    }
    if let Some(d) = &file.audit_copy {
        if !d.is_absolute() || d.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(bad(format!("audit_copy {} is not an absolute path without '..'", d.display())));
        }
    }
    Ok(MachinePolicy {
        path: path.into(),
        sha256,
        network,
        forbid,
        max_preset,
        max_memory_mib: file.max_memory_mib,
        max_cpus: file.max_cpus,
        max_disk_gib: file.max_disk_gib,
        audit_copy: file.audit_copy,
    })
}

impl MachinePolicy {
    /// The run's audit copy folder for user `uid` (`AUDIT_COPY/UID`, made
    /// 0700 if missing, checked writable), or None when none is required.
    /// A folder that cannot be written refuses the run: the destination is
    /// required, so a run without it does not start.
    pub fn audit_copy_dir(&self, uid: u32) -> Result<Option<PathBuf>, Error> {
        let Some(base) = &self.audit_copy else { return Ok(None) };
        let dir = base.join(uid.to_string());
        let fail = |e| Error::AuditCopy(dir.clone(), e, base.clone());
        if std::fs::symlink_metadata(&dir).is_err() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(fail)?;
        }
        // In a folder every user may write, another user could have made
        // this user's folder first (or a link to a folder of theirs) to
        // read the copies: only a real folder of this user's, private, is
        // written to.
        let meta = std::fs::symlink_metadata(&dir).map_err(fail)?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            let why = "not a private folder of this user's (a link, another user's, or open to others)";
            return Err(fail(std::io::Error::other(why)));
        }
        // Writable: a probe file made and removed.
        let probe = dir.join(".sbx-probe");
        std::fs::write(&probe, b"").map_err(fail)?;
        let _ = std::fs::remove_file(&probe);
        Ok(Some(dir))
    }

    /// Refuses `flag` (one of [`FLAGS`]) when the admin policy forbids it.
    pub fn forbids(&self, flag: &'static str) -> Result<(), Error> {
        match FLAGS.iter().find(|(name, _)| *name == flag) {
            Some((name, what)) if self.forbid.contains(name) => Err(Error::Forbidden { flag: name, what }),
            _ => Ok(()),
        }
    }

    /// Refuses what `sbx run`'s arguments ask for that the admin policy
    /// forbids or caps; `no_jail`: `SBX_NO_JAIL` is set.
    pub fn check_args(&self, args: &RunArgs, no_jail: bool) -> Result<(), Error> {
        let asked = [
            ("expose-secret-to-guest", !args.expose_secret_to_guest.is_empty()),
            ("allow-any", args.allow.iter().any(|a| a.trim() == "*")),
            ("no-jail", no_jail),
            ("learn", args.learn),
            ("upstream-ca", args.upstream_ca.is_some()),
            ("resolve", !args.resolve.is_empty()),
            ("mount", !args.mount.is_empty()),
            ("clone", args.clone),
        ];
        for (flag, used) in asked {
            if used {
                self.forbids(flag)?;
            }
        }
        if let Some(max) = self.max_cpus.filter(|m| args.cpus > *m) {
            return Err(Error::Cap { what: "--cpus", asked: args.cpus.into(), max: max.into() });
        }
        if let Some(max) = self.max_disk_gib.filter(|m| args.disk_size > *m && args.disk_size != DEFAULT_DISK_GIB) {
            return Err(Error::Cap { what: "--disk-size (GiB)", asked: args.disk_size, max });
        }
        Ok(())
    }

    /// The guest memory: `--memory` above the cap refused, the agent's
    /// default above it lowered to it.
    pub fn memory_mib(&self, asked: Option<u64>, default: u64) -> Result<u64, Error> {
        match (asked, self.max_memory_mib) {
            (Some(a), Some(max)) if a > max => Err(Error::Cap { what: "--memory (MiB)", asked: a, max }),
            (Some(a), _) => Ok(a),
            (None, Some(max)) => Ok(default.min(max)),
            (None, None) => Ok(default),
        }
    }

    /// The disk size: the default above the cap lowered to it (anything
    /// else above it is refused by [`MachinePolicy::check_args`]).
    pub fn disk_gib(&self, asked: u64) -> u64 {
        self.max_disk_gib.map_or(asked, |max| asked.min(max))
    }

    /// Refuses a sandbox network policy (its file, the agent's needs and
    /// `--allow`, merged) that the admin policy forbids.
    pub fn check_network(&self, policy: &Policy) -> Result<(), Error> {
        let allows = || policy.rules.iter().filter(|r| r.action == Action::Allow);
        if allows().any(|r| r.pattern == Pattern::Any) {
            self.forbids("allow-any")?;
        }
        if policy.https == netstack::policy::Https::Passthrough || allows().any(|r| r.passthrough) {
            self.forbids("passthrough")?;
        }
        if allows().any(|r| !r.addresses.is_empty()) {
            self.forbids("addresses")?;
        }
        if let Some(max) = self.max_preset {
            let level = |p: &str| PRESETS.iter().position(|have| *have == p).unwrap_or(PRESETS.len());
            for r in &policy.rules {
                if let Origin::Preset(p) = r.origin {
                    if level(p) > level(max) {
                        return Err(Error::Preset { asked: p, max });
                    }
                }
            }
        }
        Ok(())
    }
}

/// What identifies a version of the file without reading it.
type Stamp = Option<(u64, i64, i64, i64, i64, u64, u32, u32)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec(), m.ino(), m.mode(), m.uid()))
}

/// Watches the admin policy of a running sandbox (see the module docs).
#[derive(Debug)]
pub struct Watch {
    path: PathBuf,
    stamp: Stamp,
    /// The SHA-256 of the file last seen (good or not), "" for none.
    seen: String,
}

/// What a look at the file found.
#[derive(Debug)]
pub enum Change {
    /// A new good version: its network rules are to be put in force.
    Reloaded(Box<MachinePolicy>),
    /// A new version that cannot be used: the last good one stays.
    Refused(String),
}

impl Watch {
    /// Watches `path`, whose version in force is `current` (None: none).
    pub fn new(path: &Path, current: Option<&MachinePolicy>) -> Watch {
        Watch { path: path.into(), stamp: stamp(path), seen: current.map(|p| p.sha256.clone()).unwrap_or_default() }
    }

    /// A look at the file: None if nothing changed.
    pub fn poll(&mut self) -> Option<Change> {
        let now = stamp(&self.path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        let (seen, change) = match load(&self.path) {
            Ok(Some(p)) => (p.sha256.clone(), Change::Reloaded(Box::new(p))),
            Ok(None) => ("absent".to_string(), Change::Refused(format!("{} was removed", self.path.display()))),
            Err(e) => (format!("error: {e}"), Change::Refused(e.to_string())),
        };
        // Touched but the same bytes (or the same error): nothing to say.
        if seen == self.seen {
            return None;
        }
        self.seen = seen;
        Some(change)
    }

    /// Puts what [`Watch::poll`] found into `live` (logged there); `tell`
    /// gets one line for the user.
    pub fn apply(change: Change, live: &Live, tell: &dyn Fn(&str)) {
        match change {
            Change::Reloaded(p) => {
                tell(&format!("sbx: admin policy {} reloaded (sha256 {})", p.path.display(), p.sha256));
                live.set_admin(p.network, "reloaded");
            }
            Change::Refused(why) => {
                tell(&format!("sbx: admin policy changed but refused, the last good one stays in force: {why}"));
                live.admin_error(&why);
            }
        }
    }

    /// Looks every [`POLL`] for as long as the process runs.
    pub fn run(mut self, live: std::sync::Arc<Live>, tell: &dyn Fn(&str)) {
        loop {
            std::thread::sleep(POLL);
            if let Some(change) = self.poll() {
                Watch::apply(change, &live, tell);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;
    use netstack::host::HostName;
    use netstack::live::{judge, LiveRules, Verdict};
    use netstack::policy::Request;

    use super::*;

    const GOOD: &str = "version = 1\nforbid = [\"expose-secret-to-guest\", \"learn\", \"no-jail\", \"allow-any\", \"passthrough\"]\n\
                        max_preset = \"balanced\"\nmax_memory_mib = 2048\nmax_cpus = 2\nmax_disk_gib = 8\n\
                        [[rule]]\ndeny = \"evil.example\"\n[[rule]]\nask = \"api.github.com\"\nmethods = [\"DELETE\"]\n";

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("policy.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let argv = [&["sbx", "run", "shell"][..], extra].concat();
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn the_loader_refuses_files_others_could_write_and_absent_is_none() {
        let d = dir();
        assert_eq!(load(&d.path().join("policy.toml")).unwrap(), None, "absent: no admin layer");
        let path = write(d.path(), GOOD);
        let p = load(&path).unwrap().unwrap();
        assert_eq!(p.network.denies.len(), 1);
        assert_eq!(p.sha256, sha256_hex(GOOD.as_bytes()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, Error::Mode(_, 0o666)), "{e}");
        assert!(e.to_string().contains("chmod go-w"), "the cure is named: {e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(matches!(load(&path), Err(Error::Mode(..))), "group-writable");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(1), None).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, Error::Owner(_, 1)), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()) && e.to_string().contains("chown root"));
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(load(&path), Err(Error::Folder(_))), "a folder others could swap it in");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert!(load(&path).is_ok(), "root reads a 0000 file; the mode is not what makes it unsafe");
        let sub = d.path().join("policy.toml.d");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(load(&sub), Err(Error::NotFile(_))));
    }

    #[test]
    fn a_required_audit_copy_is_a_private_folder_per_user_or_the_run_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let me = crate::admin::own_uid();
        let base = d.path().join("audit");
        std::fs::create_dir(&base).unwrap();
        let text = format!("version = 1\naudit_copy = \"{}\"\n", base.display());
        let p = parse(Path::new("t"), text.as_bytes()).unwrap();
        let dir = p.audit_copy_dir(me).unwrap().unwrap();
        assert_eq!(dir, base.join(me.to_string()));
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the probe is gone");
        // No destination: the run is refused (a file where the folder should be).
        std::fs::remove_dir_all(&base).unwrap();
        std::fs::write(&base, b"").unwrap();
        let e = p.audit_copy_dir(me).unwrap_err();
        assert!(matches!(e, Error::AuditCopy(..)) && e.to_string().contains("install -d -m 1733"), "{e}");
        // Made by someone else first, or a link: refused.
        std::fs::remove_file(&base).unwrap();
        std::fs::create_dir(&base).unwrap();
        let elsewhere = d.path().join("theirs");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, base.join(me.to_string())).unwrap();
        let e = p.audit_copy_dir(me).unwrap_err();
        assert!(e.to_string().contains("not a private folder"), "{e}");
        std::fs::remove_file(base.join(me.to_string())).unwrap();
        std::fs::create_dir(base.join(me.to_string())).unwrap();
        std::os::unix::fs::chown(base.join(me.to_string()), Some(me + 1), None).unwrap();
        assert!(p.audit_copy_dir(me).is_err(), "another user's folder");
        // None asked: none made.
        assert_eq!(parse(Path::new("t"), b"version = 1\n").unwrap().audit_copy_dir(1).unwrap(), None);
        for bad in ["audit_copy = \"var/log\"", "audit_copy = \"/var/../etc\""] {
            let e = parse(Path::new("t"), format!("version = 1\n{bad}\n").as_bytes()).unwrap_err();
            assert!(e.to_string().contains("absolute path"), "{e}");
        }
    }

    #[test]
    fn bad_files_name_the_file_and_the_problem() {
        let p = Path::new("/etc/sbx/policy.toml");
        let err = |t: &str| parse(p, t.as_bytes()).unwrap_err().to_string();
        assert!(err("version = 2\n").contains("version 2"));
        assert!(err("version = 1\nforbid = [\"fun\"]\n").contains("unknown forbid flag 'fun'"));
        assert!(err("version = 1\nmax_preset = \"wide\"\n").contains("max_preset"));
        assert!(err("version = 1\n[[rule]]\nallow = \"a.com\"\n").contains("unknown field"));
        assert!(err("version = 1\ncolour = 1\n").contains("unknown field"));
        assert!(err("version = 1\nmax_cpus = 0\n").contains("cap of 0"));
        assert!(parse(p, b"version = 1\n").is_ok(), "a minimal file is good");
    }

    #[test]
    fn forbidden_flags_are_refused_by_name_and_caps_enforced() {
        let p = parse(Path::new(PATH), GOOD.as_bytes()).unwrap();
        let refused = |extra: &[&str], no_jail: bool| p.check_args(&run_args(extra), no_jail).unwrap_err().to_string();
        assert!(refused(&["--expose-secret-to-guest", "anthropic"], false).contains("\"expose-secret-to-guest\""));
        assert!(refused(&["--learn"], false).contains("\"learn\""));
        assert!(refused(&[], true).contains("SBX_NO_JAIL"));
        assert!(refused(&["--allow", "*"], false).contains("\"allow-any\""));
        let clone_forbidden = parse(Path::new(PATH), b"version = 1\nforbid = [\"clone\"]\n").unwrap();
        let e = clone_forbidden.check_args(&run_args(&["--clone"]), false).unwrap_err().to_string();
        assert!(e.contains("forbid = [\"clone\"]") && e.contains("--clone"), "{e}");
        assert!(
            clone_forbidden.forbids("clone").is_err(),
            "a later run or sbx fetch of a clone sandbox is refused too"
        );
        assert!(p.check_args(&run_args(&["--clone"]), false).is_ok(), "not forbidden there");
        assert!(refused(&["--cpus", "3"], false).contains("caps --cpus at 2: 3 asked"));
        assert!(refused(&["--disk-size", "9"], false).contains("--disk-size"));
        assert!(p.check_args(&run_args(&["--cpus", "2", "--allow", "ok.example", "--mount", "/tmp"]), false).is_ok());
        assert_eq!(p.disk_gib(DEFAULT_DISK_GIB), 8, "the default lowered to the cap");
        assert!(p.check_args(&run_args(&[]), false).is_ok(), "defaults are lowered, not refused");
        assert!(matches!(p.memory_mib(Some(4096), 128), Err(Error::Cap { asked: 4096, max: 2048, .. })));
        assert_eq!(p.memory_mib(None, 4096).unwrap(), 2048, "a default above the cap is lowered to it");
        assert_eq!(p.memory_mib(Some(512), 1024).unwrap(), 512);
        // The merged network policy.
        let net = |t: &str| Policy::from_toml(t).unwrap();
        let e = p.check_network(&net("version = 1\npreset = \"open\"\n")).unwrap_err().to_string();
        assert!(e.contains("allow-any") || e.contains("preset"), "{e}");
        let p_open_ok = parse(Path::new(PATH), b"version = 1\nmax_preset = \"balanced\"\n").unwrap();
        let e = p_open_ok.check_network(&net("version = 1\npreset = \"open\"\n")).unwrap_err();
        assert!(matches!(e, Error::Preset { asked: "open", max: "balanced" }), "{e}");
        assert!(p_open_ok.check_network(&net("version = 1\npreset = \"balanced\"\n")).is_ok());
        let e = p.check_network(&net("version = 1\nhttps = \"passthrough\"\n")).unwrap_err().to_string();
        assert!(e.contains("\"passthrough\""), "{e}");
        let pinned = "version = 1\n[[rule]]\nallow = \"pin.example\"\npassthrough = true\n";
        assert!(p.check_network(&net(pinned)).is_err());
        let mut with_allow = net("version = 1\n");
        with_allow.allow("*").unwrap();
        assert!(p.check_network(&with_allow).unwrap_err().to_string().contains("allow-any"));
        assert!(p.check_network(&net("version = 1\n[[rule]]\nallow = \"a.example\"\n")).is_ok());
        // Nothing forbidden: nothing refused.
        let none = parse(Path::new(PATH), b"version = 1\n").unwrap();
        assert!(none.check_args(&run_args(&["--learn", "--expose-secret-to-guest", "x", "--cpus", "8"]), true).is_ok());
        assert!(none.check_network(&net("version = 1\npreset = \"open\"\nhttps = \"passthrough\"\n")).is_ok());
    }

    #[test]
    fn hot_reload_puts_a_new_file_in_force_and_keeps_the_last_good_on_a_bad_one() {
        let d = dir();
        let path = write(d.path(), GOOD);
        let first = load(&path).unwrap().unwrap();
        let live = Live::new("sb", LiveRules::default());
        live.set_admin(first.network.clone(), "loaded");
        let mut watch = Watch::new(&path, Some(&first));
        assert!(watch.poll().is_none(), "unchanged");
        let user = Policy::from_toml("version = 1\n[[rule]]\nallow = \"evil.example\"\n").unwrap();
        let h = HostName::parse("evil.example").unwrap();
        let denied = |live: &Live| {
            let (rules, now) = live.rules();
            judge(&user, &rules, &Request { host: &h, port: 443, http: None }, now).verdict == Verdict::Deny
        };
        assert!(denied(&live));
        let told = std::cell::RefCell::new(Vec::new());
        let tell = |l: &str| told.borrow_mut().push(l.to_string());
        // A bad file: refused, the last good layer stays.
        write(d.path(), "version = 1\n[[rule]]\ndeny = \n");
        let change = watch.poll().expect("a change");
        assert!(matches!(change, Change::Refused(_)));
        Watch::apply(change, &live, &tell);
        assert!(denied(&live), "a bad file never drops the admin layer");
        // An unsafe file: likewise.
        let path2 = write(d.path(), "version = 1\n");
        std::fs::set_permissions(&path2, std::fs::Permissions::from_mode(0o666)).unwrap();
        Watch::apply(watch.poll().expect("a change"), &live, &tell);
        assert!(denied(&live), "an unsafe file is not put in force");
        // Removed: likewise.
        std::fs::remove_file(&path2).unwrap();
        Watch::apply(watch.poll().expect("a change"), &live, &tell);
        assert!(denied(&live), "a removed file keeps the last good layer");
        // A good file without the deny: in force.
        let good2 = "version = 1\n[[rule]]\ndeny = \"other.example\"\n";
        write(d.path(), good2);
        let change = watch.poll().expect("a change");
        assert!(matches!(&change, Change::Reloaded(p) if p.sha256 == sha256_hex(good2.as_bytes())));
        Watch::apply(change, &live, &tell);
        assert!(!denied(&live), "the reloaded layer is in force");
        assert!(watch.poll().is_none());
        let events = live.take_events();
        let changes: Vec<&str> = events.iter().filter_map(|e| e["change"].as_str()).collect();
        assert_eq!(changes, ["loaded", "refused", "refused", "refused", "reloaded"]);
        assert_eq!(events[4]["sha256"], sha256_hex(good2.as_bytes()));
        assert!(told.borrow().iter().any(|l| l.contains("reloaded")));
    }
}
