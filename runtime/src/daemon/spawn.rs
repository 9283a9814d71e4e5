//! Starting, signalling and reaping worker processes. `kilnd serve` starts one zygote
//! (`kilnd zygote`, see [`crate::sandbox::zygote`]) and asks it to fork each worker;
//! should the zygote be gone or unable to start, the worker is exec'd as
//! `launcher... kilnd worker` instead. Either way a worker is one process with its
//! stdin and stdout as the frame pipes, and the supervisor sees the same [`Process`].
//!
//! The zygote dies with the thread that forked it (`PR_SET_PDEATHSIG` follows the
//! parent *thread*), and its workers with it. So no supervisor thread, which ends with
//! its module, ever starts one: every zygote, the first and each replacement, is
//! started by one keeper thread that lives as long as [`Workers`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sandbox::zygote::{self, Msg, Spawns};

/// How to start kilnd's own binary for a worker or the zygote: `launcher... exe ARG`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub launcher: Vec<String>,
    pub exe: PathBuf,
}

impl WorkerCommand {
    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.exe);
                cmd
            }
            None => Command::new(&self.exe),
        };
        cmd.arg(subcommand).stderr(Stdio::inherit());
        cmd
    }
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The zygote that forked it died first, so it died too (`PR_SET_PDEATHSIG`), and
    /// nobody could tell how.
    WithZygote,
}

impl Exit {
    fn of(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// What the end of a worker left: how it ended, its peak RSS (KiB), its CPU time (µs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ended {
    pub exit: Option<Exit>,
    pub peak_rss_kib: Option<u64>,
    pub cpu_us: u64,
}

/// Starts workers, through the zygote while it lives.
pub struct Workers {
    command: WorkerCommand,
    zygote: Mutex<Option<Arc<Zygote>>>,
    /// The keeper thread that starts every zygote; `None` when workers are exec'd.
    keeper: Option<Mutex<SyncSender<Started>>>,
}

/// Where the keeper sends a zygote it started.
type Started = SyncSender<std::io::Result<Arc<Zygote>>>;

/// The keeper: starts a zygote for each request until [`Workers`] is dropped. The
/// zygotes it starts are its children and die with it, which is with `kilnd serve`.
fn keeper(command: WorkerCommand) -> Option<SyncSender<Started>> {
    let (ask, asked) = mpsc::sync_channel::<Started>(0);
    std::thread::Builder::new()
        .name("zygote-keeper".into())
        .spawn(move || {
            for answer in asked {
                let _ = answer.send(Zygote::start(&command));
            }
        })
        .map_err(
            |e| tracing::warn!(error = %e, "cannot start the zygote keeper; executing workers"),
        )
        .ok()?;
    Some(ask)
}

/// One running worker: its pid and the supervisor's ends of its pipes.
pub struct Process {
    pub pid: u32,
    pipes: Option<(File, File)>,
    origin: Origin,
}

enum Origin {
    Exec(Child),
    Forked(Arc<Zygote>),
}

impl Workers {
    /// With `fork` false, every worker is exec'd (`KILND_ZYGOTE=0`, or a launcher
    /// that cannot fork, should one exist).
    pub fn new(command: WorkerCommand, fork: bool) -> Self {
        let keeper = if fork {
            keeper(command.clone()).map(Mutex::new)
        } else {
            None
        };
        Self {
            command,
            zygote: Mutex::new(None),
            keeper,
        }
    }

    /// Starts the zygote now, so that the first workers do not wait for its exec.
    pub fn prestart(&self) {
        self.zygote();
    }

    pub fn exe(&self) -> &std::path::Path {
        &self.command.exe
    }

    /// Starts a worker with `first` (its Start frame) already written to its stdin.
    pub fn spawn(&self, first: &[u8]) -> std::io::Result<Process> {
        if let Some(zygote) = self.zygote() {
            match zygote.spawn(first) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(error = %e, "the zygote cannot fork a worker; executing one")
                }
            }
        }
        let mut child = self
            .command
            .command("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (mut stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (File::from(OwnedFd::from(i)), File::from(OwnedFd::from(o))),
            _ => return Err(std::io::Error::other("worker pipes missing")),
        };
        stdin.write_all(first)?;
        Ok(Process {
            pid: child.id(),
            pipes: Some((stdin, stdout)),
            origin: Origin::Exec(child),
        })
    }

    /// The live zygote, started (again, by the keeper) if it is not up.
    fn zygote(&self) -> Option<Arc<Zygote>> {
        let keeper = self.keeper.as_ref()?;
        let mut slot = self.zygote.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(z) = slot.as_ref().filter(|z| z.alive()) {
            return Some(z.clone());
        }
        if let Some(old) = slot.take() {
            old.finish();
        }
        let (answer, started) = mpsc::sync_channel(1);
        let asked = keeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(answer);
        let started = asked
            .ok()
            .and_then(|()| started.recv().ok())
            .unwrap_or_else(|| Err(std::io::Error::other("the zygote keeper has ended")));
        match started {
            Ok(z) => {
                *slot = Some(z.clone());
                Some(z)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the zygote; executing workers");
                None
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(z) = self.zygote.get_mut().ok().and_then(Option::take) {
            z.finish();
        }
    }
}

impl Process {
    /// The worker's stdin (requests) and stdout (replies), once. Closing stdin asks
    /// the worker to end.
    pub fn take_pipes(&mut self) -> Option<(File, File)> {
        self.pipes.take()
    }

    /// SIGKILL, now.
    pub fn kill(&self) {
        match &self.origin {
            // SAFETY: kill() on our own child's pid, which is not yet reaped.
            Origin::Exec(_) => unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            },
            Origin::Forked(z) => z.kill(self.pid),
        }
    }

    /// Waits for the worker to end, killing it after `grace`.
    pub fn reap(self, grace: Duration) -> Ended {
        let deadline = Instant::now() + grace;
        match &self.origin {
            Origin::Exec(child) => reap_child(child.id(), deadline),
            Origin::Forked(z) => {
                if let Some(ended) = z.wait(self.pid, deadline) {
                    return ended;
                }
                z.kill(self.pid);
                z.wait(self.pid, Instant::now() + Duration::from_secs(5))
                    .unwrap_or_default()
            }
        }
    }
}

fn reap_child(pid: u32, deadline: Instant) -> Ended {
    let pid = pid as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            return Ended::default();
        }
        if Instant::now() >= deadline {
            // SAFETY: kill and a blocking wait4 on our own, not yet reaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ended {
        exit: Some(Exit::of(status)),
        peak_rss_kib: Some(usage.ru_maxrss as u64),
        cpu_us: zygote::cpu_us(&usage),
    }
}

/// How long a spawn waits for the zygote's answer before it executes a worker instead.
const SPAWN_ANSWER: Duration = Duration::from_secs(10);

/// `kilnd serve`'s end of the zygote.
struct Zygote {
    sock: OwnedFd,
    child: Mutex<Child>,
    ended: Mutex<Ends>,
    changed: Condvar,
}

#[derive(Default)]
struct Ends {
    by_pid: HashMap<u32, Ended>,
    /// Spawn requests and their answers.
    spawns: Spawns,
    /// Workers forked for a request that had given up: killed, and their end unwanted.
    orphans: std::collections::HashSet<u32>,
    /// The zygote's spare, waiting on this socket for the next start's pipe ends.
    spare: Option<(u32, OwnedFd)>,
    /// The socket reached its end: the zygote is gone, and its workers with it.
    gone: bool,
}

impl Ends {
    /// What the zygote said, booked; returns the pid of a worker that is nobody's and
    /// must be killed. Pure, for [`tests`].
    fn heard(&mut self, msg: Msg, mut fds: Vec<OwnedFd>) -> Option<u32> {
        match msg.kind {
            zygote::EXITED => {
                let ended = Ended {
                    exit: Some(Exit::of(msg.a as i32)),
                    peak_rss_kib: Some(msg.b),
                    cpu_us: msg.c,
                };
                // A spare that ended before it was handed a start was nobody's worker.
                if self.spare.as_ref().is_some_and(|(pid, _)| *pid == msg.pid) {
                    self.spare = None;
                } else if !self.orphans.remove(&msg.pid) {
                    self.by_pid.insert(msg.pid, ended);
                }
                None
            }
            zygote::SPARE if fds.len() == 1 => {
                // One spare at a time: one replaced (the zygote never does that) ends when
                // its socket closes, and its end is nobody's.
                if let Some((old, _)) = self.spare.replace((msg.pid, fds.remove(0))) {
                    self.orphans.insert(old);
                }
                None
            }
            _ => {
                let orphan = self.spawns.answer(msg);
                if let Some(pid) = orphan {
                    self.orphans.insert(pid);
                }
                orphan
            }
        }
    }

    /// A spare taken for a start was gone before it could be handed it: its end is
    /// nobody's, whether the zygote reported it already or does so later.
    fn spare_gone(&mut self, pid: u32) {
        if self.by_pid.remove(&pid).is_none() {
            self.orphans.insert(pid);
        }
    }
}

impl Zygote {
    fn start(command: &WorkerCommand) -> std::io::Result<Arc<Self>> {
        let (ours, theirs) = zygote::socket_pair()?;
        let child = command
            .command("zygote")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        let zygote = Arc::new(Self {
            sock: ours,
            child: Mutex::new(child),
            ended: Mutex::new(Ends::default()),
            changed: Condvar::new(),
        });
        // Reads what the zygote says until it ends (and holds it until then).
        let reader = zygote.clone();
        std::thread::spawn(move || {
            let sock = reader.sock.as_raw_fd();
            while let Ok(Some((msg, fds))) = zygote::recv(sock) {
                let orphan = reader.ends().heard(msg, fds);
                if let Some(pid) = orphan {
                    tracing::warn!(pid, "a worker forked after its spawn gave up; killing it");
                    reader.kill(pid);
                }
                reader.changed.notify_all();
            }
            tracing::warn!("the zygote has ended");
            reader.ends().gone = true;
            reader.changed.notify_all();
        });
        Ok(zygote)
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self) -> bool {
        !self.ends().gone
    }

    fn spawn(self: &Arc<Self>, first: &[u8]) -> std::io::Result<Process> {
        let (to_worker, from_worker) = (pipe()?, pipe()?);
        let mut requests = File::from(to_worker.1);
        // A frame that fits the pipe's buffer is written before the worker exists (it
        // cannot block); a larger one once the worker is there to read it.
        let early = first.len() <= PIPE_SURELY_HOLDS;
        if early {
            requests.write_all(first)?;
        }
        // The worker reads requests from to_worker's read end and writes replies to
        // from_worker's write end.
        let fds = [to_worker.0.as_raw_fd(), from_worker.1.as_raw_fd()];
        let pid = match self.hand_to_spare(&fds) {
            Some(pid) => pid,
            None => self.fork(&fds)?,
        };
        let process = Process {
            pid,
            pipes: None,
            origin: Origin::Forked(self.clone()),
        };
        if !early {
            if let Err(e) = requests.write_all(first) {
                process.kill();
                return Err(e);
            }
        }
        Ok(Process {
            pipes: Some((requests, File::from(from_worker.0))),
            ..process
        })
    }

    /// Hands a start's pipe ends to the zygote's spare, if one waits, and returns its
    /// pid; the zygote hears of it after, off the start.
    fn hand_to_spare(&self, fds: &[RawFd; 2]) -> Option<u32> {
        let (pid, sock) = self.ends().spare.take()?;
        if zygote::send(sock.as_raw_fd(), &Msg::new(zygote::SPAWN, 0), fds).is_err() {
            // Its end of the socket closed: the spare is gone.
            self.ends().spare_gone(pid);
            return None;
        }
        let _ = zygote::send(self.sock.as_raw_fd(), &Msg::new(zygote::USED, pid), &[]);
        Some(pid)
    }

    /// Asks the zygote to fork a worker on the pipe ends `fds`; returns its pid.
    fn fork(&self, fds: &[RawFd; 2]) -> std::io::Result<u32> {
        let id = self.ends().spawns.begin();
        let sent = zygote::send(
            self.sock.as_raw_fd(),
            &Msg {
                id,
                ..Msg::new(zygote::SPAWN, 0)
            },
            fds,
        );
        if let Err(e) = sent {
            self.give_up(id);
            return Err(e);
        }
        let answer = self.answer(id, Instant::now() + SPAWN_ANSWER)?;
        match answer.kind {
            zygote::SPAWNED => Ok(answer.pid),
            _ => Err(std::io::Error::from_raw_os_error(answer.a as i32)),
        }
    }

    /// The zygote's answer to spawn request `id`, or an error at `deadline` or when the
    /// zygote is gone; an answer that comes later is nobody's (see [`Spawns`]).
    fn answer(&self, id: u64, deadline: Instant) -> std::io::Result<Msg> {
        let mut ends = self.ends();
        loop {
            if let Some(answer) = ends.spawns.take(id) {
                return Ok(answer);
            }
            let left = deadline.checked_duration_since(Instant::now());
            if ends.gone || left.is_none() {
                drop(ends);
                self.give_up(id);
                return Err(std::io::Error::other(if left.is_none() {
                    "the zygote did not answer"
                } else {
                    "the zygote has ended"
                }));
            }
            ends = self
                .changed
                .wait_timeout(ends, left.unwrap_or_default())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Spawn request `id` is given up; a worker already forked for it is killed.
    fn give_up(&self, id: u64) {
        let orphan = self.ends().spawns.give_up(id);
        if let Some(pid) = orphan {
            self.ends().orphans.insert(pid);
            self.kill(pid);
        }
    }

    fn kill(&self, pid: u32) {
        let _ = zygote::send(self.sock.as_raw_fd(), &Msg::new(zygote::KILL, pid), &[]);
    }

    /// The end of worker `pid`, once the zygote reports it, or `None` at `deadline`.
    /// A gone zygote took its workers with it: their end is unknown.
    fn wait(&self, pid: u32, deadline: Instant) -> Option<Ended> {
        let mut ends = self.ends();
        loop {
            if let Some(ended) = ends.by_pid.remove(&pid) {
                return Some(ended);
            }
            if ends.gone {
                return Some(Ended {
                    exit: Some(Exit::WithZygote),
                    ..Ended::default()
                });
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            ends = self
                .changed
                .wait_timeout(ends, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends the zygote (and any worker still its child) and reaps it.
    fn finish(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Linux gives a pipe 64 KiB unless memory is short, and never less than one page.
const PIPE_SURELY_HOLDS: usize = 4096;

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array with new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::zygote::{EXITED, SPARE, SPAWNED};

    fn fd() -> OwnedFd {
        OwnedFd::from(tempfile::tempfile().unwrap())
    }

    fn exited(pid: u32) -> Msg {
        Msg::new(EXITED, pid)
    }

    /// A spare that ends before it is handed a start is nobody's worker: its end is
    /// not kept for anyone to wait on, and it is no longer offered.
    #[test]
    fn a_spare_that_ends_unused_is_forgotten() {
        let mut ends = Ends::default();
        assert_eq!(ends.heard(Msg::new(SPARE, 7), vec![fd()]), None);
        assert_eq!(ends.heard(exited(7), vec![]), None);
        assert!(ends.spare.take().is_none());
        assert!(ends.by_pid.is_empty() && ends.orphans.is_empty());
    }

    /// Once handed a start, the spare is a worker: its end is kept for its supervisor.
    #[test]
    fn a_spare_handed_a_start_is_waited_for_like_any_worker() {
        let mut ends = Ends::default();
        ends.heard(Msg::new(SPARE, 7), vec![fd()]);
        assert_eq!(ends.spare.take().map(|(pid, _)| pid), Some(7));
        ends.heard(exited(7), vec![]);
        assert!(ends.by_pid.contains_key(&7));
    }

    /// A spare found gone at the handover leaves nothing behind, whichever comes first:
    /// the zygote's report of its end, or the failed handover.
    #[test]
    fn a_spare_gone_at_the_handover_leaves_no_end_behind() {
        for reported_first in [false, true] {
            let mut ends = Ends::default();
            ends.heard(Msg::new(SPARE, 7), vec![fd()]);
            let (pid, _) = ends.spare.take().unwrap();
            if reported_first {
                ends.heard(exited(pid), vec![]);
                ends.spare_gone(pid);
            } else {
                ends.spare_gone(pid);
                ends.heard(exited(pid), vec![]);
            }
            assert!(ends.by_pid.is_empty(), "reported first: {reported_first}");
            assert!(ends.orphans.is_empty(), "reported first: {reported_first}");
        }
    }

    /// A second spare replaces the first, whose end is then nobody's.
    #[test]
    fn a_replaced_spare_is_an_orphan() {
        let mut ends = Ends::default();
        ends.heard(Msg::new(SPARE, 7), vec![fd()]);
        ends.heard(Msg::new(SPARE, 8), vec![fd()]);
        ends.heard(exited(7), vec![]);
        assert!(ends.by_pid.is_empty() && ends.orphans.is_empty());
        assert_eq!(ends.spare.take().map(|(pid, _)| pid), Some(8));
    }

    /// A SPARE without its socket is not a spare; an answer nobody waits for names a
    /// worker to kill.
    #[test]
    fn malformed_and_unwanted_messages_offer_nothing() {
        let mut ends = Ends::default();
        ends.heard(Msg::new(SPARE, 7), vec![]);
        assert!(ends.spare.take().is_none());
        let stray = Msg {
            id: 99,
            ..Msg::new(SPAWNED, 12)
        };
        assert_eq!(ends.heard(stray, vec![]), Some(12));
        ends.heard(exited(12), vec![]);
        assert!(ends.by_pid.is_empty() && ends.orphans.is_empty());
    }
}
