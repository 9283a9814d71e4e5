use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::fleet::{Scope, SignedDesired, Topics};
use kiln_protocol::names::Kind;
use kiln_protocol::trust::Registry;

use crate::exit::{coded, Code};
use crate::fleet::answers::{await_answers, results, Confirmation, Convergence, DeviceResult};
use crate::fleet::broker::{now_ms, Session};
use crate::fleet::desired::{describe, scope_json, NextDesired};
use crate::fleet::messages::{online_targets, seen};
use crate::fleet::preflight;
use crate::fleet::release::{Release, ReleaseArgs};
use crate::fleet::trust::{
    describe_state, describe_state_full, encode_state, read_state, Opened, STATE_MAGIC,
};
use crate::names::valid_name;

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
  kiln push app.kiln --group lab --sign fleet.key --mirror-dir /srv/kiln \
      --mirror-url https://mirror.lan/kiln                      # chunks from a mirror too
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
    /// Also write each transfer's chunk list and chunks as static files under DIR
    /// (artifacts/SHA256/list, artifacts/SHA256/N), for an HTTP(S) mirror: a static
    /// file server's root, or synced to an object store or a CDN
    #[arg(long, value_name = "DIR")]
    pub mirror_dir: Option<PathBuf>,
    /// A mirror's base URL (http:// or https://) the signed desired state names:
    /// devices fetch chunks there first and from the broker if it fails (repeatable,
    /// up to 4; without it the state keeps the mirrors it names)
    #[arg(long = "mirror-url", value_name = "URL")]
    pub mirror_urls: Vec<String>,
    /// Name no mirror in the desired state: devices fetch from the broker only
    #[arg(long, conflicts_with = "mirror_urls")]
    pub no_mirror: bool,
    #[command(flatten)]
    pub release: ReleaseArgs,
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
        let mirrors = self.mirrors()?;
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let topics = self.release.broker.topics();
        // What can be known before anything is compiled, uploaded or published.
        let registry = self.release.registry(&mut session, &topics)?;
        let seen = seen(&mut session, &topics, registry.as_ref())?;
        if let Some(r) = preflight::scope_refusal(&scope, &seen) {
            if !self.force {
                bail!(r.error(format!("not published: {r}")));
            }
            eprintln!("warning: {r} (--force: publishing anyway)");
        }
        let mut release = self.release.load(&mut session, &scope)?;
        release.mirrors = mirrors;
        release.check(&scope, &seen, self.force)?;
        let next = release.next_desired(&mut session, &scope)?;
        if self.dry_run {
            session.disconnect();
            return self.print_dry_run(&next, &release);
        }
        if let Some(dir) = &self.mirror_dir {
            let w = crate::fleet::mirror::write(dir, &release.transfers)?;
            eprintln!(
                "{}: mirror dir {}: {} files written, {} already there ({})",
                release.label(),
                dir.display(),
                w.written,
                w.kept,
                crate::text::human_size(w.bytes)
            );
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

    /// The mirrors the state is to name: `--mirror-url`s (each checked as a device
    /// will read it), none with `--no-mirror`, else `None` (those it names now).
    fn mirrors(&self) -> Result<Option<Vec<String>>> {
        use kiln_protocol::mirror::{MirrorUrl, MAX_MIRRORS};
        if self.no_mirror {
            return Ok(Some(Vec::new()));
        }
        if self.mirror_urls.is_empty() {
            return Ok(None);
        }
        if self.mirror_urls.len() > MAX_MIRRORS {
            bail!(coded(
                Code::Usage,
                anyhow!(
                    "{} --mirror-urls (devices read at most {MAX_MIRRORS})",
                    self.mirror_urls.len()
                )
            ));
        }
        for url in &self.mirror_urls {
            MirrorUrl::parse(url).map_err(|e| coded(Code::Usage, anyhow!("--mirror-url: {e}")))?;
        }
        Ok(Some(self.mirror_urls.clone()))
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
        let rows = results(
            &confirmation,
            self.wait.then_some(&convergence),
            &unverified,
            confirm_for,
            Duration::from_millis(self.wait_timeout),
            what.version,
        );
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
