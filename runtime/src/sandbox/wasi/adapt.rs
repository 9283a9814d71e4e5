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
use wasmer_wasix::types::wasi::{Errno, Fstflags, Rights};
use wasmer_wasix::{WasiEnv, WasiFunctionEnv, WasiVersion, ALL_RIGHTS};

use super::paths;

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

// ---- preopens ------------------------------------------------------------------

fn fd_prestat_get(ctx: Ctx, fd: i32, buf: i32) -> Result<i32, RuntimeError> {
    let name_len = ctx
        .data()
        .preopens
        .lock()
        .ok()
        .and_then(|p| p.get(&(fd as u32)).map(String::len));
    answer((|| {
        let len = name_len.ok_or(Errno::Badf)?;
        // A prestat: tag 0 (a directory), padding, then the name's length.
        let mut prestat = [0u8; 8];
        prestat[4..].copy_from_slice(&(len as u32).to_le_bytes());
        write(&ctx, buf as u32, &prestat)?;
        Ok(ESUCCESS)
    })())
}

fn fd_prestat_dir_name(ctx: Ctx, fd: i32, buf: i32, buf_len: i32) -> Result<i32, RuntimeError> {
    let name = ctx
        .data()
        .preopens
        .lock()
        .ok()
        .and_then(|p| p.get(&(fd as u32)).cloned());
    answer((|| {
        let name = name.ok_or(Errno::Badf)?;
        if (buf_len as u32 as usize) < name.len() {
            return Err(Errno::Nametoolong.into());
        }
        write(&ctx, buf as u32, name.as_bytes())?;
        Ok(ESUCCESS)
    })())
}

fn fd_close(mut ctx: Ctx, fd: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        let e = call(&mut ctx, "fd_close", &[Value::I32(fd)])?;
        if e == ESUCCESS {
            if let Ok(mut p) = ctx.data().preopens.lock() {
                p.remove(&(fd as u32));
            }
            if fd == 3 {
                ctx.data_mut().fd3 = None;
            }
        }
        Ok(e)
    })())
}

/// WASI's renumber moves `from` onto `to` (closing what `to` was); wasix's copies it
/// with `to` taking `from`'s inheriting rights, leaves `from` open, and refuses a
/// preopen as `to`. kilnd closes `to`, duplicates `from` exactly into it (wasix's
/// `fd_dup2` takes the lowest free fd from `to` on, which is `to`), and closes `from`.
fn fd_renumber(mut ctx: Ctx, from: i32, to: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        if !is_open(&mut ctx, from)? || !is_open(&mut ctx, to)? {
            return Ok(errno(Errno::Badf));
        }
        let moved = fdstat(&mut ctx, from, &[])?;
        if from == to {
            return Ok(ESUCCESS);
        }
        call_ok(&mut ctx, "fd_close", &[Value::I32(to)])?;
        let dup2 = match ctx.data().dup2.clone() {
            Some(f) => f,
            None => {
                let wasi = ctx.data().wasi.clone();
                let made = wasmer_wasix::generate_import_object_from_env(
                    &mut ctx,
                    &wasi,
                    WasiVersion::Wasix32v1,
                );
                let Some(Extern::Function(f)) = made.get_export("wasix_32v1", "fd_dup2") else {
                    return Err(RuntimeError::new("wasix has no `fd_dup2`").into());
                };
                ctx.data_mut().dup2 = Some(f.clone());
                f
            }
        };
        let landed = lending(&mut ctx, 4, &[], |ctx, at| {
            let args = [
                Value::I32(from),
                Value::I32(to),
                Value::I32(0),
                Value::I32(at as i32),
            ];
            match dup2.call(ctx, &args)?.first() {
                Some(Value::I32(ESUCCESS)) => Ok(u32_at(ctx, at)?),
                Some(Value::I32(e)) => Err(Stop::Errno(*e)),
                other => Err(RuntimeError::new(format!("fd_dup2 returned {other:?}")).into()),
            }
        })?;
        if landed != to as u32 {
            return Err(RuntimeError::new(format!(
                "fd_renumber({from}, {to}): wasix put the copy at {landed}"
            ))
            .into());
        }
        call_ok(&mut ctx, "fd_close", &[Value::I32(from)])?;
        if to == 3 {
            ctx.data_mut().fd3 = (from > 3).then_some((moved.base, moved.inheriting));
        }
        if let Ok(mut p) = ctx.data().preopens.lock() {
            p.remove(&(to as u32));
            if let Some(name) = p.remove(&(from as u32)) {
                p.insert(to as u32, name);
            }
        }
        Ok(ESUCCESS)
    })())
}

// ---- rights ----------------------------------------------------------------------

/// wasix answers an fd operation whose right was dropped `ACCES`; WASI says
/// `NOTCAPABLE`. (An fd that is open has no other way to be refused with `ACCES`.)
fn capable(e: i32) -> i32 {
    if e == errno(Errno::Access) {
        errno(Errno::Notcapable)
    } else {
        e
    }
}

fn fd_read(mut ctx: Ctx, fd: i32, iovs: i32, len: i32, nread: i32) -> Result<i32, RuntimeError> {
    let f = ctx.data().read.clone();
    match f {
        Some(f) => Ok(capable(f.call(&mut ctx, fd, iovs, len, nread)?)),
        None => answer(
            call(
                &mut ctx,
                "fd_read",
                &[
                    Value::I32(fd),
                    Value::I32(iovs),
                    Value::I32(len),
                    Value::I32(nread),
                ],
            )
            .map(capable),
        ),
    }
}

fn fd_write(
    mut ctx: Ctx,
    fd: i32,
    iovs: i32,
    len: i32,
    nwritten: i32,
) -> Result<i32, RuntimeError> {
    let f = ctx.data().write.clone();
    match f {
        Some(f) => Ok(capable(f.call(&mut ctx, fd, iovs, len, nwritten)?)),
        None => answer(
            call(
                &mut ctx,
                "fd_write",
                &[
                    Value::I32(fd),
                    Value::I32(iovs),
                    Value::I32(len),
                    Value::I32(nwritten),
                ],
            )
            .map(capable),
        ),
    }
}

/// Wrappers that only turn wasix's `ACCES` for a missing right into `NOTCAPABLE`.
macro_rules! capable {
    ($($name:ident($($arg:ident: $ty:ident),*);)*) => {$(
        fn $name(mut ctx: Ctx, $($arg: $ty),*) -> Result<i32, RuntimeError> {
            answer(call(&mut ctx, stringify!($name), &[$(Value::from($arg)),*]).map(capable))
        }
    )*};
}

capable! {
    fd_pread(fd: i32, iovs: i32, len: i32, offset: i64, nread: i32);
    fd_pwrite(fd: i32, iovs: i32, len: i32, offset: i64, nwritten: i32);
    fd_seek(fd: i32, offset: i64, whence: i32, newoffset: i32);
    fd_tell(fd: i32, offset: i32);
    fd_allocate(fd: i32, offset: i64, len: i64);
    fd_advise(fd: i32, offset: i64, len: i64, advice: i32);
    fd_datasync(fd: i32);
    fd_sync(fd: i32);
    fd_filestat_set_size(fd: i32, size: i64);
    fd_filestat_set_times(fd: i32, atim: i64, mtim: i64, fst_flags: i32);
    fd_fdstat_set_flags(fd: i32, flags: i32);
}

/// Whether `fd` is open in wasix's file table: asking to set its rights to every right
/// fails `BADF` when it is not, and changes nothing when it is (rights only shrink).
/// `fd_fdstat_get` cannot tell for fds 0 to 3 (below).
fn is_open(ctx: &mut Ctx, fd: i32) -> Step<bool> {
    let all = ALL_RIGHTS.bits() as i64;
    let probe = [Value::I32(fd), Value::I64(all), Value::I64(all)];
    Ok(call(ctx, "fd_fdstat_set_rights", &probe)? != errno(Errno::Badf))
}

/// wasix answers `fd_fdstat_get` for fds 0 to 3 from constants, open or not: the
/// standard streams as terminals and fd 3 as its root with every right. kilnd asks
/// wasix's file table whether the fd is open (`is_open`), and gives fd 3 the rights
/// it really has.
fn fd_fdstat_get(mut ctx: Ctx, fd: i32, buf: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        if !is_open(&mut ctx, fd)? {
            return Ok(errno(Errno::Badf));
        }
        let e = call(
            &mut ctx,
            "fd_fdstat_get",
            &[Value::I32(fd), Value::I32(buf)],
        )?;
        if e == ESUCCESS && fd == 3 {
            if let Some((base, inheriting)) = ctx.data().fd3 {
                let mut rights = [0u8; 16];
                rights[..8].copy_from_slice(&base.to_le_bytes());
                rights[8..].copy_from_slice(&inheriting.to_le_bytes());
                write(&ctx, buf as u32 + 8, &rights)?;
            }
        }
        Ok(e)
    })())
}

fn fd_fdstat_set_rights(
    mut ctx: Ctx,
    fd: i32,
    base: i64,
    inheriting: i64,
) -> Result<i32, RuntimeError> {
    answer((|| {
        let args = [Value::I32(fd), Value::I64(base), Value::I64(inheriting)];
        let e = call(&mut ctx, "fd_fdstat_set_rights", &args)?;
        if e == ESUCCESS && fd == 3 {
            ctx.data_mut().fd3 = Some((base as u64, inheriting as u64));
        }
        Ok(e)
    })())
}

// ---- opening ---------------------------------------------------------------------

#[allow(clippy::too_many_arguments)] // WASI's path_open
fn path_open(
    mut ctx: Ctx,
    fd: i32,
    dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    rights_base: i64,
    rights_inheriting: i64,
    fdflags: i32,
    opened: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, path_len)?;
        let args = [
            Value::I32(fd),
            Value::I32(dirflags),
            Value::I32(path),
            Value::I32(path_len),
            Value::I32(oflags),
            Value::I64(rights_base),
            Value::I64(rights_inheriting),
            Value::I32(fdflags),
            Value::I32(opened),
        ];
        let e = call(&mut ctx, "path_open", &args)?;
        let avoid = [region(path, path_len), region(opened, 4)];
        if e == errno(Errno::Access) {
            // wasix says ACCES for a file where a directory fd belongs; WASI NOTDIR.
            if let Ok(st) = fdstat(&mut ctx, fd, &avoid) {
                if st.filetype != FILETYPE_DIRECTORY {
                    return Ok(errno(Errno::Notdir));
                }
            }
        }
        if e != ESUCCESS || !ctx.data().strict {
            return Ok(e);
        }
        // The new fd has the rights asked for, and a directory only a directory's:
        // wasix adds the rights it thinks an open mode implies.
        let new = u32_at(&ctx, opened as u32)? as i32;
        if new <= 3 {
            // wasix's fdstat of fds 0 to 3 is made up; leave their rights as wasix set them.
            if new == 3 {
                ctx.data_mut().fd3 = None;
            }
            return Ok(ESUCCESS);
        }
        let st = fdstat(&mut ctx, new, &avoid)?;
        let mut base = st.base & rights_base as u64;
        if st.filetype == FILETYPE_DIRECTORY {
            base &= DIRECTORY_RIGHTS.bits();
        }
        let inheriting = st.inheriting & rights_inheriting as u64;
        if (base, inheriting) != (st.base, st.inheriting) {
            call_ok(
                &mut ctx,
                "fd_fdstat_set_rights",
                &[
                    Value::I32(new),
                    Value::I64(base as i64),
                    Value::I64(inheriting as i64),
                ],
            )?;
        }
        Ok(ESUCCESS)
    })())
}

// ---- names -----------------------------------------------------------------------

fn path_filestat_get(
    mut ctx: Ctx,
    fd: i32,
    flags: i32,
    path: i32,
    len: i32,
    buf: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        let args = [
            Value::I32(fd),
            Value::I32(flags),
            Value::I32(path),
            Value::I32(len),
            Value::I32(buf),
        ];
        call(&mut ctx, "path_filestat_get", &args)
    })())
}

fn path_create_directory(mut ctx: Ctx, fd: i32, path: i32, len: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        let args = [Value::I32(fd), Value::I32(path), Value::I32(len)];
        call(&mut ctx, "path_create_directory", &args)
    })())
}

fn path_remove_directory(mut ctx: Ctx, fd: i32, path: i32, len: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        let args = [Value::I32(fd), Value::I32(path), Value::I32(len)];
        call(&mut ctx, "path_remove_directory", &args)
    })())
}

/// Unlinking a directory is `ISDIR` (wasix: `NOENT`), and a file named with a
/// trailing slash is `NOTDIR`.
fn path_unlink_file(mut ctx: Ctx, fd: i32, path: i32, len: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        if let Some(bytes) = self::path(&ctx, path, len)? {
            let trimmed = paths::trim_trailing_slashes(&bytes).len();
            let avoid = [region(path, len)];
            if let Ok((filetype, _)) = filestat_at(&mut ctx, fd, false, path, trimmed, &avoid) {
                if filetype == FILETYPE_DIRECTORY {
                    return Ok(errno(Errno::Isdir));
                }
                if paths::has_trailing_slash(&bytes) {
                    return Ok(errno(Errno::Notdir));
                }
            }
        }
        let args = [Value::I32(fd), Value::I32(path), Value::I32(len)];
        call(&mut ctx, "path_unlink_file", &args)
    })())
}

/// A symlink may not point at an absolute path (wasip1 modules), and its own name may
/// not end in a slash: `EXIST` if something has that name, else `NOENT`.
fn path_symlink(
    mut ctx: Ctx,
    old: i32,
    old_len: i32,
    fd: i32,
    new: i32,
    new_len: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        if ctx.data().strict {
            if let Some(target) = path(&ctx, old, old_len)? {
                if target.first() == Some(&b'/') {
                    return Ok(errno(Errno::Notcapable));
                }
            }
        }
        check_path(&ctx, new, new_len)?;
        if let Some(name) = path(&ctx, new, new_len)? {
            if paths::has_trailing_slash(&name) {
                let trimmed = paths::trim_trailing_slashes(&name).len();
                let avoid = [region(old, old_len), region(new, new_len)];
                return Ok(
                    match filestat_at(&mut ctx, fd, false, new, trimmed, &avoid) {
                        Ok(_) => errno(Errno::Exist),
                        Err(_) => errno(Errno::Noent),
                    },
                );
            }
        }
        let args = [
            Value::I32(old),
            Value::I32(old_len),
            Value::I32(fd),
            Value::I32(new),
            Value::I32(new_len),
        ];
        call(&mut ctx, "path_symlink", &args)
    })())
}

/// Renaming a directory over a non-empty one is `NOTEMPTY`, over a file `NOTDIR`, a
/// file over a directory `ISDIR` (wasix: `IO` for each).
fn path_rename(
    mut ctx: Ctx,
    fd: i32,
    old: i32,
    old_len: i32,
    new_fd: i32,
    new: i32,
    new_len: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, old, old_len)?;
        check_path(&ctx, new, new_len)?;
        let args = [
            Value::I32(fd),
            Value::I32(old),
            Value::I32(old_len),
            Value::I32(new_fd),
            Value::I32(new),
            Value::I32(new_len),
        ];
        let e = call(&mut ctx, "path_rename", &args)?;
        if e != errno(Errno::Io) {
            return Ok(e);
        }
        // wasix says IO for every refusal the host gives; say which.
        let avoid = [region(old, old_len), region(new, new_len)];
        let (o, n) = (old_len as u32 as usize, new_len as u32 as usize);
        let from = filestat_at(&mut ctx, fd, false, old, o, &avoid).map(|t| t.0);
        let onto = filestat_at(&mut ctx, new_fd, false, new, n, &avoid).map(|t| t.0);
        Ok(match (from, onto) {
            (Ok(FILETYPE_DIRECTORY), Ok(FILETYPE_DIRECTORY)) => errno(Errno::Notempty),
            (Ok(FILETYPE_DIRECTORY), Ok(_)) => errno(Errno::Notdir),
            (Ok(_), Ok(FILETYPE_DIRECTORY)) => errno(Errno::Isdir),
            _ => e,
        })
    })())
}

#[allow(clippy::too_many_arguments)] // WASI's path_link
fn path_link(
    mut ctx: Ctx,
    old_fd: i32,
    old_flags: i32,
    old: i32,
    old_len: i32,
    new_fd: i32,
    new: i32,
    new_len: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, old, old_len)?;
        check_path(&ctx, new, new_len)?;
        // A hard link to a directory is `PERM`, as on Linux; a new name with a
        // trailing slash (a directory's) `EXIST` if it is taken, else `NOENT`.
        let avoid = [region(old, old_len), region(new, new_len)];
        let follow = old_flags & LOOKUP_SYMLINK_FOLLOW != 0;
        let o = old_len as u32 as usize;
        if let Ok((FILETYPE_DIRECTORY, _)) = filestat_at(&mut ctx, old_fd, follow, old, o, &avoid) {
            return Ok(errno(Errno::Perm));
        }
        if let Some(name) = path(&ctx, new, new_len)? {
            if paths::has_trailing_slash(&name) {
                let trimmed = paths::trim_trailing_slashes(&name).len();
                return Ok(
                    match filestat_at(&mut ctx, new_fd, false, new, trimmed, &avoid) {
                        Ok(_) => errno(Errno::Exist),
                        Err(_) => errno(Errno::Noent),
                    },
                );
            }
        }
        // wasix keeps a hard link to a symlink in memory only (gone for the next
        // lookup); kilnd makes it a second symlink with the same target, which
        // resolves the same.
        if !follow {
            if let Ok((FILETYPE_SYMLINK, _)) = filestat_at(&mut ctx, old_fd, false, old, o, &avoid)
            {
                return lending(&mut ctx, MAX_LINK + 4, &avoid, |ctx, at| {
                    let args = [
                        Value::I32(old_fd),
                        Value::I32(old),
                        Value::I32(old_len),
                        Value::I32(at as i32),
                        Value::I32(MAX_LINK as i32),
                        Value::I32((at + MAX_LINK) as i32),
                    ];
                    call_ok(ctx, "path_readlink", &args)?;
                    let n = u32_at(ctx, at + MAX_LINK)?.min(MAX_LINK);
                    let args = [
                        Value::I32(at as i32),
                        Value::I32(n as i32),
                        Value::I32(new_fd),
                        Value::I32(new),
                        Value::I32(new_len),
                    ];
                    call(ctx, "path_symlink", &args)
                });
            }
        }
        let args = [
            Value::I32(old_fd),
            Value::I32(old_flags),
            Value::I32(old),
            Value::I32(old_len),
            Value::I32(new_fd),
            Value::I32(new),
            Value::I32(new_len),
        ];
        call(&mut ctx, "path_link", &args)
    })())
}

/// A buffer shorter than the link gets the link's first bytes (wasix: `OVERFLOW`).
fn path_readlink(
    mut ctx: Ctx,
    fd: i32,
    path: i32,
    path_len: i32,
    buf: i32,
    buf_len: i32,
    used: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, path_len)?;
        let args = [
            Value::I32(fd),
            Value::I32(path),
            Value::I32(path_len),
            Value::I32(buf),
            Value::I32(buf_len),
            Value::I32(used),
        ];
        let e = call(&mut ctx, "path_readlink", &args)?;
        if e != errno(Errno::Overflow) {
            return Ok(e);
        }
        let avoid = [
            region(path, path_len),
            region(buf, buf_len),
            region(used, 4),
        ];
        let link = lending(&mut ctx, MAX_LINK + 4, &avoid, |ctx, at| {
            let args = [
                Value::I32(fd),
                Value::I32(path),
                Value::I32(path_len),
                Value::I32(at as i32),
                Value::I32(MAX_LINK as i32),
                Value::I32((at + MAX_LINK) as i32),
            ];
            call_ok(ctx, "path_readlink", &args)?;
            let n = u32_at(ctx, at + MAX_LINK)?.min(MAX_LINK);
            read(ctx, at, n)
        })?;
        let n = link.len().min(buf_len as u32 as usize);
        write(&ctx, buf as u32, &link[..n])?;
        write(&ctx, used as u32, &(n as u32).to_le_bytes())?;
        Ok(ESUCCESS)
    })())
}

/// wasix sets the times on the directory fd's cached stat, not on the file; kilnd
/// opens the file and sets them through `fd_filestat_set_times`, which reaches it.
#[allow(clippy::too_many_arguments)] // WASI's path_filestat_set_times
fn path_filestat_set_times(
    mut ctx: Ctx,
    fd: i32,
    flags: i32,
    path: i32,
    path_len: i32,
    atim: i64,
    mtim: i64,
    fst_flags: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, path_len)?;
        let avoid = [region(path, path_len)];
        let st = fdstat(&mut ctx, fd, &avoid)?;
        if st.base & Rights::PATH_FILESTAT_SET_TIMES.bits() == 0 {
            return Ok(errno(Errno::Notcapable));
        }
        let fst = Fstflags::from_bits_truncate(fst_flags as u16);
        if fst.contains(Fstflags::SET_ATIM | Fstflags::SET_ATIM_NOW)
            || fst.contains(Fstflags::SET_MTIM | Fstflags::SET_MTIM_NOW)
        {
            return Ok(errno(Errno::Inval));
        }
        let file = lending(&mut ctx, 4, &avoid, |ctx, at| {
            let args = [
                Value::I32(fd),
                Value::I32(flags),
                Value::I32(path),
                Value::I32(path_len),
                Value::I32(0),
                Value::I64(Rights::FD_FILESTAT_SET_TIMES.bits() as i64),
                Value::I64(0),
                Value::I32(0),
                Value::I32(at as i32),
            ];
            call_ok(ctx, "path_open", &args)?;
            Ok(u32_at(ctx, at)? as i32)
        })?;
        let args = [
            Value::I32(file),
            Value::I64(atim),
            Value::I64(mtim),
            Value::I32(fst_flags),
        ];
        let e = call(&mut ctx, "fd_filestat_set_times", &args)?;
        call(&mut ctx, "fd_close", &[Value::I32(file)])?;
        Ok(e)
    })())
}

/// wasix's entries carry inode numbers of their own; WASI's are the ones
/// `fd_filestat_get` and `path_filestat_get` give for the same names.
fn fd_readdir(
    mut ctx: Ctx,
    fd: i32,
    buf: i32,
    buf_len: i32,
    cookie: i64,
    used: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        let args = [
            Value::I32(fd),
            Value::I32(buf),
            Value::I32(buf_len),
            Value::I64(cookie),
            Value::I32(used),
        ];
        let e = call(&mut ctx, "fd_readdir", &args)?;
        if e != ESUCCESS {
            return Ok(e);
        }
        let filled = u32_at(&ctx, used as u32)?.min(buf_len as u32);
        let entries = read(&ctx, buf as u32, filled)?;
        // Each entry: d_next u64, d_ino u64, d_namlen u32, d_type u8, padding: 24
        // bytes, then the name. Each whole entry gets the inode its name has.
        let avoid = [region(buf, buf_len), region(used, 4)];
        let mut at = 0usize;
        while at + 24 <= entries.len() {
            let namlen = u32::from_le_bytes([
                entries[at + 16],
                entries[at + 17],
                entries[at + 18],
                entries[at + 19],
            ]) as usize;
            let Some(name) = entries.get(at + 24..at + 24 + namlen) else {
                break;
            };
            let name_at = buf + (at + 24) as i32;
            let ino = match name {
                b".." => None,
                b"." => Some(lending(&mut ctx, 64, &avoid, |ctx, st| {
                    call_ok(
                        ctx,
                        "fd_filestat_get",
                        &[Value::I32(fd), Value::I32(st as i32)],
                    )?;
                    Ok(u64_in(&read(ctx, st, 64)?, 8))
                })?),
                _ => filestat_at(&mut ctx, fd, false, name_at, namlen, &avoid)
                    .ok()
                    .map(|(_, ino)| ino),
            };
            if let Some(ino) = ino {
                write(&ctx, buf as u32 + at as u32 + 8, &ino.to_le_bytes())?;
            }
            at += 24 + namlen;
        }
        Ok(ESUCCESS)
    })())
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
        if !imports.contains_namespace(ns) {
            continue;
        }
        let s = &mut *store;
        imports.define(
            ns,
            "fd_prestat_get",
            Function::new_typed_with_env(s, &env, fd_prestat_get),
        );
        imports.define(
            ns,
            "fd_prestat_dir_name",
            Function::new_typed_with_env(s, &env, fd_prestat_dir_name),
        );
        imports.define(
            ns,
            "fd_close",
            Function::new_typed_with_env(s, &env, fd_close),
        );
        imports.define(
            ns,
            "fd_renumber",
            Function::new_typed_with_env(s, &env, fd_renumber),
        );
    }
    if !imports.contains_namespace(P1) {
        return;
    }
    let s = &mut *store;
    let mut put = |name: &str, f: Function| imports.define(P1, name, f);
    put("fd_read", Function::new_typed_with_env(s, &env, fd_read));
    put("fd_write", Function::new_typed_with_env(s, &env, fd_write));
    put("fd_pread", Function::new_typed_with_env(s, &env, fd_pread));
    put(
        "fd_pwrite",
        Function::new_typed_with_env(s, &env, fd_pwrite),
    );
    put("fd_seek", Function::new_typed_with_env(s, &env, fd_seek));
    put("fd_tell", Function::new_typed_with_env(s, &env, fd_tell));
    put(
        "fd_allocate",
        Function::new_typed_with_env(s, &env, fd_allocate),
    );
    put(
        "fd_advise",
        Function::new_typed_with_env(s, &env, fd_advise),
    );
    put(
        "fd_datasync",
        Function::new_typed_with_env(s, &env, fd_datasync),
    );
    put("fd_sync", Function::new_typed_with_env(s, &env, fd_sync));
    put(
        "fd_filestat_set_size",
        Function::new_typed_with_env(s, &env, fd_filestat_set_size),
    );
    put(
        "fd_filestat_set_times",
        Function::new_typed_with_env(s, &env, fd_filestat_set_times),
    );
    put(
        "fd_fdstat_set_flags",
        Function::new_typed_with_env(s, &env, fd_fdstat_set_flags),
    );
    put(
        "fd_fdstat_get",
        Function::new_typed_with_env(s, &env, fd_fdstat_get),
    );
    put(
        "fd_fdstat_set_rights",
        Function::new_typed_with_env(s, &env, fd_fdstat_set_rights),
    );
    put(
        "fd_readdir",
        Function::new_typed_with_env(s, &env, fd_readdir),
    );
    put(
        "path_open",
        Function::new_typed_with_env(s, &env, path_open),
    );
    put(
        "path_filestat_get",
        Function::new_typed_with_env(s, &env, path_filestat_get),
    );
    put(
        "path_filestat_set_times",
        Function::new_typed_with_env(s, &env, path_filestat_set_times),
    );
    put(
        "path_create_directory",
        Function::new_typed_with_env(s, &env, path_create_directory),
    );
    put(
        "path_remove_directory",
        Function::new_typed_with_env(s, &env, path_remove_directory),
    );
    put(
        "path_unlink_file",
        Function::new_typed_with_env(s, &env, path_unlink_file),
    );
    put(
        "path_symlink",
        Function::new_typed_with_env(s, &env, path_symlink),
    );
    put(
        "path_rename",
        Function::new_typed_with_env(s, &env, path_rename),
    );
    put(
        "path_link",
        Function::new_typed_with_env(s, &env, path_link),
    );
    put(
        "path_readlink",
        Function::new_typed_with_env(s, &env, path_readlink),
    );
}

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
];
