//! `kilnd serve`: supervise every module of the config, each in its own worker, and
//! report what happens as JSON lines on stdout (one record per line: telemetry, logs,
//! starts, stops with their reason, failures). Telemetry a module publishes on a
//! stream is also delivered to modules whose `inbox` lists `module/stream`.
//! With `[mqtt]`, the same records go to the broker as telemetry batches, and the
//! fleet agent follows the device's desired state, both over one connection.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_protocol::clock::now_ms;
use kiln_protocol::fleet::Topics;
use kiln_protocol::keys::PublicKey;
use kiln_protocol::telemetry::{self, Body, Record};

use crate::daemon::config::{Config, Grants, ModulePlan, MqttConfig};
use crate::daemon::fleet::{self, AgentIn};
use crate::daemon::health::HealthBook;
use crate::daemon::link;
use crate::daemon::notify;
use crate::daemon::rate::RateLimit;
use crate::daemon::spawn::{WorkerCommand, Workers};
use crate::daemon::supervisor::{self, Counters, Input, Queued, Slot, Supervised};
use crate::daemon::telemetry::{Deliveries, Pipeline, TelemetryIn};
use crate::exit::{Code, Failure};
use filter::{payload_len, Shed};

mod filter;

/// Records from every module's supervisor to the loop below. Supervisors put what a
/// module publishes or logs only if there is room (else it is counted), and wait for
/// room only for starts and stops; the loop itself never waits on anything but
/// stdout, so the queue drains as fast as records can be printed.
const RECORDS_QUEUE: usize = 4096;

/// Records for the telemetry pipeline. The loop below puts records only if there is
/// room (else they are counted and reported). Acknowledgements do not queue here
/// (see `telemetry::Deliveries`): the link thread must never wait.
const TELEMETRY_QUEUE: usize = 4096;

/// Messages from the link and module events for the fleet agent. The link waits for
/// room (a chunk must not be lost; the broker then waits on TCP); module events are
/// put only if there is room, so a stuck agent cannot stall the records loop.
const AGENT_QUEUE: usize = 64;

/// The records loop turns at least this often when idle (or at the watchdog's pace,
/// if systemd asked for a faster one).
const LOOP_TURN: Duration = Duration::from_millis(200);

/// Runs until every module has ended; fails if any module was marked failed.
/// SIGHUP reloads the config: changed modules are swapped between calls, new ones
/// started, removed ones stopped. SIGTERM and SIGINT stop every module between calls.
pub fn serve(config_path: &Path) -> Result<i32, Failure> {
    let mut watchdog = notify::init();
    let signals = Signals::block()?;
    let (config, plans) = Config::load(config_path).map_err(|e| Failure::new(Code::Config, e))?;
    // What `kilnd check` refuses, serve refuses too, before anything starts.
    crate::daemon::config::validate(&config, &plans).map_err(|e| {
        Failure::new(
            Code::Config,
            format!("config `{}`: {e}", config_path.display()),
        )
    })?;
    let rates = config.rates.clone();
    let trusted_keys = read_keys(&config)?;
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(
            Code::Internal,
            format!("cannot find kilnd's own executable: {e}"),
        )
    })?;
    let workers = Arc::new(Workers::new(
        WorkerCommand {
            launcher: config.worker_launcher.clone(),
            exe,
        },
        std::env::var("KILND_ZYGOTE").as_deref() != Ok("0"),
    ));
    workers.prestart();

    let (sink, records) = mpsc::sync_channel::<Queued>(RECORDS_QUEUE);
    let modules = Arc::new(Mutex::new(Modules {
        workers,
        trusted_keys,
        sink,
        local: Vec::new(),
        rates: BTreeMap::new(),
        grants: Grants::new(),
        fleet: Vec::new(),
        running: HashMap::new(),
    }));
    lock(&modules).set_local(plans, rates, config.grants.clone());
    let mqtt = match (&config.mqtt, &config.device, &config.data_dir) {
        (Some(mqtt), Some(device), Some(data_dir)) => {
            Some(connect(&config, mqtt, device, data_dir, &modules)?)
        }
        _ => None,
    };
    let control = modules.clone();
    let path = config_path.to_path_buf();
    std::thread::spawn(move || signals.serve(&path, &control));

    let mut failed = 0;
    let mut stdout = Printer::new(
        config.telemetry.as_ref().is_none_or(|t| t.stdout),
        mqtt.is_some(),
    );
    let mut shed = Shed::default();
    let turn = watchdog
        .as_ref()
        .map_or(LOOP_TURN, |w| w.interval().min(LOOP_TURN));
    notify::send(&format!(
        "READY=1\nSTATUS={} local module(s){}",
        lock(&modules).local.len(),
        if mqtt.is_some() {
            ", following the broker"
        } else {
            ""
        }
    ));
    // With a broker, every `health_s` the modules' health goes to the fleet agent.
    let health_s = config.telemetry.clone().unwrap_or_default().health_s;
    let mut health = mqtt
        .as_ref()
        .filter(|_| health_s > 0)
        .map(|_| Period::new(Duration::from_secs(health_s)));
    #[cfg(feature = "test-hooks")]
    let stuck = test_hooks::StuckLoop::from_env();
    loop {
        // The watchdog pings from here and nowhere else: if this loop stops turning
        // (a deadlock on `modules`, stdout blocked), systemd stops hearing from kilnd.
        if let Some(w) = &mut watchdog {
            w.alive(Instant::now());
        }
        #[cfg(feature = "test-hooks")]
        stuck.maybe_hang();
        if let (Some(period), Some(m)) = (&mut health, &mqtt) {
            period.maybe_send(&modules, &m.agent);
        }
        let (record, slot) = match records.recv_timeout(turn) {
            Ok(queued) => *queued,
            Err(RecvTimeoutError::Timeout) => {
                // With a broker, the device waits for desired state until stopped.
                let stopped = mqtt.is_none() || STOPPED.load(Ordering::SeqCst);
                if stopped && lock(&modules).all_ended() {
                    break;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let module = record.module.clone().unwrap_or_default();
        if let Some(period) = &mut health {
            period.observe(&modules, &record);
        }
        let route = filter::route(&record.body, mqtt.is_some(), || {
            lock(&modules).is_fleet(&module)
        });
        if let (true, Body::Telemetry { stream, data }) = (route.inboxes, &record.body) {
            lock(&modules).route(&module, stream, data);
        }
        if route.failed {
            failed += 1;
        }
        stdout.print(&record);
        if let (true, Some(m)) = (route.broker, &mqtt) {
            if route.agent {
                if let Err(TrySendError::Full(_)) =
                    m.agent.try_send(AgentIn::Record(record.clone()))
                {
                    tracing::warn!(%module, "the fleet agent's queue is full; a module event did not reach it");
                }
            }
            send_shedding(&mut shed, &m.telemetry, record, slot);
        }
    }
    if let Some(m) = mqtt {
        m.stop();
    }
    stdout.finish();
    Ok(if failed > 0 && !STOPPED.load(Ordering::SeqCst) {
        Code::ModuleFailed as i32
    } else {
        0
    })
}

/// The modules' health over the current period (see `daemon::health`), and when it
/// ends.
struct Period {
    book: HealthBook,
    every: Duration,
    began: Instant,
}

impl Period {
    fn new(every: Duration) -> Self {
        Self {
            book: HealthBook::new(),
            every,
            began: Instant::now(),
        }
    }

    /// Counts `record`. A start or a stop first samples its module's counters: a
    /// start closes what they grew by under the version that ran until then, a stop
    /// counts its trap even if the supervisor gives up after it.
    fn observe(&mut self, modules: &Mutex<Modules>, record: &Record) {
        if let (Body::Started(_) | Body::Stopped(_), Some(module)) = (&record.body, &record.module)
        {
            if let Some(stats) = lock(modules).stats_of(module) {
                self.book.sample(module, &stats);
            }
        }
        self.book.observe(record);
    }

    /// At the end of the period: a last sample of every module, and the period to the
    /// fleet agent to sign and publish (if its queue has room: a period that finds it
    /// full is lost, never waited for); a new period begins.
    fn maybe_send(&mut self, modules: &Mutex<Modules>, agent: &SyncSender<AgentIn>) {
        let elapsed = self.began.elapsed();
        if elapsed < self.every {
            return;
        }
        for r in lock(modules).sample() {
            if let (Some(module), Body::ModuleStats(stats)) = (&r.module, &r.body) {
                self.book.sample(module, stats);
            }
        }
        self.began = Instant::now();
        let period = self.book.take(elapsed.as_millis() as u64);
        if let Err(TrySendError::Full(_)) = agent.try_send(AgentIn::Health(period)) {
            tracing::warn!("the fleet agent's queue is full; a health period was not sent");
        }
    }
}

/// Lines printed on stdout and not yet written, and their bytes (a 64 KiB record of
/// binary data is a line of up to 384 KiB of JSON).
const PRINT_QUEUE: usize = 1024;
const PRINT_BYTES: usize = 4 * 1024 * 1024;

/// kilnd's JSON lines on stdout. With a broker, stdout is a copy for people (the
/// journal), and a slow reader must not stall the records loop and with it every
/// module: lines go through a bounded queue to a thread that writes them, and lines
/// that find it full are counted and reported on stderr. Without a broker stdout is
/// the only way records leave, so it is written directly: a slow reader slows kilnd
/// down rather than losing records.
enum Printer {
    Off,
    Direct(std::io::StdoutLock<'static>),
    Queued {
        lines: SyncSender<String>,
        writer: JoinHandle<()>,
        queued_bytes: Arc<AtomicUsize>,
        dropped: u64,
        reported: Option<Instant>,
    },
}

impl Printer {
    fn new(print: bool, broker: bool) -> Self {
        if !print {
            return Self::Off;
        }
        if !broker {
            return Self::Direct(std::io::stdout().lock());
        }
        let (lines, queue) = mpsc::sync_channel::<String>(PRINT_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let written = queued_bytes.clone();
        let writer = std::thread::spawn(move || {
            let mut stdout = std::io::stdout().lock();
            for line in queue {
                // Nobody may read our reports any more; keep supervising regardless.
                let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
                written.fetch_sub(line.len(), Ordering::Relaxed);
            }
        });
        Self::Queued {
            lines,
            writer,
            queued_bytes,
            dropped: 0,
            reported: None,
        }
    }

    /// Writes what is queued before kilnd exits.
    fn finish(self) {
        if let Self::Queued { lines, writer, .. } = self {
            drop(lines);
            let _ = writer.join();
        }
    }

    fn print(&mut self, record: &Record) {
        match self {
            Self::Off => {}
            Self::Direct(stdout) => {
                let _ = writeln!(stdout, "{}", telemetry::to_json(record))
                    .and_then(|()| stdout.flush());
            }
            Self::Queued {
                lines,
                queued_bytes,
                dropped,
                reported,
                ..
            } => {
                let line = telemetry::to_json(record).to_string();
                let len = line.len();
                if queued_bytes.load(Ordering::Relaxed) + len > PRINT_BYTES {
                    *dropped += 1;
                } else {
                    queued_bytes.fetch_add(len, Ordering::Relaxed);
                    if let Err(TrySendError::Full(_)) = lines.try_send(line) {
                        queued_bytes.fetch_sub(len, Ordering::Relaxed);
                        *dropped += 1;
                    }
                }
                if *dropped > 0 && reported.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(lines = *dropped, "stdout is not keeping up; JSON lines not printed (the broker still gets them)");
                    *reported = Some(Instant::now());
                    *dropped = 0;
                }
            }
        }
    }
}

/// Offers `record` to the telemetry pipeline; what finds the queue full is counted,
/// and reported when [`Shed`] says a report is due. The record keeps its claim on its
/// module's share until the pipeline has it.
fn send_shedding(
    shed: &mut Shed,
    telemetry: &SyncSender<TelemetryIn>,
    record: Record,
    slot: Option<Slot>,
) {
    let bytes = payload_len(&record.body);
    if let Err(TrySendError::Full(_)) =
        telemetry.try_send(TelemetryIn::Record(Box::new(record), slot))
    {
        shed.full(bytes);
        return;
    }
    let Some(count) = shed.due(Instant::now()) else {
        return;
    };
    let record = Record {
        at_ms: now_ms(),
        module: None,
        body: Body::Discarded(count),
    };
    if telemetry
        .try_send(TelemetryIn::Record(Box::new(record), None))
        .is_ok()
    {
        tracing::warn!(
            records = count.records,
            bytes = count.bytes,
            "telemetry queue was full; records discarded"
        );
        shed.reported(Instant::now());
    }
}

/// The device's side of the broker: the fleet agent and the telemetry pipeline, on
/// one connection.
struct Mqtt {
    agent: SyncSender<AgentIn>,
    agent_thread: JoinHandle<()>,
    telemetry: SyncSender<TelemetryIn>,
}

impl Mqtt {
    /// Telemetry first, so its last batches go out before the agent disconnects.
    fn stop(self) {
        let (done, finished) = mpsc::channel();
        if self.telemetry.send(TelemetryIn::Finish(done)).is_ok() {
            let _ = finished.recv_timeout(Duration::from_secs(5));
        }
        let _ = self.agent.send(AgentIn::Stop);
        let _ = self.agent_thread.join();
    }
}

fn connect(
    config: &Config,
    mqtt: &MqttConfig,
    device: &str,
    data_dir: &Path,
    modules: &Arc<Mutex<Modules>>,
) -> Result<Mqtt, Failure> {
    let refused = |e: String| Failure::new(Code::Config, format!("device `{device}`: {e}"));
    let boot_id = crate::daemon::telemetry::new_boot_id();
    let facts = fleet::facts(mqtt, boot_id);
    let root = config.root.as_deref().ok_or_else(|| {
        Failure::new(
            Code::Config,
            "a device that follows a broker needs a root document",
        )
    })?;
    let trust = fleet::trust(mqtt, root, data_dir)?;
    let (agent_tx, agent_rx) = mpsc::sync_channel(AGENT_QUEUE);
    let (telemetry_tx, telemetry_rx) = mpsc::sync_channel(TELEMETRY_QUEUE);
    let (to_agent, acks) = (agent_tx.clone(), telemetry_tx.clone());
    let deliveries = Deliveries::default();
    let delivered = deliveries.clone();
    let link = link::connect(
        mqtt,
        device,
        fleet::last_will(mqtt, device, &facts, &trust.identity),
        move |event| to_agent.send(AgentIn::Link(event)).is_ok(),
        move |delivery| {
            lock(&delivered).push_back(delivery);
            // A full queue wakes the pipeline anyway.
            let _ = acks.try_send(TelemetryIn::Delivered);
        },
    )
    .map_err(refused)?;

    let fleet_modules = modules.clone();
    let apply: fleet::ApplyFn = Box::new(move |plans| lock(&fleet_modules).set_fleet(plans));
    let agent = fleet::start(
        mqtt,
        device,
        data_dir.to_path_buf(),
        trust,
        apply,
        link.clone(),
        facts,
    );
    #[cfg(feature = "mirror")]
    let agent = with_mirrors(agent, config, mqtt, agent_tx.clone());
    let (commanded, answers) = (modules.clone(), agent_tx.clone());
    let agent = agent.with_commands(Box::new(move |command| {
        let (id, reply) = (command.id, command.reply);
        let answers = answers.clone();
        let answer = supervisor::Answer::new(move |outcome| {
            // The agent's queue is bounded; a sender whose answer is lost times out.
            if answers
                .try_send(AgentIn::Answer { id, reply, outcome })
                .is_err()
            {
                tracing::warn!(
                    id = format!("{id:016x}"),
                    "the agent is busy; an answer to a command was dropped"
                );
            }
        });
        lock(&commanded).command(&command, answer)
    }));

    let sampled = modules.clone();
    let pipeline = Pipeline::open(
        config.telemetry.clone().unwrap_or_default(),
        device,
        boot_id,
        data_dir.to_path_buf(),
        Topics::new(&mqtt.prefix).telemetry(device),
        (link, deliveries),
        Box::new(move || lock(&sampled).sample()),
    );
    std::thread::spawn(move || pipeline.run(telemetry_rx));
    Ok(Mqtt {
        agent: agent_tx,
        agent_thread: std::thread::spawn(move || agent.run(agent_rx)),
        telemetry: telemetry_tx,
    })
}

/// The device's mirrors (`mirror` in kilnd.toml: its own, `off`, or unset for those
/// the desired state names) and the thread that fetches from them. A CA that cannot
/// be read is said once here; `https://` mirrors then fail, and the broker serves.
#[cfg(feature = "mirror")]
fn with_mirrors(
    agent: fleet::Driver,
    config: &Config,
    mqtt: &MqttConfig,
    to_agent: SyncSender<AgentIn>,
) -> fleet::Driver {
    use fleet::agent::Mirrors;
    let mirrors = match config.mirror.as_deref() {
        Some("off") => return agent,
        Some(url) => Mirrors::Own(url.to_string()),
        None => Mirrors::FromState,
    };
    let ca = config.mirror_ca.as_deref().or(mqtt.ca.as_deref());
    let tls = fleet::mirror::tls_config(ca);
    if let Err(e) = &tls {
        tracing::warn!(error = %e, "https:// mirrors will fail; the broker serves their transfers");
    }
    let (jobs, queue) = mpsc::channel();
    std::thread::spawn(move || fleet::mirror::serve(queue, to_agent, tls));
    agent.with_mirrors(mirrors, Box::new(move |job| jobs.send(job).is_ok()))
}

/// The keys local modules are verified with, as text for the workers: the `trust`
/// keys and the root document's release keys.
fn read_keys(config: &Config) -> Result<Vec<String>, Failure> {
    let keys = crate::sandbox::load::read_trusted_keys(&config.trust)?;
    Ok(keys.keys().map(PublicKey::to_text).collect())
}

/// The modules being supervised, by name.
struct Modules {
    workers: Arc<Workers>,
    trusted_keys: Vec<String>,
    sink: SyncSender<Queued>,
    /// From kilnd.toml, and from the fleet agent's desired state.
    local: Vec<ModulePlan>,
    /// Rate limits of local modules by name, from kilnd.toml.
    rates: BTreeMap<String, RateLimit>,
    /// The hardware kilnd.toml grants each module, local or fleet, by name.
    grants: Grants,
    fleet: Vec<ModulePlan>,
    running: HashMap<String, Running>,
}

struct Running {
    plan: ModulePlan,
    input: SyncSender<Input>,
    thread: JoinHandle<()>,
    counters: Arc<Counters>,
    rate: RateLimit,
}

impl Modules {
    fn set_local(
        &mut self,
        plans: Vec<ModulePlan>,
        rates: BTreeMap<String, RateLimit>,
        grants: Grants,
    ) {
        self.local = plans;
        self.rates = rates;
        self.grants = grants;
        self.apply();
    }

    /// A local module's limit from kilnd.toml. A fleet module gets the defaults: the
    /// desired state's wire format (`kiln_protocol::fleet`, postcard) cannot grow a
    /// field that older devices would still decode, so a per-module rate for fleet
    /// modules waits for its next version.
    fn rate(&self, name: &str) -> RateLimit {
        if self.is_fleet(name) {
            return RateLimit::default();
        }
        self.rates.get(name).copied().unwrap_or_default()
    }

    fn set_fleet(&mut self, plans: Vec<ModulePlan>) {
        self.fleet = plans;
        self.apply();
    }

    fn is_fleet(&self, name: &str) -> bool {
        self.fleet.iter().any(|p| p.name == name)
    }

    /// Brings the running set to the local and fleet plans: starts new modules, swaps
    /// changed ones between calls, stops removed ones. A fleet module shadows a local
    /// one of the same name.
    fn apply(&mut self) {
        let mut plans = self.fleet.clone();
        for p in &self.local {
            if !plans.iter().any(|f| f.name == p.name) {
                plans.push(p.clone());
            }
        }
        for plan in &mut plans {
            plan.grants = self.grants.get(&plan.name).cloned().unwrap_or_default();
        }
        let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
        for (name, running) in &self.running {
            if !names.contains(name) && !running.thread.is_finished() {
                tracing::info!(module = %name, "removed from the config; stopping");
                let _ = running.input.send(Input::Stop);
            }
        }
        for plan in plans {
            let rate = self.rate(&plan.name);
            match self.running.get_mut(&plan.name) {
                Some(r) if !r.thread.is_finished() => {
                    if r.rate != rate {
                        let _ = r.input.send(Input::Limit(rate));
                        r.rate = rate;
                    }
                    if r.plan != plan {
                        tracing::info!(module = %plan.name, "changed in the config; swapping");
                        let _ = r.input.send(Input::Swap(Box::new(plan.clone())));
                        r.plan = plan;
                    }
                }
                _ => self.start(plan, rate),
            }
        }
    }

    fn start(&mut self, plan: ModulePlan, rate: RateLimit) {
        let (input, inbox) = supervisor::inbox();
        tracing::info!(module = %plan.name, artifact = %plan.artifact.display(), "supervising");
        let counters = Arc::new(Counters::default());
        let module = Supervised {
            plan: plan.clone(),
            trusted_keys: self.trusted_keys.clone(),
            inbox,
            counters: counters.clone(),
            rate,
        };
        let (workers, sink) = (self.workers.clone(), self.sink.clone());
        let thread = std::thread::spawn(move || supervisor::supervise(module, workers, sink));
        self.running.insert(
            plan.name.clone(),
            Running {
                plan,
                input,
                thread,
                counters,
                rate,
            },
        );
    }

    fn stop_all(&self) {
        for running in self.running.values() {
            let _ = running.input.send(Input::Stop);
        }
    }

    /// Stats of every module that is still supervised.
    fn sample(&self) -> Vec<telemetry::Record> {
        let at_ms = now_ms();
        self.running
            .iter()
            .filter(|(_, r)| !r.thread.is_finished())
            .map(|(name, r)| telemetry::Record {
                at_ms,
                module: Some(name.clone()),
                body: Body::ModuleStats(r.counters.stats()),
            })
            .collect()
    }

    /// Stats of one module that is still supervised.
    fn stats_of(&self, name: &str) -> Option<telemetry::ModuleStats> {
        let r = self.running.get(name)?;
        (!r.thread.is_finished()).then(|| r.counters.stats())
    }

    fn all_ended(&self) -> bool {
        self.running.values().all(|r| r.thread.is_finished())
    }

    /// Hands a command to its module's supervisor.
    fn command(
        &self,
        command: &kiln_protocol::command::Command,
        answer: supervisor::Answer,
    ) -> Result<(), String> {
        let name = &command.module;
        let running = self
            .running
            .get(name)
            .filter(|r| !r.thread.is_finished())
            .ok_or_else(|| format!("module {name} does not run on this device"))?;
        let message = Input::Command((command.message_topic(), command.data.clone()), answer);
        match running.input.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                Err(format!("module {name} has a full inbox; try again later"))
            }
            Err(TrySendError::Disconnected(_)) => Err(format!("module {name} has stopped")),
        }
    }

    /// Delivers telemetry of `module/stream` to every module whose inbox lists it.
    fn route(&self, module: &str, stream: &str, data: &[u8]) {
        let topic = format!("{module}/{stream}");
        // `command/...` is what a command from the fleet looks like to a module: a
        // module named `command` must not pass its telemetry off as one.
        if topic.starts_with(kiln_protocol::command::MESSAGE_PREFIX) {
            return;
        }
        for (name, r) in &self.running {
            if !r.plan.inbox.contains(&topic) {
                continue;
            }
            let message = Input::Message((topic.clone(), data.to_vec()));
            if let Err(TrySendError::Full(_)) = r.input.try_send(message) {
                tracing::warn!(module = %name, %topic, "inbox full; message dropped");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set once SIGTERM or SIGINT asked every module to stop: the exit is then clean.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// SIGHUP, SIGTERM and SIGINT, blocked in every thread and taken by one with sigwait,
/// so no handler runs at an arbitrary point. Workers start with an empty mask (std
/// resets it when it spawns a process).
struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    fn block() -> Result<Self, Failure> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the
        // mask is set before any thread is spawned, so every thread inherits it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
                libc::sigaddset(&mut set, sig);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(Failure::new(Code::Internal, "cannot block signals"));
            }
            Ok(Self { set })
        }
    }

    fn serve(self, config_path: &Path, modules: &Mutex<Modules>) {
        loop {
            let mut sig = 0;
            // SAFETY: waits on the set built in `block`, with a valid out-pointer.
            if unsafe { libc::sigwait(&self.set, &mut sig) } != 0 {
                return;
            }
            if sig == libc::SIGHUP {
                notify::reloading();
                let reloaded = Config::load(config_path).and_then(|(config, plans)| {
                    crate::daemon::config::validate(&config, &plans)?;
                    Ok((config, plans))
                });
                match reloaded {
                    Ok((config, plans)) => {
                        tracing::info!(config = %config_path.display(), "reloading");
                        lock(modules).set_local(plans, config.rates, config.grants);
                    }
                    Err(e) => tracing::error!("reload refused, keeping what runs: {e}"),
                }
                notify::send("READY=1");
            } else {
                notify::send("STOPPING=1");
                tracing::info!(signal = sig, "stopping every module");
                STOPPED.store(true, Ordering::SeqCst);
                lock(modules).stop_all();
            }
        }
    }
}

#[cfg(feature = "test-hooks")]
mod test_hooks {
    use std::time::{Duration, Instant};

    /// `KILN_STUCK_MS=N`: after N ms the records loop hangs for good, as a deadlock
    /// would, so a test can watch the watchdog pings stop. Test builds only.
    pub struct StuckLoop(Option<Instant>);

    impl StuckLoop {
        pub fn from_env() -> Self {
            let after = std::env::var("KILN_STUCK_MS")
                .ok()
                .and_then(|v| v.parse().ok());
            Self(after.map(|ms| Instant::now() + Duration::from_millis(ms)))
        }

        pub fn maybe_hang(&self) {
            if self.0.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!("KILN_STUCK_MS: the records loop hangs");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}
