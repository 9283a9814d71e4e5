use std::collections::BTreeMap;

use anyhow::Result;
use clap::Parser;
use kiln_protocol::fleet::{ModuleState, Reported, Status};
use serde_json::json;

use crate::broker::BrokerArgs;
use crate::exit::{coded, Code};

const AFTER_HELP: &str = "\
Examples:
  kiln devices
  kiln devices --broker mqtt://broker.lan:1883 --json";

/// Show the fleet from the broker's retained status and reported state
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DevicesCommand {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// One JSON object per device, one per line
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Row {
    status: Option<Status>,
    reported: Option<Reported>,
}

impl DevicesCommand {
    pub fn execute(self) -> Result<()> {
        let topics = self.broker.topics();
        let mut session = self
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for kind in ["status", "reported"] {
            let retained = session
                .retained(&topics.all_devices(kind))
                .map_err(|e| coded(Code::Unavailable, e))?;
            for (topic, payload) in retained {
                let Some((device, _)) = topics.parse_device(&topic) else {
                    continue;
                };
                let row = rows.entry(device.to_string()).or_default();
                match kind {
                    "status" => row.status = postcard::from_bytes(&payload).ok(),
                    _ => row.reported = postcard::from_bytes(&payload).ok(),
                }
            }
        }
        session.disconnect();

        if self.json {
            for (device, row) in &rows {
                println!("{}", to_json(device, row));
            }
            return Ok(());
        }
        println!(
            "{:<16} {:<8} {:<28} {:<14} {:<30} LAST EVENT",
            "DEVICE", "ONLINE", "TARGET", "SERIAL", "MODULES"
        );
        for (device, row) in &rows {
            let (online, target) = match &row.status {
                Some(Status::V1(s)) => (
                    if s.online { "yes" } else { "no" },
                    s.facts.as_ref().map_or("-".into(), |f| f.triple.clone()),
                ),
                None => ("?", "-".into()),
            };
            let (serial, modules, last) = match &row.reported {
                Some(Reported::V1(r)) => (
                    r.serial.to_string(),
                    r.modules
                        .iter()
                        .map(|m| format!("{}@{}{}", m.name, m.version, state_mark(m.state)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.modules
                        .iter()
                        .map(|m| m.last_event.clone())
                        .find(|e| !e.is_empty())
                        .unwrap_or_default(),
                ),
                None => ("-".into(), "-".into(), String::new()),
            };
            println!("{device:<16} {online:<8} {target:<28} {serial:<14} {modules:<30} {last}");
        }
        Ok(())
    }
}

fn state_mark(state: ModuleState) -> &'static str {
    match state {
        ModuleState::Running => "",
        ModuleState::Updating => " (updating)",
        ModuleState::Failed => " (failed)",
    }
}

fn to_json(device: &str, row: &Row) -> serde_json::Value {
    let status = row.status.as_ref().map(|Status::V1(s)| {
        json!({
            "online": s.online,
            "triple": s.facts.as_ref().map(|f| f.triple.clone()),
            "kilnd": s.facts.as_ref().map(|f| f.kilnd.clone()),
            "groups": s.facts.as_ref().map(|f| f.groups.clone()),
        })
    });
    let reported = row.reported.as_ref().map(|Reported::V1(r)| {
        json!({
            "serial": r.serial,
            "modules": r.modules.iter().map(|m| json!({
                "name": m.name,
                "version": m.version,
                "sha256": hex::encode(m.sha256),
                "state": format!("{:?}", m.state).to_lowercase(),
                "last_event": m.last_event,
            })).collect::<Vec<_>>(),
        })
    });
    json!({ "device": device, "status": status, "reported": reported })
}
