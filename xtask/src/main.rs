//! Host side (build machine): sbx's build tasks — the guest kernel, guest
//! images, the whole test suite, and benchmarks.
#![forbid(unsafe_code)]

mod bench;
mod bench_agents;
mod bench_fs;
mod image;
mod image_agents;
mod kernel;
mod util;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the guest kernel (cached).
    Kernel {
        #[arg(long)]
        force: bool,
    },
    /// Build a guest image (cached): shell, or claude, gemini, codex,
    /// copilot, opencode, aider (one image for the agents, with their CLI
    /// versions pinned in xtask/src/image_agents.rs).
    Image {
        #[arg(default_value = "shell")]
        name: String,
        #[arg(long)]
        force: bool,
        /// Use this version of the agent CLI NAME instead of the pinned
        /// one (claude, gemini, codex, copilot, opencode or aider).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// List the images built.
        #[arg(long)]
        list: bool,
    },
    /// Benchmarks: `boot` (sbx vs QEMU on the same kernel and image),
    /// `net` (netstack throughput and latency, in process), `guest-net`
    /// (a real guest's HTTP download through netstack), `fs` (the shared
    /// folder: host vs sbx's virtio-fs vs QEMU's 9p), `agents` (each
    /// agent's `--version` in a sandbox, first run and again, and where
    /// the guest's time goes).
    Bench {
        #[arg(value_parser = ["boot", "net", "guest-net", "fs", "jail", "agents"])]
        what: String,
        /// The agents to measure (agents; default: all of them).
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// Size of the guest-net download (default 32) or of fs's big
        /// file (default 256), in MiB.
        #[arg(long)]
        mib: Option<u64>,
        /// Number of small files (fs).
        #[arg(long, default_value_t = 10000)]
        files: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// net: only the held-request figures (memory per held request,
        /// approval to upstream).
        #[arg(long)]
        held: bool,
    },
    /// Build everything and run every test, end-to-end ones included.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root());
    c
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Kernel { force } => kernel::build(force).map(|_| ()),
        Task::Image { list: true, .. } => image_agents::list(),
        Task::Image { name, force, version, .. } => {
            let versions: Vec<(String, String)> = version.map(|v| (name.clone(), v)).into_iter().collect();
            image::build_with(&name, force, &versions).map(|_| ())
        }
        Task::Bench { what, runs, memory, .. } if what == "boot" => bench::boot(runs, memory),
        Task::Bench { what, mib, .. } if what == "guest-net" => bench::guest_net(mib.unwrap_or(32)),
        Task::Bench { what, mib, files, memory, .. } if what == "fs" => bench_fs::fs(mib.unwrap_or(256), files, memory),
        Task::Bench { what, mib, files, memory, .. } if what == "jail" => {
            bench_fs::jail(mib.unwrap_or(64), files, memory)
        }
        Task::Bench { what, agents, .. } if what == "agents" => {
            let all: Vec<String> = image_agents::AGENTS.iter().map(|a| a.to_string()).collect();
            bench_agents::agents(if agents.is_empty() { &all } else { &agents })
        }
        Task::Bench { mib, held, .. } => {
            let mut c = cargo();
            c.args(["bench", "-p", "netstack", "--bench", "net", "--"]);
            if let Some(m) = mib {
                c.args(["--mib", &m.to_string()]);
            }
            if held {
                c.arg("--held");
            }
            util::run(&mut c)
        }
        Task::Test { args } => {
            kernel::build(false)?;
            image::build("shell", false)?;
            // The agents' end-to-end tests run the real CLIs.
            image::build("claude", false)?;
            util::run(cargo().args(["build", "--release", "--bin", "sbx"]))?;
            let e2e = e2e_tests(&util::root().join("tests/tests"))?;
            // First what runs anywhere (the e2e tests show as ignored), then
            // the e2e tests themselves. Both must run here: a missing
            // prerequisite is a failure, not a skip (SBX_E2E_REQUIRED is
            // read by vmm/tests/pvm_native.rs; an asked-for e2e test fails
            // on its own).
            let run_slow = std::env::var_os("SBX_E2E_SLOW").is_some_and(|v| v == "1");
            let mut e2e_phase = test_args(&args, Some(&e2e));
            e2e_phase.extend(slow_skips(run_slow));
            for phase in [test_args(&args, None), e2e_phase] {
                util::run(
                    cargo()
                        .args(&phase)
                        .env("SBX_E2E_REQUIRED", "1")
                        .env("SBX_BIN", util::root().join("target/release/sbx"))
                        .env("SBX_ASSETS", util::assets()),
                )?;
            }
            Ok(())
        }
    }
}

/// End-to-end tests too slow for every `cargo xtask test` (CI's budget),
/// each with why: left out, named on stderr, unless SBX_E2E_SLOW=1.
const SLOW_E2E: &[(&str, &str)] = &[
    // Empty: OpenCode's `--version` (once listed here at ~14 minutes) took
    // 290 s in a guest on 2026-12-07 and runs with the others.
];

/// The harness arguments that leave the slow e2e tests out (none with
/// `run_slow`), each left out said on stderr.
fn slow_skips(run_slow: bool) -> Vec<String> {
    if run_slow {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, why) in SLOW_E2E {
        eprintln!("xtask: e2e test {name} left out: {why}; SBX_E2E_SLOW=1 cargo xtask test runs it");
        out.extend(["--skip".to_string(), name.to_string()]);
    }
    out
}

/// Test files in tests/ that are developer tools, not run by `cargo xtask
/// test` (agents_host needs the agent CLIs installed by npm on the host).
const DEVELOPER_TESTS: &[&str] = &["agents_host"];

/// The end-to-end test targets: every tests/tests/NAME.rs but the
/// developer tools, sorted.
fn e2e_tests(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("Cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            if !DEVELOPER_TESTS.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The `cargo` arguments of one test phase. `user`: what followed
/// `cargo xtask test --` (cargo's arguments, then after a `--` the test
/// harness's). `e2e: None`: the whole workspace, ignored tests left out;
/// `Some(targets)`: the e2e tests (sbx-tests, ignored in a plain `cargo
/// test`) with `--ignored`, only the targets the user named with `--test`
/// if any.
fn test_args(user: &[String], e2e: Option<&[String]>) -> Vec<String> {
    let split = user.iter().position(|a| a == "--").unwrap_or(user.len());
    let (cargo_args, harness) = (&user[..split], user.get(split + 1..).unwrap_or(&[]));
    let mut out: Vec<String> = vec!["test".into()];
    match e2e {
        None => out.push("--workspace".into()),
        Some(targets) => {
            out.extend(["-p".into(), "sbx-tests".into()]);
            if !cargo_args.iter().any(|a| a == "--test" || a.starts_with("--test=")) {
                for t in targets {
                    out.extend(["--test".into(), t.clone()]);
                }
            }
        }
    }
    out.extend(cargo_args.iter().cloned());
    out.push("--".into());
    if e2e.is_some() {
        out.push("--ignored".into());
    }
    out.extend(harness.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_e2e_phase_runs_the_ignored_tests_and_the_first_leaves_them_out() {
        let e2e = strings(&["boot", "network"]);
        assert_eq!(test_args(&[], None), strings(&["test", "--workspace", "--"]));
        assert_eq!(
            test_args(&[], Some(&e2e)),
            strings(&["test", "-p", "sbx-tests", "--test", "boot", "--test", "network", "--", "--ignored"])
        );
        let user = strings(&["--test", "network", "--", "--nocapture"]);
        assert_eq!(test_args(&user, None), strings(&["test", "--workspace", "--test", "network", "--", "--nocapture"]));
        assert_eq!(
            test_args(&user, Some(&e2e)),
            strings(&["test", "-p", "sbx-tests", "--test", "network", "--", "--ignored", "--nocapture"])
        );
    }

    #[test]
    fn the_slow_e2e_tests_are_left_out_unless_asked_for() {
        assert!(slow_skips(true).is_empty());
        let skipped: Vec<String> = SLOW_E2E.iter().flat_map(|(n, _)| ["--skip".to_string(), n.to_string()]).collect();
        assert_eq!(slow_skips(false), skipped);
        // Each names a test that exists.
        let agents = std::fs::read_to_string(util::root().join("tests/tests/agents.rs")).unwrap();
        for (name, _) in SLOW_E2E {
            assert!(agents.contains(&format!("fn {name}()")), "{name}");
        }
    }

    #[test]
    fn every_e2e_file_but_the_developer_tools_is_run() {
        let names = e2e_tests(&util::root().join("tests/tests")).unwrap();
        for want in ["agents", "boot", "credentials", "exec", "live", "network", "workspace"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n == "agents_host"), "{names:?}");
    }
}
