//! The one way either side reads a file that someone else wrote (an artifact, a key, a
//! root document, a slot, a state file): opened without waiting, refused unless it is
//! a regular file, and read through a `take` so that no more than the limit is ever
//! read, whatever the file's size says or becomes while it is read.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("key.pub");
//! std::fs::write(&path, b"kiln-ed25519 ...").unwrap();
//! assert_eq!(kiln_protocol::files::read_bounded(&path, 64).unwrap().len(), 16);
//! assert!(kiln_protocol::files::read_bounded(&path, 15).is_err());
//! ```

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most [`read_bounded`] reserves before the bytes arrive. A regular file
/// delivers its size (a sparse one as zeros), so up to this much is reserved once
/// rather than grown by doubling (each step a copy; a worker reads its artifact on
/// every start); past it, a file that shrinks while read costs only what it delivers.
const FIRST_READ: u64 = 16 * 1024 * 1024;

/// The largest artifact a device reads from its own disk: `kilnd run FILE`, a module
/// configured by path, a slot the update agent wrote. Bounded so that a corrupt or
/// planted file cannot take the device's memory, but far above what travels over MQTT
/// (`transfer::MAX_ARTIFACT`): a 66 MB C++ module compiles to 270-320 MB.
pub const MAX_LOCAL_ARTIFACT: u64 = 1024 * 1024 * 1024;

/// The regular file at `path`, if it holds at most `limit` bytes. A FIFO, a device, a
/// socket or a directory is refused before a byte is read; a file that is, or grows,
/// past `limit` is refused after `limit + 1` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    // More than the size: the read that finds the end needs no growth, and an
    // artifact's payload can be aligned in place (kilnd's `load_bytes`).
    let mut bytes =
        Vec::with_capacity((len.min(limit).min(FIRST_READ) as usize).saturating_add(SLACK));
    populate(&mut bytes);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(path, limit));
    }
    Ok(bytes)
}

/// The sha256 of the regular file at `path`, read in blocks: what a file's bytes
/// need when only their digest is kept (nothing the size of the file is held). Refused
/// as [`read_bounded`] refuses it.
pub fn sha256_bounded(path: &Path, limit: u64) -> io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let (file, _) = open_regular(path)?;
    let mut hash = Sha256::new();
    let read = io::copy(&mut file.take(limit.saturating_add(1)), &mut hash)?;
    if read > limit {
        return Err(too_large(path, limit));
    }
    Ok(hash.finalize().into())
}

/// Maps the pages of `buf`'s spare capacity now, in one call, instead of a page fault
/// per 4 KiB as `read` fills them: an artifact read on a worker's start path is a
/// few hundred KiB, and each fault is a trip through the kernel (through the
/// hypervisor too, on a VM). Linux 5.14 and later; elsewhere it changes nothing.
fn populate(buf: &mut Vec<u8>) {
    const SMALL: usize = 64 * 1024;
    let spare = buf.spare_capacity_mut();
    if spare.len() < SMALL {
        return;
    }
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = spare.as_mut_ptr() as usize;
    let end = start + spare.len();
    let first = (start + page - 1) & !(page - 1);
    let len = end.saturating_sub(first) & !(page - 1);
    if len > 0 {
        // SAFETY: the range is inside the vector's own allocation, which nothing reads
        // before `read` writes it; MADV_POPULATE_WRITE only faults its pages in.
        unsafe { libc::madvise(first as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    }
}

/// Bytes a buffer read whole has beyond the file's size.
const SLACK: usize = 16;

fn too_large(path: &Path, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("`{}` is larger than {limit} bytes", path.display()),
    )
}

/// `path` opened for reading if it is a regular file, with the size it has now.
fn open_regular(path: &Path) -> io::Result<(std::fs::File, u64)> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. It
    // changes nothing for a regular file. O_NOCTTY: a terminal never becomes ours.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is {what}, not a regular file", path.display()),
        ));
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_digest_is_its_bytes_digest_and_one_past_the_limit_is_refused() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(sha256_bounded(&path, 100_000).unwrap(), want);
        assert!(sha256_bounded(&path, 99_999).is_err());
        assert!(sha256_bounded(dir.path(), 10).is_err());
    }

    #[test]
    fn a_file_within_the_limit_is_read_whole_and_one_past_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        assert_eq!(read_bounded(&path, 100).unwrap(), vec![7u8; 100]);
        let err = read_bounded(&path, 99).unwrap_err();
        assert!(err.to_string().contains("larger than 99 bytes"), "{err}");
        assert_eq!(read_bounded(&path, u64::MAX).unwrap().len(), 100);
    }

    #[test]
    fn a_fifo_a_device_and_a_directory_are_refused_without_waiting_or_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        // No writer ever opens it: a blocking open would hang the test.
        let err = read_bounded(&fifo, 10).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        let err = read_bounded(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(err.to_string().contains("is a device"), "{err}");
        let err = read_bounded(dir.path(), 10).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
}
