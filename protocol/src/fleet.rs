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
//! {prefix}/roots/{version}            retained  SignedRoot: the fleet's root documents
//! {prefix}/registry                   retained  SignedRegistry: enrolled device keys
//! ```
//!
//! What a device publishes (status, reported, events) is signed with its own identity
//! key ([`seal_report`]); the fleet tool checks the key against the registry.

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::transfer::{Codec, Transfer, MAX_ARTIFACT};
use crate::trust::{sign_all, OpenError, Root, Sig};

pub const DEFAULT_PREFIX: &str = "kiln/v1";

/// Largest signed desired state a device reads. Its size does not grow with the
/// artifacts' (their chunk hashes are in chunk lists of their own), so this is room
/// for many modules and targets, and stays below AWS IoT Core's 128 KB per publish.
pub const MAX_DESIRED: usize = 120 * 1024;

/// Limits a desired state may set, checked like the ones in `kilnd.toml`.
pub const MAX_TICK_MS: u64 = 24 * 3600 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 3600 * 1000;

/// How far ahead of time a serial may be. kiln takes a new state's serial from the
/// clock (Unix milliseconds, or one above the last when pushes come faster), so an
/// honest serial is never a day ahead of its issue time, and an issue time is never a
/// day ahead of a device's clock. A serial beyond that is a fast-forward (a leaked
/// key signing `u64::MAX` so that no later state is ever taken), and both sides refuse
/// it: the device does not apply it, kiln does not build on it.
pub const MAX_SERIAL_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// A clock before this (2024-01-01) has not been set yet (a board without a
/// real-time clock, before NTP): the issue-time bound waits for a set clock.
pub const PLAUSIBLE_CLOCK_MS: u64 = 1_704_067_200_000;

/// Largest status, reported state or event a device sends; the fleet tool skips (and
/// says so) anything larger on a device's topics instead of decoding it.
pub const MAX_REPORT: usize = 64 * 1024;

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

    pub fn prefix(&self) -> &str {
        &self.prefix
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
    /// The record of the group's rollout (see [`crate::rollout`]).
    pub fn rollout(&self, group: &str) -> String {
        format!("{}/groups/{group}/rollout", self.prefix)
    }
    pub fn all_rollouts(&self) -> String {
        format!("{}/groups/+/rollout", self.prefix)
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
    pub fn root(&self, version: u64) -> String {
        format!("{}/roots/{version}", self.prefix)
    }

    pub fn all_roots(&self) -> String {
        format!("{}/roots/+", self.prefix)
    }

    pub fn parse_root(&self, topic: &str) -> Option<u64> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/roots/")?
            .parse()
            .ok()
    }

    pub fn registry(&self) -> String {
        format!("{}/registry", self.prefix)
    }

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

/// What a device or a group should run. Signed by a threshold of the release keys of
/// the fleet's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The fleet it is for (the root's fleet id): a state signed for staging is
    /// refused in production even where the two share a key.
    pub fleet: String,
    pub scope: Scope,
    /// Increases with every change the pusher makes; a device ignores an older one,
    /// and refuses one of an equal serial with another body.
    pub serial: u64,
    /// When it was signed, and until when a device takes it (Unix milliseconds). A
    /// device refuses an expired state, and says so when the states it holds grow old:
    /// a broker that withholds newer states cannot do so unnoticed.
    pub issued_ms: u64,
    pub expires_ms: u64,
    pub modules: Vec<DesiredModule>,
}

impl Desired {
    /// Why a device must not take it at `now_ms`, if it must not.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), String> {
        if now_ms >= self.expires_ms {
            return Err(format!(
                "desired state serial {} expired at {} (issued {})",
                self.serial,
                utc(self.expires_ms),
                utc(self.issued_ms)
            ));
        }
        self.check_bounds(now_ms)
    }
}

impl Desired {
    /// Whether its serial and issue time are within [`MAX_SERIAL_AHEAD_MS`]: the serial
    /// of its issue time, the issue time of `now_ms` (once the clock is set).
    pub fn check_bounds(&self, now_ms: u64) -> Result<(), String> {
        if self.serial > self.issued_ms.saturating_add(MAX_SERIAL_AHEAD_MS) {
            return Err(format!(
                "desired state serial {} is more than a day ahead of its issue time {} (a fast-forward)",
                self.serial,
                utc(self.issued_ms)
            ));
        }
        if now_ms >= PLAUSIBLE_CLOCK_MS
            && self.issued_ms > now_ms.saturating_add(MAX_SERIAL_AHEAD_MS)
        {
            return Err(format!(
                "desired state serial {} was issued {}, more than a day after this clock's {} (a fast-forward, or a wrong clock)",
                self.serial,
                utc(self.issued_ms),
                utc(now_ms)
            ));
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC only) as Unix milliseconds.
pub fn parse_utc(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a UTC time like 2026-11-30T08:00:00Z");
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        text[r].parse::<u32>().map(i64::from).map_err(|_| bad())
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || hh > 23
        || mm > 59
        || ss > 59
    {
        return Err(bad());
    }
    // Days-from-civil (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) as u64;
    if utc(ms) != text {
        return Err(bad()); // a day the month does not have
    }
    Ok(ms)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ`, for messages.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (proleptic Gregorian), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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

/// The desired state as it travels: the postcard body and its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedDesired {
    /// The format of kiln 0.1 (one artifact per module, chunk hashes inline): read
    /// only to say that it is no longer read.
    V1 {
        body: Vec<u8>,
        key_id: [u8; 8],
        signature: Vec<u8>,
    },
    /// kiln 0.2 (one key, no fleet, no expiry): likewise.
    V2 {
        body: Vec<u8>,
        key_id: [u8; 8],
        signature: Vec<u8>,
    },
    /// Signed by a threshold of the root's release keys. A state with no signature yet
    /// is what `kiln push --unsigned` writes for `kiln sign` to sign elsewhere.
    V3 { body: Vec<u8>, signatures: Vec<Sig> },
}

const DESIRED_CONTEXT: &[u8] = b"kiln desired v3\0";

fn unwrap_v3(bytes: &[u8]) -> Result<(Vec<u8>, Vec<Sig>), String> {
    if bytes.len() > MAX_DESIRED {
        return Err(format!(
            "desired state is {} bytes (limit {MAX_DESIRED})",
            bytes.len()
        ));
    }
    match postcard::from_bytes(bytes).map_err(|e| format!("malformed desired state: {e}"))? {
        SignedDesired::V3 { body, signatures } => Ok((body, signatures)),
        SignedDesired::V1 { .. } | SignedDesired::V2 { .. } => Err(
            "desired state in an earlier kiln's format (no fleet, no expiry, one key), which this kilnd no longer reads; push the release again with a current kiln".into(),
        ),
    }
}

impl SignedDesired {
    /// The state signed by each of `keys` (none: unsigned, for `kiln sign`).
    pub fn sign(desired: &Desired, keys: &[&SecretKey]) -> Vec<u8> {
        let body = postcard::to_stdvec(desired).unwrap_or_default();
        let signatures = sign_all(DESIRED_CONTEXT, &body, keys);
        postcard::to_stdvec(&SignedDesired::V3 { body, signatures }).unwrap_or_default()
    }

    /// Adds `key`'s signature to a state (replacing one it already made).
    pub fn add_signature(bytes: &[u8], key: &SecretKey) -> Result<Vec<u8>, String> {
        let (body, mut signatures) = unwrap_v3(bytes)?;
        let id = key.public().id().0;
        signatures.retain(|s| s.key_id != id);
        signatures.extend(sign_all(DESIRED_CONTEXT, &body, &[key]));
        postcard::to_stdvec(&SignedDesired::V3 { body, signatures }).map_err(|e| e.to_string())
    }

    /// The bytes a signature covers, for a signer outside kiln (an HSM, a cloud KMS)
    /// that is handed the message and returns a raw Ed25519 signature.
    pub fn signing_message(bytes: &[u8]) -> Result<Vec<u8>, String> {
        let (body, _) = unwrap_v3(bytes)?;
        Ok([DESIRED_CONTEXT, &body].concat())
    }

    /// Adds a signature made outside kiln by `key`, after checking it.
    pub fn add_raw_signature(
        bytes: &[u8],
        key: &PublicKey,
        signature: &[u8; 64],
    ) -> Result<Vec<u8>, String> {
        let (body, mut signatures) = unwrap_v3(bytes)?;
        if !key.verify_strict(&[DESIRED_CONTEXT, &body].concat(), signature) {
            return Err(format!(
                "the signature does not verify with key {}",
                key.id()
            ));
        }
        let id = key.id().0;
        signatures.retain(|s| s.key_id != id);
        signatures.push(Sig {
            key_id: id,
            signature: signature.to_vec(),
        });
        postcard::to_stdvec(&SignedDesired::V3 { body, signatures }).map_err(|e| e.to_string())
    }

    /// Who signed it (not checked): for showing.
    pub fn signers(bytes: &[u8]) -> Result<Vec<KeyId>, String> {
        Ok(unwrap_v3(bytes)?
            .1
            .iter()
            .map(|s| KeyId(s.key_id))
            .collect())
    }

    /// Decodes and verifies a desired state: a threshold of `root`'s release keys
    /// signed it, and it is for `root`'s fleet. Freshness is the caller's, who has
    /// the clock ([`Desired::check_fresh`]).
    pub fn open(bytes: &[u8], root: &Root) -> Result<Desired, String> {
        Self::verify(bytes, root)
            .map(|(d, _)| d)
            .map_err(|e| e.to_string())
    }

    /// [`SignedDesired::open`] with the release keys whose signatures verified, and
    /// an error that says what kind of failure it is (only an
    /// [`OpenError::Untrusted`] one may open under a newer root).
    pub fn verify(bytes: &[u8], root: &Root) -> Result<(Desired, Vec<KeyId>), OpenError> {
        let (body, signatures) = unwrap_v3(bytes).map_err(OpenError::Malformed)?;
        let (desired, signers): (Desired, _) = crate::trust::open_body(
            &root.release,
            DESIRED_CONTEXT,
            (&body, &signatures),
            &format!("desired state (release keys of root v{})", root.version),
            "desired state",
        )?;
        if desired.fleet != root.fleet {
            return Err(OpenError::WrongFleet(format!(
                "desired state serial {} is for fleet {}, this is fleet {}",
                desired.serial, desired.fleet, root.fleet
            )));
        }
        Ok((desired, signers))
    }

    /// The body without checking the signature: for tools that only look (which
    /// artifacts are still referenced), never for acting on it.
    pub fn peek(bytes: &[u8]) -> Result<Desired, String> {
        let body = unwrap_v3(bytes)?.0;
        postcard::from_bytes(&body).map_err(|e| format!("malformed desired state body: {e}"))
    }
}

/// Retained on `status`: the birth message, or the LWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    V1(StatusV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
    V2(StatusV2),
}

/// kiln 0.2's status, still read (as a [`StatusV2`] without trust).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV1 {
    pub device: String,
    pub online: bool,
    pub facts: Option<DeviceFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV2 {
    pub device: String,
    pub online: bool,
    pub facts: Option<DeviceFacts>,
    pub trust: Option<TrustReport>,
}

impl From<StatusV1> for StatusV2 {
    fn from(s: StatusV1) -> Self {
        Self {
            device: s.device,
            online: s.online,
            facts: s.facts,
            trust: None,
        }
    }
}

/// What a device trusts, and whether it hears fresh desired states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustReport {
    pub fleet: String,
    pub root_version: u64,
    /// The device's identity key: what `kiln enroll` records.
    pub identity: [u8; 32],
    /// Issue time of the oldest desired state it follows (0: it has none yet).
    pub oldest_issued_ms: u64,
    /// Why the device thinks newer desired states are being withheld, if it does.
    pub stale: Option<String>,
}

impl Status {
    /// The status in its current form, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(StatusV2, Option<PublicKey>), String> {
        let (status, signer) = open_report::<Status>(topic, bytes)?;
        let status = match status {
            Status::V1(s) => s.into(),
            Status::V2(s) => s,
            Status::Signed(_) => return Err("status signed twice".into()),
        };
        Ok((status, signer))
    }
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
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
}

impl Reported {
    /// The reported state, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(ReportedV1, Option<PublicKey>), String> {
        match open_report::<Reported>(topic, bytes)? {
            (Reported::V1(r), signer) => Ok((r, signer)),
            (Reported::Signed(_), _) => Err("reported state signed twice".into()),
        }
    }
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
    /// Not running and not restarted: its supervisor gave up, a command exited with a
    /// failure, or (never committed) its first version rolled back. `last_event` says
    /// why; `version` is the version it ran or tried.
    Failed,
    /// Crashed and waiting out its backoff before the next start; `last_event` says how
    /// many crashes and the last reason.
    Restarting,
    /// A WASI command that ran to its end and exited 0.
    Exited,
}

/// On `events`: every step of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    V1(EventV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
}

impl Event {
    /// The event, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(EventV1, Option<PublicKey>), String> {
        match open_report::<Event>(topic, bytes)? {
            (Event::V1(e), signer) => Ok((e, signer)),
            (Event::Signed(_), _) => Err("event signed twice".into()),
        }
    }
}

/// A message signed by the device that sent it: the postcard of the unsigned
/// message, the device's identity key, and its signature over
/// `CONTEXT || topic || 0 || body`. The topic names the device and the kind, so a
/// signed message cannot be replayed as another device's or as another kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSigned {
    pub body: Vec<u8>,
    pub key: [u8; 32],
    pub signature: Vec<u8>,
}

/// A message a device signs: its enum has a `Signed` variant.
pub trait DeviceMessage: Serialize + serde::de::DeserializeOwned + Sized {
    const CONTEXT: &'static [u8];
    fn wrap(signed: DeviceSigned) -> Self;
    fn as_signed(&self) -> Option<&DeviceSigned>;
}

impl DeviceMessage for Status {
    const CONTEXT: &'static [u8] = b"kiln status v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Status::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Status::Signed(s) => Some(s),
            _ => None,
        }
    }
}

impl DeviceMessage for Reported {
    const CONTEXT: &'static [u8] = b"kiln reported v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Reported::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Reported::Signed(s) => Some(s),
            _ => None,
        }
    }
}

impl DeviceMessage for Event {
    const CONTEXT: &'static [u8] = b"kiln event v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Event::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Event::Signed(s) => Some(s),
            _ => None,
        }
    }
}

fn report_message(context: &[u8], topic: &str, body: &[u8]) -> Vec<u8> {
    [context, topic.as_bytes(), &[0], body].concat()
}

/// `message` for `topic`, signed with the device's identity `key`.
pub fn seal_report<T: DeviceMessage>(message: &T, topic: &str, key: &SecretKey) -> Vec<u8> {
    let body = postcard::to_stdvec(message).unwrap_or_default();
    let signature = key.sign(&report_message(T::CONTEXT, topic, &body)).to_vec();
    postcard::to_stdvec(&T::wrap(DeviceSigned {
        body,
        key: key.public().to_bytes(),
        signature,
    }))
    .unwrap_or_default()
}

/// Decodes a device's message on `topic`: the unsigned message inside, and the key
/// that signed it for that topic (`None`: an unsigned message, from a kilnd before
/// identities). A signature that does not verify is an error, never `None`. Whether
/// the key is that device's is the registry's question.
pub fn open_report<T: DeviceMessage>(
    topic: &str,
    bytes: &[u8],
) -> Result<(T, Option<PublicKey>), String> {
    let message: T = postcard::from_bytes(bytes).map_err(|e| format!("malformed: {e}"))?;
    let Some(signed) = message.as_signed() else {
        return Ok((message, None));
    };
    let key = PublicKey::from_bytes(&signed.key).map_err(|_| "invalid signing key".to_string())?;
    let signature: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| "malformed signature".to_string())?;
    if !key.verify_strict(&report_message(T::CONTEXT, topic, &signed.body), &signature) {
        return Err(format!(
            "signature by {} does not verify for {topic}",
            key.id()
        ));
    }
    let inner: T =
        postcard::from_bytes(&signed.body).map_err(|e| format!("malformed signed body: {e}"))?;
    Ok((inner, Some(key)))
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
    /// The device took a newer root document (a key rotation).
    Trusted {
        reason: String,
    },
    /// The desired states the device holds are older than its bound: newer ones may
    /// be withheld.
    Stale {
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
            EventKind::Trusted { .. } => "trusted",
            EventKind::Stale { .. } => "stale",
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
            EventKind::Trusted { reason } => write!(f, "trusts {reason}"),
            EventKind::Stale { reason } => write!(f, "stale: {reason}"),
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
            fleet: "acme".into(),
            scope: Scope::Device("dev-01".into()),
            serial: 3,
            issued_ms: 1_700_000_000_000,
            expires_ms: 1_700_000_000_000 + 86_400_000,
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

    fn root_for(release: &[&SecretKey], threshold: u32) -> (Root, SecretKey) {
        let root_key = SecretKey::generate().unwrap();
        let keys: Vec<PublicKey> = release.iter().map(|k| k.public()).collect();
        let root = Root {
            fleet: "acme".into(),
            version: 1,
            issued_ms: 0,
            root: crate::trust::Role::new(&[root_key.public()], 1),
            release: crate::trust::Role::new(&keys, threshold),
            registry: None,
            expires_ms: None,
        };
        (root, root_key)
    }

    #[test]
    fn signed_desired_state_opens_only_with_release_signatures_for_its_fleet() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let (root, _) = root_for(&[&key], 1);
        let bytes = SignedDesired::sign(&desired(), &[&key]);
        assert_eq!(SignedDesired::open(&bytes, &root), Ok(desired()));

        let foreign = SignedDesired::sign(&desired(), &[&other]);
        let err = SignedDesired::open(&foreign, &root).unwrap_err();
        assert!(err.contains("0 of the 1 signatures"), "{err}");
        let mut tampered = bytes.clone();
        let at = tampered.len() - 70;
        tampered[at] ^= 1;
        assert!(SignedDesired::open(&tampered, &root).is_err());
        assert!(SignedDesired::open(b"\x07garbage", &root)
            .unwrap_err()
            .starts_with("malformed desired state"));

        let mut staging = desired();
        staging.fleet = "staging".into();
        let err = SignedDesired::open(&SignedDesired::sign(&staging, &[&key]), &root).unwrap_err();
        assert!(err.contains("is for fleet staging"), "{err}");
    }

    #[test]
    fn a_threshold_is_met_by_signatures_added_one_at_a_time() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let (root, _) = root_for(&[&a, &b], 2);
        let unsigned = SignedDesired::sign(&desired(), &[]);
        assert!(SignedDesired::open(&unsigned, &root).is_err());
        let one = SignedDesired::add_signature(&unsigned, &a).unwrap();
        let err = SignedDesired::open(&one, &root).unwrap_err();
        assert!(err.contains("1 of the 2 signatures"), "{err}");
        let again = SignedDesired::add_signature(&one, &a).unwrap();
        assert_eq!(SignedDesired::signers(&again).unwrap().len(), 1);
        let two = SignedDesired::add_signature(&one, &b).unwrap();
        assert_eq!(SignedDesired::open(&two, &root), Ok(desired()));
        // The same signature made outside kiln (an HSM) over the signing message.
        let message = SignedDesired::signing_message(&one).unwrap();
        let raw = b.sign(&message);
        let external = SignedDesired::add_raw_signature(&one, &b.public(), &raw).unwrap();
        assert_eq!(SignedDesired::open(&external, &root), Ok(desired()));
        let wrong = SignedDesired::add_raw_signature(&one, &a.public(), &raw).unwrap_err();
        assert!(wrong.contains("does not verify"), "{wrong}");
    }

    #[test]
    fn an_expired_state_is_refused_with_its_dates() {
        let d = desired();
        assert_eq!(d.check_fresh(d.expires_ms - 1), Ok(()));
        let err = d.check_fresh(d.expires_ms).unwrap_err();
        assert_eq!(
            err,
            "desired state serial 3 expired at 2023-11-15T22:13:20Z (issued 2023-11-14T22:13:20Z)"
        );
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(parse_utc("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(parse_utc(&utc(1_764_489_600_000)), Ok(1_764_489_600_000));
        assert!(parse_utc("2001-02-29T00:00:00Z").is_err());
        assert!(parse_utc("2026-11-30 08:00:00").is_err());
    }

    #[test]
    fn device_messages_verify_only_for_their_topic_and_unsigned_ones_say_so() {
        let key = SecretKey::generate().unwrap();
        let topic = "kiln/v1/devices/dev-01/reported";
        let report = Reported::V1(ReportedV1 {
            serial: 9,
            modules: Vec::new(),
        });
        let sealed = seal_report(&report, topic, &key);
        let (opened, signer) = Reported::open(topic, &sealed).unwrap();
        assert_eq!(opened.serial, 9);
        assert_eq!(signer, Some(key.public()));
        // Moved to another device's topic, it no longer verifies.
        let err = Reported::open("kiln/v1/devices/dev-02/reported", &sealed).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        let plain = postcard::to_stdvec(&report).unwrap();
        assert_eq!(Reported::open(topic, &plain).unwrap().1, None);
        // A status of kiln 0.2 still reads, as a status without trust.
        let old = postcard::to_stdvec(&Status::V1(StatusV1 {
            device: "d".into(),
            online: true,
            facts: None,
        }))
        .unwrap();
        let (status, signer) = Status::open("t", &old).unwrap();
        assert_eq!((status.trust, signer), (None, None));
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
        assert!(SignedDesired::sign(&d, &[&key]).len() < 512);
    }

    #[test]
    fn a_desired_state_of_an_earlier_kiln_is_refused_by_name() {
        let old = postcard::to_stdvec(&SignedDesired::V2 {
            body: vec![1, 2, 3],
            key_id: [0; 8],
            signature: vec![0; 64],
        })
        .unwrap();
        let key = SecretKey::generate().unwrap();
        let (root, _) = root_for(&[&key], 1);
        assert!(SignedDesired::open(&old, &root)
            .unwrap_err()
            .contains("an earlier kiln's format"));
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
        assert_eq!(t.parse_root(&t.root(12)), Some(12));
        assert_eq!(t.parse_root("kiln/v1/roots/x"), None);
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
