//! The update agent against a model of what operators and the world do to it: random
//! sequences of pushes (good, crashing, badly signed, mislabelled, for another target;
//! raw, compressed, with patches from earlier versions, with patches that do not
//! apply), reverts, drops, junk
//! and stale desired states, chunks in any order and duplicated, corrupt chunk files,
//! worker outcomes, time, and kilnd restarts (state reloaded from the real store).
//! Only MQTT and the workers are simulated; the store and the verification are the
//! real ones. Invariants are checked after every step, convergence at the end.
//!
//! `KILN_MODEL_CASES` and `KILN_MODEL_SEED` set the case count and seed (the longer run
//! is `scripts/model.sh`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kiln_protocol::artifact::seal;
use kiln_protocol::compat::HostFacts;
use kiln_protocol::fleet::{
    Desired, DesiredModule, DeviceFacts, ModuleLimits, ModuleState, Patch, Scope, SignedDesired,
    TargetArtifact, Topics, MAX_SERIAL_AHEAD_MS,
};
use kiln_protocol::keys::{SecretKey, TrustedKeys};
use kiln_protocol::manifest::{Digest, Manifest};
use kiln_protocol::transfer::{Codec, Prepared, Transfer};
use kiln_protocol::trust::{Chain, Role, Root};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::agent::{
    decode_reported, subscribe_retry_ms, Agent, Effect, Input, MirrorPart, Mirrors, Outcome,
    Settings, Trust,
};
use super::store::{Installed, Store};
use super::Executor;

const DEVICE: &str = "dev-01";
const GROUP: &str = "lab";
const MODULES: [&str; 2] = ["app", "aux"];
const CHUNK_SIZES: [u32; 2] = [1024, 1500];
const HEALTH_MS: u64 = 5_000;
const FLEET: &str = "acme";
/// Desired states in the model are valid for a month of model time.
const VALID_MS: u64 = 30 * 24 * 3600 * 1000;

/// The fleet's root document: `root_key` as its root key, `release` as the release key.
fn root_of(root_key: &SecretKey, release: &SecretKey) -> (Root, Vec<u8>) {
    let root = Root {
        fleet: FLEET.into(),
        version: 1,
        issued_ms: 0,
        root: Role::new(&[root_key.public()], 1),
        release: Role::new(&[release.public()], 1),
        registry: None,
        expires_ms: None,
    };
    let bytes = root.sign(&[root_key]).expect("root");
    (root, bytes)
}

/// A desired state as `kiln push` makes it at `now`.
fn desired_at(scope: Scope, serial: u64, now: u64, modules: Vec<DesiredModule>) -> Desired {
    Desired {
        fleet: FLEET.into(),
        scope,
        serial,
        issued_ms: now,
        expires_ms: now + VALID_MS,
        mirrors: Vec::new(),
        modules,
    }
}

/// What an artifact does when it runs, or why it never should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    /// Crashes in its trial.
    Crashy,
    /// Signed by a key the device does not trust.
    Untrusted,
    /// Its manifest names another version than the desired state.
    Mislabelled,
    /// The release has an artifact for riscv64 only.
    Foreign,
}

/// How the release's artifact travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Raw,
    Zstd,
    /// Compressed, with patches from the module's earlier artifacts.
    Patched,
    /// Compressed, with patches that give other bytes than the artifact.
    BadPatch,
}

const TRIPLE: &str = "aarch64-unknown-linux-gnu";

#[derive(Debug, Clone)]
enum Op {
    Push {
        group: bool,
        module: usize,
        version: u64,
        kind: Kind,
        via: Via,
        chunk: usize,
        downgrade: bool,
    },
    /// Push the previous release of a module again (a revert), with allow-downgrade.
    Revert {
        group: bool,
        module: usize,
    },
    Drop {
        group: bool,
        module: usize,
    },
    Junk {
        group: bool,
    },
    /// The broker sends an older desired state again.
    Replay {
        group: bool,
    },
    /// Deliver up to n pending messages, in an order picked by `seed`, some twice.
    Deliver {
        n: usize,
        seed: u64,
        dup: bool,
    },
    /// A stored chunk file changes on disk.
    CorruptStoredChunk,
    /// Every worker reports: good ones start, crashy ones crash.
    Workers,
    Advance {
        ms: u64,
    },
    Restart,
    /// The mirror the desired states name starts serving, serving a wrong chunk, or
    /// fails; `on`: whether the device uses it (`mirror = "off"` when not).
    Mirror {
        model: MirrorModel,
        on: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        6 => Just(Kind::Good),
        2 => Just(Kind::Crashy),
        1 => Just(Kind::Untrusted),
        1 => Just(Kind::Mislabelled),
        1 => Just(Kind::Foreign),
    ];
    let via = prop_oneof![
        1 => Just(Via::Raw),
        1 => Just(Via::Zstd),
        2 => Just(Via::Patched),
        1 => Just(Via::BadPatch),
    ];
    prop_oneof![
        4 => (any::<bool>(), 0..2usize, 1..6u64, kind, via, 0..2usize, prop::bool::weighted(0.2))
            .prop_map(|(group, module, version, kind, via, chunk, downgrade)| Op::Push {
                group, module, version, kind, via, chunk, downgrade
            }),
        1 => (any::<bool>(), 0..2usize).prop_map(|(group, module)| Op::Revert { group, module }),
        1 => (any::<bool>(), 0..2usize).prop_map(|(group, module)| Op::Drop { group, module }),
        1 => any::<bool>().prop_map(|group| Op::Junk { group }),
        1 => any::<bool>().prop_map(|group| Op::Replay { group }),
        8 => (1..40usize, any::<u64>(), prop::bool::weighted(0.2))
            .prop_map(|(n, seed, dup)| Op::Deliver { n, seed, dup }),
        1 => Just(Op::CorruptStoredChunk),
        3 => Just(Op::Workers),
        3 => (100..8000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Restart),
        1 => (
            prop_oneof![
                Just(MirrorModel::Serving),
                Just(MirrorModel::Corrupt),
                Just(MirrorModel::Dead)
            ],
            any::<bool>()
        )
            .prop_map(|(model, on)| Op::Mirror { model, on }),
    ]
}

fn host() -> HostFacts {
    HostFacts {
        triple: TRIPLE.into(),
        cpu_features: ["neon".to_string()].into(),
        wasmer: "7.4.2".into(),
        kiln_abi: kiln_protocol::KILN_ABI_VERSION,
    }
}

struct Artifact {
    desired: DesiredModule,
    bytes: Vec<u8>,
    kind: Kind,
}

/// The sha256 of the artifact this device would take from a release, if any.
fn device_sha(d: &DesiredModule) -> Option<[u8; 32]> {
    d.artifacts
        .iter()
        .find(|a| a.triple == TRIPLE)
        .map(|a| a.sha256)
}

/// The artifact of a release that the model knows by (the riscv64 one of a foreign
/// release).
fn release_sha(d: &DesiredModule) -> [u8; 32] {
    d.artifacts[0].sha256
}

/// A broker with retained messages and one subscriber, the device.
#[derive(Default)]
struct Broker {
    retained: BTreeMap<String, Vec<u8>>,
    subscribed: BTreeSet<String>,
    /// Messages on their way to the device.
    pending: VecDeque<(String, Vec<u8>)>,
}

impl Broker {
    fn publish_retained(&mut self, topic: String, payload: Vec<u8>) {
        if self.subscribed.contains(&topic) {
            self.pending.push_back((topic.clone(), payload.clone()));
        }
        self.retained.insert(topic, payload);
    }

    fn subscribe(&mut self, topic: String) {
        if let Some(p) = self.retained.get(&topic) {
            self.pending.push_back((topic.clone(), p.clone()));
        }
        self.subscribed.insert(topic);
    }
}

struct World {
    dir: tempfile::TempDir,
    topics: Topics,
    key: SecretKey,
    root_key: SecretKey,
    root: Root,
    root_bytes: Vec<u8>,
    /// The agent's provisioning time and staleness bound (see `agent::Trust`).
    not_before_ms: u64,
    stale_after_ms: u64,
    rogue: SecretKey,
    broker: Broker,
    agent: Agent,
    now: u64,
    serials: BTreeMap<bool, u64>,
    /// Every desired state published per scope (for replays), newest last.
    history: BTreeMap<bool, Vec<Vec<u8>>>,
    /// What each scope's newest desired state holds, per module.
    scope_modules: BTreeMap<bool, BTreeMap<String, DesiredModule>>,
    /// Releases pushed per module, for reverts.
    releases: BTreeMap<String, Vec<DesiredModule>>,
    artifacts: BTreeMap<[u8; 32], Artifact>,
    /// The desired states the device received and accepted this run, per source: the
    /// model of what it wants.
    heard: BTreeMap<String, (u64, BTreeMap<String, DesiredModule>)>,
    running: BTreeMap<String, Installed>,
    floors: BTreeMap<String, u64>,
    last_reported: Option<Vec<u8>>,
    committed: BTreeMap<String, Option<[u8; 32]>>,
    starting: VecDeque<(String, Outcome)>,
    /// As `kiln push` does; an older pusher cut an artifact again with another size.
    keep_chunking: bool,
    /// Every event the device published, in words.
    events: Vec<String>,
    steps: Vec<String>,
    /// What an HTTP mirror does when asked, the mirrors desired states name, and
    /// what went through it and through the broker.
    mirror: MirrorModel,
    state_mirrors: Vec<String>,
    /// Whether the device uses the mirrors its desired states name.
    mirrors_on: bool,
    /// Every mirror URL the device asked.
    mirror_urls: BTreeSet<String>,
    mirror_bytes: u64,
    broker_chunks: usize,
    /// Commands handed to modules, and the replies the device signed.
    commands: Vec<kiln_protocol::command::Command>,
    replies: Vec<kiln_protocol::command::ReplyV1>,
    /// `online` of every status the device published.
    statuses: Vec<bool>,
}

/// A mirror serving the transfers on the broker as `kiln push --mirror-dir` writes
/// them, one serving a chunk with a byte flipped, or one that does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MirrorModel {
    Serving,
    Corrupt,
    Dead,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SecretKey::generate().expect("key");
        let topics = Topics::new("kiln/v1");
        let root_key = SecretKey::generate().expect("key");
        let (root, root_bytes) = root_of(&root_key, &key);
        let agent = Self::agent(&dir, &root_bytes, &topics, (0, u64::MAX / 4));
        let mut world = Self {
            dir,
            topics,
            root,
            root_bytes,
            root_key,
            not_before_ms: 0,
            stale_after_ms: u64::MAX / 4,
            rogue: SecretKey::generate().expect("key"),
            key,
            broker: Broker::default(),
            agent,
            now: 1_000_000,
            serials: BTreeMap::new(),
            history: BTreeMap::new(),
            scope_modules: BTreeMap::new(),
            releases: BTreeMap::new(),
            artifacts: BTreeMap::new(),
            heard: BTreeMap::new(),
            running: BTreeMap::new(),
            floors: BTreeMap::new(),
            last_reported: None,
            committed: BTreeMap::new(),
            starting: VecDeque::new(),
            keep_chunking: true,
            events: Vec::new(),
            steps: Vec::new(),
            mirror: MirrorModel::Dead,
            state_mirrors: vec!["http://mirror.test".into()],
            mirrors_on: false,
            mirror_urls: BTreeSet::new(),
            mirror_bytes: 0,
            broker_chunks: 0,
            commands: Vec::new(),
            replies: Vec::new(),
            statuses: Vec::new(),
        };
        world.boot();
        world
    }

    fn agent(
        dir: &tempfile::TempDir,
        root: &[u8],
        topics: &Topics,
        (not_before_ms, stale_after_ms): (u64, u64),
    ) -> Agent {
        let store = Store::open(dir.path()).expect("store");
        let facts = DeviceFacts {
            triple: host().triple,
            cpu_features: vec!["neon".into()],
            kilnd: "test".into(),
            wasmer: "7.4.2".into(),
            kiln_abi: 1,
            groups: vec![GROUP.into()],
            boot_id: 1,
        };
        Agent::new(
            DEVICE,
            vec![GROUP.into()],
            topics.clone(),
            Trust {
                chain: Chain::new(root.to_vec()).expect("root"),
                identity: SecretKey::generate().expect("key"),
                not_before_ms,
                stale_after_ms,
            },
            facts,
            Settings {
                stall_ms: 20_000,
                min_health_ms: 100,
                start_timeout_ms: HEALTH_MS,
            },
            store.load().map_err(|e| e.to_string()),
            1_000_000,
        )
    }

    fn exec(&self) -> Executor {
        Executor {
            store: Store::open(self.dir.path()).expect("store"),
            trust: TrustedKeys::new(vec![self.key.public()]),
            host: host(),
        }
    }

    fn boot(&mut self) {
        let effects = self.agent.boot();
        self.perform(effects);
        self.input(Input::Connected);
    }

    fn input(&mut self, input: Input) {
        let effects = self.agent.handle(self.now, input);
        self.perform(effects);
        // Workers start (or crash) right after they are asked to run.
        while let Some((module, outcome)) = self.starting.pop_front() {
            let effects = self
                .agent
                .handle(self.now, Input::Worker { module, outcome });
            self.perform(effects);
        }
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        let mut exec = self.exec();
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            // The committed slot is never written over.
            if let Effect::Stage { module, slot, .. } = &effect {
                let committed = self.agent.state().modules.get(&module.name);
                let committed = committed.and_then(|r| r.committed.as_ref());
                assert!(
                    committed.is_none_or(|c| c.slot != *slot),
                    "staging {} into its committed slot {slot:?}",
                    module.name
                );
            }
            match exec.perform(effect) {
                Ok(Some(input)) => queue.extend(self.agent.handle(self.now, input)),
                Ok(None) => {}
                Err(Effect::Publish { topic, payload, .. }) => {
                    if topic == self.topics.reported(DEVICE) {
                        self.last_reported = Some(payload);
                    } else if topic == self.topics.status(DEVICE) {
                        let (status, _) = kiln_protocol::fleet::Status::open(&topic, &payload)
                            .expect("a status the device signed");
                        self.statuses.push(status.online);
                    } else if topic == self.topics.replies(DEVICE) {
                        let (reply, signer) = kiln_protocol::fleet::open_report::<
                            kiln_protocol::command::Reply,
                        >(&topic, &payload)
                        .expect("a signed reply");
                        assert!(signer.is_some());
                        if let kiln_protocol::command::Reply::V1(r) = reply {
                            self.replies.push(r);
                        }
                    } else if topic == self.topics.events(DEVICE) {
                        if let Ok((e, _)) = kiln_protocol::fleet::Event::open(&topic, &payload) {
                            self.events
                                .push(format!("{} v{}: {}", e.module, e.version, e.kind));
                        }
                    }
                }
                Err(Effect::Subscribe(t)) => self.broker.subscribe(t),
                Err(Effect::Command(c)) => self.commands.push(*c),
                Err(Effect::MirrorGet {
                    key,
                    part,
                    urls,
                    max,
                    exact,
                }) => {
                    assert!(!urls.is_empty());
                    self.mirror_urls.extend(urls);
                    let result = self.mirror_answer(&key.sha256, part, max, exact);
                    let input = Input::Mirror { key, part, result };
                    queue.extend(self.agent.handle(self.now, input));
                }
                Err(Effect::Unsubscribe(t)) => {
                    self.broker.subscribed.remove(&t);
                }
                Err(Effect::Run(modules)) => {
                    // Never a version the device did not verify: the slot holds it.
                    for (name, i) in &modules {
                        let path = exec.store.slot_path(name, i.slot);
                        let bytes = std::fs::read(&path).expect("slot of a running module");
                        assert_eq!(kiln_protocol::fleet::sha256(&bytes), i.sha256, "{name}");
                    }
                    for (name, i) in &modules {
                        if self.running.get(name) != Some(i) {
                            let outcome = self.outcome(i);
                            self.starting.push_back((name.clone(), outcome));
                        }
                    }
                    self.running = modules;
                }
                Err(_) => {}
            }
        }
    }

    /// A release as `kiln push` uploads it: an artifact whose stream is already on the
    /// broker keeps the chunk size it went up with.
    fn artifact(&mut self, module: &str, version: u64, kind: Kind, chunk: u32) -> DesiredModule {
        self.release_via(module, version, kind, Via::Raw, chunk)
    }

    fn release_via(
        &mut self,
        module: &str,
        version: u64,
        kind: Kind,
        via: Via,
        chunk: u32,
    ) -> DesiredModule {
        // The payload names the kind, so a crashy and a good v3 are different artifacts.
        let payload = format!("{module} v{version} {kind:?} native code").repeat(60);
        let mut manifest = Manifest::example(payload.as_bytes());
        manifest.name = module.into();
        manifest.version = if kind == Kind::Mislabelled {
            version + 100
        } else {
            version
        };
        manifest.payload = Digest::of(payload.as_bytes());
        let key = if kind == Kind::Untrusted {
            &self.rogue
        } else {
            &self.key
        };
        let bytes = seal(&manifest, payload.as_bytes(), key).expect("seal");
        let sha = kiln_protocol::fleet::sha256(&bytes);
        let chunk = match self.artifacts.get(&sha) {
            Some(a) if self.keep_chunking => a.desired.artifacts[0].full.chunk_size,
            _ => chunk,
        };
        let codec = if via == Via::Raw {
            Codec::Raw
        } else {
            Codec::Zstd
        };
        let full = Transfer::full(&bytes, codec, chunk);
        self.upload(&full);
        let mut patches = Vec::new();
        if matches!(via, Via::Patched | Via::BadPatch) {
            let bases: Vec<([u8; 32], Vec<u8>)> = self
                .artifacts
                .iter()
                .filter(|(_, a)| a.desired.name == module)
                .map(|(sha, a)| (*sha, a.bytes.clone()))
                .collect();
            // A bad patch gives other bytes of the same length.
            let mut to = bytes.clone();
            if via == Via::BadPatch {
                *to.last_mut().expect("bytes") ^= 1;
            }
            for (base, base_bytes) in bases.into_iter().rev().take(3) {
                let p = Transfer::patch(&base_bytes, &to, chunk);
                self.upload(&p);
                patches.push(Patch {
                    base,
                    transfer: p.transfer,
                });
            }
        }
        let triple = if kind == Kind::Foreign {
            "riscv64gc-unknown-linux-gnu"
        } else {
            TRIPLE
        };
        let desired = DesiredModule {
            name: module.into(),
            version,
            artifacts: vec![TargetArtifact {
                triple: triple.into(),
                cpu_features: Vec::new(),
                sha256: sha,
                len: bytes.len() as u64,
                full: full.transfer,
                patches,
            }],
            config: Vec::new(),
            limits: ModuleLimits::default(),
            allow_downgrade: false,
            health_window_ms: HEALTH_MS,
        };
        self.artifacts.insert(
            sha,
            Artifact {
                desired: desired.clone(),
                bytes,
                kind,
            },
        );
        desired
    }

    /// A transfer's chunk list and chunks, retained.
    fn upload(&mut self, p: &Prepared) {
        let sha = p.transfer.sha256;
        self.broker
            .publish_retained(self.topics.list(&sha), p.list_message.clone());
        for (n, message) in p.chunk_messages() {
            self.broker
                .publish_retained(self.topics.chunk(&sha, n), message);
        }
    }

    fn source(&self, group: bool) -> String {
        if group {
            self.topics.group_desired(GROUP)
        } else {
            self.topics.desired(DEVICE)
        }
    }

    fn publish_desired(&mut self, group: bool) {
        let serial = self.serials.entry(group).or_insert(0);
        *serial += 1;
        let scope = if group {
            Scope::Group(GROUP.into())
        } else {
            Scope::Device(DEVICE.into())
        };
        let modules = self
            .scope_modules
            .get(&group)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let desired = Desired {
            mirrors: self.state_mirrors.clone(),
            ..desired_at(scope, *serial, self.now, modules)
        };
        let signed = SignedDesired::sign(&desired, &[&self.key]);
        self.history.entry(group).or_default().push(signed.clone());
        let topic = self.source(group);
        self.broker.publish_retained(topic, signed);
    }

    /// Makes `d` the module's entry in the scope's desired state, as `kiln push` does.
    fn release(&mut self, group: bool, d: DesiredModule) {
        self.releases
            .entry(d.name.clone())
            .or_default()
            .push(d.clone());
        self.scope_modules
            .entry(group)
            .or_default()
            .insert(d.name.clone(), d);
        self.publish_desired(group);
    }

    fn apply(&mut self, op: &Op) {
        self.steps.push(format!("{op:?}"));
        match *op {
            Op::Push {
                group,
                module,
                version,
                kind,
                via,
                chunk,
                downgrade,
            } => {
                let name = MODULES[module];
                let mut d = self.release_via(name, version, kind, via, CHUNK_SIZES[chunk]);
                d.allow_downgrade = downgrade;
                self.release(group, d);
            }
            Op::Revert { group, module } => {
                let name = MODULES[module];
                let releases = self.releases.get(name).cloned().unwrap_or_default();
                if releases.len() < 2 {
                    return;
                }
                let mut d = releases[releases.len() - 2].clone();
                d.allow_downgrade = true;
                self.release(group, d);
            }
            Op::Drop { group, module } => {
                self.scope_modules
                    .entry(group)
                    .or_default()
                    .remove(MODULES[module]);
                self.publish_desired(group);
            }
            Op::Junk { group } => {
                let topic = self.source(group);
                self.deliver(topic, b"\x00\x05junk!".to_vec());
            }
            Op::Replay { group } => {
                let old = self.history.get(&group).and_then(|h| h.first()).cloned();
                if let Some(old) = old {
                    let topic = self.source(group);
                    self.deliver(topic, old);
                }
            }
            Op::Deliver { n, seed, dup } => {
                let mut rng = seed;
                for _ in 0..n {
                    if self.broker.pending.is_empty() {
                        break;
                    }
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let i = (rng >> 33) as usize % self.broker.pending.len();
                    let Some((topic, payload)) = self.broker.pending.remove(i) else {
                        break;
                    };
                    if !self.broker.subscribed.contains(&topic) {
                        continue; // unsubscribed while on its way
                    }
                    if dup {
                        self.deliver(topic.clone(), payload.clone());
                    }
                    self.deliver(topic, payload);
                }
            }
            Op::CorruptStoredChunk => {
                let downloads = self.dir.path().join("downloads");
                let first = std::fs::read_dir(downloads)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
                    .map(|e| e.path())
                    .next();
                if let Some(path) = first {
                    std::fs::write(path, b"bit rot").expect("corrupt");
                }
            }
            Op::Workers => self.workers(),
            Op::Advance { ms } => {
                self.now += ms;
                self.input(Input::Tick);
            }
            Op::Mirror { model, on } => {
                self.mirror = model;
                self.mirrors_on = on;
                let mirrors = if on { Mirrors::FromState } else { Mirrors::Off };
                self.agent.set_mirrors(mirrors);
            }
            Op::Restart => {
                let trust = (self.not_before_ms, self.stale_after_ms);
                self.agent = Self::agent(&self.dir, &self.root_bytes, &self.topics, trust);
                if self.mirrors_on {
                    self.agent.set_mirrors(Mirrors::FromState);
                }
                self.heard.clear();
                self.broker.subscribed.clear();
                self.broker.pending.clear();
                self.running.clear();
                self.boot();
            }
        }
        self.check(matches!(op, Op::Restart));
    }

    /// What the mirror answers: the chunk list as on the broker, a chunk's raw bytes.
    fn mirror_answer(
        &mut self,
        sha: &[u8; 32],
        part: MirrorPart,
        max: u64,
        exact: Option<u64>,
    ) -> Result<Vec<u8>, String> {
        if self.mirror == MirrorModel::Dead {
            return Err(
                "GET http://mirror.test/: connect to 10.0.0.9:80: Connection refused".into(),
            );
        }
        let (topic, n) = match part {
            MirrorPart::List => (self.topics.list(sha), None),
            MirrorPart::Chunk(n) => (self.topics.chunk(sha, n), Some(n)),
        };
        let Some(message) = self.broker.retained.get(&topic) else {
            return Err("HTTP 404".into());
        };
        let mut bytes = match n {
            None => message.clone(),
            Some(_) => match postcard::from_bytes(message) {
                Ok(kiln_protocol::transfer::Chunk::V1 { data, .. }) => data,
                Err(e) => return Err(e.to_string()),
            },
        };
        if self.mirror == MirrorModel::Corrupt && n == Some(1) {
            bytes[0] ^= 1;
        }
        assert!(bytes.len() as u64 <= max && exact.is_none_or(|e| e == bytes.len() as u64));
        self.mirror_bytes += bytes.len() as u64;
        Ok(bytes)
    }

    fn deliver(&mut self, topic: String, payload: Vec<u8>) {
        if self.topics.parse_chunk(&topic).is_some() && !topic.ends_with("/list") {
            self.broker_chunks += 1;
        }
        // The model of what the device wants: a desired state it can accept.
        if topic.ends_with("/desired") {
            let fresh = |d: &Desired| d.check_fresh(self.now).is_ok();
            if let Some(d) = SignedDesired::open(&payload, &self.root).ok().filter(fresh) {
                let last = self.agent.state().serials.get(&topic).copied().unwrap_or(0);
                if d.serial >= last {
                    let modules = d.modules.into_iter().map(|m| (m.name.clone(), m)).collect();
                    self.heard.insert(topic.clone(), (d.serial, modules));
                }
            }
        }
        self.input(Input::Message { topic, payload });
    }

    fn outcome(&self, i: &Installed) -> Outcome {
        match self.artifacts.get(&i.sha256).map_or(Kind::Good, |a| a.kind) {
            Kind::Crashy => Outcome::Crashed {
                reason: "trap: unreachable".into(),
                crashes: 1,
            },
            _ => Outcome::Started { version: i.version },
        }
    }

    /// Every worker reports again (a late or repeated report changes nothing).
    fn workers(&mut self) {
        let running = self.running.clone();
        for (name, i) in running {
            let outcome = self.outcome(&i);
            self.input(Input::Worker {
                module: name,
                outcome,
            });
        }
    }

    /// What the device should want per module: device entries over group entries.
    fn wanted(&self) -> BTreeMap<String, DesiredModule> {
        let mut wanted = BTreeMap::new();
        let device = self.topics.desired(DEVICE);
        for (source, (_, modules)) in self.heard.iter().filter(|(s, _)| **s != device) {
            let _ = source;
            wanted.extend(modules.clone());
        }
        if let Some((_, modules)) = self.heard.get(&device) {
            wanted.extend(modules.clone());
        }
        wanted
    }

    fn check(&mut self, restarted: bool) {
        let state = self.agent.state().clone();
        let persisted = Store::open(self.dir.path())
            .expect("store")
            .load()
            .unwrap_or_default();
        let wanted = self.wanted();
        for (name, r) in &state.modules {
            // The floor never goes down.
            let floor = self.floors.entry(name.clone()).or_insert(0);
            assert!(
                r.floor >= *floor,
                "{name}: floor went from {floor} to {}",
                r.floor
            );
            *floor = r.floor;
            // What runs is committed or on trial, and was wanted when committed.
            if let Some(c) = &r.committed {
                assert!(c.version <= r.floor, "{name}: committed above its floor");
                let art = &self.artifacts[&c.sha256];
                assert_ne!(art.kind, Kind::Untrusted);
                assert_ne!(art.kind, Kind::Mislabelled);
                assert_ne!(art.kind, Kind::Foreign);
                assert_eq!(art.desired.version, c.version);
            }
            if let Some(i) = self.running.get(name) {
                let ok = r.committed.as_ref().is_some_and(|c| c.sha256 == i.sha256)
                    || r.staged.as_ref().is_some_and(|s| s.sha256 == i.sha256);
                assert!(ok, "{name}: runs what is neither committed nor staged");
            }
        }
        // A commit is of something wanted at the time it is made, and is saved.
        for (name, r) in &state.modules {
            let now = r.committed.as_ref().map(|c| c.sha256);
            let before = self.committed.insert(name.clone(), now).flatten();
            if let Some(sha) = now.filter(|sha| Some(*sha) != before) {
                if !restarted {
                    assert_eq!(
                        wanted.get(name).and_then(device_sha),
                        Some(sha),
                        "{name}: committed a sha that is not wanted"
                    );
                }
            }
            if self.agent.degraded().is_none() {
                let on_disk = persisted
                    .modules
                    .get(name)
                    .and_then(|p| p.committed.as_ref());
                assert_eq!(on_disk.map(|c| c.sha256), now, "{name}: commit not saved");
            }
        }
        // Nothing the device did is unreported: the last reported state is now.
        if let Some(bytes) = &self.last_reported {
            let reported = decode_reported(bytes).expect("reported decodes");
            for m in &reported.modules {
                let r = &state.modules[&m.name];
                match m.state {
                    ModuleState::Running | ModuleState::Restarting | ModuleState::Exited => {
                        let c = r.committed.as_ref().expect("running means committed");
                        assert_eq!((c.version, c.sha256), (m.version, m.sha256));
                    }
                    // On trial (staged), or a first version still downloading.
                    ModuleState::Updating => match r.staged.as_ref() {
                        Some(s) => assert_eq!(s.sha256, m.sha256),
                        None => assert!(r.committed.is_none(), "updating, not staged"),
                    },
                    // Never committed (its first version rolled back: the version it
                    // tried is named), or committed and given up on.
                    ModuleState::Failed => match r.committed.as_ref() {
                        Some(c) => assert_eq!((c.version, c.sha256), (m.version, m.sha256)),
                        None => assert!(r.rejected.contains(&m.sha256) || m.version == 0),
                    },
                }
            }
            for (name, r) in &state.modules {
                if r.committed.is_some() {
                    assert!(
                        reported.modules.iter().any(|m| m.name == *name),
                        "{name} is committed but not reported"
                    );
                }
            }
        }
    }

    /// After the last fault: every message delivered, workers healthy, time passing.
    fn settle(&mut self) {
        for _ in 0..12 {
            self.apply(&Op::Deliver {
                n: 10_000,
                seed: 7,
                dup: false,
            });
            self.apply(&Op::Workers);
            self.apply(&Op::Advance {
                ms: HEALTH_MS + 1000,
            });
        }
        let state = self.agent.state().clone();
        for (name, want) in self.wanted() {
            let r = state.modules.get(&name).cloned().unwrap_or_default();
            let sha = release_sha(&want);
            let art = &self.artifacts[&sha];
            let blocked = want.version < r.floor && !want.allow_downgrade;
            let refused = r.rejected.contains(&sha);
            if art.kind == Kind::Good && !blocked {
                assert!(!refused, "{name}: a good artifact was refused");
                let c = r.committed.as_ref().map(|c| (c.version, c.sha256));
                assert_eq!(
                    c,
                    Some((want.version, sha)),
                    "{name} did not converge to v{}",
                    want.version
                );
            } else if art.kind != Kind::Good {
                assert!(
                    r.committed.as_ref().is_none_or(|c| c.sha256 != sha),
                    "{name}: a bad artifact was committed"
                );
            }
        }
        // Modules no source wants any more (once every source spoke) are stopped.
        let wanted = self.wanted();
        if self.heard.len() == 2 {
            for (name, r) in &state.modules {
                if !wanted.contains_key(name) {
                    assert!(r.committed.is_none(), "{name} runs though nobody wants it");
                }
            }
        }
    }
}

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("KILN_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let seed: u64 = std::env::var("KILN_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b696c6e);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

#[test]
fn random_operations_keep_the_invariants_and_converge() {
    let mut runner = runner(32);
    let started = std::time::Instant::now();
    let steps = std::cell::Cell::new(0usize);
    let (mirrored, fell_back) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0usize));
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        let mut world = World::new();
        for op in &ops {
            world.apply(op);
        }
        world.settle();
        steps.set(steps.get() + ops.len());
        mirrored.set(mirrored.get() + world.mirror_bytes);
        let fell = world
            .events
            .iter()
            .filter(|e| e.contains("the mirror failed"));
        fell_back.set(fell_back.get() + fell.count());
        Ok(())
    });
    eprintln!(
        "model: {} cases, {} steps, {:.1} s; {} bytes from the mirror, {} fallbacks to the broker",
        runner.config().cases,
        steps.get(),
        started.elapsed().as_secs_f64(),
        mirrored.get(),
        fell_back.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

// Named regressions, one per finding of the review.

fn push(world: &mut World, group: bool, module: usize, version: u64, kind: Kind) {
    world.apply(&Op::Push {
        group,
        module,
        version,
        kind,
        via: Via::Raw,
        chunk: 0,
        downgrade: false,
    });
}

fn deliver_all(world: &mut World) {
    world.apply(&Op::Deliver {
        n: 10_000,
        seed: 1,
        dup: false,
    });
}

/// The desired state and the first chunk or so: a transfer under way.
fn deliver_some(world: &mut World) {
    world.apply(&Op::Deliver {
        n: 2,
        seed: 3,
        dup: false,
    });
}

/// A device-scoped desired state holding only `module`, signed by the fleet key,
/// delivered as is (for entries `kiln push` would never write).
fn deliver_only(world: &mut World, module: DesiredModule) {
    let desired = desired_at(Scope::Device(DEVICE.into()), 1, world.now, vec![module]);
    let topic = world.topics.desired(DEVICE);
    let signed = SignedDesired::sign(&desired, &[&world.key]);
    world.deliver(topic, signed);
}

fn committed(world: &World, module: &str) -> Option<u64> {
    world
        .agent
        .state()
        .modules
        .get(module)?
        .committed
        .as_ref()
        .map(|c| c.version)
}

fn commit(world: &mut World) {
    deliver_all(world);
    world.apply(&Op::Workers);
    world.apply(&Op::Advance { ms: HEALTH_MS + 1 });
}

#[test]
fn a_revert_during_a_trial_ends_the_trial_and_the_device_takes_the_next_version() {
    let mut w = World::new();
    push(&mut w, false, 0, 7, Kind::Good);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(7));
    push(&mut w, false, 0, 8, Kind::Good);
    deliver_all(&mut w);
    w.apply(&Op::Workers); // v8 runs on trial
    w.apply(&Op::Revert {
        group: false,
        module: 0,
    });
    commit(&mut w);
    let r = &w.agent.state().modules["app"];
    assert_eq!(
        committed(&w, "app"),
        Some(7),
        "v7 stays, v8 is not committed"
    );
    assert_eq!(r.floor, 7, "the floor did not rise to 8");
    push(&mut w, false, 0, 9, Kind::Good);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(9));
}

#[test]
fn a_revert_during_a_download_cancels_it() {
    let mut w = World::new();
    push(&mut w, false, 0, 7, Kind::Good);
    commit(&mut w);
    push(&mut w, false, 0, 8, Kind::Good);
    deliver_some(&mut w);
    w.apply(&Op::Revert {
        group: false,
        module: 0,
    });
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(7));
    assert_eq!(w.agent.state().modules["app"].floor, 7);
}

#[test]
fn a_module_dropped_while_it_downloads_is_not_installed() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    deliver_some(&mut w);
    w.apply(&Op::Drop {
        group: false,
        module: 0,
    });
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), None);
}

#[test]
fn a_corrupt_stored_chunk_is_fetched_again_after_a_restart() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    deliver_some(&mut w);
    w.apply(&Op::CorruptStoredChunk);
    w.apply(&Op::Restart);
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
    assert!(w.agent.state().modules["app"].rejected.is_empty());
}

#[test]
fn the_same_artifact_pushed_with_another_chunk_size_still_installs() {
    let mut w = World::new();
    w.keep_chunking = false;
    w.apply(&Op::Push {
        group: false,
        module: 0,
        version: 1,
        kind: Kind::Good,
        via: Via::Raw,
        chunk: 0,
        downgrade: false,
    });
    deliver_some(&mut w);
    w.apply(&Op::Restart);
    w.apply(&Op::Push {
        group: false,
        module: 0,
        version: 1,
        kind: Kind::Good,
        via: Via::Raw,
        chunk: 1,
        downgrade: false,
    });
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
}

#[test]
fn a_stalled_download_asks_again() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    // The chunks on their way are lost.
    w.broker.pending.retain(|(t, _)| t.ends_with("/desired"));
    deliver_all(&mut w);
    w.apply(&Op::Advance { ms: 25_000 });
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
}

#[test]
fn names_that_would_escape_the_data_dir_are_refused() {
    let mut w = World::new();
    let mut d = w.artifact("app", 1, Kind::Good, 1024);
    d.name = "../../escaped".into();
    deliver_only(&mut w, d);
    commit(&mut w);
    assert!(w.agent.state().modules.is_empty());
    assert!(!w.dir.path().join("../escaped").exists());
}

#[test]
fn fleet_limits_are_checked_like_config_limits() {
    let mut w = World::new();
    let mut d = w.artifact("app", 1, Kind::Good, 1024);
    d.limits.tick_ms = Some(0);
    deliver_only(&mut w, d);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), None, "a 0 ms tick is refused");
}

#[test]
fn a_crash_in_the_trial_rolls_back_and_the_floor_stays() {
    let mut w = World::new();
    push(&mut w, true, 0, 2, Kind::Good);
    commit(&mut w);
    push(&mut w, true, 0, 3, Kind::Crashy);
    commit(&mut w);
    commit(&mut w);
    let r = &w.agent.state().modules["app"];
    assert_eq!(committed(&w, "app"), Some(2));
    assert_eq!(r.floor, 2);
    assert_eq!(r.rejected.len(), 1);
}

#[test]
fn an_unreadable_state_file_degrades_instead_of_exiting() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    std::fs::write(w.dir.path().join("state"), b"\xff\xff junk").expect("write");
    w.apply(&Op::Restart);
    assert!(w.agent.degraded().is_some());
    push(&mut w, false, 0, 2, Kind::Good);
    commit(&mut w);
    // Nothing was saved over the unreadable file.
    assert_eq!(
        std::fs::read(w.dir.path().join("state")).expect("read"),
        b"\xff\xff junk"
    );
}

#[test]
fn a_failing_save_refuses_updates_until_the_data_dir_works_again() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    w.input(Input::Saved(Err("No space left on device".into())));
    assert!(w.agent.degraded().is_some());
    push(&mut w, false, 0, 2, Kind::Good);
    deliver_all(&mut w);
    assert_eq!(
        committed(&w, "app"),
        Some(1),
        "the committed version keeps running"
    );
    // The next tick's probe save works: updates resume.
    commit(&mut w);
    commit(&mut w);
    assert!(w.agent.degraded().is_none());
    assert_eq!(committed(&w, "app"), Some(2));
}

#[test]
fn a_patch_from_the_committed_version_installs_and_a_bad_one_falls_back_to_the_full_artifact() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    let push_via = |w: &mut World, version, via| {
        w.apply(&Op::Push {
            group: false,
            module: 0,
            version,
            kind: Kind::Good,
            via,
            chunk: 0,
            downgrade: false,
        })
    };
    push_via(&mut w, 2, Via::Patched);
    // Only the patch travels: the full artifact's chunk list is never asked for.
    let entry = w.scope_modules[&false]["app"].artifacts[0].clone();
    let (full, patch) = (entry.full.sha256, entry.patches[0].transfer.sha256);
    w.apply(&Op::Deliver {
        n: 1,
        seed: 0,
        dup: false,
    });
    let subscribed = |w: &World, sha: &[u8; 32]| w.broker.subscribed.contains(&w.topics.list(sha));
    assert!(
        subscribed(&w, &patch) && !subscribed(&w, &full),
        "{:?}",
        w.broker.subscribed
    );
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(2));
    assert!(!w.events.iter().any(|e| e.contains("full artifact")));
    push_via(&mut w, 3, Via::BadPatch);
    commit(&mut w);
    commit(&mut w);
    let fell_back: Vec<&String> = w
        .events
        .iter()
        .filter(|e| e.contains("full artifact"))
        .collect();
    assert_eq!(fell_back.len(), 1, "{:?}", w.events);
    assert!(
        fell_back[0].starts_with("app v3: fetching the full artifact: the patch from"),
        "{}",
        fell_back[0]
    );
    let r = &w.agent.state().modules["app"];
    assert_eq!(
        committed(&w, "app"),
        Some(3),
        "fetched whole after the patch failed"
    );
    assert!(
        r.rejected.is_empty(),
        "a failed patch does not refuse the release"
    );
}

#[test]
fn a_release_without_an_artifact_for_the_device_is_refused_and_what_runs_stays() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    push(&mut w, false, 0, 2, Kind::Foreign);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
    assert!(w.running.contains_key("app"));
}

/// Root `version` of the model's fleet with `release` as its release key, signed by the
/// world's root key.
fn rotated(world: &World, version: u64, release: &SecretKey) -> (Root, Vec<u8>) {
    let root = Root {
        version,
        release: Role::new(&[release.public()], 1),
        ..world.root.clone()
    };
    let bytes = root.sign(&[&world.root_key]).expect("root");
    (root, bytes)
}

fn saw(world: &World, what: &str) -> bool {
    world.events.iter().any(|e| e.contains(what))
}

#[test]
fn after_a_rotation_the_old_release_key_is_refused_and_a_state_that_came_before_its_root_is_taken()
{
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
    let new = SecretKey::generate().unwrap();
    let (root2, v2) = rotated(&w, 2, &new);
    let old = std::mem::replace(&mut w.key, new);
    // (The model wants what the new root allows from here on.)
    w.root = root2;
    // Signed by the new key, it arrives before root v2: refused for now, kept.
    push(&mut w, false, 0, 2, Kind::Good);
    deliver_all(&mut w);
    assert!(saw(&w, "0 of the 1 signatures"), "{:#?}", w.events);
    assert_eq!(committed(&w, "app"), Some(1), "what runs stays");
    // Root v2 arrives: the device takes it, and the waiting state with it.
    w.deliver(w.topics.root(2), v2.clone());
    assert!(saw(&w, "trusts fleet acme root v2"), "{:#?}", w.events);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(2));
    assert_eq!(
        Store::open(w.dir.path()).unwrap().load_root().unwrap(),
        Some(v2),
        "kept for the next start"
    );
    // A release signed with the rotated-out key is refused from now on.
    w.key = old;
    push(&mut w, false, 0, 3, Kind::Good);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(2));
}

#[test]
fn a_root_that_skips_a_version_waits_and_one_signed_by_another_root_is_refused() {
    let mut w = World::new();
    let rel = SecretKey::generate().unwrap();
    let (_, v3) = rotated(&w, 3, &rel);
    w.deliver(w.topics.root(3), v3);
    assert!(saw(&w, "waiting for root v2"), "{:#?}", w.events);
    let rogue_root = SecretKey::generate().unwrap();
    let forged = Root {
        version: 2,
        ..w.root.clone()
    }
    .sign(&[&rogue_root])
    .unwrap();
    w.deliver(w.topics.root(2), forged);
    assert!(saw(&w, "root document refused"), "{:#?}", w.events);
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1), "the old root still rules");
}

#[test]
fn expired_reused_and_pre_provisioning_states_are_refused() {
    let mut w = World::new();
    let topic = w.topics.desired(DEVICE);
    let d = desired_at(Scope::Device(DEVICE.into()), 5, w.now, Vec::new());
    let expired = Desired {
        expires_ms: w.now - 1,
        issued_ms: w.now - 1000,
        ..d.clone()
    };
    w.deliver(topic.clone(), SignedDesired::sign(&expired, &[&w.key]));
    assert!(saw(&w, "expired at"), "{:#?}", w.events);
    w.deliver(topic.clone(), SignedDesired::sign(&d, &[&w.key]));
    assert_eq!(w.agent.state().serials.get(&topic), Some(&5));
    // The same serial with another body: a broker (or a leaked key) rewriting history.
    let other = Desired {
        issued_ms: w.now + 1,
        ..d.clone()
    };
    w.deliver(topic.clone(), SignedDesired::sign(&other, &[&w.key]));
    assert!(
        saw(&w, "already applied with another body"),
        "{:#?}",
        w.events
    );
    // A device provisioned after a state was issued never takes it (a replay).
    let mut fresh = World::new();
    fresh.not_before_ms = fresh.now + 10_000;
    fresh.apply(&Op::Restart);
    let topic = fresh.topics.desired(DEVICE);
    let old = desired_at(Scope::Device(DEVICE.into()), 1, fresh.now, Vec::new());
    fresh.deliver(topic.clone(), SignedDesired::sign(&old, &[&fresh.key]));
    assert!(
        saw(&fresh, "before this device was provisioned"),
        "{:#?}",
        fresh.events
    );
    assert_eq!(fresh.agent.state().serials.get(&topic), None);
}

#[test]
fn a_device_whose_states_grow_old_says_it_is_stale_once() {
    let mut w = World::new();
    w.stale_after_ms = 60_000;
    w.apply(&Op::Restart);
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    assert!(!saw(&w, "stale"));
    w.apply(&Op::Advance { ms: 61_000 });
    w.apply(&Op::Advance { ms: 1_000 });
    let stale: Vec<_> = w.events.iter().filter(|e| e.contains("stale")).collect();
    assert_eq!(stale.len(), 1, "{:#?}", w.events);
    assert!(stale[0].contains("newer ones may be withheld"), "{stale:?}");
    // A fresh state ends it (said in the status, not as an event).
    push(&mut w, false, 0, 2, Kind::Good);
    commit(&mut w);
    w.apply(&Op::Advance { ms: 1_000 });
    assert_eq!(
        w.events.iter().filter(|e| e.contains("stale")).count(),
        1,
        "{:#?}",
        w.events
    );
}

#[test]
fn a_fast_forward_by_a_key_ends_when_a_rotation_drops_the_key() {
    let mut w = World::new();
    let topic = w.topics.desired(DEVICE);
    let scope = || Scope::Device(DEVICE.into());
    // The leaked key (the world's release key) signs a serial almost a day ahead.
    let ahead = w.now + MAX_SERIAL_AHEAD_MS - 1;
    let ffwd = desired_at(scope(), ahead, w.now, Vec::new());
    w.deliver(topic.clone(), SignedDesired::sign(&ffwd, &[&w.key]));
    assert_eq!(w.agent.state().serials.get(&topic), Some(&ahead));
    // Every honest state is below it: a replay while the key is trusted...
    let honest = desired_at(scope(), w.now + 10, w.now, Vec::new());
    w.deliver(topic.clone(), SignedDesired::sign(&honest, &[&w.key]));
    assert!(saw(&w, "(a replay)"), "{:#?}", w.events);
    // ...and taken once root v2 drops the key, signed by the new one: the leaked
    // key's floor went with it, and nothing was wiped.
    let new = SecretKey::generate().unwrap();
    let (root2, v2) = rotated(&w, 2, &new);
    w.root = root2;
    w.deliver(w.topics.root(2), v2);
    w.key = new;
    let recovered = desired_at(scope(), w.now + 20, w.now, Vec::new());
    w.deliver(topic.clone(), SignedDesired::sign(&recovered, &[&w.key]));
    assert_eq!(w.agent.state().serials.get(&topic), Some(&(w.now + 20)));
    // The new key's own floor holds: its older state is a replay.
    let older = desired_at(scope(), w.now + 15, w.now, Vec::new());
    w.deliver(topic.clone(), SignedDesired::sign(&older, &[&w.key]));
    assert_eq!(w.agent.state().serials.get(&topic), Some(&(w.now + 20)));
    // And a serial past the bound is refused outright.
    let absurd = desired_at(scope(), u64::MAX, w.now, Vec::new());
    w.deliver(topic.clone(), SignedDesired::sign(&absurd, &[&w.key]));
    assert!(saw(&w, "more than a day ahead"), "{:#?}", w.events);
    assert_eq!(w.agent.state().serials.get(&topic), Some(&(w.now + 20)));
}

#[test]
fn a_device_whose_root_expired_says_it_is_stale() {
    let mut w = World::new();
    let root2 = Root {
        version: 2,
        expires_ms: Some(w.now + 5_000),
        ..w.root.clone()
    };
    let bytes = root2.sign(&[&w.root_key]).unwrap();
    w.root = root2;
    w.deliver(w.topics.root(2), bytes);
    assert!(saw(&w, "trusts fleet acme root v2"), "{:#?}", w.events);
    assert!(!saw(&w, "stale"));
    w.apply(&Op::Advance { ms: 6_000 });
    assert!(
        w.events
            .iter()
            .any(|e| e.contains("stale") && e.contains("root v2") && e.contains("expired")),
        "{:#?}",
        w.events
    );
}

/// The module `app` as the device last reported it.
fn reported_app(w: &World) -> kiln_protocol::fleet::ModuleReport {
    let bytes = w.last_reported.as_ref().expect("a reported state");
    let reported = decode_reported(bytes).expect("reported decodes");
    reported
        .modules
        .into_iter()
        .find(|m| m.name == "app")
        .expect("app reported")
}

#[test]
fn a_module_that_crash_loops_after_its_trial_is_reported_restarting_then_failed() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    assert_eq!(reported_app(&w).state, ModuleState::Running);
    let crash = |crashes| Outcome::Crashed {
        reason: "trap: unreachable".into(),
        crashes,
    };
    w.input(Input::Worker {
        module: "app".into(),
        outcome: crash(2),
    });
    let m = reported_app(&w);
    assert_eq!((m.state, m.version), (ModuleState::Restarting, 1));
    assert!(m.last_event.contains("2 crashes"), "{}", m.last_event);
    w.input(Input::Worker {
        module: "app".into(),
        outcome: Outcome::GaveUp { crashes: 5 },
    });
    let m = reported_app(&w);
    assert_eq!((m.state, m.version), (ModuleState::Failed, 1));
    assert!(
        m.last_event
            .contains("gave up after 5 crashes: trap: unreachable"),
        "{}",
        m.last_event
    );
    // Started again (a restart by SIGHUP, a new version): running, and said so.
    w.input(Input::Worker {
        module: "app".into(),
        outcome: Outcome::Started { version: 1 },
    });
    assert_eq!(reported_app(&w).state, ModuleState::Running);
}

#[test]
fn a_command_that_exits_0_in_its_trial_is_healthy_and_a_failed_first_version_is_named() {
    let mut w = World::new();
    push(&mut w, false, 0, 1, Kind::Good);
    commit(&mut w);
    push(&mut w, false, 0, 2, Kind::Good);
    deliver_all(&mut w);
    assert_eq!(reported_app(&w).state, ModuleState::Updating);
    // A WASI command that ran and exited 0 before its window ended did its job.
    w.input(Input::Worker {
        module: "app".into(),
        outcome: Outcome::Exited { code: 0 },
    });
    assert_eq!(committed(&w, "app"), Some(2));
    assert!(!saw(&w, "rolled back"), "{:#?}", w.events);
    // A first version that never commits is reported with the version it tried.
    let mut fresh = World::new();
    push(&mut fresh, false, 0, 3, Kind::Crashy);
    commit(&mut fresh);
    let m = reported_app(&fresh);
    assert_eq!((m.state, m.version), (ModuleState::Failed, 3));
    assert_ne!(m.sha256, [0; 32]);
    assert!(
        saw(&fresh, "crashed during its health window"),
        "{:#?}",
        fresh.events
    );
}

#[test]
fn a_forged_later_root_does_not_displace_the_genuine_one_and_windows_are_bounded() {
    let mut w = World::new();
    let (r2_key, r3_key) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let (_, v2) = rotated(&w, 2, &r2_key);
    // Root v3 arrives before v2: the genuine one, then a forged v3 on another topic.
    let (root3, v3) = {
        let root = Root {
            version: 3,
            release: Role::new(&[r3_key.public()], 1),
            ..w.root.clone()
        };
        let bytes = root.sign(&[&w.root_key]).unwrap();
        (root, bytes)
    };
    let rogue = SecretKey::generate().unwrap();
    let forged = Root {
        version: 3,
        root: Role::new(&[rogue.public()], 1),
        release: Role::new(&[rogue.public()], 1),
        ..w.root.clone()
    }
    .sign(&[&rogue])
    .unwrap();
    w.deliver(w.topics.root(3), v3);
    w.deliver(format!("{}/roots/x", "kiln/v1"), forged);
    w.deliver(w.topics.root(2), v2);
    assert!(saw(&w, "trusts fleet acme root v3"), "{:#?}", w.events);
    w.root = root3;
    // A health window past the bound is refused, not left to wrap a deadline.
    let mut huge = w.artifact("app", 1, Kind::Good, 1024);
    huge.health_window_ms = u64::MAX;
    w.key = r3_key;
    deliver_only(&mut w, huge);
    assert!(saw(&w, "health window of"), "{:#?}", w.events);
}

#[test]
fn a_health_period_is_signed_and_retained_on_the_devices_health_topic_and_an_invalid_one_is_not_sent(
) {
    use kiln_protocol::fleet::{Health, HealthV1, ModuleHealth};
    use kiln_protocol::rollout::gate::HealthSummary;

    let mut w = World::new();
    let health = HealthV1 {
        seq: 1,
        period_ms: 60_000,
        modules: vec![ModuleHealth {
            version: 2,
            summary: HealthSummary {
                calls: 10,
                traps: 1,
                ..HealthSummary::new("app")
            },
        }],
    };
    let effects = w.agent.health(&health);
    let [Effect::Publish {
        topic,
        retain: true,
        payload,
    }] = effects.as_slice()
    else {
        panic!("one retained publish: {effects:?}");
    };
    assert_eq!(*topic, w.topics.health(DEVICE));
    let (opened, signer) = Health::open(topic, payload).expect("it opens");
    assert_eq!(opened, health);
    assert!(signer.is_some());

    let mut twice = health.clone();
    twice.modules.push(twice.modules[0].clone());
    assert!(w.agent.health(&twice).is_empty());
}

/// A subscription the broker refuses (its ACL, or a loaded broker's 0x80) would leave
/// the device deaf to its desired state without a word: it is named in an event and
/// asked again after 2 s, then 4 s (each plus this device's spread), and afresh on every
/// new connection.
#[test]
fn a_refused_subscription_is_named_and_asked_again_with_growing_waits() {
    let mut world = World::new();
    world.boot();
    let topic = world.topics.desired(DEVICE);
    let refused = |world: &mut World| {
        world.broker.subscribed.remove(&topic);
        world.input(Input::SubscribeRefused {
            topic: topic.clone(),
        });
    };
    refused(&mut world);
    assert!(
        world
            .events
            .iter()
            .any(|e| e.contains("the broker refused the subscription to") && e.contains(&topic)),
        "{:?}",
        world.events
    );
    for refusals in [1, 2] {
        let wait = subscribe_retry_ms(refusals, &format!("{DEVICE}/{topic}"));
        world.now += wait - 1;
        world.input(Input::Tick);
        assert!(
            !world.broker.subscribed.contains(&topic),
            "before {wait} ms"
        );
        world.now += 1;
        world.input(Input::Tick);
        assert!(world.broker.subscribed.contains(&topic), "after {wait} ms");
        refused(&mut world);
    }
    // A new connection subscribes to everything again, and forgets the refusals.
    world.input(Input::Connected);
    assert!(world.broker.subscribed.contains(&topic));
    assert_eq!(world.agent.next_deadline_ms(), None);
}

/// A cluster node that died fires the last will of the device's old session after the
/// device said online on another node: the device hears its own status say offline,
/// and says online again; its own online coming back is not answered (no loop).
#[test]
fn a_late_last_will_is_answered_by_saying_online_again() {
    let mut w = World::new();
    w.boot();
    let topic = w.topics.status(DEVICE);
    assert!(w.broker.subscribed.contains(&topic));
    assert!(w.statuses.iter().all(|online| *online));
    let before = w.statuses.len();
    let facts = kiln_protocol::fleet::DeviceFacts {
        triple: "x86_64-unknown-linux-gnu".into(),
        cpu_features: Vec::new(),
        kilnd: "test".into(),
        wasmer: "7.4.2".into(),
        kiln_abi: 1,
        groups: vec![GROUP.into()],
        boot_id: 1,
    };
    let identity = SecretKey::generate().unwrap();
    let will = super::offline(&topic, DEVICE, &facts, &identity);
    w.input(Input::Message {
        topic: topic.clone(),
        payload: will,
    });
    assert_eq!(w.statuses[before..], [true]);
    // Its own online status, delivered back: nothing more.
    let online = kiln_protocol::fleet::seal_report(
        &kiln_protocol::fleet::Status::V2(kiln_protocol::fleet::StatusV2 {
            device: DEVICE.into(),
            online: true,
            facts: None,
            trust: None,
        }),
        &topic,
        &identity,
    );
    w.input(Input::Message {
        topic: topic.clone(),
        payload: online,
    });
    assert_eq!(w.statuses.len(), before + 1);
}

/// A command signed by the release role reaches its module once; one signed by
/// another key, a replay and one for another device do not, and the sender of a
/// verified one hears what became of it in a reply the device signs.
#[test]
fn commands_reach_their_module_once_and_are_answered() {
    use kiln_protocol::command::{Command, Outcome, To};
    let mut w = World::new();
    w.boot();
    let topic = w.topics.commands(DEVICE);
    assert!(w.broker.subscribed.contains(&topic));
    assert!(w
        .broker
        .subscribed
        .contains(&w.topics.group_commands(GROUP)));
    let command = |w: &World, id: u64, to: To| Command {
        fleet: w.root.fleet.clone(),
        to,
        module: "app".into(),
        topic: "open".into(),
        data: b"1".to_vec(),
        id,
        issued_ms: w.now,
        expires_ms: w.now + 30_000,
        reply: true,
    };
    let send = |w: &mut World, bytes: Vec<u8>| {
        w.input(Input::Message {
            topic: topic.clone(),
            payload: bytes,
        })
    };

    let good = command(&w, 1, To::Device(DEVICE.into()));
    let bytes = good.sign(&[&w.key]).unwrap();
    send(&mut w, bytes);
    assert_eq!(w.commands, vec![good.clone()]);
    w.input(Input::Answer {
        id: 1,
        reply: true,
        outcome: Outcome::Answered {
            status: 0,
            data: b"opened".to_vec(),
        },
    });
    assert_eq!(w.replies.len(), 1);
    assert_eq!(
        (w.replies[0].id, &w.replies[0].outcome),
        (
            1,
            &Outcome::Answered {
                status: 0,
                data: b"opened".to_vec()
            }
        )
    );

    // A replay: refused, and the sender told.
    let bytes = good.sign(&[&w.key]).unwrap();
    send(&mut w, bytes);
    assert_eq!(w.commands.len(), 1);
    assert!(matches!(&w.replies[1].outcome, Outcome::Refused(why) if why.contains("replay")));
    // Another device's, and one by a key the root does not name: never delivered; the
    // forged one is not answered (its sender is nobody the device knows).
    let other = command(&w, 2, To::Device("other".into()));
    let bytes = other.sign(&[&w.key]).unwrap();
    send(&mut w, bytes);
    let forged = command(&w, 3, To::Device(DEVICE.into()));
    let bytes = forged.sign(&[&w.rogue]).unwrap();
    send(&mut w, bytes);
    assert_eq!(w.commands.len(), 1);
    assert_eq!(w.replies.len(), 3);
    assert!(
        w.events.iter().any(|e| e.contains("command refused")),
        "{:?}",
        w.events
    );
    // The group's: delivered.
    let group = command(&w, 4, To::Group(GROUP.into()));
    let bytes = group.sign(&[&w.key]).unwrap();
    send(&mut w, bytes);
    assert_eq!(w.commands.len(), 2);
}

proptest! {
    /// The waits grow, never pass a minute and a quarter, and a thousand devices
    /// refused together spread over at least a fifth of the wait.
    #[test]
    fn refused_subscription_waits_grow_are_bounded_and_spread(device in "[a-z0-9-]{1,24}", refusals in 1u32..64) {
        let now = subscribe_retry_ms(refusals, &device);
        let next = subscribe_retry_ms(refusals + 1, &device);
        prop_assert!((2_000..=75_000).contains(&now), "{now}");
        prop_assert!(next >= now || now > 60_000, "{now} then {next}");
        let waits: BTreeSet<u64> = (0..1000)
            .map(|i| subscribe_retry_ms(refusals, &format!("{device}-{i}")))
            .collect();
        let (lo, hi) = (waits.first().unwrap(), waits.last().unwrap());
        prop_assert!(hi - lo >= (lo / 5), "{lo}..{hi}");
    }
}

#[test]
fn transfers_come_from_the_mirror_and_from_the_broker_when_it_fails() {
    let mut w = World::new();
    w.agent.set_mirrors(Mirrors::FromState);
    w.state_mirrors = vec!["http://mirror.test".into()];
    w.mirror = MirrorModel::Serving;
    let push_chunked = |w: &mut World, version| {
        w.apply(&Op::Push {
            group: false,
            module: 0,
            version,
            kind: Kind::Good,
            via: Via::Raw,
            chunk: 0, // 1 KiB chunks: several of them
            downgrade: false,
        })
    };
    push_chunked(&mut w, 1);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(1));
    // Every byte through the mirror: no chunk or chunk list asked of the broker.
    let entry = w.scope_modules[&false]["app"].artifacts[0].clone();
    assert!(entry.full.len > 1024, "several chunks");
    assert_eq!(w.broker_chunks, 0, "{:?}", w.broker.subscribed);
    assert!(w.mirror_bytes > entry.full.len, "the list and every chunk");
    assert!(!w
        .broker
        .subscribed
        .iter()
        .any(|t| t.contains("/artifacts/")));
    assert!(!saw(&w, "fell-back"));

    // A chunk that does not hash as the list says: said once, then the broker.
    w.mirror = MirrorModel::Corrupt;
    push_chunked(&mut w, 2);
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(2));
    let fell: Vec<&String> = w.events.iter().filter(|e| e.contains("mirror")).collect();
    assert_eq!(fell.len(), 1, "{:?}", w.events);
    assert!(
        fell[0].starts_with("app v2: fetching from the broker: the mirror failed for ")
            && fell[0].ends_with(": chunk 1: sha256 mismatch"),
        "{}",
        fell[0]
    );
    assert!(w.broker_chunks > 0, "the rest came from the broker");

    // A dead mirror: the same, the next update does not stall.
    w.mirror = MirrorModel::Dead;
    let before = w.broker_chunks;
    push_chunked(&mut w, 3);
    commit(&mut w);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(3));
    assert!(saw(&w, "Connection refused"), "{:?}", w.events);
    assert!(w.broker_chunks > before);

    // The device's own `mirror = "off"`: the broker only, nothing said.
    w.agent.set_mirrors(Mirrors::Off);
    w.mirror = MirrorModel::Serving;
    let (mirrored, events) = (w.mirror_bytes, w.events.len());
    push_chunked(&mut w, 4);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(4));
    assert_eq!(w.mirror_bytes, mirrored);
    assert!(!w.events[events..].iter().any(|e| e.contains("mirror")));

    // The device's own mirror comes before the one the state names.
    w.agent
        .set_mirrors(Mirrors::Own("http://own.test/kiln".into()));
    push_chunked(&mut w, 5);
    commit(&mut w);
    assert_eq!(committed(&w, "app"), Some(5));
    assert!(w.mirror_bytes > mirrored);
    let asked: Vec<&String> = w.mirror_urls.iter().collect();
    assert_eq!(asked, ["http://mirror.test", "http://own.test/kiln"]);
}
