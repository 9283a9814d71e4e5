//! Fleet updates: the device side of desired state over MQTT. The decisions are made by
//! [`agent::Agent`], a pure state machine; this module is its driver. It turns link
//! messages, supervisor records and the clock into agent inputs, and performs the
//! effects the agent returns: publishing, subscribing, and the store operations whose
//! results go back to the agent as inputs.

pub mod agent;
pub mod identity;
#[cfg(feature = "mirror")]
pub mod mirror;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use kiln_protocol::artifact::Envelope;
use kiln_protocol::clock::now_ms;
use kiln_protocol::compat::{self, HostFacts};
use kiln_protocol::fleet::{
    seal_report, sha256, DesiredModule, DeviceFacts, HealthV1, Status, StatusV2, TargetArtifact,
    Topics,
};
use kiln_protocol::keys::{PublicKey, SecretKey, TrustedKeys};
use kiln_protocol::telemetry::{Body, Record};
use kiln_protocol::transfer::{self, MAX_ARTIFACT};
use kiln_protocol::trust::Chain;
use kiln_protocol::worker::Expect;
use rumqttc::QoS;

use crate::daemon::config::{ModulePlan, MqttConfig, RestartPolicy};
use crate::daemon::link::{Link, LinkEvent};
use agent::{Agent, Effect, Input, MirrorPart, Outcome, Settings, StageFrom, StageResult, Trust};
use store::{Installed, Store};

/// What the driver reacts to.
pub enum AgentIn {
    Link(LinkEvent),
    /// A supervisor record about a fleet module (health during a trial).
    Record(Record),
    /// A period of the modules' health, to sign and publish.
    Health(HealthV1),
    /// What a mirror answered for a download (see `mirror`).
    Mirror {
        key: store::DownloadKey,
        part: MirrorPart,
        result: Result<Vec<u8>, String>,
    },
    /// What became of a command handed to a module.
    Answer {
        id: u64,
        reply: bool,
        outcome: kiln_protocol::command::Outcome,
    },
    Stop,
}

/// Hands a verified command to its module's supervisor, which answers through
/// `AgentIn::Answer`; `Err` says at once why it cannot be delivered.
pub type DeliverFn = Box<dyn Fn(Box<kiln_protocol::command::Command>) -> Result<(), String> + Send>;

/// Hands a `MirrorJob` to whatever fetches (kilnd: a thread of the device's own;
/// kilnd-sim: a pool shared by its devices), which answers it with an
/// `AgentIn::Mirror`; false if nothing fetches any more.
pub type MirrorFn = Box<dyn Fn(MirrorJob) -> bool + Send>;

/// A request for a mirror, handed to the thread that fetches (feature `mirror`).
pub struct MirrorJob {
    pub key: store::DownloadKey,
    pub part: MirrorPart,
    pub urls: Vec<String>,
    pub max: u64,
    pub exact: Option<u64>,
}

/// How the agent changes what runs: the full set of fleet modules.
pub type ApplyFn = Box<dyn Fn(Vec<ModulePlan>) + Send>;

/// The retained status the broker publishes for this device if kilnd vanishes. It
/// keeps the device's facts, so the fleet tool knows an offline device's target and
/// groups (and compiles a release for it).
pub fn last_will(
    config: &MqttConfig,
    device: &str,
    facts: &DeviceFacts,
    identity: &SecretKey,
) -> (String, Vec<u8>) {
    let topic = Topics::new(&config.prefix).status(device);
    let payload = offline(&topic, device, facts, identity);
    (topic, payload)
}

/// The offline status, signed like everything the device says.
fn offline(topic: &str, device: &str, facts: &DeviceFacts, identity: &SecretKey) -> Vec<u8> {
    let status = Status::V2(StatusV2 {
        device: device.into(),
        online: false,
        facts: Some(facts.clone()),
        trust: None,
    });
    seal_report(&status, topic, identity)
}

/// What this device is, as its status says.
pub fn facts(config: &MqttConfig, boot_id: u64) -> DeviceFacts {
    let host = crate::host::facts();
    DeviceFacts {
        triple: host.triple.clone(),
        cpu_features: host.cpu_features.iter().cloned().collect(),
        kilnd: env!("CARGO_PKG_VERSION").into(),
        wasmer: host.wasmer.clone(),
        kiln_abi: host.kiln_abi,
        groups: config.groups.clone(),
        boot_id,
    }
}

/// What the device trusts, from its provisioned root document (or the newer one it
/// took since, kept in the data dir), and its identity key (created on first start).
pub fn trust(
    config: &MqttConfig,
    root: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<Trust, crate::exit::Failure> {
    use crate::exit::{Code, Failure};
    let provisioned = crate::sandbox::load::read_root(root)?;
    let store = Store::at(data_dir);
    let chain = follow_kept_roots(&store, provisioned);
    let identity = identity::load_or_create(data_dir)
        .map_err(|e| Failure::new(Code::Config, format!("device identity: {e}")))?;
    tracing::info!(
        root = %chain.root().describe(),
        identity = %identity.public().id(),
        "trust"
    );
    let not_before_ms = match config.not_before_ms {
        0 => first_start(data_dir),
        set => set,
    };
    Ok(Trust {
        chain,
        identity,
        not_before_ms,
        stale_after_ms: config.stale_after_s.saturating_mul(1000),
    })
}

/// The provisioned root followed through the roots this device took and kept, one
/// version at a time: a kept root that does not chain (planted by whoever could write
/// the data dir, or a kilnd's single `root` file) is refused and said.
fn follow_kept_roots(store: &Store, provisioned: Chain) -> Chain {
    let mut chain = provisioned;
    match store.load_roots() {
        Ok((kept, unreadable)) => {
            for e in unreadable {
                tracing::warn!(error = %e, "a kept root document is unreadable");
            }
            let (_, refused) = chain.follow(kept.iter().map(Vec::as_slice));
            for e in refused {
                tracing::warn!(error = %e, "a kept root document does not chain to the provisioned root: refused");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kept root documents; using the provisioned one")
        }
    }
    if let Some(v) = store.legacy_root() {
        if v > chain.root().version {
            tracing::warn!(
                version = v,
                "the data dir's `root` file cannot be chained to the provisioned root: not trusted (the broker's roots are followed again)"
            );
        }
    }
    chain
}

/// Clock skew allowed between kiln's clock and a device's first start.
const FIRST_START_SKEW_MS: u64 = 5 * 60 * 1000;

/// When this device first started with a set clock (`{data_dir}/first-start`, written
/// once), less [`FIRST_START_SKEW_MS`]: the default `not_before`, so a state issued
/// before the device existed is never replayed to it. 0 while the clock is not set.
fn first_start(data_dir: &std::path::Path) -> u64 {
    let path = data_dir.join("first-start");
    let kept = kiln_protocol::files::read_bounded(&path, 32)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let ms = match kept {
        Some(ms) => ms,
        None => {
            let now = now_ms();
            if now < kiln_protocol::fleet::PLAUSIBLE_CLOCK_MS {
                return 0;
            }
            if let Err(e) =
                kiln_protocol::atomic::write_atomically(&path, now.to_string().as_bytes())
            {
                tracing::warn!(error = %e, "cannot record the first start; not_before stays unset");
                return 0;
            }
            now
        }
    };
    ms.saturating_sub(FIRST_START_SKEW_MS)
}

pub struct Driver {
    agent: Agent,
    exec: Executor,
    link: Link,
    apply: ApplyFn,
    topics: Topics,
    device: String,
    /// The retained status said when kilnd stops.
    offline: Vec<u8>,
    fault: Option<String>,
    /// The thread that fetches from mirrors, if this device uses them.
    mirror: Option<MirrorFn>,
    /// Where commands go, if this device runs modules that take them.
    deliver: Option<DeliverFn>,
    /// When the agent was last given the clock.
    last_tick: u64,
}

/// Opens the device state and runs what was committed; `run` then serves until
/// `AgentIn::Stop`. A data dir that cannot be used does not stop kilnd: the agent runs
/// degraded, refusing updates and saying why.
pub fn start(
    config: &MqttConfig,
    device: &str,
    data_dir: PathBuf,
    trust: Trust,
    apply: ApplyFn,
    link: Link,
    facts: DeviceFacts,
) -> Driver {
    let (store, state) = match Store::open(&data_dir) {
        Ok(store) => {
            let state = store.load().map_err(|e| e.to_string());
            (store, state)
        }
        Err(e) => {
            let why = format!("cannot use data dir `{}`: {e}", data_dir.display());
            let store = Store::at(&data_dir);
            // What was committed may still be readable.
            let state = store.load().map_err(|_| why.clone());
            (store, state)
        }
    };
    // What the status says is what artifacts are checked against: probed once.
    let host = HostFacts {
        triple: facts.triple.clone(),
        cpu_features: facts.cpu_features.iter().cloned().collect(),
        wasmer: facts.wasmer.clone(),
        kiln_abi: facts.kiln_abi,
    };
    let topics = Topics::new(&config.prefix);
    let offline = offline(&topics.status(device), device, &facts, &trust.identity);
    let release = trust.chain.root().release.trusted();
    let agent = Agent::new(
        device,
        config.groups.clone(),
        topics.clone(),
        trust,
        facts,
        settings(),
        state,
        now_ms(),
    );
    let mut driver = Driver {
        agent,
        exec: Executor {
            store,
            trust: release,
            host,
        },
        link,
        apply,
        topics,
        device: device.into(),
        offline,
        fault: fault_point(),
        mirror: None,
        deliver: None,
        last_tick: now_ms(),
    };
    // What was committed runs before the broker is even reachable.
    let effects = driver.agent.boot();
    driver.perform(effects);
    driver
}

/// Test builds may shorten the download stall timeout (`KILN_STALL_MS`).
fn settings() -> Settings {
    #[allow(unused_mut)]
    let mut s = Settings::default();
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = std::env::var("KILN_STALL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        s.stall_ms = ms;
    }
    s
}

/// `KILN_FAULT=download|stage|activate|commit` kills kilnd with SIGKILL right after that
/// step's writes; only test builds (feature `test-hooks`) have it. (`spool`, a write
/// of the telemetry spool cut short, is the spool's own.)
fn fault_point() -> Option<String> {
    #[cfg(feature = "test-hooks")]
    return std::env::var("KILN_FAULT").ok();
    #[cfg(not(feature = "test-hooks"))]
    None
}

impl Driver {
    /// Fetches transfers from mirrors as `mirrors` says, through `fetcher`, which
    /// answers each `MirrorJob` with an `AgentIn::Mirror`.
    pub fn with_mirrors(mut self, mirrors: agent::Mirrors, fetcher: MirrorFn) -> Self {
        self.agent.set_mirrors(mirrors);
        self.mirror = Some(fetcher);
        self
    }

    /// Delivers commands to modules through `deliver`.
    pub fn with_commands(mut self, deliver: DeliverFn) -> Self {
        self.deliver = Some(deliver);
        self
    }

    /// Serves until `AgentIn::Stop` (or every sender is gone).
    pub fn run(mut self, rx: Receiver<AgentIn>) {
        loop {
            let input = match rx.recv_timeout(Duration::from_millis(self.wait_ms())) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(AgentIn::Stop),
            };
            if !self.turn(input) {
                return;
            }
        }
    }

    /// How long [`Driver::run`] waits for an input before it gives the agent the clock.
    pub fn wait_ms(&self) -> u64 {
        let now = now_ms();
        self.agent
            .next_deadline_ms()
            .map_or(1000, |d| d.saturating_sub(now).min(1000))
    }

    /// One input (`None`: the wait ran out, a tick), and the clock if it is due. False
    /// once it stopped (the offline status published, the link disconnected).
    pub fn turn(&mut self, input: Option<AgentIn>) -> bool {
        let input = match input {
            None => Input::Tick,
            Some(AgentIn::Link(LinkEvent::Connected)) => Input::Connected,
            Some(AgentIn::Link(LinkEvent::Message { topic, payload })) => {
                Input::Message { topic, payload }
            }
            Some(AgentIn::Link(LinkEvent::Unreceivable { what })) => Input::Unreceivable { what },
            Some(AgentIn::Link(LinkEvent::SubscribeRefused { topic })) => {
                Input::SubscribeRefused { topic }
            }
            Some(AgentIn::Record(record)) => match outcome(&record) {
                Some((module, outcome)) => Input::Worker { module, outcome },
                None => return true,
            },
            Some(AgentIn::Mirror { key, part, result }) => Input::Mirror { key, part, result },
            Some(AgentIn::Answer { id, reply, outcome }) => Input::Answer { id, reply, outcome },
            Some(AgentIn::Health(health)) => {
                let effects = self.agent.health(&health);
                self.perform(effects);
                return true;
            }
            Some(AgentIn::Stop) => {
                let topic = self.topics.status(&self.device);
                self.link.publish(topic, true, self.offline.clone());
                self.link.disconnect();
                return false;
            }
        };
        let is_tick = input == Input::Tick;
        let effects = self.agent.handle(now_ms(), input);
        self.perform(effects);
        // A busy link must not starve the clock: trials end and probes run on time.
        let now = now_ms();
        if is_tick {
            self.last_tick = now;
        } else if now >= self.last_tick + 1000
            || self.agent.next_deadline_ms().is_some_and(|d| d <= now)
        {
            self.last_tick = now;
            let effects = self.agent.handle(now, Input::Tick);
            self.perform(effects);
        }
        true
    }

    /// Performs effects in order; a store operation's result goes back to the agent
    /// and its effects are performed after the ones already queued.
    fn perform(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            if let Some(input) = self.perform_one(effect) {
                queue.extend(self.agent.handle(now_ms(), input));
            }
        }
    }

    fn perform_one(&mut self, effect: Effect) -> Option<Input> {
        let effect = match self.exec.perform(effect) {
            Ok(input) => return input,
            Err(effect) => effect,
        };
        match effect {
            Effect::Publish {
                topic,
                retain,
                payload,
            } => self.link.publish(topic, retain, payload),
            // A transfer's chunks and chunk list at QoS 0: retained, content-addressed
            // and verified, asked again when a download stalls, so a lost one costs a
            // wait, not a wrong byte; and a QoS 1 subscription is a JetStream consumer
            // on nats-server, one per chunk, which a cluster under a thousand devices'
            // downloads refused by the thousand.
            Effect::Subscribe(topic) if self.topics.parse_artifact(&topic).is_some() => {
                self.link.subscribe_at(topic, QoS::AtMostOnce)
            }
            // Commands and the device's own status at QoS 0 too: a command is live
            // (its sender waits for the reply and sends again, with a new id, if none
            // comes) and the own status is read again on every connection; at QoS 1
            // each would be three more JetStream consumers a device on nats-server (a
            // run of 1,000 devices with them at QoS 1 saw 2,165 subscriptions refused;
            // the run before these topics, none).
            Effect::Subscribe(topic)
                if self.topics.is_commands(&topic) || topic == self.topics.status(&self.device) =>
            {
                self.link.subscribe_at(topic, QoS::AtMostOnce)
            }
            Effect::Subscribe(topic) => self.link.subscribe(topic),
            Effect::Unsubscribe(topic) => self.link.unsubscribe(topic),
            Effect::Run(modules) => (self.apply)(self.exec.plans(modules)),
            Effect::Checkpoint(step) => self.checkpoint(step),
            Effect::Command(command) => {
                let (id, reply) = (command.id, command.reply);
                let delivered = match &self.deliver {
                    Some(deliver) => deliver(command),
                    None => Err("this device runs no modules that take commands".into()),
                };
                if let Err(why) = delivered {
                    let outcome = kiln_protocol::command::Outcome::Refused(why);
                    return Some(Input::Answer { id, reply, outcome });
                }
            }
            Effect::MirrorGet {
                key,
                part,
                urls,
                max,
                exact,
            } => {
                let job = MirrorJob {
                    key,
                    part,
                    urls,
                    max,
                    exact,
                };
                if !self.mirror.as_ref().is_some_and(|fetch| fetch(job)) {
                    let result = Err("this kilnd fetches from no mirror".into());
                    return Some(Input::Mirror { key, part, result });
                }
            }
            _ => {}
        }
        None
    }

    fn checkpoint(&self, step: &str) {
        #[cfg(feature = "test-hooks")]
        if self.fault.as_deref() == Some(step) {
            tracing::warn!(step, "KILN_FAULT: killing kilnd");
            // SAFETY: sends SIGKILL to this very process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        #[cfg(not(feature = "test-hooks"))]
        let _ = (step, &self.fault);
    }
}

/// Performs the effects that touch the store: its own part of the driver, so the
/// model-based tests run the agent against the real store and the real verification.
pub struct Executor {
    pub store: Store,
    pub trust: TrustedKeys,
    pub host: HostFacts,
}

impl Executor {
    /// The agent input a store effect answers with; any other effect is given back.
    pub fn perform(&mut self, effect: Effect) -> Result<Option<Input>, Effect> {
        Ok(Some(match effect {
            Effect::Save(state) => Input::Saved(self.store.save(&state).map_err(|e| e.to_string())),
            Effect::Scan { key, list } => Input::Scanned {
                key,
                have: self.store.scan(&key, &list),
            },
            Effect::WriteChunk { key, n, data } => Input::ChunkStored {
                key,
                n,
                result: self
                    .store
                    .write_chunk(&key, n, &data)
                    .map_err(|e| e.to_string()),
            },
            Effect::Stage {
                module,
                target,
                key,
                slot,
                from,
            } => {
                let result = self.stage(&module, &target, &key, slot, *from);
                Input::Staged {
                    module: module.name,
                    key,
                    result,
                }
            }
            Effect::DropDownload(key) => {
                self.store.drop_download(&key);
                return Ok(None);
            }
            Effect::Trust(root) => {
                self.trust(&root);
                return Ok(None);
            }
            other => return Err(other),
        }))
    }

    /// Takes a newer root (the agent checked its chain): its release keys verify
    /// artifacts from now on, and it is what this device trusts after a restart.
    fn trust(&mut self, root: &[u8]) {
        if let Ok(chain) = Chain::new(root.to_vec()) {
            self.trust = chain.root().release.trusted();
        }
        if let Err(e) = self.store.save_root(root) {
            tracing::warn!(error = %e, "cannot keep the new root document; it is trusted until kilnd restarts");
        }
    }

    fn stage(
        &self,
        d: &DesiredModule,
        target: &TargetArtifact,
        key: &store::DownloadKey,
        slot: store::Slot,
        from: StageFrom,
    ) -> StageResult {
        let (list, codec, base) = match from {
            StageFrom::Slot => {
                return match self.store.read_slot(&d.name, slot, target.len) {
                    Ok(bytes) => match self.verify(d, target, &bytes) {
                        Ok(signer) => StageResult::Staged(slot, signer),
                        Err(why) => StageResult::Missing(format!("staged slot: {why}")),
                    },
                    Err(e) => StageResult::Missing(format!("staged slot: {e}")),
                }
            }
            StageFrom::Download { list, codec, base } => (list, codec, base),
        };
        let stream = match self.store.assemble(key, &list) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return StageResult::Missing(e.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return StageResult::Missing(e.to_string())
            }
            Err(e) => return StageResult::Io(e.to_string()),
        };
        let base_bytes = match base {
            None => Ok(None),
            Some((base_slot, base_sha)) => self
                .store
                .read_slot(&d.name, base_slot, MAX_ARTIFACT)
                .map_err(|e| format!("cannot read the base: {e}"))
                .and_then(|b| match sha256(&b) == base_sha {
                    true => Ok(Some(b)),
                    false => Err("the base in the committed slot changed".into()),
                }),
        };
        let bytes = base_bytes.and_then(|base| {
            let bytes = transfer::decode(codec, &stream, base.as_deref(), target.len)
                .map_err(|why| format!("the {} stream: {why}", codec.name()))?;
            self.verify(d, target, &bytes).map(|signer| (bytes, signer))
        });
        let (bytes, signer) = match (bytes, base) {
            (Ok(verified), _) => verified,
            (Err(why), None) => return StageResult::Refused(why),
            // A patch that does not give the signed artifact is not a reason to refuse
            // the release: the full artifact may be fine.
            (Err(why), Some((_, base))) => {
                let base = hex::encode(&base[..6]);
                return StageResult::PatchFailed(format!("the patch from {base} failed: {why}"));
            }
        };
        match self.store.write_slot(&d.name, slot, &bytes) {
            Ok(_) => StageResult::Staged(slot, signer),
            Err(e) => StageResult::Io(format!("cannot write the inactive slot: {e}")),
        }
    }

    /// Everything about the bytes: length and hash as desired, a signature by a release
    /// key, the manifest's name and version as desired, and a target this device can
    /// run. Returns the key that signed it.
    fn verify(
        &self,
        d: &DesiredModule,
        target: &TargetArtifact,
        bytes: &[u8],
    ) -> Result<[u8; 32], String> {
        if bytes.len() as u64 != target.len || sha256(bytes) != target.sha256 {
            return Err("the artifact does not match its sha256".into());
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
        compat::check(m, &self.host).map_err(|e| e.to_string())?;
        let signer = self.trust.find(verified.signer).map(PublicKey::to_bytes);
        signer.ok_or_else(|| format!("artifact signer {} is not a release key", verified.signer))
    }

    pub fn plans(&self, modules: BTreeMap<String, Installed>) -> Vec<ModulePlan> {
        modules
            .into_iter()
            .map(|(name, i)| {
                let limits = &i.limits;
                ModulePlan {
                    artifact: self.store.slot_path(&name, i.slot),
                    artifact_digest: Some(i.sha256),
                    expect: Some(Expect {
                        sha256: i.sha256,
                        name: name.clone(),
                        version: i.version,
                    }),
                    name,
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
                    // The key it was staged under, even after a rotation dropped it.
                    trusted_keys: i
                        .signer
                        .and_then(|k| PublicKey::from_bytes(&k).ok())
                        .map(|k| vec![k.to_text()])
                        .unwrap_or_else(|| self.trust.keys().map(PublicKey::to_text).collect()),
                    // Hardware is the device's to grant: kilnd.toml's, added by serve.
                    grants: Default::default(),
                }
            })
            .collect()
    }
}

/// What a supervisor record says about a module on trial.
fn outcome(record: &Record) -> Option<(String, Outcome)> {
    let module = record.module.clone()?;
    let outcome = match &record.body {
        // A first tick that failed is followed by its own TickFailed record.
        Body::Started(s) => Outcome::Started { version: s.version },
        Body::Stopped(s) if !s.is_clean() => Outcome::Crashed {
            reason: s.why.clone(),
            crashes: s.crashes_in_window,
        },
        Body::Stopped(s) if s.reason == "exited" => Outcome::Exited {
            code: s.exit_code.unwrap_or(0),
        },
        Body::TickFailed { status } => Outcome::TickFailed { status: *status },
        Body::Failed { crashes, .. } => Outcome::GaveUp { crashes: *crashes },
        _ => return None,
    };
    Some((module, outcome))
}
