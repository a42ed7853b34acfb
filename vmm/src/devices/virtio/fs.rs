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
//! after writable buffers is returned unused; nothing panics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Active, QueueHandler, Wake, Worker};
use super::{read_config_bytes, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::control::Stop;
use crate::fs::server::{FileServer, MAX_WRITE};
use crate::threads::{Reach, ThreadKind};

pub const DEVICE_TYPE_FS: u32 = 26;
/// The filesystem tag's room in config space.
pub const TAG_LEN: usize = 36;
const HIPRIO_QUEUE_SIZE: u16 = 128;
/// Large enough for a request of MAX_WRITE bytes in 4 KiB pages and its
/// headers without indirect descriptors.
const REQUEST_QUEUE_SIZE: u16 = 1024;
/// The largest request gathered from a chain: a full write plus headers.
const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// Requests served, by kind: what the figures report.
pub type Counts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

pub struct Fs {
    tag: [u8; TAG_LEN],
    worker: Worker,
    pub counts: Counts,
}

impl Fs {
    /// A device the guest mounts by `tag`, served by `server` on a thread
    /// that reaches the host paths `reach` allows (once the jail is on).
    pub fn new(tag: &str, server: FileServer, reach: Reach) -> std::io::Result<Fs> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "filesystem tag must be 1-36 bytes"));
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        let counts = Counts::default();
        let for_thread = counts.clone();
        let worker = Worker::spawn(ThreadKind::Fs, "virtio-fs", reach, FsHandler { server, counts: for_thread })?;
        Ok(Fs { tag: t, worker, counts })
    }

    fn config_bytes(&self) -> [u8; TAG_LEN + 4] {
        let mut c = [0u8; TAG_LEN + 4];
        c[..TAG_LEN].copy_from_slice(&self.tag);
        c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        c
    }
}

impl VirtioDevice for Fs {
    fn name(&self) -> &'static str {
        "fs"
    }
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only config space.
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.worker.activate("fs", 2, mem, queues, interrupt)
    }
    fn queue_notify(&mut self, _index: u16) {
        self.worker.kick();
    }
    fn notify_event(&self) -> Option<EventFd> {
        self.worker.notify_event()
    }
    fn reset(&mut self) {
        self.worker.reset();
    }
    fn attach_stop(&self, stop: &Arc<Stop>) {
        self.worker.attach_stop(stop);
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
        let head = chain.head_index();
        let written = match split_chain(mem, chain) {
            Some((request, reply_bufs)) => {
                let room = reply_bufs.iter().map(|&(_, len)| len as usize).sum::<usize>();
                match server.handle(&request, room) {
                    Some(reply) => write_reply(mem, &reply_bufs, &reply).unwrap_or(0),
                    None => 0,
                }
            }
            None => 0,
        };
        if q.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used && q.needs_notification(mem).unwrap_or(true)
}

/// A guest buffer: address and length.
type Buf = (GuestAddress, u32);

/// The request bytes (readable part) and the reply buffers (writable
/// part) of a chain; None if it is malformed or over the bounds.
fn split_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Option<(Vec<u8>, Vec<Buf>)> {
    let mut request = Vec::new();
    let mut reply = Vec::new();
    let mut room = 0usize;
    for d in chain.take(usize::from(REQUEST_QUEUE_SIZE)) {
        if d.is_write_only() {
            room = room.checked_add(d.len() as usize)?;
            if room > MAX_REQUEST {
                return None;
            }
            reply.push((d.addr(), d.len()));
        } else {
            if !reply.is_empty() {
                return None;
            }
            let start = request.len();
            if start + d.len() as usize > MAX_REQUEST {
                return None;
            }
            request.resize(start + d.len() as usize, 0);
            mem.read_slice(&mut request[start..], d.addr()).ok()?;
        }
    }
    Some((request, reply))
}

/// Writes `reply` across the buffers; the bytes written, or None if they
/// cannot hold it or are not guest memory.
fn write_reply(mem: &GuestMemoryMmap, bufs: &[Buf], reply: &[u8]) -> Option<u32> {
    let mut done = 0usize;
    for &(addr, len) in bufs {
        if done == reply.len() {
            break;
        }
        let n = (len as usize).min(reply.len() - done);
        mem.write_slice(&reply[done..done + n], addr).ok()?;
        done += n;
    }
    (done == reply.len()).then_some(done as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::CountingInterrupt as Count;
    use crate::fs::fuse::tests::request;
    use crate::fs::policy::FsPolicy;
    use crate::fs::share::Share;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

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
        fs.activate(mem.clone(), vec![hiprio.create_queue().unwrap(), req.create_queue().unwrap()], irq.clone())
            .unwrap();
        fs.queue_notify(1);
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
        fs.reset();
    }

    #[test]
    fn config_space_has_the_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let fs = device(dir.path());
        let mut c = [0xffu8; TAG_LEN + 4];
        fs.read_config(0, &mut c);
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
