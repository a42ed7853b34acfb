//! Host side: per-sandbox resource limits (`sbx run --cpu-limit`,
//! `--pids-limit`) applied with cgroup v2 to the sbx process, which is the
//! VMM: one process whose threads are the vCPUs, the device workers,
//! netstack and its connect threads.
//!
//! [`apply`] finds the cgroup2 mount (`/proc/self/mountinfo`; it may be
//! `/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`) and the
//! process's own cgroup (`0::/path` in `/proc/self/cgroup`), checks that
//! the controllers needed are in its `cgroup.controllers`, makes a child
//! cgroup `sbx-NAME` for the sandbox, enables the controllers in the
//! parent's `cgroup.subtree_control` where needed, writes the limits
//! (`cpu.max`, `pids.max`) and moves the process into the child. cgroup v2
//! allows controllers only below a cgroup without processes (its root
//! aside), so below any other cgroup sbx must be the only process in it
//! (as under `systemd-run --user --scope -p Delegate=yes sbx run …`): it
//! then moves itself into the child first. [`Cgroup::remove`] undoes this
//! at the end of the run, best effort and bounded; a cgroup left behind
//! is empty once sbx has exited and is used again by the next run of the
//! same sandbox.
//!
//! When no limit is asked for nothing is read or required. When one is
//! and cannot be applied, the run fails before the VM starts, with an
//! error naming the problem and its cure.
//!
//! No memory limit (`memory.max`) is set: the guest's memory is bounded
//! by `--memory` already, and a cap on the whole VMM (guest memory plus
//! an overhead guessed here) would, when the guess is short, have the
//! kernel kill the VMM and with it the sandbox, losing its last audit
//! lines, rather than refuse anything.
//!
//! The places read and written are injectable ([`Host`]) so that the
//! parsing and writing are tested on a fake cgroup tree.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// The CPU period written to `cpu.max`, microseconds (the kernel's
/// default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Fewest cores' worth of CPU `--cpu-limit` takes (1 ms a period, the
/// kernel's least quota).
pub const MIN_CPU_LIMIT: f64 = 0.01;
/// Most cores' worth `--cpu-limit` takes.
pub const MAX_CPU_LIMIT: f64 = 1024.0;
/// Fewest tasks `--pids-limit` takes: sbx's own threads (the vCPUs, each
/// device's worker, netstack, the control channel, signals) need about
/// this many before netstack's connect threads.
pub const MIN_PIDS: u64 = 64;
/// Most tasks `--pids-limit` takes (the kernel's largest pid_max).
pub const MAX_PIDS: u64 = 1 << 22;
/// Largest `--workspace-quota`: 1 PiB.
pub const MAX_QUOTA: u64 = 1 << 50;
/// The cgroup of a sandbox is this prefix and its name.
pub const PREFIX: &str = "sbx-";
/// How long [`Cgroup::remove`] retries removing the cgroup.
const REMOVE_TRIES: u32 = 20;
const REMOVE_PAUSE: Duration = Duration::from_millis(10);

/// How to start sbx in a cgroup of its own that it may manage.
const DELEGATE_HINT: &str = "run sbx in a cgroup delegated to you, e.g. \
    `systemd-run --user --scope -p Delegate=yes sbx run …`, or as root";

/// The limits asked for (none: nothing is done).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Cores' worth of CPU time (`--cpu-limit`).
    pub cpu: Option<f64>,
    /// Tasks (threads and processes, `--pids-limit`).
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.pids.is_none()
    }

    /// The controllers needed, each with the option that needs it.
    fn controllers(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.cpu.is_some() {
            v.push(("cpu", "--cpu-limit"));
        }
        if self.pids.is_some() {
            v.push(("pids", "--pids-limit"));
        }
        v
    }

    /// The options given, for messages: "--cpu-limit and --pids-limit".
    fn options(&self) -> String {
        self.controllers().iter().map(|(_, o)| *o).collect::<Vec<_>>().join(" and ")
    }

    /// The files to write in the sandbox's cgroup and what.
    fn files(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(cores) = self.cpu {
            v.push(("cpu.max", cpu_max(cores)));
        }
        if let Some(n) = self.pids {
            v.push(("pids.max", n.to_string()));
        }
        v
    }
}

/// `cpu.max` for `cores` cores' worth: "QUOTA PERIOD", microseconds.
pub fn cpu_max(cores: f64) -> String {
    let quota = (cores * CPU_PERIOD_US as f64).round() as u64;
    format!("{quota} {CPU_PERIOD_US}")
}

/// `--cpu-limit`: cores' worth of CPU time, a number from
/// [`MIN_CPU_LIMIT`] to [`MAX_CPU_LIMIT`].
pub fn parse_cpu_limit(text: &str) -> Result<f64, String> {
    let range = format!("a number of cores from {MIN_CPU_LIMIT} to {MAX_CPU_LIMIT}, e.g. 1.5");
    let cores: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number: give {range}"))?;
    if !cores.is_finite() || !(MIN_CPU_LIMIT..=MAX_CPU_LIMIT).contains(&cores) {
        return Err(format!("{text} is out of range: give {range}"));
    }
    Ok(cores)
}

/// `--pids-limit`: how many tasks, [`MIN_PIDS`] to [`MAX_PIDS`].
pub fn parse_pids_limit(text: &str) -> Result<u64, String> {
    let range = format!("a whole number from {MIN_PIDS} (sbx's own threads need about that many) to {MAX_PIDS}");
    let n: u64 = text.trim().parse().map_err(|_| format!("'{text}' is not {range}"))?;
    if !(MIN_PIDS..=MAX_PIDS).contains(&n) {
        return Err(format!("{n} is out of range: give {range}"));
    }
    Ok(n)
}

/// A size: bytes, or a whole number with K, M, G or T (powers of 1024;
/// "10G", "500M", "1GiB"), more than 0 and at most [`MAX_QUOTA`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    let hint = "give a size such as 500M or 10G (K, M, G, T: powers of 1024)";
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("'{text}': unknown unit '{c}': {hint}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' is not a size: {hint}"));
    }
    let bytes = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift)).filter(|b| *b <= MAX_QUOTA);
    match bytes {
        None => Err(format!("'{text}' is too large: at most 1P ({MAX_QUOTA} bytes)")),
        Some(0) => Err(format!("'{text}': the size must be more than 0")),
        Some(b) => Ok(b),
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "{options} need cgroup v2, and {mountinfo} shows no cgroup2 file system mounted: mount it (systemd \
         hosts booted with systemd.unified_cgroup_hierarchy=1 have it at /sys/fs/cgroup) or run without {options}"
    )]
    NoCgroup2 { options: String, mountinfo: PathBuf },
    #[error(
        "{options} need cgroup v2, and {file} gives this process no cgroup v2 place (no '0::/path' line): \
         run sbx in a cgroup v2 hierarchy or without {options}"
    )]
    NotInCgroup2 { options: String, file: PathBuf },
    #[error("{option} needs cgroup v2 with the {controller} controller: {file} has no '{controller}'{why}; {cure}")]
    Controller { option: &'static str, controller: &'static str, file: PathBuf, why: String, cure: String },
    #[error(
        "{options}: sbx's cgroup {dir} holds other processes too (pid {other}), and cgroup v2 allows controllers \
         only below a cgroup without processes, so the sandbox cannot have a cgroup of its own there: {DELEGATE_HINT}"
    )]
    Shared { options: String, dir: PathBuf, other: String },
    #[error("The sandbox's cgroup {0} holds processes: is the sandbox running (`sbx ls`)? Stop it first")]
    Busy(PathBuf),
    #[error("{options}: cannot write {file}: permission denied: {DELEGATE_HINT}")]
    Permission { options: String, file: PathBuf },
    #[error(
        "{options}: {file} does not exist: the {controller} controller is not enabled for the sandbox's cgroup; \
         {DELEGATE_HINT}"
    )]
    NotEnabled { options: String, file: PathBuf, controller: String },
    #[error("{options}: cannot use {file}: {err}")]
    Io { options: String, file: PathBuf, err: io::Error },
}

/// Where the kernel's files are: `/proc/self/...` and the root the
/// cgroup2 mount point is under (`/`); elsewhere in tests.
#[derive(Debug, Clone)]
pub struct Host {
    pub mountinfo: PathBuf,
    pub cgroup: PathBuf,
    pub root: PathBuf,
    pub pid: u32,
}

impl Default for Host {
    fn default() -> Host {
        Host {
            mountinfo: "/proc/self/mountinfo".into(),
            cgroup: "/proc/self/cgroup".into(),
            root: "/".into(),
            pid: std::process::id(),
        }
    }
}

/// A mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's root within its file system (for cgroup2: the cgroup it
    /// shows).
    pub root: String,
    pub point: PathBuf,
    pub fstype: String,
    pub super_options: String,
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts in `/proc/self/mountinfo`'s text: "ID PARENT MAJ:MIN ROOT
/// POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS". Lines that
/// do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let head: Vec<&str> = head.split(' ').collect();
            let mut tail = tail.split(' ');
            let (root, point) = (head.get(3)?, head.get(4)?);
            let fstype = tail.next()?;
            let super_options = tail.nth(1).unwrap_or("");
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
                super_options: super_options.to_string(),
            })
        })
        .collect()
}

/// The cgroup2 mount: the first showing the whole hierarchy, else the
/// first.
pub fn cgroup2_mount(mounts: &[Mount]) -> Option<&Mount> {
    let v2 = || mounts.iter().filter(|m| m.fstype == "cgroup2");
    v2().find(|m| m.root == "/").or_else(|| v2().next())
}

/// Whether `controller` is mounted as cgroup v1 (a "cgroup" mount with it
/// among its options).
fn mounted_as_v1(mounts: &[Mount], controller: &str) -> bool {
    mounts.iter().any(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller))
}

/// The process's cgroup v2 path from `/proc/self/cgroup`'s text (its
/// "0::/path" line).
pub fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_end().to_string()).filter(|p| p.starts_with('/'))
}

/// The words of a cgroup list file (`cgroup.controllers`,
/// `cgroup.subtree_control`, `cgroup.procs`).
fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// The sandbox's cgroup while sbx is in it.
#[derive(Debug)]
pub struct Cgroup {
    /// The sandbox's cgroup and the one sbx was in (its parent).
    pub dir: PathBuf,
    pub parent: PathBuf,
    /// Controllers sbx enabled in the parent's subtree_control.
    enabled: Vec<&'static str>,
    pid: u32,
}

/// The error for `err` on `file`: permission denied (or a read-only
/// cgroup file system) says what cures it.
fn io_error(options: &str, file: &Path, err: io::Error) -> Error {
    let (options, file) = (options.to_string(), file.to_path_buf());
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => Error::Permission { options, file },
        _ => Error::Io { options, file, err },
    }
}

/// Writes `value` to the existing kernel file `file`.
fn write_file(file: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    fs::OpenOptions::new().write(true).truncate(true).open(file)?.write_all(value.as_bytes())
}

/// Makes the sandbox `name`'s cgroup with `limits` and moves this process
/// into it; None when no limit was asked for.
pub fn apply(limits: &Limits, name: &str, host: &Host) -> Result<Option<Cgroup>, Error> {
    if limits.is_empty() {
        return Ok(None);
    }
    let options = limits.options();
    let io_err = |file: &Path, err: io::Error| io_error(&options, file, err);
    let read = |file: &Path| fs::read_to_string(file).map_err(|e| io_err(file, e));
    let mounts = parse_mountinfo(&read(&host.mountinfo)?);
    let Some(mount) = cgroup2_mount(&mounts) else {
        return Err(Error::NoCgroup2 { options, mountinfo: host.mountinfo.clone() });
    };
    let own = parse_own_cgroup(&read(&host.cgroup)?)
        .ok_or_else(|| Error::NotInCgroup2 { options: options.clone(), file: host.cgroup.clone() })?;
    // The own cgroup as a path below the mount's root.
    let mount_root = mount.root.trim_end_matches('/');
    let below = own
        .strip_prefix(mount_root)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| Error::NotInCgroup2 { options: options.clone(), file: host.cgroup.clone() })?;
    let below = below.trim_start_matches('/');
    let point = mount.point.strip_prefix("/").unwrap_or(&mount.point);
    let parent = host.root.join(point).join(below);
    let is_root = below.is_empty() && mount.root == "/";

    let controllers_file = parent.join("cgroup.controllers");
    let available = read(&controllers_file)?;
    for (controller, option) in limits.controllers() {
        if !words(&available).contains(&controller) {
            let v1 = mounted_as_v1(&mounts, controller);
            let why = if v1 { format!(" (this host mounts {controller} as cgroup v1)") } else { String::new() };
            let cure = if v1 {
                format!(
                    "boot the host with cgroup v2 alone (systemd.unified_cgroup_hierarchy=1), or run without {option}"
                )
            } else {
                format!("the cgroup above does not delegate it: {DELEGATE_HINT}; or run without {option}")
            };
            return Err(Error::Controller { option, controller, file: controllers_file, why, cure });
        }
    }

    let dir = parent.join(format!("{PREFIX}{name}"));
    match fs::create_dir(&dir) {
        Ok(()) => {}
        // Left by an earlier run: used again if empty.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let procs = dir.join("cgroup.procs");
            if fs::read_to_string(&procs).is_ok_and(|t| !words(&t).is_empty()) {
                return Err(Error::Busy(dir));
            }
        }
        Err(e) => return Err(io_err(&dir, e)),
    }
    let mut cgroup = Cgroup { dir, parent, enabled: Vec::new(), pid: host.pid };
    let result = cgroup.fill(limits, is_root, &options, &io_err);
    if let Err(e) = result {
        cgroup.remove_quietly();
        return Err(e);
    }
    Ok(Some(cgroup))
}

impl Cgroup {
    fn join_procs(&self, dir: &Path) -> io::Result<()> {
        write_file(&dir.join("cgroup.procs"), &self.pid.to_string())
    }

    /// Enables the controllers, writes the limits, moves the process in.
    fn fill(
        &mut self,
        limits: &Limits,
        is_root: bool,
        options: &str,
        io_err: &dyn Fn(&Path, io::Error) -> Error,
    ) -> Result<(), Error> {
        let subtree = self.parent.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&subtree).map_err(|e| io_err(&subtree, e))?;
        let missing: Vec<&'static str> =
            limits.controllers().into_iter().map(|(c, _)| c).filter(|c| !words(&enabled).contains(c)).collect();
        let mut moved = false;
        if !missing.is_empty() {
            if !is_root {
                // Below a cgroup with processes no controller can be
                // enabled: sbx must be alone there, and leaves it first.
                let procs = self.parent.join("cgroup.procs");
                let text = fs::read_to_string(&procs).map_err(|e| io_err(&procs, e))?;
                let me = self.pid.to_string();
                if let Some(other) = words(&text).into_iter().find(|p| *p != me) {
                    return Err(Error::Shared {
                        options: options.to_string(),
                        dir: self.parent.clone(),
                        other: other.to_string(),
                    });
                }
                self.join_procs(&self.dir).map_err(|e| io_err(&self.dir.join("cgroup.procs"), e))?;
                moved = true;
            }
            let add: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
            write_file(&subtree, &add.join(" ")).map_err(|e| io_err(&subtree, e))?;
            self.enabled = missing;
        }
        for (file, value) in limits.files() {
            let path = self.dir.join(file);
            write_file(&path, &value).map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::NotEnabled {
                    options: options.to_string(),
                    file: path.clone(),
                    controller: file.split('.').next().unwrap_or(file).to_string(),
                },
                _ => io_err(&path, e),
            })?;
        }
        if !moved {
            self.join_procs(&self.dir).map_err(|e| io_err(&self.dir.join("cgroup.procs"), e))?;
        }
        Ok(())
    }

    /// Moves the process back to the cgroup it came from and removes the
    /// sandbox's, best effort and bounded; what could not be done, said.
    pub fn remove(self) -> Result<(), String> {
        // Controllers sbx enabled are disabled again when no other cgroup
        // below the parent may use them, so that the parent may hold a
        // process again.
        let others = fs::read_dir(&self.parent)
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.path().is_dir() && e.path() != self.dir))
            .unwrap_or(true);
        if !self.enabled.is_empty() && !others {
            let remove: Vec<String> = self.enabled.iter().map(|c| format!("-{c}")).collect();
            let _ = write_file(&self.parent.join("cgroup.subtree_control"), &remove.join(" "));
        }
        let left = |why: String| {
            Err(format!(
                "left the sandbox's cgroup {} behind ({why}); it is used again by the sandbox's next run, or \
                 remove it with `rmdir {}` once sbx has exited",
                self.dir.display(),
                self.dir.display()
            ))
        };
        if let Err(e) = self.join_procs(&self.parent) {
            return left(format!("cannot move back to {}: {e}", self.parent.display()));
        }
        let mut last = None;
        for _ in 0..REMOVE_TRIES {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(REMOVE_PAUSE);
        }
        left(last.map(|e| e.to_string()).unwrap_or_default())
    }

    /// After a failed [`apply`]: back out without a word (the error says
    /// what matters).
    fn remove_quietly(&self) {
        if !self.enabled.is_empty() {
            let remove: Vec<String> = self.enabled.iter().map(|c| format!("-{c}")).collect();
            let _ = write_file(&self.parent.join("cgroup.subtree_control"), &remove.join(" "));
        }
        let _ = self.join_procs(&self.parent);
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    /// A fake host: mountinfo, /proc/self/cgroup and a cgroup tree.
    struct Fake {
        _dir: tempfile::TempDir,
        host: Host,
        tree: PathBuf,
    }

    fn fake(mountinfo: &str, own: &str, mount_point: &str, controllers: &str) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let tree = root.join(mount_point.trim_start_matches('/')).join(own.trim_start_matches('/'));
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("cgroup.controllers"), controllers).unwrap();
        fs::write(tree.join("cgroup.subtree_control"), "").unwrap();
        fs::write(tree.join("cgroup.procs"), "4242\n").unwrap();
        fs::write(dir.path().join("mountinfo"), mountinfo).unwrap();
        fs::write(dir.path().join("cgroup"), format!("1:cpu:/\n0::{own}\n")).unwrap();
        let host = Host { mountinfo: dir.path().join("mountinfo"), cgroup: dir.path().join("cgroup"), root, pid: 4242 };
        Fake { _dir: dir, host, tree }
    }

    /// The files the kernel makes in a new cgroup with cpu and pids.
    fn kernel_files(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for f in ["cpu.max", "pids.max", "cgroup.procs"] {
            fs::write(dir.join(f), "").unwrap();
        }
    }

    #[test]
    fn mountinfo_and_own_cgroup_are_parsed() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 4);
        assert_eq!(cgroup2_mount(&m).unwrap().point, Path::new("/sys/fs/cgroup/unified"));
        assert!(mounted_as_v1(&m, "cpu") && mounted_as_v1(&m, "pids") && !mounted_as_v1(&m, "memory"));
        let m = parse_mountinfo(UNIFIED);
        let v2 = cgroup2_mount(&m).unwrap();
        assert_eq!((v2.point.as_path(), v2.root.as_str()), (Path::new("/sys/fs/cgroup"), "/"));
        assert_eq!(v2.super_options, "rw,nsdelegate");
        // Escaped mount points, garbage lines, no cgroup2.
        let m = parse_mountinfo("garbage\n\n1 2 3:4 / /a\\040b rw - cgroup2 none rw\n5 6 7:8 / /c rw - ext4");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].point, Path::new("/a b"));
        assert!(cgroup2_mount(&parse_mountinfo("1 2 3:4 / / rw - ext4 /dev/x rw\n")).is_none());
        assert_eq!(
            parse_own_cgroup("12:pids:/x\n0::/user.slice/a b.scope\n").as_deref(),
            Some("/user.slice/a b.scope")
        );
        assert_eq!(parse_own_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_own_cgroup("1:name=systemd:/\n"), None);
        assert_eq!(parse_own_cgroup("0::relative\n"), None);
    }

    #[test]
    fn user_input_is_checked() {
        assert_eq!(parse_cpu_limit("1.5"), Ok(1.5));
        assert_eq!(cpu_max(1.5), "150000 100000");
        assert_eq!(cpu_max(0.01), "1000 100000");
        assert_eq!(cpu_max(2.0), "200000 100000");
        for bad in ["0", "-1", "NaN", "inf", "1e9", "0.001", "", "x", "1,5"] {
            let e = parse_cpu_limit(bad).unwrap_err();
            assert!(e.contains("from 0.01 to 1024"), "{bad}: {e}");
        }
        assert_eq!(parse_pids_limit("256"), Ok(256));
        for bad in ["0", "-5", "10", "4194305", "99999999999999999999", "1.5", "many"] {
            let e = parse_pids_limit(bad).unwrap_err();
            assert!(e.contains("from 64"), "{bad}: {e}");
        }
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("4096"), Ok(4096));
        for (bad, why) in [
            ("0", "more than 0"),
            ("0G", "more than 0"),
            ("-1G", "not a size"),
            ("1.5G", "not a size"),
            ("G", "not a size"),
            ("", "not a size"),
            ("10X", "unknown unit"),
            ("2P", "unknown unit"),
            ("999999999999T", "too large"),
            ("99999999999999999999", "too large"),
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_options_are_refused_by_the_command_line() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sbx", "run", "shell"];
            argv.extend_from_slice(extra);
            crate::cli::Cli::try_parse_from(argv).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(parse(&["--cpu-limit", "1.5", "--pids-limit", "128", "--workspace-quota", "1G"]).is_ok());
        for (bad, why) in [
            (["--cpu-limit", "-1"], "out of range"),
            (["--cpu-limit", "NaN"], "out of range"),
            (["--pids-limit", "0"], "out of range"),
            (["--pids-limit", "-3"], "not a whole number"),
            (["--workspace-quota", "0"], "more than 0"),
            (["--workspace-quota=-1G", "--"], "not a size"),
        ] {
            let e = parse(&bad).unwrap_err();
            let option = bad[0].split('=').next().unwrap();
            assert!(e.contains(option) && e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn no_limit_needs_nothing() {
        let host = Host {
            mountinfo: "/nonexistent/mountinfo".into(),
            cgroup: "/nonexistent/cgroup".into(),
            root: "/nonexistent".into(),
            pid: 1,
        };
        assert!(apply(&Limits::default(), "x", &host).unwrap().is_none());
    }

    #[test]
    fn a_hybrid_host_without_the_controllers_is_told_why() {
        let f = fake(HYBRID, "/", "/sys/fs/cgroup/unified", "hugetlb\n");
        let limits = Limits { cpu: Some(1.5), pids: None };
        let e = apply(&limits, "s", &f.host).unwrap_err().to_string();
        let file = f.tree.join("cgroup.controllers");
        assert_eq!(
            e,
            format!(
                "--cpu-limit needs cgroup v2 with the cpu controller: {} has no 'cpu' (this host mounts cpu as \
                 cgroup v1); boot the host with cgroup v2 alone (systemd.unified_cgroup_hierarchy=1), or run \
                 without --cpu-limit",
                file.display()
            )
        );
        let e = apply(&Limits { cpu: None, pids: Some(100) }, "s", &f.host).unwrap_err().to_string();
        assert!(e.starts_with("--pids-limit needs cgroup v2 with the pids controller"), "{e}");
        assert!(!f.tree.join("sbx-s").exists(), "nothing made");
        // Not mounted at all; no v2 line.
        fs::write(&f.host.mountinfo, "1 2 3:4 / / rw - ext4 /dev/x rw\n").unwrap();
        let e = apply(&limits, "s", &f.host).unwrap_err().to_string();
        assert!(e.contains("no cgroup2 file system mounted") && e.contains("run without --cpu-limit"), "{e}");
        fs::write(&f.host.mountinfo, HYBRID).unwrap();
        fs::write(&f.host.cgroup, "1:cpu:/\n").unwrap();
        assert!(matches!(apply(&limits, "s", &f.host), Err(Error::NotInCgroup2 { .. })));
    }

    #[test]
    fn a_missing_controller_not_mounted_as_v1_points_at_delegation() {
        let f = fake(UNIFIED, "/user.slice/u.scope", "/sys/fs/cgroup", "memory pids\n");
        let e = apply(&Limits { cpu: Some(1.0), pids: Some(100) }, "s", &f.host).unwrap_err().to_string();
        assert!(
            e.contains("has no 'cpu'; the cgroup above does not delegate it: run sbx in a cgroup delegated"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_written_and_the_process_moved_in_at_the_root() {
        let f = fake(UNIFIED, "/", "/sys/fs/cgroup", "cpuset cpu io memory pids\n");
        kernel_files(&f.tree.join("sbx-box"));
        let limits = Limits { cpu: Some(1.5), pids: Some(200) };
        let cg = apply(&limits, "box", &f.host).unwrap().unwrap();
        let dir = f.tree.join("sbx-box");
        assert_eq!(cg.dir, dir);
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "150000 100000");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "200");
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "4242");
        assert_eq!(fs::read_to_string(f.tree.join("cgroup.subtree_control")).unwrap(), "+cpu +pids");
        // The fake's files stay (a real cgroup's vanish with it).
        let e = cg.remove().unwrap_err();
        assert!(e.contains("left the sandbox's cgroup") && e.contains("rmdir"), "{e}");
        assert_eq!(fs::read_to_string(f.tree.join("cgroup.procs")).unwrap(), "4242", "moved back");
        // Already enabled: left as it is; only one limit: one file.
        fs::write(f.tree.join("cgroup.subtree_control"), "cpu pids").unwrap();
        fs::write(dir.join("cpu.max"), "max 100000").unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        let cg = apply(&Limits { cpu: None, pids: Some(64) }, "box", &f.host).unwrap().unwrap();
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "max 100000");
        assert_eq!(fs::read_to_string(f.tree.join("cgroup.subtree_control")).unwrap(), "cpu pids");
        drop(cg);
    }

    #[test]
    fn below_another_cgroup_sbx_must_be_alone_and_moves_first() {
        let f = fake(UNIFIED, "/user.slice/run-1.scope", "/sys/fs/cgroup", "cpu pids\n");
        let limits = Limits { cpu: Some(0.5), pids: None };
        fs::write(f.tree.join("cgroup.procs"), "4242\n77\n").unwrap();
        let e = apply(&limits, "box", &f.host).unwrap_err().to_string();
        assert!(e.contains("holds other processes too (pid 77)") && e.contains("Delegate=yes"), "{e}");
        assert!(!f.tree.join("sbx-box").exists(), "backed out");
        fs::write(f.tree.join("cgroup.procs"), "4242\n").unwrap();
        kernel_files(&f.tree.join("sbx-box"));
        let cg = apply(&limits, "box", &f.host).unwrap().unwrap();
        assert_eq!(fs::read_to_string(cg.dir.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(fs::read_to_string(cg.dir.join("cgroup.procs")).unwrap(), "4242");
        assert_eq!(fs::read_to_string(f.tree.join("cgroup.subtree_control")).unwrap(), "+cpu");
        let _ = cg.remove();
        assert_eq!(fs::read_to_string(f.tree.join("cgroup.subtree_control")).unwrap(), "-cpu", "disabled again");
    }

    #[test]
    fn a_busy_or_unwritable_cgroup_is_an_error_naming_the_file() {
        let f = fake(UNIFIED, "/", "/sys/fs/cgroup", "cpu pids\n");
        let limits = Limits { cpu: Some(1.0), pids: None };
        // Running: its cgroup holds a process.
        kernel_files(&f.tree.join("sbx-run"));
        fs::write(f.tree.join("sbx-run/cgroup.procs"), "99\n").unwrap();
        assert!(matches!(apply(&limits, "run", &f.host), Err(Error::Busy(_))));
        // The controller not enabled in the new cgroup: its file missing.
        let e = apply(&limits, "new", &f.host).unwrap_err().to_string();
        assert!(e.contains("sbx-new/cpu.max does not exist: the cpu controller is not enabled"), "{e}");
        assert!(!f.tree.join("sbx-new").exists(), "backed out");
        // Permission denied names the file and the cure.
        for errno in [libc::EACCES, libc::EPERM, libc::EROFS] {
            let e = io_error("--cpu-limit", Path::new("/c/cgroup.procs"), io::Error::from_raw_os_error(errno));
            assert_eq!(
                e.to_string(),
                "--cpu-limit: cannot write /c/cgroup.procs: permission denied: run sbx in a cgroup delegated to \
                 you, e.g. `systemd-run --user --scope -p Delegate=yes sbx run …`, or as root"
            );
        }
        let e = io_error("--cpu-limit", Path::new("/c/x"), io::Error::from_raw_os_error(libc::EBUSY));
        assert!(e.to_string().starts_with("--cpu-limit: cannot use /c/x: "), "{e}");
    }
}
