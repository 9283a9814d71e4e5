//! The supervisor: one thread per module keeps that module's worker process alive.
//! It starts the worker, drives it (ticks on schedule, messages from its inbox), holds
//! every call to a wall-clock deadline, and when the worker dies says why and restarts
//! it after an exponential backoff, until too many crashes in the window mark the
//! module failed. A worker's death never touches the supervisor or other modules.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::abi::MAX_PUBLISH;
use kiln_protocol::clock::now_ms;
use kiln_protocol::names::{self, Kind};
use kiln_protocol::telemetry::{self, Body, Cause, Discarded, ModuleStats, Record};
use kiln_protocol::worker::{
    read_frame_within, write_frame, Done, FromWorker, Limits, Ready, Reply, Request, StartSpec,
    Stop, ToWorker, MAX_REPLY,
};

use crate::daemon::config::ModulePlan;
use crate::daemon::procfs;
use crate::daemon::rate::{Bucket, RateLimit};
use crate::daemon::spawn::{Ended, Exit, Process, Workers};
use crate::sandbox::capture::bound_line;

/// Frames read from a worker and not yet handled. When it is full the reader thread
/// stops reading, the pipe fills, and the worker blocks in its next `publish`: the
/// backpressure lands on that module alone. Frames are at most `worker::MAX_FRAME`.
const FRAME_QUEUE: usize = 8;

/// What one module may have in the queues between its supervisor and the telemetry
/// pipeline at once (records, and their payload bytes). The queues are shared by all
/// modules; this share is what keeps a module that bursts from filling them for the
/// others: its records beyond the share are its own loss, counted as `queue-full`.
const SHARE_RECORDS: usize = 256;
const SHARE_BYTES: usize = 16 * MAX_PUBLISH;

/// Longest pause after a record over the rate limit (see `Reporter::data`).
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// How often a module's discard counts are reported, at most.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What a module's supervisor counts, read by the stats sampler from another thread.
#[derive(Debug, Default)]
pub struct Counters {
    pid: AtomicU32,
    calls: AtomicU64,
    fuel_used: AtomicU64,
    memory_pages: AtomicU32,
    traps: AtomicU32,
    restarts: AtomicU32,
    /// CPU time of workers already reaped.
    ended_cpu_us: AtomicU64,
    /// Records discarded (rate limit, full queue, out of bounds) since the start; the
    /// telemetry reports them per interval as `Discarded` records.
    discarded_records: AtomicU64,
    discarded_bytes: AtomicU64,
}

impl Counters {
    fn called(&self, done: &Done) {
        self.calls.fetch_add(1, Relaxed);
        self.fuel_used
            .fetch_add(done.fuel_used.unwrap_or(0), Relaxed);
        self.memory_pages.store(done.memory_pages, Relaxed);
    }

    pub fn stats(&self) -> ModuleStats {
        let pid = self.pid.load(Relaxed);
        let running = (pid != 0).then_some(pid);
        let cpu_us =
            self.ended_cpu_us.load(Relaxed) + running.and_then(procfs::cpu_us).unwrap_or(0);
        ModuleStats {
            cpu_ms: cpu_us / 1000,
            rss_kib: running.and_then(procfs::rss_kib),
            memory_pages: self.memory_pages.load(Relaxed),
            calls: self.calls.load(Relaxed),
            fuel_used: self.fuel_used.load(Relaxed),
            traps: self.traps.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
        }
    }

    /// Records and payload bytes discarded since the module started.
    pub fn discarded(&self) -> (u64, u64) {
        (
            self.discarded_records.load(Relaxed),
            self.discarded_bytes.load(Relaxed),
        )
    }
}

/// How much of its share a module is using.
#[derive(Debug, Default)]
struct Share {
    records: AtomicUsize,
    bytes: AtomicUsize,
}

/// A queued record's claim on its module's share, given back when the record leaves
/// the last queue (when this is dropped).
#[derive(Debug)]
pub struct Slot {
    share: Arc<Share>,
    bytes: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.share.records.fetch_sub(1, Relaxed);
        self.share.bytes.fetch_sub(self.bytes, Relaxed);
    }
}

/// A record on its way to the records loop, with its claim on the module's share
/// (none for starts, stops and counts, which do not count against it).
pub type Queued = (Record, Option<Slot>);

/// A message for a module's `kiln_on_message`: topic and bytes.
pub type Message = (String, Vec<u8>);

/// What a module's supervisor thread acts on between calls.
#[derive(Debug)]
pub enum Input {
    Message(Message),
    /// Replace the running worker with one for this plan (new artifact or config).
    Swap(Box<ModulePlan>),
    /// End the worker and the module.
    Stop,
    /// New rate limits, taken at once without restarting the worker.
    Limit(RateLimit),
}

pub struct Supervised {
    pub plan: ModulePlan,
    pub trusted_keys: Vec<String>,
    pub inbox: Receiver<Input>,
    pub counters: Arc<Counters>,
    pub rate: RateLimit,
}

/// Where a module's records go, and what is counted on the way: its rate limit, the
/// bounds on what a frame may carry, and a full records queue. Only the module's own
/// supervisor thread uses it.
pub struct Reporter {
    name: String,
    sink: SyncSender<Queued>,
    counters: Arc<Counters>,
    share: Arc<Share>,
    state: RefCell<ReportState>,
}

struct ReportState {
    bucket: Bucket,
    /// Discards not yet reported, by cause.
    pending: Vec<Discarded>,
    reported: Instant,
    /// Pausing a flooding module is kilnd's doing, not the module's: it may take at
    /// most the first half of the call's time limit, never push it into its watchdog.
    pause_until: Option<Instant>,
}

impl Reporter {
    pub fn new(
        name: String,
        sink: SyncSender<Queued>,
        counters: Arc<Counters>,
        rate: RateLimit,
    ) -> Self {
        Self {
            name,
            sink,
            counters,
            share: Arc::default(),
            state: RefCell::new(ReportState {
                bucket: Bucket::new(rate, Instant::now()),
                pending: Vec::new(),
                reported: Instant::now(),
                pause_until: None,
            }),
        }
    }

    fn record(&self, body: Body) -> Record {
        Record {
            at_ms: now_ms(),
            module: Some(self.name.clone()),
            body,
        }
    }

    /// A start, a stop, a failure: rare, and the fleet agent acts on them, so they
    /// wait for room in the queue.
    pub fn event(&self, body: Body) {
        let _ = self.sink.send((self.record(body), None));
    }

    /// What the module published or logged: within its rate, and only if the queue
    /// has room, so a flood never blocks this thread or the other modules' ones.
    fn data(&self, body: Body, bytes: usize) {
        let now = Instant::now();
        let admitted = self.state.borrow_mut().bucket.admit(bytes, now);
        if !admitted {
            self.discard(Cause::RateLimit, 1, bytes as u64);
            // Dropping costs a frame read and decoded; a module publishing in a tight
            // loop would keep a core busy on it, starving kilnd's other threads. So
            // the supervisor stops reading until the bucket would take a record: the
            // pipe fills and the module waits in its own `publish`.
            let state = self.state.borrow();
            let mut pause = state.bucket.wait(bytes, now).min(MAX_PAUSE);
            if let Some(until) = state.pause_until {
                pause = pause.min(until.saturating_duration_since(now));
            }
            drop(state);
            std::thread::sleep(pause);
            return;
        }
        let share = &self.share;
        if share.records.load(Relaxed) >= SHARE_RECORDS
            || share.bytes.load(Relaxed) + bytes > SHARE_BYTES
        {
            return self.discard(Cause::Queue, 1, bytes as u64);
        }
        share.records.fetch_add(1, Relaxed);
        share.bytes.fetch_add(bytes, Relaxed);
        let slot = Slot {
            share: share.clone(),
            bytes,
        };
        match self.sink.try_send((self.record(body), Some(slot))) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => self.flush(false),
            Err(TrySendError::Full(_)) => self.discard(Cause::Queue, 1, bytes as u64),
        }
    }

    fn discard(&self, cause: Cause, records: u64, bytes: u64) {
        self.counters.discarded_records.fetch_add(records, Relaxed);
        self.counters.discarded_bytes.fetch_add(bytes, Relaxed);
        {
            let mut state = self.state.borrow_mut();
            match state.pending.iter_mut().find(|d| d.cause == cause) {
                Some(d) => {
                    d.records += records;
                    d.bytes += bytes;
                }
                None => state.pending.push(Discarded {
                    cause,
                    records,
                    bytes,
                }),
            }
        }
        self.flush(false);
    }

    /// Reports the counts gathered since the last report, once per interval (or now,
    /// with `wait`, when the worker ends). A count that finds the queue full stays for
    /// the next report: counts are never lost, only late.
    fn flush(&self, wait: bool) {
        let mut state = self.state.borrow_mut();
        if state.pending.is_empty() || (!wait && state.reported.elapsed() < REPORT_EVERY) {
            return;
        }
        state.reported = Instant::now();
        while let Some(d) = state.pending.first().copied() {
            let record = self.record(Body::Discarded(d));
            let sent = if wait {
                self.sink.send((record, None)).is_ok()
            } else {
                !matches!(
                    self.sink.try_send((record, None)),
                    Err(TrySendError::Full(_))
                )
            };
            if !sent {
                break;
            }
            tracing::warn!(module = %self.name, cause = d.cause.as_str(), records = d.records, bytes = d.bytes, "records discarded");
            state.pending.remove(0);
        }
    }

    /// A call starts that must end by `deadline`, `limit` after it started.
    fn call_started(&self, deadline: Option<Instant>, limit: Option<Duration>) {
        self.state.borrow_mut().pause_until =
            deadline.zip(limit).and_then(|(d, l)| d.checked_sub(l / 2));
    }

    fn checked(&self, checked: Checked) {
        if let Some((cause, bytes)) = checked.discard {
            self.discard(cause, 1, bytes);
        }
        if let Some((body, bytes)) = checked.forward {
            self.data(body, bytes);
        }
    }

    fn set_rate(&self, rate: RateLimit) {
        self.state.borrow_mut().bucket.set(rate);
    }
}

/// Keeps `module` running until it ends cleanly, is stopped, or is marked failed.
pub fn supervise(mut module: Supervised, workers: Arc<Workers>, sink: SyncSender<Queued>) {
    let name = module.plan.name.clone();
    let reporter = Reporter::new(name.clone(), sink, module.counters.clone(), module.rate);
    let report = |body: Body| reporter.event(body);
    let mut crashes: Vec<Instant> = Vec::new();
    let mut attempt = 0;
    let mut next: Option<ModulePlan> = None;
    loop {
        if let Some(plan) = next.take() {
            module.plan = plan;
            crashes.clear();
        }
        let policy = module.plan.restart;
        attempt += 1;
        let started = Instant::now();
        let (reason, peak_rss_kib) = run_worker(&module, &workers, attempt, &mut next, &reporter);
        reporter.flush(true);
        let uptime_ms = started.elapsed().as_millis() as u64;
        if reason.is_clean() {
            let swap = next.is_some();
            report(stopped(
                &reason,
                uptime_ms,
                peak_rss_kib,
                crashes.len() as u32,
                swap.then_some(0),
            ));
            if swap {
                continue;
            }
            return;
        }
        if matches!(
            reason,
            Stop::Trap { .. } | Stop::FuelExhausted { .. } | Stop::Watchdog { .. }
        ) {
            module.counters.traps.fetch_add(1, Relaxed);
        }
        crashes.retain(|t| t.elapsed() < policy.window());
        crashes.push(Instant::now());
        let n = crashes.len() as u32;
        // A refused artifact is refused again on every attempt: nothing to retry.
        let give_up = n >= policy.max_crashes || matches!(reason, Stop::LoadFailed { .. });
        let delay = policy.delay(n);
        tracing::warn!(module = %name, %reason, crashes = n, "worker stopped");
        report(stopped(
            &reason,
            uptime_ms,
            peak_rss_kib,
            n,
            (!give_up).then_some(delay.as_millis() as u64),
        ));
        if give_up {
            tracing::error!(module = %name, crashes = n, "module failed; not restarting");
            report(Body::Failed {
                crashes: n,
                window_s: policy.window_s,
            });
            return;
        }
        // Wait out the backoff, still listening for a swap or a stop; messages for a
        // module that is down are dropped.
        let until = Instant::now() + delay;
        loop {
            match module
                .inbox
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(Input::Message(_)) => continue,
                Ok(Input::Limit(rate)) => {
                    reporter.set_rate(rate);
                    continue;
                }
                Ok(Input::Swap(plan)) => next = Some(*plan),
                Ok(Input::Stop) => {
                    report(stopped(&Stop::Requested { swap: false }, 0, None, n, None));
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()))
                }
            }
            break;
        }
        // A restart after a crash; a swap is not one.
        module.counters.restarts.fetch_add(1, Relaxed);
    }
}

/// One worker's life, from spawn to death; returns why it ended and its peak RSS.
fn run_worker(
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
    let stop = (|| -> Result<(), Stop> {
        let ready = worker.await_ready(plan.start_timeout, reporter)?;
        counters.memory_pages.store(ready.memory_pages, Relaxed);
        let rss_kib = procfs::rss_kib(process.pid);
        if ready.command {
            let done = worker.call(Request::Run, "_start", plan.run_timeout, reporter)?;
            counters.called(&done);
            return Err(Stop::Exited(done.status));
        }
        let first_tick = if ready.ticks {
            let done = worker.call(Request::Tick, "kiln_tick", Some(plan.timeout), reporter)?;
            counters.called(&done);
            Some(done)
        } else {
            None
        };
        report(started(
            attempt,
            process.pid,
            &ready,
            spawned.elapsed().as_micros() as u64,
            first_tick.as_ref(),
            rss_kib,
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
            if done.status != 0 && call == "kiln_tick" {
                report(Body::TickFailed {
                    status: done.status,
                });
            }
        }
    })()
    .err()
    .unwrap_or_else(|| Stop::Lost("worker loop ended".into()));
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

/// The supervisor's end of one worker's pipes.
struct Worker<'a> {
    stdin: Option<BufWriter<File>>,
    frames: Receiver<Result<Reply, String>>,
    process: &'a Process,
}

impl<'a> Worker<'a> {
    fn attach(stdin: File, stdout: File, process: &'a Process) -> Self {
        let (tx, frames) = mpsc::sync_channel(FRAME_QUEUE);
        std::thread::spawn(move || {
            // Workers write their records in batches (see `sandbox::worker`).
            let mut input = BufReader::with_capacity(64 * 1024, stdout);
            loop {
                let frame = match read_frame_within::<FromWorker>(&mut input, MAX_REPLY) {
                    Ok(Some(FromWorker::V1(reply))) => Ok(reply),
                    Ok(None) => return,
                    Err(e) => Err(e.to_string()),
                };
                let broken = frame.is_err();
                if tx.send(frame).is_err() || broken {
                    return;
                }
            }
        });
        Self {
            stdin: Some(BufWriter::new(stdin)),
            frames,
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
        loop {
            let frame = match deadline {
                Some(d) => match self
                    .frames
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                {
                    Ok(frame) => frame,
                    Err(RecvTimeoutError::Timeout) => {
                        self.process.kill();
                        return Err(Stop::Watchdog {
                            call: call.into(),
                            limit_ms: limit.map_or(0, |l| l.as_millis() as u64),
                        });
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(self.gone("the worker closed its pipe".into()))
                    }
                },
                None => self
                    .frames
                    .recv()
                    .map_err(|_| self.gone("the worker closed its pipe".into()))?,
            };
            match frame.map_err(|e| Stop::Lost(format!("broken frame from the worker: {e}")))? {
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

/// A record frame checked against the ABI's bounds again: what goes on (with its
/// payload size), and what was cut or dropped (cause, payload bytes).
#[derive(Debug, PartialEq)]
struct Checked {
    forward: Option<(Body, usize)>,
    discard: Option<(Cause, u64)>,
}

fn check(body: Body) -> Checked {
    match body {
        Body::Telemetry { stream, data } => {
            let size = data.len() as u64;
            let discard = if names::check(Kind::Stream, &stream).is_err() {
                Some((Cause::Invalid, size))
            } else if data.len() > MAX_PUBLISH {
                Some((Cause::Oversized, size))
            } else {
                None
            };
            let bytes = data.len();
            let forward = match discard {
                None => Some((Body::Telemetry { stream, data }, bytes)),
                Some(_) => None,
            };
            Checked { forward, discard }
        }
        Body::Log {
            level,
            source,
            line,
        } => {
            let (line, cut) = match bound_line(&line) {
                (_, 0) => (line, 0),
                bounded => bounded,
            };
            let bytes = line.len();
            Checked {
                forward: Some((
                    Body::Log {
                        level,
                        source,
                        line,
                    },
                    bytes,
                )),
                discard: (cut > 0).then_some((Cause::Oversized, cut)),
            }
        }
        other => Checked {
            forward: Some((other, 0)),
            discard: None,
        },
    }
}

/// A worker came up: its start-up split and first tick, as telemetry reports it.
fn started(
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
fn stopped(
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

fn signal_name(signal: i32) -> &'static str {
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

/// A bounded inbox per module: a slow module drops messages instead of growing the
/// supervisor's memory.
pub fn inbox() -> (SyncSender<Input>, Receiver<Input>) {
    mpsc::sync_channel(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::abi::{Level, MAX_LOG};
    use kiln_protocol::worker::LogSource;

    #[test]
    fn frames_out_of_the_abis_bounds_are_cut_or_dropped_and_counted() {
        let telemetry = |stream: &str, n: usize| Body::Telemetry {
            stream: stream.into(),
            data: vec![1; n],
        };
        let ok = check(telemetry("temp", MAX_PUBLISH));
        assert_eq!(ok.discard, None);
        assert_eq!(ok.forward.unwrap().1, MAX_PUBLISH);
        for (stream, n, cause) in [
            ("temp", MAX_PUBLISH + 1, Cause::Oversized),
            ("a/b", 3, Cause::Invalid),
            ("#", 3, Cause::Invalid),
            ("", 3, Cause::Invalid),
        ] {
            let dropped = check(telemetry(stream, n));
            assert_eq!(dropped.forward, None, "{stream}");
            assert_eq!(dropped.discard, Some((cause, n as u64)), "{stream}");
        }
        let long = check(Body::Log {
            level: Level::Info,
            source: LogSource::Abi,
            line: "x".repeat(3 << 20),
        });
        let (Body::Log { line, .. }, bytes) = long.forward.unwrap() else {
            panic!("a log line stays a log line");
        };
        assert!(line.len() <= MAX_LOG && bytes == line.len());
        let (cause, cut) = long.discard.unwrap();
        assert_eq!(cause, Cause::Oversized);
        assert!(
            line.ends_with(&format!(" [cut: {cut} bytes]")),
            "{}",
            &line[4000..]
        );
    }
}
