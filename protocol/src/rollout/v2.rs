//! The record as kiln wrote it before cohorts (`kiln rollout v2`): it opens as a
//! record with no cohort (the whole group), so a rollout under way when the fleet
//! tool is upgraded can be resumed, and its status and the dashboard still show it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::gate::HealthSummary;
use super::{Device, Hold, Outcome, Phase, Policy, Rollout, Threshold};
use crate::fleet::DesiredModule;

/// The v2 device, field for field: without the last health period counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DeviceV2 {
    pub wave: u32,
    pub outcome: Outcome,
    pub before: Option<DesiredModule>,
    pub returned: bool,
    pub baseline: BTreeMap<String, HealthSummary>,
    pub health: BTreeMap<String, HealthSummary>,
}

impl From<DeviceV2> for Device {
    /// No period counted yet: the next one a driver reads counts (the one a v2
    /// driver may have counted already, once).
    fn from(d: DeviceV2) -> Self {
        Device {
            wave: d.wave,
            outcome: d.outcome,
            before: d.before,
            returned: d.returned,
            baseline: d.baseline,
            health: d.health,
            health_seq: None,
        }
    }
}

/// The v2 policy, field for field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PolicyV2 {
    pub wave_failures: Threshold,
    pub total_failures: Threshold,
    pub wave_timeout_ms: u64,
    pub revert: bool,
    pub gates: Vec<String>,
    pub soak_ms: u64,
    pub sample_percent: Option<u8>,
    pub wave_interval_ms: Option<u64>,
    pub window: Option<(u16, u16)>,
}

/// The v2 record, field for field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RolloutV2 {
    pub fleet: String,
    pub group: String,
    pub id: String,
    pub serial: u64,
    pub started_by: String,
    pub driver: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub module: DesiredModule,
    pub policy: PolicyV2,
    pub waves: Vec<Vec<String>>,
    pub devices: BTreeMap<String, DeviceV2>,
    pub skipped: Vec<(String, String)>,
    pub unexpected: BTreeSet<String>,
    pub phase: Phase,
    pub history: Vec<(u64, String)>,
    pub seed: u64,
    pub wave_starts: Vec<u64>,
    pub hold: Option<Hold>,
}

impl From<PolicyV2> for Policy {
    fn from(p: PolicyV2) -> Self {
        Policy {
            wave_failures: p.wave_failures,
            total_failures: p.total_failures,
            wave_timeout_ms: p.wave_timeout_ms,
            revert: p.revert,
            gates: p.gates,
            soak_ms: p.soak_ms,
            sample_percent: p.sample_percent,
            wave_interval_ms: p.wave_interval_ms,
            window: p.window,
            cohort: Vec::new(),
        }
    }
}

impl From<RolloutV2> for Rollout {
    fn from(r: RolloutV2) -> Self {
        Rollout {
            fleet: r.fleet,
            group: r.group,
            id: r.id,
            serial: r.serial,
            started_by: r.started_by,
            driver: r.driver,
            started_ms: r.started_ms,
            updated_ms: r.updated_ms,
            module: r.module,
            policy: r.policy.into(),
            waves: r.waves,
            devices: r.devices.into_iter().map(|(n, d)| (n, d.into())).collect(),
            skipped: r.skipped,
            unexpected: r.unexpected,
            phase: r.phase,
            history: r.history,
            seed: r.seed,
            wave_starts: r.wave_starts,
            hold: r.hold,
        }
    }
}

/// For the test that an old record opens: today's record as v2 wrote it.
#[cfg(test)]
impl From<&Rollout> for RolloutV2 {
    fn from(r: &Rollout) -> Self {
        let p = r.policy.clone();
        RolloutV2 {
            fleet: r.fleet.clone(),
            group: r.group.clone(),
            id: r.id.clone(),
            serial: r.serial,
            started_by: r.started_by.clone(),
            driver: r.driver.clone(),
            started_ms: r.started_ms,
            updated_ms: r.updated_ms,
            module: r.module.clone(),
            policy: PolicyV2 {
                wave_failures: p.wave_failures,
                total_failures: p.total_failures,
                wave_timeout_ms: p.wave_timeout_ms,
                revert: p.revert,
                gates: p.gates,
                soak_ms: p.soak_ms,
                sample_percent: p.sample_percent,
                wave_interval_ms: p.wave_interval_ms,
                window: p.window,
            },
            waves: r.waves.clone(),
            devices: r
                .devices
                .iter()
                .map(|(n, d)| {
                    let d = DeviceV2 {
                        wave: d.wave,
                        outcome: d.outcome.clone(),
                        before: d.before.clone(),
                        returned: d.returned,
                        baseline: d.baseline.clone(),
                        health: d.health.clone(),
                    };
                    (n.clone(), d)
                })
                .collect(),
            skipped: r.skipped.clone(),
            unexpected: r.unexpected.clone(),
            phase: r.phase.clone(),
            history: r.history.clone(),
            seed: r.seed,
            wave_starts: r.wave_starts.clone(),
            hold: r.hold,
        }
    }
}
