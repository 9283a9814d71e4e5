//! Commands from the fleet to one module on a device (or on every device of a group),
//! and the device's reply: what `kiln send` writes and kilnd reads.
//!
//! A command is signed by a threshold of the release role the device's root names
//! (the keys that already decide what runs on it), so a broker ACL mistake or a leaked
//! device credential cannot drive a module. It names its fleet, its target, the module
//! and a topic, carries at most [`MAX_DATA`] bytes, a random id and a short validity
//! ([`MAX_VALID_MS`]). A device takes each id once while it is valid ([`Seen`]), and
//! refuses one sent before it started (it cannot know whether it ran one before), so
//! a captured command cannot be played again. The module gets it as a message on
//! topic `command/<topic>` and may answer with the `reply` import; the device signs
//! the [`Reply`] with its identity key, which `kiln send` checks against the registry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::{DeviceMessage, DeviceSigned};
use crate::keys::{KeyId, SecretKey};
use crate::names::{self, Kind};
use crate::trust::{open_body, sign_all, unwrap_envelope, OpenError, Role, Sig};

/// The most bytes a command carries to a module, and a reply back.
pub const MAX_DATA: usize = 16 * 1024;
/// A whole signed command: its data, names and a few signatures.
pub const MAX_COMMAND: usize = MAX_DATA + 4 * 1024;
/// A whole signed reply.
pub const MAX_REPLY: usize = MAX_DATA + 2 * 1024;
/// The longest a command stays valid: long enough for a device on a slow link, short
/// enough that the ids a device keeps to refuse replays stay few.
pub const MAX_VALID_MS: u64 = 10 * 60 * 1000;
/// How far in the future (by the device's clock) a command may say it was issued.
pub const SKEW_MS: u64 = 60 * 1000;
/// Ids a device keeps while they are valid; more commands in flight are refused.
pub const MAX_SEEN: usize = 4096;
/// The topic a module sees a command on is `command/<topic>`.
pub const MESSAGE_PREFIX: &str = "command/";

const CONTEXT: &[u8] = b"kiln command v1\0";

/// Who a command is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum To {
    Device(String),
    Group(String),
}

impl std::fmt::Display for To {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            To::Device(d) => write!(f, "device {d}"),
            To::Group(g) => write!(f, "group {g}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub fleet: String,
    pub to: To,
    pub module: String,
    /// A stream-like name: the module sees `command/<topic>`.
    pub topic: String,
    pub data: Vec<u8>,
    /// Random, chosen by the sender: the reply names it, and a device takes it once.
    pub id: u64,
    /// Unix ms by the sender's clock.
    pub issued_ms: u64,
    pub expires_ms: u64,
    /// Whether the sender waits for a reply.
    pub reply: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Signed {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
}

impl Command {
    /// Names and bounds, checked by the sender before signing and by the device after
    /// the signatures verify.
    pub fn check(&self) -> Result<(), String> {
        names::check(Kind::Fleet, &self.fleet)?;
        match &self.to {
            To::Device(d) => names::check(Kind::Device, d)?,
            To::Group(g) => names::check(Kind::Group, g)?,
        }
        names::check(Kind::Module, &self.module)?;
        names::check(Kind::Stream, &self.topic).map_err(|e| format!("command topic: {e}"))?;
        if self.data.len() > MAX_DATA {
            return Err(format!(
                "the command carries {} bytes (limit {MAX_DATA})",
                self.data.len()
            ));
        }
        if self.expires_ms <= self.issued_ms || self.expires_ms - self.issued_ms > MAX_VALID_MS {
            return Err(format!(
                "a command is valid for 1 ms to {} s, this one for {} ms",
                MAX_VALID_MS / 1000,
                self.expires_ms as i128 - self.issued_ms as i128
            ));
        }
        Ok(())
    }

    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        self.check()?;
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(CONTEXT, &body, keys);
        let bytes =
            postcard::to_stdvec(&Signed::V1 { body, signatures }).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_COMMAND {
            return Err(format!(
                "the signed command is {} bytes (limit {MAX_COMMAND})",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// The topic the module sees it on.
    pub fn message_topic(&self) -> String {
        format!("{MESSAGE_PREFIX}{}", self.topic)
    }
}

/// Opens a command: bounded, signed by a threshold of `role`, then checked. Whether it
/// is for this device and fresh is [`Seen::admit`]'s question.
pub fn open(bytes: &[u8], role: &Role) -> Result<(Command, Vec<KeyId>), OpenError> {
    let Signed::V1 { body, signatures } = unwrap_envelope(bytes, MAX_COMMAND, "command")?;
    let (command, signers): (Command, _) = open_body(
        role,
        CONTEXT,
        (&body, &signatures),
        "the command",
        "command",
    )?;
    command.check().map_err(OpenError::Malformed)?;
    Ok((command, signers))
}

/// Arbitrary `body` bytes signed as a command's: for the fuzz targets, which reach the
/// body's decoder past the signatures.
#[cfg(feature = "fuzzing")]
pub fn sign_body(body: Vec<u8>, keys: &[&SecretKey]) -> Vec<u8> {
    let signatures = sign_all(CONTEXT, &body, keys);
    postcard::to_stdvec(&Signed::V1 { body, signatures }).unwrap_or_default()
}

/// The device's side of a command: for whom, from when, and once.
pub struct Device<'a> {
    pub fleet: &'a str,
    pub device: &'a str,
    pub groups: &'a [String],
    /// When this kilnd started (Unix ms): a command issued before it may have run.
    pub started_ms: u64,
    pub now_ms: u64,
}

/// The ids of the commands a device took, kept until each expires.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    until: BTreeMap<u64, u64>,
}

impl Seen {
    /// Whether a verified `command` may run on `device` now; if it may, its id is
    /// taken. A refusal says why, for the reply and the device's events.
    pub fn admit(&mut self, command: &Command, device: &Device<'_>) -> Result<(), String> {
        if command.fleet != device.fleet {
            return Err(format!(
                "the command is for fleet {}, this device is in fleet {}",
                command.fleet, device.fleet
            ));
        }
        let ours = match &command.to {
            To::Device(d) => d == device.device,
            To::Group(g) => device.groups.contains(g),
        };
        if !ours {
            return Err(format!(
                "the command is for {}, not device {}",
                command.to, device.device
            ));
        }
        let now = device.now_ms;
        if command.expires_ms <= now {
            return Err(format!(
                "the command expired {} s ago (by this device's clock)",
                (now - command.expires_ms) / 1000
            ));
        }
        if command.issued_ms > now.saturating_add(SKEW_MS) {
            return Err(format!(
                "the command says it was issued {} s from now (by this device's clock)",
                (command.issued_ms - now) / 1000
            ));
        }
        if command.issued_ms < device.started_ms {
            return Err(
                "the command was issued before this kilnd started: it may have run already".into(),
            );
        }
        self.until.retain(|_, until| *until > now);
        if self.until.contains_key(&command.id) {
            return Err(format!(
                "command {:016x} was taken already (a replay)",
                command.id
            ));
        }
        if self.until.len() >= MAX_SEEN {
            return Err(format!(
                "{MAX_SEEN} commands are in flight on this device; try again later"
            ));
        }
        self.until.insert(command.id, command.expires_ms);
        Ok(())
    }
}

/// What became of a command on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The module's `kiln_on_message` returned `status`, having replied `data`.
    Answered { status: i32, data: Vec<u8> },
    /// The device did not deliver it (the words say why).
    Refused(String),
    /// Delivered, but the module did not finish the call (it trapped, ran out of
    /// time, or was not running).
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyV1 {
    pub device: String,
    pub id: u64,
    pub at_ms: u64,
    pub outcome: Outcome,
}

/// A device's reply, signed with its identity key on its `replies` topic
/// (`crate::fleet::report::seal_report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    V1(ReplyV1),
    Signed(DeviceSigned),
}

impl DeviceMessage for Reply {
    const CONTEXT: &'static [u8] = b"kiln reply v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Reply::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Reply::Signed(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
