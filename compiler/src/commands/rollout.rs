//! `kiln rollout`: starts a rollout, or controls one (status, pause, resume, retry,
//! abort). The driver, the record and the recovery after a broker's absence or a
//! take-over are the fleet wing's ([`crate::fleet::rollout`]); `status` prints the
//! record ([`status`]).

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};
use kiln_protocol::fleet::Scope;
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::{plan_waves, Input, Outcome, Phase, Policy, Rollout, Threshold};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::preflight;
use crate::fleet::release::ReleaseArgs;
use crate::fleet::rollout::recovery::may_resume;
use crate::fleet::rollout::{
    busy, members, operator, own_entries, read_record, unavailable, Driver,
};
use crate::fleet::trust::{parse_duration, RootArgs, SigningArgs};
use crate::names::valid_name;

mod status;

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

    fn start(self) -> Result<()> {
        let group = self.group.clone().unwrap_or_default();
        valid_name(Kind::Group, &group)?;
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
        // No gate, sample or schedule from the command line yet.
        let policy = Policy::new(
            self.max_failures,
            self.max_total_failures,
            self.wave_timeout,
            self.revert,
        );
        policy
            .check()
            .map_err(|e| coded(Code::InvalidInput, anyhow!("not started: {e}")))?;
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
                if let Err(why) = may_resume(&driver.record, now_ms(), take_over) {
                    return Err(refuse(&why));
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
