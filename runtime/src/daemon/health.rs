//! What the device says of its modules' health each period (`health`, for a rollout's
//! health gates): per module and version, the counts the supervisors keep (calls,
//! fuel, traps, restarts, peak RSS), the records the module's telemetry sent and lost,
//! and sketches of the numbers in its own telemetry. Pure: the records loop in
//! `serve.rs` feeds it records and the supervisors' counters, and takes a period when
//! one is due; the fleet agent signs and publishes it.

use std::collections::{BTreeMap, HashMap};

use kiln_protocol::fleet::{HealthV1, ModuleHealth, MAX_HEALTH_MODULES};
use kiln_protocol::names::{self, Kind};
use kiln_protocol::rollout::gate::{check_metric, HealthSummary, MAX_METRICS, MAX_VALUE};
use kiln_protocol::telemetry::{Body, ModuleStats, Record};

/// Telemetry longer than this is not read for metrics: a metric is a short reading,
/// and parsing a large blob on every record would cost the records loop.
pub const MAX_METRIC_DATA: usize = 1024;

/// The counters of a module's supervisor at its last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    calls: u64,
    fuel_used: u64,
    traps: u32,
    restarts: u32,
}

/// One period of every module's health, and what is needed to count the next.
#[derive(Debug, Default)]
pub struct HealthBook {
    /// This period's summaries, by module and the version that ran.
    period: BTreeMap<(String, u64), HealthSummary>,
    /// The version each module runs now (from its last start; 0 before one).
    version: HashMap<String, u64>,
    /// Each module's counters at the last sample: a period counts what they grew by.
    seen: HashMap<String, Seen>,
    /// Periods taken so far.
    seq: u64,
}

impl HealthBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// This period's summary of `module` at the version it runs now: `None` for a
    /// name no summary may carry, or once the period holds [`MAX_HEALTH_MODULES`]
    /// (first come).
    fn summary(&mut self, module: &str) -> Option<&mut HealthSummary> {
        let version = self.version.get(module).copied().unwrap_or(0);
        let key = (module.to_string(), version);
        if !self.period.contains_key(&key) {
            if self.period.len() >= MAX_HEALTH_MODULES
                || names::check(Kind::Module, module).is_err()
            {
                return None;
            }
            self.period.insert(key.clone(), HealthSummary::new(module));
        }
        self.period.get_mut(&key)
    }

    /// Counts what `record` says of its module: a start (its version from now on, and
    /// its RSS), a stop (its peak RSS), a telemetry record (sent, and its numbers), a
    /// count of discarded records (dropped). Records of kilnd itself are not a
    /// module's.
    pub fn observe(&mut self, record: &Record) {
        let Some(module) = &record.module else {
            return;
        };
        if let Body::Started(s) = &record.body {
            if self.version.len() < 4 * MAX_HEALTH_MODULES || self.version.contains_key(module) {
                self.version.insert(module.clone(), s.version);
            }
        }
        let Some(summary) = self.summary(module) else {
            return;
        };
        match &record.body {
            Body::Started(s) => peak(summary, s.rss_kib),
            Body::Stopped(s) => peak(summary, s.peak_rss_kib),
            Body::Telemetry { stream, data } => {
                summary.records_sent += 1;
                metrics(summary, stream, data);
            }
            Body::Discarded(d) => {
                summary.records_dropped = summary.records_dropped.saturating_add(d.records)
            }
            _ => {}
        }
    }

    /// Counts what `module`'s supervisor counters grew by since the last sample, for
    /// the version it runs now. Counters that went back are a new supervisor's (the
    /// module was removed and added again): all of them are new. A call that trapped
    /// is not among the counters' calls; it is counted here, so calls are at least
    /// the traps.
    pub fn sample(&mut self, module: &str, stats: &ModuleStats) {
        let now = Seen {
            calls: stats.calls,
            fuel_used: stats.fuel_used,
            traps: stats.traps,
            restarts: stats.restarts,
        };
        if self.seen.len() >= 4 * MAX_HEALTH_MODULES && !self.seen.contains_key(module) {
            return;
        }
        let before = self
            .seen
            .insert(module.to_string(), now)
            .unwrap_or_default();
        let grew = |now: u64, before: u64| if now >= before { now - before } else { now };
        let traps = grew(now.traps.into(), before.traps.into());
        let restarts = grew(now.restarts.into(), before.restarts.into());
        let calls = grew(now.calls, before.calls);
        let fuel = grew(now.fuel_used, before.fuel_used);
        let version = self.version.get(module).copied().unwrap_or(0);
        if calls == 0 && traps == 0 && restarts == 0 && fuel == 0 {
            // Nothing grew: a module that did nothing has nothing to say yet.
            if let Some(summary) = self.period.get_mut(&(module.to_string(), version)) {
                peak(summary, stats.rss_kib);
            }
            return;
        }
        let Some(summary) = self.summary(module) else {
            return;
        };
        summary.calls = summary.calls.saturating_add(calls).saturating_add(traps);
        summary.traps = summary.traps.saturating_add(traps);
        summary.restarts = summary.restarts.saturating_add(restarts);
        summary.fuel_used = summary.fuel_used.saturating_add(fuel);
        peak(summary, stats.rss_kib);
    }

    /// The period that ends now, `period_ms` long, and a new one begins. Take it after
    /// a last [`sample`](Self::sample) of every module.
    pub fn take(&mut self, period_ms: u64) -> HealthV1 {
        self.seq += 1;
        let modules = std::mem::take(&mut self.period)
            .into_iter()
            .map(|((_, version), summary)| ModuleHealth { version, summary })
            .collect();
        HealthV1 {
            seq: self.seq,
            period_ms,
            modules,
        }
    }
}

fn peak(summary: &mut HealthSummary, rss_kib: Option<u64>) {
    if let Some(kib) = rss_kib {
        summary.peak_memory_bytes = summary.peak_memory_bytes.max(kib.saturating_mul(1024));
    }
}

/// The numbers in one telemetry record: a record that is a number (`21.5`) is a
/// reading of a metric named as its stream; a JSON object's top-level numbers
/// (`{"error_rate": 0.1, "latency_us": 350}`) are readings of metrics named as its
/// fields. Names a gate cannot name, values beyond ±[`MAX_VALUE`], and metrics past
/// the first [`MAX_METRICS`] of the period are skipped.
fn metrics(summary: &mut HealthSummary, stream: &str, data: &[u8]) {
    if data.is_empty() || data.len() > MAX_METRIC_DATA {
        return;
    }
    let mut add = |name: &str, value: f64| {
        if !value.is_finite() || value.abs() > MAX_VALUE || check_metric(name).is_err() {
            return;
        }
        let metrics = &mut summary.metrics;
        if let Some(sketch) = metrics.get_mut(name) {
            sketch.add(value);
        } else if metrics.len() < MAX_METRICS {
            metrics.entry(name.to_string()).or_default().add(value);
        }
    };
    match data.trim_ascii_start().first() {
        Some(b'{') => {
            let Ok(object) =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data)
            else {
                return;
            };
            for (name, value) in &object {
                if let Some(v) = value.as_f64() {
                    add(name, v);
                }
            }
        }
        Some(b'-' | b'+' | b'.' | b'0'..=b'9') => {
            if let Some(v) = std::str::from_utf8(data)
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
            {
                add(stream, v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::rollout::gate::Sketch;
    use kiln_protocol::telemetry::{Cause, Discarded, Started, Stopped};
    use proptest::prelude::*;

    fn record(module: &str, body: Body) -> Record {
        Record {
            at_ms: 0,
            module: Some(module.into()),
            body,
        }
    }

    fn started(module: &str, version: u64, rss_kib: u64) -> Record {
        record(
            module,
            Body::Started(Started {
                attempt: 1,
                pid: 7,
                version,
                command: false,
                start_us: 0,
                verify_us: 0,
                deserialize_us: 0,
                instantiate_us: 0,
                init_us: 0,
                first_tick_us: None,
                fuel_used: None,
                memory_pages: 1,
                rss_kib: Some(rss_kib),
            }),
        )
    }

    fn telemetry(module: &str, stream: &str, data: &str) -> Record {
        record(
            module,
            Body::Telemetry {
                stream: stream.into(),
                data: data.as_bytes().to_vec(),
            },
        )
    }

    fn stats(calls: u64, fuel_used: u64, traps: u32, restarts: u32, rss_kib: u64) -> ModuleStats {
        ModuleStats {
            cpu_ms: 0,
            rss_kib: Some(rss_kib),
            memory_pages: 1,
            calls,
            fuel_used,
            traps,
            restarts,
        }
    }

    fn only(h: &HealthV1) -> &HealthSummary {
        assert_eq!(h.modules.len(), 1, "{h:?}");
        &h.modules[0].summary
    }

    #[test]
    fn a_period_counts_what_the_counters_grew_by_and_then_starts_again() {
        let mut book = HealthBook::new();
        book.observe(&started("app", 3, 100));
        book.sample("app", &stats(10, 1000, 0, 0, 200));
        let h = book.take(60_000);
        assert_eq!((h.seq, h.period_ms), (1, 60_000));
        assert_eq!(h.modules[0].version, 3);
        let s = only(&h);
        assert_eq!(
            (s.calls, s.fuel_used, s.peak_memory_bytes),
            (10, 1000, 200 * 1024)
        );

        book.sample("app", &stats(25, 1500, 2, 1, 150));
        let h = book.take(60_000);
        assert_eq!(h.seq, 2);
        let s = only(&h);
        // 15 calls returned, 2 trapped.
        assert_eq!((s.calls, s.traps, s.restarts, s.fuel_used), (17, 2, 1, 500));
        assert_eq!(s.peak_memory_bytes, 150 * 1024);
        assert_eq!(s.validate(), Ok(()));

        // Nothing happened: nothing to say.
        assert!(book.take(60_000).modules.is_empty());
    }

    #[test]
    fn counters_that_went_back_are_a_new_supervisors() {
        let mut book = HealthBook::new();
        book.sample("app", &stats(100, 10, 3, 3, 1));
        book.take(1);
        book.sample("app", &stats(4, 2, 0, 0, 1));
        let h = book.take(1);
        assert_eq!((only(&h).calls, only(&h).fuel_used), (4, 2));
    }

    #[test]
    fn an_update_during_a_period_splits_it_by_version() {
        let mut book = HealthBook::new();
        book.observe(&started("app", 1, 10));
        book.observe(&telemetry("app", "temp", "20"));
        // The records loop samples a module when it starts.
        book.sample("app", &stats(5, 50, 0, 0, 10));
        book.observe(&started("app", 2, 10));
        book.observe(&telemetry("app", "temp", "30"));
        book.observe(&telemetry("app", "temp", "40"));
        book.sample("app", &stats(8, 80, 1, 0, 10));
        let h = book.take(1000);
        assert_eq!(h.validate(), Ok(()));
        let by_version: Vec<_> = h
            .modules
            .iter()
            .map(|m| {
                (
                    m.version,
                    m.summary.records_sent,
                    m.summary.calls,
                    m.summary.metrics["temp"],
                )
            })
            .collect();
        assert_eq!(
            by_version,
            [
                (1, 1, 5, Sketch::of(&[20.0])),
                (2, 2, 4, Sketch::of(&[30.0, 40.0]))
            ]
        );
    }

    #[test]
    fn records_sent_dropped_and_peaks_come_from_the_modules_records() {
        let mut book = HealthBook::new();
        book.observe(&started("app", 1, 10));
        book.observe(&telemetry("app", "log", "not a number"));
        book.observe(&record(
            "app",
            Body::Discarded(Discarded {
                cause: Cause::RateLimit,
                records: 7,
                bytes: 70,
            }),
        ));
        book.observe(&record(
            "app",
            Body::Stopped(Stopped {
                reason: "trap".into(),
                why: "unreachable".into(),
                exit_code: None,
                uptime_ms: 5,
                peak_rss_kib: Some(900),
                crashes_in_window: 1,
                restart_in_ms: Some(100),
            }),
        ));
        // kilnd's own records are no module's.
        book.observe(&Record {
            at_ms: 0,
            module: None,
            body: Body::Discarded(Discarded {
                cause: Cause::Queue,
                records: 3,
                bytes: 3,
            }),
        });
        let h = book.take(1);
        let s = only(&h);
        assert_eq!((s.records_sent, s.records_dropped), (1, 7));
        assert_eq!(s.peak_memory_bytes, 900 * 1024);
        assert!(s.metrics.is_empty());
    }

    #[test]
    fn metrics_are_numbers_of_the_modules_telemetry_bounded_first_come() {
        let mut book = HealthBook::new();
        book.observe(&telemetry("app", "temp", " 21.5\n"));
        book.observe(&telemetry(
            "app",
            "loop",
            r#"{"latency_us": 350, "error_rate": 0.25, "label": "x", "nested": {"a": 1}}"#,
        ));
        book.observe(&telemetry("app", "loop", r#"{"latency_us": 450}"#));
        // Names a gate cannot name, and values beyond the bound, are skipped.
        book.observe(&telemetry("app", "a.b", "1"));
        book.observe(&telemetry("app", "big", "1e300"));
        book.observe(&telemetry("app", "nan", "NaN"));
        book.observe(&telemetry("app", "x", r#"{"bad name": 1, "inf": 1e999}"#));
        book.observe(&telemetry(
            "app",
            "long",
            &format!("1{}", " ".repeat(MAX_METRIC_DATA)),
        ));
        let h = book.take(1);
        let s = only(&h);
        assert_eq!(
            s.metrics.keys().collect::<Vec<_>>(),
            ["error_rate", "latency_us", "temp"]
        );
        assert_eq!(s.metrics["latency_us"], Sketch::of(&[350.0, 450.0]));
        assert_eq!(s.metrics["temp"], Sketch::of(&[21.5]));
        assert_eq!(s.validate(), Ok(()));

        let mut book = HealthBook::new();
        for i in 0..20 {
            book.observe(&telemetry("app", &format!("m{i}"), "1"));
        }
        book.observe(&telemetry("app", "m0", "3"));
        let h = book.take(1);
        let s = only(&h);
        assert_eq!(s.metrics.len(), MAX_METRICS);
        assert!(s.metrics.contains_key("m7") && !s.metrics.contains_key("m8"));
        assert_eq!(s.metrics["m0"], Sketch::of(&[1.0, 3.0]));
    }

    #[test]
    fn a_period_holds_at_most_the_modules_a_message_may_carry() {
        let mut book = HealthBook::new();
        for i in 0..MAX_HEALTH_MODULES + 10 {
            book.sample(&format!("m{i}"), &stats(1, 1, 0, 0, 1));
        }
        book.sample("bad/name", &stats(1, 1, 0, 0, 1));
        let h = book.take(1);
        assert_eq!(h.modules.len(), MAX_HEALTH_MODULES);
        assert_eq!(h.validate(), Ok(()));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Start(u8, u64),
        Data(u8, u8, f64),
        Dropped(u8, u64),
        Sample(u8, u64, u64, u32, u32),
        Take,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..4u8, 0..3u64).prop_map(|(m, v)| Step::Start(m, v)),
            (0..4u8, 0..12u8, -1e20f64..1e20).prop_map(|(m, s, x)| Step::Data(m, s, x)),
            (0..4u8, any::<u64>()).prop_map(|(m, n)| Step::Dropped(m, n)),
            (
                0..4u8,
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(m, c, f, t, r)| Step::Sample(m, c, f, t, r)),
            Just(Step::Take),
        ]
    }

    proptest! {
        /// Whatever the modules do, every period is a message a device may send, and
        /// seq counts the periods.
        #[test]
        fn every_period_is_valid(steps in proptest::collection::vec(step(), 0..64)) {
            let mut book = HealthBook::new();
            let mut taken = 0;
            let check = |h: &HealthV1, taken: u64| {
                prop_assert_eq!(h.validate(), Ok(()));
                prop_assert_eq!(h.seq, taken);
                for m in &h.modules {
                    prop_assert!(m.summary.calls >= m.summary.traps);
                }
                Ok(())
            };
            for s in steps {
                let name = |m: u8| format!("m{m}");
                match s {
                    Step::Start(m, v) => book.observe(&started(&name(m), v, 1)),
                    Step::Data(m, s, x) => book.observe(&telemetry(&name(m), &format!("s{s}"), &x.to_string())),
                    Step::Dropped(m, n) => book.observe(&record(&name(m), Body::Discarded(Discarded {
                        cause: Cause::Queue, records: n, bytes: 0,
                    }))),
                    Step::Sample(m, c, f, t, r) => book.sample(&name(m), &stats(c, f, t, r, 1)),
                    Step::Take => {
                        taken += 1;
                        check(&book.take(1), taken)?;
                    }
                }
            }
            check(&book.take(1), taken + 1)?;
        }
    }
}
