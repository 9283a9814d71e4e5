//! The host side of the kiln ABI (import module `kiln`, see `kiln_protocol::abi`).
//! Every guest pointer is bounds-checked against the module's memory; a bad one is
//! answered with a negative status, never a host panic.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_protocol::abi::{self, Level, Status, MAX_LOG, MAX_PUBLISH, MAX_STREAM};
use kiln_protocol::capability::{MAX_FILE_READ, MAX_I2C_IO, MAX_SERIAL_IO};
use kiln_protocol::names::{self, Kind};
use kiln_protocol::worker::{LogSource, Reply};
use wasmer::{AsStoreMut, Exports, Function, FunctionEnv, FunctionEnvMut, Imports, Memory, Store};

/// Where a module's records go: frames to the supervisor in a worker, stderr in
/// `kilnd run`.
pub type Emit = Arc<dyn Fn(Reply) + Send + Sync>;

pub struct KilnEnv {
    pub memory: Option<Memory>,
    pub config: Vec<u8>,
    /// The message being delivered by `kiln_on_message`: topic and bytes.
    pub message: Option<(String, Vec<u8>)>,
    pub emit: Emit,
    pub started: Instant,
    /// The hardware granted to the module, opened; a handle is an index into its
    /// kind's list.
    pub devices: crate::sandbox::devices::Devices,
}

impl KilnEnv {
    pub fn new(config: Vec<u8>, emit: Emit) -> Self {
        Self {
            memory: None,
            config,
            message: None,
            emit,
            started: Instant::now(),
            devices: Default::default(),
        }
    }
}

/// The `kiln` import namespace bound to `env`.
pub fn imports(store: &mut Store, env: &FunctionEnv<KilnEnv>) -> Imports {
    let mut ns = Exports::new();
    ns.insert("publish", Function::new_typed_with_env(store, env, publish));
    ns.insert("log", Function::new_typed_with_env(store, env, log));
    ns.insert(
        "config_len",
        Function::new_typed_with_env(store, env, config_len),
    );
    ns.insert(
        "config_read",
        Function::new_typed_with_env(store, env, config_read),
    );
    ns.insert(
        "message_len",
        Function::new_typed_with_env(store, env, message_len),
    );
    ns.insert(
        "message_read",
        Function::new_typed_with_env(store, env, message_read),
    );
    ns.insert(
        "message_topic",
        Function::new_typed_with_env(store, env, message_topic),
    );
    ns.insert(
        "monotonic_ns",
        Function::new_typed_with_env(store, env, monotonic_ns),
    );
    ns.insert("wall_ns", Function::new_typed_with_env(store, env, wall_ns));
    ns.insert("reply", Function::new_typed_with_env(store, env, reply));
    ns.insert(
        "serial_open",
        Function::new_typed_with_env(store, env, serial_open),
    );
    ns.insert(
        "serial_read",
        Function::new_typed_with_env(store, env, serial_read),
    );
    ns.insert(
        "serial_write",
        Function::new_typed_with_env(store, env, serial_write),
    );
    ns.insert(
        "gpio_open",
        Function::new_typed_with_env(store, env, gpio_open),
    );
    ns.insert(
        "gpio_read",
        Function::new_typed_with_env(store, env, gpio_read),
    );
    ns.insert(
        "gpio_write",
        Function::new_typed_with_env(store, env, gpio_write),
    );
    ns.insert(
        "i2c_open",
        Function::new_typed_with_env(store, env, i2c_open),
    );
    ns.insert(
        "i2c_read",
        Function::new_typed_with_env(store, env, i2c_read),
    );
    ns.insert(
        "i2c_write",
        Function::new_typed_with_env(store, env, i2c_write),
    );
    ns.insert(
        "file_open",
        Function::new_typed_with_env(store, env, file_open),
    );
    ns.insert(
        "file_read",
        Function::new_typed_with_env(store, env, file_read),
    );
    let mut imports = Imports::new();
    imports.register_namespace(abi::MODULE, ns);
    imports
}

fn read(ctx: &FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32, max: usize) -> Result<Vec<u8>, i32> {
    let len = usize::try_from(len).map_err(|_| Status::OutOfBounds as i32)?;
    if len > max {
        return Err(Status::TooLarge as i32);
    }
    let ptr = u32::try_from(ptr).map_err(|_| Status::OutOfBounds as i32)?;
    let memory = ctx
        .data()
        .memory
        .as_ref()
        .ok_or(Status::OutOfBounds as i32)?;
    let mut buf = vec![0u8; len];
    memory
        .view(ctx)
        .read(u64::from(ptr), &mut buf)
        .map_err(|_| Status::OutOfBounds as i32)?;
    Ok(buf)
}

/// Copies as much of `bytes` as fits into the guest buffer; returns the count.
fn write(ctx: &mut FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32, bytes: &[u8]) -> i32 {
    let (Ok(ptr), Ok(len)) = (u32::try_from(ptr), usize::try_from(len)) else {
        return Status::OutOfBounds as i32;
    };
    let n = bytes.len().min(len);
    let (env, store) = ctx.data_and_store_mut();
    let Some(memory) = env.memory.as_ref() else {
        return Status::OutOfBounds as i32;
    };
    match memory.view(&store).write(u64::from(ptr), &bytes[..n]) {
        Ok(()) => n as i32,
        Err(_) => Status::OutOfBounds as i32,
    }
}

fn publish(
    ctx: FunctionEnvMut<'_, KilnEnv>,
    stream_ptr: i32,
    stream_len: i32,
    data_ptr: i32,
    data_len: i32,
) -> i32 {
    let stream = match read(&ctx, stream_ptr, stream_len, MAX_STREAM) {
        Ok(s) => s,
        Err(status) => return status,
    };
    // A stream becomes a topic level: the same rule as every other name.
    let Ok(stream) = String::from_utf8(stream) else {
        return Status::Invalid as i32;
    };
    if names::check(Kind::Stream, &stream).is_err() {
        return Status::Invalid as i32;
    }
    let data = match read(&ctx, data_ptr, data_len, MAX_PUBLISH) {
        Ok(d) => d,
        Err(status) => return status,
    };
    (ctx.data().emit)(Reply::Telemetry { stream, data });
    0
}

/// The reply to a command from the fleet, only while one is being delivered.
fn reply(ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let in_command = ctx
        .data()
        .message
        .as_ref()
        .is_some_and(|(topic, _)| topic.starts_with(kiln_protocol::command::MESSAGE_PREFIX));
    if !in_command {
        return Status::NoMessage as i32;
    }
    let data = match read(&ctx, ptr, len, abi::MAX_REPLY) {
        Ok(d) => d,
        Err(status) => return status,
    };
    (ctx.data().emit)(Reply::Answer { data });
    0
}

/// The handle (index) of the grant named by the module's `ptr`/`len` among `names`.
fn open_named<'n>(
    ctx: &FunctionEnvMut<'_, KilnEnv>,
    ptr: i32,
    len: i32,
    mut names: impl Iterator<Item = &'n str>,
) -> i32 {
    let name = match read(ctx, ptr, len, MAX_STREAM) {
        Ok(n) => n,
        Err(status) => return status,
    };
    names
        .position(|n| n.as_bytes() == name.as_slice())
        .map_or(Status::Denied as i32, |i| i as i32)
}

/// The grant a module's handle names in `list` (its index), if it names one.
fn granted<T>(list: &[T], handle: i32) -> Option<&T> {
    usize::try_from(handle).ok().and_then(|h| list.get(h))
}

/// A handle to the serial port granted under `name`.
fn serial_open(ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let names = ctx.data().devices.serial.iter().map(|p| p.name.as_str());
    open_named(&ctx, ptr, len, names)
}

/// A handle to the GPIO lines granted under `name`.
fn gpio_open(ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let names = ctx.data().devices.gpio.iter().map(|l| l.name.as_str());
    open_named(&ctx, ptr, len, names)
}

/// The lines' values, bit `i` for the grant's `i`th line (at most 16 lines, so the
/// result is never negative).
fn gpio_read(ctx: FunctionEnvMut<'_, KilnEnv>, handle: i32) -> i32 {
    let Some(lines) = granted(&ctx.data().devices.gpio, handle) else {
        return Status::Invalid as i32;
    };
    match lines.read() {
        Ok(bits) => bits as i32,
        Err(_) => Status::Io as i32,
    }
}

/// Drives the output lines whose bit is set in `mask` to their bit in `values`.
fn gpio_write(ctx: FunctionEnvMut<'_, KilnEnv>, handle: i32, values: i32, mask: i32) -> i32 {
    let Some(lines) = granted(&ctx.data().devices.gpio, handle) else {
        return Status::Invalid as i32;
    };
    if !lines.output {
        return Status::Denied as i32;
    }
    match lines.write(values as u32 as u64, mask as u32 as u64) {
        Ok(()) => 0,
        Err(_) => Status::Io as i32,
    }
}

/// A handle to the I2C device granted under `name`.
fn i2c_open(ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let names = ctx.data().devices.i2c.iter().map(|d| d.name.as_str());
    open_named(&ctx, ptr, len, names)
}

/// A handle to the file granted under `name`.
fn file_open(ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let names = ctx.data().devices.files.iter().map(|f| f.name.as_str());
    open_named(&ctx, ptr, len, names)
}

/// The file read again from its start into the module's memory, at most `len` bytes.
fn file_read(mut ctx: FunctionEnvMut<'_, KilnEnv>, handle: i32, ptr: i32, len: i32) -> i32 {
    let n = usize::try_from(len).unwrap_or(0).min(MAX_FILE_READ);
    if !fits(&ctx, ptr, n) {
        return Status::OutOfBounds as i32;
    }
    let mut buf = vec![0u8; n];
    let got = match granted(&ctx.data().devices.files, handle) {
        Some(file) => file.read(&mut buf),
        None => return Status::Invalid as i32,
    };
    match got {
        Ok(got) => write(&mut ctx, ptr, got as i32, &buf[..got]),
        Err(_) => Status::Io as i32,
    }
}

/// The register a module names: 0 to 255.
fn register(reg: i32) -> Option<u8> {
    u8::try_from(reg).ok()
}

/// Reads `len` (1 to 32) bytes from register `reg` into the module's memory.
fn i2c_read(
    mut ctx: FunctionEnvMut<'_, KilnEnv>,
    handle: i32,
    reg: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let (Some(reg), Ok(n)) = (register(reg), usize::try_from(len)) else {
        return Status::Invalid as i32;
    };
    if n == 0 || n > MAX_I2C_IO {
        return Status::TooLarge as i32;
    }
    // Checked before the bus is read: nothing is taken from a device that cannot
    // be handed over.
    if !fits(&ctx, ptr, n) {
        return Status::OutOfBounds as i32;
    }
    let mut buf = [0u8; MAX_I2C_IO];
    let got = match granted(&ctx.data().devices.i2c, handle) {
        Some(device) => device.read(reg, &mut buf[..n]),
        None => return Status::Invalid as i32,
    };
    match got {
        Ok(got) => write(&mut ctx, ptr, got as i32, &buf[..got]),
        Err(_) => Status::Io as i32,
    }
}

/// Writes `len` (1 to 32) bytes from the module's memory to register `reg`.
fn i2c_write(ctx: FunctionEnvMut<'_, KilnEnv>, handle: i32, reg: i32, ptr: i32, len: i32) -> i32 {
    let Some(reg) = register(reg) else {
        return Status::Invalid as i32;
    };
    let data = match read(&ctx, ptr, len, MAX_I2C_IO) {
        Ok(d) => d,
        Err(status) => return status,
    };
    if data.is_empty() {
        return Status::Invalid as i32;
    }
    match granted(&ctx.data().devices.i2c, handle) {
        Some(device) => match device.write(reg, &data) {
            Ok(n) => n as i32,
            Err(_) => Status::Io as i32,
        },
        None => Status::Invalid as i32,
    }
}

/// Whether `len` bytes at `ptr` are inside the module's memory: checked before a
/// port is read, so no byte is taken from it that cannot be handed over.
fn fits(ctx: &FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: usize) -> bool {
    let (Ok(ptr), Some(memory)) = (u64::try_from(ptr), ctx.data().memory.as_ref()) else {
        return false;
    };
    ptr.checked_add(len as u64)
        .is_some_and(|end| end <= memory.view(ctx).data_size())
}

fn serial_read(
    mut ctx: FunctionEnvMut<'_, KilnEnv>,
    handle: i32,
    ptr: i32,
    len: i32,
    wait_ms: i32,
) -> i32 {
    let n = usize::try_from(len).unwrap_or(0).min(MAX_SERIAL_IO);
    if !fits(&ctx, ptr, n) {
        return Status::OutOfBounds as i32;
    }
    let mut buf = vec![0u8; n];
    let got = match ctx.data_mut().devices.serial.get_mut(handle as usize) {
        Some(port) if handle >= 0 => port.read(&mut buf, wait_ms.max(0) as u32),
        _ => return Status::Invalid as i32,
    };
    match got {
        Ok(got) => write(&mut ctx, ptr, got as i32, &buf[..got]),
        Err(_) => Status::Io as i32,
    }
}

fn serial_write(
    mut ctx: FunctionEnvMut<'_, KilnEnv>,
    handle: i32,
    ptr: i32,
    len: i32,
    wait_ms: i32,
) -> i32 {
    let data = match read(&ctx, ptr, len, MAX_SERIAL_IO) {
        Ok(d) => d,
        Err(status) => return status,
    };
    match ctx.data_mut().devices.serial.get_mut(handle as usize) {
        Some(port) if handle >= 0 => match port.write(&data, wait_ms.max(0) as u32) {
            Ok(n) => n as i32,
            Err(_) => Status::Io as i32,
        },
        _ => Status::Invalid as i32,
    }
}

fn log(ctx: FunctionEnvMut<'_, KilnEnv>, level: i32, ptr: i32, len: i32) -> i32 {
    let Some(level) = Level::from_abi(level) else {
        return Status::Invalid as i32;
    };
    let line = match read(&ctx, ptr, len, MAX_LOG) {
        Ok(l) => l,
        Err(status) => return status,
    };
    (ctx.data().emit)(Reply::Log {
        level,
        source: LogSource::Abi,
        line: String::from_utf8_lossy(&line).into_owned(),
    });
    0
}

fn config_len(ctx: FunctionEnvMut<'_, KilnEnv>) -> i32 {
    ctx.data().config.len() as i32
}

fn config_read(mut ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    let config = ctx.data().config.clone();
    write(&mut ctx, ptr, len, &config)
}

fn message_len(ctx: FunctionEnvMut<'_, KilnEnv>) -> i32 {
    match &ctx.data().message {
        Some((_, data)) => data.len() as i32,
        None => Status::NoMessage as i32,
    }
}

fn message_read(mut ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    match ctx.data().message.as_ref().map(|(_, d)| d.clone()) {
        Some(data) => write(&mut ctx, ptr, len, &data),
        None => Status::NoMessage as i32,
    }
}

fn message_topic(mut ctx: FunctionEnvMut<'_, KilnEnv>, ptr: i32, len: i32) -> i32 {
    match ctx.data().message.as_ref().map(|(t, _)| t.clone()) {
        Some(topic) => write(&mut ctx, ptr, len, topic.as_bytes()),
        None => Status::NoMessage as i32,
    }
}

fn monotonic_ns(ctx: FunctionEnvMut<'_, KilnEnv>) -> i64 {
    ctx.data().started.elapsed().as_nanos() as i64
}

fn wall_ns(_ctx: FunctionEnvMut<'_, KilnEnv>) -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Records the instance's exported memory so the ABI can read and write it.
pub fn bind_memory(store: &mut impl AsStoreMut, env: &FunctionEnv<KilnEnv>, memory: Memory) {
    env.as_mut(store).memory = Some(memory);
}
