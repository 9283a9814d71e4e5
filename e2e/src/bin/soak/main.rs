//! `soak`: a chaos soak of a small fleet on this machine. From a seed, at random
//! intervals, it kills kilnd and workers, stops, kills and pauses the broker, pushes
//! good, crashing, reverted and untrusted releases, runs `kiln gc`, fills data dirs
//! and floods telemetry, while it checks the invariants; then it heals everything,
//! pushes a last release and checks every device converges to it and every record
//! is accounted for.
//!
//! ```text
//! scripts/soak.sh [--minutes N] [--seed S] [--devices D]
//! ```
//!
//! One file per concern: `schedule` (the faults, a pure function of the seed),
//! `invariants` (a pure checker of what was observed), `fleet` (the processes), and
//! `report`. Exit codes: 0 every invariant held, 1 one broke (printed with the seed,
//! the time and the faults before it), 2 bad arguments, 70 the soak itself could not
//! run.

mod fleet;
mod invariants;
mod report;
mod schedule;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use kiln_e2e::path_str;
use kiln_protocol::fleet::ModuleState;

use fleet::{now_ms, Artifacts, BrokerState, Device, Mosquitto, ObsTx};
use invariants::{Bounds, Checker, Ms, Obs, Violation};
use report::Report;
use schedule::{Fault, Planned};

#[derive(Parser)]
#[command(about = "A chaos soak of a small kiln fleet on this machine")]
struct Args {
    /// How long to inject faults and heal, in minutes (fractions allowed: 1 = 60 s)
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The seed every fault comes from
    #[arg(long, default_value_t = 20261130)]
    seed: u64,
    /// Devices: the first native, then aarch64 and riscv64 under qemu-user, in turn
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    devices: u64,
    /// Print the faults the seed plans, one a line, and exit
    #[arg(long)]
    plan: bool,
}

const TARGETS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "riscv64-linux"];

/// The bounds the soak holds kiln to. Emulated devices run 5-10x slower and their
/// kilnd's memory includes qemu's own.
fn bounds(devices: &[Device]) -> Bounds {
    let native = |d: &Device| d.profile.qemu.is_empty();
    Bounds {
        down_ms: devices
            .iter()
            .map(|d| if native(d) { 5_000 } else { 30_000 })
            .collect(),
        rss_kib: devices
            .iter()
            .map(|d| if native(d) { 64 * 1024 } else { 256 * 1024 })
            .collect(),
        tail_ms: fleet::BATCH_MS + 5_000,
        drop_after_full_ms: 60_000,
        broker_loss_ms: 3_000,
    }
}

/// How long every device may take to commit the last release after it is pushed.
const CONVERGE_MS: u64 = 60_000;
const HEALTH_WINDOW_MS: &str = "1500";

fn main() {
    let args = Args::parse();
    if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        eprintln!(
            "soak: error: --minutes must be above 0 and at most 1440, got {}",
            args.minutes
        );
        std::process::exit(2);
    }
    if args.plan {
        let duration_ms = (args.minutes * 60_000.0) as u64;
        for p in schedule::plan(args.seed, duration_ms, args.devices as usize) {
            println!("{:>8.1}s  {}", p.at_ms as f64 / 1000.0, p.fault);
        }
        return;
    }
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            std::process::exit(70);
        }
    }
}

/// Something that must happen at a time: the end of a fault's span.
#[derive(Debug, Clone)]
enum Due {
    BrokerStart,
    BrokerContinue,
    DiskBack(usize),
    FloodEnd(usize),
    Kill(usize),
    Revert(usize),
}

struct Soak {
    start: Instant,
    start_ms: Ms,
    seed: u64,
    devices: Arc<Mutex<Vec<Device>>>,
    broker: Mosquitto,
    artifacts: Artifacts,
    checker: Checker,
    rx: Receiver<(Ms, Obs)>,
    tx: ObsTx,
    /// Faults injected so far, with their offsets, for the failure report.
    history: Vec<(Ms, String)>,
    due: Vec<(Ms, Due)>,
    next_version: Vec<u64>,
    next_flood: Vec<u64>,
    flooding: Vec<bool>,
    report: Report,
    violation: Option<Violation>,
    /// Where the stderr of every `kiln push` and `kiln gc` goes.
    kiln_log: std::path::PathBuf,
}

fn run(args: &Args) -> Result<bool> {
    let duration_ms = (args.minutes * 60_000.0) as u64;
    let n = args.devices as usize;
    let plan = schedule::plan(args.seed, duration_ms, n);
    let root = tempfile::Builder::new().prefix("kiln-soak-").tempdir()?;
    // mosquitto drops to its own user; kilnd's files stay root's.
    let mut artifacts = Artifacts::new(root.path())?;
    let broker = Mosquitto::start();
    let (tx, rx) = channel();
    let mut devices = Vec::new();
    let mut mounted = Unmount(Vec::new());
    for i in 0..n {
        let target = TARGETS[i % TARGETS.len()];
        let counter = artifacts.get("fixtures/soak-counter.wat", target, "counter", 1, false);
        let d = Device::new(
            i,
            target,
            root.path(),
            &counter,
            &artifacts.trust(),
            &broker.url(),
        )?;
        mounted.0.push(d.data.clone());
        devices.push(d);
    }
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let checker = Checker::new(bounds(&devices), n);
    eprintln!(
        "soak: seed {} for {:.1} min over {n} devices ({}), {} faults planned, work dir {}",
        args.seed,
        args.minutes,
        devices
            .iter()
            .map(|d| d.target.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        plan.len(),
        root.path().display()
    );
    let latest = fleet::observe(broker.broker.port, ids.clone(), tx.clone());
    let watch = fleet::Watch::start(
        &broker.url(),
        &format!("soak-{}", args.seed),
        ids.clone(),
        tx.clone(),
        &root.path().join("watch-stderr.txt"),
    )?;
    let mut soak = Soak {
        start: Instant::now(),
        start_ms: now_ms(),
        seed: args.seed,
        devices: Arc::new(Mutex::new(devices)),
        broker,
        artifacts,
        checker,
        rx,
        tx,
        history: Vec::new(),
        due: Vec::new(),
        next_version: vec![1; n],
        next_flood: vec![1; n],
        flooding: vec![false; n],
        report: Report::new(args.seed, duration_ms, &ids),
        violation: None,
        kiln_log: root.path().join("kiln-stderr.txt"),
    };
    let keeper = soak.keeper();
    let outcome = soak.drive(&plan, duration_ms, &latest, watch);
    keeper.stop();
    drop(mounted);
    let ok = outcome?;
    if !ok || std::env::var_os("KILN_SOAK_KEEP").is_some() {
        // Keep the work dir of a failed soak for a post-mortem.
        let kept = root.keep();
        eprintln!(
            "soak: work dir kept at {} (each device's kilnd.toml and stderr.txt, kiln-stderr.txt, watch-stderr.txt)",
            kept.display()
        );
    }
    Ok(ok)
}

/// Unmounts the devices' tmpfs data dirs, whatever way the soak ends.
struct Unmount(Vec<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(p)
                .status();
        }
    }
}

/// The keeper thread: restarts kilnd, samples memory and spools.
struct Keeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Keeper {
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

impl Soak {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Device>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keeper(&self) -> Keeper {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (devices, tx, s) = (self.devices.clone(), self.tx.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut round = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                {
                    let mut devices = devices.lock().unwrap_or_else(|e| e.into_inner());
                    for d in devices.iter_mut() {
                        if let Err(e) = d.keep(&tx) {
                            eprintln!("soak: {}: {e:#}", d.id);
                        }
                        if d.spooled_bytes() + 2 * fleet::BATCH_BYTES >= fleet::SPOOL_LIMIT {
                            let _ = tx.send((now_ms(), Obs::SpoolFull { device: d.index }));
                        }
                        if round.is_multiple_of(10) {
                            if let Some((rss, _)) = d.pid().and_then(fleet::rss_kib) {
                                let _ = tx.send((
                                    now_ms(),
                                    Obs::Memory {
                                        device: d.index,
                                        rss_kib: rss,
                                    },
                                ));
                                if let Some(pss) = d.pid().and_then(kiln_e2e::procfs::pss_kib) {
                                    let _ = tx.send((
                                        now_ms(),
                                        Obs::Pss {
                                            device: d.index,
                                            pss_kib: pss,
                                        },
                                    ));
                                }
                            }
                        }
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            // Stop every kilnd still running (a failed soak leaves them up).
            let mut devices = devices.lock().unwrap_or_else(|e| e.into_inner());
            for d in devices.iter_mut() {
                d.retired = true;
                d.kill();
                let _ = d.keep(&tx);
            }
        });
        Keeper { stop, handle }
    }

    fn offset(&self) -> Ms {
        self.start.elapsed().as_millis() as Ms
    }

    /// Feeds what was observed to the checker; remembers the first violation.
    fn check(&mut self) -> bool {
        while let Ok((at, obs)) = self.rx.try_recv() {
            self.report.observe(&obs);
            if let Some(v) = self.checker.observe(at, &obs) {
                self.violation.get_or_insert(v);
            }
        }
        if let Some(v) = self.checker.tick(now_ms()) {
            self.violation.get_or_insert(v);
        }
        self.violation.is_none()
    }

    /// Waits until `offset` ms into the soak, running what falls due meanwhile and
    /// checking as it goes; false once an invariant broke.
    fn wait_until(&mut self, offset: Ms) -> bool {
        loop {
            if !self.check() {
                return false;
            }
            let now = self.offset();
            self.due.sort_by_key(|(at, _)| *at);
            if let Some((at, _)) = self.due.first() {
                if *at <= now {
                    let (_, due) = self.due.remove(0);
                    self.run_due(due);
                    continue;
                }
            }
            if now >= offset {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn note(&mut self, what: String) {
        let at = self.offset();
        eprintln!("soak: {:>7.1}s {what}", at as f64 / 1000.0);
        self.history.push((at, what));
    }

    fn run_due(&mut self, due: Due) {
        match due {
            Due::BrokerStart => {
                self.broker.broker.restart();
                self.broker.state = BrokerState::Up;
                self.note("broker back".into());
            }
            Due::BrokerContinue => {
                self.broker.signal("CONT");
                self.broker.state = BrokerState::Up;
                self.note("broker continued".into());
            }
            Due::DiskBack(d) => {
                self.lock()[d].unfill();
                let _ = self.tx.send((
                    now_ms(),
                    Obs::Disk {
                        device: d,
                        full: false,
                    },
                ));
                self.note(format!("dev{d} data dir has space again"));
            }
            Due::FloodEnd(d) => {
                self.flooding[d] = false;
                let v = self.next_flood[d];
                self.next_flood[d] += 1;
                let target = self.lock()[d].target.clone();
                let quiet =
                    self.artifacts
                        .get("fixtures/soak-counter.wat", &target, "flood", v, false);
                let code = self.push(d, &quiet);
                self.note(format!("dev{d} flood ends: quiet flood v{v} ({code})"));
                if code != "pushed" {
                    // The broker is away: try again in a second.
                    self.flooding[d] = true;
                    self.due.push((self.offset() + 1_000, Due::FloodEnd(d)));
                }
            }
            Due::Kill(d) => {
                let killed = self.lock()[d].kill();
                self.note(format!(
                    "dev{d} kilnd SIGKILL{}",
                    if killed { "" } else { " (was down)" }
                ));
            }
            Due::Revert(d) => {
                let floor = self.checker.floor(d);
                if floor > 0 {
                    let code = self.push_app(d, floor, false);
                    self.note(format!("dev{d} revert to committed v{floor} ({code})"));
                }
            }
        }
    }

    /// `kiln push` of an artifact to one device; the exit code in words.
    fn push(&mut self, d: usize, artifact: &Path) -> String {
        if self.broker.state != BrokerState::Up {
            return "skipped: broker not up".into();
        }
        let id = self.lock()[d].id.clone();
        let key = self.artifacts.key();
        let url = self.broker.url();
        let args = [
            "push",
            path_str(artifact),
            "--device",
            &id,
            "--sign",
            path_str(&key),
            "--broker",
            &url,
            "--tick-ms",
            "100",
            "--timeout-ms",
            "20000",
            "--health-window-ms",
            HEALTH_WINDOW_MS,
            "--confirm-timeout-s",
            "0",
        ];
        match fleet::kiln(&args, Duration::from_secs(30), &self.kiln_log) {
            Some(0) => "pushed".into(),
            Some(code) => format!("kiln push exit {code}"),
            None => "kiln push timed out".into(),
        }
    }

    /// Publishes a desired state signed by a key no device trusts over the device's
    /// retained one, as an attacker with broker access would (`kiln push` refuses to
    /// sign over a state it cannot verify), then puts the real one back.
    fn forge(&mut self, d: usize, version: u64, artifact: &Path) -> String {
        if self.broker.state != BrokerState::Up {
            return "skipped: broker not up".into();
        }
        let id = self.lock()[d].id.clone();
        let topic =
            kiln_protocol::fleet::Topics::new(kiln_protocol::fleet::DEFAULT_PREFIX).desired(&id);
        let port = self.broker.broker.port;
        let original = fleet::retained(port, &topic);
        let forged =
            match fleet::forged_desired(&id, version, artifact, &self.artifacts.rogue_key()) {
                Ok(f) => f,
                Err(e) => return format!("cannot forge: {e:#}"),
            };
        self.broker.broker.publish_retained(&topic, forged);
        // Long enough for the device to receive and refuse it, checked meanwhile.
        self.wait_until(self.offset() + 1_500);
        self.broker
            .broker
            .publish_retained(&topic, original.unwrap_or_default());
        "forged state published, then the real one put back".into()
    }

    /// Pushes app `version` (good, or `crashing`) to device `d`.
    fn push_app(&mut self, d: usize, version: u64, crashing: bool) -> String {
        let target = self.lock()[d].target.clone();
        let source = if crashing {
            "fixtures/trap-tick.wat"
        } else {
            "fixtures/soak-counter.wat"
        };
        let artifact = self.artifacts.get(source, &target, "app", version, false);
        // Announced before the push: the device may start it before push returns.
        let _ = self.tx.send((now_ms(), Obs::Pushed { device: d, version }));
        self.push(d, &artifact)
    }

    fn new_version(&mut self, d: usize) -> u64 {
        let v = self.next_version[d];
        self.next_version[d] += 1;
        v
    }

    fn inject(&mut self, fault: &Fault) {
        let now = self.offset();
        let what = match *fault {
            Fault::KillKilnd { device } => {
                let killed = self.lock()[device].kill();
                if killed {
                    "done".into()
                } else {
                    "skipped: kilnd was down".to_string()
                }
            }
            Fault::PowerOff { device, off_ms } => {
                let mut devices = self.lock();
                devices[device].off_until = Some(Instant::now() + Duration::from_millis(off_ms));
                if devices[device].kill() {
                    "done".into()
                } else {
                    "kilnd was down; it stays down".to_string()
                }
            }
            Fault::PushThenKill { device, after_ms } => {
                let v = self.new_version(device);
                let code = self.push_app(device, v, false);
                self.due.push((now + after_ms, Due::Kill(device)));
                format!("v{v} {code}")
            }
            Fault::KillAtStep { device, step } => {
                let mut devices = self.lock();
                devices[device].arm = Some(step);
                let killed = devices[device].kill();
                drop(devices);
                if !killed {
                    "armed for the next start".to_string()
                } else if step == "spool" {
                    "restarting armed: it dies in its first spool write".to_string()
                } else {
                    // Wait for the keeper to bring it back armed, then give it work.
                    let limit = Instant::now() + Duration::from_secs(5);
                    while self.lock()[device].arm.is_some() && Instant::now() < limit {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let v = self.new_version(device);
                    format!("v{v} {}", self.push_app(device, v, false))
                }
            }
            Fault::KillWorker { device } => {
                let devices = self.lock();
                let pid = *devices[device]
                    .counter_pid
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let kilnd = devices[device].pid();
                drop(devices);
                match pid.zip(kilnd) {
                    Some((pid, kilnd)) if fleet::is_worker_of(pid, kilnd) => {
                        fleet::signal(pid, "KILL");
                        format!("counter worker {pid}")
                    }
                    _ => "skipped: no counter worker running".into(),
                }
            }
            Fault::BrokerStop { down_ms } | Fault::BrokerKill { down_ms } => {
                if self.broker.state != BrokerState::Up {
                    "skipped: broker not up".into()
                } else {
                    if matches!(fault, Fault::BrokerKill { .. }) {
                        self.broker.broker.kill();
                        let _ = self.tx.send((now_ms(), Obs::BrokerKilled));
                    } else {
                        self.broker.broker.stop();
                    }
                    self.broker.state = BrokerState::Down;
                    self.due.push((now + down_ms, Due::BrokerStart));
                    "done".into()
                }
            }
            Fault::BrokerPause { pause_ms } => {
                if self.broker.state != BrokerState::Up {
                    "skipped: broker not up".into()
                } else {
                    self.broker.signal("STOP");
                    self.broker.state = BrokerState::Paused;
                    self.due.push((now + pause_ms, Due::BrokerContinue));
                    "done".into()
                }
            }
            Fault::PushGood { device } => {
                let v = self.new_version(device);
                format!("v{v} {}", self.push_app(device, v, false))
            }
            Fault::PushCrashing { device } => {
                let v = self.new_version(device);
                format!("v{v} {}", self.push_app(device, v, true))
            }
            Fault::PushThenRevert { device, after_ms } => {
                let v = self.new_version(device);
                let code = self.push_app(device, v, false);
                self.due.push((now + after_ms, Due::Revert(device)));
                format!("v{v} {code}")
            }
            Fault::PushUntrusted { device } => {
                // A version no trusted push ever uses, so its start would be caught.
                let v = 1_000_000 + self.offset();
                let target = self.lock()[device].target.clone();
                let artifact =
                    self.artifacts
                        .get("fixtures/soak-counter.wat", &target, "app", v, true);
                format!("v{v} {}", self.forge(device, v, &artifact))
            }
            Fault::Gc => {
                if self.broker.state != BrokerState::Up {
                    "skipped: broker not up".into()
                } else {
                    let url = self.broker.url();
                    let args = ["gc", "--grace-s", "0", "--broker", &url];
                    match fleet::kiln(&args, Duration::from_secs(30), &self.kiln_log) {
                        Some(0) => "done".into(),
                        other => format!("kiln gc ended {other:?}"),
                    }
                }
            }
            Fault::DiskFull { device, full_ms } => {
                let mut devices = self.lock();
                if devices[device].filler.is_some() {
                    "skipped: already full".into()
                } else {
                    devices[device].fill();
                    drop(devices);
                    let _ = self.tx.send((now_ms(), Obs::Disk { device, full: true }));
                    self.due.push((now + full_ms, Due::DiskBack(device)));
                    "done".into()
                }
            }
            Fault::Flood {
                device,
                kind,
                flood_ms,
            } => {
                if self.flooding[device] {
                    "skipped: already flooding".into()
                } else {
                    let v = self.next_flood[device];
                    self.next_flood[device] += 1;
                    let target = self.lock()[device].target.clone();
                    let artifact = self
                        .artifacts
                        .get(kind.fixture(), &target, "flood", v, false);
                    let code = self.push(device, &artifact);
                    if code == "pushed" {
                        self.flooding[device] = true;
                        self.due.push((now + flood_ms, Due::FloodEnd(device)));
                    }
                    format!("flood v{v} {code}")
                }
            }
        };
        let skipped = what.starts_with("skipped") || what.contains("not up");
        self.report.fault(fault.name(), skipped);
        self.note(format!("{fault}: {what}"));
    }

    fn drive(
        &mut self,
        plan: &[Planned],
        duration_ms: Ms,
        latest: &fleet::Latest,
        watch: fleet::Watch,
    ) -> Result<bool> {
        let mut watch = Some(watch);
        let ok = self.faults(plan, duration_ms, latest, &mut watch)?;
        let code = watch.take().map(fleet::Watch::stop);
        if ok {
            self.report.watch_exit = code.flatten();
        }
        // Whatever is left in the channel, and the final account.
        self.check();
        let (account, violations) = self.checker.account();
        self.report.account = account;
        if self.violation.is_none() {
            self.violation = violations.into_iter().next();
        }
        let n = self.lock().len();
        for i in 0..n {
            self.report.peak_rss_kib[i] = self.checker.peak_rss_kib(i);
            self.report.longest_down_ms[i] = self.checker.longest_down_ms(i);
        }
        self.report.print();
        if let Some(v) = &self.violation {
            self.print_violation(v);
            return Ok(false);
        }
        println!("soak: PASS seed {}", self.seed);
        Ok(true)
    }

    fn faults(
        &mut self,
        plan: &[Planned],
        duration_ms: Ms,
        latest: &fleet::Latest,
        watch: &mut Option<fleet::Watch>,
    ) -> Result<bool> {
        // The fleet's first release, committed before any fault.
        for d in 0..self.next_version.len() {
            let v = self.new_version(d);
            let code = self.push_app(d, v, false);
            self.note(format!("dev{d} first release v{v}: {code}"));
        }
        for p in plan {
            if !self.wait_until(p.at_ms) {
                return Ok(false);
            }
            if !watch.as_mut().is_some_and(fleet::Watch::alive) {
                self.violation.get_or_insert(Violation {
                    at_ms: now_ms(),
                    what: "kiln watch exited".into(),
                });
                return Ok(false);
            }
            self.inject(&p.fault);
        }
        // Heal: every span ends by FAULT_SHARE of the duration.
        let heal = ((duration_ms as f64) * schedule::FAULT_SHARE) as Ms;
        if !self.wait_until(heal.max(self.offset())) {
            return Ok(false);
        }
        // The broker first, so the pushes that end floods and reverts get through.
        self.due
            .sort_by_key(|(_, due)| !matches!(due, Due::BrokerStart | Due::BrokerContinue));
        while !self.due.is_empty() {
            let (_, due) = self.due.remove(0);
            self.run_due(due);
        }
        if self.broker.state != BrokerState::Up {
            self.broker.broker.restart();
            self.broker.state = BrokerState::Up;
        }
        // A flood whose end could not be pushed while the broker was away ends now.
        for _ in 0..10 {
            if self.due.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            for (_, due) in std::mem::take(&mut self.due) {
                self.run_due(due);
            }
        }
        // A kilnd still armed with a fault hook would kill itself in the last update.
        let armed: Vec<usize> = self
            .lock()
            .iter()
            .filter(|d| d.armed_now)
            .map(|d| d.index)
            .collect();
        for d in self.lock().iter_mut() {
            d.arm = None;
        }
        for d in armed {
            self.lock()[d].armed_now = false;
            self.lock()[d].kill();
            self.note(format!("dev{d} restarted without its fault hook"));
        }
        self.note("healed: broker up, disks free, no flood, no fault armed".into());
        // The rest of the time the fleet runs without faults, still checked (memory,
        // what runs, duplicates), before the last release.
        if !self.wait_until(duration_ms.max(self.offset())) {
            return Ok(false);
        }

        // The last desired state: a fresh release every device must converge to.
        let pushed_at = now_ms();
        let mut finals = BTreeMap::new();
        for d in 0..self.next_version.len() {
            let v = self.new_version(d);
            let mut code = String::new();
            for _ in 0..3 {
                code = self.push_app(d, v, false);
                if code == "pushed" {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            self.note(format!("dev{d} last release v{v}: {code}"));
            finals.insert(d, v);
        }
        let ids: Vec<String> = self.lock().iter().map(|d| d.id.clone()).collect();
        let mut converged: BTreeMap<usize, Ms> = BTreeMap::new();
        while converged.len() < finals.len() {
            if !self.wait_until(self.offset() + 200) {
                return Ok(false);
            }
            for (&d, &v) in &finals {
                let state = latest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&ids[d])
                    .copied();
                if !converged.contains_key(&d) && state == Some((v, ModuleState::Running)) {
                    converged.insert(d, now_ms() - pushed_at);
                    self.note(format!(
                        "dev{d} converged to v{v} in {} ms",
                        now_ms() - pushed_at
                    ));
                }
            }
            if now_ms() - pushed_at > CONVERGE_MS {
                let missing: Vec<String> = finals
                    .iter()
                    .filter(|(d, _)| !converged.contains_key(d))
                    .map(|(d, v)| {
                        let state = latest
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&ids[*d])
                            .copied();
                        format!("dev{d} (want v{v}, reports {state:?})")
                    })
                    .collect();
                self.violation.get_or_insert(Violation {
                    at_ms: now_ms(),
                    what: format!(
                        "not converged within {CONVERGE_MS} ms of the last push: {}",
                        missing.join(", ")
                    ),
                });
                return Ok(false);
            }
        }
        self.report.converge_ms = converged.values().copied().max().unwrap_or(0);
        self.report.converge_per_device = converged.values().copied().collect();

        // Stop every kilnd cleanly: each seals and publishes its open batch.
        if !self.wait_until(self.offset() + 2_000) {
            return Ok(false);
        }
        let tx = self.tx.clone();
        for d in self.lock().iter_mut() {
            d.stop(&tx)?;
        }
        let leftovers: Vec<(usize, Vec<String>)> = self
            .lock()
            .iter()
            .map(|d| (d.index, d.leftovers()))
            .collect();
        for (index, left) in leftovers {
            if !left.is_empty() {
                eprintln!(
                    "soak: dev{index} data dir keeps {} files it no longer needs: {}",
                    left.len(),
                    left.join(", ")
                );
                self.violation.get_or_insert(Violation {
                    at_ms: now_ms(),
                    what: format!(
                        "dev{index} keeps {} files in its data dir that nothing will use again (first: {})",
                        left.len(),
                        left[0]
                    ),
                });
            }
        }
        // Give kiln watch until everything made has arrived (or 30 s).
        let limit = Instant::now() + Duration::from_secs(30);
        loop {
            self.check();
            let (account, violations) = self.checker.account();
            if violations.is_empty() || Instant::now() > limit {
                let _ = account;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.note("every kilnd stopped; telemetry settled".into());
        Ok(self.violation.is_none())
    }

    fn print_violation(&self, v: &Violation) {
        let at = v.at_ms.saturating_sub(self.start_ms);
        println!("soak: FAIL seed {}: {}", self.seed, v.what);
        if v.at_ms > 0 {
            println!(
                "soak: at {:.1} s into the soak; the faults before it:",
                at as f64 / 1000.0
            );
        } else {
            println!("soak: found in the final account; the faults of the soak:");
        }
        for (at, what) in &self.history {
            println!("  {:>8.1}s  {what}", *at as f64 / 1000.0);
        }
        println!(
            "soak: replay with scripts/soak.sh --seed {} (same duration and devices)",
            self.seed
        );
    }
}
