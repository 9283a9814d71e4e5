//! The signed manifest: everything a device must know about an artifact before it
//! maps a single byte of native code.

use serde::{Deserialize, Serialize};

/// Describes one artifact. Encoded with postcard inside the envelope, whose format
/// version tags it (postcard is not self-describing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Module name (defaults to the source file stem).
    pub name: String,
    /// Monotonic module version, used by anti-rollback on the device.
    pub version: u64,
    pub target: ArtifactTarget,
    pub engine: EngineInfo,
    /// The WebAssembly binary the payload was compiled from.
    pub source: Digest,
    /// The native payload (`Module::serialize()` bytes) that follows the manifest.
    pub payload: Digest,
    pub settings: CompileSettings,
    pub imports: Vec<Import>,
    /// Exported function names (`_start` marks a WASI command).
    pub exports: Vec<String>,
    /// Seconds since the Unix epoch, recorded only when the builder asks for it
    /// (`SOURCE_DATE_EPOCH`), so equal inputs give byte-identical artifacts.
    pub created_at: Option<u64>,
    /// The tool that produced the artifact, e.g. `kiln 0.1.0 (cranelift)`.
    pub producer: String,
}

/// Where the native code may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactTarget {
    /// Normalised target triple, e.g. `aarch64-unknown-linux-gnu`.
    pub triple: String,
    /// CPU features the code may assume, in wasmer's spelling (`neon`, `avx2`, ...).
    pub cpu_features: Vec<String>,
    /// The target profile the triple came from, if any (`aarch64-linux`).
    pub profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Exact wasmer version that serialized the payload; the device requires the same.
    pub wasmer: String,
    /// Kiln host ABI version the module was built against.
    pub kiln_abi: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub sha256: [u8; 32],
    pub len: u64,
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::{Digest as _, Sha256};
        Self {
            sha256: Sha256::digest(bytes).into(),
            len: bytes.len() as u64,
        }
    }

    pub fn hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Compile settings that change how the module behaves at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileSettings {
    /// Fuel budget when wasmer metering was compiled in; `None` means no metering.
    pub metering: Option<u64>,
    /// Default cap on linear memory, in 64 KiB pages.
    pub memory_limit_pages: Option<u32>,
}

/// Bytes in one WebAssembly page.
pub const PAGE: u64 = 64 * 1024;

/// A memory size as pages (`256`) or bytes with a unit (`16MiB`, `512KiB`, `1GiB`),
/// rounded up to whole pages; at least one page.
pub fn parse_memory_size(s: &str) -> Result<u32, SizeError> {
    let bytes = match split_size(s)? {
        (n, None) => return page_count(n, s),
        (_, Some(bytes)) => bytes,
    };
    page_count(bytes.map_or(u64::MAX, |b| b.div_ceil(PAGE)), s)
}

/// A size in bytes (`65536`) or with a unit (`64KiB`, `8MiB`, `1GiB`).
pub fn parse_byte_size(s: &str) -> Result<u64, SizeError> {
    match split_size(s)? {
        (n, None) => Ok(n),
        (_, Some(Some(bytes))) => Ok(bytes),
        (_, Some(None)) => Err(SizeError::TooLarge(s.into())),
    }
}

/// Why a size (`--memory`, `memory_limit`, `batch_bytes`, ...) was refused; each
/// message quotes the text given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a number or a size like 16MiB")]
    NotANumber(String),
    #[error("`{text}`: unknown unit `{unit}` (use KiB, MiB or GiB)")]
    UnknownUnit { text: String, unit: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
    #[error("`{0}` must be between 1 page (64KiB) and 65536 pages (4GiB)")]
    Pages(String),
}

impl From<SizeError> for String {
    fn from(e: SizeError) -> Self {
        e.to_string()
    }
}

/// The number, and the bytes it means if a unit follows (`None` inside on overflow).
#[allow(clippy::type_complexity)]
fn split_size(s: &str) -> Result<(u64, Option<Option<u64>>), SizeError> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let n: u64 = num.parse().map_err(|_| SizeError::NotANumber(s.into()))?;
    let shift = match unit.trim() {
        "" => return Ok((n, None)),
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => {
            return Err(SizeError::UnknownUnit {
                text: s.into(),
                unit: other.into(),
            })
        }
    };
    Ok((n, Some(n.checked_mul(1 << shift))))
}

fn page_count(pages: u64, s: &str) -> Result<u32, SizeError> {
    // 65536 pages is all a 32-bit memory can address.
    if (1..=65536).contains(&pages) {
        Ok(pages as u32)
    } else {
        Err(SizeError::Pages(s.into()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    pub module: String,
    pub name: String,
    pub kind: ImportKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportKind {
    Function,
    Memory,
    Table,
    Global,
    Tag,
}

impl Import {
    /// Which host interface the import belongs to.
    pub fn interface(&self) -> &'static str {
        match self.module.as_str() {
            "wasi_snapshot_preview1" | "wasi_unstable" => "wasi",
            "wasix_32v1" | "wasix_64v1" => "wasix",
            "kiln" => "kiln",
            _ => "other",
        }
    }
}

impl Manifest {
    /// Is this a WASI command module (has `_start`)?
    pub fn is_command(&self) -> bool {
        self.exports.iter().any(|e| e == "_start")
    }

    /// Does the module export `name`?
    pub fn exports_fn(&self, name: &str) -> bool {
        self.exports.iter().any(|e| e == name)
    }

    /// A small filled-in manifest for docs and tests.
    pub fn example(payload: &[u8]) -> Self {
        Self {
            name: "example".into(),
            version: 1,
            target: ArtifactTarget {
                triple: "aarch64-unknown-linux-gnu".into(),
                cpu_features: vec!["neon".into()],
                profile: Some("aarch64-linux".into()),
            },
            engine: EngineInfo {
                wasmer: "7.4.2".into(),
                kiln_abi: crate::KILN_ABI_VERSION,
            },
            source: Digest::of(b"\0asm"),
            payload: Digest::of(payload),
            settings: CompileSettings::default(),
            imports: vec![],
            exports: vec!["_start".into()],
            created_at: None,
            producer: "test".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_to_pages() {
        assert_eq!(parse_memory_size("16"), Ok(16));
        assert_eq!(parse_memory_size("1MiB"), Ok(16));
        assert_eq!(parse_memory_size("100KiB"), Ok(2));
        assert_eq!(parse_memory_size("4GiB"), Ok(65536));
        assert!(parse_memory_size("0").is_err());
        assert!(parse_memory_size("5GiB").is_err());
        let err = parse_memory_size("12MB").unwrap_err();
        assert!(matches!(&err, SizeError::UnknownUnit { unit, .. } if unit == "MB"));
        assert_eq!(
            err.to_string(),
            "`12MB`: unknown unit `MB` (use KiB, MiB or GiB)"
        );
        assert!(parse_memory_size("lots").is_err());
    }
}
