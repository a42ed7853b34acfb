//! Host side: `sbx run`'s launch — from a checked [`RunPlan`] to a
//! running VM and back: the sandbox marked running, its disks, audit log,
//! shared folders and network made, the VM built and run on its own
//! thread, and the program run as the main session over the control
//! channel for as long as the VM lives.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use audit::{AuditLog, SharedLog};
use netstack::live::Live;
use netstack::stack::{Config as NetConfig, NetStack, Resolver};
use protocol::Job;
use thiserror::Error;
use vmm::builder::{self, Disk, GuestNet, Sinks, VmSpec};
use vmm::control::Stop;
use vmm::devices::console::{ConsoleFile, ConsoleLog, ProgramOutput, SharedReport};
use vmm::devices::virtio::fs::{Counts, Fs};
use vmm::fs::server::{AuditSink, FileServer};
use vmm::fs::share::Share;
use vmm::runner::{self, RunResult};
use vmm::threads::{self, PanicReport, PathRule, Reach, ThreadKind};

use super::plan::{NetPlan, RunPlan};
use crate::client::{self, Outcome};
use crate::escape::{EscapingWriter, Layout};
use crate::sandbox::{self, RunningGuard};
use crate::termfilter::Filtered;
use crate::terminal;

/// The guest's address on netstack's subnet, and its NIC's MAC address
/// (locally administered).
const GUEST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 15);
const GUEST_MAC: [u8; 6] = [0x02, 0x73, 0x62, 0x78, 0, 2];
/// The guest's MTU: netstack is in-process, so frames need not be
/// Ethernet-sized; 64 KiB frames cut the guest kernel's per-packet work
/// (Linux then posts 64 KiB receive buffers).
const GUEST_MTU: usize = 65520;
/// How often the file servers' request counts are published.
const FS_STATS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("Cannot start sandbox '{0}': {1}")]
    Sandbox(String, #[source] sandbox::Error),
    #[error("Cannot open the audit log {0}: {1}")]
    AuditLog(PathBuf, String),
    #[error("Cannot share {0}: {1}")]
    Share(PathBuf, String),
    #[error("Cannot read image {0}: {1}")]
    Image(PathBuf, io::Error),
    #[error("Cannot add the job to the initramfs: {0}")]
    Job(String),
    #[error("Cannot create {0}: {1}")]
    Console(PathBuf, io::Error),
    #[error("Cannot build the VM: {0}")]
    Build(#[source] builder::Error),
    #[error("Cannot start the VM thread: {0}")]
    Thread(io::Error),
    #[error("The VM thread failed")]
    VmPanicked,
    #[error("Cannot jail the control thread: {0}")]
    Jail(#[source] threads::JailError),
    #[error("Cannot start sandbox '{0}': {1}")]
    Live(String, #[source] crate::admin::Error),
    #[error("Cannot open the admin socket in {0}: {1}")]
    Admin(PathBuf, io::Error),
    #[error(transparent)]
    Ports(#[from] crate::ports::Error),
}

/// What came back from a run: the VM's result, the main session's (the
/// program's) outcome and the time of its first output, what the guest
/// told on its console, and the file servers' counts.
pub struct Launched {
    pub result: RunResult,
    pub session: Result<(Outcome, Option<Instant>), client::Error>,
    pub report: SharedReport,
    pub fs_counts: Vec<Counts>,
    /// Held until the run is recorded: the sandbox shows running.
    pub running: RunningGuard,
}

/// The virtio-fs tag of the `i`th shared folder (0: the workspace).
fn share_tag(i: usize) -> String {
    format!("sbx{i}")
}

/// Opens the sandbox's audit log (and its rotated files) for appending,
/// continuing its chain. A torn last line is cut off, saying so; a log
/// whose chain does not verify is kept aside, never overwritten.
fn open_audit_log(path: &Path) -> Result<AuditLog<Box<dyn Write + Send>>, LaunchError> {
    let rotation = audit::Rotation::default();
    let opened = audit::open(path, rotation, sandbox::now_unix_ms(), |f| Box::new(f) as Box<dyn Write + Send>)
        .map_err(|e| LaunchError::AuditLog(path.to_path_buf(), e.to_string()))?;
    for note in &opened.notes {
        eprintln!("sbx: {note}");
    }
    Ok(opened.log)
}

/// A virtio-fs device for each folder, under its policy, its file server
/// writing to the sandbox's audit log. Also returns each device's request
/// counters.
fn shared_folders(
    plan: &RunPlan,
    audit: &SharedLog<Box<dyn Write + Send>>,
) -> Result<(Vec<Fs>, Vec<Counts>), LaunchError> {
    let mut devices = Vec::new();
    let mut counts = Vec::new();
    for (i, share) in plan.shares.iter().enumerate() {
        let fail = |e: String| LaunchError::Share(share.dir.clone(), e);
        let mut opened =
            Share::open(&share.dir, share.policy.clone(), share.read_only).map_err(|e| fail(e.to_string()))?;
        // What the host's git configs and .envrc files name could not all
        // be resolved before they run: the user is told what stays open.
        for note in opened.notes() {
            eprintln!("sbx: {}: {}", crate::escape::line(&share.dir.display().to_string()), crate::escape::line(note));
        }
        if !share.read_only {
            opened = opened.with_git_shadow(plan.sandbox.git_shadow());
        }
        let log = audit.clone();
        let sink: AuditSink = Box::new(move |event| {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = log.record(&event, sandbox::now_unix_ms()) {
                eprintln!("sbx: {e}");
            }
        });
        // Fails closed: a change that could no longer be recorded is refused.
        let failed = audit.lock().unwrap_or_else(|p| p.into_inner()).failure_flag();
        let server = FileServer::new(opened, share.dir.clone(), sink)
            .fail_closed_on(failed)
            .with_quota(plan.workspace_quota.clone());
        // Landlock: the folder, and the sandbox's own directory (the audit
        // log it rotates, the git shadow).
        let reach = Reach::Only(vec![
            PathRule { path: share.dir.clone(), write: !share.read_only },
            PathRule { path: plan.sandbox.dir().to_path_buf(), write: true },
        ]);
        let fs = Fs::new(&share_tag(i), server, reach).map_err(|e| fail(e.to_string()))?;
        counts.push(fs.counts.clone());
        devices.push(fs);
    }
    Ok((devices, counts))
}

/// Keeps `path` up to date (when changed) with the file servers' request
/// counts, for benchmarks to read while the sandbox runs.
fn publish_fs_stats(path: PathBuf, counts: Vec<Counts>, net: Option<(PathBuf, NetStats)>, reach: Reach) {
    let _ = vmm::threads::spawn_helper("fs-stats", move || {
        if let Err(e) = threads::confine_current(ThreadKind::Control, &reach) {
            eprintln!("sbx: file server statistics: {e}");
            return;
        }
        let write = |path: &Path, text: &str| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).is_ok()
        };
        let (mut last, mut last_net) = (String::new(), String::new());
        loop {
            let now: Vec<serde_json::Value> =
                counts.iter().map(|c| serde_json::json!(*c.lock().unwrap_or_else(|p| p.into_inner()))).collect();
            let text = serde_json::Value::from(now).to_string();
            if text != last && write(&path, &text) {
                last = text;
            }
            if let Some((net_path, stats)) = &net {
                let text = serde_json::json!(*stats.lock().unwrap_or_else(|p| p.into_inner())).to_string();
                if text != last_net && write(net_path, &text) {
                    last_net = text;
                }
            }
            thread::sleep(FS_STATS_EVERY);
        }
    });
}

/// netstack's connection counters, as the network backend last left them.
type NetStats = Arc<Mutex<netstack::limits::NetCounters>>;

/// The sandbox's network: its policy and upstream overrides, and the
/// sandbox's audit log (in `sandbox_dir`, which it rotates).
fn guest_network(
    net: &NetPlan,
    audit: SharedLog<Box<dyn Write + Send>>,
    sandbox_dir: &Path,
    live: Option<Arc<Live>>,
    ports: Option<Arc<netstack::forward::Ports>>,
) -> (GuestNet, NetStats) {
    let mut resolver = Resolver { system: true, ..Resolver::default() };
    resolver.overrides.extend(net.overrides.iter().cloned());
    let cfg = NetConfig { mtu: GUEST_MTU, ..NetConfig::default() };
    let mtu = cfg.mtu as u16;
    let mut stack = NetStack::new(cfg, net.policy.clone(), resolver, audit).terminating(net.termination.clone());
    if let Some(live) = live {
        stack = stack.with_live(live);
    }
    if let Some(ports) = ports {
        stack = stack.with_ports(ports, GUEST_IP);
    }
    // netstack's threads may read what the host's resolver reads
    // (resolv.conf, hosts, the NSS configuration and modules: not the rest
    // of /etc or /run), and nothing else of the host but the sandbox's
    // directory (the audit log).
    let mut paths = vec![PathRule { path: sandbox_dir.to_path_buf(), write: true }];
    paths.extend(threads::resolver_reach());
    // A sign-in kept on the host: its refreshed tokens are written back
    // to their own folder of the store (never the rest of it).
    if let Some(o) = &net.oauth {
        paths.push(PathRule { path: o.store_dir.clone(), write: true });
    }
    let backend = netstack::backend::NetBackend::new(stack);
    let stats = backend.stats();
    (GuestNet { mac: GUEST_MAC, mtu, backend: Box::new(backend), reach: Reach::Only(paths) }, stats)
}

/// The boot job guest-init reads, and the main session's request.
fn job_and_session(plan: &RunPlan) -> (Job, protocol::session::Open) {
    let mut job = Job {
        hostname: plan.sandbox.settings.name.clone(),
        interactive: plan.interactive,
        rows: plan.rows,
        cols: plan.cols,
        emulated_cpu: plan.pvm,
        overlay_root: true,
        main_session: true,
        ..Job::default()
    };
    for (i, share) in plan.shares.iter().enumerate() {
        // UTF-8 checked by the plan.
        let path = share.dir.to_string_lossy().into_owned();
        job.shares.push(protocol::Share { tag: share_tag(i), path, read_only: share.read_only });
    }
    job.env.extend(plan.agent_env.iter().cloned());
    if let Some(net) = &plan.net {
        // The CA to trust, and the credentials' placeholders.
        job.ca_cert = Some(net.ca_cert.clone());
        job.env.extend(net.guest_env.iter().cloned());
        let cfg = NetConfig::default();
        job.net = Some(protocol::NetConfig {
            addr: GUEST_IP,
            prefix_len: cfg.prefix_len,
            gateway: cfg.gateway,
            dns: cfg.gateway,
        });
    }
    // UTF-8 checked by the plan. A clone sandbox's program starts in /
    // and enters the workspace once the clone is mounted there.
    let workspace = plan.sandbox.settings.workspace.to_string_lossy().into_owned();
    let (argv, cwd) = match &plan.clone {
        Some(_) => (crate::clone::wrap_argv(&workspace, plan.argv.clone()), "/".to_string()),
        None => (plan.argv.clone(), workspace),
    };
    let mut open = protocol::session::Open { argv, user: plan.user.clone(), main: true, cwd, ..Default::default() };
    if plan.interactive {
        if let Ok(term) = std::env::var("TERM") {
            open.env.push(("TERM".into(), term));
        }
    }
    open.env.extend(plan.env.iter().cloned());
    (job, open)
}

/// A clone sandbox's setup, on its own thread beside the main session
/// (whose program waits for it): the clone on the first start, the
/// mount at every start (`clone::setup`), the clone recorded in the
/// audit log.
fn clone_setup(
    plan: &RunPlan,
    state: crate::clone::CloneState,
    audit: &SharedLog<Box<dyn Write + Send>>,
    stop: Arc<Stop>,
    reach: Reach,
) -> Result<(), LaunchError> {
    let sb = sandbox::Sandbox { dir: plan.sandbox.dir.clone(), settings: plan.sandbox.settings.clone() };
    let workspace = sb.settings.workspace.to_string_lossy().into_owned();
    let log = audit.clone();
    let report = PanicReport::to(&stop);
    threads::spawn(ThreadKind::Control, "sbx-clone", report, reach, move || {
        let give_up = || stop.is_requested();
        let event = match crate::clone::setup(&sb, &state, &workspace, &give_up) {
            Ok(done) => done.cloned.map(|(sha256, bytes)| {
                serde_json::json!({
                    "event": "clone",
                    "repo": state.repo.display().to_string(),
                    "branch": state.branch,
                    "guest_path": workspace,
                    "bundle_sha256": sha256,
                    "bundle_bytes": bytes,
                })
            }),
            Err(why) => {
                eprintln!("sbx: --clone: {}", crate::escape::line(&why));
                Some(serde_json::json!({"event": "clone", "repo": state.repo.display().to_string(), "error": why}))
            }
        };
        if let Some(event) = event {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = log.record(&audit::Event::Untyped(event), sandbox::now_unix_ms()) {
                eprintln!("sbx: {e}");
            }
        }
    })
    .map(|_| ())
    .map_err(LaunchError::Thread)
}

/// With `--console`, the guest's kernel console is copied to stderr,
/// escaped (the guest writes it).
fn console_echo(on: bool) -> Option<Box<dyn Write + Send>> {
    on.then(|| Box::new(EscapingWriter::new(Layout::Lines, io::stderr())) as Box<dyn Write + Send>)
}

/// Runs the plan: the VM on its thread, the program as the main session.
/// `audit` is the sandbox's log once opened (for the caller to flush
/// whatever happens).
pub fn launch(
    plan: &RunPlan,
    stop: Arc<Stop>,
    session_writer: &client::Writer,
    audit_slot: &mut Option<SharedLog<Box<dyn Write + Send>>>,
    control_reach: Reach,
) -> Result<Launched, LaunchError> {
    let sb = &plan.sandbox;
    let name = sb.settings.name.clone();
    let running = sb.mark_running().map_err(|e| LaunchError::Sandbox(name.clone(), e))?;
    let data_disk = sb.data_disk(plan.disk_gib).map_err(|e| LaunchError::Sandbox(name.clone(), e))?;
    let (job, open) = job_and_session(plan);
    let mut opened = open_audit_log(&sb.audit_log())?;
    // Whose decisions follow: the run's header line.
    let header = serde_json::json!({
        "event": "run",
        "agent": plan.agent,
        "sandbox": sb.settings.name,
        "workspace": sb.settings.workspace.display().to_string(),
        "policy_sha256": plan.policy_sha256,
        "policy_source": plan.policy_source,
        "admin_policy_sha256": plan.admin.as_ref().map(|a| a.sha256.clone()),
        "sbx_version": env!("CARGO_PKG_VERSION"),
    });
    opened
        .record(&audit::Event::Untyped(header), sandbox::now_unix_ms())
        .map_err(|e| LaunchError::AuditLog(sb.audit_log(), e.to_string()))?;
    let audit = opened.shared();
    *audit_slot = Some(audit.clone());
    let (fs_devices, fs_counts) = shared_folders(plan, &audit)?;
    // Live rules and held requests, steered through the admin socket.
    let live = match &plan.net {
        Some(n) => {
            let rules =
                crate::admin::load(sb.dir(), sandbox::now_unix_ms()).map_err(|e| LaunchError::Live(name.clone(), e))?;
            let live = Live::with_hold(&name, rules, n.approval_wait_ms);
            live.set_learn(n.learn);
            if let Some(admin) = &plan.admin {
                live.set_admin(admin.network.clone(), "loaded");
            }
            // One line per new question, on stderr, only without a pty
            // (a TUI's screen is never written over).
            if !plan.interactive {
                live.set_announce(Arc::new(|line: &str| eprintln!("{line}")));
            }
            Some(live)
        }
        None => None,
    };
    // Published ports: listened on now, before any thread is jailed.
    let ports = match &plan.net {
        Some(n) => Some(crate::ports::open_all(sb.dir(), &name, &n.publish)?),
        None => None,
    };
    let (net, net_stats) =
        match plan.net.as_ref().map(|n| guest_network(n, audit.clone(), sb.dir(), live.clone(), ports.clone())) {
            Some((net, stats)) => (Some(net), Some((sb.net_stats(), stats))),
            None => (None, None),
        };
    publish_fs_stats(sb.fs_stats(), fs_counts.clone(), net_stats, control_reach.clone());
    if let (Some(live), Some(n)) = (&live, &plan.net) {
        let listener =
            crate::admin::listen(sb.dir()).map_err(|e| LaunchError::Admin(sb.dir().join(crate::admin::SOCKET), e))?;
        let (served, policy, dir, ports) = (live.clone(), n.policy.clone(), sb.dir().to_path_buf(), ports.clone());
        threads::spawn(ThreadKind::Control, "sbx-admin", PanicReport::to(&stop), control_reach.clone(), move || {
            crate::admin::serve_with_ports(listener, served, ports, policy, dir)
        })
        .map_err(LaunchError::Thread)?;
        // The machine's admin policy, watched: a changed file is put in
        // force in this running sandbox (machine_policy's docs).
        let watch = crate::machine_policy::Watch::new(Path::new(crate::machine_policy::PATH), plan.admin.as_ref());
        let (live, interactive) = (live.clone(), plan.interactive);
        threads::spawn(
            ThreadKind::Control,
            "sbx-admin-policy",
            PanicReport::to(&stop),
            control_reach.clone(),
            move || {
                // Told on stderr only without a pty (a TUI's screen is never
                // written over); the audit log has it either way.
                let tell = |line: &str| {
                    if !interactive {
                        eprintln!("{line}");
                    }
                };
                watch.run(live, &tell)
            },
        )
        .map_err(LaunchError::Thread)?;
    }
    let mut initrd = std::fs::read(&plan.initrd).map_err(|e| LaunchError::Image(plan.initrd.clone(), e))?;
    protocol::cpio::append_job(&mut initrd, &job).map_err(|e| LaunchError::Job(e.to_string()))?;

    let report = SharedReport::default();
    let console_file = ConsoleFile::create(&sb.console_log()).map_err(|e| LaunchError::Console(sb.console_log(), e))?;
    let sinks = Sinks {
        program: Box::new(ProgramOutput::new(Filtered::new(io::stdout(), terminal::is_tty(1)), report.clone())),
        console: Box::new(ConsoleLog::new(Some(console_file), console_echo(plan.console_echo), report.clone())),
    };
    let spec = VmSpec {
        kernel: plan.kernel.clone(),
        initrd,
        cmdline: builder::kernel_cmdline(plan.pvm, plan.kernel_log, &plan.kernel_args),
        mem_mib: plan.memory_mib,
        cpus: plan.cpus,
        template: plan.template,
        disks: vec![
            Disk { path: plan.rootfs.clone(), read_only: true, id: protocol::BASE_DISK_SERIAL.into() },
            Disk { path: data_disk, read_only: false, id: protocol::DATA_DISK_SERIAL.into() },
        ],
        net,
        control: Some(sb.listen_control().map_err(|e| LaunchError::Sandbox(name.clone(), e))?),
        shares: fs_devices,
    };
    let stopped = stop.clone();
    let mvm = builder::build_microvm_for_boot(spec, sinks, stop).map_err(LaunchError::Build)?;
    let opts = runner::RunOptions {
        timeout: plan.timeout,
        profile: plan.profile.as_ref().map(|_| Duration::from_millis(5)),
        // The console log it writes (and rotates) is in the sandbox's
        // directory; its disks are open already.
        vcpu_reach: Reach::Only(vec![PathRule { path: sb.dir().to_path_buf(), write: true }]),
        supervisor_reach: threads::supervisor_reach(),
    };
    let vm = vmm::threads::spawn_helper("vm", move || runner::run(mvm, opts)).map_err(LaunchError::Thread)?;
    // The program: the main session over the control channel, as long
    // as the VM lives. Its outcome is the program's; the console only
    // tells of guest-init's failures before a session exists.
    // The user's input to it: a thread of its own kind, started while
    // this one may still start it.
    let input = client::Input::start().map_err(LaunchError::Jail)?;
    // A clone sandbox's setup: its thread confined on its own, so made
    // before this one is (a confined thread cannot confine another).
    if let Some(state) = &plan.clone {
        clone_setup(plan, state.clone(), &audit, stopped, control_reach.clone())?;
    }
    // This thread now only talks to the guest's program and ends the run.
    threads::confine_current(ThreadKind::Control, &control_reach).map_err(LaunchError::Jail)?;
    let ended = || vm.is_finished();
    let session =
        client::run_session(&sb.control_socket(), open, plan.interactive, Duration::MAX, session_writer, &ended, input);
    let result = vm.join().map_err(|_| LaunchError::VmPanicked)?;
    // Uses counted and grants ended during the run are kept.
    if let Some(live) = &live {
        if let Err(e) = crate::admin::save(sb.dir(), &live.persisted()) {
            eprintln!("sbx: {e}");
        }
    }
    Ok(Launched { result, session, report, fs_counts, running })
}
