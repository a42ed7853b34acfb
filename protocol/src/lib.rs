//! Formats shared by the host (VMM) and the guest (guest-init): the job the
//! VMM hands to PID 1 and the status frames PID 1 writes back. Both sides of
//! the trust boundary parse them, so decoding is strict and bounded.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::Ipv4Addr;

/// Where the VMM places the job in the guest's initramfs.
pub const JOB_PATH: &str = "/sbx/job";

/// glibc tunables that keep AVX off, for every guest program on kvm_pvm
/// (no XSAVE in emulated kernel mode, yet user mode runs AVX). Without
/// them, a guest kernel that cannot save AVX state lets threads or
/// processes that copy memory through YMM registers lose the registers'
/// upper halves at context switches: 16-byte holes in copied data. Our
/// kernel saves it since kernel-config patch 0005 (XSAVE through a
/// user-mode trampoline); the tunables stay for kernels without it on
/// hosts whose user-mode CPUID says OSXSAVE regardless of the guest
/// (PLATFORM.md's AMD host), where glibc would otherwise pick AVX.
pub const NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,\
-AVX512CD,-AVX_VNNI,-FMA,-FMA4,-F16C,-AVX_Fast_Unaligned_Load";

/// Serial numbers (virtio-blk GET_ID) by which guest-init finds the disks:
/// the image's read-only base and the sandbox's own writable disk.
pub const BASE_DISK_SERIAL: &str = "sbx-base";
pub const DATA_DISK_SERIAL: &str = "sbx-data";

/// First line of an encoded job; bump the number on incompatible changes.
const JOB_MAGIC: &str = "sbx-job 1";

/// Upper bounds on what a job may hold (checked when decoding).
pub const MAX_JOB_BYTES: usize = 1 << 20;
pub const MAX_ARGS: usize = 4096;
pub const MAX_ENV: usize = 4096;

/// What guest-init is asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Program and arguments; empty means the image's default shell.
    pub argv: Vec<String>,
    /// Extra environment for the program.
    pub env: Vec<(String, String)>,
    /// Working directory of the program.
    pub cwd: String,
    /// The guest's hostname.
    pub hostname: String,
    /// A terminal is attached on the host: give the program a cooked,
    /// echoing terminal. Otherwise output is passed through untouched.
    pub interactive: bool,
    /// Terminal size to set on the guest console.
    pub rows: u16,
    pub cols: u16,
    /// The guest kernel runs emulated (kvm_pvm): guest programs must keep
    /// AVX off (the kernel cannot save its state there).
    pub emulated_cpu: bool,
    /// The root filesystem is the image's base disk under the sandbox's
    /// own disk (overlayfs), not the initramfs.
    pub overlay_root: bool,
    /// The guest's network (its NIC is netstack's), if it has one.
    pub net: Option<NetConfig>,
    /// Host folders shared with the guest (virtio-fs), each mounted at
    /// its host path.
    pub shares: Vec<Share>,
    /// The program arrives over the control channel as the main session
    /// (its own terminal or pipes) instead of running from `argv` on the
    /// serial port.
    pub main_session: bool,
    /// The installation's CA certificate (PEM), which netstack terminates
    /// TLS with: guest-init puts it in the guest's trust store and points
    /// programs at it. Public; its key never leaves the host.
    pub ca_cert: Option<String>,
}

/// Largest CA certificate a job may carry, in bytes.
pub const MAX_CA_CERT: usize = 16 * 1024;
const PEM_CERT_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

/// A CA certificate as a job may carry it: one PEM certificate, ASCII,
/// bounded.
fn valid_ca_cert(pem: &str) -> bool {
    let t = pem.trim();
    pem.len() <= MAX_CA_CERT
        && t.starts_with(PEM_CERT_BEGIN)
        && t.ends_with("-----END CERTIFICATE-----")
        && t.matches(PEM_CERT_BEGIN).count() == 1
        && pem.bytes().all(|b| b.is_ascii_graphic() || b == b'\n' || b == b'\r' || b == b' ')
}

/// A shared folder: the virtio-fs tag to mount, where, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    /// Absolute path in the guest (the same as on the host).
    pub path: String,
    pub read_only: bool,
}

/// Most shared folders a job may name.
pub const MAX_SHARES: usize = 16;

impl Share {
    fn encode(&self) -> String {
        format!("{},{},{}", self.tag, if self.read_only { "ro" } else { "rw" }, self.path)
    }

    fn decode(s: &str) -> Option<Share> {
        let mut parts = s.splitn(3, ',');
        let tag = parts.next().filter(|t| !t.is_empty() && t.len() <= 36)?;
        let read_only = match parts.next()? {
            "ro" => true,
            "rw" => false,
            _ => return None,
        };
        let path = parts.next().filter(|p| p.starts_with('/') && !p.split('/').any(|c| c == ".." || c == "."))?;
        Some(Share { tag: tag.into(), path: path.into(), read_only })
    }
}

/// How guest-init configures the guest's NIC: a static address, the
/// default route and the DNS server, all netstack's (no DHCP round-trips).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
}

impl NetConfig {
    fn encode(&self) -> String {
        format!("{}/{},{},{}", self.addr, self.prefix_len, self.gateway, self.dns)
    }

    fn decode(s: &str) -> Option<NetConfig> {
        let mut parts = s.split(',');
        let (addr, prefix) = parts.next()?.split_once('/')?;
        let prefix_len: u8 = prefix.parse().ok().filter(|p| (1..=30).contains(p))?;
        let config = NetConfig {
            addr: addr.parse().ok()?,
            prefix_len,
            gateway: parts.next()?.parse().ok()?,
            dns: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(config)
    }

    /// The netmask for `prefix_len`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len.min(32))))
    }
}

impl Default for Job {
    fn default() -> Self {
        Job {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            hostname: "sbx".into(),
            interactive: false,
            rows: 24,
            cols: 80,
            emulated_cpu: false,
            overlay_root: false,
            net: None,
            shares: Vec::new(),
            main_session: false,
            ca_cert: None,
        }
    }
}

/// Why a job could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge(usize),
    BadMagic,
    BadLine(usize),
    BadEscape(usize),
    BadNumber(usize),
    TooMany(&'static str),
    UnknownKey(usize, String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge(n) => write!(f, "Job is {n} bytes, over {MAX_JOB_BYTES}"),
            DecodeError::BadMagic => write!(f, "Job does not start with '{JOB_MAGIC}'"),
            DecodeError::BadLine(l) => write!(f, "Job line {l} is not 'key value'"),
            DecodeError::BadEscape(l) => write!(f, "Job line {l} has a bad %-escape"),
            DecodeError::BadNumber(l) => write!(f, "Job line {l} has a bad number"),
            DecodeError::TooMany(what) => write!(f, "Job has too many {what}"),
            DecodeError::UnknownKey(l, k) => write!(f, "Job line {l} has unknown key '{k}'"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Percent-encodes everything but printable ASCII other than '%' and ' '.
fn escape(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn unescape(s: &str, line: usize) -> Result<String, DecodeError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(DecodeError::BadEscape(line))?;
            let hex = std::str::from_utf8(hex).map_err(|_| DecodeError::BadEscape(line))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| DecodeError::BadEscape(line))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::BadEscape(line))
}

impl Job {
    /// Encodes the job as the text file guest-init reads.
    pub fn encode(&self) -> String {
        let mut out = String::from(JOB_MAGIC);
        out.push('\n');
        let mut field = |key: &str, value: &str| {
            out.push_str(key);
            out.push(' ');
            escape(value, &mut out);
            out.push('\n');
        };
        field("cwd", &self.cwd);
        field("hostname", &self.hostname);
        field("interactive", if self.interactive { "1" } else { "0" });
        field("rows", &self.rows.to_string());
        field("cols", &self.cols.to_string());
        field("emulated_cpu", if self.emulated_cpu { "1" } else { "0" });
        field("overlay_root", if self.overlay_root { "1" } else { "0" });
        field("main_session", if self.main_session { "1" } else { "0" });
        if let Some(net) = &self.net {
            field("net", &net.encode());
        }
        if let Some(ca) = &self.ca_cert {
            field("ca", ca);
        }
        for share in &self.shares {
            field("share", &share.encode());
        }
        for (k, v) in &self.env {
            field("env", &format!("{k}={v}"));
        }
        for a in &self.argv {
            field("arg", a);
        }
        out
    }

    /// Decodes a job, refusing anything malformed or over the bounds.
    pub fn decode(text: &str) -> Result<Job, DecodeError> {
        if text.len() > MAX_JOB_BYTES {
            return Err(DecodeError::TooLarge(text.len()));
        }
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, JOB_MAGIC)) => {}
            _ => return Err(DecodeError::BadMagic),
        }
        let mut job = Job::default();
        for (idx, line) in lines {
            let n = idx + 1;
            let (key, raw) = line.split_once(' ').ok_or(DecodeError::BadLine(n))?;
            let value = unescape(raw, n)?;
            let flag = |v: &str| match v {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(DecodeError::BadNumber(n)),
            };
            match key {
                "cwd" => job.cwd = value,
                "hostname" => job.hostname = value,
                "interactive" => job.interactive = flag(&value)?,
                "emulated_cpu" => job.emulated_cpu = flag(&value)?,
                "overlay_root" => job.overlay_root = flag(&value)?,
                "main_session" => job.main_session = flag(&value)?,
                "net" => job.net = Some(NetConfig::decode(&value).ok_or(DecodeError::BadNumber(n))?),
                "ca" if valid_ca_cert(&value) => job.ca_cert = Some(value),
                "ca" => return Err(DecodeError::BadLine(n)),
                "share" => {
                    if job.shares.len() >= MAX_SHARES {
                        return Err(DecodeError::TooMany("shared folders"));
                    }
                    job.shares.push(Share::decode(&value).ok_or(DecodeError::BadLine(n))?);
                }
                "rows" => job.rows = value.parse().map_err(|_| DecodeError::BadNumber(n))?,
                "cols" => job.cols = value.parse().map_err(|_| DecodeError::BadNumber(n))?,
                "env" => {
                    if job.env.len() >= MAX_ENV {
                        return Err(DecodeError::TooMany("env entries"));
                    }
                    let (k, v) = value.split_once('=').ok_or(DecodeError::BadLine(n))?;
                    if k.is_empty() {
                        return Err(DecodeError::BadLine(n));
                    }
                    job.env.push((k.to_string(), v.to_string()));
                }
                "arg" => {
                    if job.argv.len() >= MAX_ARGS {
                        return Err(DecodeError::TooMany("arguments"));
                    }
                    job.argv.push(value);
                }
                other => return Err(DecodeError::UnknownKey(n, other.to_string())),
            }
        }
        Ok(job)
    }
}

/// A status frame: one line that guest-init writes to the kernel console
/// (never to the program's terminal), so it cannot be confused with the
/// program's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// PID 1 is running (the boot timer's end point).
    Init,
    /// The program is about to be started.
    Started,
    /// The program exited with this status.
    Exit(i32),
    /// The program was killed by this signal.
    Signal(i32),
    /// guest-init could not do its job; the text says why.
    Error(String),
}

const FRAME_START: &str = "@@sbx:";
const FRAME_END: &str = "@@";
/// Longest frame line accepted.
pub const MAX_FRAME_LINE: usize = 512;

impl Frame {
    /// The line (without newline) that carries this frame.
    pub fn to_line(&self) -> String {
        let body = match self {
            Frame::Init => "init".to_string(),
            Frame::Started => "started".to_string(),
            Frame::Exit(c) => format!("exit {c}"),
            Frame::Signal(s) => format!("signal {s}"),
            Frame::Error(msg) => {
                let mut e = String::new();
                escape(msg, &mut e);
                format!("error {e}")
            }
        };
        format!("{FRAME_START}{body}{FRAME_END}")
    }

    /// Parses one console line; `None` if it is not a well-formed frame.
    /// Kernel timestamps or other text before the frame are tolerated.
    pub fn parse_line(line: &str) -> Option<Frame> {
        if line.len() > MAX_FRAME_LINE {
            return None;
        }
        let start = line.find(FRAME_START)? + FRAME_START.len();
        let rest = &line[start..];
        let body = rest.strip_suffix(FRAME_END).or_else(|| rest.trim_end().strip_suffix(FRAME_END))?;
        let (kind, arg) = match body.split_once(' ') {
            Some((k, a)) => (k, Some(a)),
            None => (body, None),
        };
        match (kind, arg) {
            ("init", None) => Some(Frame::Init),
            ("started", None) => Some(Frame::Started),
            ("exit", Some(a)) => a.parse().ok().map(Frame::Exit),
            ("signal", Some(a)) => a.parse().ok().map(Frame::Signal),
            ("error", Some(a)) => unescape(a, 0).ok().map(Frame::Error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trips_awkward_strings() {
        let job = Job {
            argv: vec!["sh".into(), "-c".into(), "echo 'a b'%\n\t$(x) é".into(), String::new()],
            env: vec![("A".into(), "x=y z".into())],
            cwd: "/home/u/my project".into(),
            hostname: "h".into(),
            interactive: true,
            rows: 50,
            cols: 132,
            emulated_cpu: true,
            overlay_root: true,
            main_session: true,
            ca_cert: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
            net: Some(NetConfig {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                dns: Ipv4Addr::new(10, 0, 2, 3),
            }),
            shares: vec![
                Share { tag: "sbx0".into(), path: "/home/u/my project".into(), read_only: false },
                Share { tag: "sbx1".into(), path: "/opt/a,b".into(), read_only: true },
            ],
        };
        let text = job.encode();
        assert_eq!(text.lines().count(), 1 + 10 + 2 + 1 + 4);
        assert_eq!(job.net.unwrap().netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(Job::decode(&text).unwrap(), job);
    }

    #[test]
    fn job_decode_refuses_malformed_input() {
        assert_eq!(Job::decode("nope\n"), Err(DecodeError::BadMagic));
        for bad in ["sbx0,rw,relative", "sbx0,xx,/a", ",rw,/a", "sbx0,rw,/a/../etc", "sbx0,rw"] {
            let text = format!("{JOB_MAGIC}\nshare {bad}\n");
            assert_eq!(Job::decode(&text), Err(DecodeError::BadLine(2)), "{bad}");
        }
        assert_eq!(Job::decode(""), Err(DecodeError::BadMagic));
        assert_eq!(Job::decode("sbx-job 1\nargnospace\n"), Err(DecodeError::BadLine(2)));
        assert_eq!(Job::decode("sbx-job 1\narg %G1\n"), Err(DecodeError::BadEscape(2)));
        assert_eq!(Job::decode("sbx-job 1\narg %4\n"), Err(DecodeError::BadEscape(2)));
        assert_eq!(Job::decode("sbx-job 1\nrows 70000\n"), Err(DecodeError::BadNumber(2)));
        assert_eq!(Job::decode("sbx-job 1\ninteractive 2\n"), Err(DecodeError::BadNumber(2)));
        for bad in [
            "10.0.2.15/24,10.0.2.2",
            "10.0.2.15/0,1.1.1.1,1.1.1.1",
            "10.0.2.15/24,x,1.1.1.1",
            "a,b,c,d,e",
            "10.0.2.15/24,1.1.1.1,1.1.1.1,9",
        ] {
            assert_eq!(Job::decode(&format!("sbx-job 1\nnet {bad}\n")), Err(DecodeError::BadNumber(2)), "{bad}");
        }
        assert_eq!(Job::decode("sbx-job 1\nenv =x\n"), Err(DecodeError::BadLine(2)));
        for bad in
            ["junk", "-----BEGIN CERTIFICATE-----\nx", "-----BEGIN CERTIFICATE-----\n\x01\n-----END CERTIFICATE-----"]
        {
            let mut text = String::from("sbx-job 1\nca ");
            escape(bad, &mut text);
            assert_eq!(Job::decode(&text), Err(DecodeError::BadLine(2)), "{bad:?}");
        }
        let two = "-----BEGIN CERTIFICATE-----\na\n-----END CERTIFICATE-----\n".repeat(2);
        let mut text = String::from("sbx-job 1\nca ");
        escape(&two, &mut text);
        assert_eq!(Job::decode(&text), Err(DecodeError::BadLine(2)), "one certificate");
        assert!(matches!(Job::decode("sbx-job 1\nfoo 1\n"), Err(DecodeError::UnknownKey(2, _))));
        let big = format!("sbx-job 1\n{}", "arg x\n".repeat(MAX_ARGS + 1));
        assert_eq!(Job::decode(&big), Err(DecodeError::TooMany("arguments")));
        let huge = "x".repeat(MAX_JOB_BYTES + 1);
        assert_eq!(Job::decode(&huge), Err(DecodeError::TooLarge(MAX_JOB_BYTES + 1)));
    }

    #[test]
    fn frames_round_trip_and_tolerate_prefixes() {
        for f in [
            Frame::Init,
            Frame::Started,
            Frame::Exit(7),
            Frame::Exit(-1),
            Frame::Signal(9),
            Frame::Error("cannot exec 'x': No such file\n".into()),
        ] {
            assert_eq!(Frame::parse_line(&f.to_line()), Some(f.clone()));
            let with_prefix = format!("[    1.234567] {}\r", f.to_line());
            assert_eq!(Frame::parse_line(&with_prefix), Some(f));
        }
    }

    #[test]
    fn frames_reject_lookalikes() {
        for line in [
            "hello",
            "@@sbx:exit@@",
            "@@sbx:exit x@@",
            "@@sbx:exit 7",
            "@@sbx:bogus@@",
            "@@sbx:init 1@@",
            "@@sbx:error %ZZ@@",
        ] {
            assert_eq!(Frame::parse_line(line), None, "{line}");
        }
        let long = format!("@@sbx:error {}@@", "a".repeat(MAX_FRAME_LINE));
        assert_eq!(Frame::parse_line(&long), None);
    }
}

pub mod cpio;
pub mod session;
