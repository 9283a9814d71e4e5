//! Documents too large for one message, kept as a signed head and content-addressed
//! parts: the device registry and a rollout's per-device state, at any fleet size.
//!
//! A document's entries are keyed by device name and spread over [`PARTS`] parts by
//! the first byte of the name's sha256. Each non-empty part is published retained on a
//! topic named by its own sha256; the head (signed as the document always was) lists
//! every part's number, entry count and sha256, as TUF's snapshot binds its targets.
//! A reader takes the head, verifies it, then fetches each part, checks its length and
//! hash against the head before a byte of it is decoded, and refuses a part whose
//! entries are not its own, out of order or twice. So a forged part never counts, and
//! parts cannot be mixed across versions: a writer publishes its new parts, then the
//! head, then clears the parts no head names any more.
//!
//! At 100,000 devices a part holds about 400 entries; the ceiling is `PARTS` parts of
//! at most `max` bytes each: some 500,000 registry entries at [`MAX_PART`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::transfer::sha256;

/// Parts a document is spread over.
pub const PARTS: usize = 256;
/// One part's bytes at most, unless a document says otherwise: as a registry was,
/// whole, before it had parts (under AWS IoT Core's 128 KB per publish).
pub const MAX_PART: usize = 120 * 1024;

/// The part `name`'s entry belongs in.
pub fn part_of(name: &str) -> u8 {
    sha256(name.as_bytes())[0]
}

/// What a head says of one part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    pub part: u8,
    pub entries: u32,
    pub sha256: [u8; 32],
}

/// One part as published: its number and its entries, by name, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Part<T> {
    part: u8,
    entries: Vec<(String, T)>,
}

/// A document's entries split into parts: the refs for its head, and each part's bytes
/// with their sha256 (the topic they go on).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    pub refs: Vec<PartRef>,
    pub parts: Vec<([u8; 32], Vec<u8>)>,
}

/// A document as it is published: its signed head and its parts, each by its sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub head: Vec<u8>,
    pub parts: Vec<([u8; 32], Vec<u8>)>,
}

impl Published {
    /// The bytes it takes on the broker: its head and its parts.
    pub fn bytes(&self) -> usize {
        self.head.len() + self.parts.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// The part with `sha256`, as [`join`] looks parts up.
    pub fn part(&self, sha256: &[u8; 32]) -> Option<&[u8]> {
        self.parts
            .iter()
            .find(|(s, _)| s == sha256)
            .map(|(_, b)| b.as_slice())
    }
}

/// Splits `entries` (one per name) into parts of at most `max` bytes; `what` names the
/// document in errors.
pub fn split<'a, T: Serialize + Clone + 'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a T)>,
    what: &str,
    max: usize,
) -> Result<Split, String> {
    let mut by_part: Vec<Vec<(String, T)>> = vec![Vec::new(); PARTS];
    for (name, entry) in entries {
        by_part[usize::from(part_of(name))].push((name.clone(), entry.clone()));
    }
    let mut out = Split::default();
    for (n, mut entries) in by_part.into_iter().enumerate() {
        if entries.is_empty() {
            continue;
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        let count = entries.len();
        let part = Part {
            part: n as u8,
            entries,
        };
        let bytes = postcard::to_stdvec(&part).map_err(|e| e.to_string())?;
        if bytes.len() > max {
            return Err(format!(
                "part {n} of {what} would be {} bytes (limit {max}): {count} entries",
                bytes.len()
            ));
        }
        let digest = sha256(&bytes);
        out.refs.push(PartRef {
            part: n as u8,
            entries: count as u32,
            sha256: digest,
        });
        out.parts.push((digest, bytes));
    }
    Ok(out)
}

/// Why a document's parts do not join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// A part the head names is not (yet, or no longer) there: a writer may be
    /// between its parts and its head; read again.
    Missing([u8; 32]),
    /// A part that is not the one the head names, or not a part: never counts.
    Bad(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Missing(sha) => write!(f, "part {} is missing", hex::encode(&sha[..8])),
            JoinError::Bad(why) => f.write_str(why),
        }
    }
}

/// Checks the head's refs themselves: each part once, in order, at most [`PARTS`].
pub fn check_refs(refs: &[PartRef]) -> Result<(), String> {
    if refs.len() > PARTS {
        return Err(format!("{} parts (at most {PARTS})", refs.len()));
    }
    if refs.windows(2).any(|w| w[0].part >= w[1].part) {
        return Err("parts out of order or named twice".into());
    }
    if let Some(r) = refs.iter().find(|r| r.entries == 0) {
        return Err(format!("part {} is named with no entries", r.part));
    }
    Ok(())
}

/// The entries of every part `refs` names, each part fetched by `lookup` (by sha256)
/// and checked against its ref (at most `max` bytes, its hash) before it is decoded.
/// Entries come out in part order.
pub fn join<'a, T: DeserializeOwned>(
    refs: &[PartRef],
    lookup: impl Fn(&[u8; 32]) -> Option<&'a [u8]>,
    max: usize,
) -> Result<Vec<(String, T)>, JoinError> {
    check_refs(refs).map_err(JoinError::Bad)?;
    let mut out = Vec::new();
    for r in refs {
        let bytes = lookup(&r.sha256).ok_or(JoinError::Missing(r.sha256))?;
        let short = hex::encode(&r.sha256[..8]);
        if bytes.len() > max {
            return Err(JoinError::Bad(format!(
                "part {short} is {} bytes (limit {max})",
                bytes.len()
            )));
        }
        if sha256(bytes) != r.sha256 {
            return Err(JoinError::Bad(format!(
                "part {short} does not hash as the head says"
            )));
        }
        let part: Part<T> = postcard::from_bytes(bytes)
            .map_err(|e| JoinError::Bad(format!("part {short} does not decode: {e}")))?;
        if part.part != r.part || part.entries.len() != r.entries as usize {
            return Err(JoinError::Bad(format!(
                "part {short} is part {} of {} entries, the head says part {} of {}",
                part.part,
                part.entries.len(),
                r.part,
                r.entries
            )));
        }
        if part.entries.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(JoinError::Bad(format!(
                "part {short} has entries out of order or twice"
            )));
        }
        if let Some((name, _)) = part.entries.iter().find(|(n, _)| part_of(n) != r.part) {
            return Err(JoinError::Bad(format!(
                "part {short} holds `{name}`, which belongs in another part"
            )));
        }
        out.extend(part.entries);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn part<'a>(split: &'a Split, sha256: &[u8; 32]) -> Option<&'a [u8]> {
        split
            .parts
            .iter()
            .find(|(s, _)| s == sha256)
            .map(|(_, b)| b.as_slice())
    }

    proptest! {
        #[test]
        fn what_is_split_joins_back_in_name_order_within_each_part(
            entries in prop::collection::btree_map("[a-z0-9-]{1,12}", any::<u32>(), 0..300)
        ) {
            let split = split(&entries, "test", MAX_PART).unwrap();
            prop_assert!(split.refs.len() <= PARTS);
            let joined: Vec<(String, u32)> = join(&split.refs, |s| part(&split, s), MAX_PART).unwrap();
            let back: BTreeMap<String, u32> = joined.into_iter().collect();
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn any_change_to_a_part_is_refused(
            entries in prop::collection::btree_map("[a-z]{1,8}", any::<u32>(), 1..50),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let mut split = split(&entries, "test", MAX_PART).unwrap();
            let (_, bytes) = &mut split.parts[0];
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            let got = join::<u32>(&split.refs, |s| part(&split, s), MAX_PART);
            prop_assert!(matches!(got, Err(JoinError::Bad(_))), "{:?}", got);
        }
    }

    #[test]
    fn a_missing_part_says_so_and_a_part_of_another_document_is_refused() {
        let a: BTreeMap<String, u32> = [("dev-1".to_string(), 1)].into();
        let b: BTreeMap<String, u32> = [("dev-1".to_string(), 2)].into();
        let (sa, sb) = (
            split(&a, "a", MAX_PART).unwrap(),
            split(&b, "b", MAX_PART).unwrap(),
        );
        let none = |_: &[u8; 32]| -> Option<&[u8]> { None };
        assert_eq!(
            join::<u32>(&sa.refs, none, MAX_PART).unwrap_err(),
            JoinError::Missing(sa.refs[0].sha256)
        );
        // b's part offered under a's hash: refused before it is decoded.
        let swapped = |_: &[u8; 32]| Some(sb.parts[0].1.as_slice());
        let err = join::<u32>(&sa.refs, swapped, MAX_PART).unwrap_err();
        assert!(err.to_string().contains("does not hash"), "{err}");
    }

    #[test]
    fn a_part_holding_a_name_of_another_part_is_refused_even_when_its_hash_matches() {
        // A writer (or a forger who got the head signed) puts a name in the wrong
        // part: readers would find it twice or never; it never counts.
        let name = "dev-1".to_string();
        let wrong = part_of(&name).wrapping_add(1);
        let bytes = postcard::to_stdvec(&Part {
            part: wrong,
            entries: vec![(name, 7u32)],
        })
        .unwrap();
        let refs = vec![PartRef {
            part: wrong,
            entries: 1,
            sha256: sha256(&bytes),
        }];
        let err = join::<u32>(&refs, |_| Some(bytes.as_slice()), MAX_PART).unwrap_err();
        assert!(err.to_string().contains("belongs in another part"), "{err}");
    }

    #[test]
    fn refs_out_of_order_twice_or_too_many_are_refused() {
        let r = |part| PartRef {
            part,
            entries: 1,
            sha256: [0; 32],
        };
        assert!(check_refs(&[r(2), r(1)]).is_err());
        assert!(check_refs(&[r(1), r(1)]).is_err());
        assert!(check_refs(&[PartRef { entries: 0, ..r(1) }]).is_err());
        assert!(check_refs(&[r(1), r(2)]).is_ok());
    }

    #[test]
    fn a_part_too_large_names_its_document_and_count() {
        let entries: BTreeMap<String, Vec<u8>> = (0..4)
            .map(|i| (format!("d{i}"), vec![0u8; MAX_PART]))
            .collect();
        let err = split(&entries, "the registry", MAX_PART).unwrap_err();
        assert!(err.contains("of the registry would be"), "{err}");
    }
}
