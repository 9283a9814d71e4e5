//! `kiln rollout`: the driver of a rollout. What to do is decided by
//! [`kiln_protocol::rollout::Rollout::step`]; this module feeds it what the broker
//! delivers and the clock, carries out the actions (desired states), and keeps the
//! signed record on `{prefix}/groups/{group}/rollout` current.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};
use kiln_protocol::fleet::{DesiredModule, EventKind, ModuleState, Scope, Topics};
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::{
    plan_waves, short_list, Action, Input, Outcome, Phase, Policy, Rollout, Threshold,
};
use kiln_protocol::trust::Registry;

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs, Session};
use crate::fleet::desired::{prepare_desired, prepare_for_devices};
use crate::fleet::messages::{warn_skipped, Body, Reader};
use crate::fleet::preflight;
use crate::fleet::release::ReleaseArgs;
use crate::fleet::trust::{parse_duration, Opened, RootArgs, Signing, SigningArgs};
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Devices are the members of the group according to their retained status; a member
whose target the release lacks is left out (and named). Each wave's devices get the
release in their own desired state; the next wave starts when every device of this
one has answered (committed, or failed: rolled back, refused, or silent past the wave
timeout). When every wave is through within the failure thresholds, the release goes
into the group's desired state and leaves the devices' own.

A wave (or the whole rollout) with more failures than allowed halts the rollout: the
devices not reached keep what they run; the halted wave's devices that did not commit
get back what their own desired state had (or follow the group's again); with
--revert, so do the ones that committed.

The rollout's record (plan, each device's outcome, phase) is signed retained state on
the broker, so any operator with a release key sees and drives it from any machine:
  kiln rollout status [--group G]      what every rollout (or G's) is doing
  kiln rollout pause  --group G        no new wave starts
  kiln rollout resume --group G        go on (also takes up a rollout whose driver died)
  kiln rollout retry  --group G        send again to the devices that failed
  kiln rollout abort  --group G        stop; devices not reached never get the release
A second rollout on a group whose rollout is running or paused is refused (exit 75).

Examples:
  kiln rollout app.kiln --group lab --sign fleet.key                  # 1 canary, then the rest
  kiln rollout app.kilnrel --group lab --sign fleet.key --waves 1,10,100 --max-failures 5%
  kiln rollout app.kiln --group lab --sign fleet.key --max-total-failures 2 --revert
  kiln rollout status --group lab";

/// Update a group's devices in waves, halting when too many fail
#[derive(Parser, Debug)]
#[command(
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct RolloutCommand {
    #[command(subcommand)]
    pub control: Option<Control>,
    /// Group whose devices to update
    #[arg(long, required = true)]
    pub group: Option<String>,
    /// Sizes of the first waves, growing (`1,10,100`); the rest follow in one wave, or in
    /// waves of --wave-size
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,N,...",
        default_value = "1"
    )]
    pub waves: Vec<usize>,
    /// Devices per wave after the --waves ones [default: all the rest]
    #[arg(long)]
    pub wave_size: Option<usize>,
    /// Failures allowed in one wave: a count, or a share of the wave (`10%`)
    #[arg(long, value_name = "N|P%", default_value = "0", value_parser = Threshold::parse)]
    pub max_failures: Threshold,
    /// Failures allowed in the whole rollout: a count, or a share of its devices
    #[arg(long, value_name = "N|P%", default_value = "0", value_parser = Threshold::parse)]
    pub max_total_failures: Threshold,
    /// How long a wave may take: devices silent after it count as failed
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub wave_timeout: u64,
    /// On a halt or an abort, give the wave's devices that committed the release back
    /// what they had too
    #[arg(long)]
    pub revert: bool,
    /// Check and plan, then print the waves and the module entry every device would
    /// get on stdout; nothing is uploaded or published
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

#[derive(Subcommand, Debug)]
pub enum Control {
    /// Show a group's rollout, or one line for every group's
    #[command(
        after_help = "Examples:\n  kiln rollout status                  # one line per group\n  kiln rollout status --group lab      # waves, outcomes, failures, history\n  kiln rollout status --json | jq .phase"
    )]
    Status {
        /// The group whose rollout to show in full [default: one line per group]
        #[arg(long)]
        group: Option<String>,
        /// One JSON object per rollout, one per line (see the JSON shapes in the book)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        root: RootArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Start no new wave until resumed (the wave in flight goes on)
    #[command(after_help = "Examples:\n  kiln rollout pause --group lab --sign fleet.key")]
    Pause(ControlArgs),
    /// Go on with a paused rollout, or take up one whose driver stopped
    #[command(
        after_help = "Examples:\n  kiln rollout resume --group lab --sign fleet.key\n  kiln rollout resume --group lab --sign fleet.key --take-over   # its driver's machine is gone"
    )]
    Resume(ResumeArgs),
    /// Send the release again to the devices that failed (a device that rolled back
    /// this very artifact refuses it again: it remembers)
    #[command(after_help = "Examples:\n  kiln rollout retry --group lab --sign fleet.key")]
    Retry(ControlArgs),
    /// Stop the rollout: devices not reached never get the release; the wave in
    /// flight gets back what it had
    #[command(after_help = "Examples:\n  kiln rollout abort --group lab --sign fleet.key")]
    Abort(ControlArgs),
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// Take up a running rollout even if its driver spoke less than 90s ago (its
    /// machine is known to be gone)
    #[arg(long)]
    pub take_over: bool,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The group whose rollout to drive
    #[arg(long)]
    pub group: String,
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// A driver that has not persisted for this long is taken for dead by `resume`.
const ORPHANED_MS: u64 = 90_000;
/// The driver writes the record at least this often (its heartbeat), and at most
/// this often while only outcomes change.
const HEARTBEAT: Duration = Duration::from_secs(30);
const COALESCE: Duration = Duration::from_secs(2);

fn unavailable(e: anyhow::Error) -> anyhow::Error {
    coded(Code::Unavailable, e)
}

impl RolloutCommand {
    pub fn execute(self) -> Result<()> {
        match self.control {
            Some(Control::Status {
                group,
                json,
                root,
                broker,
            }) => status(group.as_deref(), json, &root, &broker),
            Some(Control::Pause(c)) => c.operate(Word::Pause),
            Some(Control::Resume(c)) => c.control.operate(Word::Resume {
                take_over: c.take_over,
            }),
            Some(Control::Retry(c)) => c.operate(Word::Retry),
            Some(Control::Abort(c)) => c.operate(Word::Abort),
            None => self.start(),
        }
    }

    fn start(self) -> Result<()> {
        let group = self.group.clone().unwrap_or_default();
        valid_name(Kind::Group, &group)?;
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let scope = Scope::Group(group.clone());
        let topics = self.release.broker.topics();
        let registry = self.release.registry(&mut session, &topics)?;
        let seen = crate::fleet::messages::seen(&mut session, &topics, registry.as_ref())?;
        if let Some(r) = preflight::scope_refusal(&scope, &seen) {
            return Err(coded(r.code(), anyhow!("not started: {r}")));
        }
        let mut release = self.release.load(&mut session, &scope)?;
        // Members without an artifact are left out (below), not refused.
        let manifests: Vec<_> = release.built.iter().map(|b| &b.manifest).collect();
        let refusals: Vec<preflight::Refusal> =
            preflight::check(&scope, &release.module, &manifests, &seen)
                .into_iter()
                .filter(|r| !matches!(r, preflight::Refusal::NoArtifact { .. }))
                .collect();
        if let Some((code, line)) = preflight::verdict(&refusals, false) {
            return Err(coded(code, anyhow!(line)));
        }
        let topics = release.topics.clone();
        // Refused before anything is uploaded: another rollout holds the group.
        if let Some(other) = read_record(&mut session, &release.signing, &topics, &group)? {
            if other.phase.is_active() {
                return Err(busy(&other));
            }
        }
        let registry = release
            .signing
            .fleet
            .registry_or_empty(&mut session, &topics)?;
        let members = members(&mut session, &topics, &registry, &group)?;
        let module = release.module.clone();
        let mut devices = Vec::new();
        let mut skipped = Vec::new();
        for (device, target) in members {
            match module.artifact_for(&target.triple, &target.cpu_features) {
                Ok(_) => devices.push(device),
                Err(why) => skipped.push((device, why)),
            }
        }
        for (d, why) in &skipped {
            eprintln!("  {d}: left out: {why}");
        }
        if devices.is_empty() {
            return Err(coded(
                Code::InvalidInput,
                anyhow!(
                    "group {group}: no member can run {} ({} left out)",
                    release.label(),
                    skipped.len()
                ),
            ));
        }
        // What each device's own desired state has for the module now: what a halt
        // gives back.
        let before = own_entries(&mut session, &release.signing, &topics, &module.name)?;
        let waves = plan_waves(&devices, &self.waves, self.wave_size);
        let policy = Policy {
            wave_failures: self.max_failures,
            total_failures: self.max_total_failures,
            wave_timeout_ms: self.wave_timeout,
            revert: self.revert,
        };
        let sizes: Vec<String> = waves.iter().map(|w| w.len().to_string()).collect();
        let plan = format!(
            "rollout {} to group {group}: {} devices in {} waves ({})",
            release.label(),
            devices.len(),
            waves.len(),
            sizes.join(", ")
        );
        if self.dry_run {
            session.disconnect();
            println!("{plan}");
            for (i, wave) in waves.iter().enumerate() {
                println!("  wave {}: {}", i + 1, wave.join(" "));
            }
            for (d, why) in &skipped {
                println!("  left out: {d}: {why}");
            }
            let entry = kiln_protocol::fleet::Desired {
                fleet: release.signing.fleet.root().fleet.clone(),
                scope: scope.clone(),
                serial: 0,
                issued_ms: now_ms(),
                expires_ms: now_ms().saturating_add(release.signing.valid_ms),
                modules: vec![module],
            };
            let body = postcard::to_stdvec(&entry).unwrap_or_default();
            print!(
                "{}",
                crate::fleet::trust::describe_state_full(
                    &entry,
                    &kiln_protocol::fleet::sha256(&body)
                )
            );
            eprintln!("dry run: nothing uploaded or published");
            return Ok(());
        }
        println!("{plan}");
        release.upload(&mut session)?;
        let record = Rollout::new(
            &release.signing.fleet.root().fleet,
            &group,
            &operator(&release.signing),
            now_ms(),
            module,
            policy,
            waves,
            before,
            skipped,
        );
        let mut driver = Driver::new(session, &release.signing, topics, registry, record);
        driver.persist()?;
        driver.claim()?;
        driver.drive(Input::Start)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Pause,
    Resume { take_over: bool },
    Retry,
    Abort,
}

impl ControlArgs {
    fn operate(&self, word: Word) -> Result<()> {
        valid_name(Kind::Group, &self.group)?;
        let mut session = self.broker.connect().map_err(unavailable)?;
        let topics = self.broker.topics();
        let signing = self.signing.signing(&mut session, &topics)?;
        let Some(record) = read_record(&mut session, &signing, &topics, &self.group)? else {
            return Err(coded(
                Code::InvalidInput,
                anyhow!("group {}: no rollout on record", self.group),
            ));
        };
        let me = operator(&signing);
        let registry = signing.fleet.registry_or_empty(&mut session, &topics)?;
        let mut driver = Driver::new(session, &signing, topics, registry, record);
        let phase = driver.record.phase.clone();
        let head = format!(
            "group {}: rollout {} of {} is {phase}",
            driver.record.group,
            driver.record.id,
            driver.record.label()
        );
        let refuse = |what: &str| coded(Code::Busy, anyhow!("{head}; {what}"));
        match word {
            Word::Pause => {
                if !matches!(phase, Phase::Running { .. }) {
                    return Err(refuse("only a running rollout pauses"));
                }
                driver.apply(Input::Pause { by: me })?;
                eprintln!("rollout {} paused: no new wave starts; `kiln rollout resume --group {}` goes on", driver.record.id, driver.record.group);
                driver.session.disconnect();
                Ok(())
            }
            Word::Abort => {
                if !phase.is_active() {
                    return Err(refuse("nothing to abort"));
                }
                driver.abort(&me)
            }
            Word::Resume { take_over } => {
                match &phase {
                    Phase::Paused { .. } => {}
                    Phase::Running { .. } => {
                        let quiet = now_ms().saturating_sub(driver.record.updated_ms);
                        if quiet < ORPHANED_MS && !take_over {
                            return Err(refuse(&format!(
                                "{} drives it (its last word {}s ago); resume takes up a rollout whose driver has been silent for {}s (or pass --take-over if its machine is gone)",
                                driver.record.driver,
                                quiet / 1000,
                                ORPHANED_MS / 1000
                            )));
                        }
                    }
                    _ => return Err(refuse("only a paused rollout, or one whose driver stopped, resumes (`retry` sends again to failed devices)")),
                }
                driver.record.driver = me;
                driver.catch_up()?;
                driver.drive(Input::Resume)
            }
            Word::Retry => {
                if !matches!(phase, Phase::Halted { .. } | Phase::Complete) {
                    return Err(refuse("only a halted or complete rollout retries"));
                }
                let (.., failed) = driver.record.counts();
                if failed == 0
                    && !driver
                        .record
                        .devices
                        .values()
                        .any(|d| d.returned && matches!(d.outcome, Outcome::Sent { .. }))
                {
                    return Err(refuse("no device failed"));
                }
                driver.record.driver = me;
                driver.drive(Input::Retry)
            }
        }
    }
}

/// What a member's status says it runs on.
struct Target {
    triple: String,
    cpu_features: Vec<String>,
}

/// The group's members by their retained status, with their target, refusing any
/// whose status is not signed by its enrolled key (its reports would never count).
fn members(
    session: &mut Session,
    topics: &Topics,
    registry: &Registry,
    group: &str,
) -> Result<Vec<(String, Target)>> {
    let mut unverified = Vec::new();
    let retained = session
        .retained(&topics.all_devices("status"))
        .map_err(unavailable)?;
    let (heard, skipped) = Reader::new(topics, registry).all(&retained);
    warn_skipped(&skipped, 5);
    let mut members: Vec<(String, Target)> = heard
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
            let target = Target {
                triple: facts.triple,
                cpu_features: facts.cpu_features,
            };
            Some((device.to_string(), target))
        })
        .collect();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    if !unverified.is_empty() {
        return Err(coded(
            Code::Key,
            anyhow!(
                "group {group}: the status of {} is not signed by an enrolled key; enroll them first (`kiln enroll --group {group}`)",
                unverified.join(", ")
            ),
        ));
    }
    if members.is_empty() {
        return Err(coded(
            Code::NoSuchScope,
            anyhow!("no device has reported membership of group `{group}`"),
        ));
    }
    Ok(members)
}

/// Each device's own desired-state entry for `module`, where it has one.
fn own_entries(
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
fn read_record(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    group: &str,
) -> Result<Option<Rollout>> {
    let topic = topics.rollout(group);
    let retained = session.retained(&topic).map_err(unavailable)?;
    let Some(bytes) = retained.get(&topic) else {
        return Ok(None);
    };
    match Rollout::open(bytes, signing.fleet.root(), group) {
        Ok(r) => Ok(Some(r)),
        Err(why) => {
            eprintln!("kiln: warning: ignoring the rollout record on {topic}: {why}");
            Ok(None)
        }
    }
}

fn busy(other: &Rollout) -> anyhow::Error {
    coded(
        Code::Busy,
        anyhow!(
            "group {}: rollout {} of {} is {} (started by {}); see `kiln rollout status --group {}`, or stop it with `kiln rollout abort --group {}`",
            other.group,
            other.id,
            other.label(),
            other.phase,
            other.started_by,
            other.group,
            other.group
        ),
    )
}

/// Who is acting: the user, the machine, and the key that signs.
fn operator(signing: &Signing) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    match signing.keys.first() {
        Some(k) => format!("{user}@{host} (key {})", k.public().id()),
        None => format!("{user}@{host}"),
    }
}

struct Driver<'a> {
    session: Session,
    signing: &'a Signing,
    topics: Topics,
    registry: Registry,
    record: Rollout,
    topic: String,
    last_persist: Instant,
    dirty: bool,
}

impl<'a> Driver<'a> {
    fn new(
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
            dirty: false,
        }
    }

    /// Writes the record (retained, signed) and waits for the broker to have it.
    fn persist(&mut self) -> Result<()> {
        self.record.serial += 1;
        self.record.updated_ms = now_ms();
        let keys: Vec<_> = self.signing.keys.iter().collect();
        let bytes = self
            .record
            .seal(&keys)
            .map_err(|e| coded(Code::InvalidInput, anyhow!(e)))?;
        self.session
            .publish_all(vec![(self.topic.clone(), bytes)], |_| {})
            .map_err(unavailable)?;
        self.last_persist = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// The record the broker keeps for this rollout's group now.
    fn kept(&mut self) -> Result<Option<Rollout>> {
        read_record(
            &mut self.session,
            self.signing,
            &self.topics,
            &self.record.group,
        )
    }

    /// Two operators starting at once: the broker keeps one record; whoever's is not
    /// it stops before any device was sent anything.
    fn claim(&mut self) -> Result<()> {
        std::thread::sleep(Duration::from_millis(500));
        let kept = self.kept()?;
        match kept {
            Some(other) if other.id != self.record.id => Err(busy(&other)),
            _ => Ok(()),
        }
    }

    /// The devices' answers, then (once this driver's own record is the one kept) the
    /// record's topic, where an operator's pause or abort arrives.
    fn subscribe(&mut self, record: bool) -> Result<()> {
        let mut filters = vec![
            self.topics.all_devices("events"),
            self.topics.all_devices("reported"),
        ];
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
    fn catch_up(&mut self) -> Result<()> {
        let reported = self
            .session
            .retained(&self.topics.all_devices("reported"))
            .map_err(unavailable)?;
        for (topic, payload) in reported {
            self.on_device_message(&topic, &payload)?;
        }
        Ok(())
    }

    /// Steps the record and carries out what it says; the record is written when the
    /// phase changed or a wave went out, and otherwise at most every two seconds.
    fn apply(&mut self, input: Input) -> Result<()> {
        let phase = self.record.phase.clone();
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
            eprintln!("rollout {}: {}", self.record.id, self.record.phase);
        }
        Ok(())
    }

    fn perform(&mut self, action: Action) -> Result<()> {
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
        let states = prepare_for_devices(
            &mut self.session,
            self.signing,
            &self.topics,
            &devices,
            |device, m| {
                m.retain(|e| e.name != name);
                match &action {
                    Action::Send(_) => m.push(module.clone()),
                    Action::Return(_) => m.extend(before.get(device).cloned().flatten()),
                    // An empty module list is still published, signed, never cleared:
                    // a device takes a device-scoped state that never arrives for one it
                    // has not heard from, and would keep running what the old one named.
                    Action::Finish(_) => {}
                }
            },
        )?;
        let messages = states.into_iter().map(|n| (n.topic, n.signed)).collect();
        self.session
            .publish_all(messages, |_| {})
            .map_err(|e| coded(Code::Unavailable, e))?;
        eprintln!("  {} {what}: {}", devices.len(), short_list(&devices));
        Ok(())
    }

    /// Runs the rollout until it is no longer running: it completed, halted, or an
    /// operator paused or aborted it.
    fn drive(mut self, first: Input) -> Result<()> {
        self.subscribe(false)?;
        let resumed = first == Input::Resume;
        self.apply(first)?;
        if resumed {
            self.resend_pending()?;
        }
        self.subscribe(true)?;
        let mut last_tick = Instant::now();
        while matches!(self.record.phase, Phase::Running { .. }) {
            // The broker going away at any step (a read, a publish, the record) is
            // survived the same way: reconnect, catch up, send again what may not
            // have gone out.
            if let Err(e) = self.turn(&mut last_tick) {
                if crate::exit::code_of(&e) != Code::Unavailable {
                    return Err(e);
                }
                self.reconnect(e)?;
            }
        }
        if self.dirty {
            self.persist()?;
        }
        let r = &self.record;
        let (_, _, committed, failed) = r.counts();
        let result = match &r.phase {
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
            Phase::Halted { wave, why } => Err(coded(
                Code::Failure,
                anyhow!(
                    "rollout halted in wave {}: {why}: {}",
                    wave + 1,
                    failures(r)
                ),
            )),
            Phase::Aborted { by, wave } => Err(coded(
                Code::Failure,
                anyhow!("rollout aborted in wave {} by {by}", wave + 1),
            )),
            Phase::Running { .. } => unreachable!("the loop ends when the rollout does"),
        };
        self.session.disconnect();
        result
    }

    /// One message (or a second without one), the clock, and the record's heartbeat.
    fn turn(&mut self, last_tick: &mut Instant) -> Result<()> {
        let wait = self
            .record
            .deadline_ms()
            .map_or(1000, |d| d.saturating_sub(now_ms()))
            .clamp(10, 1000);
        let message = self
            .session
            .next_message(Duration::from_millis(wait))
            .map_err(unavailable)?;
        if let Some((topic, payload)) = message {
            if topic == self.topic {
                if let Ok(theirs) =
                    Rollout::open(&payload, self.signing.fleet.root(), &self.record.group)
                {
                    self.take_over(theirs)?;
                }
            } else {
                self.on_device_message(&topic, &payload)?;
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(wait) {
            *last_tick = Instant::now();
            self.apply(Input::Tick)?;
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

    fn on_device_message(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
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

    /// The broker went away (restarted, or the link dropped): reconnect for up to a
    /// minute, put the record back if the broker lost it, and catch up on answers.
    fn reconnect(&mut self, error: anyhow::Error) -> Result<()> {
        eprintln!("kiln: warning: {error:#}; reconnecting");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_secs(1));
            match self.session.reconnect() {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(unavailable(e.context(format!(
                        "rollout {} stopped; `kiln rollout resume --group {}` takes it up",
                        self.record.id, self.record.group
                    ))))
                }
                Err(_) => {}
            }
        }
        let kept = self.kept()?;
        if kept.is_none() {
            eprintln!("  the broker lost the rollout record (no persistence?): written again");
            self.persist()?;
        }
        // The record kept, if an operator changed it meanwhile, arrives on the topic.
        self.subscribe(true)?;
        self.catch_up()?;
        self.resend_pending()
    }

    /// A send cut short (the broker went away, or the driver died between writing the
    /// record and publishing) leaves devices on record as sent that never got the
    /// release: send it again to every device still pending (a device that has it
    /// takes the same entry again and carries on).
    fn resend_pending(&mut self) -> Result<()> {
        let pending: Vec<String> = self
            .record
            .pending()
            .into_iter()
            .map(String::from)
            .collect();
        if !pending.is_empty() && matches!(self.record.phase, Phase::Running { .. }) {
            self.perform(Action::Send(pending))?;
        }
        Ok(())
    }

    /// An operator's abort: on record first (the driver, if alive, stops sending and
    /// gives back what it sent since), then the devices of the wave in flight get back
    /// what they had. Checked until the broker keeps the abort.
    fn abort(mut self, me: &str) -> Result<()> {
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
        Err(coded(
            Code::Busy,
            anyhow!(
                "rollout {}: the abort did not hold; run it again",
                self.record.id
            ),
        ))
    }
}

/// The failed devices and why, at most five.
fn failures(r: &Rollout) -> String {
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

/// `kiln rollout status`: the record(s), checked against the fleet's root.
fn status(group: Option<&str>, json: bool, root: &RootArgs, broker: &BrokerArgs) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_and_the_controls_parse_apart() {
        let start = RolloutCommand::try_parse_from([
            "rollout",
            "app.kiln",
            "--group",
            "lab",
            "--waves",
            "1,10,100",
            "--max-failures",
            "5%",
        ])
        .unwrap();
        assert_eq!(start.waves, [1, 10, 100]);
        assert_eq!(start.max_failures, Threshold::Percent(5));
        assert!(start.control.is_none());
        let status =
            RolloutCommand::try_parse_from(["rollout", "status", "--group", "lab"]).unwrap();
        assert!(matches!(status.control, Some(Control::Status { .. })));
        let abort = RolloutCommand::try_parse_from(["rollout", "abort", "--group", "lab"]).unwrap();
        assert!(matches!(abort.control, Some(Control::Abort(_))));
        assert!(
            RolloutCommand::try_parse_from(["rollout", "app.kiln"]).is_err(),
            "a start needs --group"
        );
        assert!(RolloutCommand::try_parse_from([
            "rollout",
            "app.kiln",
            "--group",
            "lab",
            "--max-failures",
            "x"
        ])
        .is_err());
    }
}
