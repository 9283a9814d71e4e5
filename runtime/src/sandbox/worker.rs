//! A worker process (`kilnd worker`): runs exactly one module for the supervisor,
//! which is its parent. Requests arrive as frames on stdin, replies leave as frames on
//! stdout; the module's own stdout and stderr are captured into log frames, so nothing
//! else ever writes to the frame pipe. Anything fatal ends the process: a trap may
//! leave the instance in any state, and the supervisor starts a fresh one.
//!
//! A worker reads its Start frame and its artifact's bytes, then confines itself
//! ([`crate::sandbox::confine`]) while it still has one thread, and only then
//! verifies and deserializes the artifact and starts threads.

use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::abi;
use kiln_protocol::keys::{PublicKey, TrustedKeys};
use kiln_protocol::manifest::Manifest;
use kiln_protocol::worker::{
    read_frame, write_frame_unflushed, FromWorker, Ready, Reply, Request, StartSpec, Stop, ToWorker,
};

use crate::exit::{Code, Failure};
use crate::sandbox::abi::Emit;
use crate::sandbox::confine::{self, Policy, Report};
use crate::sandbox::devices::Devices;
use crate::sandbox::guest::{Guest, GuestOptions};
use crate::sandbox::limits;
use crate::sandbox::load::{load_bytes, read_bounded, MAX_LOCAL_ARTIFACT};
use crate::sandbox::wasi::{DirMapping, WasiOptions};

/// How long a record may wait in the worker's buffer before it is flushed to the
/// supervisor. A call's result flushes at once, and every record before it with it.
const RECORD_DELAY: Duration = Duration::from_millis(10);

/// Replies to the supervisor, buffered: records (telemetry and log lines) are written
/// into the buffer and flushed in batches, by the result of the call they belong to or
/// by the flusher thread within [`RECORD_DELAY`]; anything else is flushed at once.
/// One write per batch instead of one per record.
struct Replies {
    out: Mutex<(BufWriter<io::Stdout>, bool)>,
    dirty: Condvar,
}

impl Replies {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            out: Mutex::new((BufWriter::with_capacity(64 * 1024, io::stdout()), false)),
            dirty: Condvar::new(),
        })
    }

    /// Starts the thread that flushes records within [`RECORD_DELAY`]. A reactor's
    /// worker starts it once its first call has been answered, so that spawning it is
    /// not part of the start (the supervisor asks for the first tick as soon as `Ready`
    /// comes); a command's, before `_start` runs. A record written before waits in the
    /// buffer for the next reply that is not one (that first answer) or for this thread.
    fn start_flusher(self: &Arc<Self>) {
        let flusher = self.clone();
        std::thread::spawn(move || loop {
            let mut out = flusher.lock();
            while !out.1 {
                out = flusher.dirty.wait(out).unwrap_or_else(|e| e.into_inner());
            }
            drop(out);
            std::thread::sleep(RECORD_DELAY);
            flusher.flush();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BufWriter<io::Stdout>, bool)> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, reply: Reply) {
        // Texts of a stop come from wasmer and the module: bounded like log lines, so
        // the supervisor can read every reply under `MAX_REPLY`.
        let (reply, record) = match reply {
            Reply::Fatal(stop) => (Reply::Fatal(stop.bounded()), false),
            r @ (Reply::Telemetry { .. } | Reply::Log { .. }) => (r, true),
            other => (other, false),
        };
        let mut out = self.lock();
        let written = write_frame_unflushed(&mut out.0, &FromWorker::V1(reply));
        let flushed = if record {
            if !out.1 {
                out.1 = true;
                self.dirty.notify_one();
            }
            Ok(())
        } else {
            out.1 = false;
            out.0.flush()
        };
        if written.and(flushed).is_err() {
            // The supervisor is gone; nobody is left to serve.
            std::process::exit(2);
        }
    }

    fn flush(&self) {
        let mut out = self.lock();
        out.1 = false;
        if out.0.flush().is_err() {
            std::process::exit(2);
        }
    }
}

/// Serves one module until the supervisor hangs up or the module fails; returns the
/// process exit code (0 after a clean end, 1 after a fatal reply, 2 for a broken pipe).
pub fn serve() -> i32 {
    die_with_parent();
    let mut input = BufReader::new(io::stdin().lock());
    let spec = match read_frame::<ToWorker>(&mut input) {
        Ok(Some(ToWorker::V1(Request::Start(spec)))) => spec,
        Ok(other) => {
            tracing::error!(?other, "worker: the first frame must be Start");
            return 2;
        }
        Err(e) => {
            tracing::error!(error = %e, "worker: cannot read the Start frame");
            return 2;
        }
    };
    // Read before confinement, which leaves the worker only the module's dirs.
    let artifact = read_bounded(Path::new(&spec.artifact), MAX_LOCAL_ARTIFACT);
    // The granted hardware too: confinement leaves the worker these descriptors, not
    // the device files.
    let devices = Devices::open(&spec.grants);
    #[cfg(feature = "test-hooks")]
    let parent = std::os::unix::process::parent_id();
    let policy = Policy {
        dirs: spec.dirs.iter().map(|(host, _)| host.into()).collect(),
    };
    let confining = Instant::now();
    // Test builds can leave a worker unconfined, to measure what confinement costs.
    #[cfg(feature = "test-hooks")]
    let confined = match std::env::var_os("KILND_TEST_NO_CONFINE") {
        Some(_) => Report::default(),
        None => confine::confine(&policy),
    };
    #[cfg(not(feature = "test-hooks"))]
    let confined = confine::confine(&policy);
    let confine_us = confining.elapsed().as_micros() as u64;
    // Threads only from here on: each inherits the confinement.
    let replies = Replies::new();
    let sender = replies.clone();
    let emit: Emit = Arc::new(move |reply| sender.send(reply));
    #[cfg(feature = "test-hooks")]
    crate::sandbox::escape::attempt_if_asked(parent, &confined, &emit);
    let code = serve_with(
        input,
        *spec,
        (artifact, devices),
        (confined, confine_us),
        &emit,
        || replies.start_flusher(),
    );
    // What the module said last (its stdout's last line at finish) goes out too.
    replies.flush();
    code
}

fn serve_with(
    mut input: BufReader<io::StdinLock<'static>>,
    spec: StartSpec,
    artifact: (io::Result<Vec<u8>>, Result<Devices, String>),
    confined: (Report, u64),
    emit: &Emit,
    ready: impl FnOnce(),
) -> i32 {
    let first_tick = spec.first_tick;
    let (mut guest, ticks, log_confined) = match start(spec, artifact, confined, emit) {
        Ok(started) => started,
        Err(stop) => {
            emit(Reply::Fatal(stop));
            return 1;
        }
    };
    // What the worker does once it has started but not on the way to its first answer.
    let mut after_start = Some(move || {
        ready();
        log_confined();
    });
    // The first tick, when the supervisor asked for it with the Start frame.
    let mut queued = (first_tick && ticks).then_some(Request::Tick);
    loop {
        let request = match queued
            .take()
            .map_or_else(|| read_frame(&mut input), |r| Ok(Some(ToWorker::V1(r))))
        {
            Ok(Some(ToWorker::V1(request))) => request,
            Ok(None) => {
                guest.finish(Some(0));
                return 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "worker: broken request pipe");
                return 2;
            }
        };
        let result = match request {
            Request::Tick => guest.tick(),
            Request::Message { topic, data } => guest.deliver(topic, data),
            Request::Run => {
                if let Some(f) = after_start.take() {
                    f();
                }
                match guest.run_start() {
                    Ok(done) => {
                        let status = done.status;
                        emit(Reply::Done(done));
                        guest.finish(Some(status));
                        return 0;
                    }
                    Err(stop) => Err(stop),
                }
            }
            Request::Start(_) => Err(Stop::Lost("a second Start frame".into())),
        };
        match result {
            Ok(done) => {
                emit(Reply::Done(done));
                if let Some(f) = after_start.take() {
                    f();
                }
            }
            Err(stop) => {
                let code = match &stop {
                    Stop::Exited(code) => Some(*code),
                    _ => None,
                };
                guest.finish(code);
                emit(Reply::Fatal(stop));
                return 1;
            }
        }
    }
}

fn start(
    spec: StartSpec,
    (artifact, devices): (io::Result<Vec<u8>>, Result<Devices, String>),
    (confined, confine_us): (Report, u64),
    emit: &Emit,
) -> Result<(Guest, bool, impl FnOnce()), Stop> {
    let load_failed = |code: u8, message: String| Stop::LoadFailed { code, message };
    let devices = devices.map_err(|why| load_failed(Code::LoadFailed as u8, why))?;
    let file = spec.artifact.as_str();
    let bytes = artifact.map_err(|e| {
        load_failed(
            Code::NoInput as u8,
            format!("cannot read artifact `{file}`: {e}"),
        )
    })?;
    let keys = spec
        .trusted_keys
        .iter()
        .map(|text| PublicKey::from_text(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_failed(Code::Untrusted as u8, format!("bad trusted key: {e}")))?;
    let trust = TrustedKeys::new(keys);
    let limits = spec.limits;
    let loaded = load_bytes(bytes, &trust, spec.expect.as_ref(), |manifest| {
        limits::engine(
            limits
                .memory_pages
                .or(manifest.settings.memory_limit_pages)
                .unwrap_or(limits::DEFAULT_MEMORY_PAGES),
        )
    })
    .map_err(|f| load_failed(f.code as u8, format!("artifact `{file}`: {}", f.message)))?;
    let manifest = loaded.manifest.clone();
    let fuel =
        admit(&manifest, limits.fuel_per_call).map_err(|f| load_failed(f.code as u8, f.message))?;
    let command = manifest.is_command();
    let (verify_us, deserialize_us) = (
        loaded.verify_time.as_micros() as u64,
        loaded.deserialize_time.as_micros() as u64,
    );
    let started = Instant::now();
    let dirs = spec
        .dirs
        .into_iter()
        .map(|(host, guest)| DirMapping {
            host: host.into(),
            guest,
        })
        .collect();
    let opts = GuestOptions {
        wasi: WasiOptions {
            args: spec.args,
            env: spec.env,
            dirs,
        },
        config: spec.config,
        fuel,
        emit: emit.clone(),
        capture_stdio: true,
        devices,
    };
    let mut guest =
        Guest::instantiate(loaded, opts).map_err(|f| load_failed(f.code as u8, f.message))?;
    let instantiate_us = started.elapsed().as_micros() as u64;
    let started = Instant::now();
    if !command && guest.exports(abi::INIT) {
        let done = guest.call(abi::INIT, &[])?;
        if done.status != 0 {
            return Err(Stop::InitFailed(done.status));
        }
    }
    if !command && guest.exports(abi::SELF_TEST) {
        let done = guest.call(abi::SELF_TEST, &[])?;
        if done.status != 0 {
            return Err(Stop::SelfTestFailed(done.status));
        }
    }
    let ticks = !command && guest.exports(abi::TICK);
    emit(Reply::Ready(Ready {
        name: manifest.name.clone(),
        version: manifest.version,
        command,
        ticks,
        verify_us,
        deserialize_us,
        instantiate_us,
        init_us: started.elapsed().as_micros() as u64,
        memory_pages: guest.memory_pages(),
    }));
    // Every layer, on or off, in kilnd's log (the journal under systemd), next to the
    // supervisor's `started` record for the same pid; written after the first answer,
    // so the formatting is not part of the start.
    let module = manifest.name.clone();
    let log_confined = move || {
        tracing::info!(
            module = %module,
            pid = std::process::id(),
            confinement = %confined.summary(),
            confine_us,
            "worker confined"
        )
    };
    Ok((guest, ticks, log_confined))
}

/// A worker must never outlive its supervisor, even when it is stuck in guest code.
pub fn die_with_parent() {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and changes nothing
    // but this process's own death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // The parent may already have died before the call above took effect.
    if std::os::unix::process::parent_id() == 1 {
        std::process::exit(2);
    }
    let _ = io::stderr().flush();
}

/// Whether a verified module can run under these limits, the same answer for the
/// worker that is about to start it and for `kilnd check`: it must be a WASI command
/// or a kiln reactor, and a fuel limit needs an artifact compiled with metering.
/// Returns the fuel per call.
pub fn admit(manifest: &Manifest, fuel_per_call: Option<u64>) -> Result<Option<u64>, Failure> {
    let fuel = match (manifest.settings.metering, fuel_per_call) {
        (Some(compiled), asked) => Some(asked.unwrap_or(compiled)),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(Failure::new(
                Code::LoadFailed,
                format!(
                    "module `{}` has a fuel limit but was compiled without metering; compile it with `kiln compile --fuel N`",
                    manifest.name
                ),
            ))
        }
    };
    if let Some(import) = manifest
        .imports
        .iter()
        .find(|i| runs_outside_a_call(&i.module, &i.name))
    {
        return Err(Failure::new(
            Code::LoadFailed,
            format!(
                "module `{}` imports `{}`.`{}`, which would run guest code outside the calls kilnd times and caps (threads, forks, spawned processes, timed signals); kilnd does not provide it",
                manifest.name, import.module, import.name
            ),
        ));
    }
    if !manifest.is_command()
        && !manifest.exports_fn(abi::TICK)
        && !manifest.exports_fn(abi::ON_MESSAGE)
    {
        return Err(Failure::new(
            Code::LoadFailed,
            format!(
                "module `{}` is neither a WASI command (`_start`) nor a kiln reactor (`{}` or `{}`)",
                manifest.name,
                abi::TICK,
                abi::ON_MESSAGE
            ),
        ));
    }
    Ok(fuel)
}

/// WASIX (and wasi-threads) functions that start guest code of their own: a thread, a
/// forked or spawned instance, a signal handler on a timer. Such code runs after the
/// call that started it has returned, where the supervisor's wall-clock watchdog (which
/// times calls) does not see it, on host threads whose stacks are outside the memory
/// cap. A module importing one is refused at load, by the worker and by `kilnd check`.
const OUTSIDE_A_CALL: &[&str] = &[
    "thread_spawn",
    "thread_spawn_v2",
    "thread-spawn",
    "proc_fork",
    "proc_fork_env",
    "proc_exec",
    "proc_exec2",
    "proc_exec3",
    "proc_exec4",
    "proc_spawn",
    "proc_spawn2",
    "proc_spawn3",
    "proc_raise_interval",
    "callback_signal",
];

fn runs_outside_a_call(module: &str, name: &str) -> bool {
    matches!(module, "wasix_32v1" | "wasix_64v1" | "wasi") && OUTSIDE_A_CALL.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::manifest::{Import, ImportKind};

    fn importing(module: &str, name: &str) -> Manifest {
        let mut m = Manifest::example(b"code");
        m.imports.push(Import {
            module: module.into(),
            name: name.into(),
            kind: ImportKind::Function,
        });
        m
    }

    #[test]
    fn a_module_that_would_run_code_outside_a_call_is_refused_with_the_import_named() {
        for (module, name) in [
            ("wasix_32v1", "thread_spawn_v2"),
            ("wasix_64v1", "proc_fork"),
            ("wasix_32v1", "proc_spawn2"),
            ("wasix_32v1", "callback_signal"),
            ("wasi", "thread-spawn"),
        ] {
            let err = admit(&importing(module, name), None).unwrap_err();
            assert_eq!(err.code, Code::LoadFailed);
            assert!(
                err.message.contains(&format!("`{module}`.`{name}`"))
                    && err.message.contains("outside the calls"),
                "{}",
                err.message
            );
        }
        // Other WASIX functions run inside the call that makes them.
        for (module, name) in [
            ("wasix_32v1", "thread_sleep"),
            ("wasix_32v1", "proc_id"),
            ("wasi_snapshot_preview1", "fd_write"),
        ] {
            assert!(
                admit(&importing(module, name), None).is_ok(),
                "{module}.{name}"
            );
        }
    }
}
