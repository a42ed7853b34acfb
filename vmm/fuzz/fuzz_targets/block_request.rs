//! Host side: fuzzes virtio-blk requests (`vmm::devices::virtio::block`)
//! from a guest (untrusted): the request header (type, sector), the data
//! buffers' number, sizes and directions, the status buffer, on a disk
//! that is writable or read-only. Each request is a well-laid chain in
//! guest memory, sent one at a time on the device's queue; a model of the
//! disk says what each must do: the status byte and used length, the
//! bytes read into the guest, the disk afterwards (a failed write changes
//! at most what the device wrote before the failure, a read-only disk
//! nothing, the disk's size never).
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::{queue_handler, MAX_REQUEST_BYTES, SECTOR_SIZE};
use vmm::devices::virtio::worker::{Active, QueueHandler, Wake};
use vmm::devices::virtio::Interrupt;
use vmm_fuzz::{guest_memory, snapshot, CountingInterrupt, Input, Ring, DATA, F_NEXT, F_WRITE, MEM_SIZE};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The device copies through a buffer of this size.
const CHUNK: u64 = 64 * 1024;
/// What GET_ID answers (the device keeps 20 bytes of it).
const ID: &str = "sbx-fuzz-disk-serial-0123";
/// What the status byte holds before the device writes it.
const UNSET: u8 = 0xee;

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

impl Desc {
    fn in_memory(&self) -> bool {
        self.addr + u64::from(self.len) <= MEM_SIZE
    }
}

/// What the model says a request does (besides the bytes it writes).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The status byte written, if any.
    status: Option<u8>,
    used_len: u32,
}

fn sizes(v: u8) -> u32 {
    match v % 12 {
        0 => 0,
        1..=4 => u32::from(v % 12) * SECTOR_SIZE as u32,
        5 => 8 * SECTOR_SIZE as u32,
        6 => CHUNK as u32 + SECTOR_SIZE as u32,
        7 => 100,
        8 => MAX_REQUEST_BYTES as u32 + SECTOR_SIZE as u32,
        9 => u32::MAX,
        10 => 20,
        _ => 1,
    }
}

/// The model of one request on `disk`: its outcome, and what it did to
/// the disk (in place) and to guest memory (`mem`, in place).
fn model(descs: &[Desc], disk: &mut [u8], read_only: bool, mem: &mut [u8]) -> Outcome {
    // virtio-queue ends a chain before the descriptor that takes it past
    // 4 GiB (drivers must not make longer ones).
    let mut total = 0u32;
    let n = descs.iter().take_while(|d| total.checked_add(d.len).map(|t| total = t).is_some()).count();
    let descs = &descs[..n];
    let Some(&status) = descs.last().filter(|d| descs.len() >= 2 && d.write && d.len >= 1) else {
        return Outcome { status: None, used_len: 0 };
    };
    let result = serve(descs, disk, read_only, mem);
    if status.addr >= MEM_SIZE {
        // Done, but with nowhere to say so.
        return Outcome { status: None, used_len: 0 };
    }
    let (code, used_len) = match result {
        Ok(written) => (S_OK, written + 1),
        Err(code) => (code, 1),
    };
    mem[status.addr as usize] = code;
    Outcome { status: Some(code), used_len }
}

/// What the request does before its status: Ok(bytes written into the
/// guest) or Err(status).
fn serve(descs: &[Desc], disk: &mut [u8], read_only: bool, mem: &mut [u8]) -> Result<u32, u8> {
    let hdr = descs[0];
    if hdr.write || hdr.len < 16 || hdr.addr + 16 > MEM_SIZE {
        return Err(S_IOERR);
    }
    let h = &mem[hdr.addr as usize..hdr.addr as usize + 16];
    let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let data = &descs[1..descs.len() - 1];
    match kind {
        T_IN | T_OUT => {
            let to_guest = kind == T_IN;
            if !to_guest && read_only {
                return Err(S_IOERR);
            }
            if data.iter().any(|d| d.write != to_guest) {
                return Err(S_IOERR);
            }
            let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
            if total == 0 || total > MAX_REQUEST_BYTES || !total.is_multiple_of(SECTOR_SIZE) {
                return Err(S_IOERR);
            }
            let end = sector.checked_mul(SECTOR_SIZE).and_then(|s| s.checked_add(total)).ok_or(S_IOERR)?;
            if end > disk.len() as u64 {
                return Err(S_IOERR);
            }
            let mut offset = (sector * SECTOR_SIZE) as usize;
            for d in data {
                let mut done = 0u64;
                while done < u64::from(d.len) {
                    let n = (u64::from(d.len) - done).min(CHUNK);
                    let at = d.addr + done;
                    let (m, k) = (at as usize, n as usize);
                    if at + n > MEM_SIZE {
                        // vm-memory writes what is in memory, then fails.
                        if to_guest && at < MEM_SIZE {
                            let inside = (MEM_SIZE - at) as usize;
                            mem[m..m + inside].copy_from_slice(&disk[offset..offset + inside]);
                        }
                        return Err(S_IOERR);
                    }
                    if to_guest {
                        mem[m..m + k].copy_from_slice(&disk[offset..offset + k]);
                    } else {
                        disk[offset..offset + k].copy_from_slice(&mem[m..m + k]);
                    }
                    done += n;
                    offset += k;
                }
            }
            Ok(if to_guest { total as u32 } else { 0 })
        }
        T_FLUSH => Ok(0),
        T_GET_ID => {
            let &[d] = data else { return Err(S_IOERR) };
            let n = (d.len as usize).min(20);
            if !d.write {
                return Err(S_IOERR);
            }
            let a = d.addr as usize;
            if n > 0 && d.addr + n as u64 > MEM_SIZE {
                if d.addr < MEM_SIZE {
                    let inside = (MEM_SIZE - d.addr) as usize;
                    mem[a..].copy_from_slice(&ID.as_bytes()[..inside]);
                }
                return Err(S_IOERR);
            }
            mem[a..a + n].copy_from_slice(&ID.as_bytes()[..n]);
            Ok(n as u32)
        }
        _ => Err(S_UNSUPP),
    }
}

/// The disk's first bytes (made once: the harness's own loops cost
/// the fuzzer's time too).
fn pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| (0..257 * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE * 31 + i % 251) as u8).collect())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let setup = input.u8();
    let read_only = setup & 1 != 0;
    let sectors = [1u64, 2, 8, 64, 257][usize::from(setup >> 1) % 5];
    let mut disk = pattern()[..(sectors * SECTOR_SIZE) as usize].to_vec();
    let file = tempfile::NamedTempFile::new_in(vmm_fuzz::scratch()).unwrap();
    std::fs::write(file.path(), &disk).unwrap();
    let mut block = queue_handler(file.path(), read_only, ID).unwrap();
    assert_eq!(block.sectors(), sectors);

    let mem = guest_memory();
    let mut ring = Ring::empty(0);
    let irq = Arc::new(CountingInterrupt::default());
    let mut active = Active { mem: mem.clone(), queues: vec![ring.queue()] };

    for n in 0..8u16 {
        if input.is_empty() {
            break;
        }
        // The chain: header, up to three data buffers, status (or not).
        // shape: bits 0-2 header length, 3 header writable, 4-5 data
        // buffers, 6 no status buffer, 7 a readable one.
        let (shape, status_len) = (input.u8(), input.u8());
        let kind = match input.u8() {
            k @ 0..=39 => [T_IN, T_OUT, T_FLUSH, T_GET_ID][usize::from(k % 4)],
            k @ 40..=47 => u32::from(k - 38),
            _ => input.u32(),
        };
        let sector = match input.u8() {
            s @ 0..=0xef => u64::from(s) % (sectors + 2),
            s @ 0xf0..=0xf7 => u64::MAX / SECTOR_SIZE - u64::from(s & 7),
            _ => input.u64(),
        };
        let data_write = kind != T_OUT;
        let mut descs =
            vec![Desc { addr: 0, len: [16, 16, 16, 16, 16, 8, 17, 0][usize::from(shape & 7)], write: shape & 8 != 0 }];
        for _ in 0..(shape >> 4) % 4 {
            let (l, flip) = (input.u8(), input.u8());
            descs.push(Desc { addr: 0, len: sizes(l), write: data_write != (flip == 0xff) });
        }
        if shape & 0x40 == 0 {
            descs.push(Desc { addr: 0, len: [1, 1, 1, 2, 0][usize::from(status_len % 5)], write: shape & 0x80 == 0 });
        }
        // Laid out one after another from DATA: what does not fit in
        // guest memory is outside it.
        let mut at = DATA;
        for d in descs.iter_mut() {
            d.addr = at;
            at = at.saturating_add(u64::from(d.len).max(1).next_multiple_of(16));
        }
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h[..16.min(descs[0].len as usize)], GuestAddress(DATA)).unwrap();
        for d in &descs[1..] {
            if d.in_memory() {
                let from = usize::from(input.u8());
                mem.write_slice(&pattern()[from..from + d.len as usize], GuestAddress(d.addr)).unwrap();
            }
        }
        if let Some(s) = descs.last().filter(|d| d.addr < MEM_SIZE) {
            mem.write_obj(UNSET, GuestAddress(s.addr)).unwrap();
        }
        for (i, d) in descs.iter().enumerate() {
            let next = i + 1 < descs.len();
            let flags = if next { F_NEXT } else { 0 } | if d.write { F_WRITE } else { 0 };
            ring.set_desc(&mem, i as u16, d.addr, d.len, flags, i as u16 + 1);
        }
        ring.set_avail(&mem, n, 0);
        ring.set_avail_idx(&mem, n + 1);

        let mut want_mem = snapshot(&mem);
        let want = model(&descs, &mut disk, read_only, &mut want_mem);
        notify(&mut block, &mut active, &irq);

        let used = ring.used_addr();
        let what = format!("{descs:?} kind {kind} sector {sector}: want {want:?}");
        assert_eq!(ring.used_idx(&mem), n + 1, "the request was returned: {what}");
        let len: u32 = mem.read_obj(GuestAddress(used + 4 + 8 * u64::from(n % 16) + 4)).unwrap();
        assert_eq!(len, want.used_len, "used length: {what}");
        assert_eq!(irq.count(), usize::from(n) + 1, "one interrupt per request");
        // Guest memory as the model has it, but for the used ring.
        let now = snapshot(&mem);
        let (u, e) = (used as usize, (used + 4 + 8 * 16 + 2) as usize);
        if want_mem[..u] != now[..u] || want_mem[e..] != now[e..] {
            let i = (0..now.len()).find(|&i| (i < u || i >= e) && want_mem[i] != now[i]).unwrap_or(0);
            panic!("guest byte {i:#x} is {:#x}, not {:#x}: {what}", now[i], want_mem[i]);
        }
        assert!(std::fs::read(file.path()).unwrap() == disk, "the disk: {what}");
    }
    assert!(block.refusals.len() <= 8);
});

/// What the disk's worker does on a notification: one round, and the
/// interrupt if the handler asks for one.
fn notify(block: &mut impl QueueHandler, active: &mut Active, irq: &CountingInterrupt) {
    if block.handle(Some(active), &Wake { queues: true, ..Wake::default() }) {
        irq.signal_used_queue();
    }
}
