//! Exit codes of `kilnd`. A module's own WASI exit code passes through `kilnd run`;
//! kilnd's failures use these and print one line on stderr: what, which file, why.

use std::fmt;

use kiln_protocol::artifact::ArtifactError;
use kiln_protocol::compat::Incompatible;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Bad command line (clap's own code).
    Usage = 2,
    /// A bug or an environment problem kilnd cannot classify.
    Internal = 70,
    /// An artifact, key or directory cannot be read.
    NoInput = 71,
    /// Not a kiln artifact at all: empty, a plain `.wasm`, wrong magic.
    NotArtifact = 72,
    /// A kiln artifact that was truncated or modified: bad signature, hash or length.
    Corrupt = 73,
    /// Made by a newer kiln: envelope format version unknown to this kilnd.
    UnsupportedFormat = 74,
    /// Validly signed, but by a key this device does not trust; or a bad trust file.
    Untrusted = 75,
    /// Built for another architecture / OS / ABI.
    WrongTarget = 76,
    /// Needs a CPU feature this machine lacks.
    MissingCpuFeature = 77,
    /// Serialized by another wasmer, or needs a newer kiln host ABI.
    IncompatibleEngine = 78,
    /// Verified, but the module cannot be loaded or linked (e.g. unknown imports).
    LoadFailed = 79,
    /// The module trapped (unreachable, out-of-bounds, stack overflow, ...).
    Trap = 80,
    /// `kilnd.toml` is unreadable or invalid.
    Config = 81,
    /// `kilnd serve`: every module ended and at least one was marked failed.
    ModuleFailed = 82,
}

/// A kilnd failure: exit code plus the one line printed for it.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

// Every typed error of the layers below maps to its exit code here, in one place.

impl From<&ArtifactError> for Code {
    fn from(e: &ArtifactError) -> Code {
        match e {
            ArtifactError::Empty | ArtifactError::PlainWasm | ArtifactError::BadMagic => {
                Code::NotArtifact
            }
            ArtifactError::UnsupportedVersion { .. } | ArtifactError::UnknownFlags(_) => {
                Code::UnsupportedFormat
            }
            ArtifactError::UntrustedSigner { .. } => Code::Untrusted,
            ArtifactError::Truncated { .. }
            | ArtifactError::ManifestTooLarge(_)
            | ArtifactError::BadSignature { .. }
            | ArtifactError::ManifestDecode(_)
            | ArtifactError::PayloadLength { .. }
            | ArtifactError::PayloadHash { .. } => Code::Corrupt,
        }
    }
}

impl From<&Incompatible> for Code {
    fn from(e: &Incompatible) -> Code {
        match e {
            Incompatible::Target { .. } => Code::WrongTarget,
            Incompatible::CpuFeatures { .. } => Code::MissingCpuFeature,
            Incompatible::Wasmer { .. } | Incompatible::Abi { .. } => Code::IncompatibleEngine,
        }
    }
}
