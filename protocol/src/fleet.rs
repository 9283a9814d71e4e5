//! Fleet updates over MQTT: the topics, the signed desired state, artifact chunks, and
//! what a device reports. Every top-level message is a version-tagged postcard enum.
//!
//! ```text
//! {prefix}/devices/{id}/status        retained  Status: birth (online + facts), LWT offline
//! {prefix}/devices/{id}/desired       retained  SignedDesired for this device
//! {prefix}/groups/{group}/desired     retained  SignedDesired for a group
//! {prefix}/groups/{group}/rollout     retained  SignedRollout: the group's rollout record
//! {prefix}/groups/{group}/rollout/parts/{sha256}  retained  A part of it
//! {prefix}/devices/{id}/reported      retained  Reported: what runs, per module
//! {prefix}/devices/{id}/events                  Event: staged, verified, activated, ...
//! {prefix}/devices/{id}/health        retained  Health: per module, the last period's counts
//! {prefix}/devices/{id}/telemetry               telemetry batches
//! {prefix}/devices/{id}/tags          retained  SignedTags: operator tags (kiln writes)
//! {prefix}/artifacts/{sha256}/{n}     retained  Chunk n of a transfer (see `transfer`)
//! {prefix}/artifacts/{sha256}/list    retained  The chunk list of a transfer
//! {prefix}/uploads/{sha256}           retained  Upload: a transfer's chunks are going up
//! {prefix}/roots/{version}            retained  SignedRoot: the fleet's root documents
//! {prefix}/registry                   retained  SignedRegistry: enrolled device keys
//! {prefix}/registry/parts/{sha256}    retained  A part of it (see `parts`), named by its head
//! ```
//!
//! What a device publishes (status, reported, events, health) is signed with its own identity
//! key ([`seal_report`]); the fleet tool checks the key against the registry.

use serde::{Deserialize, Serialize};

pub const DEFAULT_PREFIX: &str = "kiln/v1";

/// Largest signed desired state a device reads. Its size does not grow with the
/// artifacts' (their chunk hashes are in chunk lists of their own), so this is room
/// for many modules and targets, and stays below AWS IoT Core's 128 KB per publish.
pub const MAX_DESIRED: usize = 120 * 1024;

/// Limits a desired state may set, checked like the ones in `kilnd.toml`.
pub const MAX_TICK_MS: u64 = 24 * 3600 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 3600 * 1000;

/// How far ahead of time a serial may be. kiln takes a new state's serial from the
/// clock (Unix milliseconds, or one above the last when pushes come faster), so an
/// honest serial is never a day ahead of its issue time, and an issue time is never a
/// day ahead of a device's clock. A serial beyond that is a fast-forward (a leaked
/// key signing `u64::MAX` so that no later state is ever taken), and both sides refuse
/// it: the device does not apply it, kiln does not build on it.
pub const MAX_SERIAL_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// A clock before this (2024-01-01) has not been set yet (a board without a
/// real-time clock, before NTP): the issue-time bound waits for a set clock.
pub const PLAUSIBLE_CLOCK_MS: u64 = 1_704_067_200_000;

/// Largest status, reported state or event a device sends; the fleet tool skips (and
/// says so) anything larger on a device's topics instead of decoding it.
pub const MAX_REPORT: usize = 64 * 1024;

pub use crate::clock::{parse_utc, utc};
pub use crate::transfer::sha256;

/// Where the broker is: `mqtt://host[:port]` (1883 by default) or, over TLS,
/// `mqtts://host[:port]` (8883 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Brokers one list may name: the nodes of a cluster, or brokers that serve the same
/// fleet.
pub const MAX_BROKERS: usize = 16;

/// `URL[,URL...]`, in the order a client tries them: each entry as [`parse_broker`]
/// reads it, with its text (spaces around commas allowed).
pub fn parse_brokers(list: &str) -> Result<Vec<(String, BrokerUrl)>, BrokerUrlError> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_BROKERS {
        return Err(BrokerUrlError::TooMany(entries.len()));
    }
    entries
        .into_iter()
        .map(|text| match text.is_empty() {
            true => Err(BrokerUrlError::Empty(list.into())),
            false => parse_broker(text).map(|url| (text.to_string(), url)),
        })
        .collect()
}

pub fn parse_broker(url: &str) -> Result<BrokerUrl, BrokerUrlError> {
    if url.contains(',') {
        // Read as one URL, `mqtt://a:1883,mqtt://b` would be host `a:1883,mqtt://b`.
        return Err(BrokerUrlError::Scheme(url.into()));
    }
    let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true)
    } else if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (rest, false)
    } else {
        return Err(BrokerUrlError::Scheme(url.into()));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse().map_err(|_| BrokerUrlError::Port {
                url: url.into(),
                port: p.into(),
            })?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(BrokerUrlError::NoHost(url.into()));
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Why a broker URL was refused; each message quotes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    #[error("broker `{0}` must look like mqtt://host[:port] or mqtts://host[:port]")]
    Scheme(String),
    #[error("broker `{url}`: port `{port}` is not a number")]
    Port { url: String, port: String },
    #[error("broker `{0}` names no host")]
    NoHost(String),
    #[error("broker list `{0}` has an empty entry (a list is URL,URL,...)")]
    Empty(String),
    #[error("broker list names {0} brokers (at most {MAX_BROKERS})")]
    TooMany(usize),
}

impl From<BrokerUrlError> for String {
    fn from(e: BrokerUrlError) -> Self {
        e.to_string()
    }
}

/// Builds every topic; nothing else formats topic strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn status(&self, device: &str) -> String {
        format!("{}/devices/{device}/status", self.prefix)
    }
    pub fn desired(&self, device: &str) -> String {
        format!("{}/devices/{device}/desired", self.prefix)
    }
    pub fn group_desired(&self, group: &str) -> String {
        format!("{}/groups/{group}/desired", self.prefix)
    }
    /// The record of the group's rollout (see `kiln_protocol::rollout`).
    pub fn rollout(&self, group: &str) -> String {
        format!("{}/groups/{group}/rollout", self.prefix)
    }
    /// One part of the group's rollout record, by its sha256.
    pub fn rollout_part(&self, group: &str, sha256: &[u8; 32]) -> String {
        format!(
            "{}/groups/{group}/rollout/parts/{}",
            self.prefix,
            hex::encode(sha256)
        )
    }
    /// The group's rollout record: its head and every part.
    pub fn rollout_all(&self, group: &str) -> String {
        format!("{}/groups/{group}/rollout/#", self.prefix)
    }
    /// Every group's rollout record, heads and parts.
    pub fn all_rollouts(&self) -> String {
        format!("{}/groups/+/rollout/#", self.prefix)
    }
    /// `(group, None)` of a rollout record's head topic, `(group, Some(sha256))` of
    /// one of its parts.
    pub fn parse_rollout<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<[u8; 32]>)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix("/groups/")?;
        let (group, rest) = rest.split_once('/')?;
        if rest == "rollout" {
            return Some((group, None));
        }
        let sha = rest.strip_prefix("rollout/parts/")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some((group, Some(out)))
    }
    /// The sha256 of a registry part's topic.
    pub fn parse_registry_part(&self, topic: &str) -> Option<[u8; 32]> {
        let sha = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/registry/parts/")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some(out)
    }
    pub fn reported(&self, device: &str) -> String {
        format!("{}/devices/{device}/reported", self.prefix)
    }
    /// Commands for one device, and for every device of a group (see
    /// [`crate::command`]); never retained.
    pub fn commands(&self, device: &str) -> String {
        format!("{}/devices/{device}/commands", self.prefix)
    }
    pub fn group_commands(&self, group: &str) -> String {
        format!("{}/groups/{group}/commands", self.prefix)
    }
    /// A device's signed replies to commands.
    pub fn replies(&self, device: &str) -> String {
        format!("{}/devices/{device}/replies", self.prefix)
    }
    /// Whether `topic` is one of the command topics (a device's or a group's).
    pub fn is_commands(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_suffix("/commands"))
            .is_some_and(|t| {
                t.split_once('/').is_some_and(|(kind, name)| {
                    matches!(kind, "devices" | "groups") && !name.is_empty() && !name.contains('/')
                })
            })
    }
    pub fn events(&self, device: &str) -> String {
        format!("{}/devices/{device}/events", self.prefix)
    }
    /// The device's modules over its last period (see [`Health`]), for health gates.
    pub fn health(&self, device: &str) -> String {
        format!("{}/devices/{device}/health", self.prefix)
    }
    /// The device's operator tags ([`Tags`]), signed by the release keys; the device
    /// never writes it.
    pub fn tags(&self, device: &str) -> String {
        format!("{}/devices/{device}/tags", self.prefix)
    }
    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }
    pub fn chunk(&self, sha256: &[u8; 32], n: u32) -> String {
        format!("{}/artifacts/{}/{n}", self.prefix, hex::encode(sha256))
    }
    /// Every chunk of one artifact.
    pub fn chunks(&self, sha256: &[u8; 32]) -> String {
        format!("{}/artifacts/{}/+", self.prefix, hex::encode(sha256))
    }
    /// Every device's topic of one kind (`status`, `reported`, `events`, ...).
    pub fn all_devices(&self, kind: &str) -> String {
        format!("{}/devices/+/{kind}", self.prefix)
    }
    /// Every group's desired state.
    pub fn all_groups_desired(&self) -> String {
        format!("{}/groups/+/desired", self.prefix)
    }
    /// All chunks of all artifacts.
    pub fn all_artifacts(&self) -> String {
        format!("{}/artifacts/#", self.prefix)
    }
    /// The chunk list of one transfer.
    pub fn list(&self, sha256: &[u8; 32]) -> String {
        format!("{}/artifacts/{}/list", self.prefix, hex::encode(sha256))
    }
    /// The upload marker of one artifact.
    pub fn upload(&self, sha256: &[u8; 32]) -> String {
        format!("{}/uploads/{}", self.prefix, hex::encode(sha256))
    }
    /// Every upload marker.
    pub fn all_uploads(&self) -> String {
        format!("{}/uploads/+", self.prefix)
    }

    /// `(device, kind)` of a device topic.
    pub fn root(&self, version: u64) -> String {
        format!("{}/roots/{version}", self.prefix)
    }

    pub fn all_roots(&self) -> String {
        format!("{}/roots/+", self.prefix)
    }

    pub fn parse_root(&self, topic: &str) -> Option<u64> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/roots/")?
            .parse()
            .ok()
    }

    /// The registry's signed head (see `trust::registry`).
    pub fn registry(&self) -> String {
        format!("{}/registry", self.prefix)
    }
    /// One part of the registry, by its sha256.
    pub fn registry_part(&self, sha256: &[u8; 32]) -> String {
        format!("{}/registry/parts/{}", self.prefix, hex::encode(sha256))
    }
    /// The registry's head and every part.
    pub fn registry_all(&self) -> String {
        format!("{}/registry/#", self.prefix)
    }

    pub fn parse_device<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/devices/")?;
        rest.split_once('/')
    }

    /// `(sha256, n)` of a chunk topic.
    pub fn parse_chunk(&self, topic: &str) -> Option<([u8; 32], u32)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/artifacts/")?;
        let (sha, n) = rest.split_once('/')?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some((out, n.parse().ok()?))
    }

    /// The transfer a chunk or chunk-list topic belongs to.
    pub fn parse_artifact(&self, topic: &str) -> Option<[u8; 32]> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/artifacts/")?;
        let (sha, part) = rest.split_once('/')?;
        if part != "list" && part.parse::<u32>().is_err() {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some(out)
    }

    /// The sha256 of an upload marker's topic.
    pub fn parse_upload(&self, topic: &str) -> Option<[u8; 32]> {
        let sha = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/uploads/")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(sha, &mut out).ok()?;
        Some(out)
    }
}

mod desired;
mod health;
mod report;
mod tags;
pub use desired::*;
pub use health::*;
pub use report::*;
pub use tags::*;

/// Retained on `uploads/{sha256}` before the first chunk of an artifact goes up, so
/// that `kiln gc` leaves chunks alone that no desired state references *yet*: the
/// desired state is published only after the last chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upload {
    V1 {
        sha256: [u8; 32],
        /// When the upload started, by the uploader's clock (Unix milliseconds).
        started_ms: u64,
        /// How many chunks the artifact has.
        chunks: u32,
    },
}

#[cfg(test)]
mod tests;
