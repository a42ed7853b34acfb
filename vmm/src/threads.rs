//! Host side: the one place the VMM starts threads ([`spawn`]). Each
//! thread has a [`ThreadKind`] saying what it runs (a vCPU, a device
//! worker), so that a per-kind restriction (the hardening work's seccomp
//! filters) can be installed here, once, for every thread of that kind.
//! A thread that panics stops the VM with a reason
//! ([`StopReason::ThreadPanicked`]) through its [`PanicReport`], instead of
//! leaving the guest waiting forever on a device that is gone.
//!
//! With `panic = "abort"` (the release profile) a panic ends the whole
//! process at once, which also never hangs; the stop reason is what
//! builds that unwind (tests, debug builds) report.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::control::{Stop, StopReason};

/// What a VMM thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (KVM_RUN and its exits).
    Vcpu,
    /// Runs a virtio device's queues ([`crate::devices::virtio::worker`]).
    DeviceWorker,
}

impl ThreadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device worker",
        }
    }
}

#[derive(Default)]
struct ReportInner {
    stop: Option<Arc<Stop>>,
    /// A panic that happened before the VM's stop switch was known.
    pending: Option<StopReason>,
}

/// Where a thread's panic goes: the VM's stop switch. Devices are made
/// before the VM (and its [`Stop`]) exist, so the switch can be attached
/// later ([`PanicReport::attach`]); a panic before that is kept and
/// requested on attachment.
#[derive(Clone, Default)]
pub struct PanicReport(Arc<Mutex<ReportInner>>);

impl PanicReport {
    /// Reports straight to `stop`.
    pub fn to(stop: &Arc<Stop>) -> PanicReport {
        let r = PanicReport::default();
        r.attach(stop);
        r
    }

    /// From now on, reports go to `stop` (and one kept so far goes now).
    pub fn attach(&self, stop: &Arc<Stop>) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = inner.pending.take() {
            stop.request(reason);
        }
        inner.stop = Some(stop.clone());
    }

    fn report(&self, reason: StopReason) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &inner.stop {
            Some(stop) => stop.request(reason),
            None => inner.pending = inner.pending.take().or(Some(reason)),
        }
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// Starts thread `name` of `kind` running `f`. If `f` panics, `report`
/// stops the VM naming the thread and the panic; the thread's result is
/// then None.
pub fn spawn<T, F>(kind: ThreadKind, name: &str, report: PanicReport, f: F) -> io::Result<JoinHandle<Option<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let thread_name = name.to_string();
    thread::Builder::new().name(name.into()).spawn(move || {
        // The per-kind restriction (seccomp) goes here, before `f` runs.
        let _ = kind;
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => Some(v),
            Err(payload) => {
                let message = format!("{} panicked: {}", kind.as_str(), panic_message(payload.as_ref()));
                report.report(StopReason::ThreadPanicked { thread: thread_name, message });
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_stops_the_vm_with_its_name_and_message() {
        let stop = Arc::new(Stop::default());
        let h = spawn(ThreadKind::DeviceWorker, "virtio-test", PanicReport::to(&stop), || -> u32 {
            panic!("queue handler failed")
        })
        .unwrap();
        assert_eq!(h.join().unwrap(), None);
        match stop.reason() {
            Some(StopReason::ThreadPanicked { thread, message }) => {
                assert_eq!(thread, "virtio-test");
                assert!(message.contains("queue handler failed"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_panic_before_the_vm_exists_is_kept_for_it() {
        let report = PanicReport::default();
        let h =
            spawn(ThreadKind::Vcpu, "early", report.clone(), || panic!("{}", String::from("early failure"))).unwrap();
        assert_eq!(h.join().unwrap(), None::<()>);
        let stop = Arc::new(Stop::default());
        assert!(!stop.is_requested());
        report.attach(&stop);
        assert!(matches!(stop.reason(), Some(StopReason::ThreadPanicked { .. })));
    }

    #[test]
    fn a_thread_that_returns_gives_its_value_and_stops_nothing() {
        let stop = Arc::new(Stop::default());
        let h = spawn(ThreadKind::DeviceWorker, "fine", PanicReport::to(&stop), || 7).unwrap();
        assert_eq!(h.join().unwrap(), Some(7));
        assert!(!stop.is_requested());
    }
}
