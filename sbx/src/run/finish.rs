//! Host side: `sbx run`'s finish — the verdict (exit code and one-line
//! summary), the run recorded in the sandbox, and the CLI's own report
//! (boot figures, a profile). The program's status comes from its session
//! alone; the console tells only of boot milestones and of guest-init's
//! failures before a session exists. Guest text is escaped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use protocol::Frame;
use thiserror::Error;
use vmm::control::StopReason;
use vmm::devices::console::GuestReport;

use super::launch::Launched;
use super::plan::RunPlan;
use crate::client::Outcome;
use crate::escape;
use crate::sandbox::{self, LastRun};
use crate::symbols::SystemMap;

/// Exit codes of sbx itself (the program's own code passes through).
pub const EXIT_SBX_ERROR: u8 = 125;
pub const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Error)]
pub enum FinishError {
    #[error("Cannot write the report {0}: {1}")]
    Report(std::path::PathBuf, std::io::Error),
    #[error("Cannot write the profile {0}: {1}")]
    Profile(std::path::PathBuf, std::io::Error),
}

/// The verdict on a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub code: u8,
    pub summary: String,
    /// sbx's failure (printed), not the program's own status.
    pub failure: bool,
}

/// The exit code and summary: the program's status from its session; if
/// there is none, why (guest-init's error, a timeout, a signal, the guest
/// kernel's end).
pub fn judge(reason: &StopReason, session: Option<&Outcome>, guest: &GuestReport, log: &Path) -> Verdict {
    let see_log = format!("console log: {}", log.display());
    let verdict = |code: u8, summary: String, failure: bool| Verdict { code, summary, failure };
    match (reason, session, &guest.outcome) {
        (StopReason::Timeout(s), _, _) => verdict(EXIT_TIMEOUT, format!("Timed out after {s} s ({see_log})"), true),
        (_, Some(Outcome::Exited(c)), _) => verdict(*c as u8, format!("Exited with status {c}"), false),
        (_, Some(Outcome::Killed(s)), _) => {
            verdict(128u8.wrapping_add(*s as u8), format!("Killed by signal {s}"), false)
        }
        (_, Some(Outcome::Failed(msg)), _) | (StopReason::GuestReset, None, Some(Frame::Error(msg))) => {
            verdict(EXIT_SBX_ERROR, format!("guest-init failed: {} ({see_log})", escape::line(msg)), true)
        }
        (StopReason::HostSignal(s), _, _) => {
            verdict(128u8.wrapping_add(*s as u8), format!("Stopped by signal {s}"), true)
        }
        (StopReason::GuestReset | StopReason::TripleFault, _, _) => {
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
            verdict(EXIT_SBX_ERROR, format!("{what} before the program ended{detail} ({see_log})"), true)
        }
        (other, _, _) => verdict(EXIT_SBX_ERROR, format!("{other} ({see_log})"), true),
    }
}

/// Records the run and writes what was asked; returns the verdict.
pub fn finish(plan: &RunPlan, launched: Launched, started: Instant) -> Result<Verdict, FinishError> {
    let Launched { mut result, session, report, fs_counts, running } = launched;
    let (outcome, first_output) = match &session {
        Ok((o, t)) => (Some(o), *t),
        Err(_) => (None, None),
    };
    // System.map is large: read it only when there is an address to name.
    let needs_symbols = plan.profile.is_some() || matches!(result.reason, StopReason::InternalError { .. });
    let symbols = if needs_symbols { SystemMap::for_kernel(&plan.kernel) } else { None };
    if let (StopReason::InternalError { rip, symbol, .. }, Some(map)) = (&mut result.reason, &symbols) {
        *symbol = map.describe(*rip);
    }
    let guest = report.lock().unwrap_or_else(|p| p.into_inner());
    let mut verdict = judge(&result.reason, outcome, &guest, &plan.sandbox.console_log());
    if let (Err(e), StopReason::GuestReset, None) = (&session, &result.reason, &guest.outcome) {
        // The guest ended without a word: say what the session saw.
        verdict.summary = format!("{} ({e})", verdict.summary);
    }
    let last =
        LastRun { ended_unix: sandbox::now_unix(), exit_code: verdict.code.into(), summary: verdict.summary.clone() };
    let _ = plan.sandbox.mark_stopped(&last);
    drop(running);
    if let Some(path) = &plan.profile {
        write_profile(path, &result.rip_samples, symbols.as_ref())?;
    }
    if let Some(path) = &plan.report {
        let figures =
            Figures { start: started, result: &result, guest: &guest, first_output, plan, fs_counts: &fs_counts };
        std::fs::write(path, figures.to_json()).map_err(|e| FinishError::Report(path.clone(), e))?;
    }
    Ok(verdict)
}

/// The CLI's report of a run (`--report FILE`): boot figures measured by
/// the CLI, with the VM's counts.
struct Figures<'a> {
    start: Instant,
    result: &'a vmm::runner::RunResult,
    guest: &'a GuestReport,
    /// When the program's first output reached sbx (from its session).
    first_output: Option<Instant>,
    plan: &'a RunPlan,
    fs_counts: &'a [vmm::devices::virtio::fs::Counts],
}

fn ms_since(start: Instant, t: Option<Instant>) -> serde_json::Value {
    t.map(|t| serde_json::json!(t.saturating_duration_since(start).as_secs_f64() * 1000.0))
        .unwrap_or(serde_json::Value::Null)
}

impl Figures<'_> {
    fn to_json(&self) -> String {
        let fs_requests: Vec<serde_json::Value> =
            self.fs_counts.iter().map(|c| serde_json::json!(*c.lock().unwrap_or_else(|p| p.into_inner()))).collect();
        let (start, r) = (self.start, self.result);
        serde_json::json!({
            "fs_requests": fs_requests,
            "cpu_template": self.plan.template.to_string(),
            "kvm_pvm": self.plan.pvm,
            "first_kvm_run_ms": ms_since(start, r.first_run_at),
            "init_ms": ms_since(start, self.guest.init_at),
            "program_started_ms": ms_since(start, self.guest.started_at),
            "first_output_ms": ms_since(start, self.first_output),
            "end_ms": ms_since(start, Some(r.ended_at)),
            "exits": r.exits.0,
            "exits_total": r.exits.total(),
            "vmm_rss_outside_guest_kib": r.rss_outside_guest_kib,
            "stop": r.reason.to_string(),
        })
        .to_string()
    }
}

/// Writes RIP samples as "count percent function", most frequent first,
/// then the hottest exact addresses (to find the instructions in objdump).
fn write_profile(path: &Path, samples: &[u64], symbols: Option<&SystemMap>) -> Result<(), FinishError> {
    let mut by_fn: BTreeMap<String, u64> = BTreeMap::new();
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
    let mut by_rip: BTreeMap<u64, u64> = BTreeMap::new();
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
    std::fs::write(path, format!("{} samples\n{text}", samples.len())).map_err(|e| FinishError::Profile(path.into(), e))
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
        let v = judge(&StopReason::GuestReset, None, &guest, log);
        assert_eq!((v.code, v.failure), (EXIT_SBX_ERROR, true));
        assert_eq!(
            v.summary,
            "guest-init failed: no /bin/x\\x1b]52;c;eA==\\x07\\x0asbx: all fine\\u{202e} (console log: /s/console.log)"
        );
        let mut guest = GuestReport::default();
        guest.tail.push_back("[ 1.0] Kernel panic - not syncing: \u{9b}2J\u{1b}[8mhidden\rfake\r".into());
        let v = judge(&StopReason::TripleFault, None, &guest, log);
        assert!(v.summary.contains(": [ 1.0] Kernel panic - not syncing: \\u{9b}2J\\x1b[8mhidden\\x0dfake ("), "{v:?}");
        assert!(!v.summary.contains(['\u{1b}', '\u{9b}', '\r']), "{v:?}");
    }

    #[test]
    fn the_programs_status_comes_from_its_session_only() {
        let log = Path::new("/s/console.log");
        // The console claims one status, the session another: the session
        // is the program's.
        let guest = GuestReport { outcome: Some(Frame::Exit(3)), ..GuestReport::default() };
        let v = judge(&StopReason::GuestReset, Some(&Outcome::Exited(7)), &guest, log);
        assert_eq!((v.code, v.failure), (7, false));
        let v = judge(&StopReason::GuestReset, Some(&Outcome::Killed(9)), &guest, log);
        assert_eq!((v.code, v.failure), (137, false));
        // Without a session, a console exit frame is not the program's.
        let v = judge(&StopReason::GuestReset, None, &guest, log);
        assert_eq!((v.code, v.failure), (EXIT_SBX_ERROR, true), "{v:?}");
        // A timeout is sbx's verdict whatever the session said.
        let v = judge(&StopReason::Timeout(5), Some(&Outcome::Exited(0)), &GuestReport::default(), log);
        assert_eq!(v.code, EXIT_TIMEOUT);
        let v = judge(&StopReason::HostSignal(15), None, &GuestReport::default(), log);
        assert_eq!((v.code, v.failure), (143, true));
        let v = judge(&StopReason::GuestReset, Some(&Outcome::Failed("no such file".into())), &guest, log);
        assert!(v.failure && v.summary.starts_with("guest-init failed: no such file"), "{v:?}");
    }
}
