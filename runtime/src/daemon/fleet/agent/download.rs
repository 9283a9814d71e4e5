//! Downloads: a chunk list, the chunks (from the store first, then a mirror or the
//! broker), a fetch that stalls, and staging the assembled artifact into a slot.
//!
//! A mirror is asked for one thing at a time (the list, then each missing chunk), and
//! what it answers is verified here exactly as the broker's is: the list against the
//! signed hash before it is decoded, each chunk's raw bytes against the list's hash
//! before they are written. Any failure (no answer, an HTTP error, a wrong hash, a
//! short body, a stall) is said once in a `fell-back` event, and the transfer is
//! fetched from the broker from where it stands: chunks already verified stay.

use std::collections::BTreeSet;

use kiln_protocol::fleet::{sha256, EventKind};
use kiln_protocol::mirror::MAX_MIRRORS;
use kiln_protocol::transfer::{ChunkList, MAX_LIST};

use super::{
    Agent, Download, Effect, MirrorPart, Mirrors, StageFrom, StageResult, Trial,
    MAX_HEALTH_WINDOW_MS,
};
use crate::daemon::fleet::store::{DownloadKey, Installed, Slot};

impl Agent {
    /// A download starts with its chunk list (then a scan of what is on disk), or,
    /// while `staging`, with the check of a slot staged before a restart.
    pub(super) fn begin_download(&mut self, key: DownloadKey, download: Download) {
        let fetch = !download.staging && download.list.is_none();
        let scan = download.list.clone().filter(|_| !download.staging);
        self.downloads.insert(key, download);
        if fetch {
            self.subscribe_missing(key);
        }
        if let Some(list) = scan {
            self.out.push(Effect::Scan { key, list });
        }
    }

    /// The chunk list of a download arrived: checked against its signed hash, then the
    /// chunks already on disk are scanned.
    pub(super) fn on_list(&mut self, topic: &str, payload: &[u8]) {
        let Some(sha) = self.topics.parse_artifact(topic) else {
            return;
        };
        let Some((key, d)) = self
            .downloads
            .iter_mut()
            .find(|(k, d)| k.sha256 == sha && !d.staging && d.list.is_none())
        else {
            return;
        };
        if payload.is_empty() {
            return; // a cleared retained message
        }
        let key = *key;
        match ChunkList::open(payload, &d.transfer) {
            Ok(list) => {
                d.list = Some(list.clone());
                d.last_progress_ms = self.now_ms;
                self.out.push(Effect::Unsubscribe(topic.to_string()));
                self.out.push(Effect::Scan { key, list });
            }
            Err(why) => {
                let (name, version) = (d.module.name.clone(), d.module.version);
                let reason = format!("chunk list of {}: {why}", hex::encode(&sha[..6]));
                self.event(&name, version, EventKind::Rejected { reason });
            }
        }
    }

    /// The inactive slot: never the committed one.
    pub(super) fn slot_for(&self, name: &str) -> Slot {
        self.state
            .modules
            .get(name)
            .and_then(|r| r.committed.as_ref())
            .map_or(Slot::A, |c| c.slot.other())
    }

    pub(super) fn on_scanned(&mut self, key: DownloadKey, have: BTreeSet<u32>) {
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(total) = d.list.as_ref().map(|l| l.chunks.len() as u32) else {
            return;
        };
        let have: BTreeSet<u32> = have.into_iter().filter(|n| *n < total).collect();
        let (name, version, count) = (d.module.name.clone(), d.module.version, have.len());
        d.have = Some(have);
        self.event(
            &name,
            version,
            EventKind::Downloading {
                have: count as u32,
                total,
            },
        );
        self.subscribe_missing(key);
        self.maybe_stage(key);
    }

    pub(super) fn subscribe_missing(&mut self, key: DownloadKey) {
        let Some(d) = self.downloads.get(&key) else {
            return;
        };
        if d.staging {
            return;
        }
        if d.mirror.is_some() {
            return self.mirror_next(key);
        }
        let (Some(have), Some(list)) = (&d.have, &d.list) else {
            if d.list.is_none() {
                self.out
                    .push(Effect::Subscribe(self.topics.list(&key.sha256)));
            }
            return;
        };
        let total = list.chunks.len() as u32;
        let topics: Vec<String> = (0..total)
            .filter(|n| !have.contains(n))
            .map(|n| self.topics.chunk(&key.sha256, n))
            .collect();
        self.out.extend(topics.into_iter().map(Effect::Subscribe));
    }

    pub(super) fn unsubscribe_missing(&mut self, key: DownloadKey) {
        let Some(d) = self.downloads.get(&key) else {
            return;
        };
        if d.mirror.is_some() {
            return; // nothing of it was asked of the broker
        }
        let Some(list) = &d.list else {
            self.out
                .push(Effect::Unsubscribe(self.topics.list(&key.sha256)));
            return;
        };
        let total = list.chunks.len() as u32;
        let have = d.have.clone().unwrap_or_default();
        let topics: Vec<String> = (0..total)
            .filter(|n| !have.contains(n))
            .map(|n| self.topics.chunk(&key.sha256, n))
            .collect();
        self.out.extend(topics.into_iter().map(Effect::Unsubscribe));
    }

    pub(super) fn on_chunk(&mut self, topic: &str, payload: &[u8]) {
        let Some((sha, n)) = self.topics.parse_chunk(topic) else {
            return;
        };
        let Some((key, d)) = self
            .downloads
            .iter()
            .find(|(k, d)| k.sha256 == sha && !d.staging && d.have.is_some())
        else {
            return;
        };
        let Some(list) = d.list.clone() else {
            return;
        };
        let (key, module) = (*key, d.module.clone());
        if payload.is_empty() || d.have.as_ref().is_some_and(|h| h.contains(&n)) {
            return;
        }
        let reject = |why: String| EventKind::Rejected {
            reason: format!("chunk {n} of {}: {why}", hex::encode(&sha[..6])),
        };
        let art = &list;
        let Some(expected) = art.chunks.get(n as usize) else {
            return self.event(
                &module.name,
                module.version,
                reject("beyond the last chunk".into()),
            );
        };
        let data = match kiln_protocol::transfer::Chunk::open(payload, art) {
            Ok((index, data)) if index == n => data,
            Ok((index, _)) => {
                let why = format!("carries chunk {index}, not this one");
                return self.event(&module.name, module.version, reject(why));
            }
            Err(why) => return self.event(&module.name, module.version, reject(why.into())),
        };
        if data.len() as u64 != art.chunk_len(n) {
            let why = format!("{} bytes, expected {}", data.len(), art.chunk_len(n));
            return self.event(&module.name, module.version, reject(why));
        }
        if kiln_protocol::fleet::sha256(&data) != *expected {
            return self.event(
                &module.name,
                module.version,
                reject("sha256 mismatch".into()),
            );
        }
        self.out.push(Effect::WriteChunk { key, n, data });
    }

    pub(super) fn on_chunk_stored(&mut self, key: DownloadKey, n: u32, result: Result<(), String>) {
        if let Err(e) = result {
            return self.degrade(format!("cannot store a chunk: {e}"));
        }
        let topic = self.topics.chunk(&key.sha256, n);
        let now = self.now_ms;
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(have) = d.have.as_mut() else {
            return;
        };
        if !have.insert(n) {
            return;
        }
        d.last_progress_ms = now;
        let total = d.list.as_ref().map_or(0, |l| l.chunks.len() as u32);
        let count = have.len() as u32;
        let (name, version) = (d.module.name.clone(), d.module.version);
        let mirrored = d.mirror.is_some();
        if !mirrored {
            self.out.push(Effect::Unsubscribe(topic));
        }
        self.out.push(Effect::Checkpoint("download"));
        if count < total && count.is_multiple_of(8) {
            self.event(
                &name,
                version,
                EventKind::Downloading { have: count, total },
            );
        }
        if mirrored {
            self.mirror_next(key);
        }
        self.maybe_stage(key);
    }

    /// The mirrors a transfer of a module from `source` is fetched from: the device's
    /// own, else those its desired state names; none once a mirror failed it.
    pub(super) fn mirror_for(
        &self,
        source: Option<&str>,
        transfer: &[u8; 32],
    ) -> Option<Vec<String>> {
        if self.mirror_failed.contains(transfer) {
            return None;
        }
        let urls: Vec<String> = match &self.mirrors {
            Mirrors::Off => return None,
            Mirrors::Own(url) => vec![url.clone()],
            Mirrors::FromState => source
                .and_then(|s| self.desired.get(s))
                .map(|d| d.mirrors.iter().take(MAX_MIRRORS).cloned().collect())?,
        };
        (!urls.is_empty()).then_some(urls)
    }

    /// Asks the mirror for what the download lacks next, unless it is waiting for an
    /// answer: its chunk list, then the first chunk not on disk.
    fn mirror_next(&mut self, key: DownloadKey) {
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let (Some(urls), None, false) = (&d.mirror, d.in_flight, d.staging) else {
            return;
        };
        let (part, max, exact) = match (&d.list, &d.have) {
            (None, _) => (MirrorPart::List, MAX_LIST as u64, None),
            (Some(list), Some(have)) => {
                let total = list.chunks.len() as u32;
                let Some(n) = (0..total).find(|n| !have.contains(n)) else {
                    return;
                };
                let len = list.chunk_len(n);
                (MirrorPart::Chunk(n), len, Some(len))
            }
            (Some(_), None) => return, // being scanned
        };
        let urls = urls.clone();
        d.in_flight = Some(part);
        self.out.push(Effect::MirrorGet {
            key,
            part,
            urls,
            max,
            exact,
        });
    }

    /// What the mirror answered, verified as the broker's would be.
    pub(super) fn on_mirror(
        &mut self,
        key: DownloadKey,
        part: MirrorPart,
        result: Result<Vec<u8>, String>,
    ) {
        let now = self.now_ms;
        let Some(d) = self.downloads.get_mut(&key) else {
            return; // cancelled meanwhile
        };
        if d.staging || d.mirror.is_none() || d.in_flight != Some(part) {
            return; // an answer to a question no longer asked
        }
        d.in_flight = None;
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(why) => return self.fall_back(key, why),
        };
        match part {
            MirrorPart::List => match ChunkList::open(&bytes, &d.transfer) {
                Ok(list) => {
                    d.list = Some(list.clone());
                    d.last_progress_ms = now;
                    self.out.push(Effect::Scan { key, list });
                }
                Err(why) => self.fall_back(key, format!("its chunk list: {why}")),
            },
            MirrorPart::Chunk(n) => {
                let Some(list) = &d.list else {
                    return;
                };
                let fits = match list.chunks.get(n as usize) {
                    None => Err("beyond the last chunk".to_string()),
                    Some(_) if bytes.len() as u64 != list.chunk_len(n) => Err(format!(
                        "{} bytes, expected {}",
                        bytes.len(),
                        list.chunk_len(n)
                    )),
                    Some(expected) if sha256(&bytes) != *expected => {
                        Err("sha256 mismatch".to_string())
                    }
                    Some(_) => Ok(()),
                };
                match fits {
                    Ok(()) => {
                        d.last_progress_ms = now;
                        self.out.push(Effect::WriteChunk {
                            key,
                            n,
                            data: bytes,
                        });
                    }
                    Err(why) => self.fall_back(key, format!("chunk {n}: {why}")),
                }
            }
        }
    }

    /// The mirror failed this download: said once, and the broker takes over from
    /// where it stands (the chunks already verified stay).
    pub(super) fn fall_back(&mut self, key: DownloadKey, why: String) {
        let now = self.now_ms;
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        d.mirror = None;
        d.in_flight = None;
        d.last_progress_ms = now;
        self.mirror_failed.insert(key.sha256);
        let (name, version) = (d.module.name.clone(), d.module.version);
        let reason = format!(
            "the mirror failed for {}: {why}",
            hex::encode(&key.sha256[..6])
        );
        tracing::warn!(module = %name, %reason, "fetching from the broker");
        self.event(&name, version, EventKind::FellBack { reason });
        self.subscribe_missing(key);
    }

    /// Every chunk is on disk: assemble, verify and stage into the inactive slot.
    pub(super) fn maybe_stage(&mut self, key: DownloadKey) {
        let name = match self.downloads.get(&key) {
            Some(d) if !d.staging => d.module.name.clone(),
            _ => return,
        };
        let slot = self.slot_for(&name);
        let Some(d) = self.downloads.get_mut(&key) else {
            return;
        };
        let Some(list) = d.list.clone() else {
            return;
        };
        if d.have.as_ref().is_none_or(|h| h.len() != list.chunks.len()) {
            return;
        }
        d.staging = true;
        // The patch's base is the committed artifact, in the slot being replaced last.
        let from = StageFrom::Download {
            list,
            codec: d.transfer.codec,
            base: d.base.map(|b| (slot.other(), b)),
        };
        let (module, target) = (d.module.clone(), d.target.clone());
        self.out.push(Effect::Stage {
            module: Box::new(module),
            target: Box::new(target),
            key,
            slot,
            from: Box::new(from),
        });
    }

    pub(super) fn on_staged(&mut self, name: &str, key: DownloadKey, result: StageResult) {
        let Some(download) = self.downloads.remove(&key) else {
            return; // cancelled meanwhile
        };
        let (d, target) = (download.module.clone(), download.target.clone());
        let sha = target.sha256;
        if !matches!(result, StageResult::Missing(_)) {
            self.out.push(Effect::DropDownload(key));
        }
        match result {
            StageResult::Refused(reason) => {
                let r = self.record_mut(name);
                r.rejected.push(sha);
                if r.staged.as_ref().is_some_and(|s| s.sha256 == sha) {
                    r.staged = None;
                }
                self.save();
                self.event(name, d.version, EventKind::Rejected { reason });
            }
            StageResult::PatchFailed(reason) => {
                self.no_patch.insert(sha);
                self.event(name, d.version, EventKind::FellBack { reason });
                self.reconcile_module(&d);
            }
            StageResult::Io(e) => self.degrade(format!("cannot stage {name} v{}: {e}", d.version)),
            StageResult::Missing(why) => {
                tracing::warn!(module = name, reason = %why, "fetching the artifact again");
                let download = Download {
                    have: None,
                    last_progress_ms: self.now_ms,
                    staging: false,
                    in_flight: None,
                    ..download
                };
                self.begin_download(key, download);
            }
            StageResult::Staged(slot, signer) => {
                if self.wanted_sha(name) != Some(sha) {
                    return; // no longer wanted; the slot is simply not used
                }
                self.event(name, d.version, EventKind::Verified);
                self.record_mut(name).staged =
                    Some(Installed::from_desired(slot, &d, &target, signer));
                self.save();
                self.event(name, d.version, EventKind::Staged);
                self.out.push(Effect::Checkpoint("stage"));
                self.trials.insert(
                    name.to_string(),
                    Trial {
                        sha256: sha,
                        version: d.version,
                        deadline_ms: self.now_ms.saturating_add(self.settings.start_timeout_ms),
                        started: false,
                        health_ms: d
                            .health_window_ms
                            .clamp(self.settings.min_health_ms, MAX_HEALTH_WINDOW_MS),
                    },
                );
                self.run_plans();
                self.event(name, d.version, EventKind::Activated);
                self.out.push(Effect::Checkpoint("activate"));
            }
        }
    }

    pub(super) fn cancel_download(&mut self, key: DownloadKey) {
        self.unsubscribe_missing(key);
        if let Some(d) = self.downloads.remove(&key) {
            self.event(
                &d.module.name,
                d.module.version,
                EventKind::Rejected {
                    reason: "download cancelled: no longer desired".into(),
                },
            );
        }
        self.out.push(Effect::DropDownload(key));
    }
}
