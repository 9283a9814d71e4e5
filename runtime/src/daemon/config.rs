//! `kilnd.toml`: what the daemon runs and under which limits. Paths are relative to
//! the file's directory. Unknown keys are errors, so a typo never silently drops a
//! limit.
//!
//! ```toml
//! trust = ["fleet.root"]       # the fleet's root document, or public keys (*.pub)
//!
//! [[module]]
//! artifact = "sensor-filter.kiln"
//! tick_ms = 1000
//! config = "alpha=0.3"
//! memory_limit = "4MiB"        # or pages; default: the artifact's, else 256MiB
//! fuel_per_call = 5000000      # needs an artifact compiled with --fuel
//! timeout_ms = 1000            # wall-clock watchdog per call
//! restart = { backoff_ms = 500, backoff_max_ms = 30000, max_crashes = 5, window_s = 300 }
//! rate = { records_per_s = 2000, bytes_per_s = 262144, burst_ms = 1000 }  # publish + log
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::manifest::{parse_byte_size, parse_memory_size};
use kiln_protocol::names::{self, Kind};
use serde::Deserialize;

use crate::daemon::rate::RateLimit;
use crate::sandbox::load::{is_root, key_files};
use crate::sandbox::wasi::DirMapping;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device id (used for MQTT topics by `serve` with a broker); defaults to the host
    /// name.
    pub device: Option<String>,
    /// What this device trusts: public keys (`*.pub`), or the fleet's root document
    /// (`*.root`, whose release keys sign artifacts and desired states), or a
    /// directory of them. A device that follows a broker needs a root document.
    pub trust: Vec<PathBuf>,
    /// The root document among `trust` (filled by `load`).
    #[serde(skip)]
    pub root: Option<PathBuf>,
    /// Command that starts a worker in front of kilnd itself, e.g. a qemu-user command
    /// when kilnd runs emulated on a host without binfmt_misc; empty on a device.
    #[serde(default)]
    pub worker_launcher: Vec<String>,
    #[serde(default, rename = "module")]
    pub modules: Vec<ModuleConfig>,
    /// Where fleet updates keep their state, slots and downloads (with `[mqtt]`).
    pub data_dir: Option<PathBuf>,
    /// Receive modules over MQTT as signed desired state.
    pub mqtt: Option<MqttConfig>,
    /// This device's own artifact mirror (`https://cache.lan/kiln`, a local cache or a
    /// CDN in front of the fleet's), used instead of the mirrors a desired state
    /// names; `off` uses none, only the broker. Unset: the desired state's mirrors.
    pub mirror: Option<String>,
    /// PEM CA certificate(s) an `https://` mirror's certificate must chain to; by
    /// default the `[mqtt]` `ca`, else the system's bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`).
    pub mirror_ca: Option<PathBuf>,
    /// How telemetry is batched and spooled (with `[mqtt]`).
    pub telemetry: Option<TelemetryConfig>,
    /// Each module's rate limit by name (filled by `load`).
    #[serde(skip)]
    pub rates: BTreeMap<String, RateLimit>,
    /// Serial ports, each granted to the modules it names (local or fleet).
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// GPIO lines, likewise.
    #[serde(default)]
    pub gpio: Vec<GpioConfig>,
    /// I2C devices, likewise.
    #[serde(default)]
    pub i2c: Vec<I2cConfig>,
    /// Files granted read-only (sensor attributes under /sys), likewise.
    #[serde(default)]
    pub file: Vec<FileConfig>,
    /// The hardware granted to each module, by its name (filled by `load`).
    #[serde(skip)]
    pub grants: Grants,
}

/// A serial port in kilnd.toml and the modules granted it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// What a module opens it by.
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "defaults::baud")]
    pub baud: u32,
    #[serde(default = "defaults::framing")]
    pub framing: String,
    /// The modules granted it (none: no module may open it).
    pub modules: Vec<String>,
}

/// GPIO lines in kilnd.toml and the modules granted them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    pub name: String,
    /// The chip's character device.
    pub chip: PathBuf,
    /// Line offsets on the chip.
    pub lines: Vec<u32>,
    /// `input` or `output`.
    pub direction: Direction,
    /// For inputs: `none` (the default), `rising`, `falling` or `both`, delivered
    /// to the module as messages on `gpio/NAME`.
    #[serde(default = "defaults::edges")]
    pub edges: String,
    pub modules: Vec<String>,
}

/// A file in kilnd.toml granted read-only to modules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: String,
    pub path: PathBuf,
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Input,
    Output,
}

/// An I2C device in kilnd.toml and the modules granted it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cConfig {
    pub name: String,
    /// The bus's character device.
    pub bus: PathBuf,
    /// The device's 7-bit address (`0x50` in TOML is a number).
    pub address: u16,
    pub modules: Vec<String>,
}

/// The hardware each module is granted, by module name.
pub type Grants = BTreeMap<String, kiln_protocol::capability::Grants>;

/// Checks the `[[serial]]`, `[[gpio]]`, `[[i2c]]` and `[[file]]` grants and who they
/// go to.
fn grants(config: &Config, base: &Path) -> Result<Grants, String> {
    use kiln_protocol::capability::{GpioLines, I2cDevice, ReadFile, SerialPort};
    let (mut grants, mut seen) = (Grants::new(), BTreeSet::new());
    let path = |p: &Path| base.join(p).to_string_lossy().into_owned();
    for s in &config.serial {
        let port = SerialPort {
            name: s.name.clone(),
            path: path(&s.path),
            baud: s.baud,
            framing: s
                .framing
                .parse()
                .map_err(|e| format!("[[serial]] `{}`: {e}", s.name))?,
        };
        port.check().map_err(|e| format!("[[serial]] {e}"))?;
        grant(
            &mut grants,
            &mut seen,
            ("serial", &s.name),
            &s.modules,
            |g| {
                g.serial.push(port.clone());
                g.serial.len()
            },
        )?;
    }
    for c in &config.gpio {
        let lines = GpioLines {
            name: c.name.clone(),
            chip: path(&c.chip),
            lines: c.lines.clone(),
            output: c.direction == Direction::Output,
            edges: c
                .edges
                .parse()
                .map_err(|e| format!("[[gpio]] `{}`: {e}", c.name))?,
        };
        lines.check().map_err(|e| format!("[[gpio]] {e}"))?;
        grant(&mut grants, &mut seen, ("gpio", &c.name), &c.modules, |g| {
            g.gpio.push(lines.clone());
            g.gpio.len()
        })?;
    }
    for c in &config.i2c {
        let device = I2cDevice {
            name: c.name.clone(),
            bus: path(&c.bus),
            address: c.address,
        };
        device.check().map_err(|e| format!("[[i2c]] {e}"))?;
        grant(&mut grants, &mut seen, ("i2c", &c.name), &c.modules, |g| {
            g.i2c.push(device.clone());
            g.i2c.len()
        })?;
    }
    for c in &config.file {
        let file = ReadFile {
            name: c.name.clone(),
            path: path(&c.path),
        };
        file.check().map_err(|e| format!("[[file]] {e}"))?;
        grant(&mut grants, &mut seen, ("file", &c.name), &c.modules, |g| {
            g.files.push(file.clone());
            g.files.len()
        })?;
    }
    Ok(grants)
}

/// Grants `name` (of `kind`) to each of `modules` with `add`, which returns how many
/// of that kind the module then holds (at most `MAX_GRANTS`). Names are unique within
/// a kind (`seen`).
fn grant(
    grants: &mut Grants,
    seen: &mut BTreeSet<(&'static str, String)>,
    (kind, name): (&'static str, &str),
    modules: &[String],
    add: impl Fn(&mut kiln_protocol::capability::Grants) -> usize,
) -> Result<(), String> {
    use kiln_protocol::capability::MAX_GRANTS;
    if !seen.insert((kind, name.to_string())) {
        return Err(format!("[[{kind}]]: a second one is named `{name}`"));
    }
    if modules.is_empty() {
        return Err(format!(
            "[[{kind}]] `{name}`: `modules` names no module to grant it to"
        ));
    }
    for m in modules {
        names::check(Kind::Module, m).map_err(|e| format!("[[{kind}]] `{name}`: {e}"))?;
        if add(grants.entry(m.clone()).or_default()) > MAX_GRANTS {
            return Err(format!(
                "[[{kind}]]: module `{m}` is granted more than {MAX_GRANTS}"
            ));
        }
    }
    Ok(())
}

/// Telemetry goes to the broker in batches, each written to a bounded spool on disk
/// before it is published.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Seal a batch when its records reach this size...
    pub batch_bytes: u64,
    /// ...or when its oldest record is this old.
    pub batch_ms: u64,
    /// Bound on the spool (`8MiB`, or bytes); beyond it the oldest batches are dropped
    /// and the drop is reported.
    #[serde(deserialize_with = "byte_size")]
    pub spool_limit: u64,
    /// Interval of kilnd's own module and device stats; 0 turns them off.
    pub stats_s: u64,
    /// Interval of the modules' health summaries (retained on the device's `health`
    /// topic, for a rollout's health gates); 0 turns them off.
    pub health_s: u64,
    /// Batches published and not yet acknowledged at once.
    pub window: usize,
    /// Also print every record as a JSON line on stdout (turn off on a busy device:
    /// the journal is not a telemetry bus).
    pub stdout: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 16 * 1024,
            batch_ms: 1000,
            spool_limit: 8 * 1024 * 1024,
            stats_s: 10,
            health_s: 60,
            window: 8,
            stdout: true,
        }
    }
}

/// The longest `health_s`: a rollout's health gate waits for a period at most a day.
pub const MAX_HEALTH_S: u64 = 24 * 3600;

/// The largest `batch_bytes`: the records of one batch under the link's bound.
pub const MAX_BATCH_BYTES: u64 = kiln_protocol::telemetry::RECORDS_BUDGET as u64;

fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => parse_byte_size(&t).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]`, or `mqtts://host[:port]` with `ca`; or several, separated
    /// by commas (a cluster's nodes), tried in turn when the connection drops.
    pub broker: String,
    /// PEM CA certificate for `mqtts://`
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, if the broker wants one
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    /// Groups whose desired state this device follows.
    #[serde(default)]
    pub groups: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default = "defaults::keep_alive_s")]
    pub keep_alive_s: u64,
    /// Desired states older than this (by their issue time) are reported as stale:
    /// newer ones may be withheld. Keep it above how often the fleet re-signs them.
    #[serde(default = "defaults::stale_after_s")]
    pub stale_after_s: u64,
    /// The device's provisioning time (`2026-11-30T08:00:00Z`): no desired state
    /// issued before it is taken, so an old one cannot be replayed to a new device.
    pub not_before: Option<String>,
    /// `not_before` in Unix milliseconds (filled by `load`).
    #[serde(skip)]
    pub not_before_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub artifact: PathBuf,
    /// Defaults to the artifact's file stem.
    pub name: Option<String>,
    /// Interval between `kiln_tick` calls.
    #[serde(default = "defaults::tick_ms")]
    pub tick_ms: u64,
    /// Config bytes the module reads with `kiln.config_read`, as text...
    pub config: Option<String>,
    /// ...or from a file.
    pub config_file: Option<PathBuf>,
    /// Linear-memory cap: pages or a size (`4MiB`).
    pub memory_limit: Option<String>,
    pub fuel_per_call: Option<u64>,
    /// Wall-clock limit for `kiln_init`, each tick and each message.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Wall-clock limit for a command's `_start`; none by default.
    pub run_timeout_ms: Option<u64>,
    /// Wall-clock limit for spawn + verify + load + instantiate.
    #[serde(default = "defaults::start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// Topics (`module/stream`) whose telemetry is delivered to `kiln_on_message`.
    #[serde(default)]
    pub inbox: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `HOST[:GUEST]` directories the module may use.
    #[serde(default)]
    pub dirs: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How fast the module may publish and log; beyond it records are dropped and
    /// counted.
    #[serde(default)]
    pub rate: RateLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each crash in the window.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// This many crashes within `window_s` mark the module failed.
    pub max_crashes: u32,
    pub window_s: u64,
}

impl MqttConfig {
    pub fn connect(&self) -> kiln_protocol::mqtt::Connect {
        kiln_protocol::mqtt::Connect::to(&self.broker)
            .tls(
                self.ca.clone(),
                self.client_cert.clone(),
                self.client_key.clone(),
            )
            .credentials(self.username.clone(), self.password.clone())
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_ms: 500,
            backoff_max_ms: 30_000,
            max_crashes: 5,
            window_s: 300,
        }
    }
}

impl RestartPolicy {
    /// Delay before restarting after the `n`th crash (1-based) in the window.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u64 << n.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_s)
    }
}

mod defaults {
    pub fn prefix() -> String {
        kiln_protocol::fleet::DEFAULT_PREFIX.into()
    }
    pub fn keep_alive_s() -> u64 {
        10
    }
    pub fn stale_after_s() -> u64 {
        7 * 24 * 3600
    }
    pub fn tick_ms() -> u64 {
        1000
    }
    pub fn timeout_ms() -> u64 {
        1000
    }
    pub fn start_timeout_ms() -> u64 {
        30_000
    }
    pub fn baud() -> u32 {
        9600
    }
    pub fn framing() -> String {
        "8N1".into()
    }
    pub fn edges() -> String {
        "none".into()
    }
}

/// A module ready to supervise: names resolved, paths absolute, limits parsed.
/// `artifact_digest` makes a rewritten artifact file a change, so a reload swaps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    pub name: String,
    pub artifact: PathBuf,
    pub artifact_digest: Option<[u8; 32]>,
    /// Fleet modules: the exact artifact the agent staged; the worker refuses others.
    pub expect: Option<kiln_protocol::worker::Expect>,
    pub config: Vec<u8>,
    pub memory_pages: Option<u32>,
    pub fuel_per_call: Option<u64>,
    pub tick: Duration,
    pub timeout: Duration,
    pub run_timeout: Option<Duration>,
    pub start_timeout: Duration,
    pub inbox: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirMapping>,
    pub restart: RestartPolicy,
    /// Public keys (text) the worker accepts this artifact's signature from; empty:
    /// the device's (`trust`, or its root's release keys). A fleet module names the
    /// key that signed it when it was staged.
    pub trusted_keys: Vec<String>,
    /// The hardware kilnd.toml grants the module (by its name, local or fleet).
    pub grants: kiln_protocol::capability::Grants,
}

impl Config {
    /// Reads and checks `path`; every error is one line naming the file.
    pub fn load(path: &Path) -> Result<(Self, Vec<ModulePlan>), String> {
        let file = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config `{file}`: {e}"))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            // toml's message may span lines ("invalid array\nexpected `]`"): one line.
            let msg = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("config `{file}` line {line}: {msg}")
                }
                None => format!("config `{file}`: {msg}"),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| base.join(p);
        let trust: Vec<PathBuf> = config.trust.iter().map(|p| resolve(p)).collect();
        if trust.is_empty() {
            return Err(format!("config `{file}`: `trust` names no public key"));
        }
        config.trust = key_files(&trust).map_err(|e| format!("config `{file}`: {e}"))?;
        let roots: Vec<&PathBuf> = config.trust.iter().filter(|p| is_root(p)).collect();
        if roots.len() > 1 {
            return Err(format!(
                "config `{file}`: `trust` names {} root documents; a device follows one",
                roots.len()
            ));
        }
        config.root = roots.first().map(|p| p.to_path_buf());
        if let Some(mqtt) = &mut config.mqtt {
            if config.root.is_none() {
                return Err(format!("config `{file}`: a device that follows a broker needs the fleet's root document in `trust` (fleet.root from `kiln keygen`)"));
            }
            if let Some(t) = &mqtt.not_before {
                mqtt.not_before_ms = kiln_protocol::fleet::parse_utc(t)
                    .map_err(|e| format!("config `{file}`: not_before: {e}"))?;
            }
        }
        config.mirror_ca = config.mirror_ca.as_deref().map(resolve);
        if let Some(url) = config.mirror.as_deref().filter(|u| *u != "off") {
            kiln_protocol::mirror::MirrorUrl::parse(url)
                .map_err(|e| format!("config `{file}`: {e} (or `off`)"))?;
            if !cfg!(feature = "mirror") {
                return Err(format!("config `{file}`: mirror `{url}`: this kilnd was built without mirrors (feature `mirror`); leave `mirror` out"));
            }
        }
        // Names become topic levels and file names: checked here like everywhere.
        if let Some(device) = &config.device {
            names::check(Kind::Device, device).map_err(|e| format!("config `{file}`: {e}"))?;
        }
        for group in config.mqtt.iter().flat_map(|m| &m.groups) {
            names::check(Kind::Group, group).map_err(|e| format!("config `{file}`: {e}"))?;
        }
        let mut names = BTreeSet::new();
        let mut plans = Vec::new();
        let mut rates = BTreeMap::new();
        for m in &config.modules {
            let bad =
                |why: String| format!("config `{file}`: module `{}`: {why}", m.artifact.display());
            let name = match &m.name {
                Some(n) => n.clone(),
                None => m
                    .artifact
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .ok_or_else(|| bad("cannot derive a name; set `name`".into()))?,
            };
            names::check(Kind::Module, &name).map_err(|e| bad(e.into()))?;
            if !names.insert(name.clone()) {
                return Err(bad(format!("a second module is named `{name}`")));
            }
            let config_bytes = match (&m.config, &m.config_file) {
                (Some(_), Some(_)) => {
                    return Err(bad("set `config` or `config_file`, not both".into()))
                }
                (Some(text), None) => text.clone().into_bytes(),
                (None, Some(p)) => std::fs::read(resolve(p))
                    .map_err(|e| bad(format!("cannot read config_file `{}`: {e}", p.display())))?,
                (None, None) => Vec::new(),
            };
            let memory_pages = m
                .memory_limit
                .as_deref()
                .map(parse_memory_size)
                .transpose()
                .map_err(|e| bad(format!("memory_limit {e}")))?;
            if m.tick_ms == 0 || m.timeout_ms == 0 {
                return Err(bad("tick_ms and timeout_ms must be above 0".into()));
            }
            if m.restart.max_crashes == 0 {
                return Err(bad("restart.max_crashes must be at least 1".into()));
            }
            m.rate.check().map_err(|e| bad(e.into()))?;
            rates.insert(name.clone(), m.rate);
            let dirs = m
                .dirs
                .iter()
                .map(|d| {
                    d.parse::<DirMapping>().map(|mut d| {
                        d.host = resolve(&d.host);
                        d
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            plans.push(ModulePlan {
                name,
                artifact: resolve(&m.artifact),
                artifact_digest: kiln_protocol::files::sha256_bounded(
                    &resolve(&m.artifact),
                    kiln_protocol::files::MAX_LOCAL_ARTIFACT,
                )
                .ok(),
                expect: None,
                config: config_bytes,
                memory_pages,
                fuel_per_call: m.fuel_per_call,
                tick: Duration::from_millis(m.tick_ms),
                timeout: Duration::from_millis(m.timeout_ms),
                run_timeout: m.run_timeout_ms.map(Duration::from_millis),
                start_timeout: Duration::from_millis(m.start_timeout_ms),
                inbox: m.inbox.clone(),
                args: m.args.clone(),
                env: m.env.clone().into_iter().collect(),
                dirs,
                restart: m.restart,
                trusted_keys: Vec::new(),
                grants: Default::default(),
            });
        }
        config.rates = rates;
        config.grants = grants(&config, base).map_err(|e| format!("config `{file}`: {e}"))?;
        if let Some(mqtt) = &mut config.mqtt {
            kiln_protocol::fleet::parse_brokers(&mqtt.broker)
                .map_err(|e| format!("config `{file}`: {e}"))?;
            for p in [&mut mqtt.ca, &mut mqtt.client_cert, &mut mqtt.client_key]
                .into_iter()
                .flatten()
            {
                *p = resolve(p);
            }
            if config.device.is_none() {
                let host =
                    host_name().map_err(|e| format!("config `{file}`: no `device`, and {e}"))?;
                names::check(Kind::Device, &host).map_err(|e| {
                    format!("config `{file}`: no `device`, and the host name is not a device id ({e}); set `device`")
                })?;
                config.device = Some(host);
            }
            match &config.data_dir {
                Some(d) => config.data_dir = Some(resolve(d)),
                None => return Err(format!("config `{file}`: [mqtt] needs `data_dir`")),
            }
        } else if plans.is_empty() {
            return Err(format!(
                "config `{file}`: no [[module]] to run and no [mqtt]"
            ));
        }
        if let Some(t) = &config.telemetry {
            if config.mqtt.is_none() {
                return Err(format!(
                    "config `{file}`: [telemetry] needs [mqtt] to send it to"
                ));
            }
            if t.batch_bytes > MAX_BATCH_BYTES {
                return Err(format!(
                    "config `{file}`: [telemetry] batch_bytes {} is above {MAX_BATCH_BYTES}, the most one batch can carry over the link",
                    t.batch_bytes
                ));
            }
            if t.health_s > MAX_HEALTH_S {
                return Err(format!(
                    "config `{file}`: [telemetry] health_s {} is above {MAX_HEALTH_S} (a day); 0 turns health summaries off",
                    t.health_s
                ));
            }
            if t.batch_bytes == 0 || t.window == 0 {
                return Err(format!(
                    "config `{file}`: [telemetry] needs batch_bytes and window above 0"
                ));
            }
            // Batches in flight stay spooled until acknowledged: a spool that only
            // holds the window drops batches whenever the link is busy, broker or not.
            let needed = (t.window as u64)
                .saturating_add(4)
                .saturating_mul(t.batch_bytes);
            if t.spool_limit < needed {
                return Err(format!(
                    "config `{file}`: [telemetry] spool_limit {} is under {needed} bytes: the window of {} batches and 4 more, of batch_bytes {}",
                    t.spool_limit, t.window, t.batch_bytes
                ));
            }
        }
        Ok((config, plans))
    }
}

/// The kernel's host name, which a device id defaults to.
fn host_name() -> Result<String, String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("cannot read the host name: {e}"))?;
    Ok(name.trim().to_string())
}

/// What `kilnd check` and `kilnd serve` both refuse, beyond what [`Config::load`]
/// parses: the broker's TLS material as the link will use it (a CA that is not a
/// certificate, `mqtts://` without one), each module's `dirs` (a host directory that
/// does not exist), and the worker launcher's program. One function, so whatever
/// `check` passes, `serve` accepts; `serve` fails at once instead of retrying forever
/// or failing a module for good.
pub fn validate(config: &Config, plans: &[ModulePlan]) -> Result<(), String> {
    if let Some(mqtt) = &config.mqtt {
        mqtt.connect()
            .options("kilnd-check", std::time::Duration::from_secs(30))
            .map_err(|e| format!("[mqtt]: {e}"))?;
    }
    // A CA named for the mirror must hold one (the system's bundle, the default, may be
    // missing on a device: its https:// mirrors then fail over to the broker).
    #[cfg(feature = "mirror")]
    if let Some(ca) = &config.mirror_ca {
        crate::daemon::fleet::mirror::tls_config(Some(ca))
            .map_err(|e| format!("mirror_ca: {e}"))?;
    }
    for plan in plans {
        for dir in &plan.dirs {
            match std::fs::metadata(&dir.host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "module `{}`: dirs: `{}` is not a directory",
                        plan.name,
                        dir.host.display()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "module `{}`: dirs: `{}`: {e}",
                        plan.name,
                        dir.host.display()
                    ))
                }
            }
        }
    }
    if let Some(program) = config.worker_launcher.first() {
        let found = if program.contains('/') {
            std::path::Path::new(program).is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|p| p.join(program).is_file())
            })
        };
        if !found {
            return Err(format!(
                "worker_launcher: `{program}` is not a file, nor found on PATH"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Vec<ModulePlan>, String> {
        load_config(text).map(|(_, plans)| plans)
    }

    fn load_config(text: &str) -> Result<(Config, Vec<ModulePlan>), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kilnd.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn a_full_module_entry_resolves_against_the_file() {
        let plans = load(
            r#"
trust = ["fleet.pub"]
[[module]]
artifact = "a/sensor.kiln"
config = "alpha=0.3"
memory_limit = "1MiB"
restart = { backoff_ms = 100, max_crashes = 3 }
"#,
        )
        .unwrap();
        let p = &plans[0];
        assert_eq!(p.name, "sensor");
        assert!(p.artifact.ends_with("a/sensor.kiln") && p.artifact.is_absolute());
        assert_eq!(p.memory_pages, Some(16));
        assert_eq!(p.config, b"alpha=0.3");
        assert_eq!(p.restart.max_crashes, 3);
        assert_eq!(p.restart.backoff_max_ms, 30_000);
    }

    #[test]
    fn serial_ports_are_granted_to_the_modules_they_name_and_checked() {
        let base = "trust = [\"k.pub\"]\n[[module]]\nartifact = \"nmea.kiln\"\n";
        let (config, _) = load_config(&format!(
            "{base}[[serial]]\nname = \"gps\"\npath = \"/dev/ttyUSB0\"\nbaud = 4800\nframing = \"7E1\"\nmodules = [\"nmea\", \"fleet-app\"]\n"
        ))
        .unwrap();
        let granted = &config.grants["nmea"].serial;
        assert_eq!(granted.len(), 1);
        assert_eq!(
            (
                granted[0].name.as_str(),
                granted[0].path.as_str(),
                granted[0].baud
            ),
            ("gps", "/dev/ttyUSB0", 4800)
        );
        assert_eq!(granted[0].framing.to_string(), "7E1");
        assert_eq!(config.grants["fleet-app"].serial, *granted);
        assert!(!config.grants.contains_key("other"));
        let refused = |serial: &str| load(&format!("{base}[[serial]]\n{serial}")).unwrap_err();
        assert!(refused(
            "name = \"gps\"\npath = \"/dev/ttyS0\"\nbaud = 9601\nmodules = [\"nmea\"]\n"
        )
        .contains("baud 9601"));
        assert!(refused(
            "name = \"gps\"\npath = \"/dev/ttyS0\"\nframing = \"9N1\"\nmodules = [\"nmea\"]\n"
        )
        .contains("framing `9N1`"));
        assert!(
            refused("name = \"gps\"\npath = \"/dev/ttyS0\"\nmodules = []\n")
                .contains("names no module")
        );
        assert!(
            refused("name = \"a/b\"\npath = \"/dev/ttyS0\"\nmodules = [\"nmea\"]\n")
                .contains("serial port name")
        );
        assert!(refused(
            "name = \"gps\"\npath = \"/dev/ttyS0\"\nmodules = [\"nmea\"]\nparity = 1\n"
        )
        .contains("unknown field `parity`"));
    }

    #[test]
    fn gpio_lines_and_i2c_devices_are_granted_and_checked() {
        let base = "trust = [\"k.pub\"]\n[[module]]\nartifact = \"pump.kiln\"\n";
        let (config, _) = load_config(&format!(
            "{base}[[gpio]]\nname = \"relays\"\nchip = \"/dev/gpiochip0\"\nlines = [0, 3]\ndirection = \"output\"\nmodules = [\"pump\"]\n\
             [[gpio]]\nname = \"buttons\"\nchip = \"/dev/gpiochip1\"\nlines = [7]\ndirection = \"input\"\nedges = \"both\"\nmodules = [\"pump\"]\n\
             [[file]]\nname = \"temp\"\npath = \"/sys/bus/iio/devices/iio:device0/in_temp_input\"\nmodules = [\"pump\"]\n\
             [[i2c]]\nname = \"eeprom\"\nbus = \"/dev/i2c-1\"\naddress = 0x50\nmodules = [\"pump\"]\n"
        ))
        .unwrap();
        let g = &config.grants["pump"];
        assert_eq!(g.gpio.len(), 2);
        assert_eq!(
            (g.gpio[0].lines.as_slice(), g.gpio[0].output),
            (&[0, 3][..], true)
        );
        assert!(!g.gpio[1].output);
        assert_eq!(g.gpio[1].edges, kiln_protocol::capability::Edges::Both);
        assert_eq!(g.files[0].name, "temp");
        assert_eq!(
            (g.i2c[0].bus.as_str(), g.i2c[0].address),
            ("/dev/i2c-1", 0x50)
        );
        assert!(g.serial.is_empty());
        let refused = |t: &str| load(&format!("{base}{t}")).unwrap_err();
        let gpio = "[[gpio]]\nname = \"r\"\nchip = \"/dev/gpiochip0\"\nmodules = [\"pump\"]\n";
        assert!(
            refused(&format!("{gpio}lines = [1, 1]\ndirection = \"output\"\n"))
                .contains("line 1 is named twice")
        );
        assert!(
            refused(&format!("{gpio}lines = [1]\ndirection = \"sideways\"\n"))
                .contains("unknown variant `sideways`")
        );
        assert!(refused(&format!(
            "{gpio}lines = [1]\ndirection = \"output\"\nedges = \"rising\"\n"
        ))
        .contains("not outputs"));
        assert!(refused(&format!(
            "{gpio}lines = [1]\ndirection = \"input\"\n{gpio}lines = [2]\ndirection = \"input\"\n"
        ))
        .contains("a second one is named `r`"));
        let i2c = "[[i2c]]\nname = \"e\"\nbus = \"/dev/i2c-1\"\n";
        assert!(
            refused(&format!("{i2c}address = 0x78\nmodules = [\"pump\"]\n"))
                .contains("7-bit address")
        );
        assert!(
            refused(&format!("{i2c}address = 0x50\nmodules = []\n")).contains("names no module")
        );
    }

    #[test]
    fn mistakes_are_one_line_and_name_the_file() {
        let typo =
            load("trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\nfuel = 5\n").unwrap_err();
        assert!(
            typo.contains("kilnd.toml` line 4") && typo.contains("unknown field `fuel`"),
            "{typo}"
        );
        let dup = load("trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\n[[module]]\nartifact = \"x/a.kiln\"\n")
            .unwrap_err();
        assert!(dup.contains("a second module is named `a`"), "{dup}");
        assert!(load("trust = []\n")
            .unwrap_err()
            .contains("names no public key"));
        assert!(!typo.contains('\n'));
        // toml says some mistakes in two lines; kilnd prints one.
        let open = load("trust = [\n").unwrap_err();
        assert!(
            open.contains("kilnd.toml` line ") && !open.contains('\n'),
            "{open}"
        );
    }

    #[test]
    fn device_group_and_module_names_that_would_escape_a_topic_are_refused() {
        let mqtt = |device: &str, group: &str| {
            format!("device = \"{device}\"\ndata_dir = \"d\"\ntrust = [\"fleet.root\"]\n[mqtt]\nbroker = \"mqtt://h\"\ngroups = [\"{group}\"]\n")
        };
        for (device, group) in [("dev/+", "lab"), ("dev-01", "lab/#"), ("..", "lab")] {
            let err = load_config(&mqtt(device, group)).unwrap_err();
            assert!(err.contains("name"), "{err}");
        }
        assert!(load_config(&mqtt("dev-01", "lab")).is_ok());
        let module =
            load("trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\nname = \"../x\"\n")
                .unwrap_err();
        assert!(module.contains("module name `../x`"), "{module}");
    }

    #[test]
    fn a_mirror_is_a_url_or_off_and_its_ca_must_hold_a_certificate() {
        let with = |top: &str| {
            format!("device = \"d\"\ndata_dir = \"d\"\ntrust = [\"fleet.root\"]\n{top}[mqtt]\nbroker = \"mqtt://h\"\n")
        };
        let (config, _) = load_config(&with("mirror = \"https://m.lan/kiln\"\n")).unwrap();
        assert_eq!(config.mirror.as_deref(), Some("https://m.lan/kiln"));
        assert!(load_config(&with("mirror = \"off\"\n")).is_ok());
        let err = load_config(&with("mirror = \"ftp://m.lan\"\n")).unwrap_err();
        assert!(
            err.contains("mirror `ftp://m.lan` must look like http://")
                && err.ends_with("(or `off`)"),
            "{err}"
        );
        let (config, plans) = load_config(&with("mirror_ca = \"nowhere.pem\"\n")).unwrap();
        assert!(config.mirror_ca.as_ref().is_some_and(|p| p.is_absolute()));
        if cfg!(feature = "mirror") {
            let err = validate(&config, &plans).unwrap_err();
            assert!(
                err.starts_with("mirror_ca: cannot read the mirror CA `"),
                "{err}"
            );
        }
    }

    /// Found by the chaos soak: `spool_limit = "32KiB"` with `batch_bytes = 4096` passed
    /// the old check (4 batches), but the default window keeps 8 batches in flight and
    /// spooled, so a flood next to a healthy broker dropped telemetry.
    #[test]
    fn a_spool_that_cannot_hold_the_window_and_more_is_refused() {
        let mqtt = "device = \"d\"\ndata_dir = \"/tmp/d\"\ntrust = [\"fleet.root\"]\n[mqtt]\nbroker = \"mqtt://h\"\n";
        let soak = format!("{mqtt}[telemetry]\nbatch_bytes = 4096\nspool_limit = \"32KiB\"\n");
        let err = load_config(&soak).unwrap_err();
        assert!(
            err.contains("spool_limit 32768 is under 49152 bytes") && !err.contains('\n'),
            "{err}"
        );
        let window =
            format!("{mqtt}[telemetry]\nbatch_bytes = 4096\nspool_limit = \"32KiB\"\nwindow = 4\n");
        assert!(load_config(&window).is_ok(), "4 in flight and 4 more fit");
        let enough = format!("{mqtt}[telemetry]\nbatch_bytes = 4096\nspool_limit = \"48KiB\"\n");
        assert!(load_config(&enough).is_ok());
    }

    #[test]
    fn telemetry_sizes_take_units_and_need_a_broker() {
        let mqtt = "device = \"d\"\ndata_dir = \"/tmp/d\"\ntrust = [\"fleet.root\"]\n[mqtt]\nbroker = \"mqtt://h\"\n";
        let text = format!("{mqtt}[telemetry]\nspool_limit = \"64KiB\"\nbatch_bytes = 1024\n");
        let (config, _) = load_config(&text).unwrap();
        let t = config.telemetry.unwrap();
        assert_eq!(
            (t.spool_limit, t.batch_bytes, t.batch_ms),
            (65536, 1024, 1000)
        );
        let tiny = format!("{mqtt}[telemetry]\nspool_limit = 100\n");
        let err = load_config(&tiny).unwrap_err();
        assert!(err.contains("spool_limit 100 is under"), "{err}");
        assert_eq!(t.health_s, 60);
        let off = format!("{mqtt}[telemetry]\nhealth_s = 0\n");
        assert_eq!(load_config(&off).unwrap().0.telemetry.unwrap().health_s, 0);
        let long = format!("{mqtt}[telemetry]\nhealth_s = 86401\n");
        let err = load_config(&long).unwrap_err();
        assert!(err.contains("health_s 86401 is above 86400"), "{err}");
        let alone = "trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\n[telemetry]\n";
        assert!(load(alone)
            .unwrap_err()
            .contains("[telemetry] needs [mqtt]"));
    }

    #[test]
    fn a_batch_the_link_cannot_carry_is_refused_in_one_line() {
        let mqtt = "device = \"d\"\ndata_dir = \"/tmp/d\"\ntrust = [\"fleet.root\"]\n[mqtt]\nbroker = \"mqtt://h\"\n";
        let big = format!("{mqtt}[telemetry]\nbatch_bytes = 1048576\nspool_limit = \"64MiB\"\n");
        let err = load_config(&big).unwrap_err();
        assert!(
            err.contains("batch_bytes 1048576 is above") && !err.contains('\n'),
            "{err}"
        );
        let most = format!(
            "{mqtt}[telemetry]\nbatch_bytes = {MAX_BATCH_BYTES}\nspool_limit = \"64MiB\"\n"
        );
        assert!(load_config(&most).is_ok());
    }

    #[test]
    fn rates_are_per_module_with_defaults() {
        let (config, _) = load_config(
            "trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\nrate = { records_per_s = 50, bytes_per_s = 100000 }\n[[module]]\nartifact = \"b.kiln\"\n",
        )
        .unwrap();
        assert_eq!(
            config.rates["a"],
            RateLimit {
                records_per_s: 50,
                bytes_per_s: 100_000,
                burst_ms: 1000
            }
        );
        assert_eq!(config.rates["b"], RateLimit::default());
        let err = load("trust = [\"k.pub\"]\n[[module]]\nartifact = \"a.kiln\"\nrate = { bytes_per_s = 1000 }\n").unwrap_err();
        assert!(
            err.contains("module `a.kiln`: rate allows a burst of 1000 bytes"),
            "{err}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            backoff_ms: 100,
            backoff_max_ms: 350,
            max_crashes: 9,
            window_s: 60,
        };
        let ms: Vec<u128> = (1..=4).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
    }

    #[test]
    fn a_trust_directory_stands_for_its_pub_files_and_must_hold_one() {
        let dir = tempfile::tempdir().unwrap();
        let trust = dir.path().join("trust");
        std::fs::create_dir(&trust).unwrap();
        std::fs::write(
            dir.path().join("kilnd.toml"),
            "trust = [\"trust\"]\n[mqtt]\nbroker = \"mqtt://h\"\n",
        )
        .unwrap();
        let err = Config::load(&dir.path().join("kilnd.toml")).unwrap_err();
        assert!(err.contains("holds no `*.pub` key"), "{err}");
        for f in ["b.pub", "a.pub", "README"] {
            std::fs::write(trust.join(f), "").unwrap();
        }
        std::fs::write(
            dir.path().join("kilnd.toml"),
            "trust = [\"trust\"]\ndata_dir = \"d\"\n[mqtt]\nbroker = \"mqtt://h\"\n",
        )
        .unwrap();
        let err = Config::load(&dir.path().join("kilnd.toml")).unwrap_err();
        assert!(err.contains("needs the fleet's root document"), "{err}");
        std::fs::write(trust.join("fleet.root"), "").unwrap();
        let (config, _) = Config::load(&dir.path().join("kilnd.toml")).unwrap();
        assert_eq!(
            config.trust,
            [
                trust.join("a.pub"),
                trust.join("b.pub"),
                trust.join("fleet.root")
            ]
        );
        assert_eq!(config.root, Some(trust.join("fleet.root")));
        // Without `device`, a device is known by its host name.
        assert_eq!(config.device, Some(host_name().unwrap()));
    }
}
