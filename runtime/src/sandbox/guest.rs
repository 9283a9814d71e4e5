//! One running module: a verified artifact instantiated with WASI (its sandboxed file
//! system, args and env) and the kiln host ABI, under its limits. `kilnd run` and the
//! worker processes both drive modules through this type.

use std::time::Instant;

use kiln_protocol::abi;
use kiln_protocol::worker::{Done, Stop};
#[cfg(feature = "wasi")]
use kiln_protocol::worker::{LogSource, Reply};
use wasmer::{Function, FunctionEnv, Imports, Instance, Store, Type, Value};

use crate::exit::{Code, Failure};
use crate::sandbox::abi::{Emit, KilnEnv};
#[cfg(feature = "wasi")]
use crate::sandbox::capture::LineCapture;
use crate::sandbox::load::Loaded;
use crate::sandbox::wasi::{self, WasiOptions};

const REMAINING: &str = "wasmer_metering_remaining_points";
const EXHAUSTED: &str = "wasmer_metering_points_exhausted";

pub struct GuestOptions {
    pub wasi: WasiOptions,
    pub config: Vec<u8>,
    /// Fuel per call; `Some` only for artifacts compiled with metering.
    pub fuel: Option<u64>,
    /// Where telemetry and log records go.
    pub emit: Emit,
    /// Capture stdout/stderr as log records (workers) instead of passing them through
    /// to kilnd's own (`kilnd run`).
    pub capture_stdio: bool,
    /// The hardware granted to the module, opened before confinement.
    pub devices: crate::sandbox::devices::Devices,
}

pub struct Guest {
    pub name: String,
    store: Store,
    instance: Instance,
    kiln: FunctionEnv<KilnEnv>,
    fuel: Option<u64>,
    #[cfg(feature = "wasi")]
    captures: Vec<LineCapture>,
    /// Where instantiation spent its time, step by step.
    pub steps: Steps,
}

/// Named durations of the steps of one operation, in order.
#[derive(Debug, Default, Clone)]
pub struct Steps {
    last: Option<Instant>,
    pub done: Vec<(&'static str, std::time::Duration)>,
}

impl Steps {
    fn start() -> Self {
        Self {
            last: Some(Instant::now()),
            done: Vec::new(),
        }
    }

    /// Ends the step running since the last mark.
    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now) {
            self.done.push((step, now - last));
        }
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, d)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {:.2} ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// A module that imports a capability's functions must have been granted it: refused
/// at load, naming the capability and the grant that would allow it.
fn check_capabilities(
    module: &wasmer::Module,
    devices: &crate::sandbox::devices::Devices,
) -> Result<(), String> {
    for import in module.imports().filter(|i| i.module() == abi::MODULE) {
        let Some(capability) = kiln_protocol::capability::needed_by(import.name()) else {
            continue;
        };
        if !devices.has(capability) {
            return Err(format!(
                "imports `kiln`.`{}`, but it is not granted the `{capability}` capability (kilnd.toml: [[{capability}]] with this module in `modules`)",
                import.name()
            ));
        }
    }
    Ok(())
}

impl Guest {
    /// Instantiates `loaded`, runs WASI's `_initialize` if the module has one (but not
    /// `kiln_init`, which is a call like any other).
    pub fn instantiate(loaded: Loaded, opts: GuestOptions) -> Result<Self, Failure> {
        let name = loaded.manifest.name.clone();
        let fail = |why: String| Failure::new(Code::LoadFailed, format!("module `{name}` {why}"));
        let mut steps = Steps::start();
        wasi::check_imports(&name, &loaded.module)?;
        check_capabilities(&loaded.module, &opts.devices).map_err(&fail)?;
        check_reactor_exports(&loaded.module).map_err(&fail)?;
        let mut store = Store::new(loaded.engine.clone());
        let module = loaded.module;
        // Past check_imports, anything that is not the kiln ABI is WASI, which the lean
        // build has refused there.
        let uses_wasi = module.imports().any(|i| i.module() != abi::MODULE);
        #[cfg(not(feature = "wasi"))]
        let mut imports = {
            debug_assert!(!uses_wasi, "check_imports lets no WASI import through");
            let _ = (&opts.wasi, opts.capture_stdio);
            Imports::new()
        };
        // A module that imports no WASI gets none: no file table, no stdio.
        #[cfg(feature = "wasi")]
        let mut captures = Vec::new();
        #[cfg(feature = "wasi")]
        let (wasi_env, mut imports) = if uses_wasi {
            let stdio = if opts.capture_stdio {
                let (stdio, lines) = capture_stdio(&opts.emit);
                captures = lines;
                stdio
            } else {
                wasi::Stdio::PassThrough
            };
            let env = wasi::WasiEnv::new(&name, &opts.wasi, stdio)?;
            let env = FunctionEnv::new(&mut store, env);
            let imports = wasi::imports(&mut store, &env);
            steps.mark("wasi env");
            (Some(env), imports)
        } else {
            (None, Imports::new())
        };
        let mut kiln_env = KilnEnv::new(opts.config, opts.emit.clone());
        kiln_env.devices = opts.devices;
        let kiln = FunctionEnv::new(&mut store, kiln_env);
        for ((ns, name), ext) in crate::sandbox::abi::imports(&mut store, &kiln).into_iter() {
            imports.define(&ns, &name, ext);
        }
        steps.mark("imports");
        let instance = Instance::new(&mut store, &module, &imports)
            .map_err(|e| fail(format!("cannot be instantiated: {e}")))?;
        steps.mark("instance");
        if let Ok(memory) = instance.exports.get_memory("memory") {
            crate::sandbox::abi::bind_memory(&mut store, &kiln, memory.clone());
        }
        #[cfg(feature = "wasi")]
        if let (Some(env), Ok(memory)) = (&wasi_env, instance.exports.get_memory("memory")) {
            env.as_mut(&mut store).memory = Some(memory.clone());
        }
        let mut guest = Self {
            name: name.clone(),
            store,
            instance,
            kiln,
            fuel: opts.fuel,
            #[cfg(feature = "wasi")]
            captures,
            steps,
        };
        if guest.instance.exports.get_function("_initialize").is_ok() {
            guest
                .call("_initialize", &[])
                .map_err(|stop| fail(format!("failed in _initialize: {stop}")))?;
        }
        Ok(guest)
    }

    pub fn exports(&self, name: &str) -> bool {
        self.instance.exports.get_function(name).is_ok()
    }

    /// Current size of the module's memory in pages.
    pub fn memory_pages(&self) -> u32 {
        self.instance
            .exports
            .get_memory("memory")
            .map_or(0, |m| m.view(&self.store).size().0)
    }

    /// Calls a reactor export, with the fuel reset to the per-call budget first.
    pub fn call(&mut self, export: &str, args: &[Value]) -> Result<Done, Stop> {
        let func: Function = self
            .instance
            .exports
            .get_function(export)
            .map_err(|e| Stop::Lost(format!("no export {export}: {e}")))?
            .clone();
        if let Some(budget) = self.fuel {
            self.set_fuel(budget);
        }
        let started = Instant::now();
        let result = func.call(&mut self.store, args);
        let elapsed_us = started.elapsed().as_micros() as u64;
        let fuel_used = self.fuel.map(|budget| budget - self.remaining_fuel());
        let status = match result {
            Ok(values) => match values.first() {
                Some(Value::I32(n)) => *n,
                _ => 0,
            },
            Err(err) => return Err(self.classify(export, err)),
        };
        Ok(Done {
            status,
            elapsed_us,
            fuel_used,
            memory_pages: self.memory_pages(),
        })
    }

    /// Runs a command's `_start`; its WASI exit code is `Done::status`.
    pub fn run_start(&mut self) -> Result<Done, Stop> {
        let started = Instant::now();
        match self.call("_start", &[]) {
            Err(Stop::Exited(code)) => Ok(Done {
                status: code,
                elapsed_us: started.elapsed().as_micros() as u64,
                fuel_used: None,
                memory_pages: self.memory_pages(),
            }),
            other => other,
        }
    }

    /// A tick, after the edges of the module's GPIO inputs queued since the last one,
    /// each delivered to `kiln_on_message` as a message on `gpio/NAME` (a module
    /// without it only polls).
    pub fn tick(&mut self) -> Result<Done, Stop> {
        if self.exports(abi::ON_MESSAGE) {
            let edges = self.kiln.as_ref(&self.store).devices.edge_messages();
            for (topic, data) in edges {
                self.deliver(topic, data)?;
            }
        }
        self.call(abi::TICK, &[])
    }

    /// Delivers a message through `kiln_on_message`.
    pub fn deliver(&mut self, topic: String, data: Vec<u8>) -> Result<Done, Stop> {
        let len = data.len() as i32;
        self.kiln.as_mut(&mut self.store).message = Some((topic, data));
        let done = self.call(abi::ON_MESSAGE, &[Value::I32(len)]);
        self.kiln.as_mut(&mut self.store).message = None;
        done
    }

    /// Ends the module in a process that exits next (a worker, `kilnd run`): captured
    /// output is flushed, and the rest (the module's memory, code and open files) is
    /// left to the kernel, which takes the whole process down at exit in one go
    /// rather than an unmap at a time.
    pub fn finish(self, _exit_code: Option<i32>) {
        #[cfg(feature = "wasi")]
        for capture in &self.captures {
            capture.flush_partial();
        }
        std::mem::forget(self);
    }

    fn set_fuel(&mut self, points: u64) {
        let exports = &self.instance.exports;
        if let Ok(g) = exports.get_global(REMAINING) {
            let _ = g.set(&mut self.store, Value::I64(points as i64));
        }
        if let Ok(g) = exports.get_global(EXHAUSTED) {
            let _ = g.set(&mut self.store, Value::I32(0));
        }
    }

    fn remaining_fuel(&mut self) -> u64 {
        if self.fuel_exhausted() {
            return 0;
        }
        match self.instance.exports.get_global(REMAINING) {
            Ok(g) => match g.get(&mut self.store) {
                Value::I64(n) => n as u64,
                _ => 0,
            },
            Err(_) => 0,
        }
    }

    fn fuel_exhausted(&mut self) -> bool {
        self.fuel.is_some()
            && matches!(
                self.instance
                    .exports
                    .get_global(EXHAUSTED)
                    .map(|g| g.get(&mut self.store)),
                Ok(Value::I32(n)) if n != 0
            )
    }

    fn classify(&mut self, export: &str, err: wasmer::RuntimeError) -> Stop {
        if self.fuel_exhausted() {
            return Stop::FuelExhausted {
                call: export.into(),
                budget: self.fuel.unwrap_or(0),
            };
        }
        #[cfg(not(feature = "wasi"))]
        return Stop::Trap {
            call: export.into(),
            message: wasi::trap_message(&err),
        };
        #[cfg(feature = "wasi")]
        match err.downcast::<wasi::Exit>() {
            Ok(wasi::Exit(code)) => Stop::Exited(code),
            Err(rt) => Stop::Trap {
                call: export.into(),
                message: wasi::trap_message(&rt),
            },
        }
    }
}

/// A reactor export with the wrong signature would fail on every call; refuse it once,
/// at start, naming the export and the signature the ABI wants.
fn check_reactor_exports(module: &wasmer::Module) -> Result<(), String> {
    for export in module.exports() {
        let Some((name, params, results)) = abi::EXPORTS
            .iter()
            .find(|(name, ..)| *name == export.name())
        else {
            continue;
        };
        let want = |tys: &[abi::ValType]| -> Vec<Type> {
            tys.iter()
                .map(|t| match t {
                    abi::ValType::I32 => Type::I32,
                    abi::ValType::I64 => Type::I64,
                })
                .collect()
        };
        let ok = match export.ty() {
            wasmer::ExternType::Function(f) => {
                f.params() == want(params) && f.results() == want(results)
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "exports `{name}` as {:?}; kiln ABI v{} wants a function {:?} -> {:?}",
                export.ty(),
                kiln_protocol::KILN_ABI_VERSION,
                params,
                results
            ));
        }
    }
    Ok(())
}

/// Routes the module's stdout and stderr into log records, line by line.
#[cfg(feature = "wasi")]
fn capture_stdio(emit: &Emit) -> (wasi::Stdio, Vec<LineCapture>) {
    let line = |source: LogSource| {
        let emit = emit.clone();
        let level = match source {
            LogSource::Stderr => abi::Level::Warn,
            _ => abi::Level::Info,
        };
        LineCapture::new(std::sync::Arc::new(move |line| {
            emit(Reply::Log {
                level,
                source,
                line,
            })
        }))
    };
    let (stdout, stderr) = (line(LogSource::Stdout), line(LogSource::Stderr));
    let stdio = wasi::Stdio::Capture {
        stdout: std::sync::Arc::new(stdout.clone()),
        stderr: std::sync::Arc::new(stderr.clone()),
    };
    (stdio, vec![stdout, stderr])
}

/// Runs a command module to completion in this process (`kilnd run`); with
/// `timings`, prints where the time went on stderr.
pub fn run_command(loaded: Loaded, opts: GuestOptions, timings: bool) -> Result<i32, Failure> {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let split = format!(
        "read {:.2} ms, verify {:.2} ms, deserialize {:.2} ms",
        ms(loaded.read_time),
        ms(loaded.verify_time),
        ms(loaded.deserialize_time)
    );
    let started = Instant::now();
    let mut guest = Guest::instantiate(loaded, opts)?;
    let instantiate = ms(started.elapsed());
    let result = guest.run_start();
    if timings {
        let run = result
            .as_ref()
            .map_or(0.0, |d| d.elapsed_us as f64 / 1000.0);
        // One write: stderr is unbuffered, so eprintln! makes each piece of a formatted
        // line a write of its own (28 syscalls for these two lines).
        let lines = format!(
            "kilnd: timings: {split}, instantiate {instantiate:.2} ms, run {run:.2} ms\nkilnd: instantiate: {}\n",
            guest.steps
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), lines.as_bytes());
    }
    match result {
        Ok(done) => {
            guest.finish(Some(done.status));
            Ok(done.status)
        }
        Err(Stop::Trap { message, .. }) => {
            let name = guest.name.clone();
            guest.finish(None);
            Err(Failure::new(
                Code::Trap,
                format!("module `{name}` trapped: {message}"),
            ))
        }
        Err(stop) => {
            let name = guest.name.clone();
            guest.finish(None);
            Err(Failure::new(Code::Trap, format!("module `{name}` {stop}")))
        }
    }
}
