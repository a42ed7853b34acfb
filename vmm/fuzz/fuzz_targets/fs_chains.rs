//! Host side: fuzzes virtio-fs's queues (`vmm::devices::virtio::fs`, the
//! worker's part driven by hand) with a hostile driver's high-priority and
//! request queues: any descriptor tables and available rings, FUSE
//! requests (or anything) in the buffers, over a file server on a small
//! temporary folder. The device must return every chain it can, never
//! claim more bytes than a chain's writable buffers hold nor write
//! outside them; a chain it cannot take (readable after writable buffers,
//! over the size bound, outside memory) comes back with nothing written;
//! what it writes is one FUSE reply whose length field is the used length
//! and whose `unique` is the request's.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::fs::queue_handler;
use vmm::devices::virtio::worker::{Active, QueueHandler, Wake};
use vmm::fs::fuse;
use vmm::fs::policy::FsPolicy;
use vmm::fs::server::{FileServer, MAX_WRITE};
use vmm::fs::share::Share;
use vmm_fuzz::{check_writes, disjoint, fill_data, guest_memory, snapshot, writable_ranges, Input, Ring, Walked};

/// The device's bound on a request and on the room for its reply.
const MAX_REQUEST: u64 = MAX_WRITE as u64 + 4096;
/// Descriptors the device reads of one chain.
const MAX_DESCS: usize = 1024;

/// Whether the device can take `c` (mirrors its rules); and the request.
fn request(c: &Walked, mem: &[u8]) -> Option<Vec<u8>> {
    let descs = &c.descs[..c.descs.len().min(MAX_DESCS)];
    let (mut room, mut request, mut seen_writable) = (0u64, 0u64, false);
    for &(a, l, w) in descs {
        if w {
            room += u64::from(l);
            if room > MAX_REQUEST {
                return None;
            }
            seen_writable = true;
        } else {
            request += u64::from(l);
            // (An empty buffer is never read, wherever it points.)
            let outside = l > 0 && a.checked_add(u64::from(l))? > mem.len() as u64;
            if seen_writable || request > MAX_REQUEST || outside {
                return None;
            }
        }
    }
    Walked { head: c.head, descs: descs.to_vec() }.bytes(mem, false, usize::MAX)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let setup = input.u8();
    let dir = tempfile::tempdir_in(vmm_fuzz::scratch()).unwrap();
    std::fs::write(dir.path().join("f"), "hello").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let share = Share::open(dir.path(), FsPolicy::default(), setup & 1 != 0).unwrap();
    let server = FileServer::new(share, dir.path().to_path_buf(), Box::new(|_| {}));
    let mut handler = queue_handler(server);

    let mem = guest_memory();
    let mut rings = [Ring::new(&mem, 0, &mut input), Ring::new(&mem, 1, &mut input)];
    fill_data(&mem, input.rest());
    rings.iter_mut().for_each(|r| r.walk(&mem));
    let allowed = writable_ranges(&[&rings[0], &rings[1]]);
    let before = snapshot(&mem);

    let mut active = Active { mem: mem.clone(), queues: rings.iter().map(Ring::queue).collect() };
    handler.activated(&mut active);
    let signal = handler.handle(Some(&mut active), &Wake { queues: true, ..Wake::default() });

    let Some(allowed) = allowed else { return };
    check_writes(&mem, &before, &allowed);
    let now = snapshot(&mem);
    let readable_back = disjoint(&[&rings[0], &rings[1]]);
    let mut used_any = false;
    for ring in &rings {
        ring.check_used(&mem, &ring.consumed(1));
        for (i, (_, len)) in ring.used(&mem).into_iter().enumerate() {
            used_any = true;
            let chain = &ring.chains[i];
            let req = request(chain, &before);
            if len == 0 || !readable_back {
                continue;
            }
            let Some(req) = req else { panic!("a chain the device cannot take was answered: {chain:?}") };
            let reply = chain.bytes(&now, true, len as usize).expect("the reply is in memory");
            assert!(reply.len() == len as usize && reply.len() >= fuse::OUT_HEADER_LEN, "reply {reply:?}");
            assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), len, "the reply's length field");
            assert_eq!(reply[8..16], req[8..16], "the reply's unique is the request's");
            let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
            assert!((-4095..=0).contains(&error), "error {error}");
        }
    }
    assert_eq!(signal, used_any, "an interrupt exactly when chains were used");
});
