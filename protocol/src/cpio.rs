//! Host side (built for the guest's boot): a writer for "newc" cpio
//! archives, the initramfs format. Entries are always owned by root, so an
//! image can be built without root rights or device nodes on the host.

use std::io::{self, Write};

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, written: 0, next_ino: 1 }
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let name = name.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}{dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// Appends a second archive holding `job` at [`crate::JOB_PATH`] to an
/// initramfs; the kernel unpacks concatenated archives in order.
pub fn append_job(initrd: &mut Vec<u8>, job: &crate::Job) -> io::Result<()> {
    // Archives are concatenated on 4-byte boundaries.
    while !initrd.len().is_multiple_of(4) {
        initrd.push(0);
    }
    let mut w = CpioWriter::new(Vec::new());
    w.dir("sbx", 0o755)?;
    w.file(crate::JOB_PATH, 0o600, job.encode().as_bytes())?;
    initrd.extend_from_slice(&w.finish()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data) entries.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            let hdr = std::str::from_utf8(&b[..110]).unwrap();
            assert_eq!(&hdr[..6], "070701");
            let field = |i: usize| u32::from_str_radix(&hdr[6 + i * 8..14 + i * 8], 16).unwrap() as usize;
            let (mode, size, namesize) = (field(1) as u32, field(6), field(11));
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            let data_start = (off + 110 + namesize).next_multiple_of(4) - off;
            let data = b[data_start..data_start + size].to_vec();
            let next = (off + data_start + size).next_multiple_of(4) - off;
            if name == "TRAILER!!!" {
                assert_eq!(next, b.len());
                return out;
            }
            out.push((name, mode, data));
            b = &b[next..];
            off += next;
        }
    }

    #[test]
    fn job_archive_follows_the_image() {
        let mut initrd = b"abcde".to_vec();
        let job = crate::Job { argv: vec!["true".into()], ..Default::default() };
        append_job(&mut initrd, &job).unwrap();
        assert_eq!(&initrd[..8], b"abcde\0\0\0");
        let entries = parse(&initrd[8..]);
        assert_eq!(entries[1].0, "sbx/job");
        assert_eq!(crate::Job::decode(std::str::from_utf8(&entries[1].2).unwrap()).unwrap(), job);
    }

    #[test]
    fn archive_round_trips() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/sbx", 0o755).unwrap();
        w.file("sbx/job", 0o600, b"sbx-job 1\narg x\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0], ("sbx".to_string(), S_IFDIR | 0o755, vec![]));
        assert_eq!(entries[1], ("sbx/job".to_string(), S_IFREG | 0o600, b"sbx-job 1\narg x\n".to_vec()));
        assert_eq!(entries[2], ("bin/sh".to_string(), S_IFLNK | 0o777, b"busybox".to_vec()));
        assert_eq!(entries[3].1, S_IFCHR | 0o600);
    }
}
