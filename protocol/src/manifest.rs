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
