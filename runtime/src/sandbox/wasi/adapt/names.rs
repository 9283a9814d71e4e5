//! The wrappers of path operations: opening, names, links, times.

use wasmer::{RuntimeError, Value};
use wasmer_wasix::types::wasi::{Errno, Fstflags, Rights};

use super::*;

// ---- opening ---------------------------------------------------------------------

#[allow(clippy::too_many_arguments)] // WASI's path_open
pub(super) fn path_open(
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

pub(super) fn path_filestat_get(
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

pub(super) fn path_create_directory(
    mut ctx: Ctx,
    fd: i32,
    path: i32,
    len: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        let args = [Value::I32(fd), Value::I32(path), Value::I32(len)];
        call(&mut ctx, "path_create_directory", &args)
    })())
}

pub(super) fn path_remove_directory(
    mut ctx: Ctx,
    fd: i32,
    path: i32,
    len: i32,
) -> Result<i32, RuntimeError> {
    answer((|| {
        check_path(&ctx, path, len)?;
        let args = [Value::I32(fd), Value::I32(path), Value::I32(len)];
        call(&mut ctx, "path_remove_directory", &args)
    })())
}

/// Unlinking a directory is `ISDIR` (wasix: `NOENT`), and a file named with a
/// trailing slash is `NOTDIR`.
pub(super) fn path_unlink_file(
    mut ctx: Ctx,
    fd: i32,
    path: i32,
    len: i32,
) -> Result<i32, RuntimeError> {
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
pub(super) fn path_symlink(
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
        let avoid = [region(old, old_len), region(new, new_len)];
        if let Some(e) = new_name_with_slash(&mut ctx, fd, new, new_len, &avoid)? {
            return Ok(e);
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
pub(super) fn path_rename(
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
pub(super) fn path_link(
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
        if let Some(e) = new_name_with_slash(&mut ctx, new_fd, new, new_len, &avoid)? {
            return Ok(e);
        }
        // wasix keeps a hard link to a symlink in memory only (gone for the next
        // lookup); kilnd makes it a second symlink with the same target, which
        // resolves the same.
        if !follow {
            if let Ok((FILETYPE_SYMLINK, _)) = filestat_at(&mut ctx, old_fd, false, old, o, &avoid)
            {
                return with_link(&mut ctx, old_fd, old, old_len, &avoid, |ctx, at, n| {
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
pub(super) fn path_readlink(
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
        let link = with_link(&mut ctx, fd, path, path_len, &avoid, |ctx, at, n| {
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
pub(super) fn path_filestat_set_times(
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

/// A new name that ends in a slash (a directory's) names nothing a symlink or a link
/// can be: `EXIST` if it is taken, else `NOENT`; None for a name without one.
fn new_name_with_slash(
    ctx: &mut Ctx,
    fd: i32,
    name: i32,
    name_len: i32,
    avoid: &[Region],
) -> Step<Option<i32>> {
    let Some(bytes) = path(ctx, name, name_len)? else {
        return Ok(None);
    };
    if !paths::has_trailing_slash(&bytes) {
        return Ok(None);
    }
    let trimmed = paths::trim_trailing_slashes(&bytes).len();
    Ok(Some(
        match filestat_at(ctx, fd, false, name, trimmed, avoid) {
            Ok(_) => errno(Errno::Exist),
            Err(_) => errno(Errno::Noent),
        },
    ))
}

/// Reads the symlink at (`path`, `path_len`) under `fd` into lent guest memory and
/// runs `f` with its address and length there (at most `MAX_LINK` bytes).
fn with_link<T>(
    ctx: &mut Ctx,
    fd: i32,
    path: i32,
    path_len: i32,
    avoid: &[Region],
    f: impl FnOnce(&mut Ctx, u32, u32) -> Step<T>,
) -> Step<T> {
    lending(ctx, MAX_LINK + 4, avoid, |ctx, at| {
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
        f(ctx, at, n)
    })
}
