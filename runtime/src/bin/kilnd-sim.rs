//! `kilnd-sim`: a fleet of simulated devices in one process, for fleet-scale tests
//! (`scripts/fleet-scale.sh`, the 100-device e2e test). A test build only (feature
//! `test-hooks`); never shipped.
//!
//! Each device is kilnd's own device side: its MQTT link with its own session and
//! last will, the update agent and its driver over a real data dir (downloads,
//! verification, A/B slots, the device state), its identity key, and the telemetry
//! pipeline with its disk spool. Only the worker is simulated: when the agent runs a
//! module, the simulated supervisor answers `started`, or, for a device in the
//! `--crash` share of a version, that the worker crashed. A running module publishes
//! a numeric telemetry stream (`filtered`, like the sensor-filter example).
//!
//! A module model (`--model`, per version) says how a running module behaves: it is
//! called `--calls-per-s` times a second, a share of the calls trap or restart it, it
//! burns fuel, and its telemetry carries metrics of its own. Each device counts that
//! in kilnd's own `HealthBook` and sends its period every `--health-ms` through its
//! fleet agent, which signs it and publishes it on `devices/{id}/health` as kilnd does:
//! what a rollout's health gates judge.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_protocol::clock::now_ms;
use kiln_protocol::telemetry::{Body, ModuleStats, Record, Started, Stopped};
use kiln_runtime::daemon::config::{ModulePlan, MqttConfig, TelemetryConfig};
use kiln_runtime::daemon::fleet::{self, AgentIn};
use kiln_runtime::daemon::health::HealthBook;
use kiln_runtime::daemon::link::{self, LinkEvent};
use kiln_runtime::daemon::telemetry::{new_boot_id, Deliveries, Pipeline, TelemetryIn};

const MODEL_HELP: &str = "\
Module model (--model VERSION:KEY=VALUE,...; repeatable):
  VERSION          a module version, or * for every version no other --model names
  traps=PER_MILLE  calls that trap, per thousand (a decimal: 2.5)
  restarts=PER_MILLE
                   calls after which the worker restarts, per thousand
  fuel=N           fuel per call
  metric=NAME:MEAN a field NAME of the module's telemetry record (beside
                   `filtered`), each reading MEAN +-10%; repeatable
A running module is called --calls-per-s times a second; each call traps or restarts
it with the model's chance, drawn from a generator seeded by --seed and the device's
name. The traps are counted (as a worker that traps after its health window): the
worker is not stopped, so the update agent commits the version and only the health
gates can see them (--crash makes a version fail its health window instead). A
version no model names (and no *) is called but never traps and has no metric.
Every device applies the same models.

Examples:
  kilnd-sim ... --model '*:traps=5,metric=latency_ms:100' --model '2:traps=10,metric=latency_ms:100'
  kilnd-sim ... --model 3:traps=5,restarts=1,fuel=2000,metric=latency_ms:130,metric=errors:0.5";

/// Run N simulated kilnd devices against a broker
#[derive(Parser, Debug)]
#[command(after_help = MODEL_HELP)]
struct Args {
    /// mqtt://host[:port], or a cluster's nodes as URL,URL,...: device i starts on
    /// the list's node i mod N (then the others, in order), so the fleet is spread
    /// over the nodes and a node's loss moves its share of it
    #[arg(long)]
    broker: String,
    /// The fleet's root document
    #[arg(long)]
    root: PathBuf,
    /// Data dirs go under it, one per device
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device names: the prefix and a four-digit number
    #[arg(long, default_value = "sim-")]
    name: String,
    #[arg(long, default_value = "lab")]
    group: Vec<String>,
    #[arg(long, default_value = kiln_protocol::fleet::DEFAULT_PREFIX)]
    prefix: String,
    /// VERSION:PERCENT: that share of devices (chosen by a hash of the name) crashes
    /// running that version of any module (repeatable)
    #[arg(long, value_parser = parse_crash)]
    crash: Vec<(u64, u8)>,
    /// How often a running module publishes a telemetry value
    #[arg(long, default_value_t = 5000)]
    telemetry_ms: u64,
    /// The last N devices say they are riscv64 (a mixed group: a release for x86_64
    /// only leaves them out)
    #[arg(long, default_value_t = 0)]
    riscv: usize,
    /// Connections opened per second (a thousand at once is a thundering herd)
    #[arg(long, default_value_t = 200)]
    connect_rate: u32,
    /// VERSION:KEY=VALUE,...: how a running module of that version behaves (its
    /// traps, restarts, fuel and metrics; see below; repeatable)
    #[arg(long, value_parser = Model::parse)]
    model: Vec<Model>,
    /// Calls into each running module per second
    #[arg(long, default_value_t = 100)]
    calls_per_s: u32,
    /// How often each device sends its modules' health (kilnd's health_s, and its
    /// default of a minute); 0: never
    #[arg(long, default_value_t = 60_000)]
    health_ms: u64,
    /// Seeds the draws of the models' traps, restarts and readings
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// How a module of one version (or of any, `*`) behaves.
#[derive(Debug, Clone, PartialEq)]
struct Model {
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
    fn parse(s: &str) -> Result<Model, String> {
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
fn model_of(models: &[Model], version: u64) -> Option<&Model> {
    models
        .iter()
        .find(|m| m.version == Some(version))
        .or_else(|| models.iter().find(|m| m.version.is_none()))
}

/// splitmix64: a device's own reproducible draws.
struct Draws(u64);

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
struct Running {
    version: u64,
    calls: u64,
    fuel_used: u64,
    traps: u32,
    restarts: u32,
    /// When the counters were last brought up to date, and the part of a call due.
    at: Instant,
    due: f64,
}

fn parse_crash(s: &str) -> Result<(u64, u8), String> {
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
fn fnv(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Spreads the crashing share over the names (so over every wave).
fn share_of(name: &str) -> u8 {
    (fnv(name) % 100) as u8
}

/// One device's simulated supervisor: what runs, by module.
struct Workers {
    name: String,
    crash: Vec<(u64, u8)>,
    models: Arc<Vec<Model>>,
    calls_per_s: u32,
    running: BTreeMap<String, Running>,
    agent: SyncSender<AgentIn>,
    telemetry: SyncSender<TelemetryIn>,
    started: Instant,
    /// The modules' health this period, as kilnd's records loop keeps it.
    book: HealthBook,
    draws: Draws,
}

impl Workers {
    fn record(&mut self, module: &str, body: Body) {
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
        let _ = self
            .telemetry
            .try_send(TelemetryIn::Record(record.clone(), None));
        let agent = self.agent.clone();
        // From another thread: the agent calls `apply` on its own thread, and its
        // queue is bounded.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = agent.send(AgentIn::Record(record));
        });
    }

    fn apply(&mut self, plans: Vec<ModulePlan>) {
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
    fn advance(&mut self) {
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
    fn stats_of(&self, module: &str) -> Option<ModuleStats> {
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
    fn tick(&mut self) {
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
            let _ = self.telemetry.try_send(TelemetryIn::Record(record, None));
        }
    }

    /// The period that ends now, `period_ms` long, to the fleet agent to sign and
    /// publish (if its queue has room, as kilnd).
    fn health(&mut self, period_ms: u64) {
        self.advance();
        let modules: Vec<String> = self.running.keys().cloned().collect();
        for module in modules {
            if let Some(stats) = self.stats_of(&module) {
                self.book.sample(&module, &stats);
            }
        }
        let period = self.book.take(period_ms);
        let _ = self.agent.try_send(AgentIn::Health(period));
    }

    /// Module stats for the telemetry pipeline's sampler.
    fn sample(&mut self) -> Vec<Record> {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() {
    let args = Args::parse();
    kiln_runtime::log::init(false);
    let models = Arc::new(args.model.clone());
    let connected = Arc::new(AtomicUsize::new(0));
    let begun = Instant::now();
    let mut fleet = Vec::new();
    let pause = Duration::from_secs(1) / args.connect_rate.max(1);
    for i in 0..args.devices {
        let name = format!("{}{i:04}", args.name);
        let riscv = i + args.riscv >= args.devices;
        match start(
            &args,
            &name,
            &spread(&args.broker, i),
            riscv,
            &connected,
            &models,
        ) {
            Ok(w) => fleet.push(w),
            Err(e) => {
                eprintln!("kilnd-sim: device {name}: {e}");
                std::process::exit(78);
            }
        }
        std::thread::sleep(pause);
    }
    loop {
        let n = connected.load(Ordering::Relaxed);
        if n >= args.devices {
            println!(
                "kilnd-sim: {} devices connected in {} ms",
                args.devices,
                begun.elapsed().as_millis()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Telemetry every telemetry_ms, health every health_ms, from this one thread.
    let telemetry_every = Duration::from_millis(args.telemetry_ms.max(100));
    let health_every = (args.health_ms > 0).then(|| Duration::from_millis(args.health_ms.max(100)));
    let (mut next_telemetry, mut last_health) = (Instant::now() + telemetry_every, Instant::now());
    loop {
        let next_health = health_every.map(|every| last_health + every);
        let wake = next_health.map_or(next_telemetry, |h| h.min(next_telemetry));
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        if now >= next_telemetry {
            next_telemetry += telemetry_every;
            for w in &fleet {
                lock(w).tick();
            }
        }
        if next_health.is_some_and(|h| now >= h) {
            let period_ms = now.duration_since(last_health).as_millis() as u64;
            last_health = now;
            for w in &fleet {
                lock(w).health(period_ms);
            }
        }
    }
}

/// The broker list rotated so that it starts at its entry `i mod N`.
fn spread(brokers: &str, i: usize) -> String {
    let list: Vec<&str> = brokers.split(',').collect();
    let first = i % list.len();
    list[first..]
        .iter()
        .chain(&list[..first])
        .copied()
        .collect::<Vec<_>>()
        .join(",")
}

fn start(
    args: &Args,
    name: &str,
    broker: &str,
    riscv: bool,
    connected: &Arc<AtomicUsize>,
    models: &Arc<Vec<Model>>,
) -> Result<Arc<Mutex<Workers>>, String> {
    let data_dir = args.data.join(name);
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let config = MqttConfig {
        broker: broker.to_string(),
        ca: None,
        client_cert: None,
        client_key: None,
        prefix: args.prefix.clone(),
        groups: args.group.clone(),
        username: None,
        password: None,
        keep_alive_s: 30,
        stale_after_s: 7 * 24 * 3600,
        not_before: None,
        not_before_ms: 0,
    };
    let boot_id = new_boot_id();
    let mut facts = fleet::facts(&config, boot_id);
    if riscv {
        facts.triple = "riscv64gc-unknown-linux-gnu".into();
        facts.cpu_features = Vec::new();
    }
    let trust = fleet::trust(&config, &args.root, &data_dir).map_err(|e| e.to_string())?;
    let (agent_tx, agent_rx) = mpsc::sync_channel(64);
    let (telemetry_tx, telemetry_rx) = mpsc::sync_channel(4096);
    let deliveries = Deliveries::default();
    let delivered = deliveries.clone();
    let (to_agent, acks) = (agent_tx.clone(), telemetry_tx.clone());
    let up = connected.clone();
    let first_connect = Mutex::new(true);
    let link = link::connect(
        &config,
        name,
        fleet::last_will(&config, name, &facts, &trust.identity),
        move |event| {
            if matches!(event, LinkEvent::Connected) && std::mem::take(&mut *lock(&first_connect)) {
                up.fetch_add(1, Ordering::Relaxed);
            }
            to_agent.send(AgentIn::Link(event)).is_ok()
        },
        move |delivery| {
            lock(&delivered).push_back(delivery);
            let _ = acks.try_send(TelemetryIn::Delivered);
        },
    )?;
    let workers = Arc::new(Mutex::new(Workers {
        name: name.to_string(),
        crash: args.crash.clone(),
        models: models.clone(),
        calls_per_s: args.calls_per_s,
        running: BTreeMap::new(),
        agent: agent_tx,
        telemetry: telemetry_tx,
        started: Instant::now(),
        book: HealthBook::new(),
        draws: Draws(args.seed ^ fnv(name)),
    }));
    let w = workers.clone();
    let apply: fleet::ApplyFn = Box::new(move |plans| lock(&w).apply(plans));
    let driver = fleet::start(
        &config,
        name,
        data_dir.clone(),
        trust,
        apply,
        link.clone(),
        facts,
    );
    let sampled = workers.clone();
    let pipeline = Pipeline::open(
        TelemetryConfig::default(),
        name,
        boot_id,
        data_dir,
        kiln_protocol::fleet::Topics::new(&config.prefix).telemetry(name),
        (link, deliveries),
        Box::new(move || lock(&sampled).sample()),
    );
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || pipeline.run(telemetry_rx))
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || driver.run(agent_rx))
        .map_err(|e| e.to_string())?;
    Ok(workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_names_its_version_and_what_a_call_does() {
        let m = Model::parse("2:traps=10,restarts=0.5,fuel=300,metric=latency_ms:100,metric=e:-1")
            .unwrap();
        assert_eq!(m.version, Some(2));
        assert_eq!((m.traps, m.restarts, m.fuel), (0.01, 0.0005, 300));
        assert_eq!(
            m.metrics,
            [("latency_ms".to_string(), 100.0), ("e".to_string(), -1.0)]
        );
        let any = Model::parse("*:traps=5").unwrap();
        assert_eq!(any.version, None);
        let models = [any, m];
        assert_eq!(model_of(&models, 2).unwrap().version, Some(2));
        assert_eq!(model_of(&models, 7).unwrap().version, None);
        assert!(model_of(&models[1..], 7).is_none());
        for bad in [
            "2",
            "x:traps=1",
            "2:traps=2000",
            "2:trap=1",
            "2:metric=a.b:1",
            "2:metric=x:y",
            "2:fuel=1.5",
        ] {
            assert!(Model::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_start_on_the_nodes_of_a_list_in_turn() {
        assert_eq!(spread("mqtt://a:1", 5), "mqtt://a:1");
        let list = "mqtt://a:1,mqtt://b:2,mqtt://c:3";
        assert_eq!(spread(list, 0), list);
        assert_eq!(spread(list, 1), "mqtt://b:2,mqtt://c:3,mqtt://a:1");
        assert_eq!(spread(list, 5), "mqtt://c:3,mqtt://a:1,mqtt://b:2");
    }

    #[test]
    fn draws_are_uniform_and_reproducible() {
        let (mut a, mut b) = (Draws(7), Draws(7));
        let xs: Vec<f64> = (0..10_000).map(|_| a.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().all(|x| *x == b.unit()));
        let under = xs.iter().filter(|x| **x < 0.01).count();
        assert!((60..140).contains(&under), "{under}");
    }
}
