//! One test binary for everything that needs a real `kilnd`.
//!
//! Run with `scripts/test.sh` (it builds kilnd for each target and the examples first).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
mod conformance;
mod headless;
mod refusals;
mod run;
mod util;

/// The device profiles every behaviour is checked on: native, and two under qemu-user.
pub const DEVICES: [&str; 3] = ["x86_64-linux", "aarch64-linux", "riscv64-linux"];
