//! Exit codes of `kilnd`. A module's own WASI exit code passes through `kilnd run`;
//! kilnd's failures use these and print one line on stderr: what, which file, why.
//! The numbers come from the table kiln and kilnd share (`kiln_protocol::exit`).

use std::fmt;

use kiln_protocol::artifact::ArtifactError;
use kiln_protocol::compat::Incompatible;
use kiln_protocol::exit::Code as Shared;

use crate::daemon::provision::ProvisionError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Bad command line (clap's own code).
    Usage = Shared::Usage as u8,
    /// A bug or an environment problem kilnd cannot classify.
    Internal = Shared::Internal as u8,
    /// An artifact, key or directory cannot be read.
    NoInput = Shared::Unreadable as u8,
    /// Not a kiln artifact at all: empty, a plain `.wasm`, wrong magic.
    NotArtifact = Shared::NotArtifact as u8,
    /// A kiln artifact that was truncated or modified: bad signature, hash or length.
    Corrupt = Shared::Corrupt as u8,
    /// Made by a newer kiln: envelope format version unknown to this kilnd.
    UnsupportedFormat = Shared::UnsupportedFormat as u8,
    /// Validly signed, but by a key this device does not trust; or a bad trust file.
    Untrusted = Shared::Untrusted as u8,
    /// Built for another architecture / OS / ABI.
    WrongTarget = Shared::WrongTarget as u8,
    /// Needs a CPU feature this machine lacks.
    MissingCpuFeature = Shared::MissingCpuFeature as u8,
    /// Serialized by another wasmer, or needs a newer kiln host ABI.
    IncompatibleEngine = Shared::IncompatibleEngine as u8,
    /// Verified, but the module cannot be loaded or linked (e.g. unknown imports).
    LoadFailed = Shared::LoadFailed as u8,
    /// The module trapped (unreachable, out-of-bounds, stack overflow, ...).
    Trap = Shared::Trap as u8,
    /// `kilnd.toml` is unreadable or invalid.
    Config = Shared::Config as u8,
    /// `kilnd serve`: every module ended and at least one was marked failed.
    ModuleFailed = Shared::ModuleFailed as u8,
    /// `kilnd provision`: the config directory cannot be written, or the bundle
    /// cannot be deleted after the install.
    CannotWrite = Shared::CannotWrite as u8,
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

impl From<Code> for Shared {
    fn from(code: Code) -> Shared {
        Shared::from_number(code as u8).unwrap_or(Shared::Internal)
    }
}

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

impl From<&ProvisionError> for Code {
    fn from(e: &ProvisionError) -> Code {
        match e {
            ProvisionError::Config(_) => Code::Config,
            ProvisionError::Unreadable(_) => Code::NoInput,
            ProvisionError::Untrusted(_) => Code::Untrusted,
            ProvisionError::CannotWrite(_) => Code::CannotWrite,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code kilnd ends with is a kilnd row of the shared table.
    #[test]
    fn codes_are_the_shared_tables() {
        use Code::*;
        for code in [
            Usage,
            Internal,
            NoInput,
            NotArtifact,
            Corrupt,
            UnsupportedFormat,
            Untrusted,
            WrongTarget,
            MissingCpuFeature,
            IncompatibleEngine,
            LoadFailed,
            Trap,
            Config,
            ModuleFailed,
            CannotWrite,
        ] {
            let shared = Shared::from_number(code as u8).expect("in the table");
            assert_eq!(Shared::from(code), shared);
            assert!(shared.entry().used_by.kilnd(), "{code:?}");
        }
    }
}
