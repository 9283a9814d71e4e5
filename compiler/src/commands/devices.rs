use std::collections::BTreeMap;

use anyhow::Result;
use clap::Parser;
use kiln_protocol::fleet::{ModuleState, ReportedV1, StatusV2};
use kiln_protocol::keys::PublicKey;
use kiln_protocol::names::Kind;
use kiln_protocol::rollout::cohort::{self, Attr, Attributes, Condition};
use kiln_protocol::trust::Registry;
use serde_json::json;

use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::messages::{warn_skipped, Body, Reader};
use crate::fleet::trust::{Fleet, Identity, RootArgs};
use crate::fleet::Error;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
IDENTITY says whether the device's status and reported state are signed by the key
enrolled for it (`kiln enroll`): verified, unenrolled, MISMATCH (a forged report, or a
re-provisioned device to enroll again) or unsigned (a kilnd before identities). TRUST
is the root version the device follows, and `stale` when it says its desired states
are older than its bound (they may be withheld). LAST EVENT is each module's newest
event, named by its module (`app: committed`). TAGS are the operator's tags (`kiln
tag`), shown only when they verify under the fleet's root (`?` without --root).

--group and --where show only some devices, chosen as `kiln rollout` chooses them: by
their signed status (a device that has sent none is not shown) and, for `tag=`, by
tags that verify (so `tag=` needs --root). A note on stderr says how many of the
fleet they chose.

Examples:
  kiln devices
  kiln devices --root fleet.root --broker mqtt://broker.lan:1883 --json
  kiln devices --group lab --where 'kilnd<0.9.0'
  kiln devices --root fleet.root --where tag=canary --where target=aarch64-unknown-linux-gnu";

/// Show the fleet from the broker's retained status and reported state
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DevicesCommand {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub root: RootArgs,
    /// One JSON object per device, one per line
    #[arg(long)]
    pub json: bool,
    /// Only the members of this group (by their signed status)
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Only the devices a condition selects, as `kiln rollout --where` has them
    /// (repeatable, all must hold): target=, feature=, kilnd>=X.Y.Z, group=, tag=
    #[arg(long = "where", value_name = "EXPR")]
    pub cohort: Vec<String>,
}

/// What the broker retains for a device, decoded, with who signed it.
#[derive(Default)]
struct Row {
    status: Option<(StatusV2, Option<PublicKey>)>,
    reported: Option<(ReportedV1, Option<PublicKey>)>,
}

impl Row {
    /// Verified only if everything signed is signed by the enrolled key.
    fn identity(&self, registry: Option<&Registry>, device: &str) -> Option<Identity> {
        let registry = registry?;
        let signers = [
            self.status.as_ref().map(|s| &s.1),
            self.reported.as_ref().map(|r| &r.1),
        ];
        let identities: Vec<Identity> = signers
            .into_iter()
            .flatten()
            .map(|signer| Identity::of(registry, device, signer.as_ref()))
            .collect();
        identities
            .iter()
            .find(|i| !i.is_verified())
            .or(identities.first())
            .cloned()
    }
}

impl DevicesCommand {
    /// The --group and --where conditions, refused before the broker is asked.
    fn conditions(&self) -> Result<Vec<Condition>> {
        let mut conditions =
            cohort::parse_all(&self.cohort).map_err(|e| Error::Usage(format!("--where: {e}")))?;
        if let Some(group) = &self.group {
            valid_name(Kind::Group, group)?;
            conditions.push(
                Condition::parse(&format!("group={group}"))
                    .map_err(|e| Error::Usage(format!("--group: {e}")))?,
            );
        }
        if self.root.path(None).is_none() && conditions.iter().any(|c| c.attr == Attr::Tag) {
            return Err(Error::Usage(
                "--where tag=: tags count only when they verify; pass --root".into(),
            )
            .into());
        }
        Ok(conditions)
    }

    pub fn execute(self) -> Result<()> {
        let conditions = self.conditions()?;
        let profiles = crate::build::targets::load(None).map_err(Error::invalid)?;
        let topics = self.broker.topics();
        let mut session = self
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let (registry, tags) = match self.root.path(None) {
            Some(_) => {
                let anchor = self.root.anchor(None)?;
                let fleet = Fleet::follow(&mut session, &topics, anchor)?;
                let registry = fleet.registry_or_empty(&mut session, &topics)?;
                let tags = crate::fleet::tags::read_all(&mut session, &topics, &fleet)?;
                (Some(registry), Some(tags))
            }
            None => (None, None),
        };
        let tags_of = |device: &str| {
            tags.as_ref()
                .map(|t| t.get(device).cloned().unwrap_or_default())
        };
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        let empty = Registry::default();
        let reader = Reader::new(&topics, registry.as_ref().unwrap_or(&empty));
        for kind in ["status", "reported"] {
            let retained = session
                .retained(&topics.all_devices(kind))
                .map_err(|e| coded(Code::Unavailable, e))?;
            let (heard, skipped) = reader.all(&retained);
            warn_skipped(&skipped, 10);
            for h in heard {
                let row = rows.entry(h.device.clone()).or_default();
                match h.body {
                    Body::Status(s) => row.status = Some((s, h.signer)),
                    Body::Reported(r) => row.reported = Some((r, h.signer)),
                    Body::Event(_) => {}
                }
            }
        }
        session.disconnect();
        if !conditions.is_empty() {
            let of = rows.len();
            rows.retain(|device, row| {
                let Some(facts) = row.status.as_ref().and_then(|(s, _)| s.facts.as_ref()) else {
                    return false;
                };
                let attributes = Attributes::of(facts, tags_of(device).unwrap_or_default());
                cohort::selects(&conditions, &attributes, &profiles)
            });
            let chosen: Vec<String> = conditions.iter().map(ToString::to_string).collect();
            eprintln!("{} of {of} devices: {}", rows.len(), chosen.join(" and "));
        }

        if self.json {
            for (device, row) in &rows {
                let identity = row.identity(registry.as_ref(), device);
                let mut line = to_json(device, row, identity.as_ref());
                line["tags"] = json!(tags_of(device));
                println!("{line}");
            }
            return Ok(());
        }
        println!(
            "{:<16} {:<8} {:<28} {:<11} {:<10} {:<14} {:<30} {:<16} LAST EVENT",
            "DEVICE", "ONLINE", "TARGET", "IDENTITY", "TRUST", "SERIAL", "MODULES", "TAGS"
        );
        for (device, row) in &rows {
            let (online, target, trust) = match &row.status {
                Some((s, _)) => (
                    if s.online { "yes" } else { "no" },
                    s.facts.as_ref().map_or("-".into(), |f| f.triple.clone()),
                    s.trust.as_ref().map_or("-".into(), |t| {
                        let stale = if t.stale.is_some() { " stale" } else { "" };
                        format!("v{}{stale}", t.root_version)
                    }),
                ),
                None => ("?", "-".into(), "-".into()),
            };
            let identity = row
                .identity(registry.as_ref(), device)
                .map_or("no --root", |i| i.word());
            let (serial, modules, last) = match &row.reported {
                Some((r, _)) => (
                    r.serial.to_string(),
                    r.modules
                        .iter()
                        .map(|m| format!("{}@{}{}", m.name, m.version, state_mark(m.state)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    last_events(r),
                ),
                None => ("-".into(), "-".into(), String::new()),
            };
            let tags = match tags_of(device) {
                None => "?".to_string(),
                Some(t) if t.is_empty() => "-".to_string(),
                Some(t) => t.into_iter().collect::<Vec<_>>().join(","),
            };
            println!(
                "{device:<16} {online:<8} {target:<28} {identity:<11} {trust:<10} {serial:<14} {modules:<30} {tags:<16} {last}"
            );
        }
        Ok(())
    }
}

/// Each module's newest event, named by its module (`sensor: committed v7`): a
/// device runs several, and an event without its module's name says nothing.
fn last_events(r: &ReportedV1) -> String {
    r.modules
        .iter()
        .filter(|m| !m.last_event.is_empty())
        .map(|m| format!("{}: {}", m.name, m.last_event))
        .collect::<Vec<_>>()
        .join("; ")
}

fn state_mark(state: ModuleState) -> &'static str {
    match state {
        ModuleState::Running => "",
        ModuleState::Updating => " (updating)",
        ModuleState::Failed => " (failed)",
        ModuleState::Restarting => " (restarting)",
        ModuleState::Exited => " (exited)",
    }
}

fn to_json(device: &str, row: &Row, identity: Option<&Identity>) -> serde_json::Value {
    let status = row.status.as_ref().map(|(s, signer)| {
        json!({
            "online": s.online,
            "triple": s.facts.as_ref().map(|f| f.triple.clone()),
            "kilnd": s.facts.as_ref().map(|f| f.kilnd.clone()),
            "groups": s.facts.as_ref().map(|f| f.groups.clone()),
            "key": signer.as_ref().map(|k| k.id().to_string()),
            "root_version": s.trust.as_ref().map(|t| t.root_version),
            "stale": s.trust.as_ref().and_then(|t| t.stale.clone()),
        })
    });
    let reported = row.reported.as_ref().map(|(r, _)| {
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
    json!({
        "device": device,
        "identity": identity.map(Identity::word),
        "status": status,
        "reported": reported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(args: &[&str]) -> Result<Vec<String>, String> {
        let mut all = vec!["devices"];
        all.extend(args);
        DevicesCommand::try_parse_from(all)
            .unwrap()
            .conditions()
            .map(|c| c.iter().map(ToString::to_string).collect())
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn group_and_where_make_the_conditions_and_a_bad_one_is_refused_naming_its_flag() {
        assert_eq!(conditions(&[]), Ok(vec![]));
        assert_eq!(
            conditions(&["--where", "kilnd >= 0.9.0", "--group", "lab"]),
            Ok(vec!["kilnd>=0.9.0".to_string(), "group=lab".into()])
        );
        assert_eq!(
            conditions(&["--root", "fleet.root", "--where", "tag=canary"]),
            Ok(vec!["tag=canary".to_string()])
        );
        let e = conditions(&["--where", "tag>canary"]).unwrap_err();
        assert!(e.starts_with("--where: "), "{e}");
        let e = conditions(&["--group", "no/such"]).unwrap_err();
        assert!(e.contains("no/such"), "{e}");
        let e = conditions(&["--where", "tag=canary"]).unwrap_err();
        assert_eq!(
            e,
            "--where tag=: tags count only when they verify; pass --root"
        );
    }
}
