use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::names::Kind;
use kiln_protocol::trust::Registry;

use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::keyfile;
use crate::fleet::messages::Reader;
use crate::fleet::registry::remove_from_registry;
use crate::fleet::trust::RootArgs;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Clears everything the broker retains for the device (its status, reported state,
desired state and any other retained topic under devices/DEVICE/) and removes its key
from the registry (signed like `kiln enroll`), so `kiln devices`, rollouts and the
dashboard forget it. Stop kilnd on the device first: a running device publishes its
status again (an online device is refused without --force).

Examples:
  kiln decommission dev-07 --sign fleet.key
  kiln decommission dev-07 --sign fleet.key --force --json   # its kilnd cannot be stopped";

/// Forget a device: clear its retained topics and remove it from the registry
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DecommissionCommand {
    /// Device to forget
    #[arg(value_name = "DEVICE")]
    pub device: String,
    /// Keys of the registry role (or of the release role) that sign the registry
    #[arg(long, value_name = "KEY", required = true)]
    pub sign: Vec<PathBuf>,
    /// Also when the device's retained status says it is online
    #[arg(long)]
    pub force: bool,
    /// Build on a registry that verifies only under an older root, after showing it
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

impl DecommissionCommand {
    pub fn execute(self) -> Result<()> {
        valid_name(Kind::Device, &self.device)?;
        let device = self.device.as_str();
        let keys = keyfile::read_secrets(&self.sign)?;
        let topics = self.broker.topics();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.broker.connect().map_err(unavailable)?;
        let fleet = self
            .root
            .follow_to_sign(&mut session, &topics, &self.sign, &keys)?;
        let filter = format!("{}/devices/{device}/#", topics.prefix());
        let retained = session.retained(&filter).map_err(unavailable)?;
        let status = topics.status(device);
        let empty = Registry::default();
        if let Some(Ok(Some(h))) = retained
            .get(&status)
            .map(|bytes| Reader::new(&topics, &empty).open(&status, bytes))
        {
            if h.status().is_some_and(|s| s.online) && !self.force {
                bail!(coded(
                    Code::Busy,
                    anyhow!("{device} is online (its retained status says so): stop kilnd on it first, or pass --force")
                ));
            }
        }
        let registry = fleet.registry(&mut session, &topics, self.adopt)?;
        let enrolled = registry.key_of(device).is_some();
        if retained.is_empty() && !enrolled {
            bail!(coded(
                Code::NoSuchScope,
                anyhow!("{device}: nothing retained for it and not enrolled; nothing to forget")
            ));
        }
        let cleared: Vec<String> = retained.keys().cloned().collect();
        // An empty retained message clears the topic.
        session
            .publish_all(
                cleared.iter().map(|t| (t.clone(), Vec::new())).collect(),
                |_| {},
            )
            .map_err(unavailable)?;
        let registry_serial = if enrolled {
            let (serial, _) = remove_from_registry(
                &mut session,
                &topics,
                &fleet,
                &keys,
                &[device.to_string()],
                self.adopt,
            )?;
            Some(serial)
        } else {
            None
        };
        session.disconnect();
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "device": device,
                    "cleared": cleared,
                    "unenrolled": enrolled,
                    "registry_serial": registry_serial,
                })
            );
        } else {
            println!(
                "{device}: cleared {} retained topic(s){}",
                cleared.len(),
                match registry_serial {
                    Some(s) => format!(", removed from the registry (serial {s})"),
                    None => ", not enrolled".to_string(),
                }
            );
        }
        Ok(())
    }
}
