//! The record as kiln wrote it before cohorts (`kiln rollout v2`): it opens as a
//! record with no cohort (the whole group), so a rollout under way when the fleet
//! tool is upgraded can be resumed, and its status and the dashboard still show it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Device, Hold, Phase, Policy, Rollout, Threshold};
use crate::fleet::DesiredModule;

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

/// The v2 record, field for field (its devices are today's).
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
    pub devices: BTreeMap<String, Device>,
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
            devices: r.devices,
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
            devices: r.devices.clone(),
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
