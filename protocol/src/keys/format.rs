//! Reading and writing key files: PEM (PKCS#8, SPKI) and its DER, OpenSSH lines,
//! and the hex lines earlier versions wrote. Every length is checked before anything
//! of that size is allocated.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::KeyError;

/// Tags of the line format kiln wrote before it wrote PEM; still read.
pub(super) const SECRET_TAG: &str = "kiln-secret-key-v1";
pub(super) const PUBLIC_TAG: &str = "kiln-public-key-v1";

/// The OpenSSH key type of an ed25519 key, outside and inside the base64 blob.
pub(super) const SSH_ED25519: &str = "ssh-ed25519";

/// RFC 8410 PKCS#8 (v1) ed25519 private key, up to its 32-byte seed:
/// SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING } }.
/// The layout is fixed, so a key is checked byte for byte against it.
pub(super) const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// RFC 8410 SubjectPublicKeyInfo of an ed25519 key, up to its 32 bytes:
/// SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (no unused bits) }.
pub(super) const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Longest base64 text read (a PEM body or an OpenSSH blob). An ed25519 key needs
/// under 100 characters; 4 KiB still lets an RSA-4096 PEM be refused by name.
pub(super) const MAX_BASE64: usize = 4096;

pub(super) const DER_INTEGER: u8 = 0x02;
pub(super) const DER_OID: u8 = 0x06;
pub(super) const DER_SEQUENCE: u8 = 0x30;
/// OID 1.3.101.112, id-Ed25519.
pub(super) const ED25519_OID: [u8; 3] = [0x2b, 0x65, 0x70];

/// Which half of a key pair a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Public,
    Secret,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Public => "public key",
            Kind::Secret => "secret key",
        }
    }

    /// What a file of this kind may hold, for error messages.
    pub(super) fn formats(self) -> &'static str {
        match self {
            Kind::Public => {
                "a PUBLIC KEY PEM block, an `ssh-ed25519` line or a `kiln-public-key-v1` line"
            }
            Kind::Secret => "a PRIVATE KEY PEM block or a `kiln-secret-key-v1` line",
        }
    }

    pub(super) fn pem_label(self) -> &'static str {
        match self {
            Kind::Public => "PUBLIC KEY",
            Kind::Secret => "PRIVATE KEY",
        }
    }

    /// The name of the DER structure inside this kind's PEM block.
    pub(super) fn der_format(self) -> &'static str {
        match self {
            Kind::Public => "SPKI",
            Kind::Secret => "PKCS#8",
        }
    }

    pub(super) fn der_prefix(self) -> &'static [u8] {
        match self {
            Kind::Public => &SPKI_PREFIX,
            Kind::Secret => &PKCS8_PREFIX,
        }
    }
}

/// A key found in a file, before its bytes are decoded.
pub(super) enum Encoded<'a> {
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
pub(super) fn read_key(text: &str, expected: Kind) -> Result<[u8; 32], KeyError> {
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
pub(super) fn locate(text: &str, expected: Kind) -> Result<Encoded<'_>, KeyError> {
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
pub(super) fn is_openssh_key_type(tag: &str) -> bool {
    ["ssh-", "ecdsa-sha2-", "sk-"]
        .iter()
        .any(|prefix| tag.starts_with(prefix))
}

/// The first PEM block of `text`: its label and its base64 body joined into one
/// string. Lines before and after the block are ignored; a second block is refused,
/// since trusting only the first of two keys would be a silent surprise.
pub(super) fn pem_block(text: &str) -> Result<Option<(&str, String)>, KeyError> {
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
pub(super) fn pem_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.strip_prefix("-----")?
        .strip_prefix(marker)?
        .strip_prefix(' ')?
        .strip_suffix("-----")
}

/// The kind of key a PEM label holds. The older OpenSSL labels (`RSA PRIVATE KEY`,
/// `EC PRIVATE KEY`...) name their algorithm, so they are refused by it.
pub(super) fn pem_kind(label: &str) -> Result<Kind, KeyError> {
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
pub(super) fn pem(comment: &str, label: &str, der: &[u8]) -> String {
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
pub(super) fn decode_base64(text: &str, format: &'static str) -> Result<Vec<u8>, KeyError> {
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
pub(super) fn key_from_der(kind: Kind, der: &[u8]) -> Result<[u8; 32], KeyError> {
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
pub(super) fn der_algorithm(kind: Kind, der: &[u8]) -> Option<&[u8]> {
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
pub(super) fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
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
pub(super) fn algorithm_name(oid: &[u8]) -> String {
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
pub(super) fn dotted_oid(oid: &[u8]) -> Option<String> {
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
pub(super) fn key_from_openssh(line: &str) -> Result<[u8; 32], KeyError> {
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
pub(super) fn ssh_string<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], KeyError> {
    let truncated = || malformed("OpenSSH", "the encoded key is truncated");
    let (len, rest) = input.split_first_chunk::<4>().ok_or_else(truncated)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| truncated())?;
    let (value, rest) = rest.split_at_checked(len).ok_or_else(truncated)?;
    *input = rest;
    Ok(value)
}

/// The key of a legacy `kiln-*-key-v1` line: exactly 64 hex digits, decoded in place.
pub(super) fn key_from_hex(hex: &str) -> Result<[u8; 32], KeyError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex, &mut key).map_err(|_| KeyError::BadEncoding)?;
    Ok(key)
}

pub(super) fn malformed(format: &'static str, problem: &'static str) -> KeyError {
    KeyError::Malformed { format, problem }
}
