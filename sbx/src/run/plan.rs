//! Host side: `sbx run`'s plan — every argument checked, every path
//! resolved, the sandbox opened (or made) and its stored settings checked,
//! before anything starts. A bad argument is the user's to fix now, with
//! an error naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use netstack::host::HostName;
use netstack::policy::{Origin, Policy};
use netstack::terminate::{self, Termination};
use thiserror::Error;
use vmm::arch::cpuid::{self, CpuTemplate};
use vmm::fs::policy::FsPolicy;
use vmm::fs::quota::Quota;

use crate::agents::{self, Agent};
use crate::cli::RunArgs;
use crate::folders;
use crate::limits::Limits;
use crate::machine_policy::{self, MachinePolicy};
use crate::policy_doc::{self, SandboxPolicy};
use crate::sandbox::{self, Sandbox, Settings};
use crate::secrets;
use crate::terminal;

/// Largest sandbox disk, in GiB.
pub const MAX_DISK_GIB: u64 = 1 << 14;

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("Unknown agent '{0}' (expected one of: {list})", list = agents::names().join(", "))]
    UnknownAgent(String),
    #[error("{0} (the presets built into this sbx are bad: rebuild it)")]
    Presets(&'static netstack::preset::Error),
    #[error("Bad --env '{0}': use KEY=VALUE")]
    Env(String),
    #[error("--memory {got}: agent '{agent}' needs at least {min} MiB")]
    Memory { agent: &'static str, min: u64, got: u64 },
    #[error("Cannot read the current directory: {0}")]
    CurrentDir(std::io::Error),
    #[error(transparent)]
    Folder(#[from] folders::Error),
    #[error("Bad --cpu-template: {0}")]
    CpuTemplate(String),
    #[error("{what} not found at {path}: {hint}")]
    Missing { what: String, path: PathBuf, hint: String },
    #[error("Disk size must be 1 to {MAX_DISK_GIB} GiB, got {0}")]
    DiskSize(u64),
    #[error(transparent)]
    Policy(#[from] policy_doc::Error),
    #[error("The default network rules of agent '{0}': {1}")]
    Agent(String, netstack::policy::Error),
    #[error("Bad --approval '{0}': use ask or deny")]
    Approval(String),
    #[error("Bad --approval-wait {0}: give 1 to {MAX_APPROVAL_WAIT} seconds")]
    ApprovalWait(u64),
    #[error("--allow {0}: {1}")]
    Allow(String, netstack::policy::Error),
    #[error("--resolve {0}: {1}")]
    Resolve(String, String),
    #[error("-p needs the guest's network: drop --no-network, or -p")]
    PublishNoNetwork,
    #[error("Bad -p: {0}")]
    Publish(#[source] netstack::forward::Error),
    #[error("sbx's state folder {0} (SBX_HOME): {1}")]
    State(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    BootFile(PathBuf, std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("Sandbox '{name}' shares {has}, not {asked}: a sandbox keeps its workspace (use another --name)")]
    KeepsWorkspace { name: String, has: PathBuf, asked: PathBuf },
    #[error("Cannot hide the boot files: {0}")]
    Hide(vmm::fs::policy::Error),
    #[error("Cannot share {0}: the path is not UTF-8")]
    NotUtf8(PathBuf),
    #[error(transparent)]
    Secrets(#[from] secrets::Error),
    #[error("TLS termination: {0}")]
    Tls(#[from] terminate::Error),
    #[error("sbx's config folder {0} (SBX_CONFIG): {1}")]
    Config(PathBuf, std::io::Error),
    #[error(transparent)]
    Admin(#[from] machine_policy::Error),
    #[error(transparent)]
    Clone(#[from] crate::clone::CloneError),
}

/// For one share, the file-policy patterns sbx adds: (hidden, read-only).
type SharePatterns = (Vec<String>, Vec<String>);

/// A shared folder: where, read-only or not, under which policy.
#[derive(Debug, Clone)]
pub struct SharePlan {
    pub dir: PathBuf,
    pub read_only: bool,
    pub policy: FsPolicy,
}

/// Longest `--approval-wait`, in seconds (the guest's connection is held
/// open that long; its idle limit is longer).
pub const MAX_APPROVAL_WAIT: u64 = 540;

/// The guest's network, if it has one.
#[derive(Debug, Clone)]
pub struct NetPlan {
    pub policy: Policy,
    /// `--resolve`: names sent to host addresses.
    pub overrides: Vec<((HostName, u16), SocketAddr)>,
    /// TLS termination: the installation's CA, the upstream trust roots,
    /// the credentials to inject.
    pub termination: Arc<Termination>,
    /// The CA certificate the guest trusts (PEM).
    pub ca_cert: String,
    /// Each credential's variable with its placeholder, for the guest.
    pub guest_env: Vec<(String, String)>,
    /// How long a held request waits for a person (`--approval-wait`).
    pub approval_wait_ms: u64,
    /// `--learn`: questions answered yes at once, recorded.
    pub learn: bool,
    /// A subscription sign-in kept on the host (`sbx secret
    /// oauth-import`): the guest's credential file, with placeholders.
    pub oauth: Option<OAuthRun>,
    /// `-p HOSTPORT:GUESTPORT`: published on 127.0.0.1 (with the persisted).
    pub publish: Vec<(u16, u16)>,
}

/// What a run with an OAuth secret does beside the injection itself.
#[derive(Debug, Clone)]
pub struct OAuthRun {
    /// The secret's name (`claude-oauth`).
    pub name: String,
    /// The agent's credential file for the guest (placeholders only).
    pub guest_file: String,
    /// Where in the guest's home it goes.
    pub guest_path: &'static str,
    /// The host folder netstack's threads write refreshed tokens to.
    pub store_dir: PathBuf,
}

/// The guest's variable carrying the OAuth credential file (placeholders:
/// worthless outside this run) to the wrapper that writes it.
pub const OAUTH_FILE_VAR: &str = "SBX_OAUTH_FILE";

/// Everything `sbx run` will do, checked.
pub struct RunPlan {
    pub sandbox: Sandbox,
    /// `--clone` (now or when the sandbox was made): the workspace is not
    /// shared; the guest has its own clone (see `clone`).
    pub clone: Option<crate::clone::CloneState>,
    pub agent: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub template: CpuTemplate,
    pub pvm: bool,
    pub memory_mib: u64,
    /// The agent's own settings, in its programs' environment.
    pub agent_env: Vec<(String, String)>,
    /// `--env`: the program's (the main session's) extra environment.
    pub env: Vec<(String, String)>,
    pub cpus: u8,
    pub disk_gib: u64,
    /// `--cpu-limit`, `--pids-limit` (applied by `limits::apply`).
    pub limits: Limits,
    /// `--workspace-quota`: bytes the guest may add to the shared folders
    /// in all during the run, one count for all their file servers.
    pub workspace_quota: Option<Arc<Quota>>,
    pub kernel_log: bool,
    pub kernel_args: String,
    pub console_echo: bool,
    pub timeout: Option<Duration>,
    pub profile: Option<PathBuf>,
    pub report: Option<PathBuf>,
    /// The workspace first (unless `--clone`: not shared), then each
    /// `--mount`.
    pub shares: Vec<SharePlan>,
    pub net: Option<NetPlan>,
    /// The program and how it talks to the user.
    pub argv: Vec<String>,
    pub user: String,
    pub interactive: bool,
    pub rows: u16,
    pub cols: u16,
    /// For the audit log's `run` line: the SHA-256 of the policy document
    /// as read (the built-in locked preset's name when there is none),
    /// then each `--allow`, and where it came from.
    pub policy_sha256: String,
    pub policy_source: String,
    /// The machine's admin policy ([`machine_policy::PATH`]), if there is
    /// one: its network rules go to netstack, its file is watched.
    pub admin: Option<MachinePolicy>,
    /// The admin policy's `audit_copy` folder for this user: the run's
    /// verified audit log is copied there at its end.
    pub audit_copy: Option<PathBuf>,
}

/// The SHA-256 (hex) of the effective policy document's text: the file's
/// bytes (or the built-in preset's name) and a `# --allow HOST` line for
/// each `--allow`.
fn policy_digest(args: &RunArgs) -> Result<(String, String), PlanError> {
    use sha2::Digest;
    let (mut text, source) = match &args.policy {
        Some(path) => {
            let read = std::fs::read(path).map_err(|e| policy_doc::Error::Read(path.clone(), e))?;
            (read, path.display().to_string())
        }
        None => (b"builtin: locked preset".to_vec(), "the locked preset".to_string()),
    };
    for host in &args.allow {
        text.extend_from_slice(format!("\n# --allow {host}").as_bytes());
    }
    let digest = sha2::Sha256::digest(&text);
    Ok((digest.iter().map(|b| format!("{b:02x}")).collect(), source))
}

/// Where `cargo xtask` puts kernels and images: $SBX_ASSETS, or target/sbx
/// next to this binary's `target/<profile>/` directory.
pub fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SBX_ASSETS") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("sbx")))
        .unwrap_or_else(|| PathBuf::from("target/sbx"))
}

fn existing(path: PathBuf, what: &str, hint: &str) -> Result<PathBuf, PlanError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(PlanError::Missing { what: what.into(), path, hint: hint.into() })
    }
}

/// `DIR[:ro|:rw]` -> (absolute folder, read-only).
pub fn parse_mount(text: &str) -> Result<(PathBuf, bool), PlanError> {
    let (dir, read_only) = match text.rsplit_once(':') {
        Some((d, "ro")) => (d, true),
        Some((d, "rw")) => (d, false),
        _ => (text, true),
    };
    Ok((folders::check(Path::new(dir), &format!("--mount {text}:"))?, read_only))
}

/// NAME:PORT:ADDR:APORT -> ((name, port), address).
pub fn parse_resolve(text: &str) -> Result<((HostName, u16), SocketAddr), PlanError> {
    let bad = |why: String| PlanError::Resolve(text.into(), why);
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected NAME:PORT:ADDR:APORT".into()));
    };
    let name = HostName::parse(name).map_err(|e| bad(e.to_string()))?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("bad port".into()))?;
    let addr: SocketAddr = addr.parse().map_err(|_| bad(format!("bad address '{addr}' (expected IP:PORT)")))?;
    Ok(((name, port), addr))
}

/// The network: the policy's rules, the agent's needs, `--allow`,
/// `--resolve`.
fn net_plan(
    args: &RunArgs,
    mut policy: Policy,
    scope: &secrets::RunScope,
    admin: Option<&MachinePolicy>,
) -> Result<NetPlan, PlanError> {
    policy.add_agent(&args.agent).map_err(|e| PlanError::Agent(args.agent.clone(), e))?;
    if args.learn {
        policy.approval = netstack::live::Approval::Ask;
    }
    if let Some(a) = args.approval.as_ref().filter(|_| !args.learn) {
        policy.approval = netstack::live::Approval::parse(a).ok_or_else(|| PlanError::Approval(a.clone()))?;
    }
    if !(1..=MAX_APPROVAL_WAIT).contains(&args.approval_wait) {
        return Err(PlanError::ApprovalWait(args.approval_wait));
    }
    for host in &args.allow {
        policy.allow(host).map_err(|e| PlanError::Allow(host.clone(), e))?;
    }
    if let Some(admin) = admin {
        admin.check_network(&policy)?;
    }
    let overrides = args.resolve.iter().map(|r| parse_resolve(r)).collect::<Result<_, _>>()?;
    let publish = args
        .publish
        .iter()
        .map(|m| netstack::forward::parse_mapping(m).map_err(PlanError::Publish))
        .collect::<Result<_, _>>()?;
    let config = secrets::config_dir();
    let authority = Arc::new(secrets::authority(&config)?);
    let mut roots = match terminate::host_roots() {
        Ok((roots, _)) => roots,
        Err(e) => {
            eprintln!("sbx: {e}: upstreams netstack terminates TLS for will not verify");
            rustls::RootCertStore::empty()
        }
    };
    if let Some(extra) = &args.upstream_ca {
        terminate::add_pem_roots(&mut roots, extra)?;
    }
    let mut run =
        secrets::for_run(&config, &policy.credentials, &args.expose_secret_to_guest, scope, secrets::now_unix())?;
    for note in &run.notes {
        eprintln!("sbx: {note}");
    }
    let oauth = match crate::oauth_secrets::imported(&config, &args.agent) {
        Some(name) => {
            let (session, guest_file, guest_path) = crate::oauth_secrets::for_run(&config, &name, &scope.sandbox)?;
            let raw = netstack::credential::FileCredential {
                name: name.clone(),
                hosts: session.provider.api_hosts.iter().map(|h| h.to_string()).collect(),
                header: "authorization".into(),
                scheme: Some("Bearer".into()),
                env: None,
            };
            let origin = Origin::Agent(agents::find(&args.agent).map_or("agent", |a| a.name));
            let rule = netstack::credential::CredentialRule::parse(raw, origin)
                .map_err(|e| PlanError::Agent(args.agent.clone(), netstack::policy::Error::Credential(e)))?;
            run.credentials = run.credentials.with(netstack::credential::Credential::oauth(rule, session));
            // The agent would prefer an API key in its environment to the
            // sign-in: the key's placeholder is not given.
            let keys: Vec<String> = policy
                .credentials
                .iter()
                .filter(|c| matches!(c.origin, Origin::Agent(_)))
                .filter_map(|c| c.env.clone())
                .collect();
            run.guest_env.retain(|(k, _)| !keys.contains(k));
            run.guest_env.push((OAUTH_FILE_VAR.to_string(), guest_file.clone()));
            eprintln!("sbx: {} signs in with secret '{name}': its tokens stay on the host", args.agent);
            let store_dir = crate::oauth_secrets::oauth_reach(&config);
            Some(OAuthRun { name, guest_file, guest_path, store_dir })
        }
        None => None,
    };
    let ca_cert = authority.cert_pem().to_string();
    let termination = Arc::new(Termination::new(authority, roots, run.credentials)?);
    let approval_wait_ms = args.approval_wait * 1000;
    Ok(NetPlan {
        policy,
        overrides,
        termination,
        ca_cert,
        guest_env: run.guest_env,
        approval_wait_ms,
        publish,
        learn: args.learn,
        oauth,
    })
}

impl RunPlan {
    /// Checks the arguments and opens (or makes) the sandbox.
    pub fn new(args: &RunArgs) -> Result<RunPlan, PlanError> {
        let agent: &Agent = agents::find(&args.agent).ok_or_else(|| match agents::load_error() {
            Some(e) => PlanError::Presets(e),
            None => PlanError::UnknownAgent(args.agent.clone()),
        })?;
        // The machine's admin policy first: present but unusable, nothing runs.
        let admin = machine_policy::load(Path::new(machine_policy::PATH))?;
        if let Some(admin) = &admin {
            admin.check_args(args, std::env::var_os(super::NO_JAIL).is_some())?;
        }
        let memory_mib = match &admin {
            Some(a) => a.memory_mib(args.memory, agent.default_memory_mib)?,
            None => args.memory.unwrap_or(agent.default_memory_mib),
        };
        let disk_gib = admin.as_ref().map_or(args.disk_size, |a| a.disk_gib(args.disk_size));
        let audit_copy = match &admin {
            Some(a) => a.audit_copy_dir(crate::admin::own_uid())?,
            None => None,
        };
        let mut env = Vec::new();
        for kv in &args.env {
            let (k, v) = kv.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| PlanError::Env(kv.clone()))?;
            env.push((k.to_string(), v.to_string()));
        }
        if memory_mib < agent.min_memory_mib {
            return Err(PlanError::Memory { agent: agent.name, min: agent.min_memory_mib, got: memory_mib });
        }
        let workspace = match &args.workspace {
            Some(w) => w.clone(),
            None => std::env::current_dir().map_err(PlanError::CurrentDir)?,
        };
        let workspace = folders::check(&workspace, "Workspace")?;
        let mounts = args.mount.iter().map(|m| parse_mount(m)).collect::<Result<Vec<_>, _>>()?;
        let template = match args.cpu_template.as_str() {
            "auto" => cpuid::auto_template(),
            other => other.parse::<CpuTemplate>().map_err(PlanError::CpuTemplate)?,
        };
        let assets = assets_dir();
        let kernel = existing(
            args.kernel.clone().unwrap_or_else(|| assets.join("kernel/vmlinux")),
            "Kernel",
            "build it with `cargo xtask kernel` or pass --kernel",
        )?;
        let image_dir = args.image.clone().unwrap_or_else(|| assets.join("images").join(agent.image));
        let (what, hint) = (
            format!("Image '{}'", args.agent),
            format!("build it with `cargo xtask image {}` or pass --image", args.agent),
        );
        let initrd = existing(image_dir.join("init.cpio"), &what, &hint)?;
        let rootfs = existing(image_dir.join("rootfs.ext4"), &what, &hint)?;
        if args.disk_size == 0 || args.disk_size > MAX_DISK_GIB {
            return Err(PlanError::DiskSize(args.disk_size));
        }
        let policy = match &args.policy {
            Some(path) => SandboxPolicy::read(path)?,
            None => SandboxPolicy::locked()?,
        };
        // The secrets a run gets depend on its sandbox's name and workspace:
        // an existing sandbox keeps its own (checked below, before any start).
        let name = args.name.clone().unwrap_or_else(|| sandbox::default_name(&args.agent, &workspace));
        let existing = Sandbox::open(&sandbox::home(), &name).ok();
        let run_workspace = existing.as_ref().map_or_else(|| workspace.clone(), |sb| sb.settings.workspace.clone());
        // A clone sandbox stays one; a sharing one never becomes one.
        let stored_clone = match &existing {
            Some(sb) => crate::clone::CloneState::load(sb.dir())?,
            None => None,
        };
        if args.clone && existing.is_some() && stored_clone.is_none() {
            return Err(crate::clone::CloneError::NotACloneSandbox(name).into());
        }
        let clone_mode = args.clone || stored_clone.is_some();
        // A sandbox made with --clone before the admin forbade it runs no more.
        if let (Some(admin), Some(_)) = (&admin, &stored_clone) {
            admin.forbids("clone")?;
        }
        let scope = secrets::RunScope { workspace: run_workspace, sandbox: name.clone() };
        if args.no_network && !args.publish.is_empty() {
            return Err(PlanError::PublishNoNetwork);
        }
        let net =
            if args.no_network { None } else { Some(net_plan(args, policy.network.clone(), &scope, admin.as_ref())?) };

        // sbx's own state and the files it boots from stay out of the
        // guest's reach: checked before the sandbox's folder is made, and
        // again with the workspace its settings name.
        let home = sandbox::home();
        let state = folders::canonical_lenient(&home).map_err(|e| PlanError::State(home.clone(), e))?;
        // The CA key and the secrets too.
        let config_dir = secrets::config_dir();
        let config = folders::canonical_lenient(&config_dir).map_err(|e| PlanError::Config(config_dir, e))?;
        // sbx itself too: when the workspace is sbx's own repository, the
        // guest must not be able to replace the binary the user runs next.
        let exe = std::env::current_exe().map_err(|e| PlanError::BootFile(PathBuf::from("sbx"), e))?;
        let boot = [&assets, &kernel, &image_dir, &exe]
            .into_iter()
            .map(|p| folders::canonical_lenient(p).map_err(|e| PlanError::BootFile(p.clone(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        // What sbx reads at start from files the user named: read-only to
        // the guest wherever a read-write share holds them.
        let start_files: Vec<PathBuf> = args.policy.iter().chain(&args.upstream_ca).cloned().collect();
        // The machine's admin policy, and where it copies audit logs:
        // never writable by a guest (the policy is reloaded while running).
        let admin_dirs = Path::new(machine_policy::PATH)
            .parent()
            .into_iter()
            .map(Path::to_path_buf)
            .chain(admin.as_ref().and_then(|a| a.audit_copy.clone()))
            .map(|p| folders::canonical_lenient(&p).map_err(|e| PlanError::BootFile(p.clone(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let check_shares = |shares: &[(PathBuf, bool)]| -> Result<Vec<SharePatterns>, PlanError> {
            folders::check_state(&state, shares)?;
            folders::check_admin(&admin_dirs, shares)?;
            folders::check_state(&config, shares)?;
            let hide = folders::boot_files_to_hide(&boot, shares)?;
            folders::check_overlaps(shares)?;
            let protect = folders::start_files_to_protect(&start_files, shares)?;
            Ok(hide.into_iter().zip(protect).collect())
        };
        // With --clone the workspace is not shared at all.
        let shared_workspace = |w: &PathBuf| if clone_mode { vec![] } else { vec![(w.clone(), false)] };
        check_shares(&[shared_workspace(&workspace), mounts.clone()].concat())?;
        let settings = Settings { name, agent: args.agent.clone(), workspace, created_unix: sandbox::now_unix() };
        // The folder asked for: --workspace, or the current one when the
        // name comes from it.
        let asked = (args.workspace.is_some() || args.name.is_none()).then(|| settings.workspace.clone());
        let sb = Sandbox::open_or_create(&home, settings)?;
        // Read back from disk: checked like the user's own input.
        folders::check_stored(&sb.settings_file(), &sb.settings.workspace)?;
        if let Some(asked) = asked.filter(|w| *w != sb.settings.workspace) {
            let (name, has) = (sb.settings.name.clone(), sb.settings.workspace.clone());
            return Err(PlanError::KeepsWorkspace { name, has, asked });
        }
        let clone = match stored_clone {
            Some(state) => Some(state),
            None if clone_mode => match crate::clone::prepare(&sb, &args.user) {
                Ok(state) => Some(state),
                Err(e) => {
                    // Made now: not left behind as a sandbox sharing the folder.
                    if existing.is_none() {
                        let _ = sb.remove();
                    }
                    return Err(e.into());
                }
            },
            None => None,
        };
        if clone.is_some() && sb.settings.workspace.to_str().is_none() {
            return Err(PlanError::NotUtf8(sb.settings.workspace.clone()));
        }
        let folders = [shared_workspace(&sb.settings.workspace), mounts].concat();
        let hide = check_shares(&folders)?;
        let mut shares = Vec::new();
        for ((dir, read_only), (hide, protect)) in folders.into_iter().zip(&hide) {
            if dir.to_str().is_none() {
                return Err(PlanError::NotUtf8(dir));
            }
            let policy = policy.fs_policy(hide, protect).map_err(PlanError::Hide)?;
            shares.push(SharePlan { dir, read_only, policy });
        }

        let (policy_sha256, policy_source) = policy_digest(args)?;
        let argv = match net.as_ref().and_then(|n| n.oauth.as_ref()) {
            Some(o) => oauth_argv(agent.argv(&args.command), o.guest_path),
            None => agent.argv(&args.command),
        };
        let interactive = !args.no_tty && terminal::is_tty(0) && terminal::is_tty(1);
        let (rows, cols) = terminal::size(1).unwrap_or((24, 80));
        Ok(RunPlan {
            sandbox: sb,
            clone,
            agent: args.agent.clone(),
            kernel,
            initrd,
            rootfs,
            template,
            pvm: cpuid::host_is_pvm(),
            memory_mib,
            agent_env: agent.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            env,
            cpus: args.cpus,
            disk_gib,
            limits: Limits { cpu: args.cpu_limit, pids: args.pids_limit },
            workspace_quota: args.workspace_quota.map(|bytes| Arc::new(Quota::new(bytes))),
            kernel_log: args.kernel_log,
            kernel_args: args.kernel_args.clone(),
            console_echo: args.console,
            timeout: args.timeout.map(Duration::from_secs),
            profile: args.profile.clone(),
            report: args.report.clone(),
            shares,
            net,
            argv,
            user: args.user.clone(),
            interactive,
            rows,
            cols,
            policy_sha256,
            policy_source,
            admin,
            audit_copy,
        })
    }
}

/// The agent's command behind a small wrapper that first writes the
/// OAuth credential file (from [`OAUTH_FILE_VAR`], placeholders only) to
/// `guest_path` in the agent's home, private, then execs the agent with
/// the variable gone.
fn oauth_argv(argv: Vec<String>, guest_path: &str) -> Vec<String> {
    let script = format!(
        "umask 077 && f=\"$HOME/{guest_path}\" && mkdir -p \"${{f%/*}}\" && printf '%s' \"${OAUTH_FILE_VAR}\" > \"$f\" \
         && unset {OAUTH_FILE_VAR} && exec \"$@\""
    );
    let mut out = vec!["/bin/sh".to_string(), "-c".to_string(), script, "sbx-oauth".to_string()];
    out.extend(argv);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oauth_wrapper_writes_the_file_privately_then_runs_the_agent_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let argv = oauth_argv(
            vec!["sh".into(), "-c".into(), "echo \"$0|$1|${SBX_OAUTH_FILE:-gone}\"".into(), "a b".into()],
            ".claude/.credentials.json",
        );
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("HOME", dir.path())
            .env(OAUTH_FILE_VAR, "{\"claudeAiOauth\":{\"accessToken\":\"sbx-oauth-access-1\"}}")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b||gone\n", "arguments unchanged, the variable gone");
        let file = dir.path().join(".claude/.credentials.json");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "{\"claudeAiOauth\":{\"accessToken\":\"sbx-oauth-access-1\"}}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn resolve_and_mount_arguments_are_checked() {
        let ((name, port), addr) = parse_resolve("api.test:443:127.0.0.1:8443").unwrap();
        assert_eq!((name.as_str(), port, addr.to_string().as_str()), ("api.test", 443, "127.0.0.1:8443"));
        for bad in ["api.test", "api.test:0:127.0.0.1:1", "127.0.0.1:80:127.0.0.1:1", "a.test:80:nowhere"] {
            let e = parse_resolve(bad).unwrap_err();
            assert!(e.to_string().starts_with(&format!("--resolve {bad}: ")), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        assert_eq!(parse_mount(&format!("{}:rw", d.display())).unwrap(), (d.clone(), false));
        assert_eq!(parse_mount(&d.display().to_string()).unwrap(), (d.clone(), true));
        assert!(parse_mount(&format!("{}/none:ro", d.display())).is_err());
    }
}
