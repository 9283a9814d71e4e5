//! One module in one worker process: verify and load its artifact, instantiate it under
//! its limits, and run it. Nothing here knows about MQTT, the fleet or other modules.

pub mod abi;
pub mod capture;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod guest;
pub mod limits;
pub mod load;
pub mod wasi;
pub mod worker;
pub mod zygote;
