//! Health gates: a wave of a rollout is judged, after it commits, on what its devices
//! report of their modules (traps, restarts, dropped records, fuel, memory, the
//! modules' own metrics, silence), against the devices not yet updated (the control)
//! or the same devices before the update (the baseline).
//!
//! A device sends a [`HealthSummary`] per module and period: counts and small
//! sketches, never raw samples, bounded by [`HealthSummary::validate`]. The fleet tool
//! gathers them into a [`Cohort`] per group of devices, and [`judge`] (a pure function)
//! says whether the wave passes, must wait for more devices, or breaches a [`Gate`].
//!
//! ```
//! use kiln_protocol::rollout::gate::{judge, Cohort, Gate, HealthSummary, Verdict};
//!
//! let gates = [Gate::parse("traps <= 2x control min 2").unwrap()];
//! let traps = |calls, traps| HealthSummary { calls, traps, ..HealthSummary::new("app") };
//! let (mut wave, mut control, baseline) = (Cohort::new("app"), Cohort::new("app"), Cohort::new("app"));
//! wave.report("d1", &traps(1000, 9)).unwrap();
//! wave.report("d2", &traps(1000, 0)).unwrap();
//! control.report("d3", &traps(1000, 1)).unwrap();
//! // One device of the control is less than the sample the gate wants.
//! assert_eq!(judge(&gates, &wave, &control, &baseline), Verdict::Wait);
//!
//! control.report("d4", &traps(1000, 0)).unwrap();
//! let Verdict::Breach(breaches) = judge(&gates, &wave, &control, &baseline) else {
//!     panic!("9 traps in 2000 calls against 1 in 2000");
//! };
//! assert_eq!(breaches[0].devices, ["d1"]);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{self, Kind};

/// Metrics of its own a module may report in one summary.
pub const MAX_METRICS: usize = 8;
/// The longest metric name.
pub const MAX_METRIC_NAME: usize = 32;
/// The largest magnitude a metric's value may have: far beyond any reading, and a sum
/// of a `u64` count of them stays finite.
pub const MAX_VALUE: f64 = 1e15;
/// A [`HealthSummary`] that passes [`HealthSummary::validate`] encodes (postcard) in
/// at most this many bytes.
pub const MAX_SUMMARY: usize = 1024;
/// Devices one [`Cohort`] holds.
pub const MAX_COHORT: usize = 16_384;
/// Modules one device may report in one [`Cohort`].
pub const MAX_MODULES: usize = 64;
/// Devices a [`Breach`] names (the worst); it counts the others.
pub const MAX_BLAMED: usize = 8;

/// Count, sum, least and greatest of a module's readings of one metric: enough for a
/// mean and a range, in a few bytes however many readings there were.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Sketch {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Sketch {
    /// The sketch of `values`.
    pub fn of(values: &[f64]) -> Self {
        let mut s = Sketch::default();
        values.iter().for_each(|&v| s.add(v));
        s
    }

    /// Counts one more reading.
    pub fn add(&mut self, value: f64) {
        self.merge(&Sketch {
            count: 1,
            sum: value,
            min: value,
            max: value,
        });
    }

    /// Adds the readings `other` counts.
    pub fn merge(&mut self, other: &Sketch) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The mean reading, if there was one.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The greatest magnitude of one reading.
    fn largest(&self) -> f64 {
        self.min.abs().max(self.max.abs())
    }

    fn validate(&self) -> Result<(), String> {
        let values = [self.sum, self.min, self.max];
        if values.iter().any(|v| !v.is_finite()) {
            return Err("has a value that is not a finite number".into());
        }
        if self.count == 0 {
            return match values == [0.0; 3] {
                true => Ok(()),
                false => Err("has no readings but a sum, least or greatest".into()),
            };
        }
        if self.min > self.max {
            return Err(format!(
                "has a least {} above its greatest {}",
                self.min, self.max
            ));
        }
        if self.largest() > MAX_VALUE || self.sum.abs() > MAX_VALUE * self.count as f64 {
            return Err(format!("has a value beyond ±{MAX_VALUE}"));
        }
        Ok(())
    }
}

/// What one device reports of one module over a period: counts and sketches only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealthSummary {
    pub module: String,
    /// Calls into the module (init, ticks, messages).
    pub calls: u64,
    /// Workers that stopped on a trap, fuel exhaustion or the watchdog.
    pub traps: u64,
    pub restarts: u64,
    /// Telemetry records the module published that reached the spool, and those lost.
    pub records_sent: u64,
    pub records_dropped: u64,
    /// Fuel all the calls used.
    pub fuel_used: u64,
    /// The most memory (resident) a worker of the module held.
    pub peak_memory_bytes: u64,
    /// Numeric fields of the module's own telemetry, by name (`[A-Za-z0-9_-]`, no dot:
    /// a gate names one as `module.metric`); at most [`MAX_METRICS`] in a report.
    pub metrics: BTreeMap<String, Sketch>,
}

impl HealthSummary {
    /// Nothing yet of `module`.
    pub fn new(module: &str) -> Self {
        HealthSummary {
            module: module.into(),
            ..HealthSummary::default()
        }
    }

    /// Refuses what a device must not send: a bad module or metric name, more than
    /// [`MAX_METRICS`] metrics, a sketch that is not one (so a report stays within
    /// [`MAX_SUMMARY`] bytes and every value is finite).
    pub fn validate(&self) -> Result<(), String> {
        let module = &self.module;
        names::check(Kind::Module, module)?;
        if self.metrics.len() > MAX_METRICS {
            return Err(format!(
                "the health summary of {module} has {} metrics (at most {MAX_METRICS})",
                self.metrics.len()
            ));
        }
        for (name, sketch) in &self.metrics {
            check_metric(name)?;
            sketch
                .validate()
                .map_err(|e| format!("metric {module}.{name} {e}"))?;
        }
        Ok(())
    }

    /// Adds `other`'s counts and readings to these (a later period, or another
    /// device): counts add, the peak is the greater, sketches of a name merge. The
    /// module stays this one's. A merge of many devices' summaries may name more
    /// metrics than one report may.
    pub fn merge(&mut self, other: &HealthSummary) {
        self.calls = self.calls.saturating_add(other.calls);
        self.traps = self.traps.saturating_add(other.traps);
        self.restarts = self.restarts.saturating_add(other.restarts);
        self.records_sent = self.records_sent.saturating_add(other.records_sent);
        self.records_dropped = self.records_dropped.saturating_add(other.records_dropped);
        self.fuel_used = self.fuel_used.saturating_add(other.fuel_used);
        self.peak_memory_bytes = self.peak_memory_bytes.max(other.peak_memory_bytes);
        for (name, sketch) in &other.metrics {
            self.metrics.entry(name.clone()).or_default().merge(sketch);
        }
    }
}

/// `[A-Za-z0-9_-]{1,32}`: a metric name; no dot, so `module.metric` splits at the last.
pub fn check_metric(name: &str) -> Result<(), String> {
    let shown = name.escape_debug();
    if name.is_empty() || name.len() > MAX_METRIC_NAME {
        return Err(format!(
            "metric name `{shown}` is {} bytes long (1 to {MAX_METRIC_NAME})",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        Some(c) => Err(format!(
            "metric name `{shown}` contains `{}`; use only letters, digits, `_` and `-`",
            c.escape_debug()
        )),
        None => Ok(()),
    }
}

/// What a gate watches. All but `offline` and metrics are of the module the rollout
/// updates ([`Cohort::module`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// `traps`: traps per call (a trap ends a call, so calls count at least the traps).
    Traps,
    /// `restarts`: restarts per call (likewise at least the restarts).
    Restarts,
    /// `dropped`: the share of the module's records lost (dropped / (sent + dropped)).
    Dropped,
    /// `fuel`: fuel per call.
    Fuel,
    /// `memory`: the mean of the devices' peak memory, in bytes.
    Memory,
    /// `offline`: the share of the cohort's devices that sent nothing.
    Offline,
    /// `module.metric`: the mean of a metric of a module's own telemetry.
    Metric { module: String, name: String },
}

impl Signal {
    /// Counts events (traps, restarts, dropped records, offline devices): a bound is a
    /// count (`<= 10`) or a share (`<= 1%`). Otherwise it is a value.
    pub fn counts(&self) -> bool {
        matches!(
            self,
            Signal::Traps | Signal::Restarts | Signal::Dropped | Signal::Offline
        )
    }

    fn parse(word: &str) -> Result<Self, String> {
        Ok(match word {
            "traps" => Signal::Traps,
            "restarts" => Signal::Restarts,
            "dropped" => Signal::Dropped,
            "fuel" => Signal::Fuel,
            "memory" => Signal::Memory,
            "offline" => Signal::Offline,
            _ => {
                let Some((module, name)) = word.rsplit_once('.') else {
                    return Err(format!(
                        "unknown signal `{}`: use traps, restarts, dropped, fuel, memory, \
                         offline or MODULE.METRIC",
                        word.escape_debug()
                    ));
                };
                names::check(Kind::Module, module)?;
                check_metric(name)?;
                Signal::Metric {
                    module: module.into(),
                    name: name.into(),
                }
            }
        })
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Traps => "traps",
            Signal::Restarts => "restarts",
            Signal::Dropped => "dropped",
            Signal::Fuel => "fuel",
            Signal::Memory => "memory",
            Signal::Offline => "offline",
            Signal::Metric { module, name } => return write!(f, "{module}.{name}"),
        })
    }
}

/// What a relative bound compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reference {
    /// The devices not updated yet.
    Control,
    /// The wave's own devices before the update.
    Baseline,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reference::Control => "control",
            Reference::Baseline => "baseline",
        })
    }
}

/// The most a signal may be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Bound {
    /// `10`: a count of a counting signal (traps, dropped records, offline devices in
    /// the wave), else the value itself (fuel per call, bytes, a metric's mean).
    At(f64),
    /// `20%`: a share, of a counting signal only (traps per call, records lost,
    /// devices offline).
    Percent(f64),
    /// `1.5x control`: that many times the reference's value (see [`judge`] for a
    /// reference of zero).
    Times(f64, Reference),
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::At(n) => write!(f, "{n}"),
            Bound::Percent(p) => write!(f, "{p}%"),
            Bound::Times(x, r) => write!(f, "{x}x {r}"),
        }
    }
}

/// One gate: `SIGNAL <= BOUND [min N]`, e.g. `traps <= 2x control min 5`,
/// `offline <= 20%`, `dropped <= 10`, `temperature.error_rate <= 1.2x baseline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub signal: Signal,
    pub bound: Bound,
    /// Devices with data for the signal (in the wave, and in the reference of a
    /// relative bound) below which the gate waits rather than judge noise.
    pub min: u32,
}

/// The sample a gate wants when the text names none.
pub const DEFAULT_MIN: u32 = 1;

impl Gate {
    /// `traps <= 2x control min 5`; the error names the text and what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_inner(text).map_err(|e| format!("gate `{}`: {e}", text.escape_debug()))
    }

    fn parse_inner(text: &str) -> Result<Self, String> {
        let spaced = text.replace("<=", " <= ");
        let tokens: Vec<&str> = spaced.split_whitespace().collect();
        let [signal, "<=", rest @ ..] = tokens.as_slice() else {
            return Err("expected `SIGNAL <= BOUND [min N]`, e.g. `traps <= 2x control`".into());
        };
        let signal = Signal::parse(signal)?;
        let (bound, min) = match rest {
            [bound @ .., "min", n] => (bound, parse_min(n)?),
            _ => (rest, DEFAULT_MIN),
        };
        let bound = match bound {
            [n] => parse_absolute(&signal, n)?,
            [x, r] => parse_relative(x, r)?,
            [] => return Err("no bound after `<=`".into()),
            _ => return Err(format!("unexpected `{}`", bound[2..].join(" "))),
        };
        Ok(Gate { signal, bound, min })
    }
}

fn parse_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(n),
        _ => Err(format!("`{}` is not a number", text.escape_debug())),
    }
}

fn parse_min(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "the minimum sample `{}` is not a count of devices from 1",
            text.escape_debug()
        )),
    }
}

fn parse_absolute(signal: &Signal, text: &str) -> Result<Bound, String> {
    if let Some(p) = text.strip_suffix('%') {
        let p = parse_number(p)?;
        return match (signal.counts(), (0.0..=100.0).contains(&p)) {
            (false, _) => Err(format!("{signal} is not a share; bound it by a value")),
            (true, false) => Err(format!("a share of {p}% is not within 0% to 100%")),
            (true, true) => Ok(Bound::Percent(p)),
        };
    }
    let n = parse_number(text)?;
    let whole = n >= 0.0 && n.fract() == 0.0;
    match signal {
        Signal::Metric { .. } => Ok(Bound::At(n)),
        s if s.counts() && !whole => Err(format!(
            "{s} is a count: a whole number (or a share such as `1%`)"
        )),
        s if n < 0.0 => Err(format!("{s} is never below 0")),
        _ => Ok(Bound::At(n)),
    }
}

fn parse_relative(factor: &str, reference: &str) -> Result<Bound, String> {
    let reference = match reference {
        "control" => Reference::Control,
        "baseline" => Reference::Baseline,
        r => {
            return Err(format!(
                "`{}` is not a reference: use control or baseline",
                r.escape_debug()
            ))
        }
    };
    let Some(x) = factor.strip_suffix('x') else {
        return Err(format!(
            "`{}` is not a factor such as `1.5x`",
            factor.escape_debug()
        ));
    };
    match parse_number(x)? {
        x if x > 0.0 => Ok(Bound::Times(x, reference)),
        x => Err(format!("a factor of {x}x is not above 0")),
    }
}

impl FromStr for Gate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Gate::parse(text)
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} <= {}", self.signal, self.bound)?;
        if self.min != DEFAULT_MIN {
            write!(f, " min {}", self.min)?;
        }
        Ok(())
    }
}

/// A group of devices judged together (the wave, the control, the baseline): each
/// reporting device's summaries by module, and the devices that sent nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cohort {
    /// The module the rollout updates: the signal of every gate but `offline` and
    /// metrics is its.
    pub module: String,
    devices: BTreeMap<String, BTreeMap<String, HealthSummary>>,
    offline: BTreeSet<String>,
}

impl Cohort {
    /// No device yet; `module` is the one the rollout updates.
    pub fn new(module: &str) -> Self {
        Cohort {
            module: module.into(),
            ..Cohort::default()
        }
    }

    /// Adds a device's summary of one module (merged with what it sent before). A
    /// device that reports is not offline.
    pub fn report(&mut self, device: &str, summary: &HealthSummary) -> Result<(), String> {
        names::check(Kind::Device, device)?;
        summary.validate().map_err(|e| format!("{device}: {e}"))?;
        self.room_for(device)?;
        let modules = self.devices.entry(device.into()).or_default();
        if !modules.contains_key(&summary.module) && modules.len() >= MAX_MODULES {
            return Err(format!("{device} reported more than {MAX_MODULES} modules"));
        }
        modules
            .entry(summary.module.clone())
            .or_insert_with(|| HealthSummary::new(&summary.module))
            .merge(summary);
        self.offline.remove(device);
        Ok(())
    }

    /// Counts a device that sent nothing over the period (ignored if it reported).
    pub fn offline(&mut self, device: &str) -> Result<(), String> {
        names::check(Kind::Device, device)?;
        if !self.devices.contains_key(device) {
            self.room_for(device)?;
            self.offline.insert(device.into());
        }
        Ok(())
    }

    fn room_for(&self, device: &str) -> Result<(), String> {
        let known = self.devices.contains_key(device) || self.offline.contains(device);
        match known || self.devices.len() + self.offline.len() < MAX_COHORT {
            true => Ok(()),
            false => Err(format!("a cohort holds at most {MAX_COHORT} devices")),
        }
    }

    /// Devices that sent a summary.
    pub fn reporting(&self) -> usize {
        self.devices.len()
    }

    /// Devices that sent nothing.
    pub fn offline_devices(&self) -> &BTreeSet<String> {
        &self.offline
    }

    /// A device's summary of `module`, if it sent one.
    pub fn summary(&self, device: &str, module: &str) -> Option<&HealthSummary> {
        self.devices.get(device)?.get(module)
    }

    /// Every reporting device's summary of `module`, merged.
    pub fn total(&self, module: &str) -> HealthSummary {
        let mut total = HealthSummary::new(module);
        for s in self.devices.values().filter_map(|m| m.get(module)) {
            total.merge(s);
        }
        total
    }

    /// What one device adds to `signal`, if it has data for it.
    fn part(&self, signal: &Signal, device: &str) -> Option<Part> {
        if *signal == Signal::Offline {
            let num = if self.offline.contains(device) {
                1.0
            } else {
                0.0
            };
            return Some(Part::new(num, 1.0, 1.0));
        }
        let module = match signal {
            Signal::Metric { module, .. } => module,
            _ => &self.module,
        };
        let s = self.summary(device, module)?;
        let per_call = |n: u64| Part::new(n as f64, s.calls.max(n) as f64, 1.0);
        let part = match signal {
            Signal::Traps => per_call(s.traps),
            Signal::Restarts => per_call(s.restarts),
            Signal::Dropped => Part::new(
                s.records_dropped as f64,
                s.records_sent.saturating_add(s.records_dropped) as f64,
                1.0,
            ),
            Signal::Fuel => Part::new(s.fuel_used as f64, s.calls as f64, 1.0),
            Signal::Memory => Part::new(
                s.peak_memory_bytes as f64,
                if s.peak_memory_bytes > 0 { 1.0 } else { 0.0 },
                1.0,
            ),
            Signal::Metric { name, .. } => {
                let m = s.metrics.get(name)?;
                Part::new(m.sum, m.count as f64, m.largest())
            }
            Signal::Offline => return None,
        };
        (part.den > 0.0).then_some(part)
    }

    /// Each device with data for `signal` and what it adds, and their sum.
    fn measure(&self, signal: &Signal) -> (Vec<(&str, Part)>, Measure) {
        let names = self.devices.keys().chain(&self.offline);
        let parts: Vec<(&str, Part)> = names
            .filter_map(|d| Some((d.as_str(), self.part(signal, d)?)))
            .collect();
        let mut m = Measure::default();
        for (_, p) in &parts {
            m.num += p.num;
            m.den += p.den;
            m.unit = m.unit.max(p.unit);
            m.sample += 1;
        }
        (parts, m)
    }
}

/// What one device adds to a signal: `num / den` is its value.
#[derive(Debug, Clone, Copy)]
struct Part {
    num: f64,
    den: f64,
    /// What one event adds to `num`: 1 (a trap, a record, a device, a unit of fuel or
    /// a byte), or a metric's reading of greatest magnitude.
    unit: f64,
}

impl Part {
    fn new(num: f64, den: f64, unit: f64) -> Self {
        Part { num, den, unit }
    }

    fn value(&self) -> f64 {
        self.num / self.den
    }
}

/// A signal over a cohort.
#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    num: f64,
    den: f64,
    unit: f64,
    /// Devices with data.
    sample: u32,
}

impl Measure {
    fn value(&self) -> f64 {
        self.scaled(1.0)
    }

    /// `scale * num / den`, 0 with no data.
    fn scaled(&self, scale: f64) -> f64 {
        if self.den > 0.0 {
            scale * self.num / self.den
        } else {
            0.0
        }
    }
}

/// Devices a [`Breach`]'s line shows.
const SHOWN: usize = 5;

/// A gate the wave did not pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    pub gate: Gate,
    /// The wave's signal in the bound's terms: a count (`<= 10`), a percentage
    /// (`<= 20%`) or the signal's value (a rate, a mean, bytes).
    pub observed: f64,
    /// The control's or baseline's value of a relative gate.
    pub reference: Option<f64>,
    /// The most `observed` could have been.
    pub limit: f64,
    /// Devices of the wave the signal was measured on.
    pub sample: u32,
    /// The devices that drove it, worst first: those over the limit on their own (or,
    /// when none is, those with the highest values); at most [`MAX_BLAMED`].
    pub devices: Vec<String>,
    /// More such devices, not named.
    pub more: u32,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} in the wave", self.gate, shown(self.observed))?;
        if let (Some(r), Bound::Times(_, which)) = (self.reference, self.gate.bound) {
            write!(f, " against {} in the {which}", shown(r))?;
        }
        write!(
            f,
            " (limit {}) over {} devices",
            shown(self.limit),
            self.sample
        )?;
        if self.devices.is_empty() {
            return Ok(());
        }
        let shown = self.devices.len().min(SHOWN);
        write!(f, "; worst {}", self.devices[..shown].join(", "))?;
        match self.devices.len() - shown + self.more as usize {
            0 => Ok(()),
            rest => write!(f, " and {rest} more"),
        }
    }
}

/// `value` to four significant digits (whole numbers from 10,000 up), without
/// trailing zeros: `0.005155`, `128.9`, `100`, `1048576`. An operator reads a breach
/// line, and a rate's seventeenth digit says nothing.
pub fn shown(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 15) as usize;
    let text = format!("{value:.decimals$}");
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text,
    }
}

/// What the gates say of a wave.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every gate has its sample and its signal is within its bound.
    Pass,
    /// No gate breached, but one has fewer devices than its minimum sample.
    Wait,
    /// These gates (in the order given) breached over at least their minimum sample.
    Breach(Vec<Breach>),
}

/// Judges a wave: a gate breaches when its signal, over at least its minimum sample
/// (of the wave, and of the reference of a relative bound), is above its bound; it
/// waits when the sample is smaller. Any breach makes a [`Verdict::Breach`]; else any
/// wait a [`Verdict::Wait`]; else [`Verdict::Pass`] (also for no gate).
///
/// A relative bound `Fx control` (or `Fx baseline`) compares the wave's value with
/// the reference's value `r`, taken as at least one event's worth of the wave, `u / d`:
///
/// - `d` is the wave's denominator (its calls, records, devices or readings), `u` one
///   event (a trap, a restart, a record, a device, a unit of fuel, a byte; for a
///   metric, the wave's reading of greatest magnitude);
/// - for `r >= 0` the limit is `F * max(r, u / d)`: a reference of zero allows `F`
///   events' worth in the wave, so with `2x` one or two traps in a wave whose control
///   had none pass and three breach, and nothing divides by zero;
/// - for `r < 0` (a metric's mean) the limit is `r + (F - 1) * max(|r|, u / d)`:
///   `1.2x` allows 20% of the reference's magnitude above it.
///
/// A device counts in a signal's sample when it has a denominator for it (calls or
/// traps, records, a peak, readings of the metric; any device for `offline`). Values
/// compare with a relative tolerance of 1e-12, so rounding never makes a tie a breach.
pub fn judge(gates: &[Gate], wave: &Cohort, control: &Cohort, baseline: &Cohort) -> Verdict {
    let mut breaches = Vec::new();
    let mut wait = false;
    for gate in gates {
        match check(gate, wave, control, baseline) {
            Check::Pass => {}
            Check::Wait => wait = true,
            Check::Breach(b) => breaches.push(*b),
        }
    }
    match (breaches.is_empty(), wait) {
        (false, _) => Verdict::Breach(breaches),
        (true, true) => Verdict::Wait,
        (true, false) => Verdict::Pass,
    }
}

enum Check {
    Pass,
    Wait,
    Breach(Box<Breach>),
}

/// One gate over the wave.
fn check(gate: &Gate, wave: &Cohort, control: &Cohort, baseline: &Cohort) -> Check {
    let (parts, w) = wave.measure(&gate.signal);
    let Weighed {
        observed,
        limit,
        reference,
        sample,
    } = weigh(gate, &w, control, baseline);
    // One device's value in the bound's terms.
    let own: fn(&Part) -> f64 = match gate.bound {
        Bound::At(_) if gate.signal.counts() => |p| p.num,
        Bound::Percent(_) => |p| 100.0 * p.num / p.den,
        Bound::At(_) | Bound::Times(..) => Part::value,
    };
    if sample < gate.min {
        return Check::Wait;
    }
    if !exceeds(observed, limit) {
        return Check::Pass;
    }
    let (devices, more) = blame(&parts, limit, own);
    Check::Breach(Box::new(Breach {
        gate: gate.clone(),
        observed,
        reference,
        limit,
        sample: w.sample,
        devices,
        more,
    }))
}

/// A gate's signal over a cohort measuring `m`, in the bound's terms: a count
/// (`<= 10` of a counting signal), a percentage (`<= 20%`) or the signal's value.
fn in_terms(gate: &Gate, m: &Measure) -> f64 {
    match gate.bound {
        Bound::At(_) if gate.signal.counts() => m.num,
        Bound::Percent(_) => m.scaled(100.0),
        Bound::At(_) | Bound::Times(..) => m.value(),
    }
}

/// What a gate weighs of a wave measuring `w`.
struct Weighed {
    /// The wave's value in the bound's terms.
    observed: f64,
    limit: f64,
    /// The reference's value, for a relative bound.
    reference: Option<f64>,
    /// Devices with data: of the wave, and of the reference of a relative bound.
    sample: u32,
}

fn weigh(gate: &Gate, w: &Measure, control: &Cohort, baseline: &Cohort) -> Weighed {
    let observed = in_terms(gate, w);
    match gate.bound {
        Bound::At(n) | Bound::Percent(n) => Weighed {
            observed,
            limit: n,
            reference: None,
            sample: w.sample,
        },
        Bound::Times(x, which) => {
            let cohort = match which {
                Reference::Control => control,
                Reference::Baseline => baseline,
            };
            let (_, r) = cohort.measure(&gate.signal);
            Weighed {
                observed,
                limit: relative_limit(x, r.value(), w.unit / w.den),
                reference: Some(r.value()),
                sample: w.sample.min(r.sample),
            }
        }
    }
}

/// A gate's signal over one cohort: its value in the bound's terms (see
/// [`Reading`]), and the devices with data for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub value: f64,
    pub sample: u32,
}

/// What one gate reads of a wave, as [`judge`] weighs it: for showing a gate beside
/// its verdict. Values are in the bound's terms: a count of a counting signal for an
/// absolute bound (`traps <= 10`), a percentage for a share (`offline <= 20%`), else
/// the signal's value (traps per call, a metric's mean, bytes; so a relative bound
/// compares the wave's rate with the reference's).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub wave: Level,
    pub control: Level,
    pub baseline: Level,
    /// The most the wave's value may be: the bound, or its factor times the
    /// reference's value (at least one event's worth, see [`judge`]).
    pub limit: f64,
    /// The devices the gate's minimum sample is compared with: the wave's, or the
    /// fewer of the wave's and the reference's for a relative bound.
    pub sample: u32,
    /// This gate alone: [`Verdict::Pass`], [`Verdict::Wait`] or its one breach.
    pub verdict: Verdict,
}

/// What `gate` reads of `wave` against `control` and `baseline` (the cohorts
/// [`judge`] takes), with the gate's own verdict.
pub fn read(gate: &Gate, wave: &Cohort, control: &Cohort, baseline: &Cohort) -> Reading {
    let level = |cohort: &Cohort| {
        let (_, m) = cohort.measure(&gate.signal);
        Level {
            value: in_terms(gate, &m),
            sample: m.sample,
        }
    };
    let (_, w) = wave.measure(&gate.signal);
    let weighed = weigh(gate, &w, control, baseline);
    let verdict = match check(gate, wave, control, baseline) {
        Check::Pass => Verdict::Pass,
        Check::Wait => Verdict::Wait,
        Check::Breach(b) => Verdict::Breach(vec![*b]),
    };
    Reading {
        wave: level(wave),
        control: level(control),
        baseline: level(baseline),
        limit: weighed.limit,
        sample: weighed.sample,
        verdict,
    }
}

/// `x` times `reference`, which counts as at least `floor` (one event's worth) in
/// magnitude: see [`judge`].
fn relative_limit(x: f64, reference: f64, floor: f64) -> f64 {
    if reference >= 0.0 {
        x * reference.max(floor)
    } else {
        reference + (x - 1.0) * reference.abs().max(floor)
    }
}

/// Above `limit`, past rounding.
fn exceeds(value: f64, limit: f64) -> bool {
    value > limit + limit.abs() * 1e-12
}

/// The devices over `limit` on their own, worst first, or the highest when none is;
/// at most [`MAX_BLAMED`] and how many more.
fn blame(parts: &[(&str, Part)], limit: f64, own: fn(&Part) -> f64) -> (Vec<String>, u32) {
    let mut ranked: Vec<(f64, &str)> = parts.iter().map(|(d, p)| (own(p), *d)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let over = ranked.iter().filter(|(v, _)| exceeds(*v, limit)).count();
    let drove = match over {
        0 => ranked.iter().filter(|(v, _)| *v > 0.0).count().max(1),
        n => n,
    }
    .min(ranked.len());
    let named = drove.min(MAX_BLAMED);
    let devices = ranked[..named].iter().map(|(_, d)| d.to_string()).collect();
    (devices, (drove - named) as u32)
}

#[cfg(test)]
pub(crate) mod tests;
