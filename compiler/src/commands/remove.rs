use std::cell::Cell;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::fleet::Scope;
use kiln_protocol::names::Kind;

use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::desired::{prepare_desired, scope_json};
use crate::fleet::trust::SigningArgs;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Drops the module from the signed desired state of the device or the group (the other
modules stay) under a new serial, signed like `kiln push`. Devices stop the module and
forget it (a failed entry such as `big@0 (failed)` goes with it). A device in a group
runs what its own state and its group's state name: remove the module from the one
that holds it. The artifact's chunks stay on the broker until `kiln gc`.

Examples:
  kiln remove app --device dev-01 --sign fleet.key
  kiln remove big --group lab --sign fleet.key --json";

/// Drop a module from a device's or a group's desired state
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RemoveCommand {
    /// Module to drop
    #[arg(value_name = "MODULE")]
    pub module: String,
    /// Device whose desired state to change
    #[arg(long, conflicts_with = "group")]
    pub device: Option<String>,
    /// Group whose desired state to change
    #[arg(long)]
    pub group: Option<String>,
    /// The result as one JSON object on stdout (see the JSON shapes in the book)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl RemoveCommand {
    pub fn execute(self) -> Result<()> {
        valid_name(Kind::Module, &self.module)?;
        let scope = match (&self.device, &self.group) {
            (Some(d), _) => {
                valid_name(Kind::Device, d)?;
                Scope::Device(d.clone())
            }
            (None, Some(g)) => {
                valid_name(Kind::Group, g)?;
                Scope::Group(g.clone())
            }
            (None, None) => bail!(coded(
                Code::Usage,
                anyhow!("say whose desired state: --device ID or --group NAME")
            )),
        };
        if self.signing.sign.is_empty() {
            bail!(coded(
                Code::Usage,
                anyhow!("removing a module signs a new desired state: --sign KEY")
            ));
        }
        let topics = self.broker.topics();
        let mut session = self
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let signing = self.signing.signing(&mut session, &topics)?;
        let found = Cell::new(false);
        let held = std::cell::RefCell::new(Vec::new());
        let next = prepare_desired(&mut session, &signing, &topics, &scope, |modules| {
            held.replace(
                modules
                    .iter()
                    .map(|m| format!("{}@{}", m.name, m.version))
                    .collect(),
            );
            let before = modules.len();
            modules.retain(|m| m.name != self.module);
            found.set(modules.len() != before);
        })?;
        let target = match &scope {
            Scope::Device(d) => format!("device {d}"),
            Scope::Group(g) => format!("group {g}"),
        };
        if !found.get() {
            session.disconnect();
            let held = held.into_inner();
            bail!(coded(
                Code::NoSuchScope,
                anyhow!(
                    "module `{}` is not in the desired state of {target} (it holds {}); nothing published",
                    self.module,
                    if held.is_empty() { "no module".to_string() } else { held.join(", ") }
                )
            ));
        }
        let left: Vec<String> = next
            .desired
            .modules
            .iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect();
        let serial = next.publish(&mut session)?;
        session.disconnect();
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "scope": scope_json(&scope),
                    "removed": self.module,
                    "serial": serial,
                    "modules": left,
                })
            );
        } else {
            println!(
                "removed {} from {target}: desired state serial {serial} holds {}",
                self.module,
                if left.is_empty() {
                    "no module".to_string()
                } else {
                    left.join(", ")
                }
            );
        }
        Ok(())
    }
}
