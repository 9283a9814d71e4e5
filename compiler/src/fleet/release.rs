//! A release: one version of a module as an artifact per target, and everything that
//! goes to the broker for it. Built from what the operator gives `kiln push`,
//! `kiln rollout` or `kiln release` (artifacts, a release file, or a .wasm compiled
//! here), each artifact verified with the signing key. Every artifact travels
//! compressed, and as patches from the versions the targeted devices report running.
//! The flags that make one are [`ReleaseArgs`] (`release/args.rs`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use kiln_protocol::artifact::Envelope;
use kiln_protocol::compat::same_target;
use kiln_protocol::fleet::{
    DesiredModule, Patch, Scope, SignedDesired, TargetArtifact, Topics, Upload, MAX_PATCHES,
};
use kiln_protocol::keys::TrustedKeys;
use kiln_protocol::manifest::Manifest;
use kiln_protocol::transfer::{self, sha256, Chunk, ChunkList, Codec, Prepared};

use crate::build::release_file::read_input;
use crate::fleet::broker::{now_ms, Session};
use crate::fleet::messages::{warn_skipped, Reader};
use crate::fleet::preflight;
use crate::fleet::trust::Signing;
use crate::fleet::Error;
use crate::text::human_size;

mod args;

pub use args::ReleaseArgs;

impl Release {
    /// Refuses what the devices of `scope` would refuse (see [`preflight`]); `force`
    /// waives what an operator may know better about, said on stderr.
    pub fn check(&self, scope: &Scope, seen: &[preflight::Seen], force: bool) -> Result<()> {
        let manifests: Vec<&kiln_protocol::manifest::Manifest> =
            self.built.iter().map(|b| &b.manifest).collect();
        let refusals = preflight::check(scope, &self.module, &manifests, seen);
        if let Some(refused) = preflight::verdict(&refusals, force) {
            bail!(refused);
        }
        for r in refusals.iter().filter(|r| r.forcible()) {
            eprintln!("warning: {r} (--force: publishing anyway)");
        }
        Ok(())
    }
}

/// One verified artifact of a release.
pub struct Built {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

impl Built {
    fn target(&self) -> String {
        let t = &self.manifest.target;
        match t.cpu_features.is_empty() {
            true => t.triple.clone(),
            false => format!("{}+{}", t.triple, t.cpu_features.join("+")),
        }
    }
}

/// Verifies every artifact with `trust` and checks they are one release: one name, one
/// version, one artifact per target. `origin` names each for errors.
pub fn verify_all(artifacts: Vec<(String, Vec<u8>)>, trust: &TrustedKeys) -> Result<Vec<Built>> {
    let mut built: Vec<Built> = Vec::new();
    for (origin, bytes) in artifacts {
        // The fleet must never be asked to run what its release keys did not sign.
        let manifest = Envelope::parse(&bytes)
            .and_then(|e| e.verify(trust))
            .map(|v| v.manifest)
            .map_err(|e| Error::Invalid(format!("artifact {origin}: {e}")))?;
        let b = Built {
            manifest,
            sha256: sha256(&bytes),
            bytes,
        };
        if let Some(first) = built.first() {
            let (m, f) = (&b.manifest, &first.manifest);
            if (m.name.as_str(), m.version) != (f.name.as_str(), f.version) {
                bail!(Error::invalid(anyhow!(
                    "artifact {origin} is {} v{}, the release is {} v{}",
                    m.name,
                    m.version,
                    f.name,
                    f.version
                )));
            }
        }
        if built.iter().any(|o| o.target() == b.target()) {
            bail!(Error::invalid(anyhow!(
                "artifact {origin}: the release already has one for {}",
                b.target()
            )));
        }
        built.push(b);
    }
    if built.is_empty() {
        bail!(Error::Usage(
            "a release needs at least one artifact".to_string()
        ));
    }
    Ok(built)
}

/// How the artifacts travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// zstd-compressed, and as patches from the versions devices run
    Zstd,
    /// the artifact's own bytes, whole
    Raw,
}

/// A release ready to go out: the verified artifacts, the desired-state entry naming
/// them, and the transfers to upload.
pub struct Release {
    pub signing: Signing,
    pub built: Vec<Built>,
    pub module: DesiredModule,
    pub transfers: Vec<Prepared>,
    pub topics: Topics,
    /// The mirrors its desired state names (`kiln push --mirror-url`); `None` keeps
    /// those the retained state names.
    pub mirrors: Option<Vec<String>>,
}

/// How the desired-state entry is made, apart from the artifacts.
pub struct Entry {
    pub config: Vec<u8>,
    pub limits: kiln_protocol::fleet::ModuleLimits,
    pub allow_downgrade: bool,
    pub health_window_ms: u64,
    pub chunk_size: u32,
    pub wire: Wire,
    pub delta: bool,
}

impl Release {
    /// Prepares the transfers of every artifact: the whole artifact, and a patch from
    /// each version that devices of `scope` report running (when `delta` is on and the
    /// base can be found here or on the broker).
    pub fn prepare(
        session: &mut Session,
        topics: &Topics,
        signing: Signing,
        built: Vec<Built>,
        entry: Entry,
        scope: &Scope,
    ) -> Result<Self> {
        let name = built[0].manifest.name.clone();
        let version = built[0].manifest.version;
        let codec = match entry.wire {
            Wire::Zstd => Codec::Zstd,
            Wire::Raw => Codec::Raw,
        };
        let bases = if entry.delta && entry.wire == Wire::Zstd {
            let shas = running_versions(session, topics, scope, &name)?;
            let trust = signing.any_release_keys();
            // The broker's desired states, read once if a base is not in the cache.
            let mut states = None;
            let mut bases = Vec::new();
            for sha in shas {
                if built.iter().any(|b| b.sha256 == sha) {
                    continue;
                }
                match find_artifact(session, topics, &mut states, &sha)? {
                    Some(bytes) => match Envelope::parse(&bytes).and_then(|e| e.verify(&trust)) {
                        Ok(v) => {
                            let triple = v.manifest.target.triple.clone();
                            bases.push((sha, triple, bytes));
                        }
                        Err(e) => eprintln!(
                            "{name}: no patch from {}: that artifact does not verify with the fleet's release keys ({e})",
                            hex::encode(&sha[..6])
                        ),
                    },
                    None => eprintln!(
                        "{name}: no patch from {}: that artifact is neither in {} nor on the broker; devices running it fetch the whole artifact",
                        hex::encode(&sha[..6]),
                        cache_dir().display()
                    ),
                }
            }
            bases
        } else {
            Vec::new()
        };
        let mut transfers = Vec::new();
        let mut artifacts = Vec::new();
        for b in &built {
            let phase = Phase::start(format!(
                "{name} v{version}: compressing the artifact for {} ({})",
                b.target(),
                human_size(b.bytes.len() as u64)
            ));
            let stream = encoded(codec, None, &b.bytes);
            phase.done(&human_size(stream.len() as u64));
            let full = keep_chunking(
                session,
                topics,
                Prepared::of(codec, stream, entry.chunk_size),
            )?;
            let mut patches = Vec::new();
            for (base, triple, base_bytes) in &bases {
                if !same_target(triple, &b.manifest.target.triple) || patches.len() >= MAX_PATCHES {
                    continue;
                }
                let phase = Phase::start(format!(
                    "{name} v{version}: making a patch for {} from {}",
                    b.target(),
                    hex::encode(&base[..6])
                ));
                let stream = encoded(Codec::ZstdPatch, Some(base_bytes), &b.bytes);
                phase.done(&human_size(stream.len() as u64));
                let p = Prepared::of(Codec::ZstdPatch, stream, entry.chunk_size);
                // A patch no smaller than the whole artifact is not worth a round trip.
                if p.stream.len() >= full.stream.len() {
                    continue;
                }
                let p = keep_chunking(session, topics, p)?;
                patches.push(Patch {
                    base: *base,
                    transfer: p.transfer.clone(),
                });
                transfers.push(p);
            }
            artifacts.push(TargetArtifact {
                triple: b.manifest.target.triple.clone(),
                cpu_features: b.manifest.target.cpu_features.clone(),
                sha256: b.sha256,
                len: b.bytes.len() as u64,
                full: full.transfer.clone(),
                patches,
            });
            transfers.push(full);
        }
        let module = DesiredModule {
            name,
            version,
            artifacts,
            config: entry.config,
            limits: entry.limits,
            allow_downgrade: entry.allow_downgrade,
            health_window_ms: entry.health_window_ms,
        };
        Ok(Self {
            signing,
            built,
            module,
            transfers,
            topics: topics.clone(),
            mirrors: None,
        })
    }

    pub fn label(&self) -> String {
        format!("{} v{}", self.module.name, self.module.version)
    }

    /// What the release is and what a device fetches of it, in one line.
    pub fn summary(&self) -> String {
        let targets: Vec<String> = self
            .built
            .iter()
            .zip(&self.module.artifacts)
            .map(|(b, a)| {
                let patches: Vec<u64> = a.patches.iter().map(|p| p.transfer.len).collect();
                format!(
                    "{} {} as {} {}{}",
                    b.target(),
                    human_size(a.len),
                    a.full.codec.name(),
                    human_size(a.full.len),
                    match patches.iter().min() {
                        Some(least) => format!(
                            ", {} patch{} from {}",
                            patches.len(),
                            if patches.len() == 1 { "" } else { "es" },
                            human_size(*least)
                        ),
                        None => String::new(),
                    }
                )
            })
            .collect();
        targets.join("; ")
    }

    /// Publishes every transfer retained: the upload markers first (acknowledged
    /// before any chunk, so `kiln gc`, which reads chunks before markers, never sees a
    /// chunk of this upload without its marker), then each chunk list and its chunks,
    /// with a progress line on stderr. Returns the number of chunks.
    ///
    /// The markers are left in place when the push is done, to expire after gc's
    /// grace period: a marker belongs to the transfer, not to this push, and another
    /// push or rollout of the same artifact may still be between its chunks and its
    /// desired state. gc clears them once they are stale.
    pub fn upload(&mut self, session: &mut Session) -> Result<usize> {
        let unavailable = |e| Error::Broker(e);
        let markers = self
            .transfers
            .iter()
            .map(|p| {
                let marker = Upload::V1 {
                    sha256: p.transfer.sha256,
                    started_ms: now_ms(),
                    chunks: p.list.chunks.len() as u32,
                };
                let topic = self.topics.upload(&p.transfer.sha256);
                (topic, postcard::to_stdvec(&marker).unwrap_or_default())
            })
            .collect();
        session.publish_all(markers, |_| {}).map_err(unavailable)?;
        let mut messages = Vec::new();
        for p in &self.transfers {
            let sha = p.transfer.sha256;
            messages.push((self.topics.list(&sha), p.list_message.clone()));
            for (n, chunk) in p.chunk_messages() {
                messages.push((self.topics.chunk(&sha, n), chunk));
            }
        }
        let total = messages.len();
        let label = self.label();
        let bytes: usize = messages.iter().map(|(_, m)| m.len()).sum();
        let started = std::time::Instant::now();
        // A progress line for people; one line at the end for logs and pipes.
        let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
        session
            .publish_all(messages, |done| {
                if live {
                    let mut err = std::io::stderr();
                    let _ = write!(
                        err,
                        "\r{label}: uploaded {done}/{total} messages ({}%)",
                        done * 100 / total
                    );
                    let _ = err.flush();
                }
            })
            .map_err(unavailable)?;
        if live {
            eprintln!();
        } else {
            eprintln!(
                "{label}: uploaded {total} messages ({}) in {:.1}s",
                human_size(bytes as u64),
                started.elapsed().as_secs_f64()
            );
        }
        // Kept for the patches of the next release.
        for b in &self.built {
            remember(b);
        }
        Ok(total)
    }
}

/// One step of preparing a release that may take seconds (compressing, patching): on
/// a terminal a live line with the seconds so far, updated from a thread while the
/// step runs, then its result; in a log or a pipe one line when it is done.
struct Phase {
    label: String,
    started: std::time::Instant,
    live: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Phase {
    fn start(label: String) -> Self {
        let live = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            let shown = label.clone();
            let started = std::time::Instant::now();
            let handle = std::thread::spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = write!(
                        std::io::stderr(),
                        "\r{shown}... {:.0}s",
                        started.elapsed().as_secs_f64()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
            });
            (stop, handle)
        });
        Self {
            label,
            started: std::time::Instant::now(),
            live,
        }
    }

    fn done(self, result: &str) {
        let seconds = self.started.elapsed().as_secs_f64();
        if let Some((stop, handle)) = self.live {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = handle.join();
            eprint!("\r");
        }
        eprintln!("{}: {result} in {seconds:.1}s", self.label);
    }
}

/// A stream already on the broker keeps the chunk size it went up with: chunk topics
/// are named by the stream's sha and the index only, so chunks of another size would
/// replace them under the devices that are fetching them (whose signed desired state
/// names the old size), and those transfers could never finish.
fn keep_chunking(session: &mut Session, topics: &Topics, p: Prepared) -> Result<Prepared> {
    let topic = topics.list(&p.transfer.sha256);
    let retained = session.retained(&topic).map_err(Error::Broker)?;
    match retained.get(&topic).map(|l| ChunkList::peek(l)) {
        Some(Ok(list))
            if list.sha256 == p.transfer.sha256 && list.chunk_size != p.transfer.chunk_size =>
        {
            eprintln!(
                "{}: already on the broker in chunks of {} bytes; keeping that size",
                hex::encode(&list.sha256[..6]),
                list.chunk_size
            );
            Ok(Prepared::of(p.transfer.codec, p.stream, list.chunk_size))
        }
        _ => Ok(p),
    }
}

/// The artifacts of module `name` that devices of `scope` report running, the most
/// common first, at most `MAX_PATCHES`.
fn running_versions(
    session: &mut Session,
    topics: &Topics,
    scope: &Scope,
    name: &str,
) -> Result<Vec<[u8; 32]>> {
    let unavailable = |e| Error::Broker(e);
    let (reported, status) = match scope {
        Scope::Device(d) => (topics.reported(d), topics.status(d)),
        Scope::Group(_) => (topics.all_devices("reported"), topics.all_devices("status")),
    };
    // In a group, devices known to be elsewhere are left out; offline devices say
    // nothing of their groups, so they count.
    // Which bases to make patches from: a lying device can only make kiln compute a
    // patch from an artifact the fleet's keys signed, which devices then verify.
    let registry = kiln_protocol::trust::Registry::default();
    let reader = Reader::new(topics, &registry);
    let elsewhere: Vec<String> = match scope {
        Scope::Device(_) => Vec::new(),
        Scope::Group(g) => {
            let retained = session.retained(&status).map_err(unavailable)?;
            let (heard, _) = reader.all(&retained);
            heard
                .into_iter()
                .filter_map(|h| {
                    let facts = h.status()?.facts.as_ref()?;
                    (!facts.groups.contains(g)).then_some(h.device)
                })
                .collect()
        }
    };
    let mut count: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    let retained = session.retained(&reported).map_err(unavailable)?;
    let (heard, skipped) = reader.all(&retained);
    warn_skipped(&skipped, 5);
    for h in heard.iter().filter(|h| !elsewhere.contains(&h.device)) {
        let Some(r) = h.reported() else { continue };
        for m in r
            .modules
            .iter()
            .filter(|m| m.name == name && m.sha256 != [0; 32])
        {
            *count.entry(m.sha256).or_default() += 1;
        }
    }
    let mut shas: Vec<([u8; 32], usize)> = count.into_iter().collect();
    shas.sort_by_key(|s| std::cmp::Reverse(s.1));
    Ok(shas.into_iter().take(MAX_PATCHES).map(|(s, _)| s).collect())
}

/// Where `kiln` keeps the artifacts it pushed, as bases for later patches.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kiln").join("artifacts")
}

/// `bytes` as `codec` makes them (from `base`, for a patch): from the cache when an
/// earlier push made the same stream (checked by decoding it), else made now and
/// kept. Compressing at level 19 and patching take seconds for a large artifact; a
/// push of the same release with another config, or to another group, takes none.
fn encoded(codec: Codec, base: Option<&[u8]>, bytes: &[u8]) -> Vec<u8> {
    let sha = hex::encode(sha256(bytes));
    let name = match (codec, base) {
        (Codec::Raw, _) => return bytes.to_vec(),
        (Codec::ZstdPatch, Some(base)) => format!("{}-{sha}.patch", hex::encode(sha256(base))),
        _ => format!("{sha}.zst"),
    };
    let path = cache_dir().join(name);
    if let Ok(stream) = read_input(&path) {
        if transfer::decode(codec, &stream, base, bytes.len() as u64).is_ok_and(|b| b == bytes) {
            touch(&path);
            return stream;
        }
    }
    let stream = match base {
        Some(base) => transfer::patch(base, bytes),
        None => transfer::compress(bytes),
    };
    let _ = std::fs::create_dir_all(cache_dir())
        .and_then(|()| kiln_protocol::atomic::write_atomically(&path, &stream));
    stream
}

/// A file in the cache that no push has used for this long is removed.
const CACHE_DAYS: u64 = 30;

/// Keeps a pushed artifact in the cache (or marks it used), and clears the artifacts
/// and streams no push has used for `CACHE_DAYS`.
fn remember(b: &Built) {
    let dir = cache_dir();
    let path = dir.join(format!("{}.kiln", hex::encode(b.sha256)));
    if path.exists() {
        touch(&path);
    } else {
        let _ = std::fs::create_dir_all(&dir)
            .and_then(|()| kiln_protocol::atomic::write_atomically(&path, &b.bytes));
    }
    let stale = std::time::Duration::from_secs(CACHE_DAYS * 24 * 3600);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > stale));
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = [".kiln", ".zst", ".patch"]
            .iter()
            .any(|e| name.ends_with(e));
        if old && ours {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// The artifact with sha256 `sha`: from the cache, or fetched back from the broker
/// through a desired state that still names it.
fn find_artifact(
    session: &mut Session,
    topics: &Topics,
    states: &mut Option<BTreeMap<String, Vec<u8>>>,
    sha: &[u8; 32],
) -> Result<Option<Vec<u8>>> {
    let cached = cache_dir().join(format!("{}.kiln", hex::encode(sha)));
    if let Ok(bytes) = read_input(&cached) {
        if sha256(&bytes) == *sha {
            touch(&cached);
            return Ok(Some(bytes));
        }
    }
    let unavailable = |e| Error::Broker(e);
    let states = match states {
        Some(states) => states,
        None => states.insert(session.desired_states(topics).map_err(unavailable)?),
    };
    let wanted = states
        .values()
        .filter_map(|payload| SignedDesired::peek(payload).ok())
        .flat_map(|d| d.modules)
        .flat_map(|m| m.artifacts)
        .find(|a| a.sha256 == *sha && a.check().is_ok());
    let Some(artifact) = wanted else {
        return Ok(None);
    };
    let full = &artifact.full;
    let parts = session
        .retained(&topics.chunks(&full.sha256))
        .map_err(unavailable)?;
    let stream = parts
        .get(&topics.list(&full.sha256))
        .and_then(|payload| ChunkList::open(payload, full).ok())
        .and_then(|list| {
            let mut stream = Vec::with_capacity(list.len as usize);
            for (n, expected) in list.chunks.iter().enumerate() {
                let payload = parts.get(&topics.chunk(&full.sha256, n as u32))?;
                let (_, data) = Chunk::open(payload, &list).ok()?;
                if sha256(&data) != *expected {
                    return None;
                }
                stream.extend_from_slice(&data);
            }
            Some(stream)
        });
    Ok(stream
        .and_then(|s| transfer::decode(full.codec, &s, None, artifact.len).ok())
        .filter(|bytes| sha256(bytes) == *sha))
}
