//! Host side: tar archives for `sbx cp` — a strict, bounded reader for
//! what comes out of the guest (hostile: every field checked, every size
//! capped, every name judged before the host sees it) and the writer for
//! what sbx sends into the guest.
//!
//! Read: ustar and GNU headers with their checksum; regular files and
//! directories; long names as GNU `L` records or PAX `path` (PAX `size`
//! too), each bounded. Everything else is an [`Entry`] with a
//! [`Refusal`]: symbolic and hard links, devices, FIFOs, other types,
//! absolute names, `..`, NUL, names that are not UTF-8, too long or too
//! deep. The data of all entries together is capped ([`Limits`]), and so
//! is the number of entries.

use std::fmt;
use std::io::{self, Read, Write};

use thiserror::Error;

/// A tar block.
pub const BLOCK: usize = 512;
/// Longest name accepted (bytes), as Linux's PATH_MAX.
pub const MAX_PATH: usize = 4096;
/// Longest component of a name (bytes), as Linux's NAME_MAX.
pub const MAX_COMPONENT: usize = 255;
/// Most components in a name.
pub const MAX_DEPTH: usize = 128;
/// Largest PAX extended header (`x` or `g`) read.
pub const MAX_PAX: u64 = 64 * 1024;
/// Most extension headers (PAX, GNU long names) before one entry.
pub const MAX_EXTENSIONS: usize = 8;
/// Default cap on the data of all entries together (`--max-size`).
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;
/// Default cap on the number of entries.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Largest size a ustar octal size field holds (11 digits).
const MAX_OCTAL_SIZE: u64 = 0o77777777777;

/// What an archive may hold in all.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of entry data (files, skipped entries and extension headers).
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_bytes: DEFAULT_MAX_SIZE, max_entries: DEFAULT_MAX_ENTRIES }
    }
}

/// Why an archive cannot be read on: the rest of it is not used.
#[derive(Debug, Error)]
pub enum TarError {
    #[error("The archive ends in the middle of {0} (truncated): the entries before it were kept")]
    Truncated(&'static str),
    #[error("A header's checksum is wrong: this is not a tar archive, or it is corrupted")]
    Checksum,
    #[error("A header's {0} field is not a valid number")]
    BadNumber(&'static str),
    #[error("The archive holds more than {0} bytes: the rest was not copied (--max-size allows more)")]
    TooLarge(u64),
    #[error("The archive holds more than {0} entries: the rest was not copied")]
    TooManyEntries(u64),
    #[error("A {kind} header of {size} bytes is over the limit of {max}")]
    ExtensionTooLarge { kind: &'static str, size: u64, max: u64 },
    #[error("More than {MAX_EXTENSIONS} extension headers in a row")]
    TooManyExtensions,
    #[error("A PAX extended header is malformed")]
    BadPax,
    #[error("Cannot read the archive: {0}")]
    Io(#[from] io::Error),
}

/// Why one entry is skipped (the rest of the archive is read on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Symlink,
    HardLink,
    Device,
    Fifo,
    OtherType(u8),
    Absolute,
    DotDot,
    Nul,
    NotUtf8,
    PathTooLong,
    ComponentTooLong,
    TooDeep,
    Empty,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Symlink => write!(f, "a symbolic link: not copied (copy what it points to by name)"),
            Refusal::HardLink => write!(f, "a hard link: not copied (copy the file it links to by name)"),
            Refusal::Device => write!(f, "a device: not copied"),
            Refusal::Fifo => write!(f, "a FIFO: not copied"),
            Refusal::OtherType(t) => write!(f, "an entry of tar type {:?}: not copied", char::from(*t)),
            Refusal::Absolute => write!(f, "an absolute name: not copied"),
            Refusal::DotDot => write!(f, "a name with '..': not copied"),
            Refusal::Nul => write!(f, "a name with a NUL byte: not copied"),
            Refusal::NotUtf8 => write!(f, "a name that is not UTF-8: not copied"),
            Refusal::PathTooLong => write!(f, "a name longer than {MAX_PATH} bytes: not copied"),
            Refusal::ComponentTooLong => write!(f, "a name with a part longer than {MAX_COMPONENT} bytes: not copied"),
            Refusal::TooDeep => write!(f, "a name more than {MAX_DEPTH} levels deep: not copied"),
            Refusal::Empty => write!(f, "an empty name: not copied"),
        }
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// A regular file: its data follows ([`TarReader::read_data`]).
    File {
        path: Vec<String>,
        size: u64,
        executable: bool,
    },
    Dir {
        path: Vec<String>,
    },
    Refused(Refusal),
}

/// One entry: its name as it came (for messages: escape it) and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub what: What,
}

/// Reads a tar stream entry by entry, bounded by its [`Limits`].
pub struct TarReader<R: Read> {
    inner: R,
    limits: Limits,
    /// Entry data counted so far against `max_bytes`.
    bytes: u64,
    entries: u64,
    /// Data of the current entry not yet read, then its padding.
    remaining: u64,
    padding: u64,
    done: bool,
}

/// The name a header's fields give, with the ustar prefix where it applies.
fn header_name(h: &[u8; BLOCK]) -> Vec<u8> {
    let field = |r: std::ops::Range<usize>| {
        let f = &h[r];
        f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())].to_vec()
    };
    let name = field(0..100);
    // POSIX ustar ("ustar\0", "00") has a prefix field; GNU's ("ustar  \0") does not.
    if &h[257..263] == b"ustar\0" {
        let prefix = field(345..500);
        if !prefix.is_empty() {
            let mut full = prefix;
            full.push(b'/');
            full.extend_from_slice(&name);
            return full;
        }
    }
    name
}

/// A numeric field: octal (spaces or NULs around it) or GNU base-256.
fn number(field: &[u8], what: &'static str) -> Result<u64, TarError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256, big-endian; 0xff first is a negative number.
        if field[0] != 0x80 {
            return Err(TarError::BadNumber(what));
        }
        let mut n: u64 = 0;
        for &b in &field[1..] {
            n = n.checked_mul(256).and_then(|n| n.checked_add(u64::from(b))).ok_or(TarError::BadNumber(what))?;
        }
        return Ok(n);
    }
    let text = field.iter().skip_while(|&&b| b == b' ');
    let mut n: u64 = 0;
    let mut ended = false;
    for &b in text {
        match b {
            b'0'..=b'7' if !ended => {
                n = n
                    .checked_mul(8)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                    .ok_or(TarError::BadNumber(what))?
            }
            0 | b' ' => ended = true,
            _ => return Err(TarError::BadNumber(what)),
        }
    }
    Ok(n)
}

fn checksum_ok(h: &[u8; BLOCK]) -> Result<bool, TarError> {
    let stored = number(&h[148..156], "checksum")?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    Ok(stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed))
}

/// Judges a name: its components, or why it is refused.
pub fn check_name(raw: &[u8]) -> Result<Vec<String>, Refusal> {
    if raw.contains(&0) {
        return Err(Refusal::Nul);
    }
    if raw.len() > MAX_PATH {
        return Err(Refusal::PathTooLong);
    }
    let text = std::str::from_utf8(raw).map_err(|_| Refusal::NotUtf8)?;
    if text.starts_with('/') {
        return Err(Refusal::Absolute);
    }
    let mut parts = Vec::new();
    for c in text.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(Refusal::DotDot);
        }
        if c.len() > MAX_COMPONENT {
            return Err(Refusal::ComponentTooLong);
        }
        parts.push(c.to_string());
    }
    if parts.len() > MAX_DEPTH {
        return Err(Refusal::TooDeep);
    }
    if parts.is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(parts)
}

/// PAX records "LEN key=value\n": the `path` and `size` they set.
fn parse_pax(data: &[u8], path: &mut Option<Vec<u8>>, size: &mut Option<u64>) -> Result<(), TarError> {
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or(TarError::BadPax)?;
        let len: usize =
            std::str::from_utf8(&rest[..space]).ok().and_then(|l| l.parse().ok()).ok_or(TarError::BadPax)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(TarError::BadPax);
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or(TarError::BadPax)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => *path = Some(value.to_vec()),
            b"size" => {
                let v = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).ok_or(TarError::BadPax)?;
                *size = Some(v);
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(())
}

fn padding_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: Limits) -> TarReader<R> {
        TarReader { inner, limits, bytes: 0, entries: 0, remaining: 0, padding: 0, done: false }
    }

    /// Fills `buf` wholly; Ok(false) at a clean end of input before it.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(what)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        Ok(true)
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let take = n.min(buf.len() as u64) as usize;
            if !self.fill(&mut buf[..take], what)? {
                return Err(TarError::Truncated(what));
            }
            n -= take as u64;
        }
        Ok(())
    }

    /// Counts `size` bytes of data against the limit.
    fn count(&mut self, size: u64) -> Result<(), TarError> {
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limits.max_bytes {
            return Err(TarError::TooLarge(self.limits.max_bytes));
        }
        Ok(())
    }

    /// An extension header's data (bounded by `max`), padding consumed.
    fn extension(&mut self, kind: &'static str, size: u64, max: u64) -> Result<Vec<u8>, TarError> {
        if size > max {
            return Err(TarError::ExtensionTooLarge { kind, size, max });
        }
        self.count(size)?;
        let mut data = vec![0u8; size as usize];
        if !self.fill(&mut data, "an extended header")? && size > 0 {
            return Err(TarError::Truncated("an extended header"));
        }
        self.skip(padding_of(size), "an extended header")?;
        Ok(data)
    }

    /// The next entry, None after the end-of-archive marker. The data of
    /// an entry not read is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.remaining + self.padding, "an entry's data")?;
        self.remaining = 0;
        self.padding = 0;
        let (mut pax_path, mut pax_size, mut long_name) = (None, None, None);
        let mut extensions = 0;
        loop {
            let mut h = [0u8; BLOCK];
            if !self.fill(&mut h, "a header")? {
                return Err(TarError::Truncated("the archive: no end-of-archive marker"));
            }
            if h.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            if !checksum_ok(&h)? {
                return Err(TarError::Checksum);
            }
            let header_size = number(&h[124..136], "size")?;
            let kind = h[156];
            if matches!(kind, b'x' | b'g' | b'L' | b'K') {
                extensions += 1;
                if extensions > MAX_EXTENSIONS {
                    return Err(TarError::TooManyExtensions);
                }
            }
            match kind {
                b'x' => {
                    let data = self.extension("PAX", header_size, MAX_PAX)?;
                    parse_pax(&data, &mut pax_path, &mut pax_size)?;
                    continue;
                }
                b'g' => {
                    self.extension("PAX global", header_size, MAX_PAX)?;
                    continue;
                }
                b'L' | b'K' => {
                    let what = if kind == b'L' { "GNU long name" } else { "GNU long link" };
                    let data = self.extension(what, header_size, MAX_PATH as u64 + 1)?;
                    if kind == b'L' {
                        // The name and its NUL terminator; anything after a NUL is refused.
                        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                        long_name = Some(data[..end].to_vec());
                    }
                    continue;
                }
                _ => {}
            }
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(TarError::TooManyEntries(self.limits.max_entries));
            }
            let size = pax_size.unwrap_or(header_size);
            self.count(size)?;
            self.remaining = size;
            self.padding = padding_of(size);
            let name = pax_path.or(long_name).unwrap_or_else(|| header_name(&h));
            let mode = number(&h[100..108], "mode")?;
            let slash = name.ends_with(b"/");
            let what = match kind {
                b'0' | 0 | b'7' if !slash => match check_name(&name) {
                    Ok(path) => What::File { path, size, executable: mode & 0o111 != 0 },
                    Err(r) => What::Refused(r),
                },
                b'5' | 0 => match check_name(&name) {
                    Ok(path) => What::Dir { path },
                    Err(r) => What::Refused(r),
                },
                b'0' | b'7' => What::Refused(Refusal::Empty),
                b'1' => What::Refused(Refusal::HardLink),
                b'2' => What::Refused(Refusal::Symlink),
                b'3' | b'4' => What::Refused(Refusal::Device),
                b'6' => What::Refused(Refusal::Fifo),
                t => What::Refused(Refusal::OtherType(t)),
            };
            if !matches!(what, What::File { .. }) {
                // Only a file's data is for the caller.
                self.skip(self.remaining + self.padding, "an entry's data")?;
                self.remaining = 0;
                self.padding = 0;
            }
            return Ok(Some(Entry { name, what }));
        }
    }

    /// Reads the current file's data; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let take = self.remaining.min(buf.len() as u64) as usize;
        loop {
            match self.inner.read(&mut buf[..take]) {
                Ok(0) => return Err(TarError::Truncated("a file's data")),
                Ok(n) => {
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
    }
}

/// Writes a tar stream (GNU flavour: long names as `L` records, sizes past
/// the octal field in base-256), regular files and directories only, no
/// owners: what the guest's tar unpacks.
pub struct TarWriter<W: Write> {
    out: W,
}

fn octal(field: &mut [u8], n: u64) {
    let digits = field.len() - 1;
    let text = format!("{n:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter { out }
    }

    fn raw_header(&mut self, name: &[u8], kind: u8, size: u64, mode: u32, mtime: u64) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        if size <= MAX_OCTAL_SIZE {
            octal(&mut h[124..136], size);
        } else {
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        octal(&mut h[136..148], mtime.min(MAX_OCTAL_SIZE));
        h[156] = kind;
        h[257..265].copy_from_slice(b"ustar  \0");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        self.out.write_all(&h)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        self.out.write_all(&[0u8; BLOCK][..padding_of(size) as usize])
    }

    fn header(&mut self, name: &[u8], kind: u8, size: u64, mode: u32, mtime: u64) -> io::Result<()> {
        if name.len() > 100 {
            let long = name.len() as u64 + 1;
            self.raw_header(b"././@LongLink", b'L', long, 0o644, 0)?;
            self.out.write_all(name)?;
            self.out.write_all(&[0])?;
            self.pad(long)?;
        }
        self.raw_header(name, kind, size, mode, mtime)
    }

    /// A directory (its name gets a trailing '/').
    pub fn dir(&mut self, name: &[u8], mtime: u64) -> io::Result<()> {
        let mut n = name.to_vec();
        n.push(b'/');
        self.header(&n, b'5', 0, 0o755, mtime)
    }

    /// A regular file of `size` bytes from `data`: cut at `size`, padded
    /// with zeros if `data` ends sooner. Returns whether it ended sooner.
    pub fn file(
        &mut self,
        name: &[u8],
        size: u64,
        executable: bool,
        mtime: u64,
        data: &mut dyn Read,
    ) -> io::Result<bool> {
        self.header(name, b'0', size, if executable { 0o755 } else { 0o644 }, mtime)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        let short = copied < size;
        let mut left = size - copied;
        while left > 0 {
            let n = left.min(BLOCK as u64);
            self.out.write_all(&[0u8; BLOCK][..n as usize])?;
            left -= n;
        }
        self.pad(size)?;
        Ok(short)
    }

    /// The end-of-archive marker; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A header as a hostile guest might write it: any name, type, size.
    pub fn header(name: &[u8], kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], 0o644);
        octal(&mut h[124..136], size.min(MAX_OCTAL_SIZE));
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        seal(&mut h);
        h
    }

    pub fn seal(h: &mut [u8; BLOCK]) {
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        octal(&mut h[148..155], sum);
    }

    /// An archive of (header, data) pairs with the end marker.
    pub fn archive(parts: &[([u8; BLOCK], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (h, data) in parts {
            out.extend_from_slice(h);
            out.extend_from_slice(data);
            out.resize(out.len() + padding_of(data.len() as u64) as usize, 0);
        }
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
        out
    }

    fn entries(bytes: &[u8], limits: Limits) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
        let mut r = TarReader::new(bytes, limits);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            let mut data = Vec::new();
            let mut buf = [0u8; 100];
            loop {
                let n = r.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((e, data));
        }
        Ok(out)
    }

    fn refusal_of(name: &[u8], kind: u8) -> What {
        let a = archive(&[(header(name, kind, 0), b"")]);
        entries(&a, Limits::default()).unwrap().remove(0).0.what
    }

    #[test]
    fn files_and_directories_are_read_with_their_data() {
        let a = archive(&[
            (header(b"./top/", b'5', 0), b""),
            (header(b"./top/a.txt", b'0', 5), b"hello"),
            (header(b"top/sub//b", 0, 600), &[7u8; 600]),
        ]);
        let got = entries(&a, Limits::default()).unwrap();
        assert_eq!(got[0].0.what, What::Dir { path: vec!["top".into()] });
        assert_eq!(got[1].0.what, What::File { path: vec!["top".into(), "a.txt".into()], size: 5, executable: false });
        assert_eq!(got[1].1, b"hello");
        assert_eq!(got[2].1, vec![7u8; 600]);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn links_devices_fifos_and_unknown_types_are_refused() {
        assert_eq!(refusal_of(b"l", b'2'), What::Refused(Refusal::Symlink));
        assert_eq!(refusal_of(b"h", b'1'), What::Refused(Refusal::HardLink));
        assert_eq!(refusal_of(b"c", b'3'), What::Refused(Refusal::Device));
        assert_eq!(refusal_of(b"b", b'4'), What::Refused(Refusal::Device));
        assert_eq!(refusal_of(b"p", b'6'), What::Refused(Refusal::Fifo));
        assert_eq!(refusal_of(b"s", b'S'), What::Refused(Refusal::OtherType(b'S')));
    }

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(refusal_of(b"/etc/passwd", b'0'), What::Refused(Refusal::Absolute));
        assert_eq!(refusal_of(b"a/../../x", b'0'), What::Refused(Refusal::DotDot));
        assert_eq!(refusal_of(b"..", b'5'), What::Refused(Refusal::DotDot));
        assert_eq!(refusal_of(b"a/\xff\xfe", b'0'), What::Refused(Refusal::NotUtf8));
        assert_eq!(refusal_of(b"./", b'5'), What::Refused(Refusal::Empty));
        let long_part = vec![b'a'; MAX_COMPONENT + 1];
        assert_eq!(check_name(&long_part), Err(Refusal::ComponentTooLong));
        assert_eq!(check_name(&b"a/".repeat(MAX_DEPTH + 1)), Err(Refusal::TooDeep));
        assert_eq!(check_name(&vec![b'a'; MAX_PATH + 1]), Err(Refusal::PathTooLong));
        // Through a PAX path: a NUL, and '..'.
        for (path, want) in [(&b"a\0b"[..], Refusal::Nul), (b"../x", Refusal::DotDot)] {
            let mut rec = b" path=".to_vec();
            rec.extend_from_slice(path);
            rec.push(b'\n');
            let len = rec.len() + 2;
            let rec = [len.to_string().into_bytes(), rec].concat();
            let a = archive(&[(header(b"pax", b'x', rec.len() as u64), &rec), (header(b"ok", b'0', 1), b"x")]);
            let got = entries(&a, Limits::default()).unwrap();
            assert_eq!(got[0].0.what, What::Refused(want));
            assert_eq!(got.len(), 1);
        }
    }

    #[test]
    fn a_refused_entrys_data_is_skipped_and_reading_goes_on() {
        let a = archive(&[(header(b"/abs", b'0', 700), &[1u8; 700]), (header(b"next", b'0', 2), b"ok")]);
        let got = entries(&a, Limits::default()).unwrap();
        assert_eq!(got[0].0.what, What::Refused(Refusal::Absolute));
        assert!(got[0].1.is_empty());
        assert_eq!(got[1].1, b"ok");
    }

    #[test]
    fn truncated_archives_are_errors() {
        let a = archive(&[(header(b"f", b'0', 1000), &[1u8; 1000])]);
        for cut in [100, BLOCK, BLOCK + 10, BLOCK + 1024, 3 * BLOCK] {
            let e = entries(&a[..cut], Limits::default()).unwrap_err();
            assert!(matches!(e, TarError::Truncated(_)), "cut at {cut}: {e}");
        }
        // No input at all is no archive either.
        assert!(matches!(entries(b"", Limits::default()), Err(TarError::Truncated(_))));
    }

    #[test]
    fn bad_checksums_and_numbers_are_errors() {
        let mut h = header(b"f", b'0', 0);
        h[0] = b'g';
        assert!(matches!(entries(&archive(&[(h, b"")]), Limits::default()), Err(TarError::Checksum)));
        let mut h = header(b"f", b'0', 0);
        h[124..136].copy_from_slice(b"0000000009x\0");
        seal(&mut h);
        assert!(matches!(entries(&archive(&[(h, b"")]), Limits::default()), Err(TarError::BadNumber("size"))));
        // Negative base-256.
        let mut h = header(b"f", b'0', 0);
        h[124..136].fill(0xff);
        seal(&mut h);
        assert!(matches!(entries(&archive(&[(h, b"")]), Limits::default()), Err(TarError::BadNumber("size"))));
    }

    #[test]
    fn huge_sizes_and_over_limit_totals_stop_before_reading_the_data() {
        // A base-256 size of 2^62 bytes, with no data behind it.
        let mut h = header(b"big", b'0', 0);
        h[124..136].fill(0);
        h[124] = 0x80;
        h[128..136].copy_from_slice(&(1u64 << 62).to_be_bytes());
        seal(&mut h);
        let mut a = h.to_vec();
        a.extend_from_slice(&[0u8; 1024]);
        assert!(matches!(entries(&a, Limits::default()), Err(TarError::TooLarge(DEFAULT_MAX_SIZE))));
        // Small files adding up past the cap: the first ones are read.
        let limits = Limits { max_bytes: 1000, max_entries: 10 };
        let a = archive(&[(header(b"a", b'0', 600), &[0u8; 600]), (header(b"b", b'0', 600), &[0u8; 600])]);
        let mut r = TarReader::new(&a[..], limits);
        assert!(r.next_entry().unwrap().is_some());
        assert!(matches!(r.next_entry(), Err(TarError::TooLarge(1000))));
        // Skipped entries count too.
        let a = archive(&[(header(b"/a", b'0', 600), &[0u8; 600]), (header(b"/b", b'0', 600), &[0u8; 600])]);
        assert!(matches!(entries(&a, limits), Err(TarError::TooLarge(1000))));
        // Entry count.
        let parts: Vec<_> = (0..11).map(|i| (header(format!("f{i}").as_bytes(), b'0', 0), &b""[..])).collect();
        assert!(matches!(entries(&archive(&parts), limits), Err(TarError::TooManyEntries(10))));
    }

    #[test]
    fn extension_headers_are_bounded() {
        let a = archive(&[(header(b"pax", b'x', MAX_PAX + 1), b"")]);
        assert!(matches!(entries(&a, Limits::default()), Err(TarError::ExtensionTooLarge { .. })));
        let a = archive(&[(header(b"././@LongLink", b'L', MAX_PATH as u64 + 2), b"")]);
        assert!(matches!(entries(&a, Limits::default()), Err(TarError::ExtensionTooLarge { .. })));
        let parts: Vec<_> = (0..=MAX_EXTENSIONS).map(|_| (header(b"g", b'g', 0), &b""[..])).collect();
        assert!(matches!(entries(&archive(&parts), Limits::default()), Err(TarError::TooManyExtensions)));
        let a = archive(&[(header(b"pax", b'x', 5), b"99 x\n")]);
        assert!(matches!(entries(&a, Limits::default()), Err(TarError::BadPax)));
    }

    #[test]
    fn the_writer_round_trips_through_the_reader() {
        let long = format!("top/{}/{}", "d".repeat(120), "f".repeat(200));
        let mut w = TarWriter::new(Vec::new());
        w.dir(b"top", 1).unwrap();
        assert!(!w.file(b"top/a", 3, true, 1, &mut &b"abc"[..]).unwrap());
        assert!(w.file(long.as_bytes(), 1000, false, 1, &mut &b"short"[..]).unwrap(), "padded");
        w.file(b"top/empty", 0, false, 1, &mut &b""[..]).unwrap();
        let bytes = w.finish().unwrap();
        let got = entries(&bytes, Limits::default()).unwrap();
        assert_eq!(got[0].0.what, What::Dir { path: vec!["top".into()] });
        assert_eq!(got[1].0.what, What::File { path: vec!["top".into(), "a".into()], size: 3, executable: true });
        assert_eq!(got[1].1, b"abc");
        assert_eq!(got[2].0.name, long.as_bytes());
        let mut want = b"short".to_vec();
        want.resize(1000, 0);
        assert_eq!(got[2].1, want);
        assert_eq!(got[3].1, b"");
        assert_eq!(got.len(), 4);
        // Sizes past the octal field go as base-256.
        let mut w = TarWriter::new(Vec::new());
        w.raw_header(b"big", b'0', 1 << 40, 0o644, 0).unwrap();
        let h: [u8; BLOCK] = w.out[..BLOCK].try_into().unwrap();
        assert!(checksum_ok(&h).unwrap());
        assert_eq!(number(&h[124..136], "size").unwrap(), 1 << 40);
    }
}
