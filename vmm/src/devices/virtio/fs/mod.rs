//! Host side: virtio-fs (virtio 1.x, section 5.11): FUSE requests from the
//! guest's kernel carried on virtqueues, answered by the file server in
//! this process ([`crate::fs::server::FileServer`]), which decides every
//! access. A worker thread ([`super::worker`]) owns the server and, once
//! the driver is up, both queues (high-priority and one request queue); it
//! wakes only when the guest notifies a queue.
//!
//! Every descriptor chain comes from the guest (untrusted): the readable
//! part (the request) is gathered up to a bound, the writable part (room
//! for the reply) is measured, and both go through vm-memory's checked
//! accesses. A chain over the bound, out of guest memory, or with readable
//! after writable buffers is returned unused; nothing panics. The FUSE
//! messages themselves are parsed by the file server ([`crate::fs::fuse`]);
//! this device's own layout (its config space) is in `wire.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{Chain, ChainError};
use super::device::{read_only_config, Spec, WorkerDevice};
use super::worker::{Active, QueueHandler, Wake};
use super::VIRTIO_F_VERSION_1;
use crate::fs::server::{FileServer, MAX_WRITE};
use crate::threads::{Reach, ThreadKind};

mod wire;

use wire::config_bytes;
pub use wire::TAG_LEN;

pub const DEVICE_TYPE_FS: u32 = VIRTIO_ID_FS;
const HIPRIO_QUEUE_SIZE: u16 = 128;
/// Large enough for a request of MAX_WRITE bytes in 4 KiB pages and its
/// headers without indirect descriptors.
const REQUEST_QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: &[u16] = &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE];
/// The largest request gathered from a chain: a full write plus headers.
const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// Requests served, by kind: what the figures report.
pub type Counts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// A shared folder: the device, and its request counts.
pub struct Fs {
    pub device: WorkerDevice,
    pub counts: Counts,
}

impl Fs {
    /// A device the guest mounts by `tag`, served by `server` on a thread
    /// that reaches the host paths `reach` allows (once the jail is on).
    pub fn new(tag: &str, server: FileServer, reach: Reach) -> std::io::Result<Fs> {
        let Some(config) = config_bytes(tag) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "filesystem tag must be 1-36 bytes"));
        };
        let counts = Counts::default();
        let spec = Spec {
            name: "fs",
            device_type: DEVICE_TYPE_FS,
            queue_sizes: QUEUE_SIZES,
            queues_needed: 2,
            features: VIRTIO_F_VERSION_1,
            kind: ThreadKind::Fs,
            thread: "virtio-fs",
        };
        let handler = FsHandler { server, counts: counts.clone() };
        let device = WorkerDevice::spawn(spec, config, read_only_config(), reach, handler)?;
        Ok(Fs { device, counts })
    }
}

/// The worker's part: the file server, serving both queues when the guest
/// notifies either.
struct FsHandler {
    server: FileServer,
    counts: Counts,
}

/// The worker's part alone, to drive by hand (the fuzz targets, `vmm/fuzz`).
#[doc(hidden)]
pub fn queue_handler(server: FileServer) -> impl QueueHandler {
    FsHandler { server, counts: Counts::default() }
}

impl QueueHandler for FsHandler {
    fn handle(&mut self, active: Option<&mut Active>, wake: &Wake) -> bool {
        let Some(a) = active.filter(|_| wake.queues) else { return false };
        let mut signal = false;
        for q in a.queues.iter_mut() {
            signal |= serve_queue(&a.mem, q, &mut self.server);
        }
        if let Ok(mut c) = self.counts.lock() {
            c.clone_from(&self.server.counts);
        }
        signal
    }
}

/// Serves every request on `q`. Returns whether the guest wants an
/// interrupt.
fn serve_queue(mem: &GuestMemoryMmap, q: &mut Queue, server: &mut FileServer) -> bool {
    let mut used = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let chain = Chain::walk(chain, usize::from(REQUEST_QUEUE_SIZE));
        let written = serve_chain(mem, &chain, server).unwrap_or(0);
        if q.add_used(mem, chain.head, written).is_err() {
            break;
        }
        used = true;
    }
    used && q.needs_notification(mem).unwrap_or(true)
}

/// One request: the readable part (the request, bounded) to the server,
/// its reply into the writable part (whose room is bounded too). The
/// bytes written; an error for a chain malformed, out of guest memory or
/// over the bounds (returned unused).
fn serve_chain(mem: &GuestMemoryMmap, chain: &Chain, server: &mut FileServer) -> Result<u32, ChainError> {
    let room = chain.room()?;
    if room > MAX_REQUEST as u64 {
        return Err(ChainError::TooLong { len: room, max: MAX_REQUEST as u64 });
    }
    let request = chain.read_all(mem, MAX_REQUEST)?;
    match server.handle(&request, room as usize) {
        Some(reply) => chain.write_all(mem, &[&reply]),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use crate::devices::virtio::VirtioDevice;
    use crate::fs::fuse::tests::request;
    use crate::fs::policy::FsPolicy;
    use crate::fs::share::Share;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn device(dir: &std::path::Path) -> Fs {
        let share = Share::open(dir, FsPolicy::default(), false).unwrap();
        Fs::new("sbx0", FileServer::new(share, dir.to_path_buf(), Box::new(|_| {})), Reach::Unconfined).unwrap()
    }

    fn init_request(unique: u64) -> Vec<u8> {
        let mut args = vec![];
        for v in [7u32, 37, 1 << 20, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        args.resize(64, 0);
        request(26, unique, 0, &args)
    }

    fn wait_used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap() != n {
            assert!(Instant::now() < deadline, "timed out waiting for {n} used chains");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// (id, len) of used ring entry `i`.
    fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
        let at = q.used_addr().unchecked_add(4 + 8 * i);
        (mem.read_obj(at).unwrap(), mem.read_obj(at.unchecked_add(4)).unwrap())
    }

    #[test]
    fn requests_on_the_queue_are_answered_and_bad_chains_returned_unused() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_000), 16);
        let req = MockSplitQueue::create(&mem, GuestAddress(0x20_000), 16);
        let init = init_request(77);
        mem.write_slice(&init, GuestAddress(0x40_000)).unwrap();
        req.add_desc_chains(
            &[
                // A good request: readable request, then writable room.
                desc(0x40_000, init.len() as u32, VRING_DESC_F_NEXT, 1),
                desc(0x50_000, 256, VRING_DESC_F_WRITE, 0),
                // Readable after writable.
                desc(0x50_000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
                desc(0x40_000, init.len() as u32, 0, 0),
                // Room far over the bound.
                desc(0x40_000, init.len() as u32, VRING_DESC_F_NEXT, 5),
                desc(0x60_000, u32::MAX, VRING_DESC_F_WRITE, 0),
                // Outside guest memory.
                desc((1 << 20) - 8, 64, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut fs = device(dir.path());
        let irq = Arc::new(Count::default());
        fs.device
            .activate(mem.clone(), vec![hiprio.create_queue().unwrap(), req.create_queue().unwrap()], irq.clone())
            .unwrap();
        fs.device.queue_notify(1);
        wait_used(&mem, &req, 4);
        let (id, len) = used(&mem, &req, 0);
        assert_eq!((id, len), (0, 16 + 64), "out header and fuse_init_out");
        let mut reply = vec![0u8; len as usize];
        mem.read_slice(&mut reply, GuestAddress(0x50_000)).unwrap();
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77, "the request's unique id");
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0);
        for i in 1..4 {
            assert_eq!(used(&mem, &req, i).1, 0, "bad chain {i} is returned with nothing written");
        }
        assert!(irq.count() >= 1);
        assert_eq!(
            fs.counts.lock().unwrap().get("init"),
            Some(&1),
            "{:?}",
            (0..4).map(|i| used(&mem, &req, i)).collect::<Vec<_>>()
        );
        fs.device.reset();
    }

    #[test]
    fn config_space_has_the_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let fs = device(dir.path());
        let mut c = [0xffu8; TAG_LEN + 4];
        fs.device.read_config(0, &mut c);
        assert_eq!(&c[..5], b"sbx0\0");
        assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 1);
        assert!(Fs::new(
            &"x".repeat(37),
            {
                let share = Share::open(dir.path(), FsPolicy::default(), false).unwrap();
                FileServer::new(share, dir.path().to_path_buf(), Box::new(|_| {}))
            },
            Reach::Unconfined
        )
        .is_err());
    }
}
