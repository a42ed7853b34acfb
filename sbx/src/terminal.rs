//! Host side: the user's terminal — raw mode while an interactive guest
//! shell owns it (restored on drop, so on every exit path that unwinds or
//! returns), and its size.

use std::io;

pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's (rows, cols), if `fd` is one.
pub fn size(fd: i32) -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

impl RawMode {
    /// Puts terminal `fd` in raw mode: every key goes to the guest,
    /// including ^C and ^D.
    pub fn enter(fd: i32) -> io::Result<RawMode> {
        // SAFETY: termios is plain data; zeroed is valid before tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a descriptor, saved is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the valid termios in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a descriptor, raw is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in enter() on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
