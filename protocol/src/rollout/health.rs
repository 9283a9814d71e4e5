//! The gates' side of [`Rollout::step`]: keeping the devices' health, judging a wave
//! after its soak, and drawing a sampled wave.

use std::collections::{BTreeMap, BTreeSet};

use super::gate::{judge, Cohort, Gate, HealthSummary, Signal, Verdict, MAX_METRICS, MAX_MODULES};
use super::{schedule, short_list, Action, Hold, Outcome, Rollout};

/// The modules the gates read, each with the metrics of it they name: the rollout's
/// module always.
fn watched(gates: &[Gate], module: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut watched = BTreeMap::from([(module.to_string(), BTreeSet::new())]);
    for g in gates {
        if let Signal::Metric { module, name } = &g.signal {
            watched
                .entry(module.clone())
                .or_default()
                .insert(name.clone());
        }
    }
    watched
}

/// Adds `s` (only the metrics in `metrics`) to `into`, never past [`MAX_METRICS`].
fn keep(into: &mut BTreeMap<String, HealthSummary>, s: &HealthSummary, metrics: &BTreeSet<String>) {
    let kept = into
        .entry(s.module.clone())
        .or_insert_with(|| HealthSummary::new(&s.module));
    let mut s = s.clone();
    s.metrics.retain(|name, _| {
        metrics.contains(name)
            && (kept.metrics.contains_key(name) || kept.metrics.len() < MAX_METRICS)
    });
    kept.merge(&s);
}

/// A device's kept summaries into `cohort`; a device that kept none is offline.
fn add(cohort: &mut Cohort, device: &str, health: &BTreeMap<String, HealthSummary>) {
    if health.is_empty() {
        let _ = cohort.offline(device);
    }
    for s in health.values() {
        let _ = cohort.report(device, s);
    }
}

impl Rollout {
    /// Keeps `summaries` of `device` for the gates: while it waits (the control, and
    /// then its baseline) or after it committed; nothing while it is sent the release
    /// (which version a summary is of is unknown), failed or given back. Without gates
    /// nothing is kept.
    pub(super) fn record_health(&mut self, device: &str, seq: u64, summaries: &[HealthSummary]) {
        let gates = match self.policy.parsed_gates() {
            Ok(g) if !g.is_empty() => g,
            _ => return,
        };
        let watched = watched(&gates, &self.module.name);
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        if d.health_seq.replace(seq) == Some(seq) {
            return;
        }
        let keeps = match d.outcome {
            Outcome::Waiting => true,
            Outcome::Committed { .. } => !d.returned,
            Outcome::Sent { .. } | Outcome::Failed { .. } => false,
        };
        if !keeps {
            return;
        }
        // It reported: not offline, even with nothing of the watched modules.
        let module = &self.module.name;
        d.health
            .entry(module.clone())
            .or_insert_with(|| HealthSummary::new(module));
        for s in summaries.iter().take(MAX_MODULES) {
            if let (Some(metrics), Ok(())) = (watched.get(&s.module), s.validate()) {
                keep(&mut d.health, s, metrics);
            }
        }
    }

    /// The cohorts `wave` is judged on: its committed devices (health since they
    /// committed), the control (the devices not sent the release yet) and the
    /// baseline (the wave's devices before). With no device left for the control, the
    /// baseline stands in for it (`true`).
    pub fn cohorts(&self, wave: u32) -> (Cohort, Cohort, Cohort, bool) {
        let module = &self.module.name;
        let (mut w, mut control, mut baseline) = (
            Cohort::new(module),
            Cohort::new(module),
            Cohort::new(module),
        );
        for (name, d) in &self.devices {
            match d.outcome {
                Outcome::Waiting => add(&mut control, name, &d.health),
                Outcome::Committed { .. } if d.wave == wave && !d.returned => {
                    add(&mut w, name, &d.health);
                    for s in d.baseline.values() {
                        let _ = baseline.report(name, s);
                    }
                }
                _ => {}
            }
        }
        let no_control = control.reporting() + control.offline_devices().len() == 0;
        if no_control {
            control = baseline.clone();
        }
        (w, control, baseline, no_control)
    }

    /// Whether `wave` (all of it answered) goes on: with gates, it soaks, then is
    /// judged; a breach halts the rollout; a wave short of a gate's sample waits one
    /// more soak time, then goes on unjudged. Without gates it goes on at once.
    pub(super) fn gates_passed(&mut self, wave: u32, now_ms: u64, out: &mut Vec<Action>) -> bool {
        let gates = match self.policy.parsed_gates() {
            Ok(g) if g.is_empty() => return true,
            Ok(g) => g,
            Err(e) => {
                self.halt(now_ms, wave, format!("policy: {e}"), out);
                return false;
            }
        };
        let soak = self.policy.soak_ms;
        let since = match self.hold {
            Some(Hold::Soak { wave: w, since_ms }) if w == wave => since_ms,
            _ => {
                self.hold = Some(Hold::Soak {
                    wave,
                    since_ms: now_ms,
                });
                let line = format!("wave {} soaks {}s", wave + 1, soak.div_ceil(1000));
                self.note(now_ms, line);
                return false;
            }
        };
        if now_ms < since.saturating_add(soak) {
            return false;
        }
        let (w, control, baseline, no_control) = self.cohorts(wave);
        let against = match no_control {
            true => " (no control left: `x control` gates compare with the baseline)",
            false => "",
        };
        match judge(&gates, &w, &control, &baseline) {
            Verdict::Pass => {
                self.note(
                    now_ms,
                    format!("wave {} passed its gates{against}", wave + 1),
                );
                true
            }
            Verdict::Breach(breaches) => {
                for b in &breaches[1..] {
                    self.note(now_ms, format!("gate {b}{against}"));
                }
                let more = match breaches.len() {
                    1 => String::new(),
                    n => format!(" ({} more gates above)", n - 1),
                };
                self.halt(
                    now_ms,
                    wave,
                    format!("gate {}{against}{more}", breaches[0]),
                    out,
                );
                false
            }
            Verdict::Wait if now_ms < since.saturating_add(soak.saturating_mul(2)) => false,
            Verdict::Wait => {
                let short = short_of_sample(&gates, &w, &control, &baseline);
                let line = format!(
                    "wave {} goes on unjudged: too few devices for {}",
                    wave + 1,
                    short_list(&short)
                );
                self.note(now_ms, line);
                true
            }
        }
    }

    /// With a sampling policy, `wave` (the pool of the devices not drawn yet) keeps
    /// the policy's share of the rollout's devices, drawn with the record's seed; the
    /// rest become the next wave.
    pub(super) fn draw_wave(&mut self, wave: u32) {
        let (Some(p), Some(pool)) = (self.policy.sample_percent, self.waves.get(wave as usize))
        else {
            return;
        };
        let n = schedule::sample_size(p, self.devices.len());
        if pool.len() <= n {
            return;
        }
        let chosen = schedule::draw(self.seed, wave, pool, n);
        let rest: Vec<String> = pool
            .iter()
            .filter(|d| !chosen.contains(d))
            .cloned()
            .collect();
        for name in &rest {
            if let Some(d) = self.devices.get_mut(name) {
                d.wave = wave + 1;
            }
        }
        let at = wave as usize;
        self.waves[at] = chosen;
        self.waves.insert(at + 1, rest);
    }
}

/// The gates that wait for their sample, as text.
fn short_of_sample(gates: &[Gate], w: &Cohort, control: &Cohort, baseline: &Cohort) -> Vec<String> {
    gates
        .iter()
        .filter(|g| judge(std::slice::from_ref(*g), w, control, baseline) == Verdict::Wait)
        .map(Gate::to_string)
        .collect()
}
