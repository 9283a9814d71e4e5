//! Desired states: which one wins (device over group), whether it may be taken
//! (signatures, fleet, freshness, the anti-rollback floors), and the reconciliation of
//! what runs with what is wanted.

use std::collections::{BTreeMap, BTreeSet};

use kiln_protocol::fleet::{
    sha256, utc, Desired, DesiredModule, EventKind, Scope, SignedDesired, TargetArtifact,
    MAX_DESIRED,
};
use kiln_protocol::keys::KeyId;
use kiln_protocol::names::{self, Kind};

use super::{Agent, Download, Effect, StageFrom, Trial, MAX_HEALTH_WINDOW_MS};
use crate::daemon::fleet::store::{DownloadKey, Floor};

impl Agent {
    pub(super) fn on_desired(&mut self, source: &str, payload: &[u8]) {
        if payload.is_empty() {
            return; // a cleared retained message
        }
        if payload.len() > MAX_DESIRED {
            let reason = format!(
                "desired state on {source} is {} bytes (limit {MAX_DESIRED})",
                payload.len()
            );
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        let (desired, signers) = match SignedDesired::verify(payload, self.trust.chain.root()) {
            Ok(opened) => opened,
            Err(why) => {
                // A key this root does not know may be one the next root brings;
                // nothing else a root changes makes a state open.
                if why.may_open_under_newer_root() {
                    self.unverified.insert(source.to_string(), payload.to_vec());
                }
                let reason = format!("desired state on {source} refused: {why}");
                return self.event("*", 0, EventKind::Rejected { reason });
            }
        };
        self.unverified.remove(source);
        if let Err(reason) = self.admissible(source, &desired) {
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        let digest = sha256(&postcard::to_stdvec(&desired).unwrap_or_default());
        if let Err(reason) = self.fresh(source, &desired, digest) {
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        self.state
            .serials
            .insert(source.to_string(), desired.serial);
        self.state.digests.insert(source.to_string(), digest);
        self.raise_floors(source, &signers, desired.serial, digest);
        self.desired.insert(source.to_string(), desired);
        self.check_stale();
        if let Some(why) = self.degraded.clone() {
            // Kept in memory: acted on when the data dir works again.
            let reason = format!("updates refused: {why}");
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        self.save();
        self.reconcile();
    }

    /// Not older than what a key still trusted signed and this device applied, not a
    /// second body under such a serial, within the serial bounds, not expired, and
    /// (the first from its source under the keys trusted now) not issued before the
    /// device was provisioned.
    pub(super) fn fresh(
        &self,
        source: &str,
        desired: &Desired,
        digest: [u8; 32],
    ) -> Result<(), String> {
        let floors = self.binding_floors(source);
        for floor in &floors {
            if desired.serial < floor.serial {
                return Err(format!(
                    "desired state serial {} on {source} is older than serial {} already applied (a replay)",
                    desired.serial, floor.serial
                ));
            }
            if desired.serial == floor.serial && floor.digest != digest {
                return Err(format!(
                    "desired state serial {} on {source} was already applied with another body",
                    desired.serial
                ));
            }
        }
        desired.check_fresh(self.now_ms)?;
        // Only where nothing was applied yet: after that, the floors hold.
        if floors.is_empty() && desired.issued_ms < self.trust.not_before_ms {
            return Err(format!(
                "desired state serial {} on {source} was issued {}, before this device was provisioned ({}; a replay)",
                desired.serial,
                utc(desired.issued_ms),
                utc(self.trust.not_before_ms)
            ));
        }
        Ok(())
    }

    /// The release keys of the root this device trusts now.
    pub(super) fn release_ids(&self) -> BTreeSet<[u8; 8]> {
        self.trust
            .chain
            .root()
            .release
            .ids()
            .into_iter()
            .map(|id| id.0)
            .collect()
    }

    /// The floors on `source` set by keys the current root still trusts.
    pub(super) fn binding_floors(&self, source: &str) -> Vec<Floor> {
        let trusted = self.release_ids();
        self.state
            .floors
            .get(source)
            .map(|f| {
                f.iter()
                    .filter(|f| trusted.contains(&f.key))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Raises the floor of each key that signed the state just taken, and forgets the
    /// floors of keys the current root no longer trusts.
    pub(super) fn raise_floors(
        &mut self,
        source: &str,
        signers: &[KeyId],
        serial: u64,
        digest: [u8; 32],
    ) {
        let trusted = self.release_ids();
        let floors = self.state.floors.entry(source.to_string()).or_default();
        floors.retain(|f| trusted.contains(&f.key));
        for key in signers {
            match floors.iter_mut().find(|f| f.key == key.0) {
                Some(f) if f.serial > serial => {}
                Some(f) => {
                    f.serial = serial;
                    f.digest = digest;
                }
                None => floors.push(Floor {
                    key: key.0,
                    serial,
                    digest,
                }),
            }
        }
        floors.sort_by_key(|f| f.key);
    }

    /// Whether the states this device follows are older than its bound (or, with none,
    /// whether it has heard none for that long): a broker that keeps serving old states
    /// cannot hide newer ones for longer. Said once as an event, and in the status.
    pub(super) fn check_stale(&mut self) {
        let bound = self.trust.stale_after_ms;
        let now = self.now_ms;
        let oldest = self
            .desired
            .iter()
            .min_by_key(|(_, d)| d.issued_ms)
            .map(|(s, d)| (s.clone(), d.issued_ms, d.expires_ms));
        let root_stale = self.trust.chain.root().stale_at(now);
        let stale = match oldest {
            _ if root_stale.is_some() => root_stale,
            Some((source, _, expires)) if now >= expires => Some(format!(
                "the desired state on {source} expired at {} and nothing newer arrived",
                utc(expires)
            )),
            Some((source, issued, _)) if now.saturating_sub(issued) > bound => Some(format!(
                "the desired state on {source} was issued {} s ago (bound {} s); newer ones may be withheld",
                (now - issued) / 1000,
                bound / 1000
            )),
            None if now.saturating_sub(self.started_ms) > bound => Some(format!(
                "no desired state in {} s (bound {} s)",
                (now - self.started_ms) / 1000,
                bound / 1000
            )),
            _ => None,
        };
        // Said when it starts and when it ends, not at every tick while it lasts.
        let changed = stale.is_some() != self.stale.is_some();
        self.stale = stale.clone();
        if changed {
            if let Some(reason) = stale {
                self.event("*", 0, EventKind::Stale { reason });
            }
            self.publish_status();
        }
    }

    /// Everything about a signed desired state except its serial: for this device, on
    /// its own topic, with names that are safe as paths and limits that make sense.
    pub(super) fn admissible(&self, source: &str, desired: &Desired) -> Result<(), String> {
        let for_us = match &desired.scope {
            Scope::Device(id) => *id == self.device && *source == self.topics.desired(id),
            Scope::Group(g) => self.groups.contains(g) && *source == self.topics.group_desired(g),
        };
        if !for_us {
            return Err(format!(
                "desired state for {:?} arrived on {source}",
                desired.scope
            ));
        }
        let mut seen = BTreeSet::new();
        for m in &desired.modules {
            names::check(Kind::Module, &m.name)?;
            if m.health_window_ms > MAX_HEALTH_WINDOW_MS {
                return Err(format!(
                    "module `{}`: health window of {} ms (limit {MAX_HEALTH_WINDOW_MS})",
                    m.name, m.health_window_ms
                ));
            }
            if !seen.insert(&m.name) {
                return Err(format!("desired state names module `{}` twice", m.name));
            }
        }
        Ok(())
    }

    /// Each wanted module with the source it comes from; device-level entries override
    /// group entries of the same name.
    pub(super) fn wanted(&self) -> BTreeMap<String, (String, DesiredModule)> {
        let mut wanted = BTreeMap::new();
        let device_topic = self.topics.desired(&self.device);
        let groups = self.desired.iter().filter(|(s, _)| **s != device_topic);
        let device = self.desired.get_key_value(&device_topic);
        for (source, d) in groups.chain(device) {
            for m in &d.modules {
                wanted.insert(m.name.clone(), (source.clone(), m.clone()));
            }
        }
        wanted
    }

    /// This device's artifact of a module's release, or why the release has none.
    pub(super) fn target_of<'a>(&self, d: &'a DesiredModule) -> Result<&'a TargetArtifact, String> {
        d.artifact_for(&self.facts.triple, &self.facts.cpu_features)
    }

    pub(super) fn wanted_sha(&self, name: &str) -> Option<[u8; 32]> {
        let wanted = self.wanted();
        let (_, m) = wanted.get(name)?;
        self.target_of(m).ok().map(|t| t.sha256)
    }

    pub(super) fn reconcile(&mut self) {
        let wanted = self.wanted();
        // A module its source's newest desired state leaves out stops. One whose
        // source has not been heard from since the start keeps running until it is;
        // the anti-rollback floor stays either way.
        let gone: Vec<String> = self
            .state
            .modules
            .iter()
            .filter(|(name, r)| {
                !wanted.contains_key(*name)
                    && (r.committed.is_some() || r.staged.is_some() || r.source.is_some())
                    && r.source
                        .as_ref()
                        .is_none_or(|s| self.desired.contains_key(s))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.trials.remove(&name);
            let r = self.record_mut(&name);
            r.committed = None;
            r.staged = None;
            r.source = None;
            self.event(
                &name,
                0,
                EventKind::Rejected {
                    reason: "no longer desired; stopped".into(),
                },
            );
        }
        // Downloads of something no longer wanted (or no longer offered that way) stop
        // here, before they install it.
        let stale: Vec<DownloadKey> = self
            .downloads
            .iter()
            .filter(|(_, d)| {
                let offered = |t: &TargetArtifact| {
                    t.sha256 == d.target.sha256 && t.transfers().any(|x| *x == d.transfer)
                };
                wanted
                    .get(&d.module.name)
                    .and_then(|(_, m)| self.target_of(m).ok())
                    .is_none_or(|t| !offered(t))
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.cancel_download(key);
        }
        // A trial of a version that is no longer wanted ends now, uncommitted.
        let superseded: Vec<(String, Trial)> = self
            .trials
            .iter()
            .filter(|(name, t)| {
                wanted
                    .get(*name)
                    .and_then(|(_, m)| self.target_of(m).ok())
                    .is_none_or(|target| target.sha256 != t.sha256)
            })
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for (name, trial) in superseded {
            self.trials.remove(&name);
            self.record_mut(&name).staged = None;
            self.event(
                &name,
                trial.version,
                EventKind::RolledBack {
                    reason: "superseded by a newer desired state during its trial".into(),
                },
            );
        }
        for (source, module) in wanted.values() {
            self.record_mut(&module.name).source = Some(source.clone());
            self.reconcile_module(module);
        }
        self.save();
        self.run_plans();
    }

    pub(super) fn reconcile_module(&mut self, d: &DesiredModule) {
        let record = self.state.modules.get(&d.name).cloned().unwrap_or_default();
        // An entry that makes no sense, or a release without an artifact for this
        // device, is refused on its own: the other modules of the desired state go
        // ahead, and this one keeps running what it committed.
        let target = match self.target_of(d) {
            Ok(t) => t.clone(),
            Err(reason) => {
                return self.event_once(&d.name, d.version, EventKind::Rejected { reason })
            }
        };
        let sha = target.sha256;
        if let Err(reason) = d.limits.check().and_then(|()| target.check()) {
            let reason = reason.into();
            return self.event_once(&d.name, d.version, EventKind::Rejected { reason });
        }
        if let Some(c) = &record.committed {
            if c.sha256 == sha {
                // Same code; a new config or limits take effect with a swap.
                if c.config != d.config || c.limits != d.limits {
                    let mut c = c.clone();
                    c.config = d.config.clone();
                    c.limits = d.limits.clone();
                    self.record_mut(&d.name).committed = Some(c);
                }
                return;
            }
        }
        if record.rejected.contains(&sha) {
            let serial = record
                .source
                .as_ref()
                .and_then(|s| self.desired.get(s))
                .map_or(0, |x| x.serial);
            let heard = self.refused_serial.insert(d.name.clone(), serial);
            if heard.is_some_and(|h| h < serial) {
                let reason = "this artifact was rolled back on this device before".into();
                self.event(&d.name, d.version, EventKind::Rejected { reason });
            }
            return;
        }
        if self.trials.contains_key(&d.name)
            || self.downloads.values().any(|x| x.module.name == d.name)
        {
            return;
        }
        let committed = record.committed.as_ref().map_or(0, |c| c.version);
        let floor = record.floor.max(committed);
        if d.version < floor && !d.allow_downgrade {
            let reason = format!(
                "version {} is lower than committed version {floor}; the desired state does not allow a downgrade",
                d.version
            );
            // Not remembered as rejected: a later desired state may allow the downgrade.
            return self.event_once(&d.name, d.version, EventKind::Rejected { reason });
        }
        if let Some(why) = self.degraded.clone() {
            let reason = format!("updates refused: {why}");
            return self.event_once(&d.name, d.version, EventKind::Rejected { reason });
        }
        let slot = self.slot_for(&d.name);
        let staged_here = record
            .staged
            .as_ref()
            .is_some_and(|s| s.sha256 == sha && s.slot == slot);
        let base = record.committed.as_ref().map(|c| c.sha256);
        let (transfer, base) = target.transfer_from(base, self.no_patch.contains(&sha));
        let (transfer, key) = (transfer.clone(), DownloadKey::of(transfer));
        tracing::info!(
            module = %d.name,
            version = d.version,
            codec = transfer.codec.name(),
            bytes = transfer.len,
            base = base.map(|b| hex::encode(&b[..6])),
            "fetching"
        );
        let mirror = self.mirror_for(record.source.as_deref(), &transfer.sha256);
        let download = Download {
            module: d.clone(),
            target: target.clone(),
            transfer,
            base,
            list: None,
            have: None,
            last_progress_ms: self.now_ms,
            staging: staged_here,
            mirror,
            in_flight: None,
        };
        self.begin_download(key, download);
        if staged_here {
            // Staged before a restart: verify the slot again and go on from there.
            self.out.push(Effect::Stage {
                module: Box::new(d.clone()),
                target: Box::new(target),
                key,
                slot,
                from: Box::new(StageFrom::Slot),
            });
        }
    }
}
