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

    pub fn decode(bytes: &[u8]) -> Result<BatchV1, BatchError> {
        if bytes.len() > MAX_BATCH {
            return Err(BatchError::TooLarge(bytes.len()));
        }
        match postcard::from_bytes(bytes) {
            Ok(Batch::V1(b)) => Ok(b),
            Err(e) => Err(BatchError::Malformed(e.to_string())),
        }
    }
}

/// Why bytes are not a telemetry batch a consumer takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("telemetry batch of {0} bytes is over the {MAX_BATCH} byte limit")]
    TooLarge(usize),
    #[error("not a telemetry batch: {0}")]
    Malformed(String),
}

impl From<BatchError> for String {
    fn from(e: BatchError) -> Self {
        e.to_string()
    }
}

/// Shown (in JSON too) as its message.
impl Serialize for BatchError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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

mod tracker;
pub use tracker::*;

#[cfg(feature = "json")]
pub use json::to_json;

#[cfg(feature = "json")]
mod json;

#[cfg(test)]
mod tests;
