use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use kiln_protocol::keys::PublicKey;
use kiln_protocol::trust::{Role, Root};

use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs};
use crate::fleet::keyfile;
use crate::fleet::trust::{read_root, Fleet};

const AFTER_HELP: &str = "\
The root document names the keys of each role (root, release, and optionally
registry) and how many must sign (k of n). Devices are provisioned with it and follow
newer versions from the broker (retained on {prefix}/roots/{version}) one at a time:
each must be signed by a threshold of the previous root's root keys and of its own.
A key a newer root leaves out is refused from then on; that is how a leaked release
key is revoked.

Examples:
  kiln root show fleet.root
  kiln root rotate --root fleet.root --sign fleet-root.key --release-key new.pub
  kiln root rotate --root fleet.root --sign fleet-root.key --sign new-root.key --root-key new-root.pub
  kiln root rotate --root fleet.root --sign fleet-root.key --release-key a.pub --release-key b.pub --release-threshold 2
  kiln root publish fleet.root --broker mqtt://broker.lan:1883";

/// Show, rotate and publish the fleet's root document
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RootCommand {
    #[command(subcommand)]
    pub action: RootAction,
}

#[derive(Subcommand, Debug)]
pub enum RootAction {
    /// Print what a root document says (its signatures are not checked)
    #[command(after_help = "Examples:\n  kiln root show fleet.root")]
    Show { file: PathBuf },
    /// Write the next version of the root document with other keys
    Rotate(Rotate),
    /// Retain a root document on the broker, where devices follow it
    #[command(after_help = PUBLISH_HELP)]
    Publish {
        file: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

const PUBLISH_HELP: &str = "\
It is published only if it chains from the roots the broker holds.

Examples:
  kiln root publish fleet.root --broker mqtt://broker.lan:1883";

const ROTATE_HELP: &str = "\
The new version is checked as a device will check it (the previous root's root keys
and its own must sign) before it is written.

Examples:
  kiln root rotate --root fleet.root --sign fleet-root.key --release-key new.pub
  kiln root rotate --root fleet.root --sign fleet-root.key --sign new-root.key --root-key new-root.pub";

#[derive(Args, Debug)]
#[command(after_help = ROTATE_HELP)]
pub struct Rotate {
    /// The current root document; the new one replaces it unless -o says otherwise
    #[arg(long, value_name = "FILE")]
    pub root: PathBuf,
    /// Root keys that sign the new version: a threshold of the current root keys, and
    /// of the new ones if they change (repeatable)
    #[arg(long, value_name = "KEY", required = true)]
    pub sign: Vec<PathBuf>,
    /// The release role's public keys from now on (repeatable; default: unchanged)
    #[arg(long, value_name = "PUB")]
    pub release_key: Vec<PathBuf>,
    /// How many release keys must sign a desired state (default: unchanged)
    #[arg(long, value_name = "K")]
    pub release_threshold: Option<u32>,
    /// The root role's public keys from now on (repeatable; default: unchanged)
    #[arg(long, value_name = "PUB")]
    pub root_key: Vec<PathBuf>,
    /// How many root keys must sign the next root document (default: unchanged)
    #[arg(long, value_name = "K")]
    pub root_threshold: Option<u32>,
    /// A registry role (signs enrolled device keys) from now on (repeatable)
    #[arg(long, value_name = "PUB", conflicts_with = "no_registry")]
    pub registry_key: Vec<PathBuf>,
    /// How many registry keys must sign the registry (default: unchanged)
    #[arg(long, value_name = "K")]
    pub registry_threshold: Option<u32>,
    /// Drop the registry role: the release keys sign the registry again
    #[arg(long)]
    pub no_registry: bool,
    /// Where to write the new root document [default: over --root]
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// How long the root document is valid: devices and kiln say `stale` after it, so
    /// a withheld rotation is noticed; renew it with `kiln root rotate` before then
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = crate::fleet::trust::parse_duration)]
    pub root_expires_in: u64,
    /// A root document that never expires (for fleets with a kilnd from before root
    /// expiry, which cannot read a root that has one)
    #[arg(long, conflicts_with = "root_expires_in")]
    pub no_root_expiry: bool,
}

fn publics(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths
        .iter()
        .map(|p| keyfile::read_public(p).map_err(|e| coded(Code::Key, e)))
        .collect()
}

/// The role with `keys` (or the old keys) and `threshold` (or the old one, at most
/// the number of keys).
fn role(old: &Role, keys: &[PathBuf], threshold: Option<u32>) -> Result<Role> {
    let keys = if keys.is_empty() {
        old.public_keys()
    } else {
        publics(keys)?
    };
    let threshold = threshold.unwrap_or_else(|| old.threshold.min(keys.len() as u32));
    Ok(Role::new(&keys, threshold))
}

impl Rotate {
    fn execute(self) -> Result<()> {
        let mut chain = read_root(&self.root)?;
        let current = chain.root().clone();
        let registry = if self.no_registry {
            None
        } else if !self.registry_key.is_empty() || self.registry_threshold.is_some() {
            let old = current.registry.as_ref().unwrap_or(&current.release);
            Some(role(old, &self.registry_key, self.registry_threshold)?)
        } else {
            current.registry.clone()
        };
        let next = Root {
            fleet: current.fleet.clone(),
            version: current.version + 1,
            issued_ms: now_ms(),
            root: role(&current.root, &self.root_key, self.root_threshold)?,
            release: role(&current.release, &self.release_key, self.release_threshold)?,
            registry,
            expires_ms: (!self.no_root_expiry)
                .then(|| now_ms().saturating_add(self.root_expires_in)),
        };
        let keys = keyfile::read_secrets(&self.sign)?;
        let refs: Vec<_> = keys.iter().collect();
        let doc = next
            .sign(&refs)
            .map_err(|e| coded(Code::InvalidInput, anyhow!(e)))?;
        // Exactly what a device will check before it takes it.
        if let Err(e) = chain.advance(&doc) {
            bail!(coded(Code::Key, anyhow!("devices would refuse it: {e}")));
        }
        let out = self.output.unwrap_or(self.root);
        crate::files::write_public(&out, &doc).map_err(|e| {
            coded(
                Code::CannotWrite,
                anyhow!("cannot write `{}`: {e}", out.display()),
            )
        })?;
        eprintln!(
            "wrote {}: {}\npublish it with `kiln root publish {}`; devices refuse keys it dropped once they take it",
            out.display(),
            next.describe(),
            out.display()
        );
        Ok(())
    }
}

impl RootCommand {
    pub fn execute(self) -> Result<()> {
        match self.action {
            RootAction::Show { file } => {
                let root = crate::fleet::trust::peek_root(&file)?;
                println!("{}", root.describe());
                Ok(())
            }
            RootAction::Rotate(r) => r.execute(),
            RootAction::Publish { file, broker } => {
                let chain = read_root(&file)?;
                let topics = broker.topics();
                let mut session = broker.connect().map_err(|e| coded(Code::Unavailable, e))?;
                // Published only if it chains from what the broker holds, so a mistake
                // here cannot strand devices on a root they will never take.
                let retained = session
                    .retained(&topics.all_roots())
                    .map_err(|e| coded(Code::Unavailable, e))?;
                let oldest = retained
                    .values()
                    .filter_map(|b| read_chain(b))
                    .min_by_key(|c| c.root().version);
                if let Some(mut from) = oldest {
                    if from.root().version < chain.root().version {
                        let (_, errors) = from
                            .follow(retained.values().map(Vec::as_slice).chain([chain.bytes()]));
                        if from.root().version != chain.root().version {
                            bail!(coded(
                                Code::Key,
                                anyhow!(
                                    "`{}` does not chain from the broker's roots: {}",
                                    file.display(),
                                    errors.join("; ")
                                )
                            ));
                        }
                    }
                }
                let fleet = Fleet {
                    history: vec![chain.root().clone()],
                    chain,
                };
                let published = fleet.publish_root(&mut session, &topics)?;
                session.disconnect();
                eprintln!(
                    "{} {}",
                    if published {
                        "published"
                    } else {
                        "already published:"
                    },
                    fleet.root().describe()
                );
                Ok(())
            }
        }
    }
}

fn read_chain(bytes: &[u8]) -> Option<kiln_protocol::trust::Chain> {
    kiln_protocol::trust::Chain::new(bytes.to_vec()).ok()
}
