//! `kiln rollout status`: the record(s), for a person or as JSON.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::{short_list, Outcome, Rollout};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::rollout::unavailable;
use crate::fleet::trust::RootArgs;
use crate::names::valid_name;

/// `kiln rollout status`: the record(s), checked against the fleet's root.
pub fn status(group: Option<&str>, json: bool, root: &RootArgs, broker: &BrokerArgs) -> Result<()> {
    let mut session = broker.connect().map_err(unavailable)?;
    let topics = broker.topics();
    let fleet = crate::fleet::trust::Fleet::follow(&mut session, &topics, root.anchor(None)?)?;
    let filter = match group {
        Some(g) => {
            valid_name(Kind::Group, g)?;
            topics.rollout(g)
        }
        None => topics.all_rollouts(),
    };
    let retained = session.retained(&filter).map_err(unavailable)?;
    session.disconnect();
    if retained.is_empty() {
        return Err(coded(
            Code::InvalidInput,
            anyhow!(match group {
                Some(g) => format!("group {g}: no rollout on record"),
                None => "no rollout on record".into(),
            }),
        ));
    }
    let now = now_ms();
    for (topic, bytes) in &retained {
        let g = topic
            .strip_suffix("/rollout")
            .and_then(|t| t.rsplit('/').next())
            .unwrap_or_default();
        match Rollout::open(bytes, fleet.root(), g) {
            Err(why) if json => println!(
                "{}",
                serde_json::json!({ "group": g, "valid": false, "error": why.to_string() })
            ),
            Ok(r) if json => println!("{}", status_json(&r)),
            Err(why) => println!("{g}: INVALID rollout record: {why}"),
            Ok(r) if group.is_none() => {
                let (waiting, sent, committed, failed) = r.counts();
                println!(
                    "{g}: {} {}: {} ({committed} committed, {failed} failed, {sent} pending, {waiting} waiting)",
                    r.id,
                    r.label(),
                    r.phase
                );
            }
            Ok(r) => print!("{}", describe(&r, now)),
        }
    }
    Ok(())
}

/// A rollout record for scripts: `kiln rollout status --json`, one object a line.
fn status_json(r: &Rollout) -> serde_json::Value {
    let (waiting, sent, committed, failed) = r.counts();
    let devices: Vec<serde_json::Value> = r
        .devices
        .iter()
        .map(|(name, d)| {
            let (outcome, why) = match &d.outcome {
                Outcome::Waiting => ("waiting", None),
                Outcome::Sent { .. } => ("pending", None),
                Outcome::Committed { .. } => ("committed", None),
                Outcome::Failed { why } => ("failed", Some(why.clone())),
            };
            serde_json::json!({
                "device": name,
                "outcome": outcome,
                "why": why,
                "given_back": d.returned,
            })
        })
        .collect();
    serde_json::json!({
        "group": r.group,
        "valid": true,
        "id": r.id,
        "module": r.module.name,
        "version": r.module.version,
        "phase": r.phase.to_string(),
        "started_by": r.started_by,
        "driver": r.driver,
        "started_ms": r.started_ms,
        "updated_ms": r.updated_ms,
        "waves": r.waves,
        "counts": { "waiting": waiting, "pending": sent, "committed": committed, "failed": failed },
        "devices": devices,
        "skipped": r.skipped.iter().map(|(d, why)| serde_json::json!({"device": d, "why": why})).collect::<Vec<_>>(),
    })
}

/// The whole record, for a person.
fn describe(r: &Rollout, now: u64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let ago = |ms: u64| format!("{}s ago", now.saturating_sub(ms) / 1000);
    let _ = writeln!(s, "rollout {} of {} to group {}", r.id, r.label(), r.group);
    let _ = writeln!(s, "  phase:    {}", r.phase);
    let _ = writeln!(
        s,
        "  started:  by {}, {}; driven by {}; updated {}",
        r.started_by,
        ago(r.started_ms),
        r.driver,
        ago(r.updated_ms)
    );
    let p = &r.policy;
    let _ = writeln!(
        s,
        "  policy:   failures allowed {} per wave, {} in all; wave timeout {}s; revert {}",
        p.wave_failures,
        p.total_failures,
        p.wave_timeout_ms / 1000,
        if p.revert { "yes" } else { "no" }
    );
    for (i, wave) in r.waves.iter().enumerate() {
        let mut c: BTreeMap<&str, usize> = BTreeMap::new();
        for d in wave {
            let Some(d) = r.devices.get(d) else { continue };
            let word = match (&d.outcome, d.returned) {
                (Outcome::Waiting, _) => "waiting",
                (Outcome::Sent { .. }, false) => "pending",
                (Outcome::Sent { .. }, true) => "cut off",
                (Outcome::Committed { .. }, false) => "committed",
                (Outcome::Committed { .. }, true) => "committed, reverted",
                (Outcome::Failed { .. }, _) => "failed",
            };
            *c.entry(word).or_default() += 1;
        }
        let counts: Vec<String> = c.iter().map(|(w, n)| format!("{n} {w}")).collect();
        let _ = writeln!(
            s,
            "  wave {}:   {} devices: {}",
            i + 1,
            wave.len(),
            counts.join(", ")
        );
    }
    for (name, d) in &r.devices {
        if let Outcome::Failed { why } = &d.outcome {
            let back = if d.returned { " (given back)" } else { "" };
            let _ = writeln!(s, "  failed:   {name}: {why}{back}");
        }
    }
    for (name, why) in &r.skipped {
        let _ = writeln!(s, "  left out: {name}: {why}");
    }
    let unexpected: Vec<String> = r.unexpected.iter().cloned().collect();
    if !unexpected.is_empty() {
        let _ = writeln!(
            s,
            "  not counted (reported it without being sent it): {}",
            short_list(&unexpected)
        );
    }
    for (ms, line) in &r.history {
        let _ = writeln!(s, "  {:>8}  {line}", ago(*ms));
    }
    s
}
