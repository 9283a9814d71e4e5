use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::names::Kind;

use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::keyfile;
use crate::fleet::messages::{warn_skipped, Reader};
use crate::fleet::registry::publish_registry;
use crate::fleet::trust::{Fleet, Identity, RootArgs};
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Each device makes its own ed25519 key on first start (identity.key in its data dir)
and signs its status, reported state and events with it. Enrolling records the key in
the fleet's registry (retained on {prefix}/registry, signed by the registry role, or
the release role if the root names none); `kiln devices` then shows which reports
verify, and `kiln rollout` counts only verified reports as success.

Without --key, the key is taken from the device's retained status (check its id
against the one kilnd logs at start: `trust ... identity=<id>`).

Examples:
  kiln enroll dev-01 --sign fleet.key
  kiln enroll --group lab --sign fleet.key
  kiln enroll dev-01 --key dev-01.pub --sign registry.key
  kiln enroll --remove dev-07 --sign fleet.key";

/// Record devices' identity keys in the fleet's registry
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct EnrollCommand {
    /// Devices to enroll
    pub devices: Vec<String>,
    /// Enroll every device whose status names this group
    #[arg(long)]
    pub group: Option<String>,
    /// The device's public key file, instead of the key its status carries (one device)
    #[arg(long, value_name = "PUB")]
    pub key: Option<PathBuf>,
    /// Remove these devices from the registry instead
    #[arg(long, value_name = "DEVICE")]
    pub remove: Vec<String>,
    /// Keys of the registry role (or of the release role) that sign the registry
    #[arg(long, value_name = "KEY", required = true)]
    pub sign: Vec<PathBuf>,
    /// Build on a registry that verifies only under an older root (its signers were
    /// rotated out), after showing it; without this it is refused
    #[arg(long)]
    pub adopt: bool,
    /// The result as one JSON object on stdout (see the JSON shapes in the book)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl EnrollCommand {
    pub fn execute(self) -> Result<()> {
        for d in self.devices.iter().chain(&self.remove) {
            valid_name(Kind::Device, d)?;
        }
        if let Some(g) = &self.group {
            valid_name(Kind::Group, g)?;
        }
        if self.devices.is_empty() && self.group.is_none() && self.remove.is_empty() {
            bail!(coded(
                Code::Usage,
                anyhow!("name devices to enroll, --group, or --remove")
            ));
        }
        if self.key.is_some() && (self.devices.len() != 1 || self.group.is_some()) {
            bail!(coded(Code::Usage, anyhow!("--key is for one device")));
        }
        let keys = keyfile::read_secrets(&self.sign)?;
        let topics = self.broker.topics();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.broker.connect().map_err(unavailable)?;
        let anchor = self.root.anchor(self.sign.first().map(PathBuf::as_path))?;
        let fleet = Fleet::follow(&mut session, &topics, anchor)?;
        let mut registry = fleet.registry(&mut session, &topics, self.adopt)?;
        let statuses = session
            .retained(&topics.all_devices("status"))
            .map_err(unavailable)?;
        let mut wanted = self.devices.clone();
        let (heard, skipped) = Reader::new(&topics, &registry).all(&statuses);
        warn_skipped(&skipped, 5);
        if let Some(g) = &self.group {
            for h in &heard {
                let member = h
                    .status()
                    .and_then(|s| s.facts.as_ref())
                    .is_some_and(|f| f.groups.contains(g));
                if member && !wanted.contains(&h.device) {
                    wanted.push(h.device.clone());
                }
            }
        }
        let mut results = Vec::new();
        for device in &wanted {
            let key = match &self.key {
                Some(path) => keyfile::read_public(path).map_err(|e| coded(Code::Key, e))?,
                None => {
                    let topic = topics.status(device);
                    if let Some(s) = skipped.iter().find(|s| s.topic == topic) {
                        bail!(coded(
                            Code::InvalidInput,
                            anyhow!("{device}'s status: {}", s.reason)
                        ));
                    }
                    let status = heard.iter().find(|h| h.topic == topic).ok_or_else(|| {
                        coded(
                            Code::InvalidInput,
                            anyhow!(
                                "{device} has no retained status: start it once, or pass --key"
                            ),
                        )
                    })?;
                    match &status.identity {
                        Identity::Verified => registry.key_of(device).ok_or_else(|| {
                            coded(Code::Failure, anyhow!("{device}: enrolled key vanished"))
                        })?,
                        Identity::Unenrolled(key) | Identity::Mismatch(key) => key.clone(),
                        Identity::Unsigned => bail!(coded(
                            Code::InvalidInput,
                            anyhow!("{device}'s status is not signed (a kilnd before device identities)")
                        )),
                    }
                }
            };
            let change = match registry.key_of(device) {
                Some(old) if old == key => "unchanged",
                Some(_) => "replaced",
                None => "enrolled",
            };
            results.push(serde_json::json!({
                "device": device,
                "key": key.id().to_string(),
                "change": change,
            }));
            if !self.json {
                match registry.key_of(device) {
                    Some(old) if old == key => {
                        println!("{device}: already enrolled, key {}", key.id())
                    }
                    Some(old) => println!("{device}: key {} replaces {}", key.id(), old.id()),
                    None => println!("{device}: enrolled, key {}", key.id()),
                }
            }
            registry.enroll(device, &key);
        }
        let mut removed = Vec::new();
        for device in &self.remove {
            if registry.key_of(device).is_some() {
                registry.devices.retain(|e| e.device != *device);
                if !self.json {
                    println!("{device}: removed");
                }
                removed.push(device.clone());
            }
        }
        publish_registry(&mut session, &topics, &fleet, &keys, &mut registry)?;
        session.disconnect();
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "registry_serial": registry.serial,
                    "devices": registry.devices.len(),
                    "enrolled": results,
                    "removed": removed,
                })
            );
        } else {
            println!(
                "registry serial {}: {} devices enrolled",
                registry.serial,
                registry.devices.len()
            );
        }
        Ok(())
    }
}
