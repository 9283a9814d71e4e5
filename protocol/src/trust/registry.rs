//! The registry of enrolled devices: each device's identity key, signed by the
//! fleet's enroll role.

use serde::{Deserialize, Serialize};

use super::root::Root;
use super::{open_body, sign_all, unwrap_envelope, OpenError, Sig, MAX_REGISTRY, REGISTRY_CONTEXT};
use crate::keys::{PublicKey, SecretKey};

/// The device keys the fleet has enrolled: a report verifies when it is signed by its
/// device's enrolled key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub fleet: String,
    /// Each change adds one.
    pub serial: u64,
    pub devices: Vec<Enrolled>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub key: [u8; 32],
}

impl Registry {
    pub fn key_of(&self, device: &str) -> Option<PublicKey> {
        self.devices
            .iter()
            .find(|e| e.device == device)
            .and_then(|e| PublicKey::from_bytes(&e.key).ok())
    }

    /// Enrolls `device` with `key`, replacing a key it had.
    pub fn enroll(&mut self, device: &str, key: &PublicKey) {
        self.devices.retain(|e| e.device != device);
        self.devices.push(Enrolled {
            device: device.into(),
            key: key.to_bytes(),
        });
        self.devices.sort_by(|a, b| a.device.cmp(&b.device));
    }

    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRegistry {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
}

impl SignedRegistry {
    /// The registry, if a threshold of `root`'s registry role signed it for its fleet.
    pub fn open(bytes: &[u8], root: &Root) -> Result<Registry, String> {
        Self::verify(bytes, root).map_err(|e| e.to_string())
    }

    /// [`SignedRegistry::open`] with the kind of failure.
    pub fn verify(bytes: &[u8], root: &Root) -> Result<Registry, OpenError> {
        let SignedRegistry::V1 { body, signatures } =
            unwrap_envelope(bytes, MAX_REGISTRY, "registry")?;
        let (registry, _): (Registry, _) = open_body(
            root.registry_role(),
            REGISTRY_CONTEXT,
            (&body, &signatures),
            "the device registry",
            "registry",
        )?;
        if registry.fleet != root.fleet {
            return Err(OpenError::WrongFleet(format!(
                "the registry is for fleet {}, not {}",
                registry.fleet, root.fleet
            )));
        }
        Ok(registry)
    }
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
