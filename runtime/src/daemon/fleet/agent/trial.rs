//! Trials: a staged version runs on trial, and the trial ends in a commit or a
//! rollback; the store's answers, and the agent degrading when it cannot save.

use std::collections::BTreeMap;

use kiln_protocol::fleet::EventKind;

use super::{Agent, Effect, Outcome, Run};
use crate::daemon::fleet::store::{DownloadKey, Installed};

impl Agent {
    pub(super) fn on_worker(&mut self, module: &str, outcome: Outcome) {
        let run = match &outcome {
            Outcome::Started { .. } => Some(Run::Running),
            Outcome::Crashed { reason, crashes } => Some(Run::Restarting {
                crashes: *crashes,
                reason: reason.clone(),
            }),
            Outcome::Exited { code } => Some(Run::Exited { code: *code }),
            Outcome::GaveUp { crashes } => {
                let last = match self.run.get(module) {
                    Some(Run::Restarting { reason, .. }) => format!(": {reason}"),
                    _ => String::new(),
                };
                Some(Run::Failed {
                    reason: format!("gave up after {crashes} crashes{last}"),
                })
            }
            Outcome::TickFailed { .. } => None,
        };
        if let Some(run) = run {
            if self.run.get(module) != Some(&run) {
                self.run.insert(module.to_string(), run);
            }
        }
        let now = self.now_ms;
        let Some(trial) = self.trials.get_mut(module) else {
            return;
        };
        match outcome {
            Outcome::Started { version } if version == trial.version && !trial.started => {
                // The health window starts now that it runs.
                trial.started = true;
                trial.deadline_ms = now.saturating_add(trial.health_ms);
            }
            Outcome::Started { .. } => {}
            // A command that ran and exited 0 did what it is for: healthy.
            Outcome::Exited { code: 0 } => self.commit(module),
            Outcome::Exited { code } => self.roll_back(
                module,
                format!("exited with code {code} during its health window"),
            ),
            Outcome::Crashed { reason, .. } => self.roll_back(
                module,
                format!("crashed during its health window: {reason}"),
            ),
            Outcome::GaveUp { crashes } => self.roll_back(
                module,
                format!("crashed {crashes} times during its health window"),
            ),
            Outcome::TickFailed { status } => self.roll_back(
                module,
                format!("kiln_tick returned {status} during its health window"),
            ),
        }
    }

    pub(super) fn on_tick(&mut self) {
        let now = self.now_ms;
        let due: Vec<(String, bool)> = self
            .trials
            .iter()
            .filter(|(_, t)| t.deadline_ms <= now)
            .map(|(name, t)| (name.clone(), t.started))
            .collect();
        for (name, started) in due {
            if started {
                self.commit(&name);
            } else {
                let s = self.settings.start_timeout_ms / 1000;
                self.roll_back(
                    &name,
                    format!("did not start within the start timeout ({s} s)"),
                );
            }
        }
        let stalled: Vec<DownloadKey> = self
            .downloads
            .iter()
            .filter(|(_, d)| !d.staging && d.last_progress_ms + self.settings.stall_ms <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in stalled {
            if self.downloads.get(&key).is_some_and(|d| d.mirror.is_some()) {
                let why = format!("no answer for {} s", self.settings.stall_ms / 1000);
                self.fall_back(key, why);
                continue;
            }
            let Some(d) = self.downloads.get_mut(&key) else {
                continue;
            };
            d.last_progress_ms = now;
            let have = d.have.as_ref().map_or(0, |h| h.len() as u32);
            let (name, version) = (d.module.name.clone(), d.module.version);
            let reason = match &d.list {
                Some(list) => format!(
                    "download stalled at {have}/{} chunks for {} s; asking again",
                    list.chunks.len(),
                    self.settings.stall_ms / 1000
                ),
                None => format!(
                    "download stalled waiting {} s for the chunk list of {}; asking again",
                    self.settings.stall_ms / 1000,
                    hex::encode(&key.sha256[..6])
                ),
            };
            self.event(&name, version, EventKind::Rejected { reason });
            // A resubscription makes the broker send the retained chunks again.
            self.unsubscribe_missing(key);
            self.subscribe_missing(key);
        }
        if self.degraded.is_some() && !self.unreadable_state {
            // Probe: a save that works ends degraded mode.
            self.save();
        }
        self.check_stale();
    }

    pub(super) fn commit(&mut self, name: &str) {
        let Some(trial) = self.trials.remove(name) else {
            return;
        };
        // Only what the newest desired state still names is committed.
        if self.wanted_sha(name) != Some(trial.sha256) {
            self.record_mut(name).staged = None;
            self.run_plans();
            return self.reconcile();
        }
        let r = self.record_mut(name);
        let Some(staged) = r.staged.take() else {
            return;
        };
        r.floor = r.floor.max(staged.version);
        let version = staged.version;
        r.committed = Some(staged);
        self.save();
        self.out.push(Effect::Checkpoint("commit"));
        self.event(name, version, EventKind::Committed);
        // A newer desired state may have arrived during the trial.
        self.reconcile();
    }

    pub(super) fn roll_back(&mut self, name: &str, reason: String) {
        let Some(trial) = self.trials.remove(name) else {
            return;
        };
        self.tried
            .insert(name.to_string(), (trial.version, trial.sha256));
        let serial = self
            .state
            .modules
            .get(name)
            .and_then(|r| r.source.as_ref())
            .and_then(|s| self.desired.get(s))
            .map_or(0, |d| d.serial);
        self.refused_serial.insert(name.to_string(), serial);
        let r = self.record_mut(name);
        if let Some(staged) = r.staged.take() {
            r.rejected.push(staged.sha256);
        }
        self.save();
        self.run_plans();
        self.event(name, trial.version, EventKind::RolledBack { reason });
        self.reconcile();
    }

    pub(super) fn on_saved(&mut self, result: Result<(), String>) {
        let serial = self.pending_saves.pop_front();
        match result {
            Ok(()) => {
                // Saves are answered in order: the newest answered is what is on
                // disk (lower than before after a rotation ended a fast-forward).
                if let Some(serial) = serial {
                    self.saved_serial = serial;
                }
                if self.degraded.take().is_some() && !self.unreadable_state {
                    tracing::info!("the data dir is writable again; updates resume");
                    self.reconcile();
                }
            }
            Err(e) => self.degrade(format!("cannot save the device state: {e}")),
        }
    }

    /// The data dir failed: what is committed keeps running, updates wait.
    pub(super) fn degrade(&mut self, why: String) {
        if self.degraded.as_deref() == Some(why.as_str()) {
            return;
        }
        tracing::error!(reason = %why, "updates refused until the data dir works again");
        self.degraded = Some(why.clone());
        let keys: Vec<DownloadKey> = self.downloads.keys().copied().collect();
        for key in keys {
            self.unsubscribe_missing(key);
            self.downloads.remove(&key);
        }
        self.event(
            "*",
            0,
            EventKind::Rejected {
                reason: format!("updates refused: {why}"),
            },
        );
    }

    /// Tells the supervisor what runs: the staged slot of modules on trial, the
    /// committed slot of the others.
    pub(super) fn run_plans(&mut self) {
        let plans: BTreeMap<String, Installed> = self
            .state
            .modules
            .iter()
            .filter_map(|(name, r)| {
                let i = if self.trials.contains_key(name) {
                    r.staged.as_ref()
                } else {
                    r.committed.as_ref()
                }?;
                Some((name.clone(), i.clone()))
            })
            .collect();
        if self.last_run.as_ref() != Some(&plans) {
            self.last_run = Some(plans.clone());
            self.out.push(Effect::Run(plans));
        }
    }
}
