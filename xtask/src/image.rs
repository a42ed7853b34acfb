//! Host side (build machine): `cargo xtask image` — a guest image in two
//! files: `init.cpio`, a tiny initramfs holding only guest-init as /init
//! (a static executable), and `rootfs.ext4`, the read-only root filesystem
//! every sandbox of this image shares, with busybox (Debian's
//! busybox-static) as the userland. guest-init lays each sandbox's own disk
//! over it. The cpio comes from our own writer and the ext4 from
//! `mkfs.ext4 -d`, so no root rights, loop mounts or device nodes are
//! needed. Cached by a fingerprint of its inputs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use protocol::cpio::CpioWriter;

use crate::util::{self, Fingerprint};

const BUSYBOX: &str = "/bin/busybox";
const RECIPE: &str = "image-recipe-7";
pub const MKFS: &str = "/sbin/mkfs.ext4";
pub const INIT_CPIO: &str = "init.cpio";
pub const ROOTFS: &str = "rootfs.ext4";
/// The Rust target guest-init is built for: the gnu target with a static
/// C runtime (there is no musl target on our machines).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub const IMAGES: &[&str] = &["shell"];

pub fn out_dir(image: &str) -> PathBuf {
    util::assets().join("images").join(image)
}

/// Builds guest-init as a static executable; returns its path.
pub fn build_guest_init() -> Result<PathBuf> {
    let target_dir = util::root().join("target/guest");
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "--profile", "guest", "-p", "guest-init", "--target", GUEST_TARGET])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(util::root()),
    )?;
    let bin = target_dir.join(GUEST_TARGET).join("guest/guest-init");
    let info = util::output(Command::new("file").arg(&bin)).unwrap_or_default();
    if !info.is_empty() && !info.contains("statically linked") && !info.contains("static-pie") {
        bail!("guest-init is not static: {info}");
    }
    Ok(bin)
}

/// Applets that get a link of their own. Debian's busybox shell runs every
/// applet without one (standalone shell), so links are only needed for
/// names executed directly: the program `sbx run` starts, shebangs, other
/// programs' exec calls. Every link is a file the guest kernel creates
/// while unpacking the initramfs, emulated on kvm_pvm hosts, so this list
/// is short on purpose.
const LINKED_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "cat",
    "cp",
    "mv",
    "rm",
    "ls",
    "ln",
    "mkdir",
    "rmdir",
    "touch",
    "chmod",
    "chown",
    "echo",
    "env",
    "printf",
    "test",
    "[",
    "true",
    "false",
    "sleep",
    "ps",
    "kill",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "sort",
    "uniq",
    "cut",
    "tr",
    "find",
    "xargs",
    "id",
    "whoami",
    "hostname",
    "uname",
    "date",
    "df",
    "du",
    "mount",
    "umount",
    "dmesg",
    "vi",
    "less",
    "tar",
    "gzip",
    "gunzip",
    "wget",
    "ip",
    "which",
    "stty",
    "tty",
    "basename",
    "dirname",
    "readlink",
    "realpath",
    "stat",
    "seq",
    "tee",
    "yes",
    "md5sum",
    "sha256sum",
    "diff",
    "od",
    "hexdump",
    "free",
    "top",
    "uptime",
    "nproc",
    "sync",
    "poweroff",
    "reboot",
    "su",
    "time",
    "timeout",
    "expr",
    "pwd",
    "clear",
];

/// (directory, name) of each linked applet, where busybox installs it.
fn busybox_applets() -> Result<Vec<(String, String)>> {
    let list = util::output(Command::new(BUSYBOX).arg("--list-full"))?;
    Ok(list
        .lines()
        .filter(|l| !l.is_empty() && !l.contains(".."))
        .filter_map(|l| {
            let (dir, name) = l.rsplit_once('/')?;
            Some((dir.to_string(), name.to_string()))
        })
        .filter(|(_, name)| LINKED_APPLETS.contains(&name.as_str()))
        .collect())
}

pub fn build(image: &str, force: bool) -> Result<PathBuf> {
    build_with(image, force, &[])
}

/// Builds `image` (`versions`: agent CLI versions to use instead of the
/// pinned ones, for the agents' image).
pub fn build_with(image: &str, force: bool, versions: &[(String, String)]) -> Result<PathBuf> {
    if image == crate::image_agents::IMAGE || crate::image_agents::AGENTS.contains(&image) {
        return crate::image_agents::build(force, versions);
    }
    if !versions.is_empty() {
        bail!("Image '{image}' has no agent CLI to set a version for");
    }
    if !IMAGES.contains(&image) {
        bail!(
            "No recipe for image '{image}' (available: {}, {})",
            IMAGES.join(", "),
            crate::image_agents::AGENTS.join(", ")
        );
    }
    util::ensure_packages(&[("busybox-static", BUSYBOX), ("file", "/usr/bin/file"), ("e2fsprogs", MKFS)])?;
    let init = build_guest_init()?;
    let git = host_program("git", "git")?;
    // A TLS client that verifies against the guest's trust store (busybox
    // wget does not verify): agents and tests fetch over HTTPS with it.
    let curl = host_program("curl", "curl")?;
    let mut fp = Fingerprint::default();
    fp.add("recipe", RECIPE.as_bytes()).add("image", image.as_bytes());
    fp.add_file(&init)?.add_file(Path::new(BUSYBOX))?;
    for f in git.iter().chain(&curl) {
        fp.add_file(f)?;
    }
    let key = fp.hex();
    let out = out_dir(image);
    if !force && util::up_to_date(&out, &key, &[INIT_CPIO, ROOTFS]) {
        eprintln!("xtask: image '{image}' up to date ({})", out.display());
        return Ok(out);
    }
    std::fs::create_dir_all(&out)?;
    let cpio = write_init_cpio(&init, &out.join(INIT_CPIO))?;
    let rootfs = write_rootfs(&out, &[git, curl])?;
    util::stamp(&out, &key)?;
    eprintln!(
        "xtask: image '{image}' ready in {}: {INIT_CPIO} {} KiB, {ROOTFS} {} KiB",
        out.display(),
        cpio / 1024,
        rootfs / 1024
    );
    Ok(out)
}

/// The initramfs: guest-init and the mount points it needs before the
/// disks are up. Returns its size.
pub fn write_init_cpio(init: &Path, path: &Path) -> Result<u64> {
    let mut w = CpioWriter::new(Vec::new());
    for d in ["dev", "proc", "sys", "sbx"] {
        w.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, &std::fs::read(init).context("Cannot read guest-init")?)?;
    let bytes = w.finish()?;
    std::fs::write(path, &bytes).with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(bytes.len() as u64)
}

/// A program of the build machine (git: agents work in repositories;
/// curl) and the shared libraries it loads (Debian's `package` installed
/// if there is none): the binary first.
fn host_program(name: &str, package: &str) -> Result<Vec<PathBuf>> {
    let found = util::output(Command::new("sh").args(["-c", &format!("command -v {name}")])).unwrap_or_default();
    let bin = match found.trim() {
        "" => {
            let path = format!("/usr/bin/{name}");
            util::ensure_packages(&[(package, path.as_str())])?;
            PathBuf::from(path)
        }
        path => PathBuf::from(path),
    };
    let mut files = vec![bin.clone()];
    // "libz.so.1 => /lib/.../libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)".
    for line in util::output(Command::new("ldd").arg(&bin))?.lines() {
        let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// The root filesystem, staged in a directory and turned into a read-only
/// ext4 image (no journal: nothing ever writes to it). Returns its size.
/// `programs`: each a binary (to /usr/bin) and its libraries (where they
/// are).
fn write_rootfs(out: &Path, programs: &[Vec<PathBuf>]) -> Result<u64> {
    let stage = out.join("rootfs.stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let dirs = [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        "home",
        "home/agent",
        "var",
        "var/tmp",
        "sbx",
    ];
    for d in dirs {
        let p = stage.join(d);
        std::fs::create_dir_all(&p)?;
        let mode = if d.ends_with("tmp") { 0o1777 } else { 0o755 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    // The agent's home is the agent's (mkfs.ext4 -d keeps owners).
    if let Err(e) = std::os::unix::fs::chown(stage.join("home/agent"), Some(1000), Some(1000)) {
        eprintln!("xtask: /home/agent stays root's in the image (not building as root?): {e}");
    }
    let busybox = stage.join("bin/busybox");
    std::fs::copy(BUSYBOX, &busybox).context("Cannot copy busybox")?;
    std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755))?;
    for (dir, name) in busybox_applets()? {
        if name == "busybox" {
            continue;
        }
        let rel = dir.trim_start_matches('/');
        let depth = rel.split('/').filter(|c| !c.is_empty()).count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(target, stage.join(rel).join(&name))?;
    }
    for (i, f) in programs.iter().flat_map(|p| p.iter().enumerate()) {
        let to = match (i, f.file_name()) {
            (0, Some(name)) => stage.join("usr/bin").join(name),
            _ => stage.join(f.strip_prefix("/")?),
        };
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(f, &to).with_context(|| format!("Cannot copy {}", f.display()))?;
    }
    let files: [(&str, &[u8]); 3] = [
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n"),
        ("etc/group", b"root:x:0:\nagent:x:1000:\n"),
        ("etc/hosts", b"127.0.0.1 localhost\n"),
    ];
    for (name, text) in files {
        std::fs::write(stage.join(name), text)?;
    }
    let size = make_ext4(&stage, &out.join(ROOTFS), "sbx-base")?;
    std::fs::remove_dir_all(&stage)?;
    Ok(size)
}

/// A read-only ext4 image at `path` of the staged tree `stage` (no
/// journal: nothing ever writes to it); returns its size.
pub fn make_ext4(stage: &Path, path: &Path, label: &str) -> Result<u64> {
    // Staged size plus room for ext4's own structures.
    let used = util::output(Command::new("du").args(["-s", "-B1"]).arg(stage))?;
    let used: u64 = used.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let size_mib = (used / (1 << 20)) * 5 / 4 + 16;
    let _ = std::fs::remove_file(path);
    util::run(
        Command::new(MKFS)
            .args(["-q", "-F", "-L", label, "-O", "^has_journal", "-m", "0", "-E", "root_owner=0:0", "-d"])
            .arg(stage)
            .arg(path)
            .arg(format!("{size_mib}M")),
    )?;
    Ok(std::fs::metadata(path)?.len())
}
