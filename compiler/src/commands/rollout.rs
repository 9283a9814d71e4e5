use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::fleet::{DesiredModule, Event, EventKind, ModuleState, Reported, Scope, Status};
use kiln_protocol::names::Kind;

use crate::broker::Session;
use crate::commands::push::{prepare_desired, ReleaseArgs};
use crate::commands::valid_name;
use crate::exit::{coded, Code};
use crate::release::Release;
use crate::trust::Identity;
use kiln_protocol::trust::Registry;

const AFTER_HELP: &str = "\
Devices are the members of the group according to their retained status. Each wave's
devices get the release as their own desired state; the next wave starts when every
device of this one has committed it. When every wave has committed, the release goes
into the group's desired state and leaves the devices' own, so the group's stays the
one to change (a later `kiln push --group` reaches every device).

A rollback or rejection halts the rollout: the devices not reached yet keep what they
run, the devices of the halted wave that did not commit fall back to the group's
version (or to their own entry for the module from before the rollout), and the
devices that committed keep the release in their own desired state (named on stderr).

Examples:
  kiln rollout app.kiln --group lab --sign fleet.key                 # 1 canary, then the rest
  kiln rollout app.kilnrel --group lab --sign fleet.key              # a release for every target
  kiln rollout app.kiln --group lab --sign fleet.key --canary 2 --wave-size 10";

/// Update a group's devices in waves, halting when a wave does not take the release
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RolloutCommand {
    /// Group whose devices to update
    #[arg(long)]
    pub group: String,
    /// Devices in the first wave
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// Devices per wave after the canaries [default: all the rest]
    #[arg(long)]
    pub wave_size: Option<usize>,
    /// How long one wave may take to commit
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub wave_timeout_s: u64,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

impl RolloutCommand {
    pub fn execute(self) -> Result<()> {
        valid_name(Kind::Group, &self.group)?;
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let mut release = self
            .release
            .load(&mut session, &Scope::Group(self.group.clone()))?;
        let topics = release.topics.clone();
        let registry = release.signing.fleet.registry(&mut session, &topics)?;
        let mut unverified = Vec::new();
        let mut devices: Vec<String> = session
            .retained(&topics.all_devices("status"))
            .map_err(unavailable)?
            .into_iter()
            .filter_map(|(topic, payload)| {
                let (s, signer) = Status::open(&topic, &payload).ok()?;
                let in_group = s.facts?.groups.contains(&self.group);
                let (device, _) = topics.parse_device(&topic)?;
                let identity = Identity::of(&registry, device, signer.as_ref());
                if in_group && !identity.is_verified() {
                    unverified.push(format!("{device} ({})", identity.word()));
                }
                in_group.then(|| device.to_string())
            })
            .collect();
        devices.sort();
        // Only reports signed by a device's enrolled key count as success: a device that
        // is not enrolled would hold its wave until the timeout.
        if !unverified.is_empty() {
            return Err(coded(
                Code::Key,
                anyhow!(
                    "group {}: the status of {} is not signed by an enrolled key; enroll them first (`kiln enroll --group {}`)",
                    self.group,
                    unverified.join(", "),
                    self.group
                ),
            ));
        }
        if devices.is_empty() {
            return Err(coded(
                Code::InvalidInput,
                anyhow!(
                    "no device has reported membership of group `{}`",
                    self.group
                ),
            ));
        }
        let waves = plan_waves(&devices, self.canary, self.wave_size);
        eprintln!(
            "rollout {} to group {}: {} devices in {} waves",
            release.label(),
            self.group,
            devices.len(),
            waves.len()
        );
        release.upload(&mut session)?;
        session
            .subscribe(&topics.all_devices("events"))
            .map_err(unavailable)?;
        session
            .subscribe(&topics.all_devices("reported"))
            .map_err(unavailable)?;
        let mut own = BTreeMap::new();
        let outcome = self.run_waves(&release, &mut session, &registry, &waves, &mut own)?;
        let had_own: BTreeSet<String> = own.keys().cloned().collect();
        let plan = end_plan(&waves, &outcome, &had_own);
        let ended = self.finish(&release, &mut session, &plan, &own);
        session.disconnect();
        match outcome {
            Outcome::Halted { wave, why, .. } => {
                // The halt is the failure to report; a failed clean-up is said too.
                if let Err(e) = ended {
                    eprintln!("kiln: error: {}", crate::exit::one_line(&e));
                }
                Err(halt(wave, why))
            }
            Outcome::Complete => {
                ended?;
                eprintln!(
                    "rollout complete: {} devices run {}; it is now group {}'s desired state",
                    devices.len(),
                    release.label(),
                    self.group
                );
                Ok(())
            }
        }
    }

    /// Runs the waves until all have committed, or one does not. `own` collects the
    /// entry for the module that a device's own desired state had before the rollout
    /// replaced it.
    fn run_waves(
        &self,
        release: &Release,
        session: &mut Session,
        registry: &Registry,
        waves: &[Vec<String>],
        own: &mut BTreeMap<String, DesiredModule>,
    ) -> Result<Outcome> {
        let topics = &release.topics;
        let unavailable = |e| coded(Code::Unavailable, e);
        let version = release.module.version;
        let name = &release.module.name;
        for (i, wave) in waves.iter().enumerate() {
            eprintln!("wave {}: {}", i + 1, wave.join(", "));
            for device in wave {
                let scope = Scope::Device(device.clone());
                let mut before = None;
                let next = prepare_desired(session, &release.signing, topics, &scope, |m| {
                    before = m.iter().position(|e| e.name == *name).map(|i| m.remove(i));
                    m.push(release.module.clone());
                })?;
                next.publish(session)?;
                if let Some(entry) = before {
                    own.insert(device.clone(), entry);
                }
            }
            let mut pending: BTreeSet<&String> = wave.iter().collect();
            let halted = |pending: &BTreeSet<&String>, why: String| Outcome::Halted {
                wave: i,
                why,
                committed: wave
                    .iter()
                    .filter(|d| !pending.contains(d))
                    .cloned()
                    .collect(),
            };
            let deadline = Instant::now() + Duration::from_secs(self.wave_timeout_s);
            while !pending.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let late: Vec<&str> = pending.iter().map(|s| s.as_str()).collect();
                    let why = format!(
                        "{} did not commit within {}s",
                        late.join(", "),
                        self.wave_timeout_s
                    );
                    return Ok(halted(&pending, why));
                }
                let Some((topic, payload)) = session.next_message(left).map_err(unavailable)?
                else {
                    continue;
                };
                let Some((device, kind)) = topics.parse_device(&topic) else {
                    continue;
                };
                let device = device.to_string();
                if !pending.contains(&device) {
                    continue;
                }
                match kind {
                    "events" => {
                        if let Ok((e, _)) = Event::open(&topic, &payload) {
                            if e.module == *name && e.version == version {
                                if let EventKind::RolledBack { .. } | EventKind::Rejected { .. } =
                                    e.kind
                                {
                                    let why = format!("{device}: {}", e.kind);
                                    return Ok(halted(&pending, why));
                                }
                            }
                        }
                    }
                    "reported" => {
                        if let Ok((r, signer)) = Reported::open(&topic, &payload) {
                            let identity = Identity::of(registry, &device, signer.as_ref());
                            if !identity.is_verified() {
                                eprintln!(
                                    "  {device}: a reported state not signed by its enrolled key ({}): not counted",
                                    identity.word()
                                );
                                continue;
                            }
                            let done = r.modules.iter().any(|m| {
                                m.name == *name
                                    && m.version == version
                                    && m.state == ModuleState::Running
                            });
                            if done {
                                eprintln!("  {device}: committed {}", release.label());
                                pending.remove(&device);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Outcome::Complete)
    }

    /// Carries out the end plan: the group's desired state first, so a device always
    /// has one that names the release while its own loses it.
    fn finish(
        &self,
        release: &Release,
        session: &mut Session,
        plan: &EndPlan,
        own: &BTreeMap<String, DesiredModule>,
    ) -> Result<()> {
        let label = release.label();
        if plan.to_group {
            let serial = release.set_desired(session, &Scope::Group(self.group.clone()))?;
            eprintln!(
                "group {}: desired state serial {serial} has {label}",
                self.group
            );
        }
        let name = &release.module.name;
        let restore = plan.restore.iter().filter_map(|d| Some((d, own.get(d)?)));
        let strip = plan.strip.iter().map(|d| (d, None));
        for (device, entry) in strip.chain(restore.map(|(d, e)| (d, Some(e)))) {
            let scope = Scope::Device(device.clone());
            let next = prepare_desired(session, &release.signing, &release.topics, &scope, |m| {
                m.retain(|e| e.name != *name);
                m.extend(entry.cloned());
            })?;
            // An empty module list is still published, signed, never cleared: the
            // device takes a device-scoped state that never arrives for one it has
            // not heard from, and would keep running what the old one named.
            next.publish(session)?;
        }
        if !plan.to_group && !plan.strip.is_empty() {
            eprintln!(
                "{}: {label} left their own desired state; they follow group {}'s again",
                plan.strip.join(", "),
                self.group
            );
        }
        for device in &plan.restore {
            if let Some(e) = own.get(device) {
                eprintln!(
                    "{device}: its own desired state has {name} v{} again, as before the rollout",
                    e.version
                );
            }
        }
        if !plan.keep.is_empty() {
            eprintln!(
                "{}: committed {label} and keep it in their own desired state, above group {}'s",
                plan.keep.join(", "),
                self.group
            );
        }
        Ok(())
    }
}

/// Splits the sorted members into a canary wave and waves of `wave_size` (all the
/// rest by default).
pub fn plan_waves(devices: &[String], canary: usize, wave_size: Option<usize>) -> Vec<Vec<String>> {
    if devices.is_empty() {
        return Vec::new();
    }
    let canary = canary.clamp(1, devices.len());
    let mut waves = vec![devices[..canary].to_vec()];
    let rest = &devices[canary..];
    if !rest.is_empty() {
        let size = wave_size.unwrap_or(rest.len()).max(1);
        waves.extend(rest.chunks(size).map(<[String]>::to_vec));
    }
    waves
}

/// How the waves went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every device of every wave committed the release.
    Complete,
    /// Wave `wave` (from 0) did not commit, for `why`; `committed` are its devices
    /// that did.
    Halted {
        wave: usize,
        why: String,
        committed: BTreeSet<String>,
    },
}

/// What the rollout leaves behind, so that a device-scoped entry (which shadows the
/// group's entry of the same module) stays only where it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndPlan {
    /// Publish the release into the group's desired state.
    pub to_group: bool,
    /// Devices whose own desired state loses the module.
    pub strip: Vec<String>,
    /// Devices whose own desired state gets back the entry it had before the rollout.
    pub restore: Vec<String>,
    /// Devices that committed the release and keep it in their own desired state.
    pub keep: Vec<String>,
}

/// Complete: the release becomes the group's, and every device the rollout wrote to
/// loses its own entry. Halted: the group's state is untouched; the halted wave's
/// devices that did not commit lose their entry and fall back to the group's version,
/// or, if their own desired state named the module before the rollout (`had_own`),
/// get that entry back; those that committed, and the earlier waves, keep the
/// release. Later waves were never written.
pub fn end_plan(waves: &[Vec<String>], outcome: &Outcome, had_own: &BTreeSet<String>) -> EndPlan {
    match outcome {
        Outcome::Complete => EndPlan {
            to_group: true,
            strip: waves.concat(),
            restore: Vec::new(),
            keep: Vec::new(),
        },
        Outcome::Halted {
            wave, committed, ..
        } => {
            let earlier = waves.iter().take(*wave).flatten();
            let halted = waves.get(*wave).map_or(&[][..], Vec::as_slice);
            let (restore, strip) = halted
                .iter()
                .filter(|d| !committed.contains(*d))
                .cloned()
                .partition(|d| had_own.contains(d));
            EndPlan {
                to_group: false,
                strip,
                restore,
                keep: earlier
                    .chain(halted.iter().filter(|d| committed.contains(*d)))
                    .cloned()
                    .collect(),
            }
        }
    }
}

fn halt(wave: usize, why: String) -> anyhow::Error {
    coded(
        Code::Failure,
        anyhow!("rollout halted in wave {}: {why}", wave + 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    #[test]
    fn waves_are_a_canary_then_fixed_sizes() {
        let w = plan_waves(&names(6), 1, Some(2));
        assert_eq!(
            w,
            [vec!["d0"], vec!["d1", "d2"], vec!["d3", "d4"], vec!["d5"]]
        );
        assert_eq!(
            plan_waves(&names(3), 0, None),
            [vec!["d0"], vec!["d1", "d2"]]
        );
        assert_eq!(plan_waves(&names(2), 5, None), [vec!["d0", "d1"]]);
    }

    #[test]
    fn a_complete_rollout_hands_the_release_to_the_group_and_clears_every_device_entry() {
        let waves = plan_waves(&names(4), 1, Some(2));
        // Even a device that had its own entry before loses it: the group's rules.
        let had_own = BTreeSet::from(["d1".to_string()]);
        let plan = end_plan(&waves, &Outcome::Complete, &had_own);
        assert!(plan.to_group);
        assert_eq!(plan.strip, names(4));
        assert!(plan.restore.is_empty() && plan.keep.is_empty());
    }

    #[test]
    fn a_halted_rollout_keeps_the_release_only_where_it_was_committed() {
        let waves = plan_waves(&names(6), 1, Some(3)); // [d0] [d1 d2 d3] [d4 d5]
        let committed = BTreeSet::from(["d2".to_string()]);
        let why = "d1: rolled back".to_string();
        let halted = Outcome::Halted {
            wave: 1,
            why,
            committed,
        };
        let plan = end_plan(&waves, &halted, &BTreeSet::new());
        assert!(!plan.to_group, "the group's state is left alone");
        assert_eq!(
            plan.strip,
            ["d1", "d3"],
            "the halted wave's others fall back to the group's"
        );
        assert!(plan.restore.is_empty());
        assert_eq!(plan.keep, ["d0", "d2"], "what committed keeps it");

        // d3 ran the module from its own desired state before: it gets that back.
        let had_own = BTreeSet::from(["d3".to_string(), "d4".to_string()]);
        let plan = end_plan(&waves, &halted, &had_own);
        assert_eq!(
            (plan.strip, plan.restore),
            (vec!["d1".to_string()], vec!["d3".to_string()])
        );

        // A canary that rolls back: only it is touched.
        let plan = end_plan(
            &waves,
            &Outcome::Halted {
                wave: 0,
                why: "d0: rolled back".into(),
                committed: BTreeSet::new(),
            },
            &BTreeSet::new(),
        );
        assert_eq!((plan.strip, plan.keep), (vec!["d0".to_string()], vec![]));
    }
}
