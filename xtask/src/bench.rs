//! Host side (build machine): `cargo xtask bench boot` — boot figures for
//! sbx, side by side with QEMU (microvm, PVH entry into the same vmlinux,
//! the same initramfs, job and disks) in the same run on the same machine.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use protocol::{Frame, Job};
use serde_json::Value;

use crate::util;

/// What the benchmark's program prints: its first output is a figure.
const BENCH_OUTPUT: &str = "sbx-bench-ready";

/// One boot's figures, in milliseconds from the VMM's start.
#[derive(Default, Clone)]
struct Boot {
    first_run_ms: Option<f64>,
    init_ms: Option<f64>,
    /// The program's first output on the host.
    output_ms: Option<f64>,
    end_ms: Option<f64>,
    exits: Option<Value>,
    exits_total: Option<f64>,
    rss_kib: Option<f64>,
}

fn sbx_boot(sbx: &Path, mem_mib: u64) -> Result<Boot> {
    let home = tempfile::tempdir()?;
    let report = home.path().join("report.json");
    let status = Command::new(sbx)
        .args(["run", "shell", "--name", "bench", "--timeout", "900", "--no-tty"])
        .args(["--memory", &mem_mib.to_string()])
        .arg("--report")
        .arg(&report)
        .args(["--", "echo", BENCH_OUTPUT])
        .env("SBX_HOME", home.path())
        .env("SBX_ASSETS", util::assets())
        .stdin(Stdio::null())
        .status()
        .context("Cannot run sbx")?;
    if !status.success() {
        bail!("sbx run failed ({status})");
    }
    let v: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    Ok(Boot {
        first_run_ms: v["first_kvm_run_ms"].as_f64(),
        init_ms: v["init_ms"].as_f64(),
        output_ms: v["first_output_ms"].as_f64(),
        end_ms: v["end_ms"].as_f64(),
        exits: Some(v["exits"].clone()),
        exits_total: v["exits_total"].as_f64(),
        rss_kib: v["vmm_rss_outside_guest_kib"].as_f64(),
    })
}

/// QEMU's microvm (PVH entry into the same vmlinux) with `initrd` and
/// `disks` (path, read-only, serial) and `extra` arguments. It has one
/// serial port, piped: console, frames and the program share it. Its
/// disks are those sbx gives a guest (the image's base, read-only, and a
/// fresh sandbox disk), found by guest-init by their serial numbers.
pub(crate) fn spawn_qemu(
    kernel: &Path,
    initrd: &Path,
    disks: &[(&Path, bool, &str)],
    mem_mib: u64,
    pvm: bool,
    extra: &[String],
) -> Result<std::process::Child> {
    let mut disk_args: Vec<String> = Vec::new();
    for (i, (path, ro, serial)) in disks.iter().enumerate() {
        let ro = if *ro { ",readonly=on" } else { "" };
        disk_args.push("-drive".into());
        disk_args.push(format!("file={},if=none,id=d{i},format=raw{ro}", path.display()));
        disk_args.push("-device".into());
        disk_args.push(format!("virtio-blk-device,drive=d{i},serial={serial}"));
    }
    let cmdline = vmm::builder::kernel_cmdline_with_console("console=ttyS0 8250.nr_uarts=1", pvm, false, "");
    Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,rtc=off,x-option-roms=off", "-enable-kvm"])
        .args(["-cpu", "qemu64,vendor=GenuineIntel,+tsc-deadline,+x2apic,-cx16"])
        .args(["-m", &mem_mib.to_string(), "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(&disk_args)
        .args(extra)
        .arg("-append")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot start qemu-system-x86_64")
}

/// The figures come from when lines appear on QEMU's serial port.
fn qemu_boot(kernel: &Path, initrd: &Path, disks: &[(&Path, bool, &str)], mem_mib: u64, pvm: bool) -> Result<Boot> {
    let start = Instant::now();
    let mut child = spawn_qemu(kernel, initrd, disks, mem_mib, pvm, &[])?;
    let mut boot = Boot::default();
    let stdout = child.stdout.take().context("QEMU stdout")?;
    // SBX_BENCH_QEMU_LOG=FILE keeps QEMU's console, to see why a run failed.
    let mut console = std::env::var_os("SBX_BENCH_QEMU_LOG").and_then(|p| std::fs::File::create(p).ok());
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        if let Some(f) = console.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        if Frame::parse_line(&line) == Some(Frame::Init) {
            boot.init_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        if line.trim_end() == BENCH_OUTPUT && boot.output_ms.is_none() {
            boot.output_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        // QEMU's microvm cannot reset this guest promptly: it has no i8042
        // (our reboot=k), and a triple fault (reboot=t) needs int3, which
        // kvm_pvm cannot emulate. The end is guest-init's exit report.
        if matches!(Frame::parse_line(&line), Some(Frame::Exit(_))) {
            boot.end_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if boot.end_ms.is_none() || boot.init_ms.is_none() {
        bail!("QEMU boot failed ({status}): {}", err.trim());
    }
    Ok(boot)
}

fn median_spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn row(label: &str, values: &[f64], unit: &str, scale: f64) -> String {
    match median_spread(values) {
        Some((m, lo, hi)) => format!("| {label} | {:.2} {unit} | {:.2} – {:.2} |", m / scale, lo / scale, hi / scale),
        None => format!("| {label} | n/a | |"),
    }
}

pub fn boot(runs: usize, mem_mib: u64) -> Result<()> {
    let (kernel, image, sbx) = build_all()?;
    let pvm = vmm::arch::cpuid::host_is_pvm();
    if let Err(e) = util::ensure_packages(&[("qemu-system-x86", "/usr/bin/qemu-system-x86_64")]) {
        eprintln!("xtask: no QEMU for the comparison: {e:#}");
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();

    // The same image plus the same job sbx would add, and a sandbox disk
    // made the way sbx makes one.
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("initrd.cpio");
    let mut bytes = std::fs::read(image.join(crate::image::INIT_CPIO))?;
    let job = Job {
        argv: vec!["echo".into(), BENCH_OUTPUT.into()],
        hostname: "bench".into(),
        emulated_cpu: pvm,
        overlay_root: true,
        ..Job::default()
    };
    protocol::cpio::append_job(&mut bytes, &job)?;
    std::fs::write(&initrd, &bytes)?;
    let qemu_sandbox = qemu_sandbox(dir.path())?;
    let rootfs = image.join(crate::image::ROOTFS);

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..runs {
        eprintln!("xtask: run {}/{runs}: sbx", i + 1);
        ours.push(sbx_boot(&sbx, mem_mib)?);
        if qemu {
            eprintln!("xtask: run {}/{runs}: QEMU", i + 1);
            // A fresh sandbox disk each run, as sbx's runs get.
            let _ = std::fs::remove_file(qemu_sandbox.dir.join("disk.img"));
            let data = qemu_sandbox.data_disk(16)?;
            let disks = [
                (rootfs.as_path(), true, protocol::BASE_DISK_SERIAL),
                (data.as_path(), false, protocol::DATA_DISK_SERIAL),
            ];
            theirs.push(qemu_boot(&kernel, &initrd, &disks, mem_mib, pvm)?);
        }
    }
    let col = |b: &[Boot], f: fn(&Boot) -> Option<f64>| b.iter().filter_map(f).collect::<Vec<f64>>();
    println!("Boot figures: {runs} runs, {mem_mib} MiB, 1 vCPU, kvm_pvm host: {pvm}");
    println!("kernel {}, image {}", kernel.display(), image.display());
    println!();
    println!("| figure | median | spread (min – max) |");
    println!("|---|---|---|");
    println!("{}", row("sbx: VMM start to first KVM_RUN", &col(&ours, |b| b.first_run_ms), "ms", 1.0));
    println!("{}", row("sbx: VMM start to PID 1", &col(&ours, |b| b.init_ms), "s", 1000.0));
    println!("{}", row("sbx: VMM start to the program's first output", &col(&ours, |b| b.output_ms), "s", 1000.0));
    println!("{}", row("sbx: VMM start to exit", &col(&ours, |b| b.end_ms), "s", 1000.0));
    println!("{}", row("sbx: VM exits", &col(&ours, |b| b.exits_total), "", 1.0));
    println!("{}", row("sbx: VMM RSS outside guest memory", &col(&ours, |b| b.rss_kib), "MiB", 1024.0));
    if qemu {
        println!("{}", row("QEMU microvm: start to PID 1", &col(&theirs, |b| b.init_ms), "s", 1000.0));
        println!("{}", row("QEMU microvm: start to first output", &col(&theirs, |b| b.output_ms), "s", 1000.0));
        println!(
            "{}",
            row("QEMU microvm: start to the exit report (then killed)", &col(&theirs, |b| b.end_ms), "s", 1000.0)
        );
        let m = |v: Vec<f64>| median_spread(&v).map(|x| x.0);
        if let (Some(a), Some(b)) = (m(col(&ours, |b| b.init_ms)), m(col(&theirs, |b| b.init_ms))) {
            println!();
            println!("Time to PID 1, QEMU / sbx: {:.2}x", b / a);
        }
        if let (Some(a), Some(b)) = (m(col(&ours, |b| b.end_ms)), m(col(&theirs, |b| b.end_ms))) {
            println!("Time to the end (sbx: VMM exited; QEMU: exit report), QEMU / sbx: {:.2}x", b / a);
        }
    } else {
        println!("\n(QEMU not installed: no comparison; apt-get install qemu-system-x86)");
    }
    if let Some(exits) = ours.last().and_then(|b| b.exits.clone()) {
        println!("\nsbx VM exits by reason (last run): {exits}");
    }
    Ok(())
}

/// A sandbox (in `dir`) whose disk a QEMU guest gets, made the way sbx
/// makes one.
pub(crate) fn qemu_sandbox(dir: &Path) -> Result<sbx::sandbox::Sandbox> {
    let settings =
        sbx::sandbox::Settings { name: "qemu".into(), agent: "shell".into(), workspace: dir.into(), created_unix: 0 };
    Ok(sbx::sandbox::Sandbox::open_or_create(dir, settings)?)
}

/// Builds what a benchmark boots: kernel, image and the sbx binary.
pub(crate) fn build_all() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let kernel = crate::kernel::build(false)?;
    let image = crate::image::build("shell", false)?;
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "--release", "--bin", "sbx"])
            .current_dir(util::root()),
    )?;
    Ok((kernel, image, util::root().join("target/release/sbx")))
}

/// `cargo xtask bench guest-net`: a real guest downloads `mib` MiB over
/// HTTP through netstack (DNS, policy, the port-80 path) from a server on
/// the host's loopback. Timed on the host, from the first byte the server
/// sends to the guest closing the connection, so the guest's clock does
/// not matter.
pub fn guest_net(mib: u64) -> Result<()> {
    use std::io::Write;
    use std::net::TcpListener;
    let (_, _, sbx) = build_all()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let total = mib << 20;
    let server = std::thread::spawn(move || -> Result<(f64, u64)> {
        let (mut conn, _) = listener.accept()?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 && line != "\r\n" {
            line.clear();
        }
        let started = Instant::now();
        write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = chunk.len().min((total - sent) as usize);
            conn.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        // The guest closes once it has read everything.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        Ok((started.elapsed().as_secs_f64(), sent))
    });
    let home = tempfile::tempdir()?;
    let out = Command::new(&sbx)
        .args(["run", "shell", "--name", "bench-net", "--timeout", "3600", "--no-tty"])
        .args(["--allow", "bench.test", "--resolve", &format!("bench.test:80:127.0.0.1:{port}")])
        .args(["--", "sh", "-c", "wget -q -O /dev/null http://bench.test/blob && echo downloaded"])
        .env("SBX_HOME", home.path())
        .env("SBX_ASSETS", util::assets())
        .stdin(Stdio::null())
        .output()
        .context("Cannot run sbx")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("downloaded") {
        bail!("The guest's download failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let (secs, sent) = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    println!("Guest HTTP download through netstack, kvm_pvm host: {}", vmm::arch::cpuid::host_is_pvm());
    println!();
    println!("| size | time | throughput |");
    println!("|---|---|---|");
    println!("| {} MiB | {secs:.2} s | {:.2} MB/s |", sent >> 20, sent as f64 / secs / 1e6);
    Ok(())
}
