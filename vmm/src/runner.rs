//! Host side: runs a built microVM — one thread per vCPU handling exits
//! (port I/O, MMIO, resets, errors) until the guest or a timeout stops it.
//! Exits are guest-driven and untrusted: unknown ports read as 0xff and
//! are counted, never fatal. Handling an exit ([`handle_exit`]) is a plain
//! function of our own exit type, tested without KVM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::builder::MicroVm;
use crate::control::{Stop, StopReason};
use crate::devices::Bus;
use crate::metrics;
use crate::threads::{self, PanicReport, Reach, ThreadKind};
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
}

/// Once stopping: how often vCPUs still in KVM_RUN are kicked again.
const STOP_KICK: Duration = Duration::from_millis(5);
/// After a seccomp violation: how long vCPUs are kicked before those
/// still running are left behind.
const VIOLATION_KICKS: Duration = Duration::from_secs(1);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// How to run the VM.
#[derive(Default, Clone)]
pub struct RunOptions {
    pub timeout: Option<Duration>,
    /// Sample the boot vCPU's RIP at this interval (a guest profiler).
    pub profile: Option<Duration>,
    /// The host paths vCPU threads may reach (once the jail is on): their
    /// disks are open already; the console log they write rotates.
    pub vcpu_reach: Reach,
    /// The host paths this thread (the VM's supervisor) reaches once the
    /// vCPUs run: [`threads::supervisor_reach`], /proc/self read-only,
    /// for the memory figures at the end.
    pub supervisor_reach: Reach,
}

/// What a vCPU thread hands back.
type VcpuOutcome = (ExitCounts, Option<Instant>, Vec<u64>);

/// Runs the VM to its end. The calling thread sleeps until a stop is
/// requested (by a vCPU, a device, a worker that failed, a signal), the
/// timeout runs out, or, when profiling, the next sample is due.
pub fn run(mvm: MicroVm, opts: RunOptions) -> RunResult {
    let timeout = opts.timeout;
    let MicroVm { vm, vcpus, pio, mmio, stop, .. } = mvm;
    if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
        stop.request(StopReason::Kvm(format!("Cannot install the vCPU kick signal: {e}")));
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (pio, mmio, vstop) = (pio.clone(), mmio.clone(), stop.clone());
        let sample = id == 0 && opts.profile.is_some();
        let handle = threads::spawn(
            ThreadKind::Vcpu,
            &format!("vcpu{id}"),
            PanicReport::to(&stop),
            opts.vcpu_reach.clone(),
            move || {
                let mut vcpu = vcpu;
                let out = vcpu_loop(&mut vcpu, &pio, &mmio, &vstop, sample);
                // One vCPU ending ends the VM.
                vstop.request(StopReason::UnexpectedExit("A vCPU stopped".into()));
                out
            },
        );
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => stop.request(StopReason::Kvm(format!("Cannot start a vCPU thread: {e}"))),
        }
    }

    // From here this thread only waits, kicks, joins, reads its figures
    // and drops the VM and its devices: the supervisor kind.
    if let Err(e) = threads::confine_current(ThreadKind::Supervisor, &opts.supervisor_reach) {
        stop.request(StopReason::ThreadPanicked { thread: "vm".into(), message: e.to_string() });
    }
    while !stop.is_requested() {
        let until_timeout = timeout.map(|t| t.saturating_sub(started.elapsed()));
        if until_timeout.is_some_and(|t| t.is_zero()) {
            stop.request(StopReason::Timeout(timeout.unwrap_or_default().as_secs()));
            break;
        }
        let wait = match (until_timeout, opts.profile) {
            (Some(t), Some(p)) => Some(t.min(p)),
            (t, p) => t.or(p),
        };
        if stop.wait(wait) {
            break;
        }
        // Profiling: kick the boot vCPU, which then samples its RIP.
        if opts.profile.is_some() {
            if let Some(h) = handles.first().filter(|h| !h.is_finished()) {
                let _ = h.kill(kick_signal());
            }
        }
    }
    // Stopping: kick every vCPU out of KVM_RUN until all have left (a kick
    // can land just before a vCPU enters KVM_RUN, so it is repeated).
    // A vCPU stopped for a seccomp violation never leaves: it is left
    // behind (the process ends soon, see threads::VIOLATION_GRACE).
    let stopping = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) {
        if threads::violation().is_some() && stopping.elapsed() > VIOLATION_KICKS {
            handles.retain(|h| h.is_finished());
            break;
        }
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(STOP_KICK);
    }
    let mut exits = ExitCounts::default();
    let mut first_run_at: Option<Instant> = None;
    let mut rip_samples = Vec::new();
    for h in handles {
        // None: the vCPU thread panicked (its reason is the stop's).
        if let Ok(Some((counts, first, samples))) = h.join() {
            exits.merge(&counts);
            rip_samples.extend(samples);
            first_run_at = match (first_run_at, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    let ended_at = Instant::now();
    let reason = stop.reason().unwrap_or(StopReason::UnexpectedExit("No reason recorded".into()));
    let rss_outside_guest_kib = metrics::rss_outside_guest_kib(&vm.host_ranges());
    drop(vm);
    RunResult { reason, rip_samples, exits, first_run_at, ended_at, rss_outside_guest_kib }
}

/// Why a vCPU left KVM_RUN, in our own terms (so that handling it can be
/// tested without KVM). Data slices are the guest's: untrusted.
#[derive(Debug)]
pub enum Exit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// HLT reached user space: there is no in-kernel irqchip to wait in.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A reset or power-off through KVM's system event.
    SystemEvent,
    /// KVM could not run an instruction (see [`StopReason::InternalError`]).
    InternalError {
        suberror: u32,
        rip: u64,
    },
    /// KVM refused to enter the guest, with the hardware reason.
    FailEntry(u64),
    /// A signal (a kick) interrupted KVM_RUN.
    Interrupted,
    /// Any other exit, described.
    Other(String),
    /// KVM_RUN itself failed.
    RunFailed(String),
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Continue,
    /// Enter the guest again; a kick interrupted it (a profiler's cue).
    Interrupted,
    /// Stop the VM for this reason.
    Stop(StopReason),
}

/// Handles one exit: device accesses go to their bus (an access no device
/// claims reads as all ones, writes nothing, and is counted, never
/// fatal); everything that ends the guest becomes a stop reason.
pub fn handle_exit(exit: Exit<'_>, pio: &Bus, mmio: &Bus, counts: &mut ExitCounts) -> Action {
    match exit {
        Exit::IoOut { port, data } => {
            counts.add("io_out");
            if !pio.write(u64::from(port), data) {
                counts.add("io_out_unhandled");
            }
            Action::Continue
        }
        Exit::IoIn { port, data } => {
            counts.add("io_in");
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
                counts.add("io_in_unhandled");
            }
            Action::Continue
        }
        Exit::MmioRead { addr, data } => {
            counts.add("mmio_read");
            if !mmio.read(addr, data) {
                data.fill(0xff);
                counts.add("mmio_unhandled");
            }
            Action::Continue
        }
        Exit::MmioWrite { addr, data } => {
            counts.add("mmio_write");
            if !mmio.write(addr, data) {
                counts.add("mmio_unhandled");
            }
            Action::Continue
        }
        Exit::Interrupted => {
            counts.add("intr");
            Action::Interrupted
        }
        Exit::Shutdown => Action::Stop(StopReason::TripleFault),
        Exit::SystemEvent => Action::Stop(StopReason::GuestReset),
        Exit::Hlt => Action::Stop(StopReason::UnexpectedExit("HLT with no interrupt controller".into())),
        Exit::InternalError { suberror, rip } => {
            Action::Stop(StopReason::InternalError { suberror, rip, symbol: None })
        }
        Exit::FailEntry(reason) => Action::Stop(StopReason::FailEntry(reason)),
        Exit::Other(what) => Action::Stop(StopReason::UnexpectedExit(what)),
        Exit::RunFailed(e) => Action::Stop(StopReason::Kvm(format!("KVM_RUN failed: {e}"))),
    }
}

/// KVM's exit (or KVM_RUN's error) in our terms, except
/// KVM_EXIT_INTERNAL_ERROR, whose details the caller reads from the vCPU.
fn exit_of(r: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Exit<'_> {
    match r {
        Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut { port, data },
        Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn { port, data },
        Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead { addr, data },
        Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite { addr, data },
        Ok(VcpuExit::Shutdown) => Exit::Shutdown,
        Ok(VcpuExit::SystemEvent(_, _)) => Exit::SystemEvent,
        Ok(VcpuExit::Hlt) => Exit::Hlt,
        Ok(VcpuExit::InternalError) => Exit::InternalError { suberror: 0, rip: 0 },
        Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry(reason),
        Ok(VcpuExit::Intr) => Exit::Interrupted,
        Ok(other) => Exit::Other(format!("{other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
        Err(e) => Exit::RunFailed(e.to_string()),
    }
}

fn vcpu_loop(vcpu: &mut VcpuFd, pio: &Bus, mmio: &Bus, stop: &Stop, sample: bool) -> VcpuOutcome {
    let mut counts = ExitCounts::default();
    let mut samples = Vec::new();
    let mut first_run = None;
    while !stop.is_requested() {
        first_run = first_run.or(Some(Instant::now()));
        let action = match vcpu.run() {
            Ok(VcpuExit::InternalError) => {
                let suberror = vstate::internal_error_suberror(vcpu);
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                handle_exit(Exit::InternalError { suberror, rip }, pio, mmio, &mut counts)
            }
            r => handle_exit(exit_of(r), pio, mmio, &mut counts),
        };
        match action {
            Action::Continue => {}
            Action::Interrupted => {
                if sample {
                    if let Ok(r) = vcpu.get_regs() {
                        samples.push(r.rip);
                    }
                }
            }
            Action::Stop(reason) => stop.request(reason),
        }
    }
    (counts, first_run, samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::tests::Recorder;
    use std::sync::Mutex;

    fn buses() -> (Bus, Bus, Arc<Mutex<Recorder>>, Arc<Mutex<Recorder>>) {
        let (port_dev, mmio_dev) =
            (Arc::new(Mutex::new(Recorder::default())), Arc::new(Mutex::new(Recorder::default())));
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        pio.insert(port_dev.clone(), 0x3f8, 8).unwrap();
        mmio.insert(mmio_dev.clone(), 0xd000_0000, 0x1000).unwrap();
        (pio, mmio, port_dev, mmio_dev)
    }

    #[test]
    fn port_io_reaches_the_device_and_unclaimed_ports_read_as_ones() {
        let (pio, mmio, port_dev, _) = buses();
        let mut counts = ExitCounts::default();
        let a = handle_exit(Exit::IoOut { port: 0x3f9, data: &[0x41] }, &pio, &mmio, &mut counts);
        assert_eq!(a, Action::Continue);
        assert_eq!(port_dev.lock().unwrap().writes, vec![(1, vec![0x41])]);
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(Exit::IoIn { port: 0x3fd, data: &mut data }, &pio, &mmio, &mut counts),
            Action::Continue
        );
        assert_eq!(data, [5]);
        let mut data = [0u8; 2];
        assert_eq!(handle_exit(Exit::IoIn { port: 0x80, data: &mut data }, &pio, &mmio, &mut counts), Action::Continue);
        assert_eq!(data, [0xff, 0xff], "no device: all ones");
        assert_eq!(handle_exit(Exit::IoOut { port: 0x80, data: &[1] }, &pio, &mmio, &mut counts), Action::Continue);
        let c = &counts.0;
        assert_eq!((c["io_out"], c["io_in"], c["io_in_unhandled"], c["io_out_unhandled"]), (2, 2, 1, 1));
    }

    #[test]
    fn mmio_reaches_the_device_and_unclaimed_addresses_read_as_ones() {
        let (pio, mmio, _, mmio_dev) = buses();
        let mut counts = ExitCounts::default();
        let w = handle_exit(Exit::MmioWrite { addr: 0xd000_0050, data: &[1, 0, 0, 0] }, &pio, &mmio, &mut counts);
        assert_eq!(w, Action::Continue);
        assert_eq!(mmio_dev.lock().unwrap().writes, vec![(0x50, vec![1, 0, 0, 0])]);
        let mut data = [0u8; 4];
        let r = handle_exit(Exit::MmioRead { addr: 0xd000_0010, data: &mut data }, &pio, &mmio, &mut counts);
        assert_eq!((r, data), (Action::Continue, [0x10; 4]));
        // Straddling the device's end, or nowhere: not claimed.
        let mut data = [0u8; 4];
        handle_exit(Exit::MmioRead { addr: 0xd000_0ffe, data: &mut data }, &pio, &mmio, &mut counts);
        assert_eq!(data, [0xff; 4]);
        handle_exit(Exit::MmioWrite { addr: 0x1000, data: &[0; 8] }, &pio, &mmio, &mut counts);
        assert_eq!(mmio_dev.lock().unwrap().writes.len(), 1);
        let c = &counts.0;
        assert_eq!((c["mmio_read"], c["mmio_write"], c["mmio_unhandled"]), (2, 2, 2));
        assert_eq!(counts.total(), 6);
    }

    #[test]
    fn exits_that_end_the_guest_become_stop_reasons() {
        let (pio, mmio, _, _) = buses();
        let mut counts = ExitCounts::default();
        let mut stop = |e: Exit<'_>| match handle_exit(e, &pio, &mmio, &mut counts) {
            Action::Stop(r) => r,
            other => panic!("expected a stop, got {other:?}"),
        };
        assert_eq!(stop(Exit::Shutdown), StopReason::TripleFault);
        assert_eq!(stop(Exit::SystemEvent), StopReason::GuestReset);
        assert!(matches!(stop(Exit::Hlt), StopReason::UnexpectedExit(m) if m.contains("HLT")));
        assert_eq!(
            stop(Exit::InternalError { suberror: 1, rip: 0xffff_ffff_8100_0000 }),
            StopReason::InternalError { suberror: 1, rip: 0xffff_ffff_8100_0000, symbol: None }
        );
        assert_eq!(stop(Exit::FailEntry(0x80000021)), StopReason::FailEntry(0x80000021));
        assert!(matches!(stop(Exit::Other("Debug".into())), StopReason::UnexpectedExit(m) if m == "Debug"));
        assert!(matches!(stop(Exit::RunFailed("EFAULT".into())), StopReason::Kvm(m) if m.contains("KVM_RUN failed")));
    }

    #[test]
    fn a_kick_is_counted_and_lets_the_profiler_sample() {
        let (pio, mmio, _, _) = buses();
        let mut counts = ExitCounts::default();
        assert_eq!(handle_exit(Exit::Interrupted, &pio, &mmio, &mut counts), Action::Interrupted);
        assert_eq!(counts.0["intr"], 1);
    }

    #[test]
    fn kvm_errors_other_than_interruptions_are_failures() {
        assert!(matches!(exit_of(Err(kvm_ioctls::Error::new(libc::EINTR))), Exit::Interrupted));
        assert!(matches!(exit_of(Err(kvm_ioctls::Error::new(libc::EAGAIN))), Exit::Interrupted));
        assert!(matches!(exit_of(Err(kvm_ioctls::Error::new(libc::EFAULT))), Exit::RunFailed(_)));
    }
}
