//! Host side: helpers for sbx's end-to-end tests — finding the `sbx` binary
//! and the built kernel and image, and running `sbx` with its own state
//! directory. Each test boots real guests.
//!
//! Every test in tests/tests/ is `#[ignore = "what it needs"]`, so a plain
//! `cargo test --workspace` lists it as ignored (never as passed without
//! having run). `cargo xtask test` builds the kernel, the images and a
//! release sbx, then runs them with `--ignored` (see xtask/src/main.rs);
//! run one by hand with
//! `cargo test -p sbx-tests --test boot -- --ignored`. Asked for, a test
//! whose prerequisite is missing fails, naming the cure; none skips.
#![forbid(unsafe_code)]

pub mod model;
pub mod tls;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The sbx binary and assets directory, or why the tests cannot run here
/// (naming the cure).
pub fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    let bin = std::env::var_os("SBX_BIN").map(PathBuf::from).unwrap_or_else(|| root().join("target/release/sbx"));
    let assets = std::env::var_os("SBX_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("target/sbx"));
    if !bin.is_file() {
        Err(format!("no sbx binary at {} (cargo build --release --bin sbx)", bin.display()))
    } else if !assets.join("kernel/vmlinux").is_file() {
        Err(format!("no kernel in {} (cargo xtask kernel)", assets.display()))
    } else if !assets.join("images/shell/init.cpio").is_file() || !assets.join("images/shell/rootfs.ext4").is_file() {
        Err(format!("no shell image in {} (cargo xtask image)", assets.display()))
    } else if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        Err("/dev/kvm is not available to this user".to_string())
    } else {
        Ok((bin, assets))
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
    /// Panics (the test fails) when a prerequisite is missing: the e2e
    /// tests are `#[ignore]`d, so they only run when asked for, and then
    /// they must really run.
    // No Default: building one checks the host and may fail the test.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Sbx {
        let (bin, assets) = match prerequisites() {
            Ok(found) => found,
            Err(why) => {
                panic!("end-to-end prerequisite missing: {why}; `cargo xtask test` builds everything and runs these")
            }
        };
        let (home, work) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        Sbx { bin, assets, home, work }
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

/// Whether the file at `path` holds `needle`, read in pieces (the
/// sandbox's disk is large and sparse).
pub fn file_contains(path: &std::path::Path, needle: &str) -> bool {
    file_holds(path, &[needle])[0]
}

/// For each of `needles`, whether the file at `path` holds it: one pass
/// over the file, in pieces; all-zero pieces (a sparse disk's holes) are
/// skipped without searching.
pub fn file_holds(path: &std::path::Path, needles: &[&str]) -> Vec<bool> {
    let mut f = std::fs::File::open(path).unwrap();
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    let (mut buf, mut carry) = (vec![0u8; 1 << 20], Vec::new());
    let mut found = vec![false; needles.len()];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            return found;
        }
        if buf[..n].iter().all(|&b| b == 0) && carry.iter().all(|&b| b == 0) {
            carry.clear();
            continue;
        }
        carry.extend_from_slice(&buf[..n]);
        for (i, needle) in needles.iter().enumerate() {
            let needle = needle.as_bytes();
            if !found[i] && carry.windows(needle.len()).any(|w| w == needle) {
                found[i] = true;
            }
        }
        carry.drain(..carry.len().saturating_sub(longest));
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
/// false in the caller's process once the re-run passed. It panics if the
/// re-run failed, or when it cannot be done (not root, no unshare): the
/// test is ignored unless asked for, and then it never passes silently.
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
        panic!("end-to-end prerequisite missing: {why}");
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
        .args(["--exact", test, "--include-ignored", "--nocapture", "--test-threads", "1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .expect("run unshare");
    assert!(status.success(), "{test} failed in its mount namespace ({status})");
    false
}

#[cfg(test)]
mod tests {
    /// The `#[test]`s in `source` that are not directly followed by an
    /// `#[ignore = "REASON"]` with a reason, by line number.
    fn unmarked(source: &str) -> Vec<usize> {
        let lines: Vec<&str> = source.lines().map(str::trim).collect();
        (0..lines.len())
            .filter(|&i| lines[i] == "#[test]")
            .filter(|&i| {
                let next = lines.get(i + 1).copied().unwrap_or("");
                let reason = next.strip_prefix("#[ignore = \"").and_then(|r| r.strip_suffix("\"]")).unwrap_or("");
                reason.trim().is_empty()
            })
            .map(|i| i + 1)
            .collect()
    }

    #[test]
    fn the_marker_check_sees_a_test_that_would_skip() {
        let bad = "#[test]\nfn a() {}\n#[test]\n#[ignore = \"\"]\nfn b() {}\n#[test]\n#[ignore]\nfn c() {}\n";
        assert_eq!(unmarked(bad), vec![1, 3, 6]);
        assert!(unmarked("#[test]\n#[ignore = \"boots a guest\"]\nfn a() {}\n").is_empty());
    }

    /// Every test in tests/tests/ needs something a plain `cargo test` may
    /// not have (a guest, the agent CLIs): each is ignored with a reason, so
    /// none is reported as passed without having run, and none may skip by
    /// returning early (an asked-for test with a missing prerequisite fails).
    #[test]
    fn every_test_that_needs_more_than_the_host_is_ignored_with_a_reason() {
        let dir = super::root().join("tests/tests");
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "rs"));
        assert!(files.len() >= 8, "tests/tests/ has only {files:?}");
        for f in files {
            let source = std::fs::read_to_string(&f).unwrap();
            assert_eq!(unmarked(&source), Vec::<usize>::new(), "{}: tests without #[ignore = \"reason\"]", f.display());
            assert!(!source.contains("SKIPPED"), "{}: a test that skips passes without having run", f.display());
        }
    }
}
