//! Fleet updates over MQTT: the topics, the signed desired state, artifact chunks, and
//! what a device reports. Every top-level message is a version-tagged postcard enum.
//!
//! ```text
//! {prefix}/devices/{id}/status        retained  Status: birth (online + facts), LWT offline
//! {prefix}/devices/{id}/desired       retained  SignedDesired for this device
//! {prefix}/groups/{group}/desired     retained  SignedDesired for a group
//! {prefix}/devices/{id}/reported      retained  Reported: what runs, per module
//! {prefix}/devices/{id}/events                  Event: staged, verified, activated, ...
//! {prefix}/devices/{id}/telemetry               telemetry batches
//! {prefix}/artifacts/{sha256}/{n}     retained  Chunk n of a transfer (see `transfer`)
//! {prefix}/artifacts/{sha256}/list    retained  The chunk list of a transfer
//! {prefix}/uploads/{sha256}           retained  Upload: a transfer's chunks are going up
//! ```

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, SecretKey, TrustedKeys};
use crate::transfer::{Codec, Transfer, MAX_ARTIFACT};

pub const DEFAULT_PREFIX: &str = "kiln/v1";

/// Largest signed desired state a device reads. Its size does not grow with the
/// artifacts' (their chunk hashes are in chunk lists of their own), so this is room
/// for many modules and targets, and stays below AWS IoT Core's 128 KB per publish.
pub const MAX_DESIRED: usize = 120 * 1024;

/// Limits a desired state may set, checked like the ones in `kilnd.toml`.
pub const MAX_TICK_MS: u64 = 24 * 3600 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 3600 * 1000;

pub use crate::transfer::sha256;

/// Where the broker is: `mqtt://host[:port]` (1883 by default) or, over TLS,
/// `mqtts://host[:port]` (8883 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

pub fn parse_broker(url: &str) -> Result<BrokerUrl, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true)
    } else if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (rest, false)
    } else {
        return Err(format!(
            "broker `{url}` must look like mqtt://host[:port] or mqtts://host[:port]"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| format!("broker `{url}`: port `{p}` is not a number"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("broker `{url}` names no host"));
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Builds every topic; nothing else formats topic strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn status(&self, device: &str) -> String {
        format!("{}/devices/{device}/status", self.prefix)
    }
    pub fn desired(&self, device: &str) -> String {
        format!("{}/devices/{device}/desired", self.prefix)
    }
    pub fn group_desired(&self, group: &str) -> String {
        format!("{}/groups/{group}/desired", self.prefix)
    }
    pub fn reported(&self, device: &str) -> String {
        format!("{}/devices/{device}/reported", self.prefix)
    }
    pub fn events(&self, device: &str) -> String {
        format!("{}/devices/{device}/events", self.prefix)
    }
    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }
    pub fn chunk(&self, sha256: &[u8; 32], n: u32) -> String {
        format!("{}/artifacts/{}/{n}", self.prefix, hex::encode(sha256))
    }
    /// Every chunk of one artifact.
    pub fn chunks(&self, sha256: &[u8; 32]) -> String {
        format!("{}/artifacts/{}/+", self.prefix, hex::encode(sha256))
    }
    /// Every device's topic of one kind (`status`, `reported`, `events`, ...).
    pub fn all_devices(&self, kind: &str) -> String {
        format!("{}/devices/+/{kind}", self.prefix)
    }
    /// Every group's desired state.
    pub fn all_groups_desired(&self) -> String {
        format!("{}/groups/+/desired", self.prefix)
    }
    /// All chunks of all artifacts.
    pub fn all_artifacts(&self) -> String {
        format!("{}/artifacts/#", self.prefix)
    }
    /// The chunk list of one transfer.
    pub fn list(&self, sha256: &[u8; 32]) -> String {
        format!("{}/artifacts/{}/list", self.prefix, hex::encode(sha256))
    }
    /// The upload marker of one artifact.
    pub fn upload(&self, sha256: &[u8; 32]) -> String {
        format!("{}/uploads/{}", self.prefix, hex::encode(sha256))
    }
    /// Every upload marker.
    pub fn all_uploads(&self) -> String {
        format!("{}/uploads/+", self.prefix)
    }

    /// `(device, kind)` of a device topic.
    pub fn parse_device<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/devices/")?;
        rest.split_once('/')
    }

    /// `(sha256, n)` of a chunk topic.
    pub fn parse_chunk(&self, topic: &str) -> Option<([u8; 32], u32)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/artifacts/")?;
        let (sha, n) = rest.split_once('/')?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some((out, n.parse().ok()?))
    }

    /// The transfer a chunk or chunk-list topic belongs to.
    pub fn parse_artifact(&self, topic: &str) -> Option<[u8; 32]> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/artifacts/")?;
        let (sha, part) = rest.split_once('/')?;
        if part != "list" && part.parse::<u32>().is_err() {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some(out)
    }

    /// The sha256 of an upload marker's topic.
    pub fn parse_upload(&self, topic: &str) -> Option<[u8; 32]> {
        let sha = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/uploads/")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some(out)
    }
}

/// What a device or a group should run. Signed by a fleet key the device trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub scope: Scope,
    /// Increases with every change the pusher makes; a device ignores an older one.
    pub serial: u64,
    pub modules: Vec<DesiredModule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    Device(String),
    Group(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModule {
    /// Must equal the artifact manifest's name.
    pub name: String,
    /// Must equal the artifact manifest's version.
    pub version: u64,
    /// The release: an artifact per target profile. A device takes the one for its
    /// own triple and CPU features.
    pub artifacts: Vec<TargetArtifact>,
    /// Bytes the module reads with `kiln.config_read`.
    pub config: Vec<u8>,
    pub limits: ModuleLimits,
    /// A version lower than the committed one is refused unless this is set.
    pub allow_downgrade: bool,
    /// How long the new version must run without a crash before it is committed.
    pub health_window_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLimits {
    pub tick_ms: Option<u64>,
    pub memory_limit_pages: Option<u32>,
    pub fuel_per_call: Option<u64>,
    pub timeout_ms: Option<u64>,
}

impl ModuleLimits {
    /// A tick or watchdog of 0 ms would spin or fire at once.
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self.tick_ms {
            if t == 0 || t > MAX_TICK_MS {
                return Err(format!("tick_ms {t} is outside 1..={MAX_TICK_MS}"));
            }
        }
        if let Some(t) = self.timeout_ms {
            if t == 0 || t > MAX_TIMEOUT_MS {
                return Err(format!("timeout_ms {t} is outside 1..={MAX_TIMEOUT_MS}"));
            }
        }
        if self.memory_limit_pages == Some(0) {
            return Err("memory_limit_pages is 0".into());
        }
        if self.fuel_per_call == Some(0) {
            return Err("fuel_per_call is 0".into());
        }
        Ok(())
    }
}

/// One target's artifact of a release, and the ways a device can fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetArtifact {
    /// The manifest's target: the device checks the artifact's own manifest again.
    pub triple: String,
    pub cpu_features: Vec<String>,
    /// sha256 and length of the artifact itself, whatever travels.
    pub sha256: [u8; 32],
    pub len: u64,
    /// The whole artifact (compressed or not).
    pub full: Transfer,
    /// Patches from versions devices hold (committed), by the base artifact's sha256.
    pub patches: Vec<Patch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub base: [u8; 32],
    pub transfer: Transfer,
}

/// Most patches a target's entry may carry.
pub const MAX_PATCHES: usize = 8;

impl TargetArtifact {
    /// The entry of `artifact` (built for `triple`) sent whole, without patches, and
    /// its transfer to publish.
    pub fn whole(
        artifact: &[u8],
        triple: &str,
        cpu_features: Vec<String>,
        codec: Codec,
        chunk_size: u32,
    ) -> (Self, crate::transfer::Prepared) {
        let full = Transfer::full(artifact, codec, chunk_size);
        let entry = Self {
            triple: triple.into(),
            cpu_features,
            sha256: sha256(artifact),
            len: artifact.len() as u64,
            full: full.transfer.clone(),
            patches: Vec::new(),
        };
        (entry, full)
    }

    /// Checks the description itself is sane before the device acts on it.
    pub fn check(&self) -> Result<(), String> {
        if self.len == 0 || self.len > MAX_ARTIFACT {
            return Err(format!(
                "artifact of {} bytes (limit {MAX_ARTIFACT})",
                self.len
            ));
        }
        if self.patches.len() > MAX_PATCHES {
            return Err(format!(
                "{} patches (limit {MAX_PATCHES})",
                self.patches.len()
            ));
        }
        if self.full.codec == Codec::ZstdPatch {
            return Err("the full transfer is a patch".into());
        }
        self.full.check(self.len)?;
        for p in &self.patches {
            if p.transfer.codec != Codec::ZstdPatch {
                return Err(format!(
                    "a {} transfer listed as a patch",
                    p.transfer.codec.name()
                ));
            }
            p.transfer.check(self.len)?;
        }
        Ok(())
    }

    /// Every way to fetch the artifact: whole, then each patch.
    pub fn transfers(&self) -> impl Iterator<Item = &Transfer> {
        std::iter::once(&self.full).chain(self.patches.iter().map(|p| &p.transfer))
    }

    /// The transfer to fetch: a patch from `base` (the committed artifact) if there is
    /// one and patches are not `excluded`, else the full artifact.
    pub fn transfer_from(
        &self,
        base: Option<[u8; 32]>,
        excluded: bool,
    ) -> (&Transfer, Option<[u8; 32]>) {
        match self.patches.iter().find(|p| Some(p.base) == base) {
            Some(p) if !excluded => (&p.transfer, Some(p.base)),
            _ => (&self.full, None),
        }
    }
}

impl DesiredModule {
    /// The release's artifact for a device of `triple` with `cpu_features`, or why it
    /// has none.
    pub fn artifact_for(
        &self,
        triple: &str,
        cpu_features: &[String],
    ) -> Result<&TargetArtifact, String> {
        let same = |a: &&TargetArtifact| crate::compat::same_target(&a.triple, triple);
        let fits = |a: &&TargetArtifact| a.cpu_features.iter().all(|f| cpu_features.contains(f));
        // The most specific artifact this device can run: the one needing the most
        // features it has.
        let best = self
            .artifacts
            .iter()
            .rev() // on a tie, the first
            .filter(same)
            .filter(fits)
            .max_by_key(|a| a.cpu_features.len());
        best.ok_or_else(|| {
            let has: Vec<String> = self
                .artifacts
                .iter()
                .map(|a| match a.cpu_features.is_empty() {
                    true => a.triple.clone(),
                    false => format!("{}+{}", a.triple, a.cpu_features.join("+")),
                })
                .collect();
            format!(
                "release {} v{} has no artifact for this {triple} device (it has: {})",
                self.name,
                self.version,
                if has.is_empty() {
                    "none".into()
                } else {
                    has.join(", ")
                }
            )
        })
    }
}

/// The desired state as it travels: the postcard body and a signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedDesired {
    /// The format of kiln 0.1 (one artifact per module, chunk hashes inline): read
    /// only to say that it is no longer read.
    V1 {
        body: Vec<u8>,
        key_id: [u8; 8],
        signature: Vec<u8>,
    },
    V2 {
        body: Vec<u8>,
        key_id: [u8; 8],
        signature: Vec<u8>,
    },
}

const DESIRED_CONTEXT: &[u8] = b"kiln desired v2\0";

/// The parts of a current-format desired state, not checked yet.
struct Sealed {
    body: Vec<u8>,
    key_id: [u8; 8],
    signature: Vec<u8>,
}

fn unwrap_v2(bytes: &[u8]) -> Result<Sealed, String> {
    match postcard::from_bytes(bytes).map_err(|e| format!("malformed desired state: {e}"))? {
        SignedDesired::V2 {
            body,
            key_id,
            signature,
        } => Ok(Sealed {
            body,
            key_id,
            signature,
        }),
        SignedDesired::V1 { .. } => Err(
            "desired state in kiln 0.1's format (one artifact per module), which this kilnd no longer reads; push the release again with a current kiln".into(),
        ),
    }
}

impl SignedDesired {
    pub fn sign(desired: &Desired, key: &SecretKey) -> Vec<u8> {
        let body = postcard::to_stdvec(desired).unwrap_or_default();
        let signature = key.sign(&[DESIRED_CONTEXT, &body].concat()).to_vec();
        postcard::to_stdvec(&SignedDesired::V2 {
            body,
            key_id: key.public().id().0,
            signature,
        })
        .unwrap_or_default()
    }

    /// Decodes and verifies a retained desired-state payload.
    pub fn open(bytes: &[u8], trust: &TrustedKeys) -> Result<Desired, String> {
        let Sealed {
            body,
            key_id,
            signature,
        } = unwrap_v2(bytes)?;
        let key = trust
            .find(KeyId(key_id))
            .ok_or_else(|| format!("desired state signed by untrusted key {}", KeyId(key_id)))?;
        let signature: [u8; 64] = signature
            .as_slice()
            .try_into()
            .map_err(|_| "desired state has a malformed signature".to_string())?;
        if !key.verify_strict(&[DESIRED_CONTEXT, &body].concat(), &signature) {
            return Err(format!(
                "desired state signature by key {} does not verify",
                KeyId(key_id)
            ));
        }
        postcard::from_bytes(&body).map_err(|e| format!("malformed desired state body: {e}"))
    }
}

impl SignedDesired {
    /// The body without checking the signature: for tools that only look (which
    /// artifacts are still referenced), never for acting on it.
    pub fn peek(bytes: &[u8]) -> Result<Desired, String> {
        let body = unwrap_v2(bytes)?.body;
        postcard::from_bytes(&body).map_err(|e| format!("malformed desired state body: {e}"))
    }
}

/// Retained on `status`: the birth message, or the LWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    V1(StatusV1),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV1 {
    pub device: String,
    pub online: bool,
    pub facts: Option<DeviceFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub triple: String,
    pub cpu_features: Vec<String>,
    pub kilnd: String,
    pub wasmer: String,
    pub kiln_abi: u32,
    pub groups: Vec<String>,
    pub boot_id: u64,
}

/// Retained on `reported`: what actually runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reported {
    V1(ReportedV1),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedV1 {
    /// Serial of the last desired state the device acted on.
    pub serial: u64,
    pub modules: Vec<ModuleReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleReport {
    pub name: String,
    /// The committed version, or while `state` is `Updating`, the version on trial.
    pub version: u64,
    pub sha256: [u8; 32],
    pub state: ModuleState,
    /// The newest event for this module, in words.
    pub last_event: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleState {
    Running,
    Updating,
    Failed,
}

/// On `events`: every step of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    V1(EventV1),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventV1 {
    pub at_ms: u64,
    pub module: String,
    pub version: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Downloading {
        have: u32,
        total: u32,
    },
    Staged,
    Verified,
    Activated,
    Committed,
    RolledBack {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    /// A patch did not give the artifact; the device fetches it whole.
    FellBack {
        reason: String,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Downloading { .. } => "downloading",
            EventKind::Staged => "staged",
            EventKind::Verified => "verified",
            EventKind::Activated => "activated",
            EventKind::Committed => "committed",
            EventKind::RolledBack { .. } => "rolled-back",
            EventKind::Rejected { .. } => "rejected",
            EventKind::FellBack { .. } => "fell-back",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventKind::Downloading { have, total } => {
                write!(f, "downloading {have}/{total} chunks")
            }
            EventKind::RolledBack { reason } => write!(f, "rolled back: {reason}"),
            EventKind::Rejected { reason } => write!(f, "rejected: {reason}"),
            EventKind::FellBack { reason } => {
                write!(f, "fetching the full artifact: {reason}")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// Retained on `uploads/{sha256}` before the first chunk of an artifact goes up, so
/// that `kiln gc` leaves chunks alone that no desired state references *yet*: the
/// desired state is published only after the last chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upload {
    V1 {
        sha256: [u8; 32],
        /// When the upload started, by the uploader's clock (Unix milliseconds).
        started_ms: u64,
        /// How many chunks the artifact has.
        chunks: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired {
            scope: Scope::Device("dev-01".into()),
            serial: 3,
            modules: vec![DesiredModule {
                name: "app".into(),
                version: 2,
                artifacts: vec![target("aarch64-unknown-linux-gnu", &["neon"], 7)],
                config: b"alpha=0.3".to_vec(),
                limits: ModuleLimits::default(),
                allow_downgrade: false,
                health_window_ms: 5000,
            }],
        }
    }

    fn target(triple: &str, features: &[&str], seed: u8) -> TargetArtifact {
        let bytes = [seed; 100_000];
        let full = Transfer::full(&bytes, Codec::Zstd, crate::transfer::DEFAULT_CHUNK);
        TargetArtifact {
            triple: triple.into(),
            cpu_features: features.iter().map(|f| f.to_string()).collect(),
            sha256: sha256(&bytes),
            len: bytes.len() as u64,
            full: full.transfer,
            patches: Vec::new(),
        }
    }

    #[test]
    fn signed_desired_state_opens_only_with_a_trusted_untouched_signature() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let trust = TrustedKeys::new(vec![key.public()]);
        let bytes = SignedDesired::sign(&desired(), &key);
        assert_eq!(SignedDesired::open(&bytes, &trust), Ok(desired()));

        let foreign = SignedDesired::sign(&desired(), &other);
        assert!(SignedDesired::open(&foreign, &trust)
            .unwrap_err()
            .contains("untrusted key"));
        let mut tampered = bytes.clone();
        let at = tampered.len() - 70;
        tampered[at] ^= 1;
        assert!(SignedDesired::open(&tampered, &trust).is_err());
        assert!(SignedDesired::open(b"\x07garbage", &trust)
            .unwrap_err()
            .starts_with("malformed desired state"));
    }

    #[test]
    fn a_device_takes_the_most_specific_artifact_it_can_run_or_says_why_none() {
        let mut m = desired().modules.remove(0);
        m.artifacts = vec![
            target("x86_64-unknown-linux-gnu", &[], 1),
            target("x86_64-unknown-linux-gnu", &["avx2", "bmi2"], 2),
            target("riscv64gc-unknown-linux-gnu", &[], 3),
        ];
        let x86 = |features: &[&str]| {
            let f: Vec<String> = features.iter().map(|s| s.to_string()).collect();
            m.artifact_for("x86_64-unknown-linux-musl", &f)
                .map(|a| a.cpu_features.len())
        };
        assert_eq!(x86(&["avx2", "bmi2", "sse4.2"]), Ok(2));
        assert_eq!(x86(&["avx2"]), Ok(0));
        let why = m
            .artifact_for("aarch64-unknown-linux-gnu", &[])
            .unwrap_err();
        assert_eq!(
            why,
            "release app v2 has no artifact for this aarch64-unknown-linux-gnu device (it has: x86_64-unknown-linux-gnu, x86_64-unknown-linux-gnu+avx2+bmi2, riscv64gc-unknown-linux-gnu)"
        );
        let t = &m.artifacts[0];
        assert_eq!(t.check(), Ok(()));
        let patch = Patch {
            base: [9; 32],
            transfer: Transfer::patch(&[1; 90_000], &[1; 100_000], 4096).transfer,
        };
        let mut t = t.clone();
        t.patches.push(patch);
        assert_eq!(t.check(), Ok(()));
        assert_eq!(t.transfer_from(Some([9; 32]), false).1, Some([9; 32]));
        assert_eq!(t.transfer_from(Some([9; 32]), true).1, None);
        assert_eq!(t.transfer_from(Some([8; 32]), false).0, &t.full);
        let mut bad = t.clone();
        bad.patches[0].transfer.codec = Codec::Zstd;
        assert!(bad.check().is_err());
        let mut huge = t.clone();
        huge.len = MAX_ARTIFACT + 1;
        assert!(huge.check().is_err());
    }

    #[test]
    fn a_desired_state_stays_small_whatever_the_artifact_size() {
        // 120 MB of artifact, raw: still a few hundred bytes of desired state.
        let mut d = desired();
        let t = &mut d.modules[0].artifacts[0];
        t.len = 120 << 20;
        t.full = Transfer {
            codec: Codec::Raw,
            sha256: [3; 32],
            len: 120 << 20,
            chunk_size: 64 << 10,
            list: [4; 32],
        };
        assert_eq!(t.check(), Ok(()));
        let key = SecretKey::generate().unwrap();
        assert!(SignedDesired::sign(&d, &key).len() < 512);
    }

    #[test]
    fn a_desired_state_of_kiln_0_1_is_refused_by_name() {
        let old = postcard::to_stdvec(&SignedDesired::V1 {
            body: vec![1, 2, 3],
            key_id: [0; 8],
            signature: vec![0; 64],
        })
        .unwrap();
        let trust = TrustedKeys::new(vec![]);
        assert!(SignedDesired::open(&old, &trust)
            .unwrap_err()
            .contains("kiln 0.1's format"));
    }

    #[test]
    fn broker_urls_name_host_port_and_tls() {
        let b = parse_broker("mqtts://broker.lan").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("broker.lan", 8883, true));
        let b = parse_broker("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
        assert!(parse_broker("http://x").is_err());
        assert!(parse_broker("mqtt://:1883").is_err());
    }

    #[test]
    fn topics_are_built_and_parsed_in_one_place() {
        let t = Topics::new("kiln/v1/");
        assert_eq!(t.status("dev-01"), "kiln/v1/devices/dev-01/status");
        let sha = [0xab; 32];
        let chunk = t.chunk(&sha, 7);
        assert_eq!(t.parse_chunk(&chunk), Some((sha, 7)));
        assert_eq!(
            t.parse_device("kiln/v1/devices/d/events"),
            Some(("d", "events"))
        );
        assert_eq!(t.parse_chunk("other/artifacts/zz/1"), None);
        let upload = t.upload(&sha);
        assert_eq!(upload, format!("kiln/v1/uploads/{}", hex::encode(sha)));
        assert_eq!(t.parse_upload(&upload), Some(sha));
        assert_eq!(t.parse_upload(&chunk), None);
        assert_eq!(t.parse_upload("kiln/v1/uploads/abcd"), None);
        assert_eq!(t.parse_artifact(&t.list(&sha)), Some(sha));
        assert_eq!(t.parse_artifact(&chunk), Some(sha));
        assert_eq!(t.parse_chunk(&t.list(&sha)), None);
        assert_eq!(
            t.parse_artifact(&format!("kiln/v1/artifacts/{}/x", hex::encode(sha))),
            None
        );
        assert_eq!(t.all_uploads(), "kiln/v1/uploads/+");
    }

    /// Upload markers written by this release; later releases must keep decoding them.
    #[test]
    fn upload_v1_fixture_still_decodes() {
        let marker = Upload::V1 {
            sha256: [0xab; 32],
            started_ms: 1_700_000_000_000,
            chunks: 3,
        };
        let bytes = postcard::to_stdvec(&marker).unwrap();
        let mut fixture = vec![0];
        fixture.extend([0xab; 32]);
        fixture.extend([128, 208, 149, 255, 188, 49, 3]);
        assert_eq!(bytes, fixture);
        assert_eq!(postcard::from_bytes::<Upload>(&fixture).unwrap(), marker);
    }
}
