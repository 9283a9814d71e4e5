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

/// A root document is a few keys: 16 KiB is far more than any fits.
pub const MAX_ROOT: usize = 16 * 1024;
/// Keys a role may name.
pub const MAX_ROLE_KEYS: usize = 16;
/// Signatures a document may carry (more than any role's keys is never needed).
pub const MAX_SIGNATURES: usize = 32;
/// The registry's signed head (its parts' hashes, at most some 11 KiB), or a whole
/// registry as one was kept before parts (about 60 bytes a device, some 2,000).
pub const MAX_REGISTRY: usize = 120 * 1024;

const ROOT_CONTEXT: &[u8] = b"kiln root v1\0";
const ROOT_V2_CONTEXT: &[u8] = b"kiln root v2\0";
const REGISTRY_CONTEXT: &[u8] = b"kiln registry v1\0";
const REGISTRY_V2_CONTEXT: &[u8] = b"kiln registry v2\0";

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
    /// A part its signed head names is not there (see [`crate::parts`]): a writer may
    /// be between its parts and its head, so reading again may find it whole.
    Incomplete(String),
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
            | OpenError::Stale(s)
            | OpenError::Incomplete(s) => f.write_str(s),
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

mod registry;
mod root;
pub use registry::*;
pub use root::*;

#[cfg(test)]
mod tests;
