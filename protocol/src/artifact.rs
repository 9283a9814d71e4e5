//! The `.kiln` envelope: a signed manifest in front of wasmer's serialized module.
//!
//! ```text
//! offset  size  field
//!      0     8  magic  89 'K' 'I' 'L' 'N' '\r' '\n' 1a
//!      8     2  format version, u16 little endian (this build: 1)
//!     10     2  flags, u16, must be 0
//!     12     4  manifest length, u32 little endian (at most 1 MiB)
//!     16     8  key id of the signer
//!     24    64  ed25519 signature over CONTEXT || bytes[0..16] || manifest
//!     88     n  manifest (postcard)
//!   88+n     -  payload: the bytes of `Module::serialize()`, to the end of the file
//! ```
//!
//! The manifest carries the payload's length and sha256, so the signature covers the
//! whole file. A reader verifies in this order and decodes nothing before its turn:
//! fixed header, signature by a trusted key, manifest, payload length and hash.

use crate::keys::{KeyId, SecretKey, TrustedKeys};
use crate::manifest::{Digest, Manifest};

pub const MAGIC: [u8; 8] = [0x89, b'K', b'I', b'L', b'N', b'\r', b'\n', 0x1a];
pub const FORMAT_VERSION: u16 = 1;
/// Domain separation: a kiln artifact signature can never be replayed as another
/// kind of kiln signature (desired state, ...).
const CONTEXT: &[u8] = b"kiln artifact v1\0";
const HEADER_LEN: usize = 88;
const SIGNED_HEADER_LEN: usize = 16;
const MAX_MANIFEST_LEN: u32 = 1 << 20;
const WASM_MAGIC: [u8; 4] = *b"\0asm";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    #[error("file is empty")]
    Empty,
    #[error(
        "this is a plain WebAssembly module, not a kiln artifact; compile it with `kiln compile`"
    )]
    PlainWasm,
    #[error("not a kiln artifact (bad magic bytes)")]
    BadMagic,
    #[error("truncated: {have} bytes, but the {part} needs {need}")]
    Truncated {
        part: &'static str,
        need: u64,
        have: u64,
    },
    #[error(
        "format version {found} is newer than this build supports ({supported}); update kilnd"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown header flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("manifest length {0} exceeds the 1 MiB limit")]
    ManifestTooLarge(u32),
    #[error("signed by key {key_id}, which is not trusted (trusted: {})", list(.trusted))]
    UntrustedSigner { key_id: KeyId, trusted: Vec<KeyId> },
    #[error("signature by key {key_id} is invalid: the artifact was modified after signing")]
    BadSignature { key_id: KeyId },
    #[error("signed manifest does not decode: {0}")]
    ManifestDecode(String),
    #[error("payload is {found} bytes, the signed manifest says {expected}")]
    PayloadLength { expected: u64, found: u64 },
    #[error("payload sha256 {found} does not match the signed manifest ({expected})")]
    PayloadHash { expected: String, found: String },
}

fn list(ids: &[KeyId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds a signed artifact from a manifest and the payload it describes.
pub fn seal(
    manifest: &Manifest,
    payload: &[u8],
    key: &SecretKey,
) -> Result<Vec<u8>, ArtifactError> {
    let expected = Digest::of(payload);
    if manifest.payload != expected {
        return Err(ArtifactError::PayloadHash {
            expected: manifest.payload.hex(),
            found: expected.hex(),
        });
    }
    let manifest_bytes =
        postcard::to_stdvec(manifest).map_err(|e| ArtifactError::ManifestDecode(e.to_string()))?;
    let manifest_len = u32::try_from(manifest_bytes.len())
        .ok()
        .filter(|len| *len <= MAX_MANIFEST_LEN)
        .ok_or(ArtifactError::ManifestTooLarge(u32::MAX))?;

    let mut out = Vec::with_capacity(HEADER_LEN + manifest_bytes.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&manifest_len.to_le_bytes());
    let signature = key.sign(&signed_message(&out, &manifest_bytes));
    out.extend_from_slice(&key.public().id().0);
    out.extend_from_slice(&signature);
    out.extend_from_slice(&manifest_bytes);
    out.extend_from_slice(payload);
    Ok(out)
}

fn signed_message(header: &[u8], manifest: &[u8]) -> Vec<u8> {
    [CONTEXT, &header[..SIGNED_HEADER_LEN], manifest].concat()
}

/// The parts of an artifact, split by the fixed header only: nothing is decoded and
/// nothing is trusted yet.
#[derive(Debug)]
pub struct Envelope<'a> {
    header: &'a [u8],
    pub key_id: KeyId,
    signature: [u8; 64],
    manifest: &'a [u8],
    payload: &'a [u8],
}

/// An artifact whose signature, manifest and payload hash have been checked.
#[derive(Debug)]
pub struct Verified<'a> {
    pub manifest: Manifest,
    pub signer: KeyId,
    /// Exactly the bytes whose sha256 was checked.
    pub payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ArtifactError> {
        if bytes.is_empty() {
            return Err(ArtifactError::Empty);
        }
        if bytes.starts_with(&WASM_MAGIC) {
            return Err(ArtifactError::PlainWasm);
        }
        if !bytes.starts_with(&MAGIC[..bytes.len().min(MAGIC.len())]) {
            return Err(ArtifactError::BadMagic);
        }
        let have = bytes.len() as u64;
        if bytes.len() < HEADER_LEN {
            return Err(ArtifactError::Truncated {
                part: "header",
                need: HEADER_LEN as u64,
                have,
            });
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(ArtifactError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
        if flags != 0 {
            return Err(ArtifactError::UnknownFlags(flags));
        }
        let manifest_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(ArtifactError::ManifestTooLarge(manifest_len));
        }
        let manifest_end = HEADER_LEN + manifest_len as usize;
        if bytes.len() < manifest_end {
            return Err(ArtifactError::Truncated {
                part: "manifest",
                need: manifest_end as u64,
                have,
            });
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[16..24]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[24..HEADER_LEN]);
        Ok(Self {
            header: &bytes[..HEADER_LEN],
            key_id: KeyId(key_id),
            signature,
            manifest: &bytes[HEADER_LEN..manifest_end],
            payload: &bytes[manifest_end..],
        })
    }

    /// Checks the signature against the trusted keys, then decodes the manifest, then
    /// checks the payload against it.
    pub fn verify(&self, trust: &TrustedKeys) -> Result<Verified<'a>, ArtifactError> {
        let key = trust
            .find(self.key_id)
            .ok_or_else(|| ArtifactError::UntrustedSigner {
                key_id: self.key_id,
                trusted: trust.ids(),
            })?;
        if !key.verify_strict(&signed_message(self.header, self.manifest), &self.signature) {
            return Err(ArtifactError::BadSignature {
                key_id: self.key_id,
            });
        }
        let manifest = decode_manifest(self.manifest)?;
        let found = Digest::of(self.payload);
        if found.len != manifest.payload.len {
            return Err(if found.len < manifest.payload.len {
                ArtifactError::Truncated {
                    part: "payload",
                    need: (HEADER_LEN + self.manifest.len()) as u64 + manifest.payload.len,
                    have: (HEADER_LEN + self.manifest.len()) as u64 + found.len,
                }
            } else {
                ArtifactError::PayloadLength {
                    expected: manifest.payload.len,
                    found: found.len,
                }
            });
        }
        if found.sha256 != manifest.payload.sha256 {
            return Err(ArtifactError::PayloadHash {
                expected: manifest.payload.hex(),
                found: found.hex(),
            });
        }
        Ok(Verified {
            manifest,
            signer: self.key_id,
            payload: self.payload,
        })
    }

    /// Decodes the manifest without checking the signature. For inspection tools on
    /// the host only: nothing decoded here may decide what runs.
    pub fn manifest_unverified(&self) -> Result<Manifest, ArtifactError> {
        decode_manifest(self.manifest)
    }

    pub fn payload_len(&self) -> u64 {
        self.payload.len() as u64
    }
}

fn decode_manifest(bytes: &[u8]) -> Result<Manifest, ArtifactError> {
    match postcard::take_from_bytes::<Manifest>(bytes) {
        Ok((manifest, [])) => Ok(manifest),
        Ok((_, rest)) => Err(ArtifactError::ManifestDecode(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(ArtifactError::ManifestDecode(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn sealed() -> (Vec<u8>, SecretKey) {
        let key = SecretKey::generate().unwrap();
        let payload = vec![7u8; 300];
        let bytes = seal(&Manifest::example(&payload), &payload, &key).unwrap();
        (bytes, key)
    }

    fn open(bytes: &[u8], key: &SecretKey) -> Result<Manifest, ArtifactError> {
        let trust = TrustedKeys::new(vec![key.public()]);
        Envelope::parse(bytes)?.verify(&trust).map(|v| v.manifest)
    }

    #[test]
    fn every_single_flipped_byte_is_refused() {
        let (bytes, key) = sealed();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(open(&bad, &key).is_err(), "flip at {i} was accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let (bytes, key) = sealed();
        for len in 0..bytes.len() {
            assert!(
                open(&bytes[..len], &key).is_err(),
                "truncation to {len} accepted"
            );
        }
        assert!(open(&bytes, &key).is_ok());
    }

    #[test]
    fn appended_bytes_are_refused() {
        let (mut bytes, key) = sealed();
        bytes.push(0);
        assert_eq!(
            open(&bytes, &key),
            Err(ArtifactError::PayloadLength {
                expected: 300,
                found: 301
            })
        );
    }

    #[test]
    fn untrusted_signer_names_both_key_ids() {
        let (bytes, _) = sealed();
        let other = SecretKey::generate().unwrap();
        let err = open(&bytes, &other).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ArtifactError::UntrustedSigner { .. }));
        assert!(text.contains(&other.public().id().to_string()), "{text}");
    }

    #[test]
    fn plain_wasm_and_empty_files_get_their_own_errors() {
        let key = SecretKey::generate().unwrap();
        assert_eq!(open(b"", &key), Err(ArtifactError::Empty));
        assert_eq!(
            open(b"\0asm\x01\0\0\0", &key),
            Err(ArtifactError::PlainWasm)
        );
        assert_eq!(open(b"hello world", &key), Err(ArtifactError::BadMagic));
    }

    #[test]
    fn newer_format_version_is_refused_before_anything_else() {
        let (mut bytes, key) = sealed();
        bytes[8] = 2;
        assert_eq!(
            open(&bytes, &key),
            Err(ArtifactError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
    }

    #[test]
    fn sealing_is_deterministic() {
        let key = SecretKey::generate().unwrap();
        let payload = b"abc";
        let m = Manifest::example(payload);
        assert_eq!(seal(&m, payload, &key), seal(&m, payload, &key));
    }
}
