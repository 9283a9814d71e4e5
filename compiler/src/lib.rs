//! `kiln`, the host and fleet tool: compiles WebAssembly into signed native artifacts
//! for edge devices and inspects them.
//!
//! Two wings do the work: [`build`] makes artifacts (compiling, targets, release
//! files, conformance scripts) and [`fleet`] operates the fleet (the broker session,
//! desired states, releases, trust, rollouts, the one reader of device messages).
//! Each subcommand is one thin file in [`commands`] that imports the wings and never
//! another command; tests drive them exactly as a user would:
//!
//! ```no_run
//! use clap::Parser;
//! use kiln_compiler::commands::compile::CompileCommand;
//!
//! CompileCommand::try_parse_from([
//!     "compile", "app.wasm", "--target", "aarch64-linux", "--sign", "fleet.key", "-o", "app.kiln",
//! ])?
//! .execute()?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod build;
pub mod cli;
pub mod commands;
pub mod dashboard;
pub mod exit;
pub mod files;
pub mod fleet;
pub mod names;
pub mod text;

// Paths other crates of the workspace (e2e, the bench, the soak) name.
pub use build::aot;
pub use fleet::{broker, keyfile};
