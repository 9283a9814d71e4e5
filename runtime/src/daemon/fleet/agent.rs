//! The update agent as a pure state machine: [`Agent::handle`] takes one input (a
//! message from the broker, a worker outcome, the result of a store operation, a clock
//! tick) and returns the effects to perform, in order. No I/O, no clock and no threads
//! in here: the driver (`fleet::driver`) performs the effects and feeds the results of
//! store operations back as inputs, and the model-based tests drive it the same way.
//!
//! What it decides, per module: which desired state wins (device over group), whether a
//! version may be installed (signature checked by `SignedDesired::open`, names and
//! limits checked, the anti-rollback floor), when to fetch chunks and when a fetch has
//! stalled, when a staged version starts its trial, and whether the trial ends in a
//! commit or a rollback. Anything that is no longer wanted is cancelled: a download, a
//! trial, and a commit whose sha the newest desired state does not name.
//!
//! This file holds the inputs, effects and state, and the dispatch; the handlers live
//! by concern: `agent/roots.rs`, `agent/desired.rs`, `agent/download.rs` and
//! `agent/trial.rs`, each an `impl Agent` block.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kiln_protocol::fleet::{
    seal_report, Desired, DesiredModule, DeviceFacts, DeviceMessage, Event, EventKind, EventV1,
    HealthV1, ModuleReport, ModuleState, Reported, ReportedV1, Status, StatusV2, TargetArtifact,
    Topics, TrustReport,
};
use kiln_protocol::keys::SecretKey;
use kiln_protocol::transfer::{ChunkList, Codec, Transfer};
use kiln_protocol::trust::Chain;

mod command;
mod desired;
mod download;
mod roots;
mod trial;

use super::store::{DeviceState, DownloadKey, Floor, Installed, ModuleRecord, Slot, LEGACY_SIGNER};

/// The first wait before a refused subscription is asked again, and the longest. A
/// cluster's node refuses while it is loaded (a JetStream consumer that could not be
/// created in time) and recovers within seconds: a ceiling of minutes left devices
/// deaf through a rollout's wave (docs/src/brokers.md). A refusal by ACL is asked
/// again at most once a minute, one small packet.
const SUBSCRIBE_RETRY_MS: u64 = 2_000;
const SUBSCRIBE_RETRY_MAX_MS: u64 = 60_000;

/// The wait before the `refusals`-th refused subscription to a topic is asked again:
/// doubling from [`SUBSCRIBE_RETRY_MS`] up to [`SUBSCRIBE_RETRY_MAX_MS`], plus up to a
/// quarter more, spread by `seed` (the device and the topic), so that devices a loaded
/// node refused together do not all ask again in the same instant.
pub fn subscribe_retry_ms(refusals: u32, seed: &str) -> u64 {
    let wait =
        (SUBSCRIBE_RETRY_MS << refusals.saturating_sub(1).min(6)).min(SUBSCRIBE_RETRY_MAX_MS);
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    wait + hash % (wait / 4 + 1)
}

/// What the agent reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Connected,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// A message the link could not receive (too large, undecodable).
    Unreceivable {
        what: String,
    },
    /// The broker answered a subscription with a failure (its ACL, or overloaded).
    SubscribeRefused {
        topic: String,
    },
    /// A fleet module's worker outcome, as the supervisor reports it.
    Worker {
        module: String,
        outcome: Outcome,
    },
    /// Time passed; trials and stalled downloads are checked.
    Tick,
    /// Results of effects that touch the store.
    Scanned {
        key: DownloadKey,
        have: BTreeSet<u32>,
    },
    ChunkStored {
        key: DownloadKey,
        n: u32,
        result: Result<(), String>,
    },
    Staged {
        module: String,
        key: DownloadKey,
        result: StageResult,
    },
    Saved(Result<(), String>),
    /// What a mirror answered for a download's chunk list or chunk (unverified bytes),
    /// or why it gave nothing.
    Mirror {
        key: DownloadKey,
        part: MirrorPart,
        result: Result<Vec<u8>, String>,
    },
    /// What became of a command the agent handed out (`Effect::Command`).
    Answer {
        id: u64,
        reply: bool,
        outcome: kiln_protocol::command::Outcome,
    },
}

/// What of a transfer is asked of a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPart {
    List,
    Chunk(u32),
}

/// Where this device fetches transfers besides the broker (`kilnd.toml` `mirror`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Mirrors {
    /// Only the broker (`mirror = "off"`, or a kilnd without mirrors).
    #[default]
    Off,
    /// The mirrors the desired state names, if any.
    FromState,
    /// The device's own mirror, whatever the desired state names.
    Own(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The worker is up (and its first tick, if any, returned 0).
    Started {
        version: u64,
    },
    /// The worker stopped for a reason that is not a clean exit or a requested stop;
    /// `crashes` in the supervisor's window so far (it restarts it, or gives up).
    Crashed {
        reason: String,
        crashes: u32,
    },
    TickFailed {
        status: i32,
    },
    /// A WASI command ran to its end and exited with this code (0: it did its job).
    Exited {
        code: i32,
    },
    /// The supervisor gave up: `crashes` in its window; not restarted.
    GaveUp {
        crashes: u32,
    },
}

/// What a module is doing, as the supervisor's records say: what the device reports.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Run {
    Running,
    /// Crashed `crashes` times in the window; restarted after a backoff.
    Restarting {
        crashes: u32,
        reason: String,
    },
    /// A command that exited (0: done).
    Exited {
        code: i32,
    },
    /// Not restarted any more.
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageResult {
    /// Verified (signed by this release key) and written to this slot.
    Staged(Slot, [u8; 32]),
    /// The bytes are not what the desired state promised: never tried again.
    Refused(String),
    /// The store failed (disk full, read-only): try again when it works.
    Io(String),
    /// A patch could not give the artifact (its base is gone or changed, or it decodes
    /// to something else): fetch the full artifact instead.
    PatchFailed(String),
    /// What was on disk (a staged slot, a stored chunk) is gone or changed: fetch the
    /// artifact again.
    Missing(String),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Publish {
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// Write the state file; answer with `Input::Saved`.
    Save(DeviceState),
    /// Which chunks of a download are on disk and still hash right (the others are
    /// deleted); answer with `Input::Scanned`.
    Scan {
        key: DownloadKey,
        list: ChunkList,
    },
    /// Answer with `Input::ChunkStored`.
    WriteChunk {
        key: DownloadKey,
        n: u32,
        data: Vec<u8>,
    },
    /// Get the artifact (from the download or, staged before a restart, from the
    /// slot); verify everything against `module` and `target`; write the slot; answer
    /// with `Input::Staged`.
    Stage {
        module: Box<DesiredModule>,
        target: Box<TargetArtifact>,
        key: DownloadKey,
        slot: Slot,
        from: Box<StageFrom>,
    },
    DropDownload(DownloadKey),
    /// Get a download's chunk list or chunk from the first of `urls` that gives it, at
    /// most `max` bytes (exactly `exact` when known); answer with `Input::Mirror`.
    MirrorGet {
        key: DownloadKey,
        part: MirrorPart,
        urls: Vec<String>,
        max: u64,
        exact: Option<u64>,
    },
    /// What fleet modules run: each with the installed version to run.
    Run(BTreeMap<String, Installed>),
    /// A point the crash-safety tests can kill kilnd at (test builds only).
    Checkpoint(&'static str),
    /// A newer root document was taken: keep it (it is what the device trusts after a
    /// restart) and verify artifacts with its release keys from now on.
    Trust(Vec<u8>),
    /// Deliver a verified, admitted command to its module; answer with
    /// `Input::Answer`, whatever becomes of it.
    Command(Box<kiln_protocol::command::Command>),
}

/// Where a staged artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageFrom {
    /// The slot itself, staged before a restart: read back and verified again.
    Slot,
    /// The download's chunks (each re-hashed), decoded with `codec`; a patch applies
    /// to the artifact with sha256 `base.1` in slot `base.0`.
    Download {
        list: ChunkList,
        codec: Codec,
        base: Option<(Slot, [u8; 32])>,
    },
}

/// Knobs with defaults a device wants; the tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// A download that receives no chunk for this long asks again and says so.
    pub stall_ms: u64,
    /// The shortest health window, whatever the desired state says.
    pub min_health_ms: u64,
    /// How long a new version may take to start (load, first tick) before it is
    /// rolled back; its health window starts only once it runs.
    pub start_timeout_ms: u64,
}

/// What a device trusts, and the key it signs what it says with.
pub struct Trust {
    pub chain: Chain,
    pub identity: SecretKey,
    /// No desired state issued before this is taken (Unix ms): the device's
    /// provisioning, so a state from before it cannot be replayed to a fresh device.
    pub not_before_ms: u64,
    /// Desired states older than this are reported as stale (a freeze).
    pub stale_after_ms: u64,
}

/// Root documents that arrived before the ones they follow, kept until those do.
const MAX_PENDING_ROOTS: usize = 16;
/// The longest health window a desired state may ask for (a day); longer is refused
/// at admission, and the deadline arithmetic never wraps.
pub const MAX_HEALTH_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Candidates kept per pending version.
const MAX_ROOT_CANDIDATES: usize = 4;

impl Default for Settings {
    fn default() -> Self {
        Self {
            stall_ms: 60_000,
            min_health_ms: 100,
            start_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Download {
    module: DesiredModule,
    /// This device's artifact of the release.
    target: TargetArtifact,
    transfer: Transfer,
    /// The committed artifact a patch applies to.
    base: Option<[u8; 32]>,
    /// None until the transfer's chunk list arrives.
    list: Option<ChunkList>,
    /// None while the store is being scanned.
    have: Option<BTreeSet<u32>>,
    last_progress_ms: u64,
    /// Waiting for `Input::Staged`.
    staging: bool,
    /// The mirrors it is fetched from; `None`: the broker (no mirror, or it failed).
    mirror: Option<Vec<String>>,
    /// What was asked of the mirror and not answered yet.
    in_flight: Option<MirrorPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Trial {
    sha256: [u8; 32],
    version: u64,
    /// Until it starts, the start timeout; once it runs, the end of its health window.
    deadline_ms: u64,
    started: bool,
    health_ms: u64,
}

pub struct Agent {
    device: String,
    groups: Vec<String>,
    topics: Topics,
    trust: Trust,
    facts: DeviceFacts,
    settings: Settings,
    state: DeviceState,
    /// Latest verified desired state per source topic, this run.
    desired: BTreeMap<String, Desired>,
    /// The newest desired state per source whose signatures did not verify: tried
    /// again when a newer root arrives (it may be signed by a rotated-in key).
    unverified: BTreeMap<String, Vec<u8>>,
    /// Root documents newer than the next one, by version.
    /// Several per version (a forged root n+2 must not displace the genuine one),
    /// each checked when its version is next.
    pending_roots: BTreeMap<u64, Vec<Vec<u8>>>,
    /// When this run started, and why the device thinks its states are stale.
    started_ms: u64,
    stale: Option<String>,
    downloads: BTreeMap<DownloadKey, Download>,
    /// Artifacts whose patch failed this run: fetched whole.
    no_patch: BTreeSet<[u8; 32]>,
    /// Where transfers come from besides the broker.
    mirrors: Mirrors,
    /// Transfers a mirror failed this run: fetched from the broker.
    mirror_failed: BTreeSet<[u8; 32]>,
    trials: BTreeMap<String, Trial>,
    /// What each module's worker is doing, from the supervisor's records.
    run: BTreeMap<String, Run>,
    /// The version and artifact a module last rolled back from: reported when
    /// nothing of it was ever committed, instead of v0.
    tried: BTreeMap<String, (u64, [u8; 32])>,
    last_event: BTreeMap<String, String>,
    /// By module: the serial of the desired state last heard naming an artifact this
    /// device rolled back. A newer one (a rollout's retry) is answered with a refusal;
    /// the same one (re-read after the rollback) is not.
    refused_serial: BTreeMap<String, u64>,
    /// Subscriptions the broker refused this connection: how many times, and when to
    /// ask again (`None` while asked; a refusal sets the next time).
    refused_subscriptions: BTreeMap<String, (u32, Option<u64>)>,
    /// Commands taken (their ids, while valid) and the rate they may come at.
    commands: command::Commands,
    /// Why updates are refused (the data dir cannot be written), if they are.
    degraded: Option<String>,
    /// The state file could not be read: nothing is saved over it.
    unreadable_state: bool,
    now_ms: u64,
    /// What was last told to the supervisor and the broker, to say only changes.
    last_run: Option<BTreeMap<String, Installed>>,
    last_reported: Option<Vec<u8>>,
    /// The highest serial of each save not yet answered, in order; and the highest
    /// serial known to be on disk, which is what the reported state says was applied.
    pending_saves: VecDeque<u64>,
    saved_serial: u64,
    out: Vec<Effect>,
}

impl Agent {
    /// An agent over the state the store loaded; `Err` from the store puts it in
    /// degraded mode with nothing committed, refusing updates, and never saving over
    /// the unreadable file.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: &str,
        groups: Vec<String>,
        topics: Topics,
        trust: Trust,
        facts: DeviceFacts,
        settings: Settings,
        state: Result<DeviceState, String>,
        now_ms: u64,
    ) -> Self {
        let (state, degraded): (DeviceState, _) = match state {
            Ok(s) => (s, None),
            Err(e) => (
                DeviceState::default(),
                Some(format!("the device state is unreadable ({e})")),
            ),
        };
        let unreadable_state = degraded.is_some();
        let mut state = state;
        // Floors kept before per-key floors bind under the keys trusted now.
        let ids: Vec<[u8; 8]> = trust
            .chain
            .root()
            .release
            .ids()
            .iter()
            .map(|k| k.0)
            .collect();
        for floors in state.floors.values_mut() {
            if let Some(i) = floors.iter().position(|f| f.key == LEGACY_SIGNER) {
                let legacy = floors.remove(i);
                for id in &ids {
                    if !floors.iter().any(|f| f.key == *id) {
                        floors.push(Floor {
                            key: *id,
                            ..legacy.clone()
                        });
                    }
                }
            }
        }
        let saved_serial = state.serials.values().copied().max().unwrap_or(0);
        Self {
            device: device.into(),
            groups,
            topics,
            trust,
            facts,
            settings,
            state,
            desired: BTreeMap::new(),
            unverified: BTreeMap::new(),
            pending_roots: BTreeMap::new(),
            started_ms: now_ms,
            stale: None,
            downloads: BTreeMap::new(),
            no_patch: BTreeSet::new(),
            mirrors: Mirrors::Off,
            mirror_failed: BTreeSet::new(),
            trials: BTreeMap::new(),
            run: BTreeMap::new(),
            tried: BTreeMap::new(),
            last_event: BTreeMap::new(),
            refused_serial: BTreeMap::new(),
            refused_subscriptions: BTreeMap::new(),
            commands: command::Commands::default(),
            degraded,
            unreadable_state,
            now_ms,
            last_run: None,
            last_reported: None,
            pending_saves: VecDeque::new(),
            saved_serial,
            out: Vec::new(),
        }
    }

    /// What runs before the broker is even reachable: the committed versions.
    pub fn boot(&mut self) -> Vec<Effect> {
        if let Some(why) = self.degraded.clone() {
            self.event(
                "*",
                0,
                EventKind::Rejected {
                    reason: format!("updates refused: {why}"),
                },
            );
        }
        self.run_plans();
        std::mem::take(&mut self.out)
    }

    /// Where transfers come from besides the broker (off until set).
    pub fn set_mirrors(&mut self, mirrors: Mirrors) {
        self.mirrors = mirrors;
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn degraded(&self) -> Option<&str> {
        self.degraded.as_deref()
    }

    /// The soonest time a `Tick` has something to do.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let trials = self.trials.values().map(|t| t.deadline_ms);
        let stalls = self
            .downloads
            .values()
            .filter(|d| !d.staging)
            .map(|d| d.last_progress_ms + self.settings.stall_ms);
        let retries = self.refused_subscriptions.values().filter_map(|r| r.1);
        trials.chain(stalls).chain(retries).min()
    }

    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Effect> {
        self.now_ms = self.now_ms.max(now_ms);
        match input {
            Input::Connected => self.on_connect(),
            Input::Message { topic, payload } => self.on_message(&topic, &payload),
            Input::Unreceivable { what } => self.event_once(
                "*",
                0,
                EventKind::Rejected {
                    reason: format!("message not received: {what}"),
                },
            ),
            Input::SubscribeRefused { topic } => self.on_subscribe_refused(topic),
            Input::Worker { module, outcome } => self.on_worker(&module, outcome),
            Input::Tick => {
                self.retry_subscriptions();
                self.on_tick()
            }
            Input::Scanned { key, have } => self.on_scanned(key, have),
            Input::ChunkStored { key, n, result } => self.on_chunk_stored(key, n, result),
            Input::Staged {
                module,
                key,
                result,
            } => self.on_staged(&module, key, result),
            Input::Saved(result) => self.on_saved(result),
            Input::Mirror { key, part, result } => self.on_mirror(key, part, result),
            Input::Answer { id, reply, outcome } => self.on_answer(id, reply, outcome),
        }
        self.report();
        std::mem::take(&mut self.out)
    }

    /// A refused subscription is asked again after [`subscribe_retry_ms`]; without it
    /// the device would silently never hear its desired state.
    fn on_subscribe_refused(&mut self, topic: String) {
        let entry = self.refused_subscriptions.entry(topic.clone()).or_default();
        entry.0 = entry.0.saturating_add(1);
        let wait = subscribe_retry_ms(entry.0, &format!("{}/{topic}", self.device));
        entry.1 = Some(self.now_ms + wait);
        tracing::warn!(%topic, refusals = entry.0, retry_ms = wait, "the broker refused a subscription");
        self.event_once(
            "*",
            0,
            EventKind::Rejected {
                reason: format!(
                    "the broker refused the subscription to {topic} (its ACL, or overloaded); asking again"
                ),
            },
        );
    }

    fn retry_subscriptions(&mut self) {
        let now = self.now_ms;
        for (topic, (_, at)) in &mut self.refused_subscriptions {
            if at.is_some_and(|at| at <= now) {
                *at = None;
                self.out.push(Effect::Subscribe(topic.clone()));
            }
        }
    }

    fn on_connect(&mut self) {
        // A new session: every subscription is asked afresh.
        self.refused_subscriptions.clear();
        self.publish_status();
        // Roots first: a desired state signed by a rotated-in key needs them.
        let mut topics = vec![
            self.topics.all_roots(),
            self.topics.desired(&self.device),
            self.topics.status(&self.device),
        ];
        topics.extend(self.groups.iter().map(|g| self.topics.group_desired(g)));
        topics.extend(self.command_topics());
        for topic in topics {
            self.out.push(Effect::Subscribe(topic));
        }
        let keys: Vec<DownloadKey> = self.downloads.keys().copied().collect();
        for key in keys {
            self.subscribe_missing(key);
        }
        // Said again on every connection: the broker may have forgotten it.
        self.last_reported = None;
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if topic.ends_with("/list") && self.topics.parse_artifact(topic).is_some() {
            self.on_list(topic, payload);
        } else if self.topics.parse_chunk(topic).is_some() {
            self.on_chunk(topic, payload);
        } else if topic.ends_with("/desired") {
            self.on_desired(topic, payload);
        } else if self.topics.parse_root(topic).is_some() {
            self.on_root(payload);
        } else if self.topics.is_commands(topic) {
            self.on_command(payload);
        } else if topic == self.topics.status(&self.device) {
            self.on_own_status(topic, payload);
        }
    }

    fn record_mut(&mut self, name: &str) -> &mut ModuleRecord {
        self.state.modules.entry(name.to_string()).or_default()
    }

    fn save(&mut self) {
        if !self.unreadable_state {
            self.pending_saves.push_back(self.serial());
            self.out.push(Effect::Save(self.state.clone()));
        }
    }

    fn serial(&self) -> u64 {
        self.state.serials.values().copied().max().unwrap_or(0)
    }

    fn event_once(&mut self, module: &str, version: u64, kind: EventKind) {
        if self.last_event.get(module) != Some(&kind.to_string()) {
            self.event(module, version, kind);
        }
    }

    fn event(&mut self, module: &str, version: u64, kind: EventKind) {
        tracing::info!(module, version, event = %kind, "fleet");
        self.last_event.insert(module.to_string(), kind.to_string());
        let event = Event::V1(EventV1 {
            at_ms: self.now_ms,
            module: module.into(),
            version,
            kind,
        });
        let topic = self.topics.events(&self.device);
        self.publish(topic, false, &event);
    }

    /// The retained reported state, when it changed.
    fn report(&mut self) {
        let modules = self
            .state
            .modules
            .iter()
            .filter_map(|(name, r)| {
                let c = r.committed.as_ref();
                let running = match self.run.get(name) {
                    Some(Run::Restarting { .. }) => ModuleState::Restarting,
                    Some(Run::Exited { code: 0 }) => ModuleState::Exited,
                    Some(Run::Exited { .. } | Run::Failed { .. }) => ModuleState::Failed,
                    Some(Run::Running) | None => ModuleState::Running,
                };
                let (version, sha256, state) = match (self.trials.get(name), c) {
                    (Some(t), _) => (t.version, t.sha256, ModuleState::Updating),
                    (None, Some(c)) => (c.version, c.sha256, running),
                    // Desired, never committed, its first version on its way: updating.
                    (None, None) if self.downloads.values().any(|d| d.module.name == *name) => {
                        let d = self
                            .downloads
                            .values()
                            .find(|d| d.module.name == *name)
                            .map(|d| (d.module.version, d.target.sha256))
                            .unwrap_or((0, [0; 32]));
                        (d.0, d.1, ModuleState::Updating)
                    }
                    // Desired but never committed: its first version failed; say which.
                    (None, None) if r.source.is_some() => {
                        let (v, sha) = self.tried.get(name).copied().unwrap_or((0, [0; 32]));
                        (v, sha, ModuleState::Failed)
                    }
                    // No longer desired: only its anti-rollback floor is kept.
                    (None, None) => return None,
                };
                // What the state is about, in words: the run state's reason first.
                let why = match self.run.get(name) {
                    Some(Run::Restarting { crashes, reason })
                        if state == ModuleState::Restarting =>
                    {
                        Some(format!(
                            "restarting ({crashes} crashes in the window): {reason}"
                        ))
                    }
                    Some(Run::Failed { reason }) if state == ModuleState::Failed => {
                        Some(format!("failed, not restarted: {reason}"))
                    }
                    Some(Run::Exited { code })
                        if c.is_some() && !self.trials.contains_key(name) =>
                    {
                        Some(format!("exited with code {code}"))
                    }
                    _ => None,
                };
                Some(ModuleReport {
                    name: name.clone(),
                    version,
                    sha256,
                    state,
                    last_event: why
                        .or_else(|| self.last_event.get(name).cloned())
                        .unwrap_or_default(),
                })
            })
            .collect();
        // Only a serial that is on disk counts as applied: a device that cannot save
        // does not confirm a push.
        let serial = self.saved_serial;
        let report = Reported::V1(ReportedV1 { serial, modules });
        let bytes = postcard::to_stdvec(&report).unwrap_or_default();
        if self.last_reported.as_ref() != Some(&bytes) {
            self.last_reported = Some(bytes);
            let topic = self.topics.reported(&self.device);
            self.publish(topic, true, &report);
        }
    }

    /// The device's own retained status as the broker has it. On a cluster, the last
    /// will of a session on a node that died can land after the device said it is
    /// online on another node (seen: 25 of 1,000 devices shown offline for good after
    /// a node kill); while connected, an `offline` there is answered by saying online
    /// again. Its own `online` coming back is left alone, so there is no loop.
    fn on_own_status(&mut self, topic: &str, payload: &[u8]) {
        if let Ok((status, _)) = Status::open(topic, payload) {
            if !status.online {
                tracing::info!("the broker holds an offline status for this connected device; saying online again");
                self.publish_status();
            }
        }
    }

    fn publish_status(&mut self) {
        let root = self.trust.chain.root();
        let status = Status::V2(StatusV2 {
            device: self.device.clone(),
            online: true,
            facts: Some(self.facts.clone()),
            trust: Some(TrustReport {
                fleet: root.fleet.clone(),
                root_version: root.version,
                identity: self.trust.identity.public().to_bytes(),
                oldest_issued_ms: self
                    .desired
                    .values()
                    .map(|d| d.issued_ms)
                    .min()
                    .unwrap_or(0),
                stale: self.stale.clone(),
            }),
        });
        let topic = self.topics.status(&self.device);
        self.publish(topic, true, &status);
    }

    /// A period of the modules' health (see `daemon::health`), signed and retained on
    /// the device's `health` topic; one that is not valid is not sent (and said so).
    pub fn health(&mut self, health: &HealthV1) -> Vec<Effect> {
        let topic = self.topics.health(&self.device);
        match health.seal(&topic, &self.trust.identity) {
            Ok(payload) => vec![Effect::Publish {
                topic,
                retain: true,
                payload,
            }],
            Err(e) => {
                tracing::warn!("health of period {} not sent: {e}", health.seq);
                Vec::new()
            }
        }
    }

    /// Everything a device says is signed with its identity key, for its topic.
    fn publish<T: DeviceMessage>(&mut self, topic: String, retain: bool, message: &T) {
        let payload = seal_report(message, &topic, &self.trust.identity);
        self.out.push(Effect::Publish {
            topic,
            retain,
            payload,
        });
    }
}

/// The reported state's modules, for tests and the driver's log (its own messages:
/// the signature is not checked here).
pub fn decode_reported(payload: &[u8]) -> Option<ReportedV1> {
    match postcard::from_bytes(payload).ok()? {
        Reported::V1(r) => Some(r),
        Reported::Signed(s) => match postcard::from_bytes(&s.body).ok()? {
            Reported::V1(r) => Some(r),
            Reported::Signed(_) => None,
        },
    }
}
