//! The fleet's root of trust: the root document (its roles and their thresholds),
//! its signed versions, and the chain a device follows from the root it was
//! provisioned with to the newest.

use serde::{Deserialize, Serialize};

use super::{list, sign_all, Role, Sig, MAX_ROOT, ROOT_CONTEXT, ROOT_V2_CONTEXT};
use crate::keys::SecretKey;
use crate::names::{self, Kind};

/// The root document: which keys hold which role, for one fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Desired states name the fleet they are for; a device takes only its own
    /// fleet's (staging's states never apply in production).
    pub fleet: String,
    /// 1 for the first root; each rotation adds one.
    pub version: u64,
    /// When it was signed (Unix milliseconds, the signer's clock).
    pub issued_ms: u64,
    pub root: Role,
    pub release: Role,
    pub registry: Option<Role>,
    /// After this (Unix ms) the root is stale: a device says so in its status, and
    /// kiln warns, until a newer root (`kiln root rotate`, same keys or new) arrives;
    /// so a broker that withholds a rotation cannot do so unnoticed. `None`: never
    /// (roots written before expiry, which every kilnd reads).
    pub expires_ms: Option<u64>,
}

/// The body of a root document without an expiry (the `V1` envelope): what every
/// kilnd reads. A root with an expiry travels in the `V2` envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RootV1 {
    fleet: String,
    version: u64,
    issued_ms: u64,
    root: Role,
    release: Role,
    registry: Option<Role>,
}

impl From<RootV1> for Root {
    fn from(r: RootV1) -> Self {
        Root {
            fleet: r.fleet,
            version: r.version,
            issued_ms: r.issued_ms,
            root: r.root,
            release: r.release,
            registry: r.registry,
            expires_ms: None,
        }
    }
}

#[cfg(test)]
impl Root {
    /// The tests' root: fleet `acme`, v1, whose root and release roles are `key` alone.
    pub(crate) fn of_one_key(key: &SecretKey) -> Root {
        let role = Role::new(&[key.public()], 1);
        Root {
            fleet: "acme".into(),
            version: 1,
            issued_ms: 0,
            root: role.clone(),
            release: role,
            registry: None,
            expires_ms: None,
        }
    }
}

impl Root {
    /// Why this root is stale at `now_ms`, if it is.
    pub fn stale_at(&self, now_ms: u64) -> Option<String> {
        let expires = self.expires_ms?;
        (now_ms >= expires).then(|| {
            format!(
                "root v{} of fleet {} expired at {}; a newer root may be withheld (or is due: `kiln root rotate`)",
                self.version,
                self.fleet,
                crate::clock::utc(expires)
            )
        })
    }

    pub fn check(&self) -> Result<(), String> {
        names::check(Kind::Fleet, &self.fleet)?;
        if self.version == 0 {
            return Err("root version 0 (versions start at 1)".into());
        }
        self.root.check("root")?;
        self.release.check("release")?;
        if let Some(r) = &self.registry {
            r.check("registry")?;
        }
        Ok(())
    }

    /// The role that signs the device registry.
    pub fn registry_role(&self) -> &Role {
        self.registry.as_ref().unwrap_or(&self.release)
    }

    /// Signs it with each of `keys` (a threshold of the previous root's root keys and
    /// of its own, for a rotation).
    pub fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        self.check()?;
        let envelope = match self.expires_ms {
            None => {
                let v1 = RootV1 {
                    fleet: self.fleet.clone(),
                    version: self.version,
                    issued_ms: self.issued_ms,
                    root: self.root.clone(),
                    release: self.release.clone(),
                    registry: self.registry.clone(),
                };
                let body = postcard::to_stdvec(&v1).map_err(|e| e.to_string())?;
                let signatures = sign_all(ROOT_CONTEXT, &body, keys);
                SignedRoot::V1 { body, signatures }
            }
            Some(_) => {
                let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
                let signatures = sign_all(ROOT_V2_CONTEXT, &body, keys);
                SignedRoot::V2 { body, signatures }
            }
        };
        let bytes = postcard::to_stdvec(&envelope).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_ROOT {
            return Err(format!(
                "root document is {} bytes (limit {MAX_ROOT})",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// One line for a person: fleet, version, and who holds which role.
    pub fn describe(&self) -> String {
        let role = |r: &Role| format!("{} of [{}]", r.threshold, list(&r.ids()));
        let mut s = format!(
            "fleet {} root v{}: root {}, release {}",
            self.fleet,
            self.version,
            role(&self.root),
            role(&self.release)
        );
        if let Some(r) = &self.registry {
            s.push_str(&format!(", registry {}", role(r)));
        }
        if let Some(e) = self.expires_ms {
            s.push_str(&format!(", expires {}", crate::clock::utc(e)));
        }
        s
    }
}

/// A root document as it travels and is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRoot {
    V1 {
        body: Vec<u8>,
        signatures: Vec<Sig>,
    },
    /// A root with an expiry.
    V2 {
        body: Vec<u8>,
        signatures: Vec<Sig>,
    },
}

/// The root, its body, its signatures and the context they are over.
fn decode_root(bytes: &[u8]) -> Result<Opened, String> {
    let (root, body, signatures, context) =
        match postcard::from_bytes(bytes).map_err(|e| format!("malformed root document: {e}"))? {
            SignedRoot::V1 { body, signatures } => {
                let root: RootV1 = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed root document body: {e}"))?;
                (root.into(), body, signatures, ROOT_CONTEXT)
            }
            SignedRoot::V2 { body, signatures } => {
                let root: Root = postcard::from_bytes(&body)
                    .map_err(|e| format!("malformed root document body: {e}"))?;
                (root, body, signatures, ROOT_V2_CONTEXT)
            }
        };
    Ok(Opened {
        root,
        body,
        signatures,
        context,
    })
}

/// The parts of a root document, its own signatures checked.
struct Opened {
    root: Root,
    body: Vec<u8>,
    signatures: Vec<Sig>,
    context: &'static [u8],
}

fn open_self(bytes: &[u8]) -> Result<Opened, String> {
    if bytes.len() > MAX_ROOT {
        return Err(format!(
            "root document is {} bytes (limit {MAX_ROOT})",
            bytes.len()
        ));
    }
    let Opened {
        root,
        body,
        signatures,
        context,
    } = decode_root(bytes)?;
    root.check()
        .map_err(|e| format!("root v{} is invalid: {e}", root.version))?;
    root.root.verify(
        context,
        &body,
        &signatures,
        &format!("root v{} (by its own root keys)", root.version),
    )?;
    Ok(Opened {
        root,
        body,
        signatures,
        context,
    })
}

impl SignedRoot {
    /// A root a device is provisioned with: trusted because the operator put it
    /// there, and checked to be whole and signed by its own root keys.
    pub fn open_initial(bytes: &[u8]) -> Result<Root, String> {
        open_self(bytes).map(|o| o.root)
    }

    /// The root after `current`: the same fleet, exactly one version newer, signed
    /// by a threshold of `current`'s root keys and of its own.
    pub fn open_next(bytes: &[u8], current: &Root) -> Result<Root, String> {
        let Opened {
            root,
            body,
            signatures,
            context,
        } = open_self(bytes)?;
        if root.fleet != current.fleet {
            return Err(format!(
                "root v{} is for fleet {}, this device is in fleet {}",
                root.version, root.fleet, current.fleet
            ));
        }
        // Checked: a root at u64::MAX (self-signed by anyone) must not overflow here.
        if current.version.checked_add(1) != Some(root.version) {
            return Err(format!(
                "root v{} does not follow root v{} (versions go one at a time)",
                root.version, current.version
            ));
        }
        current.root.verify(
            context,
            &body,
            &signatures,
            &format!(
                "root v{} (by root v{}'s root keys)",
                root.version, current.version
            ),
        )?;
        Ok(root)
    }

    /// The document without checking a signature: for showing, never for trusting.
    pub fn peek(bytes: &[u8]) -> Result<Root, String> {
        if bytes.len() > MAX_ROOT {
            return Err(format!(
                "root document is {} bytes (limit {MAX_ROOT})",
                bytes.len()
            ));
        }
        decode_root(bytes).map(|o| o.root)
    }
}

/// The root a device (or the fleet tool) currently trusts, with its bytes, and how
/// it moves on to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    root: Root,
    bytes: Vec<u8>,
}

impl Chain {
    /// Starts from a root the operator provided (see [`SignedRoot::open_initial`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        let root = SignedRoot::open_initial(&bytes)?;
        Ok(Self { root, bytes })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes root `version + 1`, or says why not; nothing changes on an error.
    pub fn advance(&mut self, bytes: &[u8]) -> Result<&Root, String> {
        let next = SignedRoot::open_next(bytes, &self.root)?;
        self.root = next;
        self.bytes = bytes.to_vec();
        Ok(&self.root)
    }

    /// Follows `candidates` (any order, any versions) as far as they chain; returns
    /// the roots taken and the reasons the others were not. Versions at or below the
    /// current one are old news, not errors.
    pub fn follow<'a>(
        &mut self,
        candidates: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<u64>, Vec<String>) {
        let mut pending: Vec<(u64, &[u8])> = Vec::new();
        let mut errors = Vec::new();
        for bytes in candidates {
            match SignedRoot::peek(bytes) {
                Ok(r) if r.version > self.root.version => pending.push((r.version, bytes)),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        pending.sort_by_key(|(v, _)| *v);
        let mut taken = Vec::new();
        for (version, bytes) in pending {
            if version <= self.root.version {
                continue;
            }
            match self.advance(bytes) {
                Ok(r) => taken.push(r.version),
                Err(e) => errors.push(e),
            }
        }
        (taken, errors)
    }
}
