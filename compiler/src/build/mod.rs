//! Building artifacts: compiling WebAssembly into signed native artifacts
//! ([`aot`]), for which targets ([`targets`]), with which flags ([`args`]), the release
//! file that carries one artifact per target ([`release_file`]), and the WebAssembly
//! spec suite turned into scripts devices replay ([`conformance`]). Nothing here talks
//! to a broker. What fails here fails as an [`Error`], whose kind says the exit code
//! ([`crate::exit`]).

pub mod aot;
pub mod args;
pub mod conformance;
mod error;
pub mod release_file;
pub mod targets;

pub use error::Error;
