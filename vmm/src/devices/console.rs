//! Host side: sinks for the guest's two serial ports. COM1 is the program's
//! terminal and goes to the user. COM2 is the kernel console: it goes to a
//! log file, its last lines are kept for error reports, and guest-init's
//! status frames are picked out of it. Both carry untrusted guest bytes:
//! lines are bounded, nothing is interpreted but well-formed frames.
//!
//! The guest can print forever, so the console's file is bounded
//! ([`ConsoleFile`]): past [`CONSOLE_FILE_CAP`] bytes (at the next line end,
//! or [`MAX_LINE`] bytes later) `console.log` becomes `console.log.1`,
//! replacing the one before, and a new `console.log` starts. The most
//! recent output is always kept, at least `CONSOLE_FILE_CAP` bytes of it,
//! at most about twice that in all; the start of the boot goes once the
//! guest has printed more. Error reports do not depend on the file: they
//! use the last [`TAIL_LINES`] lines, kept in memory.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use protocol::Frame;

/// Console lines kept for error reports.
pub const TAIL_LINES: usize = 40;
/// Longest console line kept whole; longer ones are cut.
pub const MAX_LINE: usize = 4096;
/// Size past which `console.log` is moved to `console.log.1`.
pub const CONSOLE_FILE_CAP: u64 = 2 << 20;

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

/// The previous console file of `path` (`console.log.1`).
pub fn previous(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The console files there are for `path`, oldest first.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    [previous(path), path.to_path_buf()].into_iter().filter(|p| p.is_file()).collect()
}

/// The console's log file, bounded by rotation into one previous file.
pub struct ConsoleFile {
    path: PathBuf,
    file: File,
    cap: u64,
    /// Bytes in the current file.
    size: u64,
    /// The last byte written ended a line.
    at_line_start: bool,
}

impl ConsoleFile {
    /// A new console log at `path`, rotated at [`CONSOLE_FILE_CAP`]. An
    /// earlier run's `console.log.1` goes: it would read as this run's.
    pub fn create(path: &Path) -> io::Result<ConsoleFile> {
        ConsoleFile::with_cap(path, CONSOLE_FILE_CAP)
    }

    /// Like [`ConsoleFile::create`], rotated at `cap` bytes.
    pub fn with_cap(path: &Path, cap: u64) -> io::Result<ConsoleFile> {
        match fs::remove_file(previous(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = File::create(path)?;
        Ok(ConsoleFile { path: path.to_path_buf(), file, cap, size: 0, at_line_start: true })
    }

    fn rotate(&mut self) -> io::Result<()> {
        match fs::rename(&self.path, previous(&self.path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.file = File::create(&self.path)?;
        self.size = 0;
        self.at_line_start = true;
        Ok(())
    }
}

impl Write for ConsoleFile {
    /// Writes all of `buf`, rotating at the first line end past the cap,
    /// or [`MAX_LINE`] bytes past it if no line ends: a file never holds
    /// more than `cap + MAX_LINE` bytes.
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        let hard_cap = self.cap + MAX_LINE as u64;
        while !buf.is_empty() {
            if self.size >= self.cap && (self.at_line_start || self.size >= hard_cap) {
                self.rotate()?;
            }
            let line_end = buf.iter().position(|&b| b == b'\n').map_or(buf.len(), |i| i + 1);
            let room = usize::try_from(hard_cap - self.size).unwrap_or(usize::MAX);
            let n = line_end.min(room);
            self.file.write_all(&buf[..n])?;
            self.size += n as u64;
            self.at_line_start = buf[n - 1] == b'\n';
            buf = &buf[n..];
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The kernel console (COM2) sink.
pub struct ConsoleLog {
    file: Option<ConsoleFile>,
    /// With `--console`: a copy for the user (whoever supplies it escapes
    /// it: the guest writes it).
    echo: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    report: SharedReport,
}

impl ConsoleLog {
    /// `file`: where the console is logged; `echo`: where else to copy it.
    pub fn new(file: Option<ConsoleFile>, echo: Option<Box<dyn Write + Send>>, report: SharedReport) -> ConsoleLog {
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
        if let Some(echo) = self.echo.as_mut() {
            let _ = echo.write_all(buf);
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
        let mut log = ConsoleLog::new(None, None, report.clone());
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
        let mut log = ConsoleLog::new(None, None, report.clone());
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
        let mut log = ConsoleLog::new(Some(ConsoleFile::create(&path).unwrap()), None, SharedReport::default());
        log.write_all(b"boot\n").unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "boot\n");
    }

    #[test]
    fn an_endless_console_keeps_the_most_recent_output_in_two_bounded_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // An earlier run's older half goes at once.
        std::fs::write(previous(&path), "stale\n").unwrap();
        let cap = 64 * 1024;
        let file = ConsoleFile::with_cap(&path, cap).unwrap();
        assert_eq!(log_files(&path), vec![path.clone()]);
        let report = SharedReport::default();
        let mut log = ConsoleLog::new(Some(file), None, report.clone());
        // 1 MiB of kernel messages, a byte at a time as the port sends them.
        let mut sent = 0;
        for i in 0.. {
            if sent > 1 << 20 {
                break;
            }
            let line = format!("[{i:>8}] a kernel message that goes on for a while\n");
            feed(&mut log, line.as_bytes());
            sent += line.len();
        }
        feed(&mut log, b"Kernel panic - not syncing: the end\n");
        log.flush().unwrap();
        let files = log_files(&path);
        assert_eq!(files, vec![previous(&path), path.clone()]);
        let sizes: Vec<u64> = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).collect();
        assert!(sizes.iter().all(|s| *s <= cap + MAX_LINE as u64), "{sizes:?}");
        // Whole lines in each file, the newest at the end of console.log.
        let older = std::fs::read_to_string(&files[0]).unwrap();
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(older.ends_with('\n') && newest.lines().all(|l| l.starts_with('[') || l.starts_with("Kernel")));
        assert!(newest.ends_with("Kernel panic - not syncing: the end\n"));
        assert!(!older.contains("stale"));
        // Error reports still see the panic.
        assert_eq!(report.lock().unwrap().tail.back().unwrap(), "Kernel panic - not syncing: the end");
    }

    #[test]
    fn a_console_line_without_end_is_bounded_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let cap = 16 * 1024;
        let report = SharedReport::default();
        let mut log = ConsoleLog::new(Some(ConsoleFile::with_cap(&path, cap).unwrap()), None, report.clone());
        let chunk = vec![b'y'; 1000];
        for _ in 0..1000 {
            log.write_all(&chunk).unwrap();
            assert!(log.line.len() <= MAX_LINE && log.line.capacity() <= 2 * MAX_LINE);
        }
        log.write_all(&vec![b'z'; 100_000]).unwrap();
        log.write_all(b"\n").unwrap();
        for f in log_files(&path) {
            assert!(std::fs::metadata(&f).unwrap().len() <= cap + MAX_LINE as u64, "{}", f.display());
        }
        assert_eq!(report.lock().unwrap().tail.back().unwrap().len(), MAX_LINE);
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
