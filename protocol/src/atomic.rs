//! Every file kiln writes that someone may read back after a crash is written the same
//! way: a temp file in the same directory, fsync, rename over the target, fsync the
//! directory. A reader (or a device after power loss) sees the old file or the new one,
//! never half of either.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temp_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new state").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new state");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
