//! Host side: the `sbx` commands other than `run` — `exec`, `ls`, `stop`,
//! `rm`, `log`, `policy explain`, `policy explain-file`. What they print
//! that the guest chose is escaped.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use netstack::policy::{Action, Policy, Request, Target};
use thiserror::Error;
use vmm::devices::console;
use vmm::fs::policy::Access;

use crate::cli::ExecArgs;
use crate::client::{self, Outcome};
use crate::escape::{self, Layout};
use crate::policy_doc::{self, SandboxPolicy};
use crate::run::STOP_GRACE;
use crate::sandbox::{self, Sandbox};
use crate::terminal;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error(transparent)]
    MachinePolicy(#[from] crate::machine_policy::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("Sandbox '{0}' is not running (start it with `sbx run`)")]
    NotRunning(String),
    #[error("Sandbox '{0}' is starting or stopping; try again")]
    Starting(String),
    #[error("Sandbox '{0}' did not stop within {1} s")]
    DidNotStop(String, u64),
    #[error("Cannot signal the VMM (pid {0}): {1}")]
    Signal(i32, io::Error),
    #[error("Bad --env '{0}': use KEY=VALUE")]
    Env(String),
    #[error(transparent)]
    Session(#[from] client::Error),
    /// guest-init could not run the command (its words, escaped).
    #[error("{0}")]
    Failed(String),
    #[error("Cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("Cannot read {0}: there is no {1} yet")]
    NoLog(PathBuf, &'static str),
    #[error(transparent)]
    Audit(#[from] audit::Error),
    #[error(transparent)]
    Policy(#[from] policy_doc::Error),
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Preset(netstack::policy::Error),
    #[error(transparent)]
    Files(vmm::fs::policy::Error),
    #[error("Cannot write to stdout: {0}")]
    Stdout(io::Error),
    #[error(transparent)]
    Admin(#[from] crate::admin::Error),
}

type Result<T> = std::result::Result<T, CommandError>;

/// `sbx exec`: a command beside the sandbox's first program.
pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    let sb = Sandbox::open(&sandbox::home(), &args.name)?;
    if sb.running_pid().is_none() {
        return Err(CommandError::NotRunning(args.name));
    }
    let mut env = Vec::new();
    for kv in &args.env {
        let (k, v) = kv.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or(CommandError::Env(kv.clone()))?;
        env.push((k.to_string(), v.to_string()));
    }
    let interactive = args.tty || (!args.no_tty && terminal::is_tty(0) && terminal::is_tty(1));
    if interactive {
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
    }
    let cwd = if args.cwd.is_empty() { sb.settings.workspace.to_string_lossy().into_owned() } else { args.cwd };
    let open = protocol::session::Open { argv: args.command, env, cwd, user: args.user, tty: None, main: false };
    let outcome = client::exec(&sb.control_socket(), open, interactive, Duration::from_secs(args.wait))?;
    Ok(match outcome {
        Outcome::Exited(c) => ExitCode::from(c as u8),
        Outcome::Killed(s) => ExitCode::from(128u8.wrapping_add(s as u8)),
        Outcome::Failed(m) => return Err(CommandError::Failed(escape::line(&m))),
    })
}

/// `sbx ls`.
pub fn ls() -> Result<()> {
    let list = Sandbox::list(&sandbox::home())?;
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:<10} {:<6} {:<24} WORKSPACE",
        "NAME", "AGENT", "STATE", "LAST", "NET open/held/lim/tmo"
    );
    for sb in list {
        let state = match sb.running_pid() {
            Some(pid) => format!("running:{pid}"),
            None => "stopped".into(),
        };
        let last = sb.last_run().ok().flatten().map(|l| l.exit_code.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<10} {:<6} {:<24} {}",
            escape::line(&sb.settings.name),
            escape::line(&sb.settings.agent),
            state,
            last,
            net_figures(&sb.net_stats()),
            escape::escape(sb.settings.workspace.as_os_str().as_encoded_bytes(), Layout::Line)
        );
    }
    Ok(())
}

/// netstack's connection counters of a sandbox's (last) run, as `sbx ls`
/// shows them: connections open now, held (awaiting a response or the
/// guest), refused for the connection limit, ended by a time limit; "-"
/// when there are none (no network, never run). The file is the VMM's
/// (it runs as the user), read as untrusted: only the numbers are used.
fn net_figures(path: &std::path::Path) -> String {
    use std::io::Read as _;
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_string(&mut text));
    let Some(v) = read.ok().and_then(|_| serde_json::from_str::<serde_json::Value>(&text).ok()) else {
        return "-".into();
    };
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    format!("{}/{}/{}/{}", n("open"), n("held"), n("refused_for_limit"), n("timed_out"))
}

/// `sbx stop`: the VMM turns SIGTERM into an orderly stop; waits for it.
pub fn stop(name: &str) -> Result<()> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let mut pid = sb.running_pid().ok_or_else(|| CommandError::NotRunning(name.into()))?;
    // Pid 0: the VMM holds the lock but has not written its pid yet.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pid == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        pid = sb.running_pid().unwrap_or(0);
    }
    if pid == 0 {
        return Err(CommandError::Starting(name.into()));
    }
    crate::signals::terminate(pid).map_err(|e| CommandError::Signal(pid, e))?;
    // The guest powers off in order, or is stopped hard after STOP_GRACE.
    let limit = STOP_GRACE + Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    while sb.running_pid().is_some() {
        if Instant::now() > deadline {
            return Err(CommandError::DidNotStop(name.into(), limit.as_secs()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `sbx rm`.
pub fn rm(name: &str) -> Result<()> {
    Ok(Sandbox::open(&sandbox::home(), name)?.remove()?)
}

/// `sbx log NAME [--audit]`: the console log, or the audit log after its
/// hash chain is verified; escaped either way (the guest wrote the
/// console and chose the audit log's host and file names). With
/// `--audit`, the evidence file's chain is verified too, and its refusals
/// that the kept audit log no longer has are printed first.
pub fn log(name: &str, audit: bool) -> Result<()> {
    let sb = Sandbox::open(&sandbox::home(), name)?;
    let path = if audit { sb.audit_log() } else { sb.console_log() };
    let mut text = Vec::new();
    // Oldest first: the rotated files, then the current one.
    let files = if audit {
        let files = audit::log_files(&path).map_err(|e| CommandError::Read(path.clone(), e.to_string()))?;
        if files.is_empty() {
            return Err(CommandError::NoLog(path, "audit log"));
        }
        let verified = audit::verify_files(&files)?;
        if verified.first_seq > 1 || verified.torn_tail.is_some() {
            eprintln!("sbx: {}: {verified}", path.display());
        }
        if let Some(evidence) = audit::evidence_report(&path, &verified)? {
            if evidence.older_lines > 0 || evidence.verified.torn_tail.is_some() {
                eprintln!("sbx: {evidence}");
            }
            text = evidence.older;
        }
        files
    } else {
        let files = console::log_files(&path);
        if files.is_empty() {
            return Err(CommandError::NoLog(path, "console log"));
        }
        files
    };
    for f in &files {
        text.extend(std::fs::read(f).map_err(|e| CommandError::Read(f.clone(), e.to_string()))?);
    }
    let layout = if audit { Layout::JsonLines } else { Layout::Lines };
    io::stdout().write_all(escape::escape(&text, layout).as_bytes()).map_err(CommandError::Stdout)
}

/// `sbx policy explain`: the rules that match `url` and the decision —
/// made by the stack's own decision function ([`netstack::live::judge`]),
/// with sandbox `sandbox`'s kept live rules if given; exit 0 if allowed,
/// 1 if denied or held.
pub fn policy_explain(
    url: &str,
    file: Option<&Path>,
    preset: &str,
    method: &str,
    sandbox: Option<&str>,
) -> Result<ExitCode> {
    let policy = match file {
        Some(path) => SandboxPolicy::read(path)?.network,
        None => Policy::preset(preset).map_err(CommandError::Preset)?,
    };
    let now = sandbox::now_unix_ms();
    let mut live = match sandbox {
        Some(name) => crate::admin::load(Sandbox::open(&sandbox::home(), name)?.dir(), now)?,
        None => netstack::live::LiveRules::default(),
    };
    // The machine's admin policy decides first here as in every sandbox.
    if let Some(machine) = crate::machine_policy::load(Path::new(crate::machine_policy::PATH))? {
        live.set_admin(std::sync::Arc::new(machine.network));
    }
    let target = Target::parse_url(url).map_err(CommandError::Url)?;
    // HTTPS that netstack terminates is checked request by request.
    let terminated = target.https && netstack::live::terminates(&policy, &live, &target.host, target.port);
    let http = (!target.https || terminated).then_some((method, target.path.as_str()));
    let req = Request { host: &target.host, port: target.port, http };
    let mut out = io::stdout().lock();
    if terminated {
        let _ = writeln!(out, "TLS terminated by netstack: the request is checked like plain HTTP");
    } else if target.https {
        let _ = writeln!(
            out,
            "TLS spliced by SNI (passthrough): only the server name is checked, not the method, path or Host inside, so other tenants of the same front end are reachable (domain fronting)"
        );
    }
    for c in policy.credentials.iter().filter(|c| c.bound_to(&target.host)) {
        let _ = writeln!(out, "{c} (injected over terminated TLS)");
    }
    let matched = policy.explain(&req);
    if matched.is_empty() {
        let _ = writeln!(out, "no rule matches {}:{}", target.host, target.port);
    }
    for rule in matched {
        let _ = writeln!(out, "matches {rule}");
    }
    for action in [Action::Deny, Action::Allow] {
        if let Some(r) = live.matching(action, &req, now) {
            let _ = writeln!(out, "matches {r} ({})", r.limit_text(now));
        }
    }
    let j = netstack::live::judge(&policy, &live, &req, now);
    let _ = writeln!(out, "{}", j.reason);
    Ok(if j.allowed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `sbx policy show`: the rules in order, then the credentials and where
/// they go (names and hosts; never a value).
pub fn policy_show(agent: &str, file: Option<&Path>) -> Result<()> {
    let mut policy = match file {
        Some(path) => SandboxPolicy::read(path)?.network,
        None => SandboxPolicy::locked()?.network,
    };
    policy.add_agent(agent).map_err(CommandError::Preset)?;
    let machine = crate::machine_policy::load(Path::new(crate::machine_policy::PATH))?;
    let mut out = io::stdout().lock();
    if let Some(m) = &machine {
        let _ = writeln!(out, "admin policy {} (sha256 {}): its deny rules beat every other rule, its ask rules hold what any other allows:", m.path.display(), m.sha256);
        for rule in &m.network.denies {
            let _ = writeln!(out, "  admin  {rule}");
        }
        for ask in &m.network.asks {
            let _ = writeln!(out, "  admin  {ask}");
        }
        if !m.forbid.is_empty() {
            let _ = writeln!(out, "  admin  forbids: {}", m.forbid.join(", "));
        }
    }
    let _ = writeln!(out, "network rules for agent '{agent}' (denied if a deny rule matches, else allowed if an allow rule does, else denied):");
    if policy.rules.is_empty() {
        let _ = writeln!(out, "  (none: everything is denied)");
    }
    for rule in &policy.rules {
        let _ = writeln!(out, "  {:<6} {rule}", crate::admin::layer(&rule.origin));
    }
    for ask in &policy.asks {
        let layer = if ask.origin.starts_with("ask:") { "preset" } else { "file" };
        let _ = writeln!(out, "  {layer:<6} {ask}");
    }
    for c in &policy.credentials {
        let hosts: Vec<String> = c.hosts.iter().map(|h| h.to_string()).collect();
        let scheme = c.scheme.as_deref().map(|s| format!("{s} ")).unwrap_or_default();
        let _ = writeln!(out, "credential {}: header '{}: {scheme}<secret>' to {}", c.name, c.header, hosts.join(", "));
    }
    Ok(())
}

/// `sbx policy explain-file`: hidden, read-only or read-write.
pub fn explain_file(path: &str, file: Option<&Path>) -> Result<()> {
    let policy = match file {
        Some(f) => SandboxPolicy::read(f)?,
        None => SandboxPolicy::locked()?,
    };
    let fs = policy.fs_policy(&[], &[]).map_err(CommandError::Files)?;
    let is_dir = path.ends_with('/');
    let access = match fs.access(Path::new(path.trim_end_matches('/')), is_dir) {
        Access::Hidden => "hidden",
        Access::ReadOnly => "read-only",
        Access::ReadWrite => "read-write",
    };
    let _ = writeln!(io::stdout().lock(), "{path}: {access}");
    Ok(())
}
