//! The file capability's host side: a file granted read-only (a sensor attribute
//! under `/sys`, such as an IIO channel's `in_temp_input`), opened by the worker
//! before it confines itself and read again from its start on each call (`pread` at
//! offset 0, which is how a sysfs attribute gives its current value).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use kiln_protocol::capability::ReadFile;

/// A granted file, opened read-only.
pub struct Granted {
    pub name: String,
    file: File,
}

pub fn open(grant: &ReadFile) -> io::Result<Granted> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&grant.path)?;
    Ok(Granted {
        name: grant.name.clone(),
        file,
    })
}

impl Granted {
    /// The file from its start, as much as `buf` holds.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut at = 0;
        while at < buf.len() {
            match self.file.read_at(&mut buf[at..], at as u64) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_is_the_file_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in_temp_input");
        std::fs::write(&path, "23456\n").unwrap();
        let granted = open(&ReadFile {
            name: "temp".into(),
            path: path.to_string_lossy().into_owned(),
        })
        .unwrap();
        let mut buf = [0u8; 64];
        let n = granted.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"23456\n");
        std::fs::write(&path, "24001\n").unwrap();
        let n = granted.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"24001\n");
        let mut small = [0u8; 3];
        assert_eq!(granted.read(&mut small).unwrap(), 3);
        assert_eq!(&small, b"240");
    }
}
