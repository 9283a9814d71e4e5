//! `kiln push --mirror-dir DIR`: each transfer's chunk list and chunks as static files
//! under DIR, in the layout devices fetch them from an HTTP(S) mirror
//! (`kiln_protocol::mirror`): `artifacts/{sha256}/list` (the chunk-list message, as on
//! the broker) and `artifacts/{sha256}/{n}` (chunk n's raw bytes). DIR is what a
//! static file server serves, or what is synced to an object store or a CDN. Every
//! file is written atomically (temp file, fsync, rename), so a server never serves
//! half a file; a file already there with the right bytes is left alone, so a second
//! push of the same release writes nothing.

use std::path::Path;

use anyhow::{anyhow, Result};
use kiln_protocol::mirror::layout;
use kiln_protocol::transfer::{sha256, Prepared};

use crate::fleet::Error;

/// What a push wrote to the mirror directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Files written, and files already there with the right bytes.
    pub written: usize,
    pub kept: usize,
    /// Bytes of all the files of the transfers.
    pub bytes: u64,
}

/// Writes every file of `transfers` under `dir`.
pub fn write(dir: &Path, transfers: &[Prepared]) -> Result<Written> {
    let mut done = Written::default();
    for p in transfers {
        let sha = p.transfer.sha256;
        let size = p.transfer.chunk_size.max(1) as usize;
        let chunks = p
            .stream
            .chunks(size)
            .enumerate()
            .map(|(n, data)| (n.to_string(), data));
        let files = std::iter::once(("list".to_string(), p.list_message.as_slice())).chain(chunks);
        for (part, bytes) in files {
            let path = dir.join(layout(&sha, &part));
            done.bytes += bytes.len() as u64;
            if same_file(&path, bytes) {
                done.kept += 1;
                continue;
            }
            let parent = path.parent().unwrap_or(dir);
            std::fs::create_dir_all(parent)
                .and_then(|()| kiln_protocol::atomic::write_atomically(&path, bytes))
                .map_err(|e| {
                    Error::invalid(anyhow!(
                        "mirror dir: cannot write `{}`: {e}",
                        path.display()
                    ))
                })?;
            done.written += 1;
        }
    }
    Ok(done)
}

/// Whether `path` already holds exactly `bytes`.
fn same_file(path: &Path, bytes: &[u8]) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == bytes.len() as u64 => {
            std::fs::read(path).is_ok_and(|have| sha256(&have) == sha256(bytes))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::transfer::{ChunkList, Codec, Transfer};

    #[test]
    fn the_files_are_the_list_and_each_chunk_raw_and_a_second_write_keeps_them() {
        let artifact: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let p = Transfer::full(&artifact, Codec::Raw, 4096);
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), std::slice::from_ref(&p)).unwrap();
        assert_eq!((first.written, first.kept), (11, 0));
        let sha = hex::encode(p.transfer.sha256);
        let list = std::fs::read(dir.path().join(format!("artifacts/{sha}/list"))).unwrap();
        let list = ChunkList::open(&list, &p.transfer).unwrap();
        for (n, hash) in list.chunks.iter().enumerate() {
            let chunk = std::fs::read(dir.path().join(format!("artifacts/{sha}/{n}"))).unwrap();
            assert_eq!(sha256(&chunk), *hash);
            assert_eq!(chunk.len() as u64, list.chunk_len(n as u32));
        }
        let again = write(dir.path(), &[p]).unwrap();
        assert_eq!(
            (again.written, again.kept, again.bytes),
            (0, 11, first.bytes)
        );
    }
}
