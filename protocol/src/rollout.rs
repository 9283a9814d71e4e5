//! A rollout: one release taken to a group's devices in waves, under a policy that
//! halts it when too many fail. The record of it (plan, per-device outcome, phase) is
//! kept on the broker as signed retained state, `{prefix}/groups/{group}/rollout`, so
//! any operator's `kiln rollout status|pause|resume|retry|abort` sees and drives the
//! same rollout, and a rollout outlives the machine that started it.
//!
//! [`Rollout::step`] is the whole decision: a pure function of the record and one
//! input (a device committed or failed, its health, the clock, an operator's word)
//! that returns the actions to carry out. The fleet tool only performs them.
//!
//! A policy may gate each wave on its devices' health ([`gate`]): once every device
//! of a wave has answered, the wave soaks for [`Policy::soak_ms`], then [`gate::judge`]
//! compares the wave's committed devices (their [`Input::Health`] since they
//! committed) with the control (the rollout's devices not sent the release yet) and
//! the baseline (the wave's devices' own health from before they were sent it):
//!
//! - `Pass`: the next wave starts (when the schedule allows), or the rollout completes;
//! - `Breach`: the rollout halts, as a failure halt does (with `revert`, the wave's
//!   committed devices get back what they had); the history names each breached gate,
//!   the wave's value against the reference, and the worst devices;
//! - `Wait` (a gate short of its minimum sample): the wave waits one more soak time;
//!   still short then, it goes on unjudged and the history says which gates lacked
//!   their sample. A gate never halts a rollout without a breach over its sample.
//!
//! In the last wave no device is left for the control: `x control` gates compare
//! with the wave's baseline instead (and the history says so).
//!
//! The schedule ([`Policy::wave_interval_ms`], [`Policy::window`]) holds a wave that
//! may not start yet ([`Hold::Schedule`]); [`Policy::sample_percent`] draws each wave
//! at random, from a seed kept in the record, when it starts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fleet::DesiredModule;

use gate::HealthSummary;

/// A rollout record's signed head, and each of its parts (its members, by device:
/// see [`crate::parts`]). A member is some 60 bytes; gates add each device's health
/// twice (before and after its update), only the modules and metrics the gates name:
/// some 200 bytes more for gates on the rollout's module and one metric. So a gated
/// rollout of 100,000 devices is some 100 KiB a part. A record from before parts
/// (v1 to v3) was all in one message of at most this.
pub const MAX_ROLLOUT: usize = 1024 * 1024;
/// Lines of history a record keeps (the newest).
pub const MAX_HISTORY: usize = 64;
/// Gates one policy may have.
pub const MAX_GATES: usize = 16;

pub mod cohort;
pub mod gate;
mod health;
mod record;
mod schedule;
mod v1;
mod v2;

#[cfg(feature = "fuzzing")]
pub use record::sign_head;
pub use record::SignedRollout;
#[cfg(test)]
use record::{CONTEXT_V1, CONTEXT_V2};

pub use schedule::{in_window, next_open, DAY_MINUTES};

/// How many failures are allowed: a count, or a share of the devices counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Threshold {
    Count(u32),
    Percent(u8),
}

impl Threshold {
    /// Failures allowed among `n` devices (a share rounds down).
    pub fn allowed(self, n: usize) -> usize {
        match self {
            Threshold::Count(c) => c as usize,
            Threshold::Percent(p) => n * usize::from(p) / 100,
        }
    }

    /// `3` (devices) or `10%`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}`: a failure threshold is a count (`2`) or a share (`10%`)");
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Threshold::Percent(p)),
                _ => Err(bad()),
            },
            None => text.trim().parse().map(Threshold::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Count(c) => write!(f, "{c}"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Failures allowed in one wave, of its devices.
    pub wave_failures: Threshold,
    /// Failures allowed in the whole rollout, of all its devices.
    pub total_failures: Threshold,
    /// A device sent the release that has neither committed nor failed this long after
    /// its wave started counts as failed.
    pub wave_timeout_ms: u64,
    /// A halt (or an abort) gives every device of the wave in flight back what it had
    /// before, committed or not; without it, only those that did not commit.
    pub revert: bool,
    /// Health gates (`traps <= 2x control min 5`, see [`gate::Gate`]), at most
    /// [`MAX_GATES`]; each wave is judged on them after its soak. None: no soak.
    pub gates: Vec<String>,
    /// How long after its last device answered a wave is judged by the gates (above 0
    /// when there are gates); a wave short of a gate's sample then waits once more as
    /// long.
    pub soak_ms: u64,
    /// Each wave is this share (1 to 100) of the rollout's devices (rounded up), drawn
    /// at random from those not yet sent the release, with the record's seed; the
    /// planned waves are not used. None: the planned waves, in their order.
    pub sample_percent: Option<u8>,
    /// The least time between the starts of two waves.
    pub wave_interval_ms: Option<u64>,
    /// Minutes of the UTC day (0 to 1439) from which, and until which (not included),
    /// a wave may start; a window whose start is after its end spans midnight
    /// (`(1380, 120)`: 23:00 to 02:00).
    pub window: Option<(u16, u16)>,
    /// The cohort: the `--where` conditions (`tag=canary`, `kilnd>=0.9.0`, see
    /// [`cohort`]) every device of the rollout met when it started, normalized; at
    /// most [`cohort::MAX_CONDITIONS`]. Members that did not are not in the rollout
    /// (neither updated nor in the control). None: the whole group.
    pub cohort: Vec<String>,
}

impl Policy {
    /// A policy with no gate, no sample and no schedule.
    pub fn new(
        wave_failures: Threshold,
        total_failures: Threshold,
        wave_timeout_ms: u64,
        revert: bool,
    ) -> Self {
        Policy {
            wave_failures,
            total_failures,
            wave_timeout_ms,
            revert,
            gates: Vec::new(),
            soak_ms: 0,
            sample_percent: None,
            wave_interval_ms: None,
            window: None,
            cohort: Vec::new(),
        }
    }

    /// The gates, parsed; an error names the gate and what is wrong with it.
    pub fn parsed_gates(&self) -> Result<Vec<gate::Gate>, String> {
        if self.gates.len() > MAX_GATES {
            return Err(format!(
                "the policy has {} gates (at most {MAX_GATES})",
                self.gates.len()
            ));
        }
        self.gates.iter().map(|g| gate::Gate::parse(g)).collect()
    }

    /// Refuses a policy the step cannot follow: a gate that does not parse, gates
    /// without a soak time, a sample outside 1% to 100%, a window that is empty or
    /// names a minute past the day's last.
    pub fn check(&self) -> Result<(), String> {
        let gates = self.parsed_gates()?;
        if !gates.is_empty() && self.soak_ms == 0 {
            return Err("the policy has gates but no soak time: give one above 0".into());
        }
        if let Some(p) = self.sample_percent {
            if !(1..=100).contains(&p) {
                return Err(format!("a wave sample of {p}% is not within 1% to 100%"));
            }
        }
        if let Some(w) = self.window {
            schedule::check_window(w)?;
        }
        cohort::parse_all(&self.cohort)?;
        Ok(())
    }
}

/// Splits `devices` into waves: one of each of `sizes` (1, 10, 100 ...), then waves of
/// `rest` (all the remaining devices in one wave without it). Empty waves are left out.
pub fn plan_waves(devices: &[String], sizes: &[usize], rest: Option<usize>) -> Vec<Vec<String>> {
    let mut waves = Vec::new();
    let mut left = devices;
    for &size in sizes {
        if left.is_empty() {
            break;
        }
        let (wave, after) = left.split_at(size.clamp(1, left.len()));
        waves.push(wave.to_vec());
        left = after;
    }
    if !left.is_empty() {
        let size = rest.unwrap_or(left.len()).max(1);
        waves.extend(left.chunks(size).map(<[String]>::to_vec));
    }
    waves
}

/// What became of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Its wave has not come (or the rollout stopped before it): never sent.
    Waiting,
    /// Given the release; neither committed nor failed yet.
    Sent {
        at_ms: u64,
    },
    Committed {
        at_ms: u64,
    },
    Failed {
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its wave, from 0.
    pub wave: u32,
    pub outcome: Outcome,
    /// The entry for the module its own desired state had before the rollout: what
    /// it gets back when returned (none: it follows the group's again).
    pub before: Option<DesiredModule>,
    /// Given back what it had before, after a halt or an abort.
    pub returned: bool,
    /// Its health from before it was sent the release, by module (the baseline).
    pub baseline: BTreeMap<String, HealthSummary>,
    /// Its health since the rollout started (while waiting) or since it committed, by
    /// module: only the modules and metrics the gates name, and an empty summary of
    /// the rollout's module once it reported anything.
    pub health: BTreeMap<String, HealthSummary>,
    /// The `seq` of the last health period counted: the same retained message read
    /// again (a resubscription, or a driver that takes the rollout up) counts once.
    pub health_seq: Option<u64>,
}

/// A wave held back from going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    /// Every device of `wave` had answered at `since_ms`: the gates judge it at the
    /// end of the soak.
    Soak { wave: u32, since_ms: u64 },
    /// `wave` starts when the schedule allows (its window, the interval since the
    /// last wave started).
    Schedule { wave: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Running {
        wave: u32,
        since_ms: u64,
    },
    Paused {
        wave: u32,
        by: String,
    },
    Halted {
        wave: u32,
        why: String,
    },
    Aborted {
        wave: u32,
        by: String,
    },
    /// Every wave went through within the policy; the release is the group's (with
    /// a cohort: the cohort's devices' own).
    Complete,
}

impl Phase {
    /// Running or paused: a second rollout on the group would conflict with it.
    pub fn is_active(&self) -> bool {
        matches!(self, Phase::Running { .. } | Phase::Paused { .. })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Running { wave, .. } => write!(f, "running wave {}", wave + 1),
            Phase::Paused { wave, by } => write!(f, "paused in wave {} by {by}", wave + 1),
            Phase::Halted { wave, why } => write!(f, "halted in wave {}: {why}", wave + 1),
            Phase::Aborted { wave, by } => write!(f, "aborted in wave {} by {by}", wave + 1),
            Phase::Complete => f.write_str("complete"),
        }
    }
}

/// The record of a rollout, as kept on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub fleet: String,
    pub group: String,
    /// `{group}-{started_ms}`: names this rollout apart from the group's earlier ones.
    pub id: String,
    /// Each write adds one; a record with a lower serial than one seen is old.
    pub serial: u64,
    pub started_by: String,
    /// Who drives it now: the starter, or whoever resumed it last.
    pub driver: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// The release: the module entry every device gets.
    pub module: DesiredModule,
    pub policy: Policy,
    pub waves: Vec<Vec<String>>,
    pub devices: BTreeMap<String, Device>,
    /// Members of the group left out, and why (a target the release lacks).
    pub skipped: Vec<(String, String)>,
    /// Devices that reported running the release without being sent it: not counted.
    pub unexpected: BTreeSet<String>,
    pub phase: Phase,
    /// What happened, newest last (at most [`MAX_HISTORY`] lines).
    pub history: Vec<(u64, String)>,
    /// Draws the waves of a sampling policy: the same seed, the same waves.
    pub seed: u64,
    /// When each wave started, in order (a retry starts none).
    pub wave_starts: Vec<u64>,
    /// A soak or the schedule holding the rollout.
    pub hold: Option<Hold>,
}

/// What happens to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The first wave goes out.
    Start,
    /// A device's signed reported state runs the release.
    Committed {
        device: String,
    },
    /// A device rolled the release back or refused it.
    Failed {
        device: String,
        why: String,
    },
    /// A device's signed health summaries (one per module, each over the period
    /// since its previous one): kept for the gates while it waits (the control, then
    /// its baseline) or after it committed; invalid ones, and those of modules no gate
    /// watches, are left out.
    Health {
        device: String,
        /// The period's `seq` (see [`Device::health_seq`]).
        seq: u64,
        summaries: Vec<HealthSummary>,
    },
    /// The clock: a wave past its timeout fails its silent devices; a soak ends; the
    /// schedule lets a wave start.
    Tick,
    Pause {
        by: String,
    },
    /// A paused rollout goes on, or one whose driver died is taken up again.
    Resume,
    /// A halted or complete rollout sends the release again to the devices that
    /// failed, and to those a halt cut off before they answered.
    Retry,
    Abort {
        by: String,
    },
}

/// What the fleet tool must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put the release in these devices' own desired states.
    Send(Vec<String>),
    /// Give these devices back what their own desired state had before.
    Return(Vec<String>),
    /// The release goes into the group's desired state; then these devices' own
    /// desired states lose it (they follow the group's again). Never for a rollout
    /// with a cohort ([`Policy::cohort`]): the group's state would take the release
    /// to the members it left out, so its devices keep it in their own.
    Finish(Vec<String>),
}

impl Rollout {
    /// A new rollout, waiting for [`Input::Start`]. With a sampling policy, `waves`
    /// become one pool every wave is drawn from; the seed is derived from the id and
    /// the devices (the fleet tool may set a random one before the start).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fleet: &str,
        group: &str,
        started_by: &str,
        now_ms: u64,
        module: DesiredModule,
        policy: Policy,
        waves: Vec<Vec<String>>,
        before: BTreeMap<String, DesiredModule>,
        skipped: Vec<(String, String)>,
    ) -> Self {
        let waves = match policy.sample_percent {
            Some(_) => vec![waves.concat()],
            None => waves,
        };
        let id = format!("{group}-{now_ms}");
        let seed = schedule::seed(&id, waves.iter().flatten());
        let mut devices = BTreeMap::new();
        for (i, wave) in waves.iter().enumerate() {
            for d in wave {
                devices.insert(
                    d.clone(),
                    Device {
                        wave: i as u32,
                        outcome: Outcome::Waiting,
                        before: before.get(d).cloned(),
                        returned: false,
                        baseline: BTreeMap::new(),
                        health: BTreeMap::new(),
                        health_seq: None,
                    },
                );
            }
        }
        Rollout {
            fleet: fleet.into(),
            group: group.into(),
            id,
            serial: 0,
            started_by: started_by.into(),
            driver: started_by.into(),
            started_ms: now_ms,
            updated_ms: now_ms,
            module,
            policy,
            waves,
            devices,
            skipped,
            unexpected: BTreeSet::new(),
            phase: Phase::Running {
                wave: 0,
                since_ms: now_ms,
            },
            history: Vec::new(),
            seed,
            wave_starts: Vec::new(),
            hold: None,
        }
    }

    /// `sensor_filter v3`.
    pub fn label(&self) -> String {
        format!("{} v{}", self.module.name, self.module.version)
    }

    /// Devices (of all waves) sent the release that have not answered yet, and were
    /// not given back what they had before.
    pub fn pending(&self) -> BTreeSet<&str> {
        self.devices
            .iter()
            .filter(|(_, d)| matches!(d.outcome, Outcome::Sent { .. }) && !d.returned)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Devices by outcome: (waiting, sent, committed, failed).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let mut c = (0, 0, 0, 0);
        for d in self.devices.values() {
            match d.outcome {
                Outcome::Waiting => c.0 += 1,
                Outcome::Sent { .. } => c.1 += 1,
                Outcome::Committed { .. } => c.2 += 1,
                Outcome::Failed { .. } => c.3 += 1,
            }
        }
        c
    }

    /// When the rollout next needs the clock ([`Input::Tick`]), as of its last step:
    /// the end of a soak (or of its extension), the schedule's next start, or the wave
    /// in flight's timeout. None unless it is running.
    pub fn deadline_ms(&self) -> Option<u64> {
        let Phase::Running { since_ms, .. } = self.phase else {
            return None;
        };
        Some(match self.hold {
            Some(Hold::Soak { since_ms, .. }) => {
                let end = since_ms.saturating_add(self.policy.soak_ms);
                match self.updated_ms < end {
                    true => end,
                    false => end.saturating_add(self.policy.soak_ms),
                }
            }
            Some(Hold::Schedule { .. }) => self.next_start_ms(self.updated_ms),
            None => since_ms.saturating_add(self.policy.wave_timeout_ms),
        })
    }

    /// The earliest moment from `now_ms` at which the schedule lets a wave start.
    pub fn next_start_ms(&self, now_ms: u64) -> u64 {
        let after = match (self.wave_starts.last(), self.policy.wave_interval_ms) {
            (Some(last), Some(interval)) => now_ms.max(last.saturating_add(interval)),
            _ => now_ms,
        };
        match self.policy.window {
            Some(window) => next_open(window, after),
            None => after,
        }
    }

    /// Takes one input at `now_ms`; returns what to do. Any input may change the
    /// record: the caller persists it after carrying out the actions.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Vec<Action> {
        self.updated_ms = now_ms;
        let mut out = Vec::new();
        match input {
            Input::Start => {
                if let Phase::Running { wave: 0, .. } = self.phase {
                    if !self.started() && self.counts().0 == self.devices.len() {
                        self.note(now_ms, format!("started by {}", self.started_by));
                        self.start_wave(0, now_ms, &mut out);
                    }
                }
            }
            Input::Health {
                device,
                seq,
                summaries,
            } => self.record_health(&device, seq, &summaries),
            Input::Committed { device } => {
                match self.devices.get_mut(&device).map(|d| &mut d.outcome) {
                    // A device that timed out may commit late: it runs the release.
                    Some(o @ Outcome::Sent { .. }) | Some(o @ Outcome::Failed { .. }) => {
                        *o = Outcome::Committed { at_ms: now_ms };
                    }
                    Some(Outcome::Committed { .. }) => return out,
                    Some(Outcome::Waiting) | None => {
                        if self.unexpected.insert(device.clone()) {
                            self.note(
                                now_ms,
                                format!(
                                    "{device} reported {} without being sent it: not counted",
                                    self.label()
                                ),
                            );
                        }
                        return out;
                    }
                }
                self.evaluate(now_ms, &mut out);
            }
            Input::Failed { device, why } => {
                let Some(d) = self.devices.get_mut(&device) else {
                    return out;
                };
                if !matches!(d.outcome, Outcome::Sent { .. }) {
                    return out;
                }
                d.outcome = Outcome::Failed { why: why.clone() };
                self.note(now_ms, format!("{device} failed: {why}"));
                self.evaluate(now_ms, &mut out);
            }
            Input::Tick => {
                let Phase::Running { since_ms, .. } = self.phase else {
                    return out;
                };
                if now_ms >= since_ms.saturating_add(self.policy.wave_timeout_ms) {
                    self.time_out(now_ms);
                }
                self.evaluate(now_ms, &mut out);
            }
            Input::Pause { by } => {
                if let Phase::Running { wave, .. } = self.phase {
                    self.phase = Phase::Paused {
                        wave,
                        by: by.clone(),
                    };
                    self.note(now_ms, format!("paused by {by}"));
                }
            }
            Input::Resume => match self.phase {
                Phase::Paused { wave, .. } => {
                    self.phase = Phase::Running {
                        wave,
                        since_ms: now_ms,
                    };
                    self.note(now_ms, "resumed".into());
                    self.evaluate(now_ms, &mut out);
                }
                Phase::Running { .. } => self.evaluate(now_ms, &mut out),
                _ => {}
            },
            Input::Retry => {
                let wave = match &self.phase {
                    Phase::Halted { wave, .. } => *wave,
                    Phase::Complete => self.waves.len().saturating_sub(1) as u32,
                    _ => return out,
                };
                let failed: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(_, d)| match d.outcome {
                        Outcome::Failed { .. } => true,
                        Outcome::Sent { .. } => d.returned,
                        _ => false,
                    })
                    .map(|(n, _)| n.clone())
                    .collect();
                if failed.is_empty() {
                    return out;
                }
                for device in &failed {
                    if let Some(d) = self.devices.get_mut(device) {
                        d.outcome = Outcome::Sent { at_ms: now_ms };
                        d.returned = false;
                        d.health.clear();
                    }
                }
                self.hold = None;
                self.phase = Phase::Running {
                    wave,
                    since_ms: now_ms,
                };
                self.note(now_ms, format!("retry: {}", short_list(&failed)));
                out.push(Action::Send(failed));
            }
            Input::Abort { by } => {
                let wave = match self.phase {
                    Phase::Running { wave, .. } | Phase::Paused { wave, .. } => wave,
                    _ => return out,
                };
                self.phase = Phase::Aborted {
                    wave,
                    by: by.clone(),
                };
                self.hold = None;
                self.note(now_ms, format!("aborted by {by}"));
                self.give_back(&mut out);
            }
        }
        out
    }

    /// Whether the first wave went out (or waits for the schedule).
    fn started(&self) -> bool {
        !self.wave_starts.is_empty() || self.hold.is_some()
    }

    /// The devices still pending past the wave's timeout fail.
    fn time_out(&mut self, now_ms: u64) {
        let why = format!(
            "no answer within {}s",
            self.policy.wave_timeout_ms.div_ceil(1000)
        );
        let silent: Vec<String> = self.pending().into_iter().map(String::from).collect();
        for device in &silent {
            if let Some(d) = self.devices.get_mut(device) {
                d.outcome = Outcome::Failed { why: why.clone() };
            }
        }
        if !silent.is_empty() {
            self.note(now_ms, format!("{}: {why}", short_list(&silent)));
        }
    }

    /// While running: halts when a threshold is passed; when no device is pending,
    /// has the gates judge the wave (after its soak), then starts the next wave (when
    /// the schedule allows) or completes after the last.
    fn evaluate(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let Phase::Running { wave, .. } = self.phase else {
            return;
        };
        if !self.started() {
            return;
        }
        if let Some(why) = self.over_threshold(wave) {
            self.halt(now_ms, wave, why, out);
            return;
        }
        if !self.pending().is_empty() {
            return;
        }
        if let Some(Hold::Schedule { wave: next }) = self.hold {
            self.start_wave(next, now_ms, out);
            return;
        }
        if !self.gates_passed(wave, now_ms, out) {
            return;
        }
        let next = wave + 1;
        if (next as usize) < self.waves.len() {
            self.start_wave(next, now_ms, out);
        } else {
            self.phase = Phase::Complete;
            self.hold = None;
            if self.policy.cohort.is_empty() {
                self.note(now_ms, "complete".into());
                out.push(Action::Finish(self.devices.keys().cloned().collect()));
            } else {
                // The group's desired state would take the release to the members the
                // cohort left out: the cohort keeps it in its own.
                self.note(
                    now_ms,
                    "complete: the cohort keeps the release in its own desired states".into(),
                );
            }
        }
    }

    /// Why the failures so far halt the rollout in `wave`, if they do.
    fn over_threshold(&self, wave: u32) -> Option<String> {
        let failed_in = |w: Option<u32>| {
            self.devices
                .values()
                .filter(|d| w.is_none_or(|w| d.wave == w))
                .filter(|d| matches!(d.outcome, Outcome::Failed { .. }))
                .count()
        };
        let in_wave = self.waves.get(wave as usize).map_or(0, Vec::len);
        let (wave_failed, total_failed) = (failed_in(Some(wave)), failed_in(None));
        if wave_failed > self.policy.wave_failures.allowed(in_wave) {
            return Some(format!(
                "{wave_failed} of {in_wave} devices of the wave failed (allowed: {})",
                self.policy.wave_failures
            ));
        }
        let total_allowed = self.policy.total_failures.allowed(self.devices.len());
        (total_failed > total_allowed).then(|| {
            format!(
                "{total_failed} of {} devices failed (allowed: {})",
                self.devices.len(),
                self.policy.total_failures
            )
        })
    }

    /// Stops the rollout in `wave` for `why` and gives back what must not keep the
    /// release.
    fn halt(&mut self, now_ms: u64, wave: u32, why: String, out: &mut Vec<Action>) {
        self.note(now_ms, format!("halted: {why}"));
        self.phase = Phase::Halted { wave, why };
        self.hold = None;
        self.give_back(out);
    }

    /// Starts `wave` if the schedule allows it now (drawing its devices when the
    /// policy samples); otherwise holds it for the schedule.
    fn start_wave(&mut self, wave: u32, now_ms: u64, out: &mut Vec<Action>) {
        if self.next_start_ms(now_ms) > now_ms {
            if self.hold != Some(Hold::Schedule { wave }) {
                self.hold = Some(Hold::Schedule { wave });
                let wait = self.next_start_ms(now_ms) - now_ms;
                let line = format!(
                    "wave {} waits {}s for the schedule",
                    wave + 1,
                    wait.div_ceil(1000)
                );
                self.note(now_ms, line);
            }
            return;
        }
        self.hold = None;
        self.phase = Phase::Running {
            wave,
            since_ms: now_ms,
        };
        self.wave_starts.push(now_ms);
        self.draw_wave(wave);
        self.send_wave(wave, now_ms, out);
        // An empty wave (all of it already answered) moves on at once.
        self.evaluate(now_ms, out);
    }

    fn send_wave(&mut self, wave: u32, now_ms: u64, out: &mut Vec<Action>) {
        let mut sent = Vec::new();
        for name in self.waves.get(wave as usize).into_iter().flatten() {
            if let Some(d) = self.devices.get_mut(name) {
                if d.outcome == Outcome::Waiting {
                    d.outcome = Outcome::Sent { at_ms: now_ms };
                    d.baseline = std::mem::take(&mut d.health);
                    sent.push(name.clone());
                }
            }
        }
        if !sent.is_empty() {
            self.note(now_ms, format!("wave {}: {} devices", wave + 1, sent.len()));
            out.push(Action::Send(sent));
        }
    }

    /// After a halt or an abort: the devices sent the release that must not keep it
    /// get back what they had. Those that did not commit always; those that committed
    /// too if the policy reverts. Devices never sent it are never touched.
    fn give_back(&mut self, out: &mut Vec<Action>) {
        let revert = self.policy.revert;
        let wave = match self.phase {
            Phase::Halted { wave, .. } | Phase::Aborted { wave, .. } => wave,
            _ => return,
        };
        let mut back = Vec::new();
        for (name, d) in &mut self.devices {
            let give = match d.outcome {
                Outcome::Waiting => false,
                Outcome::Sent { .. } | Outcome::Failed { .. } => true,
                Outcome::Committed { .. } => revert && d.wave == wave,
            };
            if give && !d.returned {
                d.returned = true;
                back.push(name.clone());
            }
        }
        if !back.is_empty() {
            out.push(Action::Return(back));
        }
    }

    fn note(&mut self, now_ms: u64, line: String) {
        self.history.push((now_ms, line));
        if self.history.len() > MAX_HISTORY {
            let extra = self.history.len() - MAX_HISTORY;
            self.history.drain(..extra);
        }
    }

    /// Refuses a record the step cannot follow: its policy ([`Policy::check`]), or a
    /// health summary that is not one.
    pub fn check(&self) -> Result<(), String> {
        self.policy.check()?;
        for (name, d) in &self.devices {
            for s in d.baseline.values().chain(d.health.values()) {
                s.validate().map_err(|e| format!("health of {name}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// At most five of `items`, and how many more: `d1, d2, d3, d4, d5 and 995 more`.
pub fn short_list(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests;
