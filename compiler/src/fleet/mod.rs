//! Operating the fleet: what kiln reads from devices and decides from it, and what it
//! publishes. The session with the broker is [`broker`]; every command that looks at
//! what devices say goes through [`messages`] (and waits on their answers with
//! [`answers`]); every desired state is built by [`desired`] under a serial from
//! [`serial`]; releases (artifacts and their transfers) are [`release`]; keys, roots
//! and the registry are [`trust`] and [`keyfile`]; the bundles that provision a device are
//! [`provision`]; operator tags are [`tags`]; the checks before publishing are
//! [`preflight`]. What fails here fails as an [`Error`], whose kind says the exit
//! code ([`crate::exit`]).

pub mod answers;
pub mod broker;
pub mod desired;
mod error;
pub mod keyfile;
pub mod messages;
pub mod mirror;
pub mod parts;
pub mod preflight;
pub mod provision;
pub mod registry;
pub mod release;
pub mod rollout;
pub mod serial;
pub mod tags;
pub mod trust;

pub use error::Error;
