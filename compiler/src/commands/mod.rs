//! One file and one struct per subcommand.

pub mod compile;
pub mod conformance;
pub mod inspect;
pub mod keygen;
pub mod targets;
