//! What the records loop does with each record, decided here and nowhere else: which
//! records the fleet agent hears (starts, stops, failed ticks and failures of the
//! modules the fleet runs; never a local module's, never data), which go to the broker
//! (every record, when there is one), and when the records the telemetry queue had no
//! room for are reported (a `Discarded` count of kilnd's own, at most once a second,
//! never lost). Pure: the loop in `serve.rs` feeds it and does what it says.

use std::time::{Duration, Instant};

use kiln_protocol::telemetry::{Body, Cause, Discarded};

/// How often the records the telemetry queue had no room for are reported, at most.
pub const SHED_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Where one record goes besides stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    /// Telemetry a module published: to the modules whose inbox lists the stream.
    pub inboxes: bool,
    /// A module was marked failed: `serve` fails at the end.
    pub failed: bool,
    /// What the update agent acts on and reports.
    pub agent: bool,
    /// To the telemetry pipeline (the broker).
    pub broker: bool,
}

/// Where `body` goes. `is_fleet` says whether its module is one the fleet runs; it is
/// asked only for records the agent could want.
pub fn route(body: &Body, broker: bool, is_fleet: impl FnOnce() -> bool) -> Route {
    Route {
        inboxes: matches!(body, Body::Telemetry { .. }),
        failed: matches!(body, Body::Failed { .. }),
        agent: broker && for_agent(body) && is_fleet(),
        broker,
    }
}

/// Starts, stops, failed ticks, and a supervisor giving up.
fn for_agent(body: &Body) -> bool {
    matches!(
        body,
        Body::Started(_) | Body::Stopped(_) | Body::TickFailed { .. } | Body::Failed { .. }
    )
}

/// Bytes a record carries for its module: telemetry data or a log line.
pub fn payload_len(body: &Body) -> u64 {
    match body {
        Body::Telemetry { data, .. } => data.len() as u64,
        Body::Log { line, .. } => line.len() as u64,
        _ => 0,
    }
}

/// Records the telemetry queue had no room for, and when they were last reported.
#[derive(Debug, Default)]
pub struct Shed {
    records: u64,
    bytes: u64,
    reported: Option<Instant>,
}

impl Shed {
    /// A record carrying `bytes` found the queue full: counted.
    pub fn full(&mut self, bytes: u64) {
        self.records += 1;
        self.bytes += bytes;
    }

    /// A record went into the queue at `now`: the count to put in after it, if there
    /// is one and the last went in at least [`SHED_REPORT_EVERY`] ago.
    pub fn due(&self, now: Instant) -> Option<Discarded> {
        if self.records == 0
            || self
                .reported
                .is_some_and(|t| now.saturating_duration_since(t) < SHED_REPORT_EVERY)
        {
            return None;
        }
        Some(Discarded {
            cause: Cause::Queue,
            records: self.records,
            bytes: self.bytes,
        })
    }

    /// The count [`Shed::due`] gave went into the queue at `now`: counting starts
    /// over. (If it found the queue full, nothing is called: it stays for later.)
    pub fn reported(&mut self, now: Instant) {
        self.reported = Some(now);
        (self.records, self.bytes) = (0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::abi::Level;
    use kiln_protocol::telemetry::{Started, Stopped};
    use kiln_protocol::worker::LogSource;
    use proptest::prelude::*;

    fn started() -> Started {
        // Every field zero, `None` or false: what the route looks at is the kind.
        postcard::from_bytes(&[0; 64]).expect("a zeroed Started decodes")
    }

    fn stopped() -> Stopped {
        Stopped {
            reason: "trap".into(),
            why: "unreachable".into(),
            exit_code: None,
            uptime_ms: 5,
            peak_rss_kib: None,
            crashes_in_window: 1,
            restart_in_ms: Some(500),
        }
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|data| Body::Telemetry {
                stream: "s".into(),
                data
            }),
            Just(Body::Started(started())),
            Just(Body::Stopped(stopped())),
            Just(Body::TickFailed { status: 3 }),
            Just(Body::Failed {
                crashes: 5,
                window_s: 300
            }),
            Just(Body::Log {
                level: Level::Info,
                source: LogSource::Abi,
                line: "hello".into()
            }),
            Just(Body::Discarded(Discarded {
                cause: Cause::RateLimit,
                records: 1,
                bytes: 1
            })),
        ]
    }

    proptest! {
        /// The agent hears exactly the lifecycle of the fleet's modules, and only
        /// with a broker; the broker hears everything; a local module's records and
        /// any data never reach the agent.
        #[test]
        fn the_fleet_hears_its_modules_lifecycle(body in body(), broker: bool, fleet: bool) {
            let mut asked = false;
            let r = route(&body, broker, || { asked = true; fleet });
            let lifecycle = matches!(
                body,
                Body::Started(_) | Body::Stopped(_) | Body::TickFailed { .. } | Body::Failed { .. }
            );
            prop_assert_eq!(r.agent, broker && fleet && lifecycle);
            prop_assert_eq!(r.broker, broker);
            prop_assert_eq!(r.inboxes, matches!(body, Body::Telemetry { .. }));
            prop_assert_eq!(r.failed, matches!(body, Body::Failed { .. }));
            // Membership is looked up only for what the agent could want.
            prop_assert!(!asked || (broker && lifecycle));
        }

        /// Over any sequence of full and free queues: no shed record is lost (what
        /// was reported plus what is pending is what was shed), reports are at least
        /// a second apart, and none is empty.
        #[test]
        fn shed_records_are_reported_late_never_lost(
            steps in proptest::collection::vec((0u64..700, any::<bool>(), 0u64..100, any::<bool>()), 1..200)
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut shed = Shed::default();
            let (mut shed_records, mut shed_bytes) = (0u64, 0u64);
            let (mut reported_records, mut reported_bytes) = (0u64, 0u64);
            let mut last: Option<Instant> = None;
            for (advance_ms, room, bytes, room_for_count) in steps {
                now += Duration::from_millis(advance_ms);
                if !room {
                    shed.full(bytes);
                    shed_records += 1;
                    shed_bytes += bytes;
                    continue;
                }
                let Some(d) = shed.due(now) else {
                    continue;
                };
                prop_assert!(d.records > 0);
                prop_assert_eq!(d.cause, Cause::Queue);
                prop_assert_eq!(
                    (d.records, d.bytes),
                    (shed_records - reported_records, shed_bytes - reported_bytes)
                );
                if let Some(t) = last {
                    prop_assert!(now.duration_since(t) >= SHED_REPORT_EVERY);
                }
                if room_for_count {
                    shed.reported(now);
                    reported_records += d.records;
                    reported_bytes += d.bytes;
                    last = Some(now);
                }
            }
            prop_assert_eq!(shed.records, shed_records - reported_records);
            prop_assert_eq!(shed.bytes, shed_bytes - reported_bytes);
        }
    }
}
