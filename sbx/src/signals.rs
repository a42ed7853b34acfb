//! Host side: signals to the sbx process handled on a thread of their own
//! (`sbx run` turns them into an orderly stop or passes them to the
//! program; `sbx exec` passes them to its program), and `sbx stop`'s
//! SIGTERM to a VMM. The signal thread is confined as its own kind
//! ([`vmm::threads::ThreadKind::Signals`]) once the jail is on.

use std::time::{Duration, Instant};

use vmm::threads::{Reach, ThreadKind};

/// Signal numbers, for code that has no libc of its own (the CLI).
pub mod names {
    pub const TERM: i32 = libc::SIGTERM;
    pub const INT: i32 = libc::SIGINT;
    pub const HUP: i32 = libc::SIGHUP;
    pub const WINCH: i32 = libc::SIGWINCH;
}

fn set_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: set is a valid, initialised sigset_t and s a valid signal.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// What wakes the signal thread's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// One of the signals it forwards arrived.
    Signal(libc::c_int),
    /// The time the handler asked for has come.
    Deadline,
}

/// Signals blocked in the thread that blocked them and in every thread it
/// starts afterwards, waiting for [`Blocked::forward`]'s thread: until
/// then they stay pending, none is lost.
#[must_use = "the signals stay blocked until forwarded"]
pub struct Blocked {
    set: libc::sigset_t,
}

/// Blocks `signals` in the calling thread (and threads started after).
/// Call before starting other threads: a thread that has them unblocked
/// would take them (SIGTERM's default ends the process).
pub fn block(signals: &[libc::c_int]) -> Blocked {
    let set = set_of(signals);
    // SAFETY: set is valid; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    Blocked { set }
}

/// The next of `set` to arrive, waiting at most `timeout` (None: no
/// limit); None on a timeout or an interruption.
fn wait(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<libc::c_int> {
    let n = match timeout {
        // SAFETY: set is a valid sigset_t; a null siginfo is allowed.
        None => unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) },
        Some(t) => {
            let ts = libc::timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            };
            // SAFETY: set and ts are valid; a null siginfo is allowed.
            unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) }
        }
    };
    (n > 0).then_some(n)
}

impl Blocked {
    /// Calls `on` on a thread of its own for each signal that arrives.
    /// `on` returning a duration asks for an [`Event::Deadline`] that long
    /// after (the earliest asked for comes first): a grace period needs no
    /// thread of its own. Once the jail is on, the thread runs confined as
    /// [`vmm::threads::ThreadKind::Signals`] (it waits, writes to sockets
    /// it holds, reads the terminal's size, asks the stop: no path, no
    /// new socket, no thread), and the error says if it could not be.
    pub fn forward(
        self,
        mut on: impl FnMut(Event) -> Option<Duration> + Send + 'static,
    ) -> Result<(), vmm::threads::JailError> {
        let set = self.set;
        let thread =
            vmm::threads::spawn_confined(ThreadKind::Signals, "signals", Reach::Only(Vec::new()), move || {
                let mut deadline: Option<Instant> = None;
                loop {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    let asked = if left.is_some_and(|l| l.is_zero()) {
                        deadline = None;
                        on(Event::Deadline)
                    } else {
                        match wait(&set, left) {
                            Some(sig) => on(Event::Signal(sig)),
                            None => continue,
                        }
                    };
                    // A deadline too far to represent is none.
                    if let Some(at) = asked.and_then(|d| Instant::now().checked_add(d)) {
                        deadline = Some(deadline.map_or(at, |d| d.min(at)));
                    }
                }
            })?;
        drop(thread);
        Ok(())
    }
}

/// [`block`] and [`Blocked::forward`] at once, for a handler that needs
/// no deadline. Call before starting other threads.
pub fn forward(
    signals: &[libc::c_int],
    mut on_signal: impl FnMut(libc::c_int) + Send + 'static,
) -> Result<(), vmm::threads::JailError> {
    block(signals).forward(move |event| {
        if let Event::Signal(s) = event {
            on_signal(s);
        }
        None
    })
}

/// Asks process `pid` to stop (SIGTERM), as `sbx stop` does to a VMM.
pub fn terminate(pid: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a process id"));
    }
    // SAFETY: kill(2) takes no pointers; pid > 0 names exactly one process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread named `name` of this process, from /proc.
    fn thread_named(name: &str) -> Option<i32> {
        std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| t.file_name().to_str()?.parse().ok()).flatten()
        })
    }

    #[test]
    fn a_signal_reaches_the_handler_and_the_deadline_it_asks_for_follows() {
        let (tx, rx) = std::sync::mpsc::channel();
        forward_with_grace(tx);
        let tid = thread_named("signals").expect("the signal thread runs");
        // SAFETY: integer arguments only; tid is this process's signal
        // thread, which has SIGUSR2 blocked and waits for it.
        assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, std::process::id(), tid, libc::SIGUSR2) }, 0);
        let wait = Duration::from_secs(60);
        assert_eq!(rx.recv_timeout(wait), Ok(Event::Signal(libc::SIGUSR2)));
        // The grace period, without a thread of its own.
        assert_eq!(rx.recv_timeout(wait), Ok(Event::Deadline));
    }

    fn forward_with_grace(tx: std::sync::mpsc::Sender<Event>) {
        block(&[libc::SIGUSR2])
            .forward(move |event| {
                let _ = tx.send(event);
                matches!(event, Event::Signal(_)).then_some(Duration::from_millis(1))
            })
            .unwrap();
    }
}
