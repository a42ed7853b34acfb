//! Host side: helpers for sbx's end-to-end tests — finding the `sbx` binary
//! and the built kernel and image, and running `sbx` with its own state
//! directory. Each test boots real guests.
#![forbid(unsafe_code)]

pub mod model;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The sbx binary and assets directory, or why the tests cannot run.
/// Under `cargo xtask test` (SBX_E2E_REQUIRED=1) a missing prerequisite is
/// a failure; otherwise the test prints why it is skipped.
pub fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    let bin = std::env::var_os("SBX_BIN").map(PathBuf::from).unwrap_or_else(|| root().join("target/release/sbx"));
    let assets = std::env::var_os("SBX_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("target/sbx"));
    let missing = if !bin.is_file() {
        Some(format!("no sbx binary at {} (cargo build --release --bin sbx)", bin.display()))
    } else if !assets.join("kernel/vmlinux").is_file() {
        Some(format!("no kernel in {} (cargo xtask kernel)", assets.display()))
    } else if !assets.join("images/shell/init.cpio").is_file() || !assets.join("images/shell/rootfs.ext4").is_file() {
        Some(format!("no shell image in {} (cargo xtask image)", assets.display()))
    } else if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        Some("/dev/kvm is not available".to_string())
    } else {
        None
    };
    match missing {
        None => Some((bin, assets)),
        Some(why) if std::env::var_os("SBX_E2E_REQUIRED").is_some() => panic!("end-to-end prerequisite missing: {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}; `cargo xtask test` builds everything and runs these");
            None
        }
    }
}

/// An `sbx` invocation with a private SBX_HOME, run in a folder of its
/// own (the workspace its sandboxes share, unless told otherwise).
pub struct Sbx {
    pub bin: PathBuf,
    pub assets: PathBuf,
    pub home: tempfile::TempDir,
    pub work: tempfile::TempDir,
}

impl Sbx {
    pub fn new() -> Option<Sbx> {
        let (bin, assets) = prerequisites()?;
        let (home, work) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        Some(Sbx { bin, assets, home, work })
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("SBX_HOME", self.home.path()).env("SBX_ASSETS", &self.assets).stdin(Stdio::null());
        c.current_dir(self.work.path());
        c
    }

    /// Runs `sbx ARGS`, feeding `input` on its standard input.
    pub fn run(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sbx");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait for sbx");
        let _ = feeder.join();
        out
    }
}

impl Sbx {
    /// Waits (up to 60 s) until `sbx ls` shows sandbox `name` running.
    pub fn wait_running(&self, name: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ls = text(&self.cmd().arg("ls").output().expect("sbx ls").stdout);
            if ls.lines().any(|l| l.starts_with(&format!("{name} ")) && l.contains("running:")) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{name} never ran: {ls}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Sbx {
    /// `sbx approvals NAME`'s waiting questions: (id, host:port+path, method).
    pub fn waiting(&self, name: &str) -> Vec<(String, String, String)> {
        let out = self.cmd().args(["approvals", name]).output().expect("sbx approvals");
        text(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4 && f[1] == "waiting").then(|| (f[0].to_string(), f[2].to_string(), f[3].to_string()))
            })
            .collect()
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Set in the environment of a test re-run by [`in_private_mount_namespace`].
pub const IN_NAMESPACE: &str = "SBX_TESTS_IN_MOUNT_NAMESPACE";

/// Runs test `test` of this test binary again, alone, in a new mount
/// namespace (`unshare --mount --propagation private`, root only) with an
/// empty root-owned tmpfs (0755) over `dir` — so that a test can write the
/// machine's `/etc/sbx` without touching the host's. `dir` is made (empty)
/// if the host has none: a mount needs a mount point.
///
/// Returns true in the re-run (the caller goes on with the test body);
/// false in the caller's process once the re-run passed (it panics if the
/// re-run failed), or when it cannot be done (not root, no unshare):
/// then a failure under SBX_E2E_REQUIRED, else a printed skip.
pub fn in_private_mount_namespace(test: &str, dir: &str) -> bool {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return true;
    }
    let why = if !Path::new("/proc/self/ns/mnt").exists() {
        Some("no mount namespaces".to_string())
    } else if Command::new("id").arg("-u").output().map(|o| text(&o.stdout).trim() != "0").unwrap_or(true) {
        Some("not root (a mount namespace with a tmpfs needs it)".to_string())
    } else if Command::new("unshare").arg("--version").output().is_err() {
        Some("no unshare(1) (util-linux)".to_string())
    } else {
        None
    };
    if let Some(why) = why {
        if std::env::var_os("SBX_E2E_REQUIRED").is_some() {
            panic!("end-to-end prerequisite missing: {why}");
        }
        eprintln!("SKIPPED: {why}");
        return false;
    }
    if !Path::new(dir).is_dir() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot make the mount point {dir}: {e}"));
    }
    let exe = std::env::current_exe().expect("the test binary");
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o mode=0755,uid=0,gid=0 sbx-test \"$1\" && shift && exec \"$@\"")
        .args(["sh", dir])
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .expect("run unshare");
    assert!(status.success(), "{test} failed in its mount namespace ({status})");
    false
}
