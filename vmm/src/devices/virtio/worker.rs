//! Host side: the one event loop every threaded virtio device runs. A
//! device is a [`QueueHandler`] (what to do with its queues and host
//! descriptors); [`Worker`] runs it on a thread of its own and does the
//! rest the same way for all: activation and reset (messages from the
//! vCPU thread), the wait, deadlines and the guest's interrupt.
//!
//! The wait is one epoll set holding: the queue notification eventfd
//! (which KVM writes directly, as an ioeventfd), a control eventfd
//! (activation, reset), a stop eventfd (the device is dropped), a timerfd
//! armed at the handler's next deadline, and the host descriptors the
//! handler names ([`QueueHandler::interests`], asked again after every
//! round and registered or changed only where they changed). Nothing
//! polls: an idle device sleeps in `epoll_wait` with no timeout.
//!
//! Runs with the guest's queues (untrusted); the handler checks every
//! descriptor chain. The handler's own descriptors are level-triggered:
//! it must stop naming one it cannot make progress on (or ask for neither
//! read nor write), or the loop comes straight back.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{ActivateError, Interrupt};
use crate::control::Stop;
use crate::threads::{self, PanicReport, Reach, ThreadKind};

/// Events taken from one `epoll_wait`.
const MAX_EVENTS: usize = 64;
/// After a seccomp violation: how long a dropped worker is waited for.
const VIOLATION_WAIT: Duration = Duration::from_secs(1);
/// epoll data of the worker's own descriptors; a handler's key `k` is
/// registered as `k + FIRST_HANDLER_TOKEN`.
const TOKEN_KICK: u64 = 0;
const TOKEN_CTL: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_TIMER: u64 = 3;
const FIRST_HANDLER_TOKEN: u64 = 4;
/// Largest handler key ([`Interest::key`]).
pub const MAX_INTEREST_KEY: u64 = u64::MAX - FIRST_HANDLER_TOKEN;

/// A host descriptor a handler waits on, and for what (defined with the
/// frame backend boundary, whose backends name theirs the same way).
pub use frame_backend::Interest;

/// One of the handler's descriptors that is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub key: u64,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up.
    pub closed: bool,
}

/// Why the handler runs this round (several at once is usual).
#[derive(Debug, Default)]
pub struct Wake {
    /// The guest notified a queue, or the queues were just handed over.
    pub queues: bool,
    /// The handler's deadline has passed.
    pub timer: bool,
    /// The handler's descriptors that are ready.
    pub ready: Vec<Ready>,
}

/// The queues of an activated device, and the guest memory they are in.
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
}

/// What a threaded device does; [`Worker`] does the rest.
pub trait QueueHandler: Send + 'static {
    /// The driver is up: the queues are in `active` from now on.
    fn activated(&mut self, _active: &mut Active) {}
    /// The driver reset the device: back to the state before activation.
    fn reset(&mut self) {}
    /// The host descriptors to wait on now (asked after every round).
    fn interests(&mut self, _out: &mut Vec<Interest>) {}
    /// One round of work; `active` is None before activation. Returns
    /// whether the guest wants a used-buffer interrupt.
    fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool;
    /// When the handler must run next even if nothing else happens.
    fn next_deadline(&mut self) -> Option<Instant> {
        None
    }
    /// The device is going away: a last round (e.g. to pass on what the
    /// guest sent last). Returns whether the guest wants an interrupt.
    fn stop(&mut self, _active: Option<&mut Active>) -> bool {
        false
    }
}

/// Messages from the device (on the vCPU thread) to its worker.
enum Ctl {
    Activate { active: Active, interrupt: Arc<dyn Interrupt> },
    Reset,
}

/// The device's side of its worker thread: the queue notification
/// eventfd (which KVM may write directly, as an ioeventfd), the control
/// channel and the stop eventfd. Dropping it stops and joins the thread.
pub struct Worker {
    kick: Arc<EventFd>,
    ctl: Sender<Ctl>,
    ctl_evt: Arc<EventFd>,
    stop_evt: Arc<EventFd>,
    report: PanicReport,
    thread: Option<JoinHandle<Option<()>>>,
}

impl Worker {
    /// Starts thread `name` running `handler`, confined as a `kind` thread
    /// that reaches the host paths `reach` allows.
    pub fn spawn(kind: ThreadKind, name: &str, reach: Reach, handler: impl QueueHandler) -> io::Result<Worker> {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let ctl_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let stop_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (ctl, rx) = mpsc::channel();
        let mut event_loop = EventLoop::new(handler, kick.clone(), ctl_evt.clone(), stop_evt.clone(), rx)?;
        let report = PanicReport::default();
        let thread = threads::spawn(kind, name, report.clone(), reach, move || event_loop.run())?;
        Ok(Worker { kick, ctl, ctl_evt, stop_evt, report, thread: Some(thread) })
    }

    /// Hands the device's ready queues to the thread, if there are at
    /// least the `needed` ones.
    pub fn activate(
        &self,
        device: &'static str,
        needed: usize,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() < needed {
            return Err(ActivateError::QueueCount(device, needed, queues.len()));
        }
        self.send(Ctl::Activate { active: Active { mem, queues }, interrupt });
        Ok(())
    }

    /// Takes the queues back (the driver reset the device).
    pub fn reset(&self) {
        self.send(Ctl::Reset);
    }

    fn send(&self, c: Ctl) {
        // A worker that is gone (it panicked) has stopped the VM already.
        let _ = self.ctl.send(c);
        let _ = self.ctl_evt.write(1);
    }

    /// A queue notification that came as an MMIO exit.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// The notification eventfd, for KVM to write (see
    /// `VirtioDevice::notify_event`).
    pub fn notify_event(&self) -> Option<EventFd> {
        self.kick.try_clone().ok()
    }

    /// Where a panic of the worker goes: the VM's stop switch.
    pub fn attach_stop(&self, stop: &Arc<Stop>) {
        self.report.attach(stop);
    }

    /// Whether the thread has ended (it only does when stopped, or when
    /// its handler panicked).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop_evt.write(1);
        if let Some(h) = self.thread.take() {
            // A worker stopped for a seccomp violation never ends: it is
            // left behind (the process ends soon after).
            if threads::violation().is_some() {
                let until = Instant::now() + VIOLATION_WAIT;
                while !h.is_finished() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if !h.is_finished() {
                    return;
                }
            }
            let _ = h.join();
        }
    }
}

/// The worker thread's state.
struct EventLoop<H: QueueHandler> {
    handler: H,
    epoll: Epoll,
    kick: Arc<EventFd>,
    ctl_evt: Arc<EventFd>,
    _stop_evt: Arc<EventFd>,
    ctl: Receiver<Ctl>,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    active: Option<Active>,
    interrupt: Option<Arc<dyn Interrupt>>,
    /// The handler's descriptors as registered: key -> (fd, events).
    registered: BTreeMap<u64, (RawFd, u32)>,
    interests: Vec<Interest>,
}

fn event_set(i: &Interest) -> EventSet {
    let mut e = EventSet::empty();
    if i.read {
        e |= EventSet::IN;
    }
    if i.write {
        e |= EventSet::OUT;
    }
    e
}

impl<H: QueueHandler> EventLoop<H> {
    fn new(
        handler: H,
        kick: Arc<EventFd>,
        ctl_evt: Arc<EventFd>,
        stop_evt: Arc<EventFd>,
        ctl: Receiver<Ctl>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        for (fd, token) in [
            (kick.as_raw_fd(), TOKEN_KICK),
            (ctl_evt.as_raw_fd(), TOKEN_CTL),
            (stop_evt.as_raw_fd(), TOKEN_STOP),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        Ok(EventLoop {
            handler,
            epoll,
            kick,
            ctl_evt,
            _stop_evt: stop_evt,
            ctl,
            timer,
            armed: None,
            active: None,
            interrupt: None,
            registered: BTreeMap::new(),
            interests: Vec::new(),
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        loop {
            self.sync_interests();
            let deadline = self.handler.next_deadline();
            let overdue = deadline.is_some_and(|d| d <= Instant::now());
            self.arm_timer(if overdue { None } else { deadline });
            let n = match self.epoll.wait(if overdue { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The epoll set itself failed: nothing can wake this
                // thread any more, so it must not go on as if it could.
                Err(e) => panic!("epoll_wait failed: {e}"),
            };
            let mut wake = Wake { timer: overdue, ..Wake::default() };
            let mut stopping = false;
            for e in &events[..n] {
                match e.data() {
                    TOKEN_KICK => {
                        let _ = self.kick.read();
                        wake.queues = true;
                    }
                    TOKEN_CTL => {
                        let _ = self.ctl_evt.read();
                        wake.queues |= self.drain_ctl();
                    }
                    TOKEN_STOP => stopping = true,
                    TOKEN_TIMER => {
                        // Readable: the expiration count is there to read.
                        let _ = self.timer.wait();
                        self.armed = None;
                        wake.timer = true;
                    }
                    token => {
                        let set = e.event_set();
                        wake.ready.push(Ready {
                            key: token - FIRST_HANDLER_TOKEN,
                            readable: set.contains(EventSet::IN),
                            writable: set.contains(EventSet::OUT),
                            closed: set.intersects(EventSet::ERROR | EventSet::HANG_UP),
                        });
                    }
                }
            }
            if stopping {
                if self.handler.stop(self.active.as_mut()) {
                    self.signal();
                }
                return;
            }
            if self.handler.handle(self.active.as_mut(), &wake) {
                self.signal();
            }
        }
    }

    /// Takes the control messages; true if the queues were handed over.
    fn drain_ctl(&mut self) -> bool {
        let mut activated = false;
        while let Ok(c) = self.ctl.try_recv() {
            match c {
                Ctl::Activate { mut active, interrupt } => {
                    self.handler.activated(&mut active);
                    self.active = Some(active);
                    self.interrupt = Some(interrupt);
                    activated = true;
                }
                Ctl::Reset => {
                    self.active = None;
                    self.interrupt = None;
                    self.handler.reset();
                    activated = false;
                }
            }
        }
        activated
    }

    fn signal(&self) {
        if let (Some(i), Some(_)) = (&self.interrupt, &self.active) {
            i.signal_used_queue();
        }
    }

    /// Arms the timer for `deadline` (None: disarmed), if that changed.
    fn arm_timer(&mut self, deadline: Option<Instant>) {
        if deadline == self.armed {
            return;
        }
        let result = match deadline {
            // A zero duration would disarm the timer: at least 1 ns.
            Some(d) => self.timer.reset(d.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1)), None),
            None => self.timer.clear(),
        };
        // A timer that cannot be set leaves the handler without its
        // deadline: a device that then stalls is worse than a stop.
        if let Err(e) = result {
            panic!("cannot set the worker's timer: {e}");
        }
        self.armed = deadline;
    }

    /// Brings the epoll set in line with the handler's interests: only
    /// what changed is added, modified or removed. A descriptor wanted for
    /// neither reading nor writing is not registered at all (hang-ups
    /// cannot be masked, and would wake the loop for nothing).
    fn sync_interests(&mut self) {
        self.interests.clear();
        self.handler.interests(&mut self.interests);
        let mut wanted: BTreeMap<u64, (RawFd, u32)> = BTreeMap::new();
        for i in self.interests.iter().filter(|i| (i.read || i.write) && i.key <= MAX_INTEREST_KEY) {
            wanted.insert(i.key, (i.fd, event_set(i).bits()));
        }
        // Removals first: a key that went away may have had the number a
        // new key's descriptor has now.
        let gone: Vec<(u64, RawFd)> =
            self.registered.iter().filter(|(k, _)| !wanted.contains_key(k)).map(|(k, (fd, _))| (*k, *fd)).collect();
        for (key, fd) in gone {
            // The descriptor may be closed already (its registration then
            // went with it).
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.registered.remove(&key);
        }
        for (key, (fd, bits)) in wanted {
            let event = EpollEvent::new(EventSet::from_bits_truncate(bits), key + FIRST_HANDLER_TOKEN);
            let op = match self.registered.get(&key) {
                Some(&(old_fd, old_bits)) if old_fd == fd && old_bits == bits => continue,
                Some(&(old_fd, _)) if old_fd == fd => ControlOperation::Modify,
                Some(&(old_fd, _)) => {
                    let _ = self.epoll.ctl(ControlOperation::Delete, old_fd, EpollEvent::default());
                    ControlOperation::Add
                }
                None => ControlOperation::Add,
            };
            let mut result = self.epoll.ctl(op, fd, event);
            if let Err(e) = &result {
                // Registered under an old key whose descriptor was closed
                // and whose number came back: take it over.
                if e.raw_os_error() == Some(libc::EEXIST) {
                    result = self.epoll.ctl(ControlOperation::Modify, fd, event);
                } else if e.raw_os_error() == Some(libc::ENOENT) {
                    result = self.epoll.ctl(ControlOperation::Add, fd, event);
                }
            }
            match result {
                Ok(()) => {
                    self.registered.insert(key, (fd, bits));
                }
                // Not pollable or not open: the handler will find out when
                // it uses it; waiting on it is not possible.
                Err(_) => {
                    self.registered.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StopReason;
    use crate::devices::virtio::test_utils::CountingInterrupt;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Seen {
        rounds: usize,
        queue_wakes: usize,
        timer_wakes: usize,
        ready: Vec<u64>,
        activated: usize,
        resets: usize,
        stopped: bool,
        bytes: Vec<u8>,
    }

    /// Records what wakes it; reads its socket when readable.
    struct Recorder {
        seen: Arc<Mutex<Seen>>,
        sock: Option<UnixStream>,
        deadline: Option<Instant>,
        panic_on_queue: bool,
    }

    impl QueueHandler for Recorder {
        fn activated(&mut self, _: &mut Active) {
            self.seen.lock().unwrap().activated += 1;
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
        }
        fn interests(&mut self, out: &mut Vec<Interest>) {
            if let Some(s) = &self.sock {
                out.push(Interest { key: 9, fd: s.as_raw_fd(), read: true, write: false });
            }
        }
        fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool {
            if wake.queues && self.panic_on_queue {
                panic!("handler failed on purpose");
            }
            let mut s = self.seen.lock().unwrap();
            s.rounds += 1;
            s.queue_wakes += usize::from(wake.queues);
            s.timer_wakes += usize::from(wake.timer);
            for r in &wake.ready {
                s.ready.push(r.key);
                let mut buf = [0u8; 64];
                if let Some(sock) = self.sock.as_mut() {
                    match sock.read(&mut buf) {
                        Ok(0) => self.sock = None,
                        Ok(n) => s.bytes.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                }
            }
            if wake.timer {
                self.deadline = None;
            }
            wake.queues && active.is_some()
        }
        fn next_deadline(&mut self) -> Option<Instant> {
            self.deadline
        }
        fn stop(&mut self, _: Option<&mut Active>) -> bool {
            self.seen.lock().unwrap().stopped = true;
            false
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recorder(sock: Option<UnixStream>, deadline: Option<Instant>) -> (Recorder, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        (Recorder { seen: seen.clone(), sock, deadline, panic_on_queue: false }, seen)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap()
    }

    #[test]
    fn kicks_activation_descriptors_and_deadlines_wake_the_handler_and_nothing_else_does() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let (h, seen) = recorder(Some(mine), Some(Instant::now() + Duration::from_millis(30)));
        let w = Worker::spawn(ThreadKind::Vsock, "worker-test", Reach::Unconfined, h).unwrap();
        // The deadline fires once, by itself.
        wait_for("the deadline", || seen.lock().unwrap().timer_wakes == 1);
        // Activation is a queue wake; the interrupt goes to the guest.
        let irq = Arc::new(CountingInterrupt::default());
        w.activate("test", 0, mem(), vec![], irq.clone()).unwrap();
        wait_for("activation", || seen.lock().unwrap().activated == 1);
        wait_for("the interrupt", || irq.count() == 1);
        w.kick();
        wait_for("the kick", || seen.lock().unwrap().queue_wakes == 2);
        assert_eq!(irq.count(), 2);
        // A registered descriptor wakes it with its key.
        (&theirs).write_all(b"hello").unwrap();
        wait_for("the socket", || seen.lock().unwrap().bytes == b"hello");
        assert_eq!(seen.lock().unwrap().ready, vec![9]);
        // Idle: no more rounds (no polling).
        let rounds = seen.lock().unwrap().rounds;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen.lock().unwrap().rounds, rounds, "an idle worker does not wake up");
        // The peer going away: read returns 0, the handler drops the
        // socket and the worker stops waiting on it (no hang-up storm).
        drop(theirs);
        wait_for("the hang-up", || seen.lock().unwrap().ready.len() == 2);
        let rounds = seen.lock().unwrap().rounds;
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.lock().unwrap().rounds, rounds);
        w.reset();
        wait_for("the reset", || seen.lock().unwrap().resets == 1);
        drop(w);
        assert!(seen.lock().unwrap().stopped, "the handler had its last round");
    }

    #[test]
    fn too_few_queues_are_refused() {
        let (h, _) = recorder(None, None);
        let w = Worker::spawn(ThreadKind::Vsock, "worker-test", Reach::Unconfined, h).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        assert_eq!(w.activate("test", 2, mem(), vec![], irq), Err(ActivateError::QueueCount("test", 2, 0)));
    }

    #[test]
    fn a_handler_that_panics_stops_the_vm_instead_of_hanging_it() {
        let (mut h, _) = recorder(None, None);
        h.panic_on_queue = true;
        let w = Worker::spawn(ThreadKind::Vsock, "virtio-broken", Reach::Unconfined, h).unwrap();
        let stop = Arc::new(Stop::default());
        w.attach_stop(&stop);
        w.kick();
        assert!(stop.wait(Some(Duration::from_secs(5))), "the VM is told to stop");
        match stop.reason() {
            Some(StopReason::ThreadPanicked { thread, message }) => {
                assert_eq!(thread, "virtio-broken");
                assert!(message.contains("handler failed on purpose"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        wait_for("the thread to end", || w.is_finished());
        // Messages to the dead worker and dropping it do not hang.
        w.kick();
        w.reset();
        drop(w);
    }

    /// Counts rounds; wants a descriptor it never reads (as a device whose
    /// buffers are full would), then stops asking for it.
    struct Stubborn {
        sock: UnixStream,
        want: Arc<AtomicUsize>,
        rounds: Arc<AtomicUsize>,
    }

    impl QueueHandler for Stubborn {
        fn interests(&mut self, out: &mut Vec<Interest>) {
            let read = self.want.load(Ordering::SeqCst) == 1;
            out.push(Interest { key: 0, fd: self.sock.as_raw_fd(), read, write: false });
        }
        fn handle(&mut self, _: Option<&mut Active>, _: &Wake) -> bool {
            self.rounds.fetch_add(1, Ordering::SeqCst);
            false
        }
    }

    #[test]
    fn interest_changes_are_followed() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let want = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let w = Worker::spawn(
            ThreadKind::Vsock,
            "worker-test",
            Reach::Unconfined,
            Stubborn { sock: mine, want: want.clone(), rounds: rounds.clone() },
        )
        .unwrap();
        (&theirs).write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rounds.load(Ordering::SeqCst), 0, "not wanted: the data does not wake it");
        want.store(1, Ordering::SeqCst);
        w.kick();
        // Wanted and never read: level-triggered, it keeps waking.
        wait_for("rounds on the readable socket", || rounds.load(Ordering::SeqCst) > 10);
        want.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let settled = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rounds.load(Ordering::SeqCst), settled, "no longer wanted: quiet again");
        drop(w);
    }
}
