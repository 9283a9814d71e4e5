//! The contract between `kiln` (host) and `kilnd` (device). No wasmer in here: both sides
//! agree on these bytes without agreeing on a compiler.
//!
//! ```
//! use kiln_protocol::{artifact, keys::SecretKey, manifest::Manifest};
//!
//! let key = SecretKey::generate().unwrap();
//! let manifest = Manifest::example(b"native code");
//! let bytes = artifact::seal(&manifest, b"native code", &key).unwrap();
//!
//! let trust = kiln_protocol::keys::TrustedKeys::new(vec![key.public()]);
//! let verified = artifact::Envelope::parse(&bytes).unwrap().verify(&trust).unwrap();
//! assert_eq!(verified.payload, b"native code");
//! assert_eq!(verified.manifest, manifest);
//! ```

pub mod abi;
pub mod artifact;
pub mod atomic;
pub mod capability;
pub mod clock;
pub mod command;
pub mod compat;
pub mod dirs;
pub mod exit;
pub mod files;
pub mod fleet;
pub mod heard;
pub mod keys;
#[cfg(feature = "cli")]
pub mod kilnd_cli;
pub mod manifest;
pub mod mirror;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod names;
pub mod parts;
pub mod provision;
pub mod rollout;
pub mod script;
pub mod target;
pub mod telemetry;
pub mod transfer;
pub mod trust;
pub mod worker;

/// Version of the `kiln` host ABI (import module `kiln`) this build implements.
/// An artifact declares the ABI its imports need ([`abi::needed`]); a device runs it
/// if its own ABI is at least that. Version 2 added commands' `reply` and the hardware
/// capabilities (`serial_*`, `gpio_*`, `i2c_*`, `file_*`).
pub const KILN_ABI_VERSION: u32 = 2;
