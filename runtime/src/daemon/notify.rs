//! The systemd notification protocol (`sd_notify`), spoken directly: one datagram per
//! message to the unix socket in `NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace). `serve` says `READY=1` once its modules are started and its broker link
//! is on its way, `RELOADING=1` and `READY=1` around a SIGHUP reload, `STOPPING=1` on
//! SIGTERM, and `WATCHDOG=1` from its records loop at half of `WATCHDOG_USEC`, so a
//! loop that stops turning stops the pings and systemd restarts the service.
//! Without `NOTIFY_SOCKET` every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
}

static SOCKET: OnceLock<Option<Socket>> = OnceLock::new();

/// Reads and removes the variables, so that worker processes never see them: with
/// `NotifyAccess=main` systemd would ignore a worker anyway. Call before any thread
/// starts. Returns the watchdog pacer when systemd asked for pings.
pub fn init() -> Option<Watchdog> {
    let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
        let path = path.as_encoded_bytes();
        let addr = match path.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => {
                SocketAddr::from_pathname(std::path::Path::new(std::ffi::OsStr::from_bytes(path)))
            }
        };
        match (addr, UnixDatagram::unbound()) {
            (Ok(addr), Ok(socket)) => Some(Socket { socket, addr }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("NOTIFY_SOCKET is set but unusable: {e}");
                None
            }
        }
    });
    let watchdog = watchdog_interval().map(|every| Watchdog { every, last: None });
    // SAFETY (of the environment): called at the start of `serve`, before it spawns
    // any thread, so nothing reads the environment concurrently.
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        std::env::remove_var(var);
    }
    let enabled = socket.is_some();
    let _ = SOCKET.set(socket);
    watchdog.filter(|_| enabled)
}

/// Half of `WATCHDOG_USEC`, if it is meant for this process (`WATCHDOG_PID`).
fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends one message (`KEY=VALUE` lines); a failure is logged, never fatal.
pub fn send(message: &str) {
    if let Some(Some(s)) = SOCKET.get() {
        if let Err(e) = s.socket.send_to_addr(message.as_bytes(), &s.addr) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }
}

/// `RELOADING=1` with the monotonic time systemd wants beside it.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Paces `WATCHDOG=1`: the loop calls `alive` every time it turns.
pub struct Watchdog {
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    pub fn alive(&mut self, now: Instant) {
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= self.every)
        {
            self.last = Some(now);
            send("WATCHDOG=1");
        }
    }

    pub fn interval(&self) -> Duration {
        self.every
    }
}
