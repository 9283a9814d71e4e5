//! One test binary for everything that needs a real `kilnd`.
//!
//! Run with `scripts/test.sh` (it builds kilnd for each target and the examples first).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
mod board;
mod capabilities;
mod cluster;
mod commands;
mod confine;
mod conformance;
mod csdk;
mod dashboard;
mod first_hour;
mod fleet;
mod gates;
mod headless;
mod lean;
mod mirror;
mod module_state;
mod provision;
mod refusals;
mod run;
mod sandbox;
mod scale;
mod service;
mod telemetry;
mod topologies;
mod transfers;
mod trust;
mod trust_attacks;
mod truth;
mod util;
mod wasi;

pub use kiln_e2e::DEVICES;
