//! What a device keeps on disk for fleet updates, all of it written atomically:
//!
//! ```text
//! {data_dir}/state                      postcard State: per module the committed slot and
//!                                       version, the staged slot, the anti-rollback floor
//! {data_dir}/root                       the newest root document the device took
//! {data_dir}/identity.key               the device's own ed25519 key (0600)
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
use kiln_protocol::transfer::{ChunkList, Transfer, MAX_ARTIFACT};
use kiln_protocol::trust::{SignedRoot, MAX_ROOT};

use kiln_protocol::files::read_bounded;

use serde::{Deserialize, Serialize};

/// A download is keyed by the transfer's stream and how it is cut: the same stream
/// pushed again with another chunk size is another download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DownloadKey {
    pub sha256: [u8; 32],
    pub chunk_size: u32,
}

impl DownloadKey {
    pub fn of(transfer: &Transfer) -> Self {
        Self {
            sha256: transfer.sha256,
            chunk_size: transfer.chunk_size,
        }
    }
}

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
    /// The release key that signed it, checked when it was staged. Its worker trusts
    /// this key, so a key rotation does not stop what already runs. `None`: staged by
    /// a kilnd before root documents (the current release keys are used).
    pub signer: Option<[u8; 32]>,
}

impl Installed {
    pub fn from_desired(
        slot: Slot,
        d: &DesiredModule,
        target: &TargetArtifact,
        signer: [u8; 32],
    ) -> Self {
        Self {
            slot,
            version: d.version,
            sha256: target.sha256,
            config: d.config.clone(),
            limits: d.limits.clone(),
            signer: Some(signer),
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
pub struct DeviceState {
    /// The serial of the desired state last acted on, per source topic (what the
    /// device reports)...
    pub serials: BTreeMap<String, u64>,
    /// ...and the sha256 of its body.
    pub digests: BTreeMap<String, [u8; 32]>,
    pub modules: BTreeMap<String, ModuleRecord>,
    /// The anti-replay floors, per source topic and per release key: the highest
    /// serial each key signed that this device applied, and that state's digest. A
    /// floor binds while its key is a release key of the current root; a rotation
    /// that drops a key drops its floors with it, so a leaked key's fast-forward
    /// (serial `u64::MAX`) ends with the rotation that revokes the key, and the
    /// floors the keys still trusted set keep refusing their old states.
    pub floors: BTreeMap<String, Vec<Floor>>,
}

/// One release key's anti-replay floor on one source (see [`DeviceState::floors`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// The key's id; [`LEGACY_SIGNER`] for a floor kept by a kilnd before per-key
    /// floors (it binds under whatever keys the device trusts when it starts).
    pub key: [u8; 8],
    pub serial: u64,
    pub digest: [u8; 32],
}

/// The key id of a floor whose signer is not known (see [`Floor::key`]).
pub const LEGACY_SIGNER: [u8; 8] = [0; 8];

/// Root documents kept in the data dir: more rotations than a fleet makes in years.
pub const MAX_KEPT_ROOTS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    V1(v1::State),
    V2(v2::State),
    V3(DeviceState),
}

/// The state file before per-key floors: its serials become floors of unknown signer.
mod v2 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct State {
        pub serials: BTreeMap<String, u64>,
        pub digests: BTreeMap<String, [u8; 32]>,
        pub modules: BTreeMap<String, ModuleRecord>,
    }

    impl From<State> for DeviceState {
        fn from(s: State) -> Self {
            let floors = s
                .serials
                .iter()
                .map(|(source, serial)| {
                    let floor = Floor {
                        key: LEGACY_SIGNER,
                        serial: *serial,
                        digest: s.digests.get(source).copied().unwrap_or_default(),
                    };
                    (source.clone(), vec![floor])
                })
                .collect();
            DeviceState {
                serials: s.serials,
                digests: s.digests,
                modules: s.modules,
                floors,
            }
        }
    }

    #[cfg(test)]
    pub fn fixture() -> Vec<u8> {
        let old = State {
            serials: BTreeMap::from([("kiln/v1/devices/d/desired".to_string(), 9)]),
            digests: BTreeMap::from([("kiln/v1/devices/d/desired".to_string(), [4; 32])]),
            modules: BTreeMap::new(),
        };
        postcard::to_stdvec(&super::State::V2(old)).unwrap()
    }
}

/// The state file of kiln 0.2 (no digests, no signers), read and upgraded.
mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Installed {
        slot: Slot,
        version: u64,
        sha256: [u8; 32],
        config: Vec<u8>,
        limits: ModuleLimits,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ModuleRecord {
        committed: Option<Installed>,
        staged: Option<Installed>,
        floor: u64,
        rejected: Vec<[u8; 32]>,
        source: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct State {
        serials: BTreeMap<String, u64>,
        modules: BTreeMap<String, ModuleRecord>,
    }

    fn installed(i: Installed) -> super::Installed {
        super::Installed {
            slot: i.slot,
            version: i.version,
            sha256: i.sha256,
            config: i.config,
            limits: i.limits,
            signer: None,
        }
    }

    impl From<State> for DeviceState {
        fn from(s: State) -> Self {
            let serials = s.serials.clone();
            let modules = s
                .modules
                .into_iter()
                .map(|(name, r)| {
                    let record = super::ModuleRecord {
                        committed: r.committed.map(installed),
                        staged: r.staged.map(installed),
                        floor: r.floor,
                        rejected: r.rejected,
                        source: r.source,
                    };
                    (name, record)
                })
                .collect();
            super::v2::State {
                serials,
                digests: BTreeMap::new(),
                modules,
            }
            .into()
        }
    }

    #[cfg(test)]
    pub fn fixture() -> (Vec<u8>, DeviceState) {
        let old = State {
            serials: BTreeMap::from([("kiln/v1/groups/lab/desired".to_string(), 7)]),
            modules: BTreeMap::from([(
                "app".to_string(),
                ModuleRecord {
                    committed: Some(Installed {
                        slot: Slot::B,
                        version: 3,
                        sha256: [5; 32],
                        config: b"x".to_vec(),
                        limits: ModuleLimits::default(),
                    }),
                    staged: None,
                    floor: 3,
                    rejected: vec![[6; 32]],
                    source: Some("kiln/v1/groups/lab/desired".into()),
                },
            )]),
        };
        let bytes = postcard::to_stdvec(&super::State::V1(old.clone())).unwrap();
        (bytes, old.into())
    }
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

    pub fn load(&self) -> io::Result<DeviceState> {
        match std::fs::read(self.dir.join("state")) {
            Ok(bytes) => match postcard::from_bytes::<State>(&bytes) {
                Ok(State::V1(old)) => Ok(old.into()),
                Ok(State::V2(old)) => Ok(old.into()),
                Ok(State::V3(state)) => Ok(state),
                Err(e) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.dir.join("state").display()),
                )),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DeviceState::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state: &DeviceState) -> io::Result<()> {
        let bytes = postcard::to_stdvec(&State::V3(state.clone()))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        write_atomically(&self.dir.join("state"), &bytes)
    }

    /// A root document this device took (see `trust::Chain`), kept as
    /// `roots/{version}` beside the others it took: at the next start, the provisioned
    /// root is followed through them one version at a time, so a file planted in the
    /// data dir that does not chain to the provisioned root is never trusted.
    pub fn save_root(&self, bytes: &[u8]) -> io::Result<()> {
        let version = SignedRoot::peek(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            .version;
        let dir = self.dir.join("roots");
        std::fs::create_dir_all(&dir)?;
        write_atomically(&dir.join(version.to_string()), bytes)
    }

    /// The root documents kept by [`Store::save_root`], at most [`MAX_KEPT_ROOTS`] of
    /// them (the newest), each bounded; unreadable ones are skipped and named.
    pub fn load_roots(&self) -> io::Result<(Vec<Vec<u8>>, Vec<String>)> {
        let dir = self.dir.join("roots");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(e) => return Err(e),
        };
        let mut versions: Vec<(u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u64>().ok()?;
                Some((v, e.path()))
            })
            .collect();
        versions.sort();
        let skip = versions.len().saturating_sub(MAX_KEPT_ROOTS);
        let (mut roots, mut errors) = (Vec::new(), Vec::new());
        for (_, path) in versions.into_iter().skip(skip) {
            match read_bounded(&path, MAX_ROOT as u64) {
                Ok(bytes) => roots.push(bytes),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        Ok((roots, errors))
    }

    /// The newest kept root document, if any.
    pub fn load_root(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.load_roots()?.0.pop())
    }

    /// A root file of a kilnd that kept only the newest root (`{data_dir}/root`): it
    /// cannot be chained, so it is not trusted; its version is said once.
    pub fn legacy_root(&self) -> Option<u64> {
        let bytes = read_bounded(&self.dir.join("root"), MAX_ROOT as u64).ok()?;
        SignedRoot::peek(&bytes).ok().map(|r| r.version)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A device upgraded from kiln 0.2 keeps what it committed and its floors.
    #[test]
    fn a_state_file_of_kiln_0_2_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, upgraded) = v1::fixture();
        std::fs::write(dir.path().join("state"), bytes).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = store.load().unwrap();
        assert_eq!(state, upgraded);
        assert_eq!(
            state.modules["app"].committed.as_ref().unwrap().signer,
            None
        );
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
    }

    /// A state file from before per-key floors keeps its floors, of unknown signer.
    #[test]
    fn a_state_file_without_per_key_floors_is_upgraded_with_its_floors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state"), v2::fixture()).unwrap();
        let state = Store::open(dir.path()).unwrap().load().unwrap();
        let source = "kiln/v1/devices/d/desired";
        assert_eq!(state.serials[source], 9);
        assert_eq!(
            state.floors[source],
            vec![Floor {
                key: LEGACY_SIGNER,
                serial: 9,
                digest: [4; 32]
            }]
        );
    }

    #[test]
    fn state_round_trips_and_a_fresh_device_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), DeviceState::default());
        let mut state = DeviceState::default();
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
