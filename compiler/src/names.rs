//! Names given on the command line (devices, groups, modules), checked before they
//! become a topic level or a file name.

use kiln_protocol::names::{self, Kind};

use crate::exit::{coded, Code};

/// Checks a name given on the command line, before it becomes a topic level or a file
/// name; a bad one is a usage error, like any other bad argument.
pub fn valid_name(kind: Kind, name: &str) -> anyhow::Result<()> {
    names::check(kind, name).map_err(|e| coded(Code::Usage, anyhow::anyhow!(e)))
}
