//! Where a module's records go, and what is counted on the way: its counters, its
//! share of the queues, its rate limit, and the ABI's bounds checked again.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::abi::MAX_PUBLISH;
use kiln_protocol::clock::now_ms;
use kiln_protocol::names::{self, Kind};
use kiln_protocol::telemetry::{Body, Cause, Discarded, ModuleStats, Record};
use kiln_protocol::worker::Done;

use crate::daemon::procfs;
use crate::daemon::rate::{Bucket, RateLimit};
use crate::sandbox::capture::bound_line;

/// What one module may have in the queues between its supervisor and the telemetry
/// pipeline at once (records, and their payload bytes). The queues are shared by all
/// modules; this share is what keeps a module that bursts from filling them for the
/// others: its records beyond the share are its own loss, counted as `queue-full`.
pub(super) const SHARE_RECORDS: usize = 256;
pub(super) const SHARE_BYTES: usize = 16 * MAX_PUBLISH;

/// Longest pause after a record over the rate limit (see `Reporter::data`).
pub(super) const MAX_PAUSE: Duration = Duration::from_millis(100);

/// How often a module's discard counts are reported, at most.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What a module's supervisor counts, read by the stats sampler from another thread.
#[derive(Debug, Default)]
pub struct Counters {
    pub(super) pid: AtomicU32,
    calls: AtomicU64,
    fuel_used: AtomicU64,
    pub(super) memory_pages: AtomicU32,
    pub(super) traps: AtomicU32,
    pub(super) restarts: AtomicU32,
    /// CPU time of workers already reaped.
    pub(super) ended_cpu_us: AtomicU64,
    /// Records discarded (rate limit, full queue, out of bounds) since the start; the
    /// telemetry reports them per interval as `Discarded` records.
    discarded_records: AtomicU64,
    discarded_bytes: AtomicU64,
}

impl Counters {
    pub(super) fn called(&self, done: &Done) {
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
pub(super) struct Share {
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
/// (none for starts, stops and counts, which do not count against it). Boxed: the
/// queue's buffer is allocated whole when it is made, 4,096 slots of a pointer
/// rather than of a record (672 KiB of serve's memory, for a queue that is mostly
/// empty).
pub type Queued = Box<(Record, Option<Slot>)>;

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

pub(super) struct ReportState {
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
        let _ = self.sink.send(Box::new((self.record(body), None)));
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
        match self
            .sink
            .try_send(Box::new((self.record(body), Some(slot))))
        {
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
    pub(super) fn flush(&self, wait: bool) {
        let mut state = self.state.borrow_mut();
        if state.pending.is_empty() || (!wait && state.reported.elapsed() < REPORT_EVERY) {
            return;
        }
        state.reported = Instant::now();
        while let Some(d) = state.pending.first().copied() {
            let record = self.record(Body::Discarded(d));
            let sent = if wait {
                self.sink.send(Box::new((record, None))).is_ok()
            } else {
                !matches!(
                    self.sink.try_send(Box::new((record, None))),
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
    pub(super) fn call_started(&self, deadline: Option<Instant>, limit: Option<Duration>) {
        self.state.borrow_mut().pause_until =
            deadline.zip(limit).and_then(|(d, l)| d.checked_sub(l / 2));
    }

    pub(super) fn checked(&self, checked: Checked) {
        if let Some((cause, bytes)) = checked.discard {
            self.discard(cause, 1, bytes);
        }
        if let Some((body, bytes)) = checked.forward {
            self.data(body, bytes);
        }
    }

    pub(super) fn set_rate(&self, rate: RateLimit) {
        self.state.borrow_mut().bucket.set(rate);
    }
}

/// A record frame checked against the ABI's bounds again: what goes on (with its
/// payload size), and what was cut or dropped (cause, payload bytes).
#[derive(Debug, PartialEq)]
pub(super) struct Checked {
    pub(super) forward: Option<(Body, usize)>,
    pub(super) discard: Option<(Cause, u64)>,
}

pub(super) fn check(body: Body) -> Checked {
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
