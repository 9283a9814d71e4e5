//! `kilnd`, the headless device daemon. It links no compiler: it loads only artifacts
//! that `kiln` compiled and signed, after verifying every byte it is about to map.
//!
//! How a module runs: `serve` reads `config`, and one `supervisor` thread per module
//! keeps a `worker` process alive. The worker `load`s the artifact and drives one
//! `guest` (WASI from `wasi`, the kiln ABI from `abi`, the memory cap from `limits`).
//! `kilnd run` drives a `guest` directly, in its own process.
//!
//! ```no_run
//! use kiln_runtime::load::{load_artifact, read_trusted_keys};
//!
//! let trust = read_trusted_keys(&["fleet.pub".into()])?;
//! let loaded = load_artifact("app.kiln".as_ref(), &trust, |_| wasmer::Engine::headless())?;
//! println!("{} v{} ready", loaded.manifest.name, loaded.manifest.version);
//! # Ok::<(), kiln_runtime::exit::Failure>(())
//! ```

pub mod abi;
pub mod capture;
pub mod config;
pub mod conformance;
pub mod exit;
pub mod fleet;
pub mod guest;
pub mod host;
pub mod limits;
pub mod link;
pub mod load;
pub mod procfs;
pub mod serve;
pub mod supervisor;
pub mod telemetry;
pub mod wasi;
pub mod worker;
