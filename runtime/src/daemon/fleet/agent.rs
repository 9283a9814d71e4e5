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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kiln_protocol::fleet::{
    seal_report, sha256, utc, Desired, DesiredModule, DeviceFacts, DeviceMessage, Event, EventKind,
    EventV1, ModuleReport, ModuleState, Reported, ReportedV1, Scope, SignedDesired, Status,
    StatusV2, TargetArtifact, Topics, TrustReport, MAX_DESIRED,
};
use kiln_protocol::keys::{KeyId, SecretKey};
use kiln_protocol::names::{self, Kind};
use kiln_protocol::transfer::{ChunkList, Codec, Transfer};
use kiln_protocol::trust::{Chain, SignedRoot, MAX_ROOT};

use super::store::{DeviceState, DownloadKey, Floor, Installed, ModuleRecord, Slot, LEGACY_SIGNER};

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
    /// What fleet modules run: each with the installed version to run.
    Run(BTreeMap<String, Installed>),
    /// A point the crash-safety tests can kill kilnd at (test builds only).
    Checkpoint(&'static str),
    /// A newer root document was taken: keep it (it is what the device trusts after a
    /// restart) and verify artifacts with its release keys from now on.
    Trust(Vec<u8>),
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
            trials: BTreeMap::new(),
            run: BTreeMap::new(),
            tried: BTreeMap::new(),
            last_event: BTreeMap::new(),
            refused_serial: BTreeMap::new(),
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
        trials.chain(stalls).min()
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
            Input::Worker { module, outcome } => self.on_worker(&module, outcome),
            Input::Tick => self.on_tick(),
            Input::Scanned { key, have } => self.on_scanned(key, have),
            Input::ChunkStored { key, n, result } => self.on_chunk_stored(key, n, result),
            Input::Staged {
                module,
                key,
                result,
            } => self.on_staged(&module, key, result),
            Input::Saved(result) => self.on_saved(result),
        }
        self.report();
        std::mem::take(&mut self.out)
    }

    fn on_connect(&mut self) {
        self.publish_status();
        // Roots first: a desired state signed by a rotated-in key needs them.
        let mut topics = vec![self.topics.all_roots(), self.topics.desired(&self.device)];
        topics.extend(self.groups.iter().map(|g| self.topics.group_desired(g)));
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
        }
    }

    /// A root document: taken if it is the next version and signed by this root's
    /// root keys and its own; kept if a version between is missing.
    fn on_root(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let current = self.trust.chain.root().version;
        let version = match SignedRoot::peek(payload) {
            Ok(r) => r.version,
            Err(why) => {
                let reason = format!("root document refused: {why}");
                return self.event_once("*", 0, EventKind::Rejected { reason });
            }
        };
        if payload.len() > MAX_ROOT || version <= current {
            return;
        }
        let candidates = self.pending_roots.entry(version).or_default();
        if !candidates.iter().any(|c| c.as_slice() == payload) {
            candidates.push(payload.to_vec());
            if candidates.len() > MAX_ROOT_CANDIDATES {
                candidates.remove(0);
            }
        }
        while self.pending_roots.len() > MAX_PENDING_ROOTS {
            self.pending_roots.pop_last();
        }
        let mut taken = false;
        while let Some(candidates) = self
            .pending_roots
            .remove(&self.trust.chain.root().version.saturating_add(1))
        {
            // The first candidate that chains is the root; the others are refused.
            let mut refused = Vec::new();
            let mut advanced = false;
            for bytes in candidates {
                if advanced {
                    break;
                }
                match self.trust.chain.advance(&bytes) {
                    Ok(root) => {
                        let reason = root.describe();
                        advanced = true;
                        taken = true;
                        // Each one kept: the next start chains through all of them.
                        self.out.push(Effect::Trust(bytes.clone()));
                        self.event("*", 0, EventKind::Trusted { reason });
                    }
                    Err(why) => refused.push(why),
                }
            }
            for why in refused {
                let reason = format!("root document refused: {why}");
                self.event("*", 0, EventKind::Rejected { reason });
            }
            if !advanced {
                break;
            }
        }
        let current = self.trust.chain.root().version;
        self.pending_roots.retain(|v, _| *v > current);
        if let Some(first) = self.pending_roots.keys().next() {
            let reason = format!(
                "root v{first} does not follow root v{current}: waiting for root v{}",
                current.saturating_add(1)
            );
            self.event_once("*", 0, EventKind::Rejected { reason });
        }
        if taken {
            self.on_new_root();
        }
    }

    /// After a rotation: the states taken before stay (they were signed by a key
    /// trusted then, and what runs must not change because a key did); every state
    /// from now on must verify under the new root, and the ones that did not verify
    /// before are tried again (they may be signed by a rotated-in key).
    fn on_new_root(&mut self) {
        for (source, bytes) in std::mem::take(&mut self.unverified) {
            self.on_desired(&source, &bytes);
        }
        self.publish_status();
        self.reconcile();
    }

    fn on_desired(&mut self, source: &str, payload: &[u8]) {
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
    fn fresh(&self, source: &str, desired: &Desired, digest: [u8; 32]) -> Result<(), String> {
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
    fn release_ids(&self) -> BTreeSet<[u8; 8]> {
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
    fn binding_floors(&self, source: &str) -> Vec<Floor> {
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
    fn raise_floors(&mut self, source: &str, signers: &[KeyId], serial: u64, digest: [u8; 32]) {
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
    fn check_stale(&mut self) {
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
    fn admissible(&self, source: &str, desired: &Desired) -> Result<(), String> {
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

    /// This device's artifact of a module's release, or why the release has none.
    fn target_of<'a>(&self, d: &'a DesiredModule) -> Result<&'a TargetArtifact, String> {
        d.artifact_for(&self.facts.triple, &self.facts.cpu_features)
    }

    fn wanted_sha(&self, name: &str) -> Option<[u8; 32]> {
        let wanted = self.wanted();
        let (_, m) = wanted.get(name)?;
        self.target_of(m).ok().map(|t| t.sha256)
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

    fn reconcile_module(&mut self, d: &DesiredModule) {
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
        let download = Download {
            module: d.clone(),
            target: target.clone(),
            transfer,
            base,
            list: None,
            have: None,
            last_progress_ms: self.now_ms,
            staging: staged_here,
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

    /// A download starts with its chunk list (then a scan of what is on disk), or,
    /// while `staging`, with the check of a slot staged before a restart.
    fn begin_download(&mut self, key: DownloadKey, download: Download) {
        let fetch = !download.staging && download.list.is_none();
        let scan = download.list.clone().filter(|_| !download.staging);
        self.downloads.insert(key, download);
        if fetch {
            self.out
                .push(Effect::Subscribe(self.topics.list(&key.sha256)));
        }
        if let Some(list) = scan {
            self.out.push(Effect::Scan { key, list });
        }
    }

    /// The chunk list of a download arrived: checked against its signed hash, then the
    /// chunks already on disk are scanned.
    fn on_list(&mut self, topic: &str, payload: &[u8]) {
        let Some(sha) = self.topics.parse_artifact(topic) else {
            return;
        };
        let Some((key, d)) = self
            .downloads
            .iter_mut()
            .find(|(k, d)| k.sha256 == sha && !d.staging && d.list.is_none())
        else {
            return;
        };
        if payload.is_empty() {
            return; // a cleared retained message
        }
        let key = *key;
        match ChunkList::open(payload, &d.transfer) {
            Ok(list) => {
                d.list = Some(list.clone());
                d.last_progress_ms = self.now_ms;
                self.out.push(Effect::Unsubscribe(topic.to_string()));
                self.out.push(Effect::Scan { key, list });
            }
            Err(why) => {
                let (name, version) = (d.module.name.clone(), d.module.version);
                let reason = format!("chunk list of {}: {why}", hex::encode(&sha[..6]));
                self.event(&name, version, EventKind::Rejected { reason });
            }
        }
    }

    /// The inactive slot: never the committed one.
    fn slot_for(&self, name: &str) -> Slot {
        self.state
            .modules
            .get(name)
            .and_then(|r| r.committed.as_ref())
            .map_or(Slot::A, |c| c.slot.other())
    }

    fn on_scanned(&mut self, key: DownloadKey, have: BTreeSet<u32>) {
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(total) = d.list.as_ref().map(|l| l.chunks.len() as u32) else {
            return;
        };
        let have: BTreeSet<u32> = have.into_iter().filter(|n| *n < total).collect();
        let (name, version, count) = (d.module.name.clone(), d.module.version, have.len());
        d.have = Some(have);
        self.event(
            &name,
            version,
            EventKind::Downloading {
                have: count as u32,
                total,
            },
        );
        self.subscribe_missing(key);
        self.maybe_stage(key);
    }

    fn subscribe_missing(&mut self, key: DownloadKey) {
        let Some(d) = self.downloads.get(&key) else {
            return;
        };
        if d.staging {
            return;
        }
        let (Some(have), Some(list)) = (&d.have, &d.list) else {
            if d.list.is_none() {
                self.out
                    .push(Effect::Subscribe(self.topics.list(&key.sha256)));
            }
            return;
        };
        let total = list.chunks.len() as u32;
        let topics: Vec<String> = (0..total)
            .filter(|n| !have.contains(n))
            .map(|n| self.topics.chunk(&key.sha256, n))
            .collect();
        self.out.extend(topics.into_iter().map(Effect::Subscribe));
    }

    fn unsubscribe_missing(&mut self, key: DownloadKey) {
        let Some(d) = self.downloads.get(&key) else {
            return;
        };
        let Some(list) = &d.list else {
            self.out
                .push(Effect::Unsubscribe(self.topics.list(&key.sha256)));
            return;
        };
        let total = list.chunks.len() as u32;
        let have = d.have.clone().unwrap_or_default();
        let topics: Vec<String> = (0..total)
            .filter(|n| !have.contains(n))
            .map(|n| self.topics.chunk(&key.sha256, n))
            .collect();
        self.out.extend(topics.into_iter().map(Effect::Unsubscribe));
    }

    fn on_chunk(&mut self, topic: &str, payload: &[u8]) {
        let Some((sha, n)) = self.topics.parse_chunk(topic) else {
            return;
        };
        let Some((key, d)) = self
            .downloads
            .iter()
            .find(|(k, d)| k.sha256 == sha && !d.staging && d.have.is_some())
        else {
            return;
        };
        let Some(list) = d.list.clone() else {
            return;
        };
        let (key, module) = (*key, d.module.clone());
        if payload.is_empty() || d.have.as_ref().is_some_and(|h| h.contains(&n)) {
            return;
        }
        let reject = |why: String| EventKind::Rejected {
            reason: format!("chunk {n} of {}: {why}", hex::encode(&sha[..6])),
        };
        let art = &list;
        let Some(expected) = art.chunks.get(n as usize) else {
            return self.event(
                &module.name,
                module.version,
                reject("beyond the last chunk".into()),
            );
        };
        let data = match kiln_protocol::transfer::Chunk::open(payload, art) {
            Ok((index, data)) if index == n => data,
            Ok((index, _)) => {
                let why = format!("carries chunk {index}, not this one");
                return self.event(&module.name, module.version, reject(why));
            }
            Err(why) => return self.event(&module.name, module.version, reject(why)),
        };
        if data.len() as u64 != art.chunk_len(n) {
            let why = format!("{} bytes, expected {}", data.len(), art.chunk_len(n));
            return self.event(&module.name, module.version, reject(why));
        }
        if kiln_protocol::fleet::sha256(&data) != *expected {
            return self.event(
                &module.name,
                module.version,
                reject("sha256 mismatch".into()),
            );
        }
        self.out.push(Effect::WriteChunk { key, n, data });
    }

    fn on_chunk_stored(&mut self, key: DownloadKey, n: u32, result: Result<(), String>) {
        if let Err(e) = result {
            return self.degrade(format!("cannot store a chunk: {e}"));
        }
        let topic = self.topics.chunk(&key.sha256, n);
        let now = self.now_ms;
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(have) = d.have.as_mut() else {
            return;
        };
        if !have.insert(n) {
            return;
        }
        d.last_progress_ms = now;
        let total = d.list.as_ref().map_or(0, |l| l.chunks.len() as u32);
        let count = have.len() as u32;
        let (name, version) = (d.module.name.clone(), d.module.version);
        self.out.push(Effect::Unsubscribe(topic));
        self.out.push(Effect::Checkpoint("download"));
        if count < total && count.is_multiple_of(8) {
            self.event(
                &name,
                version,
                EventKind::Downloading { have: count, total },
            );
        }
        self.maybe_stage(key);
    }

    /// Every chunk is on disk: assemble, verify and stage into the inactive slot.
    fn maybe_stage(&mut self, key: DownloadKey) {
        let name = match self.downloads.get(&key) {
            Some(d) if !d.staging => d.module.name.clone(),
            _ => return,
        };
        let slot = self.slot_for(&name);
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(list) = d.list.clone() else {
            return;
        };
        if d.have.as_ref().is_none_or(|h| h.len() != list.chunks.len()) {
            return;
        }
        d.staging = true;
        // The patch's base is the committed artifact, in the slot being replaced last.
        let from = StageFrom::Download {
            list,
            codec: d.transfer.codec,
            base: d.base.map(|b| (slot.other(), b)),
        };
        let (module, target) = (d.module.clone(), d.target.clone());
        self.out.push(Effect::Stage {
            module: Box::new(module),
            target: Box::new(target),
            key,
            slot,
            from: Box::new(from),
        });
    }

    fn on_staged(&mut self, name: &str, key: DownloadKey, result: StageResult) {
        let Some(download) = self.downloads.remove(&key) else {
            return; // cancelled meanwhile
        };
        let (d, target) = (download.module.clone(), download.target.clone());
        let sha = target.sha256;
        if !matches!(result, StageResult::Missing(_)) {
            self.out.push(Effect::DropDownload(key));
        }
        match result {
            StageResult::Refused(reason) => {
                let r = self.record_mut(name);
                r.rejected.push(sha);
                if r.staged.as_ref().is_some_and(|s| s.sha256 == sha) {
                    r.staged = None;
                }
                self.save();
                self.event(name, d.version, EventKind::Rejected { reason });
            }
            StageResult::PatchFailed(reason) => {
                self.no_patch.insert(sha);
                self.event(name, d.version, EventKind::FellBack { reason });
                self.reconcile_module(&d);
            }
            StageResult::Io(e) => self.degrade(format!("cannot stage {name} v{}: {e}", d.version)),
            StageResult::Missing(why) => {
                tracing::warn!(module = name, reason = %why, "fetching the artifact again");
                let download = Download {
                    have: None,
                    last_progress_ms: self.now_ms,
                    staging: false,
                    ..download
                };
                self.begin_download(key, download);
            }
            StageResult::Staged(slot, signer) => {
                if self.wanted_sha(name) != Some(sha) {
                    return; // no longer wanted; the slot is simply not used
                }
                self.event(name, d.version, EventKind::Verified);
                self.record_mut(name).staged =
                    Some(Installed::from_desired(slot, &d, &target, signer));
                self.save();
                self.event(name, d.version, EventKind::Staged);
                self.out.push(Effect::Checkpoint("stage"));
                self.trials.insert(
                    name.to_string(),
                    Trial {
                        sha256: sha,
                        version: d.version,
                        deadline_ms: self.now_ms.saturating_add(self.settings.start_timeout_ms),
                        started: false,
                        health_ms: d
                            .health_window_ms
                            .clamp(self.settings.min_health_ms, MAX_HEALTH_WINDOW_MS),
                    },
                );
                self.run_plans();
                self.event(name, d.version, EventKind::Activated);
                self.out.push(Effect::Checkpoint("activate"));
            }
        }
    }

    fn on_worker(&mut self, module: &str, outcome: Outcome) {
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

    fn on_tick(&mut self) {
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

    fn commit(&mut self, name: &str) {
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

    fn roll_back(&mut self, name: &str, reason: String) {
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

    fn cancel_download(&mut self, key: DownloadKey) {
        self.unsubscribe_missing(key);
        if let Some(d) = self.downloads.remove(&key) {
            self.event(
                &d.module.name,
                d.module.version,
                EventKind::Rejected {
                    reason: "download cancelled: no longer desired".into(),
                },
            );
        }
        self.out.push(Effect::DropDownload(key));
    }

    fn on_saved(&mut self, result: Result<(), String>) {
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
    fn degrade(&mut self, why: String) {
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
    fn run_plans(&mut self) {
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
