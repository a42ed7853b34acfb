//! Host side: `sbx run` — plan, launch, finish. The plan checks every
//! argument and opens the sandbox before anything starts
//! ([`plan::RunPlan`]); the launch runs the VM and the program's session
//! ([`launch::launch`]); the finish turns the outcome into sbx's exit code
//! and records it ([`finish::finish`]).

pub mod finish;
pub mod launch;
pub mod plan;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm::control::{Stop, StopReason};

use crate::cli::RunArgs;
use crate::client;
use crate::escape::{self, Layout};
use crate::limits;
use crate::sandbox::{self, LastRun};
use crate::signals::names as sig;

pub use finish::{EXIT_SBX_ERROR, EXIT_TIMEOUT};

/// How long `sbx stop` lets the guest end its program and power off in
/// order before the VM is stopped hard.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// Set (to anything) in sbx's environment, `sbx run` leaves the VMM
/// unjailed, saying so: to tell a filter's false refusal from a bug, and
/// to measure what the jail costs (`cargo xtask bench ... --no-jail`).
pub const NO_JAIL: &str = "SBX_NO_JAIL";

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Launch(#[from] launch::LaunchError),
    #[error(transparent)]
    Finish(#[from] finish::FinishError),
    #[error(transparent)]
    Limits(#[from] limits::Error),
    #[error("Cannot jail the VMM: {0}")]
    Jail(#[source] vmm::threads::JailError),
}

/// The signals `sbx run` handles ([`handle_signals`]).
const SIGNALS: [i32; 4] = [sig::TERM, sig::INT, sig::HUP, sig::WINCH];

/// SIGTERM and SIGHUP (`sbx stop`) end the program through its session so
/// that guest-init powers off in order (disk synced and clean); the VM is
/// stopped hard after [`STOP_GRACE`] (the signal thread's own deadline:
/// no thread of its own), at once on a second signal, or at once if the
/// session is not open yet. SIGINT goes to the program (without a
/// terminal; with one, ^C is just a key). SIGWINCH resizes.
fn handle_signals(
    blocked: crate::signals::Blocked,
    stop: Arc<Stop>,
    session: client::Writer,
) -> Result<(), vmm::threads::JailError> {
    use crate::signals::Event;
    use protocol::session::Frame;
    let mut stopping = false;
    // The signal whose grace is running.
    let mut grace: Option<i32> = None;
    blocked.forward(move |event| {
        let s = match event {
            Event::Deadline => {
                if let Some(s) = grace.take() {
                    stop.request(StopReason::HostSignal(s));
                }
                return None;
            }
            Event::Signal(s) => s,
        };
        if s == sig::WINCH {
            if let Some(f) = client::resize_frame() {
                client::send_to(&session, &f);
            }
            return None;
        }
        if s == sig::INT && client::send_to(&session, &Frame::Signal(s)) {
            return None;
        }
        if !std::mem::replace(&mut stopping, true) && client::send_to(&session, &Frame::Signal(s)) {
            grace = Some(s);
            return Some(STOP_GRACE);
        }
        stop.request(StopReason::HostSignal(s));
        None
    })
}

/// The host paths the control threads reach once the VM runs (Landlock):
/// the sandbox's directory (its state, logs, control socket), the
/// kernel's (System.map for error reports), this process's /proc (its
/// memory figures), where `--report` and `--profile` write, and the
/// cgroup sbx made. Nothing else of the host, root or not.
fn control_reach(plan: &plan::RunPlan, cgroup: Option<&limits::Cgroup>) -> vmm::threads::Reach {
    use vmm::threads::{PathRule, Reach};
    let rw = |p: &std::path::Path| PathRule { path: p.to_path_buf(), write: true };
    let ro = |p: &std::path::Path| PathRule { path: p.to_path_buf(), write: false };
    let mut paths = vec![rw(plan.sandbox.dir()), ro(std::path::Path::new("/proc/self"))];
    paths.extend(plan.kernel.parent().map(ro));
    for out in [&plan.report, &plan.profile].into_iter().flatten() {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        paths.push(rw(parent));
    }
    paths.extend(cgroup.map(|c| rw(&c.parent)));
    // The machine's admin policy's folder, read-only: its file is watched
    // while the sandbox runs (a folder made later is not seen).
    let admin_dir = std::path::Path::new(crate::machine_policy::PATH).parent().filter(|d| d.is_dir());
    paths.extend(admin_dir.map(ro));
    // The admin policy's audit copy: written at the run's end.
    paths.extend(plan.audit_copy.as_deref().map(rw));
    // SBX_AUDIT_ANCHORS: its folder, where the run's end appends (and locks).
    let anchors = crate::audit::anchors_from_env().and_then(|a| crate::folders::canonical_lenient(&a).ok());
    paths.extend(anchors.as_deref().and_then(|a| a.parent()).map(rw));
    Reach::Only(paths)
}

/// `sbx run`: the program's exit status, or why sbx failed.
pub fn run(args: &RunArgs, started: Instant) -> Result<ExitCode, RunError> {
    // The jail's process-wide part before any thread: no_new_privs, and
    // as root every capability but those acting on the shared files.
    vmm::fs::server::raise_open_file_limit();
    let jail = std::env::var_os(NO_JAIL).is_none();
    if jail {
        vmm::threads::harden_process().map_err(RunError::Jail)?;
    } else {
        eprintln!(
            "sbx: {NO_JAIL} is set: the VMM runs without its seccomp filters, Landlock and capability drop \
             (for diagnosis and measurement only)"
        );
    }
    // Then, before any thread exists (each started later inherits the
    // block: none but the signal thread takes them) and before the
    // sandbox shows as running: from then on `sbx stop` (SIGTERM) must
    // stop the VM in order, even while it is still being built.
    let blocked = crate::signals::block(&SIGNALS);
    let stop = Arc::new(Stop::default());
    let session = client::Writer::default();
    // Every thread from now on runs under its kind's seccomp filter:
    // the jail's watcher, the signal thread (confined first thing, so
    // after the jail is on), the VMM's.
    if jail {
        vmm::threads::enable_jail(stop.clone(), vmm::runner::kick_signal(), Some(EXIT_SBX_ERROR.into()))
            .map_err(RunError::Jail)?;
        if vmm::threads::landlock_abi().is_none() {
            eprintln!(
                "sbx: this kernel has no Landlock (or it is off: add 'landlock' to the lsm= boot parameter): the VMM's \
                 threads are confined by their seccomp filters only, not to the sandbox's paths"
            );
        }
    }
    handle_signals(blocked, stop.clone(), session.clone()).map_err(RunError::Jail)?;
    let plan = plan::RunPlan::new(args)?;
    // The limits asked for, before the VM and its threads exist (a
    // cgroup's limits bind all of a process's threads in any case).
    let cgroup = limits::apply(&plan.limits, &plan.sandbox.settings.name, &limits::Host::default())?;
    let mut audit = None;
    let reach = control_reach(&plan, cgroup.as_ref());
    let launched = launch::launch(&plan, stop, &session, &mut audit, reach);
    if let Some(Err(note)) = cgroup.map(limits::Cgroup::remove) {
        eprintln!("sbx: {note}");
    }
    // The VM is over: the counts of refusals not yet written go to the
    // audit log now.
    if let Some(log) = audit {
        if let Err(e) = log.lock().unwrap_or_else(|p| p.into_inner()).flush_suppressed(sandbox::now_unix_ms()) {
            eprintln!("sbx: {e}");
        }
    }
    // SBX_AUDIT_ANCHORS: the chain heads kept outside the sandbox's state.
    crate::audit::anchor_after_run(&plan.sandbox);
    // The admin policy's audit_copy: this sandbox's verified log, whole.
    if let Some(dir) = &plan.audit_copy {
        let to = dir.to_string_lossy();
        match crate::audit::export(Some(&plan.sandbox.settings.name), false, "jsonl", &to) {
            Ok(code) if code == ExitCode::SUCCESS => {}
            Ok(_) => eprintln!("sbx: the audit copy to {to} stopped at a broken line (said above)"),
            Err(e) => {
                eprintln!("sbx: the audit copy to {to}: {}", escape::escape(e.to_string().as_bytes(), Layout::Line))
            }
        }
    }
    let launched = match launched {
        Ok(l) => l,
        Err(e) => {
            let last =
                LastRun { ended_unix: sandbox::now_unix(), exit_code: EXIT_SBX_ERROR.into(), summary: e.to_string() };
            let _ = plan.sandbox.mark_stopped(&last);
            return Err(e.into());
        }
    };
    let verdict = finish::finish(&plan, launched, started)?;
    if verdict.failure {
        // Its guest parts are escaped by `judge`; all of it here, in case.
        eprintln!("sbx: {}", escape::escape(verdict.summary.as_bytes(), Layout::Lines));
    }
    Ok(ExitCode::from(verdict.code))
}
