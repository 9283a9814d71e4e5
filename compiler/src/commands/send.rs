//! `kiln send`: a command to one module on a device or on a group's devices, signed
//! by the fleet's release keys, and the replies the devices sign.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use kiln_protocol::command::{self, Command, Outcome, Reply, To};
use kiln_protocol::fleet::{open_report, Scope, Topics};
use kiln_protocol::keys::SecretKey;
use kiln_protocol::names::Kind;
use kiln_protocol::trust::Registry;

use crate::exit::{coded, Code};
use crate::fleet::broker::{BrokerArgs, Session};
use crate::fleet::keyfile;
use crate::fleet::messages::online_targets;
use crate::fleet::trust::{parse_duration, RootArgs};
use crate::fleet::Error;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
The command goes over each device's MQTT session (devices/DEVICE/commands, or
groups/GROUP/commands) to the module, which sees it in kiln_on_message as a message on
topic command/TOPIC and may answer with the reply import (kiln::reply in Rust,
kiln_reply in C). It is signed by the fleet's release keys, as a desired state is, so
nobody who can merely publish on the broker drives a module. It carries at most 16 KiB,
is valid for --valid (at most 10m), and a device takes each command once while it is
valid and never one sent before it started; it takes 20 at once and 10 a second after.

kiln send waits --timeout for the reply of every online target (offline devices are
named and skipped: a command is not kept for them) and checks each reply against the
device's enrolled key. One line per device: the module's status and its reply, or why
the device refused or could not deliver it.

Exit codes: 0 every target answered with status 0; 1 a module answered non-zero or its
call failed; 76 a device refused the command; 69 no reply within --timeout, or the
broker; 68 no online device in the scope; 2 bad flags.

Examples:
  kiln send --device pump-1 --module valve --topic open --data 30 --sign fleet.key
  kiln send --group lab --module blinker --topic rate --data 2 --sign fleet.key --json
  kiln send --device pump-1 --module valve --topic close --sign fleet.key --no-reply";

/// Send a command to a module on devices, and print their replies
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct SendCommand {
    /// Device to send to
    #[arg(long, conflicts_with = "group")]
    pub device: Option<String>,
    /// Group whose online devices to send to
    #[arg(long)]
    pub group: Option<String>,
    /// Module that takes the command
    #[arg(long)]
    pub module: String,
    /// Command topic (the module sees command/TOPIC)
    #[arg(long)]
    pub topic: String,
    /// The command's bytes, as text
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    /// The command's bytes, from a file (at most 16 KiB)
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,
    /// Release key that signs the command (repeat for a k-of-n threshold)
    #[arg(long, value_name = "KEY", required = true)]
    pub sign: Vec<PathBuf>,
    /// How long to wait for the replies (30s, 2m)
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// How long a device may take the command after it was sent (at most 10m)
    #[arg(long, default_value = "60s")]
    pub valid: String,
    /// Publish and return; ask no reply
    #[arg(long)]
    pub no_reply: bool,
    /// One JSON object per device
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// The flags, checked before a key is read or the broker asked.
struct Checked {
    scope: Scope,
    data: Vec<u8>,
    timeout: Duration,
    valid_ms: u64,
}

impl SendCommand {
    fn check(&self) -> std::result::Result<Checked, String> {
        let scope = match (&self.device, &self.group) {
            (Some(d), None) => {
                valid_name(Kind::Device, d).map_err(|e| crate::exit::one_line(&e))?;
                Scope::Device(d.clone())
            }
            (None, Some(g)) => {
                valid_name(Kind::Group, g).map_err(|e| crate::exit::one_line(&e))?;
                Scope::Group(g.clone())
            }
            _ => return Err("pass --device DEVICE or --group GROUP".into()),
        };
        valid_name(Kind::Module, &self.module).map_err(|e| crate::exit::one_line(&e))?;
        kiln_protocol::names::check(Kind::Stream, &self.topic)
            .map_err(|e| format!("--topic: {e}"))?;
        let data = match (&self.data, &self.data_file) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(path)) => crate::fleet::trust::read_bounded(path, command::MAX_DATA as u64)
                .map_err(|e| format!("--data-file: {e}"))?,
            (None, None) => Vec::new(),
        };
        if data.len() > command::MAX_DATA {
            return Err(format!(
                "--data: {} bytes (a command carries at most {})",
                data.len(),
                command::MAX_DATA
            ));
        }
        let timeout = Duration::from_millis(
            parse_duration(&self.timeout).map_err(|e| format!("--timeout: {e}"))?,
        );
        let valid_ms = parse_duration(&self.valid).map_err(|e| format!("--valid: {e}"))?;
        if valid_ms > command::MAX_VALID_MS {
            return Err(format!(
                "--valid: {} (a command is valid for at most {}m)",
                self.valid,
                command::MAX_VALID_MS / 60_000
            ));
        }
        Ok(Checked {
            scope,
            data,
            timeout,
            valid_ms,
        })
    }

    pub fn execute(self) -> Result<()> {
        let checked = self.check().map_err(Error::Usage)?;
        let keys = keyfile::read_secrets(&self.sign)?;
        let topics = self.broker.topics();
        let mut session = self
            .broker
            .connect()
            .map_err(|e| coded(Code::Unavailable, e))?;
        let fleet = self
            .root
            .follow_to_sign(&mut session, &topics, &self.sign, &keys)?;
        let registry = fleet.registry_or_empty(&mut session, &topics)?;
        let scope = &checked.scope;
        let targets = online_targets(&mut session, &topics, scope)?;
        if targets.is_empty() {
            session.disconnect();
            let why = match scope {
                Scope::Device(d) => format!("device {d} is not online (its retained status says so, or it has none); a command is not kept for it"),
                Scope::Group(_) => format!("no online device's status names {}", words(scope)),
            };
            return Err(coded(Code::NoSuchScope, anyhow::anyhow!(why)));
        }
        let now = kiln_protocol::clock::now_ms();
        let command = Command {
            fleet: fleet.root().fleet.clone(),
            to: match scope {
                Scope::Device(d) => To::Device(d.clone()),
                Scope::Group(g) => To::Group(g.clone()),
            },
            module: self.module.clone(),
            topic: self.topic.clone(),
            data: checked.data,
            id: random_id()?,
            issued_ms: now,
            expires_ms: now + checked.valid_ms,
            reply: !self.no_reply,
        };
        let keys: Vec<&SecretKey> = keys.iter().collect();
        let signed = command.sign(&keys).map_err(Error::Usage)?;
        // Replies are listened for before the command goes, so none is missed.
        if command.reply {
            for device in &targets {
                session.subscribe(&topics.replies(device))?;
            }
        }
        let topic = match scope {
            Scope::Device(d) => topics.commands(d),
            Scope::Group(g) => topics.group_commands(g),
        };
        session
            .publish_once(topic, signed)
            .map_err(|e| coded(Code::Unavailable, e))?;
        if !command.reply {
            println!(
                "sent command {:016x} to {} online devices of {}",
                command.id,
                targets.len(),
                words(scope)
            );
            session.disconnect();
            return Ok(());
        }
        let heard = wait_for_replies(
            &mut session,
            &topics,
            &registry,
            command.id,
            &targets,
            checked.timeout,
        )?;
        session.disconnect();
        self.print(&targets, &heard, checked.timeout)
    }

    /// One line (or JSON object) per target; the worst outcome is the exit code.
    fn print(
        &self,
        targets: &[String],
        heard: &BTreeMap<String, (Outcome, bool)>,
        timeout: Duration,
    ) -> Result<()> {
        let mut worst: Option<(Code, String)> = None;
        let mut note = |code: Code, why: String| {
            let rank = |c: Code| match c {
                Code::Refused => 3,
                Code::Unavailable => 2,
                _ => 1,
            };
            if worst.as_ref().is_none_or(|(c, _)| rank(code) > rank(*c)) {
                worst = Some((code, why));
            }
        };
        for device in targets {
            let (line, json) = match heard.get(device) {
                Some((Outcome::Answered { status, data }, enrolled)) => {
                    if *status != 0 {
                        note(
                            Code::Failure,
                            format!("{device}: module {} answered {status}", self.module),
                        );
                    }
                    let text = String::from_utf8_lossy(data);
                    let key = if *enrolled { "" } else { " (key not enrolled)" };
                    (
                        format!("{device}: status {status}: {text}{key}"),
                        serde_json::json!({"device": device, "outcome": "answered", "status": status, "reply": text, "enrolled": enrolled}),
                    )
                }
                Some((Outcome::Refused(why), enrolled)) => {
                    note(
                        Code::Refused,
                        format!("{device} refused the command: {why}"),
                    );
                    (
                        format!("{device}: refused: {why}"),
                        serde_json::json!({"device": device, "outcome": "refused", "reason": why, "enrolled": enrolled}),
                    )
                }
                Some((Outcome::Failed(why), enrolled)) => {
                    note(Code::Failure, format!("{device}: {why}"));
                    (
                        format!("{device}: failed: {why}"),
                        serde_json::json!({"device": device, "outcome": "failed", "reason": why, "enrolled": enrolled}),
                    )
                }
                None => {
                    let why = format!("no reply within {}s", timeout.as_secs_f32());
                    note(Code::Unavailable, format!("{device}: {why}"));
                    (
                        format!("{device}: {why}"),
                        serde_json::json!({"device": device, "outcome": "no reply"}),
                    )
                }
            };
            if self.json {
                println!("{json}");
            } else {
                println!("{line}");
            }
        }
        match worst {
            None => Ok(()),
            Some((code, why)) => Err(coded(code, anyhow::anyhow!(why))),
        }
    }
}

/// Replies to command `id` from `targets`, until each answered or `timeout`: signed
/// by the device's enrolled key (or any key where the device is not enrolled, said as
/// such); anything else on the topic is skipped with a warning.
fn wait_for_replies(
    session: &mut Session,
    topics: &Topics,
    registry: &Registry,
    id: u64,
    targets: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, (Outcome, bool)>> {
    let deadline = Instant::now() + timeout;
    let mut heard = BTreeMap::new();
    while heard.len() < targets.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, payload)) = session.next_message(left).map_err(Error::Broker)? else {
            break;
        };
        let Some(device) = targets.iter().find(|d| topics.replies(d) == topic) else {
            continue;
        };
        if payload.len() > command::MAX_REPLY {
            eprintln!(
                "warning: skipped a reply of {} bytes on {topic}",
                payload.len()
            );
            continue;
        }
        let (reply, signer) = match open_report::<Reply>(&topic, &payload) {
            Ok((Reply::V1(r), Some(signer))) => (r, signer),
            Ok(_) => {
                eprintln!("warning: skipped an unsigned reply on {topic}");
                continue;
            }
            Err(e) => {
                eprintln!("warning: skipped a reply on {topic}: {e}");
                continue;
            }
        };
        let enrolled = match registry.key_of(device) {
            Some(key) if key == signer => true,
            Some(key) => {
                eprintln!(
                    "warning: skipped a reply on {topic} signed by {}, not by {device}'s enrolled key {}",
                    signer.id(),
                    key.id()
                );
                continue;
            }
            None => false,
        };
        if reply.id != id || reply.device != *device {
            continue;
        }
        heard.insert(device.clone(), (reply.outcome, enrolled));
    }
    Ok(heard)
}

fn words(scope: &Scope) -> String {
    match scope {
        Scope::Device(d) => format!("device {d}"),
        Scope::Group(g) => format!("group {g}"),
    }
}

fn random_id() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no random bytes for the command's id: {e}"))?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(args: &[&str]) -> std::result::Result<Checked, String> {
        let mut all = vec!["send"];
        all.extend(args);
        SendCommand::try_parse_from(all).unwrap().check()
    }

    #[test]
    fn bad_flags_are_refused_on_one_line_naming_the_flag() {
        let base = ["--module", "valve", "--topic", "open", "--sign", "k"];
        let with = |extra: &[&str]| {
            let mut a: Vec<&str> = base.to_vec();
            a.extend(extra);
            checked(&a)
        };
        let ok = with(&["--device", "pump-1", "--data", "30"]).unwrap();
        assert_eq!((ok.data, ok.valid_ms), (b"30".to_vec(), 60_000));
        assert!(with(&[])
            .err()
            .unwrap()
            .contains("--device DEVICE or --group GROUP"));
        assert!(with(&["--device", "a b"])
            .err()
            .unwrap()
            .contains("device name"));
        assert!(with(&["--group", "lab", "--valid", "11m"])
            .err()
            .unwrap()
            .starts_with("--valid:"));
        assert!(with(&["--group", "lab", "--timeout", "x"])
            .err()
            .unwrap()
            .starts_with("--timeout:"));
        let big = "x".repeat(command::MAX_DATA + 1);
        assert!(with(&["--device", "d", "--data", &big])
            .err()
            .unwrap()
            .contains("at most 16384"));
        let mut bad_topic = base.to_vec();
        bad_topic[3] = "a/b";
        bad_topic.extend(["--device", "d"]);
        assert!(checked(&bad_topic).err().unwrap().starts_with("--topic:"));
    }
}
