//! Runs a WASI command module (`_start`) with wasmer-wasix: the given args and env
//! only, the given host directories only, stdio through to the terminal.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use wasmer::{Engine, Module, Store};
use wasmer_wasix::virtual_fs::{host_fs, mount_fs::MountFileSystem, RootFileSystemBuilder};
use wasmer_wasix::wasmer_wasix_types::wasi::{Errno, ExitCode};
use wasmer_wasix::{WasiEnv, WasiError};

use crate::exit::{Code, Failure};

/// A host directory made visible to the module at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMapping {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for DirMapping {
    type Err = String;

    /// `HOST[:GUEST]`. Without GUEST the directory keeps its path, taken from `/` (the
    /// guest's working directory): `data` and `./data` appear as `/data`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = match s.split_once(':') {
            Some((h, g)) => (h, g.to_string()),
            None => (s, guest_default(Path::new(s))),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("`{s}` is not HOST[:GUEST]"));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest,
        })
    }
}

fn guest_default(host: &Path) -> String {
    let mut guest = PathBuf::from("/");
    for c in host.components() {
        if let Component::Normal(part) = c {
            guest.push(part);
        }
    }
    guest.display().to_string()
}

#[derive(Debug, Clone, Default)]
pub struct WasiOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirMapping>,
}

/// Runs `_start` on this thread and returns the module's exit code. kilnd calls the
/// entry point itself (rather than through wasix's process runner) so that a trap is
/// reported once, in kilnd's words, with kilnd's exit code.
pub fn run_command(
    engine: Engine,
    module: Module,
    name: &str,
    opts: &WasiOptions,
) -> Result<i32, Failure> {
    // wasix does its file and timer I/O on a tokio runtime; one worker is plenty.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Code::Internal, format!("cannot start the I/O runtime: {e}")))?;
    let _guard = tokio.enter();

    let mut builder = WasiEnv::builder(name)
        .args(opts.args.iter())
        .envs(opts.env.iter().cloned());
    builder.set_engine(engine.clone());
    builder.set_mount_fs(sandbox(&opts.dirs, tokio.handle())?);
    // Rust's WASI libc resolves both absolute and relative paths through preopens:
    // "/" for the former, "." (the working directory, also "/") for the latter.
    builder
        .add_preopen_dir("/")
        .and_then(|()| {
            builder.add_preopen_build(|p| {
                p.directory("/")
                    .alias(".")
                    .read(true)
                    .write(true)
                    .create(true)
            })
        })
        .map_err(|e| Failure::new(Code::Internal, format!("cannot set up the sandbox: {e}")))?;

    check_imports(name, &module)?;
    let mut store = Store::new(engine);
    let (instance, env) = builder.instantiate(module, &mut store).map_err(|e| {
        Failure::new(
            Code::LoadFailed,
            format!("module `{name}` cannot be instantiated: {e}"),
        )
    })?;
    let start = instance.exports.get_function("_start").map_err(|e| {
        Failure::new(
            Code::LoadFailed,
            format!("module `{name}` has no usable `_start`: {e}"),
        )
    })?;
    let outcome = match start.call(&mut store, &[]) {
        Ok(_) => Ok(0),
        Err(err) => match err.downcast::<WasiError>() {
            Ok(WasiError::Exit(code)) => Ok(code.raw()),
            Ok(other) => Err(Failure::new(
                Code::Trap,
                format!("module `{name}` stopped: {other}"),
            )),
            Err(rt) => Err(trap(name, rt)),
        },
    };
    let exit = match &outcome {
        Ok(code) => ExitCode::from(*code as u16),
        Err(_) => ExitCode::from(Errno::Noexec),
    };
    // Flushes and closes the module's files and stdio.
    env.on_exit(&mut store, Some(exit));
    outcome
}

/// Import modules this kilnd provides to command modules.
const PROVIDED: &[&str] = &[
    "wasi_snapshot_preview1",
    "wasi_unstable",
    "wasix_32v1",
    "wasix_64v1",
];

/// Names the first import nobody provides, instead of wasmer's generic link error.
fn check_imports(name: &str, module: &Module) -> Result<(), Failure> {
    match module.imports().find(|i| !PROVIDED.contains(&i.module())) {
        Some(i) => Err(Failure::new(
            Code::LoadFailed,
            format!(
                "module `{name}` imports `{}`.`{}`, which this kilnd does not provide (it provides {})",
                i.module(),
                i.name(),
                PROVIDED.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// The module's whole file system: an empty in-memory root with `/dev/null` and
/// friends, and the mapped host directories. Nothing else of the host is visible.
fn sandbox(
    dirs: &[DirMapping],
    handle: &tokio::runtime::Handle,
) -> Result<MountFileSystem, Failure> {
    let guests: Vec<&str> = dirs.iter().map(|d| d.guest.as_str()).collect();
    let root = RootFileSystemBuilder::default().build_ext(&guests);
    for dir in dirs {
        let fail = |why: String| {
            Failure::new(
                Code::NoInput,
                format!("cannot map directory `{}`: {why}", dir.host.display()),
            )
        };
        if dir.guest == "/" || !dir.guest.starts_with('/') {
            return Err(fail(format!(
                "guest path `{}` must be absolute and not `/`, e.g. `--dir {}:/data`",
                dir.guest,
                dir.host.display()
            )));
        }
        let host = dir.host.canonicalize().map_err(|e| fail(e.to_string()))?;
        if !host.is_dir() {
            return Err(fail("not a directory".into()));
        }
        let fs = host_fs::FileSystem::new(handle.clone(), host).map_err(|e| fail(e.to_string()))?;
        root.mount(Path::new(&dir.guest), Arc::new(fs))
            .map_err(|e| fail(format!("cannot mount at `{}`: {e}", dir.guest)))?;
    }
    Ok(root)
}

fn trap(name: &str, rt: wasmer::RuntimeError) -> Failure {
    let message = rt.message();
    let what = match rt.to_trap() {
        Some(code) => format!("{} [{code}]", code.message()),
        None => message,
    };
    Failure::new(Code::Trap, format!("module `{name}` trapped: {what}"))
}
