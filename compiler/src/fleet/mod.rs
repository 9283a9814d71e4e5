//! Operating the fleet: what kiln reads from devices and decides from it. Every
//! command that looks at what devices say goes through [`messages`]; every serial
//! kiln signs comes from [`serial`].

pub mod broker;
pub mod keyfile;
pub mod messages;
pub mod preflight;
pub mod release;
pub mod serial;
pub mod trust;
