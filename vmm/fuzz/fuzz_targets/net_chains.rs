//! Host side: fuzzes virtio-net's queues (`vmm::devices::virtio::net`, the
//! worker's part driven by hand) with a hostile driver's receive and
//! transmit queues (any descriptor tables and available rings, any bytes
//! in the buffers) and a backend with frames of any size for the guest.
//! Besides every device's checks (chains returned, used lengths within
//! the writable bytes, no write outside them): the backend gets exactly
//! the frames of the well-formed transmit chains (all readable, within
//! the MTU, at least a header and an Ethernet header, in guest memory),
//! headers stripped, in order, the rest counted as dropped; each receive
//! chain used gets a header (one buffer) and its frame when it is all
//! writable (a readable buffer anywhere refuses it) and large enough, or
//! nothing.
#![no_main]
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::{queue_handler, FrameBackend, ETH_HDR_LEN, HDR_LEN};
use vmm::devices::virtio::worker::{Active, Interest, QueueHandler, Wake};
use vmm_fuzz::{check_writes, disjoint, fill_data, guest_memory, snapshot, writable_ranges, Input, Ring, Walked};

const MTU: u16 = 1500;
/// Descriptors the device reads of one chain.
const MAX_DESCS: usize = 256;

struct Backend {
    to_guest: VecDeque<Vec<u8>>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FrameBackend for Backend {
    fn send_to_backend(&mut self, frame: Vec<u8>) {
        self.got.lock().unwrap().push(frame);
    }
    fn receive(&mut self) -> Option<Vec<u8>> {
        self.to_guest.pop_front()
    }
    fn poll(&mut self, _: Instant) {}
    fn next_deadline(&mut self, _: Instant) -> Option<Instant> {
        None
    }
    fn interests(&mut self, _: &mut Vec<Interest>) {}
}

/// The frame the device must take from a transmit chain, if any.
fn tx_frame(c: &Walked, mem: &[u8]) -> Option<Vec<u8>> {
    let descs = &c.descs[..c.descs.len().min(MAX_DESCS)];
    let limit = HDR_LEN as u64 + u64::from(MTU) + ETH_HDR_LEN as u64;
    let mut total = 0u64;
    for &(a, l, w) in descs {
        total += u64::from(l);
        // (An empty buffer is never touched, wherever it points.)
        if w || total > limit || l > 0 && a.checked_add(u64::from(l))? > mem.len() as u64 {
            return None;
        }
    }
    let bytes = Walked { head: c.head, descs: descs.to_vec() }.bytes(mem, false, usize::MAX)?;
    (bytes.len() >= HDR_LEN + ETH_HDR_LEN).then(|| bytes[HDR_LEN..].to_vec())
}

/// The bytes a receive chain must hold after `frame`, if it can.
fn rx_bytes(c: &Walked, frame: &[u8]) -> Option<Vec<u8>> {
    let mut want = vec![0u8; HDR_LEN];
    want[10] = 1; // num_buffers
    want.extend_from_slice(frame);
    // A receive chain is writable buffers only: one readable buffer
    // anywhere in it (virtio puts readable ones first) refuses it whole.
    if c.descs.iter().take(MAX_DESCS).any(|&(_, _, w)| !w) {
        return None;
    }
    let mut done = 0usize;
    for &(a, l, _) in c.descs.iter().take(MAX_DESCS) {
        if done == want.len() {
            break;
        }
        let n = (l as usize).min(want.len() - done);
        if n > 0 && a.checked_add(n as u64)? > vmm_fuzz::MEM_SIZE {
            return None;
        }
        done += n;
    }
    (done == want.len()).then_some(want)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut frames = VecDeque::new();
    for i in 0..input.u8() % 5 {
        let len = usize::from(input.u16() % 1600).max(ETH_HDR_LEN);
        frames.push_back((0..len).map(|k| (k as u8).wrapping_mul(7).wrapping_add(i)).collect::<Vec<u8>>());
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let backend = Backend { to_guest: frames.clone(), got: got.clone() };
    let (mut handler, counters) = queue_handler(MTU, Box::new(backend));

    let mem = guest_memory();
    let mut rx = Ring::new(&mem, 0, &mut input);
    let mut tx = Ring::new(&mem, 1, &mut input);
    fill_data(&mem, input.rest());
    rx.walk(&mem);
    tx.walk(&mem);
    let allowed = writable_ranges(&[&rx, &tx]);
    let before = snapshot(&mem);

    let mut active = Active { mem: mem.clone(), queues: vec![rx.queue(), tx.queue()] };
    handler.activated(&mut active);
    handler.handle(Some(&mut active), &Wake { queues: true, ..Wake::default() });

    let Some(allowed) = allowed else { return };
    check_writes(&mem, &before, &allowed);
    // Transmit: exactly the well-formed chains' frames.
    let sent: Vec<Option<Vec<u8>>> = tx.chains[..tx.returnable()].iter().map(|c| tx_frame(c, &before)).collect();
    tx.check_used(&mem, &tx.consumed(1));
    assert!(tx.used(&mem).iter().all(|&(_, len)| len == 0), "transmit chains are used with nothing written");
    let want: Vec<Vec<u8>> = sent.iter().flatten().cloned().collect();
    let got = got.lock().unwrap();
    let exact = disjoint(&[&rx, &tx]);
    let lengths = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(lengths(&got), lengths(&want), "the backend got other frames than the chains held");
    assert!(!exact || *got == want, "the backend got other frames than the chains held");
    assert_eq!(counters.tx_frames.load(Ordering::SeqCst), want.len() as u64);
    // (A chain whose head is outside the table is dropped too.)
    let stopped = u64::from(tx.chains.len() > tx.returnable());
    assert_eq!(counters.tx_dropped.load(Ordering::SeqCst), (sent.len() - want.len()) as u64 + stopped);
    // Receive: the frames in order, one a chain, while there are chains.
    let n = frames.len().min(rx.returnable());
    rx.check_used(&mem, &rx.consumed(1)[..n]);
    let now = snapshot(&mem);
    for (i, (_, len)) in rx.used(&mem).into_iter().enumerate() {
        let chain = &rx.chains[i];
        match rx_bytes(chain, &frames[i]) {
            Some(want) => {
                assert_eq!(len as usize, want.len(), "used length of {chain:?}");
                let got = chain.bytes(&now, true, want.len());
                assert!(!exact || got.as_ref() == Some(&want), "frame {i} as written");
            }
            None => assert_eq!(len, 0, "a chain that cannot hold frame {i} is used empty"),
        }
    }
    let delivered = rx.used(&mem).iter().filter(|u| u.1 > 0).count() as u64;
    assert_eq!(counters.rx_frames.load(Ordering::SeqCst), delivered);
});
