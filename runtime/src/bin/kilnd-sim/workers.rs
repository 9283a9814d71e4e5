//! A simulated device's supervisor ([`Workers`]): what its modules do, as their
//! models (`--model`) and the crash shares (`--crash`) say.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::clock::now_ms;
use kiln_protocol::telemetry::{Body, ModuleStats, Record, Started, Stopped};
use kiln_runtime::daemon::config::ModulePlan;
use kiln_runtime::daemon::fleet::AgentIn;
use kiln_runtime::daemon::health::HealthBook;
use kiln_runtime::daemon::telemetry::TelemetryIn;

use crate::shard::Msg;

/// How a module of one version (or of any, `*`) behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// `None`: every version no other model names.
    version: Option<u64>,
    /// Chances per call, from 0 to 1.
    traps: f64,
    restarts: f64,
    fuel: u64,
    /// Telemetry fields and their mean readings.
    metrics: Vec<(String, f64)>,
}

impl Model {
    /// `2:traps=10,restarts=1,fuel=500,metric=latency_ms:100`.
    pub fn parse(s: &str) -> Result<Model, String> {
        let (v, spec) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: VERSION:KEY=VALUE,... (e.g. 2:traps=10)"))?;
        let version = match v {
            "*" => None,
            v => Some(
                v.parse()
                    .map_err(|_| format!("`{v}`: not a version (a number, or *)"))?,
            ),
        };
        let mut model = Model {
            version,
            traps: 0.0,
            restarts: 0.0,
            fuel: 0,
            metrics: Vec::new(),
        };
        let per_mille = |key: &str, n: &str| match n.parse::<f64>() {
            Ok(p) if (0.0..=1000.0).contains(&p) => Ok(p / 1000.0),
            _ => Err(format!(
                "{key}=`{n}`: a number of calls per thousand, 0 to 1000"
            )),
        };
        for item in spec.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: KEY=VALUE"))?;
            match key {
                "traps" => model.traps = per_mille(key, value)?,
                "restarts" => model.restarts = per_mille(key, value)?,
                "fuel" => {
                    model.fuel = value
                        .parse()
                        .map_err(|_| format!("fuel=`{value}`: fuel per call, a whole number"))?
                }
                "metric" => {
                    let (name, mean) = value
                        .split_once(':')
                        .ok_or_else(|| format!("metric=`{value}`: NAME:MEAN"))?;
                    kiln_protocol::rollout::gate::check_metric(name)?;
                    let mean = mean
                        .parse::<f64>()
                        .ok()
                        .filter(|m| m.is_finite())
                        .ok_or_else(|| format!("metric=`{value}`: `{mean}` is not a number"))?;
                    model.metrics.push((name.to_string(), mean));
                }
                _ => return Err(format!("`{key}`: not traps, restarts, fuel or metric")),
            }
        }
        Ok(model)
    }
}

/// The model of `version`: the one naming it, else `*`'s.
pub fn model_of(models: &[Model], version: u64) -> Option<&Model> {
    models
        .iter()
        .find(|m| m.version == Some(version))
        .or_else(|| models.iter().find(|m| m.version.is_none()))
}

/// splitmix64: a device's own reproducible draws.
pub struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A running module: its version and its supervisor's counters, which go on across
/// versions (a sample at each start closes the old version's share, as in kilnd).
pub struct Running {
    version: u64,
    calls: u64,
    fuel_used: u64,
    traps: u32,
    restarts: u32,
    /// When the counters were last brought up to date, and the part of a call due.
    at: Instant,
    due: f64,
}

pub fn parse_crash(s: &str) -> Result<(u64, u8), String> {
    let (v, p) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: VERSION:PERCENT"))?;
    let v = v.parse().map_err(|_| format!("`{v}`: not a version"))?;
    let p: u8 = p
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{p}`: not a percentage"))?;
    Ok((v, p.min(100)))
}

/// FNV-1a of a name.
pub fn fnv(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Spreads the crashing share over the names (so over every wave).
pub fn share_of(name: &str) -> u8 {
    (fnv(name) % 100) as u8
}

/// One device's simulated supervisor: what runs, by module.
pub struct Workers {
    name: String,
    crash: Vec<(u64, u8)>,
    models: Arc<Vec<Model>>,
    calls_per_s: u32,
    running: BTreeMap<String, Running>,
    /// The device's shard, and its place there: where its records and its agent's
    /// inputs go.
    to: Sender<(u32, Msg)>,
    at: u32,
    started: Instant,
    /// The modules' health this period, as kilnd's records loop keeps it.
    book: HealthBook,
    draws: Draws,
}

impl Workers {
    /// The supervisor of device `name`, at `at` of the shard `to` feeds.
    pub fn new(
        name: &str,
        crash: Vec<(u64, u8)>,
        models: Arc<Vec<Model>>,
        calls_per_s: u32,
        (to, at): (Sender<(u32, Msg)>, u32),
        seed: u64,
    ) -> Self {
        Workers {
            name: name.to_string(),
            crash,
            models,
            calls_per_s,
            running: BTreeMap::new(),
            to,
            at,
            started: Instant::now(),
            book: HealthBook::new(),
            draws: Draws(seed ^ fnv(name)),
        }
    }

    pub fn record(&mut self, module: &str, body: Body) {
        let record = Record {
            at_ms: now_ms(),
            module: Some(module.to_string()),
            body,
        };
        // As kilnd does: a start or a stop first samples the module's counters.
        if matches!(record.body, Body::Started(_) | Body::Stopped(_)) {
            if let Some(stats) = self.stats_of(module) {
                self.book.sample(module, &stats);
            }
        }
        self.book.observe(&record);
        self.send(Msg::Telemetry(TelemetryIn::Record(
            Box::new(record.clone()),
            None,
        )));
        // As a worker's would, the record reaches the agent a moment later (the agent
        // is in the middle of `apply` now).
        let when = Instant::now() + Duration::from_millis(50);
        self.send(Msg::Later(when, AgentIn::Record(record)));
    }

    fn send(&self, msg: Msg) {
        let _ = self.to.send((self.at, msg));
    }

    pub fn apply(&mut self, plans: Vec<ModulePlan>) {
        let wanted: BTreeMap<String, u64> = plans
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.expect.as_ref()?.version)))
            .collect();
        self.running.retain(|name, _| wanted.contains_key(name));
        // What the versions running until now did.
        self.advance();
        for (name, version) in wanted {
            if self.running.get(&name).map(|r| r.version) == Some(version) {
                continue;
            }
            let crashes = self
                .crash
                .iter()
                .any(|(v, p)| *v == version && share_of(&self.name) < *p);
            if crashes {
                self.running.remove(&name);
                self.record(
                    &name,
                    Body::Stopped(Stopped {
                        reason: "trap".into(),
                        why: "simulated crash (kilnd-sim --crash)".into(),
                        exit_code: None,
                        uptime_ms: 40,
                        peak_rss_kib: None,
                        crashes_in_window: 1,
                        restart_in_ms: None,
                    }),
                );
            } else {
                let running = self.running.entry(name.clone()).or_insert(Running {
                    version,
                    calls: 0,
                    fuel_used: 0,
                    traps: 0,
                    restarts: 0,
                    at: Instant::now(),
                    due: 0.0,
                });
                running.version = version;
                self.record(
                    &name,
                    Body::Started(Started {
                        attempt: 1,
                        pid: 0,
                        version,
                        command: false,
                        start_us: 1000,
                        verify_us: 0,
                        deserialize_us: 0,
                        instantiate_us: 0,
                        init_us: 0,
                        first_tick_us: None,
                        fuel_used: None,
                        memory_pages: 1,
                        rss_kib: None,
                    }),
                );
            }
        }
    }

    /// Brings every running module's counters up to now: the calls due since the last
    /// time, each trapping or restarting it with its version's chance.
    pub fn advance(&mut self) {
        let now = Instant::now();
        let rate = f64::from(self.calls_per_s);
        for r in self.running.values_mut() {
            let due = r.due + now.duration_since(r.at).as_secs_f64() * rate;
            r.at = now;
            let calls = due.floor();
            r.due = due - calls;
            let model = model_of(&self.models, r.version);
            for _ in 0..calls as u64 {
                let Some(m) = model else {
                    r.calls += 1;
                    continue;
                };
                // A trapped call is not among the supervisor's calls (see HealthBook).
                if m.traps > 0.0 && self.draws.unit() < m.traps {
                    r.traps = r.traps.saturating_add(1);
                } else {
                    r.calls += 1;
                }
                if m.restarts > 0.0 && self.draws.unit() < m.restarts {
                    r.restarts = r.restarts.saturating_add(1);
                }
                r.fuel_used = r.fuel_used.saturating_add(m.fuel);
            }
        }
    }

    /// `module`'s supervisor counters, as kilnd's sampler reads them.
    pub fn stats_of(&self, module: &str) -> Option<ModuleStats> {
        let r = self.running.get(module)?;
        Some(ModuleStats {
            cpu_ms: self.started.elapsed().as_millis() as u64 / 100,
            rss_kib: Some(1024),
            memory_pages: 1,
            calls: r.calls,
            fuel_used: r.fuel_used,
            traps: r.traps,
            restarts: r.restarts,
        })
    }

    /// A telemetry record from every running module: `filtered`, and its model's
    /// metrics.
    pub fn tick(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        let modules: Vec<(String, u64)> = self
            .running
            .iter()
            .map(|(name, r)| (name.clone(), r.version))
            .collect();
        for (module, version) in modules {
            let value = 20.0 + (t / 10.0).sin() * 5.0 + f64::from(share_of(&self.name)) / 100.0;
            let mut data = format!("{{\"filtered\":{value:.3}");
            for (name, mean) in model_of(&self.models, version)
                .map(|m| m.metrics.as_slice())
                .unwrap_or_default()
            {
                let reading = mean * (0.9 + 0.2 * self.draws.unit());
                data.push_str(&format!(",\"{name}\":{reading:.4}"));
            }
            data.push('}');
            let record = Record {
                at_ms: now_ms(),
                module: Some(module),
                body: Body::Telemetry {
                    stream: "filtered".into(),
                    data: data.into_bytes(),
                },
            };
            self.book.observe(&record);
            self.send(Msg::Telemetry(TelemetryIn::Record(Box::new(record), None)));
        }
    }

    /// The period that ends now, `period_ms` long, to the fleet agent to sign and
    /// publish (if its queue has room, as kilnd).
    pub fn health(&mut self, period_ms: u64) {
        self.advance();
        let modules: Vec<String> = self.running.keys().cloned().collect();
        for module in modules {
            if let Some(stats) = self.stats_of(&module) {
                self.book.sample(&module, &stats);
            }
        }
        let period = self.book.take(period_ms);
        self.send(Msg::Agent(AgentIn::Health(period)));
    }

    /// Module stats for the telemetry pipeline's sampler.
    pub fn sample(&mut self) -> Vec<Record> {
        self.advance();
        self.running
            .keys()
            .filter_map(|module| {
                Some(Record {
                    at_ms: now_ms(),
                    module: Some(module.clone()),
                    body: Body::ModuleStats(self.stats_of(module)?),
                })
            })
            .collect()
    }
}
