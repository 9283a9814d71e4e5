//! Runs a WASI command module (`_start`) with wasmer-wasix: the given args and env
//! only, the given host directories only, stdio through to the terminal.

use std::path::{Component, Path, PathBuf};

use wasmer::{Engine, Module};
use wasmer_types::ModuleHash;
use wasmer_wasix::runners::wasi::{RuntimeOrEngine, WasiRunner};
use wasmer_wasix::runners::MappedDirectory;
use wasmer_wasix::{WasiError, WasiRuntimeError};

use crate::exit::{Code, Failure};

/// A host directory made visible to the module at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMapping {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for DirMapping {
    type Err = String;

    /// `HOST[:GUEST]`; without GUEST the directory appears at the same path, relative
    /// paths under `/` (the guest's working directory).
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

/// Runs `_start` and returns the module's exit code.
pub fn run_command(
    engine: Engine,
    module: Module,
    name: &str,
    source_sha256: [u8; 32],
    opts: &WasiOptions,
) -> Result<i32, Failure> {
    let mut mapped = Vec::with_capacity(opts.dirs.len());
    for dir in &opts.dirs {
        // wasix panics on a missing host directory; refuse it here with its name.
        let host = dir.host.canonicalize().map_err(|e| {
            Failure::new(Code::NoInput, format!("cannot map directory `{}`: {e}", dir.host.display()))
        })?;
        if !host.is_dir() {
            return Err(Failure::new(
                Code::NoInput,
                format!("cannot map `{}`: not a directory", dir.host.display()),
            ));
        }
        mapped.push(MappedDirectory {
            host,
            guest: dir.guest.clone(),
        });
    }

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Code::Internal, format!("cannot start the I/O runtime: {e}")))?;
    let _guard = tokio.enter();

    let mut runner = WasiRunner::new();
    runner
        .with_args(opts.args.iter().cloned())
        .with_envs(opts.env.iter().cloned())
        .with_mapped_directories(mapped);
    let result = runner.run_wasm(
        RuntimeOrEngine::Engine(engine),
        name,
        module,
        ModuleHash::from_bytes(source_sha256),
    );
    match result {
        Ok(()) => Ok(0),
        Err(err) => Err(classify(name, &err)).or_else(|f: Failure| match exit_code_of(&err) {
            Some(code) => Ok(code),
            None => Err(f),
        }),
    }
}

fn exit_code_of(err: &anyhow::Error) -> Option<i32> {
    err.chain().find_map(|e| {
        if let Some(w) = e.downcast_ref::<WasiRuntimeError>() {
            return w.as_exit_code().map(|c| c.raw());
        }
        if let Some(WasiError::Exit(code)) = e.downcast_ref::<WasiError>() {
            return Some(code.raw());
        }
        None
    })
}

fn classify(name: &str, err: &anyhow::Error) -> Failure {
    for e in err.chain() {
        if let Some(WasiRuntimeError::Runtime(rt)) = e.downcast_ref::<WasiRuntimeError>() {
            return trap(name, rt);
        }
        if let Some(rt) = e.downcast_ref::<wasmer::RuntimeError>() {
            return trap(name, rt);
        }
        if let Some(WasiRuntimeError::Instantiation(i)) = e.downcast_ref::<WasiRuntimeError>() {
            return Failure::new(Code::LoadFailed, format!("module `{name}` cannot be instantiated: {i}"));
        }
    }
    let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    Failure::new(Code::LoadFailed, format!("module `{name}` failed: {}", chain.join(": ")))
}

fn trap(name: &str, rt: &wasmer::RuntimeError) -> Failure {
    let what = match rt.clone().to_trap() {
        Some(code) => code.to_string(),
        None => rt.message(),
    };
    Failure::new(Code::Trap, format!("module `{name}` trapped: {what}"))
}

