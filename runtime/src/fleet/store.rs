//! What a device keeps on disk for fleet updates, all of it written atomically:
//!
//! ```text
//! {data_dir}/state                      postcard State: per module the committed slot and
//!                                       version, the staged slot, the anti-rollback floor
//! {data_dir}/modules/{name}/a.kiln      slot A
//! {data_dir}/modules/{name}/b.kiln      slot B
//! {data_dir}/downloads/{sha256}/{n}     verified chunks of a transfer in progress
//! ```
//!
//! The state file is the only commit point: a slot file is written completely before the
//! state names it, so after a crash at any step the device runs the committed slot.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use kiln_protocol::atomic::write_atomically;
use kiln_protocol::fleet::{DesiredModule, ModuleLimits};
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
    pub fn from_desired(slot: Slot, d: &DesiredModule) -> Self {
        Self {
            slot,
            version: d.version,
            sha256: d.artifact.sha256,
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

    pub fn slot_path(&self, module: &str, slot: Slot) -> PathBuf {
        self.dir.join("modules").join(module).join(slot.file())
    }

    pub fn write_slot(&self, module: &str, slot: Slot, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.slot_path(module, slot);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    fn download_dir(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join("downloads").join(hex::encode(sha256))
    }

    /// Chunk indices already on disk for `sha256`.
    pub fn chunks_present(&self, sha256: &[u8; 32]) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.download_dir(sha256)) else {
            return Vec::new();
        };
        let mut have: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        have.sort_unstable();
        have
    }

    pub fn write_chunk(&self, sha256: &[u8; 32], n: u32, data: &[u8]) -> io::Result<()> {
        let dir = self.download_dir(sha256);
        std::fs::create_dir_all(&dir)?;
        write_atomically(&dir.join(n.to_string()), data)
    }

    pub fn read_chunk(&self, sha256: &[u8; 32], n: u32) -> io::Result<Vec<u8>> {
        std::fs::read(self.download_dir(sha256).join(n.to_string()))
    }

    pub fn drop_download(&self, sha256: &[u8; 32]) {
        let _ = std::fs::remove_dir_all(self.download_dir(sha256));
    }
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
        store.write_chunk(&[1; 32], 2, b"x").unwrap();
        store.write_chunk(&[1; 32], 0, b"y").unwrap();
        assert_eq!(store.chunks_present(&[1; 32]), [0, 2]);
    }
}
