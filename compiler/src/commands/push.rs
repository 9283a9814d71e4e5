use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use kiln_protocol::fleet::{
    Desired, DesiredModule, DeviceFacts, EventKind, EventV1, ModuleLimits, ModuleState, ReportedV1,
    Scope, SignedDesired, StatusV2, Topics, MAX_DESIRED,
};
use kiln_protocol::manifest::parse_memory_size;
use kiln_protocol::names::Kind;
use kiln_protocol::transfer::DEFAULT_CHUNK;

use crate::build::args::BuildArgs;
use crate::build::release_file::{decode_file, read_input, FILE_MAGIC};
use crate::build::targets::ResolvedTarget;
use crate::exit::{coded, Code};
use crate::fleet::broker::{now_ms, BrokerArgs, Session};
use crate::fleet::messages::{warn_skipped, Body, Heard, Reader};
use crate::fleet::preflight;
use crate::fleet::release::{verify_all, Entry, Release, Wire};
use crate::fleet::serial::{next_serial, warn_ignored, Claim};
use crate::fleet::trust::{
    describe_state, describe_state_full, encode_state, read_state, Identity, Opened, Signing,
    SigningArgs, STATE_MAGIC,
};
use crate::names::valid_name;
use crate::text::human_size;
use kiln_protocol::trust::Registry;

const AFTER_HELP: &str = "\
A release is one artifact per target; each device takes its own. Each artifact goes to
retained topics under artifacts/{sha256}/ zstd-compressed, with a patch from every
version the targeted devices report running (--no-delta: none; --wire raw: the bytes
as they are). Then the signed desired state for the device or group is updated (other
modules in it are kept). Devices that are offline converge when they come back.

Before anything is uploaded, push refuses what the devices would refuse, naming the
device and the reason: a device or group no device has been seen in (exit 68), an
artifact for another target, a version below what a device runs, --fuel-per-call on
an unmetered artifact, a module that is neither a WASI command nor a reactor (78).
--force publishes anyway where the operator may know better (a device not started
yet, another target); --allow-downgrade makes a lower version one devices take.
The result goes to stdout (--json: one object); progress to stderr.

To sign apart from publishing (the release key never meets the broker's credentials),
a signer builds the release with `kiln release`, the publisher uploads it and writes
the state with --unsigned, each signer adds a signature with `kiln sign`, and the
publisher publishes the file with `kiln push FILE` (the last four examples).

Examples:
  kiln push app.kiln --device dev-01 --sign fleet.key
  kiln push app.wasm --group lab --version 3 --sign fleet.key   # compiled for the group's targets
  kiln push app-aarch64.kiln app-riscv64.kiln --group lab --sign fleet.key
  kiln push app.kilnrel --group lab --sign fleet.key            # from `kiln release`
  kiln push app.kiln --group lab --sign fleet.key --broker mqtt://broker.lan:1883 --config app.conf
  kiln push app.kiln --device dev-01 --sign fleet.key --allow-downgrade   # roll back on purpose
  kiln push app.kiln --group lab --sign fleet.key --dry-run     # the state it would publish
  kiln push app.kiln --group lab --sign fleet.key --wait --json # each device's outcome
  kiln push app.kiln --device dev-09 --sign fleet.key --force   # a device not started yet
  kiln release app.wasm --target aarch64-linux --sign release.key -o app.kilnrel   # signer
  kiln push app.kilnrel --group lab --unsigned lab.kilnstate                       # publisher
  kiln sign lab.kilnstate --key release.key                                        # signer(s)
  kiln push lab.kilnstate                                                          # publisher";

/// Publish an artifact to the broker and make it the desired version of its module on a
/// device or a group
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct PushCommand {
    /// Device id to update
    #[arg(long, conflicts_with = "group")]
    pub device: Option<String>,
    /// Group to update
    #[arg(long)]
    pub group: Option<String>,
    /// How long to wait for online devices to take the new desired state (0: do not wait)
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub confirm_timeout_s: u64,
    /// Upload the transfers, then write the desired state unsigned to FILE for
    /// `kiln sign` instead of publishing it (no key needed)
    #[arg(long, value_name = "FILE", conflicts_with = "sign")]
    pub unsigned: Option<PathBuf>,
    /// Check and sign, then print the desired state that would be published, in full,
    /// on stdout; nothing is uploaded or published
    #[arg(long)]
    pub dry_run: bool,
    /// After publishing, wait until every online device of the scope runs the new
    /// version (or fails it) and report each; non-zero if any failed or did not finish
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::fleet::trust::parse_duration)]
    pub wait_timeout: u64,
    /// Publish although no device of the scope has been seen, or some have a target
    /// the release has no artifact for
    #[arg(long)]
    pub force: bool,
    /// The result as one JSON object on stdout (see the JSON shapes in the book)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

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
                let inner = decode_file(&bytes)
                    .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
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
                    coded(
                        Code::Usage,
                        anyhow!(
                            "compiling {} needs a key to sign it: --sign",
                            input.display()
                        ),
                    )
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
            _ => bail!(coded(
                Code::Usage,
                anyhow!("give one .wasm/.wat module, or artifacts and release files, not both")
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
                    ResolvedTarget::resolve(t, &[], &profiles).map_err(|e| coded(Code::Usage, e))
                })
                .collect();
        }
        let mut targets: Vec<ResolvedTarget> = Vec::new();
        for facts in device_facts(session, topics, scope)? {
            let target = ResolvedTarget::for_device(&facts.triple, &facts.cpu_features, &profiles)
                .map_err(|e| coded(Code::InvalidInput, e))?;
            if !targets.iter().any(|t| t.label() == target.label()) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            bail!(coded(
                Code::Usage,
                anyhow!(
                    "no device of {} has reported its target yet; pass --target",
                    describe(scope)
                )
            ));
        }
        Ok(targets)
    }
}

fn read_config(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("cannot read config `{}`", path.display()))
        .map_err(|e| coded(Code::NoInput, e))
}

/// The facts of the devices of `scope`, from their retained status (an offline
/// device's last will keeps them).
fn device_facts(session: &mut Session, topics: &Topics, scope: &Scope) -> Result<Vec<DeviceFacts>> {
    Ok(statuses(session, topics, scope)?
        .into_iter()
        .filter_map(|(_, s)| s.facts)
        .collect())
}

/// The retained status of every device of `scope`: the device, or the devices whose
/// status names the group.
fn statuses(
    session: &mut Session,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<(String, StatusV2)>> {
    let filter = match scope {
        Scope::Device(d) => topics.status(d),
        Scope::Group(_) => topics.all_devices("status"),
    };
    let retained = session
        .retained(&filter)
        .map_err(|e| coded(Code::Unavailable, e))?;
    // Facts only (which targets, who is online): no identity is judged from them.
    let registry = Registry::default();
    let (heard, skipped) = Reader::new(topics, &registry).all(&retained);
    warn_skipped(&skipped, 5);
    Ok(heard
        .into_iter()
        .filter_map(|h| {
            let s = h.status()?.clone();
            let targeted = match scope {
                Scope::Device(d) => *d == h.device,
                Scope::Group(g) => s.facts.as_ref().is_some_and(|f| f.groups.contains(g)),
            };
            targeted.then_some((h.device, s))
        })
        .collect())
}

impl Release {
    /// The desired state of `scope` with this release as its module's entry (the
    /// other modules kept), signed and ready to publish.
    pub fn next_desired(&self, session: &mut Session, scope: &Scope) -> Result<NextDesired> {
        let module = self.module.clone();
        prepare_desired(session, &self.signing, &self.topics, scope, |modules| {
            modules.retain(|m| m.name != module.name);
            modules.push(module);
        })
    }

    /// Makes this release the desired version of its module for `scope`; returns the
    /// new serial.
    pub fn set_desired(&self, session: &mut Session, scope: &Scope) -> Result<u64> {
        let next = self.next_desired(session, scope)?;
        next.publish(session)
    }
}

/// A signed desired state, not published yet.
pub struct NextDesired {
    pub topic: String,
    pub desired: Desired,
    pub signed: Vec<u8>,
}

impl NextDesired {
    /// Publishes it retained and waits for the broker's acknowledgement; returns the
    /// serial.
    pub fn publish(self, session: &mut Session) -> Result<u64> {
        session
            .publish_all(vec![(self.topic, self.signed)], |_| {})
            .map_err(|e| coded(Code::Unavailable, e))?;
        Ok(self.desired.serial)
    }
}

fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Device(d) => format!("device {d}"),
        Scope::Group(g) => format!("group {g}"),
    }
}

/// Reads the current desired state of `scope`, lets `edit` change its module list,
/// and signs the result under a new serial (see [`crate::fleet::serial`]).
pub fn prepare_desired(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    scope: &Scope,
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let unavailable = |e| coded(Code::Unavailable, e);
    let topic = match scope {
        Scope::Device(d) => topics.desired(d),
        Scope::Group(g) => topics.group_desired(g),
    };
    let current = session.retained(&topic).map_err(unavailable)?;
    let heard = device_reports(session, signing, topics, scope)?;
    build_desired(
        signing,
        scope,
        topic.clone(),
        current.get(&topic).map(Vec::as_slice),
        &crate::fleet::serial::claims(&heard, scope),
        edit,
    )
}

/// [`prepare_desired`] for many devices with a few retained reads in all (a rollout's
/// wave of a thousand devices would otherwise make thousands of round trips).
pub fn prepare_for_devices(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    devices: &[String],
    mut edit: impl FnMut(&str, &mut Vec<DesiredModule>),
) -> Result<Vec<NextDesired>> {
    let unavailable = |e| coded(Code::Unavailable, e);
    let current = session
        .retained(&topics.all_devices("desired"))
        .map_err(unavailable)?;
    let heard = device_reports(session, signing, topics, &Scope::Group(String::new()))?;
    devices
        .iter()
        .map(|device| {
            let topic = topics.desired(device);
            let scope = Scope::Device(device.clone());
            build_desired(
                signing,
                &scope,
                topic.clone(),
                current.get(&topic).map(Vec::as_slice),
                &crate::fleet::serial::claims(&heard, &scope),
                |m| edit(device, m),
            )
        })
        .collect()
}

/// The retained statuses and reports of the devices `scope` may hold (a group's
/// members say so in their statuses), judged by the one reader.
fn device_reports(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<Heard>> {
    let unavailable = |e| coded(Code::Unavailable, e);
    let registry = signing.registry(session, topics)?;
    let mut retained = BTreeMap::new();
    let kinds: &[&str] = match scope {
        Scope::Device(d) => {
            retained.extend(session.retained(&topics.reported(d)).map_err(unavailable)?);
            &[]
        }
        Scope::Group(_) => &["status", "reported"],
    };
    for kind in kinds {
        retained.extend(
            session
                .retained(&topics.all_devices(kind))
                .map_err(unavailable)?,
        );
    }
    let (heard, skipped) = Reader::new(topics, registry).all(&retained);
    warn_skipped(&skipped, 5);
    Ok(heard)
}

/// The next desired state of `scope`, from the one retained on its topic (if it is
/// trusted under the current root, or adopted) and what its devices claim.
fn build_desired(
    signing: &Signing,
    scope: &Scope,
    topic: String,
    current: Option<&[u8]>,
    claims: &[Claim],
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let target = describe(scope);
    let (retained_serial, modules) = match current {
        Some(payload) => {
            let d = match signing.fleet.open_desired(payload) {
                Ok(Opened::Trusted(d)) => d,
                Ok(Opened::Revoked { doc, root }) if signing.adopt => {
                    eprintln!(
                        "adopting the desired state of {target} signed under root v{root} (keys since rotated out): {}",
                        describe_state(&doc)
                    );
                    doc
                }
                Ok(Opened::Revoked { root, .. }) if signing.replace_untrusted => {
                    eprintln!(
                        "replacing the desired state of {target} signed under root v{root} (keys since rotated out): its modules are dropped"
                    );
                    return finish_desired(signing, scope, topic, None, Vec::new(), claims, edit);
                }
                Err(e) if signing.replace_untrusted => {
                    eprintln!("replacing the untrusted desired state of {target} ({e}): its modules are dropped");
                    return finish_desired(signing, scope, topic, None, Vec::new(), claims, edit);
                }
                Ok(Opened::Revoked { doc, root }) => bail!(coded(
                    Code::Key,
                    anyhow!(
                        "the current desired state of {target} was signed under root v{root} by keys since rotated out ({}); building on it would re-sign it with today's keys: review it and pass --adopt, or --replace-untrusted to start from no modules",
                        describe_state(&doc)
                    )
                )),
                Err(e) => bail!(coded(
                    Code::Key,
                    anyhow!("the current desired state of {target} is not trusted ({e}); refusing to build on it (--replace-untrusted starts from no modules)"),
                )),
            };
            // Not this target's state (a stray or mis-addressed message): start over,
            // above its serial so devices do not take ours for an old one.
            let modules = if d.scope == *scope {
                d.modules
            } else {
                Vec::new()
            };
            (Some(d.serial), modules)
        }
        None => (None, Vec::new()),
    };
    finish_desired(
        signing,
        scope,
        topic,
        retained_serial,
        modules,
        claims,
        edit,
    )
}

/// The new state: `modules` edited, under the next serial, signed.
fn finish_desired(
    signing: &Signing,
    scope: &Scope,
    topic: String,
    retained_serial: Option<u64>,
    mut modules: Vec<DesiredModule>,
    claims: &[Claim],
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let target = describe(scope);
    let next = next_serial(retained_serial, claims, now_ms());
    warn_ignored(&next, &target);
    let serial = next.serial;
    edit(&mut modules);
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    let now = now_ms();
    let desired = Desired {
        fleet: signing.fleet.root().fleet.clone(),
        scope: scope.clone(),
        serial,
        issued_ms: now,
        expires_ms: now.saturating_add(signing.valid_ms),
        modules,
    };
    let signed = signing.sign(&desired)?;
    if signed.len() > MAX_DESIRED {
        bail!(coded(
            Code::InvalidInput,
            anyhow!(
                "the desired state of {target} would be {} bytes, more than devices read ({MAX_DESIRED}); fewer modules or a smaller config",
                signed.len()
            )
        ));
    }
    Ok(NextDesired {
        topic,
        desired,
        signed,
    })
}

/// What the devices said about a new desired state. Pure: the driver feeds it what
/// the broker delivers on their `reported` and `events` topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    serial: u64,
    pending: BTreeSet<String>,
    pub confirmed: Vec<String>,
    /// `(device, reason)` for every device that refused the state.
    pub refused: Vec<(String, String)>,
    /// Pending devices whose report names a serial above this state's: a newer state,
    /// or a fast-forward (never counted as confirmed).
    pub above: BTreeMap<String, u64>,
}

/// One message from a device, decoded.
pub enum Answer {
    Reported(ReportedV1),
    Event(EventV1),
}

impl Confirmation {
    pub fn new(serial: u64, devices: impl IntoIterator<Item = String>) -> Self {
        Self {
            serial,
            pending: devices.into_iter().collect(),
            confirmed: Vec::new(),
            refused: Vec::new(),
            above: BTreeMap::new(),
        }
    }

    /// A device confirms by reporting exactly the new serial; it refuses with
    /// a rejection of the desired state as a whole (module `*`: a stale serial, an
    /// untrusted signature, a wrong address). Other devices and messages are ignored.
    pub fn heard(&mut self, device: &str, message: Answer) {
        if !self.pending.contains(device) {
            return;
        }
        match message {
            // Exactly this serial. A report of a higher one is not this state taken:
            // a newer state, or one a leaked key fast-forwarded, which makes the
            // device refuse this one. Said as such, never as "took".
            Answer::Reported(r) if r.serial == self.serial => {
                self.pending.remove(device);
                self.confirmed.push(device.to_string());
            }
            // Still pending (the retained report may predate this state), but said
            // if nothing else comes.
            Answer::Reported(r) if r.serial > self.serial => {
                self.above.insert(device.to_string(), r.serial);
            }
            Answer::Event(e) if e.module == "*" => {
                if let EventKind::Rejected { reason } = e.kind {
                    self.pending.remove(device);
                    self.refused.push((device.to_string(), reason));
                }
            }
            _ => {}
        }
    }

    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Devices that have said nothing about the new state yet.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.pending.iter().map(String::as_str)
    }
}

/// The devices targeted by `scope` that are online now, by their retained status.
fn online_targets(session: &mut Session, topics: &Topics, scope: &Scope) -> Result<Vec<String>> {
    Ok(statuses(session, topics, scope)?
        .into_iter()
        .filter(|(_, s)| s.online)
        .map(|(device, _)| device)
        .collect())
}

/// What waits on devices' answers: a confirmation of a state, or `--wait`'s convergence.
trait Answers {
    fn done(&self) -> bool;
    fn heard(&mut self, device: &str, message: Answer);
}

impl Answers for Confirmation {
    fn done(&self) -> bool {
        Confirmation::done(self)
    }
    fn heard(&mut self, device: &str, message: Answer) {
        Confirmation::heard(self, device, message)
    }
}

impl Answers for Convergence {
    fn done(&self) -> bool {
        Convergence::done(self)
    }
    fn heard(&mut self, device: &str, message: Answer) {
        Convergence::heard(self, device, message)
    }
}

/// Feeds the devices' answers to `answers` until all have answered or `limit` has
/// passed. A message signed by another key than the device's enrolled one is forged
/// (or from a re-provisioned device) and never counts (said on stderr where `warn`);
/// the devices whose answers could not be verified are returned.
fn await_answers(
    session: &mut Session,
    topics: &Topics,
    registry: &Registry,
    answers: &mut impl Answers,
    limit: Duration,
    warn: bool,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + limit;
    let mut unverified = BTreeSet::new();
    while !answers.done() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some((topic, payload)) = session
            .next_message(left)
            .map_err(|e| coded(Code::Unavailable, e))?
        else {
            continue;
        };
        let heard = match Reader::new(topics, registry).open(&topic, &payload) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(skipped) => {
                if warn {
                    eprintln!("warning: skipped {skipped}");
                }
                continue;
            }
        };
        let device = heard.device.as_str();
        match &heard.identity {
            Identity::Verified => {}
            Identity::Mismatch(key) => {
                if warn {
                    eprintln!(
                        "warning: a message for {device} is signed by key {}, not its enrolled key: ignored",
                        key.id()
                    );
                }
                continue;
            }
            Identity::Unenrolled(_) | Identity::Unsigned => {
                unverified.insert(device.to_string());
            }
        }
        let answer = match heard.body {
            Body::Reported(r) => Answer::Reported(r),
            Body::Event(e) => Answer::Event(e),
            Body::Status(_) => continue,
        };
        answers.heard(&heard.device, answer);
    }
    Ok(unverified)
}

impl PushCommand {
    pub fn execute(self) -> Result<()> {
        let state_file = match self.release.inputs.as_slice() {
            [one] => std::fs::File::open(one)
                .and_then(|mut f| {
                    let mut head = [0u8; STATE_MAGIC.len()];
                    std::io::Read::read_exact(&mut f, &mut head).map(|()| head)
                })
                .is_ok_and(|head| head == STATE_MAGIC),
            _ => false,
        };
        if state_file {
            return self.publish_state_file();
        }
        let scope = self.scope()?;
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let topics = self.release.broker.topics();
        // What can be known before anything is compiled, uploaded or published.
        let registry = self.release.registry(&mut session, &topics)?;
        let seen = seen(&mut session, &topics, registry.as_ref())?;
        if let Some(r) = preflight::scope_refusal(&scope, &seen) {
            if !self.force {
                bail!(coded(r.code(), anyhow!("not published: {r}")));
            }
            eprintln!("warning: {r} (--force: publishing anyway)");
        }
        let mut release = self.release.load(&mut session, &scope)?;
        release.check(&scope, &seen, self.force)?;
        let next = release.next_desired(&mut session, &scope)?;
        if self.dry_run {
            session.disconnect();
            return self.print_dry_run(&next, &release);
        }
        let messages = release.upload(&mut session)?;
        // Signed again after the upload: the serial must be above anything a device
        // applied meanwhile (the upload of a large release takes a while).
        let next = release.next_desired(&mut session, &scope)?;
        if let Some(path) = &self.unsigned {
            session.disconnect();
            return write_unsigned(path, &next, &release, messages);
        }
        let registry = release
            .signing
            .fleet
            .registry_or_empty(&mut session, &topics)?;
        let summary = format!(
            "{} ({}; {messages} messages)",
            release.label(),
            release.summary()
        );
        let what = Pushed {
            module: release.module.name.clone(),
            version: release.module.version,
            messages,
            summary,
        };
        self.publish_and_confirm(session, &topics, &registry, next, &scope, what)
    }

    /// `--dry-run`: the state that would be published, in full, on stdout.
    fn print_dry_run(&self, next: &NextDesired, release: &Release) -> Result<()> {
        let body = postcard::to_stdvec(&next.desired).unwrap_or_default();
        let full = describe_state_full(&next.desired, &kiln_protocol::fleet::sha256(&body));
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "dry_run": true,
                    "scope": scope_json(&next.desired.scope),
                    "module": release.module.name,
                    "version": release.module.version,
                    "serial": next.desired.serial,
                    "topic": next.topic,
                    "transfers": release.transfers.len(),
                    "state": full,
                })
            );
        } else {
            print!("{full}");
            eprintln!(
                "dry run: nothing uploaded or published ({} would go out as {} transfer(s))",
                release.label(),
                release.transfers.len()
            );
        }
        Ok(())
    }

    fn scope(&self) -> Result<Scope> {
        let (device, group) = (self.device.as_deref(), self.group.as_deref());
        device.map_or(Ok(()), |d| valid_name(Kind::Device, d))?;
        group.map_or(Ok(()), |g| valid_name(Kind::Group, g))?;
        match (&self.device, &self.group) {
            (Some(d), _) => Ok(Scope::Device(d.clone())),
            (None, Some(g)) => Ok(Scope::Group(g.clone())),
            (None, None) => Err(coded(
                Code::Usage,
                anyhow!("say which devices: --device ID or --group NAME"),
            )),
        }
    }

    /// `kiln push lab.kilnstate`: publishes a state signed elsewhere, after checking
    /// what a device will check (threshold, fleet, expiry) and that the broker's state
    /// has not moved past it meanwhile.
    fn publish_state_file(self) -> Result<()> {
        let path = &self.release.inputs[0];
        let file = path.display();
        let signed = read_state(path)?;
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let topics = self.release.broker.topics();
        let signing = self.release.signing(&mut session)?;
        let desired = SignedDesired::open(&signed, signing.fleet.root())
            .map_err(|e| coded(Code::Key, anyhow!("`{file}`: {e}")))?;
        desired.check_fresh(now_ms()).map_err(|e| {
            coded(
                Code::InvalidInput,
                anyhow!("`{file}`: {e}; prepare it again"),
            )
        })?;
        let topic = match &desired.scope {
            Scope::Device(d) => topics.desired(d),
            Scope::Group(g) => topics.group_desired(g),
        };
        let retained = session.retained(&topic).map_err(unavailable)?;
        if let Some(current) = retained.get(&topic) {
            if let Ok(Opened::Trusted(d) | Opened::Revoked { doc: d, .. }) =
                signing.fleet.open_desired(current)
            {
                if d.serial >= desired.serial {
                    bail!(coded(
                        Code::InvalidInput,
                        anyhow!(
                            "`{file}`: {} already holds serial {} (this state is serial {}); prepare it again",
                            describe(&desired.scope),
                            d.serial,
                            desired.serial
                        )
                    ));
                }
            }
        }
        let registry = signing.fleet.registry_or_empty(&mut session, &topics)?;
        let what = Pushed {
            module: String::new(),
            version: 0,
            messages: 0,
            summary: describe_state(&desired),
        };
        let scope = desired.scope.clone();
        let next = NextDesired {
            topic,
            desired,
            signed,
        };
        self.publish_and_confirm(session, &topics, &registry, next, &scope, what)
    }

    fn publish_and_confirm(
        &self,
        mut session: Session,
        topics: &Topics,
        registry: &Registry,
        next: NextDesired,
        scope: &Scope,
        what: Pushed,
    ) -> Result<()> {
        let unavailable = |e| coded(Code::Unavailable, e);
        let online = if self.confirm_timeout_s > 0 || self.wait {
            online_targets(&mut session, topics, scope)?
        } else {
            Vec::new()
        };
        // Subscribed before the state goes out, so no answer can be missed.
        if !online.is_empty() {
            let (reported, events) = match scope {
                Scope::Device(d) => (topics.reported(d), topics.events(d)),
                Scope::Group(_) => (topics.all_devices("reported"), topics.all_devices("events")),
            };
            session.subscribe(&reported).map_err(unavailable)?;
            session.subscribe(&events).map_err(unavailable)?;
        }
        let serial = next.publish(&mut session)?;
        let target = describe(scope);
        if !self.json {
            println!(
                "pushed {} to {target}: desired state serial {serial}",
                what.summary
            );
        }
        let mut confirmation = Confirmation::new(serial, online.clone());
        let confirm_for =
            Duration::from_secs(self.confirm_timeout_s.max(u64::from(self.wait) * 30));
        let mut waited = await_answers(
            &mut session,
            topics,
            registry,
            &mut confirmation,
            confirm_for,
            true,
        );
        // --wait: each device that took the state, until it runs the version or fails.
        let mut convergence = Convergence::new(
            &what.module,
            what.version,
            confirmation.confirmed.iter().cloned(),
        );
        if self.wait && waited.is_ok() && !what.module.is_empty() {
            waited = await_answers(
                &mut session,
                topics,
                registry,
                &mut convergence,
                Duration::from_millis(self.wait_timeout),
                false,
            )
            .map(|more| {
                let mut all = waited.unwrap_or_default();
                all.extend(more);
                all
            });
        }
        session.disconnect();
        let unverified = waited?;
        let mut rows: Vec<DeviceResult> = Vec::new();
        for device in &confirmation.confirmed {
            let mut row = DeviceResult {
                device: device.clone(),
                result: "took",
                reason: None,
                verified: !unverified.contains(device),
            };
            if self.wait {
                match convergence.outcome(device) {
                    Some(Ok(())) => row.result = "running",
                    Some(Err(why)) => {
                        row.result = "failed";
                        row.reason = Some(why.to_string());
                    }
                    None => {
                        row.result = "pending";
                        row.reason = Some(format!(
                            "took the state but did not run v{} within {}s",
                            what.version,
                            self.wait_timeout / 1000
                        ));
                    }
                }
            }
            rows.push(row);
        }
        for device in confirmation.pending() {
            let reason = match confirmation.above.get(device) {
                Some(above) => format!(
                    "not confirmed after {}s: it reports serial {above}, above this state's {} (a newer state, or a fast-forward it keeps until the key that signed it is rotated out)",
                    confirm_for.as_secs(),
                    confirmation.serial
                ),
                None => format!(
                    "not confirmed after {}s (offline or busy); it converges when it takes the retained state",
                    confirm_for.as_secs()
                ),
            };
            rows.push(DeviceResult {
                device: device.to_string(),
                result: "pending",
                reason: Some(reason),
                verified: false,
            });
        }
        for (device, reason) in &confirmation.refused {
            rows.push(DeviceResult {
                device: device.clone(),
                result: "refused",
                reason: Some(reason.clone()),
                verified: !unverified.contains(device),
            });
        }
        rows.sort_by(|a, b| a.device.cmp(&b.device));
        if self.json {
            let devices: Vec<serde_json::Value> = rows.iter().map(DeviceResult::json).collect();
            println!(
                "{}",
                serde_json::json!({
                    "scope": scope_json(scope),
                    "module": (!what.module.is_empty()).then_some(&what.module),
                    "version": (!what.module.is_empty()).then_some(what.version),
                    "serial": serial,
                    "messages": what.messages,
                    "devices": devices,
                })
            );
        } else {
            for row in &rows {
                let note = if row.result != "pending" && !row.verified {
                    " (its report is not from an enrolled key: `kiln enroll`)"
                } else {
                    ""
                };
                match (row.result, &row.reason) {
                    ("took", _) => println!("  {}: took serial {serial}{note}", row.device),
                    ("running", _) => println!(
                        "  {}: runs {} v{}{note}",
                        row.device, what.module, what.version
                    ),
                    (word, Some(why)) => println!("  {}: {word}: {why}{note}", row.device),
                    (word, None) => println!("  {}: {word}{note}", row.device),
                }
            }
        }
        let refused: Vec<String> = rows
            .iter()
            .filter(|r| matches!(r.result, "refused" | "failed"))
            .map(|r| format!("{}: {}", r.device, r.reason.as_deref().unwrap_or("")))
            .collect();
        if !refused.is_empty() {
            return Err(coded(
                Code::Refused,
                anyhow!(
                    "desired state serial {serial} of {target} refused by {}",
                    refused.join("; ")
                ),
            ));
        }
        if self.wait {
            let pending: Vec<&str> = rows
                .iter()
                .filter(|r| r.result == "pending")
                .map(|r| r.device.as_str())
                .collect();
            if !pending.is_empty() {
                return Err(coded(
                    Code::Failure,
                    anyhow!(
                        "{target}: {} did not converge within --wait-timeout",
                        pending.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What a push published, for its result.
pub struct Pushed {
    /// Empty for a state file (it may hold many modules).
    module: String,
    version: u64,
    messages: usize,
    summary: String,
}

/// One device's answer, as printed and in `--json`.
struct DeviceResult {
    device: String,
    /// `took`, `running`, `failed`, `refused` or `pending`.
    result: &'static str,
    reason: Option<String>,
    verified: bool,
}

impl DeviceResult {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "result": self.result,
            "reason": self.reason,
            "verified": self.verified,
        })
    }
}

/// `{"device": ID}` or `{"group": NAME}`.
pub fn scope_json(scope: &Scope) -> serde_json::Value {
    match scope {
        Scope::Device(d) => serde_json::json!({ "device": d }),
        Scope::Group(g) => serde_json::json!({ "group": g }),
    }
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

/// Every device the broker retains anything for, with its facts and reported state
/// (judged by the one reader). Where the fleet enrolls devices (`registry` holds any),
/// a device whose status or report is not signed by its enrolled key is left out and
/// named: one lying device cannot block every push. Where nobody is enrolled, what is
/// retained counts as it is.
pub fn seen(
    session: &mut Session,
    topics: &Topics,
    registry: Option<&Registry>,
) -> Result<Vec<preflight::Seen>> {
    let unavailable = |e| coded(Code::Unavailable, e);
    let empty = Registry::default();
    let registry = registry.unwrap_or(&empty);
    let enrolling = !registry.devices.is_empty();
    let mut left_out = BTreeSet::new();
    let reader = Reader::new(topics, registry);
    let mut by_device: BTreeMap<String, preflight::Seen> = BTreeMap::new();
    for kind in ["status", "reported"] {
        let retained = session
            .retained(&topics.all_devices(kind))
            .map_err(unavailable)?;
        let (heard, skipped) = reader.all(&retained);
        warn_skipped(&skipped, 5);
        for h in heard {
            if enrolling && !h.is_verified() {
                left_out.insert(h.device.clone());
                continue;
            }
            let entry = by_device
                .entry(h.device.clone())
                .or_insert_with(|| preflight::Seen {
                    device: h.device.clone(),
                    ..Default::default()
                });
            match h.body {
                Body::Status(st) => entry.facts = st.facts,
                Body::Reported(r) => entry.reported = Some(r),
                Body::Event(_) => {}
            }
        }
    }
    if !left_out.is_empty() {
        let names: Vec<String> = left_out.into_iter().collect();
        eprintln!(
            "warning: not signed by an enrolled key, so left out of the checks: {}",
            kiln_protocol::rollout::short_list(&names)
        );
    }
    Ok(by_device.into_values().collect())
}

impl Release {
    /// Refuses what the devices of `scope` would refuse (see [`preflight`]); `force`
    /// waives what an operator may know better about, said on stderr.
    pub fn check(&self, scope: &Scope, seen: &[preflight::Seen], force: bool) -> Result<()> {
        let manifests: Vec<&kiln_protocol::manifest::Manifest> =
            self.built.iter().map(|b| &b.manifest).collect();
        let refusals = preflight::check(scope, &self.module, &manifests, seen);
        if let Some((code, line)) = preflight::verdict(&refusals, force) {
            bail!(coded(code, anyhow!(line)));
        }
        for r in refusals.iter().filter(|r| r.forcible()) {
            eprintln!("warning: {r} (--force: publishing anyway)");
        }
        Ok(())
    }
}

/// Whether the devices that took a state run the new version: a report of the module
/// at the version, running, is success; a rollback or rejection of the module (or a
/// report of it failed) is failure. Pure, like [`Confirmation`].
pub struct Convergence {
    module: String,
    version: u64,
    pending: BTreeSet<String>,
    outcomes: BTreeMap<String, Result<(), String>>,
}

impl Convergence {
    pub fn new(module: &str, version: u64, devices: impl IntoIterator<Item = String>) -> Self {
        Self {
            module: module.to_string(),
            version,
            pending: devices.into_iter().collect(),
            outcomes: BTreeMap::new(),
        }
    }

    pub fn heard(&mut self, device: &str, message: Answer) {
        if !self.pending.contains(device) {
            return;
        }
        let outcome = match message {
            Answer::Reported(r) => r
                .modules
                .iter()
                .find(|m| m.name == self.module)
                .and_then(|m| match m.state {
                    // A command that ran to its end and exited 0 did what it was for.
                    ModuleState::Running | ModuleState::Exited if m.version == self.version => {
                        Some(Ok(()))
                    }
                    // Only the version it tried: a first version still downloading is
                    // reported as v0, not failed yet.
                    ModuleState::Failed if m.version == self.version => {
                        Some(Err(format!("failed: {}", m.last_event)))
                    }
                    _ => None,
                }),
            Answer::Event(e)
                if (e.module == self.module && e.version == self.version) || e.module == "*" =>
            {
                match e.kind {
                    EventKind::RolledBack { reason } => Some(Err(format!("rolled back: {reason}"))),
                    EventKind::Rejected { reason } => Some(Err(format!("rejected: {reason}"))),
                    _ => None,
                }
            }
            Answer::Event(_) => None,
        };
        if let Some(o) = outcome {
            self.pending.remove(device);
            self.outcomes.insert(device.to_string(), o);
        }
    }

    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn outcome(&self, device: &str) -> Option<Result<(), &str>> {
        self.outcomes
            .get(device)
            .map(|o| o.as_ref().map(|_| ()).map_err(String::as_str))
    }
}

/// `--unsigned FILE`: the state for `kiln sign`, with what it holds on stderr.
fn write_unsigned(
    path: &Path,
    next: &NextDesired,
    release: &Release,
    messages: usize,
) -> Result<()> {
    crate::files::write_public(path, &encode_state(&next.signed)).map_err(|e| {
        coded(
            Code::CannotWrite,
            anyhow!("cannot write `{}`: {e}", path.display()),
        )
    })?;
    println!(
        "uploaded {} ({}; {messages} messages); wrote the unsigned desired state to {}:\n  {}\nsign it with `kiln sign {} --key release.key` (as many keys as the threshold), then `kiln push {}`",
        release.label(),
        release.summary(),
        path.display(),
        describe_state(&next.desired),
        path.display(),
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(serial: u64) -> Answer {
        Answer::Reported(ReportedV1 {
            serial,
            modules: Vec::new(),
        })
    }

    fn event(module: &str, kind: EventKind) -> Answer {
        Answer::Event(EventV1 {
            at_ms: 0,
            module: module.into(),
            version: 0,
            kind,
        })
    }

    fn app(version: u64, state: ModuleState, last_event: &str) -> Answer {
        Answer::Reported(ReportedV1 {
            serial: 5,
            modules: vec![kiln_protocol::fleet::ModuleReport {
                name: "app".into(),
                version,
                sha256: [0; 32],
                state,
                last_event: last_event.into(),
            }],
        })
    }

    #[test]
    fn a_device_converges_by_running_the_version_and_fails_by_rolling_it_back() {
        let mut c = Convergence::new("app", 2, ["a", "b", "c", "d"].map(String::from));
        // Still downloading its first version: reported as v0 failed, not an answer.
        c.heard("a", app(0, ModuleState::Failed, "downloading 0/2 chunks"));
        c.heard("a", app(1, ModuleState::Running, ""));
        c.heard("a", app(2, ModuleState::Updating, "activated"));
        assert!(c.outcome("a").is_none());
        c.heard("a", app(2, ModuleState::Running, "committed"));
        assert_eq!(c.outcome("a"), Some(Ok(())));
        // A late rollback of another version says nothing about this one.
        let old = EventKind::RolledBack {
            reason: "old".into(),
        };
        c.heard(
            "b",
            Answer::Event(EventV1 {
                at_ms: 0,
                module: "app".into(),
                version: 1,
                kind: old,
            }),
        );
        assert!(c.outcome("b").is_none());
        let crash = EventKind::RolledBack {
            reason: "trap".into(),
        };
        c.heard(
            "b",
            Answer::Event(EventV1 {
                at_ms: 0,
                module: "app".into(),
                version: 2,
                kind: crash,
            }),
        );
        assert_eq!(c.outcome("b"), Some(Err("rolled back: trap")));
        c.heard("c", app(2, ModuleState::Exited, "exited with code 0"));
        assert_eq!(c.outcome("c"), Some(Ok(())));
        assert!(!c.done());
        c.heard(
            "d",
            app(2, ModuleState::Failed, "failed, not restarted: trap"),
        );
        assert!(c.done());
    }

    #[test]
    fn devices_confirm_by_reporting_the_serial_and_refuse_with_a_rejection_of_the_state() {
        let mut c = Confirmation::new(100, ["a", "b", "c"].map(String::from));
        c.heard("a", reported(99)); // the old retained report
        c.heard("x", reported(100)); // not a target
        c.heard("b", event("app", EventKind::Staged));
        let module_level = EventKind::Rejected {
            reason: "version 1 is lower than committed version 2".into(),
        };
        c.heard("b", event("app", module_level));
        assert!(!c.done());
        c.heard("a", reported(100));
        let stale = "desired state serial 100 is older than 200 already applied";
        c.heard(
            "b",
            event(
                "*",
                EventKind::Rejected {
                    reason: stale.into(),
                },
            ),
        );
        // Later messages from a device that has answered change nothing.
        c.heard("b", reported(300));
        assert_eq!(c.confirmed, ["a"]);
        assert_eq!(c.refused, [("b".to_string(), stale.to_string())]);
        assert_eq!(c.pending().collect::<Vec<_>>(), ["c"]);
        // A report above the serial is not this state taken (a newer state, or a
        // fast-forward): noted, never counted as confirmed.
        c.heard("c", reported(u64::MAX - 1));
        assert!(!c.done());
        assert_eq!(c.confirmed, ["a"]);
        assert_eq!(c.above.get("c"), Some(&(u64::MAX - 1)));
        c.heard("c", reported(100));
        assert_eq!(c.confirmed, ["a", "c"]);
    }
}
