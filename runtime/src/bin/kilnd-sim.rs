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
use kiln_runtime::daemon::link::{self, LinkEvent};
use kiln_runtime::daemon::telemetry::{new_boot_id, Deliveries, Pipeline, TelemetryIn};

/// Run N simulated kilnd devices against a broker
#[derive(Parser, Debug)]
struct Args {
    /// mqtt://host[:port]
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

/// FNV-1a: spreads the crashing share over the names (so over every wave).
fn share_of(name: &str) -> u8 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % 100) as u8
}

/// One device's simulated supervisor: what runs, by module.
struct Workers {
    name: String,
    crash: Vec<(u64, u8)>,
    running: BTreeMap<String, u64>,
    agent: SyncSender<AgentIn>,
    telemetry: SyncSender<TelemetryIn>,
    started: Instant,
}

impl Workers {
    fn record(&self, module: &str, body: Body) {
        let record = Record {
            at_ms: now_ms(),
            module: Some(module.to_string()),
            body,
        };
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
        for (name, version) in wanted {
            if self.running.get(&name) == Some(&version) {
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
                self.running.insert(name.clone(), version);
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

    /// A telemetry value from every running module; module stats for the sampler.
    fn tick(&self) {
        let t = self.started.elapsed().as_secs_f64();
        for module in self.running.keys() {
            let value = 20.0 + (t / 10.0).sin() * 5.0 + f64::from(share_of(&self.name)) / 100.0;
            let record = Record {
                at_ms: now_ms(),
                module: Some(module.clone()),
                body: Body::Telemetry {
                    stream: "filtered".into(),
                    data: format!("{{\"filtered\":{value:.3}}}").into_bytes(),
                },
            };
            let _ = self.telemetry.try_send(TelemetryIn::Record(record, None));
        }
    }

    fn sample(&self) -> Vec<Record> {
        self.running
            .keys()
            .map(|module| Record {
                at_ms: now_ms(),
                module: Some(module.clone()),
                body: Body::ModuleStats(ModuleStats {
                    cpu_ms: self.started.elapsed().as_millis() as u64 / 100,
                    rss_kib: Some(1024),
                    memory_pages: 1,
                    calls: 0,
                    fuel_used: 0,
                    traps: 0,
                    restarts: 0,
                }),
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
    let connected = Arc::new(AtomicUsize::new(0));
    let begun = Instant::now();
    let mut fleet = Vec::new();
    let pause = Duration::from_secs(1) / args.connect_rate.max(1);
    for i in 0..args.devices {
        let name = format!("{}{i:04}", args.name);
        let riscv = i + args.riscv >= args.devices;
        match start(&args, &name, riscv, &connected) {
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
    loop {
        std::thread::sleep(Duration::from_millis(args.telemetry_ms.max(100)));
        for w in &fleet {
            lock(w).tick();
        }
    }
}

fn start(
    args: &Args,
    name: &str,
    riscv: bool,
    connected: &Arc<AtomicUsize>,
) -> Result<Arc<Mutex<Workers>>, String> {
    let data_dir = args.data.join(name);
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let config = MqttConfig {
        broker: args.broker.clone(),
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
        running: BTreeMap::new(),
        agent: agent_tx,
        telemetry: telemetry_tx,
        started: Instant::now(),
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
