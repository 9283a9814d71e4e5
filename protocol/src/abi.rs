//! The kiln host ABI, version 2: what a module may import from module `kiln` and what a
//! reactor module exports for the daemon to drive (version 2 added the imports in
//! [`SINCE_V2`]; an artifact records the version its imports need, [`needed`]). This file is the reference; the
//! book's page `docs/src/abi.md` documents the same names.
//!
//! Pointers and lengths are `i32` offsets into the module's exported `memory`. Functions
//! that return `i32` return a count (>= 0) or one of the negative [`Status`] codes; a bad
//! pointer is reported, never trapped on, so a guest can recover.
//!
//! | import (module `kiln`) | signature | does |
//! |---|---|---|
//! | `publish` | `(stream_ptr, stream_len, data_ptr, data_len) -> i32` | telemetry record on `stream` |
//! | `log` | `(level, ptr, len) -> i32` | log line at [`Level`] (0 error .. 4 trace) |
//! | `config_len` | `() -> i32` | length of the module's config bytes |
//! | `config_read` | `(ptr, len) -> i32` | copies up to `len` config bytes, returns count |
//! | `message_len` | `() -> i32` | length of the message being delivered, or `NO_MESSAGE` |
//! | `message_read` | `(ptr, len) -> i32` | copies up to `len` bytes of the message |
//! | `message_topic` | `(ptr, len) -> i32` | copies its topic (`module/stream`, or `command/<topic>` for a command from the fleet), returns count |
//! | `serial_open` | `(name_ptr, name_len) -> i32` | a handle to the serial port granted under `name` ([`crate::capability`]); `DENIED` if none is |
//! | `serial_read` | `(handle, ptr, len, wait_ms) -> i32` | bytes read (at most [`crate::capability::MAX_SERIAL_IO`]), 0 if none came within `wait_ms` (at most 5,000) |
//! | `serial_write` | `(handle, ptr, len, wait_ms) -> i32` | bytes written, 0 if the port took none within `wait_ms` |
//! | `gpio_open` | `(name_ptr, name_len) -> i32` | a handle to the GPIO lines granted under `name`; `DENIED` if none are |
//! | `gpio_read` | `(handle) -> i32` | the lines' values, bit `i` for the grant's `i`th line |
//! | `gpio_write` | `(handle, values, mask) -> i32` | drives the output lines whose bit is set in `mask` to their bit in `values`; `DENIED` for inputs |
//! | `i2c_open` | `(name_ptr, name_len) -> i32` | a handle to the I2C device granted under `name`; `DENIED` if none is |
//! | `i2c_read` | `(handle, reg, ptr, len) -> i32` | reads `len` bytes from register `reg` (1: SMBus read byte data; 2 to [`crate::capability::MAX_I2C_IO`]: I2C block read), returns count |
//! | `i2c_write` | `(handle, reg, ptr, len) -> i32` | writes `len` bytes to register `reg` (1: SMBus write byte data; more: I2C block write), returns count |
//! | `file_open` | `(name_ptr, name_len) -> i32` | a handle to the read-only file granted under `name`; `DENIED` if none is |
//! | `file_read` | `(handle, ptr, len) -> i32` | the file read again from its start, at most `len` (and [`crate::capability::MAX_FILE_READ`]) bytes; returns count |
//! | `reply` | `(ptr, len) -> i32` | within `kiln_on_message` for a command: its reply, at most [`MAX_REPLY`] bytes (the last call counts); `NO_MESSAGE` otherwise |
//! | `monotonic_ns` | `() -> i64` | nanoseconds since the worker started, never goes back |
//! | `wall_ns` | `() -> i64` | nanoseconds since the Unix epoch (the device's clock) |
//!
//! | export (reactor) | signature | called |
//! |---|---|---|
//! | `kiln_init` | `() -> i32` | once after instantiation; non-zero fails the start |
//! | `kiln_tick` | `() -> i32` | every tick interval; non-zero is reported as a failed tick |
//! | `kiln_on_message` | `(len: i32) -> i32` | for each message routed to the module, each command from the fleet (`command/<topic>`), and each edge of its GPIO inputs (`gpio/<name>`, before the next tick) |
//! | `kiln_self_test` | `() -> i32` | optional, once after `kiln_init`; non-zero fails the start (and an update's health check) |
//!
//! A module with `_start` is a WASI command instead: it runs once, its stdout and stderr
//! become log records line by line. Every call runs under the module's limits: fuel per
//! call (if compiled with metering), the linear-memory cap and the wall-clock watchdog.

use serde::{Deserialize, Serialize};

/// Import module name of the kiln host ABI.
pub const MODULE: &str = "kiln";

/// Every function the ABI provides, with its wasm signature (params, results).
pub const IMPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("publish", &[I32, I32, I32, I32], &[I32]),
    ("log", &[I32, I32, I32], &[I32]),
    ("config_len", &[], &[I32]),
    ("config_read", &[I32, I32], &[I32]),
    ("message_len", &[], &[I32]),
    ("message_read", &[I32, I32], &[I32]),
    ("message_topic", &[I32, I32], &[I32]),
    ("monotonic_ns", &[], &[I64]),
    ("wall_ns", &[], &[I64]),
    ("reply", &[I32, I32], &[I32]),
    ("serial_open", &[I32, I32], &[I32]),
    ("serial_read", &[I32, I32, I32, I32], &[I32]),
    ("serial_write", &[I32, I32, I32, I32], &[I32]),
    ("gpio_open", &[I32, I32], &[I32]),
    ("gpio_read", &[I32], &[I32]),
    ("gpio_write", &[I32, I32, I32], &[I32]),
    ("i2c_open", &[I32, I32], &[I32]),
    ("i2c_read", &[I32, I32, I32, I32], &[I32]),
    ("i2c_write", &[I32, I32, I32, I32], &[I32]),
    ("file_open", &[I32, I32], &[I32]),
    ("file_read", &[I32, I32, I32], &[I32]),
];

/// The imports ABI version 2 added (each import not named here is version 1's).
pub const SINCE_V2: &[&str] = &[
    "reply",
    "serial_open",
    "serial_read",
    "serial_write",
    "gpio_open",
    "gpio_read",
    "gpio_write",
    "i2c_open",
    "i2c_read",
    "i2c_write",
    "file_open",
    "file_read",
];

/// The ABI version a module importing `imports` (module, name) needs: what `kiln
/// compile` writes into its artifact, so a kilnd of an older ABI refuses it before it
/// loads a byte of it, naming both versions.
pub fn needed<'a>(imports: impl IntoIterator<Item = (&'a str, &'a str)>) -> u32 {
    let v2 = imports
        .into_iter()
        .any(|(module, name)| module == MODULE && SINCE_V2.contains(&name));
    if v2 {
        2
    } else {
        1
    }
}

/// Reactor exports the daemon calls, with their signatures.
pub const INIT: &str = "kiln_init";
pub const TICK: &str = "kiln_tick";
pub const ON_MESSAGE: &str = "kiln_on_message";
pub const SELF_TEST: &str = "kiln_self_test";
pub const EXPORTS: &[(&str, &[ValType], &[ValType])] = &[
    (INIT, &[], &[I32]),
    (TICK, &[], &[I32]),
    (ON_MESSAGE, &[I32], &[I32]),
    (SELF_TEST, &[], &[I32]),
];

/// Largest stream name, telemetry payload and log line a guest may hand over.
pub const MAX_STREAM: usize = crate::names::MAX_NAME;
pub const MAX_PUBLISH: usize = 64 * 1024;
pub const MAX_LOG: usize = 4 * 1024;
/// Largest reply to a command (see [`crate::command`]).
pub const MAX_REPLY: usize = crate::command::MAX_DATA;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValType {
    I32,
    I64,
}
use ValType::{I32, I64};

/// Negative results of ABI calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// A pointer/length pair is outside the module's memory.
    OutOfBounds = -1,
    /// More than the ABI accepts (see `MAX_*`).
    TooLarge = -2,
    /// `message_*` outside `kiln_on_message`.
    NoMessage = -3,
    /// A stream name that `names::check` refuses (empty, not `[A-Za-z0-9._-]`), or a
    /// log level outside 0..=4, or a handle the module was not given.
    Invalid = -4,
    /// A capability (a serial port, GPIO lines or an I2C device by that name) the
    /// module was not granted, or a write to GPIO lines granted as inputs.
    Denied = -5,
    /// The device said no (an I/O error on a serial port, a GPIO chip, an I2C bus);
    /// the module may try again.
    Io = -6,
}

/// Log levels, as numbers on the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn from_abi(n: i32) -> Option<Self> {
        Some(match n {
            0 => Self::Error,
            1 => Self::Warn,
            2 => Self::Info,
            3 => Self::Debug,
            4 => Self::Trace,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_needs_the_abi_of_its_newest_import() {
        assert_eq!(needed([]), 1);
        assert_eq!(
            needed([(MODULE, "publish"), ("wasi_snapshot_preview1", "fd_write")]),
            1
        );
        assert_eq!(needed([(MODULE, "publish"), (MODULE, "gpio_read")]), 2);
        // Another module's import of the same name is not the kiln ABI's.
        assert_eq!(needed([("env", "reply")]), 1);
        for name in SINCE_V2 {
            assert!(
                IMPORTS.iter().any(|(n, ..)| n == name),
                "{name} is not an import"
            );
        }
        assert!(needed([(MODULE, "file_read")]) <= crate::KILN_ABI_VERSION);
    }
}
