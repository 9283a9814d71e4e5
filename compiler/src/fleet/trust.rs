//! The fleet tool's side of the trust model (`kiln_protocol::trust`): where its root
//! document is, following newer roots the broker holds, and the device registry.
//!
//! kiln starts from a root document it was given (the anchor) and follows the broker's
//! `roots/{version}` one version at a time, exactly as a device does, so an operator
//! whose `fleet.root` predates a rotation still checks everything against the current
//! root, and a forged root on the broker is never taken.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use kiln_protocol::fleet::{Desired, SignedDesired, Topics, MAX_DESIRED};
use kiln_protocol::keys::{PublicKey, SecretKey, TrustedKeys};
use kiln_protocol::trust::{
    Chain, OpenError, Registry, Root, SignedRegistry, SignedRoot, MAX_ROOT,
};

use crate::exit::Code;
use crate::fleet::broker::Session;
use crate::fleet::Error;

/// The root document flag the fleet commands share.
#[derive(Args, Debug, Clone, Default)]
pub struct RootArgs {
    /// The fleet's root document [default: the `.root` file next to the first --sign
    /// key (its own name, or the only one in that directory), else ./fleet.root]
    #[arg(long, value_name = "FILE", env = "KILN_ROOT")]
    pub root: Option<PathBuf>,
}

impl RootArgs {
    /// `--root`, else `fleet.root` beside `fleet.key`, else the one `*.root` beside the
    /// key (a key added later, `new.key`, sits with the fleet's files), else
    /// `./fleet.root` if it exists.
    pub fn path(&self, sign: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = &self.root {
            return Some(p.clone());
        }
        let named = sign.map(|k| k.with_extension("root"));
        let only = sign.and_then(only_root_beside);
        named
            .into_iter()
            .chain(only)
            .chain([PathBuf::from("fleet.root")])
            .find(|p| p.is_file())
    }

    /// The root document kiln starts from; an error names the file and says how to
    /// get one.
    pub fn anchor(&self, sign: Option<&Path>) -> Result<Chain, Error> {
        let path = self.path(sign).ok_or_else(|| {
            Error::Trust(
                "no root document: pass --root FILE (kiln keygen writes fleet.root)".into(),
            )
        })?;
        read_root(&path)
    }

    /// The fleet's roots, from the anchor (beside the first of `sign`) along the
    /// broker's, for a command that signs with `keys` (read from `sign`): a root key
    /// among them is refused ([`refuse_root_keys`]).
    pub fn follow_to_sign(
        &self,
        session: &mut Session,
        topics: &Topics,
        sign: &[PathBuf],
        keys: &[SecretKey],
    ) -> Result<Fleet> {
        let anchor = self.anchor(sign.first().map(PathBuf::as_path))?;
        let fleet = Fleet::follow(session, topics, anchor)?;
        refuse_root_keys(&fleet, sign, keys)?;
        Ok(fleet)
    }
}

/// The single `*.root` file in the directory of `key`, if there is exactly one.
fn only_root_beside(key: &Path) -> Option<PathBuf> {
    let dir = match key.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut roots = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "root") && p.is_file());
    let first = roots.next()?;
    roots.next().is_none().then_some(first)
}

pub fn read_root(path: &Path) -> Result<Chain, Error> {
    let bytes = read_bounded(path, MAX_ROOT as u64)?;
    Chain::new(bytes).map_err(|e| Error::Trust(format!("root document `{}`: {e}", path.display())))
}

pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Unreadable(format!("cannot read `{}`: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Unreadable(format!("cannot read `{}`: {e}", path.display())))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Invalid(format!(
            "`{}` is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The fleet as kiln sees it: the roots from the anchor to the newest the broker
/// chains to, oldest first.
pub struct Fleet {
    pub chain: Chain,
    pub history: Vec<Root>,
}

impl Fleet {
    /// The anchor followed along the broker's retained roots. Roots that do not chain
    /// are reported on stderr and ignored (a device ignores them too).
    pub fn follow(session: &mut Session, topics: &Topics, anchor: Chain) -> Result<Self> {
        let retained = session
            .retained(&topics.all_roots())
            .map_err(Error::Broker)?;
        let mut chain = anchor;
        let mut history = older_roots(&chain, &retained);
        history.push(chain.root().clone());
        let (taken, errors) = chain.follow(retained.values().map(Vec::as_slice));
        if !taken.is_empty() {
            history.push(chain.root().clone());
        }
        for e in errors {
            eprintln!("warning: a root document on the broker is not taken: {e}");
        }
        let now = crate::fleet::broker::now_ms();
        if let Some(why) = chain.root().stale_at(now) {
            eprintln!("warning: {why}");
        } else if let Some(e) = chain.root().expires_ms {
            if e.saturating_sub(now) < 30 * 86_400_000 {
                eprintln!(
                    "note: root v{} expires at {}: renew it with `kiln root rotate` before then",
                    chain.root().version,
                    kiln_protocol::fleet::utc(e)
                );
            }
        }
        Ok(Self { chain, history })
    }

    pub fn root(&self) -> &Root {
        self.chain.root()
    }

    /// Publishes the current root retained under `roots/{version}` if the broker does
    /// not hold it, so devices can follow a rotation made from this machine.
    pub fn publish_root(&self, session: &mut Session, topics: &Topics) -> Result<bool> {
        let topic = topics.root(self.root().version);
        let held = session.retained(&topic).map_err(Error::Broker)?;
        if held.get(&topic).map(Vec::as_slice) == Some(self.chain.bytes()) {
            return Ok(false);
        }
        session
            .publish_all(vec![(topic, self.chain.bytes().to_vec())], |_| {})
            .map_err(Error::Broker)?;
        Ok(true)
    }

    /// A retained desired state, verified under the current root. One signed only
    /// under an older root (by keys since rotated out) is [`Opened::Revoked`]: nothing
    /// is built on it, re-signed or counted unless the operator adopts it.
    pub fn open_desired(&self, bytes: &[u8]) -> Result<Opened<Desired>, String> {
        let current = SignedDesired::open(bytes, self.root());
        if let Ok(d) = current {
            return Ok(Opened::Trusted(d));
        }
        for root in self.history.iter().rev().skip(1) {
            if let Ok(d) = SignedDesired::open(bytes, root) {
                return Ok(Opened::Revoked {
                    doc: d,
                    root: root.version,
                });
            }
        }
        current.map(Opened::Trusted)
    }

    /// The enrolled device keys (an empty registry if none is retained yet). A
    /// registry signed only under an older root is refused unless the operator
    /// adopts it (`adopt`: it is shown, then taken): the keys a leaked key enrolled
    /// must not count as verified.
    pub fn registry(
        &self,
        session: &mut Session,
        topics: &Topics,
        adopt: bool,
    ) -> Result<Registry> {
        let read = crate::fleet::parts::read_whole(session, &topics.registry_all(), |retained| {
            self.registry_in(retained, topics, adopt)
        })
        .map_err(Error::Broker)?;
        read.map_err(RegistryRead::into_error)
    }

    /// The registry in `retained` (its head and parts), as [`Fleet::registry`] takes it.
    fn registry_in(
        &self,
        retained: &std::collections::BTreeMap<String, Vec<u8>>,
        topics: &Topics,
        adopt: bool,
    ) -> Result<Registry, RegistryRead> {
        let Some(head) = retained.get(&topics.registry()) else {
            return Ok(Registry {
                fleet: self.root().fleet.clone(),
                serial: 0,
                devices: Vec::new(),
            });
        };
        let part = |sha: &[u8; 32]| {
            retained
                .get(&topics.registry_part(sha))
                .map(|b| b.as_slice())
        };
        let current = SignedRegistry::verify(head, part, self.root());
        match current {
            Ok(r) => return Ok(r),
            Err(e @ OpenError::Incomplete(_)) => return Err(RegistryRead::Incomplete(e)),
            Err(_) => {}
        }
        for root in self.history.iter().rev().skip(1) {
            if let Ok(r) = SignedRegistry::open(head, part, root) {
                let what = describe_registry(&r);
                if adopt {
                    eprintln!(
                        "adopting the registry signed under root v{} (keys since rotated out): {what}",
                        root.version
                    );
                    return Ok(r);
                }
                return Err(RegistryRead::Refused(Error::trust(anyhow!(
                        "the registry on the broker was signed under root v{} by keys since rotated out ({what}); review it and pass --adopt to re-sign it with today's keys, or enroll the devices again",
                        root.version
                    )
                ).into()));
            }
        }
        current.map_err(|e| {
            RegistryRead::Refused(
                Error::Trust(format!("the registry on the broker is not trusted: {e}")).into(),
            )
        })
    }

    /// [`Fleet::registry`] for commands that only read: an untrusted registry is said
    /// on stderr and counts as empty (every device then shows as unenrolled).
    pub fn registry_or_empty(&self, session: &mut Session, topics: &Topics) -> Result<Registry> {
        match self.registry(session, topics, false) {
            Ok(r) => Ok(r),
            Err(e) if crate::exit::code_of(&e) == Code::Key => {
                eprintln!(
                    "warning: {}; no device counts as enrolled",
                    crate::exit::one_line(&e)
                );
                Ok(Registry {
                    fleet: self.root().fleet.clone(),
                    serial: 0,
                    devices: Vec::new(),
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// Why the registry could not be read this time.
enum RegistryRead {
    /// A part its head names is not retained (yet, or any more): read again.
    Incomplete(OpenError),
    Refused(anyhow::Error),
}

impl crate::fleet::parts::Incomplete for RegistryRead {
    fn is_incomplete(&self) -> bool {
        matches!(self, RegistryRead::Incomplete(_))
    }
}

impl RegistryRead {
    fn into_error(self) -> anyhow::Error {
        match self {
            RegistryRead::Incomplete(e) => {
                Error::Trust(format!("the registry on the broker is not whole: {e}")).into()
            }
            RegistryRead::Refused(e) => e,
        }
    }
}

/// A signed document and whether it verifies under the current root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened<T> {
    Trusted(T),
    /// Verifies only under the older root `root`: its signers were rotated out.
    Revoked {
        doc: T,
        root: u64,
    },
}

/// The registry's devices and keys, for a person deciding whether to adopt it.
pub fn describe_registry(r: &Registry) -> String {
    let devices: Vec<String> = r
        .devices
        .iter()
        .map(|e| match PublicKey::from_bytes(&e.key) {
            Ok(k) => format!("{} key {}", e.device, k.id()),
            Err(_) => format!("{} (invalid key)", e.device),
        })
        .collect();
    format!(
        "serial {}, {} devices: {}",
        r.serial,
        devices.len(),
        devices.join(", ")
    )
}

/// The broker's roots older than `anchor` that it vouches for: root `n` is the fleet's
/// if root `n + 1` (already trusted) was signed by a threshold of its root keys.
fn older_roots(
    anchor: &Chain,
    retained: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Vec<Root> {
    let by_version: std::collections::BTreeMap<u64, &Vec<u8>> = retained
        .values()
        .filter_map(|b| SignedRoot::peek(b).ok().map(|r| (r.version, b)))
        .collect();
    let mut older = Vec::new();
    let mut known = anchor.bytes().to_vec();
    let mut version = anchor.root().version;
    while version > 1 {
        let Some(bytes) = by_version.get(&(version - 1)) else {
            break;
        };
        let Ok(candidate) = SignedRoot::open_initial(bytes) else {
            break;
        };
        if SignedRoot::open_next(&known, &candidate).is_err() {
            break;
        }
        known = bytes.to_vec();
        version -= 1;
        older.push(candidate);
    }
    older.reverse();
    older
}

pub use kiln_protocol::trust::Identity;

/// The root document at `path`, for showing (signatures not checked).
pub fn peek_root(path: &Path) -> Result<Root, Error> {
    let bytes = read_bounded(path, MAX_ROOT as u64)?;
    SignedRoot::peek(&bytes).map_err(|e| Error::Invalid(format!("`{}`: {e}", path.display())))
}

/// The signing flags that `push`, `rollout` and `refresh` share.
#[derive(Args, Debug, Clone)]
pub struct SigningArgs {
    /// Release key that signs the desired state (repeat for a k-of-n threshold); a
    /// .wasm input is compiled and signed with the first
    #[arg(long, value_name = "KEY")]
    pub sign: Vec<PathBuf>,
    #[command(flatten)]
    pub root: RootArgs,
    /// How long devices take the desired state (re-sign it before with `kiln refresh`)
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    pub expires_in: u64,
    /// After a rotation: build on, and re-sign with today's keys, the desired states
    /// and the registry that verify only under an older root (their signers were
    /// rotated out). Each is shown in full first. Without it they are refused: a
    /// leaked key's work is never re-signed by a routine command.
    #[arg(long)]
    pub adopt: bool,
    /// Where the current desired state is not trusted (signed by a revoked or unknown
    /// key, too large, undecodable), start the new one from no modules instead of
    /// refusing: the untrusted state's modules and serial are dropped, not re-signed
    #[arg(long, conflicts_with = "adopt")]
    pub replace_untrusted: bool,
}

impl SigningArgs {
    /// The fleet's roots (the anchor followed along the broker's), the release keys at
    /// hand, and how long a state is valid. A root newer than the broker's is published.
    pub fn signing(&self, session: &mut Session, topics: &Topics) -> Result<Signing> {
        let keys = crate::fleet::keyfile::read_secrets(&self.sign)?;
        let fleet = self
            .root
            .follow_to_sign(session, topics, &self.sign, &keys)?;
        if fleet.publish_root(session, topics)? {
            eprintln!("published {}", fleet.root().describe());
        }
        Ok(Signing {
            fleet,
            keys,
            valid_ms: self.expires_in,
            adopt: self.adopt,
            replace_untrusted: self.replace_untrusted,
            registry: std::cell::OnceCell::new(),
        })
    }
}

/// A root key given to sign a state or an artifact is refused: it signs root
/// documents only, and belongs offline (a root key that is also a release key is the
/// operator's documented choice, and allowed).
pub fn refuse_root_keys(fleet: &Fleet, paths: &[PathBuf], keys: &[SecretKey]) -> Result<()> {
    let root = fleet.root();
    for (path, key) in paths.iter().zip(keys) {
        let id = key.public().id();
        if root.root.ids().contains(&id) && !root.release.ids().contains(&id) {
            bail!(Error::trust(anyhow!(
                    "`{}` is a root key of {} (key {id}): root keys sign root documents only and stay offline; sign with a release key",
                    path.display(),
                    root.describe()
                )
            ));
        }
    }
    Ok(())
}

/// For what is signed away from the broker (`kiln compile`, `kiln release`): a key
/// that the root document beside it (see [`RootArgs::path`]) names as a root key and
/// not as a release key is refused, so the offline root key is never used online. No
/// root document beside the key: nothing to check against.
pub fn refuse_root_key_beside(path: &Path, key: &SecretKey) -> Result<()> {
    let Some(root_path) = RootArgs::default().path(Some(path)) else {
        return Ok(());
    };
    let Ok(root) = peek_root(&root_path) else {
        return Ok(());
    };
    let id = key.public().id();
    if root.root.ids().contains(&id) && !root.release.ids().contains(&id) {
        bail!(Error::trust(anyhow!(
                "`{}` is a root key of {} (per `{}`): root keys sign root documents only and stay offline; sign with a release key",
                path.display(),
                root.describe(),
                root_path.display()
            )
        ));
    }
    Ok(())
}

/// How desired states are signed: the fleet's roots, the release keys at hand (none:
/// the state is written unsigned for `kiln sign`), how long a state is valid, and
/// whether the operator adopts what was signed under an older root.
pub struct Signing {
    pub fleet: Fleet,
    pub keys: Vec<SecretKey>,
    pub valid_ms: u64,
    pub adopt: bool,
    pub replace_untrusted: bool,
    /// The registry, read once per command (`refresh --all` prepares a state per
    /// scope, and each judges its devices' reports against it).
    registry: std::cell::OnceCell<Registry>,
}

impl Signing {
    /// The fleet's registry as [`Fleet::registry_or_empty`] reads it, once.
    pub fn registry(&self, session: &mut Session, topics: &Topics) -> Result<&Registry> {
        if self.registry.get().is_none() {
            let registry = self.fleet.registry_or_empty(session, topics)?;
            let _ = self.registry.set(registry);
        }
        Ok(self.registry.get().expect("set just above"))
    }

    /// The keys a release's artifacts must be signed by: the current release keys.
    pub fn release_keys(&self) -> TrustedKeys {
        self.fleet.root().release.trusted()
    }

    /// Every release key of every root kiln knows: a base for a patch may have been
    /// signed before a rotation.
    pub fn any_release_keys(&self) -> TrustedKeys {
        let keys = self
            .fleet
            .history
            .iter()
            .flat_map(|r| r.release.public_keys())
            .collect();
        TrustedKeys::new(keys)
    }

    /// Signs `desired` with every key at hand and checks that the result is what a
    /// device takes (a threshold of release keys of the current root), unless there is
    /// no key (an unsigned state for `kiln sign`).
    pub fn sign(&self, desired: &Desired) -> Result<Vec<u8>> {
        let keys: Vec<&SecretKey> = self.keys.iter().collect();
        let signed = SignedDesired::sign(desired, &keys);
        if keys.is_empty() {
            return Ok(signed);
        }
        SignedDesired::open(&signed, self.fleet.root()).map_err(|e| {
            Error::trust(anyhow!(
                    "devices would refuse this desired state: {e}; sign with release keys of {} (or write it with --unsigned and add signatures with `kiln sign`)",
                    self.fleet.root().describe()
                ),
            )
        })?;
        Ok(signed)
    }
}

/// `30d`, `12h`, `90m` or `3600s` (or plain seconds), in milliseconds.
pub fn parse_duration(text: &str) -> std::result::Result<u64, String> {
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30d, 12h, 90m or 3600s"))?;
    let unit_ms = match unit {
        'd' => 86_400_000,
        'h' => 3_600_000,
        'm' => 60_000,
        's' => 1000,
        _ => return Err(format!("`{text}`: the unit is d, h, m or s")),
    };
    n.checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("`{text}` is out of range"))
}

/// A desired state written to a file by `kiln push --unsigned`, for `kiln sign` on
/// another machine and `kiln push FILE` back on this one.
pub const STATE_MAGIC: &[u8] = b"KILNSTATE\x01";

pub fn encode_state(signed: &[u8]) -> Vec<u8> {
    [STATE_MAGIC, signed].concat()
}

pub fn read_state(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = read_bounded(path, (STATE_MAGIC.len() + MAX_DESIRED) as u64)?;
    bytes
        .strip_prefix(STATE_MAGIC)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            Error::invalid(anyhow!(
                "`{}` is not a desired-state file from `kiln push --unsigned`",
                path.display()
            ))
        })
}

/// What a desired state says, on one line, for a person about to sign, publish or
/// adopt it: every module with its version and each target's full sha256 (the rest is
/// in [`describe_state_full`]).
pub fn describe_state(d: &Desired) -> String {
    let scope = match &d.scope {
        kiln_protocol::fleet::Scope::Device(x) => format!("device {x}"),
        kiln_protocol::fleet::Scope::Group(x) => format!("group {x}"),
    };
    let modules: Vec<String> = d
        .modules
        .iter()
        .map(|m| {
            let targets: Vec<String> = m
                .artifacts
                .iter()
                .map(|a| format!("{} {}", a.triple, hex::encode(a.sha256)))
                .collect();
            let mut flags = String::new();
            if m.allow_downgrade {
                flags.push_str(", DOWNGRADE ALLOWED");
            }
            if !m.config.is_empty() {
                flags.push_str(&format!(
                    ", config {} B sha256 {}",
                    m.config.len(),
                    hex::encode(kiln_protocol::fleet::sha256(&m.config))
                ));
            }
            format!("{} v{} ({}{flags})", m.name, m.version, targets.join(", "))
        })
        .collect();
    format!(
        "fleet {} {scope} serial {}, issued {}, expires {}: {}",
        d.fleet,
        d.serial,
        kiln_protocol::fleet::utc(d.issued_ms),
        kiln_protocol::fleet::utc(d.expires_ms),
        if modules.is_empty() {
            "no modules".to_string()
        } else {
            modules.join("; ")
        }
    )
}

/// Everything a signature over a desired state commits to, one fact a line: what
/// `kiln sign` shows before it signs, so a publisher without keys cannot slip a
/// config, a limit, a downgrade or an artifact past the signers.
pub fn describe_state_full(d: &Desired, body_sha256: &[u8; 32]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let scope = match &d.scope {
        kiln_protocol::fleet::Scope::Device(x) => format!("device {x}"),
        kiln_protocol::fleet::Scope::Group(x) => format!("group {x}"),
    };
    let _ = writeln!(
        out,
        "desired state  {} {scope}, fleet {}",
        hex::encode(body_sha256),
        d.fleet
    );
    let _ = writeln!(out, "  serial       {}", d.serial);
    let _ = writeln!(
        out,
        "  valid        {} .. {}",
        kiln_protocol::fleet::utc(d.issued_ms),
        kiln_protocol::fleet::utc(d.expires_ms)
    );
    for url in &d.mirrors {
        let _ = writeln!(out, "  mirror       {url}");
    }
    if d.modules.is_empty() {
        let _ = writeln!(
            out,
            "  no modules (devices in scope stop every fleet module)"
        );
    }
    for m in &d.modules {
        let _ = writeln!(out, "  module       {} v{}", m.name, m.version);
        let _ = writeln!(
            out,
            "    downgrade  {}",
            if m.allow_downgrade {
                "ALLOWED"
            } else {
                "refused"
            }
        );
        let _ = writeln!(out, "    health     {} ms", m.health_window_ms);
        let l = &m.limits;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            out,
            "    limits     tick_ms {}, timeout_ms {}, fuel_per_call {}, memory_limit_pages {}",
            opt(l.tick_ms),
            opt(l.timeout_ms),
            opt(l.fuel_per_call),
            opt(l.memory_limit_pages.map(u64::from))
        );
        let printable: String = String::from_utf8_lossy(&m.config[..m.config.len().min(64)])
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect();
        let _ = writeln!(
            out,
            "    config     {} B, sha256 {}{}",
            m.config.len(),
            hex::encode(kiln_protocol::fleet::sha256(&m.config)),
            if m.config.is_empty() {
                String::new()
            } else {
                format!(", begins \"{printable}\"")
            }
        );
        for a in &m.artifacts {
            let _ = writeln!(
                out,
                "    artifact   {} [{}] sha256 {} ({} B)",
                a.triple,
                a.cpu_features.join(","),
                hex::encode(a.sha256),
                a.len
            );
            for p in &a.patches {
                let _ = writeln!(out, "      patch    from {}", hex::encode(p.base));
            }
        }
    }
    out
}
