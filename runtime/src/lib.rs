//! `kilnd`, the headless device daemon. It links no compiler: it loads only artifacts
//! that `kiln` compiled and signed, after verifying every byte it is about to map.
//!
//! ```no_run
//! use kiln_runtime::load::{load_artifact, read_trusted_keys};
//!
//! let trust = read_trusted_keys(&["fleet.pub".into()])?;
//! let loaded = load_artifact("app.kiln".as_ref(), &trust)?;
//! println!("{} v{} ready", loaded.manifest.name, loaded.manifest.version);
//! # Ok::<(), kiln_runtime::exit::Failure>(())
//! ```

pub mod conformance;
pub mod exit;
pub mod host;
pub mod load;
pub mod wasi;
