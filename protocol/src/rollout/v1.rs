//! The record as kiln wrote it before health gates (`kiln rollout v1`): it opens as a
//! record with no gates, no sample and no schedule, so a rollout under way when the
//! fleet tool is upgraded can be resumed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Device, Outcome, Phase, Policy, Rollout, Threshold};
use crate::fleet::DesiredModule;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PolicyV1 {
    pub wave_failures: Threshold,
    pub total_failures: Threshold,
    pub wave_timeout_ms: u64,
    pub revert: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DeviceV1 {
    pub wave: u32,
    pub outcome: Outcome,
    pub before: Option<DesiredModule>,
    pub returned: bool,
}

/// The v1 record, field for field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RolloutV1 {
    pub fleet: String,
    pub group: String,
    pub id: String,
    pub serial: u64,
    pub started_by: String,
    pub driver: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub module: DesiredModule,
    pub policy: PolicyV1,
    pub waves: Vec<Vec<String>>,
    pub devices: BTreeMap<String, DeviceV1>,
    pub skipped: Vec<(String, String)>,
    pub unexpected: BTreeSet<String>,
    pub phase: Phase,
    pub history: Vec<(u64, String)>,
}

impl From<RolloutV1> for Rollout {
    /// A started v1 rollout counts its waves up to the current one as started (at its
    /// start time), so it is not started again.
    fn from(r: RolloutV1) -> Self {
        let p = r.policy;
        let started = r.devices.values().any(|d| d.outcome != Outcome::Waiting);
        let current = match &r.phase {
            Phase::Running { wave, .. }
            | Phase::Paused { wave, .. }
            | Phase::Halted { wave, .. }
            | Phase::Aborted { wave, .. } => *wave as usize,
            Phase::Complete => r.waves.len().saturating_sub(1),
        };
        let wave_starts = match started {
            true => vec![r.started_ms; current + 1],
            false => Vec::new(),
        };
        let seed = super::schedule::seed(&r.id, r.waves.iter().flatten());
        let devices = r
            .devices
            .into_iter()
            .map(|(name, d)| {
                let d = Device {
                    wave: d.wave,
                    outcome: d.outcome,
                    before: d.before,
                    returned: d.returned,
                    baseline: BTreeMap::new(),
                    health: BTreeMap::new(),
                    health_seq: None,
                };
                (name, d)
            })
            .collect();
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
            policy: Policy::new(
                p.wave_failures,
                p.total_failures,
                p.wave_timeout_ms,
                p.revert,
            ),
            waves: r.waves,
            devices,
            skipped: r.skipped,
            unexpected: r.unexpected,
            phase: r.phase,
            history: r.history,
            seed,
            wave_starts,
            hold: None,
        }
    }
}
