//! `kiln tag`: sets a device's operator tags, the signed record rollouts select on
//! (`kiln rollout --where tag=canary`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use kiln_protocol::fleet::MAX_TAGS;
use kiln_protocol::keys::SecretKey;
use kiln_protocol::names::Kind;

use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::keyfile;
use crate::fleet::tags;
use crate::fleet::trust::RootArgs;
use crate::fleet::Error;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Each device's tags are one record retained on the broker (devices/DEVICE/tags), signed
like a desired state by the fleet's release keys, with a serial above the one it
replaces. `kiln rollout --where tag=NAME` selects on them and `kiln devices` shows them;
a record that does not verify under the fleet's current root (forged, or signed by a
key since rotated out) is ignored with a warning and selects nothing. Devices never
write their tags (`kiln acl` gives them no write on the topic). A device has at most 32
tags, each a name of letters, digits, `.`, `_` and `-` (at most 64 bytes). Without
--add or --remove it prints the tags; `kiln decommission` clears them with the rest.

Examples:
  kiln tag dev-01 dev-02 dev-03 --add canary --sign fleet.key
  kiln tag dev-02 --remove canary --add rack-3 --sign fleet.key
  kiln tag dev-01                                   # what dev-01 is tagged with
  kiln rollout app.kiln --group lab --sign fleet.key --where tag=canary";

/// Set the operator tags of devices that rollouts select on
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct TagCommand {
    /// Devices to tag
    #[arg(value_name = "DEVICE", required = true)]
    pub devices: Vec<String>,
    /// A tag to add (repeatable)
    #[arg(long, value_name = "TAG")]
    pub add: Vec<String>,
    /// A tag to remove (repeatable)
    #[arg(long, value_name = "TAG")]
    pub remove: Vec<String>,
    /// Release key that signs the tags (repeat for a k-of-n threshold)
    #[arg(long, value_name = "KEY")]
    pub sign: Vec<PathBuf>,
    #[command(flatten)]
    pub root: RootArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl TagCommand {
    /// The flags' names and counts, checked before the broker is asked anything.
    fn check(&self) -> std::result::Result<(), String> {
        for d in &self.devices {
            valid_name(Kind::Device, d).map_err(|e| crate::exit::one_line(&e))?;
        }
        for (flag, list) in [("--add", &self.add), ("--remove", &self.remove)] {
            for t in list {
                kiln_protocol::names::check(Kind::Tag, t).map_err(|e| format!("{flag}: {e}"))?;
            }
        }
        if self.add.len() > MAX_TAGS {
            return Err(format!(
                "--add: {} tags (a device has at most {MAX_TAGS})",
                self.add.len()
            ));
        }
        if let Some(t) = self.add.iter().find(|t| self.remove.contains(t)) {
            return Err(format!("--add and --remove both name `{t}`"));
        }
        let changes = !self.add.is_empty() || !self.remove.is_empty();
        if changes && self.sign.is_empty() {
            return Err("--sign: tags are signed by a release key; pass --sign KEY".into());
        }
        Ok(())
    }

    pub fn execute(self) -> Result<()> {
        self.check().map_err(Error::Usage)?;
        let keys = keyfile::read_secrets(&self.sign)?;
        let topics = self.broker.topics();
        let mut session = self
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let fleet = self
            .root
            .follow_to_sign(&mut session, &topics, &self.sign, &keys)?;
        let keys: Vec<&SecretKey> = keys.iter().collect();
        for device in &self.devices {
            let record = if self.add.is_empty() && self.remove.is_empty() {
                tags::read_one(&mut session, &topics, &fleet, device)?
            } else {
                let t = tags::write(
                    &mut session,
                    &topics,
                    &fleet,
                    &keys,
                    device,
                    &self.add,
                    &self.remove,
                )?;
                Some(t)
            };
            match record {
                Some(t) if !t.tags.is_empty() => println!(
                    "{device}: {} (serial {})",
                    t.tags.iter().cloned().collect::<Vec<_>>().join(", "),
                    t.serial
                ),
                Some(t) => println!("{device}: no tags (serial {})", t.serial),
                None => println!("{device}: no tags"),
            }
        }
        session.disconnect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: &[&str]) -> String {
        let mut all = vec!["tag"];
        all.extend(args);
        TagCommand::try_parse_from(all)
            .unwrap()
            .check()
            .unwrap_err()
    }

    #[test]
    fn bad_tags_and_devices_are_refused_on_one_line_naming_the_flag() {
        let ok = TagCommand::try_parse_from([
            "tag", "dev-01", "dev-02", "--add", "canary", "--remove", "old", "--sign", "k",
        ])
        .unwrap();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.devices, ["dev-01", "dev-02"]);
        assert!(refused(&["dev-01", "--add", "a/b", "--sign", "k"]).starts_with("--add: tag name"));
        assert!(
            refused(&["dev-01", "--remove", "", "--sign", "k"]).starts_with("--remove: tag name")
        );
        assert!(refused(&["dev 1", "--add", "x", "--sign", "k"]).contains("device name"));
        assert!(refused(&["dev-01", "--add", "x"]).starts_with("--sign:"));
        assert!(
            refused(&["dev-01", "--add", "x", "--remove", "x", "--sign", "k"])
                .contains("both name `x`")
        );
        // Reading needs no key; a device is required.
        let read = TagCommand::try_parse_from(["tag", "dev-01"]).unwrap();
        assert_eq!(read.check(), Ok(()));
        assert!(TagCommand::try_parse_from(["tag"]).is_err());
    }
}
