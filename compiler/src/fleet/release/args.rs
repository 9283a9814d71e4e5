//! The flags `push` and `rollout` share ([`ReleaseArgs`]), and how they become a
//! [`Release`]: read, verified or compiled here for the scope's targets.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use kiln_protocol::fleet::{ModuleLimits, Scope, Topics};
use kiln_protocol::manifest::parse_memory_size;
use kiln_protocol::transfer::DEFAULT_CHUNK;
use kiln_protocol::trust::Registry;

use crate::build::args::BuildArgs;
use crate::build::release_file::{decode_file, read_input, FILE_MAGIC};
use crate::build::targets::ResolvedTarget;
use crate::fleet::broker::{BrokerArgs, Session};
use crate::fleet::desired::describe;
use crate::fleet::messages::device_facts;
use crate::fleet::release::{verify_all, Entry, Release, Wire};
use crate::fleet::trust::{Signing, SigningArgs};
use crate::fleet::Error;
use crate::text::human_size;

/// What `push` and `rollout` share: the release, the key, the broker, and how the
/// module should run.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// Artifacts built by `kiln compile` (one per target), a release file from
    /// `kiln release`, or a .wasm/.wat module to compile here for each target
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<PathBuf>,
    /// For a .wasm/.wat input: a target profile or triple to compile for (repeatable);
    /// without it, every target the group's (or the device's) retained status reports
    #[arg(long = "target", value_name = "PROFILE|TRIPLE")]
    pub targets: Vec<String>,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Config bytes for the module, from a file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Tick period for a reactor (at least 1)
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub tick_ms: Option<u64>,
    /// Linear-memory cap: pages or a size (4MiB)
    #[arg(long, value_name = "PAGES|SIZE", value_parser = parse_memory_size)]
    pub memory_limit: Option<u32>,
    /// Fuel per call (the artifact must be compiled with --fuel)
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
    /// Size of the chunks an artifact travels in
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CHUNK,
          value_parser = clap::value_parser!(u32).range(1024..=1_048_576))]
    pub chunk_size: u32,
    /// How artifacts travel
    #[arg(long, value_enum, default_value_t = Wire::Zstd)]
    pub wire: Wire,
    /// Send whole artifacts only: no patches from the versions devices run
    #[arg(long)]
    pub no_delta: bool,
}

impl ReleaseArgs {
    pub fn signing(&self, session: &mut Session) -> Result<Signing> {
        self.signing.signing(session, &self.broker.topics())
    }

    /// Reads, verifies (or compiles) and prepares the release for `scope`.
    pub fn load(&self, session: &mut Session, scope: &Scope) -> Result<Release> {
        let signing = self.signing(session)?;
        let topics = self.broker.topics();
        let mut artifacts = Vec::new();
        let mut sources = Vec::new();
        for input in &self.inputs {
            let bytes = read_input(input)?;
            let file = input.display().to_string();
            let text = input.extension().is_some_and(|e| e == "wat");
            if bytes.starts_with(FILE_MAGIC) {
                let inner =
                    decode_file(&bytes).map_err(|e| Error::Invalid(format!("`{file}`: {e}")))?;
                let n = inner.len();
                artifacts.extend(
                    inner
                        .into_iter()
                        .enumerate()
                        .map(|(i, a)| (format!("{} of {n} in `{file}`", i + 1), a)),
                );
            } else if bytes.starts_with(b"\0asm") || text {
                sources.push((input.clone(), bytes));
            } else {
                artifacts.push((format!("`{file}`"), bytes));
            }
        }
        match (sources.len(), artifacts.is_empty()) {
            (0, _) => {}
            (1, true) => {
                let (input, source) = sources.remove(0);
                let key = signing.keys.first().ok_or_else(|| {
                    Error::usage(anyhow!(
                        "compiling {} needs a key to sign it: --sign",
                        input.display()
                    ))
                })?;
                let targets = self.compile_targets(session, &topics, scope)?;
                for target in targets {
                    let label = target.label();
                    let c = self.build.compile(&input, &source, target, None, key)?;
                    eprintln!(
                        "compiled {} for {label}: artifact {} in {:.2}s",
                        input.display(),
                        human_size(c.bytes.len() as u64),
                        c.compile_time.as_secs_f64()
                    );
                    artifacts.push((format!("{} for {label}", input.display()), c.bytes));
                }
            }
            _ => bail!(Error::Usage(
                "give one .wasm/.wat module, or artifacts and release files, not both".to_string()
            )),
        }
        let built = verify_all(artifacts, &signing.release_keys())?;
        let entry = Entry {
            config: match &self.config {
                Some(path) => read_config(path)?,
                None => Vec::new(),
            },
            limits: ModuleLimits {
                tick_ms: self.tick_ms,
                memory_limit_pages: self.memory_limit,
                fuel_per_call: self.fuel_per_call,
                timeout_ms: self.timeout_ms,
            },
            allow_downgrade: self.allow_downgrade,
            health_window_ms: self.health_window_ms,
            chunk_size: self.chunk_size,
            wire: self.wire,
            delta: !self.no_delta,
        };
        Release::prepare(session, &topics, signing, built, entry, scope)
    }

    /// `--target`, or the targets the devices of `scope` report: for each, the stock
    /// profile of its triple with the most CPU features it has.
    fn compile_targets(
        &self,
        session: &mut Session,
        topics: &Topics,
        scope: &Scope,
    ) -> Result<Vec<ResolvedTarget>> {
        let profiles = self.build.profiles()?;
        if !self.targets.is_empty() {
            return self
                .targets
                .iter()
                .map(|t| {
                    ResolvedTarget::resolve(t, &[], &profiles).map_err(|e| Error::usage(e).into())
                })
                .collect();
        }
        let mut targets: Vec<ResolvedTarget> = Vec::new();
        for facts in device_facts(session, topics, scope)? {
            let target = ResolvedTarget::for_device(&facts.triple, &facts.cpu_features, &profiles)
                .map_err(Error::invalid)?;
            if !targets.iter().any(|t| t.label() == target.label()) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            bail!(Error::usage(anyhow!(
                "no device of {} has reported its target yet; pass --target",
                describe(scope)
            )));
        }
        Ok(targets)
    }
}

fn read_config(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .with_context(|| format!("cannot read config `{}`", path.display()))
        .map_err(Error::unreadable)
}

impl ReleaseArgs {
    /// The registry of the fleet whose root these flags find (`None` without a root),
    /// for the checks before publishing.
    pub fn registry(&self, session: &mut Session, topics: &Topics) -> Result<Option<Registry>> {
        let sign = self.signing.sign.first().map(PathBuf::as_path);
        if self.signing.root.path(sign).is_none() {
            return Ok(None);
        }
        let anchor = self.signing.root.anchor(sign)?;
        let fleet = crate::fleet::trust::Fleet::follow(session, topics, anchor)?;
        Ok(Some(fleet.registry_or_empty(session, topics)?))
    }
}
