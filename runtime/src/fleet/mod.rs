//! Fleet updates: the device side of desired state over MQTT. The agent reconciles what
//! the signed desired state asks for with what runs: fetch missing chunks (resumable),
//! verify, stage into the inactive slot, run it on trial for the health window, then
//! commit or roll back, reporting every step.

pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kiln_protocol::artifact::Envelope;
use kiln_protocol::compat;
use kiln_protocol::fleet::{
    Chunk, Desired, DesiredModule, DeviceFacts, Event, EventKind, EventV1, ModuleReport,
    ModuleState, Reported, ReportedV1, Scope, SignedDesired, Status, StatusV1, Topics,
};
use kiln_protocol::keys::TrustedKeys;
use sha2::{Digest, Sha256};

use crate::config::{ModulePlan, MqttConfig, RestartPolicy};
use crate::link::{Link, LinkEvent};
use crate::supervisor::{now_ms, Record};
use store::{Installed, Slot, StateV1, Store};

/// What the agent reacts to.
pub enum AgentIn {
    Connected,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// A supervisor record about a fleet module (health during a trial).
    Record(Record),
    Stop,
}

/// How the agent changes what runs: the full set of fleet modules.
pub type ApplyFn = Box<dyn Fn(Vec<ModulePlan>) + Send>;

pub struct Agent {
    device: String,
    groups: Vec<String>,
    topics: Topics,
    trust: TrustedKeys,
    store: Store,
    state: StateV1,
    link: Link,
    boot_id: u64,
    apply: ApplyFn,
    /// Latest verified desired state per source topic.
    desired: BTreeMap<String, Desired>,
    downloads: HashMap<[u8; 32], Download>,
    trials: HashMap<String, Trial>,
    last_event: HashMap<String, String>,
    fault: Option<String>,
}

struct Download {
    module: DesiredModule,
    have: BTreeSet<u32>,
}

struct Trial {
    deadline: Instant,
    started: bool,
    version: u64,
}

/// The retained status the broker publishes for this device if kilnd vanishes.
pub fn last_will(config: &MqttConfig, device: &str) -> (String, Vec<u8>) {
    let will = postcard::to_stdvec(&Status::V1(StatusV1 {
        device: device.into(),
        online: false,
        facts: None,
    }))
    .unwrap_or_default();
    (Topics::new(&config.prefix).status(device), will)
}

impl From<LinkEvent> for AgentIn {
    fn from(e: LinkEvent) -> Self {
        match e {
            LinkEvent::Connected => AgentIn::Connected,
            LinkEvent::Message { topic, payload } => AgentIn::Message { topic, payload },
        }
    }
}

/// Opens the device state and runs what was committed; `run` then serves until
/// `AgentIn::Stop`.
pub fn start(
    config: &MqttConfig,
    device: &str,
    data_dir: PathBuf,
    trust: TrustedKeys,
    apply: ApplyFn,
    link: Link,
    boot_id: u64,
) -> Result<Agent, String> {
    let topics = Topics::new(&config.prefix);
    let store = Store::open(&data_dir)
        .map_err(|e| format!("cannot use data dir `{}`: {e}", data_dir.display()))?;
    let state = store
        .load()
        .map_err(|e| format!("cannot read the device state: {e}"))?;
    let agent = Agent {
        device: device.into(),
        groups: config.groups.clone(),
        topics,
        trust,
        store,
        state,
        link,
        boot_id,
        apply,
        desired: BTreeMap::new(),
        downloads: HashMap::new(),
        trials: HashMap::new(),
        last_event: HashMap::new(),
        fault: std::env::var("KILN_FAULT").ok(),
    };
    // What was committed runs before the broker is even reachable.
    agent.apply_plans();
    Ok(agent)
}

impl Agent {
    pub fn run(mut self, rx: Receiver<AgentIn>) {
        loop {
            let wait = self
                .trials
                .values()
                .map(|t| t.deadline.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(1));
            match rx.recv_timeout(wait) {
                Ok(AgentIn::Connected) => self.on_connect(),
                Ok(AgentIn::Message { topic, payload }) => self.on_message(&topic, &payload),
                Ok(AgentIn::Record(record)) => self.on_record(record),
                Ok(AgentIn::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.publish_status(false);
                    self.link.disconnect();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.check_trials();
        }
    }

    fn on_connect(&mut self) {
        self.publish_status(true);
        let mut topics = vec![self.topics.desired(&self.device)];
        topics.extend(self.groups.iter().map(|g| self.topics.group_desired(g)));
        for topic in topics {
            self.link.subscribe(topic);
        }
        let missing: Vec<String> = self
            .downloads
            .iter()
            .flat_map(|(sha, d)| {
                (0..d.module.artifact.chunks.len() as u32)
                    .filter(|n| !d.have.contains(n))
                    .map(|n| self.topics.chunk(sha, n))
                    .collect::<Vec<_>>()
            })
            .collect();
        for topic in missing {
            self.link.subscribe(topic);
        }
        self.publish_reported();
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if self.topics.parse_chunk(topic).is_some() {
            self.on_chunk(topic, payload);
        } else if topic.ends_with("/desired") {
            self.on_desired(topic, payload);
        }
    }

    fn on_desired(&mut self, source: &str, payload: &[u8]) {
        if payload.is_empty() {
            return; // a cleared retained message
        }
        let desired = match SignedDesired::open(payload, &self.trust) {
            Ok(d) => d,
            Err(why) => return self.event("*", 0, EventKind::Rejected { reason: why }),
        };
        let for_us = match &desired.scope {
            Scope::Device(id) => *id == self.device && *source == self.topics.desired(id),
            Scope::Group(g) => self.groups.contains(g) && *source == self.topics.group_desired(g),
        };
        if !for_us {
            let reason = format!("desired state for {:?} arrived on {source}", desired.scope);
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        let last = self.state.serials.get(source).copied().unwrap_or(0);
        if desired.serial < last {
            let reason = format!(
                "desired state serial {} is older than {last} already applied",
                desired.serial
            );
            return self.event("*", 0, EventKind::Rejected { reason });
        }
        self.state
            .serials
            .insert(source.to_string(), desired.serial);
        self.save();
        self.desired.insert(source.to_string(), desired);
        self.reconcile();
    }

    /// Each wanted module with the desired-state topic it comes from; device-level
    /// entries override group entries of the same name.
    fn wanted(&self) -> BTreeMap<String, (String, DesiredModule)> {
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

    fn reconcile(&mut self) {
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
                    && r.source
                        .as_ref()
                        .is_none_or(|s| self.desired.contains_key(s))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let record = self.record_mut(&name);
            record.committed = None;
            record.staged = None;
            record.source = None;
            self.trials.remove(&name);
        }
        for (source, module) in wanted.values() {
            self.record_mut(&module.name).source = Some(source.clone());
            self.reconcile_module(module);
        }
        self.save();
        self.apply_plans();
        self.publish_reported();
    }

    fn reconcile_module(&mut self, d: &DesiredModule) {
        let record = self
            .state
            .modules
            .entry(d.name.clone())
            .or_default()
            .clone();
        let sha = d.artifact.sha256;
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
        if self.trials.contains_key(&d.name)
            || record.rejected.contains(&sha)
            || self.downloads.contains_key(&sha)
        {
            return;
        }
        if let Err(reason) = d.artifact.check() {
            self.record_mut(&d.name).rejected.push(sha);
            return self.event(&d.name, d.version, EventKind::Rejected { reason });
        }
        let committed = record.committed.as_ref().map_or(0, |c| c.version);
        if d.version < record.floor.max(committed) && !d.allow_downgrade {
            let reason = format!(
                "version {} is lower than committed version {}; the desired state does not allow a downgrade",
                d.version,
                record.floor.max(committed)
            );
            // Not remembered as rejected: a later desired state may allow the downgrade.
            return self.event(&d.name, d.version, EventKind::Rejected { reason });
        }
        if let Some(s) = record.staged.as_ref().filter(|s| s.sha256 == sha) {
            // Staged before a restart: verify the slot again and go on from there.
            let path = self.store.slot_path(&d.name, s.slot);
            if let Ok(bytes) = std::fs::read(&path) {
                if self.verify(d, &bytes).is_ok() {
                    return self.activate(d);
                }
            }
        }
        let total = d.artifact.chunks.len() as u32;
        let have: BTreeSet<u32> = self
            .store
            .chunks_present(&sha)
            .into_iter()
            .filter(|n| *n < total)
            .collect();
        self.event(
            &d.name,
            d.version,
            EventKind::Downloading {
                have: have.len() as u32,
                total,
            },
        );
        let missing: Vec<u32> = (0..total).filter(|n| !have.contains(n)).collect();
        self.drop_downloads_of(&d.name);
        self.downloads.insert(
            sha,
            Download {
                module: d.clone(),
                have,
            },
        );
        if missing.is_empty() {
            return self.finish_download(&sha);
        }
        for n in missing {
            self.link.subscribe(self.topics.chunk(&sha, n));
        }
    }

    fn on_chunk(&mut self, topic: &str, payload: &[u8]) {
        let Some((sha, n)) = self.topics.parse_chunk(topic) else {
            return;
        };
        let Some(download) = self.downloads.get(&sha) else {
            return;
        };
        if payload.is_empty() || download.have.contains(&n) {
            return;
        }
        let module = download.module.clone();
        let reject = |why: String| EventKind::Rejected {
            reason: format!("chunk {n} of {}: {why}", hex::encode(&sha[..6])),
        };
        let data = match postcard::from_bytes::<Chunk>(payload) {
            Ok(Chunk::V1 {
                sha256,
                index,
                data,
            }) if sha256 == sha && index == n => data,
            Ok(Chunk::V1 { sha256, index, .. }) => {
                let why = format!(
                    "carries chunk {index} of {}, not this one",
                    hex::encode(&sha256[..6])
                );
                return self.event(&module.name, module.version, reject(why));
            }
            Err(e) => {
                return self.event(
                    &module.name,
                    module.version,
                    reject(format!("malformed: {e}")),
                )
            }
        };
        let art = &module.artifact;
        let Some(expected) = art.chunks.get(n as usize) else {
            return self.event(
                &module.name,
                module.version,
                reject("beyond the last chunk".into()),
            );
        };
        if data.len() as u64 != art.chunk_len(n) {
            let why = format!("{} bytes, expected {}", data.len(), art.chunk_len(n));
            return self.event(&module.name, module.version, reject(why));
        }
        if <[u8; 32]>::from(Sha256::digest(&data)) != *expected {
            return self.event(
                &module.name,
                module.version,
                reject("sha256 mismatch".into()),
            );
        }
        if let Err(e) = self.store.write_chunk(&sha, n, &data) {
            tracing::error!(error = %e, "cannot store a chunk");
            return;
        }
        self.link.unsubscribe(self.topics.chunk(&sha, n));
        self.fault("download");
        let Some(download) = self.downloads.get_mut(&sha) else {
            return;
        };
        download.have.insert(n);
        let (have, total) = (download.have.len() as u32, art.chunks.len() as u32);
        if have == total {
            self.finish_download(&sha);
            self.save();
            self.apply_plans();
            self.publish_reported();
        } else if have % 8 == 0 {
            self.event(
                &module.name,
                module.version,
                EventKind::Downloading { have, total },
            );
        }
    }

    /// All chunks are on disk: assemble, verify, stage into the inactive slot, activate.
    fn finish_download(&mut self, sha: &[u8; 32]) {
        let Some(download) = self.downloads.remove(sha) else {
            return;
        };
        let d = download.module;
        let mut bytes = Vec::with_capacity(d.artifact.len as usize);
        for n in 0..d.artifact.chunks.len() as u32 {
            match self.store.read_chunk(sha, n) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(e) => {
                    tracing::error!(error = %e, chunk = n, "stored chunk unreadable");
                    self.store.drop_download(sha);
                    return;
                }
            }
        }
        if let Err(reason) = self.verify(&d, &bytes) {
            self.store.drop_download(sha);
            self.record_mut(&d.name).rejected.push(*sha);
            return self.event(&d.name, d.version, EventKind::Rejected { reason });
        }
        self.event(&d.name, d.version, EventKind::Verified);
        let slot = self
            .state
            .modules
            .get(&d.name)
            .and_then(|r| r.committed.as_ref())
            .map_or(Slot::A, |c| c.slot.other());
        if let Err(e) = self.store.write_slot(&d.name, slot, &bytes) {
            tracing::error!(error = %e, "cannot write the inactive slot");
            return;
        }
        self.record_mut(&d.name).staged = Some(Installed::from_desired(slot, &d));
        self.save();
        self.store.drop_download(sha);
        self.event(&d.name, d.version, EventKind::Staged);
        self.fault("stage");
        self.activate(&d);
    }

    /// Everything about the bytes: length and hash as desired, a trusted signature, the
    /// manifest's name and version as desired, and a target this device can run.
    fn verify(&self, d: &DesiredModule, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() as u64 != d.artifact.len
            || <[u8; 32]>::from(Sha256::digest(bytes)) != d.artifact.sha256
        {
            return Err("assembled artifact does not match its sha256".into());
        }
        let verified = Envelope::parse(bytes)
            .and_then(|e| e.verify(&self.trust))
            .map_err(|e| format!("artifact refused: {e}"))?;
        let m = &verified.manifest;
        if m.name != d.name || m.version != d.version {
            return Err(format!(
                "artifact is {} v{}, the desired state says {} v{}",
                m.name, m.version, d.name, d.version
            ));
        }
        compat::check(m, &crate::host::facts()).map_err(|e| e.to_string())
    }

    fn activate(&mut self, d: &DesiredModule) {
        self.trials.insert(
            d.name.clone(),
            Trial {
                deadline: Instant::now() + Duration::from_millis(d.health_window_ms.max(100)),
                started: false,
                version: d.version,
            },
        );
        self.apply_plans();
        self.event(&d.name, d.version, EventKind::Activated);
        self.fault("activate");
    }

    fn on_record(&mut self, record: Record) {
        use crate::supervisor::Event as E;
        let Some(trial) = self.trials.get_mut(&record.module) else {
            return;
        };
        match record.event {
            E::Started {
                ready, first_tick, ..
            } if ready.version == trial.version => {
                trial.started = first_tick.is_none_or(|t| t.status == 0);
            }
            E::Stopped { reason, .. } if !reason.is_clean() => {
                self.roll_back(&record.module, reason.to_string());
            }
            E::TickFailed { status } => {
                self.roll_back(&record.module, format!("kiln_tick returned {status}"));
            }
            _ => {}
        }
    }

    fn check_trials(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, bool)> = self
            .trials
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(name, t)| (name.clone(), t.started))
            .collect();
        for (name, started) in due {
            if started {
                self.commit(&name);
            } else {
                self.roll_back(&name, "did not start within the health window".into());
            }
        }
    }

    fn commit(&mut self, name: &str) {
        self.trials.remove(name);
        let record = self.record_mut(name);
        let Some(staged) = record.staged.take() else {
            return;
        };
        record.floor = record.floor.max(staged.version);
        let version = staged.version;
        record.committed = Some(staged);
        self.save();
        self.fault("commit");
        self.event(name, version, EventKind::Committed);
        // A newer desired state may have arrived during the trial.
        self.reconcile();
    }

    fn roll_back(&mut self, name: &str, reason: String) {
        let Some(trial) = self.trials.remove(name) else {
            return;
        };
        let record = self.record_mut(name);
        if let Some(staged) = record.staged.take() {
            record.rejected.push(staged.sha256);
        }
        self.save();
        self.apply_plans();
        self.event(name, trial.version, EventKind::RolledBack { reason });
        // A newer desired state may have arrived during the trial.
        self.reconcile();
    }

    /// A newer version supersedes a transfer in progress for the same module.
    fn drop_downloads_of(&mut self, module: &str) {
        let stale: Vec<[u8; 32]> = self
            .downloads
            .iter()
            .filter(|(_, d)| d.module.name == module)
            .map(|(sha, _)| *sha)
            .collect();
        for sha in stale {
            if let Some(d) = self.downloads.remove(&sha) {
                for n in (0..d.module.artifact.chunks.len() as u32).filter(|n| !d.have.contains(n))
                {
                    self.link.unsubscribe(self.topics.chunk(&sha, n));
                }
            }
            self.store.drop_download(&sha);
        }
    }

    /// Tells the supervisor what runs: the staged slot of modules on trial, the
    /// committed slot of the others.
    fn apply_plans(&self) {
        let plans = self
            .state
            .modules
            .iter()
            .filter_map(|(name, r)| {
                let installed = if self.trials.contains_key(name) {
                    r.staged.as_ref()
                } else {
                    r.committed.as_ref()
                }?;
                Some(self.plan(name, installed))
            })
            .collect();
        (self.apply)(plans);
    }

    fn plan(&self, name: &str, i: &Installed) -> ModulePlan {
        let limits = &i.limits;
        ModulePlan {
            name: name.into(),
            artifact: self.store.slot_path(name, i.slot),
            artifact_digest: Some(i.sha256),
            config: i.config.clone(),
            memory_pages: limits.memory_limit_pages,
            fuel_per_call: limits.fuel_per_call,
            tick: Duration::from_millis(limits.tick_ms.unwrap_or(1000)),
            timeout: Duration::from_millis(limits.timeout_ms.unwrap_or(1000)),
            run_timeout: None,
            start_timeout: Duration::from_secs(30),
            inbox: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            dirs: Vec::new(),
            restart: RestartPolicy::default(),
        }
    }

    fn record_mut(&mut self, name: &str) -> &mut store::ModuleRecord {
        self.state.modules.entry(name.to_string()).or_default()
    }

    fn save(&self) {
        if let Err(e) = self.store.save(&self.state) {
            tracing::error!(error = %e, "cannot save the device state");
        }
    }

    fn event(&mut self, module: &str, version: u64, kind: EventKind) {
        tracing::info!(module, version, event = %kind, "fleet");
        self.last_event.insert(module.to_string(), kind.to_string());
        let event = Event::V1(EventV1 {
            at_ms: now_ms(),
            module: module.into(),
            version,
            kind,
        });
        self.publish(self.topics.events(&self.device), false, &event);
    }

    fn publish_reported(&self) {
        let modules = self
            .state
            .modules
            .iter()
            .filter_map(|(name, r)| {
                let c = r.committed.as_ref();
                let (version, sha256, state) = match (self.trials.get(name), c) {
                    (Some(t), _) => (t.version, r.staged.as_ref()?.sha256, ModuleState::Updating),
                    (None, Some(c)) => (c.version, c.sha256, ModuleState::Running),
                    // Desired but never committed: its first version failed.
                    (None, None) if r.source.is_some() => (0, [0; 32], ModuleState::Failed),
                    // No longer desired: only its anti-rollback floor is kept.
                    (None, None) => return None,
                };
                Some(ModuleReport {
                    name: name.clone(),
                    version,
                    sha256,
                    state,
                    last_event: self.last_event.get(name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let serial = self.state.serials.values().copied().max().unwrap_or(0);
        let reported = Reported::V1(ReportedV1 { serial, modules });
        self.publish(self.topics.reported(&self.device), true, &reported);
    }

    fn publish_status(&self, online: bool) {
        let facts = crate::host::facts();
        let status = Status::V1(StatusV1 {
            device: self.device.clone(),
            online,
            facts: online.then(|| DeviceFacts {
                triple: facts.triple,
                cpu_features: facts.cpu_features.into_iter().collect(),
                kilnd: env!("CARGO_PKG_VERSION").into(),
                wasmer: facts.wasmer,
                kiln_abi: facts.kiln_abi,
                groups: self.groups.clone(),
                boot_id: self.boot_id,
            }),
        });
        self.publish(self.topics.status(&self.device), true, &status);
    }

    /// Publishes a version-tagged message with QoS 1. rumqttc queues it while the
    /// broker is away; a lost event is made good by the retained reported state.
    fn publish(&self, topic: String, retain: bool, message: &impl serde::Serialize) {
        if let Ok(bytes) = postcard::to_stdvec(message) {
            self.link.publish(topic, retain, bytes);
        }
    }

    /// Fault injection for the crash-safety tests: `KILN_FAULT=download|stage|activate|commit`
    /// kills kilnd with SIGKILL right after that step's writes.
    fn fault(&self, step: &str) {
        if self.fault.as_deref() == Some(step) {
            tracing::warn!(step, "KILN_FAULT: killing kilnd");
            // SAFETY: sends SIGKILL to this very process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
