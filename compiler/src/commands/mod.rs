//! One file and one struct per subcommand.

pub mod compile;
pub mod conformance;
pub mod devices;
pub mod gc;
pub mod inspect;
pub mod keygen;
pub mod push;
pub mod rollout;
pub mod targets;
pub mod watch;
