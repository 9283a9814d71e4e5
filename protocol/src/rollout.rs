//! A rollout: one release taken to a group's devices in waves, under a policy that
//! halts it when too many fail. The record of it (plan, per-device outcome, phase) is
//! kept on the broker as signed retained state, `{prefix}/groups/{group}/rollout`, so
//! any operator's `kiln rollout status|pause|resume|retry|abort` sees and drives the
//! same rollout, and a rollout outlives the machine that started it.
//!
//! [`Rollout::step`] is the whole decision: a pure function of the record and one
//! input (a device committed or failed, the clock, an operator's word) that returns
//! the actions to carry out. The fleet tool only performs them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fleet::DesiredModule;
use crate::keys::SecretKey;
use crate::trust::{open_body, sign_all, unwrap_envelope, OpenError, Root, Sig};

/// A rollout record of 1,000 devices is some 60 KiB (with no device entry of its own to
/// return); 1 MiB holds the largest group one rollout should take.
pub const MAX_ROLLOUT: usize = 1024 * 1024;
/// Lines of history a record keeps (the newest).
pub const MAX_HISTORY: usize = 64;

const CONTEXT: &[u8] = b"kiln rollout v1\0";

pub mod gate;

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Its wave, from 0.
    pub wave: u32,
    pub outcome: Outcome,
    /// The entry for the module its own desired state had before the rollout: what
    /// it gets back when returned (none: it follows the group's again).
    pub before: Option<DesiredModule>,
    /// Given back what it had before, after a halt or an abort.
    pub returned: bool,
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
    /// Every wave went through within the policy; the release is the group's.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// What happens to a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The clock: a wave past its timeout fails its silent devices.
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
    /// desired states lose it (they follow the group's again).
    Finish(Vec<String>),
}

impl Rollout {
    /// A new rollout, waiting for [`Input::Start`].
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
                    },
                );
            }
        }
        Rollout {
            fleet: fleet.into(),
            group: group.into(),
            id: format!("{group}-{now_ms}"),
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

    /// When the wave in flight times out, if one is.
    pub fn deadline_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Running { since_ms, .. } => {
                Some(since_ms.saturating_add(self.policy.wave_timeout_ms))
            }
            _ => None,
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
                    if self.counts().0 == self.devices.len() {
                        self.note(now_ms, format!("started by {}", self.started_by));
                        self.send_wave(0, now_ms, &mut out);
                    }
                }
            }
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
                if now_ms < since_ms.saturating_add(self.policy.wave_timeout_ms) {
                    return out;
                }
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
                    }
                }
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
                self.note(now_ms, format!("aborted by {by}"));
                self.give_back(&mut out);
            }
        }
        out
    }

    /// While running: halts when a threshold is passed, starts the next wave when no
    /// device is pending, or completes after the last.
    fn evaluate(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let Phase::Running { wave, .. } = self.phase else {
            return;
        };
        let failed_in = |w: Option<u32>| {
            self.devices
                .values()
                .filter(|d| w.is_none_or(|w| d.wave == w))
                .filter(|d| matches!(d.outcome, Outcome::Failed { .. }))
                .count()
        };
        let in_wave = self.waves.get(wave as usize).map_or(0, Vec::len);
        let (wave_failed, total_failed) = (failed_in(Some(wave)), failed_in(None));
        let wave_allowed = self.policy.wave_failures.allowed(in_wave);
        let total_allowed = self.policy.total_failures.allowed(self.devices.len());
        let why = if wave_failed > wave_allowed {
            Some(format!(
                "{wave_failed} of {in_wave} devices of the wave failed (allowed: {})",
                self.policy.wave_failures
            ))
        } else if total_failed > total_allowed {
            Some(format!(
                "{total_failed} of {} devices failed (allowed: {})",
                self.devices.len(),
                self.policy.total_failures
            ))
        } else {
            None
        };
        if let Some(why) = why {
            self.note(now_ms, format!("halted: {why}"));
            self.phase = Phase::Halted { wave, why };
            self.give_back(out);
            return;
        }
        if !self.pending().is_empty() {
            return;
        }
        let next = wave + 1;
        if (next as usize) < self.waves.len() {
            self.phase = Phase::Running {
                wave: next,
                since_ms: now_ms,
            };
            self.send_wave(next, now_ms, out);
            // An empty wave (all of it already answered) moves on at once.
            self.evaluate(now_ms, out);
        } else {
            self.phase = Phase::Complete;
            self.note(now_ms, "complete".into());
            out.push(Action::Finish(self.devices.keys().cloned().collect()));
        }
    }

    fn send_wave(&mut self, wave: u32, now_ms: u64, out: &mut Vec<Action>) {
        let mut sent = Vec::new();
        for name in self.waves.get(wave as usize).into_iter().flatten() {
            if let Some(d) = self.devices.get_mut(name) {
                if d.outcome == Outcome::Waiting {
                    d.outcome = Outcome::Sent { at_ms: now_ms };
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

    /// Signs the record with `keys` (a threshold of the fleet's release role).
    pub fn seal(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(CONTEXT, &body, keys);
        let bytes = postcard::to_stdvec(&SignedRollout::V1 { body, signatures })
            .map_err(|e| e.to_string())?;
        if bytes.len() > MAX_ROLLOUT {
            return Err(format!(
                "the rollout record would be {} bytes (limit {MAX_ROLLOUT}): {} devices",
                bytes.len(),
                self.devices.len()
            ));
        }
        Ok(bytes)
    }

    /// The record on `topic`, if a threshold of `root`'s release keys signed it for
    /// this fleet and the group the topic names.
    pub fn open(bytes: &[u8], root: &Root, group: &str) -> Result<Self, String> {
        Self::verify(bytes, root, group).map_err(|e| e.to_string())
    }

    /// [`Rollout::open`] with the kind of failure.
    pub fn verify(bytes: &[u8], root: &Root, group: &str) -> Result<Self, OpenError> {
        let SignedRollout::V1 { body, signatures } =
            unwrap_envelope(bytes, MAX_ROLLOUT, "rollout record")?;
        let (r, _): (Rollout, _) = open_body(
            &root.release,
            CONTEXT,
            (&body, &signatures),
            "the rollout record",
            "rollout record",
        )?;
        if r.fleet != root.fleet || r.group != group {
            return Err(OpenError::WrongFleet(format!(
                "the rollout record is for group {} of fleet {}, not group {group} of {}",
                r.group, r.fleet, root.fleet
            )));
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRollout {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
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
