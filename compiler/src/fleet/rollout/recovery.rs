//! What a rollout's driver does when the broker goes away under it, and when it takes
//! up a rollout in progress: a pure state machine, like the policy
//! ([`Rollout::step`]) and the device's update agent. The driver
//! ([`super::driver`]) carries out each list of [`Do`]s in order and says how it went:
//! [`Event::Done`] when all went through, [`Event::Failed`] at the first that did not
//! (the rest are dropped), and a reconnect's result as [`Event::Reconnected`] or
//! [`Event::StillAway`]. The model test (`tests.rs`) runs it against a broker that
//! goes away at any step and drivers that die at any step.

use kiln_protocol::rollout::{Action, Phase, Rollout};

/// A driver that has not written the record for this long is taken for dead by
/// `resume` (its heartbeat is every 30 s).
pub const ORPHANED_MS: u64 = 90_000;
/// How long a driver tries to reconnect to a broker that went away before it stops.
/// Longer than [`ORPHANED_MS`] on purpose: a broker cluster that lost a node can take
/// minutes to take subscriptions again, and a driver that is still trying when an
/// operator has meanwhile resumed the rollout elsewhere finds the record names
/// another driver when it gets back ([`Event::TakenOver`]) and stops without writing.
pub const RECONNECT_FOR_MS: u64 = 600_000;

/// How a driver took up the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeUp {
    /// `kiln rollout`: a new rollout, nothing sent yet.
    Start,
    /// `kiln rollout resume`: a paused rollout, or one whose driver stopped (taken over).
    Resume,
    /// `kiln rollout retry`: a halted or complete rollout, its failed devices again.
    Retry,
}

/// Which step of the driver was under way when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doing {
    /// Waiting for a device's message, an operator's record, or the clock.
    Waiting,
    /// Reading retained messages (desired states, reports, the record).
    Reading,
    /// Publishing desired states: a send, a give-back, the group's at the finish.
    Publishing,
    /// Writing the record.
    Persisting,
}

/// What happened to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It took up the rollout (and stepped the record with the matching input).
    TookUp(TakeUp),
    /// A step failed: `away` when the broker went away (the session's error), not
    /// when something else did (a key, a record too large).
    Failed { doing: Doing, away: bool },
    /// The list of [`Do`]s went through.
    Done,
    /// A reconnect went through; whether the broker still keeps the rollout's record
    /// (one restarted without persistence has lost it).
    Reconnected { record_kept: bool },
    /// A reconnect failed: the broker is still away.
    StillAway,
    /// The record the broker keeps (or another writer's head, as delivered) names
    /// another driver of this rollout: an operator resumed it while this one was away
    /// or silent.
    TakenOver,
}

/// What the broker keeps of a rollout's group, read on reconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// No record (a broker restarted without persistence).
    Nothing,
    /// A record this driver may go on writing: its own, or one an operator's pause or
    /// abort changed.
    Record,
    /// This rollout's record, naming another driver that took it up.
    TakenOver,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Do {
    /// Reconnect to the broker, a second from now.
    Reconnect,
    /// Write the record again (the broker lost it).
    Persist,
    /// Subscribe again to the devices' answers and to the record's topic (where an
    /// operator's pause or abort arrives).
    Subscribe,
    /// Read the devices' retained reports: the answers missed while away.
    CatchUp,
    /// Carry out a rollout action: here always a send again to the devices the record
    /// has as sent and not answered (a device that has the release takes the same
    /// entry again and carries on).
    Perform(Action),
    /// Stop with the error that failed the step.
    Fail,
    /// Stop: the broker stayed away for [`RECONNECT_FOR_MS`]; `resume` takes it up.
    GiveUp,
    /// Stop, writing nothing more: another driver has the rollout.
    Yield,
}

/// Where the driver is, as far as recovery goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Recovery {
    /// Driving the rollout: waiting on devices and the clock.
    #[default]
    Driving,
    /// Sending the release again to the devices still pending.
    Resending,
    /// The broker went away at `since_ms`; reconnecting.
    Away { since_ms: u64 },
    /// Back after being away since `since_ms`, and putting right what was missed
    /// (the record, the answers).
    CatchingUp { since_ms: u64 },
    /// Stopped: the rollout is left on record for `resume`.
    Stopped,
}

impl Recovery {
    /// Takes what happened at `now_ms` to the driver of `record`; returns what to do.
    pub fn step(&mut self, record: &Rollout, now_ms: u64, event: Event) -> Vec<Do> {
        use Recovery::*;
        match (&*self, event) {
            // Whatever this driver was doing, another one drives the rollout now: any
            // write of this one's would undo that one's.
            (Stopped, Event::TakenOver) => Vec::new(),
            (_, Event::TakenOver) => {
                *self = Stopped;
                vec![Do::Yield]
            }
            // A driver that died between writing the record and publishing left
            // devices on record as sent that never got the release: whoever takes
            // it up sends it again to every device still pending.
            (Driving, Event::TookUp(TakeUp::Resume)) => self.resend(record),
            (Driving, Event::TookUp(TakeUp::Start | TakeUp::Retry)) => Vec::new(),
            // The broker going away at any step (a read, a publish, the record, not
            // only a wait for a message) is survived the same way.
            (Driving, Event::Failed { away: true, .. }) => {
                *self = Away { since_ms: now_ms };
                vec![Do::Reconnect]
            }
            // Reconnected, but the first read after it failed as the broker going
            // away (a cluster's node refusing the subscription while it elects
            // leaders): still away.
            (Away { since_ms }, Event::StillAway | Event::Failed { away: true, .. }) => {
                if now_ms.saturating_sub(*since_ms) >= RECONNECT_FOR_MS {
                    *self = Stopped;
                    vec![Do::GiveUp]
                } else {
                    vec![Do::Reconnect]
                }
            }
            (Away { since_ms }, Event::Reconnected { record_kept }) => {
                *self = CatchingUp {
                    since_ms: *since_ms,
                };
                let mut todo = Vec::new();
                if !record_kept {
                    todo.push(Do::Persist);
                }
                todo.extend([Do::Subscribe, Do::CatchUp]);
                todo
            }
            // A send cut short by the broker going away leaves devices on record as
            // sent that never got the release: send it again to every device still
            // pending, once caught up on the answers missed.
            (CatchingUp { .. }, Event::Done) => self.resend(record),
            // A broker that goes away again, or refuses a subscription, while the
            // driver catches up is still away: a cluster that lost a node takes
            // seconds to elect new leaders, and meanwhile its other nodes accept a
            // connection but may refuse its subscriptions (nats-server answers a
            // SUBACK failure when it cannot create the subscription's consumer). The
            // same window since the broker first went away bounds it.
            (CatchingUp { since_ms }, Event::Failed { away: true, .. }) => {
                *self = Away {
                    since_ms: *since_ms,
                };
                vec![Do::Reconnect]
            }
            // A send again cut short the same way: away again, from now.
            (Resending, Event::Failed { away: true, .. }) => {
                *self = Away { since_ms: now_ms };
                vec![Do::Reconnect]
            }
            (Resending, Event::Done) => {
                *self = Driving;
                Vec::new()
            }
            (Driving, Event::Done) => Vec::new(),
            // Anything else failing stops the driver with the error; the record stays
            // for `resume`.
            (Stopped, _) => Vec::new(),
            (_, Event::Failed { .. }) => {
                *self = Stopped;
                vec![Do::Fail]
            }
            // Events that cannot come in this state (the driver's mistake) change
            // nothing.
            (_, _) => Vec::new(),
        }
    }

    /// The send again to the devices still pending, if the rollout runs and any are.
    fn resend(&mut self, record: &Rollout) -> Vec<Do> {
        let pending: Vec<String> = record.pending().into_iter().map(String::from).collect();
        if pending.is_empty() || !matches!(record.phase, Phase::Running { .. }) {
            *self = Recovery::Driving;
            return Vec::new();
        }
        *self = Recovery::Resending;
        vec![Do::Perform(Action::Send(pending))]
    }

    /// Whether the driver is stopped.
    pub fn stopped(&self) -> bool {
        *self == Recovery::Stopped
    }
}

/// Whether `resume` may take up `record` at `now_ms`: a paused rollout, or a running
/// one whose driver has been silent for [`ORPHANED_MS`] (or any running one with
/// `--take-over`). `Err` says why not.
pub fn may_resume(record: &Rollout, now_ms: u64, take_over: bool) -> Result<(), String> {
    match &record.phase {
        Phase::Paused { .. } => Ok(()),
        Phase::Running { .. } => {
            let quiet = now_ms.saturating_sub(record.updated_ms);
            if quiet < ORPHANED_MS && !take_over {
                return Err(format!(
                    "{} drives it (its last word {}s ago); resume takes up a rollout whose driver has been silent for {}s (or pass --take-over if its machine is gone)",
                    record.driver,
                    quiet / 1000,
                    ORPHANED_MS / 1000
                ));
            }
            Ok(())
        }
        _ => Err("only a paused rollout, or one whose driver stopped, resumes (`retry` sends again to failed devices)".into()),
    }
}
