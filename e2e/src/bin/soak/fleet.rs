//! The real parts: a mosquitto with persistence, `kilnd serve` per device on a small
//! tmpfs of its own (kept running by a keeper thread, as systemd would), `kiln watch`
//! with a persistent session, an MQTT observer of reported states and events, and
//! `kiln push` / `kiln gc` as the fleet manager runs them. Whatever they show becomes
//! an [`Obs`] on one channel, stamped with the time it was seen.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{compile, kiln_path, kilnd_path, path_str, profile, source};
use kiln_protocol::fleet::{Event, EventKind, ModuleState, Reported, Topics, DEFAULT_PREFIX};
use kiln_protocol::target::TargetProfile;
use rumqttc::{Client, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::invariants::{Ms, Obs};

/// Unix time in milliseconds: the clock of every observation, and of kilnd's records
/// (the one clock, `kiln_protocol::clock`).
pub use kiln_protocol::clock::now_ms;

pub type ObsTx = Sender<(Ms, Obs)>;

/// The telemetry settings every device runs with: small batches and a small spool, so
/// an outage of a few seconds with a flood fills it and drops are exercised. The spool
/// holds four times what may be in flight (the default window of 8 batches): a
/// spool no bigger than the window is full whenever the link is busy.
pub const BATCH_MS: u64 = 200;
pub const BATCH_BYTES: u64 = 4096;
pub const SPOOL_LIMIT: u64 = 128 * 1024;
/// The data dir's filesystem: room for the state, two slots per module, a download
/// and the spool, and little more.
pub const DATA_FS: &str = "8m";
/// How long the keeper waits before it restarts a dead kilnd (systemd's RestartSec).
pub const RESTART_MS: u64 = 300;

/// Makes the kernel SIGKILL the child when the thread that spawned it ends, so a soak
/// stopped by Ctrl-C or a signal leaves no kilnd or watch behind. (The keeper thread
/// that starts kilnd lives as long as the soak.)
fn die_with_the_soak(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `sig` (a name: KILL, TERM, STOP, CONT) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The fleet key pair, a key nobody trusts, and every artifact compiled so far.
pub struct Artifacts {
    dir: PathBuf,
    cache: HashMap<(String, String, String, u64, bool), PathBuf>,
}

impl Artifacts {
    pub fn new(dir: &Path) -> Result<Self> {
        use clap::Parser;
        use kiln_compiler::commands::keygen::KeygenCommand;
        KeygenCommand::try_parse_from(["keygen", "-o", path_str(&dir.join("fleet.key"))])?
            .execute()?;
        // A key of no fleet (keygen refuses a second root beside the fleet's).
        let rogue = dir.join("rogue.key");
        KeygenCommand::try_parse_from(["keygen", "-o", path_str(&rogue), "--no-root"])?
            .execute()?;
        Ok(Self {
            dir: dir.into(),
            cache: HashMap::new(),
        })
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("fleet.key")
    }

    pub fn rogue_key(&self) -> PathBuf {
        self.dir.join("rogue.key")
    }

    /// The fleet's root document, which the devices are provisioned with.
    pub fn trust(&self) -> PathBuf {
        self.dir.join("fleet.root")
    }

    /// `source` compiled for `target` as module `name` at `version`, signed with the
    /// fleet key (or, `rogue`, one the devices do not trust). Compiled once.
    pub fn get(
        &mut self,
        source_name: &str,
        target: &str,
        name: &str,
        version: u64,
        rogue: bool,
    ) -> PathBuf {
        let k = (
            source_name.into(),
            target.into(),
            name.into(),
            version,
            rogue,
        );
        if let Some(p) = self.cache.get(&k) {
            return p.clone();
        }
        let out = self.dir.join(format!(
            "{name}-{target}-v{version}{}.kiln",
            if rogue { "-rogue" } else { "" }
        ));
        let key = if rogue { self.rogue_key() } else { self.key() };
        let v = version.to_string();
        compile(
            &source(source_name),
            target,
            &key,
            &out,
            &["--name", name, "--version", &v],
        );
        self.cache.insert(k, out.clone());
        out
    }
}

/// One device: its kilnd, config, tmpfs data dir and what the keeper knows of it.
pub struct Device {
    pub index: usize,
    pub id: String,
    pub target: String,
    pub profile: TargetProfile,
    pub dir: PathBuf,
    pub data: PathBuf,
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub boot: u32,
    /// `KILN_FAULT` for the next start only.
    pub arm: Option<&'static str>,
    /// Whether the running kilnd was started with a fault armed.
    pub armed_now: bool,
    dead_since: Option<Instant>,
    /// The counter module's newest worker, from its `started` record.
    pub counter_pid: Arc<Mutex<Option<u32>>>,
    /// The filler file while the data dir is held full.
    pub filler: Option<PathBuf>,
    /// Set when the soak ends: the keeper leaves kilnd down.
    pub retired: bool,
    /// A powered-off device: the keeper leaves kilnd down until then.
    pub off_until: Option<Instant>,
}

impl Device {
    pub fn new(
        index: usize,
        target: &str,
        root: &Path,
        counter: &Path,
        trust: &Path,
        broker: &str,
    ) -> Result<Self> {
        let profile = profile(target);
        let id = format!("soak-{index}-{}", profile.arch());
        let dir = root.join(&id);
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DATA_FS}"), "tmpfs"])
            .arg(&data)
            .status()
            .context("run mount")?;
        if !status.success() {
            bail!(
                "cannot mount a tmpfs on `{}` (the soak needs root)",
                data.display()
            );
        }
        let launcher: Vec<String> = profile.qemu.iter().map(|a| format!("{a:?}")).collect();
        let config = format!(
            "device = {id:?}\ndata_dir = {:?}\ntrust = [{:?}]\nworker_launcher = [{}]\n\
             [mqtt]\nbroker = {broker:?}\n\
             [telemetry]\nbatch_ms = {BATCH_MS}\nbatch_bytes = {BATCH_BYTES}\nspool_limit = {SPOOL_LIMIT}\nstats_s = 5\n\
             [[module]]\nname = \"counter\"\nartifact = {:?}\nconfig = \"5\"\ntick_ms = 100\ntimeout_ms = 20000\n\
             restart = {{ backoff_ms = 100, backoff_max_ms = 1000, max_crashes = 1000000, window_s = 1 }}\n",
            path_str(&data),
            path_str(trust),
            launcher.join(", "),
            path_str(counter),
        );
        std::fs::write(dir.join("kilnd.toml"), config)?;
        Ok(Self {
            index,
            id,
            target: target.into(),
            profile,
            dir,
            data,
            child: None,
            reader: None,
            boot: 0,
            arm: None,
            armed_now: false,
            dead_since: Some(Instant::now() - Duration::from_secs(60)),
            counter_pid: Arc::default(),
            filler: None,
            retired: false,
            off_until: None,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn start(&mut self, tx: &ObsTx) -> Result<()> {
        let config = self.dir.join("kilnd.toml");
        let mut cmd = self.profile.command(&kilnd_path(&self.profile));
        cmd.args(["serve", "--config", path_str(&config)])
            .env_remove("KILN_LOG");
        die_with_the_soak(&mut cmd);
        self.armed_now = self.arm.is_some();
        if let Some(step) = self.arm.take() {
            cmd.env("KILN_FAULT", step);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.txt"))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start kilnd for {}", self.id))?;
        let _ = tx.send((
            now_ms(),
            Obs::KilndStarted {
                device: self.index,
                boot: self.boot,
            },
        ));
        let stdout = child.stdout.take().context("kilnd stdout")?;
        let (tx, device, boot, pid) = (tx.clone(), self.index, self.boot, self.counter_pid.clone());
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(obs) = from_kilnd(device, boot, &v, &pid) {
                        let _ = tx.send((now_ms(), obs));
                    }
                }
            }
        }));
        self.child = Some(child);
        Ok(())
    }

    /// Reaps a kilnd that died and restarts it after `RESTART_MS`, like systemd.
    pub fn keep(&mut self, tx: &ObsTx) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            let Some(status) = child.try_wait()? else {
                return Ok(());
            };
            self.child = None;
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            use std::os::unix::process::ExitStatusExt;
            let _ = tx.send((
                now_ms(),
                Obs::KilndEnded {
                    device: self.index,
                    boot: self.boot,
                    killed: status.signal() == Some(9),
                },
            ));
            if status.signal() != Some(9) && status.code() != Some(0) {
                eprintln!("soak: {} kilnd exited with {status}", self.id);
            }
            self.boot += 1;
            self.dead_since = Some(Instant::now());
        }
        if self.retired || self.off_until.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        if self
            .dead_since
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(RESTART_MS))
        {
            self.dead_since = None;
            self.start(tx)?;
        }
        Ok(())
    }

    /// SIGKILL of kilnd, if it runs.
    pub fn kill(&self) -> bool {
        self.pid().map(|p| signal(p, "KILL")).is_some()
    }

    /// SIGTERM, and waits for kilnd to exit (it seals and publishes its open batch).
    pub fn stop(&mut self, tx: &ObsTx) -> Result<()> {
        self.retired = true;
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.child.is_some() {
                self.keep(tx)?;
                if Instant::now() > deadline {
                    self.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Bytes of batches in the spool.
    pub fn spooled_bytes(&self) -> u64 {
        std::fs::read_dir(self.data.join("telemetry"))
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// What a converged, cleanly stopped kilnd should no longer keep in its data dir:
    /// temp files of interrupted writes and downloads (every download has finished or
    /// been dropped). Each one left is space a device never gets back.
    pub fn leftovers(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                if path.is_dir() {
                    walk(&path, root, out);
                } else if rel.starts_with("downloads/")
                    || e.file_name().to_string_lossy().starts_with(".tmp")
                {
                    let len = e.metadata().map_or(0, |m| m.len());
                    out.push(format!("{rel} ({len} bytes)"));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data, &self.data, &mut out);
        out.sort();
        out
    }

    /// Fills the data dir's filesystem with one file.
    pub fn fill(&mut self) {
        let filler = self.data.join("soak-filler");
        if let Ok(mut file) = std::fs::File::create(&filler) {
            let block = vec![0u8; 64 * 1024];
            while file.write_all(&block).is_ok() {}
            let _ = file.sync_all();
        }
        self.filler = Some(filler);
    }

    pub fn unfill(&mut self) {
        if let Some(filler) = self.filler.take() {
            let _ = std::fs::remove_file(filler);
        }
    }
}

/// Whether `pid` is still a worker of the kilnd `kilnd`: forked by its zygote (the
/// zygote's child) or, without one, executed by kilnd itself, so a signal never
/// reaches a process that took over a recycled pid.
pub fn is_worker_of(pid: u32, kilnd: u32) -> bool {
    use kiln_e2e::procfs::parent_of;
    match parent_of(pid) {
        Some(parent) if parent == kilnd => true,
        Some(zygote) => parent_of(zygote) == Some(kilnd),
        None => false,
    }
}

/// Resident memory of a process in KiB (`VmRSS`), and its peak (`VmHWM`).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// What one line of kilnd's stdout tells the checker.
fn from_kilnd(
    device: usize,
    boot: u32,
    v: &Value,
    counter_pid: &Mutex<Option<u32>>,
) -> Option<Obs> {
    let module = v["module"].as_str()?.to_string();
    match v["kind"].as_str()? {
        "started" => {
            if module == "counter" {
                if let Some(pid) = v["pid"].as_u64() {
                    *counter_pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid as u32);
                }
            }
            Some(Obs::Started {
                device,
                module,
                version: v["version"].as_u64().unwrap_or(0),
            })
        }
        "stopped" => Some(Obs::Stopped { device, module }),
        "telemetry" if v["stream"] == "n" => Some(Obs::Published {
            device,
            boot,
            module,
            text: v["text"].as_str()?.to_string(),
            made: v["at_ms"].as_u64()?,
        }),
        _ => None,
    }
}

/// `kiln watch --json --session NAME`, its lines turned into observations.
pub struct Watch {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    pub fn start(
        broker: &str,
        session: &str,
        ids: Vec<String>,
        tx: ObsTx,
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new(kiln_path());
        die_with_the_soak(&mut cmd);
        let mut child = cmd
            .args(["watch", "--json", "--session", session, "--broker", broker])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("start kiln watch")?;
        let stdout = child.stdout.take().context("kiln watch stdout")?;
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let Some(device) = v["device"]
                    .as_str()
                    .and_then(|d| ids.iter().position(|i| i == d))
                else {
                    continue;
                };
                let module = v["module"].as_str().unwrap_or_default().to_string();
                let obs = match v["kind"].as_str().unwrap_or_default() {
                    "telemetry" if v["stream"] == "n" => Obs::Delivered {
                        device,
                        module,
                        text: v["text"].as_str().unwrap_or_default().to_string(),
                    },
                    "dropped" => Obs::DropReport {
                        device,
                        records: v["records"].as_u64().unwrap_or(0),
                    },
                    "discarded" => Obs::Discarded {
                        device,
                        module,
                        records: v["records"].as_u64().unwrap_or(0),
                    },
                    _ => continue,
                };
                let _ = tx.send((now_ms(), obs));
            }
        });
        Ok(Self {
            child,
            reader: Some(reader),
        })
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it like Ctrl-C; its exit code (1: a batch missing that no drop explains).
    pub fn stop(mut self) -> Option<i32> {
        signal(self.child.id(), "TERM");
        let code = self.child.wait().ok().and_then(|s| s.code());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        code
    }
}

/// The newest reported state of `app` per device, retained or live.
pub type Latest = Arc<Mutex<HashMap<String, (u64, ModuleState)>>>;

/// Subscribes to every device's reported state and events with a persistent session.
/// Live messages (not replayed retained ones, which a SIGKILLed broker may have rolled
/// back) raise the floor the checker holds each device to.
pub fn observe(port: u16, ids: Vec<String>, tx: ObsTx) -> Latest {
    let latest: Latest = Arc::default();
    let l = latest.clone();
    std::thread::spawn(move || {
        let topics = Topics::new(DEFAULT_PREFIX);
        let mut options = MqttOptions::new("soak-observer", "127.0.0.1", port);
        options.set_clean_session(false);
        options.set_max_packet_size(4 << 20, 4 << 20);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 64);
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    for id in &ids {
                        let _ = client.try_subscribe(topics.reported(id), QoS::AtLeastOnce);
                        let _ = client.try_subscribe(topics.events(id), QoS::AtLeastOnce);
                    }
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    let Some((id, kind)) = topics.parse_device(&p.topic) else {
                        continue;
                    };
                    let Some(device) = ids.iter().position(|i| i == id) else {
                        continue;
                    };
                    if kind == "reported" {
                        let Ok((r, _)) = Reported::open(&p.topic, &p.payload) else {
                            continue;
                        };
                        let Some(app) = r.modules.iter().find(|m| m.name == "app") else {
                            continue;
                        };
                        l.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id.to_string(), (app.version, app.state));
                        // While a version is on trial, `version` is the trial's.
                        if !p.retain && app.state == ModuleState::Running && app.version > 0 {
                            let obs = Obs::Committed {
                                device,
                                version: app.version,
                            };
                            let _ = tx.send((now_ms(), obs));
                        }
                    } else if kind == "events" {
                        if let Ok((e, _)) = Event::open(&p.topic, &p.payload) {
                            if e.module == "app" && e.kind == EventKind::Committed {
                                let obs = Obs::Committed {
                                    device,
                                    version: e.version,
                                };
                                let _ = tx.send((now_ms(), obs));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    latest
}

/// The retained message on `topic`, if there is one (waits up to 2 s for it).
pub fn retained(port: u16, topic: &str) -> Option<Vec<u8>> {
    let mut options = MqttOptions::new("soak-reader", "127.0.0.1", port);
    options.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut connection) = Client::new(options, 10);
    client.subscribe(topic, QoS::AtLeastOnce).ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut found = None;
    while Instant::now() < deadline {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(Packet::Publish(p)))) if p.topic == topic => {
                found = Some(p.payload.to_vec());
                break;
            }
            // Subscribed and nothing came: no retained message; give it a moment.
            Ok(Ok(rumqttc::Event::Incoming(Packet::SubAck(_)))) => {
                if let Ok(Ok(rumqttc::Event::Incoming(Packet::Publish(p)))) =
                    connection.recv_timeout(Duration::from_millis(300))
                {
                    found = Some(p.payload.to_vec());
                }
                break;
            }
            Ok(Err(_)) => break,
            _ => {}
        }
    }
    let _ = client.disconnect();
    found
}

/// A desired state naming app `version` in `artifact`, signed with `key` (which no
/// device trusts): what an attacker with broker access would publish.
pub fn forged_desired(device: &str, version: u64, artifact: &Path, key: &Path) -> Result<Vec<u8>> {
    use kiln_protocol::fleet::{
        Desired, DesiredModule, ModuleLimits, Scope, SignedDesired, TargetArtifact,
    };
    use kiln_protocol::keys::SecretKey;
    use kiln_protocol::transfer::Codec;
    let secret = SecretKey::from_text(&std::fs::read_to_string(key)?)?;
    let bytes = std::fs::read(artifact)?;
    let desired = Desired {
        // The fleet's own id, so only the key can refuse it.
        fleet: kiln_protocol::trust::SignedRoot::peek(&std::fs::read(
            key.with_file_name("fleet.root"),
        )?)
        .map_err(|e| anyhow::anyhow!(e))?
        .fleet,
        scope: Scope::Device(device.into()),
        // Far above any serial a push makes (Unix ms), so only the key can refuse it.
        serial: now_ms() * 1_000,
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        mirrors: Vec::new(),
        modules: vec![DesiredModule {
            name: "app".into(),
            version,
            artifacts: vec![
                TargetArtifact::whole(
                    &bytes,
                    "x86_64-unknown-linux-gnu",
                    Vec::new(),
                    Codec::Raw,
                    64 * 1024,
                )
                .0,
            ],
            config: Vec::new(),
            limits: ModuleLimits::default(),
            allow_downgrade: true,
            health_window_ms: 1_000,
        }],
    };
    Ok(SignedDesired::sign(&desired, &[&secret]))
}

/// Runs a `kiln` fleet command with a time limit, its stderr appended to `log`; its
/// exit code (None: killed).
pub fn kiln(args: &[&str], limit: Duration, log: &Path) -> Option<i32> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ok()?;
    let Ok(mut child) = Command::new(kiln_path())
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
    else {
        return None;
    };
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The broker and whether it is up, paused or down.
pub struct Mosquitto {
    pub broker: Broker,
    pub state: BrokerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Up,
    Paused,
    Down,
}

impl Mosquitto {
    pub fn start() -> Self {
        let mut broker = Broker::start();
        // Persist every second, so a SIGKILL loses at most the last second of retained
        // messages and sessions, and allow what kilnd may send (8 MiB).
        broker.extra_config = "autosave_interval 1\nmessage_size_limit 8388608\n".into();
        broker.restart();
        Self {
            broker,
            state: BrokerState::Up,
        }
    }

    pub fn url(&self) -> String {
        self.broker.url()
    }

    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.broker.pid() {
            signal(pid, sig);
        }
    }
}
