//! Host side (build machine): helpers for xtask — running commands with
//! clear errors, hashing inputs for caches, installing Debian packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Where built kernels and images go: target/sbx.
pub fn assets() -> PathBuf {
    root().join("target/sbx")
}

/// Runs `cmd`, failing with its description if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("Cannot start {desc}"))?;
    if !status.success() {
        bail!("Command failed ({status}): {desc}");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("Cannot start {desc}"))?;
    if !out.status.success() {
        bail!("Command failed ({}): {desc}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A hash over labelled inputs, for build caches.
#[derive(Default)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn add(&mut self, label: &str, bytes: &[u8]) -> &mut Self {
        self.0.update((label.len() as u64).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn add_file(&mut self, path: &Path) -> Result<&mut Self> {
        let bytes = std::fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
        Ok(self.add(&path.to_string_lossy(), &bytes))
    }

    pub fn hex(&self) -> String {
        self.0.clone().finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// True if the cache stamp in `dir` matches `key` and every `outputs` exists.
pub fn up_to_date(dir: &Path, key: &str, outputs: &[&str]) -> bool {
    std::fs::read_to_string(dir.join(".fingerprint")).map(|k| k.trim() == key).unwrap_or(false)
        && outputs.iter().all(|o| dir.join(o).exists())
}

pub fn stamp(dir: &Path, key: &str) -> Result<()> {
    std::fs::write(dir.join(".fingerprint"), key)
        .with_context(|| format!("Cannot write the stamp in {}", dir.display()))
}

/// Installs Debian packages whose marker file is missing. Needs root.
pub fn ensure_packages(needs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> =
        needs.iter().filter(|(_, marker)| !Path::new(marker).exists()).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let is_root = output(Command::new("id").arg("-u")).map(|u| u.trim() == "0").unwrap_or(false);
    if !is_root {
        bail!("Missing Debian packages: {} (run: sudo apt-get install {})", missing.join(" "), missing.join(" "));
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
