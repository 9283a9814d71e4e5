//! kilnd's answers where wasix 0.704's differ from WASI preview 1 as wasmtime gives it
//! and the WASI testsuite checks it (conformance/wasi). kilnd links wasix unchanged
//! and cannot reach its file table once a module runs, so each fix is a wrapper around
//! wasix's own import: it checks or corrects what the guest asked, calls wasix, and
//! corrects the answer. Where a wrapper needs wasix to tell it something (an fd's
//! type or rights, a file's inode), it calls wasix's own function with a few bytes of
//! the guest's memory lent for the answer and put back afterwards (`Lent`).
//!
//! What changes, each with the testsuite test that shows it:
//! - preopens are answered here (`fd_prestat_get`, `fd_prestat_dir_name`), so that
//!   closing or renumbering over one works (close_preopen, overwrite_preopen) and a
//!   too-short name buffer is `NAMETOOLONG` (dir_fd_op_failures);
//! - `fd_renumber` moves the fd instead of duplicating it (renumber, stdio);
//! - an fd's rights are what the guest asked for, directories never carry file rights
//!   (directory_seek, path_link, path_open_preopen, truncation_rights), and a missing
//!   right is `NOTCAPABLE` (fd_fdstat_set_rights);
//! - paths are relative to their fd: absolute ones and ones that climb out of it with
//!   `..` are `NOTCAPABLE`, so is a symlink to an absolute path (interesting_paths,
//!   symlink_create) — for wasip1 modules only: WASIX modules pass absolute paths on
//!   purpose and keep wasix's rules;
//! - errnos for directories where files were meant and back (path_open_dirfd_not_dir,
//!   unlink_file_trailing_slashes, path_symlink_trailing_slashes, path_rename);
//! - `sock_shutdown` of an fd that is not a socket is `NOTSOCK` (the C tests'
//!   sock_shutdown-*);
//! - `path_readlink` fills a short buffer (readlink), `path_filestat_set_times` sets
//!   the file's times (path_filestat), and `fd_readdir`'s `.` has the directory's inode
//!   (fd_readdir).
//!
//! Nothing here widens what a module can reach: every wrapper ends in wasix's own
//! call on the module's own sandbox, or refuses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use wasmer::{
    Extern, Function, FunctionEnv, FunctionEnvMut, Imports, RuntimeError, Store, TypedFunction,
    Value,
};
use wasmer_wasix::types::wasi::{Errno, Rights};
use wasmer_wasix::{WasiEnv, WasiFunctionEnv, WasiVersion, ALL_RIGHTS};

use super::paths;

mod fds;
mod names;

use fds::*;
use names::*;

/// The preopened directories as the guest sees them: fd to the name
/// `fd_prestat_dir_name` gives. Filled when the file table is set up, kept by the
/// wrappers of `fd_close` and `fd_renumber` afterwards.
pub type Preopens = Arc<Mutex<BTreeMap<u32, String>>>;

/// A directory's own rights (wasmtime's set, which the testsuite checks): what it
/// takes to work with names in it. File rights are only ever inherited.
pub const DIRECTORY_RIGHTS: Rights = Rights::PATH_CREATE_DIRECTORY
    .union(Rights::PATH_CREATE_FILE)
    .union(Rights::PATH_LINK_SOURCE)
    .union(Rights::PATH_LINK_TARGET)
    .union(Rights::PATH_OPEN)
    .union(Rights::FD_READDIR)
    .union(Rights::PATH_READLINK)
    .union(Rights::PATH_RENAME_SOURCE)
    .union(Rights::PATH_RENAME_TARGET)
    .union(Rights::PATH_SYMLINK)
    .union(Rights::PATH_REMOVE_DIRECTORY)
    .union(Rights::PATH_UNLINK_FILE)
    .union(Rights::PATH_FILESTAT_GET)
    .union(Rights::PATH_FILESTAT_SET_TIMES)
    .union(Rights::FD_FILESTAT_GET)
    .union(Rights::FD_FILESTAT_SET_TIMES);

/// Paths longer than this are left to wasix unchecked (it refuses them itself).
const MAX_PATH: u32 = 64 * 1024;
/// What a readlink into a short buffer reads first, to fill it.
const MAX_LINK: u32 = 4096;

const FILETYPE_DIRECTORY: u8 = 3;
const FILETYPE_SOCKET_DGRAM: u8 = 5;
const FILETYPE_SOCKET_STREAM: u8 = 6;
const FILETYPE_SYMLINK: u8 = 7;
const LOOKUP_SYMLINK_FOLLOW: i32 = 1;
const ESUCCESS: i32 = 0;

fn errno(e: Errno) -> i32 {
    e as i32
}

struct Adapter {
    wasi: FunctionEnv<WasiEnv>,
    /// wasix's own preview 1 functions, which the wrappers call.
    wasix: BTreeMap<&'static str, Function>,
    read: Option<TypedFunction<(i32, i32, i32, i32), i32>>,
    write: Option<TypedFunction<(i32, i32, i32, i32), i32>>,
    /// wasix_32v1's `fd_dup2`, made at the first `fd_renumber`.
    dup2: Option<Function>,
    preopens: Preopens,
    /// fd 3's rights (base, inheriting), which wasix's `fd_fdstat_get` does not tell;
    /// None once they are not known (fd 3 closed, or reused by `path_open`).
    fd3: Option<(u64, u64)>,
    /// A wasip1 module: paths are relative to their fd, rights are what was asked.
    strict: bool,
}

type Ctx<'a> = FunctionEnvMut<'a, Adapter>;

/// Why a wrapper stops: an errno for the guest, or a trap.
enum Stop {
    Errno(i32),
    Trap(RuntimeError),
}

impl From<RuntimeError> for Stop {
    fn from(e: RuntimeError) -> Self {
        Stop::Trap(e)
    }
}

impl From<Errno> for Stop {
    fn from(e: Errno) -> Self {
        Stop::Errno(errno(e))
    }
}

type Step<T> = Result<T, Stop>;

/// The errno a wrapper answers with.
fn answer(step: Step<i32>) -> Result<i32, RuntimeError> {
    match step {
        Ok(e) | Err(Stop::Errno(e)) => Ok(e),
        Err(Stop::Trap(t)) => Err(t),
    }
}

/// Calls wasix's own `name`, returning its errno.
fn call(ctx: &mut Ctx, name: &str, args: &[Value]) -> Step<i32> {
    let f = ctx
        .data()
        .wasix
        .get(name)
        .cloned()
        .ok_or_else(|| RuntimeError::new(format!("wasix has no `{name}`")))?;
    match f.call(ctx, args)?.first() {
        Some(Value::I32(e)) => Ok(*e),
        other => Err(RuntimeError::new(format!("wasix's `{name}` returned {other:?}")).into()),
    }
}

/// Like `call`, but an errno other than success stops the wrapper.
fn call_ok(ctx: &mut Ctx, name: &str, args: &[Value]) -> Step<()> {
    match call(ctx, name, args)? {
        ESUCCESS => Ok(()),
        e => Err(Stop::Errno(e)),
    }
}

fn read(ctx: &Ctx, at: u32, len: u32) -> Step<Vec<u8>> {
    let env = ctx.data().wasi.as_ref(ctx);
    let view = env.try_memory_view(ctx).ok_or(Errno::Fault)?;
    let mut buf = vec![0; len as usize];
    view.read(u64::from(at), &mut buf)
        .map_err(|_| Errno::Fault)?;
    Ok(buf)
}

fn write(ctx: &Ctx, at: u32, bytes: &[u8]) -> Step<()> {
    let env = ctx.data().wasi.as_ref(ctx);
    let view = env.try_memory_view(ctx).ok_or(Errno::Fault)?;
    view.write(u64::from(at), bytes).map_err(|_| Errno::Fault)?;
    Ok(())
}

fn memory_size(ctx: &Ctx) -> Step<u64> {
    let env = ctx.data().wasi.as_ref(ctx);
    Ok(env.try_memory_view(ctx).ok_or(Errno::Fault)?.data_size())
}

fn u32_at(ctx: &Ctx, at: u32) -> Step<u32> {
    let b = read(ctx, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_in(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A guest path the wrappers look at, when it is short enough to.
fn path(ctx: &Ctx, at: i32, len: i32) -> Step<Option<Vec<u8>>> {
    let len = len as u32;
    if len > MAX_PATH {
        return Ok(None);
    }
    read(ctx, at as u32, len).map(Some)
}

/// A guest region (pointer, length) that lent memory must not overlap.
type Region = (u32, u32);

/// Guest memory lent for an answer from wasix: the bytes that were there, put back by
/// `give_back`. The guest is single-threaded (kilnd refuses WASIX threads) and
/// stopped in the call that lends, so nothing else reads them meanwhile.
struct Lent {
    at: u32,
    saved: Vec<u8>,
}

impl Lent {
    fn take(ctx: &Ctx, len: u32, avoid: &[Region]) -> Step<Lent> {
        let size = memory_size(ctx)?;
        let overlaps = |at: u32| {
            avoid.iter().any(|&(p, l)| {
                let (a0, a1) = (u64::from(at), u64::from(at) + u64::from(len));
                let (b0, b1) = (u64::from(p), u64::from(p) + u64::from(l));
                a0 < b1 && b0 < a1
            })
        };
        let candidates = std::iter::once(0u32).chain(
            avoid
                .iter()
                .map(|&(p, l)| p.saturating_add(l).saturating_add(7) & !7),
        );
        for at in candidates {
            if u64::from(at) + u64::from(len) <= size && !overlaps(at) {
                return Ok(Lent {
                    at,
                    saved: read(ctx, at, len)?,
                });
            }
        }
        Err(Errno::Nomem.into())
    }

    fn give_back(self, ctx: &Ctx) -> Step<()> {
        write(ctx, self.at, &self.saved)
    }
}

/// Runs `f` with `len` bytes of lent guest memory at the address it is given.
fn lending<T>(
    ctx: &mut Ctx,
    len: u32,
    avoid: &[Region],
    f: impl FnOnce(&mut Ctx, u32) -> Step<T>,
) -> Step<T> {
    let lent = Lent::take(ctx, len, avoid)?;
    let out = f(ctx, lent.at);
    lent.give_back(ctx)?;
    out
}

struct Fdstat {
    filetype: u8,
    base: u64,
    inheriting: u64,
}

fn fdstat(ctx: &mut Ctx, fd: i32, avoid: &[Region]) -> Step<Fdstat> {
    lending(ctx, 24, avoid, |ctx, at| {
        call_ok(
            ctx,
            "fd_fdstat_get",
            &[Value::I32(fd), Value::I32(at as i32)],
        )?;
        let b = read(ctx, at, 24)?;
        Ok(Fdstat {
            filetype: b[0],
            base: u64_in(&b, 8),
            inheriting: u64_in(&b, 16),
        })
    })
}

/// A file's type and inode, by `path_filestat_get` of the guest's own path bytes at
/// (`ptr`, `len`).
fn filestat_at(
    ctx: &mut Ctx,
    fd: i32,
    follow: bool,
    ptr: i32,
    len: usize,
    avoid: &[Region],
) -> Step<(u8, u64)> {
    lending(ctx, 64, avoid, |ctx, at| {
        call_ok(
            ctx,
            "path_filestat_get",
            &[
                Value::I32(fd),
                Value::I32(if follow { LOOKUP_SYMLINK_FOLLOW } else { 0 }),
                Value::I32(ptr),
                Value::I32(len as i32),
                Value::I32(at as i32),
            ],
        )?;
        let b = read(ctx, at, 64)?;
        Ok((b[16], u64_in(&b, 8)))
    })
}

/// Refuses a path that is absolute or climbs out of its fd, for wasip1 modules.
fn check_path(ctx: &Ctx, ptr: i32, len: i32) -> Step<()> {
    if !ctx.data().strict {
        return Ok(());
    }
    match path(ctx, ptr, len)? {
        Some(p) if paths::check(&p).is_err() => Err(Errno::Notcapable.into()),
        _ => Ok(()),
    }
}

fn region(ptr: i32, len: i32) -> Region {
    (ptr as u32, len as u32)
}

/// Puts kilnd's wrappers in place of wasix's imports in `imports`. `strict` is for
/// wasip1 modules (see the module's doc).
pub fn adapt(
    store: &mut Store,
    imports: &mut Imports,
    wasi: &WasiFunctionEnv,
    preopens: Preopens,
    strict: bool,
) {
    const P1: &str = "wasi_snapshot_preview1";
    let mut own = imports.clone();
    if !own.contains_namespace(P1) {
        own =
            wasmer_wasix::generate_import_object_from_env(store, &wasi.env, WasiVersion::Snapshot1);
    }
    let mut wasix = BTreeMap::new();
    for name in CALLED {
        if let Some(Extern::Function(f)) = own.get_export(P1, name) {
            wasix.insert(*name, f);
        }
    }
    let typed = |name: &str| {
        wasix
            .get(name)
            .and_then(|f| f.typed::<(i32, i32, i32, i32), i32>(&*store).ok())
    };
    let (read, write) = (typed("fd_read"), typed("fd_write"));
    let env = FunctionEnv::new(
        store,
        Adapter {
            wasi: wasi.env.clone(),
            wasix,
            read,
            write,
            dup2: None,
            preopens,
            fd3: Some((DIRECTORY_RIGHTS.bits(), ALL_RIGHTS.bits())),
            strict,
        },
    );
    // Same signatures in preview 1 and the older `wasi_unstable`.
    for ns in [P1, "wasi_unstable"] {
        if imports.contains_namespace(ns) {
            wrap!(store, env, imports, ns; fd_prestat_get, fd_prestat_dir_name, fd_close, fd_renumber);
        }
    }
    if imports.contains_namespace(P1) {
        wrap!(store, env, imports, P1;
            fd_read, fd_write, fd_pread, fd_pwrite, fd_seek, fd_tell, fd_allocate, fd_advise,
            fd_datasync, fd_sync, fd_filestat_set_size, fd_filestat_set_times,
            fd_fdstat_set_flags, fd_fdstat_get, fd_fdstat_set_rights, fd_readdir, sock_shutdown,
            path_open, path_filestat_get, path_filestat_set_times, path_create_directory,
            path_remove_directory, path_unlink_file, path_symlink, path_rename, path_link,
            path_readlink);
    }
}

/// Defines each wrapper as `ns`.`name` in `imports`.
macro_rules! wrap {
    ($store:ident, $env:ident, $imports:ident, $ns:expr; $($name:ident),* $(,)?) => {$(
        $imports.define(
            $ns,
            stringify!($name),
            Function::new_typed_with_env(&mut *$store, &$env, $name),
        );
    )*};
}
use wrap;

/// wasix's functions the wrappers call.
const CALLED: &[&str] = &[
    "fd_allocate",
    "fd_advise",
    "fd_datasync",
    "fd_sync",
    "fd_filestat_set_size",
    "fd_fdstat_set_flags",
    "fd_close",
    "fd_fdstat_get",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_times",
    "fd_read",
    "fd_write",
    "fd_pread",
    "fd_pwrite",
    "fd_seek",
    "fd_tell",
    "fd_readdir",
    "path_open",
    "path_filestat_get",
    "path_create_directory",
    "path_remove_directory",
    "path_unlink_file",
    "path_symlink",
    "path_rename",
    "path_link",
    "path_readlink",
    "sock_shutdown",
];
