//! One file and one struct per subcommand.

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
pub mod push;
pub mod refresh;
pub mod release;
pub mod remove;
pub mod rollout;
pub mod root;
pub mod sign;
pub mod targets;
pub mod watch;

use kiln_protocol::names::{self, Kind};

use crate::exit::{coded, Code};

/// Checks a name given on the command line, before it becomes a topic level or a file
/// name; a bad one is a usage error, like any other bad argument.
pub fn valid_name(kind: Kind, name: &str) -> anyhow::Result<()> {
    names::check(kind, name).map_err(|e| coded(Code::Usage, anyhow::anyhow!(e)))
}
