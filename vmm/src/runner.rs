//! Host side: runs a built microVM — one thread per vCPU handling exits
//! (port I/O, MMIO, resets, errors) until the guest or a timeout stops it.
//! Exits are guest-driven and untrusted: unknown ports read as 0xff and
//! are counted, never fatal.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::builder::MicroVm;
use crate::control::{Stop, StopReason};
use crate::devices::Bus;
use crate::metrics;
use crate::vstate;

/// Counts of vCPU exits by reason (summed over vCPUs).
#[derive(Debug, Default, Clone)]
pub struct ExitCounts(pub BTreeMap<&'static str, u64>);

impl ExitCounts {
    fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }

    fn merge(&mut self, other: &ExitCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

pub struct RunResult {
    pub reason: StopReason,
    /// Guest RIPs sampled every `profile` interval (empty unless asked).
    pub rip_samples: Vec<u64>,
    pub exits: ExitCounts,
    pub first_run_at: Option<Instant>,
    pub ended_at: Instant,
    /// VMM resident memory outside guest RAM, at the end of the run.
    pub rss_outside_guest_kib: Option<u64>,
    /// When the program's first output reached the host (set by the
    /// caller, which relays the program's session).
    pub first_output_at: Option<Instant>,
}

/// How often the run loop looks for a stop request.
const STOP_POLL: Duration = Duration::from_millis(50);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// How to run the VM.
#[derive(Default, Clone, Copy)]
pub struct RunOptions {
    pub timeout: Option<Duration>,
    /// Sample the boot vCPU's RIP at this interval (a guest profiler).
    pub profile: Option<Duration>,
}

/// Runs the VM to its end.
pub fn run(mvm: MicroVm, opts: RunOptions) -> RunResult {
    let timeout = opts.timeout;
    let MicroVm { vm, vcpus, pio, mmio, stop, .. } = mvm;
    if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
        stop.request(StopReason::Kvm(format!("Cannot install the vCPU kick signal: {e}")));
    }
    let started = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<(ExitCounts, Option<Instant>, Vec<u64>)>();
    let mut handles = Vec::new();
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (pio, mmio, vstop, tx) = (pio.clone(), mmio.clone(), stop.clone(), done_tx.clone());
        let handle = thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            let mut vcpu = vcpu;
            let out = vcpu_loop(&mut vcpu, &pio, &mmio, &vstop, id == 0 && opts.profile.is_some());
            let _ = tx.send(out);
        });
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => stop.request(StopReason::Kvm(format!("Cannot start a vCPU thread: {e}"))),
        }
    }
    drop(done_tx);

    let mut exits = ExitCounts::default();
    let mut first_run_at: Option<Instant> = None;
    let mut rip_samples = Vec::new();
    let mut remaining = handles.len();
    while remaining > 0 {
        let wait = match (timeout, opts.profile) {
            // Profiling: wake up to kick the boot vCPU, which then samples.
            (_, Some(p)) if !stop.is_requested() => {
                if let Some(h) = handles.first().filter(|h| !h.is_finished()) {
                    let _ = h.kill(kick_signal());
                }
                if timeout.is_some_and(|t| started.elapsed() >= t) {
                    stop.request(StopReason::Timeout(timeout.unwrap_or_default().as_secs()));
                }
                p
            }
            // A stop can be requested from anywhere (a signal, a device)
            // while every vCPU sits in KVM_RUN without exiting (an idle
            // guest halts inside the in-kernel irqchip): look every
            // STOP_POLL, not only when the timeout runs out.
            (Some(t), _) if !stop.is_requested() => t.saturating_sub(started.elapsed()).min(STOP_POLL),
            (None, _) if !stop.is_requested() => STOP_POLL,
            // Once stopping, poll and keep kicking vCPUs out of KVM_RUN.
            _ => Duration::from_millis(5),
        };
        match done_rx.recv_timeout(wait) {
            Ok((counts, first, samples)) => {
                exits.merge(&counts);
                rip_samples.extend(samples);
                first_run_at = match (first_run_at, first) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                remaining -= 1;
                // One vCPU ending ends the VM.
                if !stop.is_requested() {
                    stop.request(StopReason::UnexpectedExit("A vCPU stopped".into()));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !stop.is_requested() && opts.profile.is_none() {
                    if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
                        stop.request(StopReason::Timeout(t.as_secs()));
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop.is_requested() {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(kick_signal());
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let ended_at = Instant::now();
    let reason = stop.reason().unwrap_or(StopReason::UnexpectedExit("No reason recorded".into()));
    let rss_outside_guest_kib = metrics::rss_outside_guest_kib(&vm.host_ranges());
    drop(vm);
    RunResult { reason, rip_samples, exits, first_run_at, ended_at, rss_outside_guest_kib, first_output_at: None }
}

fn vcpu_loop(
    vcpu: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    stop: &Stop,
    sample: bool,
) -> (ExitCounts, Option<Instant>, Vec<u64>) {
    let mut counts = ExitCounts::default();
    let mut samples = Vec::new();
    let mut first_run = None;
    while !stop.is_requested() {
        first_run = first_run.or(Some(Instant::now()));
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.add("io_out");
                if !pio.write(u64::from(port), data) {
                    counts.add("io_out_unhandled");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                counts.add("io_in");
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    counts.add("io_in_unhandled");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counts.add("mmio_read");
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                    counts.add("mmio_unhandled");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counts.add("mmio_write");
                if !mmio.write(addr, data) {
                    counts.add("mmio_unhandled");
                }
            }
            Ok(VcpuExit::Shutdown) => stop.request(StopReason::TripleFault),
            Ok(VcpuExit::SystemEvent(_, _)) => stop.request(StopReason::GuestReset),
            Ok(VcpuExit::Hlt) => stop.request(StopReason::UnexpectedExit("HLT with no interrupt controller".into())),
            Ok(VcpuExit::InternalError) => {
                let suberror = vstate::internal_error_suberror(vcpu);
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                stop.request(StopReason::InternalError { suberror, rip, symbol: None });
            }
            Ok(VcpuExit::FailEntry(reason, _)) => stop.request(StopReason::FailEntry(reason)),
            Ok(VcpuExit::Intr) => counts.add("intr"),
            Ok(other) => stop.request(StopReason::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counts.add("intr");
                if sample {
                    if let Ok(r) = vcpu.get_regs() {
                        samples.push(r.rip);
                    }
                }
            }
            Err(e) => stop.request(StopReason::Kvm(format!("KVM_RUN failed: {e}"))),
        }
    }
    (counts, first_run, samples)
}
