//! Waiting for one descriptor, as the worker's output, the supervisor's reads of a
//! worker's replies and a serial port do.

use std::io;
use std::os::fd::RawFd;

/// Waits at most `timeout_ms` (-1: for as long as it takes) until `fd` is ready for
/// `events` (or hung up, or failed: the next read or write says which); false when the
/// time ran out. A signal that interrupts the wait starts it again.
pub fn ready(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut polled = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, its count and a timeout.
        let n = unsafe { libc::poll(&mut polled, 1, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
