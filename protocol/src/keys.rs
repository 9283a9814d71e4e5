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

/// Tags of the line format kiln wrote before it wrote PEM; still read.
const SECRET_TAG: &str = "kiln-secret-key-v1";
const PUBLIC_TAG: &str = "kiln-public-key-v1";

/// The OpenSSH key type of an ed25519 key, outside and inside the base64 blob.
const SSH_ED25519: &str = "ssh-ed25519";

/// RFC 8410 PKCS#8 (v1) ed25519 private key, up to its 32-byte seed:
/// SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING } }.
/// The layout is fixed, so a key is checked byte for byte against it.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// RFC 8410 SubjectPublicKeyInfo of an ed25519 key, up to its 32 bytes:
/// SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (no unused bits) }.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Longest base64 text read (a PEM body or an OpenSSH blob). An ed25519 key needs
/// under 100 characters; 4 KiB still lets an RSA-4096 PEM be refused by name.
const MAX_BASE64: usize = 4096;

const DER_INTEGER: u8 = 0x02;
const DER_OID: u8 = 0x06;
const DER_SEQUENCE: u8 = 0x30;
/// OID 1.3.101.112, id-Ed25519.
const ED25519_OID: [u8; 3] = [0x2b, 0x65, 0x70];

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

/// Which half of a key pair a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    Secret,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Public => "public key",
            Kind::Secret => "secret key",
        }
    }

    /// What a file of this kind may hold, for error messages.
    fn formats(self) -> &'static str {
        match self {
            Kind::Public => {
                "a PUBLIC KEY PEM block, an `ssh-ed25519` line or a `kiln-public-key-v1` line"
            }
            Kind::Secret => "a PRIVATE KEY PEM block or a `kiln-secret-key-v1` line",
        }
    }

    fn pem_label(self) -> &'static str {
        match self {
            Kind::Public => "PUBLIC KEY",
            Kind::Secret => "PRIVATE KEY",
        }
    }

    /// The name of the DER structure inside this kind's PEM block.
    fn der_format(self) -> &'static str {
        match self {
            Kind::Public => "SPKI",
            Kind::Secret => "PKCS#8",
        }
    }

    fn der_prefix(self) -> &'static [u8] {
        match self {
            Kind::Public => &SPKI_PREFIX,
            Kind::Secret => &PKCS8_PREFIX,
        }
    }
}

/// A key found in a file, before its bytes are decoded.
enum Encoded<'a> {
    /// A PEM block: the kind its label names, and its base64 body joined.
    Pem(Kind, String),
    /// An OpenSSH public key line, whole.
    OpenSsh(&'a str),
    /// A legacy `kiln-*-key-v1` line: its kind and its hex value.
    Legacy(Kind, &'a str),
}

impl Encoded<'_> {
    fn kind(&self) -> Kind {
        match self {
            Encoded::Pem(kind, _) | Encoded::Legacy(kind, _) => *kind,
            Encoded::OpenSsh(_) => Kind::Public,
        }
    }
}

/// The 32 key bytes (seed or public key) of a file that must hold a key of kind
/// `expected`. The kind is checked before anything is decoded, so a secret key given
/// as a public one is refused as such whatever its contents.
fn read_key(text: &str, expected: Kind) -> Result<[u8; 32], KeyError> {
    let encoded = locate(text, expected)?;
    let found = encoded.kind();
    if found != expected {
        return Err(KeyError::WrongKind {
            expected: expected.name(),
            found: found.name().to_string(),
        });
    }
    match encoded {
        Encoded::Pem(kind, body) => key_from_der(kind, &decode_base64(&body, "PEM")?),
        Encoded::OpenSsh(line) => key_from_openssh(line),
        Encoded::Legacy(_, hex) => key_from_hex(hex),
    }
}

/// Finds the key in `text`: a PEM block anywhere, else the first line that is not
/// blank or a `#` comment.
fn locate(text: &str, expected: Kind) -> Result<Encoded<'_>, KeyError> {
    if let Some((label, body)) = pem_block(text)? {
        return Ok(Encoded::Pem(pem_kind(label)?, body));
    }
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or(KeyError::Missing {
            expected: expected.formats(),
        })?;
    let (tag, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    match tag {
        PUBLIC_TAG => Ok(Encoded::Legacy(Kind::Public, value.trim())),
        SECRET_TAG => Ok(Encoded::Legacy(Kind::Secret, value.trim())),
        _ if is_openssh_key_type(tag) => Ok(Encoded::OpenSsh(line)),
        _ => Err(KeyError::Unrecognized {
            expected: expected.formats(),
        }),
    }
}

/// Whether a line's first word is an OpenSSH public key type (`ssh-rsa`,
/// `ecdsa-sha2-nistp256`, `sk-ssh-ed25519@openssh.com`...), so that a key of another
/// type is refused by name rather than as unreadable.
fn is_openssh_key_type(tag: &str) -> bool {
    ["ssh-", "ecdsa-sha2-", "sk-"]
        .iter()
        .any(|prefix| tag.starts_with(prefix))
}

/// The first PEM block of `text`: its label and its base64 body joined into one
/// string. Lines before and after the block are ignored; a second block is refused,
/// since trusting only the first of two keys would be a silent surprise.
fn pem_block(text: &str) -> Result<Option<(&str, String)>, KeyError> {
    let mut lines = text.lines().map(str::trim);
    let Some(label) = lines.by_ref().find_map(|l| pem_marker(l, "BEGIN")) else {
        return Ok(None);
    };
    let mut body = String::new();
    for line in lines.by_ref() {
        if let Some(end) = pem_marker(line, "END") {
            if end != label {
                return Err(malformed(
                    "PEM",
                    "the END line does not match the BEGIN line",
                ));
            }
            if lines.any(|l| pem_marker(l, "BEGIN").is_some()) {
                return Err(malformed("PEM", "more than one key in the file"));
            }
            return Ok(Some((label, body)));
        }
        if body.len() + line.len() > MAX_BASE64 {
            return Err(malformed("PEM", "base64 is over 4 KiB"));
        }
        body.push_str(line);
    }
    Err(malformed("PEM", "no END line"))
}

/// The label of a `-----BEGIN label-----` line (or END, as `marker` says).
fn pem_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.strip_prefix("-----")?
        .strip_prefix(marker)?
        .strip_prefix(' ')?
        .strip_suffix("-----")
}

/// The kind of key a PEM label holds. The older OpenSSL labels (`RSA PRIVATE KEY`,
/// `EC PRIVATE KEY`...) name their algorithm, so they are refused by it.
fn pem_kind(label: &str) -> Result<Kind, KeyError> {
    match label {
        "PUBLIC KEY" => Ok(Kind::Public),
        "PRIVATE KEY" => Ok(Kind::Secret),
        _ => Err(match label.split_once(' ') {
            Some((algorithm @ ("RSA" | "EC" | "DSA"), _)) => KeyError::NotEd25519 {
                format: "PEM",
                algorithm: algorithm.to_string(),
            },
            _ => KeyError::UnsupportedPem {
                label: label.chars().take(40).collect(),
            },
        }),
    }
}

/// PEM text: a `#` comment line, the BEGIN line, base64 in 64-character lines (as
/// RFC 7468 and OpenSSL write it), the END line.
fn pem(comment: &str, label: &str, der: &[u8]) -> String {
    let base64 = STANDARD.encode(der);
    let mut text = format!("# {comment}\n-----BEGIN {label}-----\n");
    let mut rest = base64.as_str();
    while !rest.is_empty() {
        // base64 is ASCII, so any index is a character boundary.
        let (line, tail) = rest.split_at(rest.len().min(64));
        text.push_str(line);
        text.push('\n');
        rest = tail;
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// Decodes padded standard base64, refusing more than a key needs before allocating.
fn decode_base64(text: &str, format: &'static str) -> Result<Vec<u8>, KeyError> {
    if text.len() > MAX_BASE64 {
        return Err(malformed(format, "base64 is over 4 KiB"));
    }
    STANDARD
        .decode(text)
        .map_err(|_| malformed(format, "invalid base64"))
}

/// The key bytes of an RFC 8410 PKCS#8 or SPKI structure, checked byte for byte
/// against the one fixed ed25519 layout. Anything else is parsed only far enough to
/// name its algorithm.
fn key_from_der(kind: Kind, der: &[u8]) -> Result<[u8; 32], KeyError> {
    let format = kind.der_format();
    if let Some(key) = der.strip_prefix(kind.der_prefix()) {
        return key
            .try_into()
            .map_err(|_| malformed(format, "the key is not 32 bytes"));
    }
    match der_algorithm(kind, der) {
        Some(oid) if oid != ED25519_OID => Err(KeyError::NotEd25519 {
            format,
            algorithm: algorithm_name(oid),
        }),
        _ => Err(malformed(format, "not the RFC 8410 ed25519 layout")),
    }
}

/// The algorithm OID of a PKCS#8 (`kind` secret) or SPKI (`kind` public) structure.
fn der_algorithm(kind: Kind, der: &[u8]) -> Option<&[u8]> {
    let (body, _) = der_element(der, DER_SEQUENCE)?;
    let body = match kind {
        // Skip the version.
        Kind::Secret => der_element(body, DER_INTEGER)?.1,
        Kind::Public => body,
    };
    let (identifier, _) = der_element(body, DER_SEQUENCE)?;
    der_element(identifier, DER_OID).map(|(oid, _)| oid)
}

/// Splits one DER element with this `tag` off the front of `input`: its contents and
/// what follows. The length is checked against the input, so nothing is allocated.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&len, rest) = rest.split_first()?;
            (usize::from(len), rest)
        }
        0x82 => {
            let (len, rest) = rest.split_first_chunk::<2>()?;
            (usize::from(u16::from_be_bytes(*len)), rest)
        }
        // Longer lengths are far beyond `MAX_BASE64`.
        _ => return None,
    };
    rest.split_at_checked(len)
}

/// A name for the algorithm of a key that is not ed25519: the common ones by name,
/// others by dotted OID.
fn algorithm_name(oid: &[u8]) -> String {
    const KNOWN: [(&[u8], &str); 7] = [
        (
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            "RSA",
        ),
        (
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a],
            "RSA-PSS",
        ),
        (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01], "EC"),
        (&[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01], "DSA"),
        (&[0x2b, 0x65, 0x6e], "X25519"),
        (&[0x2b, 0x65, 0x6f], "X448"),
        (&[0x2b, 0x65, 0x71], "Ed448"),
    ];
    match KNOWN.iter().find(|(known, _)| *known == oid) {
        Some((_, name)) => (*name).to_string(),
        None => dotted_oid(oid).map_or_else(|| "unknown".to_string(), |d| format!("OID {d}")),
    }
}

/// The dotted form of a DER-encoded OID (`1.2.840.10045.2.1`), for an error message;
/// `None` unless it is short and well formed.
fn dotted_oid(oid: &[u8]) -> Option<String> {
    if oid.len() > 32 || oid.last()? & 0x80 != 0 {
        return None;
    }
    let mut text = String::new();
    let mut arc: u64 = 0;
    for &byte in oid {
        arc = arc.checked_mul(128)? | u64::from(byte & 0x7f);
        if byte & 0x80 != 0 {
            continue;
        }
        if text.is_empty() {
            // The first number packs the first two arcs: 40 * x + y, x at most 2.
            let top = (arc / 40).min(2);
            text = format!("{top}.{}", arc - 40 * top);
        } else {
            text.push_str(&format!(".{arc}"));
        }
        arc = 0;
    }
    Some(text)
}

/// The key of an OpenSSH public key line: `ssh-ed25519`, then the base64 of the
/// SSH wire form (string "ssh-ed25519", string key), then an optional comment.
fn key_from_openssh(line: &str) -> Result<[u8; 32], KeyError> {
    let mut fields = line.split_whitespace();
    let key_type = fields.next().unwrap_or_default();
    if key_type != SSH_ED25519 {
        return Err(KeyError::NotEd25519 {
            format: "OpenSSH",
            algorithm: key_type.chars().take(40).collect(),
        });
    }
    let base64 = fields
        .next()
        .ok_or_else(|| malformed("OpenSSH", "no base64 key after `ssh-ed25519`"))?;
    let blob = decode_base64(base64, "OpenSSH")?;
    let mut rest = blob.as_slice();
    if ssh_string(&mut rest)? != SSH_ED25519.as_bytes() {
        return Err(malformed(
            "OpenSSH",
            "the encoded key type is not ssh-ed25519",
        ));
    }
    let key = ssh_string(&mut rest)?;
    if !rest.is_empty() {
        return Err(malformed("OpenSSH", "trailing bytes after the key"));
    }
    key.try_into()
        .map_err(|_| malformed("OpenSSH", "the key is not 32 bytes"))
}

/// Splits one SSH wire string (u32 big-endian length, bytes) off the front of
/// `input`, checking the length against what is there.
fn ssh_string<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], KeyError> {
    let truncated = || malformed("OpenSSH", "the encoded key is truncated");
    let (len, rest) = input.split_first_chunk::<4>().ok_or_else(truncated)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| truncated())?;
    let (value, rest) = rest.split_at_checked(len).ok_or_else(truncated)?;
    *input = rest;
    Ok(value)
}

/// The key of a legacy `kiln-*-key-v1` line: exactly 64 hex digits, decoded in place.
fn key_from_hex(hex: &str) -> Result<[u8; 32], KeyError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex, &mut key).map_err(|_| KeyError::BadEncoding)?;
    Ok(key)
}

fn malformed(format: &'static str, problem: &'static str) -> KeyError {
    KeyError::Malformed { format, problem }
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
mod tests {
    use std::path::Path;
    use std::process::Command;

    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use proptest::prelude::*;

    use super::*;

    /// RFC 8032 test 1: a known seed and its public key.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn rfc8032_secret() -> SecretKey {
        SecretKey::from_text(&format!("{SECRET_TAG} {RFC8032_SEED}")).unwrap()
    }

    /// Runs an external tool and returns its stdout; `None`, with a note, when the tool
    /// is not installed (the interop tests then skip). Any other failure fails the test.
    fn run(tool: &str, args: &[&str]) -> Option<Vec<u8>> {
        let output = match Command::new(tool).args(args).output() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("note: `{tool}` is not on PATH; skipping this interop check");
                return None;
            }
            Err(e) => panic!("cannot run {tool}: {e}"),
        };
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(output.stdout)
    }

    fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The key algorithm and public key bytes of an `openssl pkey ... -text` report.
    fn openssl_report(stdout: &[u8]) -> (String, Vec<u8>) {
        let report = String::from_utf8(stdout.to_vec()).unwrap();
        let algorithm = report.split_whitespace().next().unwrap().to_string();
        let hex: String = report
            .lines()
            .skip_while(|l| l.trim() != "pub:")
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .flat_map(|l| l.chars().filter(char::is_ascii_hexdigit))
            .collect();
        (algorithm, hex::decode(hex).unwrap())
    }

    fn public_err(text: &str) -> KeyError {
        let err = PublicKey::from_text(text).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        err
    }

    fn secret_err(text: &str) -> KeyError {
        let err = SecretKey::from_text(text).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        err
    }

    fn ssh_line(blob: &[u8]) -> String {
        format!("ssh-ed25519 {} c", STANDARD.encode(blob))
    }

    /// An SSH wire blob of the given strings.
    fn ssh_blob(fields: &[&[u8]]) -> Vec<u8> {
        let mut blob = Vec::new();
        for field in fields {
            blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
            blob.extend_from_slice(field);
        }
        blob
    }

    #[test]
    fn key_files_round_trip_and_ids_match() {
        let secret = SecretKey::generate().unwrap();
        let again = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(again.public(), secret.public());
        let public = PublicKey::from_text(&secret.public().to_text()).unwrap();
        assert_eq!(public.id(), secret.public().id());
        assert!(secret.to_text().contains(&public.id().to_string()));
        assert!(public.to_text().contains(&public.id().to_string()));
    }

    #[test]
    fn secret_key_text_is_a_commented_pkcs8_pem() {
        let secret = rfc8032_secret();
        let expected = format!(
            "# kiln ed25519 secret key, key id {}: keep it private\n\
             -----BEGIN PRIVATE KEY-----\n\
             {}\n\
             -----END PRIVATE KEY-----\n",
            secret.public().id(),
            STANDARD.encode(
                hex::decode(format!("302e020100300506032b657004220420{RFC8032_SEED}")).unwrap()
            )
        );
        assert_eq!(secret.to_text(), expected);
    }

    #[test]
    fn public_key_text_is_a_commented_spki_pem() {
        let public = rfc8032_secret().public();
        assert_eq!(hex::encode(public.0.as_bytes()), RFC8032_PUBLIC);
        assert_eq!(
            public.to_text(),
            "# kiln ed25519 public key, key id 21fe31dfa154a261\n\
             -----BEGIN PUBLIC KEY-----\n\
             MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n\
             -----END PUBLIC KEY-----\n"
        );
        let der = hex::decode(format!("302a300506032b6570032100{RFC8032_PUBLIC}")).unwrap();
        assert!(public.to_text().contains(&STANDARD.encode(der)));
    }

    #[test]
    fn pem_bodies_wrap_at_64_characters() {
        let text = pem("c", "PUBLIC KEY", &[7u8; 100]);
        let lengths: Vec<usize> = text.lines().map(str::len).collect();
        assert_eq!(lengths, [3, 26, 64, 64, 8, 24]);
        let (_, body) = pem_block(&text).unwrap().unwrap();
        assert_eq!(STANDARD.decode(body).unwrap(), [7u8; 100]);
    }

    #[test]
    fn openssh_lines_round_trip() {
        let public = SecretKey::generate().unwrap().public();
        for comment in ["", "ops@example", "  two words\nand a newline "] {
            let line = public.to_openssh(comment);
            assert!(
                line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"),
                "{line}"
            );
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(PublicKey::from_text(&line).unwrap(), public);
            assert_eq!(
                PublicKey::from_text(&format!("# fleet\n\n{line}\n")).unwrap(),
                public
            );
        }
        let fields = |comment: &str| -> Vec<String> {
            let line = public.to_openssh(comment);
            line.split(' ').skip(2).map(String::from).collect()
        };
        assert_eq!(fields("ops@example"), ["ops@example"]);
        assert_eq!(fields(""), [""; 0]);
        assert_eq!(fields(" a\n b "), ["a", "b"]);
    }

    #[test]
    fn the_openssh_form_of_the_rfc_8032_key_is_exact() {
        let line = rfc8032_secret().public().to_openssh("x");
        let blob = ssh_blob(&[b"ssh-ed25519", &hex::decode(RFC8032_PUBLIC).unwrap()]);
        assert_eq!(line, format!("ssh-ed25519 {} x", STANDARD.encode(blob)));
    }

    #[test]
    fn legacy_hex_lines_still_parse() {
        let secret = SecretKey::from_text(&format!(
            "# kiln ed25519 secret key, key id 21fe31dfa154a261: keep it private\n\
             {SECRET_TAG} {RFC8032_SEED}\n"
        ))
        .unwrap();
        assert_eq!(hex::encode(secret.0.to_bytes()), RFC8032_SEED);
        let public = PublicKey::from_text(&format!("  {PUBLIC_TAG} {RFC8032_PUBLIC}  \n")).unwrap();
        assert_eq!(public, secret.public());
        // A legacy key rewritten by this version is the same key.
        let rewritten = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(rewritten.0.to_bytes(), secret.0.to_bytes());
    }

    #[test]
    fn lines_outside_the_pem_block_are_ignored() {
        let public = SecretKey::generate().unwrap().public();
        let text = public.to_text();
        let wrapped = format!(
            "Subject: the fleet key\r\n\r\n{}notes after the key\n",
            text.replace('\n', "\r\n")
        );
        assert_eq!(PublicKey::from_text(&wrapped).unwrap(), public);
        let bare: String = text.lines().skip(1).map(|l| format!("  {l}\n")).collect();
        assert_eq!(PublicKey::from_text(&bare).unwrap(), public);
        // PEM is preferred over a line format anywhere in the file.
        let other = SecretKey::generate().unwrap().public();
        let both = format!("{}\n{text}", other.to_openssh(""));
        assert_eq!(PublicKey::from_text(&both).unwrap(), public);
    }

    #[test]
    fn a_secret_key_is_not_accepted_as_a_public_key() {
        let secret = SecretKey::generate().unwrap();
        let legacy = format!("{SECRET_TAG} {}", hex::encode(secret.0.to_bytes()));
        for text in [secret.to_text(), legacy] {
            let err = public_err(&text);
            assert_eq!(
                err,
                KeyError::WrongKind {
                    expected: "public key",
                    found: "secret key".into()
                }
            );
            assert_eq!(
                err.to_string(),
                "expected a public key but found a secret key"
            );
        }
    }

    #[test]
    fn a_public_key_is_not_accepted_as_a_secret_key() {
        let public = SecretKey::generate().unwrap().public();
        let legacy = format!("{PUBLIC_TAG} {}", hex::encode(public.0.as_bytes()));
        for text in [public.to_text(), public.to_openssh("c"), legacy] {
            assert_eq!(
                secret_err(&text).to_string(),
                "expected a secret key but found a public key"
            );
        }
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for text in ["", "# only a comment\n", "\n  \n"] {
            assert!(matches!(public_err(text), KeyError::Missing { .. }));
            assert!(matches!(secret_err(text), KeyError::Missing { .. }));
        }
        assert_eq!(
            PublicKey::from_text("kiln-public-key-v1 abcd"),
            Err(KeyError::BadEncoding)
        );
        assert_eq!(
            PublicKey::from_text(&format!("{PUBLIC_TAG} {RFC8032_PUBLIC}00")),
            Err(KeyError::BadEncoding)
        );
        // Unknown text is not quoted back: a bare hex secret must not reach the logs.
        for text in ["hello world", RFC8032_SEED] {
            let err = secret_err(text);
            assert!(matches!(err, KeyError::Unrecognized { .. }), "{err}");
            assert!(!err.to_string().contains(&text[..5]), "{err}");
        }
        assert_eq!(
            public_err("hello").to_string(),
            "not a key file (expected a PUBLIC KEY PEM block, an `ssh-ed25519` line or a \
             `kiln-public-key-v1` line)"
        );
    }

    #[test]
    fn truncated_or_garbage_pem_is_refused() {
        let text = SecretKey::generate().unwrap().to_text();
        let body = text.lines().nth(2).unwrap();
        let with_body = |new: &str| text.replace(body, new);
        let too_long = "A".repeat(MAX_BASE64 + 4);
        let cases = [
            (
                with_body(&body[..40]),
                "malformed PKCS#8 key: the key is not 32 bytes",
            ),
            (
                with_body(&format!("{body}AAAA")),
                "malformed PKCS#8 key: the key is not 32 bytes",
            ),
            (with_body(&body[..41]), "malformed PEM key: invalid base64"),
            (
                with_body(&body.replace(|c: char| c.is_ascii_digit(), "!")),
                "malformed PEM key: invalid base64",
            ),
            (
                with_body(""),
                "malformed PKCS#8 key: not the RFC 8410 ed25519 layout",
            ),
            (
                with_body("MAA="),
                "malformed PKCS#8 key: not the RFC 8410 ed25519 layout",
            ),
            (
                with_body(&too_long),
                "malformed PEM key: base64 is over 4 KiB",
            ),
            (
                text.replace("-----END PRIVATE KEY-----", ""),
                "malformed PEM key: no END line",
            ),
            (
                text.replace("END PRIVATE", "END PUBLIC"),
                "malformed PEM key: the END line does not match the BEGIN line",
            ),
            (
                format!("{text}{text}"),
                "malformed PEM key: more than one key in the file",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(secret_err(&text).to_string(), message, "{text}");
        }
        let public = SecretKey::generate().unwrap().public().to_text();
        let unpadded = public.replace('=', "");
        assert_eq!(
            public_err(&unpadded).to_string(),
            "malformed PEM key: invalid base64"
        );
    }

    #[test]
    fn truncated_or_garbage_openssh_lines_are_refused() {
        let public = rfc8032_secret().public();
        let key = public.to_bytes();
        let cases = [
            (
                "ssh-ed25519".to_string(),
                "malformed OpenSSH key: no base64 key after `ssh-ed25519`",
            ),
            (
                "ssh-ed25519 !!!!".to_string(),
                "malformed OpenSSH key: invalid base64",
            ),
            (
                format!("ssh-ed25519 {}", "A".repeat(MAX_BASE64 + 4)),
                "malformed OpenSSH key: base64 is over 4 KiB",
            ),
            (
                ssh_line(&[0, 0, 0]),
                "malformed OpenSSH key: the encoded key is truncated",
            ),
            (
                ssh_line(&[0xff, 0xff, 0xff, 0xff, 0]),
                "malformed OpenSSH key: the encoded key is truncated",
            ),
            (
                ssh_line(&ssh_blob(&[b"ssh-ed25519"])),
                "malformed OpenSSH key: the encoded key is truncated",
            ),
            (
                ssh_line(&ssh_blob(&[b"ssh-rsa", &key])),
                "malformed OpenSSH key: the encoded key type is not ssh-ed25519",
            ),
            (
                ssh_line(&ssh_blob(&[b"ssh-ed25519", &key[..31]])),
                "malformed OpenSSH key: the key is not 32 bytes",
            ),
            (
                ssh_line(&ssh_blob(&[b"ssh-ed25519", &key, b""])),
                "malformed OpenSSH key: trailing bytes after the key",
            ),
            (
                "ssh-rsa AAAAB3NzaC1yc2E x".to_string(),
                "not an ed25519 key (OpenSSH algorithm is ssh-rsa, not Ed25519)",
            ),
            (
                "ecdsa-sha2-nistp256 AAAA".to_string(),
                "not an ed25519 key (OpenSSH algorithm is ecdsa-sha2-nistp256, not Ed25519)",
            ),
        ];
        for (line, message) in cases {
            assert_eq!(public_err(&line).to_string(), message, "{line}");
        }
        // The same blob, well formed, is the key.
        let good = ssh_line(&ssh_blob(&[b"ssh-ed25519", &key]));
        assert_eq!(PublicKey::from_text(&good).unwrap(), public);
        // Two bytes short of the wire length: the decoder never reads past the blob.
        let short = ssh_blob(&[b"ssh-ed25519", &key]);
        assert!(matches!(
            public_err(&ssh_line(&short[..short.len() - 2])),
            KeyError::Malformed { .. }
        ));
    }

    #[test]
    fn other_pem_blocks_are_refused_by_name() {
        let block = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
        for label in [
            "ENCRYPTED PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "CERTIFICATE",
        ] {
            assert_eq!(
                secret_err(&block(label)),
                KeyError::UnsupportedPem {
                    label: label.into()
                }
            );
        }
        assert_eq!(
            secret_err(&block("RSA PRIVATE KEY")).to_string(),
            "not an ed25519 key (PEM algorithm is RSA, not Ed25519)"
        );
        assert_eq!(
            public_err(&block("EC PRIVATE KEY")).to_string(),
            "not an ed25519 key (PEM algorithm is EC, not Ed25519)"
        );
    }

    #[test]
    fn unknown_algorithms_are_named_by_oid() {
        // SPKI { { OID 1.2.3.4 }, BIT STRING 00 }
        let der = hex::decode("300b300506032a03040302000000").unwrap();
        let text = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(&der[..der.len() - 1])
        );
        assert_eq!(
            public_err(&text).to_string(),
            "not an ed25519 key (SPKI algorithm is OID 1.2.3.4, not Ed25519)"
        );
        let rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        assert_eq!(dotted_oid(&rsa).unwrap(), "1.2.840.113549.1.1.1");
        assert_eq!(dotted_oid(&[0x88, 0x37]).unwrap(), "2.999");
        assert_eq!(dotted_oid(&[0x2a, 0x86]), None);
        assert_eq!(dotted_oid(&[0xff; 12]), None);
    }

    #[test]
    fn signatures_verify_only_for_the_signed_message() {
        let secret = SecretKey::generate().unwrap();
        let sig = secret.sign(b"hello");
        assert!(secret.public().verify_strict(b"hello", &sig));
        assert!(!secret.public().verify_strict(b"hellp", &sig));
    }

    #[test]
    fn openssl_reads_the_secret_key_file() {
        let secret = SecretKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fleet.key", secret.to_text());
        let Some(out) = run("openssl", &["pkey", "-in", &path, "-noout", "-text_pub"]) else {
            return;
        };
        let (algorithm, public) = openssl_report(&out);
        assert_eq!(algorithm, "ED25519");
        assert_eq!(public, secret.public().0.as_bytes());
    }

    #[test]
    fn openssl_reads_the_public_key_file() {
        let public = SecretKey::generate().unwrap().public();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fleet.pub", public.to_text());
        let Some(out) = run(
            "openssl",
            &["pkey", "-pubin", "-in", &path, "-noout", "-text"],
        ) else {
            return;
        };
        let (algorithm, bytes) = openssl_report(&out);
        assert_eq!(algorithm, "ED25519");
        assert_eq!(bytes, public.0.as_bytes());
    }

    #[test]
    fn openssl_signatures_verify_with_verify_strict() {
        let secret = SecretKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "fleet.key", secret.to_text());
        let message = b"a kiln artifact\n";
        let input = write(dir.path(), "message", message);
        let args = ["pkeyutl", "-sign", "-rawin", "-inkey", &key, "-in", &input];
        let Some(out) = run("openssl", &args) else {
            return;
        };
        let signature: [u8; 64] = out.as_slice().try_into().unwrap();
        assert!(secret.public().verify_strict(message, &signature));
        assert!(!secret
            .public()
            .verify_strict(b"another artifact\n", &signature));
        // ed25519 signing is deterministic: the same key signs the same bytes.
        assert_eq!(signature, secret.sign(message));
    }

    #[test]
    fn keys_written_by_openssl_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "k.pem", "");
        let public = write(dir.path(), "p.pem", "");
        let args = ["genpkey", "-algorithm", "ed25519", "-out", &key];
        let Some(_) = run("openssl", &args) else {
            return;
        };
        run(
            "openssl",
            &["pkey", "-in", &key, "-pubout", "-out", &public],
        );
        let secret = SecretKey::from_text(&read(&key)).unwrap();
        assert_eq!(
            PublicKey::from_text(&read(&public)).unwrap(),
            secret.public()
        );
    }

    #[test]
    fn ssh_keygen_accepts_the_openssh_line() {
        let public = SecretKey::generate().unwrap().public();
        let line = public.to_openssh("fleet@kiln");
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "fleet.pub", format!("{line}\n"));
        let Some(out) = run("ssh-keygen", &["-l", "-f", &path]) else {
            return;
        };
        let blob = STANDARD.decode(line.split(' ').nth(1).unwrap()).unwrap();
        let fingerprint = STANDARD_NO_PAD.encode(Sha256::digest(blob));
        assert_eq!(
            String::from_utf8(out).unwrap().trim(),
            format!("256 SHA256:{fingerprint} fleet@kiln (ED25519)")
        );
    }

    #[test]
    fn keys_written_by_ssh_keygen_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id").to_str().unwrap().to_string();
        let args = [
            "-q", "-t", "ed25519", "-N", "", "-C", "ops@host", "-f", &key,
        ];
        let Some(_) = run("ssh-keygen", &args) else {
            return;
        };
        let line = read(&format!("{key}.pub"));
        let public = PublicKey::from_text(&line).unwrap();
        assert_eq!(public.to_openssh("ops@host"), line.trim());
    }

    #[test]
    fn an_rsa_or_ec_key_is_refused_as_not_ed25519() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                "RSA",
            ),
            (
                ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                "EC",
            ),
        ];
        for (options, name) in cases {
            let key = write(dir.path(), "k.pem", "");
            let public = write(dir.path(), "p.pem", "");
            let Some(_) = run(
                "openssl",
                &[&["genpkey", "-out", &key], &options[..]].concat(),
            ) else {
                return;
            };
            run(
                "openssl",
                &["pkey", "-in", &key, "-pubout", "-out", &public],
            );
            assert_eq!(
                secret_err(&read(&key)).to_string(),
                format!("not an ed25519 key (PKCS#8 algorithm is {name}, not Ed25519)")
            );
            assert_eq!(
                public_err(&read(&public)).to_string(),
                format!("not an ed25519 key (SPKI algorithm is {name}, not Ed25519)")
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever bytes a file holds, in whatever wrapper, reading refuses or
        /// returns a key and never panics.
        #[test]
        fn any_bytes_are_read_or_refused_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..160),
            prefix in prop::bool::ANY,
        ) {
            let mut der = if prefix { PKCS8_PREFIX.to_vec() } else { Vec::new() };
            der.extend_from_slice(&bytes);
            let base64 = STANDARD.encode(&der);
            let texts = [
                format!("-----BEGIN PRIVATE KEY-----\n{base64}\n-----END PRIVATE KEY-----"),
                format!("-----BEGIN PUBLIC KEY-----\n{base64}\n-----END PUBLIC KEY-----"),
                format!("ssh-ed25519 {base64} c"),
                String::from_utf8_lossy(&bytes).into_owned(),
            ];
            for text in &texts {
                let _ = PublicKey::from_text(text);
                let _ = SecretKey::from_text(text);
            }
        }
    }
}
