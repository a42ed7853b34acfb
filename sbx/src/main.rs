//! Host side: the `sbx` command line — run, list, stop, remove sandboxes and
//! read their logs. No unsafe here; the VMM library does the machine work.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use netstack::audit::{AuditLog, SharedLog};
use netstack::host::HostName;
use netstack::policy::Policy;
use netstack::stack::{Config as NetConfig, NetStack, Resolver};
use protocol::{Frame, Job};
use sbx::client;
use sbx::escape::{self, Layout};
use sbx::folders;
use sbx::sandbox::{self, LastRun, Sandbox, Settings};
use sbx::signals::names as libc_sig;
use sbx::symbols::SystemMap;
use sbx::terminal;
use vmm::arch::cpuid::{self, CpuTemplate};
use vmm::builder::{self, Disk, GuestNet, Sinks, VmSpec};
use vmm::control::{Stop, StopReason};
use vmm::devices::console::{self, ConsoleFile, ConsoleLog, GuestReport, ProgramOutput, SharedReport};
use vmm::devices::virtio::fs::Fs;
use vmm::fs::policy::FsPolicy;
use vmm::fs::server::{AuditSink, FileServer};
use vmm::fs::share::Share;
use vmm::runner::{self, RunResult};

/// How long `sbx stop` lets the guest end its program and power off in
/// order before the VM is stopped hard.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Exit codes of sbx itself (the program's own code passes through).
const EXIT_SBX_ERROR: u8 = 125;
const EXIT_TIMEOUT: u8 = 124;

const AGENTS: [&str; 4] = ["shell", "claude", "gemini", "codex"];

#[derive(Parser)]
#[command(name = "sbx", version, about = "MicroVM sandboxes for AI coding agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent (or a command) in its sandbox, creating it if needed.
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox, beside its first session.
    Exec(ExecArgs),
    /// List sandboxes.
    Ls,
    /// Stop a running sandbox.
    Stop { name: String },
    /// Remove a sandbox and everything it keeps.
    Rm { name: String },
    /// Print a sandbox's console log, or with --audit its audit log: every
    /// network request and every file change or refusal, after checking
    /// its hash chain.
    Log {
        name: String,
        #[arg(long, visible_alias = "network")]
        audit: bool,
    },
    /// Network policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Explain whether a URL is allowed: every matching rule, in order.
    Explain {
        url: String,
        /// A policy file (TOML, see netstack/src/policy.rs).
        #[arg(long, conflicts_with = "preset")]
        policy: Option<PathBuf>,
        /// A preset: locked, balanced, open.
        #[arg(long, default_value = "balanced")]
        preset: String,
        /// The HTTP method (plain HTTP only).
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// What the guest may do with PATH (relative to the shared folder; a
    /// trailing '/' for a directory): hidden, read-only or read-write.
    ExplainFile {
        path: String,
        /// A policy file whose [files] table adds to the defaults.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ExecArgs {
    /// The sandbox (see `sbx ls`).
    name: String,
    /// Give the command a terminal (default: when stdin and stdout are one).
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// Separate stdin/stdout/stderr pipes even on a terminal.
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// Guest user: a name or UID[:GID] (default: root).
    #[arg(short, long, default_value = "")]
    user: String,
    /// Working directory in the guest (default: the workspace).
    #[arg(short = 'w', long, default_value = "")]
    cwd: String,
    /// Extra environment, KEY=VALUE. Repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// How long to wait for a sandbox that is still booting, in seconds.
    #[arg(long, default_value_t = 300)]
    wait: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The agent image: shell, claude, gemini or codex.
    agent: String,
    /// Sandbox name (default: AGENT-FOLDER).
    #[arg(long)]
    name: Option<String>,
    /// The project folder (default: the current directory).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Guest memory in MiB. Boot time grows with it (the guest kernel
    /// initialises and frees every page), so the default is small.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// CPU template: host, portable, or auto (portable where the host's KVM
    /// is kvm_pvm, host otherwise).
    #[arg(long, default_value = "auto")]
    cpu_template: String,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Do not treat the terminal as interactive even if there is one.
    #[arg(long)]
    no_tty: bool,
    /// Guest user to run as: a name or UID[:GID].
    #[arg(short, long, default_value = "agent")]
    user: String,
    /// Copy the guest kernel console to stderr.
    #[arg(long)]
    console: bool,
    /// Let the guest kernel log everything (slower boot).
    #[arg(long)]
    kernel_log: bool,
    /// Kernel image (default: the one `cargo xtask kernel` built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Image directory with init.cpio and rootfs.ext4 (default: the one
    /// `cargo xtask image` built for AGENT).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Size in GiB of the sandbox's own disk (sparse; used when the
    /// sandbox is created).
    #[arg(long, default_value_t = 16)]
    disk_size: u64,
    /// Extra kernel command line arguments.
    #[arg(long, default_value = "")]
    kernel_args: String,
    /// Write boot figures as JSON to this file.
    #[arg(long, hide = true)]
    report: Option<PathBuf>,
    /// Sample the guest's instruction pointer every 5 ms and write a
    /// histogram by kernel function to this file (a boot profiler).
    #[arg(long, hide = true)]
    profile: Option<PathBuf>,
    /// Network policy file (TOML, see netstack/src/policy.rs). Default:
    /// deny everything but what the agent needs.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Also allow HOST (or *.DOMAIN) on ports 80 and 443. Repeatable.
    #[arg(long, value_name = "HOST")]
    allow: Vec<String>,
    /// Send connections to NAME:PORT to the host address ADDR:APORT instead
    /// of what the host's resolver says, like curl's --resolve (for local
    /// services and tests). The policy still decides. Repeatable.
    #[arg(long, value_name = "NAME:PORT:ADDR:APORT")]
    resolve: Vec<String>,
    /// No network device at all.
    #[arg(long)]
    no_network: bool,
    /// Also share the host folder DIR at the same path, read-only (`:ro`,
    /// the default) or read-write (`:rw`), under the same file policy.
    /// Repeatable.
    #[arg(long, value_name = "DIR[:ro|:rw]")]
    mount: Vec<String>,
    /// The command to run instead of the agent.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let vmm_start = Instant::now();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args, vmm_start),
        Command::Exec(args) => exec(args),
        Command::Ls => ls().map(|_| ExitCode::SUCCESS),
        Command::Stop { name } => stop(&name).map(|_| ExitCode::SUCCESS),
        Command::Rm { name } => rm(&name).map(|_| ExitCode::SUCCESS),
        Command::Log { name, audit } => log(&name, audit).map(|_| ExitCode::SUCCESS),
        Command::Policy(PolicyCommand::Explain { url, policy, preset, method }) => {
            policy_explain(&url, policy.as_deref(), &preset, &method)
        }
        Command::Policy(PolicyCommand::ExplainFile { path, policy }) => {
            explain_file(&path, policy.as_deref()).map(|_| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            // Guest-controlled parts were escaped where they came in; the
            // rest is escaped here too, in case one was missed.
            eprintln!("sbx: {}", escape::escape(msg.as_bytes(), Layout::Lines));
            ExitCode::from(EXIT_SBX_ERROR)
        }
    }
}

/// Where `cargo xtask` puts kernels and images: $SBX_ASSETS, or target/sbx
/// next to this binary's target/<profile>/ directory.
fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SBX_ASSETS") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("sbx")))
        .unwrap_or_else(|| PathBuf::from("target/sbx"))
}

/// The guest's address on netstack's subnet, and its NIC's MAC address
/// (locally administered).
const GUEST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 15);
const GUEST_MAC: [u8; 6] = [0x02, 0x73, 0x62, 0x78, 0, 2];
/// The guest's MTU: netstack is in-process, so frames need not be
/// Ethernet-sized; 64 KiB frames cut the guest kernel's per-packet work
/// (Linux then posts 64 KiB receive buffers).
const GUEST_MTU: usize = 65520;

/// The sandbox's network: the policy (file, agent defaults, --allow), the
/// upstream overrides (--resolve) and the sandbox's audit log, continued
/// from earlier runs when its hash chain checks out.
fn guest_network(
    args: &RunArgs,
    audit: SharedLog<Box<dyn Write + Send>>,
    mut policy: Policy,
) -> Result<GuestNet, String> {
    policy.add_agent(&args.agent).map_err(|e| e.to_string())?;
    for host in &args.allow {
        policy.allow(host).map_err(|e| format!("--allow {host}: {e}"))?;
    }
    let mut resolver = Resolver { system: true, ..Resolver::default() };
    for r in &args.resolve {
        let (key, addr) = parse_resolve(r).map_err(|e| format!("--resolve {r}: {e}"))?;
        resolver.overrides.insert(key, addr);
    }
    let cfg = NetConfig { mtu: GUEST_MTU, ..NetConfig::default() };
    let mtu = cfg.mtu as u16;
    Ok(GuestNet { mac: GUEST_MAC, mtu, stack: NetStack::new(cfg, policy, resolver, audit) })
}

/// A policy file, network rules and file rules both checked, errors
/// naming the file.
fn read_policy_file(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("Cannot read {}: {e}", path.display()))?;
    let policy = Policy::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    file_policy(&policy).map_err(|e| format!("{}: [files]: {e}", path.display()))?;
    Ok(policy)
}

/// The shared folder's policy: the defaults plus the file's `[files]`.
fn file_policy(policy: &Policy) -> Result<FsPolicy, vmm::fs::policy::Error> {
    FsPolicy::with(&policy.files.hidden, &policy.files.read_only)
}

/// A shared folder's policy: the file policy, and `hide` (the boot files
/// in it, see `folders::boot_files_to_hide`) hidden.
fn share_policy(policy: &Policy, hide: &[String]) -> Result<FsPolicy, String> {
    let hidden = [policy.files.hidden.as_slice(), hide].concat();
    FsPolicy::with(&hidden, &policy.files.read_only).map_err(|e| format!("Cannot hide the boot files: {e}"))
}

/// Keeps `path` up to date (every 250 ms, when changed) with the file
/// servers' request counts, for benchmarks to read while the sandbox runs.
fn publish_fs_stats(path: PathBuf, counts: Vec<vmm::devices::virtio::fs::Counts>) {
    let _ = thread::Builder::new().name("fs-stats".into()).spawn(move || {
        let mut last = String::new();
        loop {
            let now: Vec<serde_json::Value> =
                counts.iter().map(|c| serde_json::json!(*c.lock().unwrap_or_else(|p| p.into_inner()))).collect();
            let text = serde_json::Value::from(now).to_string();
            if text != last {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &path)).is_ok() {
                    last = text;
                }
            }
            thread::sleep(Duration::from_millis(250));
        }
    });
}

/// The virtio-fs tag of the `i`th shared folder (0: the workspace).
fn share_tag(i: usize) -> String {
    format!("sbx{i}")
}

/// `DIR[:ro|:rw]` -> (absolute folder, read-only).
fn parse_mount(text: &str) -> Result<(PathBuf, bool), String> {
    let (dir, read_only) = match text.rsplit_once(':') {
        Some((d, "ro")) => (d, true),
        Some((d, "rw")) => (d, false),
        _ => (text, true),
    };
    let path = folders::check(Path::new(dir), &format!("--mount {text}:")).map_err(|e| e.to_string())?;
    Ok((path, read_only))
}

/// A virtio-fs device for each folder, under its policy, its file server
/// writing to the sandbox's audit log. Also returns each device's request
/// counters.
fn shared_folders(
    shares: &[(PathBuf, bool)],
    policies: &[FsPolicy],
    git_shadow: &Path,
    audit: &SharedLog<Box<dyn Write + Send>>,
) -> Result<(Vec<Fs>, Vec<vmm::devices::virtio::fs::Counts>), String> {
    let mut devices = Vec::new();
    let mut counts = Vec::new();
    vmm::fs::server::raise_open_file_limit();
    for (i, ((dir, read_only), policy)) in shares.iter().zip(policies).enumerate() {
        let mut share =
            Share::open(dir, policy.clone(), *read_only).map_err(|e| format!("Cannot share {}: {e}", dir.display()))?;
        if !read_only {
            share = share.with_git_shadow(git_shadow.to_path_buf());
        }
        let log = audit.clone();
        let sink: AuditSink = Box::new(move |event| {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = log.record(&event, sandbox::now_unix_ms()) {
                eprintln!("sbx: {e}");
            }
        });
        let server = FileServer::new(share, dir.clone(), sink);
        let fs = Fs::new(&share_tag(i), server).map_err(|e| format!("Cannot share {}: {e}", dir.display()))?;
        counts.push(fs.counts.clone());
        devices.push(fs);
    }
    Ok((devices, counts))
}

/// NAME:PORT:ADDR:APORT -> ((name, port), address).
fn parse_resolve(text: &str) -> Result<((HostName, u16), std::net::SocketAddr), String> {
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected NAME:PORT:ADDR:APORT".into());
    };
    let name = HostName::parse(name).map_err(|e| e.to_string())?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or("bad port")?;
    let addr: std::net::SocketAddr = addr.parse().map_err(|_| format!("bad address '{addr}' (expected IP:PORT)"))?;
    Ok(((name, port), addr))
}

/// Opens the sandbox's audit log (and its rotated files) for appending,
/// continuing its chain. A torn last line is cut off, saying so; a log
/// whose chain does not verify is kept aside, never overwritten.
fn open_audit_log(path: &Path) -> Result<AuditLog<Box<dyn Write + Send>>, String> {
    let rotation = netstack::audit::Rotation::default();
    let opened =
        netstack::audit::open(path, rotation, sandbox::now_unix_ms(), |f| Box::new(f) as Box<dyn Write + Send>)
            .map_err(|e| format!("Cannot open {}: {e}", path.display()))?;
    for note in &opened.notes {
        eprintln!("sbx: {note}");
    }
    Ok(opened.log)
}

fn existing(path: PathBuf, what: &str, hint: &str) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{what} not found at {}: {hint}", path.display()))
    }
}

fn run(args: RunArgs, vmm_start: Instant) -> Result<ExitCode, String> {
    // First, before any thread exists and before the sandbox shows as
    // running: from then on `sbx stop` (SIGTERM) must stop the VM in order,
    // even while it is still being built.
    // SIGTERM and SIGHUP (`sbx stop`) end the program through its session
    // so that guest-init powers off in order (disk synced and clean); the
    // VM is stopped hard after STOP_GRACE, at once on a second signal, or
    // at once if the session is not open yet. SIGINT goes to the program
    // (without a terminal; with one, ^C is just a key). SIGWINCH resizes.
    let stop = Arc::new(Stop::default());
    let session = client::Writer::default();
    let (for_signals, stop_for_signals) = (session.clone(), stop.clone());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    sbx::signals::forward(&[libc_sig::TERM, libc_sig::INT, libc_sig::HUP, libc_sig::WINCH], move |sig| {
        use protocol::session::Frame;
        match sig {
            libc_sig::WINCH => {
                if let Some(f) = client::resize_frame() {
                    client::send_to(&for_signals, &f);
                }
            }
            libc_sig::INT if client::send_to(&for_signals, &Frame::Signal(sig)) => {}
            _ if !stopping.swap(true, std::sync::atomic::Ordering::SeqCst)
                && client::send_to(&for_signals, &Frame::Signal(sig)) =>
            {
                let stop = stop_for_signals.clone();
                let _ = thread::Builder::new().name("stop-grace".into()).spawn(move || {
                    thread::sleep(STOP_GRACE);
                    stop.request(StopReason::HostSignal(sig));
                });
            }
            _ => stop_for_signals.request(StopReason::HostSignal(sig)),
        }
    });
    if !AGENTS.contains(&args.agent.as_str()) {
        return Err(format!("Unknown agent '{}' (expected one of: {})", args.agent, AGENTS.join(", ")));
    }
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => std::env::current_dir().map_err(|e| format!("Cannot read the current directory: {e}"))?,
    };
    let workspace = folders::check(&workspace, "Workspace").map_err(|e| e.to_string())?;
    let mut extra_shares = Vec::new();
    for m in &args.mount {
        extra_shares.push(parse_mount(m)?);
    }
    let template = match args.cpu_template.as_str() {
        "auto" => cpuid::auto_template(),
        other => other.parse::<CpuTemplate>()?,
    };
    let pvm = cpuid::host_is_pvm();
    let assets = assets_dir();
    let kernel = existing(
        args.kernel.clone().unwrap_or_else(|| assets.join("kernel/vmlinux")),
        "Kernel",
        "build it with `cargo xtask kernel` or pass --kernel",
    )?;
    let image_dir = args.image.clone().unwrap_or_else(|| assets.join("images").join(&args.agent));
    let image_hint = format!("build it with `cargo xtask image {}` or pass --image", args.agent);
    let image = existing(image_dir.join("init.cpio"), &format!("Image '{}'", args.agent), &image_hint)?;
    let rootfs = existing(image_dir.join("rootfs.ext4"), &format!("Image '{}'", args.agent), &image_hint)?;
    if args.disk_size == 0 || args.disk_size > 1 << 14 {
        return Err(format!("Disk size must be 1 to 16384 GiB, got {}", args.disk_size));
    }
    // Checked before anything starts: a bad rule is the user's to fix now.
    let policy = match &args.policy {
        Some(path) => read_policy_file(path)?,
        None => Policy::preset("locked").map_err(|e| e.to_string())?,
    };
    // sbx's own state and the files it boots from stay out of the guest's
    // reach: checked before the sandbox's folder is made, and again with
    // the workspace its settings name.
    let home = sandbox::home();
    let state = folders::canonical_lenient(&home)
        .map_err(|e| format!("sbx's state folder {} (SBX_HOME): {e}", home.display()))?;
    let mut boot = Vec::new();
    for path in [&assets, &kernel, &image_dir] {
        boot.push(folders::canonical_lenient(path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let check_shares = |shares: &[(PathBuf, bool)]| -> Result<Vec<Vec<String>>, String> {
        folders::check_state(&state, shares).map_err(|e| e.to_string())?;
        folders::boot_files_to_hide(&boot, shares).map_err(|e| e.to_string())
    };
    check_shares(&[vec![(workspace.clone(), false)], extra_shares.clone()].concat())?;
    let name = args.name.clone().unwrap_or_else(|| sandbox::default_name(&args.agent, &workspace));
    let settings = Settings { name, agent: args.agent.clone(), workspace, created_unix: sandbox::now_unix() };
    // The folder asked for: --workspace, or the current one when the name
    // comes from it.
    let asked = (args.workspace.is_some() || args.name.is_none()).then(|| settings.workspace.clone());
    let sb = Sandbox::open_or_create(&home, settings).map_err(|e| e.to_string())?;
    // Read back from disk: checked like the user's own input.
    folders::check_stored(&sb.settings_file(), &sb.settings.workspace).map_err(|e| e.to_string())?;
    let shares = [vec![(sb.settings.workspace.clone(), false)], extra_shares].concat();
    let hide = check_shares(&shares)?;
    if let Some(w) = asked.filter(|w| *w != sb.settings.workspace) {
        return Err(format!(
            "Sandbox '{}' shares {}, not {}: a sandbox keeps its workspace (use another --name)",
            sb.settings.name,
            sb.settings.workspace.display(),
            w.display()
        ));
    }
    let _running = sb.mark_running().map_err(|e| e.to_string())?;
    let data_disk = sb.data_disk(args.disk_size).map_err(|e| e.to_string())?;

    let interactive = !args.no_tty && terminal::is_tty(0) && terminal::is_tty(1);
    let (rows, cols) = terminal::size(1).unwrap_or((24, 80));
    let mut job = Job {
        hostname: sb.settings.name.clone(),
        interactive,
        rows,
        cols,
        emulated_cpu: pvm,
        overlay_root: true,
        main_session: true,
        ..Job::default()
    };
    let mut open = protocol::session::Open {
        argv: if args.command.is_empty() { vec!["/bin/sh".into()] } else { args.command.clone() },
        user: args.user.clone(),
        main: true,
        ..Default::default()
    };
    if interactive {
        if let Ok(term) = std::env::var("TERM") {
            open.env.push(("TERM".into(), term));
        }
    }
    let audit = open_audit_log(&sb.audit_log())?.shared();
    let fs_policies = hide.iter().map(|h| share_policy(&policy, h)).collect::<Result<Vec<_>, _>>()?;
    let (fs_devices, fs_counts) = shared_folders(&shares, &fs_policies, &sb.git_shadow(), &audit)?;
    for (i, (dir, read_only)) in shares.iter().enumerate() {
        let path = dir.to_str().ok_or_else(|| format!("Cannot share {}: the path is not UTF-8", dir.display()))?;
        job.shares.push(protocol::Share { tag: share_tag(i), path: path.into(), read_only: *read_only });
    }
    open.cwd = job.shares[0].path.clone();
    publish_fs_stats(sb.fs_stats(), fs_counts.clone());
    let net = if args.no_network { None } else { Some(guest_network(&args, audit.clone(), policy)?) };
    if net.is_some() {
        let cfg = NetConfig::default();
        job.net = Some(protocol::NetConfig {
            addr: GUEST_IP,
            prefix_len: cfg.prefix_len,
            gateway: cfg.gateway,
            dns: cfg.gateway,
        });
    }
    let mut initrd = std::fs::read(&image).map_err(|e| format!("Cannot read image {}: {e}", image.display()))?;
    protocol::cpio::append_job(&mut initrd, &job).map_err(|e| format!("Cannot add the job to the initramfs: {e}"))?;

    let report = SharedReport::default();
    let console_file = ConsoleFile::create(&sb.console_log())
        .map_err(|e| format!("Cannot create {}: {e}", sb.console_log().display()))?;
    let sinks = Sinks {
        program: Box::new(ProgramOutput::new(io::stdout(), report.clone())),
        console: Box::new(ConsoleLog::new(Some(console_file), console_echo(args.console), report.clone())),
    };
    let spec = VmSpec {
        kernel: kernel.clone(),
        initrd,
        cmdline: builder::kernel_cmdline(pvm, args.kernel_log, &args.kernel_args),
        mem_mib: args.memory,
        cpus: args.cpus,
        template,
        disks: vec![
            Disk { path: rootfs, read_only: true, id: protocol::BASE_DISK_SERIAL.into() },
            Disk { path: data_disk, read_only: false, id: protocol::DATA_DISK_SERIAL.into() },
        ],
        net,
        control: Some(sb.listen_control().map_err(|e| e.to_string())?),
        shares: fs_devices,
    };
    let socket = sb.control_socket();
    let outcome = (|| {
        let mvm = builder::build_microvm_for_boot(spec, sinks, stop).map_err(|e| e.to_string())?;
        let opts = runner::RunOptions {
            timeout: args.timeout.map(Duration::from_secs),
            profile: args.profile.as_ref().map(|_| Duration::from_millis(5)),
        };
        let vm = thread::Builder::new()
            .name("vm".into())
            .spawn(move || runner::run(mvm, opts))
            .map_err(|e| format!("Cannot start the VM thread: {e}"))?;
        // The program: the main session over the control channel, as
        // long as the VM lives.
        let ended = || vm.is_finished();
        let session = client::run_session(&socket, open, interactive, Duration::MAX, &session, &ended);
        let mut result = vm.join().map_err(|_| "The VM thread failed".to_string())?;
        if let Ok((_, Some(t))) = &session {
            result.first_output_at = Some(*t);
        }
        // System.map is large: read it only when there is an address to name.
        let needs_symbols = args.profile.is_some() || matches!(result.reason, StopReason::InternalError { .. });
        let symbols = if needs_symbols { SystemMap::for_kernel(&kernel) } else { None };
        if let (StopReason::InternalError { rip, symbol, .. }, Some(map)) = (&mut result.reason, &symbols) {
            *symbol = map.describe(*rip);
        }
        if let Some(path) = &args.profile {
            write_profile(path, &result.rip_samples, symbols.as_ref())?;
        }
        Ok::<RunResult, String>(result)
    })();
    // The VM is over: the counts of refusals not yet written go to the
    // audit log now.
    if let Err(e) = audit.lock().unwrap_or_else(|p| p.into_inner()).flush_suppressed(sandbox::now_unix_ms()) {
        eprintln!("sbx: {e}");
    }
    let result = match outcome {
        Ok(r) => r,
        Err(e) => {
            let _ = sb.mark_stopped(&LastRun {
                ended_unix: sandbox::now_unix(),
                exit_code: EXIT_SBX_ERROR.into(),
                summary: e.clone(),
            });
            return Err(e);
        }
    };
    let guest = report.lock().unwrap_or_else(|p| p.into_inner());
    let (code, summary, failure) = judge(&result.reason, &guest, &sb.console_log());
    let _ =
        sb.mark_stopped(&LastRun { ended_unix: sandbox::now_unix(), exit_code: code.into(), summary: summary.clone() });
    if let Some(path) = &args.report {
        let figures = figures_json(vmm_start, &result, &guest, template, pvm, &fs_counts);
        std::fs::write(path, figures).map_err(|e| format!("Cannot write report {}: {e}", path.display()))?;
    }
    if failure {
        // Its guest parts are escaped by `judge`; all of it here, in case.
        eprintln!("sbx: {}", escape::escape(summary.as_bytes(), Layout::Lines));
    }
    Ok(ExitCode::from(code))
}

/// Writes RIP samples as "count percent function", most frequent first.
/// With `--console`, the guest's kernel console is copied to stderr,
/// escaped (the guest writes it).
fn console_echo(on: bool) -> Option<Box<dyn Write + Send>> {
    on.then(|| Box::new(escape::EscapingWriter::new(Layout::Lines, io::stderr())) as Box<dyn Write + Send>)
}

fn write_profile(path: &Path, samples: &[u64], symbols: Option<&SystemMap>) -> Result<(), String> {
    let mut by_fn: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for rip in samples {
        let name = symbols
            .and_then(|s| s.describe(*rip))
            .map(|d| d.split('+').next().unwrap_or_default().to_string())
            .unwrap_or_else(|| if *rip < 0x8000_0000_0000 { "(user)".into() } else { format!("{rip:#x}") });
        *by_fn.entry(name).or_default() += 1;
    }
    let mut rows: Vec<(u64, String)> = by_fn.into_iter().map(|(k, v)| (v, k)).collect();
    rows.sort_by(|a, b| b.cmp(a));
    let total = samples.len().max(1) as f64;
    let mut text: String =
        rows.iter().map(|(n, f)| format!("{n:8} {:6.2}% {f}\n", *n as f64 * 100.0 / total)).collect();
    // Then the hottest exact addresses, to find the instructions in objdump.
    let mut by_rip: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for rip in samples {
        *by_rip.entry(*rip).or_default() += 1;
    }
    let mut hot: Vec<(u64, u64)> = by_rip.into_iter().map(|(r, n)| (n, r)).collect();
    hot.sort_by(|a, b| b.cmp(a));
    text.push_str("\nhottest addresses:\n");
    for (n, rip) in hot.iter().take(30) {
        let name = symbols.and_then(|s| s.describe(*rip)).unwrap_or_default();
        text.push_str(&format!("{n:8} {rip:#x} {name}\n"));
    }
    std::fs::write(path, format!("{} samples\n{text}", samples.len()))
        .map_err(|e| format!("Cannot write {}: {e}", path.display()))
}

/// The exit code, a one-line summary, and whether it is sbx's failure.
fn judge(reason: &StopReason, guest: &GuestReport, log: &Path) -> (u8, String, bool) {
    let see_log = format!("console log: {}", log.display());
    match (reason, &guest.outcome) {
        (StopReason::GuestReset, Some(Frame::Exit(c))) => (*c as u8, format!("Exited with status {c}"), false),
        (StopReason::GuestReset, Some(Frame::Signal(s))) => {
            (128u8.wrapping_add(*s as u8), format!("Killed by signal {s}"), false)
        }
        (StopReason::GuestReset, Some(Frame::Error(msg))) => {
            (EXIT_SBX_ERROR, format!("guest-init failed: {} ({see_log})", escape::line(msg)), true)
        }
        (StopReason::Timeout(s), _) => (EXIT_TIMEOUT, format!("Timed out after {s} s ({see_log})"), true),
        (StopReason::HostSignal(s), _) => (128u8.wrapping_add(*s as u8), format!("Stopped by signal {s}"), true),
        (StopReason::GuestReset | StopReason::TripleFault, _) => {
            let panic = guest
                .tail
                .iter()
                .rev()
                .find(|l| l.contains("Kernel panic") || l.contains("BUG:") || l.contains("Oops"));
            let what = if matches!(reason, StopReason::TripleFault) {
                "The guest triple-faulted"
            } else {
                "The guest kernel stopped"
            };
            let detail = panic.map(|p| format!(": {}", escape::line(p.trim()))).unwrap_or_default();
            (EXIT_SBX_ERROR, format!("{what} before the program ended{detail} ({see_log})"), true)
        }
        (other, _) => (EXIT_SBX_ERROR, format!("{other} ({see_log})"), true),
    }
}

fn ms_since(start: Instant, t: Option<Instant>) -> serde_json::Value {
    t.map(|t| serde_json::json!(t.saturating_duration_since(start).as_secs_f64() * 1000.0))
        .unwrap_or(serde_json::Value::Null)
}

fn figures_json(
    start: Instant,
    result: &RunResult,
    guest: &GuestReport,
    template: CpuTemplate,
    pvm: bool,
    fs_counts: &[vmm::devices::virtio::fs::Counts],
) -> String {
    let fs_requests: Vec<serde_json::Value> =
        fs_counts.iter().map(|c| serde_json::json!(*c.lock().unwrap_or_else(|p| p.into_inner()))).collect();
    let v = serde_json::json!({
        "fs_requests": fs_requests,
        "cpu_template": template.to_string(),
        "kvm_pvm": pvm,
        "first_kvm_run_ms": ms_since(start, result.first_run_at),
        "init_ms": ms_since(start, guest.init_at),
        "program_started_ms": ms_since(start, guest.started_at),
        "first_output_ms": ms_since(start, result.first_output_at),
        "end_ms": ms_since(start, Some(result.ended_at)),
        "exits": result.exits.0,
        "exits_total": result.exits.total(),
        "vmm_rss_outside_guest_kib": result.rss_outside_guest_kib,
        "stop": result.reason.to_string(),
    });
    v.to_string()
}

fn ls() -> Result<(), String> {
    let list = Sandbox::list(&sandbox::home()).map_err(|e| e.to_string())?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{:<24} {:<8} {:<10} {:<6} WORKSPACE", "NAME", "AGENT", "STATE", "LAST");
    for sb in list {
        let state = match sb.running_pid() {
            Some(pid) => format!("running:{pid}"),
            None => "stopped".into(),
        };
        let last = sb.last_run().ok().flatten().map(|l| l.exit_code.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<10} {:<6} {}",
            escape::line(&sb.settings.name),
            escape::line(&sb.settings.agent),
            state,
            last,
            escape::escape(sb.settings.workspace.as_os_str().as_encoded_bytes(), Layout::Line)
        );
    }
    Ok(())
}

fn exec(args: ExecArgs) -> Result<ExitCode, String> {
    use protocol::session::Open;
    use sbx::client::Outcome;
    let sb = Sandbox::open(&sandbox::home(), &args.name).map_err(|e| e.to_string())?;
    if sb.running_pid().is_none() {
        return Err(format!("Sandbox '{}' is not running (start it with `sbx run`)", args.name));
    }
    let mut env = Vec::new();
    for kv in &args.env {
        let (k, v) =
            kv.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or(format!("Bad --env '{kv}': use KEY=VALUE"))?;
        env.push((k.to_string(), v.to_string()));
    }
    let interactive = args.tty || (!args.no_tty && terminal::is_tty(0) && terminal::is_tty(1));
    if interactive {
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
    }
    let cwd = if args.cwd.is_empty() { sb.settings.workspace.to_string_lossy().into_owned() } else { args.cwd };
    let open = Open { argv: args.command, env, cwd, user: args.user, tty: None, main: false };
    let outcome = sbx::client::exec(&sb.control_socket(), open, interactive, Duration::from_secs(args.wait))?;
    Ok(match outcome {
        Outcome::Exited(c) => ExitCode::from(c as u8),
        Outcome::Killed(s) => ExitCode::from(128u8.wrapping_add(s as u8)),
        Outcome::Failed(m) => return Err(escape::line(&m)),
    })
}

fn stop(name: &str) -> Result<(), String> {
    let sb = Sandbox::open(&sandbox::home(), name).map_err(|e| e.to_string())?;
    let mut pid = sb.running_pid().ok_or_else(|| format!("Sandbox '{name}' is not running"))?;
    // Pid 0: the VMM holds the lock but has not written its pid yet.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pid == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        pid = sb.running_pid().unwrap_or(0);
    }
    if pid == 0 {
        return Err(format!("Sandbox '{name}' is starting or stopping; try again"));
    }
    // The VMM turns SIGTERM into a VM stop and records it.
    sbx::signals::terminate(pid).map_err(|e| format!("Cannot signal the VMM (pid {pid}): {e}"))?;
    // The guest powers off in order, or is stopped hard after STOP_GRACE.
    let limit = STOP_GRACE + Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    while sb.running_pid().is_some() {
        if Instant::now() > deadline {
            return Err(format!("Sandbox '{name}' did not stop within {} s", limit.as_secs()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Prints the rules that match `url` and the decision; exit 0 if allowed,
/// 1 if denied.
fn policy_explain(url: &str, file: Option<&Path>, preset: &str, method: &str) -> Result<ExitCode, String> {
    use netstack::policy::{Action, Policy, Request, Target};
    let policy = match file {
        Some(path) => read_policy_file(path)?,
        None => Policy::preset(preset).map_err(|e| e.to_string())?,
    };
    let target = Target::parse_url(url)?;
    let http = (!target.https).then_some((method, target.path.as_str()));
    let req = Request { host: &target.host, port: target.port, http };
    let mut out = io::stdout().lock();
    let matched = policy.explain(&req);
    if matched.is_empty() {
        let _ = writeln!(out, "no rule matches {}:{}", target.host, target.port);
    }
    for rule in matched {
        let _ = writeln!(out, "matches {rule}");
    }
    let decision = policy.decide(&req);
    let _ = writeln!(out, "{decision}");
    Ok(if decision.action == Action::Allow { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn explain_file(path: &str, file: Option<&Path>) -> Result<(), String> {
    use vmm::fs::policy::Access;
    let policy = match file {
        Some(f) => read_policy_file(f)?,
        None => Policy::preset("locked").map_err(|e| e.to_string())?,
    };
    let fs = file_policy(&policy).map_err(|e| e.to_string())?;
    let is_dir = path.ends_with('/');
    let access = match fs.access(Path::new(path.trim_end_matches('/')), is_dir) {
        Access::Hidden => "hidden",
        Access::ReadOnly => "read-only",
        Access::ReadWrite => "read-write",
    };
    let _ = writeln!(io::stdout().lock(), "{path}: {access}");
    Ok(())
}

fn rm(name: &str) -> Result<(), String> {
    Sandbox::open(&sandbox::home(), name).and_then(|sb| sb.remove()).map_err(|e| e.to_string())
}

fn log(name: &str, network: bool) -> Result<(), String> {
    let sb = Sandbox::open(&sandbox::home(), name).map_err(|e| e.to_string())?;
    let path = if network { sb.audit_log() } else { sb.console_log() };
    // Oldest first: the rotated files, then the current one.
    let files = if network {
        let files = netstack::audit::log_files(&path).map_err(|e| format!("Cannot read {}: {e}", path.display()))?;
        if files.is_empty() {
            return Err(format!("Cannot read {}: there is no audit log yet", path.display()));
        }
        let verified = netstack::audit::verify_files(&files).map_err(|e| e.to_string())?;
        if verified.first_seq > 1 || verified.torn_tail.is_some() {
            eprintln!("sbx: {}: {verified}", path.display());
        }
        files
    } else {
        let files = console::log_files(&path);
        if files.is_empty() {
            return Err(format!("Cannot read {}: there is no console log", path.display()));
        }
        files
    };
    let mut text = Vec::new();
    for f in &files {
        text.extend(std::fs::read(f).map_err(|e| format!("Cannot read {}: {e}", f.display()))?);
    }
    // The guest wrote the console and chose the audit log's host and file
    // names: escaped, so that it cannot drive the user's terminal.
    let layout = if network { Layout::JsonLines } else { Layout::Lines };
    io::stdout().write_all(escape::escape(&text, layout).as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_reports_are_summarised_escaped() {
        let log = Path::new("/s/console.log");
        let guest = GuestReport {
            outcome: Some(Frame::Error("no /bin/x\u{1b}]52;c;eA==\u{7}\nsbx: all fine\u{202e}".into())),
            ..GuestReport::default()
        };
        let (code, summary, failure) = judge(&StopReason::GuestReset, &guest, log);
        assert_eq!((code, failure), (EXIT_SBX_ERROR, true));
        assert_eq!(
            summary,
            "guest-init failed: no /bin/x\\x1b]52;c;eA==\\x07\\x0asbx: all fine\\u{202e} (console log: /s/console.log)"
        );
        let mut guest = GuestReport::default();
        guest.tail.push_back("[ 1.0] Kernel panic - not syncing: \u{9b}2J\u{1b}[8mhidden\rfake\r".into());
        let (_, summary, _) = judge(&StopReason::TripleFault, &guest, log);
        assert!(
            summary.contains(": [ 1.0] Kernel panic - not syncing: \\u{9b}2J\\x1b[8mhidden\\x0dfake ("),
            "{summary}"
        );
        assert!(!summary.contains(['\u{1b}', '\u{9b}', '\r']), "{summary}");
    }
}
