//! Host side: fuzzes virtio-vsock, the control channel's device
//! (`vmm::devices::virtio::vsock`, the worker's part driven by hand), with
//! a hostile driver's receive and transmit queues (any descriptor tables
//! and available rings, any packets in the buffers), while host clients
//! connect to its socket and write. Two rounds of work. Besides every
//! device's checks (chains returned, used lengths within the writable
//! bytes, no write outside them): every packet the device writes for the
//! guest is well formed (host to guest CIDs, a stream, a known operation,
//! its length the payload's, data only in RW packets, sent only to
//! guest-init's port); what the guest gets on a connection is a prefix of
//! what its client wrote; what a client reads is made of RW payloads the
//! guest sent to that connection, whole and in order.
#![no_main]
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::{queue_handler, Hdr, CONTROL_PORT, GUEST_CID, HDR_LEN, HOST_CID};
use vmm::devices::virtio::worker::{Active, QueueHandler, Wake};
use vmm_fuzz::{check_writes, disjoint, fill_data, guest_memory, snapshot, writable_ranges, Input, Ring, Walked};

const FIRST_HOST_PORT: u32 = 0x4000_0000;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const MAX_PAYLOAD: usize = 64 * 1024;
/// Descriptors the device reads of one chain.
const MAX_DESCS: usize = 256;

/// The packet in a transmit chain, as the guest wrote it.
fn tx_packet(c: &Walked, mem: &[u8]) -> Option<(Hdr, Vec<u8>)> {
    let descs = &c.descs[..c.descs.len().min(MAX_DESCS)];
    if descs.iter().any(|d| d.2) {
        return None;
    }
    let bytes = Walked { head: c.head, descs: descs.to_vec() }.bytes(mem, false, usize::MAX)?;
    let h = Hdr::parse(&bytes)?;
    Some((h, bytes[HDR_LEN..].to_vec()))
}

/// True if `got` is some of `parts`, whole and in order.
fn made_of(got: &[u8], parts: &[Vec<u8>]) -> bool {
    // reach[k]: the first k bytes are made of the parts seen so far.
    let mut reach = vec![false; got.len() + 1];
    reach[0] = true;
    for p in parts {
        for k in (0..got.len()).rev() {
            if reach[k] && !p.is_empty() && got[k..].starts_with(p) {
                reach[k + p.len()] = true;
            }
        }
    }
    reach[got.len()]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let dir = tempfile::tempdir_in(vmm_fuzz::scratch()).unwrap();
    let path = dir.path().join("control.sock");
    let mut handler = queue_handler(UnixListener::bind(&path).unwrap()).unwrap();
    // Clients, and what each writes before the first round and the second.
    let mut clients = Vec::new();
    let mut wrote: Vec<Vec<u8>> = Vec::new();
    for i in 0..input.u8() % 4 {
        let c = UnixStream::connect(&path).unwrap();
        c.set_nonblocking(true).unwrap();
        clients.push(c);
        wrote.push(Vec::new());
        let n = usize::from(input.u8());
        let bytes: Vec<u8> = (0..n).map(|k| (k as u8) ^ i.wrapping_mul(0x35)).collect();
        if clients[usize::from(i)].write_all(&bytes).is_ok() {
            wrote[usize::from(i)].extend_from_slice(&bytes);
        }
    }
    let later = input.u8();

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
    let wake = Wake { queues: true, ..Wake::default() };
    handler.handle(Some(&mut active), &wake);
    // The second round: a client writes more first.
    if !clients.is_empty() {
        let i = usize::from(later) % clients.len();
        let more = vec![later; usize::from(later)];
        if clients[i].write_all(&more).is_ok() {
            wrote[i].extend_from_slice(&more);
        }
    }
    handler.handle(Some(&mut active), &wake);
    // What the clients read.
    let mut read: Vec<Vec<u8>> = vec![Vec::new(); clients.len()];
    for (c, r) in clients.iter_mut().zip(read.iter_mut()) {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = c.read(&mut buf) {
            r.extend_from_slice(&buf[..n]);
        }
    }

    let Some(allowed) = allowed else { return };
    check_writes(&mem, &before, &allowed);
    tx.check_used(&mem, &tx.consumed(2));
    assert!(tx.used(&mem).iter().all(|&(_, len)| len == 0), "transmit chains are used with nothing written");
    let used = rx.used(&mem);
    let consumed = rx.consumed(2);
    assert!(used.len() <= consumed.len(), "more receive chains used than there are");
    rx.check_used(&mem, &consumed[..used.len()]);

    // The guest's packets (when what the device wrote can be read back).
    if !disjoint(&[&rx, &tx]) {
        return;
    }
    let now = snapshot(&mem);
    let mut to_guest: Vec<Vec<u8>> = vec![Vec::new(); clients.len()];
    for (i, &(_, len)) in used.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let bytes = rx.chains[consumed[i]].bytes(&now, true, len as usize).expect("in memory");
        assert!(bytes.len() == len as usize && bytes.len() >= HDR_LEN, "a short packet");
        let h = Hdr::parse(&bytes).unwrap();
        let payload = &bytes[HDR_LEN..];
        assert_eq!((h.src_cid, h.dst_cid, h.kind), (HOST_CID, GUEST_CID, TYPE_STREAM), "{h:?}");
        assert_eq!(h.len as usize, payload.len(), "{h:?}");
        assert!([OP_REQUEST, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE].contains(&h.op), "{h:?}");
        assert!(h.op == OP_RW || payload.is_empty(), "data outside RW: {h:?}");
        assert!(payload.len() <= MAX_PAYLOAD);
        if h.op == OP_RW || h.op == OP_REQUEST {
            assert_eq!(h.dst_port, CONTROL_PORT, "{h:?}");
            let k = h.src_port.wrapping_sub(FIRST_HOST_PORT) as usize;
            assert!(k < clients.len(), "a connection no client made: {h:?}");
            to_guest[k].extend_from_slice(payload);
        }
    }
    for (k, got) in to_guest.iter().enumerate() {
        assert!(wrote[k].starts_with(got), "the guest got other bytes than client {k} wrote");
    }
    // What the clients read: RW payloads to their connections.
    let mut from_guest: Vec<Vec<Vec<u8>>> = vec![Vec::new(); clients.len()];
    for c in tx.consumed(2).into_iter().map(|i| &tx.chains[i]) {
        if let Some((h, payload)) = tx_packet(c, &before) {
            let k = h.dst_port.wrapping_sub(FIRST_HOST_PORT) as usize;
            let addressed = (h.src_cid, h.dst_cid, h.src_port, h.op) == (GUEST_CID, HOST_CID, CONTROL_PORT, OP_RW);
            if addressed && k < clients.len() && h.len as usize == payload.len() {
                from_guest[k].push(payload);
            }
        }
    }
    for (k, r) in read.iter().enumerate() {
        assert!(made_of(r, &from_guest[k]), "client {k} read bytes the guest did not send it");
    }
});
