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

use std::collections::{BTreeMap, BTreeSet};

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

/// What a consumer should make of a batch it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Seen for the first time. `gap` holds seqs skipped just now (they may still
    /// arrive late); `late` says this seq had been counted missing.
    New { gap: Option<(u64, u64)>, late: bool },
    /// Seen before: its records were already delivered.
    Duplicate,
}

/// Per `(device, boot_id)`: which seqs arrived, which are missing, which the device
/// said it dropped.
#[derive(Debug, Default)]
pub struct Tracker {
    streams: BTreeMap<(String, u64), Stream>,
}

#[derive(Debug, Default, Clone)]
struct Stream {
    first: u64,
    max: u64,
    missing: BTreeSet<u64>,
    dropped: BTreeSet<u64>,
    batches: u64,
    records: u64,
    duplicates: u64,
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
    /// Seqs neither received nor reported dropped.
    pub unexplained: Vec<u64>,
}

impl Tracker {
    pub fn batch(&mut self, device: &str, boot_id: u64, seq: u64, records: usize) -> Verdict {
        let key = (device.to_string(), boot_id);
        let Some(s) = self.streams.get_mut(&key) else {
            self.streams.insert(
                key,
                Stream {
                    first: seq,
                    max: seq,
                    batches: 1,
                    records: records as u64,
                    ..Stream::default()
                },
            );
            return Verdict::New {
                gap: None,
                late: false,
            };
        };
        let verdict = if seq > s.max {
            let gap = (seq > s.max + 1).then(|| (s.max + 1, seq - 1));
            s.missing.extend(s.max + 1..seq);
            s.max = seq;
            Verdict::New { gap, late: false }
        } else if s.missing.remove(&seq) {
            Verdict::New {
                gap: None,
                late: true,
            }
        } else if seq < s.first {
            // Older than the first one seen: the consumer started mid-stream.
            s.missing.extend(seq + 1..s.first);
            s.first = seq;
            Verdict::New {
                gap: None,
                late: true,
            }
        } else {
            s.duplicates += 1;
            return Verdict::Duplicate;
        };
        s.batches += 1;
        s.records += records as u64;
        verdict
    }

    /// Notes a drop report from `device`.
    pub fn dropped(&mut self, device: &str, d: &Dropped) {
        let s = self
            .streams
            .entry((device.to_string(), d.boot_id))
            .or_insert_with(|| Stream {
                first: d.first_seq,
                max: d.last_seq,
                ..Stream::default()
            });
        s.dropped.extend(d.first_seq..=d.last_seq);
        if d.first_seq < s.first {
            s.first = d.first_seq;
        }
        if d.last_seq > s.max {
            s.max = d.last_seq;
        }
    }

    pub fn accounts(&self) -> Vec<Account> {
        self.streams
            .iter()
            .map(|((device, boot_id), s)| Account {
                device: device.clone(),
                boot_id: *boot_id,
                first_seq: s.first,
                last_seq: s.max,
                batches: s.batches,
                records: s.records,
                duplicates: s.duplicates,
                dropped: s.dropped.len() as u64,
                unexplained: s.missing.difference(&s.dropped).copied().collect(),
            })
            .collect()
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
        assert_eq!(a.unexplained, vec![3], "1 was dropped, 2 came late");
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
}
