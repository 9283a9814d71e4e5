//! Facts about the machine kilnd runs on, as the compatibility check needs them.

use kiln_protocol::compat::HostFacts;
use kiln_protocol::KILN_ABI_VERSION;
use wasmer::sys::{CpuFeature, Triple};

/// The wasmer version linked into this kilnd.
pub const WASMER_VERSION: &str = wasmer_types::VERSION;

pub fn facts() -> HostFacts {
    HostFacts {
        triple: Triple::host().to_string(),
        cpu_features: CpuFeature::for_host()
            .iter()
            .map(|f| f.to_string())
            .collect(),
        wasmer: WASMER_VERSION.into(),
        kiln_abi: KILN_ABI_VERSION,
    }
}
