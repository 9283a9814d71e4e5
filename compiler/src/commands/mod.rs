//! One file and one struct per subcommand: each parses its flags and runs, importing
//! the wings ([`crate::build`], [`crate::fleet`]) and never another command.

pub mod acl;
pub mod compile;
pub mod completions;
pub mod conformance;
pub mod dashboard;
pub mod decommission;
pub mod devices;
pub mod enroll;
pub mod gc;
pub mod inspect;
pub mod keygen;
pub mod provision;
pub mod push;
pub mod refresh;
pub mod release;
pub mod remove;
pub mod rollout;
pub mod root;
pub mod send;
pub mod sign;
pub mod tag;
pub mod targets;
pub mod watch;
