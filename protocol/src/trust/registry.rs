//! The registry of enrolled devices: each device's identity key, signed by the
//! fleet's enroll role. It is kept as a signed head and parts ([`crate::parts`]), so it
//! grows with the fleet without a ceiling near 100,000 devices: enrolling one device
//! rewrites its part and the head. A registry written before parts (one signed message
//! of every device, [`SignedRegistry::V1`]) still opens; the next write gives it parts.

use serde::{Deserialize, Serialize};

use super::root::Root;
use super::{
    open_body, sign_all, unwrap_envelope, OpenError, Sig, MAX_REGISTRY, REGISTRY_CONTEXT,
    REGISTRY_V2_CONTEXT,
};
use crate::keys::{PublicKey, SecretKey};
use crate::parts::{self, JoinError, PartRef, Published};

/// The device keys the fleet has enrolled: a report verifies when it is signed by its
/// device's enrolled key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub fleet: String,
    /// Each change adds one.
    pub serial: u64,
    /// By device name, in order: [`Registry::enroll`] and opening keep them so.
    pub devices: Vec<Enrolled>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub key: [u8; 32],
}

/// What is signed of a registry with parts: its parts' hashes, not its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    fleet: String,
    serial: u64,
    parts: Vec<PartRef>,
}

impl Registry {
    pub fn key_of(&self, device: &str) -> Option<PublicKey> {
        let at = self
            .devices
            .binary_search_by(|e| e.device.as_str().cmp(device))
            .ok()?;
        PublicKey::from_bytes(&self.devices[at].key).ok()
    }

    /// Enrolls `device` with `key`, replacing a key it had.
    pub fn enroll(&mut self, device: &str, key: &PublicKey) {
        let entry = Enrolled {
            device: device.into(),
            key: key.to_bytes(),
        };
        match self
            .devices
            .binary_search_by(|e| e.device.as_str().cmp(device))
        {
            Ok(at) => self.devices[at] = entry,
            Err(at) => self.devices.insert(at, entry),
        }
    }

    /// The head signed by `keys`, and the parts it names.
    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Published, String> {
        let split = parts::split(
            self.devices.iter().map(|e| (&e.device, &e.key)),
            "the registry",
            parts::MAX_PART,
        )?;
        let head = Head {
            fleet: self.fleet.clone(),
            serial: self.serial,
            parts: split.refs,
        };
        let body = postcard::to_stdvec(&head).map_err(|e| e.to_string())?;
        let signatures = sign_all(REGISTRY_V2_CONTEXT, &body, keys);
        let bytes = postcard::to_stdvec(&SignedRegistry::V2 { body, signatures })
            .map_err(|e| e.to_string())?;
        if bytes.len() > MAX_REGISTRY {
            return Err(format!(
                "the registry's head would be {} bytes (limit {MAX_REGISTRY})",
                bytes.len()
            ));
        }
        Ok(Published {
            head: bytes,
            parts: split.parts,
        })
    }

    /// The registry as one signed message of every device, as it was kept before
    /// parts: for tests of reading an old fleet.
    pub fn sign_whole(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(REGISTRY_CONTEXT, &body, keys);
        let bytes = postcard::to_stdvec(&SignedRegistry::V1 { body, signatures })
            .map_err(|e| e.to_string())?;
        if bytes.len() > MAX_REGISTRY {
            return Err(format!(
                "the registry would be {} bytes (limit {MAX_REGISTRY}): {} devices",
                bytes.len(),
                self.devices.len()
            ));
        }
        Ok(bytes)
    }
}

/// The envelope on the registry topic: `V1` a whole registry (before parts), `V2` the
/// head of one with parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRegistry {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
    V2 { body: Vec<u8>, signatures: Vec<Sig> },
}

impl SignedRegistry {
    /// The registry, if a threshold of `root`'s registry role signed its head for its
    /// fleet and every part the head names is found by `part` (by sha256) as named.
    pub fn open<'a>(
        head: &[u8],
        part: impl Fn(&[u8; 32]) -> Option<&'a [u8]>,
        root: &Root,
    ) -> Result<Registry, String> {
        Self::verify(head, part, root).map_err(|e| e.to_string())
    }

    /// [`SignedRegistry::open`] with the kind of failure: [`OpenError::Incomplete`]
    /// when a part is not there (read again).
    pub fn verify<'a>(
        head: &[u8],
        part: impl Fn(&[u8; 32]) -> Option<&'a [u8]>,
        root: &Root,
    ) -> Result<Registry, OpenError> {
        let (what, kind) = ("the device registry", "registry");
        let mut registry = match unwrap_envelope(head, MAX_REGISTRY, kind)? {
            SignedRegistry::V1 { body, signatures } => {
                let (whole, _): (Registry, _) = open_body(
                    root.registry_role(),
                    REGISTRY_CONTEXT,
                    (&body, &signatures),
                    what,
                    kind,
                )?;
                check_fleet(&whole.fleet, root)?;
                whole
            }
            SignedRegistry::V2 { body, signatures } => {
                let (head, _): (Head, _) = open_body(
                    root.registry_role(),
                    REGISTRY_V2_CONTEXT,
                    (&body, &signatures),
                    what,
                    kind,
                )?;
                check_fleet(&head.fleet, root)?;
                let entries: Vec<(String, [u8; 32])> =
                    parts::join(&head.parts, part, parts::MAX_PART).map_err(|e| match e {
                        JoinError::Missing(_) => {
                            OpenError::Incomplete(format!("the registry's {e}"))
                        }
                        JoinError::Bad(why) => {
                            OpenError::Malformed(format!("the registry's {why}"))
                        }
                    })?;
                Registry {
                    fleet: head.fleet,
                    serial: head.serial,
                    devices: entries
                        .into_iter()
                        .map(|(device, key)| Enrolled { device, key })
                        .collect(),
                }
            }
        };
        registry.devices.sort_by(|a, b| a.device.cmp(&b.device));
        registry.devices.dedup_by(|a, b| a.device == b.device);
        Ok(registry)
    }
}

fn check_fleet(fleet: &str, root: &Root) -> Result<(), OpenError> {
    if fleet != root.fleet {
        return Err(OpenError::WrongFleet(format!(
            "the registry is for fleet {fleet}, not {}",
            root.fleet
        )));
    }
    Ok(())
}

/// Whether a device's message is from its enrolled key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Signed by the key the registry holds for the device.
    Verified,
    /// Signed, but the device is not enrolled.
    Unenrolled(PublicKey),
    /// Signed by a key other than the enrolled one: forged, or the device was
    /// re-provisioned and must be enrolled again.
    Mismatch(PublicKey),
    /// Not signed (a kilnd before device identities).
    Unsigned,
}

impl Identity {
    pub fn of(registry: &Registry, device: &str, signer: Option<&PublicKey>) -> Self {
        match (signer, registry.key_of(device)) {
            (None, _) => Identity::Unsigned,
            (Some(k), Some(enrolled)) if *k == enrolled => Identity::Verified,
            (Some(k), Some(_)) => Identity::Mismatch(k.clone()),
            (Some(k), None) => Identity::Unenrolled(k.clone()),
        }
    }

    pub fn is_verified(&self) -> bool {
        *self == Identity::Verified
    }

    /// One word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            Identity::Verified => "verified",
            Identity::Unenrolled(_) => "unenrolled",
            Identity::Mismatch(_) => "MISMATCH",
            Identity::Unsigned => "unsigned",
        }
    }
}
