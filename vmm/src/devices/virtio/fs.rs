//! Host side: virtio-fs (virtio 1.x, section 5.11): FUSE requests from the
//! guest's kernel carried on virtqueues, answered by the file server in
//! this process ([`crate::fs::server::FileServer`]), which decides every
//! access. A worker thread owns the server and, once the driver is up,
//! both queues (high-priority and one request queue); the vCPU thread only
//! kicks it.
//!
//! Every descriptor chain comes from the guest (untrusted): the readable
//! part (the request) is gathered up to a bound, the writable part (room
//! for the reply) is measured, and both go through vm-memory's checked
//! accesses. A chain over the bound, out of guest memory, or with readable
//! after writable buffers is returned unused; nothing panics.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, ActivateError, Ctl, Interrupt, VirtioDevice, Worker, VIRTIO_F_VERSION_1};
use crate::fs::server::{FileServer, MAX_WRITE};

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
    /// A device the guest mounts by `tag`, served by `server`.
    pub fn new(tag: &str, server: FileServer) -> std::io::Result<Fs> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "filesystem tag must be 1-36 bytes"));
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        let counts = Counts::default();
        let for_thread = counts.clone();
        let worker = Worker::spawn("virtio-fs", move |kick, ctl| {
            FsWorker { server, active: None, kick, ctl, counts: for_thread }.run();
        })?;
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
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount("fs", 2, queues.len()));
        }
        self.worker.send(Ctl::Activate { mem, queues, interrupt });
        Ok(())
    }
    fn queue_notify(&mut self, _index: u16) {
        self.worker.kick();
    }
    fn notify_event(&self) -> Option<EventFd> {
        self.worker.notify_event()
    }
    fn reset(&mut self) {
        self.worker.send(Ctl::Reset);
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<dyn Interrupt>,
}

struct FsWorker {
    server: FileServer,
    active: Option<Active>,
    kick: Arc<EventFd>,
    ctl: Receiver<Ctl>,
    counts: Counts,
}

impl FsWorker {
    fn run(&mut self) {
        loop {
            let mut pfd = libc::pollfd { fd: self.kick.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: pfd is a valid pollfd for the duration of the call,
            // and the count (1) matches.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            let _ = self.kick.read();
            while let Ok(c) = self.ctl.try_recv() {
                match c {
                    Ctl::Activate { mem, queues, interrupt } => self.active = Some(Active { mem, queues, interrupt }),
                    Ctl::Reset => self.active = None,
                    Ctl::Shutdown => return,
                }
            }
            if let Some(a) = self.active.as_mut() {
                let mut signal = false;
                for q in a.queues.iter_mut() {
                    signal |= serve_queue(&a.mem, q, &mut self.server);
                }
                if signal {
                    a.interrupt.signal_used_queue();
                }
                if let Ok(mut c) = self.counts.lock() {
                    c.clone_from(&self.server.counts);
                }
            }
        }
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
fn split_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<(Vec<u8>, Vec<Buf>)> {
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
