//! The functions of `wasi_snapshot_preview1`, each on the module's own fd table and
//! the host's `*at` calls. Every guest pointer and length is checked against the
//! module's memory before anything is read, written or allocated for it; a bad one
//! is `FAULT`, never a host panic.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use wasmer::{Exports, Function, FunctionEnv, FunctionEnvMut, MemoryView, RuntimeError, Store};

use super::host::{self, Resolved};
use super::table::{opened_rights, Entry, Kind};
use super::types::*;
use super::{Exit, WasiEnv};

type Ctx<'a> = FunctionEnvMut<'a, WasiEnv>;
type R = Result<(), Errno>;

/// A directory listing kept for `fd_readdir` holds at most this many bytes of names.
const MAX_LISTING: usize = 16 << 20;

/// The module's memory, bounds-checked.
struct Mem<'a>(MemoryView<'a>);

impl Mem<'_> {
    fn check(&self, ptr: u32, len: u64) -> R {
        if u64::from(ptr) + len > self.0.data_size() {
            return Err(Errno::FAULT);
        }
        Ok(())
    }

    fn read(&self, ptr: u32, len: u32) -> Result<Vec<u8>, Errno> {
        self.check(ptr, u64::from(len))?;
        let mut buf = vec![0u8; len as usize];
        self.0
            .read(u64::from(ptr), &mut buf)
            .map_err(|_| Errno::FAULT)?;
        Ok(buf)
    }

    fn write(&self, ptr: u32, bytes: &[u8]) -> R {
        self.check(ptr, bytes.len() as u64)?;
        self.0
            .write(u64::from(ptr), bytes)
            .map_err(|_| Errno::FAULT)
    }

    fn put_u32(&self, ptr: u32, v: u32) -> R {
        self.write(ptr, &v.to_le_bytes())
    }

    fn put_u64(&self, ptr: u32, v: u64) -> R {
        self.write(ptr, &v.to_le_bytes())
    }

    /// An iovec array: (pointer, length) pairs, each checked.
    fn iovs(&self, ptr: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
        let raw = self.read(ptr, count.checked_mul(8).ok_or(Errno::FAULT)?)?;
        raw.chunks_exact(IOVEC_SIZE)
            .map(|c| {
                let at = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let len = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
                self.check(at, u64::from(len))?;
                Ok((at, len))
            })
            .collect()
    }

    /// A path, bounded.
    fn path(&self, ptr: i32, len: i32) -> Result<Vec<u8>, Errno> {
        let len = len as u32;
        if len as usize > host::MAX_PATH {
            return Err(Errno::NAMETOOLONG);
        }
        self.read(ptr as u32, len)
    }
}

/// Splits `ctx` into the module's WASI state and its memory.
macro_rules! parts {
    ($ctx:ident => $env:ident, $mem:ident) => {
        let (env, store) = $ctx.data_and_store_mut();
        let memory = env.memory.clone().ok_or(Errno::FAULT)?;
        let view = memory.view(&store);
        let $mem = Mem(view);
        let $env = env;
    };
}

// ---- args, environment, clocks, random, process ---------------------------------

fn strings_get(list: &[Vec<u8>], mem: &Mem, ptrs: i32, buf: i32) -> R {
    let (mut ptr, mut at) = (ptrs as u32, buf as u32);
    for s in list {
        mem.put_u32(ptr, at)?;
        mem.write(at, s)?;
        ptr = ptr.checked_add(4).ok_or(Errno::FAULT)?;
        at = at.checked_add(s.len() as u32).ok_or(Errno::FAULT)?;
    }
    Ok(())
}

fn strings_sizes(list: &[Vec<u8>], mem: &Mem, count: i32, size: i32) -> R {
    mem.put_u32(count as u32, list.len() as u32)?;
    mem.put_u32(size as u32, list.iter().map(|s| s.len() as u32).sum())
}

fn args_get(ctx: &mut Ctx, argv: i32, buf: i32) -> R {
    parts!(ctx => env, mem);
    strings_get(&env.args, &mem, argv, buf)
}

fn args_sizes_get(ctx: &mut Ctx, count: i32, size: i32) -> R {
    parts!(ctx => env, mem);
    strings_sizes(&env.args, &mem, count, size)
}

fn environ_get(ctx: &mut Ctx, environ: i32, buf: i32) -> R {
    parts!(ctx => env, mem);
    strings_get(&env.env, &mem, environ, buf)
}

fn environ_sizes_get(ctx: &mut Ctx, count: i32, size: i32) -> R {
    parts!(ctx => env, mem);
    strings_sizes(&env.env, &mem, count, size)
}

fn clock_res_get(ctx: &mut Ctx, id: i32, out: i32) -> R {
    parts!(ctx => _env, mem);
    let clock = clock::host(id as u32).ok_or(Errno::INVAL)?;
    mem.put_u64(out as u32, clock_ns(libc::clock_getres, clock)?.max(1))
}

fn now(clock: libc::clockid_t) -> Result<u64, Errno> {
    clock_ns(libc::clock_gettime, clock)
}

/// `clock_gettime` or `clock_getres` of `clock`, in nanoseconds.
fn clock_ns(
    call: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    clock: libc::clockid_t,
) -> Result<u64, Errno> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a timespec to write into.
    if unsafe { call(clock, &mut ts) } != 0 {
        return Err(Errno::last());
    }
    Ok((ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64))
}

fn clock_time_get(ctx: &mut Ctx, id: i32, _precision: i64, out: i32) -> R {
    parts!(ctx => _env, mem);
    let clock = clock::host(id as u32).ok_or(Errno::INVAL)?;
    mem.put_u64(out as u32, now(clock)?)
}

fn random_get(ctx: &mut Ctx, buf: i32, len: i32) -> R {
    parts!(ctx => _env, mem);
    let (buf, len) = (buf as u32, len as u32);
    mem.check(buf, u64::from(len))?;
    let mut chunk = [0u8; 256];
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(chunk.len() as u32);
        getrandom::getrandom(&mut chunk[..n as usize]).map_err(|_| Errno::IO)?;
        mem.write(buf + done, &chunk[..n as usize])?;
        done += n;
    }
    Ok(())
}

fn sched_yield(_ctx: &mut Ctx) -> R {
    std::thread::yield_now();
    Ok(())
}

fn proc_raise(_ctx: &mut Ctx, _signal: i32) -> R {
    Err(Errno::NOSYS)
}

// ---- file descriptors ----------------------------------------------------------

fn fd_close(ctx: &mut Ctx, fd: i32) -> R {
    ctx.data_mut().table.close(fd)
}

fn fd_renumber(ctx: &mut Ctx, from: i32, to: i32) -> R {
    ctx.data_mut().table.renumber(from, to)
}

fn fd_prestat_get(ctx: &mut Ctx, fd: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let name = env.table.get(fd)?.preopen.as_ref().ok_or(Errno::BADF)?;
    // tag 0 (a directory), padding, the name's length.
    let mut prestat = [0u8; 8];
    prestat[4..].copy_from_slice(&(name.len() as u32).to_le_bytes());
    mem.write(out as u32, &prestat)
}

fn fd_prestat_dir_name(ctx: &mut Ctx, fd: i32, buf: i32, len: i32) -> R {
    parts!(ctx => env, mem);
    let name = env.table.get(fd)?.preopen.as_ref().ok_or(Errno::BADF)?;
    if (len as u32 as usize) < name.len() {
        return Err(Errno::NAMETOOLONG);
    }
    mem.write(buf as u32, name.as_bytes())
}

/// The host descriptor of a file or directory fd, `BADF` for stdio where a file is
/// needed (with `stdio` as the errno to give for a standard stream).
fn host_fd(entry: &Entry, stdio: Errno) -> Result<RawFd, Errno> {
    match &entry.kind {
        Kind::File(fd) => Ok(fd.as_raw_fd()),
        Kind::Dir { fd, .. } => Ok(fd.as_raw_fd()),
        Kind::Stdin { .. } | Kind::Output { .. } => Err(stdio),
    }
}

fn file_fd(entry: &Entry) -> Result<RawFd, Errno> {
    match &entry.kind {
        Kind::File(fd) => Ok(fd.as_raw_fd()),
        Kind::Dir { .. } => Err(Errno::ISDIR),
        Kind::Stdin { .. } | Kind::Output { .. } => Err(Errno::SPIPE),
    }
}

fn host_flags(fd: RawFd) -> Result<u16, Errno> {
    // SAFETY: F_GETFL takes no argument.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(Errno::last());
    }
    let mut flags = 0;
    if fl & libc::O_APPEND != 0 {
        flags |= fdflags::APPEND;
    }
    if fl & libc::O_NONBLOCK != 0 {
        flags |= fdflags::NONBLOCK;
    }
    if fl & libc::O_SYNC == libc::O_SYNC {
        flags |= fdflags::SYNC | fdflags::RSYNC;
    } else if fl & libc::O_DSYNC != 0 {
        flags |= fdflags::DSYNC;
    }
    Ok(flags)
}

fn fd_fdstat_get(ctx: &mut Ctx, fd: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let entry = env.table.get(fd)?;
    let (filetype, flags) = match &entry.kind {
        Kind::Stdin { host: true } => (stdio_type(0), 0),
        Kind::Stdin { host: false } => (filetype::CHARACTER_DEVICE, 0),
        Kind::Output { filetype, .. } => (*filetype, 0),
        Kind::File(f) => {
            let st = host::fstat(f.as_raw_fd())?;
            (filetype::of_mode(st.st_mode), host_flags(f.as_raw_fd())?)
        }
        Kind::Dir { .. } => (filetype::DIRECTORY, 0),
    };
    mem.write(
        out as u32,
        &fdstat_bytes(filetype, flags, entry.base, entry.inheriting),
    )
}

/// What kilnd's own standard stream `fd` is, as wasmtime tells it: a terminal is a
/// character device, anything else (a file, a pipe) of unknown type.
pub fn stdio_type(fd: RawFd) -> u8 {
    // SAFETY: isatty only reads the descriptor's state.
    if unsafe { libc::isatty(fd) } == 1 {
        filetype::CHARACTER_DEVICE
    } else {
        filetype::UNKNOWN
    }
}

fn fd_fdstat_set_flags(ctx: &mut Ctx, fd: i32, flags: i32) -> R {
    let entry = ctx.data().table.with(fd, rights::FD_FDSTAT_SET_FLAGS)?;
    let flags = flags as u16;
    let f = match &entry.kind {
        Kind::File(f) => f.as_raw_fd(),
        // The standard streams take no flags of their own.
        Kind::Stdin { .. } | Kind::Output { .. } => return Ok(()),
        Kind::Dir { .. } => return Err(Errno::BADF),
    };
    if flags & (fdflags::DSYNC | fdflags::RSYNC | fdflags::SYNC) != 0 {
        return Err(Errno::NOTSUP);
    }
    // SAFETY: F_GETFL takes no argument.
    let mut fl = unsafe { libc::fcntl(f, libc::F_GETFL) };
    if fl < 0 {
        return Err(Errno::last());
    }
    fl &= !(libc::O_APPEND | libc::O_NONBLOCK);
    if flags & fdflags::APPEND != 0 {
        fl |= libc::O_APPEND;
    }
    if flags & fdflags::NONBLOCK != 0 {
        fl |= libc::O_NONBLOCK;
    }
    // SAFETY: F_SETFL takes the flags as an int.
    if unsafe { libc::fcntl(f, libc::F_SETFL, fl) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn fd_fdstat_set_rights(ctx: &mut Ctx, fd: i32, base: i64, inheriting: i64) -> R {
    ctx.data_mut()
        .table
        .set_rights(fd, base as u64, inheriting as u64)
}

fn fd_filestat_get(ctx: &mut Ctx, fd: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let entry = env.table.with(fd, rights::FD_FILESTAT_GET)?;
    let st = match &entry.kind {
        Kind::File(f) | Kind::Dir { fd: f, .. } => Filestat::of(&host::fstat(f.as_raw_fd())?),
        Kind::Stdin { host: true } => Filestat {
            filetype: stdio_type(0),
            ..Default::default()
        },
        Kind::Stdin { host: false } => Filestat {
            filetype: filetype::CHARACTER_DEVICE,
            ..Default::default()
        },
        Kind::Output { filetype, .. } => Filestat {
            filetype: *filetype,
            ..Default::default()
        },
    };
    mem.write(out as u32, &st.bytes())
}

fn fd_filestat_set_size(ctx: &mut Ctx, fd: i32, size: i64) -> R {
    let f = file_fd(ctx.data().table.with(fd, rights::FD_FILESTAT_SET_SIZE)?)?;
    // SAFETY: ftruncate of a descriptor we hold.
    if unsafe { libc::ftruncate(f, size) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The two timespecs of utimensat for WASI's times and `fstflags`.
fn times(atim: i64, mtim: i64, fst: i32) -> Result<[libc::timespec; 2], Errno> {
    let fst = fst as u16;
    let one = |set: u16, now: u16, at: i64| {
        if fst & set != 0 && fst & now != 0 {
            return Err(Errno::INVAL);
        }
        Ok(if fst & now != 0 {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            }
        } else if fst & set != 0 {
            let ns = at as u64;
            libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            }
        } else {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            }
        })
    };
    if fst & !(fstflags::ATIM | fstflags::ATIM_NOW | fstflags::MTIM | fstflags::MTIM_NOW) != 0 {
        return Err(Errno::INVAL);
    }
    Ok([
        one(fstflags::ATIM, fstflags::ATIM_NOW, atim)?,
        one(fstflags::MTIM, fstflags::MTIM_NOW, mtim)?,
    ])
}

fn fd_filestat_set_times(ctx: &mut Ctx, fd: i32, atim: i64, mtim: i64, fst: i32) -> R {
    let entry = ctx.data().table.with(fd, rights::FD_FILESTAT_SET_TIMES)?;
    let f = host_fd(entry, Errno::NOTSUP)?;
    host::utimensat(f, b"", &times(atim, mtim, fst)?)
}

fn fd_advise(ctx: &mut Ctx, fd: i32, _offset: i64, _len: i64, advice: i32) -> R {
    file_fd(ctx.data().table.with(fd, rights::FD_ADVISE)?)?;
    // Advice is a hint; kilnd takes none (its workers' syscall filter has no fadvise).
    if !(0..=5).contains(&advice) {
        return Err(Errno::INVAL);
    }
    Ok(())
}

fn fd_allocate(ctx: &mut Ctx, fd: i32, _offset: i64, _len: i64) -> R {
    file_fd(ctx.data().table.with(fd, rights::FD_ALLOCATE)?)?;
    // As wasmtime: preview 1's allocate is not supported (the testsuite allows it).
    Err(Errno::NOTSUP)
}

fn fd_sync(ctx: &mut Ctx, fd: i32) -> R {
    sync(ctx, fd, rights::FD_SYNC, libc::fsync)
}

fn fd_datasync(ctx: &mut Ctx, fd: i32) -> R {
    sync(ctx, fd, rights::FD_DATASYNC, libc::fdatasync)
}

/// fsync(2) or fdatasync(2) of `fd`, which needs the right `need`.
fn sync(
    ctx: &mut Ctx,
    fd: i32,
    need: u64,
    call: unsafe extern "C" fn(libc::c_int) -> libc::c_int,
) -> R {
    let f = host_fd(ctx.data().table.with(fd, need)?, Errno::INVAL)?;
    // SAFETY: a sync of a descriptor we hold.
    if unsafe { call(f) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// lseek(2) of a descriptor we hold; the new offset.
fn seek(f: RawFd, offset: i64, how: libc::c_int) -> Result<u64, Errno> {
    // SAFETY: lseek of a descriptor we hold.
    let pos = unsafe { libc::lseek(f, offset, how) };
    if pos < 0 {
        return Err(Errno::last());
    }
    Ok(pos as u64)
}

fn fd_seek(ctx: &mut Ctx, fd: i32, offset: i64, whence: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let need = if offset == 0 && whence as u8 == whence::CUR {
        rights::FD_TELL
    } else {
        rights::FD_SEEK | rights::FD_TELL
    };
    let f = file_fd(env.table.with(fd, need)?)?;
    let how = match whence {
        w if w == i32::from(whence::SET) => libc::SEEK_SET,
        w if w == i32::from(whence::CUR) => libc::SEEK_CUR,
        w if w == i32::from(whence::END) => libc::SEEK_END,
        _ => return Err(Errno::INVAL),
    };
    mem.put_u64(out as u32, seek(f, offset, how)?)
}

fn fd_tell(ctx: &mut Ctx, fd: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let f = file_fd(env.table.with(fd, rights::FD_TELL)?)?;
    mem.put_u64(out as u32, seek(f, 0, libc::SEEK_CUR)?)
}

/// read(2) or pread(2) into `buf`.
fn host_read(fd: RawFd, buf: &mut [u8], at: Option<i64>) -> Result<usize, Errno> {
    // SAFETY: buf is writable for its length.
    host::retry(|| unsafe {
        match at {
            Some(off) => libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off),
            None => libc::read(fd, buf.as_mut_ptr().cast(), buf.len()),
        }
    })
}

/// write(2) or pwrite(2) of `buf`; may write less.
fn host_write(fd: RawFd, buf: &[u8], at: Option<i64>) -> Result<usize, Errno> {
    // SAFETY: buf is readable for its length.
    host::retry(|| unsafe {
        match at {
            Some(off) => libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off),
            None => libc::write(fd, buf.as_ptr().cast(), buf.len()),
        }
    })
}

fn read_into(
    env: &mut WasiEnv,
    mem: &Mem,
    fd: i32,
    iovs: i32,
    n: i32,
    at: Option<i64>,
) -> Result<u32, Errno> {
    let need = match at {
        Some(off) if off < 0 => return Err(Errno::INVAL),
        Some(_) => rights::FD_READ | rights::FD_SEEK,
        None => rights::FD_READ,
    };
    let entry = env.table.with(fd, need)?;
    let src = match &entry.kind {
        Kind::File(f) => Some(f.as_raw_fd()),
        Kind::Stdin { host: true } if at.is_none() => Some(0),
        Kind::Stdin { host: false } if at.is_none() => None,
        Kind::Dir { .. } => return Err(Errno::ISDIR),
        _ if at.is_some() => return Err(Errno::SPIPE),
        _ => return Err(Errno::BADF),
    };
    let Some(src) = src else {
        return Ok(0);
    };
    let mut total = 0u32;
    let scratch = &mut env.scratch;
    for (ptr, len) in mem.iovs(iovs as u32, n as u32)? {
        if len == 0 {
            continue;
        }
        scratch.resize(len as usize, 0);
        let got = host_read(src, scratch, at.map(|o| o + i64::from(total)))?;
        mem.write(ptr, &scratch[..got])?;
        total += got as u32;
        if got < len as usize {
            break;
        }
    }
    Ok(total)
}

fn write_from(
    env: &mut WasiEnv,
    mem: &Mem,
    fd: i32,
    iovs: i32,
    n: i32,
    at: Option<i64>,
) -> Result<u32, Errno> {
    let need = match at {
        Some(off) if off < 0 => return Err(Errno::INVAL),
        Some(_) => rights::FD_WRITE | rights::FD_SEEK,
        None => rights::FD_WRITE,
    };
    let list = mem.iovs(iovs as u32, n as u32)?;
    let entry = env.table.with(fd, need)?;
    let scratch = &mut env.scratch;
    scratch.clear();
    for &(ptr, len) in &list {
        let from = scratch.len();
        scratch.resize(from + len as usize, 0);
        mem.0
            .read(u64::from(ptr), &mut scratch[from..])
            .map_err(|_| Errno::FAULT)?;
    }
    match &entry.kind {
        Kind::Output { sink, .. } if at.is_none() => {
            sink.write_all(scratch).map_err(Errno::from)?;
            Ok(scratch.len() as u32)
        }
        Kind::File(f) => {
            let f = f.as_raw_fd();
            let mut done = 0usize;
            while done < scratch.len() {
                let n = host_write(f, &scratch[done..], at.map(|o| o + done as i64))?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            Ok(done as u32)
        }
        Kind::Dir { .. } => Err(Errno::ISDIR),
        _ if at.is_some() => Err(Errno::SPIPE),
        _ => Err(Errno::BADF),
    }
}

fn fd_read(ctx: &mut Ctx, fd: i32, iovs: i32, n: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let got = read_into(env, &mem, fd, iovs, n, None)?;
    mem.put_u32(out as u32, got)
}

fn fd_pread(ctx: &mut Ctx, fd: i32, iovs: i32, n: i32, offset: i64, out: i32) -> R {
    parts!(ctx => env, mem);
    let got = read_into(env, &mem, fd, iovs, n, Some(offset))?;
    mem.put_u32(out as u32, got)
}

fn fd_write(ctx: &mut Ctx, fd: i32, iovs: i32, n: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let done = write_from(env, &mem, fd, iovs, n, None)?;
    mem.put_u32(out as u32, done)
}

fn fd_pwrite(ctx: &mut Ctx, fd: i32, iovs: i32, n: i32, offset: i64, out: i32) -> R {
    parts!(ctx => env, mem);
    let done = write_from(env, &mem, fd, iovs, n, Some(offset))?;
    mem.put_u32(out as u32, done)
}

fn fd_readdir(ctx: &mut Ctx, fd: i32, buf: i32, len: i32, cookie: i64, out: i32) -> R {
    parts!(ctx => env, mem);
    let entry = env.table.get_mut(fd)?;
    entry.with(rights::FD_READDIR)?;
    let Kind::Dir { fd: dir, listing } = &mut entry.kind else {
        return Err(Errno::NOTDIR);
    };
    let dir = dir.as_raw_fd();
    if cookie == 0 || listing.is_none() {
        *listing = Some(host::list(dir, MAX_LISTING)?);
    }
    let entries = listing.as_deref().unwrap_or_default();
    let (buf, len) = (buf as u32, len as u32);
    mem.check(buf, u64::from(len))?;
    let mut bytes: Vec<u8> = Vec::new();
    let start = usize::try_from(cookie as u64).unwrap_or(usize::MAX);
    for (i, e) in entries.iter().enumerate().skip(start) {
        if bytes.len() >= len as usize {
            break;
        }
        let filetype = match filetype::of_dirent(e.d_type) {
            filetype::UNKNOWN => host::statat(dir, &e.name, false)
                .map(|st| filetype::of_mode(st.st_mode))
                .unwrap_or(filetype::UNKNOWN),
            t => t,
        };
        bytes.extend_from_slice(&dirent_bytes(
            i as u64 + 1,
            e.ino,
            e.name.len() as u32,
            filetype,
        ));
        bytes.extend_from_slice(&e.name);
    }
    bytes.truncate(len as usize);
    mem.write(buf, &bytes)?;
    mem.put_u32(out as u32, bytes.len() as u32)
}

// ---- paths ---------------------------------------------------------------------

/// The directory fd `fd` with the rights in `need`: `NOTDIR` if it is not one.
fn dir_of(env: &WasiEnv, fd: i32, need: u64) -> Result<(RawFd, u64), Errno> {
    let entry = env.table.get(fd)?;
    let Kind::Dir { fd: dir, .. } = &entry.kind else {
        return Err(Errno::NOTDIR);
    };
    entry.with(need)?;
    Ok((dir.as_raw_fd(), entry.inheriting))
}

/// The last name as the host should see it: with the guest's trailing slash kept, so
/// Linux answers for a file named as a directory as it would natively.
fn host_name(r: &Resolved) -> Vec<u8> {
    let mut name = r.name.clone();
    if r.dir_required && name != b"." {
        name.push(b'/');
    }
    name
}

#[allow(clippy::too_many_arguments)] // WASI's path_open
fn path_open(
    ctx: &mut Ctx,
    fd: i32,
    dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    base: i64,
    inheriting: i64,
    fdflags: i32,
    out: i32,
) -> R {
    parts!(ctx => env, mem);
    let (oflags, fdflags) = (oflags as u16, fdflags as u16);
    let mut need = rights::PATH_OPEN;
    if oflags & oflags::CREAT != 0 {
        need |= rights::PATH_CREATE_FILE;
    }
    if oflags & oflags::TRUNC != 0 {
        need |= rights::PATH_FILESTAT_SET_SIZE;
    }
    let (dir, dir_inheriting) = dir_of(env, fd, need)?;
    let path = mem.path(path, path_len)?;
    let follow = dirflags as u32 & SYMLINK_FOLLOW != 0;
    let r = host::resolve(dir, &path, follow)?;
    let (base, inheriting) = (base as u64, inheriting as u64);
    let writing = base & rights::WRITING != 0 || fdflags & fdflags::APPEND != 0;
    let reading = base & rights::READING != 0;
    let mut flags = libc::O_NOFOLLOW | libc::O_NOCTTY;
    flags |= match (reading, writing) {
        (_, false) => libc::O_RDONLY,
        (false, true) => libc::O_WRONLY,
        (true, true) => libc::O_RDWR,
    };
    let directory = oflags & oflags::DIRECTORY != 0 || r.dir_required;
    if directory {
        if writing {
            return Err(Errno::ISDIR);
        }
        flags |= libc::O_DIRECTORY;
    }
    if oflags & oflags::CREAT != 0 {
        flags |= libc::O_CREAT;
    }
    if oflags & oflags::EXCL != 0 {
        flags |= libc::O_EXCL;
    }
    if oflags & oflags::TRUNC != 0 {
        flags |= libc::O_TRUNC;
    }
    if fdflags & fdflags::APPEND != 0 {
        flags |= libc::O_APPEND;
    }
    if fdflags & fdflags::NONBLOCK != 0 {
        flags |= libc::O_NONBLOCK;
    }
    if fdflags & fdflags::DSYNC != 0 {
        flags |= libc::O_DSYNC;
    }
    if fdflags & (fdflags::SYNC | fdflags::RSYNC) != 0 {
        flags |= libc::O_SYNC;
    }
    // O_NOFOLLOW on a symlink without SYMLINK_FOLLOW: LOOP, or NOTDIR with
    // O_DIRECTORY, as Linux says.
    let opened = host::openat(r.parent.fd(), &r.name, flags, 0o666)?;
    let st = host::fstat(opened.as_raw_fd())?;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let (base, inheriting) = opened_rights(dir_inheriting, base, inheriting, is_dir);
    let kind = if is_dir {
        Kind::Dir {
            fd: opened,
            listing: None,
        }
    } else {
        Kind::File(opened)
    };
    let new = env.table.insert(Entry::new(kind, base, inheriting))?;
    mem.put_u32(out as u32, new)
}

fn path_create_directory(ctx: &mut Ctx, fd: i32, path: i32, len: i32) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_CREATE_DIRECTORY)?;
    let r = host::resolve(dir, &mem.path(path, len)?, false)?;
    host::mkdirat(r.parent.fd(), &r.name)
}

fn path_remove_directory(ctx: &mut Ctx, fd: i32, path: i32, len: i32) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_REMOVE_DIRECTORY)?;
    let r = host::resolve(dir, &mem.path(path, len)?, false)?;
    host::unlinkat(r.parent.fd(), &r.name, libc::AT_REMOVEDIR)
}

fn path_unlink_file(ctx: &mut Ctx, fd: i32, path: i32, len: i32) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_UNLINK_FILE)?;
    let r = host::resolve(dir, &mem.path(path, len)?, false)?;
    if r.dir_required {
        // `file/`: NOTDIR for a file, ISDIR for a directory, as Linux's unlink.
        let st = host::statat(r.parent.fd(), &r.name, true)?;
        return Err(if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            Errno::ISDIR
        } else {
            Errno::NOTDIR
        });
    }
    host::unlinkat(r.parent.fd(), &r.name, 0)
}

fn path_symlink(ctx: &mut Ctx, old: i32, old_len: i32, fd: i32, new: i32, new_len: i32) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_SYMLINK)?;
    let target = mem.path(old, old_len)?;
    // A link that points out of the sandbox is refused when it is made, as wasmtime.
    if target.first() == Some(&b'/') {
        return Err(Errno::NOTCAPABLE);
    }
    if target.contains(&0) {
        return Err(Errno::INVAL);
    }
    let r = host::resolve(dir, &mem.path(new, new_len)?, false)?;
    host::symlinkat(&target, r.parent.fd(), &host_name(&r))
}

fn path_rename(
    ctx: &mut Ctx,
    fd: i32,
    old: i32,
    old_len: i32,
    fd2: i32,
    new: i32,
    new_len: i32,
) -> R {
    parts!(ctx => env, mem);
    let (from_dir, _) = dir_of(env, fd, rights::PATH_RENAME_SOURCE)?;
    let (to_dir, _) = dir_of(env, fd2, rights::PATH_RENAME_TARGET)?;
    let from = host::resolve(from_dir, &mem.path(old, old_len)?, false)?;
    let to = host::resolve(to_dir, &mem.path(new, new_len)?, false)?;
    host::renameat(
        from.parent.fd(),
        &host_name(&from),
        to.parent.fd(),
        &host_name(&to),
    )
}

#[allow(clippy::too_many_arguments)] // WASI's path_link
fn path_link(
    ctx: &mut Ctx,
    fd: i32,
    flags: i32,
    old: i32,
    old_len: i32,
    fd2: i32,
    new: i32,
    new_len: i32,
) -> R {
    parts!(ctx => env, mem);
    let (from_dir, _) = dir_of(env, fd, rights::PATH_LINK_SOURCE)?;
    let (to_dir, _) = dir_of(env, fd2, rights::PATH_LINK_TARGET)?;
    let follow = flags as u32 & SYMLINK_FOLLOW != 0;
    let from = host::resolve(from_dir, &mem.path(old, old_len)?, follow)?;
    let to = host::resolve(to_dir, &mem.path(new, new_len)?, false)?;
    host::linkat(
        from.parent.fd(),
        &host_name(&from),
        to.parent.fd(),
        &host_name(&to),
    )
}

fn path_readlink(
    ctx: &mut Ctx,
    fd: i32,
    path: i32,
    len: i32,
    buf: i32,
    buf_len: i32,
    out: i32,
) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_READLINK)?;
    let r = host::resolve(dir, &mem.path(path, len)?, false)?;
    let target = host::readlinkat(r.parent.fd(), &host_name(&r))?;
    let n = target.len().min(buf_len as u32 as usize);
    mem.write(buf as u32, &target[..n])?;
    mem.put_u32(out as u32, n as u32)
}

fn path_filestat_get(ctx: &mut Ctx, fd: i32, flags: i32, path: i32, len: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_FILESTAT_GET)?;
    let follow = flags as u32 & SYMLINK_FOLLOW != 0;
    let r = host::resolve(dir, &mem.path(path, len)?, follow)?;
    let st = host::statat(r.parent.fd(), &host_name(&r), false)?;
    mem.write(out as u32, &Filestat::of(&st).bytes())
}

#[allow(clippy::too_many_arguments)] // WASI's path_filestat_set_times
fn path_filestat_set_times(
    ctx: &mut Ctx,
    fd: i32,
    flags: i32,
    path: i32,
    len: i32,
    atim: i64,
    mtim: i64,
    fst: i32,
) -> R {
    parts!(ctx => env, mem);
    let (dir, _) = dir_of(env, fd, rights::PATH_FILESTAT_SET_TIMES)?;
    let times = times(atim, mtim, fst)?;
    let follow = flags as u32 & SYMLINK_FOLLOW != 0;
    let r = host::resolve(dir, &mem.path(path, len)?, follow)?;
    host::utimensat(r.parent.fd(), &host_name(&r), &times)
}

// ---- poll, sockets -------------------------------------------------------------

/// One subscription of `poll_oneoff`, read from the guest.
struct Sub {
    userdata: u64,
    what: Wait,
}

enum Wait {
    /// A clock: how long from now, or an error for a bad clock.
    Clock(Result<Duration, Errno>),
    Fd {
        write: bool,
        fd: i32,
    },
}

fn poll_oneoff(ctx: &mut Ctx, subs: i32, events: i32, n: i32, out: i32) -> R {
    parts!(ctx => env, mem);
    let n = n as u32;
    if n == 0 {
        return Err(Errno::INVAL);
    }
    let raw = mem.read(
        subs as u32,
        n.checked_mul(SUBSCRIPTION_SIZE as u32)
            .ok_or(Errno::FAULT)?,
    )?;
    mem.check(events as u32, u64::from(n) * EVENT_SIZE as u64)?;
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
    let mut list = Vec::with_capacity(n as usize);
    for s in raw.chunks_exact(SUBSCRIPTION_SIZE) {
        let userdata = u64_at(s, 0);
        let what = match s[8] {
            eventtype::CLOCK => {
                let id = u32::from_le_bytes([s[16], s[17], s[18], s[19]]);
                let timeout = u64_at(s, 24);
                let flags = u16::from_le_bytes([s[40], s[41]]);
                Wait::Clock(clock::host(id).ok_or(Errno::INVAL).and_then(|c| {
                    Ok(if flags & ABSTIME != 0 {
                        Duration::from_nanos(timeout.saturating_sub(now(c)?))
                    } else {
                        Duration::from_nanos(timeout)
                    })
                }))
            }
            t @ (eventtype::FD_READ | eventtype::FD_WRITE) => Wait::Fd {
                write: t == eventtype::FD_WRITE,
                fd: i32::from_le_bytes([s[16], s[17], s[18], s[19]]),
            },
            _ => return Err(Errno::INVAL),
        };
        list.push(Sub { userdata, what });
    }
    // Fds are ready at once (files always are; output goes to kilnd's sinks), but for
    // kilnd's own stdin, which is polled; clocks fire when their time comes.
    let mut fired: Vec<[u8; EVENT_SIZE]> = Vec::new();
    let mut stdin_wait: Vec<&Sub> = Vec::new();
    let event = |userdata: u64, error: Errno, kind: u8, nbytes: u64| {
        let mut e = [0u8; EVENT_SIZE];
        e[0..8].copy_from_slice(&userdata.to_le_bytes());
        e[8..10].copy_from_slice(&error.0.to_le_bytes());
        e[10] = kind;
        e[16..24].copy_from_slice(&nbytes.to_le_bytes());
        e
    };
    for sub in &list {
        let Wait::Fd { write, fd } = sub.what else {
            continue;
        };
        let kind = if write {
            eventtype::FD_WRITE
        } else {
            eventtype::FD_READ
        };
        let entry = match env.table.with(fd, rights::POLL_FD_READWRITE) {
            Ok(e) => e,
            Err(e) => {
                fired.push(event(sub.userdata, e, kind, 0));
                continue;
            }
        };
        match (&entry.kind, write) {
            (Kind::Stdin { host: true }, false) => stdin_wait.push(sub),
            (Kind::File(f), false) => {
                let f = f.as_raw_fd();
                let size = host::fstat(f).map(|st| st.st_size as u64).unwrap_or(0);
                let pos = seek(f, 0, libc::SEEK_CUR).unwrap_or(0);
                fired.push(event(
                    sub.userdata,
                    Errno::SUCCESS,
                    kind,
                    size.saturating_sub(pos),
                ));
            }
            (Kind::Dir { .. }, _) => fired.push(event(sub.userdata, Errno::BADF, kind, 0)),
            _ => fired.push(event(sub.userdata, Errno::SUCCESS, kind, 0)),
        }
    }
    let clocks: Vec<(&Sub, Result<Duration, Errno>)> = list
        .iter()
        .filter_map(|s| match &s.what {
            Wait::Clock(d) => Some((s, *d)),
            Wait::Fd { .. } => None,
        })
        .collect();
    for (sub, d) in &clocks {
        if let Err(e) = d {
            fired.push(event(sub.userdata, *e, eventtype::CLOCK, 0));
        }
    }
    let soonest = clocks.iter().filter_map(|(_, d)| d.ok()).min();
    if fired.is_empty() {
        let waited = match (stdin_wait.is_empty(), soonest) {
            (true, Some(d)) => {
                std::thread::sleep(d);
                Some(d)
            }
            (true, None) => return Err(Errno::INVAL),
            (false, timeout) => {
                let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
                let ready = crate::poll::ready(0, libc::POLLIN, ms).map_err(Errno::from)?;
                if ready {
                    for sub in &stdin_wait {
                        fired.push(event(sub.userdata, Errno::SUCCESS, eventtype::FD_READ, 1));
                    }
                    None
                } else {
                    timeout
                }
            }
        };
        if let Some(waited) = waited {
            for (sub, d) in &clocks {
                if matches!(d, Ok(d) if *d <= waited) {
                    fired.push(event(sub.userdata, Errno::SUCCESS, eventtype::CLOCK, 0));
                }
            }
        }
    } else {
        for (sub, d) in &clocks {
            if matches!(d, Ok(d) if d.is_zero()) {
                fired.push(event(sub.userdata, Errno::SUCCESS, eventtype::CLOCK, 0));
            }
        }
    }
    for (i, e) in fired.iter().enumerate() {
        mem.write(events as u32 + (i * EVENT_SIZE) as u32, e)?;
    }
    mem.put_u32(out as u32, fired.len() as u32)
}

/// No socket is ever open in a module: an open fd is not one, a closed one is `BADF`.
fn not_a_socket(env: &WasiEnv, fd: i32) -> R {
    env.table.get(fd)?;
    Err(Errno::NOTSOCK)
}

fn sock_accept(ctx: &mut Ctx, fd: i32, _flags: i32, _out: i32) -> R {
    not_a_socket(ctx.data(), fd)
}

fn sock_recv(
    ctx: &mut Ctx,
    fd: i32,
    _data: i32,
    _len: i32,
    _flags: i32,
    _n: i32,
    _oflags: i32,
) -> R {
    not_a_socket(ctx.data(), fd)
}

fn sock_send(ctx: &mut Ctx, fd: i32, _data: i32, _len: i32, _flags: i32, _n: i32) -> R {
    not_a_socket(ctx.data(), fd)
}

fn sock_shutdown(ctx: &mut Ctx, fd: i32, _how: i32) -> R {
    not_a_socket(ctx.data(), fd)
}

/// `proc_exit` ends the module's call with its exit code, as a trap kilnd reads back.
fn proc_exit(_ctx: FunctionEnvMut<WasiEnv>, code: i32) -> Result<(), RuntimeError> {
    Err(RuntimeError::user(Box::new(Exit(code))))
}

/// Each function, exported as WASI names it, its errno returned as i32.
macro_rules! export {
    ($store:ident, $env:ident, $ns:ident; $($name:ident($($arg:ident: $ty:ty),*);)*) => {
        /// The names of the functions kilnd provides.
        pub const NAMES: &[&str] = &["proc_exit", $(stringify!($name)),*];
        pub fn exports($store: &mut Store, $env: &FunctionEnv<WasiEnv>) -> Exports {
            let mut $ns = Exports::new();
            $ns.insert("proc_exit", Function::new_typed_with_env($store, $env, proc_exit));
            $(
                $ns.insert(
                    stringify!($name),
                    Function::new_typed_with_env(
                        $store,
                        $env,
                        |mut ctx: Ctx, $($arg: $ty),*| -> Result<i32, RuntimeError> {
                            Ok(match $name(&mut ctx, $($arg),*) {
                                Ok(()) => 0,
                                Err(e) => i32::from(e.0),
                            })
                        },
                    ),
                );
            )*
            $ns
        }
    };
}

export! { store, env, ns;
    args_get(a: i32, b: i32);
    args_sizes_get(a: i32, b: i32);
    environ_get(a: i32, b: i32);
    environ_sizes_get(a: i32, b: i32);
    clock_res_get(id: i32, out: i32);
    clock_time_get(id: i32, precision: i64, out: i32);
    fd_advise(fd: i32, offset: i64, len: i64, advice: i32);
    fd_allocate(fd: i32, offset: i64, len: i64);
    fd_close(fd: i32);
    fd_datasync(fd: i32);
    fd_fdstat_get(fd: i32, out: i32);
    fd_fdstat_set_flags(fd: i32, flags: i32);
    fd_fdstat_set_rights(fd: i32, base: i64, inheriting: i64);
    fd_filestat_get(fd: i32, out: i32);
    fd_filestat_set_size(fd: i32, size: i64);
    fd_filestat_set_times(fd: i32, atim: i64, mtim: i64, fst: i32);
    fd_pread(fd: i32, iovs: i32, n: i32, offset: i64, out: i32);
    fd_prestat_get(fd: i32, out: i32);
    fd_prestat_dir_name(fd: i32, buf: i32, len: i32);
    fd_pwrite(fd: i32, iovs: i32, n: i32, offset: i64, out: i32);
    fd_read(fd: i32, iovs: i32, n: i32, out: i32);
    fd_readdir(fd: i32, buf: i32, len: i32, cookie: i64, out: i32);
    fd_renumber(from: i32, to: i32);
    fd_seek(fd: i32, offset: i64, whence: i32, out: i32);
    fd_sync(fd: i32);
    fd_tell(fd: i32, out: i32);
    fd_write(fd: i32, iovs: i32, n: i32, out: i32);
    path_create_directory(fd: i32, path: i32, len: i32);
    path_filestat_get(fd: i32, flags: i32, path: i32, len: i32, out: i32);
    path_filestat_set_times(fd: i32, flags: i32, path: i32, len: i32, atim: i64, mtim: i64, fst: i32);
    path_link(fd: i32, flags: i32, old: i32, old_len: i32, fd2: i32, new: i32, new_len: i32);
    path_open(fd: i32, dirflags: i32, path: i32, len: i32, oflags: i32, base: i64, inheriting: i64, fdflags: i32, out: i32);
    path_readlink(fd: i32, path: i32, len: i32, buf: i32, buf_len: i32, out: i32);
    path_remove_directory(fd: i32, path: i32, len: i32);
    path_rename(fd: i32, old: i32, old_len: i32, fd2: i32, new: i32, new_len: i32);
    path_symlink(old: i32, old_len: i32, fd: i32, new: i32, new_len: i32);
    path_unlink_file(fd: i32, path: i32, len: i32);
    poll_oneoff(subs: i32, events: i32, n: i32, out: i32);
    proc_raise(signal: i32);
    random_get(buf: i32, len: i32);
    sched_yield();
    sock_accept(fd: i32, flags: i32, out: i32);
    sock_recv(fd: i32, data: i32, len: i32, flags: i32, n: i32, oflags: i32);
    sock_send(fd: i32, data: i32, len: i32, flags: i32, n: i32);
    sock_shutdown(fd: i32, how: i32);
}
