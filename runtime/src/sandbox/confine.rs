//! What a worker gives up before it maps module code. A worker is the process a module
//! escape would land in, so it keeps only what running one module needs: its pipes,
//! its memory, its threads and the module's own `dirs`. Each layer is applied by the
//! worker to itself, in the zygote's child (or the exec'd worker), after it has read
//! its Start frame and its artifact's bytes and before it verifies and deserializes
//! them, while it still has a single thread (Landlock and seccomp bind the calling
//! thread and the threads it starts later, and a new user namespace needs a single
//! thread):
//!
//! | layer | what it takes away |
//! |---|---|
//! | namespaces | a network namespace (loopback only, down) and IPC namespace of the workers' own, made once by the zygote ([`share_namespaces`]) or by an exec'd worker |
//! | `no_new_privs` | gaining privileges through a set-uid file; required by the two below |
//! | non-dumpable | ptrace by same-uid processes, core dumps, `/proc/PID/mem` |
//! | rlimits | core dumps, more than [`MAX_OPEN_FILES`] descriptors, files past [`MAX_FILE_BYTES`] |
//! | Landlock | every file outside the module's `dirs`; TCP bind/connect; signals and abstract sockets outside the worker |
//! | seccomp | every syscall but the worker's own ([`allowed`]): no `fork`, `execve`, `ptrace`, `kill` of another process, sockets, `mount`, `bpf`, ... |
//!
//! A layer the kernel lacks (or refuses, as `unshare` without privileges) is reported
//! off with the reason, and the worker runs with the others: confinement degrades, it
//! never stops a module. The [`Report`] goes into the worker's `Ready` (so into its
//! `started` record) and `kilnd check` prints what this kernel offers ([`probe`]).
//!
//! Denied syscalls fail with `EPERM` rather than killing the worker: a syscall that a
//! new libc starts using in a path the traces missed then fails as an error the module
//! sees, instead of a `SIGSYS` that would fail every module on the device after an OS
//! update; an attacker gains nothing from either. `clone3` fails with `ENOSYS` so that
//! glibc falls back to `clone`, whose flags the filter can read (threads only).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Descriptors a worker may hold: its pipes, stdio, the runtime's few and the files a
/// module opens in its `dirs`.
pub const MAX_OPEN_FILES: u64 = 256;

/// Largest file a worker may write (`RLIMIT_FSIZE`): a module's data files, not a disk.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// What the worker may still reach on the file system: the module's `dirs` (read and
/// write, no execute). The artifact is read before confinement, so it needs no rule.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub dirs: Vec<PathBuf>,
}

/// One layer, and whether it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: &'static str,
    pub on: bool,
    /// What was applied, or why it was not.
    pub detail: String,
}

/// The layers a worker applied, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub layers: Vec<Layer>,
}

impl Report {
    fn push(&mut self, name: &'static str, result: Result<String, String>) {
        let (on, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, e),
        };
        if !on {
            tracing::warn!(layer = name, why = %detail, "worker confinement: layer off");
        }
        self.layers.push(Layer { name, on, detail });
    }

    /// One line: `seccomp on (...), landlock off (...)`.
    pub fn summary(&self) -> String {
        self.layers
            .iter()
            .map(|l| {
                let state = if l.on { "on" } else { "off" };
                if l.detail.is_empty() {
                    format!("{} {state}", l.name)
                } else {
                    format!("{} {state} ({})", l.name, l.detail)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether every layer is on.
    pub fn complete(&self) -> bool {
        self.layers.iter().all(|l| l.on)
    }
}

/// The namespaces the zygote made for every worker it forks ([`share_namespaces`]).
static SHARED_NAMESPACES: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();

/// Moves the zygote, still single-threaded and before its first fork, into a network
/// and IPC namespace of its own, which every worker it forks inherits. A namespace per
/// worker cost about 0.5 ms of each start (and the kernel's teardown of a network
/// namespace after each exit); the workers of one zygote sharing one takes nothing
/// from them that seccomp leaves them: no socket, no System V IPC, no POSIX queue,
/// so they cannot reach each other through it either. The zygote needs neither: it
/// talks to `kilnd serve` over the socket it was started with.
pub fn share_namespaces() {
    let _ = SHARED_NAMESPACES.set(namespaces().map(|d| format!("{d}; the zygote's")));
}

/// Applies every layer to this process, which must still be single-threaded.
pub fn confine(policy: &Policy) -> Report {
    let mut report = Report::default();
    let shared = SHARED_NAMESPACES.get().cloned();
    report.push("namespaces", shared.unwrap_or_else(namespaces));
    report.push("no_new_privs", no_new_privs());
    report.push("non-dumpable", non_dumpable());
    report.push("rlimits", rlimits());
    report.push("landlock", landlock(policy));
    // Last: the filter forbids what the layers above needed.
    report.push("seccomp", seccomp());
    report
}

/// What this kernel would give a worker, without applying anything (`kilnd check`).
pub fn probe() -> Report {
    let mut report = Report::default();
    report.push("namespaces", probe_namespaces());
    report.push("no_new_privs", Ok(String::new()));
    report.push("non-dumpable", Ok(String::new()));
    report.push("rlimits", Ok(rlimit_detail()));
    report.push(
        "landlock",
        landlock_abi().map(|abi| format!("ABI {abi}{}", landlock_extras(abi))),
    );
    report.push(
        "seccomp",
        if cfg!(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        )) {
            seccomp_available().map(|()| format!("{} syscalls allowed", allowed().len()))
        } else {
            Err("no filter for this architecture".into())
        },
    );
    report
}

fn errno() -> String {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "not in this kernel (ENOSYS)".into(),
        Some(libc::EPERM) => "refused (EPERM)".into(),
        Some(libc::EOPNOTSUPP) => "disabled in this kernel (EOPNOTSUPP)".into(),
        Some(libc::EINVAL) => format!("refused: {e}"),
        _ => e.to_string(),
    }
}

/// A fresh network and IPC namespace: directly with the privilege, else inside a new
/// user namespace where the kernel lets an unprivileged process make one.
fn namespaces() -> Result<String, String> {
    let want = libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    // SAFETY: unshare changes only this process's namespaces.
    if unsafe { libc::unshare(want) } == 0 {
        return Ok("net, ipc".into());
    }
    let direct = errno();
    // SAFETY: as above; the process is single-threaded, as a user namespace requires.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | want) } == 0 {
        return Ok("user, net, ipc".into());
    }
    Err(format!(
        "unshare: {direct}; in a user namespace: {}",
        errno()
    ))
}

/// Whether a child could get a network namespace: tried in a throw-away child, so this
/// process keeps its own.
fn probe_namespaces() -> Result<String, String> {
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe.
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot fork to probe: {}", errno())),
        0 => unsafe {
            let want = libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
            if libc::unshare(want) == 0 {
                libc::_exit(0)
            }
            if libc::unshare(libc::CLONE_NEWUSER | want) == 0 {
                libc::_exit(1)
            }
            libc::_exit(2)
        },
        pid => {
            let mut status = 0;
            // SAFETY: waiting for the child just forked.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                Some(0) => Ok("net, ipc".into()),
                Some(1) => Ok("user, net, ipc".into()),
                _ => Err("unshare refused (no privilege, no unprivileged user namespaces)".into()),
            }
        }
    }
}

fn no_new_privs() -> Result<String, String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0 {
        Ok(String::new())
    } else {
        Err(errno())
    }
}

fn non_dumpable() -> Result<String, String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0 {
        Ok(String::new())
    } else {
        Err(errno())
    }
}

fn rlimit_detail() -> String {
    format!(
        "core 0, nofile {MAX_OPEN_FILES}, fsize {} MiB",
        MAX_FILE_BYTES >> 20
    )
}

/// Lowers soft and hard limits (never raises one already lower).
fn rlimits() -> Result<String, String> {
    let limits = [
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (libc::RLIMIT_FSIZE, MAX_FILE_BYTES),
    ];
    for (resource, max) in limits {
        // SAFETY: getrlimit/setrlimit on a local struct.
        unsafe {
            let mut now: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(resource, &mut now) != 0 {
                return Err(errno());
            }
            let new = libc::rlimit {
                rlim_cur: now.rlim_cur.min(max as libc::rlim_t),
                rlim_max: now.rlim_max.min(max as libc::rlim_t),
            };
            if libc::setrlimit(resource, &new) != 0 {
                return Err(errno());
            }
        }
    }
    Ok(rlimit_detail())
}

// Landlock, through its three syscalls (the same numbers on every architecture).
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

/// Every file-system access right, by the ABI that introduced it.
fn landlock_fs_rights(abi: i64) -> u64 {
    let mut rights = (1 << 13) - 1; // ABI 1: execute .. make_sym
    if abi >= 2 {
        rights |= 1 << 13; // refer
    }
    if abi >= 3 {
        rights |= 1 << 14; // truncate
    }
    if abi >= 5 {
        rights |= 1 << 15; // ioctl_dev
    }
    rights
}

const FS_EXECUTE: u64 = 1 << 0;
const FS_MAKE_CHAR: u64 = 1 << 6;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_MAKE_FIFO: u64 = 1 << 10;
const FS_MAKE_BLOCK: u64 = 1 << 11;
const FS_IOCTL_DEV: u64 = 1 << 15;
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

fn landlock_abi() -> Result<i64, String> {
    // SAFETY: the version query takes no attribute.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        return Err(errno());
    }
    Ok(abi)
}

fn landlock_extras(abi: i64) -> &'static str {
    match abi {
        ..=3 => ", files only",
        4 | 5 => ", files and TCP",
        _ => ", files, TCP, signals and abstract sockets",
    }
}

fn landlock(policy: &Policy) -> Result<String, String> {
    let abi = landlock_abi()?;
    let fs = landlock_fs_rights(abi);
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        },
    };
    // Older kernels take the struct up to the fields they know.
    let size = match abi {
        ..=3 => 8,
        4 | 5 => 16,
        _ => 24,
    };
    // SAFETY: `attr` is a valid ruleset attribute of at least `size` bytes.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size as usize,
            0u32,
        )
    };
    if ruleset < 0 {
        return Err(format!("create_ruleset: {}", errno()));
    }
    let ruleset = ruleset as libc::c_int;
    let result = (|| {
        // A module's dirs: its data, never code, devices, sockets or FIFOs.
        let allowed = fs
            & !(FS_EXECUTE
                | FS_MAKE_CHAR
                | FS_MAKE_BLOCK
                | FS_MAKE_SOCK
                | FS_MAKE_FIFO
                | FS_IOCTL_DEV);
        for dir in &policy.dirs {
            let path = CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| format!("`{}` has a NUL byte", dir.display()))?;
            // SAFETY: open with a valid NUL-terminated path.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                // A dir that is not there gets no rule: nothing to reach through it.
                tracing::warn!(dir = %dir.display(), error = %io::Error::last_os_error(), "landlock: no such dir");
                continue;
            }
            let rule = PathBeneathAttr {
                allowed_access: allowed,
                parent_fd: fd,
            };
            // SAFETY: a valid path-beneath rule for a ruleset fd we own.
            let added = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const PathBeneathAttr,
                    0u32,
                )
            };
            let e = errno();
            // SAFETY: closing the O_PATH descriptor opened above.
            unsafe { libc::close(fd) };
            if added != 0 {
                return Err(format!("add_rule `{}`: {e}", dir.display()));
            }
        }
        // SAFETY: restrict_self with a ruleset fd; no_new_privs is set.
        if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
            return Err(format!("restrict_self: {}", errno()));
        }
        Ok(format!(
            "ABI {abi}{}, {} dirs",
            landlock_extras(abi),
            policy.dirs.len()
        ))
    })();
    // SAFETY: closing the ruleset fd created above.
    unsafe { libc::close(ruleset) };
    result
}

// seccomp-bpf, built by hand: a check of the architecture, then one comparison per
// allowed syscall number, and a few syscalls whose arguments are checked.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JSET_K: u16 = 0x45;
const BPF_JGE_K: u16 = 0x35;
const BPF_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_IP: u32 = 8;
/// The low 32 bits of argument `i` (all three targets are little-endian).
const fn arg_lo(i: u32) -> u32 {
    16 + 8 * i
}
const fn arg_hi(i: u32) -> u32 {
    16 + 8 * i + 4
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xc000_00f3;

/// The syscalls a worker makes once confined, from traces of real workers (reactors
/// with and without WASI, commands, modules writing in their `dirs`) on each target;
/// see docs/src/confinement.md. Those with checked arguments are in [`filter`].
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
pub fn allowed() -> Vec<(&'static str, libc::c_long)> {
    macro_rules! sys {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name), libc_sys::$name)),*]
        };
    }
    #[allow(non_upper_case_globals)]
    mod libc_sys {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        pub use libc::SYS_renameat as renameat;
        #[cfg(target_arch = "x86_64")]
        pub use libc::{
            SYS_access as access, SYS_epoll_wait as epoll_wait, SYS_getdents as getdents,
            SYS_lstat as lstat, SYS_mkdir as mkdir, SYS_open as open, SYS_pipe as pipe,
            SYS_poll as poll, SYS_readlink as readlink, SYS_rename as rename, SYS_rmdir as rmdir,
            SYS_stat as stat, SYS_unlink as unlink,
        };
        pub use libc::{
            SYS_brk as brk, SYS_clock_getres as clock_getres, SYS_clock_gettime as clock_gettime,
            SYS_clock_nanosleep as clock_nanosleep, SYS_close as close, SYS_dup as dup,
            SYS_dup3 as dup3, SYS_epoll_create1 as epoll_create1, SYS_epoll_ctl as epoll_ctl,
            SYS_epoll_pwait as epoll_pwait, SYS_epoll_pwait2 as epoll_pwait2,
            SYS_eventfd2 as eventfd2, SYS_exit as exit, SYS_exit_group as exit_group,
            SYS_faccessat as faccessat, SYS_faccessat2 as faccessat2, SYS_fcntl as fcntl,
            SYS_fdatasync as fdatasync, SYS_fstat as fstat, SYS_fsync as fsync,
            SYS_ftruncate as ftruncate, SYS_futex as futex, SYS_get_robust_list as get_robust_list,
            SYS_getcwd as getcwd, SYS_getdents64 as getdents64, SYS_getegid as getegid,
            SYS_geteuid as geteuid, SYS_getgid as getgid, SYS_getpid as getpid,
            SYS_getrandom as getrandom, SYS_gettid as gettid, SYS_gettimeofday as gettimeofday,
            SYS_getuid as getuid, SYS_linkat as linkat, SYS_lseek as lseek, SYS_madvise as madvise,
            SYS_membarrier as membarrier, SYS_mkdirat as mkdirat, SYS_mmap as mmap,
            SYS_mprotect as mprotect, SYS_mremap as mremap, SYS_munmap as munmap,
            SYS_nanosleep as nanosleep, SYS_newfstatat as newfstatat, SYS_openat as openat,
            SYS_pipe2 as pipe2, SYS_ppoll as ppoll, SYS_pread64 as pread64, SYS_preadv as preadv,
            SYS_pwrite64 as pwrite64, SYS_pwritev as pwritev, SYS_read as read,
            SYS_readlinkat as readlinkat, SYS_readv as readv, SYS_renameat2 as renameat2,
            SYS_rseq as rseq, SYS_rt_sigaction as rt_sigaction,
            SYS_rt_sigprocmask as rt_sigprocmask, SYS_rt_sigreturn as rt_sigreturn,
            SYS_sched_getaffinity as sched_getaffinity, SYS_sched_yield as sched_yield,
            SYS_set_robust_list as set_robust_list, SYS_sigaltstack as sigaltstack,
            SYS_statx as statx, SYS_symlinkat as symlinkat, SYS_unlinkat as unlinkat,
            SYS_utimensat as utimensat, SYS_write as write, SYS_writev as writev,
        };
        /// `riscv_hwprobe` (CPU features, read by the compatibility check) and
        /// `riscv_flush_icache` (after module code is written): not in libc yet.
        #[cfg(target_arch = "riscv64")]
        pub const riscv_hwprobe: libc::c_long = 258;
        #[cfg(target_arch = "riscv64")]
        pub const riscv_flush_icache: libc::c_long = 259;
    }
    let mut list = sys![
        brk,
        clock_getres,
        clock_gettime,
        clock_nanosleep,
        close,
        dup,
        dup3,
        epoll_create1,
        epoll_ctl,
        epoll_pwait,
        epoll_pwait2,
        eventfd2,
        exit,
        exit_group,
        faccessat,
        faccessat2,
        fcntl,
        fdatasync,
        fstat,
        fsync,
        ftruncate,
        futex,
        getcwd,
        getdents64,
        getegid,
        geteuid,
        getgid,
        getpid,
        getrandom,
        get_robust_list,
        gettid,
        gettimeofday,
        getuid,
        linkat,
        lseek,
        madvise,
        membarrier,
        mkdirat,
        mmap,
        mprotect,
        mremap,
        munmap,
        nanosleep,
        newfstatat,
        openat,
        pipe2,
        ppoll,
        pread64,
        preadv,
        pwrite64,
        pwritev,
        read,
        readlinkat,
        readv,
        renameat2,
        rseq,
        rt_sigaction,
        rt_sigprocmask,
        rt_sigreturn,
        sched_getaffinity,
        sched_yield,
        set_robust_list,
        sigaltstack,
        statx,
        symlinkat,
        unlinkat,
        utimensat,
        write,
        writev,
    ];
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    list.extend(sys![renameat]);
    #[cfg(target_arch = "x86_64")]
    list.extend(sys![
        access, epoll_wait, getdents, lstat, mkdir, open, pipe, poll, readlink, rename, rmdir,
        stat, unlink
    ]);
    #[cfg(target_arch = "riscv64")]
    list.extend(sys![riscv_hwprobe, riscv_flush_icache]);
    list
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
pub fn allowed() -> Vec<(&'static str, libc::c_long)> {
    Vec::new()
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Allows the syscall numbers `nrs` (sorted), with the number in the accumulator, by a
/// binary search: about log2(n) comparisons instead of n for a syscall that is not in
/// the list. It matters when the filter is installed as much as when it runs: the
/// kernel works out which syscalls the filter always allows by running it for every
/// syscall number, so a linear list made installing the filter the dearest step of a
/// worker's confinement. A number not in the list jumps past the search.
fn search(nrs: &[u32]) -> Vec<libc::sock_filter> {
    // Leaves of up to eight numbers compare each and share one ALLOW; an inner node
    // splits at its middle number and skips the lower half when nr >= it (through a
    // long jump when the half is beyond a conditional jump's 255). Every leaf ends in
    // a jump to the end, patched once the length is known. Short, because the kernel
    // compiles every instruction of it for each worker.
    fn node(nrs: &[u32], out: &mut Vec<libc::sock_filter>, exits: &mut Vec<usize>) {
        if nrs.len() <= 8 {
            for (i, &nr) in nrs.iter().enumerate() {
                // To the ALLOW after the remaining comparisons and the exit.
                out.push(jump(BPF_JEQ_K, nr, (nrs.len() - i) as u8, 0));
            }
            exits.push(out.len());
            out.push(stmt(BPF_JA, 0));
            out.push(stmt(BPF_RET_K, RET_ALLOW));
            return;
        }
        let (low, high) = nrs.split_at(nrs.len() / 2);
        let split = out.len();
        out.push(jump(BPF_JGE_K, high[0], 0, 0));
        node(low, out, exits);
        match u8::try_from(out.len() - split - 1) {
            Ok(over) => out[split].jt = over,
            Err(_) => {
                // Too far: nr >= pivot falls into a long jump put in front of the half.
                let mut low_code = out.split_off(split + 1);
                out[split].jf = 1;
                out.push(stmt(BPF_JA, low_code.len() as u32));
                for exit in exits.iter_mut().filter(|at| **at > split) {
                    *exit += 1;
                }
                out.append(&mut low_code);
            }
        }
        node(high, out, exits);
    }
    let mut out = Vec::new();
    let mut exits = Vec::new();
    node(nrs, &mut out, &mut exits);
    for at in exits {
        out[at].k = (out.len() - at - 1) as u32;
    }
    out
}

/// The filter for this architecture, for a worker whose pid is `pid`.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
pub fn filter(pid: u32) -> Vec<libc::sock_filter> {
    let deny = RET_ERRNO | libc::EPERM as u32;
    let mut p = vec![
        // A load the kernel's syscall cache cannot fold, first, so that installing the
        // filter does not run it for every syscall number of both ABIs (to find those it
        // always allows, which would then skip it): that run was about 25 µs of every
        // worker's start on x86_64, and skipping it costs each later syscall about 20 ns.
        stmt(BPF_LD_W_ABS, OFF_IP),
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        // Another architecture's syscalls (x86_64's x32 and i386 entry points are
        // other numbers, or another arch value): kill.
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    let mut nrs: Vec<u32> = allowed().into_iter().map(|(_, nr)| nr as u32).collect();
    nrs.sort_unstable();
    nrs.dedup();
    p.extend(search(&nrs));
    // A block for a syscall with checked arguments: skipped unless the number matches;
    // every path through it returns.
    let mut block = |nr: libc::c_long, body: Vec<libc::sock_filter>| {
        p.push(jump(BPF_JEQ_K, nr as u32, 0, body.len() as u8));
        p.extend(body);
    };
    // Threads, never processes.
    block(
        libc::SYS_clone,
        vec![
            stmt(BPF_LD_W_ABS, arg_lo(0)),
            jump(BPF_JSET_K, libc::CLONE_THREAD as u32, 0, 1),
            stmt(BPF_RET_K, RET_ALLOW),
            stmt(BPF_RET_K, deny),
        ],
    );
    // Its flags are in memory the filter cannot read: ENOSYS, and glibc uses clone.
    block(
        libc::SYS_clone3,
        vec![stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32)],
    );
    // Signals to itself only (abort, a thread's own signals).
    for nr in [libc::SYS_tgkill, libc::SYS_kill] {
        block(
            nr,
            vec![
                stmt(BPF_LD_W_ABS, arg_lo(0)),
                jump(BPF_JEQ_K, pid, 0, 1),
                stmt(BPF_RET_K, RET_ALLOW),
                stmt(BPF_RET_K, deny),
            ],
        );
    }
    // Only the terminal and non-blocking queries the runtime makes, and the transfers
    // of granted hardware opened before confinement (`devices`): GPIO values on a
    // line request, SMBus on an I2C descriptor already bound to its address. Never
    // the requests that open lines or rebind an address.
    use crate::sandbox::devices::{gpio, i2c};
    let ioctls = [
        libc::TCGETS as u32,
        libc::FIONBIO as u32,
        libc::FIOCLEX as u32,
        libc::FIONCLEX as u32,
        libc::FIONREAD as u32,
        gpio::GET_VALUES,
        gpio::SET_VALUES,
        i2c::I2C_SMBUS,
    ];
    let mut body = vec![stmt(BPF_LD_W_ABS, arg_lo(1))];
    for (i, cmd) in ioctls.iter().enumerate() {
        // Jump forward to the ALLOW after the last comparison.
        body.push(jump(BPF_JEQ_K, *cmd, (ioctls.len() - i) as u8, 0));
    }
    body.push(stmt(BPF_RET_K, deny));
    body.push(stmt(BPF_RET_K, RET_ALLOW));
    block(libc::SYS_ioctl, body);
    // Naming threads (tokio's, the runtime's).
    block(
        libc::SYS_prctl,
        vec![
            stmt(BPF_LD_W_ABS, arg_lo(0)),
            jump(BPF_JEQ_K, libc::PR_SET_NAME as u32, 1, 0),
            jump(BPF_JEQ_K, libc::PR_GET_NAME as u32, 0, 1),
            stmt(BPF_RET_K, RET_ALLOW),
            stmt(BPF_RET_K, deny),
        ],
    );
    // Reading its own limits (getrlimit), never setting them.
    block(
        libc::SYS_prlimit64,
        vec![
            stmt(BPF_LD_W_ABS, arg_lo(0)),
            jump(BPF_JEQ_K, 0, 0, 4),
            stmt(BPF_LD_W_ABS, arg_lo(2)),
            jump(BPF_JEQ_K, 0, 0, 2),
            stmt(BPF_LD_W_ABS, arg_hi(2)),
            jump(BPF_JEQ_K, 0, 1, 0),
            stmt(BPF_RET_K, deny),
            stmt(BPF_RET_K, RET_ALLOW),
        ],
    );
    p.push(stmt(BPF_RET_K, deny));
    p
}

fn seccomp_available() -> Result<(), String> {
    // SAFETY: PR_GET_SECCOMP takes no pointer.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
        return Err(errno());
    }
    Ok(())
}

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
fn seccomp() -> Result<String, String> {
    let program = filter(std::process::id());
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(errno());
    }
    Ok(format!(
        "{} syscalls allowed, others EPERM",
        allowed().len() + 7
    ))
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
fn seccomp() -> Result<String, String> {
    Err("no filter for this architecture".into())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Runs `program` on one syscall, as the kernel would.
    fn run(program: &[libc::sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend((nr as u32).to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("a 32-bit word"));
                }
                BPF_JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                BPF_JSET_K => pc += if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                BPF_JGE_K => pc += if acc >= i.k { i.jt } else { i.jf } as usize,
                BPF_JA => pc += i.k as usize,
                BPF_RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// The search alone, then deny: what it allows for syscall number `nr`.
    fn searched(nrs: &[u32], nr: u32) -> u32 {
        let mut p = vec![stmt(BPF_LD_W_ABS, OFF_NR)];
        p.extend(search(nrs));
        p.push(stmt(BPF_RET_K, 0));
        run(&p, AUDIT_ARCH, i64::from(nr), [0; 6])
    }

    proptest::proptest! {
        /// A number is allowed exactly when it is in the list, for any list.
        #[test]
        fn the_search_allows_exactly_the_listed_numbers(
            set in proptest::collection::btree_set(0u32..2000, 0..300),
            probes in proptest::collection::vec(0u32..2100, 64),
        ) {
            let nrs: Vec<u32> = set.iter().copied().collect();
            for nr in probes.iter().chain(&nrs) {
                let expected = if set.contains(nr) { RET_ALLOW } else { 0 };
                proptest::prop_assert_eq!(searched(&nrs, *nr), expected, "nr {}", nr);
            }
        }
    }

    #[test]
    fn the_filter_decides_every_syscall_number_as_its_list_says() {
        let p = filter(4242);
        let listed: std::collections::BTreeSet<u32> =
            allowed().into_iter().map(|(_, nr)| nr as u32).collect();
        let checked = [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_tgkill,
            libc::SYS_kill,
            libc::SYS_ioctl,
            libc::SYS_prctl,
            libc::SYS_prlimit64,
        ]
        .map(|nr| nr as u32);
        for nr in 0..1024u32 {
            if checked.contains(&nr) {
                continue;
            }
            let expected = if listed.contains(&nr) {
                RET_ALLOW
            } else {
                RET_ERRNO | libc::EPERM as u32
            };
            assert_eq!(
                run(&p, AUDIT_ARCH, i64::from(nr), [0; 6]),
                expected,
                "syscall {nr}"
            );
        }
    }

    /// The kernel's cache of always-allowed syscalls emulates a new filter for every
    /// syscall number and gives up at the first load of anything but the number or the
    /// architecture: the filter starts with one, so installing it skips that work.
    #[test]
    fn the_filter_starts_with_a_load_the_syscall_cache_cannot_fold() {
        let p = filter(4242);
        assert_eq!((p[0].code, p[0].k), (BPF_LD_W_ABS, OFF_IP));
        assert_eq!((p[1].code, p[1].k), (BPF_LD_W_ABS, OFF_ARCH));
    }

    #[test]
    fn the_filter_allows_a_workers_syscalls_and_denies_the_rest() {
        let pid = 4242;
        let p = filter(pid);
        assert!(p.len() < 4096, "BPF programs are at most 4096 instructions");
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let decide = |nr: i64, args: [u64; 6]| run(&p, AUDIT_ARCH, nr, args);
        assert_eq!(decide(libc::SYS_read, [0; 6]), RET_ALLOW);
        assert_eq!(decide(libc::SYS_futex, [0; 6]), RET_ALLOW);
        for nr in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_process_vm_readv,
        ] {
            assert_eq!(decide(nr, [0; 6]), eperm, "syscall {nr}");
        }
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(decide(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            decide(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            decide(libc::SYS_clone3, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(decide(libc::SYS_tgkill, [4242, 7, 6, 0, 0, 0]), RET_ALLOW);
        assert_eq!(decide(libc::SYS_tgkill, [1, 1, 9, 0, 0, 0]), eperm);
        assert_eq!(decide(libc::SYS_kill, [4241, 9, 0, 0, 0, 0]), eperm);
        assert_eq!(
            decide(libc::SYS_ioctl, [2, libc::TCGETS, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            decide(libc::SYS_ioctl, [2, libc::FIONREAD, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            decide(libc::SYS_ioctl, [2, libc::TIOCSTI, 0, 0, 0, 0]),
            eperm
        );
        {
            use crate::sandbox::devices::{gpio, i2c};
            for cmd in [gpio::GET_VALUES, gpio::SET_VALUES, i2c::I2C_SMBUS] {
                let cmd = u64::from(cmd);
                assert_eq!(decide(libc::SYS_ioctl, [5, cmd, 0, 0, 0, 0]), RET_ALLOW);
            }
            for cmd in [
                gpio::GET_LINE,
                i2c::I2C_SLAVE,
                0x0706, /* I2C_SLAVE_FORCE */
            ] {
                let cmd = u64::from(cmd);
                assert_eq!(decide(libc::SYS_ioctl, [5, cmd, 0, 0, 0, 0]), eperm);
            }
        }
        assert_eq!(
            decide(libc::SYS_prctl, [libc::PR_SET_NAME as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            decide(
                libc::SYS_prctl,
                [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0]
            ),
            eperm
        );
        assert_eq!(
            decide(libc::SYS_prlimit64, [0, 7, 0, 0x1000, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(decide(libc::SYS_prlimit64, [0, 7, 0x1000, 0, 0, 0]), eperm);
        assert_eq!(decide(libc::SYS_prlimit64, [0, 7, 1 << 32, 0, 0, 0]), eperm);
        assert_eq!(decide(libc::SYS_prlimit64, [1, 7, 0, 0, 0, 0]), eperm);
        // x32 numbers and another architecture's calls.
        assert_eq!(decide(libc::SYS_read | 0x4000_0000, [0; 6]), eperm);
        assert_eq!(run(&p, 0x4000_0003, 3, [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn a_report_says_which_layers_are_off_and_why() {
        let mut r = Report::default();
        r.push("seccomp", Ok("60 syscalls allowed".into()));
        r.push("namespaces", Err("refused (EPERM)".into()));
        assert_eq!(
            r.summary(),
            "seccomp on (60 syscalls allowed), namespaces off (refused (EPERM))"
        );
        assert!(!r.complete());
    }
}
