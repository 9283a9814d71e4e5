//! The WASI side of a module's sandbox (feature `wasi`): WASI preview 1
//! (`wasi_snapshot_preview1`) implemented by kilnd on wasmer's imports. A module gets
//! the given args and env only, and the given host directories only, each preopened
//! at its guest path as wasmtime's `--dir HOST::GUEST` does. Also what a module may
//! import at all, with or without WASI.
//!
//! - `types`: preview 1's numbers and layouts;
//! - `table`: the module's fds and their rights (pure);
//! - `host`: the host's `*at` calls, and the walk that keeps every path beneath its
//!   directory;
//! - `calls`: the functions themselves.

use kiln_protocol::abi;
use wasmer::Module;

use crate::exit::{Code, Failure};

#[cfg(feature = "wasi")]
mod calls;
#[cfg(feature = "wasi")]
mod host;
#[cfg(feature = "wasi")]
mod table;
#[cfg(feature = "wasi")]
pub mod types;

pub use kiln_protocol::dirs::DirMapping;

#[derive(Debug, Clone, Default)]
pub struct WasiOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirMapping>,
}

/// The import module of WASI preview 1.
pub const PREVIEW1: &str = "wasi_snapshot_preview1";

/// A module's WASI state: its fds, args and environment, and its memory once
/// instantiated.
#[cfg(feature = "wasi")]
pub struct WasiEnv {
    table: table::Table,
    /// Each NUL-terminated.
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    pub memory: Option<wasmer::Memory>,
    /// Reused for the bytes of each read and write.
    scratch: Vec<u8>,
}

/// Where a module's standard streams go.
#[cfg(feature = "wasi")]
pub enum Stdio {
    /// kilnd's own stdin, stdout and stderr (`kilnd run`).
    PassThrough,
    /// An empty stdin; stdout and stderr into these sinks (workers: log records).
    Capture {
        stdout: std::sync::Arc<dyn crate::sandbox::capture::Sink>,
        stderr: std::sync::Arc<dyn crate::sandbox::capture::Sink>,
    },
}

/// `proc_exit`'s code, carried out of the module's call as the error of a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exited with code {}", self.0)
    }
}

impl std::error::Error for Exit {}

#[cfg(feature = "wasi")]
impl WasiEnv {
    /// The WASI state of module `name` (its `argv[0]`): stdio as `stdio` says, then
    /// the mapped directories from fd 3 on, the one mapped at `/` first.
    pub fn new(name: &str, opts: &WasiOptions, stdio: Stdio) -> Result<Self, Failure> {
        use crate::sandbox::capture::PassThrough;
        use std::sync::Arc;
        use table::{Entry, Kind};
        use types::{filetype, rights};

        let mut table = table::Table::default();
        let (stdin, stdout, stderr, types) = match stdio {
            Stdio::PassThrough => (
                true,
                Arc::new(PassThrough::STDOUT) as Arc<dyn crate::sandbox::capture::Sink>,
                Arc::new(PassThrough::STDERR) as Arc<dyn crate::sandbox::capture::Sink>,
                [calls::stdio_type(1), calls::stdio_type(2)],
            ),
            // Log records are lines, as on a terminal: wasi-libc line-buffers a
            // character device, so a C module's lines arrive as it prints them.
            Stdio::Capture { stdout, stderr } => (
                false,
                stdout,
                stderr,
                [filetype::CHARACTER_DEVICE, filetype::CHARACTER_DEVICE],
            ),
        };
        table.put(0, Entry::new(Kind::Stdin { host: stdin }, rights::STDIO, 0));
        for (fd, sink, filetype) in [(1, stdout, types[0]), (2, stderr, types[1])] {
            table.put(
                fd,
                Entry::new(Kind::Output { sink, filetype }, rights::STDIO, 0),
            );
        }
        let mut dirs: Vec<&DirMapping> = opts.dirs.iter().collect();
        dirs.sort_by_key(|d| !d.is_root());
        for (i, dir) in dirs.iter().enumerate() {
            let fail = |why: String| {
                Failure::new(
                    Code::NoInput,
                    format!("cannot map directory `{}`: {why}", dir.host.display()),
                )
            };
            if let Some(twice) = dirs[..i].iter().find(|d| d.guest == dir.guest) {
                return Err(fail(format!(
                    "`{}` is mapped at `{}` too",
                    twice.host.display(),
                    dir.guest
                )));
            }
            let path = dir.host.canonicalize().map_err(|e| fail(e.to_string()))?;
            let fd = host::openat(
                libc::AT_FDCWD,
                path.as_os_str().as_encoded_bytes(),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .map_err(|e| {
                fail(match e {
                    types::Errno::NOTDIR => "not a directory".into(),
                    e => format!("cannot open it (WASI errno {})", e.0),
                })
            })?;
            let mut entry = Entry::new(
                Kind::Dir { fd, listing: None },
                rights::DIRECTORY,
                rights::ALL,
            );
            entry.preopen = Some(dir.guest.clone());
            table.put(3 + i as u32, entry);
        }
        let cstring = |s: String| {
            let mut b = s.into_bytes();
            b.push(0);
            b
        };
        Ok(Self {
            table,
            args: std::iter::once(name.to_string())
                .chain(opts.args.iter().cloned())
                .map(cstring)
                .collect(),
            env: opts
                .env
                .iter()
                .map(|(k, v)| cstring(format!("{k}={v}")))
                .collect(),
            memory: None,
            scratch: Vec::new(),
        })
    }
}

/// The `wasi_snapshot_preview1` import namespace bound to `env`.
#[cfg(feature = "wasi")]
pub fn imports(store: &mut wasmer::Store, env: &wasmer::FunctionEnv<WasiEnv>) -> wasmer::Imports {
    let mut imports = wasmer::Imports::new();
    imports.register_namespace(PREVIEW1, calls::exports(store, env));
    imports
}

/// Import modules this kilnd provides.
#[cfg(feature = "wasi")]
pub const PROVIDED: &[&str] = &[abi::MODULE, PREVIEW1];
/// Import modules this kilnd provides: the lean build has no WASI.
#[cfg(not(feature = "wasi"))]
pub const PROVIDED: &[&str] = &[abi::MODULE];

#[cfg(feature = "wasi")]
fn provides(module: &str, name: &str) -> bool {
    module == PREVIEW1 && calls::NAMES.contains(&name)
}

#[cfg(not(feature = "wasi"))]
fn provides(_module: &str, _name: &str) -> bool {
    false
}

/// At most this many missing imports are named in the error.
const NAMED: usize = 4;

/// Names the imports nobody provides, instead of wasmer's generic link error.
pub fn check_imports(name: &str, module: &Module) -> Result<(), Failure> {
    let unknown = |i: &wasmer::ImportType| {
        if i.module() == abi::MODULE {
            !abi::IMPORTS.iter().any(|(f, ..)| *f == i.name())
        } else {
            !provides(i.module(), i.name())
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

/// A trap in kilnd's words: wasmer's trap code when it has one, else its message.
pub fn trap_message(rt: &wasmer::RuntimeError) -> String {
    match rt.clone().to_trap() {
        Some(code) => format!("{} [{code}]", code.message()),
        None => rt.message(),
    }
}
