use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use clap::Parser;
use kiln_protocol::fleet::SignedDesired;

use crate::broker::BrokerArgs;
use crate::commands::compile::human_size;
use crate::exit::{coded, Code};

const AFTER_HELP: &str = "\
Examples:
  kiln gc --dry-run
  kiln gc --broker mqtt://broker.lan:1883";

/// Remove retained artifact chunks that no device or group desired state references
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct GcCommand {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only say what would be removed
    #[arg(long)]
    pub dry_run: bool,
}

impl GcCommand {
    pub fn execute(self) -> Result<()> {
        let topics = self.broker.topics();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.broker.connect().map_err(unavailable)?;
        let mut desired = session
            .retained(&topics.all_devices("desired"))
            .map_err(unavailable)?;
        desired.extend(
            session
                .retained(&topics.all_groups_desired())
                .map_err(unavailable)?,
        );
        let mut referenced = BTreeSet::new();
        for (topic, payload) in &desired {
            match SignedDesired::peek(payload) {
                Ok(d) => referenced.extend(d.modules.iter().map(|m| m.artifact.sha256)),
                Err(e) => {
                    // An unreadable desired state might reference anything: keep all.
                    eprintln!("gc: {topic}: {e}; removing nothing");
                    session.disconnect();
                    return Err(coded(Code::InvalidInput, anyhow::anyhow!("{topic}: {e}")));
                }
            }
        }
        let chunks = session
            .retained(&topics.all_artifacts())
            .map_err(unavailable)?;
        let mut unreferenced: BTreeMap<[u8; 32], (Vec<String>, u64)> = BTreeMap::new();
        let mut kept = BTreeSet::new();
        for (topic, payload) in &chunks {
            let Some((sha, _)) = topics.parse_chunk(topic) else {
                continue;
            };
            if referenced.contains(&sha) {
                kept.insert(sha);
                continue;
            }
            let entry = unreferenced.entry(sha).or_default();
            entry.0.push(topic.clone());
            entry.1 += payload.len() as u64;
        }
        let (n, bytes): (usize, u64) = unreferenced
            .values()
            .fold((0, 0), |(n, b), (t, s)| (n + t.len(), b + s));
        for (sha, (chunk_topics, size)) in &unreferenced {
            eprintln!(
                "gc: {} {}: {} chunks, {}",
                if self.dry_run {
                    "would remove"
                } else {
                    "removing"
                },
                hex::encode(sha),
                chunk_topics.len(),
                human_size(*size)
            );
        }
        if !self.dry_run {
            // An empty retained message clears the topic.
            let clears = unreferenced
                .into_values()
                .flat_map(|(t, _)| t)
                .map(|t| (t, Vec::new()))
                .collect();
            session.publish_all(clears, |_| {}).map_err(unavailable)?;
        }
        session.disconnect();
        eprintln!(
            "gc: {} {n} chunks ({}); kept {} referenced artifacts",
            if self.dry_run {
                "would remove"
            } else {
                "removed"
            },
            human_size(bytes),
            kept.len()
        );
        Ok(())
    }
}
