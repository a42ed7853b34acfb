//! Host side (build machine): `cargo xtask bench fs` — the shared folder's
//! speed, one workload run three ways in the same run: on the host itself,
//! in an sbx guest (virtio-fs served by our file server) and in a QEMU
//! guest booting the same kernel and image with QEMU's 9p share of the same
//! folder (`-fsdev local` + `virtio-9p-device`). The workload is one shell
//! script; each phase is timed on the host from the moments its marker
//! lines arrive, so guest clocks do not matter. For sbx, the requests the
//! file server answered in each phase are read from the sandbox's
//! `fs-stats.json` while the guest pauses between phases: requests per
//! operation do not depend on how fast this host is.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocol::{Frame, Job};
use serde_json::Value;

use crate::bench::{build_all, qemu_sandbox, spawn_qemu};
use crate::util;

const MARK: &str = "@sbx-bench ";
const TAG_9P: &str = "sbxbench";

/// The phases, in order, with what one operation is and how to count them.
const PHASES: &[(&str, &str)] = &[
    ("write", "MiB written (dd bs=1M, fsync)"),
    ("read", "MiB read (guest cache dropped first)"),
    ("create", "files created (echo x > f$i)"),
    ("stat", "files listed with attributes (ls -l)"),
    ("delete", "files deleted (rm -r)"),
    ("git-first", "files, first git status (index refresh)"),
    ("git", "files, git status again"),
];

/// The workload. `$1`: MiB of the big file, `$2`: small files, `$3`: a
/// command that drops the guest's page cache (empty on the host).
const SCRIPT: &str = r#"
set -e
mark() { echo "@sbx-bench $1"; }
MIB=$1; N=$2; DROP=$3
mark ready; sleep 1
mark write-start; dd if=/dev/zero of=big bs=1048576 count=$MIB conv=fsync 2>/dev/null; mark write-end; sleep 1
eval "$DROP"
mark read-start; cat big > /dev/null; mark read-end; sleep 1
rm big; mkdir small; cd small
mark create-start; i=0; while [ $i -lt $N ]; do echo x > f$i; i=$((i+1)); done; mark create-end; sleep 1
mark stat-start; ls -l > /dev/null; mark stat-end; sleep 1
cd ..
mark delete-start; rm -r small; mark delete-end; sleep 1
if [ -d tree ] && command -v git > /dev/null; then
  cd tree
  mark git-first-start; git -c safe.directory='*' status --porcelain > /dev/null; mark git-first-end; sleep 1
  mark git-start; git -c safe.directory='*' status --porcelain > /dev/null; mark git-end; sleep 1
  cd ..
fi
mark done
"#;

/// One run's phase times (seconds) and, for sbx, requests by kind.
#[derive(Default)]
struct Run {
    secs: BTreeMap<String, f64>,
    requests: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Follows the workload's marker lines on `out`: times each phase; at the
/// end of each (the guest pauses a second), `on_end` may sample.
fn follow(out: impl Read, mut on_end: impl FnMut(&str, &mut Run), console: Option<&Path>) -> Result<Run> {
    let mut run = Run::default();
    let mut started: Option<(String, Instant)> = None;
    let mut log = console.and_then(|p| std::fs::File::create(p).ok());
    let mut done = false;
    for line in BufReader::new(out).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        let Some(mark) = line.trim_end().strip_prefix(MARK) else {
            if matches!(Frame::parse_line(&line), Some(Frame::Exit(_) | Frame::Error(_) | Frame::Signal(_))) {
                break;
            }
            continue;
        };
        if let Some(phase) = mark.strip_suffix("-start") {
            started = Some((phase.to_string(), Instant::now()));
        } else if let Some(phase) = mark.strip_suffix("-end") {
            if let Some((p, t)) = started.take().filter(|(p, _)| p == phase) {
                run.secs.insert(p, t.elapsed().as_secs_f64());
            }
            on_end(phase, &mut run);
        } else if mark == "ready" {
            on_end("ready", &mut run);
        } else if mark == "done" {
            done = true;
            break;
        }
    }
    if !done {
        bail!("the workload did not finish");
    }
    Ok(run)
}

/// The host folder: an empty workspace with a git repository of `files`
/// files in 100 directories (if git is there).
fn make_tree(ws: &Path, files: u64) -> Result<bool> {
    let tree = ws.join("tree");
    for i in 0..files {
        let dir = tree.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}\n"))?;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-c", "user.name=bench", "-c", "user.email=bench@sbx", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(&tree)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !(git(&["init", "-q"]) && git(&["add", "."]) && git(&["commit", "-q", "-m", "tree"])) {
        eprintln!("xtask: git is not available: no git figures");
        std::fs::remove_dir_all(&tree)?;
        return Ok(false);
    }
    Ok(true)
}

fn host_run(ws: &Path, mib: u64, files: u64) -> Result<Run> {
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "sh", &mib.to_string(), &files.to_string(), ""])
        .current_dir(ws)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("Cannot run sh")?;
    let run = follow(child.stdout.take().context("stdout")?, |_, _| {}, None)?;
    child.wait()?;
    Ok(run)
}

/// Requests by kind so far, of the first shared folder (the workspace).
fn read_stats(path: &Path) -> BTreeMap<String, u64> {
    let v: Value = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    v.get(0)
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
        .unwrap_or_default()
}

fn sbx_run(sbx: &Path, ws: &Path, mib: u64, files: u64, mem_mib: u64, jail: bool) -> Result<Run> {
    let home = tempfile::tempdir()?;
    let mut cmd = Command::new(sbx);
    if !jail {
        cmd.env("SBX_NO_JAIL", "1");
    }
    let mut child = cmd
        .args(["run", "shell", "--name", "bench-fs", "--user", "root", "--no-network", "--no-tty"])
        .args(["--memory", &mem_mib.to_string(), "--timeout", "14400", "--workspace"])
        .arg(ws)
        .args(["--", "sh", "-c", SCRIPT, "sh", &mib.to_string(), &files.to_string()])
        .arg("echo 3 > /proc/sys/vm/drop_caches")
        .env("SBX_HOME", home.path())
        .env("SBX_ASSETS", util::assets())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("Cannot run sbx")?;
    let stats = home.path().join("sandboxes/bench-fs/fs-stats.json");
    let mut last = BTreeMap::new();
    let run = follow(
        child.stdout.take().context("stdout")?,
        |phase, run| {
            // The guest pauses a second after each phase; the counts are
            // published every 250 ms.
            std::thread::sleep(Duration::from_millis(600));
            let now = read_stats(&stats);
            let delta = now
                .iter()
                .map(|(k, v)| (k.clone(), v - last.get(k).copied().unwrap_or(0)))
                .filter(|(k, v)| *v > 0 && k != "forget")
                .collect();
            run.requests.insert(phase.to_string(), delta);
            last = now;
        },
        None,
    )?;
    let status = child.wait()?;
    if !status.success() {
        bail!("sbx run failed ({status})");
    }
    Ok(run)
}

fn qemu_run(kernel: &Path, image: &Path, ws: &Path, mib: u64, files: u64, mem_mib: u64, pvm: bool) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let path = ws.to_str().context("workspace path is not UTF-8")?;
    let mount = format!(
        "mkdir -p {path} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 {TAG_9P} {path} && cd {path}"
    );
    let script = format!(
        "{mount} && sh -c '{}' sh {mib} {files} 'echo 3 > /proc/sys/vm/drop_caches'",
        SCRIPT.replace('\'', "'\\''")
    );
    let job = Job {
        argv: vec!["sh".into(), "-c".into(), script],
        hostname: "bench".into(),
        emulated_cpu: pvm,
        overlay_root: true,
        ..Job::default()
    };
    let mut bytes = std::fs::read(image.join(crate::image::INIT_CPIO))?;
    protocol::cpio::append_job(&mut bytes, &job)?;
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, &bytes)?;
    let data = qemu_sandbox(dir.path())?.data_disk(16)?;
    let rootfs = image.join(crate::image::ROOTFS);
    let disks =
        [(rootfs.as_path(), true, protocol::BASE_DISK_SERIAL), (data.as_path(), false, protocol::DATA_DISK_SERIAL)];
    let extra = [
        "-fsdev".to_string(),
        format!("local,id=fs0,path={path},security_model=none"),
        "-device".to_string(),
        format!("virtio-9p-device,fsdev=fs0,mount_tag={TAG_9P}"),
    ];
    let mut child = spawn_qemu(kernel, &initrd, &disks, mem_mib, pvm, &extra)?;
    let console = std::env::var_os("SBX_BENCH_QEMU_LOG").map(PathBuf::from);
    let run = follow(child.stdout.take().context("stdout")?, |_, _| {}, console.as_deref());
    // As in the boot bench: QEMU cannot reset this guest; stop it here.
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    run.with_context(|| format!("QEMU: {}", err.trim()))
}

/// Operations of a phase: MiB for the big file, files otherwise.
fn ops(phase: &str, mib: u64, files: u64) -> f64 {
    match phase {
        "write" | "read" => mib as f64,
        _ => files as f64,
    }
}

/// The benchmark's folder: the big file's and the small files' home, with
/// a git tree whose index is put back between runs (each guest's first
/// `git status` then refreshes it alike).
struct Workspace {
    _top: tempfile::TempDir,
    dir: PathBuf,
    index: PathBuf,
    saved: Option<Vec<u8>>,
}

impl Workspace {
    fn make(files: u64) -> Result<Workspace> {
        let top = tempfile::tempdir_in(
            std::env::var_os("SBX_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir),
        )?;
        let dir = top.path().canonicalize()?.join("workspace");
        std::fs::create_dir_all(&dir)?;
        let has_git = make_tree(&dir, files)?;
        let index = dir.join("tree/.git/index");
        let saved = if has_git { Some(std::fs::read(&index)?) } else { None };
        Ok(Workspace { _top: top, dir, index, saved })
    }

    fn restore(&self) -> Result<()> {
        if let Some(b) = &self.saved {
            std::fs::write(&self.index, b)?;
        }
        Ok(())
    }
}

pub fn fs(mib: u64, files: u64, mem_mib: u64) -> Result<()> {
    let (kernel, image, sbx) = build_all()?;
    let pvm = vmm::arch::cpuid::host_is_pvm();
    if let Err(e) = util::ensure_packages(&[("qemu-system-x86", "/usr/bin/qemu-system-x86_64")]) {
        eprintln!("xtask: no QEMU for the comparison: {e:#}");
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    let bench = Workspace::make(files)?;
    let (ws, restore) = (&bench.dir, || bench.restore());
    eprintln!("xtask: host");
    let host = host_run(ws, mib, files)?;
    restore()?;
    eprintln!("xtask: sbx (virtio-fs)");
    let ours = sbx_run(&sbx, ws, mib, files, mem_mib, true)?;
    restore()?;
    let theirs = if qemu {
        eprintln!("xtask: QEMU (9p)");
        Some(qemu_run(&kernel, &image, ws, mib, files, mem_mib, pvm)?)
    } else {
        None
    };

    println!("Shared folder figures: {mib} MiB file, {files} small files, {mem_mib} MiB guests, kvm_pvm host: {pvm}");
    println!();
    println!("| phase | host | sbx (virtio-fs) | QEMU (9p) | sbx / host | sbx / QEMU | sbx requests per op |");
    println!("|---|---|---|---|---|---|---|");
    for (phase, what) in PHASES {
        let Some(&ours_s) = ours.secs.get(*phase) else { continue };
        let n = ops(phase, mib, files);
        let rate = |s: f64| n / s;
        let unit = if n == mib as f64 { "MiB/s" } else { "/s" };
        let cell = |r: Option<&f64>| r.map(|s| format!("{:.1} {unit}", rate(*s))).unwrap_or_else(|| "n/a".into());
        let ratio = |a: Option<&f64>| a.map(|s| format!("{:.3}x", rate(ours_s) / rate(*s))).unwrap_or_default();
        let theirs_s = theirs.as_ref().and_then(|t| t.secs.get(*phase));
        let req = ours.requests.get(*phase).map(|m| m.values().sum::<u64>()).unwrap_or(0);
        println!(
            "| {phase}: {what} | {} | {} | {} | {} | {} | {:.2} |",
            cell(host.secs.get(*phase)),
            cell(Some(&ours_s)),
            cell(theirs_s),
            ratio(host.secs.get(*phase)),
            ratio(theirs_s),
            req as f64 / n
        );
    }
    println!();
    println!("sbx requests by kind, per phase:");
    for (phase, _) in PHASES {
        if let Some(m) = ours.requests.get(*phase) {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("- {phase}: {}", parts.join(", "));
        }
    }
    Ok(())
}

/// `cargo xtask bench jail`: what the jail (seccomp filters, Landlock)
/// costs the file server's workload — the same phases run by sbx with and
/// without it, alternating (off, on, off, on: drift shows), side by side.
pub fn jail(mib: u64, files: u64, mem_mib: u64) -> Result<()> {
    let (_, _, sbx) = build_all()?;
    let bench = Workspace::make(files)?;
    let mut runs: Vec<(bool, Run)> = Vec::new();
    for (i, jail) in [false, true, false, true].into_iter().enumerate() {
        eprintln!("xtask: run {} of 4, jail {}", i + 1, if jail { "on" } else { "off" });
        runs.push((jail, sbx_run(&sbx, &bench.dir, mib, files, mem_mib, jail)?));
        bench.restore()?;
    }
    println!("Jail cost on the shared-folder workload: {mib} MiB file, {files} small files, {mem_mib} MiB guests");
    println!();
    println!("| phase | off (1) | on (1) | off (2) | on (2) | on / off (best of each) |");
    println!("|---|---|---|---|---|---|");
    for (phase, what) in PHASES {
        let secs: Vec<Option<f64>> = runs.iter().map(|(_, r)| r.secs.get(*phase).copied()).collect();
        if secs.iter().all(Option::is_none) {
            continue;
        }
        let best = |on: bool| {
            runs.iter()
                .filter(|(j, _)| *j == on)
                .filter_map(|(_, r)| r.secs.get(*phase).copied())
                .fold(f64::NAN, f64::min)
        };
        let cell = |s: &Option<f64>| s.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "n/a".into());
        println!(
            "| {phase}: {what} | {} | {} | {} | {} | {:.3}x |",
            cell(&secs[0]),
            cell(&secs[1]),
            cell(&secs[2]),
            cell(&secs[3]),
            best(true) / best(false)
        );
    }
    Ok(())
}
