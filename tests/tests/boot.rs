//! Host side: end-to-end tests of `sbx run` booting the real kernel and the
//! default image. Boots are expensive where guest kernel code is emulated,
//! so one boot checks many things.

use sbx_tests::{text, Sbx};

/// Everything the guest reports about itself in one boot.
const SCRIPT: &str = r#"
echo "hello from $(uname -r)"
echo "comm1=$(cat /proc/1/comm)"
echo "host=$(hostname)"
echo "mounts=$(awk '{print $2}' /proc/mounts | sort | tr '\n' ',')"
read line; echo "got=$line"
read more || echo "eof=yes"
sh -c 'sleep 1 & exit 0'; sleep 2
echo "zombies=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == "Z"' | wc -l)"
echo "uid=$(id -u) cwd=$(pwd)"
exit 7
"#;

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn run_boots_runs_a_command_and_returns_its_status() {
    let sbx = Sbx::new();
    let out =
        sbx.run(&["run", "shell", "--name", "e2e", "--timeout", "600", "--", "sh", "-c", SCRIPT], b"line-from-host\n");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(7), "the program's exit status passes through");
    assert!(stdout.contains("hello from 6.1."), "guest kernel is our 6.1 build");
    assert!(stdout.contains("comm1=init\n"), "guest-init is PID 1");
    assert!(stdout.contains("host=e2e\n"), "hostname is the sandbox name");
    for m in ["/proc", "/sys", "/dev", "/dev/pts", "/tmp", "/run"] {
        assert!(stdout.contains(&format!(",{m},")) || stdout.contains(&format!("={m},")), "{m} mounted");
    }
    assert!(stdout.contains("got=line-from-host\n"), "host stdin reaches the program");
    assert!(stdout.contains("eof=yes\n"), "end of host stdin is end of file in the guest");
    assert!(stdout.contains("zombies=0\n"), "PID 1 reaps orphans");
    let work = sbx.work.path().canonicalize().unwrap();
    let want = format!("uid=1000 cwd={}\n", work.display());
    assert!(stdout.contains(&want), "the program runs as the agent user, in the workspace");
    assert!(!stdout.contains('\r'), "no terminal rewriting of output without a terminal");
    assert!(!stdout.contains("@@sbx:"), "status frames never reach the program's output");
    assert!(!stdout.contains("Linux version"), "kernel messages stay in the console log");
    assert!(stderr.is_empty(), "sbx says nothing on success");

    // The sandbox persists with its log and last result until removed.
    let ls = text(&sbx.cmd().arg("ls").output().unwrap().stdout);
    assert!(ls.lines().any(|l| l.starts_with("e2e ") && l.contains("stopped") && l.contains(" 7 ")), "{ls}");
    let log = text(&sbx.cmd().args(["log", "e2e"]).output().unwrap().stdout);
    assert!(log.contains("@@sbx:init@@") && log.contains("@@sbx:started@@"), "console log has init's milestones");
    assert!(!log.contains("@@sbx:exit"), "the program's status travels on its session only");
    assert!(sbx.cmd().args(["rm", "e2e"]).status().unwrap().success());
    let ls = text(&sbx.cmd().arg("ls").output().unwrap().stdout);
    assert!(!ls.contains("e2e"), "{ls}");
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn a_kernel_panic_is_a_one_line_failure_with_the_log_kept() {
    let sbx = Sbx::new();
    // No init to run: the kernel panics ("No working init found").
    let out = sbx.run(
        &[
            "run",
            "shell",
            "--name",
            "panic",
            "--timeout",
            "600",
            "--kernel-args",
            "rdinit=/missing init=/missing",
            "--",
            "true",
        ],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("Kernel panic"), "{stderr}");
    assert!(stderr.contains("console.log"), "{stderr}");
    let log = text(&sbx.cmd().args(["log", "panic"]).output().unwrap().stdout);
    assert!(log.contains("Kernel panic"), "the console log keeps the panic");
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn a_hung_guest_is_stopped_by_the_timeout() {
    let sbx = Sbx::new();
    // Two seconds is far too short to boot here, and on any host too short
    // for `sleep 600`.
    let started = std::time::Instant::now();
    let out = sbx.run(&["run", "shell", "--name", "hang", "--timeout", "2", "--", "sleep", "600"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(stderr.contains("Timed out after 2 s"), "{stderr}");
    assert!(started.elapsed().as_secs() < 60, "stopped promptly");
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn bad_input_gets_a_clear_error() {
    let sbx = Sbx::new();
    let junk = sbx.home.path().join("not-a-kernel");
    std::fs::write(&junk, b"this is not an ELF file").unwrap();
    let out = sbx.run(&["run", "shell", "--kernel", junk.to_str().unwrap(), "--", "true"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr.contains("Cannot load kernel") && stderr.contains("not-a-kernel"), "{stderr}");

    let out = sbx.run(&["run", "nosuchagent"], b"");
    assert!(text(&out.stderr).contains("Unknown agent 'nosuchagent'"));
    let out = sbx.run(&["run", "shell", "--memory", "16", "--", "true"], b"");
    assert!(text(&out.stderr).contains("at least 64 MiB"), "{}", text(&out.stderr));
    let out = sbx.run(&["run", "shell", "--name", "../x", "--", "true"], b"");
    assert!(text(&out.stderr).contains("Bad sandbox name"), "{}", text(&out.stderr));
    let out = sbx.run(&["rm", "nosuch"], b"");
    assert!(text(&out.stderr).contains("No sandbox named 'nosuch'"));
}

#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn stop_ends_a_running_sandbox_and_records_it() {
    use std::io::{BufRead, BufReader};
    let sbx = Sbx::new();
    let mut run = sbx
        .cmd()
        .args([
            "run",
            "shell",
            "--name",
            "stopme",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            "echo before-stop > ~/kept; echo started; sleep 600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sbx.wait_running("stopme");
    // Stop a guest that is idle in its program (no VM exits at all), not
    // one still busy booting.
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l == "started")), "the program never started");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let stop = sbx.cmd().args(["stop", "stopme"]).output().unwrap();
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "the run reports SIGTERM");
    let ls = text(&sbx.cmd().arg("ls").output().unwrap().stdout);
    assert!(ls.lines().any(|l| l.starts_with("stopme ") && l.contains("stopped") && l.contains(" 143 ")), "{ls}");
    let again = sbx.cmd().args(["stop", "stopme"]).output().unwrap();
    assert!(text(&again.stderr).contains("is not running"));
    // Started again, the sandbox still has what was written before the stop.
    let out = sbx.run(&["run", "shell", "--name", "stopme", "--timeout", "600", "--", "cat", "/home/agent/kept"], b"");
    assert_eq!(text(&out.stdout), "before-stop\n", "{}", text(&out.stderr));
}

/// The sandbox's disk keeps what the guest writes outside the workspace
/// from one run to the next; a VMM killed mid-write leaves it mountable and
/// the image's shared base untouched; `sbx rm` removes it.
#[test]
#[ignore = "boots a guest: needs /dev/kvm, `cargo xtask kernel`, `cargo xtask image` and a release sbx; run by `cargo xtask test`"]
fn the_sandbox_disk_persists_and_survives_a_killed_vmm() {
    use std::io::{BufRead, BufReader};
    let sbx = Sbx::new();
    let rootfs = sbx.assets.join("images/shell/rootfs.ext4");
    let base_before = std::fs::read(&rootfs).unwrap();
    // Run 1: a file written and synced, then writes in flight when the VMM
    // is killed with SIGKILL (no chance to stop the guest in order).
    let script = "echo kept > /root/marker; sync; echo synced; \
                  i=0; while true; do i=$((i+1)); echo $i > /root/counter; \
                  dd if=/dev/zero of=/root/big bs=64k count=16 2>/dev/null; done";
    let mut run = sbx
        .cmd()
        .args(["run", "shell", "--name", "disk", "--user", "root", "--timeout", "600", "--", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.trim() == "synced")), "the guest never synced");
    std::thread::sleep(std::time::Duration::from_secs(2));
    run.kill().unwrap();
    run.wait().unwrap();
    // Run 2: the synced file is there, the half-written ones are readable.
    let out = sbx.run(
        &[
            "run",
            "shell",
            "--name",
            "disk",
            "--user",
            "root",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            "cat /root/marker; ls /root >/dev/null && echo readable; touch /bin/x 2>&1; ls /bin/x",
        ],
        b"",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("kept\n"), "the synced file survived: {stdout}");
    assert!(stdout.contains("readable\n"), "the disk mounts and reads after the kill: {stdout}");
    assert!(stdout.contains("/bin/x"), "the overlay takes writes over the base: {stdout}");
    assert!(std::fs::read(&rootfs).unwrap() == base_before, "the shared base image is unchanged");
    // guest-init left the disk clean at power-off: a full check finds
    // nothing to fix (and no journal to replay).
    let disk = sbx.home.path().join("sandboxes/disk/disk.img");
    let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&disk).output().unwrap();
    assert!(fsck.status.success(), "e2fsck: {}{}", text(&fsck.stdout), text(&fsck.stderr));
    // Another sandbox starts from the clean base.
    let out = sbx
        .run(&["run", "shell", "--name", "other", "--timeout", "600", "--", "sh", "-c", "ls /root/marker /bin/x"], b"");
    assert_ne!(out.status.code(), Some(0), "another sandbox does not see this one's files");
    assert!(disk.is_file());
    assert!(sbx.cmd().args(["rm", "disk"]).status().unwrap().success());
    assert!(!disk.exists(), "sbx rm removes the sandbox's disk");
}
