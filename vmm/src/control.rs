//! Host side: why and when the VM stops. Devices, vCPU and worker threads
//! request a stop; the first reason wins, every vCPU leaves its run loop,
//! and whoever waits for the stop ([`Stop::wait`]) wakes at once.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine (guest-init's power-off, or a panic
    /// with panic=-1).
    GuestReset,
    /// Triple fault.
    TripleFault,
    /// KVM could not run a guest instruction (on kvm_pvm: one the emulator
    /// lacks). `symbol` is the kernel function when System.map knows it.
    InternalError { suberror: u32, rip: u64, symbol: Option<String> },
    /// KVM refused to enter the guest.
    FailEntry(u64),
    /// The vCPU stopped in a way sbx does not handle.
    UnexpectedExit(String),
    /// A KVM call on the host failed.
    Kvm(String),
    /// `--timeout` ran out.
    Timeout(u64),
    /// The VMM was sent this signal (`sbx stop`, Ctrl-C without a terminal).
    HostSignal(i32),
    /// A VMM thread (a device worker, a vCPU) panicked: the device it ran
    /// is gone, so the VM stops rather than hang waiting for it.
    ThreadPanicked { thread: String, message: String },
    /// A VMM thread made a system call its seccomp filter forbids (a bug,
    /// or a guest exploiting one): the thread was stopped, so the VM is.
    SyscallForbidden { thread: String, syscall: i64, name: Option<String> },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "Guest reset"),
            StopReason::TripleFault => write!(f, "Guest triple fault"),
            StopReason::InternalError { suberror, rip, symbol } => {
                let what = if *suberror == 1 { "emulation failure" } else { "internal error" };
                write!(f, "KVM {what} (suberror {suberror}) at RIP {rip:#x}")?;
                if let Some(s) = symbol {
                    write!(f, " in {s}")?;
                }
                Ok(())
            }
            StopReason::FailEntry(r) => write!(f, "KVM failed to enter the guest (reason {r:#x})"),
            StopReason::UnexpectedExit(e) => write!(f, "Unexpected vCPU exit: {e}"),
            StopReason::Kvm(e) => write!(f, "KVM error: {e}"),
            StopReason::Timeout(s) => write!(f, "Timed out after {s} s"),
            StopReason::HostSignal(s) => write!(f, "Stopped by signal {s}"),
            StopReason::ThreadPanicked { thread, message } => write!(f, "VMM thread {thread} failed: {message}"),
            StopReason::SyscallForbidden { thread, syscall, name } => {
                write!(f, "A {thread} thread of the VMM made system call {syscall}")?;
                if let Some(name) = name {
                    write!(f, " ({name})")?;
                }
                write!(f, ", which its seccomp filter forbids; the thread was stopped and the VM with it")
            }
        }
    }
}

#[derive(Default)]
pub struct Stop {
    requested: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    /// Notified when a stop is first requested.
    requested_cv: Condvar,
}

impl Stop {
    /// Asks the VM to stop; the first reason given is kept.
    pub fn request(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.requested.store(true, Ordering::SeqCst);
        self.requested_cv.notify_all();
    }

    /// Sleeps until a stop is requested or `timeout` (None: no limit) has
    /// passed; true if a stop was requested.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        while r.is_none() {
            r = match deadline {
                None => self.requested_cv.wait(r).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.requested_cv.wait_timeout(r, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        r.is_some()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = Stop::default();
        assert!(!s.is_requested());
        s.request(StopReason::Timeout(3));
        s.request(StopReason::GuestReset);
        assert!(s.is_requested());
        assert_eq!(s.reason(), Some(StopReason::Timeout(3)));
    }

    #[test]
    fn a_waiter_wakes_when_a_stop_is_requested_from_another_thread() {
        let s = std::sync::Arc::new(Stop::default());
        assert!(!s.wait(Some(Duration::from_millis(10))), "nothing requested: the wait times out");
        let t = {
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                s.request(StopReason::GuestReset);
            })
        };
        let started = Instant::now();
        assert!(s.wait(None));
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        assert!(s.wait(Some(Duration::ZERO)), "an earlier request is seen at once");
    }

    #[test]
    fn messages_name_the_problem() {
        let e =
            StopReason::InternalError { suberror: 1, rip: 0xffffffff81000000, symbol: Some("fpu__drop+0x1a".into()) };
        assert_eq!(e.to_string(), "KVM emulation failure (suberror 1) at RIP 0xffffffff81000000 in fpu__drop+0x1a");
        let p = StopReason::ThreadPanicked { thread: "virtio-net".into(), message: "boom".into() };
        assert_eq!(p.to_string(), "VMM thread virtio-net failed: boom");
    }
}
