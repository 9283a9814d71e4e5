//! One worker's life as the supervisor sees it: spawning it with its Start frame,
//! driving its calls (ticks, messages, `_start`) to their deadlines, and why it ended.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use kiln_protocol::telemetry::{self, Body};
use kiln_protocol::worker::{
    read_frame_within, write_frame, Done, FromWorker, Limits, Ready, Reply, Request, StartSpec,
    Stop, ToWorker, MAX_REPLY,
};

use super::report::{check, Reporter};
use super::{Answer, Input, Supervised};
use crate::daemon::config::ModulePlan;
use crate::daemon::procfs;
use crate::daemon::spawn::{Ended, Exit, Process, Workers};
use crate::sandbox::capture::bound_line;
use kiln_protocol::command::Outcome;

/// One worker's life, from spawn to death; returns why it ended and its peak RSS.
pub(super) fn run_worker(
    module: &Supervised,
    workers: &Workers,
    attempt: u32,
    next: &mut Option<ModulePlan>,
    reporter: &Reporter,
) -> (Stop, Option<u64>) {
    let report = |body: Body| reporter.event(body);
    let plan = &module.plan;
    let spawned = Instant::now();
    let spec = StartSpec {
        artifact: plan.artifact.display().to_string(),
        trusted_keys: if plan.trusted_keys.is_empty() {
            module.trusted_keys.clone()
        } else {
            plan.trusted_keys.clone()
        },
        config: plan.config.clone(),
        limits: Limits {
            memory_pages: plan.memory_pages,
            fuel_per_call: plan.fuel_per_call,
        },
        args: plan.args.clone(),
        env: plan.env.clone(),
        dirs: plan
            .dirs
            .iter()
            .map(|d| (d.host.display().to_string(), d.guest.clone()))
            .collect(),
        expect: plan.expect.clone(),
        grants: plan.grants.clone(),
        first_tick: true,
    };
    // The Start frame goes with the spawn: a forked worker finds it waiting in its
    // pipe and starts loading while the zygote is still answering.
    let mut start = Vec::new();
    if let Err(e) = write_frame(&mut start, &ToWorker::V1(Request::Start(Box::new(spec)))) {
        return (
            Stop::Lost(format!("cannot encode the Start frame: {e}")),
            None,
        );
    }
    let mut process = match workers.spawn(&start) {
        Ok(process) => process,
        Err(e) => {
            return (
                Stop::Lost(format!("cannot start a worker ({:?}): {e}", workers.exe())),
                None,
            )
        }
    };
    let counters = &module.counters;
    counters.pid.store(process.pid, Relaxed);
    let Some((stdin, stdout)) = process.take_pipes() else {
        return (Stop::Lost("a worker without pipes".into()), None);
    };
    let mut worker = Worker::attach(stdin, stdout, &process);
    // A command being delivered: answered when its call ends, or with why it did not.
    let mut pending: Option<Answer> = None;
    let stop = (|| -> Result<(), Stop> {
        let ready = worker.await_ready(plan.start_timeout, reporter)?;
        counters.memory_pages.store(ready.memory_pages, Relaxed);
        if ready.command {
            let done = worker.call(Request::Run, "_start", plan.run_timeout, reporter)?;
            counters.called(&done);
            return Err(Stop::Exited(done.status));
        }
        // The worker ticks once right after Ready by itself (`first_tick` above).
        let first_tick = if ready.ticks {
            let done = worker.await_done("kiln_tick", Some(plan.timeout), reporter)?;
            counters.called(&done);
            Some(done)
        } else {
            None
        };
        // The start ends with the first tick; the resident memory is read after it,
        // off the worker's start.
        let start_us = spawned.elapsed().as_micros() as u64;
        report(started(
            attempt,
            process.pid,
            &ready,
            start_us,
            first_tick.as_ref(),
            procfs::rss_kib(process.pid),
        ));
        if let Some(done) = first_tick.filter(|d| d.status != 0) {
            report(Body::TickFailed {
                status: done.status,
            });
        }
        let mut next_tick = Instant::now() + plan.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let (request, call) = match module.inbox.recv_timeout(if ready.ticks {
                wait
            } else {
                Duration::from_secs(3600)
            }) {
                Ok(Input::Message((topic, data))) => {
                    (Request::Message { topic, data }, "kiln_on_message")
                }
                Ok(Input::Command((topic, data), answer)) => {
                    pending = Some(answer);
                    worker.answer = None;
                    (Request::Message { topic, data }, "kiln_on_message")
                }
                Ok(Input::Swap(plan)) => {
                    *next = Some(*plan);
                    return Err(Stop::Requested { swap: true });
                }
                Ok(Input::Stop) => return Err(Stop::Requested { swap: false }),
                Ok(Input::Limit(rate)) => {
                    reporter.set_rate(rate);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) if ready.ticks => {
                    next_tick += plan.tick;
                    (Request::Tick, "kiln_tick")
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(wait);
                    next_tick += plan.tick;
                    (Request::Tick, "kiln_tick")
                }
            };
            let done = worker.call(request, call, Some(plan.timeout), reporter)?;
            reporter.flush(false);
            counters.called(&done);
            if let Some(answer) = pending.take() {
                answer.give(Outcome::Answered {
                    status: done.status,
                    data: worker.answer.take().unwrap_or_default(),
                });
            }
            if done.status != 0 && call == "kiln_tick" {
                report(Body::TickFailed {
                    status: done.status,
                });
            }
        }
    })()
    .err()
    .unwrap_or_else(|| Stop::Lost("worker loop ended".into()));
    if let Some(answer) = pending.take() {
        answer.give(Outcome::Failed(format!(
            "the module's worker stopped: {stop}"
        )));
    }
    drop(worker);
    let Ended {
        exit: status,
        peak_rss_kib: peak,
        cpu_us,
    } = process.reap(Duration::from_secs(2));
    counters.pid.store(0, Relaxed);
    counters.ended_cpu_us.fetch_add(cpu_us, Relaxed);
    // A worker that died on its own without a last word: its exit status says why.
    let stop = match (stop, status) {
        (Stop::Lost(_), Some(Exit::Signal(signal))) => Stop::Signal {
            signal,
            name: signal_name(signal).into(),
        },
        (Stop::Lost(why), Some(Exit::Code(code))) => {
            Stop::Lost(format!("{why}; it exited with code {code}"))
        }
        (Stop::Lost(why), Some(Exit::WithZygote)) => Stop::Lost(format!(
            "{why}; the zygote that forked it died, and it with it"
        )),
        (stop, _) => stop,
    };
    (stop, peak)
}

/// A worker's stdout, read by the supervisor's own thread while a call runs: each read
/// waits in poll(2) until bytes come, the pipe closes or the call's deadline passes
/// (`TimedOut`). Between calls nobody reads, so a module that writes more than the
/// pipe holds blocks in its own `publish`: the backpressure lands on it alone.
struct ReplyPipe {
    stdout: File,
    deadline: Option<Instant>,
}

impl Read for ReplyPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: a wait never ends just short of the deadline and spins.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            if !crate::poll::ready(self.stdout.as_raw_fd(), libc::POLLIN, ms)? {
                return Err(io::ErrorKind::TimedOut.into());
            }
        }
        self.stdout.read(buf)
    }
}

/// The supervisor's end of one worker's pipes.
pub(super) struct Worker<'a> {
    /// The reply the module gave to the command being delivered.
    answer: Option<Vec<u8>>,
    stdin: Option<BufWriter<File>>,
    /// Workers write their records in batches (see `sandbox::worker`).
    replies: BufReader<ReplyPipe>,
    process: &'a Process,
}

impl<'a> Worker<'a> {
    fn attach(stdin: File, stdout: File, process: &'a Process) -> Self {
        Self {
            answer: None,
            stdin: Some(BufWriter::new(stdin)),
            replies: BufReader::with_capacity(
                64 * 1024,
                ReplyPipe {
                    stdout,
                    deadline: None,
                },
            ),
            process,
        }
    }

    fn send(&mut self, request: Request) -> Result<(), Stop> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Stop::Lost("worker stdin closed".into()))?;
        write_frame(stdin, &ToWorker::V1(request)).map_err(|e| self.gone(e.to_string()))
    }

    /// Waits for the next frame that is not a record, forwarding records on the way.
    /// The worker checked them already; they are checked again here, because a frame
    /// that slipped past (a bug, a worker built from other sources) must not reach the
    /// link as it is: out of bounds is cut (a log line) or dropped, and counted.
    fn next(
        &mut self,
        deadline: Option<Instant>,
        call: &str,
        limit: Option<Duration>,
        reporter: &Reporter,
    ) -> Result<Reply, Stop> {
        reporter.call_started(deadline, limit);
        self.replies.get_mut().deadline = deadline;
        loop {
            let frame = match read_frame_within::<FromWorker>(&mut self.replies, MAX_REPLY) {
                Ok(Some(FromWorker::V1(reply))) => reply,
                Ok(None) => return Err(self.gone("the worker closed its pipe".into())),
                // Past the deadline; a frame cut off by it does not matter, the worker
                // is killed.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    self.process.kill();
                    return Err(Stop::Watchdog {
                        call: call.into(),
                        limit_ms: limit.map_or(0, |l| l.as_millis() as u64),
                    });
                }
                Err(e) => return Err(Stop::Lost(format!("broken frame from the worker: {e}"))),
            };
            match frame {
                Reply::Telemetry { stream, data } => {
                    let checked = check(Body::Telemetry { stream, data });
                    reporter.checked(checked);
                }
                Reply::Log {
                    level,
                    source,
                    line,
                } => {
                    let checked = check(Body::Log {
                        level,
                        source,
                        line,
                    });
                    reporter.checked(checked);
                }
                Reply::Fatal(stop) => return Err(stop),
                // Bounded by the worker's ABI; checked again, as records are.
                Reply::Answer { mut data } => {
                    data.truncate(kiln_protocol::abi::MAX_REPLY);
                    self.answer = Some(data);
                }
                other => return Ok(other),
            }
        }
    }

    fn await_ready(&mut self, limit: Duration, reporter: &Reporter) -> Result<Ready, Stop> {
        match self.next(Some(Instant::now() + limit), "start", Some(limit), reporter)? {
            Reply::Ready(ready) => Ok(ready),
            other => Err(Stop::Lost(format!("expected Ready, got {other:?}"))),
        }
    }

    fn call(
        &mut self,
        request: Request,
        call: &str,
        limit: Option<Duration>,
        reporter: &Reporter,
    ) -> Result<Done, Stop> {
        self.send(request)?;
        self.await_done(call, limit, reporter)
    }

    /// The `Done` of a call the worker is making, within `limit` from now.
    fn await_done(
        &mut self,
        call: &str,
        limit: Option<Duration>,
        reporter: &Reporter,
    ) -> Result<Done, Stop> {
        let deadline = limit.map(|l| Instant::now() + l);
        match self.next(deadline, call, limit, reporter)? {
            Reply::Done(done) => Ok(done),
            other => Err(Stop::Lost(format!("expected Done, got {other:?}"))),
        }
    }

    fn gone(&self, why: String) -> Stop {
        Stop::Lost(why)
    }
}

/// A worker came up: its start-up split and first tick, as telemetry reports it.
pub(super) fn started(
    attempt: u32,
    pid: u32,
    ready: &Ready,
    start_us: u64,
    first_tick: Option<&Done>,
    rss_kib: Option<u64>,
) -> Body {
    Body::Started(telemetry::Started {
        attempt,
        pid,
        version: ready.version,
        command: ready.command,
        start_us,
        verify_us: ready.verify_us,
        deserialize_us: ready.deserialize_us,
        instantiate_us: ready.instantiate_us,
        init_us: ready.init_us,
        first_tick_us: first_tick.map(|d| d.elapsed_us),
        fuel_used: first_tick.and_then(|d| d.fuel_used),
        memory_pages: ready.memory_pages,
        rss_kib,
    })
}

/// A worker ended, and why.
pub(super) fn stopped(
    reason: &Stop,
    uptime_ms: u64,
    peak_rss_kib: Option<u64>,
    crashes_in_window: u32,
    restart_in_ms: Option<u64>,
) -> Body {
    Body::Stopped(telemetry::Stopped {
        reason: reason.kind().into(),
        // A trap message comes from the worker: bounded like a log line.
        why: bound_line(&reason.to_string()).0,
        exit_code: match reason {
            Stop::Exited(c) => Some(*c),
            _ => None,
        },
        uptime_ms,
        peak_rss_kib,
        crashes_in_window,
        restart_in_ms,
    })
}

pub(super) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::worker::write_frame;
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array with descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    /// Replies already in the pipe are read at once; with none, a read ends at the
    /// deadline (the supervisor's watchdog) rather than blocking; a closed pipe ends.
    #[test]
    fn replies_are_read_until_the_deadline_and_then_time_out() {
        let (read, mut write) = pipe();
        let mut replies = BufReader::new(ReplyPipe {
            stdout: read,
            deadline: Some(Instant::now() + Duration::from_secs(5)),
        });
        let mut frames = Vec::new();
        for n in 1..=2 {
            let done = Done {
                status: n,
                elapsed_us: 0,
                fuel_used: None,
                memory_pages: 1,
            };
            write_frame(&mut frames, &FromWorker::V1(Reply::Done(done))).unwrap();
        }
        write.write_all(&frames).unwrap();
        for n in 1..=2 {
            let Some(FromWorker::V1(Reply::Done(done))) =
                read_frame_within::<FromWorker>(&mut replies, MAX_REPLY).unwrap()
            else {
                panic!("a Done frame");
            };
            assert_eq!(done.status, n);
        }
        let started = Instant::now();
        replies.get_mut().deadline = Some(started + Duration::from_millis(50));
        let err = read_frame_within::<FromWorker>(&mut replies, MAX_REPLY).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(write);
        replies.get_mut().deadline = Some(Instant::now() + Duration::from_secs(5));
        assert!(read_frame_within::<FromWorker>(&mut replies, MAX_REPLY)
            .unwrap()
            .is_none());
    }
}
