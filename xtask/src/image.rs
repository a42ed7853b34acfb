//! Host side (build machine): `cargo xtask image` — the guest's initramfs:
//! guest-init as /init (a static executable) and busybox (Debian's
//! busybox-static) as the userland. Written with our own cpio writer, so no
//! root rights or device nodes are needed. Cached by a fingerprint of its
//! inputs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use protocol::cpio::CpioWriter;

use crate::util::{self, Fingerprint};

const BUSYBOX: &str = "/bin/busybox";
const RECIPE: &str = "image-recipe-3";
/// The Rust target guest-init is built for: the gnu target with a static
/// C runtime (there is no musl target on our machines).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub const IMAGES: &[&str] = &["shell"];

pub fn out_dir(image: &str) -> PathBuf {
    util::assets().join("images").join(image)
}

/// Builds guest-init as a static executable; returns its path.
fn build_guest_init() -> Result<PathBuf> {
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
    if !IMAGES.contains(&image) {
        bail!("No recipe for image '{image}' yet (available: {})", IMAGES.join(", "));
    }
    util::ensure_packages(&[("busybox-static", BUSYBOX), ("file", "/usr/bin/file")])?;
    let init = build_guest_init()?;
    let mut fp = Fingerprint::default();
    fp.add("recipe", RECIPE.as_bytes()).add("image", image.as_bytes());
    fp.add_file(&init)?.add_file(std::path::Path::new(BUSYBOX))?;
    let key = fp.hex();
    let out = out_dir(image);
    if !force && util::up_to_date(&out, &key, &["initramfs.cpio"]) {
        eprintln!("xtask: image '{image}' up to date ({})", out.join("initramfs.cpio").display());
        return Ok(out.join("initramfs.cpio"));
    }
    std::fs::create_dir_all(&out)?;

    let mut w = CpioWriter::new(Vec::new());
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "home", "var",
        "var/tmp",
    ] {
        w.dir(d, if d.ends_with("tmp") { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, &std::fs::read(&init).context("Cannot read guest-init")?)?;
    w.file("bin/busybox", 0o755, &std::fs::read(BUSYBOX).context("Cannot read busybox")?)?;
    for (dir, name) in busybox_applets()? {
        if name == "busybox" {
            continue;
        }
        let depth = dir.trim_start_matches('/').split('/').filter(|c| !c.is_empty()).count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        w.symlink(&format!("{}/{name}", dir.trim_start_matches('/')), &target)?;
    }
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\nagent:x:1000:\n")?;
    w.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?;
    let bytes = w.finish()?;
    let path = out.join("initramfs.cpio");
    std::fs::write(&path, &bytes).with_context(|| format!("Cannot write {}", path.display()))?;
    util::stamp(&out, &key)?;
    eprintln!("xtask: image '{image}' ready: {} ({} KiB)", path.display(), bytes.len() / 1024);
    Ok(path)
}
