//! The rollout record as it is kept on the broker: a signed head (the rollout but its
//! members) and its members in parts ([`crate::parts`]), so a record grows with the
//! group without a ceiling below 100,000 devices; any operator's kiln reads it whole,
//! and only a head a threshold of the release role signed, with the parts it names,
//! ever opens. Records from before parts (v1, v2, v3: one message each) still open.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{v1, v2, Device, Rollout, MAX_ROLLOUT};
use crate::keys::SecretKey;
use crate::parts::{self, JoinError, PartRef, Published};
use crate::trust::{open_body, sign_all, unwrap_envelope, OpenError, Root, Sig};

/// Records with parts (v4); before them, v3 (cohorts), v2 (gates), v1.
const CONTEXT: &[u8] = b"kiln rollout v4\0";
pub(super) const CONTEXT_V3: &[u8] = b"kiln rollout v3\0";
pub(super) const CONTEXT_V2: &[u8] = b"kiln rollout v2\0";
pub(super) const CONTEXT_V1: &[u8] = b"kiln rollout v1\0";

/// The signed envelope: a v1 body (before health gates) opens as a record with
/// none, a v2 body (before cohorts) as one with no cohort, a v3 body whole; records
/// are sealed as v4 (a head and parts), which a kiln before parts does not open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedRollout {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
    V2 { body: Vec<u8>, signatures: Vec<Sig> },
    V3 { body: Vec<u8>, signatures: Vec<Sig> },
    V4 { body: Vec<u8>, signatures: Vec<Sig> },
}

/// What a v4 head signs: the record with no members, how many each wave and the
/// skipped list hold, and the parts that hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Head {
    record: Rollout,
    waves: Vec<u32>,
    skipped: u32,
    parts: Vec<PartRef>,
}

impl Head {
    /// `record` without its members, with `waves` and `skipped` places and `parts`.
    fn of(record: &Rollout, waves: Vec<u32>, skipped: u32, parts: Vec<PartRef>) -> Head {
        // Field by field: cloning the record whole would copy every member (on each
        // write of a 10,000-device rollout) only to drop them.
        Head {
            record: Rollout {
                fleet: record.fleet.clone(),
                group: record.group.clone(),
                id: record.id.clone(),
                serial: record.serial,
                started_by: record.started_by.clone(),
                driver: record.driver.clone(),
                started_ms: record.started_ms,
                updated_ms: record.updated_ms,
                module: record.module.clone(),
                policy: record.policy.clone(),
                waves: Vec::new(),
                devices: BTreeMap::new(),
                skipped: Vec::new(),
                unexpected: BTreeSet::new(),
                phase: record.phase.clone(),
                history: record.history.clone(),
                seed: record.seed,
                wave_starts: record.wave_starts.clone(),
                hold: record.hold,
            },
            waves,
            skipped,
            parts,
        }
    }

    /// The v4 envelope, signed by `keys`.
    fn sign(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(CONTEXT, &body, keys);
        postcard::to_stdvec(&SignedRollout::V4 { body, signatures }).map_err(|e| e.to_string())
    }
}

/// One device's place in the record, in its part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Member {
    /// Its state, and its place in its wave (`device.wave`).
    device: Option<(Device, u32)>,
    /// Left out: why, and its place among those left out.
    skipped: Option<(String, u32)>,
    unexpected: bool,
}

impl Rollout {
    /// Signs the record with `keys` (a threshold of the fleet's release role): its
    /// head, and the parts the head names.
    pub fn seal(&self, keys: &[&SecretKey]) -> Result<Published, String> {
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for (w, wave) in self.waves.iter().enumerate() {
            for (at, name) in wave.iter().enumerate() {
                let d = self
                    .devices
                    .get(name)
                    .filter(|d| d.wave as usize == w)
                    .ok_or_else(|| format!("{name} is in wave {} but not its member", w + 1))?;
                let m = members.entry(name.clone()).or_default();
                if m.device.replace((d.clone(), at as u32)).is_some() {
                    return Err(format!("{name} is in the waves twice"));
                }
            }
        }
        if members.len() != self.devices.len() {
            return Err("a member of the rollout is in no wave".into());
        }
        for (at, (name, why)) in self.skipped.iter().enumerate() {
            let m = members.entry(name.clone()).or_default();
            if m.skipped.replace((why.clone(), at as u32)).is_some() {
                return Err(format!("{name} is skipped twice"));
            }
        }
        for name in &self.unexpected {
            members.entry(name.clone()).or_default().unexpected = true;
        }
        let split = parts::split(&members, "the rollout record", MAX_ROLLOUT)?;
        let waves = self.waves.iter().map(|w| w.len() as u32).collect();
        let head = Head::of(self, waves, self.skipped.len() as u32, split.refs);
        let bytes = head.sign(keys)?;
        if bytes.len() > MAX_ROLLOUT {
            return Err(format!(
                "the rollout record's head would be {} bytes (limit {MAX_ROLLOUT})",
                bytes.len()
            ));
        }
        Ok(Published {
            head: bytes,
            parts: split.parts,
        })
    }

    /// The record whose head is `head`, if a threshold of `root`'s release keys signed
    /// it for this fleet and the group the topic names, with the parts it names (found
    /// by `part`, by sha256).
    pub fn open<'a>(
        head: &[u8],
        part: impl Fn(&[u8; 32]) -> Option<&'a [u8]>,
        root: &Root,
        group: &str,
    ) -> Result<Self, String> {
        Self::verify(head, part, root, group).map_err(|e| e.to_string())
    }

    /// [`Rollout::open`] with the kind of failure: [`OpenError::Incomplete`] when a
    /// part is not there (read again).
    pub fn verify<'a>(
        head: &[u8],
        part: impl Fn(&[u8; 32]) -> Option<&'a [u8]>,
        root: &Root,
        group: &str,
    ) -> Result<Self, OpenError> {
        let r = match Self::open_signed(head, root)? {
            Signed::Whole(r) => *r,
            Signed::Head(head) => {
                let members = parts::join(&head.parts, part, MAX_ROLLOUT).map_err(|e| match e {
                    JoinError::Missing(_) => {
                        OpenError::Incomplete(format!("the rollout record's {e}"))
                    }
                    JoinError::Bad(why) => {
                        OpenError::Malformed(format!("the rollout record's {why}"))
                    }
                })?;
                whole(*head, members).map_err(|e| {
                    OpenError::Malformed(format!("the rollout record's members: {e}"))
                })?
            }
        };
        r.check()
            .map_err(|e| OpenError::Malformed(format!("rollout record {}: {e}", r.id)))?;
        r.for_group(root, group)?;
        Ok(r)
    }

    /// The record's head alone, signature and fleet checked, without its members
    /// (`devices`, `waves`, `skipped` and `unexpected` are empty): what a driver needs
    /// of another writer's head (its rollout, serial and phase) when the broker may
    /// already hold a later write in its place.
    pub fn verify_head(head: &[u8], root: &Root, group: &str) -> Result<Self, OpenError> {
        let r = match Self::open_signed(head, root)? {
            Signed::Whole(mut r) => {
                r.devices.clear();
                r.waves.clear();
                r.skipped.clear();
                r.unexpected.clear();
                *r
            }
            Signed::Head(head) => head.record,
        };
        r.for_group(root, group)?;
        Ok(r)
    }

    fn open_signed(head: &[u8], root: &Root) -> Result<Signed, OpenError> {
        let signed = unwrap_envelope(head, MAX_ROLLOUT, "rollout record")?;
        let (what, kind) = ("the rollout record", "rollout record");
        Ok(match signed {
            SignedRollout::V1 { body, signatures } => {
                let (old, _): (v1::RolloutV1, _) =
                    open_body(&root.release, CONTEXT_V1, (&body, &signatures), what, kind)?;
                Signed::Whole(Box::new(old.into()))
            }
            SignedRollout::V2 { body, signatures } => {
                let (old, _): (v2::RolloutV2, _) =
                    open_body(&root.release, CONTEXT_V2, (&body, &signatures), what, kind)?;
                Signed::Whole(Box::new(old.into()))
            }
            SignedRollout::V3 { body, signatures } => Signed::Whole(Box::new(
                open_body(&root.release, CONTEXT_V3, (&body, &signatures), what, kind)?.0,
            )),
            SignedRollout::V4 { body, signatures } => Signed::Head(Box::new(
                open_body(&root.release, CONTEXT, (&body, &signatures), what, kind)?.0,
            )),
        })
    }

    fn for_group(&self, root: &Root, group: &str) -> Result<(), OpenError> {
        if self.fleet != root.fleet || self.group != group {
            return Err(OpenError::WrongFleet(format!(
                "the rollout record is for group {} of fleet {}, not group {group} of {}",
                self.group, self.fleet, root.fleet
            )));
        }
        Ok(())
    }
}

/// A signed record as it was published: whole (formats 1 to 3) or a head naming parts.
enum Signed {
    Whole(Box<Rollout>),
    Head(Box<Head>),
}

/// The record a head and its members make: every place in every wave and in the
/// skipped list taken exactly once.
fn whole(head: Head, members: Vec<(String, Member)>) -> Result<Rollout, String> {
    let Head {
        mut record,
        waves: sizes,
        skipped,
        ..
    } = head;
    if !(record.devices.is_empty()
        && record.waves.is_empty()
        && record.skipped.is_empty()
        && record.unexpected.is_empty())
    {
        return Err("the head holds members of its own".into());
    }
    // The places are allocated only as many as there are members to fill them.
    let (in_waves, placed) = (
        sizes.iter().map(|n| *n as usize).sum::<usize>(),
        members.iter().filter(|(_, m)| m.device.is_some()).count(),
    );
    if in_waves != placed {
        return Err(format!("the waves hold {in_waves}, the parts {placed}"));
    }
    let left_out = members.iter().filter(|(_, m)| m.skipped.is_some()).count();
    if skipped as usize != left_out {
        return Err(format!("{skipped} skipped, the parts name {left_out}"));
    }
    let mut waves: Vec<Vec<Option<String>>> =
        sizes.iter().map(|n| vec![None; *n as usize]).collect();
    let mut skipped: Vec<Option<(String, String)>> = vec![None; left_out];
    for (name, m) in members {
        if let Some((device, at)) = m.device {
            let slot = waves
                .get_mut(device.wave as usize)
                .and_then(|w| w.get_mut(at as usize))
                .ok_or_else(|| {
                    format!(
                        "{name} is at {at} of wave {}, which has no such place",
                        device.wave + 1
                    )
                })?;
            if slot.replace(name.clone()).is_some() {
                return Err(format!("two devices at {at} of wave {}", device.wave + 1));
            }
            record.devices.insert(name.clone(), device);
        }
        if let Some((why, at)) = m.skipped {
            let slot = skipped
                .get_mut(at as usize)
                .ok_or_else(|| format!("{name} is skipped at {at}, past the list"))?;
            if slot.replace((name.clone(), why)).is_some() {
                return Err(format!("two devices skipped at {at}"));
            }
        }
        if m.unexpected {
            record.unexpected.insert(name);
        }
    }
    // Every place is taken: as many members as places, none twice.
    record.waves = waves
        .into_iter()
        .map(|w| w.into_iter().flatten().collect())
        .collect();
    record.skipped = skipped.into_iter().flatten().collect();
    Ok(record)
}

/// A v4 head of `record` (its members left out) naming `parts`, with `waves` and
/// `skipped` places, signed by `keys`: what a fuzz target needs to reach the decoder
/// of the parts behind a valid signature.
#[cfg(feature = "fuzzing")]
pub fn sign_head(
    record: &Rollout,
    waves: Vec<u32>,
    skipped: u32,
    parts: Vec<PartRef>,
    keys: &[&SecretKey],
) -> Vec<u8> {
    Head::of(record, waves, skipped, parts)
        .sign(keys)
        .expect("a head encodes")
}
