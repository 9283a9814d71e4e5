//! The fleet's trust model, after TUF's root role: an offline **root** key signs a small,
//! versioned root document that names the keys of every role and how many of them
//! must sign (k of n):
//!
//! - `root` signs the next root document;
//! - `release` signs artifacts and desired states (it may be the CI key);
//! - `registry` (optional) signs the list of enrolled device keys; without it, the
//!   release role does.
//!
//! A device is provisioned with a root document only. Rotating a key (or revoking
//! one) is publishing root `n + 1`, signed by a threshold of root `n`'s root keys *and*
//! of its own (so a new root key proves it is held too). A device follows the chain one
//! version at a time and never skips one; a key a newer root leaves out is refused
//! from then on.
//!
//! Every signed document here is `postcard(body)` plus signatures over
//! `CONTEXT || body`, each context different, so no signature can be replayed as
//! another kind.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, PublicKey, SecretKey, TrustedKeys};
use crate::names::{self, Kind};

/// A root document is a few keys: 16 KiB is far more than any fits.
pub const MAX_ROOT: usize = 16 * 1024;
/// Keys a role may name.
pub const MAX_ROLE_KEYS: usize = 16;
/// Signatures a document may carry (more than any role's keys is never needed).
pub const MAX_SIGNATURES: usize = 32;
/// The enrolled device keys: about 60 bytes a device, so some 2,000 devices.
pub const MAX_REGISTRY: usize = 120 * 1024;

const ROOT_CONTEXT: &[u8] = b"kiln root v1\0";
const ROOT_V2_CONTEXT: &[u8] = b"kiln root v2\0";
const REGISTRY_CONTEXT: &[u8] = b"kiln registry v1\0";

/// Why a signed document (a desired state, a registry, a rollout record, a root) does
/// not open, by kind: a caller acts on the kind, and the words are for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Not a document of this kind, too large, or cut short: no root will open it.
    Malformed(String),
    /// Not signed by a threshold of the role's keys: a newer root may name the keys
    /// that signed it, so this is the one kind worth trying again after a rotation.
    Untrusted(String),
    /// Signed for another fleet.
    WrongFleet(String),
    /// Past its expiry, or its serial or issue time out of bounds.
    Stale(String),
}

impl OpenError {
    /// Whether a newer root could make it open.
    pub fn may_open_under_newer_root(&self) -> bool {
        matches!(self, OpenError::Untrusted(_))
    }
}

/// The one way a signed document opens: `body` verified against `role` (a threshold
/// of its keys signed `context || body`), then decoded. What is malformed and what is
/// untrusted stay apart ([`OpenError`]); the fleet and scope are the caller's checks.
pub fn open_body<T: serde::de::DeserializeOwned>(
    role: &Role,
    context: &[u8],
    (body, signatures): (&[u8], &[Sig]),
    signed_as: &str,
    kind: &str,
) -> Result<(T, Vec<KeyId>), OpenError> {
    let signers = role
        .verify(context, body, signatures, signed_as)
        .map_err(OpenError::Untrusted)?;
    let doc = postcard::from_bytes(body)
        .map_err(|e| OpenError::Malformed(format!("malformed {kind} body: {e}")))?;
    Ok((doc, signers))
}

/// The envelope every signed document travels in, bounded before it is decoded.
pub fn unwrap_envelope<E: serde::de::DeserializeOwned>(
    bytes: &[u8],
    max: usize,
    what: &str,
) -> Result<E, OpenError> {
    if bytes.len() > max {
        return Err(OpenError::Malformed(format!(
            "{what} is {} bytes (limit {max})",
            bytes.len()
        )));
    }
    postcard::from_bytes(bytes).map_err(|e| OpenError::Malformed(format!("malformed {what}: {e}")))
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Malformed(s)
            | OpenError::Untrusted(s)
            | OpenError::WrongFleet(s)
            | OpenError::Stale(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<OpenError> for String {
    fn from(e: OpenError) -> Self {
        e.to_string()
    }
}

/// One signature over a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sig {
    pub key_id: [u8; 8],
    pub signature: Vec<u8>,
}

/// Signs `CONTEXT || body` with each key.
pub fn sign_all(context: &[u8], body: &[u8], keys: &[&SecretKey]) -> Vec<Sig> {
    let message = [context, body].concat();
    keys.iter()
        .map(|k| Sig {
            key_id: k.public().id().0,
            signature: k.sign(&message).to_vec(),
        })
        .collect()
}

/// The keys of a role and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub keys: Vec<[u8; 32]>,
    pub threshold: u32,
}

impl Role {
    pub fn new(keys: &[PublicKey], threshold: u32) -> Self {
        Self {
            keys: keys.iter().map(PublicKey::to_bytes).collect(),
            threshold,
        }
    }

    /// Its keys, decoded (checked by [`Root::check`], so never an invalid point).
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.keys
            .iter()
            .filter_map(|k| PublicKey::from_bytes(k).ok())
            .collect()
    }

    pub fn ids(&self) -> Vec<KeyId> {
        self.public_keys().iter().map(PublicKey::id).collect()
    }

    pub fn trusted(&self) -> TrustedKeys {
        TrustedKeys::new(self.public_keys())
    }

    fn check(&self, name: &str) -> Result<(), String> {
        if self.keys.is_empty() || self.keys.len() > MAX_ROLE_KEYS {
            return Err(format!(
                "role {name} names {} keys (1 to {MAX_ROLE_KEYS})",
                self.keys.len()
            ));
        }
        if self.threshold == 0 || self.threshold as usize > self.keys.len() {
            return Err(format!(
                "role {name} needs {} of its {} keys",
                self.threshold,
                self.keys.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for k in &self.keys {
            let key = PublicKey::from_bytes(k)
                .map_err(|_| format!("role {name} names an invalid ed25519 key"))?;
            if !seen.insert(key.id()) {
                return Err(format!("role {name} names key {} twice", key.id()));
            }
        }
        Ok(())
    }

    /// Checks that at least `threshold` distinct keys of this role signed
    /// `CONTEXT || body`; returns who did. Signatures by other keys are ignored (a
    /// document may be signed for two roots during a rotation).
    pub fn verify(
        &self,
        context: &[u8],
        body: &[u8],
        sigs: &[Sig],
        what: &str,
    ) -> Result<Vec<KeyId>, String> {
        if sigs.len() > MAX_SIGNATURES {
            return Err(format!(
                "{what} carries {} signatures (limit {MAX_SIGNATURES})",
                sigs.len()
            ));
        }
        let message = [context, body].concat();
        let keys = self.public_keys();
        let mut good = BTreeSet::new();
        let mut bad = Vec::new();
        for sig in sigs {
            let id = KeyId(sig.key_id);
            let Some(key) = keys.iter().find(|k| k.id() == id) else {
                continue;
            };
            let Ok(signature) = <[u8; 64]>::try_from(sig.signature.as_slice()) else {
                bad.push(id);
                continue;
            };
            if key.verify_strict(&message, &signature) {
                good.insert(id);
            } else {
                bad.push(id);
            }
        }
        if good.len() >= self.threshold as usize {
            return Ok(good.into_iter().collect());
        }
        let signers: Vec<String> = sigs.iter().map(|s| KeyId(s.key_id).to_string()).collect();
        let mut why = format!(
            "{what} has {} of the {} signatures it needs from keys {} (signed by: {})",
            good.len(),
            self.threshold,
            list(&self.ids()),
            if signers.is_empty() {
                "nobody".to_string()
            } else {
                signers.join(", ")
            }
        );
        if !bad.is_empty() {
            why.push_str(&format!(
                "; the signature by {} does not verify",
                list(&bad)
            ));
        }
        Err(why)
    }
}

fn list(ids: &[KeyId]) -> String {
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The root document: which keys hold which role, for one fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Desired states name the fleet they are for; a device takes only its own
    /// fleet's (staging's states never apply in production).
    pub fleet: String,
    /// 1 for the first root; each rotation adds one.
    pub version: u64,
    /// When it was signed (Unix milliseconds, the signer's clock).
    pub issued_ms: u64,
    pub root: Role,
    pub release: Role,
    pub registry: Option<Role>,
    /// After this (Unix ms) the root is stale: a device says so in its status, and
    /// kiln warns, until a newer root (`kiln root rotate`, same keys or new) arrives;
    /// so a broker that withholds a rotation cannot do so unnoticed. `None`: never
    /// (roots written before expiry, which every kilnd reads).
    pub expires_ms: Option<u64>,
}

/// The body of a root document without an expiry (the `V1` envelope): what every
/// kilnd reads. A root with an expiry travels in the `V2` envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RootV1 {
    fleet: String,
    version: u64,
    issued_ms: u64,
    root: Role,
    release: Role,
    registry: Option<Role>,
}

impl From<RootV1> for Root {
    fn from(r: RootV1) -> Self {
        Root {
            fleet: r.fleet,
            version: r.version,
            issued_ms: r.issued_ms,
            root: r.root,
            release: r.release,
            registry: r.registry,
            expires_ms: None,
        }
    }
}

impl Root {
    /// Why this root is stale at `now_ms`, if it is.
    pub fn stale_at(&self, now_ms: u64) -> Option<String> {
        let expires = self.expires_ms?;
        (now_ms >= expires).then(|| {
            format!(
                "root v{} of fleet {} expired at {}; a newer root may be withheld (or is due: `kiln root rotate`)",
                self.version,
                self.fleet,
                crate::clock::utc(expires)
            )
        })
    }

    pub fn check(&self) -> Result<(), String> {
        names::check(Kind::Fleet, &self.fleet)?;
        if self.version == 0 {
            return Err("root version 0 (versions start at 1)".into());
        }
        self.root.check("root")?;
        self.release.check("release")?;
        if let Some(r) = &self.registry {
            r.check("registry")?;
        }
        Ok(())
    }

    /// The role that signs the device registry.
    pub fn registry_role(&self) -> &Role {
        self.registry.as_ref().unwrap_or(&self.release)
    }

    /// Signs it with each of `keys` (a threshold of the previous root's root keys and
    /// of its own, for a rotation).
    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        self.check()?;
        let envelope = match self.expires_ms {
            None => {
                let v1 = RootV1 {
                    fleet: self.fleet.clone(),
                    version: self.version,
                    issued_ms: self.issued_ms,
                    root: self.root.clone(),
                    release: self.release.clone(),
                    registry: self.registry.clone(),
                };
                let body = postcard::to_stdvec(&v1).map_err(|e| e.to_string())?;
                let signatures = sign_all(ROOT_CONTEXT, &body, keys);
                SignedRoot::V1 { body, signatures }
            }
            Some(_) => {
                let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
                let signatures = sign_all(ROOT_V2_CONTEXT, &body, keys);
                SignedRoot::V2 { body, signatures }
            }
        };
        let bytes = postcard::to_stdvec(&envelope).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_ROOT {
            return Err(format!(
                "root document is {} bytes (limit {MAX_ROOT})",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// One line for a person: fleet, version, and who holds which role.
    pub fn describe(&self) -> String {
        let role = |r: &Role| format!("{} of [{}]", r.threshold, list(&r.ids()));
        let mut s = format!(
            "fleet {} root v{}: root {}, release {}",
            self.fleet,
            self.version,
            role(&self.root),
            role(&self.release)
        );
        if let Some(r) = &self.registry {
            s.push_str(&format!(", registry {}", role(r)));
        }
        if let Some(e) = self.expires_ms {
            s.push_str(&format!(", expires {}", crate::clock::utc(e)));
        }
        s
    }
}

/// A root document as it travels and is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRoot {
    V1 {
        body: Vec<u8>,
        signatures: Vec<Sig>,
    },
    /// A root with an expiry.
    V2 {
        body: Vec<u8>,
        signatures: Vec<Sig>,
    },
}

/// The root, its body, its signatures and the context they are over.
fn decode_root(bytes: &[u8]) -> Result<Opened, String> {
    let (root, body, signatures, context) =
        match postcard::from_bytes(bytes).map_err(|e| format!("malformed root document: {e}"))? {
            SignedRoot::V1 { body, signatures } => {
                let root: RootV1 = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed root document body: {e}"))?;
                (root.into(), body, signatures, ROOT_CONTEXT)
            }
            SignedRoot::V2 { body, signatures } => {
                let root: Root = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed root document body: {e}"))?;
                (root, body, signatures, ROOT_V2_CONTEXT)
            }
        };
    Ok(Opened {
        root,
        body,
        signatures,
        context,
    })
}

/// The parts of a root document, its own signatures checked.
struct Opened {
    root: Root,
    body: Vec<u8>,
    signatures: Vec<Sig>,
    context: &'static [u8],
}

fn open_self(bytes: &[u8]) -> Result<Opened, String> {
    if bytes.len() > MAX_ROOT {
        return Err(format!(
            "root document is {} bytes (limit {MAX_ROOT})",
            bytes.len()
        ));
    }
    let Opened {
        root,
        body,
        signatures,
        context,
    } = decode_root(bytes)?;
    root.check()
        .map_err(|e| format!("root v{} is invalid: {e}", root.version))?;
    root.root.verify(
        context,
        &body,
        &signatures,
        &format!("root v{} (by its own root keys)", root.version),
    )?;
    Ok(Opened {
        root,
        body,
        signatures,
        context,
    })
}

impl SignedRoot {
    /// A root a device is provisioned with: trusted because the operator put it
    /// there, and checked to be whole and signed by its own root keys.
    pub fn open_initial(bytes: &[u8]) -> Result<Root, String> {
        open_self(bytes).map(|o| o.root)
    }

    /// The root after `current`: the same fleet, exactly one version newer, signed
    /// by a threshold of `current`'s root keys and of its own.
    pub fn open_next(bytes: &[u8], current: &Root) -> Result<Root, String> {
        let Opened {
            root,
            body,
            signatures,
            context,
        } = open_self(bytes)?;
        if root.fleet != current.fleet {
            return Err(format!(
                "root v{} is for fleet {}, this device is in fleet {}",
                root.version, root.fleet, current.fleet
            ));
        }
        // Checked: a root at u64::MAX (self-signed by anyone) must not overflow here.
        if current.version.checked_add(1) != Some(root.version) {
            return Err(format!(
                "root v{} does not follow root v{} (versions go one at a time)",
                root.version, current.version
            ));
        }
        current.root.verify(
            context,
            &body,
            &signatures,
            &format!(
                "root v{} (by root v{}'s root keys)",
                root.version, current.version
            ),
        )?;
        Ok(root)
    }

    /// The document without checking a signature: for showing, never for trusting.
    pub fn peek(bytes: &[u8]) -> Result<Root, String> {
        if bytes.len() > MAX_ROOT {
            return Err(format!(
                "root document is {} bytes (limit {MAX_ROOT})",
                bytes.len()
            ));
        }
        decode_root(bytes).map(|o| o.root)
    }
}

/// The root a device (or the fleet tool) currently trusts, with its bytes, and how
/// it moves on to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    root: Root,
    bytes: Vec<u8>,
}

impl Chain {
    /// Starts from a root the operator provided (see [`SignedRoot::open_initial`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        let root = SignedRoot::open_initial(&bytes)?;
        Ok(Self { root, bytes })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes root `version + 1`, or says why not; nothing changes on an error.
    pub fn advance(&mut self, bytes: &[u8]) -> Result<&Root, String> {
        let next = SignedRoot::open_next(bytes, &self.root)?;
        self.root = next;
        self.bytes = bytes.to_vec();
        Ok(&self.root)
    }

    /// Follows `candidates` (any order, any versions) as far as they chain; returns
    /// the roots taken and the reasons the others were not. Versions at or below the
    /// current one are old news, not errors.
    pub fn follow<'a>(
        &mut self,
        candidates: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<u64>, Vec<String>) {
        let mut pending: Vec<(u64, &[u8])> = Vec::new();
        let mut errors = Vec::new();
        for bytes in candidates {
            match SignedRoot::peek(bytes) {
                Ok(r) if r.version > self.root.version => pending.push((r.version, bytes)),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        pending.sort_by_key(|(v, _)| *v);
        let mut taken = Vec::new();
        for (version, bytes) in pending {
            if version <= self.root.version {
                continue;
            }
            match self.advance(bytes) {
                Ok(r) => taken.push(r.version),
                Err(e) => errors.push(e),
            }
        }
        (taken, errors)
    }
}

/// The device keys the fleet has enrolled: a report verifies when it is signed by its
/// device's enrolled key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub fleet: String,
    /// Each change adds one.
    pub serial: u64,
    pub devices: Vec<Enrolled>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub key: [u8; 32],
}

impl Registry {
    pub fn key_of(&self, device: &str) -> Option<PublicKey> {
        self.devices
            .iter()
            .find(|e| e.device == device)
            .and_then(|e| PublicKey::from_bytes(&e.key).ok())
    }

    /// Enrolls `device` with `key`, replacing a key it had.
    pub fn enroll(&mut self, device: &str, key: &PublicKey) {
        self.devices.retain(|e| e.device != device);
        self.devices.push(Enrolled {
            device: device.into(),
            key: key.to_bytes(),
        });
        self.devices.sort_by(|a, b| a.device.cmp(&b.device));
    }

    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(REGISTRY_CONTEXT, &body, keys);
        let bytes = postcard::to_stdvec(&SignedRegistry::V1 { body, signatures })
            .map_err(|e| e.to_string())?;
        if bytes.len() > MAX_REGISTRY {
            return Err(format!(
                "the registry would be {} bytes (limit {MAX_REGISTRY}): {} devices",
                bytes.len(),
                self.devices.len()
            ));
        }
        Ok(bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRegistry {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
}

impl SignedRegistry {
    /// The registry, if a threshold of `root`'s registry role signed it for its fleet.
    pub fn open(bytes: &[u8], root: &Root) -> Result<Registry, String> {
        Self::verify(bytes, root).map_err(|e| e.to_string())
    }

    /// [`SignedRegistry::open`] with the kind of failure.
    pub fn verify(bytes: &[u8], root: &Root) -> Result<Registry, OpenError> {
        let SignedRegistry::V1 { body, signatures } =
            unwrap_envelope(bytes, MAX_REGISTRY, "registry")?;
        let (registry, _): (Registry, _) = open_body(
            root.registry_role(),
            REGISTRY_CONTEXT,
            (&body, &signatures),
            "the device registry",
            "registry",
        )?;
        if registry.fleet != root.fleet {
            return Err(OpenError::WrongFleet(format!(
                "the registry is for fleet {}, not {}",
                registry.fleet, root.fleet
            )));
        }
        Ok(registry)
    }
}

/// Whether a device's message is from its enrolled key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Signed by the key the registry holds for the device.
    Verified,
    /// Signed, but the device is not enrolled.
    Unenrolled(PublicKey),
    /// Signed by a key other than the enrolled one: forged, or the device was
    /// re-provisioned and must be enrolled again.
    Mismatch(PublicKey),
    /// Not signed (a kilnd before device identities).
    Unsigned,
}

impl Identity {
    pub fn of(registry: &Registry, device: &str, signer: Option<&PublicKey>) -> Self {
        match (signer, registry.key_of(device)) {
            (None, _) => Identity::Unsigned,
            (Some(k), Some(enrolled)) if *k == enrolled => Identity::Verified,
            (Some(k), Some(_)) => Identity::Mismatch(k.clone()),
            (Some(k), None) => Identity::Unenrolled(k.clone()),
        }
    }

    pub fn is_verified(&self) -> bool {
        *self == Identity::Verified
    }

    /// One word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            Identity::Verified => "verified",
            Identity::Unenrolled(_) => "unenrolled",
            Identity::Mismatch(_) => "MISMATCH",
            Identity::Unsigned => "unsigned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<SecretKey> {
        (0..n).map(|_| SecretKey::generate().unwrap()).collect()
    }

    fn publics(keys: &[SecretKey]) -> Vec<PublicKey> {
        keys.iter().map(SecretKey::public).collect()
    }

    fn root(version: u64, root_keys: &[SecretKey], release: &[SecretKey], k: u32) -> Root {
        Root {
            fleet: "acme".into(),
            version,
            issued_ms: 1_700_000_000_000 + version,
            root: Role::new(&publics(root_keys), k),
            release: Role::new(&publics(release), 1),
            registry: None,
            expires_ms: None,
        }
    }

    fn refs(keys: &[SecretKey]) -> Vec<&SecretKey> {
        keys.iter().collect()
    }

    #[test]
    fn a_rotation_is_followed_and_the_old_release_key_is_gone() {
        let (r, old, new) = (keys(1), keys(1), keys(1));
        let mut chain = Chain::new(root(1, &r, &old, 1).sign(&refs(&r)).unwrap()).unwrap();
        assert_eq!(chain.root().release.ids(), vec![old[0].public().id()]);
        let v2 = root(2, &r, &new, 1).sign(&refs(&r)).unwrap();
        assert_eq!(chain.advance(&v2).unwrap().version, 2);
        assert_eq!(chain.root().release.ids(), vec![new[0].public().id()]);
        assert!(chain
            .root()
            .release
            .trusted()
            .find(old[0].public().id())
            .is_none());
    }

    #[test]
    fn a_new_root_key_must_sign_its_own_root_as_well() {
        let (r1, r2, rel) = (keys(1), keys(1), keys(1));
        let mut chain = Chain::new(root(1, &r1, &rel, 1).sign(&refs(&r1)).unwrap()).unwrap();
        let only_old = root(2, &r2, &rel, 1).sign(&refs(&r1)).unwrap();
        let err = chain.advance(&only_old).unwrap_err();
        assert!(err.contains("by its own root keys"), "{err}");
        let only_new = root(2, &r2, &rel, 1).sign(&refs(&r2)).unwrap();
        let err = chain.advance(&only_new).unwrap_err();
        assert!(err.contains("by root v1's root keys"), "{err}");
        let both = root(2, &r2, &rel, 1).sign(&[&r1[0], &r2[0]]).unwrap();
        assert_eq!(chain.advance(&both).unwrap().version, 2);
        assert_eq!(chain.root().root.ids(), vec![r2[0].public().id()]);
    }

    #[test]
    fn skipping_a_version_or_another_fleet_or_a_wrong_root_is_refused() {
        let (r, rel, rogue) = (keys(1), keys(1), keys(1));
        let mut chain = Chain::new(root(1, &r, &rel, 1).sign(&refs(&r)).unwrap()).unwrap();
        let v3 = root(3, &r, &rel, 1).sign(&refs(&r)).unwrap();
        let err = chain.advance(&v3).unwrap_err();
        assert!(err.contains("does not follow root v1"), "{err}");
        let mut other = root(2, &r, &rel, 1);
        other.fleet = "staging".into();
        let err = chain.advance(&other.sign(&refs(&r)).unwrap()).unwrap_err();
        assert!(err.contains("fleet staging"), "{err}");
        let forged = root(2, &rogue, &rel, 1).sign(&refs(&rogue)).unwrap();
        let err = chain.advance(&forged).unwrap_err();
        assert!(err.contains("0 of the 1 signatures"), "{err}");
        assert_eq!(chain.root().version, 1, "nothing changed");
    }

    #[test]
    fn a_threshold_counts_distinct_valid_signatures_of_the_role() {
        let (r, rel) = (keys(3), keys(1));
        let v1 = root(1, &r, &rel, 2);
        let one = v1.sign(&[&r[0]]).unwrap();
        let err = SignedRoot::open_initial(&one).unwrap_err();
        assert!(err.contains("1 of the 2 signatures"), "{err}");
        // The same key twice is still one signer.
        let twice = v1.sign(&[&r[0], &r[0]]).unwrap();
        assert!(SignedRoot::open_initial(&twice).is_err());
        let two = v1.sign(&[&r[0], &r[2]]).unwrap();
        assert_eq!(SignedRoot::open_initial(&two).unwrap(), v1);
    }

    #[test]
    fn follow_takes_roots_in_order_whatever_order_they_arrive_in() {
        let (r, rel) = (keys(1), keys(4));
        let docs: Vec<Vec<u8>> = (1..=4)
            .map(|v| {
                root(v, &r, &rel[v as usize - 1..v as usize], 1)
                    .sign(&refs(&r))
                    .unwrap()
            })
            .collect();
        let mut chain = Chain::new(docs[0].clone()).unwrap();
        let arriving = [&docs[3], &docs[1], &docs[0], &docs[2]];
        let (taken, errors) = chain.follow(arriving.iter().map(|d| d.as_slice()));
        assert_eq!(taken, vec![2, 3, 4]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(chain.root().release.ids(), vec![rel[3].public().id()]);
    }

    #[test]
    fn the_registry_opens_only_with_the_registry_role_for_its_fleet() {
        let (r, rel, reg) = (keys(1), keys(1), keys(1));
        let mut doc = root(1, &r, &rel, 1);
        let device = keys(1);
        let mut registry = Registry {
            fleet: "acme".into(),
            serial: 1,
            devices: Vec::new(),
        };
        registry.enroll("dev-01", &device[0].public());
        // Without a registry role, the release role signs it.
        let by_release = registry.sign(&refs(&rel)).unwrap();
        let opened = SignedRegistry::open(&by_release, &doc).unwrap();
        assert_eq!(opened.key_of("dev-01"), Some(device[0].public()));
        doc.registry = Some(Role::new(&publics(&reg), 1));
        assert!(SignedRegistry::open(&by_release, &doc).is_err());
        assert!(SignedRegistry::open(&registry.sign(&refs(&reg)).unwrap(), &doc).is_ok());
        registry.fleet = "staging".into();
        let err = SignedRegistry::open(&registry.sign(&refs(&reg)).unwrap(), &doc).unwrap_err();
        assert!(err.contains("fleet staging"), "{err}");
    }

    #[test]
    fn a_root_with_an_expiry_travels_apart_and_goes_stale() {
        let (r, rel) = (keys(1), keys(1));
        let mut v1 = root(1, &r, &rel, 1);
        let plain = v1.sign(&refs(&r)).unwrap();
        assert!(matches!(
            postcard::from_bytes(&plain).unwrap(),
            SignedRoot::V1 { .. }
        ));
        v1.expires_ms = Some(2_000);
        let dated = v1.sign(&refs(&r)).unwrap();
        assert!(matches!(
            postcard::from_bytes(&dated).unwrap(),
            SignedRoot::V2 { .. }
        ));
        let opened = SignedRoot::open_initial(&dated).unwrap();
        assert_eq!(opened, v1);
        assert_eq!(opened.stale_at(1_999), None);
        assert!(opened.stale_at(2_000).unwrap().contains("expired"));
        // The expiry is signed: moving it breaks the signature.
        let mut chain = Chain::new(dated).unwrap();
        let mut v2 = root(2, &r, &rel, 1);
        v2.expires_ms = Some(9_000);
        assert_eq!(
            chain
                .advance(&v2.sign(&refs(&r)).unwrap())
                .unwrap()
                .expires_ms,
            Some(9_000)
        );
    }

    #[test]
    fn invalid_roles_are_named() {
        let (r, rel) = (keys(2), keys(1));
        let mut doc = root(1, &r, &rel, 3);
        assert!(doc.check().unwrap_err().contains("needs 3 of its 2 keys"));
        doc.root.threshold = 1;
        doc.root.keys[1] = doc.root.keys[0];
        assert!(doc.check().unwrap_err().contains("twice"));
        doc.root.keys.truncate(1);
        doc.version = 0;
        assert!(doc.check().unwrap_err().contains("version 0"));
    }

    proptest! {
        /// Whatever roots an attacker mixes in (other keys, skipped versions, other
        /// fleets), a chain ends at the highest version reachable one step at a time
        /// with valid signatures, and its release keys are that root's.
        #[test]
        fn a_chain_only_moves_along_valid_steps(
            steps in proptest::collection::vec((0u8..4, any::<bool>()), 1..8),
        ) {
            let r = keys(1);
            let rogue = keys(1);
            let rel = keys(1);
            let first = root(1, &r, &rel, 1).sign(&refs(&r)).unwrap();
            let mut chain = Chain::new(first).unwrap();
            let mut expect = 1u64;
            for (kind, _) in steps {
                let v = chain.root().version;
                let (doc, valid) = match kind {
                    0 => (root(v + 1, &r, &rel, 1).sign(&refs(&r)).unwrap(), true),
                    1 => (root(v + 2, &r, &rel, 1).sign(&refs(&r)).unwrap(), false),
                    2 => (root(v + 1, &r, &rel, 1).sign(&refs(&rogue)).unwrap(), false),
                    _ => {
                        let mut d = root(v + 1, &r, &rel, 1);
                        d.fleet = "other".into();
                        (d.sign(&refs(&r)).unwrap(), false)
                    }
                };
                let taken = chain.advance(&doc).is_ok();
                prop_assert_eq!(taken, valid);
                if valid {
                    expect += 1;
                }
                prop_assert_eq!(chain.root().version, expect);
            }
        }

        /// Bytes that are not a root document never panic and never open.
        #[test]
        fn garbage_never_opens(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(SignedRoot::open_initial(&bytes).is_err());
        }
    }
}
