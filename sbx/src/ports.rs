//! Host side: `sbx ports NAME [--publish [127.0.0.1:]HOSTPORT:GUESTPORT |
//! --unpublish HOSTPORT]` and `sbx run -p`: a guest TCP service reached on
//! the host's 127.0.0.1:HOSTPORT only (netstack's [`netstack::forward`]
//! does the forwarding, audited in the sandbox's log).
//!
//! Kept with the sandbox in `ports.json` (0600, in its 0700 directory),
//! like the live rules: a restarted sandbox publishes them again, binding
//! each before any thread is jailed; a host port in use then stops the
//! run with an error naming it and the cure.
//!
//! On a running sandbox, `--publish` binds 127.0.0.1:HOSTPORT in this
//! command's own (un-jailed) process — a port in use is named here — and
//! hands the listener to the sandbox over its admin socket (SCM_RIGHTS):
//! the sandbox's jailed threads never bind or listen, its network thread
//! only accepts. The sandbox checks the listener is a listening TCP
//! socket on 127.0.0.1:HOSTPORT before using it. On a stopped sandbox the
//! commands edit `ports.json` (a publish checks the port is free now).

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use netstack::forward::{self, Mapping, Ports};
use thiserror::Error;

use crate::admin::{self, Req};
use crate::escape;
use crate::sandbox::{self, Sandbox};

/// The persisted published ports' file name in the sandbox directory.
pub const PORTS_FILE: &str = "ports.json";

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error(transparent)]
    Forward(#[from] forward::Error),
    #[error("Cannot read {0}: {1} (remove it, or `sbx ports NAME --unpublish` each port, to start over)")]
    Read(PathBuf, String),
    #[error("Cannot write {0}: {1}")]
    Write(PathBuf, io::Error),
    #[error("Cannot publish host port {0} for sandbox '{1}': {2}")]
    Republish(u16, String, forward::Error),
}

/// Reads the persisted ports (none if there is no file).
pub fn load(dir: &Path) -> Result<Vec<Mapping>, Error> {
    let path = dir.join(PORTS_FILE);
    let mut text = Vec::new();
    match std::fs::File::open(&path) {
        Ok(f) => {
            f.take(forward::MAX_PORTS_FILE as u64 + 1)
                .read_to_end(&mut text)
                .map_err(|e| Error::Read(path.clone(), e.to_string()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Read(path, e.to_string())),
    }
    forward::from_json(&text).map_err(|e| Error::Read(path, e.to_string()))
}

/// Writes the persisted ports (0600, atomically).
pub fn save(dir: &Path, json: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(PORTS_FILE);
    let tmp = dir.join(format!("{PORTS_FILE}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(json.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::Write(path.clone(), e))
}

/// `sbx ports NAME`'s listing.
pub fn list_text(ports: &[Mapping]) -> String {
    if ports.is_empty() {
        return "no published ports\n".into();
    }
    let mut out = format!("{:<22} GUEST PORT\n", "HOST");
    for m in ports {
        out += &format!("{:<22} {}\n", format!("127.0.0.1:{}", m.host_port), m.guest_port);
    }
    out
}

/// The ports of a sandbox starting: the persisted ones and `extra`
/// (`sbx run -p`, which wins over a persisted one of the same host port),
/// each listened on at 127.0.0.1 now (before the jail), and kept.
pub fn open_all(dir: &Path, name: &str, extra: &[(u16, u16)]) -> Result<Arc<Ports>, Error> {
    let mut all = load(dir)?;
    for &(host_port, guest_port) in extra {
        all.retain(|m| m.host_port != host_port);
        all.push(Mapping { host_port, guest_port });
    }
    let ports = Ports::new();
    for m in &all {
        let listener =
            forward::bind_loopback(m.host_port).map_err(|e| Error::Republish(m.host_port, name.into(), e))?;
        ports
            .publish(m.host_port, m.guest_port, listener)
            .map_err(|e| Error::Republish(m.host_port, name.into(), e))?;
    }
    if let Some(json) = ports.take_dirty() {
        if !extra.is_empty() || dir.join(PORTS_FILE).exists() {
            save(dir, &json)?;
        }
    }
    Ok(ports)
}

/// What `sbx ports` was asked.
pub enum Action {
    List,
    Publish(String),
    Unpublish(u16),
}

/// `sbx ports NAME ...`: through the admin socket if the sandbox runs,
/// else on its `ports.json`. Prints the answer.
pub fn command(name: &str, action: Action) -> Result<ExitCode, Error> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let text = if sb.running_pid().is_some() { running(&sb, name, action)? } else { offline(&sb, action)? };
    let mut out = io::stdout().lock();
    let _ = out.write_all(escape::escape(text.as_bytes(), escape::Layout::Lines).as_bytes());
    if !text.ends_with('\n') {
        let _ = writeln!(out);
    }
    Ok(ExitCode::SUCCESS)
}

fn running(sb: &Sandbox, name: &str, action: Action) -> Result<String, Error> {
    let path = sb.dir().join(admin::SOCKET);
    let reply = match action {
        Action::List => admin::request(name, &path, &Req::Ports {})?,
        Action::Unpublish(host_port) => admin::request(name, &path, &Req::Unpublish { host_port })?,
        Action::Publish(raw) => {
            let (host_port, guest_port) = forward::parse_mapping(&raw)?;
            // Bound here, un-jailed: a port in use is named now.
            let listener = forward::bind_loopback(host_port)?;
            let req = Req::Publish { host_port, guest_port };
            admin::request_with_fd(name, &path, &req, Some(listener.as_fd()))?
        }
    };
    if !reply.ok {
        return Err(admin::Error::Refused(escape::escape(reply.text.as_bytes(), escape::Layout::Line)).into());
    }
    Ok(reply.text)
}

fn offline(sb: &Sandbox, action: Action) -> Result<String, Error> {
    let mut all = load(sb.dir())?;
    let text = match action {
        Action::List => return Ok(list_text(&all)),
        Action::Publish(raw) => {
            let (host_port, guest_port) = forward::parse_mapping(&raw)?;
            if let Some(m) = all.iter().find(|m| m.host_port == host_port) {
                return Err(forward::Error::AlreadyPublished(host_port, m.guest_port).into());
            }
            if all.len() >= forward::MAX_PUBLISHED {
                return Err(forward::Error::TooMany.into());
            }
            // Free now (it is bound again at the next run).
            drop(forward::bind_loopback(host_port)?);
            all.push(Mapping { host_port, guest_port });
            format!("127.0.0.1:{host_port} -> guest port {guest_port}: published from the next run")
        }
        Action::Unpublish(host_port) => {
            let before = all.len();
            all.retain(|m| m.host_port != host_port);
            if before == all.len() {
                return Err(forward::Error::NotPublished(host_port).into());
            }
            format!("127.0.0.1:{host_port}: unpublished")
        }
    };
    save(sb.dir(), &forward::to_json(&all))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netstack::live::{Live, LiveRules};
    use std::os::unix::fs::PermissionsExt;

    /// An admin socket served with published ports in a fresh directory.
    fn served() -> (tempfile::TempDir, Arc<Ports>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = admin::listen(dir.path()).unwrap();
        let ports = Ports::new();
        let (p, d) = (ports.clone(), dir.path().to_path_buf());
        let live = Live::new("sb", LiveRules::default());
        std::thread::spawn(move || {
            admin::serve_with_ports(
                listener,
                live,
                Some(p),
                netstack::policy::Policy::from_toml("version = 1\n").unwrap(),
                d,
            )
        });
        (dir, ports)
    }

    #[test]
    fn a_listener_handed_over_the_admin_socket_is_published_and_kept() {
        let (dir, ports) = served();
        let sock = dir.path().join(admin::SOCKET);
        let listener = forward::bind_loopback(0).unwrap();
        let host_port = listener.local_addr().unwrap().port();
        let req = Req::Publish { host_port, guest_port: 8000 };
        let r = admin::request_with_fd("sb", &sock, &req, Some(listener.as_fd())).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(ports.list(), vec![Mapping { host_port, guest_port: 8000 }]);
        let kept = load(dir.path()).unwrap();
        assert_eq!(kept, ports.list(), "kept at once");
        let mode = std::fs::metadata(dir.path().join(PORTS_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = admin::request("sb", &sock, &Req::Ports {}).unwrap();
        assert!(r.text.contains(&format!("127.0.0.1:{host_port}")) && r.text.contains("8000"), "{}", r.text);
        let r = admin::request("sb", &sock, &Req::Unpublish { host_port }).unwrap();
        assert!(r.ok, "{r:?}");
        assert!(ports.list().is_empty());
        assert!(load(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn publish_without_a_listener_or_with_a_wide_one_is_refused() {
        let (dir, ports) = served();
        let sock = dir.path().join(admin::SOCKET);
        let r = admin::request("sb", &sock, &Req::Publish { host_port: 18080, guest_port: 8000 }).unwrap();
        assert!(!r.ok && r.text.contains("listener must come with the request"), "{r:?}");
        let wide = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let host_port = wide.local_addr().unwrap().port();
        let req = Req::Publish { host_port, guest_port: 8000 };
        let r = admin::request_with_fd("sb", &sock, &req, Some(wide.as_fd())).unwrap();
        assert!(!r.ok && r.text.contains("not a TCP socket listening on 127.0.0.1"), "{r:?}");
        assert!(ports.list().is_empty());
    }

    #[test]
    fn a_restarted_sandbox_republishes_and_a_port_in_use_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let taken = forward::bind_loopback(0).unwrap();
        let busy = taken.local_addr().unwrap().port();
        let free = {
            let l = forward::bind_loopback(0).unwrap();
            l.local_addr().unwrap().port()
        };
        let ports = open_all(dir.path(), "sb", &[(free, 8000)]).unwrap();
        assert_eq!(ports.list(), vec![Mapping { host_port: free, guest_port: 8000 }]);
        assert_eq!(load(dir.path()).unwrap(), ports.list(), "-p is kept");
        drop(ports);
        // Restarted: the kept port is published again.
        let again = open_all(dir.path(), "sb", &[]).unwrap();
        assert_eq!(again.list(), vec![Mapping { host_port: free, guest_port: 8000 }]);
        drop(again);
        let e = open_all(dir.path(), "sb", &[(busy, 22)]).err().expect("refused").to_string();
        assert!(e.contains(&format!("Host port {busy} is already in use on 127.0.0.1")), "{e}");
    }
}
