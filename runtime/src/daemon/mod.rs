//! `kilnd serve`: supervises worker processes, follows the fleet's signed desired state
//! and sends telemetry, all over one MQTT connection.

pub mod check;
pub mod config;
pub mod fleet;
pub mod health;
pub mod link;
pub mod notify;
pub mod procfs;
pub mod provision;
pub mod rate;
pub mod serve;
pub mod spawn;
pub mod supervisor;
pub mod telemetry;
