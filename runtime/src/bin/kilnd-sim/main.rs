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
//!
//! No device has a thread of its own (kilnd gives its link, agent, pipeline and
//! mirror fetches one each): the links are polled on one tokio runtime, the agents
//! and pipelines turned by a few shard threads (`shard.rs`), and the devices' mirror
//! fetches (kilnd's own HTTP client) run on a pool of `MIRROR_THREADS`, so 10,000
//! devices fit in one process.

mod shard;
mod workers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_runtime::daemon::config::{MqttConfig, TelemetryConfig};
use kiln_runtime::daemon::fleet::{self, AgentIn};
use kiln_runtime::daemon::link::{self, LinkEvent};
use kiln_runtime::daemon::telemetry::{new_boot_id, Deliveries, Pipeline, TelemetryIn};

use shard::{lock, Device, Msg, Shard};
use workers::{parse_crash, Model, Workers};

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
    /// Shard threads that turn the devices' agents and pipelines, and threads that
    /// poll their links (each this many)
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    kiln_runtime::log::init(false);
    let models = Arc::new(args.model.clone());
    let connected = Arc::new(AtomicUsize::new(0));
    let begun = Instant::now();
    // The links' event loops, all on one runtime.
    let links = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .thread_name("links")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd-sim: no runtime for the links: {e}");
            std::process::exit(71);
        }
    };
    let telemetry_every = Duration::from_millis(args.telemetry_ms.max(100));
    let health_every = (args.health_ms > 0).then(|| Duration::from_millis(args.health_ms.max(100)));
    let shards: Vec<Sender<(u32, Msg)>> = (0..args.threads.max(1))
        .map(|n| {
            let (tx, rx) = mpsc::channel();
            let shard = Shard::new(rx, telemetry_every, health_every);
            std::thread::Builder::new()
                .name(format!("shard-{n}"))
                .spawn(move || shard.run())
                .expect("a shard thread starts");
            tx
        })
        .collect();
    #[cfg(feature = "mirror")]
    let mirrors = mirror_pool(MIRROR_THREADS);
    #[cfg(not(feature = "mirror"))]
    let mirrors = ();
    let pause = Duration::from_secs(1) / args.connect_rate.max(1);
    for i in 0..args.devices {
        let name = format!("{}{i:04}", args.name);
        let riscv = i + args.riscv >= args.devices;
        let shard = &shards[i % shards.len()];
        let place = (shard.clone(), (i / shards.len()) as u32);
        let started = start(
            &args,
            &name,
            &spread(&args.broker, i),
            riscv,
            (&connected, &models),
            place,
            &mirrors,
        );
        match started {
            Ok((device, looping)) => {
                // The device first: its link's first event must find it there.
                let _ = shard.send(((i / shards.len()) as u32, Msg::Add(Box::new(device))));
                links.spawn(looping.run());
            }
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
    // The shards and the links serve until the process is killed.
    loop {
        std::thread::park();
    }
}

/// Threads that fetch every device's chunks from mirrors (kilnd: one a device).
#[cfg(feature = "mirror")]
const MIRROR_THREADS: usize = 4;

/// A mirror fetch, and where its answer goes: the device's shard and its place there.
#[cfg(feature = "mirror")]
type Mirrors = Sender<(Sender<(u32, Msg)>, u32, fleet::MirrorJob)>;
#[cfg(not(feature = "mirror"))]
type Mirrors = ();

/// The pool of `threads` that fetch from mirrors with kilnd's own client, each job
/// answered to its device's agent as kilnd's fetching thread answers it.
#[cfg(feature = "mirror")]
fn mirror_pool(threads: usize) -> Mirrors {
    let (tx, rx): (Mirrors, _) = mpsc::channel();
    let rx = Arc::new(Mutex::new(rx));
    for n in 0..threads {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("mirror-{n}"))
            .spawn(move || {
                let mut client = fleet::mirror::Client::new(fleet::mirror::tls_config(None));
                loop {
                    let next = lock(&rx).recv();
                    let Ok((shard, at, job)) = next else {
                        return;
                    };
                    let _ = shard.send((at, Msg::Agent(client.answer(job))));
                }
            })
            .expect("a mirror thread starts");
    }
    tx
}

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

/// Device `name`: kilnd's link (not polled yet), agent and pipeline over its own data
/// dir, its simulated workers sending to `place` (its shard, and its place there).
fn start(
    args: &Args,
    name: &str,
    broker: &str,
    riscv: bool,
    (connected, models): (&Arc<AtomicUsize>, &Arc<Vec<Model>>),
    place: (Sender<(u32, Msg)>, u32),
    #[cfg_attr(not(feature = "mirror"), allow(unused_variables))] mirrors: &Mirrors,
) -> Result<(Device, link::LinkLoop), String> {
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
    let deliveries = Deliveries::default();
    let delivered = deliveries.clone();
    let (shard, at) = place.clone();
    let to_pipeline = shard.clone();
    let up = connected.clone();
    let first_connect = Mutex::new(true);
    let (link, looping) = link::open(
        &config,
        name,
        fleet::last_will(&config, name, &facts, &trust.identity),
        move |event| {
            if matches!(event, LinkEvent::Connected) && std::mem::take(&mut *lock(&first_connect)) {
                up.fetch_add(1, Ordering::Relaxed);
            }
            shard.send((at, Msg::Agent(AgentIn::Link(event)))).is_ok()
        },
        move |delivery| {
            lock(&delivered).push_back(delivery);
            let _ = to_pipeline.send((at, Msg::Telemetry(TelemetryIn::Delivered)));
        },
    )?;
    #[cfg(feature = "mirror")]
    let place_of_mirror = place.clone();
    let workers = Arc::new(Mutex::new(Workers::new(
        name,
        args.crash.clone(),
        models.clone(),
        args.calls_per_s,
        place,
        args.seed,
    )));
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
    // The mirrors its desired states name, as a kilnd with no `mirror` of its own.
    #[cfg(feature = "mirror")]
    let driver = {
        let (shard, at) = place_of_mirror;
        let pool = mirrors.clone();
        driver.with_mirrors(
            fleet::agent::Mirrors::FromState,
            Box::new(move |job| pool.send((shard.clone(), at, job)).is_ok()),
        )
    };
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
    let device = Device {
        driver,
        pipeline,
        workers,
    };
    Ok((device, looping))
}
