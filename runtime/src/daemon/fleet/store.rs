//! What a device keeps on disk for fleet updates, all of it written atomically:
//!
//! ```text
//! {data_dir}/state                      postcard State: per module the committed slot and
//!                                       version, the staged slot, the anti-rollback floor
//! {data_dir}/modules/{name}/a.kiln      slot A
//! {data_dir}/modules/{name}/b.kiln      slot B
//! {data_dir}/downloads/{sha256}-{chunk_size}/{n}
//!                                       chunks of a transfer in progress, by the
//!                                       stream's sha256 (re-hashed whenever read)
//! ```
//!
//! The state file is the only commit point: a slot file is written completely before the
//! state names it, so after a crash at any step the device runs the committed slot.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use kiln_protocol::atomic::write_atomically;
use kiln_protocol::fleet::{sha256, DesiredModule, ModuleLimits, TargetArtifact};
use kiln_protocol::names::{self, Kind};
use kiln_protocol::transfer::{ChunkList, MAX_ARTIFACT};

use super::agent::DownloadKey;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Self {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    fn file(self) -> &'static str {
        match self {
            Slot::A => "a.kiln",
            Slot::B => "b.kiln",
        }
    }
}

/// A version of a module in a slot, with how it was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub slot: Slot,
    pub version: u64,
    pub sha256: [u8; 32],
    pub config: Vec<u8>,
    pub limits: ModuleLimits,
}

impl Installed {
    pub fn from_desired(slot: Slot, d: &DesiredModule, target: &TargetArtifact) -> Self {
        Self {
            slot,
            version: d.version,
            sha256: target.sha256,
            config: d.config.clone(),
            limits: d.limits.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub committed: Option<Installed>,
    /// Written, verified, maybe running on trial; not committed.
    pub staged: Option<Installed>,
    /// Anti-rollback: the highest version ever committed.
    pub floor: u64,
    /// Artifacts that failed their health window; not tried again.
    pub rejected: Vec<[u8; 32]>,
    /// The desired-state topic the module came from.
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateV1 {
    /// Highest desired-state serial acted on, per source topic.
    pub serials: BTreeMap<String, u64>,
    pub modules: BTreeMap<String, ModuleRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    V1(StateV1),
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir.join("modules"))?;
        std::fs::create_dir_all(dir.join("downloads"))?;
        Ok(Self { dir: dir.into() })
    }

    /// The store without touching the disk, for a data dir that cannot be created:
    /// every operation then fails and the agent runs degraded.
    pub fn at(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    pub fn load(&self) -> io::Result<StateV1> {
        match std::fs::read(self.dir.join("state")) {
            Ok(bytes) => match postcard::from_bytes::<State>(&bytes) {
                Ok(State::V1(state)) => Ok(state),
                Err(e) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.dir.join("state").display()),
                )),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateV1::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state: &StateV1) -> io::Result<()> {
        let bytes = postcard::to_stdvec(&State::V1(state.clone()))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        write_atomically(&self.dir.join("state"), &bytes)
    }

    /// The file of a module's slot. Names are checked where they enter; an unchecked
    /// one never becomes a path (it maps to a file that cannot exist).
    pub fn slot_path(&self, module: &str, slot: Slot) -> PathBuf {
        let module = if names::check(Kind::Module, module).is_ok() {
            module
        } else {
            "\0invalid"
        };
        self.dir.join("modules").join(module).join(slot.file())
    }

    pub fn write_slot(&self, module: &str, slot: Slot, bytes: &[u8]) -> io::Result<PathBuf> {
        names::check(Kind::Module, module)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let path = self.slot_path(module, slot);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    fn download_dir(&self, key: &DownloadKey) -> PathBuf {
        self.dir
            .join("downloads")
            .join(format!("{}-{}", hex::encode(key.sha256), key.chunk_size))
    }

    /// Chunks of a download already on disk that still have the right length and
    /// hash; any other file there is deleted, so a resumed download trusts nothing it
    /// did not check again.
    pub fn scan(&self, key: &DownloadKey, artifact: &ChunkList) -> BTreeSet<u32> {
        let dir = self.download_dir(key);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return BTreeSet::new();
        };
        let mut have = BTreeSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let n: Option<u32> = entry.file_name().to_str().and_then(|n| n.parse().ok());
            let good = n
                .filter(|n| (*n as usize) < artifact.chunks.len())
                .is_some_and(|n| {
                    let expected = artifact.chunk_len(n);
                    let fits = entry.metadata().is_ok_and(|m| m.len() == expected);
                    fits && std::fs::read(&path)
                        .is_ok_and(|b| sha256(&b) == artifact.chunks[n as usize])
                });
            match n {
                Some(n) if good => {
                    have.insert(n);
                }
                _ => {
                    tracing::warn!(file = %path.display(), "removing a stored chunk that does not hash right");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        have
    }

    pub fn write_chunk(&self, key: &DownloadKey, n: u32, data: &[u8]) -> io::Result<()> {
        let dir = self.download_dir(key);
        std::fs::create_dir_all(&dir)?;
        write_atomically(&dir.join(n.to_string()), data)
    }

    /// The whole stream from its chunks, each re-hashed; a chunk that changed on disk
    /// is deleted (the next scan fetches it again).
    pub fn assemble(&self, key: &DownloadKey, artifact: &ChunkList) -> io::Result<Vec<u8>> {
        let dir = self.download_dir(key);
        let mut bytes = Vec::with_capacity(artifact.len.min(MAX_ARTIFACT) as usize);
        for (n, expected) in artifact.chunks.iter().enumerate() {
            let path = dir.join(n.to_string());
            let chunk = read_bounded(&path, artifact.chunk_len(n as u32))?;
            if sha256(&chunk) != *expected {
                let _ = std::fs::remove_file(&path);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored chunk {n} changed on disk"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// A slot's bytes, if the file is no longer than `limit`.
    pub fn read_slot(&self, module: &str, slot: Slot, limit: u64) -> io::Result<Vec<u8>> {
        read_bounded(&self.slot_path(module, slot), limit)
    }

    pub fn drop_download(&self, key: &DownloadKey) {
        let _ = std::fs::remove_dir_all(self.download_dir(key));
    }
}

/// Reads a file the device wrote, refusing one larger than `limit` before reading it.
fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, expected at most {limit}",
                path.display()
            ),
        ));
    }
    std::fs::read(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_fresh_device_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), StateV1::default());
        let mut state = StateV1::default();
        state.modules.insert(
            "app".into(),
            ModuleRecord {
                floor: 3,
                ..Default::default()
            },
        );
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        let bytes = b"xyz".repeat(1000);
        let artifact = ChunkList::of(&bytes, 1024);
        let key = DownloadKey {
            sha256: artifact.sha256,
            chunk_size: 1024,
        };
        store.write_chunk(&key, 2, &bytes[2048..]).unwrap();
        store.write_chunk(&key, 0, &bytes[..1024]).unwrap();
        // A chunk that does not hash right is deleted, whatever its name.
        store.write_chunk(&key, 1, &bytes[..1024]).unwrap();
        assert_eq!(store.scan(&key, &artifact), BTreeSet::from([0, 2]));
        assert!(store.assemble(&key, &artifact).is_err(), "chunk 1 is gone");
        store.write_chunk(&key, 1, &bytes[1024..2048]).unwrap();
        assert_eq!(store.assemble(&key, &artifact).unwrap(), bytes);
        // Another chunk size is another download.
        let other = DownloadKey {
            chunk_size: 2048,
            ..key
        };
        assert!(store.scan(&other, &ChunkList::of(&bytes, 2048)).is_empty());
    }
}
