//! The model test of rollout recovery: [`Recovery`] and the driver's [`carry_out`],
//! run against a simulated broker that goes away at any step of a driver (a wait, a
//! read, a publish cut short after some devices, the record; sometimes restarting
//! without persistence) and drivers that die at any step (their machine gone, the
//! rollout taken up by `resume`), with devices that commit what they are sent.
//!
//! Two fixes that only CI's end-to-end tests caught are properties here:
//!
//! - 7839389 (*the broker going away at any step of the driver, not only while
//!   waiting for a message, is survived*): property 1, a broker away for less than
//!   the reconnect window at any step never stops the driver; and property 2 after a reconnect,
//!   a publish cut short leaves no device on record as sent that never got the
//!   release (the driver sends it again to every device still pending once caught
//!   up). Reverting either half (reconnecting only when a wait failed; no send again
//!   after catching up) fails the test.
//! - 2f11253 (*resume sends the release again to the devices still pending*): property
//!   2 after a take-over, a driver killed between writing the record and publishing
//!   leaves no device pending that never got the release, which would otherwise wait
//!   for the wave timeout. Reverting it (nothing sent on taking up) fails the test.
//!
//! Property 3: every rollout completes, every device committed, well before any wave
//! times out, and the release is the group's.
//!
//! Two gaps the model found are left out of it, for a change of their own (each
//! changes what kiln does): a driver that dies after writing a new rollout's record but
//! before its first wave's (the half second `claim` waits) leaves a record that
//! `resume` carries on from wave 2, wave 1 never sent (`Rollout::step`'s `Resume`); and
//! the finish's publish cut short (the group's desired state, then the devices' own)
//! is not done again after a reconnect, and a dead driver's complete rollout is not
//! resumed. Deaths here come after the first wave is on record, and the group's state
//! is checked only in runs without a fault.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Result};
use kiln_protocol::fleet::{DesiredModule, ModuleLimits};
use kiln_protocol::rollout::{
    plan_waves, Action, Input, Outcome, Phase, Policy, Rollout, Threshold,
};
use proptest::prelude::*;

use super::driver::{carry_out, Effects};
use super::recovery::{
    may_resume, Do, Doing, Event, Kept, Recovery, TakeUp, ORPHANED_MS, RECONNECT_FOR_MS,
};
use crate::exit::{code_of, Code};
use crate::fleet::Error;

/// What goes wrong at one step of a driver.
#[derive(Debug, Clone)]
struct Fault {
    /// The driver's machine is gone here (else: the broker goes away).
    dies: bool,
    /// Reconnects that fail before the broker is back (well within the reconnect window).
    away_for: u32,
    /// The broker restarts without persistence: the record is lost.
    loses_record: bool,
    /// Of a publish cut short, how many devices' states went out first.
    delivered: usize,
}

/// The broker and the fleet.
#[derive(Default)]
struct World {
    now: u64,
    /// The record the broker keeps.
    kept: Option<Rollout>,
    /// Devices whose own desired state has the release.
    has_release: BTreeSet<String>,
    /// The group's desired state has it (the rollout finished).
    group_has_it: bool,
    /// `Some(n)`: the broker is away for `n` more reconnects.
    away: Option<u32>,
    /// The faults to come, by the number of the step they hit.
    faults: BTreeMap<u32, Fault>,
    steps: u32,
    /// How many devices the publish under way delivers if it is cut short.
    cut: usize,
    /// How many faults hit a driver.
    faults_hit: u32,
    /// What broke a property.
    broken: Vec<String>,
}

fn away() -> anyhow::Error {
    Error::Broker(anyhow!("the broker went away")).into()
}

/// A driver on the simulated broker: what `Driver` does, step for step.
struct Sim<'w> {
    world: &'w mut World,
    record: Rollout,
    recovery: Recovery,
    doing: Doing,
    dead: bool,
    /// In its loop (faults of the broker hit a driver there, as in CI's tests).
    looping: bool,
    /// The driver the record named when this one took it up.
    took_from: Option<String>,
}

impl Sim<'_> {
    /// One step on the broker, which may fail.
    fn step_on_broker(&mut self, doing: Doing) -> Result<()> {
        self.doing = doing;
        if self.dead {
            return Err(anyhow!("dead"));
        }
        if self.world.away.is_some() {
            return Err(away());
        }
        let n = self.world.steps;
        self.world.steps += 1;
        let armed = self.looping && self.recovery == Recovery::Driving;
        match self.world.faults.remove(&n) {
            Some(f) if f.dies && self.world.kept.as_ref().is_some_and(started) => {
                self.world.faults_hit += 1;
                self.dead = true;
                self.world.cut = f.delivered;
                Err(anyhow!("the driver's machine is gone"))
            }
            Some(f) if !f.dies && armed => {
                self.world.faults_hit += 1;
                self.world.away = Some(f.away_for);
                if f.loses_record {
                    self.world.kept = None;
                }
                self.world.cut = f.delivered;
                Err(away())
            }
            _ => Ok(()),
        }
    }

    fn apply(&mut self, input: Input) -> Result<()> {
        let phase = self.record.phase.clone();
        let actions = self.record.step(self.world.now, input);
        if !actions.is_empty() || self.record.phase != phase {
            Effects::persist(self)?;
        }
        for action in actions {
            Effects::perform(self, action)?;
        }
        Ok(())
    }

    /// One message (a device that has the release commits it), then the clock.
    fn turn(&mut self) -> Result<()> {
        self.step_on_broker(Doing::Waiting)?;
        self.world.now += 100;
        let answer = self
            .record
            .pending()
            .into_iter()
            .find(|d| self.world.has_release.contains(*d))
            .map(String::from);
        if let Some(device) = answer {
            self.apply(Input::Committed { device })?;
        }
        self.apply(Input::Tick)
    }

    /// `Driver::drive`, until the rollout stops running or the driver does.
    fn drive(&mut self, first: Input) -> Result<()> {
        let took_up = match first {
            Input::Resume => TakeUp::Resume,
            Input::Retry => TakeUp::Retry,
            _ => TakeUp::Start,
        };
        self.apply(first)?;
        carry_out(self, Event::TookUp(took_up), None)?;
        self.settled("taking it up");
        self.looping = true;
        for _ in 0..2000 {
            if !matches!(self.record.phase, Phase::Running { .. }) {
                return Ok(());
            }
            if let Err(e) = self.turn() {
                if self.dead {
                    return Err(e);
                }
                let away = code_of(&e) == Code::Unavailable;
                let doing = self.doing;
                carry_out(self, Event::Failed { doing, away }, Some(e))?;
                self.settled("a reconnect");
            }
        }
        Err(anyhow!("the rollout did not end"))
    }

    /// Property 2: once recovered, no device is pending on record that does not have
    /// the release (it would wait for the wave timeout).
    fn settled(&mut self, after: &str) {
        if self.dead || !matches!(self.record.phase, Phase::Running { .. }) {
            return;
        }
        let stranded: Vec<&str> = self
            .record
            .pending()
            .into_iter()
            .filter(|d| !self.world.has_release.contains(*d))
            .collect();
        if !stranded.is_empty() {
            self.world.broken.push(format!(
                "after {after}: {stranded:?} on record as sent, never sent the release"
            ));
        }
    }
}

impl Effects for Sim<'_> {
    fn record(&self) -> &Rollout {
        &self.record
    }
    fn parts(&mut self) -> (&Rollout, &mut Recovery) {
        (&self.record, &mut self.recovery)
    }
    fn doing(&self) -> Doing {
        self.doing
    }
    fn now_ms(&self) -> u64 {
        self.world.now
    }
    fn reconnect(&mut self) -> Result<()> {
        self.world.now += 1000;
        match self.world.away {
            Some(0) | None => {
                self.world.away = None;
                Ok(())
            }
            Some(n) => {
                self.world.away = Some(n - 1);
                Err(anyhow!("connection refused"))
            }
        }
    }
    fn record_kept(&mut self) -> Result<Kept> {
        self.step_on_broker(Doing::Reading)?;
        Ok(match &self.world.kept {
            None => Kept::Nothing,
            Some(k)
                if k.id == self.record.id
                    && matches!(k.phase, Phase::Running { .. })
                    && k.driver != self.record.driver
                    && Some(&k.driver) != self.took_from.as_ref() =>
            {
                Kept::TakenOver
            }
            Some(_) => Kept::Record,
        })
    }
    fn persist(&mut self) -> Result<()> {
        self.step_on_broker(Doing::Persisting)?;
        self.record.serial += 1;
        self.record.updated_ms = self.world.now;
        self.world.kept = Some(self.record.clone());
        Ok(())
    }
    fn subscribe(&mut self) -> Result<()> {
        self.step_on_broker(Doing::Waiting)
    }
    fn catch_up(&mut self) -> Result<()> {
        self.step_on_broker(Doing::Reading)?;
        let committed: Vec<String> = self
            .record
            .pending()
            .into_iter()
            .filter(|d| self.world.has_release.contains(*d))
            .map(String::from)
            .collect();
        for device in committed {
            self.apply(Input::Committed { device })?;
        }
        Ok(())
    }
    fn perform(&mut self, action: Action) -> Result<()> {
        let finish = matches!(action, Action::Finish(_));
        let result = self.publish(action);
        if finish && result.is_ok() {
            self.world.group_has_it = true;
        }
        result
    }
}

impl Sim<'_> {
    /// A desired state for each device of `action`: a read, then a publish that a
    /// fault may cut short after some devices.
    fn publish(&mut self, action: Action) -> Result<()> {
        self.step_on_broker(Doing::Reading)?;
        let published = self.step_on_broker(Doing::Publishing);
        let (devices, give) = match &action {
            Action::Send(d) => (d, true),
            Action::Return(d) => (d, false),
            Action::Finish(d) => (d, false),
        };
        let out = if published.is_ok() {
            devices.len()
        } else {
            self.world.cut.min(devices.len())
        };
        for d in &devices[..out] {
            if give {
                self.world.has_release.insert(d.clone());
            } else {
                self.world.has_release.remove(d);
            }
        }
        published
    }
}

/// Whether a record has its first wave on record (sent, or further).
fn started(record: &Rollout) -> bool {
    record
        .devices
        .values()
        .any(|d| d.outcome != Outcome::Waiting)
}

/// The module the rollout tests (here and beside the driver and `status`) roll out.
pub(crate) fn module() -> DesiredModule {
    DesiredModule {
        name: "app".into(),
        version: 2,
        artifacts: Vec::new(),
        config: Vec::new(),
        limits: ModuleLimits::default(),
        allow_downgrade: false,
        health_window_ms: 1000,
    }
}

/// A rollout of `devices` in waves of `sizes`, driven (and taken up after each
/// driver's death) to its end.
fn run(devices: usize, sizes: &[usize], faults: BTreeMap<u32, Fault>) -> World {
    let names: Vec<String> = (0..devices).map(|i| format!("dev-{i:02}")).collect();
    // A day: no wave may time out in a run of minutes.
    let policy = Policy::new(Threshold::Count(0), Threshold::Count(0), 86_400_000, false);
    let mut world = World {
        now: 1_000_000,
        faults,
        ..World::default()
    };
    let record = Rollout::new(
        "fleet",
        "lab",
        "alice",
        world.now,
        module(),
        policy,
        plan_waves(&names, sizes, None),
        BTreeMap::new(),
        Vec::new(),
    );
    let mut sim = Sim {
        world: &mut world,
        record,
        recovery: Recovery::default(),
        doing: Doing::Waiting,
        dead: false,
        looping: false,
        took_from: None,
    };
    let mut result = match Effects::persist(&mut sim) {
        Ok(()) => sim.drive(Input::Start),
        Err(e) => Err(e),
    };
    let mut dead = sim.dead;
    let mut record = sim.record.clone();
    for driver in 1..20 {
        if !dead {
            break;
        }
        // A driver died: after its silence, an operator takes the rollout up
        // (`kiln rollout resume`): the record the broker keeps, caught up, resumed.
        world.away = None;
        world.now += ORPHANED_MS;
        let Some(kept) = world.kept.clone() else {
            // It died before the record was ever written: nothing was started.
            return world;
        };
        if kept.phase == Phase::Complete {
            // It died finishing (a known gap: see the module's doc).
            record = kept;
            dead = false;
            result = Ok(());
            break;
        }
        if let Err(why) = may_resume(&kept, world.now, false) {
            world.broken.push(format!("resume refused: {why}"));
            return world;
        }
        let mut sim = Sim {
            world: &mut world,
            record: kept,
            recovery: Recovery::default(),
            doing: Doing::Waiting,
            dead: false,
            looping: false,
            took_from: None,
        };
        sim.took_from = Some(std::mem::replace(
            &mut sim.record.driver,
            format!("operator {driver}"),
        ));
        result = match sim.catch_up() {
            Ok(()) => sim.drive(Input::Resume),
            Err(e) => Err(e),
        };
        dead = sim.dead;
        record = sim.record.clone();
    }
    // Property 1: a broker away within the reconnect window never stops a driver.
    if let (Err(e), false) = (&result, dead) {
        world.broken.push(format!("the driver stopped: {e:#}"));
    }
    // Property 3: done, every device committed (the release the group's, but for the
    // known gap of a finish cut short).
    if record.phase != Phase::Complete {
        world.broken.push(format!("ended {}", record.phase));
    } else if !world.group_has_it && world.faults_hit == 0 {
        world
            .broken
            .push("complete, but the group's state lacks it".into());
    }
    for (name, d) in &record.devices {
        if !matches!(d.outcome, Outcome::Committed { .. }) {
            world.broken.push(format!("{name}: {:?}", d.outcome));
        }
    }
    world
}

fn fault() -> impl Strategy<Value = Fault> {
    (
        prop::bool::weighted(0.3),
        0u32..50,
        prop::bool::ANY,
        0usize..4,
    )
        .prop_map(|(dies, away_for, loses_record, delivered)| Fault {
            dies,
            away_for,
            loses_record,
            delivered,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any rollout, a broker that goes away at any step (cutting publishes short,
    /// losing the record) and drivers that die at any step: see the module's doc.
    #[test]
    fn a_rollout_survives_the_broker_going_away_and_its_driver_dying(
        devices in 1usize..8,
        sizes in prop::collection::vec(1usize..4, 0..3),
        faults in prop::collection::btree_map(0u32..120, fault(), 0..6),
    ) {
        let world = run(devices, &sizes, faults);
        prop_assert!(world.broken.is_empty(), "{:#?}", world.broken);
    }
}

/// The two cases CI caught, spelled out: a publish cut short by a broker restart, and
/// a driver killed between writing the record and publishing.
#[test]
fn the_cases_ci_caught_end_to_end() {
    // Two waves (1, then 3 devices): a fault at each step of the whole run in turn,
    // among them the publish of wave 2 cut short after one device.
    for at in 0..60 {
        let cut = Fault {
            dies: false,
            away_for: 3,
            loses_record: true,
            delivered: 1,
        };
        let world = run(4, &[1, 3], BTreeMap::from([(at, cut)]));
        assert!(
            world.broken.is_empty(),
            "broker away at step {at}: {:#?}",
            world.broken
        );
        let killed = Fault {
            dies: true,
            away_for: 0,
            loses_record: false,
            delivered: 0,
        };
        let world = run(4, &[1, 3], BTreeMap::from([(at, killed)]));
        assert!(
            world.broken.is_empty(),
            "driver killed at step {at}: {:#?}",
            world.broken
        );
    }
}

#[test]
fn a_broker_away_past_the_reconnect_window_stops_the_driver_and_resume_takes_it_up() {
    let record = Rollout::new(
        "fleet",
        "lab",
        "alice",
        0,
        module(),
        Policy::new(Threshold::Count(0), Threshold::Count(0), 60_000, false),
        vec![vec!["a".into()]],
        BTreeMap::new(),
        Vec::new(),
    );
    let mut r = Recovery::default();
    let failed = Event::Failed {
        doing: Doing::Publishing,
        away: true,
    };
    assert_eq!(r.step(&record, 1000, failed), [Do::Reconnect]);
    assert_eq!(r.step(&record, 30_000, Event::StillAway), [Do::Reconnect]);
    assert_eq!(
        r.step(&record, 1000 + RECONNECT_FOR_MS, Event::StillAway),
        [Do::GiveUp]
    );
    assert!(r.stopped());
    // Away again while catching up (a cluster's node refusing the subscription while
    // it elects leaders): reconnect again, within the same window.
    let mut r = Recovery::default();
    let refused = Event::Failed {
        doing: Doing::Waiting,
        away: true,
    };
    assert_eq!(r.step(&record, 1000, refused.clone()), [Do::Reconnect]);
    let back = Event::Reconnected { record_kept: true };
    assert_eq!(
        r.step(&record, 2000, back.clone()),
        [Do::Subscribe, Do::CatchUp]
    );
    assert_eq!(r.step(&record, 2500, refused.clone()), [Do::Reconnect]);
    // The same when the read of the record just after reconnecting is refused.
    assert_eq!(r.step(&record, 2600, refused.clone()), [Do::Reconnect]);
    assert_eq!(r.step(&record, 3000, back), [Do::Subscribe, Do::CatchUp]);
    assert_eq!(
        r.step(&record, 1000 + RECONNECT_FOR_MS, refused),
        [Do::Reconnect]
    );
    assert_eq!(
        r.step(&record, 1000 + RECONNECT_FOR_MS, Event::StillAway),
        [Do::GiveUp]
    );
    // Something else failing stops it at once.
    let mut r = Recovery::default();
    let other = Event::Failed {
        doing: Doing::Persisting,
        away: false,
    };
    assert_eq!(r.step(&record, 0, other), [Do::Fail]);
    // Resume: a paused one, or a running one whose driver is silent (or --take-over).
    assert!(may_resume(&record, ORPHANED_MS - 1, false).is_err());
    assert!(may_resume(&record, ORPHANED_MS - 1, true).is_ok());
    assert!(may_resume(&record, ORPHANED_MS, false).is_ok());
}

/// A driver away longer than `resume` waits for (a cluster slow to take subscriptions
/// again) while an operator took the rollout up elsewhere: back, it finds the record
/// names the other driver and stops without writing a thing; the driver it took the
/// rollout up from does not make the new one yield.
#[test]
fn a_driver_back_after_its_rollout_was_taken_up_stops_without_writing() {
    // A driver outlasts resume's wait.
    const { assert!(RECONNECT_FOR_MS > 2 * ORPHANED_MS) };
    let names: Vec<String> = (0..3).map(|i| format!("dev-{i}")).collect();
    let mut record = Rollout::new(
        "fleet",
        "lab",
        "alice",
        1_000_000,
        module(),
        Policy::new(Threshold::Count(0), Threshold::Count(0), 86_400_000, false),
        plan_waves(&names, &[1], None),
        BTreeMap::new(),
        Vec::new(),
    );
    record.driver = "alice pid 1".into();
    record.step(1_000_000, Input::Start);
    let mut theirs = record.clone();
    theirs.driver = "bob pid 2".into();
    theirs.serial = record.serial + 5;
    let mut world = World {
        now: 1_000_000 + ORPHANED_MS * 2,
        kept: Some(theirs.clone()),
        ..World::default()
    };
    let mut old = Sim {
        world: &mut world,
        record: record.clone(),
        recovery: Recovery::Away {
            since_ms: 1_000_000,
        },
        doing: Doing::Waiting,
        dead: false,
        looping: true,
        took_from: None,
    };
    let e = carry_out(&mut old, Event::StillAway, Some(away())).unwrap_err();
    assert_eq!(code_of(&e), Code::Busy, "{e:#}");
    assert!(
        format!("{e:#}").contains("another driver took it up"),
        "{e:#}"
    );
    assert!(old.recovery.stopped());
    assert_eq!(
        world.kept.as_ref(),
        Some(&theirs),
        "nothing written over it"
    );

    // The new driver hears the old one's last write: not a take-over.
    let mut stale = record.clone();
    stale.serial = theirs.serial + 1;
    world.kept = Some(stale);
    let mut new = Sim {
        world: &mut world,
        record: theirs,
        recovery: Recovery::Away {
            since_ms: 1_000_000 + ORPHANED_MS * 2,
        },
        doing: Doing::Waiting,
        dead: false,
        looping: true,
        took_from: Some("alice pid 1".into()),
    };
    carry_out(&mut new, Event::StillAway, Some(away())).unwrap();
    assert!(!new.recovery.stopped());
}

#[test]
fn a_take_over_stops_a_driver_in_any_state() {
    let record = Rollout::new(
        "fleet",
        "lab",
        "alice",
        0,
        module(),
        Policy::new(Threshold::Count(0), Threshold::Count(0), 60_000, false),
        vec![vec!["a".into()]],
        BTreeMap::new(),
        Vec::new(),
    );
    for state in [
        Recovery::Driving,
        Recovery::Resending,
        Recovery::Away { since_ms: 0 },
        Recovery::CatchingUp { since_ms: 0 },
    ] {
        let mut r = state.clone();
        assert_eq!(
            r.step(&record, 10, Event::TakenOver),
            [Do::Yield],
            "{state:?}"
        );
        assert!(r.stopped());
        assert!(r.step(&record, 20, Event::TakenOver).is_empty());
    }
}
