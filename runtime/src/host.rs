//! Facts about the machine kilnd runs on, as the compatibility check needs them.

use kiln_protocol::compat::HostFacts;
use kiln_protocol::KILN_ABI_VERSION;
use wasmer::sys::{CpuFeature, Triple};

/// The wasmer version linked into this kilnd.
pub const WASMER_VERSION: &str = wasmer_types::VERSION;

/// Computed once per process (and by the zygote for every worker it forks): the CPU
/// feature probe is a run of `cpuid`, which traps to the hypervisor on a VM.
pub fn facts() -> &'static HostFacts {
    static FACTS: std::sync::OnceLock<HostFacts> = std::sync::OnceLock::new();
    FACTS.get_or_init(probe)
}

fn probe() -> HostFacts {
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
