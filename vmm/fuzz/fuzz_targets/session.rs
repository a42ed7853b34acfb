//! Host side: fuzzes the two framings a guest's bytes arrive in on the
//! host: the control channel's session frames (`protocol::session::Reader`,
//! read by `sbx exec`/`sbx run` from guest-init through the vsock relay)
//! and guest-init's console status lines (`protocol::Frame::parse_line`,
//! read by the VMM's console). Never a panic; the stream gives the same
//! frames and error however it is split into reads; every frame read
//! encodes back to exactly the bytes it came from (the format has one
//! spelling); no frame is over the bounds; a status line parsed encodes
//! back to a line that parses to the same frame.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::session::{Error, Frame, Reader, MAX_FRAME};

/// The frames read from `stream` fed in pieces of the given sizes (the
/// last repeated), then the error that ended it, if any.
fn read_all(stream: &[u8], sizes: &[usize]) -> (Vec<Frame>, Option<Error>) {
    let mut r = Reader::default();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    loop {
        let n = sizes.get(i).or(sizes.last()).copied().unwrap_or(rest.len()).max(1).min(rest.len());
        i += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        r.feed(piece);
        loop {
            match r.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        if rest.is_empty() {
            return (frames, None);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let (frames, error) = read_all(stream, &[stream.len()]);
    // The same stream a byte at a time, and in the pieces the first byte
    // says (1 to 16 bytes, cycling).
    let pieces: Vec<usize> = (0..stream.len()).map(|i| (usize::from(split) + i * 7) % 16 + 1).collect();
    for sizes in [&[1][..], &pieces[..]] {
        assert_eq!(read_all(stream, sizes), (frames.clone(), error.clone()), "split into {sizes:?}");
    }
    let mut encoded = Vec::new();
    for f in &frames {
        let bytes = f.encode();
        assert!(bytes.len() <= 4 + MAX_FRAME, "a frame over the bound");
        encoded.extend_from_slice(&bytes);
    }
    assert!(stream.starts_with(&encoded), "frames re-encode to the bytes they came from");
    if error.is_none() {
        // What is left is an incomplete frame: fewer bytes than its length.
        let rest = &stream[encoded.len()..];
        if rest.len() >= 4 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            assert!(len > 0 && len <= MAX_FRAME && rest.len() < 4 + len, "a whole frame was left unread");
        }
    }

    // Console status lines: the text before a newline, if it is text.
    let line = stream.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(line) = std::str::from_utf8(line) {
        if let Some(frame) = protocol::Frame::parse_line(line) {
            let again = frame.to_line();
            if again.len() <= protocol::MAX_FRAME_LINE {
                assert_eq!(protocol::Frame::parse_line(&again), Some(frame), "{again:?}");
            }
        }
    }
});
