//! Guest side: sbx's PID 1. Sets up the guest, runs the job the VMM placed in
//! the initramfs on the program's terminal (/dev/ttyS0), reaps every child,
//! reports how the program ended on the kernel console (/dev/console, the
//! VMM's log channel, never the program's terminal) and ends the VM.
//!
//! It never panics: every failure is printed, reported as an error frame, and
//! the VM still ends.
//!
//! `unsafe` lives in `sys` only (denied everywhere else).
#![deny(unsafe_code)]

mod control;
mod net;
mod root;
#[allow(unsafe_code)]
mod sys;
mod trust;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::OwnedFd;

use protocol::{Frame, Job, JOB_PATH};

/// The program's terminal: the first serial port. The console (second port)
/// carries kernel messages and our frames.
const PROGRAM_TTY: &str = "/dev/ttyS0";

fn frame(f: Frame) {
    // The console is a serial line; one write per frame keeps it on one line.
    let mut out = io::stdout().lock();
    let _ = out.write_all(format!("\n{}\n", f.to_line()).as_bytes());
    let _ = out.flush();
}

fn main() {
    frame(Frame::Init);
    let mut disk = None;
    let outcome = run(&mut disk);
    shutdown_children();
    // Before the final frame: the VMM may end the VM as soon as it sees it.
    sys::sync();
    if let Some(d) = &disk {
        if let Err(e) = d.close_for_power_off() {
            eprintln!("sbx-init: cannot leave the sandbox disk clean: {e}");
        }
    }
    match outcome {
        Ok(Some(f)) => frame(f),
        // The main session told the host how its program ended.
        Ok(None) => {}
        Err(msg) => {
            eprintln!("sbx-init: {msg}");
            frame(Frame::Error(msg));
        }
    }
    sys::reboot();
}

/// Runs the job; the frame that tells how its program ended, unless its
/// session (the host's one channel for that) already did.
fn run(disk: &mut Option<root::DataDisk>) -> Result<Option<Frame>, String> {
    let text = std::fs::read_to_string(JOB_PATH).map_err(|e| format!("Cannot read {JOB_PATH}: {e}"))?;
    let job = Job::decode(&text).map_err(|e| e.to_string())?;
    mount_filesystems(EARLY_MOUNTS)?;
    if job.overlay_root {
        *disk = Some(root::switch_to_disks()?);
    }
    mount_filesystems(LATE_MOUNTS)?;
    for share in &job.shares {
        mount_share(share)?;
    }
    if let Some(net) = &job.net {
        net::configure(net)?;
    }
    if let Some(ca) = &job.ca_cert {
        trust::install(ca)?;
    }
    // Sessions from the host (sbx run's program, sbx exec). Without the
    // vsock device a guest can still run a program given in the job.
    let control = control::start(program_env(&job));
    // /dev/ptmx must reach the devpts instance mounted above.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    if let Err(e) = sys::sethostname(&job.hostname) {
        eprintln!("sbx-init: cannot set hostname: {e}");
    }
    sys::block_terminal_signals();
    match control {
        Ok(main) if job.main_session => return run_main_session(main).map(|()| None),
        Ok(_) => {}
        Err(e) if job.main_session => return Err(e),
        Err(e) => eprintln!("sbx-init: {e}"),
    }
    let tty: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(PROGRAM_TTY)
        .map_err(|e| format!("Cannot open {PROGRAM_TTY}: {e}"))?
        .into();
    let mode = if job.interactive { sys::TtyMode::Interactive } else { sys::TtyMode::Passthrough };
    sys::configure_tty(&tty, mode, job.rows, job.cols).map_err(|e| format!("Cannot set up {PROGRAM_TTY}: {e}"))?;

    let argv = if job.argv.is_empty() { vec!["/bin/sh".to_string()] } else { job.argv.clone() };
    let env = program_env(&job);
    let exec = sys::Exec::new(&argv, &env, &job.cwd).map_err(|e| format!("Cannot run '{}': {e}", argv[0]))?;
    frame(Frame::Started);
    let child = sys::spawn_on_tty(&exec, &tty).map_err(|e| format!("Cannot start '{}': {e}", argv[0]))?;

    // Reap everything; the job ends when its first process does.
    let result = loop {
        match sys::wait_any() {
            Some((pid, ended)) if pid == child => break ended,
            Some((pid, ended)) => control::deliver(pid, ended),
            None => return Err("The program vanished without being reaped".into()),
        }
    };
    // Let the terminal send what the program wrote before the VM ends.
    let _ = sys::tcdrain(&tty);
    Ok(Some(match result {
        sys::Ended::Exited(code) => Frame::Exit(code),
        sys::Ended::Signaled(sig) => Frame::Signal(sig),
    }))
}

/// The program came as the main session: wait for it to start, reap
/// everything until it ends, let its session report, and end with it.
fn run_main_session(main: control::Main) -> Result<(), String> {
    let child = main.started.recv().map_err(|_| "The control channel ended".to_string())??;
    frame(Frame::Started);
    let result = loop {
        match sys::wait_any() {
            Some((pid, ended)) if pid == child => break ended,
            Some((pid, ended)) => control::deliver(pid, ended),
            None => return Err("The program vanished without being reaped".into()),
        }
    };
    control::deliver(child, result);
    // Its session sends the rest of its output and how it ended.
    let _ = main.done.recv_timeout(std::time::Duration::from_secs(5));
    Ok(())
}

fn program_env(job: &Job) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "linux".into()),
        ("HOSTNAME".into(), job.hostname.clone()),
    ];
    if job.emulated_cpu {
        env.push(("GLIBC_TUNABLES".into(), protocol::NO_AVX_TUNABLES.into()));
    }
    if job.ca_cert.is_some() {
        env.extend(trust::env());
    }
    for (k, v) in &job.env {
        env.retain(|(old, _)| old != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

type Mount = (&'static str, &'static str, &'static str, libc::c_ulong);
const NODEV_EXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
/// Mounted first: finding the disks needs /sys and /dev. They move with
/// the root when it switches to the disks.
const EARLY_MOUNTS: &[Mount] = &[
    ("proc", "/proc", "proc", NODEV_EXEC),
    ("sysfs", "/sys", "sysfs", NODEV_EXEC),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
];
/// Mounted on the final root.
const LATE_MOUNTS: &[Mount] = &[
    ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC),
    ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
];

fn mount_filesystems(mounts: &[Mount]) -> Result<(), String> {
    for &(source, target, fstype, flags) in mounts {
        if let Err(e) = std::fs::create_dir_all(target) {
            return Err(format!("Cannot create {target}: {e}"));
        }
        sys::mount(source, target, fstype, flags).map_err(|e| format!("Cannot mount {fstype} on {target}: {e}"))?;
    }
    Ok(())
}

/// Mounts a shared folder (virtio-fs) at its host path. Every directory
/// on the way is made traversable, so that the agent user reaches it
/// wherever it is on the host (/root/project too).
fn mount_share(share: &protocol::Share) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&share.path).map_err(|e| format!("Cannot create {}: {e}", share.path))?;
    for dir in std::path::Path::new(&share.path).ancestors() {
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            if mode & 0o111 != 0o111 {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode((mode | 0o111) & 0o7777));
            }
        }
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if share.read_only {
        flags |= libc::MS_RDONLY;
    }
    sys::mount(&share.tag, &share.path, "virtiofs", flags)
        .map_err(|e| format!("Cannot mount the shared folder {} ({}): {e}", share.path, share.tag))?;
    // Sequential reads in 1 MiB requests instead of the default 128 KiB
    // readahead: eight times fewer round trips to the file server.
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(&share.path) {
        let dev = meta.dev();
        let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
        let _ = std::fs::write(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"), "1024");
    }
    Ok(())
}

/// Ends every process but PID 1 and reaps them.
fn shutdown_children() {
    sys::kill_all(libc::SIGTERM);
    sys::reap_ended();
    sys::kill_all(libc::SIGKILL);
    while sys::wait_any().is_some() {}
}
