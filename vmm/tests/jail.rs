//! Host side, tests: the VMM's jail on real threads — each thread kind runs
//! the work it does in a VM under its own seccomp filter (and the file
//! server under Landlock), and a forbidden call stops the thread, stops
//! the VM with the reason, and ends the process if the stop does not
//! finish. The jail is process-wide once enabled, so the violation cases
//! run in child processes (this test binary, re-run for one case).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vmm::control::{Stop, StopReason};
use vmm::threads::{self, PanicReport, PathRule, Reach, ThreadKind};

/// The exit code the child processes give the jail for its last resort.
const CHILD_EXIT: i32 = 77;

fn jail() -> Arc<Stop> {
    static ONCE: Once = Once::new();
    let stop = Arc::new(Stop::default());
    ONCE.call_once(|| {
        threads::enable_jail(stop.clone(), libc::SIGRTMIN(), None).unwrap();
    });
    stop
}

/// Runs `f` on a thread confined as `kind` (Landlock to `reach`) and
/// returns its result; fails the test, naming the call, if the thread hit
/// its filter.
fn confined<T: Send + 'static>(kind: ThreadKind, reach: Reach, f: impl FnOnce() -> T + Send + 'static) -> T {
    let stop = jail();
    let h = threads::spawn(kind, &format!("test-{}", kind.as_str()), PanicReport::to(&stop), reach, f).unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !h.is_finished() {
        if let Some((k, nr)) = threads::violation() {
            let k = k.map_or("helper", |k| k.as_str());
            panic!("a {k} thread hit its filter: system call {nr} ({:?})", vmm::seccomp_filters::syscall_name(nr));
        }
        assert!(Instant::now() < until, "the {} thread did not finish", kind.as_str());
        std::thread::sleep(Duration::from_millis(5));
    }
    match h.join().unwrap() {
        Some(v) => v,
        None => panic!("the {} thread failed: {:?}", kind.as_str(), stop.reason()),
    }
}

fn status_field(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default().trim().to_string()
}

#[test]
fn each_kind_runs_its_work_under_its_filter() {
    // vCPU: the console log written and rotated.
    let t = tempfile::tempdir().unwrap();
    let log = t.path().join("console.log");
    let l = log.clone();
    let dir = t.path().to_path_buf();
    let seccomp = confined(ThreadKind::Vcpu, Reach::Only(vec![PathRule { path: dir, write: true }]), move || {
        std::fs::File::create(&l).unwrap().write_all(b"sector").unwrap();
        std::fs::rename(&l, l.with_extension("log.1")).unwrap();
        let b: [u8; 6] = std::fs::read(l.with_extension("log.1")).unwrap().try_into().unwrap();
        let etc = std::fs::read("/etc/hostname").map_err(|e| e.raw_os_error());
        // (/proc too is a path it does not reach.)
        let proc = std::fs::read("/proc/thread-self/status").map_err(|e| e.raw_os_error());
        (b, proc, etc)
    });
    assert_eq!(&seccomp.0, b"sector");
    assert_eq!(seccomp.1, Err(Some(libc::EACCES)), "a vCPU reaches the sandbox's directory only");
    assert_eq!(seccomp.2, Err(Some(libc::EACCES)), "a vCPU reaches the sandbox's directory only");

    // Block: I/O on a disk image opened before the thread starts; no path.
    let disk = t.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 8192]).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let read = confined(ThreadKind::Block, Reach::Only(vec![]), move || {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"sector", 512).unwrap();
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b, 512).unwrap();
        f.sync_data().unwrap();
        b
    });
    assert_eq!(&read, b"sector");
    // And the disk's own worker, its event loop and all, serving a read
    // and a flush under that filter.
    assert_eq!(block_device_serves(&disk), [0, 0], "both requests succeed");
    assert!(threads::violation().is_none(), "{:?}", threads::violation());

    // Network: resolving, connecting, a thread of its own (the connect
    // threads), non-blocking sockets.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"pong").unwrap();
    });
    let system = threads::resolver_reach();
    let home = std::env::var("HOME").unwrap_or("/root".into());
    let (got, resolved, home_read) = confined(ThreadKind::Net, Reach::Only(system), move || {
        let resolved = ("localhost", 80).to_socket_addrs().map(|a| a.count()).map_err(|e| e.to_string());
        let home_read = std::fs::read_dir(&home).map(|_| ()).map_err(|e| e.raw_os_error());
        let got = std::thread::spawn(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_nonblocking(false).unwrap();
            let mut b = Vec::new();
            s.read_to_end(&mut b).unwrap();
            b
        })
        .join()
        .unwrap();
        (got, resolved, home_read)
    });
    assert_eq!(got, b"pong");
    assert!(resolved.as_ref().is_ok_and(|n| *n > 0), "the host resolver works: {resolved:?}");
    assert_eq!(home_read, Err(Some(libc::EACCES)), "netstack cannot read the user's files");
    server.join().unwrap();

    // Control channel: accepting the host's connections to its socket.
    let sock = t.path().join("control.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"hello").unwrap();
    });
    // (It may not open any file at all: its filter has no openat.)
    let before = euid();
    let (got, worker_euid) = confined(ThreadKind::Vsock, Reach::Only(vec![]), move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        s.set_nonblocking(false).unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b).unwrap();
        (b, euid())
    });
    assert_eq!(got, b"hello");
    if before == 0 {
        assert_eq!(worker_euid, threads::NOBODY, "as root, the control channel's worker runs as nobody");
    } else {
        assert_eq!(worker_euid, before, "not root: the user stays");
    }
    assert_eq!(euid(), before, "the rest of the process keeps its user");
    client.join().unwrap();

    // Control: threads, unix sockets, the sandbox's state files.
    let state = t.path().join("state");
    let ok = confined(ThreadKind::Control, Reach::Unconfined, move || {
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("last.tmp"), "x").unwrap();
        std::fs::rename(state.join("last.tmp"), state.join("last")).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || (&a).write_all(b"y").unwrap()).join().unwrap();
        let mut buf = [0u8; 1];
        b.read_exact(&mut buf).unwrap();
        let seccomp = status_field("Seccomp:");
        (std::fs::read_to_string(state.join("last")).unwrap() + std::str::from_utf8(&buf).unwrap(), seccomp)
    });
    assert_eq!(ok.0, "xy");
    assert_eq!(ok.1, "2", "the thread runs under a seccomp filter");
}

/// Runs a read of sector 1 and a flush on a virtio-blk device for `disk`
/// (its worker confined as the block kind); their status bytes.
fn block_device_serves(disk: &std::path::Path) -> [u8; 2] {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm::devices::virtio::block::{outhdr, Block};
    use vmm::devices::virtio::{Interrupt, VirtioDevice};

    struct NoIrq;
    impl Interrupt for NoIrq {
        fn signal_used_queue(&self) {}
        fn signal_config_change(&self) {}
    }
    let mut block = Block::open(disk, false, "jail").unwrap();
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for (at, kind, sector) in [(0x1000u64, 0u32, 1u64), (0x2000, 4, 0)] {
        let mut h = [0u8; outhdr::LEN];
        h[outhdr::TYPE].copy_from_slice(&kind.to_le_bytes());
        h[outhdr::SECTOR].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
        m.write_obj(0xffu8, GuestAddress(at + 0x800)).unwrap();
    }
    let d = |addr: u64, len: u32, flags: u32, next: u16| {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    };
    let q = MockSplitQueue::create(&m, GuestAddress(0x40_000), 16);
    q.add_desc_chains(
        &[
            d(0x1000, 16, VRING_DESC_F_NEXT, 1),
            d(0x8000, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
            d(0x1800, 1, VRING_DESC_F_WRITE, 0),
            d(0x2000, 16, VRING_DESC_F_NEXT, 4),
            d(0x2800, 1, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    block.device.activate(m.clone(), vec![q.create_queue().unwrap()], Arc::new(NoIrq)).unwrap();
    block.device.queue_notify(0);
    let until = Instant::now() + Duration::from_secs(10);
    while m.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap() != 2 {
        assert!(threads::violation().is_none(), "the disk's worker hit its filter: {:?}", threads::violation());
        assert!(Instant::now() < until, "the disk's worker did not answer");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(block);
    [m.read_obj(GuestAddress(0x1800)).unwrap(), m.read_obj(GuestAddress(0x2800)).unwrap()]
}

/// A device as the VM's buses hold one: a virtio-blk device (its worker
/// thread running) and a clone of the guest memory; dropping it stops
/// and joins the worker and may unmap the memory. It tells, from the
/// thread that drops it, that thread's `Seccomp:` and `CapEff:` fields.
struct DeviceLike {
    _block: vmm::devices::virtio::block::Block,
    _mem: vm_memory::GuestMemoryMmap,
    dropped_under: DroppedUnder,
}

/// The `Seccomp:` and `CapEff:` fields of the thread that dropped a
/// [`DeviceLike`], once one did.
type DroppedUnder = Arc<std::sync::Mutex<Option<(String, String)>>>;

impl Drop for DeviceLike {
    fn drop(&mut self) {
        let fields = (status_field("Seccomp:"), status_field("CapEff:"));
        *self.dropped_under.lock().unwrap() = Some(fields);
    }
}

impl vmm::devices::BusDevice for DeviceLike {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// A [`DeviceLike`] for a disk image in `dir`, with 1 MiB of memory.
fn device_like(dir: &std::path::Path) -> (DeviceLike, DroppedUnder) {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8192]).unwrap();
    let block = vmm::devices::virtio::block::Block::open(&disk, false, "supervisor").unwrap();
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let dropped_under = Arc::new(std::sync::Mutex::new(None));
    (DeviceLike { _block: block, _mem: mem, dropped_under: dropped_under.clone() }, dropped_under)
}

#[test]
fn the_supervisor_ends_a_run_under_its_filter_and_reaches_only_proc_self() {
    // What the VM thread does once its vCPUs run (runner::run): waits for
    // the stop, joins threads, reads its memory figures from smaps, drops
    // the devices (their workers stopped and joined) and guest memory,
    // says things on stderr.
    let t = tempfile::tempdir().unwrap();
    let (device, dropped_under) = device_like(t.path());
    let waited = Arc::new(Stop::default());
    let w = waited.clone();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let vcpu_like = std::thread::spawn(move || {
        let _ = go_rx.recv();
        w.request(StopReason::GuestReset);
        7u32
    });
    let secret = t.path().join("secret");
    std::fs::write(&secret, "host secret").unwrap();
    let before = euid();
    let out = confined(ThreadKind::Supervisor, threads::supervisor_reach(), move || {
        go_tx.send(()).unwrap();
        let stopped = waited.wait(Some(Duration::from_secs(60)));
        let joined = vcpu_like.join().unwrap();
        std::thread::sleep(Duration::from_millis(1));
        let rss = vmm::metrics::rss_outside_guest_kib(&[]);
        eprintln!("sbx: test: the run ends");
        drop(device);
        // Read-only opens elsewhere: refused by Landlock, not by the
        // filter (an errno, not a trap).
        let etc = std::fs::read("/etc/hostname").map(drop).map_err(|e| e.raw_os_error());
        let beside = std::fs::read(&secret).map(drop).map_err(|e| e.raw_os_error());
        (stopped, joined, rss, etc, beside, status_field("Seccomp:"))
    });
    assert!(threads::violation().is_none(), "{:?}", threads::violation());
    let (stopped, joined, rss, etc, beside, seccomp) = out;
    assert!(stopped && joined == 7, "the stop was seen and the thread joined");
    assert!(rss.is_some_and(|kib| kib > 0), "smaps read under the filter: {rss:?}");
    assert_eq!(etc, Err(Some(libc::EACCES)), "the supervisor reaches /proc/self only");
    assert_eq!(beside, Err(Some(libc::EACCES)), "the supervisor reaches /proc/self only");
    assert_eq!(seccomp, "2");
    let (seccomp, caps) = dropped_under.lock().unwrap().clone().expect("the device was dropped");
    assert_eq!(seccomp, "2", "the device was dropped under the filter");
    if before == 0 {
        assert_eq!(caps, "0000000000000000", "as root, the supervisor keeps no capability");
    }
}

/// The exit code the runner's child gives when there is no KVM to run on.
const NO_KVM: i32 = 78;

#[test]
fn a_tiny_guest_runs_to_its_end_through_the_runner_under_the_jail() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "runner_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SBX_JAIL_CHILD", "runner")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let case = format!("{:?}\nstdout {stdout}\nstderr {stderr}", out.status);
    if out.status.code() == Some(NO_KVM) {
        eprintln!("SKIPPED: /dev/kvm is not available to this user");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{case}");
    assert!(!stderr.contains("made system call"), "no thread hit its filter: {case}");
    assert!(stdout.contains("RUN ENDED"), "{case}");
}

/// A port the tiny guest writes to; what it got.
#[derive(Default)]
struct Port(Vec<u8>);

impl vmm::devices::BusDevice for Port {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0.extend_from_slice(data);
    }
}

/// A real run in a process of its own (the jail is process-wide): a
/// real-mode guest that writes a port and its serial console, then spins
/// until the run's timeout; `runner::run` on a `vm` thread as sbx starts
/// it, its vCPU confined as such and the thread itself as the supervisor
/// (the stop, the kicks, the join, smaps, the VM and its devices dropped,
/// a disk's worker among them).
#[test]
#[ignore = "a child of a_tiny_guest_runs_to_its_end_through_the_runner_under_the_jail"]
fn runner_child() {
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmm::devices::console::{ConsoleFile, ConsoleLog, SharedReport};
    use vmm::devices::serial::SerialDevice;
    use vmm::devices::Bus;
    use vmm::runner::{self, RunOptions};

    std::env::var("SBX_JAIL_CHILD").expect("run by its parent test");
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        std::process::exit(NO_KVM);
    }
    let stop = Arc::new(Stop::default());
    threads::enable_jail(stop.clone(), runner::kick_signal(), Some(CHILD_EXIT)).unwrap();
    let t = tempfile::tempdir().unwrap();
    let vm = vmm::vstate::Vm::new(64 << 20).unwrap();
    // mov al, 0x2a ; mov dx, 0x500 ; out dx, al ;
    // mov al, 'A' ; mov dx, 0x3f8 ; out dx, al ; jmp $
    let code = [0xb0, 0x2a, 0xba, 0x00, 0x05, 0xee, 0xb0, 0x41, 0xba, 0xf8, 0x03, 0xee, 0xeb, 0xfe];
    vm.memory.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).unwrap();

    let port = Arc::new(Mutex::new(Port::default()));
    let console_path = t.path().join("console.log");
    let console = ConsoleLog::new(Some(ConsoleFile::create(&console_path).unwrap()), None, SharedReport::default());
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, Box::new(console))));
    let (mut device, dropped_under) = device_like(t.path());
    device._mem = vm.memory.clone();
    let mut pio = Bus::new();
    pio.insert(port.clone(), 0x500, 1).unwrap();
    pio.insert(serial, 0x3f8, 8).unwrap();
    let mut mmio = Bus::new();
    mmio.insert(Arc::new(Mutex::new(device)), 0xd000_0000, 0x1000).unwrap();
    let mvm = vmm::builder::MicroVm { vm, vcpus: vec![vcpu], pio, mmio, stop: stop.clone() };
    let opts = RunOptions {
        // Ended by the timeout: the vCPU spins in KVM_RUN until kicked.
        timeout: Some(Duration::from_millis(300)),
        // The boot vCPU's RIP sampled: kicks while it runs too.
        profile: Some(Duration::from_millis(5)),
        vcpu_reach: Reach::Only(vec![PathRule { path: t.path().to_path_buf(), write: true }]),
        supervisor_reach: threads::supervisor_reach(),
    };
    let vm_thread = threads::spawn_helper("vm", move || runner::run(mvm, opts)).unwrap();
    let result = vm_thread.join().unwrap();
    assert!(threads::violation().is_none(), "{:?}", threads::violation());
    assert_eq!(result.reason, StopReason::Timeout(0), "{}", result.reason);
    assert!(result.exits.0.get("intr").is_some_and(|n| *n >= 1), "kicked out of KVM_RUN: {:?}", result.exits.0);
    assert_eq!(result.exits.0.get("io_out"), Some(&2), "{:?}", result.exits.0);
    assert!(result.rss_outside_guest_kib.is_some_and(|kib| kib > 0), "smaps read by the supervisor");
    assert_eq!(port.lock().unwrap().0, [0x2a], "the guest ran");
    assert_eq!(std::fs::read(&console_path).unwrap(), b"A", "its console was written");
    let (seccomp, _) = dropped_under.lock().unwrap().clone().expect("the devices were dropped at the run's end");
    assert_eq!(seccomp, "2", "dropped on the supervisor, under its filter");
    println!("RUN ENDED");
}

#[test]
fn the_file_server_reaches_its_folder_and_nothing_else() {
    let t = tempfile::tempdir().unwrap();
    let share = t.path().join("work");
    let ro = t.path().join("ro");
    let outside = t.path().join("secret");
    for d in [&share, &ro] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(&outside, "host secret").unwrap();
    std::fs::write(ro.join("doc"), "read me").unwrap();
    let paths = vec![PathRule { path: share.clone(), write: true }, PathRule { path: ro.clone(), write: false }];
    let (s, o, r) = (share.clone(), outside.clone(), ro.clone());
    let result = confined(ThreadKind::Fs, Reach::Only(paths), move || {
        use std::os::unix::fs::{symlink, PermissionsExt};
        // What the file server does in its folder.
        std::fs::create_dir_all(s.join("a/b")).unwrap();
        std::fs::write(s.join("a/b/f"), "data").unwrap();
        std::fs::rename(s.join("a/b/f"), s.join("a/g")).unwrap();
        symlink("g", s.join("a/link")).unwrap();
        std::fs::File::open(s.join("a/g")).unwrap().set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
        let listed = std::fs::read_dir(s.join("a")).unwrap().count();
        std::fs::remove_file(s.join("a/link")).unwrap();
        let read_only = std::fs::read_to_string(r.join("doc")).unwrap();
        let ro_write = std::fs::write(r.join("new"), "x").map_err(|e| e.raw_os_error());
        // Anything else on the host: refused whatever the path.
        let outside_read = std::fs::read(&o).map_err(|e| e.raw_os_error());
        let etc = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
        let escape = std::fs::read(s.join("../secret")).map_err(|e| e.raw_os_error());
        (listed, read_only, ro_write, outside_read, etc, escape)
    });
    assert_eq!(result.0, 3, "b/, g and link");
    assert_eq!(result.1, "read me");
    assert_eq!(result.2, Err(Some(libc::EACCES)), "a read-only folder stays read-only");
    assert_eq!(result.3, Err(Some(libc::EACCES)), "a file beside the folder is out of reach");
    assert_eq!(result.4, Err(Some(libc::EACCES)), "/etc is out of reach");
    assert_eq!(result.5, Err(Some(libc::EACCES)), "`..` does not lead out");
    assert_eq!(std::fs::read_to_string(share.join("a/g")).unwrap(), "data");
    assert_eq!(threads::landlock_state(), threads::LandlockState::Enforced);
}

/// The first name /etc/hosts gives that is not localhost's.
fn a_hosts_name() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(|l| l.split_whitespace().skip(1))
        .find(|n| !n.starts_with("localhost") && !n.starts_with("ip6-"))
        .map(str::to_string)
}

#[test]
fn the_network_threads_resolve_but_reach_no_unix_socket_no_secret_and_no_capability() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("agent.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let hosts_name = a_hosts_name();
    let mut reach = vec![PathRule { path: t.path().to_path_buf(), write: true }];
    reach.extend(threads::resolver_reach());
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let stop = jail();
    let h = threads::spawn(ThreadKind::Net, "test-net", PanicReport::to(&stop), Reach::Only(reach), move || {
        let err = |e: std::io::Error| e.raw_os_error();
        let localhost = ("localhost", 80).to_socket_addrs().map(|a| a.count()).map_err(|e| e.to_string());
        let named =
            hosts_name.map(|n| (n.as_str(), 80).to_socket_addrs().map(|a| a.count()).map_err(|e| e.to_string()));
        // UNIX sockets: refused with an errno, not a trap (a pathname
        // one in a directory it may even write, and none to create).
        let unix = UnixStream::connect(&sock).map(drop).map_err(err);
        let datagram = std::os::unix::net::UnixDatagram::unbound().map(drop).map_err(err);
        // Root's secrets: uid 0 owns them (so capabilities alone do not
        // keep them), Landlock does.
        let shadow = std::fs::read("/etc/shadow").map(drop).map_err(err);
        let passwd = std::fs::read("/etc/passwd").map(drop).map_err(err);
        let root_home = std::fs::read_dir("/root").map(drop).map_err(err);
        let root_file = std::fs::read("/root/.profile").map(drop).map_err(err);
        // Its capabilities, read by the test from /proc (which this
        // thread does not reach) while it waits.
        // SAFETY: gettid has no preconditions and cannot fail.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
        (localhost, named, unix, datagram, shadow, passwd, root_home, root_file)
    })
    .unwrap();
    let tid = tid_rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
        panic!("the network thread did not get this far: {:?} {:?}", threads::violation(), stop.reason())
    });
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let field = |f: &str| status.lines().find_map(|l| l.strip_prefix(f)).unwrap_or_default().trim().to_string();
    let (eff, prm) = (field("CapEff:"), field("CapPrm:"));
    done_tx.send(()).unwrap();
    let r = h.join().unwrap().unwrap_or_else(|| panic!("the network thread failed: {:?}", stop.reason()));
    assert!(threads::violation().is_none(), "{:?}", threads::violation());
    assert!(r.0.as_ref().is_ok_and(|n| *n > 0), "localhost resolves: {:?}", r.0);
    if let Some(named) = &r.1 {
        assert!(named.as_ref().is_ok_and(|n| *n > 0), "a name of /etc/hosts resolves: {named:?}");
    }
    let refused = Err(Some(vmm::seccomp_filters::NO_UNIX_SOCKET));
    assert_eq!(r.2, refused, "no connect to a UNIX socket (ssh-agent's, docker.sock)");
    assert_eq!(r.3, refused, "no UNIX socket at all");
    assert_eq!(r.4, Err(Some(libc::EACCES)), "/etc/shadow is out of reach");
    assert_eq!(r.5, Err(Some(libc::EACCES)), "what the resolver does not read of /etc is out of reach");
    assert_eq!(r.6, Err(Some(libc::EACCES)), "root's home is out of reach");
    assert!(matches!(r.7, Err(Some(libc::EACCES | libc::ENOENT))), "{:?}", r.7);
    if is_root() {
        assert_eq!((eff.as_str(), prm.as_str()), ("0000000000000000", "0000000000000000"), "no capability left");
    }
}

#[test]
fn no_kind_connects_to_an_abstract_socket_made_outside_it() {
    use std::os::linux::net::SocketAddrExt;
    if threads::landlock_abi().is_none_or(|v| v < 6) {
        eprintln!("skipped: Landlock below ABI 6 has no scope for abstract sockets");
        return;
    }
    let name = format!("sbx-jail-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    // Reachable from an unconfined thread (the test's).
    assert!(UnixStream::connect_addr(&addr).is_ok());
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("control.sock");
    let control = UnixListener::bind(&sock).unwrap();
    let reach = Reach::Only(vec![PathRule { path: t.path().to_path_buf(), write: true }]);
    let (abstract_connect, control_connect) = confined(ThreadKind::Control, reach, move || {
        let abstract_connect = UnixStream::connect_addr(&addr).map(drop).map_err(|e| e.raw_os_error());
        // The one connect the control threads make: to the control socket.
        let control_connect = UnixStream::connect(&sock).map(drop).map_err(|e| e.raw_os_error());
        (abstract_connect, control_connect)
    });
    assert_eq!(abstract_connect, Err(Some(libc::EPERM)), "D-Bus's or X11's abstract socket is out of reach");
    assert_eq!(control_connect, Ok(()), "the main session still connects to the control socket");
    drop(control);
}

#[test]
fn hardening_turns_core_dumps_off_and_the_process_still_reads_its_proc() {
    let exe = std::env::current_exe().unwrap();
    let users: &[&str] = if is_root() { &["self", "nobody"] } else { &["self"] };
    for user in users {
        let out = Command::new(&exe)
            .args(["--exact", "harden_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("SBX_JAIL_CHILD", user)
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let case = format!("as {user}: {:?}\nstdout {stdout}\nstderr {stderr}", out.status);
        assert_eq!(out.status.code(), Some(0), "{case}");
        assert!(stdout.contains("CORE LIMIT 0 0"), "{case}");
        assert!(stdout.contains("DUMPABLE 0"), "{case}");
        assert!(stdout.contains("PROC READ"), "{case}");
        assert!(stdout.contains("CONFINED PROC READ"), "{case}");
    }
}

/// The hardening in a process of its own (it is process-wide): run by the
/// test above, as this user and, for root, as nobody.
#[test]
#[ignore = "a child of hardening_turns_core_dumps_off_and_the_process_still_reads_its_proc"]
fn harden_child() {
    let user = std::env::var("SBX_JAIL_CHILD").expect("run by its parent test");
    if user == "nobody" {
        // SAFETY: integer arguments only (setgroups with a null list of
        // size 0); glibc applies them to every thread of the process.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setresgid(threads::NOBODY, threads::NOBODY, threads::NOBODY), 0);
            assert_eq!(libc::setresuid(threads::NOBODY, threads::NOBODY, threads::NOBODY), 0);
        }
    }
    threads::harden_process().unwrap();
    let mut lim = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
    // SAFETY: lim is a valid rlimit to write.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) }, 0);
    println!("CORE LIMIT {} {}", lim.rlim_cur, lim.rlim_max);
    // SAFETY: prctl with integer arguments only.
    println!("DUMPABLE {}", unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) });
    // What sbx reads of itself: its status, memory (metrics), mounts and
    // cgroup (limits).
    let own = ["/proc/self/status", "/proc/self/smaps", "/proc/self/mountinfo", "/proc/self/cgroup"];
    for f in own {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!text.is_empty(), "{f}");
    }
    assert_eq!(status_field("NoNewPrivs:"), "1");
    println!("PROC READ");
    // And a control thread, confined to /proc/self as sbx's are.
    let reach = Reach::Only(vec![PathRule { path: "/proc/self".into(), write: false }]);
    let read = confined(ThreadKind::Control, reach, move || {
        own.iter()
            .map(|f| std::fs::read_to_string(f).map(|t| t.len()).map_err(|e| format!("{f}: {e}")))
            .collect::<Vec<_>>()
    });
    for r in read {
        assert!(r.as_ref().is_ok_and(|n| *n > 0), "{r:?}");
    }
    println!("CONFINED PROC READ");
}

#[test]
fn hardening_sets_no_new_privs_and_drops_capabilities() {
    let (nnp, eff, bnd, root) = std::thread::spawn(|| {
        threads::harden_process().unwrap();
        (status_field("NoNewPrivs:"), status_field("CapEff:"), status_field("CapBnd:"), is_root())
    })
    .join()
    .unwrap();
    assert_eq!(nnp, "1");
    let eff = u64::from_str_radix(&eff, 16).unwrap();
    let bnd = u64::from_str_radix(&bnd, 16).unwrap();
    assert_eq!(eff & !threads::KEPT_CAPABILITIES, 0, "only the kept capabilities are effective");
    if root {
        let bounding = threads::KEPT_CAPABILITIES | threads::SWITCH_USER;
        assert_eq!(bnd & !bounding, 0, "nothing else can come back either");
        assert_eq!(eff, threads::KEPT_CAPABILITIES, "root keeps what the file server needs");
    }
    // The rest of the process is untouched (a thread's own sets).
    assert_ne!(status_field("NoNewPrivs:"), "", "status readable");
}

/// The calling thread's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (from /proc, no libc call).
fn is_root() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = s.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
    uid.split_whitespace().nth(1) == Some("0")
}

/// The violations: (kind, what the thread does, the call its filter
/// traps; None where the thread has every signal blocked at that moment:
/// glibc does, around the clone of a new thread or process, and a trap
/// that cannot be handled kills the whole process with SIGSYS).
const VIOLATIONS: &[(&str, &str, Option<&str>)] = &[
    ("vcpu", "tty-ioctl", Some("ioctl")),
    ("vcpu", "spawn", None),
    ("network", "spawn", None),
    ("network", "tty-ioctl", Some("ioctl")),
    // A thread netstack started itself (a connect thread) has the
    // network filter but no kind of its own: "helper".
    ("network", "helper-tty-ioctl", Some("ioctl")),
    ("file server", "inet-socket", Some("socket")),
    ("control channel", "tty-ioctl", Some("ioctl")),
    ("control", "inet-socket", Some("socket")),
    // The threads beside the VM: the signal thread opens no file and
    // starts no thread; the input forwarder makes no socket.
    ("signals", "open-file", Some("openat")),
    ("signals", "thread", None),
    ("session", "inet-socket", Some("socket")),
    ("session", "open-file", Some("openat")),
    // The VM's supervisor reads its own figures, nothing more: no
    // socket, no file opened for writing, no ioctl, no thread.
    ("supervisor", "inet-socket", Some("socket")),
    ("supervisor", "write-file", Some("openat")),
    ("supervisor", "tty-ioctl", Some("ioctl")),
    ("supervisor", "thread", None),
];

#[test]
fn a_confined_thread_that_panics_stops_the_vm_with_its_message_even_with_backtraces_on() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "violation_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SBX_JAIL_CHILD", "vcpu/panic")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let case = format!("{:?}\nstdout {stdout}\nstderr {stderr}", out.status);
    assert_eq!(out.status.code(), Some(0), "{case}");
    assert!(stdout.contains("PANIC REPORTED: VMM thread victim failed: vcpu panicked: a bug in a device"), "{case}");
    assert!(stderr.contains("sbx: vcpu thread 'victim' panicked at"), "{case}");
    assert!(!stderr.contains("made system call"), "the backtrace is not attempted: {case}");
}

#[test]
fn a_forbidden_call_stops_the_thread_and_the_vm_and_at_last_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = VIOLATIONS
        .iter()
        .map(|(kind, action, _)| {
            let child = Command::new(&exe)
                .args(["--exact", "violation_child", "--ignored", "--nocapture", "--test-threads=1"])
                .env("SBX_JAIL_CHILD", format!("{kind}/{action}"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (child, Instant::now())
        })
        .collect();
    for ((child, started), (kind, action, call)) in children.into_iter().zip(VIOLATIONS) {
        let out = child.wait_with_output().unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let case = format!("{kind}/{action}: {:?}\nstdout {stdout}\nstderr {stderr}", out.status);
        assert!(!stdout.contains("STILL ALIVE"), "{case}");
        let Some(call) = call else {
            // Signals blocked: the kernel kills the process at once.
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{case}");
            assert!(!stdout.contains("STOPPED"), "{case}");
            continue;
        };
        let kind = if action.starts_with("helper") { "helper" } else { kind };
        // The thread's own words, from the signal handler.
        assert!(stderr.contains(&format!("a {kind} thread made system call")), "{case}");
        assert!(stderr.contains(&format!("({call})")), "{case}");
        // The VM's stop reason, as the child saw it.
        assert!(stdout.contains(&format!("STOPPED: A {kind} thread of the VMM made system call")), "{case}");
        assert!(stdout.contains("THREAD PARKED"), "the thread never returned to its code: {case}");
        // The last resort: the process ends with the code it was given.
        assert_eq!(out.status.code(), Some(CHILD_EXIT), "{case}");
        assert!(took >= threads::VIOLATION_GRACE, "{case}");
        assert!(took < threads::VIOLATION_GRACE * 4, "{case}: {took:?}");
    }
}

/// One violation case (run by the test above in a process of its own).
#[test]
#[ignore = "a child of a_forbidden_call_stops_the_thread_and_the_vm_and_at_last_the_process"]
fn violation_child() {
    let case = std::env::var("SBX_JAIL_CHILD").expect("run by its parent test");
    let (kind, action) = case.split_once('/').unwrap();
    let kind = ThreadKind::ALL.into_iter().find(|k| k.as_str() == kind).unwrap();
    let stop = Arc::new(Stop::default());
    threads::enable_jail(stop.clone(), libc::SIGRTMIN(), Some(CHILD_EXIT)).unwrap();
    let action = action.to_string();
    let h = threads::spawn(kind, "victim", PanicReport::to(&stop), Reach::Unconfined, move || match action.as_str() {
        "spawn" => drop(Command::new("/bin/true").status()),
        "tty-ioctl" => drop(std::io::IsTerminal::is_terminal(&std::io::stdin())),
        "inet-socket" => drop(TcpListener::bind("127.0.0.1:0")),
        "panic" => panic!("a bug in a device"),
        "open-file" => drop(std::fs::File::open("/etc/hostname")),
        "write-file" => drop(std::fs::File::create(std::env::temp_dir().join("sbx-jail-supervisor-write"))),
        "thread" => drop(std::thread::spawn(|| ())),
        "helper-tty-ioctl" => {
            // Parked, the helper never ends: not joined.
            let _ = std::thread::spawn(|| std::io::IsTerminal::is_terminal(&std::io::stdin()));
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown action {other}"),
    })
    .unwrap();
    assert!(stop.wait(Some(Duration::from_secs(30))), "the VM was not stopped");
    if let Some(StopReason::ThreadPanicked { .. }) = stop.reason() {
        // A panic is no violation: the thread ends, nothing is parked.
        println!("PANIC REPORTED: {}", stop.reason().unwrap());
        assert_eq!(h.join().unwrap(), None);
        assert!(threads::violation().is_none());
        return;
    }
    if let Some(StopReason::SyscallForbidden { .. }) = stop.reason() {
        println!("STOPPED: {}", stop.reason().unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    if !h.is_finished() {
        println!("THREAD PARKED");
    }
    let _ = std::io::stdout().flush();
    // The jail's watcher ends the process after its grace.
    std::thread::sleep(threads::VIOLATION_GRACE * 3);
    println!("STILL ALIVE");
}

#[test]
fn the_signal_thread_waits_for_signals_and_passes_them_on_under_its_filter() {
    jail();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (session, mut peer) = UnixStream::pair().unwrap();
    let h = threads::spawn_confined(ThreadKind::Signals, "test-signals", Reach::Only(vec![]), move || {
        // SAFETY: set is plain data, initialised by sigemptyset before use;
        // sig a valid int to write.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            tid_tx.send(libc::gettid()).unwrap();
            let mut sig = 0;
            assert_eq!(libc::sigwait(&set, &mut sig), 0);
            // What it passes on: a frame on the session's socket.
            (&session).write_all(&[sig as u8]).unwrap();
            let mut ack = [0u8; 1];
            (&session).read_exact(&mut ack).unwrap();
            ack[0]
        }
    })
    .unwrap();
    let tid = tid_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "the signal thread is filtered:\n{status}");
    // SAFETY: integer arguments only; tid is a thread of this process,
    // blocked on sigwait for the signal.
    assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, std::process::id(), tid, libc::SIGUSR1) }, 0);
    let mut got = [0u8; 1];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got[0] as i32, libc::SIGUSR1, "the signal came through");
    peer.write_all(b"k").unwrap();
    assert_eq!(h.join().unwrap(), Some(b'k'));
    assert!(threads::violation().is_none(), "{:?}", threads::violation());
}

#[test]
fn every_thread_of_a_jailed_process_runs_under_a_filter() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "all_filtered_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SBX_JAIL_CHILD", "all")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let case = format!("{:?}\nstdout {stdout}\nstderr {stderr}", out.status);
    assert_eq!(out.status.code(), Some(0), "{case}");
    for name in ["seccomp-watch", "signals", "stdin", "vm"] {
        assert!(stdout.contains(&format!("\"{name}\"")), "{name} among the threads: {case}");
    }
    assert!(stdout.contains("UNFILTERED []"), "{case}");
}

/// `sbx run`'s threads in a process of their own (the jail is
/// process-wide), each started as sbx starts it: the watcher by the
/// jail, the signal thread and the input forwarder confined first thing,
/// a helper a control thread started, and this thread confining
/// itself as the main thread does; then every thread's Seccomp field
/// but the test harness's main thread (which only waits for this one).
#[test]
#[ignore = "a child of every_thread_of_a_jailed_process_runs_under_a_filter"]
fn all_filtered_child() {
    std::env::var("SBX_JAIL_CHILD").expect("run by its parent test");
    let stop = Arc::new(Stop::default());
    threads::enable_jail(stop.clone(), libc::SIGRTMIN(), Some(CHILD_EXIT)).unwrap();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let signals = threads::spawn_confined(ThreadKind::Signals, "signals", Reach::Only(vec![]), move || {
        let _ = hold_rx.recv();
    })
    .unwrap();
    // The input forwarder, started before this thread confines itself
    // (a confined thread cannot confine another: it may not add filters).
    let (session_tx, session_rx) = std::sync::mpsc::channel::<()>();
    let input = threads::spawn_confined(ThreadKind::Session, "stdin", Reach::Only(vec![]), move || {
        let _ = session_rx.recv();
    })
    .unwrap();
    let (worker_tx, worker_rx) = std::sync::mpsc::channel::<()>();
    let worker =
        threads::spawn(ThreadKind::Control, "sbx-admin", PanicReport::to(&stop), Reach::Unconfined, move || {
            // And one a confined thread starts (netstack's connect threads):
            // it keeps its filter.
            let helper = std::thread::spawn(move || {
                let _ = worker_rx.recv();
            });
            // But it cannot start one of another kind: refused, not trapped.
            let other = threads::spawn_confined(ThreadKind::Session, "other", Reach::Only(vec![]), || ()).map(drop);
            (helper, other.map_err(|e| e.to_string()))
        })
        .unwrap();
    // The VM's thread, confining itself as the supervisor (runner::run
    // does once its vCPUs run).
    let (vm_tx, vm_rx) = std::sync::mpsc::channel::<()>();
    let (vm_ready_tx, vm_ready_rx) = std::sync::mpsc::channel();
    let vm = threads::spawn_helper("vm", move || {
        vm_ready_tx.send(threads::confine_current(ThreadKind::Supervisor, &threads::supervisor_reach())).unwrap();
        let _ = vm_rx.recv();
    })
    .unwrap();
    vm_ready_rx.recv().unwrap().unwrap();
    let (helper, other) = worker.join().unwrap().unwrap();
    assert!(other.as_ref().is_err_and(|e| e.contains("confined")), "{other:?}");
    threads::confine_current(ThreadKind::Control, &Reach::Unconfined).unwrap();
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap().trim().to_string())
        .collect();
    names.sort();
    let harness = std::process::id();
    let unfiltered: Vec<_> =
        threads::unfiltered_threads().unwrap().into_iter().filter(|(tid, _)| *tid != harness).collect();
    println!("THREADS {names:?}");
    println!("UNFILTERED {unfiltered:?}");
    hold_tx.send(()).unwrap();
    session_tx.send(()).unwrap();
    worker_tx.send(()).unwrap();
    vm_tx.send(()).unwrap();
    vm.join().unwrap();
    assert_eq!(signals.join().unwrap(), Some(()));
    assert_eq!(input.join().unwrap(), Some(()));
    helper.join().unwrap();
    assert!(threads::violation().is_none(), "{:?}", threads::violation());
}
