//! The zygote (`kilnd zygote`): a small single-threaded process that `kilnd serve`
//! starts once, and that forks a worker per module start instead of `kilnd serve`
//! executing the whole binary again. A fork skips what an exec pays for on every
//! start (the dynamic loader, relocations, process set-up) and shares the zygote's
//! pages with every worker until one writes to them.
//!
//! Isolation is unchanged: each worker is its own process, and it verifies and loads
//! its artifact itself, right before deserializing it, exactly as an exec'd worker
//! does ([`crate::sandbox::worker::serve`]). The zygote holds no secret to inherit: it
//! never reads the config, the keys or the broker's credentials, and it touches no
//! artifact.
//!
//! The zygote is the workers' parent, so it reaps them, and it is the only process
//! that signals them: `kilnd serve` asks it to, so a pid is never signalled after it
//! was reaped and perhaps reused. It talks to `kilnd serve` over a `SOCK_SEQPACKET`
//! socket on its stdin, in fixed-size messages ([`Msg`]); a spawn request carries the
//! worker's two pipe ends as `SCM_RIGHTS`. It ends when `kilnd serve` closes the
//! socket or dies (`PR_SET_PDEATHSIG`); its workers die with it the same way.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One message, either way: `kind`, a pid, and three numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub kind: u32,
    pub pid: u32,
    pub a: i64,
    pub b: u64,
    pub c: u64,
}

/// serve -> zygote: fork a worker on the two file descriptors attached.
pub const SPAWN: u32 = 1;
/// serve -> zygote: SIGKILL worker `pid`, if it is still one of ours.
pub const KILL: u32 = 2;
/// zygote -> serve: the worker is `pid`.
pub const SPAWNED: u32 = 3;
/// zygote -> serve: fork failed with errno `a`.
pub const FAILED: u32 = 4;
/// zygote -> serve: worker `pid` ended: wait status `a`, peak RSS `b` KiB, CPU `c` µs.
pub const EXITED: u32 = 5;

const MSG_LEN: usize = 32;

impl Msg {
    pub fn new(kind: u32, pid: u32) -> Self {
        Self {
            kind,
            pid,
            a: 0,
            b: 0,
            c: 0,
        }
    }

    fn encode(&self) -> [u8; MSG_LEN] {
        let mut out = [0u8; MSG_LEN];
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[4..8].copy_from_slice(&self.pid.to_le_bytes());
        out[8..16].copy_from_slice(&self.a.to_le_bytes());
        out[16..24].copy_from_slice(&self.b.to_le_bytes());
        out[24..32].copy_from_slice(&self.c.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; MSG_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        Self {
            kind: u32_at(0),
            pid: u32_at(4),
            a: u64_at(8) as i64,
            b: u64_at(16),
            c: u64_at(24),
        }
    }
}

/// Sends one message with `fds` attached (at most two).
pub fn send(sock: RawFd, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
    let bytes = msg.encode();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: MSG_LEN,
    };
    let mut space = [0u64; 8]; // room for CMSG_SPACE(2 * sizeof(int)), aligned
                               // SAFETY: msghdr is plain data; every pointer in it points into locals that outlive
                               // the sendmsg call, and the control buffer is large enough for two descriptors.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            let payload = std::mem::size_of_val(fds) as u32;
            hdr.msg_control = space.as_mut_ptr().cast();
            hdr.msg_controllen = libc::CMSG_SPACE(payload) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        loop {
            if libc::sendmsg(sock, &hdr, libc::MSG_NOSIGNAL) == MSG_LEN as isize {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Receives one message and the descriptors attached to it; `None` at end of stream.
pub fn recv(sock: RawFd) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut bytes = [0u8; MSG_LEN];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: MSG_LEN,
    };
    let mut space = [0u64; 8];
    // SAFETY: as in `send`; the kernel writes at most msg_controllen bytes of control
    // data, and only descriptors it installed in this process are taken as owned.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = space.as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of_val(&space) as _;
        let n = loop {
            let n = libc::recvmsg(sock, &mut hdr, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
        match n {
            0 => Ok(None),
            MSG_LEN => Ok(Some((Msg::decode(&bytes), fds))),
            n => Err(io::Error::other(format!(
                "a zygote message of {n} bytes, not {MSG_LEN}"
            ))),
        }
    }
}

/// The write end of the self-pipe that SIGCHLD wakes the loop through.
static CHLD_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = CHLD_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; a full pipe already means "wake up".
    unsafe {
        libc::write(fd, [0u8].as_ptr().cast(), 1);
    }
}

/// Serves `kilnd serve` on the socket at fd 0 until it hangs up; returns the exit code.
pub fn serve() -> i32 {
    crate::sandbox::worker::die_with_parent();
    let sock: RawFd = 0;
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array; sigaction gets a zeroed struct with
    // a handler that only calls write(2) on a descriptor set before it is installed.
    unsafe {
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "zygote: no pipe");
            return 2;
        }
        CHLD_PIPE.store(pipe[1], std::sync::atomic::Ordering::Relaxed);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_NOCLDSTOP;
        libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut());
        // `kilnd serve` blocks the signals it waits for; SIGCHLD must get through here.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    let mut children: BTreeSet<u32> = BTreeSet::new();
    loop {
        let mut polled = [
            libc::pollfd {
                fd: sock,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pipe[0],
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two valid pollfds; EINTR (a SIGCHLD) just turns the loop.
        unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) };
        if polled[1].revents != 0 {
            let mut drain = [0u8; 64];
            // SAFETY: a non-blocking read into a local buffer.
            while unsafe { libc::read(pipe[0], drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        }
        // Reap on every turn: a SIGCHLD may have come between the poll and the drain.
        if reap(sock, &mut children).is_err() {
            return 0;
        }
        if polled[0].revents == 0 {
            continue;
        }
        let (msg, fds) = match recv(sock) {
            Ok(Some(m)) => m,
            // `kilnd serve` hung up: its workers get the end of their pipes too.
            Ok(None) => return 0,
            Err(e) => {
                tracing::error!(error = %e, "zygote: broken socket");
                return 2;
            }
        };
        match msg.kind {
            SPAWN if fds.len() == 2 => {
                let reply = match fork_worker(pipe, &fds) {
                    Ok(pid) => {
                        children.insert(pid);
                        Msg::new(SPAWNED, pid)
                    }
                    Err(e) => Msg {
                        a: e.raw_os_error().unwrap_or(0) as i64,
                        ..Msg::new(FAILED, 0)
                    },
                };
                drop(fds);
                if send(sock, &reply, &[]).is_err() {
                    return 0;
                }
            }
            KILL if children.contains(&msg.pid) => {
                // SAFETY: the pid is our own child, not yet reaped (so not reused).
                unsafe { libc::kill(msg.pid as libc::pid_t, libc::SIGKILL) };
            }
            KILL => {}
            other => {
                tracing::error!(kind = other, fds = fds.len(), "zygote: unexpected message");
                return 2;
            }
        }
    }
}

/// Reaps every worker that has ended and reports each.
fn reap(sock: RawFd, children: &mut BTreeSet<u32>) -> io::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 for any child of ours, without blocking, into locals.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        if pid <= 0 {
            return Ok(());
        }
        children.remove(&(pid as u32));
        let msg = Msg {
            a: status as i64,
            b: usage.ru_maxrss as u64,
            c: cpu_us(&usage),
            ..Msg::new(EXITED, pid as u32)
        };
        send(sock, &msg, &[])?;
    }
}

/// User plus system CPU time of a reaped process, in µs.
pub fn cpu_us(usage: &libc::rusage) -> u64 {
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// Forks a worker whose stdin and stdout are `fds`; returns its pid.
fn fork_worker(pipe: [RawFd; 2], fds: &[OwnedFd]) -> io::Result<u32> {
    let (stdin, stdout) = (fds[0].as_raw_fd(), fds[1].as_raw_fd());
    // SAFETY: the zygote is single-threaded, so the child inherits no lock held by
    // another thread. The child only rearranges descriptors and signal dispositions
    // before it becomes an ordinary worker, and never returns into the loop above.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGCHLD, &dfl, std::ptr::null_mut());
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            // The socket was on fd 0: the worker's stdin replaces it.
            if libc::dup2(stdin, 0) < 0 || libc::dup2(stdout, 1) < 0 {
                libc::_exit(2);
            }
            libc::close(stdin);
            libc::close(stdout);
            std::process::exit(crate::sandbox::worker::serve());
        },
        pid => Ok(pid as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_seqpacket_socket_whole() {
        let mut pair = [0 as RawFd; 2];
        // SAFETY: socketpair fills the array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let file = tempfile::tempfile().unwrap();
        let msg = Msg {
            a: -9,
            b: u64::MAX,
            c: 7,
            ..Msg::new(EXITED, 4242)
        };
        send(a.as_raw_fd(), &msg, &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        let (got, fds) = recv(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 2);
        send(a.as_raw_fd(), &Msg::new(KILL, 1), &[]).unwrap();
        let (got, fds) = recv(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!((got.kind, got.pid, fds.len()), (KILL, 1, 0));
        drop(a);
        assert!(recv(b.as_raw_fd()).unwrap().is_none(), "end of stream");
    }
}
