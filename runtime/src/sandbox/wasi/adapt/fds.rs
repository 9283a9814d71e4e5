//! The wrappers of fd operations: preopens, closing and renumbering, rights.

use wasmer::{RuntimeError, Value};
use wasmer_wasix::types::wasi::Errno;
use wasmer_wasix::{WasiVersion, ALL_RIGHTS};

use super::*;

pub(super) fn fd_prestat_get(ctx: Ctx, fd: i32, buf: i32) -> Result<i32, RuntimeError> {
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

pub(super) fn fd_prestat_dir_name(
    ctx: Ctx,
    fd: i32,
    buf: i32,
    buf_len: i32,
) -> Result<i32, RuntimeError> {
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

pub(super) fn fd_close(mut ctx: Ctx, fd: i32) -> Result<i32, RuntimeError> {
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
///
/// `to` must be open, as in wasmtime, except a standard stream: programs redirect one
/// by closing it and renumbering a file onto it (`close(1); dup2(fd, 1)`), as Yosys
/// does around ABC, which wasix allowed.
pub(super) fn fd_renumber(mut ctx: Ctx, from: i32, to: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        if !is_open(&mut ctx, from)? {
            return Ok(errno(Errno::Badf));
        }
        let to_open = is_open(&mut ctx, to)?;
        if !to_open && !(0..=2).contains(&to) {
            return Ok(errno(Errno::Badf));
        }
        let moved = fdstat(&mut ctx, from, &[])?;
        if from == to {
            return Ok(ESUCCESS);
        }
        if to_open {
            call_ok(&mut ctx, "fd_close", &[Value::I32(to)])?;
        }
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
pub(super) fn capable(e: i32) -> i32 {
    if e == errno(Errno::Access) {
        errno(Errno::Notcapable)
    } else {
        e
    }
}

pub(super) fn fd_read(
    mut ctx: Ctx,
    fd: i32,
    iovs: i32,
    len: i32,
    nread: i32,
) -> Result<i32, RuntimeError> {
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

pub(super) fn fd_write(
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
        pub(super) fn $name(mut ctx: Ctx, $($arg: $ty),*) -> Result<i32, RuntimeError> {
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
pub(super) fn is_open(ctx: &mut Ctx, fd: i32) -> Step<bool> {
    let all = ALL_RIGHTS.bits() as i64;
    let probe = [Value::I32(fd), Value::I64(all), Value::I64(all)];
    Ok(call(ctx, "fd_fdstat_set_rights", &probe)? != errno(Errno::Badf))
}

/// wasix answers `fd_fdstat_get` for fds 0 to 3 from constants, open or not: the
/// standard streams as terminals and fd 3 as its root with every right. kilnd asks
/// wasix's file table whether the fd is open (`is_open`), and gives fd 3 the rights
/// it really has.
pub(super) fn fd_fdstat_get(mut ctx: Ctx, fd: i32, buf: i32) -> Result<i32, RuntimeError> {
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

pub(super) fn fd_fdstat_set_rights(
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

/// wasix's entries carry inode numbers of their own; WASI's are the ones
/// `fd_filestat_get` and `path_filestat_get` give for the same names.
pub(super) fn fd_readdir(
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

/// `sock_shutdown` of an fd that is not open is `BADF`, of one that is not a socket
/// `NOTSOCK` (wasix answers otherwise); a socket's is wasix's.
pub(super) fn sock_shutdown(mut ctx: Ctx, fd: i32, how: i32) -> Result<i32, RuntimeError> {
    answer((|| {
        if !is_open(&mut ctx, fd)? {
            return Ok(errno(Errno::Badf));
        }
        let st = fdstat(&mut ctx, fd, &[])?;
        if !matches!(st.filetype, FILETYPE_SOCKET_DGRAM | FILETYPE_SOCKET_STREAM) {
            return Ok(errno(Errno::Notsock));
        }
        call(
            &mut ctx,
            "sock_shutdown",
            &[Value::I32(fd), Value::I32(how)],
        )
    })())
}
