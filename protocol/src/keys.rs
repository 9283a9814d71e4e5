//! Ed25519 signing keys and the files they live in.
//!
//! Key files are in the formats other tools already read, so a security team can
//! inspect, generate, import and back up fleet keys with the tools it has:
//!
//! - a secret key is a PKCS#8 PEM (RFC 8410, `-----BEGIN PRIVATE KEY-----`) and a
//!   public key an SPKI PEM (`-----BEGIN PUBLIC KEY-----`): what OpenSSL, ring, Go's
//!   crypto/x509 and the key import tools of cloud KMSs and HSMs read;
//! - a public key can also be an OpenSSH line ([`PublicKey::to_openssh`]), for people
//!   who live in `authorized_keys`.
//!
//! [`PublicKey::to_text`] and [`SecretKey::to_text`] write the PEM form after one
//! `#` comment line naming the key id. PEM readers skip text before the BEGIN line
//! (OpenSSL does; the tests check it with the real `openssl`), and kiln ignores every
//! line outside the block:
//!
//! ```text
//! # kiln ed25519 public key, key id 21fe31dfa154a261
//! -----BEGIN PUBLIC KEY-----
//! MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=
//! -----END PUBLIC KEY-----
//! ```
//!
//! Reading accepts, in this order of preference: the PEM forms, an OpenSSH
//! `ssh-ed25519` line (public keys only), and the `kiln-public-key-v1 <64 hex>` /
//! `kiln-secret-key-v1 <64 hex>` lines earlier versions wrote, so existing key files
//! keep working. One key per file. Only ed25519 is read: an RSA or EC key is refused
//! naming its algorithm, and a secret key where a public key is expected (or the
//! reverse) is refused as such. Every length read from a file is checked before
//! anything of that size is allocated.
//!
//! The key id is the first 8 bytes of the sha256 of the public key: short enough to
//! print, long enough to tell keys apart.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

mod format;

use format::{pem, read_key, Kind, PKCS8_PREFIX, SPKI_PREFIX, SSH_ED25519};

/// Why a key file was refused. Each message is one line and never quotes key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The text holds no key: it is empty or only comments.
    #[error("no key found (expected {expected})")]
    Missing { expected: &'static str },
    /// A secret key where a public key is expected, or the reverse.
    #[error("expected a {expected} but found a {found}")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    /// Text in none of the key formats. Not quoted: it may be a bare secret.
    #[error("not a key file (expected {expected})")]
    Unrecognized { expected: &'static str },
    /// A key of another algorithm (RSA, EC, ...).
    #[error("not an ed25519 key ({format} algorithm is {algorithm}, not Ed25519)")]
    NotEd25519 {
        format: &'static str,
        algorithm: String,
    },
    /// A PEM block kiln does not read (encrypted, OpenSSH private key, certificate...).
    #[error("unsupported PEM block `{label}` (expected `PRIVATE KEY` or `PUBLIC KEY`)")]
    UnsupportedPem { label: String },
    /// A key in a known format whose contents are broken or truncated.
    #[error("malformed {format} key: {problem}")]
    Malformed {
        format: &'static str,
        problem: &'static str,
    },
    /// A legacy `kiln-*-key-v1` line whose value is not 32 bytes of hex.
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

    /// The raw 32-byte key, for binary documents that embed keys (trust roots,
    /// device registries, signed reports); files use [`PublicKey::to_text`].
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// A key from its raw 32 bytes, refused if it is not a valid curve point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidPoint)
    }

    /// An SPKI PEM after a comment line naming the key id (see the module docs).
    pub fn to_text(&self) -> String {
        pem(
            &format!("kiln ed25519 public key, key id {}", self.id()),
            Kind::Public.pem_label(),
            &[&SPKI_PREFIX[..], self.0.as_bytes()].concat(),
        )
    }

    /// The key as one OpenSSH line, `ssh-ed25519 <base64> comment`, as in
    /// `authorized_keys` or a `.pub` file. Whitespace in the comment (newlines
    /// included) is folded to single spaces so the key stays one line; an empty
    /// comment is left out.
    pub fn to_openssh(&self, comment: &str) -> String {
        let mut blob = Vec::with_capacity(51);
        for field in [SSH_ED25519.as_bytes(), self.0.as_bytes()] {
            blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
            blob.extend_from_slice(field);
        }
        let comment = comment.split_whitespace().collect::<Vec<_>>().join(" ");
        let line = format!("{SSH_ED25519} {}", STANDARD.encode(blob));
        if comment.is_empty() {
            line
        } else {
            format!("{line} {comment}")
        }
    }

    /// Reads an SPKI PEM, an OpenSSH `ssh-ed25519` line or a legacy
    /// `kiln-public-key-v1` line (see the module docs).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(&read_key(text, Kind::Public)?)
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

    /// A PKCS#8 PEM after a comment line naming the key id (see the module docs).
    pub fn to_text(&self) -> String {
        pem(
            &format!(
                "kiln ed25519 secret key, key id {}: keep it private",
                self.public().id()
            ),
            Kind::Secret.pem_label(),
            &[&PKCS8_PREFIX[..], self.0.as_bytes()].concat(),
        )
    }

    /// Reads a PKCS#8 PEM or a legacy `kiln-secret-key-v1` line (see the module docs).
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        read_key(text, Kind::Secret).map(|bytes| Self(SigningKey::from_bytes(&bytes)))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().id())
    }
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

    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests;
