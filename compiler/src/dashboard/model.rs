//! What the dashboard knows of the fleet: every message the broker delivers, folded
//! into bounded per-device state. Pure: [`Fleet::on_message`] takes a topic, its bytes
//! and the time, and says which device or group changed; the server turns that into
//! JSON for the page. Nothing a device sends is trusted: statuses, reports and events
//! must verify (a forged one is kept as an invalid message, with the reason), and
//! telemetry batches must decode and name the device whose topic they came on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kiln_protocol::fleet::Topics;
use kiln_protocol::keys::PublicKey;
use kiln_protocol::names::{self, Kind};
use kiln_protocol::parts::MAX_PART;
use kiln_protocol::rollout::gate::{self, Cohort, Gate, Level};
use kiln_protocol::rollout::{Outcome, Phase, Rollout, MAX_ROLLOUT};
use kiln_protocol::telemetry::{self, Batch, Body, Tracker, Verdict};
use kiln_protocol::trust::{OpenError, Registry, Root, SignedRegistry};
use serde_json::{json, Map, Value};

use crate::fleet::messages::{Body as MessageBody, Reader};
use crate::fleet::parts::Assembly;
use crate::fleet::rollout::health::{verdicts, Judged};
use crate::fleet::trust::Identity;

/// How much is kept, per device and per series.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Points per time series (a module stat, a telemetry stream).
    pub points: usize,
    /// Entries of a device's state history.
    pub history: usize,
    /// Series per device (module stats and streams together).
    pub series: usize,
    /// Devices tracked at most.
    pub devices: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            points: 120,
            history: 50,
            series: 32,
            devices: 20_000,
        }
    }
}

/// What changed, for the server to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    Device(String),
    Rollout(String),
    /// The registry changed: every device's identity may have.
    All,
    Nothing,
}

#[derive(Debug, Default)]
struct Series {
    points: VecDeque<(u64, f64)>,
    /// The last value, as text when it was not a number.
    last_text: Option<String>,
}

#[derive(Debug, Default)]
struct Device {
    online: Option<bool>,
    triple: String,
    kilnd: String,
    groups: Vec<String>,
    /// The key its status was signed with (its identity is checked against the
    /// registry when shown, so enrolling shows at once).
    signer: Option<PublicKey>,
    /// (name, version, state, last event) as reported.
    modules: Vec<(String, u64, String, String)>,
    last_event: Option<(u64, String)>,
    last_seen_ms: u64,
    history: VecDeque<(u64, String, String)>,
    series: BTreeMap<String, Series>,
    batches: u64,
    gaps: u64,
    duplicates: u64,
    late: u64,
    last_gap: Option<String>,
    invalid: VecDeque<(u64, String)>,
}

/// The fleet as the dashboard shows it.
pub struct Fleet {
    topics: Topics,
    root: Root,
    registry: Registry,
    limits: Limits,
    devices: BTreeMap<String, Device>,
    rollouts: BTreeMap<String, Value>,
    tracker: Tracker,
    /// The registry's head and parts as retained (see `kiln_protocol::parts`): the
    /// registry changes when they open together. The same for each group's rollout.
    registry_parts: Assembly,
    rollout_parts: BTreeMap<String, Assembly>,
    /// Messages on no device's topic, or for more devices than the limit.
    pub ignored: u64,
}

impl Fleet {
    pub fn new(topics: Topics, root: Root, registry: Registry, limits: Limits) -> Self {
        Fleet {
            topics,
            root,
            registry,
            limits,
            devices: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            tracker: Tracker::default(),
            registry_parts: Assembly::default(),
            rollout_parts: BTreeMap::new(),
            ignored: 0,
        }
    }

    /// The registry, when its head and the parts it names open together.
    fn open_registry(&mut self) -> Changed {
        let Some((head, part)) = self.registry_parts.get() else {
            return Changed::Nothing;
        };
        match SignedRegistry::open(head, part, &self.root) {
            Ok(r) if r != self.registry => {
                self.registry = r;
                Changed::All
            }
            _ => Changed::Nothing,
        }
    }

    /// A rollout record's head or part: the record as it stands once the head and the
    /// parts it names are all in (until then, the last one that was).
    fn on_rollout(&mut self, group: &str, part: Option<[u8; 32]>, payload: &[u8]) -> Changed {
        if names::check(Kind::Group, group).is_err()
            || (!self.rollout_parts.contains_key(group)
                && self.rollout_parts.len() >= self.limits.devices)
        {
            self.ignored += 1;
            return Changed::Nothing;
        }
        let parts = self.rollout_parts.entry(group.to_string()).or_default();
        match part {
            None => parts.head(payload),
            Some(sha) => {
                if !parts.part(sha, payload, MAX_ROLLOUT) {
                    self.ignored += 1;
                    return Changed::Nothing;
                }
            }
        }
        let Some((head, part)) = parts.get() else {
            return Changed::Nothing;
        };
        let summary = match Rollout::verify(head, part, &self.root, group) {
            Ok(r) => rollout_json(&r),
            Err(OpenError::Incomplete(_)) => return Changed::Nothing,
            Err(why) => json!({ "group": group, "invalid": why.to_string() }),
        };
        self.rollouts.insert(group.to_string(), summary);
        Changed::Rollout(group.to_string())
    }

    /// Folds one message in.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> Changed {
        if topic == self.topics.registry() {
            self.registry_parts.head(payload);
            return self.open_registry();
        }
        if let Some(sha) = self.topics.parse_registry_part(topic) {
            if !self.registry_parts.part(sha, payload, MAX_PART) {
                self.ignored += 1;
                return Changed::Nothing;
            }
            return self.open_registry();
        }
        if let Some((group, part)) = self.topics.parse_rollout(topic) {
            return self.on_rollout(group, part, payload);
        }
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            self.ignored += 1;
            return Changed::Nothing;
        };
        if names::check(Kind::Device, device).is_err()
            || (!self.devices.contains_key(device) && self.devices.len() >= self.limits.devices)
        {
            self.ignored += 1;
            return Changed::Nothing;
        }
        let device = device.to_string();
        let limits = self.limits;
        let d = self.devices.entry(device.clone()).or_default();
        let invalid = |d: &mut Device, why: String| {
            d.invalid.push_back((now_ms, why));
            trim(&mut d.invalid, 10);
        };
        if matches!(kind, "status" | "reported" | "events") {
            let heard = match Reader::new(&self.topics, &self.registry).open(topic, payload) {
                Ok(Some(h)) => h,
                Ok(None) => return Changed::Nothing,
                Err(skipped) => {
                    invalid(d, format!("{kind}: {}", skipped.reason));
                    return Changed::Device(device);
                }
            };
            // An enrolled device signs all it says with its key: anything else on its
            // topics is someone else's, never shown as the device's own.
            if self.registry.key_of(&device).is_some() && !heard.is_verified() {
                let why = match &heard.identity {
                    Identity::Mismatch(k) | Identity::Unenrolled(k) => {
                        format!("signed by key {}, not the device's enrolled key", k.id())
                    }
                    _ => "not signed, and the device is enrolled".to_string(),
                };
                invalid(d, format!("{kind}: {why}"));
                return Changed::Device(device);
            }
            match heard.body {
                MessageBody::Status(s) => {
                    d.online = Some(s.online);
                    if let Some(f) = s.facts {
                        d.triple = f.triple;
                        d.kilnd = f.kilnd;
                        d.groups = f.groups;
                    }
                    d.signer = heard.signer;
                    if s.online {
                        d.last_seen_ms = now_ms;
                    }
                }
                MessageBody::Reported(r) => {
                    d.modules = r
                        .modules
                        .iter()
                        .map(|m| {
                            let state = format!("{:?}", m.state).to_lowercase();
                            (m.name.clone(), m.version, state, m.last_event.clone())
                        })
                        .collect();
                    d.last_seen_ms = now_ms;
                }
                MessageBody::Event(e) => {
                    let text = format!("{} v{}: {}", e.module, e.version, e.kind);
                    d.last_event = Some((e.at_ms, text.clone()));
                    d.history
                        .push_back((e.at_ms, e.module.clone(), e.kind.to_string()));
                    trim(&mut d.history, limits.history);
                    d.last_seen_ms = now_ms;
                }
            }
            return Changed::Device(device);
        }
        match kind {
            "telemetry" => {
                let batch = match Batch::decode(payload) {
                    Ok(b) if b.device == device => b,
                    Ok(b) => {
                        invalid(d, format!("telemetry: a batch from `{}`", b.device));
                        return Changed::Device(device);
                    }
                    Err(why) => {
                        invalid(d, format!("telemetry: {why}"));
                        return Changed::Device(device);
                    }
                };
                d.last_seen_ms = now_ms;
                match self
                    .tracker
                    .batch(&device, batch.boot_id, batch.seq, batch.records.len())
                {
                    Verdict::Duplicate => {
                        d.duplicates += 1;
                        return Changed::Device(device);
                    }
                    Verdict::New { gap, late } => {
                        d.batches += 1;
                        if let Some((a, b)) = gap {
                            d.gaps += 1;
                            d.last_gap = Some(format!("batches {a}..={b} missing"));
                        }
                        d.late += u64::from(late);
                    }
                    Verdict::Untracked => d.batches += 1,
                }
                for record in &batch.records {
                    if let Body::Dropped(x) = &record.body {
                        self.tracker.dropped(&device, x);
                    }
                    fold_record(d, record, limits);
                }
            }
            _ => return Changed::Nothing,
        }
        Changed::Device(device)
    }

    /// One row of the fleet table.
    pub fn summary(&self, name: &str) -> Option<Value> {
        let d = self.devices.get(name)?;
        let modules: Vec<Value> = d
            .modules
            .iter()
            .map(|(n, v, s, e)| json!({ "name": n, "version": v, "state": s, "last_event": e }))
            .collect();
        Some(json!({
            "device": name,
            "online": d.online,
            "target": d.triple,
            "kilnd": d.kilnd,
            "groups": d.groups,
            "identity": Identity::of(&self.registry, name, d.signer.as_ref()).word(),
            "modules": modules,
            "last_event": d.last_event.as_ref().map(|(at, t)| json!({ "at_ms": at, "text": t })),
            "last_seen_ms": d.last_seen_ms,
            "telemetry": {
                "batches": d.batches, "gaps": d.gaps, "duplicates": d.duplicates,
                "late": d.late, "last_gap": d.last_gap,
            },
            "invalid": d.invalid.back().map(|(at, why)| json!({ "at_ms": at, "why": why })),
            "invalid_count": d.invalid.len(),
        }))
    }

    /// Everything about one device: its row, history and series.
    pub fn detail(&self, name: &str) -> Option<Value> {
        let d = self.devices.get(name)?;
        let mut v = self.summary(name)?;
        v["history"] = d
            .history
            .iter()
            .map(|(at, m, k)| json!({ "at_ms": at, "module": m, "what": k }))
            .collect();
        let series: Map<String, Value> = d
            .series
            .iter()
            .map(|(k, s)| {
                let points: Vec<Value> = s.points.iter().map(|(t, y)| json!([t, y])).collect();
                (k.clone(), json!({ "points": points, "text": s.last_text }))
            })
            .collect();
        v["series"] = Value::Object(series);
        v["invalid_messages"] = d
            .invalid
            .iter()
            .map(|(at, why)| json!({ "at_ms": at, "why": why }))
            .collect();
        Some(v)
    }

    pub fn device_names(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    pub fn rollout(&self, group: &str) -> Option<&Value> {
        self.rollouts.get(group)
    }

    pub fn rollouts(&self) -> impl Iterator<Item = &Value> {
        self.rollouts.values()
    }
}

fn trim<T>(q: &mut VecDeque<T>, n: usize) {
    while q.len() > n {
        q.pop_front();
    }
}

/// A record into a device's history and series.
fn fold_record(d: &mut Device, record: &telemetry::Record, limits: Limits) {
    let module = record.module.clone().unwrap_or_else(|| "kilnd".into());
    let at = record.at_ms;
    let point = |d: &mut Device, key: String, value: Option<f64>, text: Option<String>| {
        if !d.series.contains_key(&key) && d.series.len() >= limits.series {
            return;
        }
        let s = d.series.entry(key).or_default();
        if let Some(y) = value.filter(|y| y.is_finite()) {
            s.points.push_back((at, y));
            trim(&mut s.points, limits.points);
        }
        s.last_text = text;
    };
    match &record.body {
        Body::Telemetry { stream, data } => {
            let key = format!("{module}/{stream}");
            let text = String::from_utf8_lossy(data);
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Number(n)) => point(d, key, n.as_f64(), None),
                Ok(Value::Object(fields)) => {
                    let mut any = false;
                    for (field, value) in &fields {
                        if let Some(y) = value.as_f64() {
                            any = true;
                            point(d, format!("{key}.{field}"), Some(y), None);
                        }
                    }
                    if !any {
                        point(d, key, None, Some(clip(&text)));
                    }
                }
                _ => point(d, key, None, Some(clip(&text))),
            }
        }
        Body::ModuleStats(_) | Body::DeviceStats(_) => {
            let v = telemetry::to_json(record);
            let wanted: BTreeSet<&str> = [
                "cpu_ms",
                "rss_kib",
                "restarts",
                "fuel_used",
                "traps",
                "kilnd_rss_kib",
                "load_milli",
                "spool_batches",
            ]
            .into();
            if let Some(fields) = v.as_object() {
                for (field, value) in fields {
                    if wanted.contains(field.as_str()) {
                        if let Some(y) = value.as_f64() {
                            point(d, format!("{module} {field}"), Some(y), None);
                        }
                    }
                }
            }
        }
        Body::Started(s) => {
            d.history
                .push_back((at, module, format!("started v{}", s.version)));
            trim(&mut d.history, limits.history);
        }
        Body::Stopped(s) => {
            d.history
                .push_back((at, module, format!("stopped: {}", s.why)));
            trim(&mut d.history, limits.history);
        }
        _ => {}
    }
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// A rollout record as the page shows it.
fn rollout_json(r: &Rollout) -> Value {
    let (waiting, pending, committed, failed) = r.counts();
    let waves: Vec<Value> = r
        .waves
        .iter()
        .map(|w| {
            let devices: Vec<Value> = w
                .iter()
                .map(|name| {
                    let d = &r.devices[name];
                    let (outcome, why) = match &d.outcome {
                        Outcome::Waiting => ("waiting", None),
                        Outcome::Sent { .. } => ("pending", None),
                        Outcome::Committed { .. } => ("committed", None),
                        Outcome::Failed { why } => ("failed", Some(why.clone())),
                    };
                    json!({ "device": name, "outcome": outcome, "why": why, "returned": d.returned })
                })
                .collect();
            json!(devices)
        })
        .collect();
    json!({
        "group": r.group,
        "id": r.id,
        "release": r.label(),
        "phase": r.phase.to_string(),
        "started_by": r.started_by,
        "updated_ms": r.updated_ms,
        "counts": { "waiting": waiting, "pending": pending, "committed": committed, "failed": failed },
        "waves": waves,
        "skipped": r.skipped,
        "cohort": r.policy.cohort,
        "history": r.history.iter().map(|(at, l)| json!({ "at_ms": at, "text": l })).collect::<Vec<_>>(),
        "gates": gates_json(r),
    })
}

/// Each gate of `r`'s policy and, per wave that started, what it reads of the wave
/// ([`gate::read`] over [`Rollout::cohorts`]: the signal in the wave, the control and
/// the baseline in the bound's terms, the limit, the devices) beside what the rollout
/// decided of it. A policy whose gates do not parse gives one entry with the error.
fn gates_json(r: &Rollout) -> Value {
    let gates = match r.policy.parsed_gates() {
        Ok(g) => g,
        Err(why) => {
            return json!([{ "gate": r.policy.gates.join("; "), "error": why, "waves": [] }])
        }
    };
    if gates.is_empty() {
        return json!([]);
    }
    let started = r.wave_starts.len().min(r.waves.len()) as u32;
    let cohorts: Vec<(Cohort, Cohort, Cohort, bool)> = (0..started).map(|w| r.cohorts(w)).collect();
    let judged = verdicts(r);
    let gates: Vec<Value> = gates
        .iter()
        .zip(&r.policy.gates)
        .map(|(g, text)| {
            let waves: Vec<Value> = cohorts
                .iter()
                .enumerate()
                .map(|(i, (w, control, baseline, no_control))| {
                    let reading = gate::read(g, w, control, baseline);
                    let last = judged.iter().rev().find(|j| j.wave as usize == i);
                    let level = |l: Level| json!({ "value": l.value, "devices": l.sample });
                    json!({
                        "wave": i + 1,
                        "wave_value": level(reading.wave),
                        "control": level(reading.control),
                        "baseline": level(reading.baseline),
                        "control_is_baseline": no_control,
                        "bound": g.bound.to_string(),
                        "limit": reading.limit,
                        "sample": reading.sample,
                        "min": g.min,
                        "now": verdict_word(&reading.verdict),
                        "verdict": decided(r, i, last, g),
                        "line": last.and_then(|j| j.breach_of(g)),
                    })
                })
                .collect();
            json!({ "gate": text, "waves": waves })
        })
        .collect();
    json!(gates)
}

fn verdict_word(v: &gate::Verdict) -> &'static str {
    match v {
        gate::Verdict::Pass => "pass",
        gate::Verdict::Wait => "wait",
        gate::Verdict::Breach(_) => "breach",
    }
}

/// What the rollout decided of `gate` for wave `i`: its last judgment in the
/// history; else `went on` for a wave whose judgment left the history (a later wave
/// started, or the rollout completed), else `not yet judged`.
fn decided(r: &Rollout, i: usize, last: Option<&Judged>, gate: &Gate) -> &'static str {
    match last {
        Some(j) => j.of_gate(gate),
        None if i + 1 < r.wave_starts.len() || r.phase == Phase::Complete => "went on",
        None => "not yet judged",
    }
}

#[cfg(test)]
mod tests;
