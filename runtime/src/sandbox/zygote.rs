//! The zygote (`kilnd zygote`): a small single-threaded process that `kilnd serve`
//! starts once, and that forks a worker per module start instead of `kilnd serve`
//! executing the whole binary again. A fork skips what an exec pays for on every
//! start (the dynamic loader, relocations, process set-up) and shares the zygote's
//! pages with every worker until one writes to them.
//!
//! What every worker would do first and the same way the zygote does once, so the
//! workers it forks inherit it: their network and IPC namespaces when it starts
//! ([`crate::sandbox::confine::share_namespaces`]), and the CPU feature probes and the
//! signature verifier's code and tables once it has forked its first worker and has
//! had nothing to do for a moment ([`crate::sandbox::load::warm`]).
//!
//! Once idle, it also forks one worker ahead of need, a *spare*: a child that waits on
//! a socket of its own for the two pipe ends of the next start, and then starts as a
//! worker forked at that moment would. The zygote hands the other end of that socket
//! to `kilnd serve` (`SPARE`), which gives the next start's pipe ends to the spare
//! directly and then tells the zygote (`USED`): one process woken on the way to a
//! start instead of two, and no fork (a copy of the zygote's page tables and the
//! child's first copied pages) on it either. That matters most for a restart after a
//! crash. The spare shares all its pages with the zygote until it is handed a
//! request; one spare is kept at a time, and it is the zygote's child like any worker.
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
//! worker's two pipe ends as `SCM_RIGHTS` and a request id that the answer repeats, so
//! an answer that comes after its request gave up is never taken for another's
//! ([`Spawns`]). It ends when `kilnd serve` closes the socket or dies
//! (`PR_SET_PDEATHSIG`); its workers die with it the same way. `PR_SET_PDEATHSIG`
//! follows the *thread* that forked the process, so `kilnd serve` starts every zygote
//! from one thread that lives as long as it does (`daemon::spawn`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One message, either way: `kind`, a pid, the spawn request it belongs to, and three
/// numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub kind: u32,
    pub pid: u32,
    /// A spawn request's id, repeated by its `SPAWNED` or `FAILED` answer; 0 otherwise.
    pub id: u64,
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
/// zygote -> serve: spare `pid` waits for a start's two pipe ends (a `SPAWN` message)
/// on the socket attached.
pub const SPARE: u32 = 6;
/// serve -> zygote: spare `pid` was handed a start and is a worker now.
pub const USED: u32 = 7;

const MSG_LEN: usize = 40;

impl Msg {
    pub fn new(kind: u32, pid: u32) -> Self {
        Self {
            kind,
            pid,
            id: 0,
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
        out[32..40].copy_from_slice(&self.id.to_le_bytes());
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
            id: u64_at(32),
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

/// `kilnd serve`'s book of spawn requests: which answer belongs to which request. Pure
/// state, no I/O, so that any interleaving of answers, late answers and timeouts can
/// be tested ([`tests`]); the driver is `daemon::spawn`'s zygote reader.
#[derive(Debug, Default)]
pub struct Spawns {
    last: u64,
    /// Requests still waited for, and each one's answer once it came.
    open: BTreeMap<u64, Option<Msg>>,
}

impl Spawns {
    /// A new request; its id goes in the `SPAWN` message.
    pub fn begin(&mut self) -> u64 {
        self.last += 1;
        self.open.insert(self.last, None);
        self.last
    }

    /// An answer from the zygote. Kept for its request if that request is still waited
    /// for and unanswered; otherwise (its request gave up, or the id was never asked
    /// for or is answered twice) the worker it names belongs to nobody: its pid is
    /// returned, to be killed.
    pub fn answer(&mut self, msg: Msg) -> Option<u32> {
        match self.open.get_mut(&msg.id) {
            Some(slot @ None) => {
                *slot = Some(msg);
                None
            }
            _ => (msg.kind == SPAWNED).then_some(msg.pid),
        }
    }

    /// The answer to request `id`, once it came; the request is then closed.
    pub fn take(&mut self, id: u64) -> Option<Msg> {
        match self.open.get(&id) {
            Some(Some(_)) => self.open.remove(&id).flatten(),
            _ => None,
        }
    }

    /// Request `id` gives up waiting. An answer that came meanwhile is nobody's: the pid
    /// of a worker it names is returned, to be killed; one that comes later is an
    /// orphan for [`Spawns::answer`].
    pub fn give_up(&mut self, id: u64) -> Option<u32> {
        self.open
            .remove(&id)
            .flatten()
            .filter(|m| m.kind == SPAWNED)
            .map(|m| m.pid)
    }

    /// Requests still open (for tests and leak checks).
    pub fn open(&self) -> usize {
        self.open.len()
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

/// How long the zygote waits with nothing to do before it warms up: past the burst of
/// starts at boot, which its work would slow (a small device's cores are shared with
/// `kilnd serve` and the starting workers).
const IDLE_MS: i32 = 50;

/// When the zygote runs [`crate::sandbox::load::warm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Warm {
    AfterFirstFork,
    WhenIdle,
    Done,
}

/// Serves `kilnd serve` on the socket at fd 0 until it hangs up; returns the exit code.
pub fn serve() -> i32 {
    crate::sandbox::worker::die_with_parent();
    crate::sandbox::confine::share_namespaces();
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
    // The warm-up waits for the first worker to be forked and then for [`IDLE_MS`]
    // with nothing to do: no start waits for it (`kilnd serve` asks for the first
    // workers while the zygote is still starting), and every worker after inherits it.
    let mut warm = Warm::AfterFirstFork;
    // A spare is forked once the zygote has been idle for IDLE_MS after a start (the
    // warm-up first, so the spare inherits it) and handed to `kilnd serve`; this is its
    // pid until serve says it used it, or it ends.
    let mut spare: Option<u32> = None;
    let mut spare_due = false;
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
        let idle_work = warm == Warm::WhenIdle || spare_due;
        let wait = if idle_work { IDLE_MS } else { -1 };
        // SAFETY: poll on two valid pollfds; EINTR (a SIGCHLD) just turns the loop.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, wait) } == 0 && idle_work {
            if warm == Warm::WhenIdle {
                crate::sandbox::load::warm();
                warm = Warm::Done;
            } else {
                spare_due = false;
                match fork_spare(pipe) {
                    Ok((pid, serves_end)) => {
                        children.insert(pid);
                        spare = Some(pid);
                        if send(sock, &Msg::new(SPARE, pid), &[serves_end.as_raw_fd()]).is_err() {
                            return 0;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "zygote: cannot fork a spare worker"),
                }
            }
            continue;
        }
        if polled[1].revents != 0 {
            let mut drain = [0u8; 64];
            // SAFETY: a non-blocking read into a local buffer.
            while unsafe { libc::read(pipe[0], drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        }
        // Reap on every turn: a SIGCHLD may have come between the poll and the drain.
        if reap(sock, &mut children, &mut spare).is_err() {
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
                let started = fork_worker(pipe, &fds);
                spare_due = spare.is_none();
                let reply = match started {
                    Ok(pid) => {
                        children.insert(pid);
                        if warm == Warm::AfterFirstFork {
                            warm = Warm::WhenIdle;
                        }
                        Msg {
                            id: msg.id,
                            ..Msg::new(SPAWNED, pid)
                        }
                    }
                    Err(e) => Msg {
                        id: msg.id,
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
            USED if spare == Some(msg.pid) => {
                spare = None;
                spare_due = true;
            }
            USED => {}
            other => {
                tracing::error!(kind = other, fds = fds.len(), "zygote: unexpected message");
                return 2;
            }
        }
    }
}

/// Reaps every worker that has ended and reports each, the spare too: `kilnd serve`
/// drops it then, or it was a worker already.
fn reap(sock: RawFd, children: &mut BTreeSet<u32>, spare: &mut Option<u32>) -> io::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 for any child of ours, without blocking, into locals.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        if pid <= 0 {
            return Ok(());
        }
        if *spare == Some(pid as u32) {
            *spare = None;
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

/// A connected pair of `SOCK_SEQPACKET` sockets (close-on-exec), as the zygote talks:
/// to `kilnd serve`, and to its spare.
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut pair = [0 as RawFd; 2];
    // SAFETY: socketpair fills the two-element array with new descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// Forks a spare: a child that waits for the pipe ends of the next start on a socket
/// of its own, then becomes that start's worker; returns its pid and the socket's
/// other end, for `kilnd serve`. It holds nothing of the zygote's but its pages: the
/// socket to `kilnd serve` and the SIGCHLD pipe are closed in it, and it dies with the
/// zygote, or when `kilnd serve` closes the other end.
fn fork_spare(pipe: [RawFd; 2]) -> io::Result<(u32, OwnedFd)> {
    let (ours, theirs) = socket_pair()?;
    // SAFETY: as in `fork_worker`: the zygote is single-threaded, and the child only
    // rearranges descriptors before it waits and then becomes an ordinary worker.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            leave_zygote(pipe);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::close(0);
            drop(ours);
            let fds = match recv(theirs.as_raw_fd()) {
                Ok(Some((msg, fds))) if msg.kind == SPAWN && fds.len() == 2 => fds,
                // `kilnd serve` closed the socket, or is gone: nothing to start.
                _ => libc::_exit(0),
            };
            drop(theirs);
            become_worker(fds[0].as_raw_fd(), fds[1].as_raw_fd())
        },
        pid => Ok((pid as u32, ours)),
    }
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
            leave_zygote(pipe);
            become_worker(stdin, stdout)
        },
        pid => Ok(pid as u32),
    }
}

/// In a forked child: what was the zygote's alone, its SIGCHLD handler and the pipe
/// that handler writes to, is dropped.
///
/// # Safety
/// Only in a child the zygote forked, where `pipe` is the SIGCHLD pipe.
unsafe fn leave_zygote(pipe: [RawFd; 2]) {
    // SAFETY: a zeroed sigaction with SIG_DFL; closing this process's copies of the pipe.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGCHLD, &dfl, std::ptr::null_mut());
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}

/// In a forked child: puts the request's pipe ends on stdin and stdout (the socket to
/// `kilnd serve` was on fd 0) and runs the worker to its end.
///
/// # Safety
/// Only in a child the zygote forked, with `stdin` and `stdout` open in it.
unsafe fn become_worker(stdin: RawFd, stdout: RawFd) -> ! {
    // SAFETY: descriptor calls on descriptors open in this process (the caller's
    // promise); nothing else in the process holds them.
    unsafe {
        // A descriptor received into a spare may already be 0 or 1 (the lowest free
        // numbers): moved off 0 first, and each left alone where it already is.
        let stdout = if stdout == 0 {
            libc::dup(stdout)
        } else {
            stdout
        };
        for (fd, target) in [(stdin, 0), (stdout, 1)] {
            if fd == target {
                continue;
            }
            if fd < 0 || libc::dup2(fd, target) < 0 {
                libc::_exit(2);
            }
            libc::close(fd);
        }
    }
    std::process::exit(crate::sandbox::worker::serve())
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
            id: 77,
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

    /// One step of the world around [`Spawns`]: kilnd serve asks, the zygote answers
    /// (in order, possibly late), a waiter times out, or a waiter looks for its answer.
    #[derive(Debug, Clone)]
    enum Step {
        Ask,
        /// The zygote answers the oldest request it has not answered yet.
        Answer {
            fail: bool,
        },
        /// The zygote sends an answer for an id nobody asked for.
        Stray(u64),
        /// Waiter number `n` (of those still waiting) times out.
        TimeOut(usize),
        /// Waiter number `n` looks for its answer.
        Look(usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Step::Ask),
            3 => any::<bool>().prop_map(|fail| Step::Answer { fail }),
            1 => (0u64..40).prop_map(Step::Stray),
            2 => (0usize..8).prop_map(Step::TimeOut),
            3 => (0usize..8).prop_map(Step::Look),
        ]
    }

    proptest::proptest! {
        /// Any interleaving of requests, answers, late answers, stray answers and
        /// timeouts: a waiter only ever gets the answer the zygote gave to its own
        /// request, and every worker forked for a request that gave up is handed back
        /// to be killed, exactly once.
        #[test]
        fn no_interleaving_gives_a_pid_to_the_wrong_request(
            steps in proptest::collection::vec(step(), 0..200)
        ) {
            let mut book = Spawns::default();
            // The zygote's queue of requests to answer, in order.
            let mut queue = std::collections::VecDeque::new();
            // What the zygote answered to each id: the pid it forked (None: failed).
            let mut forked: BTreeMap<u64, Option<u32>> = BTreeMap::new();
            let mut waiting: Vec<u64> = Vec::new();
            let mut got: BTreeMap<u64, Option<u32>> = BTreeMap::new();
            let mut killed: Vec<u32> = Vec::new();
            let mut next_pid = 100u32;
            for step in steps {
                match step {
                    Step::Ask => {
                        let id = book.begin();
                        queue.push_back(id);
                        waiting.push(id);
                    }
                    Step::Answer { fail } => {
                        let Some(id) = queue.pop_front() else { continue };
                        let msg = if fail {
                            forked.insert(id, None);
                            Msg { id, a: 11, ..Msg::new(FAILED, 0) }
                        } else {
                            next_pid += 1;
                            forked.insert(id, Some(next_pid));
                            Msg { id, ..Msg::new(SPAWNED, next_pid) }
                        };
                        killed.extend(book.answer(msg));
                    }
                    Step::Stray(id) => {
                        // Never an id the zygote is still to answer: the zygote
                        // answers each request once, and this is another answer.
                        if queue.contains(&id) {
                            continue;
                        }
                        next_pid += 1;
                        let orphan = book.answer(Msg { id, ..Msg::new(SPAWNED, next_pid) });
                        proptest::prop_assert_eq!(orphan, Some(next_pid), "a stray answer is killed");
                    }
                    Step::TimeOut(n) if !waiting.is_empty() => {
                        let id = waiting.remove(n % waiting.len());
                        killed.extend(book.give_up(id));
                    }
                    Step::Look(n) if !waiting.is_empty() => {
                        let id = waiting[n % waiting.len()];
                        if let Some(answer) = book.take(id) {
                            waiting.retain(|w| *w != id);
                            proptest::prop_assert_eq!(answer.id, id);
                            let pid = (answer.kind == SPAWNED).then_some(answer.pid);
                            proptest::prop_assert_eq!(Some(&pid), forked.get(&id), "request {} got another's answer", id);
                            got.insert(id, pid);
                        }
                    }
                    Step::TimeOut(_) | Step::Look(_) => {}
                }
            }
            // Every forked worker is either some waiter's, or killed; never both.
            for (id, pid) in &forked {
                let Some(pid) = pid else { continue };
                let taken = got.get(id) == Some(&Some(*pid));
                let dropped = killed.contains(pid);
                let pending = waiting.contains(id);
                proptest::prop_assert!(
                    [taken, dropped, pending].iter().filter(|x| **x).count() == 1,
                    "worker {} of request {}: taken {}, killed {}, still awaited {}", pid, id, taken, dropped, pending
                );
            }
            proptest::prop_assert_eq!(book.open(), waiting.len(), "no request leaks");
        }
    }
}
