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
//! {prefix}/artifacts/{sha256}/{n}     retained  Chunk n of an artifact
//! {prefix}/uploads/{sha256}           retained  Upload: an artifact's chunks are going up
//! ```

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, SecretKey, TrustedKeys};

pub const DEFAULT_PREFIX: &str = "kiln/v1";

/// Artifacts travel in chunks of this size unless the pusher says otherwise; with
/// the per-chunk hashes in the desired state a 1 MiB artifact costs 512 bytes of hashes.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;

/// Largest artifact a device accepts over MQTT, and the most chunks.
pub const MAX_ARTIFACT: u64 = 64 * 1024 * 1024;
pub const MAX_CHUNKS: u32 = 4096;

/// Largest chunk a pusher may cut (`kiln push --chunk-size`), and so the largest chunk
/// message a device takes: the data plus its small postcard header.
pub const MAX_CHUNK: u32 = 1024 * 1024;
const CHUNK_OVERHEAD: usize = 64;

/// Largest signed desired state a device reads: room for the chunk hashes of several
/// artifacts of the largest size, and far below any broker's message limit.
pub const MAX_DESIRED: usize = 1024 * 1024;

/// Limits a desired state may set, checked like the ones in `kilnd.toml`.
pub const MAX_TICK_MS: u64 = 24 * 3600 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 3600 * 1000;

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

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
    pub artifact: ArtifactRef,
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

/// Where an artifact's bytes are: `chunks.len()` retained chunks of `chunk_size`
/// bytes (the last may be shorter), each with its own sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub sha256: [u8; 32],
    pub len: u64,
    pub chunk_size: u32,
    pub chunks: Vec<[u8; 32]>,
}

impl ArtifactRef {
    /// Describes `bytes` split into `chunk_size` pieces.
    pub fn of(bytes: &[u8], chunk_size: u32) -> Self {
        use sha2::{Digest, Sha256};
        Self {
            sha256: Sha256::digest(bytes).into(),
            len: bytes.len() as u64,
            chunk_size,
            chunks: bytes
                .chunks(chunk_size.max(1) as usize)
                .map(|c| Sha256::digest(c).into())
                .collect(),
        }
    }

    /// Checks the description itself is sane before the device acts on it.
    pub fn check(&self) -> Result<(), String> {
        let n = self.chunks.len() as u64;
        if self.len == 0 || self.len > MAX_ARTIFACT {
            return Err(format!(
                "artifact of {} bytes (limit {MAX_ARTIFACT})",
                self.len
            ));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK || n > u64::from(MAX_CHUNKS) {
            return Err(format!("{n} chunks of {} bytes", self.chunk_size));
        }
        if n != self.len.div_ceil(u64::from(self.chunk_size)) {
            return Err(format!(
                "{n} chunk hashes for {} bytes in chunks of {}",
                self.len, self.chunk_size
            ));
        }
        Ok(())
    }

    /// Expected length of chunk `n`.
    pub fn chunk_len(&self, n: u32) -> u64 {
        let start = u64::from(n) * u64::from(self.chunk_size);
        self.len
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }
}

/// The desired state as it travels: the postcard body and a signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedDesired {
    V1 {
        body: Vec<u8>,
        key_id: [u8; 8],
        signature: Vec<u8>,
    },
}

const DESIRED_CONTEXT: &[u8] = b"kiln desired v1\0";

impl SignedDesired {
    pub fn sign(desired: &Desired, key: &SecretKey) -> Vec<u8> {
        let body = postcard::to_stdvec(desired).unwrap_or_default();
        let signature = key.sign(&[DESIRED_CONTEXT, &body].concat()).to_vec();
        postcard::to_stdvec(&SignedDesired::V1 {
            body,
            key_id: key.public().id().0,
            signature,
        })
        .unwrap_or_default()
    }

    /// Decodes and verifies a retained desired-state payload.
    pub fn open(bytes: &[u8], trust: &TrustedKeys) -> Result<Desired, String> {
        let SignedDesired::V1 {
            body,
            key_id,
            signature,
        } = postcard::from_bytes(bytes).map_err(|e| format!("malformed desired state: {e}"))?;
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
        let SignedDesired::V1 { body, .. } =
            postcard::from_bytes(bytes).map_err(|e| format!("malformed desired state: {e}"))?;
        postcard::from_bytes(&body).map_err(|e| format!("malformed desired state body: {e}"))
    }
}

/// One retained chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    V1 {
        sha256: [u8; 32],
        index: u32,
        data: Vec<u8>,
    },
}

impl Chunk {
    /// Decodes a chunk of `artifact` (size bounded before decoding): its index and data.
    /// The caller checks the data against the chunk's own hash.
    pub fn open(payload: &[u8], artifact: &ArtifactRef) -> Result<(u32, Vec<u8>), String> {
        let limit = artifact.chunk_size as usize + CHUNK_OVERHEAD;
        if payload.len() > limit {
            return Err(format!("{} bytes (limit {limit})", payload.len()));
        }
        match postcard::from_bytes(payload).map_err(|e| format!("malformed: {e}"))? {
            Chunk::V1 {
                sha256,
                index,
                data,
            } if sha256 == artifact.sha256 => Ok((index, data)),
            Chunk::V1 { sha256, index, .. } => Err(format!(
                "carries chunk {index} of {}, not this one",
                hex::encode(&sha256[..6])
            )),
        }
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
    Downloading { have: u32, total: u32 },
    Staged,
    Verified,
    Activated,
    Committed,
    RolledBack { reason: String },
    Rejected { reason: String },
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
                artifact: ArtifactRef::of(&[7u8; 100_000], DEFAULT_CHUNK),
                config: b"alpha=0.3".to_vec(),
                limits: ModuleLimits::default(),
                allow_downgrade: false,
                health_window_ms: 5000,
            }],
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
    fn artifact_refs_describe_their_chunks() {
        let r = ArtifactRef::of(&[1u8; 150_000], DEFAULT_CHUNK);
        assert_eq!(r.chunks.len(), 3);
        assert_eq!(r.chunk_len(2), 150_000 - 2 * 65_536);
        assert_eq!(r.check(), Ok(()));
        let mut bad = r.clone();
        bad.chunks.pop();
        assert!(bad.check().is_err());
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
