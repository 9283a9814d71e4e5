//! What a device publishes: its status (birth and LWT), what it runs (reported), the
//! events of every update, each signed with the device's identity key.

use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SecretKey};

/// Why a device's message is not taken: it does not decode (or is signed twice), or its
/// signature does not verify for its topic (forged, or moved to another topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Forged(String),
}

impl From<ReportError> for String {
    fn from(e: ReportError) -> Self {
        e.to_string()
    }
}

/// Retained on `status`: the birth message, or the LWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    V1(StatusV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
    V2(StatusV2),
}

/// kiln 0.2's status, still read (as a [`StatusV2`] without trust).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV1 {
    pub device: String,
    pub online: bool,
    pub facts: Option<DeviceFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV2 {
    pub device: String,
    pub online: bool,
    pub facts: Option<DeviceFacts>,
    pub trust: Option<TrustReport>,
}

impl From<StatusV1> for StatusV2 {
    fn from(s: StatusV1) -> Self {
        Self {
            device: s.device,
            online: s.online,
            facts: s.facts,
            trust: None,
        }
    }
}

/// What a device trusts, and whether it hears fresh desired states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustReport {
    pub fleet: String,
    pub root_version: u64,
    /// The device's identity key: what `kiln enroll` records.
    pub identity: [u8; 32],
    /// Issue time of the oldest desired state it follows (0: it has none yet).
    pub oldest_issued_ms: u64,
    /// Why the device thinks newer desired states are being withheld, if it does.
    pub stale: Option<String>,
}

impl Status {
    /// The status in its current form, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(StatusV2, Option<PublicKey>), ReportError> {
        let (status, signer) = open_report::<Status>(topic, bytes)?;
        let status = match status {
            Status::V1(s) => s.into(),
            Status::V2(s) => s,
            Status::Signed(_) => return Err(ReportError::Malformed("status signed twice".into())),
        };
        Ok((status, signer))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub triple: String,
    pub cpu_features: Vec<String>,
    pub kilnd: String,
    pub wasmer: String,
    pub kiln_abi: u32,
    pub groups: Vec<String>,
    pub boot_id: u64,
}

/// Retained on `reported`: what actually runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reported {
    V1(ReportedV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
}

impl Reported {
    /// The reported state, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(ReportedV1, Option<PublicKey>), ReportError> {
        match open_report::<Reported>(topic, bytes)? {
            (Reported::V1(r), signer) => Ok((r, signer)),
            (Reported::Signed(_), _) => {
                Err(ReportError::Malformed("reported state signed twice".into()))
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedV1 {
    /// Serial of the last desired state the device acted on.
    pub serial: u64,
    pub modules: Vec<ModuleReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleReport {
    pub name: String,
    /// The committed version, or while `state` is `Updating`, the version on trial.
    pub version: u64,
    pub sha256: [u8; 32],
    pub state: ModuleState,
    /// The newest event for this module, in words.
    pub last_event: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleState {
    Running,
    Updating,
    /// Not running and not restarted: its supervisor gave up, a command exited with a
    /// failure, or (never committed) its first version rolled back. `last_event` says
    /// why; `version` is the version it ran or tried.
    Failed,
    /// Crashed and waiting out its backoff before the next start; `last_event` says how
    /// many crashes and the last reason.
    Restarting,
    /// A WASI command that ran to its end and exited 0.
    Exited,
}

/// On `events`: every step of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    V1(EventV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
}

impl Event {
    /// The event, and who signed it (see [`open_report`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(EventV1, Option<PublicKey>), ReportError> {
        match open_report::<Event>(topic, bytes)? {
            (Event::V1(e), signer) => Ok((e, signer)),
            (Event::Signed(_), _) => Err(ReportError::Malformed("event signed twice".into())),
        }
    }
}

/// A message signed by the device that sent it: the postcard of the unsigned
/// message, the device's identity key, and its signature over
/// `CONTEXT || topic || 0 || body`. The topic names the device and the kind, so a
/// signed message cannot be replayed as another device's or as another kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSigned {
    pub body: Vec<u8>,
    pub key: [u8; 32],
    pub signature: Vec<u8>,
}

/// A message a device signs: its enum has a `Signed` variant.
pub trait DeviceMessage: Serialize + serde::de::DeserializeOwned + Sized {
    const CONTEXT: &'static [u8];
    fn wrap(signed: DeviceSigned) -> Self;
    fn as_signed(&self) -> Option<&DeviceSigned>;
}

impl DeviceMessage for Status {
    const CONTEXT: &'static [u8] = b"kiln status v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Status::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Status::Signed(s) => Some(s),
            _ => None,
        }
    }
}

impl DeviceMessage for Reported {
    const CONTEXT: &'static [u8] = b"kiln reported v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Reported::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Reported::Signed(s) => Some(s),
            _ => None,
        }
    }
}

impl DeviceMessage for Event {
    const CONTEXT: &'static [u8] = b"kiln event v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Event::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Event::Signed(s) => Some(s),
            _ => None,
        }
    }
}

fn report_message(context: &[u8], topic: &str, body: &[u8]) -> Vec<u8> {
    [context, topic.as_bytes(), &[0], body].concat()
}

/// `message` for `topic`, signed with the device's identity `key`.
pub fn seal_report<T: DeviceMessage>(message: &T, topic: &str, key: &SecretKey) -> Vec<u8> {
    let body = postcard::to_stdvec(message).unwrap_or_default();
    let signature = key.sign(&report_message(T::CONTEXT, topic, &body)).to_vec();
    postcard::to_stdvec(&T::wrap(DeviceSigned {
        body,
        key: key.public().to_bytes(),
        signature,
    }))
    .unwrap_or_default()
}

/// Decodes a device's message on `topic`: the unsigned message inside, and the key
/// that signed it for that topic (`None`: an unsigned message, from a kilnd before
/// identities). A signature that does not verify is an error, never `None`. Whether
/// the key is that device's is the registry's question.
pub fn open_report<T: DeviceMessage>(
    topic: &str,
    bytes: &[u8],
) -> Result<(T, Option<PublicKey>), ReportError> {
    let message: T = postcard::from_bytes(bytes)
        .map_err(|e| ReportError::Malformed(format!("malformed: {e}")))?;
    let Some(signed) = message.as_signed() else {
        return Ok((message, None));
    };
    let key = PublicKey::from_bytes(&signed.key)
        .map_err(|_| ReportError::Malformed("invalid signing key".into()))?;
    let signature: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| ReportError::Malformed("malformed signature".into()))?;
    if !key.verify_strict(&report_message(T::CONTEXT, topic, &signed.body), &signature) {
        return Err(ReportError::Forged(format!(
            "signature by {} does not verify for {topic}",
            key.id()
        )));
    }
    let inner: T = postcard::from_bytes(&signed.body)
        .map_err(|e| ReportError::Malformed(format!("malformed signed body: {e}")))?;
    Ok((inner, Some(key)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventV1 {
    pub at_ms: u64,
    pub module: String,
    pub version: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Downloading {
        have: u32,
        total: u32,
    },
    Staged,
    Verified,
    Activated,
    Committed,
    RolledBack {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    /// A patch did not give the artifact, and the device fetches it whole; or a mirror
    /// failed (the reason starts `the mirror `), and it fetches the transfer from the
    /// broker.
    FellBack {
        reason: String,
    },
    /// The device took a newer root document (a key rotation).
    Trusted {
        reason: String,
    },
    /// The desired states the device holds are older than its bound: newer ones may
    /// be withheld.
    Stale {
        reason: String,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Downloading { .. } => "downloading",
            EventKind::Staged => "staged",
            EventKind::Verified => "verified",
            EventKind::Activated => "activated",
            EventKind::Committed => "committed",
            EventKind::RolledBack { .. } => "rolled-back",
            EventKind::Rejected { .. } => "rejected",
            EventKind::FellBack { .. } => "fell-back",
            EventKind::Trusted { .. } => "trusted",
            EventKind::Stale { .. } => "stale",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventKind::Downloading { have, total } => {
                write!(f, "downloading {have}/{total} chunks")
            }
            EventKind::RolledBack { reason } => write!(f, "rolled back: {reason}"),
            EventKind::Rejected { reason } => write!(f, "rejected: {reason}"),
            // A mirror that failed: the same transfer comes from the broker.
            EventKind::FellBack { reason } if reason.starts_with("the mirror ") => {
                write!(f, "fetching from the broker: {reason}")
            }
            EventKind::FellBack { reason } => {
                write!(f, "fetching the full artifact: {reason}")
            }
            EventKind::Trusted { reason } => write!(f, "trusts {reason}"),
            EventKind::Stale { reason } => write!(f, "stale: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}
