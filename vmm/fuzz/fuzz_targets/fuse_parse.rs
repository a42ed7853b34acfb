//! Host side: fuzzes the FUSE request parser (`vmm::fs::fuse::parse`) with
//! the bytes a guest's kernel puts on a virtio-fs queue (untrusted). Each
//! input is parsed as it is and with a true length in its header (so that
//! every opcode's arguments are reached). It must never panic, and what it
//! returns must be what the bytes say: the header's fields, a length equal
//! to the request's, names non-empty without NUL and inside the request,
//! write data inside the request, unknown opcodes as `Unknown`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::os::unix::ffi::OsStrExt;
use vmm::fs::fuse::{self, Op, Opcode, ParseError};

/// True if `part` lies within `whole`'s bytes.
fn inside(whole: &[u8], part: &[u8]) -> bool {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fn check(data: &[u8]) {
    let got = fuse::parse(data);
    assert_eq!(got, fuse::parse(data), "parsing is deterministic");
    let field = |at: usize, n: usize| data[at..at + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    let header_ok = data.len() >= fuse::IN_HEADER_LEN && field(0, 4) == data.len() as u64;
    let (h, op) = match got {
        Err(ParseError::BadHeader) => {
            assert!(!header_ok, "a sound header refused");
            return;
        }
        Err(ParseError::BadArgs(h)) => {
            assert!(header_ok);
            assert!(Opcode::from_u32(h.opcode).is_some(), "unknown opcodes are Unknown, not bad arguments");
            (h, None)
        }
        Ok((h, op)) => (h, Some(op)),
    };
    assert!(header_ok, "a header whose length lies was accepted");
    assert_eq!(h.len as usize, data.len());
    assert_eq!(u64::from(h.opcode), field(4, 4));
    assert_eq!(h.unique, field(8, 8));
    assert_eq!(h.nodeid, field(16, 8));
    assert_eq!((u64::from(h.uid), u64::from(h.gid), u64::from(h.pid)), (field(24, 4), field(28, 4), field(32, 4)));
    let Some(op) = op else { return };
    let _ = (op.name(), op.no_reply(), op.changes());
    let args = &data[fuse::IN_HEADER_LEN..];
    let name_ok = |n: &std::ffi::OsStr| {
        let b = n.as_bytes();
        assert!(!b.is_empty() && !b.contains(&0) && inside(args, b), "name {n:?}");
    };
    match &op {
        Op::Unknown(n) => {
            assert_eq!(*n, h.opcode);
            assert!(Opcode::from_u32(*n).is_none(), "a known opcode parsed as Unknown");
        }
        Op::Lookup { name }
        | Op::MkNod { name }
        | Op::MkDir { name, .. }
        | Op::Unlink { name }
        | Op::RmDir { name }
        | Op::Link { name, .. }
        | Op::Create { name, .. } => name_ok(name),
        Op::Symlink { name, target } => {
            name_ok(name);
            name_ok(target);
        }
        Op::Rename { old, new, flags, .. } => {
            name_ok(old);
            name_ok(new);
            if h.opcode == Opcode::Rename as u32 {
                assert_eq!(*flags, 0, "RENAME has no flags");
            }
        }
        Op::Write { data: d, .. } => {
            assert!(inside(args, d));
            assert!(d.len() <= args.len().saturating_sub(40), "write data overlaps fuse_write_in");
        }
        Op::BatchForget(list) => assert!(list.len() * 16 <= args.len().saturating_sub(8)),
        _ => assert!(Opcode::from_u32(h.opcode).is_some()),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= fuse::IN_HEADER_LEN {
        let mut fixed = data.to_vec();
        fixed[0..4].copy_from_slice(&(data.len() as u32).to_le_bytes());
        check(&fixed);
    }
});
