use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use clap::Parser;
use kiln_protocol::fleet::{SignedDesired, TargetArtifact, Topics, Upload};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs, Session};
use crate::text::human_size;

const AFTER_HELP: &str = "\
An artifact is kept while a device or group desired state references it, or while its
upload marker (published by push and rollout before the first chunk) is younger than
the grace period: a push publishes its desired state only after the last chunk.
Stale markers are removed with the chunks of unreferenced artifacts. With --mirror-dir,
the same artifacts' files go from an artifact mirror's directory (kiln push
--mirror-dir), but for those written less than the grace period ago.

Examples:
  kiln gc --dry-run
  kiln gc --broker mqtt://broker.lan:1883
  kiln gc --grace-s 0        # also uploads that started just now
  kiln gc --mirror-dir /srv/kiln   # and the mirror's files of the same artifacts";

/// Remove retained artifact chunks that no desired state references and no upload in
/// progress needs
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct GcCommand {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only say what would be removed
    #[arg(long)]
    pub dry_run: bool,
    /// Keep unreferenced artifacts whose upload started less than this long ago
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub grace_s: u64,
    /// The result as one JSON object on stdout (see the JSON shapes in the book)
    #[arg(long)]
    pub json: bool,
    /// Also remove, from this artifact mirror's directory (as `kiln push --mirror-dir`
    /// writes it), the files of every transfer no desired state references
    #[arg(long, value_name = "DIR")]
    pub mirror_dir: Option<std::path::PathBuf>,
}

/// The transfers in a mirror directory that go: unreferenced, not uploading, and not
/// written within the grace period (a push writes its mirror files before its upload
/// marker). Only `artifacts/{64 hex digits}` entries are ever considered.
pub fn mirror_plan(
    dir: &std::path::Path,
    referenced: &BTreeSet<[u8; 32]>,
    uploading: &BTreeSet<[u8; 32]>,
    grace: std::time::Duration,
) -> std::io::Result<Vec<([u8; 32], u64)>> {
    let artifacts = dir.join("artifacts");
    let entries = match std::fs::read_dir(&artifacts) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let mut sha = [0u8; 32];
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 64 || hex::decode_to_slice(name, &mut sha).is_err() {
            continue;
        }
        if referenced.contains(&sha) || uploading.contains(&sha) || !entry.file_type()?.is_dir() {
            continue;
        }
        let (mut bytes, mut young) = (0u64, false);
        for file in std::fs::read_dir(entry.path())? {
            let meta = file?.metadata()?;
            bytes += meta.len();
            let age = meta.modified()?.elapsed().unwrap_or_default();
            young |= age < grace;
        }
        if !young {
            out.push((sha, bytes));
        }
    }
    Ok(out)
}

/// The upload marker of an artifact, as gc sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// The upload started at this time (the uploader's clock, Unix milliseconds).
    Started(u64),
    /// A marker gc cannot decode (written by a newer kiln?): its age is unknown, so
    /// it counts as young and is never removed.
    Unreadable,
}

/// What gc removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Artifacts whose chunks go.
    pub remove: BTreeSet<[u8; 32]>,
    /// Stale markers that go (of removed artifacts, and of referenced ones).
    pub clear_markers: BTreeSet<[u8; 32]>,
    /// Artifacts kept because a desired state references them.
    pub referenced: BTreeSet<[u8; 32]>,
    /// Unreferenced artifacts kept because their upload is younger than the grace.
    pub uploading: BTreeSet<[u8; 32]>,
}

/// Decides, per artifact that has chunks or a marker: referenced, kept; unreferenced
/// with a young marker, kept; otherwise its chunks go. A marker goes once it is stale,
/// whether its artifact stays or not.
pub fn plan(
    chunks: &BTreeSet<[u8; 32]>,
    markers: &BTreeMap<[u8; 32], Marker>,
    referenced: &BTreeSet<[u8; 32]>,
    now_ms: u64,
    grace_ms: u64,
) -> GcPlan {
    let young = |sha: &[u8; 32]| match markers.get(sha) {
        Some(Marker::Started(at)) => now_ms.saturating_sub(*at) < grace_ms,
        Some(Marker::Unreadable) => true,
        None => false,
    };
    let mut out = GcPlan::default();
    for sha in chunks.iter().chain(markers.keys()) {
        if markers.contains_key(sha) && !young(sha) {
            out.clear_markers.insert(*sha);
        }
        if !chunks.contains(sha) {
            continue;
        }
        if referenced.contains(sha) {
            out.referenced.insert(*sha);
        } else if young(sha) {
            out.uploading.insert(*sha);
        } else {
            out.remove.insert(*sha);
        }
    }
    out
}

fn markers(session: &mut Session, topics: &Topics) -> Result<BTreeMap<[u8; 32], Marker>> {
    let retained = session
        .retained(&topics.all_uploads())
        .map_err(|e| coded(Code::Unavailable, e))?;
    Ok(retained
        .into_iter()
        .filter_map(|(topic, payload)| {
            let sha = topics.parse_upload(&topic)?;
            let marker = match postcard::from_bytes(&payload) {
                Ok(Upload::V1 { started_ms, .. }) => Marker::Started(started_ms),
                Err(_) => Marker::Unreadable,
            };
            Some((sha, marker))
        })
        .collect())
}

impl GcCommand {
    pub fn execute(self) -> Result<()> {
        let topics = self.broker.topics();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.broker.connect().map_err(unavailable)?;
        // Chunks first, then markers, then desired states: push publishes in the
        // opposite order (marker, chunks, desired state), so every chunk seen here
        // has its marker or its reference visible by the time gc looks for them.
        let chunks = session
            .retained(&topics.all_artifacts())
            .map_err(unavailable)?;
        let mut by_artifact: BTreeMap<[u8; 32], (Vec<String>, u64)> = BTreeMap::new();
        for (topic, payload) in &chunks {
            let Some(sha) = topics.parse_artifact(topic) else {
                continue;
            };
            let entry = by_artifact.entry(sha).or_default();
            entry.0.push(topic.clone());
            entry.1 += payload.len() as u64;
        }
        let mut markers = markers(&mut session, &topics)?;
        let desired = session.desired_states(&topics).map_err(unavailable)?;
        let mut referenced = BTreeSet::new();
        for (topic, payload) in &desired {
            match SignedDesired::peek(payload) {
                // Every transfer of every target: the whole artifact and its patches.
                Ok(d) => referenced.extend(
                    d.modules
                        .iter()
                        .flat_map(|m| &m.artifacts)
                        .flat_map(TargetArtifact::transfers)
                        .map(|t| t.sha256),
                ),
                Err(e) => {
                    // An unreadable desired state might reference anything: keep all.
                    eprintln!("gc: {topic}: {e}; removing nothing");
                    session.disconnect();
                    return Err(coded(Code::InvalidInput, anyhow::anyhow!("{topic}: {e}")));
                }
            }
        }
        let grace_ms = self.grace_s.saturating_mul(1000);
        let now = now_ms();
        let have: BTreeSet<[u8; 32]> = by_artifact.keys().copied().collect();
        let mut plan = plan(&have, &markers, &referenced, now, grace_ms);
        if !self.dry_run && (!plan.remove.is_empty() || !plan.clear_markers.is_empty()) {
            // An upload of the same artifact may have started since the markers were
            // read: look once more, right before removing anything, and leave alone
            // every artifact whose marker changed.
            let fresh = self::markers(&mut session, &topics)?;
            let changed: Vec<[u8; 32]> = plan
                .remove
                .union(&plan.clear_markers)
                .filter(|sha| fresh.get(*sha) != markers.get(*sha))
                .copied()
                .collect();
            for sha in changed {
                plan.clear_markers.remove(&sha);
                if plan.remove.remove(&sha) {
                    plan.uploading.insert(sha);
                }
            }
            markers = fresh;
        }
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removing"
        };
        let (mut n, mut bytes) = (0usize, 0u64);
        let mut clears = Vec::new();
        let mut removed = Vec::new();
        for sha in &plan.remove {
            let Some((chunk_topics, size)) = by_artifact.remove(sha) else {
                continue;
            };
            if !self.json {
                println!(
                    "gc: {verb} {}: {} chunks, {}",
                    hex::encode(sha),
                    chunk_topics.len(),
                    human_size(size)
                );
            }
            removed.push(serde_json::json!({
                "sha256": hex::encode(sha),
                "chunks": chunk_topics.len(),
                "bytes": size,
            }));
            n += chunk_topics.len();
            bytes += size;
            clears.extend(chunk_topics);
        }
        for sha in &plan.uploading {
            let age = match markers.get(sha) {
                Some(Marker::Started(at)) => format!("{}s ago", now.saturating_sub(*at) / 1000),
                _ => "at an unknown time (its marker is unreadable)".into(),
            };
            if self.json {
                continue;
            }
            println!(
                "gc: keeping {}: unreferenced, but its upload started {age} (grace {}s)",
                hex::encode(sha),
                self.grace_s
            );
        }
        let mirror = match &self.mirror_dir {
            Some(dir) => {
                let grace = std::time::Duration::from_secs(self.grace_s);
                // Every reference and every young marker, whether or not the broker
                // still holds the transfer's chunks.
                let uploading: BTreeSet<[u8; 32]> = markers
                    .iter()
                    .filter(|(_, m)| match m {
                        Marker::Started(at) => now.saturating_sub(*at) < grace_ms,
                        Marker::Unreadable => true,
                    })
                    .map(|(sha, _)| *sha)
                    .chain(plan.uploading.iter().copied())
                    .collect();
                let gone = mirror_plan(dir, &referenced, &uploading, grace).map_err(|e| {
                    coded(
                        Code::InvalidInput,
                        anyhow::anyhow!("mirror dir `{}`: {e}", dir.display()),
                    )
                })?;
                for (sha, size) in &gone {
                    if !self.json {
                        println!(
                            "gc: {verb} {} from the mirror dir, {}",
                            hex::encode(sha),
                            human_size(*size)
                        );
                    }
                    if !self.dry_run {
                        let path = dir.join("artifacts").join(hex::encode(sha));
                        std::fs::remove_dir_all(&path).map_err(|e| {
                            coded(
                                Code::InvalidInput,
                                anyhow::anyhow!("cannot remove `{}`: {e}", path.display()),
                            )
                        })?;
                    }
                }
                gone
            }
            None => Vec::new(),
        };
        // Chunks before markers: a gc that stops halfway leaves stale markers, which
        // the next run removes, never chunks that lost their marker early.
        clears.extend(plan.clear_markers.iter().map(|sha| topics.upload(sha)));
        if !self.dry_run {
            // An empty retained message clears the topic.
            let clears = clears.into_iter().map(|t| (t, Vec::new())).collect();
            session.publish_all(clears, |_| {}).map_err(unavailable)?;
        }
        session.disconnect();
        if self.json {
            let hexes = |set: &BTreeSet<[u8; 32]>| set.iter().map(hex::encode).collect::<Vec<_>>();
            println!(
                "{}",
                serde_json::json!({
                    "dry_run": self.dry_run,
                    "removed": removed,
                    "chunks": n,
                    "bytes": bytes,
                    "stale_markers": hexes(&plan.clear_markers),
                    "referenced": hexes(&plan.referenced),
                    "uploading": hexes(&plan.uploading),
                    "mirror_removed": mirror.iter().map(|(sha, bytes)| serde_json::json!({
                        "sha256": hex::encode(sha),
                        "bytes": bytes,
                    })).collect::<Vec<_>>(),
                    "grace_s": self.grace_s,
                })
            );
            return Ok(());
        }
        println!(
            "gc: {} {n} chunks ({}) and {} stale upload markers; kept {} referenced artifacts and {} uploads younger than {}s",
            if self.dry_run {
                "would remove"
            } else {
                "removed"
            },
            human_size(bytes),
            plan.clear_markers.len(),
            plan.referenced.len(),
            plan.uploading.len(),
            self.grace_s
        );
        if self.mirror_dir.is_some() {
            println!(
                "gc: {} {} transfers from the mirror dir ({})",
                if self.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                mirror.len(),
                human_size(mirror.iter().map(|(_, b)| b).sum())
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn referenced_or_young_uploads_stay_and_stale_markers_go() {
        let [used, uploading, stale, bare, unreadable, used_stale, marker_only] =
            [1u8, 2, 3, 4, 5, 6, 7].map(|b| [b; 32]);
        let now = 10 * HOUR;
        let chunks = BTreeSet::from([used, uploading, stale, bare, unreadable, used_stale]);
        let markers = BTreeMap::from([
            (uploading, Marker::Started(now - HOUR + 1)),
            (stale, Marker::Started(now - HOUR)),
            (unreadable, Marker::Unreadable),
            (used_stale, Marker::Started(0)),
            (marker_only, Marker::Started(now - 2 * HOUR)),
        ]);
        let referenced = BTreeSet::from([used, used_stale]);
        let p = plan(&chunks, &markers, &referenced, now, HOUR);
        assert_eq!(p.referenced, BTreeSet::from([used, used_stale]));
        assert_eq!(p.uploading, BTreeSet::from([uploading, unreadable]));
        assert_eq!(p.remove, BTreeSet::from([stale, bare]));
        assert_eq!(
            p.clear_markers,
            BTreeSet::from([stale, used_stale, marker_only])
        );

        // Grace 0: every upload is stale.
        let p = plan(&chunks, &markers, &referenced, now, 0);
        assert_eq!(p.remove, BTreeSet::from([uploading, stale, bare]));
        assert_eq!(p.uploading, BTreeSet::from([unreadable]));
        // A marker from a clock ahead of gc's counts as young.
        let ahead = BTreeMap::from([(uploading, Marker::Started(now + HOUR))]);
        let p = plan(&chunks, &ahead, &referenced, now, HOUR);
        assert!(p.uploading.contains(&uploading));
    }
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    #[test]
    fn only_unreferenced_settled_transfers_leave_the_mirror_dir() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let d = dir.path().join("artifacts").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("list"), b"list").unwrap();
            std::fs::write(d.join("0"), b"chunk").unwrap();
        };
        let (used, busy, old) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        for sha in [used, busy, old] {
            write(&hex::encode(sha));
        }
        write("not-a-transfer");
        let referenced = BTreeSet::from([used]);
        let uploading = BTreeSet::from([busy]);
        let settled = std::time::Duration::ZERO;
        let gone = mirror_plan(dir.path(), &referenced, &uploading, settled).unwrap();
        assert_eq!(gone, vec![(old, 9)]);
        // Written within the grace period: a push between its mirror files and its
        // upload marker.
        let grace = std::time::Duration::from_secs(3600);
        assert!(mirror_plan(dir.path(), &referenced, &uploading, grace)
            .unwrap()
            .is_empty());
        let none = tempfile::tempdir().unwrap();
        assert!(mirror_plan(none.path(), &referenced, &uploading, settled)
            .unwrap()
            .is_empty());
    }
}
