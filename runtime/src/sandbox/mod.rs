//! One module in one worker process: verify and load its artifact, instantiate it under
//! its limits, and run it. Nothing here knows about MQTT, the fleet or other modules.

pub mod abi;
pub mod capture;
pub mod confine;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod devices;
#[cfg(feature = "test-hooks")]
pub mod escape;
pub mod guest;
pub mod limits;
pub mod load;
pub mod wasi;
pub mod worker;
pub mod zygote;
