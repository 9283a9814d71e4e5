//! The telemetry spool: every sealed batch is written here, durably, before it is
//! published, and removed only when the broker has acknowledged it. One file per
//! batch, named by a spool index that only grows (`{index:016x}.batch`), written with
//! [`write_atomically`] so a power cut leaves whole batches or none. The spool is
//! bounded in bytes: making room drops the oldest batches that are not in flight, and
//! the caller reports what was dropped.
//!
//! A spool that cannot be used (its directory cannot be created or read, say after a
//! read-only remount) is *degraded*: it holds nothing, every append fails so the
//! caller publishes without it, and [`Spool::retry`] tries to open it again.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;

use kiln_protocol::atomic::write_atomically;
use kiln_protocol::telemetry::{Batch, Body, Dropped};

/// What the spool knows of a batch without reading it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub boot_id: u64,
    pub seq: u64,
    /// Records in the batch, not counting drop reports.
    pub records: u64,
    pub bytes: u64,
    /// Drop reports the batch carries: if it is dropped in turn, they must travel on.
    pub drops: Vec<Dropped>,
}

impl Entry {
    pub fn of(batch: &kiln_protocol::telemetry::BatchV1, bytes: u64) -> Self {
        let drops: Vec<Dropped> = batch
            .records
            .iter()
            .filter_map(|r| match r.body {
                Body::Dropped(d) => Some(d),
                _ => None,
            })
            .collect();
        Self {
            boot_id: batch.boot_id,
            seq: batch.seq,
            records: (batch.records.len() - drops.len()) as u64,
            bytes,
            drops,
        }
    }
}

pub struct Spool {
    dir: PathBuf,
    limit: u64,
    /// Why the spool is not usable, while it is not.
    degraded: Option<String>,
    entries: BTreeMap<u64, Entry>,
    /// Batches a working spool could not write (a full disk), held in memory under
    /// the same bound: they are published, resent after a reconnect and dropped with
    /// a report like any other, and written back to disk, oldest first, as soon as a
    /// write succeeds again. Only a kilnd that dies while the disk is still full
    /// loses them.
    held: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
    next: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and indexes what a previous kilnd left.
    /// Leftover temp files of an interrupted write, and files that are not whole
    /// batches, are removed; their names are returned so the caller can say so.
    pub fn open(dir: PathBuf, limit: u64) -> io::Result<(Self, Vec<String>)> {
        std::fs::create_dir_all(&dir)?;
        let mut spool = Self {
            dir,
            limit,
            degraded: None,
            entries: BTreeMap::new(),
            held: BTreeMap::new(),
            bytes: 0,
            next: 0,
        };
        let mut removed = Vec::new();
        for item in std::fs::read_dir(&spool.dir)? {
            let path = item?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let index = name
                .strip_suffix(".batch")
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            let entry = index.and_then(|_| {
                let bytes = std::fs::read(&path).ok()?;
                let batch = Batch::decode(&bytes).ok()?;
                Some(Entry::of(&batch, bytes.len() as u64))
            });
            match (index, entry) {
                (Some(index), Some(entry)) => {
                    spool.bytes += entry.bytes;
                    spool.next = spool.next.max(index + 1);
                    spool.entries.insert(index, entry);
                }
                _ => match std::fs::remove_file(&path) {
                    Ok(()) => removed.push(name),
                    // Not indexed either way; what cannot go is left for a later start.
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "cannot remove a spool file that is not a whole batch")
                    }
                },
            }
        }
        Ok((spool, removed))
    }

    /// Opens the spool, or a degraded one that says why, and logs either way.
    pub fn open_or_degraded(dir: PathBuf, limit: u64) -> Self {
        match Self::open(dir.clone(), limit) {
            Ok((spool, removed)) => {
                if !removed.is_empty() {
                    tracing::warn!(files = ?removed, "removed spool files that were not whole batches");
                }
                spool
            }
            Err(e) => {
                let why = format!("cannot use the telemetry spool `{}`: {e}", dir.display());
                tracing::error!("{why}; telemetry goes out unspooled until it can");
                Self {
                    dir,
                    limit,
                    degraded: Some(why),
                    entries: BTreeMap::new(),
                    held: BTreeMap::new(),
                    bytes: 0,
                    next: 0,
                }
            }
        }
    }

    /// A degraded spool tries to open again; a working one stays as it is.
    pub fn retry(&mut self) {
        if self.degraded.is_none() {
            return;
        }
        if let Ok((spool, _)) = Self::open(self.dir.clone(), self.limit) {
            tracing::info!(dir = %self.dir.display(), "telemetry spool usable again");
            // Indexes go on growing past what the degraded spool never used.
            *self = spool;
        }
    }

    pub fn degraded(&self) -> Option<&str> {
        self.degraded.as_deref()
    }

    /// Indexes of the oldest batches not in `in_flight` that must go so that `size`
    /// more bytes fit under the bound.
    pub fn room_for(&self, size: u64, in_flight: &BTreeSet<u64>) -> Vec<u64> {
        let mut total = self.bytes + size;
        let mut victims = Vec::new();
        for (index, entry) in &self.entries {
            if total <= self.limit {
                break;
            }
            if !in_flight.contains(index) {
                total -= entry.bytes;
                victims.push(*index);
            }
        }
        victims
    }

    /// Writes a batch durably; returns its spool index. Batches held in memory are
    /// written first, so a batch is never on disk while an older one is only in
    /// memory; if one of them cannot be written, neither is this one.
    pub fn append(&mut self, entry: Entry, bytes: &[u8]) -> io::Result<u64> {
        if let Some(why) = &self.degraded {
            return Err(io::Error::other(why.clone()));
        }
        self.write_back()?;
        let index = self.next;
        #[cfg(feature = "test-hooks")]
        cut_short(&self.dir, bytes);
        write_atomically(&self.path(index), bytes)?;
        self.next += 1;
        self.bytes += entry.bytes;
        self.entries.insert(index, entry);
        Ok(index)
    }

    /// Keeps a batch that `append` could not write in memory instead; returns its
    /// index. Only for a working spool: a degraded one holds nothing.
    pub fn hold(&mut self, entry: Entry, bytes: Vec<u8>) -> Option<u64> {
        if self.degraded.is_some() {
            return None;
        }
        let index = self.next;
        self.next += 1;
        self.bytes += entry.bytes;
        self.entries.insert(index, entry);
        self.held.insert(index, bytes);
        Some(index)
    }

    /// Writes the batches held in memory to disk, oldest first, under the indexes
    /// they already have; stops at the first that cannot be written.
    pub fn write_back(&mut self) -> io::Result<()> {
        while let Some((&index, bytes)) = self.held.first_key_value() {
            write_atomically(&self.path(index), bytes)?;
            self.held.remove(&index);
            tracing::info!(index, "telemetry batch held in memory is spooled now");
        }
        Ok(())
    }

    /// Batches held in memory for want of disk space.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn read(&self, index: u64) -> io::Result<Vec<u8>> {
        match self.held.get(&index) {
            Some(bytes) => Ok(bytes.clone()),
            None => std::fs::read(self.path(index)),
        }
    }

    /// Removes a batch (acknowledged, or dropped); no directory fsync: should the
    /// removal be lost in a power cut, the batch is only sent again.
    pub fn remove(&mut self, index: u64) -> Option<Entry> {
        let entry = self.entries.remove(&index)?;
        self.bytes -= entry.bytes;
        if self.held.remove(&index).is_some() {
            return Some(entry);
        }
        if let Err(e) = std::fs::remove_file(self.path(index)) {
            tracing::warn!(index, error = %e, "cannot remove a spooled batch");
        }
        Some(entry)
    }

    pub fn get(&self, index: u64) -> Option<&Entry> {
        self.entries.get(&index)
    }

    /// Up to `n` batches, oldest first, that are not in flight.
    pub fn unsent(&self, in_flight: &BTreeSet<u64>, n: usize) -> Vec<u64> {
        self.entries
            .keys()
            .filter(|i| !in_flight.contains(i))
            .take(n)
            .copied()
            .collect()
    }

    /// Batches and bytes waiting.
    pub fn depth(&self) -> (u64, u64) {
        (self.entries.len() as u64, self.bytes)
    }

    fn path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:016x}.batch"))
    }
}

/// `KILN_FAULT=spool` (test builds only): the first spool write of this kilnd stops
/// halfway, as a power cut would leave it (half the batch in a temp file, synced),
/// and kilnd SIGKILLs itself. The next start must clear it and lose no whole batch.
#[cfg(feature = "test-hooks")]
fn cut_short(dir: &std::path::Path, bytes: &[u8]) {
    if std::env::var("KILN_FAULT").as_deref() != Ok("spool") {
        return;
    }
    let tmp = dir.join(format!(".tmpcut{}", std::process::id()));
    if let Ok(mut file) = std::fs::File::create(tmp) {
        let _ = std::io::Write::write_all(&mut file, &bytes[..bytes.len() / 2]);
        let _ = file.sync_all();
    }
    tracing::warn!(step = "spool", "KILN_FAULT: killing kilnd");
    // SAFETY: sends SIGKILL to this very process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::telemetry::{BatchV1, Record};

    fn batch(seq: u64, payload: usize) -> (Entry, Vec<u8>) {
        let b = BatchV1 {
            device: "d".into(),
            boot_id: 7,
            seq,
            records: vec![Record {
                at_ms: 0,
                module: None,
                body: Body::Telemetry {
                    stream: "s".into(),
                    data: vec![1; payload],
                },
            }],
        };
        let bytes = Batch::encode(&b);
        (Entry::of(&b, bytes.len() as u64), bytes)
    }

    #[test]
    fn batches_survive_a_restart_in_order_and_leave_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path().into(), 1 << 20).unwrap();
        for seq in 0..3 {
            let (entry, bytes) = batch(seq, 100);
            assert_eq!(spool.append(entry, &bytes).unwrap(), seq);
        }
        assert_eq!(spool.remove(0).unwrap().seq, 0);
        // A temp file of a write cut short, and junk.
        std::fs::write(dir.path().join(".tmpXYZ"), b"half").unwrap();
        std::fs::write(dir.path().join("0000000000000009.batch"), b"junk").unwrap();

        let (spool, removed) = Spool::open(dir.path().into(), 1 << 20).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(spool.unsent(&BTreeSet::new(), 10), vec![1, 2]);
        assert_eq!(spool.get(2).unwrap().seq, 2);
        assert_eq!(spool.depth().0, 2);
        assert_eq!(spool.next, 3, "indexes keep growing after a restart");
    }

    /// Found by the chaos soak: with the disk full, batches went out unspooled and
    /// untracked; if the broker was away too, rumqttc dropped them and nothing said
    /// so (`kiln watch`: batches missing that no drop report explains).
    #[test]
    fn a_batch_the_disk_cannot_take_is_held_until_acknowledged_or_dropped_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, _) = Spool::open(spool_dir.clone(), 250).unwrap();
        let (entry, bytes) = batch(0, 100);
        assert_eq!(spool.append(entry, &bytes).unwrap(), 0);
        // The disk goes: writes fail from now on.
        std::fs::remove_dir_all(&spool_dir).unwrap();
        let (entry, bytes) = batch(1, 100);
        assert!(spool.append(entry.clone(), &bytes).is_err());
        assert_eq!(spool.hold(entry, bytes.clone()), Some(1));
        assert_eq!(spool.read(1).unwrap(), bytes, "held in memory");
        assert_eq!(spool.unsent(&BTreeSet::new(), 10), vec![0, 1]);
        assert_eq!(spool.depth().0, 2);
        // Held batches count against the bound and are dropped oldest first.
        let (entry, bytes) = batch(2, 100);
        assert_eq!(spool.room_for(entry.bytes, &BTreeSet::from([0])), vec![1]);
        assert_eq!(spool.remove(1).unwrap().seq, 1);
        assert_eq!(spool.hold(entry, bytes), Some(2));
        assert_eq!(spool.remove(2).unwrap().seq, 2, "acknowledged");
        assert_eq!(spool.depth().0, 1);
        // A degraded spool holds nothing.
        let (entry, bytes) = batch(3, 10);
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let mut degraded = Spool::open_or_degraded(dir.path().join("file/spool"), 1000);
        assert!(degraded.degraded().is_some());
        assert_eq!(degraded.hold(entry, bytes), None);
    }

    /// Found by the chaos soak's long run: batches held through a full disk stayed
    /// in memory after the disk had room again, and a power cut later lost them.
    #[test]
    fn held_batches_are_written_back_first_once_the_disk_has_room_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, _) = Spool::open(spool_dir.clone(), 1 << 20).unwrap();
        std::fs::remove_dir_all(&spool_dir).unwrap();
        for seq in 0..2 {
            let (entry, bytes) = batch(seq, 100);
            assert!(spool.append(entry.clone(), &bytes).is_err());
            spool.hold(entry, bytes);
        }
        assert_eq!(spool.held(), 2);
        // While the disk is still full, a new batch is refused too, never written
        // ahead of the older ones held.
        let (entry, bytes) = batch(2, 100);
        assert!(spool.append(entry, &bytes).is_err());
        // The disk has room again: the held batches go first, then the new one.
        std::fs::create_dir_all(&spool_dir).unwrap();
        let (entry, bytes) = batch(3, 100);
        assert_eq!(spool.append(entry, &bytes).unwrap(), 2);
        assert_eq!(spool.held(), 0);
        // And with no new batch at all, the periodic write-back does it.
        let away = dir.path().join("away");
        std::fs::rename(&spool_dir, &away).unwrap();
        let (entry, bytes) = batch(4, 100);
        spool.hold(entry, bytes);
        assert!(spool.write_back().is_err());
        std::fs::rename(&away, &spool_dir).unwrap();
        spool.write_back().unwrap();
        // A kilnd killed now loses nothing: a new one finds all of them on disk.
        drop(spool);
        let (spool, removed) = Spool::open(spool_dir, 1 << 20).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        let seqs: Vec<u64> = spool
            .unsent(&BTreeSet::new(), 10)
            .into_iter()
            .map(|i| spool.get(i).unwrap().seq)
            .collect();
        assert_eq!(seqs, vec![0, 1, 3, 4]);
    }

    #[test]
    fn a_spool_that_cannot_be_opened_is_degraded_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the spool directory should be: create_dir_all fails.
        let blocked = dir.path().join("telemetry");
        std::fs::write(&blocked, b"not a directory").unwrap();
        let mut spool = Spool::open_or_degraded(blocked.clone(), 1 << 20);
        assert!(spool
            .degraded()
            .unwrap()
            .contains("cannot use the telemetry spool"));
        let (entry, bytes) = batch(0, 10);
        assert!(spool.append(entry.clone(), &bytes).is_err());
        assert_eq!(spool.depth(), (0, 0));
        spool.retry();
        assert!(spool.degraded().is_some());
        std::fs::remove_file(&blocked).unwrap();
        spool.retry();
        assert!(spool.degraded().is_none());
        assert_eq!(spool.append(entry, &bytes).unwrap(), 0);
    }

    #[test]
    fn making_room_takes_the_oldest_that_are_not_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (entry, bytes) = batch(0, 1000);
        let size = entry.bytes;
        let (mut spool, _) = Spool::open(dir.path().into(), size * 4).unwrap();
        for seq in 0..4 {
            let (entry, bytes) = batch(seq, 1000);
            spool.append(entry, &bytes).unwrap();
        }
        assert!(spool.room_for(0, &BTreeSet::new()).is_empty());
        let in_flight = BTreeSet::from([0]);
        assert_eq!(spool.room_for(size * 2, &in_flight), vec![1, 2]);
        assert_eq!(bytes.len() as u64, size);
    }
}
