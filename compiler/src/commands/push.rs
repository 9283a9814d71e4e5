use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser};
use kiln_protocol::artifact::Envelope;
use kiln_protocol::fleet::{
    ArtifactRef, Chunk, Desired, DesiredModule, ModuleLimits, Scope, SignedDesired, Topics,
    DEFAULT_CHUNK,
};
use kiln_protocol::keys::{SecretKey, TrustedKeys};
use kiln_protocol::manifest::{parse_memory_size, Manifest};
use kiln_protocol::names::Kind;

use crate::broker::{BrokerArgs, Session};
use crate::commands::compile::human_size;
use crate::commands::valid_name;
use crate::exit::{coded, Code};
use crate::keyfile;

const AFTER_HELP: &str = "\
Examples:
  kiln push app.kiln --device dev-01 --sign fleet.key
  kiln push app.kiln --group lab --sign fleet.key --broker mqtt://broker.lan:1883 --config app.conf
  kiln push app.kiln --device dev-01 --sign fleet.key --allow-downgrade   # roll back on purpose

Chunks go to retained topics under artifacts/{sha256}/, then the signed desired state
for the device or group is updated (other modules in it are kept). Devices that are
offline converge when they come back.";

/// Publish an artifact to the broker and make it the desired version of its module on a
/// device or a group
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct PushCommand {
    /// Device id to update
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    pub device: Option<String>,
    /// Group to update
    #[arg(long)]
    pub group: Option<String>,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

/// What `push` and `rollout` share: the artifact, the key, the broker, and how the
/// module should run.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// Artifact built by `kiln compile`
    #[arg(value_name = "ARTIFACT")]
    pub artifact: PathBuf,
    /// Secret key that signs the desired state (and signed the artifact)
    #[arg(long, value_name = "KEY")]
    pub sign: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Config bytes for the module, from a file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "MS")]
    pub tick_ms: Option<u64>,
    /// Linear-memory cap: pages or a size (4MiB)
    #[arg(long, value_name = "PAGES|SIZE", value_parser = parse_memory_size)]
    pub memory_limit: Option<u32>,
    #[arg(long, value_name = "POINTS")]
    pub fuel_per_call: Option<u64>,
    /// Wall-clock limit per call
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// How long the new version must run without a crash before devices commit it
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub health_window_ms: u64,
    /// Allow a version lower than the one devices have committed
    #[arg(long)]
    pub allow_downgrade: bool,
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CHUNK,
          value_parser = clap::value_parser!(u32).range(1024..=1_048_576))]
    pub chunk_size: u32,
}

/// A release ready to go out: the verified artifact and its desired-state entry.
pub struct Release {
    pub key: SecretKey,
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub module: DesiredModule,
    pub topics: Topics,
}

impl ReleaseArgs {
    pub fn load(&self) -> Result<Release> {
        let key = keyfile::read_secret(&self.sign).map_err(|e| coded(Code::Key, e))?;
        let trust = TrustedKeys::new(vec![key.public()]);
        let file = self.artifact.display();
        let bytes = std::fs::read(&self.artifact)
            .with_context(|| format!("cannot read `{file}`"))
            .map_err(|e| coded(Code::NoInput, e))?;
        // The fleet must never be asked to run what this key did not sign.
        let manifest = Envelope::parse(&bytes)
            .and_then(|e| e.verify(&trust))
            .map(|v| v.manifest)
            .map_err(|e| coded(Code::InvalidInput, anyhow!("artifact `{file}`: {e}")))?;
        let config = match &self.config {
            Some(path) => read_config(path)?,
            None => Vec::new(),
        };
        let module = DesiredModule {
            name: manifest.name.clone(),
            version: manifest.version,
            artifact: ArtifactRef::of(&bytes, self.chunk_size),
            config,
            limits: ModuleLimits {
                tick_ms: self.tick_ms,
                memory_limit_pages: self.memory_limit,
                fuel_per_call: self.fuel_per_call,
                timeout_ms: self.timeout_ms,
            },
            allow_downgrade: self.allow_downgrade,
            health_window_ms: self.health_window_ms,
        };
        Ok(Release {
            key,
            manifest,
            bytes,
            module,
            topics: self.broker.topics(),
        })
    }
}

fn read_config(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("cannot read config `{}`", path.display()))
        .map_err(|e| coded(Code::NoInput, e))
}

impl Release {
    pub fn label(&self) -> String {
        format!("{} v{}", self.manifest.name, self.manifest.version)
    }

    /// Publishes every chunk retained, with a progress line on stderr.
    pub fn upload(&self, session: &mut Session) -> Result<usize> {
        let art = &self.module.artifact;
        let chunks: Vec<(String, Vec<u8>)> = self
            .bytes
            .chunks(art.chunk_size as usize)
            .enumerate()
            .map(|(n, data)| {
                let chunk = Chunk::V1 {
                    sha256: art.sha256,
                    index: n as u32,
                    data: data.to_vec(),
                };
                let payload = postcard::to_stdvec(&chunk).unwrap_or_default();
                (self.topics.chunk(&art.sha256, n as u32), payload)
            })
            .collect();
        let total = chunks.len();
        let label = self.label();
        // A progress line for people; one line at the end for logs and pipes.
        let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
        session
            .publish_all(chunks, |done| {
                if live {
                    let mut err = std::io::stderr();
                    let _ = write!(
                        err,
                        "\r{label}: uploaded {done}/{total} chunks ({}%)",
                        done * 100 / total
                    );
                    let _ = err.flush();
                }
            })
            .map_err(|e| coded(Code::Unavailable, e))?;
        if live {
            eprintln!();
        }
        Ok(total)
    }

    /// Makes this release the desired version of its module for `scope`, keeping the
    /// other modules of the current desired state; returns the new serial.
    pub fn set_desired(&self, session: &mut Session, scope: &Scope) -> Result<u64> {
        let (topic, target) = match scope {
            Scope::Device(d) => (self.topics.desired(d), format!("device {d}")),
            Scope::Group(g) => (self.topics.group_desired(g), format!("group {g}")),
        };
        let trust = TrustedKeys::new(vec![self.key.public()]);
        let current = session
            .retained(&topic)
            .map_err(|e| coded(Code::Unavailable, e))?;
        let mut desired = match current.get(&topic) {
            Some(payload) => SignedDesired::open(payload, &trust).map_err(|e| {
                coded(
                    Code::Key,
                    anyhow!("the current desired state of {target} cannot be read with this key ({e}); refusing to overwrite it"),
                )
            })?,
            None => Desired {
                scope: scope.clone(),
                serial: 0,
                modules: Vec::new(),
            },
        };
        if desired.scope != *scope {
            // Not this target's state (a stray or mis-addressed message): start over,
            // above its serial so devices do not take ours for an old one.
            desired.scope = scope.clone();
            desired.modules.clear();
        }
        desired.serial += 1;
        desired.modules.retain(|m| m.name != self.module.name);
        desired.modules.push(self.module.clone());
        desired.modules.sort_by(|a, b| a.name.cmp(&b.name));
        let signed = SignedDesired::sign(&desired, &self.key);
        session
            .publish_all(vec![(topic, signed)], |_| {})
            .map_err(|e| coded(Code::Unavailable, e))?;
        Ok(desired.serial)
    }
}

impl PushCommand {
    pub fn execute(self) -> Result<()> {
        let (device, group) = (self.device.as_deref(), self.group.as_deref());
        device.map_or(Ok(()), |d| valid_name(Kind::Device, d))?;
        group.map_or(Ok(()), |g| valid_name(Kind::Group, g))?;
        let release = self.release.load()?;
        let scope = match (self.device, self.group) {
            (Some(d), _) => Scope::Device(d),
            (None, Some(g)) => Scope::Group(g),
            (None, None) => unreachable!("clap requires --device or --group"),
        };
        let mut session = self
            .release
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let chunks = release.upload(&mut session)?;
        let serial = release.set_desired(&mut session, &scope)?;
        session.disconnect();
        let target = match &scope {
            Scope::Device(d) => format!("device {d}"),
            Scope::Group(g) => format!("group {g}"),
        };
        eprintln!(
            "pushed {} ({}, {chunks} chunks) to {target}: desired state serial {serial}",
            release.label(),
            human_size(release.bytes.len() as u64),
        );
        Ok(())
    }
}
