//! Rollouts, as the fleet tool drives them. What to do is decided by
//! [`kiln_protocol::rollout::Rollout::step`] (the policy) and by [`recovery`] (what a
//! driver does after the broker went away or when it takes up a rollout in progress);
//! [`driver`] feeds both what the broker delivers and the clock, carries out what they
//! decide (desired states) and keeps the signed record on
//! `{prefix}/groups/{group}/rollout` current. This file holds what the driver and the
//! `rollout` command share: the group's members, the record as the broker keeps it,
//! who is acting.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Result};
use kiln_protocol::fleet::{DesiredModule, DeviceFacts, Topics};
use kiln_protocol::rollout::{short_list, Hold, Outcome, Phase, Rollout};
use kiln_protocol::trust::Registry;

use crate::fleet::broker::Session;
use crate::fleet::messages::{warn_skipped, Reader};
use crate::fleet::trust::{Opened, Signing};
use crate::fleet::Error;

pub mod driver;
pub mod health;
pub mod recovery;
#[cfg(test)]
pub(crate) mod tests;

pub use driver::Driver;

/// The broker went away (or was never there).
pub fn unavailable(e: anyhow::Error) -> Error {
    Error::Broker(e)
}

/// The group's members by their retained status, with its facts (what it runs on,
/// and what a cohort selects on), refusing any
/// whose status is not signed by its enrolled key (its reports would never count).
pub fn members(
    session: &mut Session,
    topics: &Topics,
    registry: &Registry,
    group: &str,
) -> Result<Vec<(String, DeviceFacts)>> {
    let mut unverified = Vec::new();
    let retained = session
        .retained(&topics.all_devices("status"))
        .map_err(unavailable)?;
    let (heard, skipped) = Reader::new(topics, registry).all(&retained);
    warn_skipped(&skipped, 5);
    let mut members: Vec<(String, DeviceFacts)> = heard
        .into_iter()
        .filter_map(|h| {
            let facts = h.status()?.facts.clone()?;
            if !facts.groups.iter().any(|g| g == group) {
                return None;
            }
            let device = h.device.as_str();
            if !h.identity.is_verified() {
                unverified.push(format!("{device} ({})", h.identity.word()));
            }
            Some((device.to_string(), facts))
        })
        .collect();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    if !unverified.is_empty() {
        return Err(Error::Trust(format!(
            "group {group}: the status of {} is not signed by an enrolled key; enroll them first (`kiln enroll --group {group}`)",
            unverified.join(", ")
        ))
        .into());
    }
    if members.is_empty() {
        return Err(Error::NoSuchScope(format!(
            "no device has reported membership of group `{group}`"
        ))
        .into());
    }
    Ok(members)
}

/// Each device's own desired-state entry for `module`, where it has one.
pub fn own_entries(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    module: &str,
) -> Result<BTreeMap<String, DesiredModule>> {
    let states = session
        .retained(&topics.all_devices("desired"))
        .map_err(unavailable)?;
    Ok(states
        .into_iter()
        .filter_map(|(topic, payload)| {
            let (device, _) = topics.parse_device(&topic)?;
            // Only what verifies under the current root is carried into a new state.
            let Ok(Opened::Trusted(d)) = signing.fleet.open_desired(&payload) else {
                return None;
            };
            let entry = d.modules.into_iter().find(|m| m.name == module)?;
            Some((device.to_string(), entry))
        })
        .collect())
}

/// The group's rollout record, if one is retained and trusted. An untrusted one is
/// named and ignored (it is overwritten by the next rollout).
pub fn read_record(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    group: &str,
) -> Result<Option<Rollout>> {
    Ok(read_whole_record(session, signing.fleet.root(), topics, group)?.map(|(r, _)| r))
}

/// The group's rollout record and the part topics the broker holds for it (what its
/// next write clears if it no longer names them). An untrusted record is named and
/// ignored (it is overwritten by the next rollout).
pub fn read_whole_record(
    session: &mut Session,
    root: &kiln_protocol::trust::Root,
    topics: &Topics,
    group: &str,
) -> Result<Option<(Rollout, BTreeSet<String>)>> {
    let topic = topics.rollout(group);
    let mut held = BTreeSet::new();
    let read = crate::fleet::parts::read_whole(session, &topics.rollout_all(group), |retained| {
        held = retained
            .keys()
            .filter(|t| matches!(topics.parse_rollout(t), Some((_, Some(_)))))
            .cloned()
            .collect();
        let Some(head) = retained.get(&topic) else {
            return Ok(None);
        };
        let part = |sha: &[u8; 32]| {
            retained
                .get(&topics.rollout_part(group, sha))
                .map(Vec::as_slice)
        };
        Rollout::verify(head, part, root, group).map(Some)
    })
    .map_err(unavailable)?;
    match read {
        Ok(r) => Ok(r.map(|r| (r, held))),
        Err(why) => {
            eprintln!("kiln: warning: ignoring the rollout record on {topic}: {why}");
            Ok(None)
        }
    }
}

/// Another rollout holds the group.
pub fn busy(other: &Rollout) -> Error {
    Error::busy(anyhow!(
            "group {}: rollout {} of {} is {} (started by {}); see `kiln rollout status --group {}`, or stop it with `kiln rollout abort --group {}`",
            other.group,
            other.id,
            other.label(),
            phase_words(other),
            other.started_by,
            other.group,
            other.group
        ),
    )
}

/// The phase in a few words, never `running` for a wave its soak or the schedule
/// holds (`kiln rollout status` says until when).
pub fn phase_words(r: &Rollout) -> String {
    match (&r.phase, r.hold) {
        (Phase::Running { .. }, Some(Hold::Soak { wave, .. })) => {
            format!("soaking wave {} before its gates judge it", wave + 1)
        }
        (Phase::Running { .. }, Some(Hold::Schedule { wave })) => {
            format!("holding wave {} for the schedule", wave + 1)
        }
        (phase, _) => phase.to_string(),
    }
}

/// Who is acting: the user, the machine, and the key that signs.
pub fn operator(signing: &Signing) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    match signing.keys.first() {
        Some(k) => format!("{user}@{host} (key {})", k.public().id()),
        None => format!("{user}@{host}"),
    }
}

/// The driver a record names: the operator and this process, so that two drivers on
/// one operator's machine are told apart (a driver yields to one that took its
/// rollout up, see `Driver::taken_over_by`).
pub fn driver_name(signing: &Signing) -> String {
    format!("{} pid {}", operator(signing), std::process::id())
}

/// The failed devices and why, at most five.
pub fn failures(r: &Rollout) -> String {
    let failed: Vec<String> = r
        .devices
        .iter()
        .filter_map(|(n, d)| match &d.outcome {
            Outcome::Failed { why } => Some(format!("{n}: {why}")),
            _ => None,
        })
        .collect();
    short_list(&failed)
}
