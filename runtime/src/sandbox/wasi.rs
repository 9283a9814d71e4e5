//! The WASI side of a module's sandbox (wasmer-wasix, feature `wasi`): the given args
//! and env only, the given host directories only, mounted over an empty in-memory
//! root. Also what a module may import at all, with or without WASI.

#[cfg(feature = "wasi")]
use std::path::Path;
#[cfg(feature = "wasi")]
use std::sync::Arc;

use kiln_protocol::abi;
use wasmer::Module;
#[cfg(feature = "wasi")]
use wasmer_wasix::virtual_fs::{host_fs, mount_fs::MountFileSystem, RootFileSystemBuilder};
#[cfg(feature = "wasi")]
use wasmer_wasix::{WasiEnv, WasiEnvBuilder};

use crate::exit::{Code, Failure};

pub use kiln_protocol::dirs::DirMapping;

#[derive(Debug, Clone, Default)]
pub struct WasiOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirMapping>,
}

/// A WASI environment for module `name`: only the given args, env and directories.
#[cfg(feature = "wasi")]
pub fn builder(
    name: &str,
    opts: &WasiOptions,
    handle: &tokio::runtime::Handle,
) -> Result<WasiEnvBuilder, Failure> {
    let mut builder = WasiEnv::builder(name)
        .args(opts.args.iter())
        .envs(opts.env.iter().cloned());
    builder.set_mount_fs(sandbox(&opts.dirs, handle)?);
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
    Ok(builder)
}

/// Import modules this kilnd provides.
#[cfg(feature = "wasi")]
pub const PROVIDED: &[&str] = &[
    abi::MODULE,
    "wasi_snapshot_preview1",
    "wasi_unstable",
    "wasix_32v1",
    "wasix_64v1",
];
/// Import modules this kilnd provides: the lean build has no WASI.
#[cfg(not(feature = "wasi"))]
pub const PROVIDED: &[&str] = &[abi::MODULE];

/// At most this many missing imports are named in the error.
const NAMED: usize = 4;

/// Names the imports nobody provides, instead of wasmer's generic link error.
pub fn check_imports(name: &str, module: &Module) -> Result<(), Failure> {
    let unknown = |i: &wasmer::ImportType| {
        if i.module() == abi::MODULE {
            !abi::IMPORTS.iter().any(|(f, ..)| *f == i.name())
        } else {
            !PROVIDED.contains(&i.module())
        }
    };
    if let Some(i) = module
        .imports()
        .find(|i| i.module() == abi::MODULE && unknown(i))
    {
        return Err(Failure::new(
            Code::LoadFailed,
            format!(
                "module `{name}` imports `kiln`.`{}`, which kiln host ABI v{} does not have",
                i.name(),
                kiln_protocol::KILN_ABI_VERSION
            ),
        ));
    }
    let missing: Vec<String> = module
        .imports()
        .filter(unknown)
        .map(|i| format!("`{}`.`{}`", i.module(), i.name()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let more = match missing.len().saturating_sub(NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let lean = if cfg!(feature = "wasi") {
        ""
    } else {
        "; this is the lean kilnd, built without WASI: run WASI modules on the full build"
    };
    Err(Failure::new(
        Code::LoadFailed,
        format!(
            "module `{name}` imports {}{more}, which this kilnd does not provide (it provides {}){lean}",
            missing[..missing.len().min(NAMED)].join(", "),
            PROVIDED.join(", ")
        ),
    ))
}

/// The module's whole file system: an empty in-memory root with `/dev/null` and
/// friends, and the mapped host directories. Nothing else of the host is visible.
#[cfg(feature = "wasi")]
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

/// A trap in kilnd's words: wasmer's trap code when it has one, else its message.
pub fn trap_message(rt: &wasmer::RuntimeError) -> String {
    match rt.clone().to_trap() {
        Some(code) => format!("{} [{code}]", code.message()),
        None => rt.message(),
    }
}
