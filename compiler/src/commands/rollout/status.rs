//! `kiln rollout status`: the record(s), for a person or as JSON.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use kiln_protocol::clock::utc;
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::{in_window, short_list, Hold, Outcome, Phase, Policy, Rollout};
use kiln_protocol::trust::OpenError;

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::rollout::health::verdicts;
use crate::fleet::rollout::unavailable;
use crate::fleet::trust::RootArgs;
use crate::names::valid_name;

use super::hhmm;

/// `kiln rollout status`: the record(s), checked against the fleet's root.
pub fn status(group: Option<&str>, json: bool, root: &RootArgs, broker: &BrokerArgs) -> Result<()> {
    let mut session = broker.connect().map_err(unavailable)?;
    let topics = broker.topics();
    let fleet = crate::fleet::trust::Fleet::follow(&mut session, &topics, root.anchor(None)?)?;
    let filter = match group {
        Some(g) => {
            valid_name(Kind::Group, g)?;
            topics.rollout_all(g)
        }
        None => topics.all_rollouts(),
    };
    // Every record's head, opened with its parts (read again while a writer is
    // between its parts and its head).
    let read = crate::fleet::parts::read_whole(&mut session, &filter, |retained| {
        let mut records = Vec::new();
        for (topic, head) in retained {
            let Some((g, None)) = topics.parse_rollout(topic) else {
                continue;
            };
            let part = |sha: &[u8; 32]| {
                retained
                    .get(&topics.rollout_part(g, sha))
                    .map(Vec::as_slice)
            };
            records.push((g.to_string(), Rollout::verify(head, part, fleet.root(), g)));
        }
        let incomplete = records
            .iter()
            .any(|(_, r)| matches!(r, Err(OpenError::Incomplete(_))));
        if incomplete {
            Err(Partial(records))
        } else {
            Ok(records)
        }
    })
    .map_err(unavailable)?;
    // Still incomplete after reading again: said as such, record by record.
    let records = read.unwrap_or_else(|Partial(records)| records);
    session.disconnect();
    if records.is_empty() {
        return Err(coded(
            Code::InvalidInput,
            anyhow!(match group {
                Some(g) => format!("group {g}: no rollout on record"),
                None => "no rollout on record".into(),
            }),
        ));
    }
    let now = now_ms();
    for (g, opened) in records {
        match opened {
            Err(why) if json => println!(
                "{}",
                serde_json::json!({ "group": g, "valid": false, "error": why.to_string() })
            ),
            Ok(r) if json => println!("{}", status_json(&r, now)),
            Err(why) => println!("{g}: INVALID rollout record: {why}"),
            Ok(r) if group.is_none() => {
                let (waiting, sent, committed, failed) = r.counts();
                println!(
                    "{g}: {} {}: {} ({committed} committed, {failed} failed, {sent} pending, {waiting} waiting)",
                    r.id,
                    r.label(),
                    state(&r, now)
                );
            }
            Ok(r) => print!("{}", describe(&r, now)),
        }
    }
    Ok(())
}

/// Records read while a part of one was missing.
struct Partial(Vec<(String, Result<Rollout, OpenError>)>);

impl crate::fleet::parts::Incomplete for Partial {
    fn is_incomplete(&self) -> bool {
        true
    }
}

/// `30m`, `2h`, `90s`: a duration as the flags take it.
pub fn duration(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms => format!("{}s", ms.div_ceil(1000)),
    }
}

/// The cohort, gates, soak, sample and schedule of `p`, a line each (none without
/// them).
pub fn policy_lines(p: &Policy) -> Vec<String> {
    let mut lines = Vec::new();
    if !p.cohort.is_empty() {
        lines.push(format!(
            "cohort:   the members where {} (the others are neither updated nor the control)",
            p.cohort.join(" and ")
        ));
    }
    lines.extend(p.gates.iter().map(|g| format!("gate:     {g}")));
    if !p.gates.is_empty() {
        lines.push(format!(
            "soak:     {}: a wave's gates judge it this long after its last device answered",
            duration(p.soak_ms)
        ));
    }
    if let Some(share) = p.sample_percent {
        lines.push(format!(
            "sample:   {share}% of the devices a wave, drawn at random from those not sent it yet"
        ));
    }
    let mut schedule = Vec::new();
    if let Some(interval) = p.wave_interval_ms {
        schedule.push(format!(
            "a wave starts at least {} after the previous one started",
            duration(interval)
        ));
    }
    if let Some((from, until)) = p.window {
        schedule.push(format!(
            "waves start only from {} to {} UTC",
            hhmm(from),
            hhmm(until)
        ));
    }
    if !schedule.is_empty() {
        lines.push(format!("schedule: {}", schedule.join("; ")));
    }
    lines
}

/// What holds a running rollout's next step, if anything does.
#[derive(Debug, Clone, PartialEq)]
pub enum Held {
    /// `wave` soaks until `until_ms` (`again`: a gate was short of its sample at the
    /// end of the first soak, so it soaks once more).
    Soak {
        wave: u32,
        since_ms: u64,
        until_ms: u64,
        again: bool,
    },
    /// `wave` starts at `until_ms`, when the schedule allows (`why`: the interval,
    /// the window, or both).
    Schedule {
        wave: u32,
        until_ms: u64,
        why: Vec<String>,
    },
}

/// The hold of a running rollout, as of its last step.
pub fn held(r: &Rollout) -> Option<Held> {
    if !matches!(r.phase, Phase::Running { .. }) {
        return None;
    }
    let until_ms = r.deadline_ms()?;
    match r.hold? {
        Hold::Soak { wave, since_ms } => Some(Held::Soak {
            wave,
            since_ms,
            until_ms,
            again: until_ms > since_ms.saturating_add(r.policy.soak_ms),
        }),
        Hold::Schedule { wave } => {
            let mut why = Vec::new();
            let mut after = r.updated_ms;
            if let (Some(last), Some(interval)) = (r.wave_starts.last(), r.policy.wave_interval_ms)
            {
                if last.saturating_add(interval) > r.updated_ms {
                    after = last.saturating_add(interval);
                    why.push(format!(
                        "{} after wave {} started",
                        duration(interval),
                        r.wave_starts.len()
                    ));
                }
            }
            if let Some(w) = r.policy.window {
                if !in_window(w, after) {
                    why.push(format!("the window {}-{} UTC", hhmm(w.0), hhmm(w.1)));
                }
            }
            Some(Held::Schedule {
                wave,
                until_ms,
                why,
            })
        }
    }
}

/// The phase in words, truthful about a hold: a soaking or scheduled wave is never
/// said to be running. A hold past its time says so (its driver has not stepped it).
pub fn state(r: &Rollout, now: u64) -> String {
    let late = |until: u64| match now > until.saturating_add(5_000) {
        true => " (overdue: is its driver running? `kiln rollout resume` takes it up)",
        false => "",
    };
    match held(r) {
        Some(Held::Soak {
            wave,
            until_ms,
            again: false,
            ..
        }) => format!(
            "wave {} soaking until {} (its gates judge it then){}",
            wave + 1,
            utc(until_ms),
            late(until_ms)
        ),
        Some(Held::Soak {
            wave,
            until_ms,
            again: true,
            ..
        }) => format!(
            "wave {} soaking once more until {} (a gate was short of its sample){}",
            wave + 1,
            utc(until_ms),
            late(until_ms)
        ),
        Some(Held::Schedule {
            wave,
            until_ms,
            why,
        }) => {
            let why = match why.is_empty() {
                true => String::new(),
                false => format!(": {}", why.join(" and ")),
            };
            format!(
                "wave {} held for the schedule until {}{why}{}",
                wave + 1,
                utc(until_ms),
                late(until_ms)
            )
        }
        None => r.phase.to_string(),
    }
}

/// A rollout record for scripts: `kiln rollout status --json`, one object a line.
fn status_json(r: &Rollout, now: u64) -> serde_json::Value {
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
        "phase": state(r, now),
        "hold": held(r).map(|h| match h {
            Held::Soak { wave, since_ms, until_ms, again } => serde_json::json!({
                "kind": "soak", "wave": wave + 1, "since_ms": since_ms, "until_ms": until_ms, "again": again,
            }),
            Held::Schedule { wave, until_ms, why } => serde_json::json!({
                "kind": "schedule", "wave": wave + 1, "until_ms": until_ms, "why": why,
            }),
        }),
        "policy": {
            "max_failures": r.policy.wave_failures.to_string(),
            "max_total_failures": r.policy.total_failures.to_string(),
            "wave_timeout_ms": r.policy.wave_timeout_ms,
            "revert": r.policy.revert,
            "gates": r.policy.gates,
            "cohort": r.policy.cohort,
            "soak_ms": r.policy.soak_ms,
            "sample_percent": r.policy.sample_percent,
            "wave_interval_ms": r.policy.wave_interval_ms,
            "window": r.policy.window.map(|(a, b)| format!("{}-{}", hhmm(a), hhmm(b))),
        },
        "verdicts": verdicts(r).into_iter().map(|j| serde_json::json!({
            "wave": j.wave + 1, "at_ms": j.at_ms, "verdict": j.verdict, "lines": j.lines,
        })).collect::<Vec<_>>(),
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
    let _ = writeln!(s, "  phase:    {}", state(r, now));
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
    for line in policy_lines(p) {
        let _ = writeln!(s, "  {line}");
    }
    let judged = verdicts(r);
    let soaking = match held(r) {
        Some(Held::Soak { wave, .. }) => Some(wave),
        _ => None,
    };
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
        let gates = match judged.iter().rev().find(|j| j.wave as usize == i) {
            Some(j) => format!("; gates: {}", j.verdict),
            None if soaking == Some(i as u32) => "; gates: soaking".into(),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "  wave {}:   {} devices: {}{gates}",
            i + 1,
            wave.len(),
            counts.join(", ")
        );
        for j in judged.iter().filter(|j| j.wave as usize == i) {
            for line in &j.lines {
                let _ = writeln!(s, "            {}: {line}", j.verdict);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::rollout::gate::HealthSummary;
    use kiln_protocol::rollout::{Input, Threshold};

    const T0: u64 = 1_800_000_000_000;
    const SOAK: u64 = 60_000;

    use crate::fleet::rollout::tests::module;

    /// d1 in wave 1, d2 and d3 in wave 2, gated on traps, a wave an hour at most.
    fn rollout() -> Rollout {
        let mut policy = Policy::new(Threshold::Count(0), Threshold::Count(0), 600_000, true);
        policy.gates = vec!["traps <= 2x control".into(), "offline <= 50%".into()];
        policy.soak_ms = SOAK;
        policy.wave_interval_ms = Some(3_600_000);
        policy.window = Some((22 * 60, 4 * 60));
        let waves = vec![vec!["d1".to_string()], vec!["d2".into(), "d3".into()]];
        let mut r = Rollout::new(
            "fleet",
            "lab",
            "alice",
            T0,
            module(),
            policy,
            waves,
            BTreeMap::new(),
            Vec::new(),
        );
        // 23:00 UTC: within the window.
        let day = T0 - T0 % 86_400_000 + 23 * 3_600_000;
        r.step(day, Input::Start);
        r
    }

    fn health(device: &str, traps: u64) -> Input {
        Input::Health {
            device: device.into(),
            seq: traps + 1,
            summaries: vec![HealthSummary {
                calls: 1000,
                traps,
                ..HealthSummary::new("app")
            }],
        }
    }

    /// Wave 1 answered at `at`: the control reported, d1 committed and reported
    /// `traps`.
    fn soaking(traps: u64) -> (Rollout, u64) {
        let mut r = rollout();
        let at = r.updated_ms + 5_000;
        r.step(at, health("d2", 0));
        r.step(at, health("d3", 0));
        r.step(
            at,
            Input::Committed {
                device: "d1".into(),
            },
        );
        r.step(at + 1000, health("d1", traps));
        (r, at)
    }

    #[test]
    fn the_policy_is_shown_gate_by_gate_with_its_soak_sample_and_schedule() {
        let mut p = rollout().policy;
        p.sample_percent = Some(10);
        assert_eq!(
            policy_lines(&p),
            [
                "gate:     traps <= 2x control",
                "gate:     offline <= 50%",
                "soak:     1m: a wave's gates judge it this long after its last device answered",
                "sample:   10% of the devices a wave, drawn at random from those not sent it yet",
                "schedule: a wave starts at least 1h after the previous one started; waves start only from 22:00 to 04:00 UTC",
            ]
        );
        let plain = Policy::new(Threshold::Count(0), Threshold::Count(0), 1000, false);
        assert!(policy_lines(&plain).is_empty());
        let mut cohort = plain.clone();
        cohort.cohort = vec!["tag=canary".into(), "kilnd>=0.9.0".into()];
        assert_eq!(
            policy_lines(&cohort),
            ["cohort:   the members where tag=canary and kilnd>=0.9.0 (the others are neither updated nor the control)"]
        );
        assert_eq!(duration(90_000), "90s");
        assert_eq!(duration(2 * 86_400_000), "2d");
    }

    #[test]
    fn a_soaking_wave_is_never_said_to_be_running() {
        let (r, at) = soaking(0);
        assert!(matches!(r.phase, Phase::Running { .. }));
        let until = at + SOAK;
        let words = state(&r, at + 2000);
        assert_eq!(
            words,
            format!(
                "wave 1 soaking until {} (its gates judge it then)",
                utc(until)
            )
        );
        let text = describe(&r, at + 2000);
        assert!(text.contains(&format!("  phase:    {words}\n")), "{text}");
        assert!(!text.contains("running"), "{text}");
        assert!(
            text.contains("wave 1:   1 devices: 1 committed; gates: soaking"),
            "{text}"
        );
        assert!(text.contains("  gate:     traps <= 2x control\n"), "{text}");
        assert_eq!(
            crate::fleet::rollout::phase_words(&r),
            "soaking wave 1 before its gates judge it"
        );
        // Past its time with no step since, it says its driver has not judged it.
        assert!(state(&r, until + 60_000).contains("overdue"));
        let json = status_json(&r, at + 2000);
        assert_eq!(json["phase"], words);
        assert_eq!(json["hold"]["kind"], "soak");
        assert_eq!(json["hold"]["wave"], 1);
        assert_eq!(json["hold"]["until_ms"], until);
        assert_eq!(json["policy"]["soak_ms"], SOAK);
        assert_eq!(json["policy"]["window"], "22:00-04:00");
        assert_eq!(json["policy"]["gates"][1], "offline <= 50%");
        assert_eq!(json["policy"]["cohort"], serde_json::json!([]));
    }

    #[test]
    fn a_breach_is_shown_on_its_wave_with_the_breach_line() {
        let (mut r, at) = soaking(50);
        r.step(at + SOAK, Input::Tick);
        assert!(
            matches!(r.phase, Phase::Halted { wave: 0, .. }),
            "{}",
            r.phase
        );
        let v = verdicts(&r);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].wave, v[0].verdict), (0, "breach"));
        assert!(v[0].lines[0].starts_with("traps <= 2x control: "), "{v:?}");
        let text = describe(&r, at + SOAK);
        assert!(
            text.contains("wave 1:   1 devices: 1 committed, reverted; gates: breach"),
            "{text}"
        );
        assert!(
            text.contains("            breach: traps <= 2x control: "),
            "{text}"
        );
        assert!(text.contains("worst d1"), "{text}");
        assert!(text.contains("wave 2:   2 devices: 2 waiting\n"), "{text}");
        let json = status_json(&r, at + SOAK);
        assert_eq!(json["verdicts"][0]["verdict"], "breach");
        assert_eq!(json["verdicts"][0]["wave"], 1);
        assert!(json["hold"].is_null());
        assert!(json["phase"]
            .as_str()
            .unwrap()
            .starts_with("halted in wave 1: gate traps"));
    }

    #[test]
    fn a_passed_wave_then_the_schedule_holds_the_next() {
        let (mut r, at) = soaking(0);
        r.step(at + SOAK, Input::Tick);
        assert_eq!(verdicts(&r)[0].verdict, "pass");
        let until = r.deadline_ms().unwrap();
        assert_eq!(until, r.wave_starts[0] + 3_600_000);
        let words = state(&r, at + SOAK);
        assert_eq!(
            words,
            format!(
                "wave 2 held for the schedule until {}: 1h after wave 1 started",
                utc(until)
            )
        );
        let text = describe(&r, at + SOAK);
        assert!(
            text.contains("wave 1:   1 devices: 1 committed; gates: pass"),
            "{text}"
        );
        assert!(!text.contains("phase:    running"), "{text}");
        assert_eq!(
            crate::fleet::rollout::phase_words(&r),
            "holding wave 2 for the schedule"
        );
        let json = status_json(&r, at + SOAK);
        assert_eq!(json["hold"]["kind"], "schedule");
        assert_eq!(json["hold"]["wave"], 2);
        assert_eq!(json["verdicts"][0]["verdict"], "pass");
    }

    #[test]
    fn a_wave_short_of_its_sample_soaks_once_more_then_goes_on_unjudged() {
        let mut r = rollout();
        r.policy.gates = vec!["traps <= 2x control min 3".into()];
        r.policy.wave_interval_ms = None;
        r.policy.window = None;
        let at = r.updated_ms + 5_000;
        r.step(
            at,
            Input::Committed {
                device: "d1".into(),
            },
        );
        r.step(at + SOAK, Input::Tick);
        let words = state(&r, at + SOAK);
        assert_eq!(
            words,
            format!(
                "wave 1 soaking once more until {} (a gate was short of its sample)",
                utc(at + 2 * SOAK)
            )
        );
        r.step(at + 2 * SOAK, Input::Tick);
        let v = verdicts(&r);
        assert_eq!((v[0].wave, v[0].verdict), (0, "wait"), "{v:?}");
        assert!(
            v[0].lines[0].starts_with("went on unjudged: too few devices for traps"),
            "{v:?}"
        );
        assert_eq!(state(&r, at + 2 * SOAK), "running wave 2");
    }
}
