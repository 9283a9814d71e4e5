//! The release file (`kiln release`'s `.kilnrel`): a release's artifacts, each signed
//! on its own, in one file; and the bounded read of any input artifact or release file.

use std::path::Path;

use anyhow::Result;
use kiln_protocol::transfer::MAX_ARTIFACT;
use serde::{Deserialize, Serialize};

use crate::build::Error;

/// The first bytes of a release file (`kiln release`).
pub const FILE_MAGIC: &[u8; 8] = b"KILNREL\x01";
/// A release file holds at most this many artifacts.
pub const MAX_TARGETS: usize = 16;

#[derive(Serialize, Deserialize)]
enum FileBody {
    V1 { artifacts: Vec<Vec<u8>> },
}

/// A release file: its artifacts, each signed on its own.
pub fn encode_file(artifacts: &[Vec<u8>]) -> Vec<u8> {
    let body = FileBody::V1 {
        artifacts: artifacts.to_vec(),
    };
    [
        &FILE_MAGIC[..],
        &postcard::to_stdvec(&body).unwrap_or_default(),
    ]
    .concat()
}

pub fn decode_file(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let body = bytes
        .strip_prefix(&FILE_MAGIC[..])
        .ok_or("not a kiln release file")?;
    let FileBody::V1 { artifacts } =
        postcard::from_bytes(body).map_err(|e| format!("malformed release file: {e}"))?;
    if artifacts.is_empty() || artifacts.len() > MAX_TARGETS {
        return Err(format!(
            "a release file of {} artifacts (1 to {MAX_TARGETS})",
            artifacts.len()
        ));
    }
    Ok(artifacts)
}

/// Reads an input file, refusing one larger than any release, and a FIFO or device.
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    let limit = MAX_ARTIFACT * MAX_TARGETS as u64 + 4096;
    // The refusals name the file already; an I/O error does not.
    kiln_protocol::files::read_bounded(path, limit).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
            Error::Invalid(e.to_string()).into()
        }
        _ => Error::Unreadable(format!("cannot read `{}`: {e}", path.display())).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_files_round_trip_and_refuse_anything_else() {
        let file = encode_file(&[vec![1, 2, 3], vec![4; 100]]);
        assert_eq!(decode_file(&file).unwrap(), [vec![1, 2, 3], vec![4; 100]]);
        assert!(decode_file(b"KILNART\x01....").is_err());
        assert!(decode_file(&file[..file.len() - 1]).is_err());
        assert!(decode_file(&encode_file(&[])).is_err());
    }
}
