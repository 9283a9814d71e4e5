//! The driver of a rollout: it feeds [`Rollout::step`] what the broker delivers and
//! the clock, carries out the actions (desired states), keeps the signed record
//! current, and hands every failure to [`Recovery`], doing what it says.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use kiln_protocol::fleet::{DesiredModule, EventKind, ModuleState, Scope, Topics};
use kiln_protocol::rollout::{short_list, Action, Input, Phase, Rollout};
use kiln_protocol::trust::Registry;

use crate::exit::{code_of, Code};
use crate::fleet::broker::{now_ms, Session};
use crate::fleet::desired::{prepare_desired, prepare_for_devices};
use crate::fleet::messages::Body;
use crate::fleet::messages::Reader;
use crate::fleet::rollout::health::{HealthFeed, Taken};
use crate::fleet::rollout::recovery::{Do, Doing, Event, Kept, Recovery, TakeUp};
use crate::fleet::rollout::{busy, failures, phase_words, read_whole_record, unavailable};
use crate::fleet::trust::Signing;
use crate::fleet::Error;

/// The driver writes the record at least this often (its heartbeat), and at most
/// this often while only outcomes change.
const HEARTBEAT: Duration = Duration::from_secs(30);
const COALESCE: Duration = Duration::from_secs(2);
/// While devices are pending, the driver reads their retained reported states this
/// often: a broker may drop live answers it cannot queue (mosquitto keeps at most
/// 1,000 QoS 1 messages a client past 20 in flight), and a device whose answer was
/// dropped must not count as silent.
const CATCH_UP: Duration = Duration::from_secs(15);

pub struct Driver<'a> {
    pub session: Session,
    signing: &'a Signing,
    topics: Topics,
    registry: Registry,
    pub record: Rollout,
    topic: String,
    last_persist: Instant,
    last_catch_up: Instant,
    dirty: bool,
    /// What to do when the broker goes away, or on taking the rollout up.
    recovery: Recovery,
    /// The step under way, for [`Recovery`] when it fails.
    doing: Doing,
    /// The devices' health messages taken for the gates, and those refused.
    health: HealthFeed,
    /// The record's part topics the broker holds (None: not read yet), and the last
    /// head this driver wrote (its own, coming back, is not another operator's).
    held: Option<BTreeSet<String>>,
    last_head: Vec<u8>,
    /// The driver the record named when this one took the rollout up (resume,
    /// retry): its writes still in flight are not a take-over.
    pub took_from: Option<String>,
    /// Whether its writes clear the record's parts its head no longer names: a
    /// driver's do; an operator's pause or abort beside a running driver must not,
    /// or the driver's next head could name a part it cleared. The driver writes
    /// again after any other writer's head, so what it leaves is whole.
    pub clears: bool,
}

impl<'a> Driver<'a> {
    pub fn new(
        session: Session,
        signing: &'a Signing,
        topics: Topics,
        registry: Registry,
        record: Rollout,
    ) -> Self {
        let topic = topics.rollout(&record.group);
        Self {
            session,
            signing,
            topics,
            registry,
            record,
            topic,
            last_persist: Instant::now(),
            last_catch_up: Instant::now(),
            dirty: false,
            recovery: Recovery::default(),
            doing: Doing::Waiting,
            health: HealthFeed::default(),
            held: None,
            last_head: Vec::new(),
            took_from: None,
            clears: true,
        }
    }

    /// This driver takes the rollout up (resume, retry) as `name`, from the driver the
    /// record names.
    pub fn take_up(&mut self, name: String) {
        self.took_from = Some(std::mem::replace(&mut self.record.driver, name));
    }

    /// Writes the record (retained, signed) and waits for the broker to have it.
    pub fn persist(&mut self) -> Result<()> {
        self.doing = Doing::Persisting;
        self.record.serial += 1;
        self.record.updated_ms = now_ms();
        let keys: Vec<_> = self.signing.keys.iter().collect();
        let sealed = self
            .record
            .seal(&keys)
            .map_err(|e| Error::invalid(anyhow!(e)))?;
        let held = match self.held.take() {
            Some(held) => held,
            None => self
                .session
                .retained(&self.topics.rollout_all(&self.record.group))
                .map_err(unavailable)?
                .into_keys()
                .filter(|t| matches!(self.topics.parse_rollout(t), Some((_, Some(_)))))
                .collect(),
        };
        let head = sealed.head.clone();
        let (topics, group) = (&self.topics, &self.record.group);
        let part = |sha: &[u8; 32]| topics.rollout_part(group, sha);
        let named = crate::fleet::parts::publish(
            &mut self.session,
            &self.topic,
            part,
            (&held, self.clears),
            sealed,
        )
        .map_err(unavailable)?;
        self.held = Some(named);
        self.last_head = head;
        self.last_persist = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// The record the broker keeps for this rollout's group now.
    pub fn kept(&mut self) -> Result<Option<Rollout>> {
        self.doing = Doing::Reading;
        let kept = read_whole_record(
            &mut self.session,
            self.signing.fleet.root(),
            &self.topics,
            &self.record.group,
        )?;
        Ok(kept.map(|(record, held)| {
            self.held = Some(held);
            record
        }))
    }

    /// Two operators starting at once: the broker keeps one record; whoever's is not
    /// it stops before any device was sent anything.
    pub fn claim(&mut self) -> Result<()> {
        std::thread::sleep(Duration::from_millis(500));
        let kept = self.kept()?;
        match kept {
            Some(other) if other.id != self.record.id => Err(busy(&other).into()),
            _ => Ok(()),
        }
    }

    /// Whether the policy has health gates (and the driver reads health messages).
    fn gated(&self) -> bool {
        !self.record.policy.gates.is_empty()
    }

    /// The devices' answers (and, with gates, their health), then (once this driver's
    /// own record is the one kept) the record's topic, where an operator's pause or
    /// abort arrives.
    fn subscribe(&mut self, record: bool) -> Result<()> {
        self.doing = Doing::Waiting;
        let mut filters = vec![
            self.topics.all_devices("events"),
            self.topics.all_devices("reported"),
        ];
        if self.gated() {
            filters.push(self.topics.all_devices("health"));
        }
        if record {
            filters.push(self.topic.clone());
        }
        for filter in filters {
            self.session.subscribe(&filter).map_err(unavailable)?;
        }
        Ok(())
    }

    /// What the retained reported states say of the devices still pending: the
    /// answers a driver that was away (dead, or disconnected) missed.
    pub fn catch_up(&mut self) -> Result<()> {
        self.read_retained("reported")
    }

    /// The devices' retained health (their last period each), fed before the first
    /// wave so its devices have a baseline and the control has data.
    pub fn read_health(&mut self) -> Result<()> {
        if !self.gated() {
            return Ok(());
        }
        self.read_retained("health")
    }

    /// Every device's retained message of `kind`, taken as if it had just arrived.
    fn read_retained(&mut self, kind: &str) -> Result<()> {
        self.doing = Doing::Reading;
        let retained = self
            .session
            .retained(&self.topics.all_devices(kind))
            .map_err(unavailable)?;
        for (topic, payload) in retained {
            self.on_device_message(&topic, &payload)?;
        }
        Ok(())
    }

    /// Steps the record and carries out what it says; the record is written when the
    /// phase changed or a wave went out, and otherwise at most every two seconds.
    pub fn apply(&mut self, input: Input) -> Result<()> {
        let phase = self.record.phase.clone();
        let hold = self.record.hold;
        let actions = self.record.step(now_ms(), input);
        self.dirty = true;
        let urgent = !actions.is_empty() || self.record.phase != phase;
        if urgent {
            // Sent is on record before any device is sent the release, so an abort
            // from elsewhere knows whom to give back.
            self.persist()?;
        }
        for action in actions {
            self.perform(action)?;
        }
        if self.record.phase != phase {
            eprintln!("rollout {}: {}", self.record.id, phase_words(&self.record));
        } else if self.record.hold != hold && self.record.hold.is_some() {
            // A soak or the schedule holds it: what the history says of it.
            if let Some((_, line)) = self.record.history.last() {
                eprintln!("rollout {}: {line}", self.record.id);
            }
        }
        Ok(())
    }

    fn perform(&mut self, action: Action) -> Result<()> {
        self.doing = Doing::Reading;
        let name = self.record.module.name.clone();
        let module = self.record.module.clone();
        let (devices, what) = match &action {
            Action::Send(d) => (d.clone(), "sent"),
            Action::Return(d) => (d.clone(), "given back what they had"),
            Action::Finish(d) => {
                let scope = Scope::Group(self.record.group.clone());
                let next =
                    prepare_desired(&mut self.session, self.signing, &self.topics, &scope, |m| {
                        m.retain(|e| e.name != name);
                        m.push(module.clone());
                    })?;
                self.doing = Doing::Publishing;
                let serial = next.publish(&mut self.session)?;
                eprintln!(
                    "group {}: desired state serial {serial} has {}",
                    self.record.group,
                    self.record.label()
                );
                (d.clone(), "follow the group's desired state again")
            }
        };
        let before: BTreeMap<String, Option<DesiredModule>> = devices
            .iter()
            .map(|d| {
                let entry = self.record.devices.get(d).and_then(|x| x.before.clone());
                (d.clone(), entry)
            })
            .collect();
        if matches!(action, Action::Return(_)) && before.values().any(Option::is_none) {
            self.let_the_group_take_back(&name)?;
        }
        self.doing = Doing::Reading;
        let states = prepare_for_devices(
            &mut self.session,
            self.signing,
            &self.topics,
            &devices,
            |device, m| {
                m.retain(|e| e.name != name);
                match &action {
                    Action::Send(_) => m.push(module.clone()),
                    // What it had, signed as a downgrade: a device that committed
                    // the release refuses anything older without it.
                    Action::Return(_) => {
                        m.extend(before.get(device).cloned().flatten().map(|mut had| {
                            had.allow_downgrade = true;
                            had
                        }))
                    }
                    // An empty module list is still published, signed, never cleared:
                    // a device takes a device-scoped state that never arrives for one it
                    // has not heard from, and would keep running what the old one named.
                    Action::Finish(_) => {}
                }
            },
        )?;
        let messages = states.into_iter().map(|n| (n.topic, n.signed)).collect();
        self.doing = Doing::Publishing;
        self.session
            .publish_all(messages, |_| {})
            .map_err(Error::Broker)?;
        eprintln!("  {} {what}: {}", devices.len(), short_list(&devices));
        Ok(())
    }

    /// A device given back with no entry of its own follows the group's desired state
    /// again, whose entry for `name` is older than the release a committed device now
    /// runs: without `allow_downgrade` the device refuses it and keeps the release. So
    /// the group's entry is signed again allowing the downgrade (devices that never
    /// left it are not moved by that); the next push to the group replaces it.
    fn let_the_group_take_back(&mut self, name: &str) -> Result<()> {
        let scope = Scope::Group(self.record.group.clone());
        let mut needed = false;
        self.doing = Doing::Reading;
        let next = prepare_desired(&mut self.session, self.signing, &self.topics, &scope, |m| {
            for entry in m
                .iter_mut()
                .filter(|e| e.name == name && !e.allow_downgrade)
            {
                entry.allow_downgrade = true;
                needed = true;
            }
        })?;
        if needed {
            self.doing = Doing::Publishing;
            let serial = next.publish(&mut self.session)?;
            eprintln!(
                "group {}: desired state serial {serial} lets devices given back go down to it",
                self.record.group
            );
        }
        Ok(())
    }

    /// Runs the rollout until it is no longer running: it completed, halted, or an
    /// operator paused or aborted it.
    pub fn drive(mut self, first: Input) -> Result<()> {
        self.subscribe(false)?;
        let took_up = match first {
            Input::Resume => TakeUp::Resume,
            Input::Retry => TakeUp::Retry,
            _ => TakeUp::Start,
        };
        if took_up == TakeUp::Start {
            self.read_health()?;
        }
        self.apply(first)?;
        // What taking it up, and any step failing below, call for is Recovery's to say.
        carry_out(&mut self, Event::TookUp(took_up), None)?;
        self.subscribe(true)?;
        let mut last_tick = Instant::now();
        while matches!(self.record.phase, Phase::Running { .. }) {
            if let Err(e) = self.turn(&mut last_tick) {
                if self.recovery.stopped() {
                    // It yielded to another driver: nothing more is written.
                    return Err(e);
                }
                let away = code_of(&e) == Code::Unavailable;
                let doing = self.doing;
                carry_out(&mut self, Event::Failed { doing, away }, Some(e))?;
            }
        }
        if self.dirty {
            self.persist()?;
        }
        if !self.health.refused.is_empty() {
            let devices: Vec<String> = self.health.refused.keys().cloned().collect();
            eprintln!(
                "  {} health messages refused (not judged), from {}",
                self.health.refused_count(),
                short_list(&devices)
            );
        }
        let r = &self.record;
        let (_, _, committed, failed) = r.counts();
        let result = match &r.phase {
            Phase::Complete if !r.policy.cohort.is_empty() => {
                println!(
                    "rollout complete: {committed} devices run {}, {failed} failed; they keep it in their own desired states (the cohort where {}), group {}'s is unchanged",
                    r.label(),
                    r.policy.cohort.join(" and "),
                    r.group
                );
                Ok(())
            }
            Phase::Complete => {
                println!(
                    "rollout complete: {committed} devices run {}, {failed} failed; it is now group {}'s desired state",
                    r.label(),
                    r.group
                );
                Ok(())
            }
            Phase::Paused { by, .. } => {
                eprintln!(
                    "rollout {} paused by {by}; `kiln rollout resume --group {}` goes on",
                    r.id, r.group
                );
                Ok(())
            }
            Phase::Halted { wave, why } => Err(Error::Stopped(format!(
                "rollout halted in wave {}: {why}: {}",
                wave + 1,
                failures(r)
            ))
            .into()),
            Phase::Aborted { by, wave } => {
                Err(Error::Stopped(format!("rollout aborted in wave {} by {by}", wave + 1)).into())
            }
            Phase::Running { .. } => unreachable!("the loop ends when the rollout does"),
        };
        self.session.disconnect();
        result
    }

    /// One message (or a second without one), the clock, and the record's heartbeat.
    fn turn(&mut self, last_tick: &mut Instant) -> Result<()> {
        // The step needs the clock at its deadline (a soak's end, the schedule's next
        // start, the wave's timeout) and, for anything else, once a second.
        let deadline = self.record.deadline_ms();
        let wait = deadline
            .map_or(1000, |d| d.saturating_sub(now_ms()))
            .clamp(10, 1000);
        self.doing = Doing::Waiting;
        let message = self
            .session
            .next_message(Duration::from_millis(wait))
            .map_err(unavailable)?;
        if let Some((topic, payload)) = message {
            if topic == self.topic {
                // Another operator's write (a pause, an abort, a driver taking the
                // rollout up): its head names parts, read with it.
                if !payload.is_empty() && payload != self.last_head {
                    // The head as delivered: this driver's own write may have landed
                    // after it and taken its place on the broker, but a pause or abort
                    // it carries still stands.
                    let heard = Rollout::verify_head(
                        &payload,
                        self.signing.fleet.root(),
                        &self.record.group,
                    );
                    let kept = self.kept()?;
                    let taken = kept.iter().chain(heard.as_ref().ok());
                    if taken.into_iter().any(|r| self.taken_over_by(r)) {
                        return carry_out(self, Event::TakenOver, None);
                    }
                    if let Some(theirs) = kept {
                        self.take_over(theirs)?;
                    }
                    if let Ok(heard) = heard {
                        self.heed(heard)?;
                    }
                    // Another writer's parts and this driver's may have crossed (a
                    // head naming a part the other cleared): written again, whole,
                    // over what the broker read just now holds.
                    if matches!(self.record.phase, Phase::Running { .. }) {
                        self.held = None;
                        self.persist()?;
                    }
                }
            } else {
                self.on_device_message(&topic, &payload)?;
            }
        }
        let due = deadline.is_some_and(|d| now_ms() >= d)
            || last_tick.elapsed() >= Duration::from_secs(1);
        if due && last_tick.elapsed() >= Duration::from_millis(10) {
            *last_tick = Instant::now();
            self.apply(Input::Tick)?;
        }
        if self.last_catch_up.elapsed() >= CATCH_UP
            && matches!(self.record.phase, Phase::Running { .. })
            && !self.record.pending().is_empty()
        {
            self.last_catch_up = Instant::now();
            self.catch_up()?;
        }
        let due = self.last_persist.elapsed() >= HEARTBEAT
            || (self.dirty && self.last_persist.elapsed() >= COALESCE);
        if due && matches!(self.record.phase, Phase::Running { .. }) {
            self.persist()?;
        }
        Ok(())
    }

    /// A record on the rollout topic: our own echo, or an operator's pause or abort,
    /// which this driver takes on (adding what it did since their copy).
    fn take_over(&mut self, theirs: Rollout) -> Result<()> {
        if theirs.id != self.record.id {
            // A new rollout took the group (after an abort): this one is over.
            self.record.phase = Phase::Aborted {
                wave: 0,
                by: format!("rollout {} of {}", theirs.id, theirs.started_by),
            };
            self.dirty = false;
            return Ok(());
        }
        for (name, d) in &theirs.devices {
            if d.returned {
                if let Some(ours) = self.record.devices.get_mut(name) {
                    ours.returned = true;
                }
            }
        }
        self.record.serial = self.record.serial.max(theirs.serial);
        match theirs.phase {
            Phase::Paused { by, .. } => self.apply(Input::Pause { by })?,
            Phase::Aborted { by, .. } => self.apply(Input::Abort { by })?,
            _ => {}
        }
        Ok(())
    }

    /// Whether `theirs`, another writer's record of this rollout, says another driver
    /// runs it: one that took it up from this one (not the driver this one took it up
    /// from, whose late writes are only old news).
    fn taken_over_by(&self, theirs: &Rollout) -> bool {
        theirs.id == self.record.id
            && matches!(theirs.phase, Phase::Running { .. })
            && theirs.driver != self.record.driver
            && Some(&theirs.driver) != self.took_from.as_ref()
    }

    /// Another writer's head of this rollout, as it was delivered: its pause or abort
    /// is applied even when the record the broker now keeps is a later write of this
    /// driver's that was made without it (two writers, no compare-and-set).
    fn heed(&mut self, heard: Rollout) -> Result<()> {
        if heard.id != self.record.id || !matches!(self.record.phase, Phase::Running { .. }) {
            return Ok(());
        }
        match heard.phase {
            Phase::Paused { by, .. } => self.apply(Input::Pause { by }),
            Phase::Aborted { by, .. } => self.apply(Input::Abort { by }),
            _ => Ok(()),
        }
    }

    fn on_device_message(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        let taken = self
            .health
            .take(&self.topics, &self.registry, &self.record, topic, payload);
        match taken {
            Taken::NotHealth => {}
            Taken::Input(input) => return self.apply(input),
            Taken::Ignored => return Ok(()),
            Taken::Refused { device, why } => {
                if self
                    .health
                    .refused
                    .get(&device)
                    .is_some_and(|(n, _)| *n == 1)
                {
                    eprintln!("  warning: {device}: health not judged: {why}");
                }
                return Ok(());
            }
        }
        let heard = match Reader::new(&self.topics, &self.registry).open(topic, payload) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(skipped) => {
                eprintln!("  warning: skipped {skipped}");
                return Ok(());
            }
        };
        let (name, version) = (&self.record.module.name, self.record.module.version);
        let device = heard.device.clone();
        let input = match &heard.body {
            Body::Event(e) => {
                if e.module != *name || e.version != version || !heard.is_verified() {
                    return Ok(());
                }
                match e.kind {
                    EventKind::RolledBack { .. } | EventKind::Rejected { .. } => Input::Failed {
                        device,
                        why: e.kind.to_string(),
                    },
                    _ => return Ok(()),
                }
            }
            Body::Reported(r) => {
                let this = |m: &&kiln_protocol::fleet::ModuleReport| {
                    m.name == *name && m.version == version
                };
                // Failed after its trial (its supervisor gave up, or a command failed):
                // a failure of the release, counted as the policy counts failures.
                if let Some(m) = r
                    .modules
                    .iter()
                    .find(|m| this(m) && m.state == ModuleState::Failed)
                {
                    if heard.is_verified() {
                        return self.apply(Input::Failed {
                            device,
                            why: format!("failed after its trial: {}", m.last_event),
                        });
                    }
                    return Ok(());
                }
                let runs = r.modules.iter().any(|m| {
                    this(&m) && matches!(m.state, ModuleState::Running | ModuleState::Exited)
                });
                if !runs {
                    return Ok(());
                }
                if !heard.is_verified() {
                    eprintln!(
                        "  {device}: a reported state not signed by its enrolled key ({}): not counted",
                        heard.identity.word()
                    );
                    return Ok(());
                }
                Input::Committed { device }
            }
            Body::Status(_) => return Ok(()),
        };
        self.apply(input)
    }

    /// An operator's abort: on record first (the driver, if alive, stops sending and
    /// gives back what it sent since), then the devices of the wave in flight get back
    /// what they had. Checked until the broker keeps the abort.
    pub fn abort(mut self, me: &str) -> Result<()> {
        for _ in 0..5 {
            self.apply(Input::Abort { by: me.into() })?;
            std::thread::sleep(Duration::from_millis(1500));
            match self.kept()? {
                Some(kept) if kept.id == self.record.id && !kept.phase.is_active() => {
                    eprintln!("rollout {}: {}", kept.id, kept.phase);
                    self.session.disconnect();
                    return Ok(());
                }
                // A driver wrote over the abort before it saw it: abort its newer copy.
                Some(kept) if kept.id == self.record.id => self.record = kept,
                _ => {
                    self.session.disconnect();
                    return Ok(());
                }
            }
        }
        Err(Error::Busy(format!(
            "rollout {}: the abort did not hold; run it again",
            self.record.id
        ))
        .into())
    }
}

/// What the driver does for [`Recovery`]: on the broker here; on a simulated one in
/// the model test, which runs the same [`carry_out`].
pub trait Effects {
    /// The rollout as this driver has it.
    fn record(&self) -> &Rollout;
    /// The rollout, and the driver's recovery to step with it.
    fn parts(&mut self) -> (&Rollout, &mut Recovery);
    /// The step under way (the one that failed, after an error).
    fn doing(&self) -> Doing;
    /// The clock.
    fn now_ms(&self) -> u64;
    /// Waits a second, then reconnects the session (`Err`: still away).
    fn reconnect(&mut self) -> Result<()>;
    /// What the broker keeps of this rollout's group.
    fn record_kept(&mut self) -> Result<Kept>;
    fn persist(&mut self) -> Result<()>;
    /// Subscribes again to the devices' answers and the record's topic.
    fn subscribe(&mut self) -> Result<()>;
    fn catch_up(&mut self) -> Result<()>;
    fn perform(&mut self, action: Action) -> Result<()>;
}

impl Effects for Driver<'_> {
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
        now_ms()
    }
    fn reconnect(&mut self) -> Result<()> {
        std::thread::sleep(Duration::from_secs(1));
        self.session.reconnect()
    }
    fn record_kept(&mut self) -> Result<Kept> {
        Ok(match self.kept()? {
            None => Kept::Nothing,
            Some(theirs) if self.taken_over_by(&theirs) => Kept::TakenOver,
            Some(_) => Kept::Record,
        })
    }
    fn persist(&mut self) -> Result<()> {
        Driver::persist(self)
    }
    fn subscribe(&mut self) -> Result<()> {
        Driver::subscribe(self, true)
    }
    fn catch_up(&mut self) -> Result<()> {
        Driver::catch_up(self)
    }
    fn perform(&mut self, action: Action) -> Result<()> {
        Driver::perform(self, action)
    }
}

/// Hands `event` (and the error that caused it) to the driver's [`Recovery`] and does
/// what it says, feeding back how each list went, until it has nothing more to do.
/// `Err` when it stops the driver: the error, the broker's absence past
/// [`RECONNECT_FOR_MS`](super::recovery::RECONNECT_FOR_MS), or another driver's take-over.
pub fn carry_out(fx: &mut impl Effects, event: Event, error: Option<anyhow::Error>) -> Result<()> {
    let mut event = event;
    let mut error = error;
    if let (Event::Failed { away: true, .. }, Some(e)) = (&event, &error) {
        if !fx.parts().1.stopped() {
            eprintln!("kiln: warning: {e:#}; reconnecting");
        }
    }
    loop {
        let now = fx.now_ms();
        let (record, recovery) = fx.parts();
        let todo = recovery.step(record, now, event);
        if todo.is_empty() {
            return Ok(());
        }
        event = Event::Done;
        for d in todo {
            let result = match d {
                Do::Reconnect => {
                    event = match fx.reconnect() {
                        Ok(()) => match fx.record_kept() {
                            Ok(Kept::TakenOver) => Event::TakenOver,
                            Ok(kept) => Event::Reconnected {
                                record_kept: kept == Kept::Record,
                            },
                            Err(e) => failed(fx, &mut error, e),
                        },
                        Err(e) => {
                            error = Some(e);
                            Event::StillAway
                        }
                    };
                    break;
                }
                Do::Persist => {
                    eprintln!(
                        "  the broker lost the rollout record (no persistence?): written again"
                    );
                    fx.persist()
                }
                Do::Subscribe => fx.subscribe(),
                Do::CatchUp => fx.catch_up(),
                Do::Perform(action) => fx.perform(action),
                Do::Fail => {
                    return Err(error.unwrap_or_else(|| anyhow!("the rollout driver stopped")))
                }
                Do::GiveUp => {
                    let r = fx.record();
                    let context = format!(
                        "rollout {} stopped; `kiln rollout resume --group {}` takes it up",
                        r.id, r.group
                    );
                    let e = error.unwrap_or_else(|| anyhow!("the broker is away"));
                    return Err(unavailable(e.context(context)).into());
                }
                Do::Yield => {
                    let r = fx.record();
                    return Err(Error::busy(anyhow!(
                        "rollout {}: another driver took it up (`kiln rollout resume`) while this one was away or silent; this one stops without writing, and `kiln rollout status --group {}` follows it",
                        r.id, r.group
                    ))
                    .into());
                }
            };
            if let Err(e) = result {
                event = failed(fx, &mut error, e);
                break;
            }
        }
    }
}

/// The event for a step that failed with `e` (kept as the error to stop with).
fn failed(fx: &impl Effects, error: &mut Option<anyhow::Error>, e: anyhow::Error) -> Event {
    let away = code_of(&e) == Code::Unavailable;
    *error = Some(e);
    Event::Failed {
        doing: fx.doing(),
        away,
    }
}
