use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::fleet::{EventKind, Topics};
use kiln_protocol::names::{self, Kind};
use kiln_protocol::telemetry::{self, Account, Batch, BatchV1, Body, Record, Tracker, Verdict};
use kiln_protocol::trust::Registry;
use rumqttc::{Client, Event, Packet, QoS};
use serde_json::{json, Value};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::messages::Reader;
use crate::fleet::trust::{Fleet, RootArgs};
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Every telemetry batch carries (device, boot_id, seq). watch shows each batch's records
once, says when a seq is missing (a gap), arrives twice (a duplicate, not shown again)
or was dropped by the device's full spool, and ends with a summary per device and boot.
It exits 1 if a gap was never filled nor explained by a drop report. Text from devices
is printed with control characters escaped (`\\u{1b}`), so none can drive the terminal.

Examples:
  kiln watch
  kiln watch --device pi-01
  kiln watch --json --session ops | jq 'select(.kind == \"telemetry\")'
  kiln watch --duration 60";

/// Show live telemetry and deployment events from the fleet
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct WatchCommand {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only this device
    #[arg(long)]
    pub device: Option<String>,
    /// One JSON object per line: records, deployment events, gaps, duplicates, summary
    #[arg(long)]
    pub json: bool,
    /// Resume the named broker session, so what is published while watch is away
    /// waits at the broker (QoS 1) instead of being missed
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
    /// Stop after this many seconds (default: until Ctrl-C), then print the summary
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// With a root (`--root`, or fleet.root here), each deployment event shows whether
    /// it is signed by its device's enrolled key; one on an enrolled device's topic
    /// signed by another key, or not at all, is shown as invalid
    #[command(flatten)]
    pub root: RootArgs,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

impl WatchCommand {
    pub fn execute(self) -> Result<()> {
        if let Some(device) = &self.device {
            valid_name(Kind::Device, device)?;
        }
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, interrupted as *const () as libc::sighandler_t);
            libc::signal(
                libc::SIGTERM,
                interrupted as *const () as libc::sighandler_t,
            );
        }
        let topics = self.broker.topics();
        let device = self.device.as_deref().unwrap_or("+");
        let filters = [topics.telemetry(device), topics.events(device)];
        let id = match &self.session {
            Some(name) => format!("kiln-watch-{name}"),
            None => format!("kiln-watch-{}-{}", std::process::id(), now_ms() % 100_000),
        };
        // A list (a cluster's nodes): the next when the current one fails.
        let mut brokers = self
            .broker
            .connect_options()
            .map_err(|e| coded(Code::NoInput, e))?
            .all_options(
                &id,
                Duration::from_secs(10),
                kiln_protocol::mqtt::HOST_MAX_INCOMING,
            )
            .map_err(|e| coded(Code::Usage, anyhow!(e)))?;
        for (_, options) in &mut brokers {
            options.set_clean_session(self.session.is_none());
        }
        let mut at = 0;
        let (client, mut connection) = Client::new(brokers[at].1.clone(), 64);

        let deadline = self
            .duration
            .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
        let registry = match self.root.path(None) {
            Some(_) => {
                let anchor = self.root.anchor(None)?;
                let mut session = self
                    .broker
                    .connect()
                    .map_err(|e| coded(Code::Unavailable, e))?;
                let fleet = Fleet::follow(&mut session, &topics, anchor)?;
                let registry = fleet.registry_or_empty(&mut session, &topics)?;
                session.disconnect();
                Some(registry)
            }
            None => None,
        };
        let mut out = Output {
            json: self.json,
            tracker: Tracker::default(),
            topics: topics.clone(),
            registry,
        };
        let mut connected_once = false;
        let mut down = false;
        let mut announced = false;
        while !INTERRUPTED.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
            match connection.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    if down {
                        eprintln!("kiln watch: broker `{}` is back", brokers[at].0);
                    }
                    connected_once = true;
                    down = false;
                    let subscriptions = filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    client
                        .subscribe_many(subscriptions)
                        .map_err(|e| anyhow!("cannot subscribe: {e}"))?;
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) if !announced => {
                    if let Some(i) = crate::fleet::broker::refused(&ack) {
                        return Err(coded(
                            Code::Unavailable,
                            anyhow!(
                                "broker `{}` refused the subscription to `{}` (SUBACK failure): its ACL does not let this user read it, or it is overloaded",
                                brokers[at].0,
                                filters[i]
                            ),
                        ));
                    }
                    announced = true;
                    eprintln!(
                        "kiln watch: watching {} and {} on {}",
                        filters[0], filters[1], brokers[at].0
                    );
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let Some((device, kind)) = topics.parse_device(&p.topic) else {
                        continue;
                    };
                    match kind {
                        "telemetry" => out.batch(device, &p.payload),
                        "events" => out.event(device, &p.topic, &p.payload),
                        _ => {}
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if !connected_once && at + 1 == brokers.len() => {
                    return Err(coded(
                        Code::Unavailable,
                        anyhow!(crate::fleet::broker::describe_connection_error(
                            &brokers[at].0,
                            &e
                        )),
                    ));
                }
                Ok(Err(e)) => {
                    let was = at;
                    at = (at + 1) % brokers.len();
                    if !down || at != was {
                        eprintln!(
                            "kiln watch: broker `{}`: {e}; reconnecting to `{}`",
                            brokers[was].0, brokers[at].0
                        );
                    }
                    connection.eventloop.mqtt_options = brokers[at].1.clone();
                    down = true;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(_) => {}
            }
        }
        let _ = client.disconnect();
        let unexplained = out.summary();
        if unexplained > 0 {
            return Err(coded(
                Code::Failure,
                anyhow!(
                    "{unexplained} telemetry batches never arrived and were not reported dropped"
                ),
            ));
        }
        Ok(())
    }
}

struct Output {
    json: bool,
    tracker: Tracker,
    topics: Topics,
    /// The enrolled keys, where a root was given.
    registry: Option<Registry>,
}

impl Output {
    fn batch(&mut self, device: &str, payload: &[u8]) {
        // The topic level names the tracker's account: a forged one must not be
        // arbitrarily long.
        if let Err(why) = names::check(Kind::Device, device) {
            return self.note(
                json!({ "kind": "invalid", "device": device, "why": why }),
                format!("{device}: telemetry on a topic that names no device: {why}"),
            );
        }
        let batch = match Batch::decode(payload) {
            Ok(b) => b,
            Err(why) => {
                return self.note(
                    json!({ "kind": "invalid", "device": device, "why": why }),
                    format!("{device}: unreadable telemetry: {why}"),
                )
            }
        };
        if batch.device != device {
            let why = format!("batch from `{}` on {device}'s topic", batch.device);
            return self.note(
                json!({ "kind": "invalid", "device": device, "why": why }),
                format!("{device}: {why}"),
            );
        }
        let boot = format!("{:016x}", batch.boot_id);
        let ids = json!({ "device": device, "boot_id": boot });
        match self
            .tracker
            .batch(device, batch.boot_id, batch.seq, batch.records.len())
        {
            Verdict::Duplicate => {
                return self.note(
                    with(&ids, json!({ "kind": "duplicate", "seq": batch.seq })),
                    format!(
                        "{device}: batch {} of boot {boot} arrived again (not shown twice)",
                        batch.seq
                    ),
                )
            }
            Verdict::Untracked => {
                self.note(
                    with(&ids, json!({ "kind": "untracked", "seq": batch.seq })),
                    format!(
                        "{device}: batch {} of boot {boot} is older than the seqs still tracked (maybe shown before)",
                        batch.seq
                    ),
                );
            }
            Verdict::New { gap, late } => {
                if let Some((first, last)) = gap {
                    self.note(
                        with(
                            &ids,
                            json!({ "kind": "gap", "first_seq": first, "last_seq": last }),
                        ),
                        format!(
                            "{device}: GAP: batches {first}..={last} of boot {boot} have not arrived"
                        ),
                    );
                }
                if late {
                    self.note(
                        with(&ids, json!({ "kind": "late", "seq": batch.seq })),
                        format!("{device}: batch {} of boot {boot} arrived late", batch.seq),
                    );
                }
            }
        }
        self.records(device, &batch);
    }

    fn records(&mut self, device: &str, batch: &BatchV1) {
        for record in &batch.records {
            if let Body::Dropped(d) = &record.body {
                self.tracker.dropped(device, d);
            }
            if self.json {
                let mut v = telemetry::to_json(record);
                v["device"] = json!(device);
                v["boot_id"] = json!(format!("{:016x}", batch.boot_id));
                v["seq"] = json!(batch.seq);
                println!("{}", json_line(&v));
            } else {
                println!("{}", printable(&line(device, record)));
            }
        }
    }

    fn event(&mut self, device: &str, topic: &str, payload: &[u8]) {
        let empty = Registry::default();
        let registry = self.registry.as_ref().unwrap_or(&empty);
        let heard = match Reader::new(&self.topics, registry).open(topic, payload) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(skipped) => {
                return self.note(
                    json!({ "kind": "invalid", "device": device, "why": skipped.reason }),
                    format!("{device}: unreadable deployment event: {}", skipped.reason),
                )
            }
        };
        let identity = self.registry.as_ref().map(|_| heard.identity.word());
        if registry.key_of(device).is_some() && !heard.is_verified() {
            let why = match &heard.signer {
                Some(k) => format!(
                    "deployment event signed by key {}, not the device's enrolled key",
                    k.id()
                ),
                None => "unsigned deployment event for an enrolled device".to_string(),
            };
            return self.note(
                json!({ "kind": "invalid", "device": device, "why": why }),
                format!("{device}: {why}"),
            );
        }
        let signer = heard.signer.as_ref().map(|k| k.id().to_string());
        let Some(e) = heard.event().cloned() else {
            return;
        };
        let reason = match &e.kind {
            EventKind::RolledBack { reason } | EventKind::Rejected { reason } => Some(reason),
            _ => None,
        };
        self.note(
            json!({
                "kind": "deployment",
                "device": device,
                "at_ms": e.at_ms,
                "module": e.module,
                "version": e.version,
                "event": e.kind.name(),
                "reason": reason,
                "signer": signer,
                "identity": identity,
            }),
            format!(
                "{} {device} {} v{} {}{}",
                clock(e.at_ms),
                e.module,
                e.version,
                e.kind,
                match identity {
                    Some(w) if w != "verified" => format!(" [{w}]"),
                    _ => String::new(),
                }
            ),
        );
    }

    /// Prints one account per device and boot; returns the count of batches that
    /// never arrived and were not reported dropped.
    fn summary(&mut self) -> u64 {
        let accounts = self.tracker.accounts();
        for a in &accounts {
            self.note(account_json(a), account_line(a));
        }
        let forgotten = self.tracker.forgotten();
        if forgotten.streams > 0 {
            self.note(
                json!({
                    "kind": "forgotten",
                    "streams": forgotten.streams,
                    "unexplained": forgotten.unexplained,
                }),
                format!(
                    "forgot {} device boots (over {} at once), with {} batches missing",
                    forgotten.streams,
                    telemetry::MAX_STREAMS,
                    forgotten.unexplained
                ),
            );
        }
        accounts.iter().fold(forgotten.unexplained, |n, a| {
            n.saturating_add(a.unexplained_batches)
        })
    }

    /// The one place watch prints what it learned: everything in `json` and `line`
    /// may have come from a device.
    fn note(&self, json: Value, line: String) {
        if self.json {
            println!("{}", json_line(&json));
        } else {
            println!("{}", printable(&line));
        }
    }
}

fn with(ids: &Value, mut v: Value) -> Value {
    if let (Some(o), Some(ids)) = (v.as_object_mut(), ids.as_object()) {
        o.extend(ids.clone());
    }
    v
}

fn account_json(a: &Account) -> Value {
    json!({
        "kind": "summary",
        "device": a.device,
        "boot_id": format!("{:016x}", a.boot_id),
        "first_seq": a.first_seq,
        "last_seq": a.last_seq,
        "batches": a.batches,
        "records": a.records,
        "duplicates": a.duplicates,
        "dropped": a.dropped,
        "unexplained": a.unexplained,
        "unexplained_batches": a.unexplained_batches,
        "untracked": a.untracked,
    })
}

fn account_line(a: &Account) -> String {
    let missing = if a.unexplained_batches == 0 {
        "none missing".to_string()
    } else {
        let ranges: Vec<String> = a
            .unexplained
            .iter()
            .map(|&(first, last)| {
                if first == last {
                    first.to_string()
                } else {
                    format!("{first}..={last}")
                }
            })
            .collect();
        format!("{} MISSING [{}]", a.unexplained_batches, ranges.join(", "))
    };
    let missing = match a.untracked {
        0 => missing,
        n => format!("{missing}, {n} times bookkeeping was cut short (too many ranges)"),
    };
    format!(
        "summary {} boot {:016x}: batches {}..={}, {} received ({} records), {} duplicates, {} dropped by the device, {missing}",
        a.device, a.boot_id, a.first_seq, a.last_seq, a.batches, a.records, a.duplicates, a.dropped
    )
}

/// One record for people: time, device, module (or kilnd), what happened.
fn line(device: &str, r: &Record) -> String {
    let who = r.module.as_deref().unwrap_or("kilnd");
    let what = match &r.body {
        Body::Telemetry { stream, data } => match std::str::from_utf8(data) {
            Ok(text) => format!("{stream} {text}"),
            Err(_) => format!("{stream} 0x{}", hex::encode(data)),
        },
        Body::Log { level, line, .. } => format!("{} {line}", level.as_str()),
        Body::Started(s) => format!(
            "started v{} (attempt {}) in {:.1} ms: verify {:.1}, deserialize {:.1}, instantiate {:.1}, init {:.1}",
            s.version,
            s.attempt,
            ms(s.start_us),
            ms(s.verify_us),
            ms(s.deserialize_us),
            ms(s.instantiate_us),
            ms(s.init_us)
        ),
        Body::TickFailed { status } => format!("kiln_tick returned {status}"),
        Body::Stopped(s) => match s.restart_in_ms {
            Some(ms) => format!("stopped: {}; restart in {ms} ms", s.why),
            None => format!("stopped: {}", s.why),
        },
        Body::Failed { crashes, window_s } => {
            format!("FAILED: {crashes} crashes within {window_s} s; not restarting")
        }
        Body::ModuleStats(s) => format!(
            "stats: cpu {} ms, rss {} KiB, {} pages, {} calls, fuel {}, {} traps, {} restarts",
            s.cpu_ms,
            s.rss_kib.unwrap_or(0),
            s.memory_pages,
            s.calls,
            s.fuel_used,
            s.traps,
            s.restarts
        ),
        Body::DeviceStats(s) => format!(
            "stats: up {} s, load {:.2}, {} MiB available, {} MiB disk free, kilnd rss {} KiB, spool {} batches ({} B), dropped {} batches",
            s.uptime_s,
            s.load_milli as f64 / 1000.0,
            s.mem_available_kib / 1024,
            s.disk_free_kib / 1024,
            s.kilnd_rss_kib,
            s.spool_batches,
            s.spool_bytes,
            s.dropped_batches
        ),
        Body::Dropped(d) => format!(
            "DROPPED batches {}..={} of boot {:016x} ({} records): the device's spool was full",
            d.first_seq, d.last_seq, d.boot_id, d.records
        ),
        Body::Discarded(d) => format!(
            "DISCARDED {} records ({} B): {}",
            d.records,
            d.bytes,
            d.cause.as_str()
        ),
    };
    format!("{} {device} {who} {what}", clock(r.at_ms))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `HH:MM:SS.mmm` UTC.
fn clock(at_ms: u64) -> String {
    let day_ms = at_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// Text from a device made safe for a terminal: every control character (ESC starts
/// escape sequences, CR rewrites the line, C1 codes act as ESC on some terminals) is
/// shown as a `\u{..}` escape instead of being sent.
fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// One JSON line. serde_json escapes U+0000..U+001F but passes DEL and the C1
/// controls through raw; outside strings its output is ASCII punctuation, so any control
/// character left is inside a string, where `\uXXXX` is a valid escape.
fn json_line(v: &Value) -> String {
    let text = v.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\u{:04x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_reaches_the_terminal_without_control_characters() {
        assert!(matches!(printable("temp 21.5 °C"), Cow::Borrowed(_)));
        let shown = printable("ok\u{1b}]0;pwned\u{7}\r\u{9b}2Jx\ty");
        assert_eq!(shown, "ok\\u{1b}]0;pwned\\u{7}\\u{d}\\u{9b}2Jx\\u{9}y");
        assert!(!shown.chars().any(char::is_control));
    }

    #[test]
    fn json_lines_carry_no_raw_control_characters_and_still_parse() {
        let v = json!({ "line": "a\u{1b}[2J\u{7f}\u{85}b\n" });
        let line = json_line(&v);
        assert!(!line.chars().any(char::is_control), "{line}");
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn every_record_kind_prints_escaped() {
        let record = Record {
            at_ms: 0,
            module: Some("m\u{1b}[31m".into()),
            body: Body::Log {
                level: kiln_protocol::abi::Level::Info,
                source: kiln_protocol::worker::LogSource::Abi,
                line: "\u{1b}]52;c;ZXZpbA==\u{7}".into(),
            },
        };
        let shown = printable(&line("dev\r", &record)).into_owned();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("m\\u{1b}[31m"), "{shown}");
    }
}
