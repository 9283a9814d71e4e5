//! Ed25519 signing keys and their text file format.
//!
//! A key file is plain text, one key per file, `#` lines are comments:
//!
//! ```text
//! # kiln ed25519 public key, key id 5e1d0c9a3b7f2e41
//! kiln-public-key-v1 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29
//! ```
//!
//! Secret keys use the tag `kiln-secret-key-v1`. The key id is the first 8 bytes of
//! the sha256 of the public key: short enough to print, long enough to tell keys apart.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const SECRET_TAG: &str = "kiln-secret-key-v1";
const PUBLIC_TAG: &str = "kiln-public-key-v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("no key found (expected a line `{expected} <hex>`)")]
    Missing { expected: &'static str },
    #[error("expected a {expected} but found `{found}`")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    #[error("key is not 64 hex digits")]
    BadEncoding,
    #[error("not a valid ed25519 public key")]
    InvalidPoint,
    #[error("cannot get randomness from the OS: {0}")]
    Random(String),
}

/// Identifies a signer: first 8 bytes of sha256(public key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// Strict ed25519 verification: rejects weak keys and malleable signatures.
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.0
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }

    pub fn to_text(&self) -> String {
        format!(
            "# kiln ed25519 public key, key id {}\n{PUBLIC_TAG} {}\n",
            self.id(),
            hex::encode(self.0.as_bytes())
        )
    }

    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = parse_key_line(text, PUBLIC_TAG)?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidPoint)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

/// A signing key. Never printed: `Debug` shows only the key id.
pub struct SecretKey(SigningKey);

impl SecretKey {
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    pub fn to_text(&self) -> String {
        format!(
            "# kiln ed25519 secret key, key id {}: keep it private\n{SECRET_TAG} {}\n",
            self.public().id(),
            hex::encode(self.0.to_bytes())
        )
    }

    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        parse_key_line(text, SECRET_TAG).map(|bytes| Self(SigningKey::from_bytes(&bytes)))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().id())
    }
}

fn parse_key_line(text: &str, expected: &'static str) -> Result<[u8; 32], KeyError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or(KeyError::Missing { expected })?;
    let (tag, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    if tag != expected {
        let kind = match tag {
            SECRET_TAG => "secret key".to_string(),
            PUBLIC_TAG => "public key".to_string(),
            other => other.chars().take(40).collect(),
        };
        return Err(KeyError::WrongKind {
            expected,
            found: kind,
        });
    }
    let raw = hex::decode(value.trim()).map_err(|_| KeyError::BadEncoding)?;
    raw.try_into().map_err(|_| KeyError::BadEncoding)
}

/// The set of public keys a device accepts artifacts from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self(keys)
    }

    pub fn find(&self, id: KeyId) -> Option<&PublicKey> {
        self.0.iter().find(|k| k.id() == id)
    }

    pub fn ids(&self) -> Vec<KeyId> {
        self.0.iter().map(PublicKey::id).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_ids_match() {
        let secret = SecretKey::generate().unwrap();
        let again = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(again.public(), secret.public());
        let public = PublicKey::from_text(&secret.public().to_text()).unwrap();
        assert_eq!(public.id(), secret.public().id());
        assert!(secret.to_text().contains(&public.id().to_string()));
    }

    #[test]
    fn a_secret_key_is_not_accepted_as_a_public_key() {
        let secret = SecretKey::generate().unwrap();
        let err = PublicKey::from_text(&secret.to_text()).unwrap_err();
        assert_eq!(
            err,
            KeyError::WrongKind {
                expected: PUBLIC_TAG,
                found: "secret key".into()
            }
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(matches!(
            PublicKey::from_text("# only a comment\n"),
            Err(KeyError::Missing { .. })
        ));
        assert_eq!(
            PublicKey::from_text("kiln-public-key-v1 abcd"),
            Err(KeyError::BadEncoding)
        );
    }

    #[test]
    fn signatures_verify_only_for_the_signed_message() {
        let secret = SecretKey::generate().unwrap();
        let sig = secret.sign(b"hello");
        assert!(secret.public().verify_strict(b"hello", &sig));
        assert!(!secret.public().verify_strict(b"hellp", &sig));
    }
}
