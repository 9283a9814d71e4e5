use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::fleet::{Event, EventKind, ModuleState, Reported, Scope, Status};
use kiln_protocol::names::Kind;

use crate::commands::push::ReleaseArgs;
use crate::commands::valid_name;
use crate::exit::{coded, Code};

const AFTER_HELP: &str = "\
Examples:
  kiln rollout app.kiln --group lab --sign fleet.key                 # 1 canary, then the rest
  kiln rollout app.kiln --group lab --sign fleet.key --canary 2 --wave-size 10

Devices are the members of the group according to their retained status. Each wave's
devices get the release as their own desired state; the next wave starts when every
device of this one has committed it. A rollback or rejection halts the rollout, and
the devices not reached yet keep what they run.";

/// Update a group's devices in waves, halting when a wave does not take the release
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RolloutCommand {
    /// Group whose devices to update
    #[arg(long)]
    pub group: String,
    /// Devices in the first wave
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// Devices per wave after the canaries [default: all the rest]
    #[arg(long)]
    pub wave_size: Option<usize>,
    /// How long one wave may take to commit
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub wave_timeout_s: u64,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

impl RolloutCommand {
    pub fn execute(self) -> Result<()> {
        valid_name(Kind::Group, &self.group)?;
        let release = self.release.load()?;
        let topics = release.topics.clone();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.release.broker.connect().map_err(unavailable)?;
        let mut devices: Vec<String> = session
            .retained(&topics.all_devices("status"))
            .map_err(unavailable)?
            .into_iter()
            .filter_map(|(topic, payload)| {
                let Ok(Status::V1(s)) = postcard::from_bytes(&payload) else {
                    return None;
                };
                let in_group = s.facts?.groups.contains(&self.group);
                let (device, _) = topics.parse_device(&topic)?;
                in_group.then(|| device.to_string())
            })
            .collect();
        devices.sort();
        if devices.is_empty() {
            return Err(coded(
                Code::InvalidInput,
                anyhow!(
                    "no device has reported membership of group `{}`",
                    self.group
                ),
            ));
        }
        let mut waves: Vec<Vec<String>> = Vec::new();
        let canary = self.canary.clamp(1, devices.len());
        waves.push(devices[..canary].to_vec());
        let rest = &devices[canary..];
        if !rest.is_empty() {
            let size = self.wave_size.unwrap_or(rest.len()).max(1);
            waves.extend(rest.chunks(size).map(<[String]>::to_vec));
        }
        eprintln!(
            "rollout {} to group {}: {} devices in {} waves",
            release.label(),
            self.group,
            devices.len(),
            waves.len()
        );
        release.upload(&mut session)?;
        session
            .subscribe(&topics.all_devices("events"))
            .map_err(unavailable)?;
        session
            .subscribe(&topics.all_devices("reported"))
            .map_err(unavailable)?;
        let version = release.module.version;
        let name = release.module.name.clone();
        for (i, wave) in waves.iter().enumerate() {
            eprintln!("wave {}: {}", i + 1, wave.join(", "));
            for device in wave {
                release.set_desired(&mut session, &Scope::Device(device.clone()))?;
            }
            let mut pending: BTreeSet<&String> = wave.iter().collect();
            let deadline = Instant::now() + Duration::from_secs(self.wave_timeout_s);
            while !pending.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let late: Vec<&str> = pending.iter().map(|s| s.as_str()).collect();
                    session.disconnect();
                    let why = format!(
                        "{} did not commit within {}s",
                        late.join(", "),
                        self.wave_timeout_s
                    );
                    return Err(halt(i, why));
                }
                let Some((topic, payload)) = session.next_message(left).map_err(unavailable)?
                else {
                    continue;
                };
                let Some((device, kind)) = topics.parse_device(&topic) else {
                    continue;
                };
                let device = device.to_string();
                if !pending.contains(&device) {
                    continue;
                }
                match kind {
                    "events" => {
                        if let Ok(Event::V1(e)) = postcard::from_bytes(&payload) {
                            if e.module == name && e.version == version {
                                if let EventKind::RolledBack { .. } | EventKind::Rejected { .. } =
                                    e.kind
                                {
                                    session.disconnect();
                                    return Err(halt(i, format!("{device}: {}", e.kind)));
                                }
                            }
                        }
                    }
                    "reported" => {
                        if let Ok(Reported::V1(r)) = postcard::from_bytes(&payload) {
                            let done = r.modules.iter().any(|m| {
                                m.name == name
                                    && m.version == version
                                    && m.state == ModuleState::Running
                            });
                            if done {
                                eprintln!("  {device}: committed {}", release.label());
                                pending.remove(&device);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        session.disconnect();
        eprintln!(
            "rollout complete: {} devices run {}",
            devices.len(),
            release.label()
        );
        Ok(())
    }
}

fn halt(wave: usize, why: String) -> anyhow::Error {
    coded(
        Code::Failure,
        anyhow!("rollout halted in wave {}: {why}", wave + 1),
    )
}
