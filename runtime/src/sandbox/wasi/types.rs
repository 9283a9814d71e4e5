//! WASI preview 1's numbers: errnos, rights, flags and the layouts of the structures
//! a guest passes by pointer (`witx` of wasi_snapshot_preview1, little-endian).

/// A WASI errno (`errno`, u16 on the wire; functions return it as i32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u16);

impl Errno {
    pub const SUCCESS: Self = Self(0);
    pub const TOOBIG: Self = Self(1);
    pub const ACCES: Self = Self(2);
    pub const AGAIN: Self = Self(6);
    pub const BADF: Self = Self(8);
    pub const BUSY: Self = Self(10);
    pub const EXIST: Self = Self(20);
    pub const FAULT: Self = Self(21);
    pub const FBIG: Self = Self(22);
    pub const INTR: Self = Self(27);
    pub const INVAL: Self = Self(28);
    pub const IO: Self = Self(29);
    pub const ISDIR: Self = Self(31);
    pub const LOOP: Self = Self(32);
    pub const MFILE: Self = Self(33);
    pub const MLINK: Self = Self(34);
    pub const NAMETOOLONG: Self = Self(37);
    pub const NFILE: Self = Self(41);
    pub const NODEV: Self = Self(43);
    pub const NOENT: Self = Self(44);
    pub const NOMEM: Self = Self(48);
    pub const NOSPC: Self = Self(51);
    pub const NOSYS: Self = Self(52);
    pub const NOTDIR: Self = Self(54);
    pub const NOTEMPTY: Self = Self(55);
    pub const NOTSOCK: Self = Self(57);
    pub const NOTSUP: Self = Self(58);
    pub const NOTTY: Self = Self(59);
    pub const NXIO: Self = Self(60);
    pub const OVERFLOW: Self = Self(61);
    pub const PERM: Self = Self(63);
    pub const PIPE: Self = Self(64);
    pub const ROFS: Self = Self(66);
    pub const SPIPE: Self = Self(67);
    pub const TXTBSY: Self = Self(70);
    pub const XDEV: Self = Self(71);
    pub const NOTCAPABLE: Self = Self(76);

    /// The WASI errno for a Linux errno (the same names; anything unnamed is `IO`).
    pub fn from_raw_os(e: i32) -> Self {
        match e {
            libc::E2BIG => Self::TOOBIG,
            libc::EACCES => Self::ACCES,
            libc::EAGAIN => Self::AGAIN,
            libc::EBADF => Self::BADF,
            libc::EBUSY => Self::BUSY,
            libc::EEXIST => Self::EXIST,
            libc::EFAULT => Self::FAULT,
            libc::EFBIG => Self::FBIG,
            libc::EINTR => Self::INTR,
            libc::EINVAL => Self::INVAL,
            libc::EISDIR => Self::ISDIR,
            libc::ELOOP => Self::LOOP,
            libc::EMFILE => Self::MFILE,
            libc::EMLINK => Self::MLINK,
            libc::ENAMETOOLONG => Self::NAMETOOLONG,
            libc::ENFILE => Self::NFILE,
            libc::ENODEV => Self::NODEV,
            libc::ENOENT => Self::NOENT,
            libc::ENOMEM => Self::NOMEM,
            libc::ENOSPC | libc::EDQUOT => Self::NOSPC,
            libc::ENOSYS => Self::NOSYS,
            libc::ENOTDIR => Self::NOTDIR,
            libc::ENOTEMPTY => Self::NOTEMPTY,
            libc::ENOTSOCK => Self::NOTSOCK,
            libc::EOPNOTSUPP => Self::NOTSUP,
            libc::ENOTTY => Self::NOTTY,
            libc::ENXIO => Self::NXIO,
            libc::EOVERFLOW => Self::OVERFLOW,
            libc::EPERM => Self::PERM,
            libc::EPIPE => Self::PIPE,
            libc::EROFS => Self::ROFS,
            libc::ESPIPE => Self::SPIPE,
            libc::ETXTBSY => Self::TXTBSY,
            libc::EXDEV => Self::XDEV,
            _ => Self::IO,
        }
    }

    /// The errno of the last failed libc call in this thread.
    pub fn last() -> Self {
        Self::from_raw_os(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Self::from_raw_os(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// `filetype`
pub mod filetype {
    pub const UNKNOWN: u8 = 0;
    pub const BLOCK_DEVICE: u8 = 1;
    pub const CHARACTER_DEVICE: u8 = 2;
    pub const DIRECTORY: u8 = 3;
    pub const REGULAR_FILE: u8 = 4;
    pub const SOCKET_STREAM: u8 = 6;
    pub const SYMBOLIC_LINK: u8 = 7;

    /// The WASI file type of a host `st_mode`.
    pub fn of_mode(mode: u32) -> u8 {
        match mode & libc::S_IFMT {
            libc::S_IFBLK => BLOCK_DEVICE,
            libc::S_IFCHR => CHARACTER_DEVICE,
            libc::S_IFDIR => DIRECTORY,
            libc::S_IFREG => REGULAR_FILE,
            libc::S_IFSOCK => SOCKET_STREAM,
            libc::S_IFLNK => SYMBOLIC_LINK,
            _ => UNKNOWN,
        }
    }

    /// The WASI file type of a `d_type` from getdents.
    pub fn of_dirent(d_type: u8) -> u8 {
        match d_type {
            libc::DT_BLK => BLOCK_DEVICE,
            libc::DT_CHR => CHARACTER_DEVICE,
            libc::DT_DIR => DIRECTORY,
            libc::DT_REG => REGULAR_FILE,
            libc::DT_SOCK => SOCKET_STREAM,
            libc::DT_LNK => SYMBOLIC_LINK,
            _ => UNKNOWN,
        }
    }
}

/// `rights`: what an fd may be used for. kilnd keeps them per fd as wasmtime did for
/// preview 1 and the testsuite checks them.
pub mod rights {
    pub const FD_DATASYNC: u64 = 1 << 0;
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_SEEK: u64 = 1 << 2;
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    pub const FD_SYNC: u64 = 1 << 4;
    pub const FD_TELL: u64 = 1 << 5;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_ADVISE: u64 = 1 << 7;
    pub const FD_ALLOCATE: u64 = 1 << 8;
    pub const PATH_CREATE_DIRECTORY: u64 = 1 << 9;
    pub const PATH_CREATE_FILE: u64 = 1 << 10;
    pub const PATH_LINK_SOURCE: u64 = 1 << 11;
    pub const PATH_LINK_TARGET: u64 = 1 << 12;
    pub const PATH_OPEN: u64 = 1 << 13;
    pub const FD_READDIR: u64 = 1 << 14;
    pub const PATH_READLINK: u64 = 1 << 15;
    pub const PATH_RENAME_SOURCE: u64 = 1 << 16;
    pub const PATH_RENAME_TARGET: u64 = 1 << 17;
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    pub const PATH_FILESTAT_SET_SIZE: u64 = 1 << 19;
    pub const PATH_FILESTAT_SET_TIMES: u64 = 1 << 20;
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    pub const FD_FILESTAT_SET_TIMES: u64 = 1 << 23;
    pub const PATH_SYMLINK: u64 = 1 << 24;
    pub const PATH_REMOVE_DIRECTORY: u64 = 1 << 25;
    pub const PATH_UNLINK_FILE: u64 = 1 << 26;
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    pub const SOCK_SHUTDOWN: u64 = 1 << 28;
    pub const SOCK_ACCEPT: u64 = 1 << 29;
    pub const ALL: u64 = (1 << 30) - 1;

    /// A directory's own rights (wasmtime's set): what it takes to work with names in
    /// it. File rights are only ever inherited through it.
    pub const DIRECTORY: u64 = PATH_CREATE_DIRECTORY
        | PATH_CREATE_FILE
        | PATH_LINK_SOURCE
        | PATH_LINK_TARGET
        | PATH_OPEN
        | FD_READDIR
        | PATH_READLINK
        | PATH_RENAME_SOURCE
        | PATH_RENAME_TARGET
        | PATH_SYMLINK
        | PATH_REMOVE_DIRECTORY
        | PATH_UNLINK_FILE
        | PATH_FILESTAT_GET
        | PATH_FILESTAT_SET_SIZE
        | PATH_FILESTAT_SET_TIMES
        | FD_FILESTAT_GET
        | FD_FILESTAT_SET_TIMES;

    /// A regular file's rights.
    pub const FILE: u64 = FD_DATASYNC
        | FD_READ
        | FD_SEEK
        | FD_FDSTAT_SET_FLAGS
        | FD_SYNC
        | FD_TELL
        | FD_WRITE
        | FD_ADVISE
        | FD_ALLOCATE
        | FD_FILESTAT_GET
        | FD_FILESTAT_SET_SIZE
        | FD_FILESTAT_SET_TIMES
        | POLL_FD_READWRITE;

    /// A standard stream's rights: no seek or tell (which makes it a terminal to
    /// wasi-libc's `isatty` when its type says character device).
    pub const STDIO: u64 =
        FD_READ | FD_WRITE | FD_FDSTAT_SET_FLAGS | FD_FILESTAT_GET | POLL_FD_READWRITE;

    /// Rights that need the host file open for reading, and for writing.
    pub const READING: u64 = FD_READ | FD_READDIR;
    pub const WRITING: u64 = FD_DATASYNC | FD_WRITE | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
}

/// `fdflags`
pub mod fdflags {
    pub const APPEND: u16 = 1 << 0;
    pub const DSYNC: u16 = 1 << 1;
    pub const NONBLOCK: u16 = 1 << 2;
    pub const RSYNC: u16 = 1 << 3;
    pub const SYNC: u16 = 1 << 4;
}

/// `oflags`
pub mod oflags {
    pub const CREAT: u16 = 1 << 0;
    pub const DIRECTORY: u16 = 1 << 1;
    pub const EXCL: u16 = 1 << 2;
    pub const TRUNC: u16 = 1 << 3;
}

/// `lookupflags`
pub const SYMLINK_FOLLOW: u32 = 1;

/// `fstflags`
pub mod fstflags {
    pub const ATIM: u16 = 1 << 0;
    pub const ATIM_NOW: u16 = 1 << 1;
    pub const MTIM: u16 = 1 << 2;
    pub const MTIM_NOW: u16 = 1 << 3;
}

/// `whence`
pub mod whence {
    pub const SET: u8 = 0;
    pub const CUR: u8 = 1;
    pub const END: u8 = 2;
}

/// `clockid`
pub mod clock {
    pub const REALTIME: u32 = 0;
    pub const MONOTONIC: u32 = 1;
    pub const PROCESS_CPUTIME: u32 = 2;
    pub const THREAD_CPUTIME: u32 = 3;

    /// The Linux clock behind a WASI one.
    pub fn host(id: u32) -> Option<libc::clockid_t> {
        Some(match id {
            REALTIME => libc::CLOCK_REALTIME,
            MONOTONIC => libc::CLOCK_MONOTONIC,
            PROCESS_CPUTIME => libc::CLOCK_PROCESS_CPUTIME_ID,
            THREAD_CPUTIME => libc::CLOCK_THREAD_CPUTIME_ID,
            _ => return None,
        })
    }
}

/// `eventtype`
pub mod eventtype {
    pub const CLOCK: u8 = 0;
    pub const FD_READ: u8 = 1;
    pub const FD_WRITE: u8 = 2;
}

/// `subclockflags`: the timeout is an absolute time of the clock.
pub const ABSTIME: u16 = 1;

/// Sizes of the structures a guest passes by pointer.
pub const FDSTAT_SIZE: usize = 24;
pub const FILESTAT_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 24;
pub const SUBSCRIPTION_SIZE: usize = 48;
pub const EVENT_SIZE: usize = 32;
pub const IOVEC_SIZE: usize = 8;

/// A `filestat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filestat {
    pub dev: u64,
    pub ino: u64,
    pub filetype: u8,
    pub nlink: u64,
    pub size: u64,
    pub atim: u64,
    pub mtim: u64,
    pub ctim: u64,
}

fn nanos(sec: i64, nsec: i64) -> u64 {
    (sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(nsec as u64)
}

impl Filestat {
    // nlink_t is u64 on x86_64 and u32 on aarch64 and riscv64.
    #[allow(clippy::useless_conversion)]
    pub fn of(st: &libc::stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            filetype: filetype::of_mode(st.st_mode),
            nlink: u64::from(st.st_nlink),
            size: st.st_size as u64,
            atim: nanos(st.st_atime, st.st_atime_nsec),
            mtim: nanos(st.st_mtime, st.st_mtime_nsec),
            ctim: nanos(st.st_ctime, st.st_ctime_nsec),
        }
    }

    pub fn bytes(&self) -> [u8; FILESTAT_SIZE] {
        let mut b = [0u8; FILESTAT_SIZE];
        b[0..8].copy_from_slice(&self.dev.to_le_bytes());
        b[8..16].copy_from_slice(&self.ino.to_le_bytes());
        b[16] = self.filetype;
        b[24..32].copy_from_slice(&self.nlink.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b[40..48].copy_from_slice(&self.atim.to_le_bytes());
        b[48..56].copy_from_slice(&self.mtim.to_le_bytes());
        b[56..64].copy_from_slice(&self.ctim.to_le_bytes());
        b
    }
}

/// An `fdstat`.
pub fn fdstat_bytes(filetype: u8, flags: u16, base: u64, inheriting: u64) -> [u8; FDSTAT_SIZE] {
    let mut b = [0u8; FDSTAT_SIZE];
    b[0] = filetype;
    b[2..4].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&base.to_le_bytes());
    b[16..24].copy_from_slice(&inheriting.to_le_bytes());
    b
}

/// A `dirent` header; the name follows it.
pub fn dirent_bytes(next: u64, ino: u64, namlen: u32, filetype: u8) -> [u8; DIRENT_SIZE] {
    let mut b = [0u8; DIRENT_SIZE];
    b[0..8].copy_from_slice(&next.to_le_bytes());
    b[8..16].copy_from_slice(&ino.to_le_bytes());
    b[16..20].copy_from_slice(&namlen.to_le_bytes());
    b[20] = filetype;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_put_each_field_where_the_witx_says() {
        let st = Filestat {
            dev: 1,
            ino: 2,
            filetype: filetype::REGULAR_FILE,
            nlink: 3,
            size: 4,
            atim: 5,
            mtim: 6,
            ctim: 7,
        };
        let b = st.bytes();
        assert_eq!((b[8], b[16], b[24], b[32], b[56]), (2, 4, 3, 4, 7));
        let f = fdstat_bytes(3, 0x11, rights::ALL, 1);
        assert_eq!((f[0], f[2], f[16]), (3, 0x11, 1));
        assert_eq!(
            u64::from_le_bytes(f[8..16].try_into().unwrap()),
            rights::ALL
        );
        let d = dirent_bytes(9, 8, 7, 6);
        assert_eq!((d[0], d[8], d[16], d[20]), (9, 8, 7, 6));
        assert_eq!(
            rights::DIRECTORY
                & rights::FILE
                & !rights::FD_FILESTAT_GET
                & !rights::FD_FILESTAT_SET_TIMES,
            0
        );
    }

    #[test]
    fn linux_errnos_keep_their_names() {
        assert_eq!(Errno::from_raw_os(libc::ENOTEMPTY), Errno::NOTEMPTY);
        assert_eq!(Errno::from_raw_os(libc::ELOOP), Errno::LOOP);
        assert_eq!(Errno::from_raw_os(libc::ENOTDIR), Errno::NOTDIR);
        assert_eq!(Errno::from_raw_os(libc::ECHILD), Errno::IO);
    }
}
