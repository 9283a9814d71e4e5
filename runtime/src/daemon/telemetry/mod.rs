//! Telemetry over MQTT that loses nothing it has spooled. Records (from modules, and
//! kilnd's own stats) collect into a batch; the batch is sealed by size or age, given
//! the next `seq` of this boot, written to the spool, and only then published with
//! QoS 1. A batch leaves the spool when the broker acknowledges it. A window of
//! batches is in flight at a time; the rest wait on disk, so a broker outage costs
//! disk, not memory, and a restarted kilnd publishes what the last one left.
//!
//! When the spool is full the oldest batches that are not in flight are dropped, and
//! the batch being sealed carries a `Dropped` record naming them, so a consumer can
//! tell a drop from a loss.
//!
//! Every batch fits what the link sends: sealing splits the open records over as many
//! batches as it takes to keep each under `telemetry::MAX_BATCH`, and a record that
//! could not fit alone becomes a `Discarded` count. A spool whose writes fail (a full
//! disk) holds the batches in memory under its bound, published and acknowledged like
//! spooled ones. A spool that cannot be opened (a read-only remount) does not stop
//! kilnd: batches are then published without it, and it is tried again at each stats
//! interval. Either way they are counted as `Discarded` (cause `unspooled`).

pub mod spool;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::clock::now_ms;
use kiln_protocol::telemetry::{
    coalesce, split, Batch, BatchV1, Body, Cause, DeviceStats, Discarded, Dropped, Record,
    RECORDS_BUDGET,
};

use crate::daemon::config::TelemetryConfig;
use crate::daemon::link::{Delivery, Link};
use crate::daemon::procfs;
use crate::daemon::supervisor::Slot;
use spool::{Entry, Spool};

pub enum TelemetryIn {
    /// A record, holding its module's share of the queues until it is here. Boxed,
    /// as in the records queue: a bounded queue's buffer is allocated whole.
    Record(Box<Record>, Option<Slot>),
    /// The link put deliveries in the shared [`Deliveries`] list.
    Delivered,
    /// Seal what is open, give in-flight batches a moment, then answer and end.
    Finish(Sender<()>),
}

/// What the broker acknowledged (or the connection lost), by spool index. The link
/// thread must never wait on the pipeline (it would stop polling the connection,
/// and the pipeline may itself be waiting for rumqttc), so deliveries go in this
/// list rather than the bounded queue; it holds at most one entry per tracked
/// publish, so at most `window` entries.
pub type Deliveries = Arc<Mutex<VecDeque<Delivery>>>;

/// Module stats records, sampled by whoever knows the modules.
pub type SampleFn = Box<dyn Fn() -> Vec<Record> + Send>;

pub struct Pipeline {
    settings: TelemetryConfig,
    device: String,
    boot_id: u64,
    topic: String,
    link: Link,
    deliveries: Deliveries,
    spool: Spool,
    sample: SampleFn,
    data_dir: PathBuf,
    next_seq: u64,
    open: Vec<Record>,
    open_bytes: u64,
    opened_at: Instant,
    in_flight: BTreeSet<u64>,
    next_stats: Instant,
    totals: Totals,
}

#[derive(Default)]
struct Totals {
    dropped_batches: u64,
    dropped_records: u64,
    appends: u64,
    append_us: u64,
    /// Batches published without the spool since the last report: (records, bytes).
    unspooled: (u64, u64),
    /// Batches neither spooled nor taken by rumqttc since the last report.
    unsent: (u64, u64),
}

/// Where the spool lives under the data dir.
pub fn spool_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("telemetry")
}

impl Pipeline {
    pub fn open(
        settings: TelemetryConfig,
        device: &str,
        boot_id: u64,
        data_dir: PathBuf,
        topic: String,
        (link, deliveries): (Link, Deliveries),
        sample: SampleFn,
    ) -> Self {
        let dir = spool_dir(&data_dir);
        let spool = Spool::open_or_degraded(dir, settings.spool_limit);
        let (batches, bytes) = spool.depth();
        if batches > 0 {
            tracing::info!(
                batches,
                bytes,
                "telemetry spool holds batches of an earlier run"
            );
        }
        let stats_every = Duration::from_secs(settings.stats_s);
        Self {
            settings,
            device: device.into(),
            boot_id,
            topic,
            link,
            deliveries,
            spool,
            sample,
            data_dir,
            next_seq: 0,
            open: Vec::new(),
            open_bytes: 0,
            opened_at: Instant::now(),
            in_flight: BTreeSet::new(),
            next_stats: Instant::now() + stats_every,
            totals: Totals::default(),
        }
    }

    pub fn run(mut self, rx: Receiver<TelemetryIn>) {
        self.publish();
        loop {
            let wait = self.until().saturating_duration_since(Instant::now());
            let input = match rx.recv_timeout(wait) {
                Ok(TelemetryIn::Finish(done)) => {
                    self.finish(&rx);
                    let _ = done.send(());
                    return;
                }
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return self.seal(),
            };
            self.turn(input);
        }
    }

    /// When [`Pipeline::run`] stops waiting for a record: the next stats, or the end
    /// of the open batch's age.
    pub fn until(&self) -> Instant {
        let now = Instant::now();
        let mut until = self.next_stats;
        if self.settings.stats_s == 0 {
            until = now + Duration::from_secs(3600);
        }
        if !self.open.is_empty() {
            until = until.min(self.opened_at + Duration::from_millis(self.settings.batch_ms));
        }
        until
    }

    /// One input (`None`: the wait ran out): a record taken, deliveries counted, stats
    /// when due, a batch sealed when full or old, and what the window lets out
    /// published. A `Finish` is for [`Pipeline::run`] only.
    pub fn turn(&mut self, input: Option<TelemetryIn>) {
        match input {
            Some(TelemetryIn::Record(r, _slot)) => self.push(*r),
            Some(TelemetryIn::Delivered | TelemetryIn::Finish(_)) | None => {}
        }
        self.take_deliveries();
        if self.settings.stats_s > 0 && Instant::now() >= self.next_stats {
            self.next_stats += Duration::from_secs(self.settings.stats_s);
            self.spool.retry();
            // A quiet device writes what it held through a full disk back too.
            if self.spool.held() > 0 {
                let _ = self.spool.write_back();
            }
            for r in (self.sample)() {
                self.push(r);
            }
            let stats = self.device_stats();
            self.push(stats);
        }
        let age = Duration::from_millis(self.settings.batch_ms);
        if !self.open.is_empty()
            && (self.open_bytes >= self.settings.batch_bytes || self.opened_at.elapsed() >= age)
        {
            self.seal();
        }
        self.publish();
    }

    fn push(&mut self, record: Record) {
        if self.open.is_empty() {
            self.opened_at = Instant::now();
        }
        self.open_bytes += record.body.size_hint() as u64;
        self.open.push(record);
    }

    fn take_deliveries(&mut self) {
        let taken = std::mem::take(&mut *self.deliveries.lock().unwrap_or_else(|e| e.into_inner()));
        for d in taken {
            self.delivered(d);
        }
    }

    fn delivered(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Acked(index) => {
                self.in_flight.remove(&index);
                self.spool.remove(index);
            }
            // Sent again, oldest first, as the window allows.
            Delivery::Lost(index) => {
                self.in_flight.remove(&index);
            }
        }
    }

    /// Seals the open records into as many batches as keep each under the link's
    /// bound, each into the spool.
    fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        for run in split(records, RECORDS_BUDGET) {
            self.seal_one(run);
        }
        for cause in [Cause::Unspooled, Cause::Queue] {
            let (records, bytes) = std::mem::take(match cause {
                Cause::Unspooled => &mut self.totals.unspooled,
                _ => &mut self.totals.unsent,
            });
            if records > 0 {
                // Goes out with the next batch.
                self.push(Record {
                    at_ms: now_ms(),
                    module: None,
                    body: Body::Discarded(Discarded {
                        cause,
                        records,
                        bytes,
                    }),
                });
            }
        }
    }

    /// Seals one batch into the spool, making room first if the bound asks for it.
    fn seal_one(&mut self, mut records: Vec<Record>) {
        let estimate = records.iter().map(Record::encoded_len).sum::<usize>() as u64 + 128;
        let victims = self.spool.room_for(estimate, &self.in_flight);
        let mut drops = Vec::new();
        for index in &victims {
            if let Some(e) = self.spool.get(*index) {
                drops.push(Dropped {
                    boot_id: e.boot_id,
                    first_seq: e.seq,
                    last_seq: e.seq,
                    batches: 1,
                    records: e.records,
                });
                self.totals.dropped_batches += 1;
                self.totals.dropped_records += e.records;
                // What a dropped batch reported as dropped must not be forgotten.
                drops.extend(e.drops.iter().copied());
            }
        }
        let at_ms = now_ms();
        for d in coalesce(drops) {
            tracing::warn!(
                boot_id = format!("{:016x}", d.boot_id),
                first_seq = d.first_seq,
                last_seq = d.last_seq,
                records = d.records,
                "telemetry spool full: dropped the oldest batches"
            );
            records.push(Record {
                at_ms,
                module: None,
                body: Body::Dropped(d),
            });
        }
        let batch = BatchV1 {
            device: self.device.clone(),
            boot_id: self.boot_id,
            seq: self.next_seq,
            records,
        };
        self.next_seq += 1;
        let bytes = Batch::encode(&batch);
        let started = Instant::now();
        match self
            .spool
            .append(Entry::of(&batch, bytes.len() as u64), &bytes)
        {
            Ok(_) => {
                self.totals.appends += 1;
                self.totals.append_us += started.elapsed().as_micros() as u64;
            }
            Err(e) => {
                let (n, size) = (batch.records.len() as u64, bytes.len() as u64);
                let entry = Entry::of(&batch, size);
                // A full disk under a working spool: the batch waits in memory, under
                // the spool's bound, and is published, resent and acknowledged like
                // a spooled one, until a write succeeds and takes it to disk (only a
                // kilnd that dies before that loses it).
                if self.spool.hold(entry, bytes.clone()).is_some() {
                    tracing::error!(seq = batch.seq, error = %e, "cannot spool telemetry; holding it in memory");
                    self.totals.unspooled.0 += n;
                    self.totals.unspooled.1 += size;
                    for index in victims {
                        self.spool.remove(index);
                    }
                    return;
                }
                // No spool at all: send it anyway; it is lost only if the broker is
                // away too. Without waiting: with the broker away too, rumqttc's
                // queue fills, and what it cannot take is lost (and counted).
                tracing::error!(seq = batch.seq, error = %e, "cannot spool telemetry; publishing it unspooled");
                if self.link.publish_now(self.topic.clone(), bytes) {
                    self.totals.unspooled.0 += n;
                    self.totals.unspooled.1 += size;
                } else {
                    self.totals.unsent.0 += n;
                    self.totals.unsent.1 += size;
                }
            }
        }
        // Only now that the drop report is on disk do the dropped batches go.
        for index in victims {
            self.spool.remove(index);
        }
    }

    /// Fills the window with the oldest spooled batches not yet in flight.
    fn publish(&mut self) {
        let room = self.settings.window.saturating_sub(self.in_flight.len());
        for index in self.spool.unsent(&self.in_flight, room) {
            match self.spool.read(index) {
                // Written by a kilnd without the bound: the link would refuse it and
                // drop the connection over it, again and again.
                Ok(bytes) if !self.link.fits(&self.topic, bytes.len()) => {
                    tracing::error!(
                        index,
                        bytes = bytes.len(),
                        "a spooled batch is over the link's packet limit; dropping it"
                    );
                    if let Some(e) = self.spool.remove(index) {
                        self.totals.dropped_batches += 1;
                        self.totals.dropped_records += e.records;
                    }
                }
                Ok(bytes) => {
                    if !self.link.publish_tracked(self.topic.clone(), bytes, index) {
                        return;
                    }
                    self.in_flight.insert(index);
                }
                Err(e) => {
                    tracing::error!(index, error = %e, "cannot read a spooled batch; dropping it");
                    if let Some(e) = self.spool.remove(index) {
                        self.totals.dropped_batches += 1;
                        self.totals.dropped_records += e.records;
                    }
                }
            }
        }
    }

    fn finish(&mut self, rx: &Receiver<TelemetryIn>) {
        while let Ok(input) = rx.try_recv() {
            match input {
                TelemetryIn::Record(r, _slot) => self.push(*r),
                TelemetryIn::Delivered | TelemetryIn::Finish(_) => {}
            }
        }
        self.take_deliveries();
        self.seal();
        self.publish();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.in_flight.is_empty() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(TelemetryIn::Delivered) => {
                    self.take_deliveries();
                    self.publish();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let (batches, _) = self.spool.depth();
        if batches > 0 {
            tracing::info!(batches, "telemetry left in the spool for the next start");
        }
    }

    fn device_stats(&self) -> Record {
        let (spool_batches, spool_bytes) = self.spool.depth();
        Record {
            at_ms: now_ms(),
            module: None,
            body: Body::DeviceStats(DeviceStats {
                uptime_s: procfs::uptime_s().unwrap_or(0),
                load_milli: procfs::load_milli().unwrap_or(0),
                mem_available_kib: procfs::mem_available_kib().unwrap_or(0),
                disk_free_kib: procfs::disk_free_kib(&self.data_dir).unwrap_or(0),
                kilnd_rss_kib: procfs::own_rss_kib().unwrap_or(0),
                spool_batches,
                spool_bytes,
                dropped_batches: self.totals.dropped_batches,
                dropped_records: self.totals.dropped_records,
                spool_appends: self.totals.appends,
                spool_append_us: self.totals.append_us,
            }),
        }
    }
}

/// A random id for this run of kilnd: batches are numbered per boot.
pub fn new_boot_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy source: the clock still tells runs apart.
        return now_ms() ^ (std::process::id() as u64) << 40;
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::abi::Level;
    use kiln_protocol::names::MAX_NAME;
    use kiln_protocol::telemetry::MAX_BATCH;
    use kiln_protocol::worker::LogSource;
    use proptest::prelude::*;

    fn record(kind: u8, size: usize, n: u64) -> Record {
        let body = match kind {
            0 => Body::Telemetry {
                stream: "s".repeat(MAX_NAME),
                data: vec![0xa5; size],
            },
            1 => Body::Log {
                level: Level::Info,
                source: LogSource::Stdout,
                line: "é".repeat(size / 2),
            },
            _ => Body::TickFailed { status: -1 },
        };
        Record {
            at_ms: u64::MAX - n,
            module: Some("m".repeat(MAX_NAME)),
            body,
        }
    }

    /// A batch as `seal_one` makes it: the records of one run, the drop reports the
    /// spool may add, the longest device id and the largest numbers.
    fn batch(records: Vec<Record>) -> Vec<u8> {
        let mut records = records;
        for i in 0..100 {
            records.push(Record {
                at_ms: u64::MAX,
                module: None,
                body: Body::Dropped(Dropped {
                    boot_id: u64::MAX - i,
                    first_seq: u64::MAX,
                    last_seq: u64::MAX,
                    batches: u64::MAX,
                    records: u64::MAX,
                }),
            });
        }
        Batch::encode(&BatchV1 {
            device: "d".repeat(MAX_NAME),
            boot_id: u64::MAX,
            seq: u64::MAX,
            records,
        })
    }

    #[test]
    fn a_full_run_with_its_drop_reports_fits_the_link() {
        // Records of the largest kind until the budget is spent.
        let records: Vec<Record> = (0..40).map(|n| record(0, 64 * 1024, n)).collect();
        let runs = split(records, RECORDS_BUDGET);
        assert!(runs.len() > 1);
        for run in runs {
            let bytes = batch(run);
            assert!(bytes.len() <= MAX_BATCH, "{} bytes", bytes.len());
            assert!(Batch::decode(&bytes).is_ok());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the records: every run fits the budget (so every batch the link's
        /// bound), order is kept, and every record is in exactly one run, as itself
        /// or, when it could not fit alone, as a count of one for its module.
        #[test]
        fn sealing_keeps_every_batch_under_the_bound_and_accounts_for_every_record(
            budget in 300usize..40_000,
            specs in prop::collection::vec((0u8..3, 0usize..50_000), 0..60),
        ) {
            let records: Vec<Record> = specs
                .iter()
                .enumerate()
                .map(|(n, (kind, size))| record(*kind, *size, n as u64))
                .collect();
            let runs = split(records.clone(), budget);
            let mut out = Vec::new();
            for run in &runs {
                prop_assert!(!run.is_empty());
                let used: usize = run.iter().map(Record::encoded_len).sum();
                prop_assert!(used <= budget, "a run of {} bytes over {}", used, budget);
                out.extend(run.iter().cloned());
            }
            prop_assert_eq!(out.len(), records.len());
            for (sent, original) in out.iter().zip(&records) {
                if original.encoded_len() <= budget {
                    prop_assert_eq!(sent, original);
                } else {
                    let Body::Discarded(d) = &sent.body else {
                        panic!("an oversized record was neither sent nor counted: {sent:?}");
                    };
                    prop_assert_eq!(d.cause, Cause::Oversized);
                    prop_assert_eq!(d.records, 1);
                    prop_assert_eq!(&sent.module, &original.module);
                }
            }
        }
    }
}
