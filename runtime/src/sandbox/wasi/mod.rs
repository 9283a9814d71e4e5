//! The WASI side of a module's sandbox (wasmer-wasix, feature `wasi`): the given args
//! and env only, the given host directories only, mounted over an empty in-memory
//! root. Also what a module may import at all, with or without WASI.

#[cfg(feature = "wasi")]
use std::path::Path;
#[cfg(feature = "wasi")]
use std::sync::Arc;

use kiln_protocol::abi;
#[cfg(feature = "wasi")]
use std::sync::RwLock;
use wasmer::Module;
#[cfg(feature = "wasi")]
use wasmer_wasix::fs::{InodeGuard, InodeVal, Kind, WasiFs, WasiInodes, VIRTUAL_ROOT_FD};
#[cfg(feature = "wasi")]
use wasmer_wasix::virtual_fs::{mount_fs::MountFileSystem, RootFileSystemBuilder};
#[cfg(feature = "wasi")]
use wasmer_wasix::{WasiEnv, WasiEnvBuilder, ALL_RIGHTS};

use crate::exit::{Code, Failure};

#[cfg(feature = "wasi")]
mod adapt;
#[cfg(feature = "wasi")]
mod hostfs;
#[cfg(feature = "wasi")]
pub mod paths;

#[cfg(feature = "wasi")]
pub use adapt::{adapt, Preopens};

pub use kiln_protocol::dirs::DirMapping;

#[derive(Debug, Clone, Default)]
pub struct WasiOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirMapping>,
}

/// A WASI environment for module `name`: only the given args, env and directories.
/// `kilnd run` and the workers of `kilnd serve` both set WASI up here.
#[cfg(feature = "wasi")]
pub fn builder(
    name: &str,
    opts: &WasiOptions,
    handle: &tokio::runtime::Handle,
) -> Result<(WasiEnvBuilder, Preopens), Failure> {
    let mut builder = WasiEnv::builder(name)
        .args(opts.args.iter())
        .envs(opts.env.iter().cloned());
    builder.set_mount_fs(sandbox(&opts.dirs, handle)?);
    // WASI libcs resolve absolute paths through the preopen named "/", and relative
    // ones (older libcs) through ".": both are the sandbox's root.
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
    let preopens = Preopens::default();
    let table = preopens.clone();
    let builder = builder.setup_fs(Box::new(move |inodes, fs| {
        preopens_first(inodes, fs, &table)
    }));
    Ok((builder, preopens))
}

/// wasix puts its own virtual root at fd 3, named `/` like a preopen, ahead of the
/// real preopens, and resolves fd 3 and every absolute path through it. That root holds
/// only the preopens themselves: nothing can be created in it (`EACCES`) or opened for
/// writing in it (`EPERM`). Programs that take the first preopen named `/` as the root
/// (the WASI testsuite, users of wasmtime's `--dir HOST::/`) got that root. So kilnd
/// makes the sandbox's `/` directory the root: it becomes wasix's root inode (`/..` is
/// `/` again, as in POSIX), it takes fd 3, and the other preopens follow without a gap
/// (libcs stop at the first fd that is not a preopen), each with a directory's rights
/// and every right to inherit, as wasmtime's preopens.
///
/// Each preopen gets an inode of its own that wasix does not mark as preopened: wasix
/// will not close such an fd or renumber over it, which WASI allows. kilnd answers
/// `fd_prestat_get` itself from `table` instead (`adapt`).
#[cfg(feature = "wasi")]
fn preopens_first(inodes: &WasiInodes, fs: &mut WasiFs, table: &Preopens) -> Result<(), String> {
    let poisoned = "the WASI file table is poisoned";
    let root_fd = VIRTUAL_ROOT_FD;
    let preopens = fs.preopen_fds.get_mut().map_err(|_| poisoned)?;
    let fds = fs.fd_map.get_mut().map_err(|_| poisoned)?;
    match fds
        .get(root_fd)
        .map(|fd| matches!(*fd.inode.read(), Kind::Root { .. }))
    {
        Some(true) => {}
        _ => return Err(format!("fd {root_fd} is not wasix's virtual root")),
    }
    let ours: Vec<u32> = preopens
        .iter()
        .copied()
        .filter(|&fd| fd != root_fd)
        .collect();
    if ours.iter().any(|&fd| fd < root_fd) {
        return Err(format!("a preopen below fd {root_fd}: {ours:?}"));
    }
    fds.remove(root_fd);
    let mut moved = Vec::with_capacity(ours.len());
    for have in ours {
        let mut fd = fds
            .remove(have)
            .ok_or_else(|| format!("preopen fd {have} is not open"))?;
        fd.inode = unmarked(inodes, &fd.inode)?;
        fd.inner.rights = adapt::DIRECTORY_RIGHTS;
        fd.inner.rights_inheriting = ALL_RIGHTS;
        moved.push(fd);
    }
    let root = moved
        .first()
        .map(|fd| fd.inode.clone())
        .ok_or("no preopen for `/`")?;
    if !matches!(*root.read(), Kind::Dir { ref path, .. } if path.as_path() == Path::new("/")) {
        return Err("the first preopen is not the directory `/`".into());
    }
    for fd in &moved {
        if let Kind::Dir { parent, .. } = &mut *fd.inode.write() {
            *parent = root.downgrade();
        }
    }
    fs.root_inode = root;
    let mut renumbered = Vec::with_capacity(moved.len());
    let mut names = table.lock().map_err(|_| poisoned)?;
    for (want, fd) in (root_fd..).zip(moved) {
        let name = fd.inode.name.read().map_err(|_| poisoned)?.to_string();
        names.insert(want, name);
        if !fds.insert(true, want, fd) {
            return Err(format!("fd {want} is taken"));
        }
        renumbered.push(want);
    }
    *preopens = renumbered;
    Ok(())
}

/// A copy of preopen inode `old` that wasix does not mark as preopened.
#[cfg(feature = "wasi")]
fn unmarked(inodes: &WasiInodes, old: &InodeGuard) -> Result<InodeGuard, String> {
    let poisoned = "the WASI inode table is poisoned";
    let kind = match &*old.read() {
        Kind::Dir {
            parent,
            path,
            entries,
        } => Kind::Dir {
            parent: parent.clone(),
            path: path.clone(),
            entries: entries.clone(),
        },
        other => return Err(format!("a preopen is not a directory: {other:?}")),
    };
    Ok(inodes.add_inode_val(InodeVal {
        stat: RwLock::new(*old.stat.read().map_err(|_| poisoned)?),
        is_preopened: false,
        name: RwLock::new(old.name.read().map_err(|_| poisoned)?.clone()),
        kind: RwLock::new(kind),
    }))
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

/// The module's whole file system: the host directory mapped at `/` if there is one,
/// else an empty in-memory root with `/dev/null` and friends; and the other mapped
/// host directories mounted in it. Nothing else of the host is visible.
#[cfg(feature = "wasi")]
fn sandbox(
    dirs: &[DirMapping],
    handle: &tokio::runtime::Handle,
) -> Result<MountFileSystem, Failure> {
    let guests: Vec<&str> = dirs.iter().map(|d| d.guest.as_str()).collect();
    let host_fs = |dir: &DirMapping| {
        let fail = |why: String| {
            Failure::new(
                Code::NoInput,
                format!("cannot map directory `{}`: {why}", dir.host.display()),
            )
        };
        if let Some(twice) = dirs
            .iter()
            .find(|d| !std::ptr::eq(*d, dir) && d.guest == dir.guest)
        {
            return Err(fail(format!(
                "`{}` is mapped at `{}` too",
                twice.host.display(),
                dir.guest
            )));
        }
        let host = dir.host.canonicalize().map_err(|e| fail(e.to_string()))?;
        if !host.is_dir() {
            return Err(fail("not a directory".into()));
        }
        hostfs::HostDir::new(handle.clone(), host)
            .map(Arc::new)
            .map_err(|e| fail(e.to_string()))
    };
    // Mapped at `/`, a host directory is the root itself, as with wasmtime's
    // `--dir HOST::/`: no in-memory `/dev` or `/tmp` is laid over it.
    let root = match dirs.iter().find(|d| d.is_root()) {
        Some(dir) => {
            let root = MountFileSystem::new();
            root.mount(Path::new("/"), host_fs(dir)?).map_err(|e| {
                Failure::new(
                    Code::Internal,
                    format!("cannot mount `{}` at `/`: {e}", dir.host.display()),
                )
            })?;
            root
        }
        None => RootFileSystemBuilder::default().build_ext(&guests),
    };
    for dir in dirs.iter().filter(|d| !d.is_root()) {
        root.mount(Path::new(&dir.guest), host_fs(dir)?)
            .map_err(|e| {
                Failure::new(
                    Code::NoInput,
                    format!(
                        "cannot map directory `{}` at `{}`: {e}",
                        dir.host.display(),
                        dir.guest
                    ),
                )
            })?;
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
