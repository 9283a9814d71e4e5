//! `kilnd`, the headless device daemon. It links no compiler: it loads only artifacts
//! that `kiln` compiled and signed, after verifying every byte it is about to map.
//!
//! Two wings, and the arrows go one way:
//!
//! - [`sandbox`]: what one worker process does with one module: `load` verifies and
//!   deserializes the artifact, `guest` instantiates it with WASI (`wasi`), the kiln
//!   host ABI (`abi`) and the memory cap (`limits`), `capture` turns its stdout into
//!   log lines, and `worker` speaks the frame protocol to the supervisor. `kilnd run`
//!   drives a guest directly. The sandbox never imports the daemon.
//! - [`daemon`]: `kilnd serve`: the `config`, one `supervisor` thread per module that
//!   keeps a worker process alive, the MQTT `link`, the `fleet` update agent (a pure
//!   state machine and its driver), the `telemetry` pipeline with its spool, and
//!   `notify`, which tells systemd it is ready and alive. `kilnd check` (`check`)
//!   loads a config and verifies its artifacts the way `serve` would, and stops there.
//!
//! ```no_run
//! use kiln_runtime::sandbox::limits;
//! use kiln_runtime::sandbox::load::{load_artifact, read_trusted_keys};
//!
//! let trust = read_trusted_keys(&["fleet.pub".into()])?;
//! // No expected identity: any artifact a trusted key signed; memories capped at 16 MiB.
//! let loaded = load_artifact("app.kiln".as_ref(), &trust, None, |_| limits::engine(256))?;
//! println!("{} v{} ready", loaded.manifest.name, loaded.manifest.version);
//! # Ok::<(), kiln_runtime::exit::Failure>(())
//! ```

pub mod daemon;
pub mod exit;
pub mod host;
pub mod log;
pub mod poll;
pub mod sandbox;
