//! Host side (build machine): `cargo xtask bench agents` — how long each
//! agent's CLI takes to answer `--version` in a sandbox (first run of a
//! sandbox, and again), what the image weighs, and where the guest's time
//! goes (its kernel's functions, sampled): the figures BENCHMARKS.md
//! records for the agents.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util;

/// One `sbx run AGENT -- --version`: its report, and the profile's head.
fn version_run(sbx: &Path, home: &Path, agent: &str, profile: Option<&Path>) -> Result<Value> {
    let report = home.join(format!("{agent}.json"));
    let mut cmd = Command::new(sbx);
    cmd.args(["run", agent, "--name", &format!("bench-{agent}"), "--no-network", "--no-tty", "--timeout", "1800"])
        .arg("--report")
        .arg(&report);
    if let Some(p) = profile {
        cmd.arg("--profile").arg(p);
    }
    let out = cmd
        .args(["--", "--version"])
        .env("SBX_HOME", home)
        .env("SBX_ASSETS", util::assets())
        .stdin(Stdio::null())
        .output()
        .context("Cannot run sbx")?;
    if !out.status.success() {
        bail!("sbx run {agent} -- --version failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    println!("  {agent} says: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(serde_json::from_slice(&std::fs::read(&report)?)?)
}

fn secs(v: &Value, key: &str) -> String {
    v[key].as_f64().map(|ms| format!("{:.1}", ms / 1000.0)).unwrap_or_else(|| "-".into())
}

pub fn agents(which: &[String]) -> Result<()> {
    let sbx = util::root().join("target/release/sbx");
    if !sbx.is_file() {
        bail!("No {} (cargo build --release --bin sbx)", sbx.display());
    }
    let image = util::assets().join("images/agents");
    let size = std::fs::metadata(image.join("rootfs.ext4")).map(|m| m.len() >> 20).unwrap_or(0);
    let used = util::output(Command::new("du").args(["-s", "-m"]).arg(image.join("rootfs.ext4"))).unwrap_or_default();
    println!(
        "Agents' image: rootfs.ext4 {size} MiB ({} MiB on disk), kvm_pvm host: {}",
        used.split_whitespace().next().unwrap_or("?"),
        vmm::arch::cpuid::host_is_pvm()
    );
    println!(
        "{:<8} {:>8} {:>10} {:>12} {:>12} {:>8}",
        "agent", "run", "PID 1 (s)", "started (s)", "output (s)", "exits"
    );
    for agent in which {
        let home = tempfile::tempdir()?;
        let profile = home.path().join("profile.txt");
        for (run, prof) in [("first", Some(profile.as_path())), ("again", None)] {
            let v = version_run(&sbx, home.path(), agent, prof)?;
            println!(
                "{agent:<8} {run:>8} {:>10} {:>12} {:>12} {:>8}",
                secs(&v, "init_ms"),
                secs(&v, "program_started_ms"),
                secs(&v, "first_output_ms"),
                v["exits_total"].as_f64().unwrap_or(0.0)
            );
        }
        let text = std::fs::read_to_string(&profile).unwrap_or_default();
        println!("  where the guest's time went (first run, RIP samples by function, top 8):");
        for line in text.lines().skip(1).take(8) {
            println!("    {line}");
        }
    }
    Ok(())
}
