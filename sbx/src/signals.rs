//! Host side: signals to the sbx process handled on a thread of their own
//! (`sbx run` turns them into an orderly stop or passes them to the
//! program; `sbx exec` passes them to its program), and `sbx stop`'s
//! SIGTERM to a VMM.

/// Signal numbers, for code that has no libc of its own (the CLI).
pub mod names {
    pub const TERM: i32 = libc::SIGTERM;
    pub const INT: i32 = libc::SIGINT;
    pub const HUP: i32 = libc::SIGHUP;
    pub const WINCH: i32 = libc::SIGWINCH;
}

fn set_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: set is a valid, initialised sigset_t and s a valid signal.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks `signals` in the calling thread (and threads started after) and
/// calls `on_signal` on a thread of its own for each one that arrives.
/// Call before starting other threads.
pub fn forward(signals: &[libc::c_int], mut on_signal: impl FnMut(libc::c_int) + Send + 'static) {
    let set = set_of(signals);
    // SAFETY: set is valid; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = vmm::threads::spawn_helper("signals", move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: set is a valid sigset_t, sig a valid int to write.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            on_signal(sig);
        }
    });
}

/// Asks process `pid` to stop (SIGTERM), as `sbx stop` does to a VMM.
pub fn terminate(pid: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a process id"));
    }
    // SAFETY: kill(2) takes no pointers; pid > 0 names exactly one process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
