//! `kiln`, the host and fleet tool: compiles WebAssembly into signed native artifacts
//! for edge devices and inspects them.
//!
//! Each subcommand is one file in [`commands`]; tests drive them exactly as a user
//! would:
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

pub mod aot;
pub mod broker;
pub mod cli;
pub mod commands;
pub mod conformance;
pub mod dashboard;
pub mod exit;
pub mod files;
pub mod fleet;
pub mod keyfile;
pub mod release;
pub mod targets;
pub mod trust;
