//! The signed desired state: what a device or a group should run, each module's
//! artifacts per target and limits, and the envelope its signatures travel in.

use serde::{Deserialize, Serialize};

use super::{
    sha256, utc, MAX_DESIRED, MAX_SERIAL_AHEAD_MS, MAX_TICK_MS, MAX_TIMEOUT_MS, PLAUSIBLE_CLOCK_MS,
};
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::transfer::{Codec, Transfer, TransferError, MAX_ARTIFACT};
use crate::trust::{sign_all, OpenError, Root, Sig};

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
    /// Base URLs of HTTP(S) mirrors that serve the transfers' chunk lists and chunks
    /// (`kiln push --mirror-url`; see `kiln_protocol::mirror`), tried before the
    /// broker, which stays the fallback. Absent from the body when empty, so a state
    /// without mirrors is byte for byte what kiln signed before there were mirrors, and
    /// a kilnd from before reads a state with them (postcard ignores what follows).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "trailing_mirrors"
    )]
    pub mirrors: Vec<String>,
}

/// The mirrors at the end of a desired state's body, or none when the body ends
/// before them (a state signed without mirrors, or by a kiln from before them).
fn trailing_mirrors<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    // postcard says only that the input ended; a body the signers signed with a
    // malformed tail gets no mirrors, and the device uses the broker.
    Ok(Vec::<String>::deserialize(d).unwrap_or_default())
}

/// Why a module of a desired state cannot be taken as it is: limits out of bounds, an
/// artifact whose description is not sane, or no artifact for this device. (What
/// makes a whole desired state refused is an [`OpenError`].)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("{0}")]
    Limits(String),
    #[error("{0}")]
    Artifact(String),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    NoArtifact(String),
}

impl From<ModuleError> for String {
    fn from(e: ModuleError) -> Self {
        e.to_string()
    }
}

impl Desired {
    /// Why a device must not take it at `now_ms`, if it must not.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), OpenError> {
        if now_ms >= self.expires_ms {
            return Err(OpenError::Stale(format!(
                "desired state serial {} expired at {} (issued {})",
                self.serial,
                utc(self.expires_ms),
                utc(self.issued_ms)
            )));
        }
        self.check_bounds(now_ms)
    }
}

impl Desired {
    /// Whether its serial and issue time are within [`MAX_SERIAL_AHEAD_MS`]: the serial
    /// of its issue time, the issue time of `now_ms` (once the clock is set).
    pub fn check_bounds(&self, now_ms: u64) -> Result<(), OpenError> {
        if self.serial > self.issued_ms.saturating_add(MAX_SERIAL_AHEAD_MS) {
            return Err(OpenError::Stale(format!(
                "desired state serial {} is more than a day ahead of its issue time {} (a fast-forward)",
                self.serial,
                utc(self.issued_ms)
            )));
        }
        if now_ms >= PLAUSIBLE_CLOCK_MS
            && self.issued_ms > now_ms.saturating_add(MAX_SERIAL_AHEAD_MS)
        {
            return Err(OpenError::Stale(format!(
                "desired state serial {} was issued {}, more than a day after this clock's {} (a fast-forward, or a wrong clock)",
                self.serial,
                utc(self.issued_ms),
                utc(now_ms)
            )));
        }
        Ok(())
    }
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
    pub fn check(&self) -> Result<(), ModuleError> {
        if let Some(t) = self.tick_ms {
            if t == 0 || t > MAX_TICK_MS {
                return Err(ModuleError::Limits(format!(
                    "tick_ms {t} is outside 1..={MAX_TICK_MS}"
                )));
            }
        }
        if let Some(t) = self.timeout_ms {
            if t == 0 || t > MAX_TIMEOUT_MS {
                return Err(ModuleError::Limits(format!(
                    "timeout_ms {t} is outside 1..={MAX_TIMEOUT_MS}"
                )));
            }
        }
        if self.memory_limit_pages == Some(0) {
            return Err(ModuleError::Limits("memory_limit_pages is 0".into()));
        }
        if self.fuel_per_call == Some(0) {
            return Err(ModuleError::Limits("fuel_per_call is 0".into()));
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
    pub fn check(&self) -> Result<(), ModuleError> {
        if self.len == 0 || self.len > MAX_ARTIFACT {
            return Err(ModuleError::Artifact(format!(
                "artifact of {} bytes (limit {MAX_ARTIFACT})",
                self.len
            )));
        }
        if self.patches.len() > MAX_PATCHES {
            return Err(ModuleError::Artifact(format!(
                "{} patches (limit {MAX_PATCHES})",
                self.patches.len()
            )));
        }
        if self.full.codec == Codec::ZstdPatch {
            return Err(ModuleError::Artifact("the full transfer is a patch".into()));
        }
        self.full.check(self.len)?;
        for p in &self.patches {
            if p.transfer.codec != Codec::ZstdPatch {
                return Err(ModuleError::Artifact(format!(
                    "a {} transfer listed as a patch",
                    p.transfer.codec.name()
                )));
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
    /// has none (the message; [`DesiredModule::find_artifact`] gives the kind).
    pub fn artifact_for(
        &self,
        triple: &str,
        cpu_features: &[String],
    ) -> Result<&TargetArtifact, String> {
        self.find_artifact(triple, cpu_features)
            .map_err(String::from)
    }

    /// [`DesiredModule::artifact_for`], its error a [`ModuleError::NoArtifact`].
    pub fn find_artifact(
        &self,
        triple: &str,
        cpu_features: &[String],
    ) -> Result<&TargetArtifact, ModuleError> {
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
            ModuleError::NoArtifact(format!(
                "release {} v{} has no artifact for this {triple} device (it has: {})",
                self.name,
                self.version,
                if has.is_empty() {
                    "none".into()
                } else {
                    has.join(", ")
                }
            ))
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

fn unwrap_v3(bytes: &[u8]) -> Result<(Vec<u8>, Vec<Sig>), OpenError> {
    if bytes.len() > MAX_DESIRED {
        return Err(OpenError::Malformed(format!(
            "desired state is {} bytes (limit {MAX_DESIRED})",
            bytes.len()
        )));
    }
    match postcard::from_bytes(bytes)
        .map_err(|e| OpenError::Malformed(format!("malformed desired state: {e}")))?
    {
        SignedDesired::V3 { body, signatures } => Ok((body, signatures)),
        SignedDesired::V1 { .. } | SignedDesired::V2 { .. } => Err(OpenError::Malformed(
            "desired state in an earlier kiln's format (no fleet, no expiry, one key), which this kilnd no longer reads; push the release again with a current kiln".into(),
        )),
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
    pub fn add_signature(bytes: &[u8], key: &SecretKey) -> Result<Vec<u8>, OpenError> {
        let (body, mut signatures) = unwrap_v3(bytes)?;
        let id = key.public().id().0;
        signatures.retain(|s| s.key_id != id);
        signatures.extend(sign_all(DESIRED_CONTEXT, &body, &[key]));
        postcard::to_stdvec(&SignedDesired::V3 { body, signatures })
            .map_err(|e| OpenError::Malformed(e.to_string()))
    }

    /// The bytes a signature covers, for a signer outside kiln (an HSM, a cloud KMS)
    /// that is handed the message and returns a raw Ed25519 signature.
    pub fn signing_message(bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (body, _) = unwrap_v3(bytes)?;
        Ok([DESIRED_CONTEXT, &body].concat())
    }

    /// Adds a signature made outside kiln by `key`, after checking it.
    pub fn add_raw_signature(
        bytes: &[u8],
        key: &PublicKey,
        signature: &[u8; 64],
    ) -> Result<Vec<u8>, OpenError> {
        let (body, mut signatures) = unwrap_v3(bytes)?;
        if !key.verify_strict(&[DESIRED_CONTEXT, &body].concat(), signature) {
            return Err(OpenError::Untrusted(format!(
                "the signature does not verify with key {}",
                key.id()
            )));
        }
        let id = key.id().0;
        signatures.retain(|s| s.key_id != id);
        signatures.push(Sig {
            key_id: id,
            signature: signature.to_vec(),
        });
        postcard::to_stdvec(&SignedDesired::V3 { body, signatures })
            .map_err(|e| OpenError::Malformed(e.to_string()))
    }

    /// Who signed it (not checked): for showing.
    pub fn signers(bytes: &[u8]) -> Result<Vec<KeyId>, OpenError> {
        Ok(unwrap_v3(bytes)?
            .1
            .iter()
            .map(|s| KeyId(s.key_id))
            .collect())
    }

    /// Decodes and verifies a desired state: a threshold of `root`'s release keys
    /// signed it, and it is for `root`'s fleet. Freshness is the caller's, who has
    /// the clock ([`Desired::check_fresh`]).
    /// (Its error is the message; [`SignedDesired::verify`] gives the kind.)
    pub fn open(bytes: &[u8], root: &Root) -> Result<Desired, String> {
        Self::verify(bytes, root)
            .map(|(d, _)| d)
            .map_err(String::from)
    }

    /// [`SignedDesired::open`] with the release keys whose signatures verified, and
    /// an error that says what kind of failure it is (only an
    /// [`OpenError::Untrusted`] one may open under a newer root).
    pub fn verify(bytes: &[u8], root: &Root) -> Result<(Desired, Vec<KeyId>), OpenError> {
        let (body, signatures) = unwrap_v3(bytes)?;
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
    pub fn peek(bytes: &[u8]) -> Result<Desired, OpenError> {
        let body = unwrap_v3(bytes)?.0;
        postcard::from_bytes(&body)
            .map_err(|e| OpenError::Malformed(format!("malformed desired state body: {e}")))
    }
}
