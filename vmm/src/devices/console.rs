//! Host side: sinks for the guest's two serial ports. COM1 is the program's
//! terminal and goes to the user. COM2 is the kernel console: it goes to a
//! log file, its last lines are kept for error reports, and guest-init's
//! status frames are picked out of it. Both carry untrusted guest bytes:
//! lines are bounded, nothing is interpreted but well-formed frames.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use protocol::Frame;

/// Console lines kept for error reports.
pub const TAIL_LINES: usize = 40;
/// Longest console line kept whole; longer ones are cut.
const MAX_LINE: usize = 4096;

/// What the guest told us through the console, as it happened.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// guest-init's first frame: PID 1 runs.
    pub init_at: Option<Instant>,
    /// The program was started.
    pub started_at: Option<Instant>,
    /// How the program ended, or guest-init's error.
    pub outcome: Option<Frame>,
    /// The first byte the program wrote.
    pub first_output_at: Option<Instant>,
    /// Bytes of program output.
    pub output_bytes: u64,
    /// The last console lines.
    pub tail: VecDeque<String>,
}

pub type SharedReport = Arc<Mutex<GuestReport>>;

fn lock(r: &SharedReport) -> std::sync::MutexGuard<'_, GuestReport> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// The kernel console (COM2) sink.
pub struct ConsoleLog {
    file: Option<File>,
    echo: bool,
    line: Vec<u8>,
    report: SharedReport,
}

impl ConsoleLog {
    /// `file`: where the console is logged; `echo`: also copy it to stderr.
    pub fn new(file: Option<File>, echo: bool, report: SharedReport) -> ConsoleLog {
        ConsoleLog { file, echo, line: Vec::new(), report }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_string();
        self.line.clear();
        let mut r = lock(&self.report);
        match Frame::parse_line(&text) {
            Some(Frame::Init) => r.init_at = r.init_at.or(Some(Instant::now())),
            Some(Frame::Started) => r.started_at = Some(Instant::now()),
            Some(f) => r.outcome = Some(f),
            None if text.is_empty() => {}
            None => {
                if r.tail.len() == TAIL_LINES {
                    r.tail.pop_front();
                }
                r.tail.push_back(text);
            }
        }
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = self.file.as_mut() {
            // Losing the log must not stop the guest.
            let _ = f.write_all(buf);
        }
        if self.echo {
            let _ = io::stderr().write_all(buf);
        }
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        Ok(())
    }
}

/// The program's terminal (COM1) sink: the user's stdout.
pub struct ProgramOutput<W: Write + Send> {
    out: W,
    report: SharedReport,
}

impl<W: Write + Send> ProgramOutput<W> {
    pub fn new(out: W, report: SharedReport) -> Self {
        ProgramOutput { out, report }
    }
}

impl<W: Write + Send> Write for ProgramOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut r = lock(&self.report);
            r.first_output_at = r.first_output_at.or(Some(Instant::now()));
            r.output_bytes += buf.len() as u64;
        }
        // The guest writes a byte at a time; pass each on at once.
        self.out.write_all(buf)?;
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(log: &mut ConsoleLog, text: &[u8]) {
        for b in text {
            log.write_all(&[*b]).unwrap();
        }
    }

    #[test]
    fn frames_are_picked_out_and_other_lines_kept() {
        let report = SharedReport::default();
        let mut log = ConsoleLog::new(None, false, report.clone());
        feed(&mut log, b"[    0.000000] Linux version 6.1\r\n");
        feed(&mut log, format!("\n{}\n", Frame::Init.to_line()).as_bytes());
        feed(&mut log, format!("{}\n", Frame::Exit(7).to_line()).as_bytes());
        let r = report.lock().unwrap();
        assert!(r.init_at.is_some());
        assert_eq!(r.outcome, Some(Frame::Exit(7)));
        assert_eq!(r.tail, vec!["[    0.000000] Linux version 6.1".to_string()]);
    }

    #[test]
    fn tail_and_lines_are_bounded() {
        let report = SharedReport::default();
        let mut log = ConsoleLog::new(None, false, report.clone());
        for i in 0..100 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        log.write_all(&vec![b'x'; 10 * MAX_LINE]).unwrap();
        log.write_all(b"\n").unwrap();
        let r = report.lock().unwrap();
        assert_eq!(r.tail.len(), TAIL_LINES);
        assert_eq!(r.tail[0], "line 61");
        assert_eq!(r.tail.back().unwrap().len(), MAX_LINE);
    }

    #[test]
    fn console_is_logged_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::new(Some(File::create(&path).unwrap()), false, SharedReport::default());
        log.write_all(b"boot\n").unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "boot\n");
    }

    #[test]
    fn program_output_passes_through_and_is_counted() {
        let report = SharedReport::default();
        let mut out = ProgramOutput::new(Vec::new(), report.clone());
        out.write_all(b"hello").unwrap();
        assert_eq!(out.out, b"hello");
        let r = report.lock().unwrap();
        assert_eq!(r.output_bytes, 5);
        assert!(r.first_output_at.is_some());
    }
}
