//! Telemetry on the wire: what a device publishes on `devices/{id}/telemetry`.
//!
//! A device sends [`Batch`]es, postcard-encoded and tagged by version, QoS 1. Each
//! batch carries the device id, the `boot_id` of the kilnd process that made it (random
//! per start) and a `seq` that counts batches from 0 within that boot. A consumer
//! keys batches by `(device, boot_id, seq)`: a seq seen twice is a duplicate (QoS 1
//! delivers at least once, a restarted kilnd replays its spool), a seq never seen is a
//! gap, unless a [`Dropped`] record says the device's bounded spool dropped it.
//! [`Tracker`] does that bookkeeping for `kiln watch` and anything else that consumes
//! telemetry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::abi::Level;
use crate::worker::LogSource;

/// Largest encoded batch: a consumer refuses anything larger, and a device seals
/// every batch under it (splitting records over several batches). `mqtt::MAX_PACKET`
/// is checked to leave room for it plus the topic and MQTT framing.
pub const MAX_BATCH: usize = 1024 * 1024;

/// What a batch's envelope (version tag, device id, boot id, seq, record count) may
/// take besides its records, with a device id at its longest.
pub const BATCH_OVERHEAD: usize = 1 + (1 + crate::names::MAX_NAME) + 10 + 10 + 5;

/// Largest encoded record a batch can carry. A record over it (which the bounds on
/// streams, payloads and log lines keep from happening) is replaced by a count.
pub const MAX_RECORD: usize = MAX_BATCH - BATCH_OVERHEAD;

/// Room a device keeps in every batch for the drop reports sealing may add to it
/// (coalesced ranges: a handful, 40 bytes each).
pub const DROP_REPORT_ROOM: usize = 16 * 1024;

/// The bound on the records of one batch a device seals (and so on kilnd.toml's
/// `batch_bytes`).
pub const RECORDS_BUDGET: usize = MAX_RECORD - DROP_REPORT_ROOM;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Batch {
    V1(BatchV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchV1 {
    pub device: String,
    pub boot_id: u64,
    pub seq: u64,
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Wall clock on the device, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The module it is about; `None` for kilnd itself.
    pub module: Option<String>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// What a module published with `kiln.publish`.
    Telemetry {
        stream: String,
        data: Vec<u8>,
    },
    /// A module's `kiln.log` line, or a line of its captured stdout/stderr.
    Log {
        level: Level,
        source: LogSource,
        line: String,
    },
    Started(Started),
    /// `kiln_tick` returned a non-zero status.
    TickFailed {
        status: i32,
    },
    Stopped(Stopped),
    /// The supervisor gave up on the module: too many crashes in the window.
    Failed {
        crashes: u32,
        window_s: u64,
    },
    ModuleStats(ModuleStats),
    DeviceStats(DeviceStats),
    /// Batches the device's spool dropped, oldest first, because it was full.
    Dropped(Dropped),
    /// Records kilnd discarded (or could not spool) since its last report of this
    /// cause for this module (`module: None`: kilnd's own stages). Appended last so
    /// batches written before it existed still decode.
    Discarded(Discarded),
}

/// A count of records that did not go on as they came, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discarded {
    pub cause: Cause,
    pub records: u64,
    /// Payload bytes of those records (data, or log line).
    pub bytes: u64,
}

/// Why records were discarded. New causes are appended last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// The module published or logged faster than its rate limit allows.
    RateLimit,
    /// A queue between kilnd's stages was full (the next stage is not keeping up).
    Queue,
    /// A frame or record over its size bound: cut to the bound, or dropped.
    Oversized,
    /// The spool could not be written: the batch was published without it, and is
    /// lost if the broker does not acknowledge it.
    Unspooled,
    /// A frame from a worker that broke the ABI's rules (a stream name it refuses).
    Invalid,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::RateLimit => "rate-limit",
            Cause::Queue => "queue-full",
            Cause::Oversized => "oversized",
            Cause::Unspooled => "unspooled",
            Cause::Invalid => "invalid",
        }
    }
}

/// A worker is up: its start-up split and, for a ticking module, the first tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub attempt: u32,
    pub pid: u32,
    pub version: u64,
    pub command: bool,
    /// Spawn until ready (and the first tick done, for ticking modules).
    pub start_us: u64,
    pub verify_us: u64,
    pub deserialize_us: u64,
    pub instantiate_us: u64,
    pub init_us: u64,
    pub first_tick_us: Option<u64>,
    pub fuel_used: Option<u64>,
    pub memory_pages: u32,
    pub rss_kib: Option<u64>,
}

/// A worker ended, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// Short name of the reason (`trap`, `watchdog`, `fuel-exhausted`, ...).
    pub reason: String,
    /// The reason for people.
    pub why: String,
    pub exit_code: Option<i32>,
    pub uptime_ms: u64,
    pub peak_rss_kib: Option<u64>,
    pub crashes_in_window: u32,
    pub restart_in_ms: Option<u64>,
}

impl Stopped {
    /// Not a crash: what `worker::Stop::is_clean` says of the stop this record was made
    /// from, decided from the wire fields so that a consumer of telemetry agrees.
    pub fn is_clean(&self) -> bool {
        match self.reason.as_str() {
            "stopped" | "swapped" => true,
            "exited" => self.exit_code == Some(0),
            _ => false,
        }
    }
}

/// kilnd's periodic account of one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStats {
    /// CPU time of all its workers so far (user + system).
    pub cpu_ms: u64,
    /// Resident memory of the current worker.
    pub rss_kib: Option<u64>,
    pub memory_pages: u32,
    /// Calls into the module (init, ticks, messages) and the fuel they used.
    pub calls: u64,
    pub fuel_used: u64,
    /// Workers that stopped on a trap, fuel exhaustion or the watchdog.
    pub traps: u32,
    pub restarts: u32,
}

/// kilnd's periodic account of the device and of its own telemetry spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub uptime_s: u64,
    /// One-minute load average, times 1000.
    pub load_milli: u32,
    pub mem_available_kib: u64,
    pub disk_free_kib: u64,
    pub kilnd_rss_kib: u64,
    /// Batches and bytes waiting in the spool for the broker's acknowledgement.
    pub spool_batches: u64,
    pub spool_bytes: u64,
    /// Totals since this kilnd started.
    pub dropped_batches: u64,
    pub dropped_records: u64,
    pub spool_appends: u64,
    /// Time spent writing batches to the spool (durably), over all appends.
    pub spool_append_us: u64,
}

/// Batches `first_seq..=last_seq` of boot `boot_id` that will never arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub boot_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub batches: u64,
    /// Records those batches held.
    pub records: u64,
}

impl Batch {
    pub fn encode(batch: &BatchV1) -> Vec<u8> {
        // Serializing owned, plain data into a Vec cannot fail.
        postcard::to_stdvec(&Batch::V1(batch.clone())).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<BatchV1, String> {
        if bytes.len() > MAX_BATCH {
            return Err(format!(
                "telemetry batch of {} bytes is over the {MAX_BATCH} byte limit",
                bytes.len()
            ));
        }
        match postcard::from_bytes(bytes) {
            Ok(Batch::V1(b)) => Ok(b),
            Err(e) => Err(format!("not a telemetry batch: {e}")),
        }
    }
}

impl Record {
    /// Exact encoded size of the record inside a batch.
    pub fn encoded_len(&self) -> usize {
        // Serializing plain owned data only counts bytes; it cannot fail.
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX)
    }
}

/// Splits records, in order, into runs whose encodings add up to at most `budget`
/// bytes (at most [`MAX_RECORD`] for a batch). A record that does not fit a run of its
/// own is replaced by a [`Discarded`] count (cause `Oversized`) for its module, so no
/// run, and no batch made of one, is ever over the bound.
pub fn split(records: Vec<Record>, budget: usize) -> Vec<Vec<Record>> {
    let mut runs: Vec<Vec<Record>> = Vec::new();
    let mut run: Vec<Record> = Vec::new();
    let mut used = 0;
    for record in records {
        let mut len = record.encoded_len();
        let record = if len > budget {
            let bytes = match &record.body {
                Body::Telemetry { data, .. } => data.len(),
                Body::Log { line, .. } => line.len(),
                _ => len,
            };
            let count = Record {
                at_ms: record.at_ms,
                module: record.module,
                body: Body::Discarded(Discarded {
                    cause: Cause::Oversized,
                    records: 1,
                    bytes: bytes as u64,
                }),
            };
            len = count.encoded_len();
            count
        } else {
            record
        };
        if used + len > budget && !run.is_empty() {
            runs.push(std::mem::take(&mut run));
            used = 0;
        }
        used += len;
        run.push(record);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

impl Body {
    /// Short name of the record's kind, as in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Telemetry { .. } => "telemetry",
            Body::Log { .. } => "log",
            Body::Started(_) => "started",
            Body::TickFailed { .. } => "tick-failed",
            Body::Stopped(_) => "stopped",
            Body::Failed { .. } => "failed",
            Body::ModuleStats(_) => "module-stats",
            Body::DeviceStats(_) => "device-stats",
            Body::Dropped(_) => "dropped",
            Body::Discarded(_) => "discarded",
        }
    }

    /// Rough encoded size, for sealing batches by size without encoding twice.
    pub fn size_hint(&self) -> usize {
        24 + match self {
            Body::Telemetry { stream, data } => stream.len() + data.len(),
            Body::Log { line, .. } => line.len(),
            Body::Stopped(s) => s.reason.len() + s.why.len() + 24,
            _ => 48,
        }
    }
}

/// Merges drop ranges: contiguous or overlapping ranges of one boot become one.
pub fn coalesce(mut drops: Vec<Dropped>) -> Vec<Dropped> {
    drops.sort_by_key(|d| (d.boot_id, d.first_seq));
    let mut out: Vec<Dropped> = Vec::with_capacity(drops.len());
    for d in drops {
        match out.last_mut() {
            Some(last) if last.boot_id == d.boot_id && d.first_seq <= last.last_seq + 1 => {
                last.last_seq = last.last_seq.max(d.last_seq);
                last.batches += d.batches;
                last.records += d.records;
            }
            _ => out.push(d),
        }
    }
    out
}

/// Most `(device, boot_id)` pairs a [`Tracker`] keeps; past it the one unused longest
/// is forgotten. Boot ids come from the wire, so a forger could otherwise make a
/// consumer keep one account per u64.
pub const MAX_STREAMS: usize = 1024;

/// Most ranges a [`Tracker`] keeps per `(device, boot_id)` in each of its sets
/// (received, missing, dropped); past it the lowest seqs are forgotten. Seqs are kept
/// as ranges, so memory follows how often the stream broke, not the seq values.
pub const MAX_RANGES: usize = 128;

/// What a consumer should make of a batch it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Seen for the first time. `gap` holds seqs skipped just now (they may still
    /// arrive late); `late` says this seq had been counted missing.
    New { gap: Option<(u64, u64)>, late: bool },
    /// Seen before: its records were already delivered.
    Duplicate,
    /// Below the seqs still tracked for its boot (older ones were forgotten to stay
    /// within [`MAX_RANGES`]): it cannot be told new from duplicate.
    Untracked,
}

/// Per `(device, boot_id)`: which seqs arrived, which are missing, which the device
/// said it dropped. Memory is bounded by [`MAX_STREAMS`] and [`MAX_RANGES`] whatever
/// the seqs and boot ids a broker forges.
#[derive(Debug, Default)]
pub struct Tracker {
    streams: BTreeMap<(String, u64), Stream>,
    /// Stamps streams by last use, to forget the one unused longest.
    clock: u64,
    forgotten: Forgotten,
}

/// What a [`Tracker`] forgot to stay within [`MAX_STREAMS`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// `(device, boot_id)` accounts dropped.
    pub streams: u64,
    /// Seqs those accounts held as neither received nor reported dropped.
    pub unexplained: u64,
}

#[derive(Debug, Default, Clone)]
struct Stream {
    first: u64,
    max: u64,
    received: Ranges,
    missing: Ranges,
    dropped: Ranges,
    batches: u64,
    records: u64,
    duplicates: u64,
    /// Seqs below this were forgotten (0: none were).
    floor: u64,
    /// Ranges forgotten, plus batches that arrived below `floor`.
    untracked: u64,
    /// Unexplained seqs among those forgotten.
    forgotten_unexplained: u64,
    last_used: u64,
}

/// A consumer's account of one `(device, boot_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub device: String,
    pub boot_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub batches: u64,
    pub records: u64,
    pub duplicates: u64,
    /// Seqs the device reported dropped (spool full).
    pub dropped: u64,
    /// Seqs neither received nor reported dropped, as inclusive ranges (one range
    /// can stand for 2^63 seqs a forged batch skipped).
    pub unexplained: Vec<(u64, u64)>,
    /// How many seqs are unexplained, including any in ranges forgotten (saturating).
    pub unexplained_batches: u64,
    /// Times bookkeeping was cut short to stay within [`MAX_RANGES`]: ranges
    /// forgotten, and batches that arrived below them.
    pub untracked: u64,
}

impl Tracker {
    pub fn batch(&mut self, device: &str, boot_id: u64, seq: u64, records: usize) -> Verdict {
        let s = match self.stream(device, boot_id) {
            Some(s) => s,
            None => {
                let clock = self.clock;
                self.insert(
                    device,
                    boot_id,
                    Stream {
                        first: seq,
                        max: seq,
                        received: Ranges::one(seq, seq),
                        batches: 1,
                        records: records as u64,
                        last_used: clock,
                        ..Stream::default()
                    },
                );
                return Verdict::New {
                    gap: None,
                    late: false,
                };
            }
        };
        if seq < s.floor {
            s.untracked = s.untracked.saturating_add(1);
            s.batches += 1;
            s.records = s.records.saturating_add(records as u64);
            return Verdict::Untracked;
        }
        if s.received.contains(seq) {
            s.duplicates += 1;
            return Verdict::Duplicate;
        }
        let verdict = if seq > s.max {
            // seq > max, so max + 1 cannot overflow.
            let gap = (seq > s.max + 1).then(|| (s.max + 1, seq - 1));
            if let Some((a, b)) = gap {
                s.missing.insert(a, b);
            }
            s.max = seq;
            Verdict::New { gap, late: false }
        } else if s.missing.remove(seq) {
            Verdict::New {
                gap: None,
                late: true,
            }
        } else {
            if seq < s.first {
                // Older than the first one seen: the consumer started mid-stream.
                if seq + 1 < s.first {
                    s.missing.insert(seq + 1, s.first - 1);
                }
                s.first = seq;
            }
            // Otherwise within the span yet never counted missing: a seq the device
            // reported dropped, or one below a drop report's range.
            Verdict::New {
                gap: None,
                late: true,
            }
        };
        s.received.insert(seq, seq);
        s.batches += 1;
        s.records = s.records.saturating_add(records as u64);
        s.bound();
        verdict
    }

    /// Notes a drop report from `device`.
    pub fn dropped(&mut self, device: &str, d: &Dropped) {
        if d.first_seq > d.last_seq {
            // Not a range: nothing a well-behaved device sends, and nothing to note.
            return;
        }
        let s = match self.stream(device, d.boot_id) {
            Some(s) => s,
            None => {
                let clock = self.clock;
                self.insert(
                    device,
                    d.boot_id,
                    Stream {
                        first: d.first_seq,
                        max: d.last_seq,
                        dropped: Ranges::one(d.first_seq, d.last_seq),
                        last_used: clock,
                        ..Stream::default()
                    },
                );
                return;
            }
        };
        if d.last_seq < s.floor {
            s.untracked = s.untracked.saturating_add(1);
            return;
        }
        let first = d.first_seq.max(s.floor);
        if let Some(next) = s.max.checked_add(1).filter(|&next| first > next) {
            // Batches between the newest seen and the dropped ones exist too.
            s.missing.insert(next, first - 1);
        }
        s.dropped.insert(first, d.last_seq);
        s.first = s.first.min(first);
        s.max = s.max.max(d.last_seq);
        s.bound();
    }

    pub fn accounts(&self) -> Vec<Account> {
        self.streams
            .iter()
            .map(|((device, boot_id), s)| {
                let unexplained = s.missing.minus(&s.dropped);
                let tracked = unexplained
                    .iter()
                    .fold(0u64, |n, (a, b)| n.saturating_add(width(*a, *b)));
                Account {
                    device: device.clone(),
                    boot_id: *boot_id,
                    first_seq: s.first,
                    last_seq: s.max,
                    batches: s.batches,
                    records: s.records,
                    duplicates: s.duplicates,
                    dropped: s.dropped.count(),
                    unexplained,
                    unexplained_batches: tracked.saturating_add(s.forgotten_unexplained),
                    untracked: s.untracked,
                }
            })
            .collect()
    }

    /// What was forgotten to stay within [`MAX_STREAMS`].
    pub fn forgotten(&self) -> Forgotten {
        self.forgotten
    }

    fn stream(&mut self, device: &str, boot_id: u64) -> Option<&mut Stream> {
        self.clock += 1;
        let clock = self.clock;
        let s = self.streams.get_mut(&(device.to_string(), boot_id))?;
        s.last_used = clock;
        Some(s)
    }

    fn insert(&mut self, device: &str, boot_id: u64, stream: Stream) {
        if self.streams.len() >= MAX_STREAMS {
            // A linear scan, but only when full, over at most MAX_STREAMS entries.
            let oldest = self
                .streams
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            if let Some(s) = oldest.and_then(|k| self.streams.remove(&k)) {
                let unexplained = s.missing.minus(&s.dropped);
                self.forgotten.streams += 1;
                self.forgotten.unexplained = unexplained
                    .iter()
                    .fold(self.forgotten.unexplained, |n, (a, b)| {
                        n.saturating_add(width(*a, *b))
                    })
                    .saturating_add(s.forgotten_unexplained);
            }
        }
        self.streams.insert((device.to_string(), boot_id), stream);
    }
}

impl Stream {
    /// Forgets the lowest seqs until every set is within [`MAX_RANGES`].
    fn bound(&mut self) {
        loop {
            let over = [&self.received, &self.missing, &self.dropped]
                .into_iter()
                .find(|r| r.len() > MAX_RANGES);
            // A set over the cap has at least two ranges, so its lowest one ends below
            // `max` and the new floor stays within the span.
            let Some(floor) = over
                .and_then(Ranges::lowest_end)
                .and_then(|e| e.checked_add(1))
            else {
                return;
            };
            let unexplained = self.missing.below(floor).minus(&self.dropped.below(floor));
            self.forgotten_unexplained = unexplained
                .iter()
                .fold(self.forgotten_unexplained, |n, (a, b)| {
                    n.saturating_add(width(*a, *b))
                });
            self.received.remove_below(floor);
            self.missing.remove_below(floor);
            self.dropped.remove_below(floor);
            self.floor = floor;
            self.first = self.first.max(floor);
            self.untracked = self.untracked.saturating_add(1);
        }
    }
}

/// How many seqs `a..=b` holds, saturating at `u64::MAX` for the full range.
fn width(a: u64, b: u64) -> u64 {
    (b - a).saturating_add(1)
}

/// A set of seqs as disjoint, non-adjacent inclusive ranges `start -> end`, merged on
/// insert: it costs one entry per run of seqs, whatever the seq values.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn one(a: u64, b: u64) -> Self {
        Self(BTreeMap::from([(a, b)]))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn contains(&self, x: u64) -> bool {
        self.0
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &end)| x <= end)
    }

    /// Adds `a..=b` (`a <= b`), merging with overlapping and adjacent ranges.
    fn insert(&mut self, a: u64, b: u64) {
        let (mut a, mut b) = (a, b);
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e.saturating_add(1) >= a {
                a = s;
                b = b.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..).next() {
            if s > b.saturating_add(1) {
                break;
            }
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    /// Removes `x`; says whether it was there.
    fn remove(&mut self, x: u64) -> bool {
        let Some((&s, &e)) = self.0.range(..=x).next_back() else {
            return false;
        };
        if x > e {
            return false;
        }
        self.0.remove(&s);
        if s < x {
            self.0.insert(s, x - 1);
        }
        if x < e {
            self.0.insert(x + 1, e);
        }
        true
    }

    fn lowest_end(&self) -> Option<u64> {
        self.0.first_key_value().map(|(_, &e)| e)
    }

    /// The part below `floor`.
    fn below(&self, floor: u64) -> Ranges {
        Ranges(
            self.0
                .range(..floor)
                .map(|(&s, &e)| (s, e.min(floor - 1)))
                .collect(),
        )
    }

    fn remove_below(&mut self, floor: u64) {
        let keep = self.0.split_off(&floor);
        let straddling = self.0.last_key_value().map(|(_, &e)| e);
        self.0 = keep;
        if let Some(e) = straddling.filter(|&e| e >= floor) {
            self.0.insert(floor, e);
        }
    }

    /// How many seqs the set holds (saturating).
    fn count(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |n, (&a, &b)| n.saturating_add(width(a, b)))
    }

    /// `self` without the seqs of `other`, as ranges; at most
    /// `self.len() + other.len()` of them.
    fn minus(&self, other: &Ranges) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (&a, &b) in &self.0 {
            // Ranges of `other` that overlap a..=b, lowest first.
            let mut overlapping: Vec<(u64, u64)> = other
                .0
                .range(..=b)
                .rev()
                .take_while(|(_, &e)| e >= a)
                .map(|(&s, &e)| (s, e))
                .collect();
            overlapping.reverse();
            let mut from = Some(a);
            for (s, e) in overlapping {
                let Some(f) = from else { break };
                if s > f {
                    out.push((f, s - 1));
                }
                // e < b here, so e + 1 cannot overflow.
                from = (e < b).then(|| f.max(e + 1));
            }
            if let Some(f) = from {
                out.push((f, b));
            }
        }
        out
    }
}

#[cfg(feature = "json")]
pub use json::to_json;

#[cfg(feature = "json")]
mod json {
    use serde_json::{json, Value};

    use super::{Body, Record};

    /// One record as a JSON object: `kind`, `module`, `at_ms` and the kind's fields.
    /// Telemetry bytes appear as `text` when they are UTF-8, else as `hex`.
    pub fn to_json(record: &Record) -> Value {
        let mut v = match &record.body {
            Body::Telemetry { stream, data } => {
                let mut v = json!({ "stream": stream });
                match std::str::from_utf8(data) {
                    Ok(text) => v["text"] = json!(text),
                    Err(_) => v["hex"] = json!(hex::encode(data)),
                }
                v
            }
            Body::Log {
                level,
                source,
                line,
            } => json!({
                "level": level.as_str(),
                "source": format!("{source:?}").to_lowercase(),
                "line": line,
            }),
            Body::Started(s) => json!({
                "attempt": s.attempt,
                "pid": s.pid,
                "version": s.version,
                "command": s.command,
                "start_ms": ms(s.start_us),
                "verify_ms": ms(s.verify_us),
                "deserialize_ms": ms(s.deserialize_us),
                "instantiate_ms": ms(s.instantiate_us),
                "init_ms": ms(s.init_us),
                "first_tick_ms": s.first_tick_us.map(ms),
                "fuel_used": s.fuel_used,
                "memory_pages": s.memory_pages,
                "rss_kib": s.rss_kib,
            }),
            Body::TickFailed { status } => json!({ "status": status }),
            Body::Stopped(s) => json!({
                "reason": s.reason,
                "why": s.why,
                "exit_code": s.exit_code,
                "uptime_ms": s.uptime_ms,
                "peak_rss_kib": s.peak_rss_kib,
                "crashes_in_window": s.crashes_in_window,
                "restart_in_ms": s.restart_in_ms,
            }),
            Body::Failed { crashes, window_s } => {
                json!({ "crashes": crashes, "window_s": window_s })
            }
            Body::ModuleStats(s) => serde_json::to_value(s).unwrap_or_default(),
            Body::DeviceStats(s) => serde_json::to_value(s).unwrap_or_default(),
            Body::Dropped(d) => json!({
                "boot_id": format!("{:016x}", d.boot_id),
                "first_seq": d.first_seq,
                "last_seq": d.last_seq,
                "batches": d.batches,
                "records": d.records,
            }),
            Body::Discarded(d) => json!({
                "cause": d.cause.as_str(),
                "records": d.records,
                "bytes": d.bytes,
            }),
        };
        v["kind"] = json!(record.body.kind());
        v["at_ms"] = json!(record.at_ms);
        v["module"] = json!(record.module);
        v
    }

    fn ms(us: u64) -> f64 {
        (us as f64 / 10.0).round() / 100.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stopped_record_is_clean_exactly_when_its_stop_was() {
        use crate::worker::Stop;
        let call = || "kiln_tick".to_string();
        for stop in [
            Stop::Exited(0),
            Stop::Exited(3),
            Stop::LoadFailed {
                code: 79,
                message: "x".into(),
            },
            Stop::InitFailed(1),
            Stop::Trap {
                call: call(),
                message: "unreachable".into(),
            },
            Stop::FuelExhausted {
                call: call(),
                budget: 1,
            },
            Stop::Watchdog {
                call: call(),
                limit_ms: 1,
            },
            Stop::Signal {
                signal: 9,
                name: "SIGKILL".into(),
            },
            Stop::Lost("gone".into()),
            Stop::Requested { swap: true },
            Stop::Requested { swap: false },
            Stop::SelfTestFailed(1),
        ] {
            let wire = Stopped {
                reason: stop.kind().into(),
                why: stop.to_string(),
                exit_code: match stop {
                    Stop::Exited(c) => Some(c),
                    _ => None,
                },
                uptime_ms: 0,
                peak_rss_kib: None,
                crashes_in_window: 0,
                restart_in_ms: None,
            };
            assert_eq!(wire.is_clean(), stop.is_clean(), "{stop:?}");
        }
    }

    use super::*;

    fn record(n: u32) -> Record {
        Record {
            at_ms: 1_700_000_000_000 + n as u64,
            module: Some("sensor".into()),
            body: Body::Telemetry {
                stream: "t".into(),
                data: n.to_le_bytes().to_vec(),
            },
        }
    }

    #[test]
    fn a_batch_survives_the_wire_and_junk_is_refused() {
        let batch = BatchV1 {
            device: "pi-01".into(),
            boot_id: 0xfeed,
            seq: 7,
            records: (0..3).map(record).collect(),
        };
        let bytes = Batch::encode(&batch);
        assert_eq!(Batch::decode(&bytes).unwrap(), batch);
        assert!(Batch::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Batch::decode(&[9, 9, 9])
            .unwrap_err()
            .contains("not a telemetry batch"));
        assert!(Batch::decode(&vec![0; MAX_BATCH + 1])
            .unwrap_err()
            .contains("limit"));
    }

    #[test]
    fn the_tracker_names_gaps_duplicates_late_arrivals_and_explained_drops() {
        let mut t = Tracker::default();
        assert_eq!(
            t.batch("d", 1, 0, 2),
            Verdict::New {
                gap: None,
                late: false
            }
        );
        assert_eq!(t.batch("d", 1, 0, 2), Verdict::Duplicate);
        assert_eq!(
            t.batch("d", 1, 4, 2),
            Verdict::New {
                gap: Some((1, 3)),
                late: false
            }
        );
        assert_eq!(
            t.batch("d", 1, 2, 2),
            Verdict::New {
                gap: None,
                late: true
            }
        );
        // Another boot is its own stream.
        assert!(matches!(
            t.batch("d", 2, 0, 1),
            Verdict::New { gap: None, .. }
        ));
        t.dropped(
            "d",
            &Dropped {
                boot_id: 1,
                first_seq: 1,
                last_seq: 1,
                batches: 1,
                records: 2,
            },
        );
        let a = &t.accounts()[0];
        assert_eq!((a.batches, a.records, a.duplicates), (3, 6, 1));
        assert_eq!(a.dropped, 1);
        assert_eq!(a.unexplained, vec![(3, 3)], "1 was dropped, 2 came late");
        assert_eq!(a.unexplained_batches, 1);
    }

    /// New record kinds are appended: every earlier kind keeps its tag, so batches
    /// spooled or retained by an older kilnd still decode.
    #[test]
    fn discarded_is_appended_after_every_earlier_kind() {
        let tag = |body: Body| postcard::to_stdvec(&body).unwrap()[0];
        assert_eq!(tag(Body::TickFailed { status: 0 }), 3);
        let dropped = Dropped {
            boot_id: 1,
            first_seq: 0,
            last_seq: 0,
            batches: 1,
            records: 1,
        };
        assert_eq!(tag(Body::Dropped(dropped)), 8);
        let discarded = Body::Discarded(Discarded {
            cause: Cause::RateLimit,
            records: 3,
            bytes: 300,
        });
        assert_eq!(tag(discarded.clone()), 9);
        let record = Record {
            at_ms: 5,
            module: Some("flood".into()),
            body: discarded,
        };
        let bytes = postcard::to_stdvec(&record).unwrap();
        assert_eq!(postcard::from_bytes::<Record>(&bytes).unwrap(), record);
        assert_eq!(record.encoded_len(), bytes.len());
    }

    #[test]
    fn drop_ranges_of_one_boot_merge() {
        let d = |boot_id, first_seq, last_seq| Dropped {
            boot_id,
            first_seq,
            last_seq,
            batches: last_seq - first_seq + 1,
            records: 10,
        };
        let merged = coalesce(vec![d(1, 3, 4), d(2, 0, 0), d(1, 0, 2), d(1, 9, 9)]);
        assert_eq!(
            merged,
            vec![
                Dropped {
                    records: 20,
                    ..d(1, 0, 4)
                },
                d(1, 9, 9),
                d(2, 0, 0)
            ]
        );
    }

    #[test]
    fn a_forged_seq_near_two_to_the_63_costs_one_range_not_two_to_the_63_entries() {
        let mut t = Tracker::default();
        t.batch("d", 1, 0, 1);
        assert_eq!(
            t.batch("d", 1, 1 << 63, 1),
            Verdict::New {
                gap: Some((1, (1 << 63) - 1)),
                late: false
            }
        );
        assert_eq!(
            t.batch("d", 1, u64::MAX, 1),
            Verdict::New {
                gap: Some(((1 << 63) + 1, u64::MAX - 1)),
                late: false
            }
        );
        assert_eq!(t.batch("d", 1, u64::MAX, 1), Verdict::Duplicate);
        t.dropped(
            "d",
            &Dropped {
                boot_id: 1,
                first_seq: 0,
                last_seq: u64::MAX,
                batches: 0,
                records: 0,
            },
        );
        let a = &t.accounts()[0];
        assert_eq!(a.dropped, u64::MAX, "2^64 seqs saturate");
        assert_eq!(a.unexplained, vec![]);
        let s = &t.streams[&("d".to_string(), 1)];
        assert!(s.missing.len() <= 2 && s.received.len() == 3 && s.dropped.len() == 1);
    }

    #[test]
    fn a_drop_report_above_the_newest_seq_leaves_the_seqs_between_missing() {
        let mut t = Tracker::default();
        t.batch("d", 1, 5, 1);
        t.dropped(
            "d",
            &Dropped {
                boot_id: 1,
                first_seq: 8,
                last_seq: 9,
                batches: 2,
                records: 2,
            },
        );
        // 6 and 7 were never counted received: they are new, late, and shown.
        assert_eq!(
            t.batch("d", 1, 6, 1),
            Verdict::New {
                gap: None,
                late: true
            }
        );
        assert_eq!(t.accounts()[0].unexplained, vec![(7, 7)]);
        // A report whose range is backwards is ignored, not trusted.
        t.dropped(
            "d",
            &Dropped {
                boot_id: 1,
                first_seq: 9,
                last_seq: 3,
                batches: 0,
                records: 0,
            },
        );
        assert_eq!(t.accounts()[0].dropped, 2);
    }

    #[test]
    fn a_broker_forging_a_boot_per_batch_makes_the_tracker_forget_not_grow() {
        let mut t = Tracker::default();
        t.batch("d", 0, 0, 1);
        t.batch("d", 0, 2, 1); // seq 1 unexplained
        for boot in 1..=(MAX_STREAMS as u64 + 10) {
            t.batch("d", boot, 0, 1);
        }
        assert_eq!(t.streams.len(), MAX_STREAMS);
        assert_eq!(
            t.forgotten(),
            Forgotten {
                streams: 11,
                unexplained: 1
            }
        );
        // The streams still in use were kept, the oldest went first.
        assert!(t
            .streams
            .contains_key(&("d".to_string(), MAX_STREAMS as u64 + 10)));
        assert!(!t.streams.contains_key(&("d".to_string(), 0)));
    }

    #[test]
    fn past_max_ranges_the_lowest_seqs_are_forgotten_and_counted() {
        let mut t = Tracker::default();
        // Every other seq: one received range and one missing range each.
        for n in 0..(MAX_RANGES as u64 * 3) {
            t.batch("d", 1, n * 2, 1);
        }
        let s = &t.streams[&("d".to_string(), 1)];
        assert!(s.received.len() <= MAX_RANGES && s.missing.len() <= MAX_RANGES);
        assert!(s.floor > 0);
        let a = &t.accounts()[0];
        assert!(a.untracked > 0);
        assert_eq!(
            a.unexplained_batches,
            MAX_RANGES as u64 * 3 - 1,
            "forgotten holes still count"
        );
        assert_eq!(t.batch("d", 1, 1, 1), Verdict::Untracked);
    }

    #[test]
    fn ranges_merge_split_and_subtract() {
        let mut r = Ranges::default();
        r.insert(5, 9);
        r.insert(11, 12);
        r.insert(10, 10);
        assert_eq!(r, Ranges::one(5, 12));
        r.insert(0, u64::MAX);
        assert_eq!(r, Ranges::one(0, u64::MAX));
        assert!(r.remove(7));
        assert!(!r.remove(7));
        assert_eq!(r.len(), 2);
        assert_eq!(r.count(), u64::MAX);
        let mut other = Ranges::one(2, 3);
        other.insert(u64::MAX, u64::MAX);
        assert_eq!(r.minus(&other), vec![(0, 1), (4, 6), (8, u64::MAX - 1)]);
        r.remove_below(5);
        assert_eq!(r.lowest_end(), Some(6));
        assert_eq!(r.below(8), Ranges::one(5, 6));
    }

    mod properties {
        use std::collections::BTreeSet;

        use proptest::prelude::*;

        use super::super::*;

        /// Seqs a forger would pick as well as the ones a device sends.
        fn seq() -> impl Strategy<Value = u64> {
            prop_oneof![
                0u64..64,
                0u64..100_000,
                (0u64..64).prop_map(|d| (1 << 63) + d),
                (0u64..64).prop_map(|d| u64::MAX - d),
                any::<u64>(),
            ]
        }

        #[derive(Debug, Clone)]
        enum Op {
            Batch { boot: u64, seq: u64 },
            Dropped { boot: u64, first: u64, last: u64 },
        }

        fn op() -> impl Strategy<Value = Op> {
            let boot = prop_oneof![0u64..4, any::<u64>()];
            prop_oneof![
                4 => (boot.clone(), seq()).prop_map(|(boot, seq)| Op::Batch { boot, seq }),
                1 => (boot, seq(), seq()).prop_map(|(boot, first, last)| Op::Dropped { boot, first, last }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn memory_stays_bounded_whatever_the_seqs(ops in prop::collection::vec(op(), 1..1000)) {
                let mut t = Tracker::default();
                for op in ops {
                    match op {
                        Op::Batch { boot, seq } => {
                            t.batch("d", boot, seq, 1);
                        }
                        Op::Dropped { boot, first, last } => t.dropped(
                            "d",
                            &Dropped { boot_id: boot, first_seq: first, last_seq: last, batches: 1, records: 1 },
                        ),
                    }
                    prop_assert!(t.streams.len() <= MAX_STREAMS);
                    for s in t.streams.values() {
                        prop_assert!(s.received.len() <= MAX_RANGES);
                        prop_assert!(s.missing.len() <= MAX_RANGES);
                        prop_assert!(s.dropped.len() <= MAX_RANGES);
                    }
                }
                for a in t.accounts() {
                    prop_assert!(a.unexplained.len() <= 2 * MAX_RANGES);
                    prop_assert!(a.first_seq <= a.last_seq);
                }
            }

            #[test]
            fn verdicts_agree_with_a_set_of_seen_seqs(
                ops in prop::collection::vec((0u64..3, 0u64..200), 1..300)
            ) {
                let mut t = Tracker::default();
                let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
                let mut duplicates: BTreeMap<u64, u64> = BTreeMap::new();
                for (boot, seq) in ops {
                    let seen = model.entry(boot).or_default();
                    let expected = match seen.last() {
                        _ if seen.contains(&seq) => {
                            *duplicates.entry(boot).or_default() += 1;
                            Verdict::Duplicate
                        }
                        None => Verdict::New { gap: None, late: false },
                        Some(&max) if seq > max => Verdict::New {
                            gap: (seq > max + 1).then(|| (max + 1, seq - 1)),
                            late: false,
                        },
                        Some(_) => Verdict::New { gap: None, late: true },
                    };
                    seen.insert(seq);
                    prop_assert_eq!(t.batch("d", boot, seq, 2), expected, "boot {} seq {}", boot, seq);
                }
                let accounts = t.accounts();
                prop_assert_eq!(accounts.len(), model.len());
                for a in accounts {
                    let seen = &model[&a.boot_id];
                    let (first, last) = (*seen.first().unwrap(), *seen.last().unwrap());
                    let holes: Vec<u64> = (first..=last).filter(|n| !seen.contains(n)).collect();
                    let listed: Vec<u64> = a.unexplained.iter().flat_map(|&(x, y)| x..=y).collect();
                    prop_assert_eq!(listed, holes.clone());
                    prop_assert_eq!(a.unexplained_batches, holes.len() as u64);
                    prop_assert_eq!((a.first_seq, a.last_seq), (first, last));
                    prop_assert_eq!(a.batches, seen.len() as u64);
                    prop_assert_eq!(a.records, 2 * seen.len() as u64);
                    prop_assert_eq!(a.duplicates, duplicates.get(&a.boot_id).copied().unwrap_or(0));
                    prop_assert_eq!(a.untracked, 0);
                }
            }
        }
    }
}
