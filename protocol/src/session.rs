//! The control channel's framing, spoken between a host client (`sbx
//! exec`, through the VMM's vsock device) and guest-init: one session per
//! connection. Both ends parse what the other sends, so every length is
//! bounded and every frame checked.
//!
//! A frame is `len: u32 LE` (type byte plus payload, at most
//! [`MAX_FRAME`]), `type: u8`, payload. The client's first frame is
//! [`Frame::Open`]; then it may send stdin, resizes and signals; guest-init
//! answers [`Frame::Started`], the program's output, and finally
//! [`Frame::Exit`], [`Frame::Killed`] or [`Frame::Error`].

use std::fmt;

/// Version of this framing, carried in [`Open`].
pub const VERSION: u32 = 1;
/// Largest frame (type byte and payload).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest chunk of program input or output in one frame.
pub const MAX_DATA: usize = 32 * 1024;

/// What to run in a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Open {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Working directory; empty means the user's home or /.
    pub cwd: String,
    /// User name or numeric uid; empty means root.
    pub user: String,
    /// A terminal of this size (rows, cols), or separate pipes if None.
    pub tty: Option<(u16, u16)>,
    /// The sandbox's main program (`sbx run`'s): when it ends, the VM
    /// powers off. Only one per boot.
    pub main: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open(Open),
    Stdin(Vec<u8>),
    /// No more input (a terminal gets its end-of-file character).
    StdinEof,
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Send this signal to the program (its process group).
    Signal(i32),
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
    Killed(i32),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooLarge(usize),
    UnknownType(u8),
    Malformed(&'static str),
    Version(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge(n) => write!(f, "Control frame of {n} bytes is over {MAX_FRAME}"),
            Error::UnknownType(t) => write!(f, "Unknown control frame type {t}"),
            Error::Malformed(what) => write!(f, "Malformed control frame: {what}"),
            Error::Version(v) => write!(f, "Control protocol version {v} is not {VERSION}"),
        }
    }
}

impl std::error::Error for Error {}

const T_OPEN: u8 = 1;
const T_STDIN: u8 = 2;
const T_STDIN_EOF: u8 = 3;
const T_RESIZE: u8 = 4;
const T_SIGNAL: u8 = 5;
const T_STARTED: u8 = 16;
const T_STDOUT: u8 = 17;
const T_STDERR: u8 = 18;
const T_EXIT: u8 = 19;
const T_KILLED: u8 = 20;
const T_ERROR: u8 = 21;

/// Strings in Open: u32 LE count, then each as u32 LE length and bytes.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(Error::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| Error::Malformed("truncated"))?))
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| Error::Malformed("truncated"))?))
    }
    fn str(&mut self) -> Result<String, Error> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Error::Malformed("not UTF-8"))
    }
    fn strings(&mut self, max: usize) -> Result<Vec<String>, Error> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Error::Malformed("too many strings"));
        }
        (0..n).map(|_| self.str()).collect()
    }
    fn end(&self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed("trailing bytes"))
        }
    }
}

impl Frame {
    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (t, body): (u8, Vec<u8>) = match self {
            Frame::Open(o) => {
                let mut b = VERSION.to_le_bytes().to_vec();
                b.extend_from_slice(&(o.argv.len() as u32).to_le_bytes());
                o.argv.iter().for_each(|a| put_str(&mut b, a));
                b.extend_from_slice(&(o.env.len() as u32).to_le_bytes());
                o.env.iter().for_each(|(k, v)| put_str(&mut b, &format!("{k}={v}")));
                put_str(&mut b, &o.cwd);
                put_str(&mut b, &o.user);
                match o.tty {
                    Some((r, c)) => {
                        b.push(1);
                        b.extend_from_slice(&r.to_le_bytes());
                        b.extend_from_slice(&c.to_le_bytes());
                    }
                    None => b.push(0),
                }
                b.push(u8::from(o.main));
                (T_OPEN, b)
            }
            Frame::Stdin(d) => (T_STDIN, d.clone()),
            Frame::StdinEof => (T_STDIN_EOF, vec![]),
            Frame::Resize { rows, cols } => (T_RESIZE, [rows.to_le_bytes(), cols.to_le_bytes()].concat()),
            Frame::Signal(s) => (T_SIGNAL, s.to_le_bytes().to_vec()),
            Frame::Started { pid } => (T_STARTED, pid.to_le_bytes().to_vec()),
            Frame::Stdout(d) => (T_STDOUT, d.clone()),
            Frame::Stderr(d) => (T_STDERR, d.clone()),
            Frame::Exit(c) => (T_EXIT, c.to_le_bytes().to_vec()),
            Frame::Killed(s) => (T_KILLED, s.to_le_bytes().to_vec()),
            Frame::Error(m) => (T_ERROR, m.as_bytes().to_vec()),
        };
        let mut out = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        out.push(t);
        out.extend_from_slice(&body);
        out
    }

    fn decode(t: u8, body: &[u8]) -> Result<Frame, Error> {
        let mut c = Cursor(body);
        let i32_of = |c: &mut Cursor| -> Result<i32, Error> { Ok(c.u32()? as i32) };
        let f = match t {
            T_OPEN => {
                let v = c.u32()?;
                if v != VERSION {
                    return Err(Error::Version(v));
                }
                let argv = c.strings(crate::MAX_ARGS)?;
                let mut env = Vec::new();
                for kv in c.strings(crate::MAX_ENV)? {
                    let (k, v) = kv.split_once('=').ok_or(Error::Malformed("env entry without '='"))?;
                    env.push((k.to_string(), v.to_string()));
                }
                let cwd = c.str()?;
                let user = c.str()?;
                let tty = match c.take(1)?[0] {
                    0 => None,
                    1 => Some((c.u16()?, c.u16()?)),
                    _ => return Err(Error::Malformed("tty flag")),
                };
                let main = match c.take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(Error::Malformed("main flag")),
                };
                Frame::Open(Open { argv, env, cwd, user, tty, main })
            }
            T_STDIN => return Ok(Frame::Stdin(body.to_vec())),
            T_STDOUT => return Ok(Frame::Stdout(body.to_vec())),
            T_STDERR => return Ok(Frame::Stderr(body.to_vec())),
            T_STDIN_EOF => Frame::StdinEof,
            T_RESIZE => Frame::Resize { rows: c.u16()?, cols: c.u16()? },
            T_SIGNAL => Frame::Signal(i32_of(&mut c)?),
            T_STARTED => Frame::Started { pid: c.u32()? },
            T_EXIT => Frame::Exit(i32_of(&mut c)?),
            T_KILLED => Frame::Killed(i32_of(&mut c)?),
            T_ERROR => {
                return String::from_utf8(body.to_vec()).map(Frame::Error).map_err(|_| Error::Malformed("not UTF-8"))
            }
            other => return Err(Error::UnknownType(other)),
        };
        c.end()?;
        Ok(f)
    }
}

/// Turns a byte stream into frames. Feed what arrives, take what is whole.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. After an
    /// error the stream cannot be trusted: close it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let Some(len) = self.buf.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
            return Ok(None);
        };
        if len == 0 || len > MAX_FRAME {
            return Err(Error::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Open(Open {
                argv: vec!["sh".into(), "-c".into(), "echo 'é' $X".into(), String::new()],
                env: vec![("X".into(), "a=b".into())],
                cwd: "/work dir".into(),
                user: "agent".into(),
                tty: Some((50, 132)),
                main: true,
            }),
            Frame::Open(Open::default()),
            Frame::Stdin(b"abc\x04".to_vec()),
            Frame::StdinEof,
            Frame::Resize { rows: 10, cols: 20 },
            Frame::Signal(2),
            Frame::Started { pid: 42 },
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(vec![]),
            Frame::Exit(-1),
            Frame::Killed(9),
            Frame::Error("Cannot run 'x'".into()),
        ]
    }

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let wire: Vec<u8> = all().iter().flat_map(Frame::encode).collect();
        let mut r = Reader::default();
        let mut got = Vec::new();
        for b in wire {
            r.feed(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all());
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![0, 0, 0, 0],                                // zero length
            ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec(), // over the bound
            vec![1, 0, 0, 0, 99],                            // unknown type
            vec![3, 0, 0, 0, T_RESIZE, 1, 0],                // short resize
            vec![6, 0, 0, 0, T_SIGNAL, 1, 0, 0, 0, 9],       // trailing bytes
            vec![5, 0, 0, 0, T_OPEN, 2, 0, 0, 0],            // wrong version
            [vec![13, 0, 0, 0, T_OPEN, 1, 0, 0, 0], u32::MAX.to_le_bytes().to_vec(), vec![0; 4]].concat(),
            vec![3, 0, 0, 0, T_ERROR, 0xff, 0xfe], // not UTF-8
        ];
        for c in cases {
            let mut r = Reader::default();
            r.feed(&c);
            assert!(r.next_frame().is_err(), "{c:?}");
        }
    }
}
