//! Write kiln reactor modules in safe Rust. The daemon calls your [`Reactor`] on its
//! schedule; you publish telemetry, log, and read your deployment's config through
//! the kiln host ABI (import module `kiln`, documented in `kiln_protocol::abi`).
//!
//! ```ignore
//! use kiln_guest::{telemetry, Reactor};
//!
//! struct Counter(u64);
//!
//! impl Reactor for Counter {
//!     fn init() -> Result<Self, String> {
//!         Ok(Counter(0))
//!     }
//!     fn tick(&mut self) -> Result<(), String> {
//!         self.0 += 1;
//!         telemetry!("count", "{}", self.0)
//!     }
//! }
//!
//! kiln_guest::reactor!(Counter);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip1 --release` (crate-type `cdylib`),
//! then `kiln compile`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod sys {
    #[link(wasm_import_module = "kiln")]
    extern "C" {
        pub fn publish(stream: *const u8, stream_len: i32, data: *const u8, data_len: i32) -> i32;
        pub fn log(level: i32, ptr: *const u8, len: i32) -> i32;
        pub fn config_len() -> i32;
        pub fn config_read(ptr: *mut u8, len: i32) -> i32;
        pub fn message_len() -> i32;
        pub fn message_read(ptr: *mut u8, len: i32) -> i32;
        pub fn message_topic(ptr: *mut u8, len: i32) -> i32;
        pub fn monotonic_ns() -> i64;
        pub fn wall_ns() -> i64;
        pub fn reply(ptr: *const u8, len: i32) -> i32;
        pub fn serial_open(name: *const u8, len: i32) -> i32;
        pub fn serial_read(port: i32, ptr: *mut u8, len: i32, wait_ms: i32) -> i32;
        pub fn serial_write(port: i32, ptr: *const u8, len: i32, wait_ms: i32) -> i32;
        pub fn gpio_open(name: *const u8, len: i32) -> i32;
        pub fn gpio_read(lines: i32) -> i32;
        pub fn gpio_write(lines: i32, values: i32, mask: i32) -> i32;
        pub fn i2c_open(name: *const u8, len: i32) -> i32;
        pub fn i2c_read(device: i32, reg: i32, ptr: *mut u8, len: i32) -> i32;
        pub fn i2c_write(device: i32, reg: i32, ptr: *const u8, len: i32) -> i32;
        pub fn file_open(name: *const u8, len: i32) -> i32;
        pub fn file_read(file: i32, ptr: *mut u8, len: i32) -> i32;
    }
}

/// A negative status from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    OutOfBounds,
    TooLarge,
    NoMessage,
    Invalid,
    /// A capability (a serial port, GPIO lines or an I2C device by that name) not
    /// granted to the module, or a write to lines granted as inputs.
    Denied,
    /// The device reported an I/O error.
    Io,
    Other(i32),
}

impl Error {
    fn check(status: i32) -> Result<i32, Error> {
        match status {
            n if n >= 0 => Ok(n),
            -1 => Err(Error::OutOfBounds),
            -2 => Err(Error::TooLarge),
            -3 => Err(Error::NoMessage),
            -4 => Err(Error::Invalid),
            -5 => Err(Error::Denied),
            -6 => Err(Error::Io),
            n => Err(Error::Other(n)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfBounds => f.write_str("buffer outside the module's memory"),
            Error::TooLarge => f.write_str("larger than the kiln ABI accepts"),
            Error::NoMessage => f.write_str("no message is being delivered"),
            Error::Invalid => f.write_str("invalid argument"),
            Error::Denied => f.write_str("not granted to this module"),
            Error::Io => f.write_str("the device reported an I/O error"),
            Error::Other(n) => write!(f, "kiln ABI status {n}"),
        }
    }
}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

/// Publishes one telemetry record on `stream` (at most 64 bytes of name, 64 KiB of data).
pub fn publish(stream: &str, data: &[u8]) -> Result<(), Error> {
    // SAFETY: both pointers come from live slices whose lengths are passed with them.
    let status = unsafe {
        sys::publish(
            stream.as_ptr(),
            stream.len() as i32,
            data.as_ptr(),
            data.len() as i32,
        )
    };
    Error::check(status).map(|_| ())
}

/// Publishes a formatted telemetry record: `telemetry!("temp", "{:.1}", t)`.
#[macro_export]
macro_rules! telemetry {
    ($stream:expr, $($arg:tt)*) => {
        $crate::publish($stream, ::std::format!($($arg)*).as_bytes()).map_err(::std::string::String::from)
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
    Trace = 4,
}

/// Sends a log line to the daemon (at most 4 KiB).
pub fn log(level: Level, line: &str) {
    // SAFETY: pointer and length of a live str.
    unsafe {
        sys::log(level as i32, line.as_ptr(), line.len() as i32);
    }
}

/// `info!("started with {}", x)`; also `warn!`, `error!`, `debug!`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($arg)*)) };
}

/// The config bytes set in this module's deployment (empty when none).
pub fn config() -> Vec<u8> {
    // SAFETY: the host copies at most `buf.len()` bytes into `buf`.
    unsafe {
        let len = sys::config_len().max(0) as usize;
        let mut buf = vec![0u8; len];
        let n = sys::config_read(buf.as_mut_ptr(), len as i32).max(0) as usize;
        buf.truncate(n);
        buf
    }
}

/// `key=value` lines of the config, for the common case of a small text config.
pub fn config_value(key: &str) -> Option<String> {
    let config = config();
    let text = String::from_utf8_lossy(&config);
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// Time since the worker started; never goes backwards.
pub fn monotonic() -> Duration {
    // SAFETY: no arguments.
    Duration::from_nanos(unsafe { sys::monotonic_ns() }.max(0) as u64)
}

/// The device's wall clock.
pub fn wall() -> SystemTime {
    // SAFETY: no arguments.
    UNIX_EPOCH + Duration::from_nanos(unsafe { sys::wall_ns() }.max(0) as u64)
}

/// A serial port kilnd.toml grants this module (`[[serial]]`): kilnd opens it and
/// sets its baud and framing; the module moves bytes. A module that uses it without
/// a grant is refused at load.
#[derive(Debug)]
pub struct Serial(i32);

impl Serial {
    /// The port granted under `name`; `Error::Denied` if there is none.
    pub fn open(name: &str) -> Result<Self, Error> {
        // SAFETY: pointer and length of a live str.
        let handle = unsafe { sys::serial_open(name.as_ptr(), name.len() as i32) };
        Error::check(handle).map(Serial)
    }

    /// Bytes read into `buf` (at most 4096 a call), 0 if none came within `wait`
    /// (at most 5 s; keep it under the module's `timeout_ms`).
    pub fn read(&self, buf: &mut [u8], wait: Duration) -> Result<usize, Error> {
        let wait = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { sys::serial_read(self.0, buf.as_mut_ptr(), buf.len() as i32, wait) };
        Error::check(n).map(|n| n as usize)
    }

    /// Bytes the port took (at most 4096 a call), 0 if none within `wait`.
    pub fn write(&self, data: &[u8], wait: Duration) -> Result<usize, Error> {
        let wait = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pointer and length of a live slice.
        let n = unsafe { sys::serial_write(self.0, data.as_ptr(), data.len() as i32, wait) };
        Error::check(n).map(|n| n as usize)
    }
}

/// GPIO lines kilnd.toml grants this module (`[[gpio]]`), all inputs or all outputs:
/// bit `i` of a value is the grant's `i`th line (at most 16).
#[derive(Debug)]
pub struct Gpio(i32);

impl Gpio {
    /// The lines granted under `name`; `Error::Denied` if there are none.
    pub fn open(name: &str) -> Result<Self, Error> {
        // SAFETY: pointer and length of a live str.
        let handle = unsafe { sys::gpio_open(name.as_ptr(), name.len() as i32) };
        Error::check(handle).map(Gpio)
    }

    /// The lines' values.
    pub fn read(&self) -> Result<u16, Error> {
        // SAFETY: a handle and no memory.
        Error::check(unsafe { sys::gpio_read(self.0) }).map(|bits| bits as u16)
    }

    /// Drives the lines set in `mask` to their bit in `values` (`Error::Denied` for
    /// inputs).
    pub fn write(&self, values: u16, mask: u16) -> Result<(), Error> {
        // SAFETY: a handle and two numbers.
        Error::check(unsafe { sys::gpio_write(self.0, values.into(), mask.into()) }).map(|_| ())
    }
}

/// An I2C device kilnd.toml grants this module (`[[i2c]]`, one bus and address):
/// register reads and writes of 1 byte (SMBus byte data) to 32 (I2C block).
#[derive(Debug)]
pub struct I2c(i32);

impl I2c {
    /// The device granted under `name`; `Error::Denied` if there is none.
    pub fn open(name: &str) -> Result<Self, Error> {
        // SAFETY: pointer and length of a live str.
        let handle = unsafe { sys::i2c_open(name.as_ptr(), name.len() as i32) };
        Error::check(handle).map(I2c)
    }

    /// Fills `buf` (1 to 32 bytes) from register `reg`; returns how many came.
    pub fn read(&self, reg: u8, buf: &mut [u8]) -> Result<usize, Error> {
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { sys::i2c_read(self.0, reg.into(), buf.as_mut_ptr(), buf.len() as i32) };
        Error::check(n).map(|n| n as usize)
    }

    /// Writes `data` (1 to 32 bytes) to register `reg`.
    pub fn write(&self, reg: u8, data: &[u8]) -> Result<usize, Error> {
        // SAFETY: pointer and length of a live slice.
        let n = unsafe { sys::i2c_write(self.0, reg.into(), data.as_ptr(), data.len() as i32) };
        Error::check(n).map(|n| n as usize)
    }
}

/// A file kilnd.toml grants this module read-only (`[[file]]`), such as an IIO
/// sensor's attribute under `/sys`: each read is the file as it is now.
#[derive(Debug)]
pub struct GrantedFile(i32);

impl GrantedFile {
    /// The file granted under `name`; `Error::Denied` if there is none.
    pub fn open(name: &str) -> Result<Self, Error> {
        // SAFETY: pointer and length of a live str.
        let handle = unsafe { sys::file_open(name.as_ptr(), name.len() as i32) };
        Error::check(handle).map(GrantedFile)
    }

    /// The file from its start, at most `buf.len()` (and 4096) bytes.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Error> {
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { sys::file_read(self.0, buf.as_mut_ptr(), buf.len() as i32) };
        Error::check(n).map(|n| n as usize)
    }
}

/// A message routed to this module: `topic` is `module/stream` of its sender,
/// `command/<topic>` for a command from the fleet (`kiln send`), or `gpio/<name>` for
/// an edge on its GPIO inputs (`{"line":0,"edge":"rising","ns":123}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub data: Vec<u8>,
}

impl Message {
    /// The command's topic, if this is a command from the fleet.
    pub fn command(&self) -> Option<&str> {
        self.topic.strip_prefix("command/")
    }
}

/// The reply to the command being delivered (at most 16 KiB; the last call counts),
/// which `kiln send` prints with `on_message`'s result. Outside a command it is
/// `Error` no-message.
pub fn reply(data: &[u8]) -> Result<(), Error> {
    // SAFETY: pointer and length of a live slice.
    let status = unsafe { sys::reply(data.as_ptr(), data.len() as i32) };
    Error::check(status).map(|_| ())
}

fn current_message() -> Result<Message, Error> {
    // SAFETY: the host copies at most the given lengths into the buffers.
    unsafe {
        let len = Error::check(sys::message_len())? as usize;
        let mut data = vec![0u8; len];
        let n = Error::check(sys::message_read(data.as_mut_ptr(), len as i32))? as usize;
        data.truncate(n);
        let mut topic = vec![0u8; 256];
        let n = Error::check(sys::message_topic(topic.as_mut_ptr(), 256))? as usize;
        topic.truncate(n);
        Ok(Message {
            topic: String::from_utf8_lossy(&topic).into_owned(),
            data,
        })
    }
}

/// A module the daemon drives. An `Err` is logged; from `init` it fails the start,
/// from `tick` it is reported as a failed tick.
pub trait Reactor: Sized + Send + 'static {
    fn init() -> Result<Self, String>;
    fn tick(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn on_message(&mut self, _message: Message) -> Result<(), String> {
        Ok(())
    }
}

#[doc(hidden)]
pub mod __rt {
    use super::*;
    use std::sync::Mutex;

    fn report(what: &str, result: Result<(), String>) -> i32 {
        match result {
            Ok(()) => 0,
            Err(why) => {
                log(Level::Error, &format!("{what} failed: {why}"));
                1
            }
        }
    }

    pub fn init<R: Reactor>(cell: &Mutex<Option<R>>) -> i32 {
        let result = R::init().map(|r| {
            *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        report("init", result)
    }

    pub fn tick<R: Reactor>(cell: &Mutex<Option<R>>) -> i32 {
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        let result = match guard.as_mut() {
            Some(r) => r.tick(),
            None => Err("tick before a successful init".into()),
        };
        report("tick", result)
    }

    pub fn on_message<R: Reactor>(cell: &Mutex<Option<R>>) -> i32 {
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        let result = match (guard.as_mut(), current_message()) {
            (Some(r), Ok(m)) => r.on_message(m),
            (None, _) => Err("message before a successful init".into()),
            (_, Err(e)) => Err(e.to_string()),
        };
        report("on_message", result)
    }
}

/// Exports `kiln_init`, `kiln_tick` and `kiln_on_message` for a [`Reactor`] type.
#[macro_export]
macro_rules! reactor {
    ($ty:ty) => {
        static __KILN_REACTOR: ::std::sync::Mutex<::std::option::Option<$ty>> =
            ::std::sync::Mutex::new(::std::option::Option::None);

        #[no_mangle]
        pub extern "C" fn kiln_init() -> i32 {
            $crate::__rt::init(&__KILN_REACTOR)
        }

        #[no_mangle]
        pub extern "C" fn kiln_tick() -> i32 {
            $crate::__rt::tick(&__KILN_REACTOR)
        }

        #[no_mangle]
        pub extern "C" fn kiln_on_message(_len: i32) -> i32 {
            $crate::__rt::on_message(&__KILN_REACTOR)
        }
    };
}
