//! Documents kept as a signed head and parts on the broker (the registry, rollout
//! records: see `kiln_protocol::parts`): read whole, written in the order that keeps
//! them whole for every reader, and followed message by message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use kiln_protocol::parts::{Published, MAX_PART, PARTS};
use kiln_protocol::trust::OpenError;

use crate::fleet::broker::Session;

/// Reads `filter` (a head and its parts) and opens what it holds with `open`; reads
/// again, up to three times, while a part the head names is not there: a writer
/// publishes its new parts, then the head, then clears the parts no head names, so a
/// read between the last two misses a part the next read finds.
pub fn read_whole<T, E: Incomplete>(
    session: &mut Session,
    filter: &str,
    mut open: impl FnMut(&BTreeMap<String, Vec<u8>>) -> Result<T, E>,
) -> Result<Result<T, E>> {
    let mut tries = 0;
    loop {
        let retained = session.retained(filter)?;
        match open(&retained) {
            Err(e) if e.is_incomplete() && tries < 3 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(200 * tries));
            }
            other => return Ok(other),
        }
    }
}

/// Whether a document did not open only because a part was missing.
pub trait Incomplete {
    fn is_incomplete(&self) -> bool;
}

impl Incomplete for OpenError {
    fn is_incomplete(&self) -> bool {
        matches!(self, OpenError::Incomplete(_))
    }
}

/// Publishes `published` with its head on `head` and each part on `part(sha256)`: the
/// parts not in `held` (the part topics the broker holds) first, then the head, then,
/// if `clear`, clears the held parts the head does not name. Returns the part topics
/// it names.
///
/// Clearing is for a document's one writer at a time: a second writer's head that
/// lands meanwhile may name a part this one clears. A rollout's record has its driver
/// clear and the operators' pause and abort not (see `Driver::clears`).
pub fn publish(
    session: &mut Session,
    head: &str,
    part: impl Fn(&[u8; 32]) -> String,
    (held, clear): (&BTreeSet<String>, bool),
    published: Published,
) -> Result<BTreeSet<String>> {
    let named: BTreeSet<String> = published.parts.iter().map(|(sha, _)| part(sha)).collect();
    let new_parts: Vec<(String, Vec<u8>)> = published
        .parts
        .into_iter()
        .map(|(sha, bytes)| (part(&sha), bytes))
        .filter(|(topic, _)| !held.contains(topic))
        .collect();
    let stale: Vec<(String, Vec<u8>)> = held
        .difference(&named)
        .filter(|_| clear)
        .map(|t| (t.clone(), Vec::new()))
        .collect();
    for step in [new_parts, vec![(head.to_string(), published.head)], stale] {
        if !step.is_empty() {
            session.publish_all(step, |_| {})?;
        }
    }
    Ok(named)
}

/// A head and parts as they arrive one message at a time (the dashboard), bounded:
/// at most twice a document's parts are kept (a writer's new ones beside the old
/// until it clears them), each at most `max_part` bytes.
#[derive(Debug, Default)]
pub struct Assembly {
    head: Option<Vec<u8>>,
    parts: BTreeMap<[u8; 32], Vec<u8>>,
}

impl Assembly {
    /// A head (an empty payload clears it).
    pub fn head(&mut self, payload: &[u8]) {
        self.head = (!payload.is_empty()).then(|| payload.to_vec());
    }

    /// A part on the topic of `sha256` (an empty payload clears it). False when it is
    /// not kept: too large, or too many parts already.
    pub fn part(&mut self, sha256: [u8; 32], payload: &[u8], max_part: usize) -> bool {
        if payload.is_empty() {
            self.parts.remove(&sha256);
            return true;
        }
        if payload.len() > max_part.max(MAX_PART)
            || (self.parts.len() >= 2 * PARTS && !self.parts.contains_key(&sha256))
        {
            return false;
        }
        self.parts.insert(sha256, payload.to_vec());
        true
    }

    /// The head, and a lookup of its parts by sha256, if a head arrived.
    #[allow(clippy::type_complexity)]
    pub fn get<'a>(&'a self) -> Option<(&'a [u8], impl Fn(&[u8; 32]) -> Option<&'a [u8]> + 'a)> {
        let head = self.head.as_deref()?;
        Some((head, move |sha: &[u8; 32]| {
            self.parts.get(sha).map(Vec::as_slice)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assembly_keeps_parts_until_cleared_and_at_most_twice_a_documents() {
        let mut a = Assembly::default();
        assert!(a.get().is_none(), "no head yet");
        assert!(a.part([1; 32], b"one", MAX_PART));
        a.head(b"head");
        {
            let (head, part) = a.get().unwrap();
            assert_eq!((head, part(&[1; 32])), (&b"head"[..], Some(&b"one"[..])));
        }
        assert!(
            !a.part([2; 32], &vec![0; MAX_PART + 1], MAX_PART),
            "too large"
        );
        for n in 0..2 * PARTS - 1 {
            assert!(a.part(sha(n), b"x", MAX_PART));
        }
        assert!(!a.part([9; 32], b"x", MAX_PART), "full");
        assert!(a.part([1; 32], b"", MAX_PART), "a clear is always taken");
        assert!(a.part([9; 32], b"x", MAX_PART), "room again");
        a.head(b"");
        assert!(a.get().is_none(), "head cleared");
    }

    fn sha(n: usize) -> [u8; 32] {
        let mut s = [0xff; 32];
        s[..8].copy_from_slice(&(n as u64).to_le_bytes());
        s
    }
}
