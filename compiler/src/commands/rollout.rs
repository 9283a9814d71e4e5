//! `kiln rollout`: starts a rollout, or controls one (status, pause, resume, retry,
//! abort). The driver, the record and the recovery after a broker's absence or a
//! take-over are the fleet wing's ([`crate::fleet::rollout`]); `status` prints the
//! record ([`status`]).

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};
use kiln_protocol::fleet::{DeviceFacts, Scope};
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::{
    cohort, plan_waves, Input, Outcome, Phase, Policy, Rollout, Threshold,
};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::preflight;
use crate::fleet::release::ReleaseArgs;
use crate::fleet::rollout::recovery::may_resume;
use crate::fleet::rollout::{
    busy, driver_name, members, operator, own_entries, phase_words, read_record, unavailable,
    Driver,
};
use crate::fleet::trust::{parse_duration, RootArgs, SigningArgs};
use crate::fleet::Error;
use crate::names::valid_name;

mod status;

const AFTER_HELP: &str = "\
Devices are the members of the group according to their retained status; a member
whose target the release lacks is left out (and named). Each wave's devices get the
release in their own desired state; the next wave starts when every device of this
one has answered (committed, or failed: rolled back, refused, or silent past the wave
timeout). When every wave is through within the failure thresholds, the release goes
into the group's desired state and leaves the devices' own (with --where, it stays in
the selected devices' own, and the group's is unchanged).

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
  kiln rollout app.kiln --group lab --sign fleet.key --gate 'traps <= 2x control min 5' --soak 30m
  kiln rollout app.kiln --group lab --sign fleet.key --where tag=canary --where 'kilnd>=0.9.0'
  kiln rollout status --group lab";

/// The policy language, in `kiln rollout --help` (not `-h`).
const GATES_HELP: &str = "
Health gates: --gate 'SIGNAL <= BOUND [min N]' (repeatable, at most 16) with --soak.
Once every device of a wave has answered, the wave soaks for --soak; then each gate
compares the wave's committed devices (their health since they committed) with the
control (the rollout's devices not sent the release yet) or the baseline (the same
devices before they were sent it). Each device sends a signed health summary per
module every health_s of its kilnd.toml (60 s by default): give --soak a few of
them, as a device that sent none since it committed counts as offline.

Signals (of the module the rollout updates, unless MODULE.METRIC):
  traps           traps per call (a worker stopped by a trap, its fuel or the watchdog)
  restarts        restarts per call
  dropped         the share of the module's telemetry records lost
  fuel            fuel per call
  memory          the devices' mean peak memory, in bytes
  offline         the share of the devices that sent no health at all
  MODULE.METRIC   the mean of a numeric field of a module's own telemetry
                  (temperature.error_rate: field error_rate of module temperature)
Bounds:
  10   1%         absolute: for traps, restarts, dropped and offline a count in the
                  wave or a share; for fuel, memory and metrics the value itself
  1.5x control    relative: at most 1.5 times the control's value (a control of zero
  1.2x baseline   allows 1.5 events' worth), or the wave's own value from before
  min N           judge only with at least N devices with data in the wave (and in
                  the reference); fewer: the gate waits [default: 1]
In the last wave no device is left for the control: `x control` gates compare with
the baseline.

After the soak, the wave's verdict:
  pass            the next wave starts (when the schedule allows), or the rollout
                  completes
  breach          the rollout halts (exit 1), as too many failures do: the wave's
                  devices that did not commit get back what they had, with --revert
                  the committed ones too; the history names the gate, the wave's
                  value against the reference and the worst devices
  wait            a gate short of its sample: the wave soaks once more; still short,
                  it goes on unjudged and the history says which gates lacked devices
A gate never halts a rollout without a breach over its minimum sample.

Schedule and sampling:
  --wave-interval 1h       a wave starts at least 1h after the previous one started
  --window 22:00-04:00     waves start only within this UTC time (may span midnight)
  --sample 10%             each wave is 10% of the devices, drawn at random (with a
                           seed kept in the record) from those not sent it yet,
                           instead of --waves and --wave-size
A held wave shows in `kiln rollout status` (waiting for the window or the interval,
soaking until a time), never as running.

Cohorts: --where EXPR (repeatable, at most 16; every one must hold) takes only the
members of the group it selects, by their signed status and their signed tags:
  target=TRIPLE            the device's triple (aarch64-unknown-linux-gnu), or a kiln
  target=NAME              target's name (aarch64-linux: its triple and CPU features)
  feature=NAME             the device has this CPU feature (neon, avx2)
  kilnd>=X.Y.Z             its kilnd version; also =, !=, <, <=, >
  group=NAME               it is also a member of this group
  tag=NAME                 an operator tagged it with `kiln tag DEVICE --add NAME`
Each but kilnd also takes != (tag!=fragile). The members not selected are neither
updated nor part of the control; `kiln rollout` says how many of the group the cohort
selects and refuses (exit 68) when it selects none. Tags count only when their record
verifies under the fleet's root; an unverifiable one is named and selects nothing. The
conditions are in the signed record: `kiln rollout status` shows them (--json:
`policy.cohort`), and `resume` goes on with the same devices.

Examples:
  kiln rollout app.kiln --group lab --sign fleet.key --waves 1,10 \\
      --gate 'traps <= 2x control min 5' --gate 'offline <= 20%' --soak 30m --revert
  kiln rollout app.kiln --group lab --sign fleet.key --sample 10% --wave-interval 1h \\
      --window 22:00-04:00 --gate 'temperature.error_rate <= 1.2x baseline min 3' --soak 2h
  kiln rollout app.kiln --group lab --sign fleet.key --gate 'restarts <= 0' \\
      --gate 'memory <= 8000000' --gate 'dropped <= 1%' --soak 10m
  kiln rollout app.kiln --group lab --sign fleet.key --where tag=canary \\
      --where 'kilnd>=0.9.0' --where target=aarch64-linux --where feature!=lse";

/// Update a group's devices in waves, halting when too many fail
#[derive(Parser, Debug)]
#[command(
    after_help = AFTER_HELP,
    after_long_help = format!("{AFTER_HELP}\n{GATES_HELP}"),
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
    /// A health gate every wave must pass after its soak, `SIGNAL <= BOUND [min N]`
    /// (`traps <= 2x control min 5`; repeatable; see --help)
    #[arg(long = "gate", value_name = "GATE")]
    pub gates: Vec<String>,
    /// How long a wave runs, once all its devices answered, before its gates judge it
    #[arg(long, value_name = "DURATION")]
    pub soak: Option<String>,
    /// Each wave is this share of the devices (`10%`), drawn at random from those not
    /// sent the release yet, instead of --waves and --wave-size
    #[arg(long, value_name = "PERCENT", conflicts_with_all = ["waves", "wave_size"])]
    pub sample: Option<String>,
    /// The least time between the starts of two waves
    #[arg(long, value_name = "DURATION")]
    pub wave_interval: Option<String>,
    /// Waves start only within this time of the UTC day (`22:00-04:00` spans midnight)
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub window: Option<String>,
    /// Take only the members for which EXPR holds (repeatable: all must): `tag=canary`,
    /// `target=aarch64-linux`, `feature=neon`, `kilnd>=0.9.0`, `group=west` (see --help)
    #[arg(long = "where", value_name = "EXPR")]
    pub cohort: Vec<String>,
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

impl RolloutCommand {
    pub fn execute(self) -> Result<()> {
        match self.control {
            Some(Control::Status {
                group,
                json,
                root,
                broker,
            }) => status::status(group.as_deref(), json, &root, &broker),
            Some(Control::Pause(c)) => c.operate(Word::Pause),
            Some(Control::Resume(c)) => c.control.operate(Word::Resume {
                take_over: c.take_over,
            }),
            Some(Control::Retry(c)) => c.operate(Word::Retry),
            Some(Control::Abort(c)) => c.operate(Word::Abort),
            None => self.start(),
        }
    }

    /// The policy the flags ask for, checked by [`Policy::check`]; the error is one
    /// line naming the flag and what is wrong.
    pub fn policy(&self) -> std::result::Result<Policy, String> {
        let mut p = Policy::new(
            self.max_failures,
            self.max_total_failures,
            self.wave_timeout,
            self.revert,
        );
        let check = |p: &Policy, flag: &str| p.check().map_err(|e| format!("{flag}: {e}"));
        let duration = |flag: &str, text: &Option<String>| match text {
            Some(t) => parse_duration(t)
                .map(Some)
                .map_err(|e| format!("{flag}: {e}")),
            None => Ok(None),
        };
        // Each gate on its own first, so the error names the one at fault.
        for gate in &self.gates {
            let one = Policy {
                gates: vec![gate.clone()],
                soak_ms: 1,
                ..p.clone()
            };
            check(&one, "--gate")?;
        }
        p.gates = self.gates.clone();
        p.soak_ms = 1;
        check(&p, "--gate")?;
        p.soak_ms = duration("--soak", &self.soak)?.unwrap_or(0);
        if p.gates.is_empty() && p.soak_ms > 0 {
            return Err("--soak: no --gate to judge a wave on after its soak".into());
        }
        check(&p, "--soak").map_err(|e| format!("{e} (e.g. --soak 30m)"))?;
        if let Some(text) = &self.sample {
            let share = text.trim().strip_suffix('%').unwrap_or(text.trim());
            let share: u8 = share.trim().parse().map_err(|_| {
                format!("--sample: `{text}` is not a share of the devices from 1% to 100%")
            })?;
            p.sample_percent = Some(share);
            check(&p, "--sample")?;
        }
        p.wave_interval_ms = duration("--wave-interval", &self.wave_interval)?;
        check(&p, "--wave-interval")?;
        if let Some(text) = &self.window {
            p.window = Some(parse_window(text).map_err(|e| format!("--window: {e}"))?);
            check(&p, "--window")
                .map_err(|e| format!("{e} (`{text}`: the start and the end are the same)"))?;
        }
        p.cohort = cohort::parse_all(&self.cohort)
            .map_err(|e| format!("--where: {e}"))?
            .iter()
            .map(ToString::to_string)
            .collect();
        check(&p, "--where")?;
        Ok(p)
    }

    fn start(self) -> Result<()> {
        let group = self.group.clone().unwrap_or_default();
        valid_name(Kind::Group, &group)?;
        // A policy the flags get wrong is refused before the broker is asked anything.
        let policy = self
            .policy()
            .map_err(|e| Error::Usage(format!("not started: {e}")))?;
        if !policy.gates.is_empty() && policy.soak_ms < 3 * DEFAULT_HEALTH_MS {
            eprintln!(
                "warning: --soak {} is short: devices send their health every {}s by default (health_s), and one that sent none since it committed counts as offline",
                status::duration(policy.soak_ms),
                DEFAULT_HEALTH_MS / 1000
            );
        }
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let scope = Scope::Group(group.clone());
        let topics = self.release.broker.topics();
        let registry = self.release.registry(&mut session, &topics)?;
        let seen = crate::fleet::messages::seen(&mut session, &topics, registry.as_ref())?;
        if let Some(r) = preflight::scope_refusal(&scope, &seen) {
            return Err(r.error(format!("not started: {r}")).into());
        }
        let mut release = self.release.load(&mut session, &scope)?;
        // Members without an artifact are left out (below), not refused.
        let manifests: Vec<_> = release.built.iter().map(|b| &b.manifest).collect();
        let refusals: Vec<preflight::Refusal> =
            preflight::check(&scope, &release.module, &manifests, &seen)
                .into_iter()
                .filter(|r| !matches!(r, preflight::Refusal::NoArtifact { .. }))
                .collect();
        if let Some(refused) = preflight::verdict(&refusals, false) {
            return Err(refused.into());
        }
        let topics = release.topics.clone();
        // Refused before anything is uploaded: another rollout holds the group.
        if let Some(other) = read_record(&mut session, &release.signing, &topics, &group)? {
            if other.phase.is_active() {
                return Err(busy(&other).into());
            }
        }
        let registry = release
            .signing
            .fleet
            .registry_or_empty(&mut session, &topics)?;
        let members = members(&mut session, &topics, &registry, &group)?;
        let profiles = self.release.build.profiles()?;
        let (members, selected) = select(
            &mut session,
            &topics,
            (&release.signing.fleet, &profiles),
            &group,
            &policy,
            members,
        )?;
        let module = release.module.clone();
        let mut devices = Vec::new();
        let mut skipped = Vec::new();
        for (device, facts) in members {
            match module.artifact_for(&facts.triple, &facts.cpu_features) {
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
        let plan = match policy.sample_percent {
            Some(p) => {
                let each = (devices.len() * usize::from(p)).div_ceil(100).max(1);
                format!(
                    "rollout {} to group {group}: {} devices in {} waves of {each} ({p}%), each drawn at random when it starts",
                    release.label(),
                    devices.len(),
                    devices.len().div_ceil(each),
                )
            }
            None => {
                let sizes: Vec<String> = waves.iter().map(|w| w.len().to_string()).collect();
                format!(
                    "rollout {} to group {group}: {} devices in {} waves ({})",
                    release.label(),
                    devices.len(),
                    waves.len(),
                    sizes.join(", ")
                )
            }
        };
        let terms = status::policy_lines(&policy);
        if self.dry_run {
            session.disconnect();
            println!("{plan}");
            for line in &terms {
                println!("  {line}");
            }
            if policy.sample_percent.is_none() {
                for (i, wave) in waves.iter().enumerate() {
                    println!("  wave {}: {}", i + 1, wave.join(" "));
                }
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
                mirrors: Vec::new(),
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
        for line in &terms {
            println!("  {line}");
        }
        release.upload(&mut session)?;
        let mut record = Rollout::new(
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
        // Every operator's copy draws the same sampled waves from the record's seed;
        // a random one keeps a rollout from drawing what the last one drew.
        record.seed = random_seed();
        record.driver = driver_name(&release.signing);
        if let Some(said) = selected {
            record.history.push((record.started_ms, said));
        }
        let mut driver = Driver::new(session, &release.signing, topics, registry, record);
        driver.persist()?;
        driver.claim()?;
        driver.drive(Input::Start)
    }
}

/// A group's members, each with what its status says of it.
type Members = Vec<(String, DeviceFacts)>;

/// The members the policy's cohort selects (all without one), and what to say of
/// the choice (none without a cohort). Says how many of the group it picked; refuses
/// when it picks none. Tags count only when they verify under the fleet's root;
/// `target=NAME` resolves among `profiles` (the built-in ones, or --targets-dir's).
fn select(
    session: &mut crate::fleet::broker::Session,
    topics: &kiln_protocol::fleet::Topics,
    (fleet, profiles): (
        &crate::fleet::trust::Fleet,
        &[kiln_protocol::target::TargetProfile],
    ),
    group: &str,
    policy: &Policy,
    members: Members,
) -> Result<(Members, Option<String>)> {
    if policy.cohort.is_empty() {
        return Ok((members, None));
    }
    let conditions = cohort::parse_all(&policy.cohort).map_err(Error::Usage)?;
    let tags = crate::fleet::tags::read_all(session, topics, fleet)?;
    let of = members.len();
    let chosen: Members = members
        .into_iter()
        .filter(|(device, facts)| {
            let tags = tags.get(device).cloned().unwrap_or_default();
            cohort::selects(&conditions, &cohort::Attributes::of(facts, tags), profiles)
        })
        .collect();
    let cohort = policy.cohort.join(" and ");
    if chosen.is_empty() {
        return Err(coded(
            Code::NoSuchScope,
            anyhow!("group {group}: --where {cohort} selects none of its {of} members; nothing to roll out"),
        ));
    }
    let said = format!(
        "cohort: --where {cohort} selects {} of the {of} members of group {group}",
        chosen.len()
    );
    eprintln!("{said}");
    Ok((chosen, Some(said)))
}

/// How often a kilnd sends its modules' health unless configured otherwise
/// (`[telemetry] health_s`).
const DEFAULT_HEALTH_MS: u64 = 60_000;

/// `22:00-04:00`: minutes of the UTC day, from and until (a start after the end
/// spans midnight).
pub fn parse_window(text: &str) -> std::result::Result<(u16, u16), String> {
    let bad = || format!("`{text}` is not a time of the UTC day like 22:00-04:00 (HH:MM-HH:MM)");
    let minute = |hhmm: &str| -> Option<u16> {
        let (h, m) = hhmm.trim().split_once(':')?;
        let digits = |s: &str, most: usize| {
            (!s.is_empty() && s.len() <= most && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().ok())
                .flatten()
        };
        let (h, m) = (digits(h, 2)?, digits(m, 2).filter(|_| m.len() == 2)?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    let (from, until) = text.split_once('-').ok_or_else(bad)?;
    Ok((
        minute(from).ok_or_else(bad)?,
        minute(until).ok_or_else(bad)?,
    ))
}

/// `HH:MM` of a minute of the day.
pub fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// A seed no earlier rollout had: this process's hasher keys (random, from the
/// system) over the clock.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.finish()
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
            "group {}: rollout {} of {} is {}",
            driver.record.group,
            driver.record.id,
            driver.record.label(),
            phase_words(&driver.record)
        );
        let refuse = |what: &str| coded(Code::Busy, anyhow!("{head}; {what}"));
        match word {
            Word::Pause => {
                if !matches!(phase, Phase::Running { .. }) {
                    return Err(refuse("only a running rollout pauses"));
                }
                driver.clears = false;
                driver.apply(Input::Pause { by: me })?;
                eprintln!("rollout {} paused: no new wave starts; `kiln rollout resume --group {}` goes on", driver.record.id, driver.record.group);
                driver.session.disconnect();
                Ok(())
            }
            Word::Abort => {
                if !phase.is_active() {
                    return Err(refuse("nothing to abort"));
                }
                // A running driver may be writing too: it clears what is stale.
                driver.clears = !matches!(phase, Phase::Running { .. });
                driver.abort(&me)
            }
            Word::Resume { take_over } => {
                if let Err(why) = may_resume(&driver.record, now_ms(), take_over) {
                    return Err(refuse(&why));
                }
                driver.take_up(driver_name(&signing));
                for line in status::policy_lines(&driver.record.policy) {
                    eprintln!("  {line}");
                }
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
                driver.take_up(driver_name(&signing));
                driver.drive(Input::Retry)
            }
        }
    }
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

    fn start(flags: &[&str]) -> RolloutCommand {
        let args = ["rollout", "app.kiln", "--group", "lab"]
            .iter()
            .chain(flags);
        RolloutCommand::try_parse_from(args).unwrap()
    }

    /// The policy's error for `flags`, which must be one line naming `flag`.
    fn refused(flags: &[&str], flag: &str) -> String {
        let e = start(flags).policy().unwrap_err();
        assert!(e.starts_with(&format!("{flag}: ")), "{flags:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn the_gate_soak_sample_and_schedule_flags_make_the_policy() {
        let p = start(&[
            "--gate",
            "traps <= 2x control min 5",
            "--gate",
            "temperature.error_rate <= 1.2x baseline",
            "--soak",
            "30m",
            "--sample",
            "10%",
            "--wave-interval",
            "1h",
            "--window",
            "22:00-04:30",
            "--revert",
        ])
        .policy()
        .unwrap();
        assert_eq!(
            p.gates,
            [
                "traps <= 2x control min 5",
                "temperature.error_rate <= 1.2x baseline"
            ]
        );
        assert_eq!(p.soak_ms, 30 * 60_000);
        assert_eq!(p.sample_percent, Some(10));
        assert_eq!(p.wave_interval_ms, Some(3_600_000));
        assert_eq!(p.window, Some((22 * 60, 4 * 60 + 30)));
        assert!(p.revert);
        assert_eq!(p.check(), Ok(()));
        // A share with or without its sign; no flag: the policy of before.
        assert_eq!(
            start(&["--sample", "25"]).policy().unwrap().sample_percent,
            Some(25)
        );
        let plain = start(&[]).policy().unwrap();
        assert_eq!(
            plain,
            Policy::new(Threshold::Count(0), Threshold::Count(0), 300_000, false)
        );
    }

    #[test]
    fn a_bad_policy_flag_is_one_line_naming_the_flag_and_why() {
        let e = refused(&["--gate", "traps <= x", "--soak", "1m"], "--gate");
        assert!(e.contains("`x` is not a number"), "{e}");
        let e = refused(&["--gate", "latency < 3", "--soak", "1m"], "--gate");
        assert!(e.contains("SIGNAL <= BOUND"), "{e}");
        let e = refused(
            &["--gate", "traps <= 2x control", "--gate", "fuel <= 5%"],
            "--gate",
        );
        assert!(e.contains("fuel is not a share"), "{e}");
        let mut many = Vec::new();
        for _ in 0..17 {
            many.extend(["--gate", "traps <= 1"]);
        }
        many.extend(["--soak", "1m"]);
        let e = refused(&many, "--gate");
        assert!(e.contains("17 gates (at most 16)"), "{e}");
        let e = refused(&["--gate", "traps <= 1"], "--soak");
        assert!(
            e.contains("no soak time") && e.contains("--soak 30m"),
            "{e}"
        );
        refused(&["--soak", "10m"], "--soak");
        refused(&["--gate", "traps <= 1", "--soak", "soon"], "--soak");
        let e = refused(&["--sample", "0%"], "--sample");
        assert!(e.contains("not within 1% to 100%"), "{e}");
        refused(&["--sample", "101"], "--sample");
        refused(&["--sample", "1000%"], "--sample");
        refused(&["--sample", "half"], "--sample");
        let e = refused(&["--wave-interval", "0s"], "--wave-interval");
        assert!(e.contains("out of range"), "{e}");
        for bad in [
            "22:00",
            "24:00-01:00",
            "22:60-01:00",
            "2200-0100",
            "22:0-01:00",
            "a:00-01:00",
        ] {
            let e = refused(&["--window", bad], "--window");
            assert!(e.contains("HH:MM-HH:MM"), "{bad}: {e}");
        }
        let e = refused(&["--window", "02:00-02:00"], "--window");
        assert!(e.contains("empty"), "{e}");
        // A sample replaces the planned waves: both is a usage error of clap's.
        for planned in [["--waves", "1,10"], ["--wave-size", "5"]] {
            let mut args = vec!["rollout", "app.kiln", "--group", "lab", "--sample", "10"];
            args.extend(planned);
            assert!(RolloutCommand::try_parse_from(args).is_err());
        }
    }

    #[test]
    fn where_flags_make_the_cohort_and_a_bad_one_names_the_flag() {
        let p = start(&["--where", "tag=canary", "--where", "kilnd >= 0.9.0"])
            .policy()
            .unwrap();
        assert_eq!(p.cohort, ["tag=canary", "kilnd>=0.9.0"]);
        assert!(start(&[]).policy().unwrap().cohort.is_empty());
        let e = refused(&["--where", "colour=red"], "--where");
        assert!(e.contains("`colour` is not an attribute"), "{e}");
        let e = refused(&["--where", "kilnd>=soon"], "--where");
        assert!(e.contains("not a version like 0.9.0"), "{e}");
        let e = refused(&["--where", "tag<x"], "--where");
        assert!(e.contains("tag takes = or !="), "{e}");
        let mut many = Vec::new();
        for _ in 0..17 {
            many.extend(["--where", "tag=a"]);
        }
        assert!(refused(&many, "--where").contains("at most 16"));
    }

    #[test]
    fn windows_parse_as_minutes_of_the_utc_day() {
        assert_eq!(parse_window("00:00-23:59"), Ok((0, 1439)));
        assert_eq!(parse_window("9:05-17:00"), Ok((545, 1020)));
        assert_eq!(parse_window(" 23:00 - 02:00 "), Ok((1380, 120)));
        assert_eq!(hhmm(545), "09:05");
    }

    #[test]
    fn the_long_help_documents_the_policy_language() {
        use clap::CommandFactory;
        let mut cmd = RolloutCommand::command();
        let long = cmd.render_long_help().to_string();
        for word in [
            "--gate",
            "--soak",
            "--sample",
            "--wave-interval",
            "--window",
            "traps",
            "restarts",
            "dropped",
            "fuel",
            "memory",
            "offline",
            "MODULE.METRIC",
            "x control",
            "x baseline",
            "min N",
            "pass",
            "breach",
            "wait",
            "--revert",
            "kiln rollout status",
            "--where",
            "target=",
            "feature=",
            "kilnd>=",
            "group=",
            "tag=",
            "kiln tag",
        ] {
            assert!(long.contains(word), "`kiln rollout --help` lacks {word}");
        }
        let short = cmd.render_help().to_string();
        assert!(
            !short.contains("MODULE.METRIC"),
            "the language is --help's, not -h's"
        );
        // Every example in the help parses into a policy.
        let examples = GATES_HELP
            .split("Examples:")
            .nth(1)
            .unwrap()
            .replace("\\\n", " ");
        for line in examples.lines().filter(|l| !l.trim().is_empty()) {
            let words = split_shell(line.trim());
            let cmd = RolloutCommand::try_parse_from(&words[1..]).unwrap();
            cmd.policy().unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    /// Words of a command line with single quotes.
    fn split_shell(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        for (i, part) in line.split('\'').enumerate() {
            if i % 2 == 1 {
                words.push(part.to_string());
            } else {
                words.extend(part.split_whitespace().map(String::from));
            }
        }
        words
    }
}
