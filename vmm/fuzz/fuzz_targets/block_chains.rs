//! Host side: fuzzes virtio-blk (`vmm::devices::virtio::block`) with a
//! hostile driver's queue: any descriptor table (loops, chains leaving the
//! table, indirect tables, buffers outside guest memory or over the rings),
//! any available ring (heads out of range, an index claiming more than
//! the ring holds), any bytes in the buffers. The device must return every
//! chain it can, never claim more written bytes than a chain's writable
//! buffers hold, never write guest memory outside them, never change the
//! disk's size, nor a read-only disk at all.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::{queue_handler, SECTOR_SIZE};
use vmm::devices::virtio::worker::{Active, QueueHandler, Wake};
use vmm::devices::virtio::Interrupt;
use vmm_fuzz::{check_writes, fill_data, guest_memory, snapshot, writable_ranges, CountingInterrupt, Input, Ring};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let setup = input.u8();
    let read_only = setup & 1 != 0;
    let disk: Vec<u8> = (0..8 * SECTOR_SIZE).map(|i| (i % 253) as u8).collect();
    let file = tempfile::NamedTempFile::new_in(vmm_fuzz::scratch()).unwrap();
    std::fs::write(file.path(), &disk).unwrap();
    let mut block = queue_handler(file.path(), read_only, "sbx-fuzz").unwrap();

    let mem = guest_memory();
    let mut ring = Ring::new(&mem, 0, &mut input);
    fill_data(&mem, input.rest());
    ring.walk(&mem);
    let allowed = writable_ranges(&[&ring]);
    let before = snapshot(&mem);

    let irq = Arc::new(CountingInterrupt::default());
    let mut active = Active { mem: mem.clone(), queues: vec![ring.queue()] };
    notify(&mut block, &mut active, &irq);
    if ring.returnable() == ring.chains.len() {
        // Nothing new: a second notification changes nothing. (After a
        // head out of range the device stops, and goes on at the next.)
        let after_first = snapshot(&mem);
        notify(&mut block, &mut active, &irq);
        assert!(snapshot(&mem) == after_first, "a notification with nothing new wrote guest memory");
    }

    if let Some(allowed) = allowed {
        ring.check_used(&mem, &ring.consumed(1));
        check_writes(&mem, &before, &allowed);
    }
    assert!(irq.count() <= 1, "at most one interrupt a round");
    let now = std::fs::read(file.path()).unwrap();
    assert_eq!(now.len(), disk.len(), "the disk's size");
    if read_only {
        assert!(now == disk, "a read-only disk changed");
    }
    assert!(block.refusals.len() <= 16);
});

/// What the disk's worker does on a notification: one round, and the
/// interrupt if the handler asks for one.
fn notify(block: &mut impl QueueHandler, active: &mut Active, irq: &CountingInterrupt) {
    if block.handle(Some(active), &Wake { queues: true, ..Wake::default() }) {
        irq.signal_used_queue();
    }
}
