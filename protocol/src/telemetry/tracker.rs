//! The consumer's bookkeeping (host side: `kiln watch`, the dashboard): per
//! `(device, boot_id)`, which seqs arrived, which are missing and which the device
//! said it dropped, in bounded memory.

use std::collections::BTreeMap;

use super::Dropped;

/// Most `(device, boot_id)` pairs a [`Tracker`] keeps; past it the one unused longest
/// is forgotten. Boot ids come from the wire, so a forger could otherwise make a
/// consumer keep one account per u64.
pub const MAX_STREAMS: usize = 1024;

/// Most ranges a [`Tracker`] keeps per `(device, boot_id)` in each of its sets
/// (received, missing, dropped); past it the lowest seqs are forgotten. Seqs are kept
/// as ranges, so memory follows how often the stream broke, not the seq values.
pub const MAX_RANGES: usize = 128;

/// What a consumer should make of a batch it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Seen for the first time. `gap` holds seqs skipped just now (they may still
    /// arrive late); `late` says this seq had been counted missing.
    New { gap: Option<(u64, u64)>, late: bool },
    /// Seen before: its records were already delivered.
    Duplicate,
    /// Below the seqs still tracked for its boot (older ones were forgotten to stay
    /// within [`MAX_RANGES`]): it cannot be told new from duplicate.
    Untracked,
}

/// Per `(device, boot_id)`: which seqs arrived, which are missing, which the device
/// said it dropped. Memory is bounded by [`MAX_STREAMS`] and [`MAX_RANGES`] whatever
/// the seqs and boot ids a broker forges.
#[derive(Debug, Default)]
pub struct Tracker {
    pub(super) streams: BTreeMap<(String, u64), Stream>,
    /// Stamps streams by last use, to forget the one unused longest.
    clock: u64,
    forgotten: Forgotten,
}

/// What a [`Tracker`] forgot to stay within [`MAX_STREAMS`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// `(device, boot_id)` accounts dropped.
    pub streams: u64,
    /// Seqs those accounts held as neither received nor reported dropped.
    pub unexplained: u64,
}

#[derive(Debug, Default, Clone)]
pub(super) struct Stream {
    first: u64,
    max: u64,
    pub(super) received: Ranges,
    pub(super) missing: Ranges,
    pub(super) dropped: Ranges,
    batches: u64,
    records: u64,
    duplicates: u64,
    /// Seqs below this were forgotten (0: none were).
    pub(super) floor: u64,
    /// Ranges forgotten, plus batches that arrived below `floor`.
    untracked: u64,
    /// Unexplained seqs among those forgotten.
    forgotten_unexplained: u64,
    last_used: u64,
}

/// A consumer's account of one `(device, boot_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub device: String,
    pub boot_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub batches: u64,
    pub records: u64,
    pub duplicates: u64,
    /// Seqs the device reported dropped (spool full).
    pub dropped: u64,
    /// Seqs neither received nor reported dropped, as inclusive ranges (one range
    /// can stand for 2^63 seqs a forged batch skipped).
    pub unexplained: Vec<(u64, u64)>,
    /// How many seqs are unexplained, including any in ranges forgotten (saturating).
    pub unexplained_batches: u64,
    /// Times bookkeeping was cut short to stay within [`MAX_RANGES`]: ranges
    /// forgotten, and batches that arrived below them.
    pub untracked: u64,
}

impl Tracker {
    pub fn batch(&mut self, device: &str, boot_id: u64, seq: u64, records: usize) -> Verdict {
        let s = match self.stream(device, boot_id) {
            Some(s) => s,
            None => {
                let clock = self.clock;
                self.insert(
                    device,
                    boot_id,
                    Stream {
                        first: seq,
                        max: seq,
                        received: Ranges::one(seq, seq),
                        batches: 1,
                        records: records as u64,
                        last_used: clock,
                        ..Stream::default()
                    },
                );
                return Verdict::New {
                    gap: None,
                    late: false,
                };
            }
        };
        if seq < s.floor {
            s.untracked = s.untracked.saturating_add(1);
            s.batches += 1;
            s.records = s.records.saturating_add(records as u64);
            return Verdict::Untracked;
        }
        if s.received.contains(seq) {
            s.duplicates += 1;
            return Verdict::Duplicate;
        }
        let verdict = if seq > s.max {
            // seq > max, so max + 1 cannot overflow.
            let gap = (seq > s.max + 1).then(|| (s.max + 1, seq - 1));
            if let Some((a, b)) = gap {
                s.missing.insert(a, b);
            }
            s.max = seq;
            Verdict::New { gap, late: false }
        } else if s.missing.remove(seq) {
            Verdict::New {
                gap: None,
                late: true,
            }
        } else {
            if seq < s.first {
                // Older than the first one seen: the consumer started mid-stream.
                if seq + 1 < s.first {
                    s.missing.insert(seq + 1, s.first - 1);
                }
                s.first = seq;
            }
            // Otherwise within the span yet never counted missing: a seq the device
            // reported dropped, or one below a drop report's range.
            Verdict::New {
                gap: None,
                late: true,
            }
        };
        s.received.insert(seq, seq);
        s.batches += 1;
        s.records = s.records.saturating_add(records as u64);
        s.bound();
        verdict
    }

    /// Notes a drop report from `device`.
    pub fn dropped(&mut self, device: &str, d: &Dropped) {
        if d.first_seq > d.last_seq {
            // Not a range: nothing a well-behaved device sends, and nothing to note.
            return;
        }
        let s = match self.stream(device, d.boot_id) {
            Some(s) => s,
            None => {
                let clock = self.clock;
                self.insert(
                    device,
                    d.boot_id,
                    Stream {
                        first: d.first_seq,
                        max: d.last_seq,
                        dropped: Ranges::one(d.first_seq, d.last_seq),
                        last_used: clock,
                        ..Stream::default()
                    },
                );
                return;
            }
        };
        if d.last_seq < s.floor {
            s.untracked = s.untracked.saturating_add(1);
            return;
        }
        let first = d.first_seq.max(s.floor);
        if let Some(next) = s.max.checked_add(1).filter(|&next| first > next) {
            // Batches between the newest seen and the dropped ones exist too.
            s.missing.insert(next, first - 1);
        }
        s.dropped.insert(first, d.last_seq);
        s.first = s.first.min(first);
        s.max = s.max.max(d.last_seq);
        s.bound();
    }

    pub fn accounts(&self) -> Vec<Account> {
        self.streams
            .iter()
            .map(|((device, boot_id), s)| {
                let unexplained = s.missing.minus(&s.dropped);
                let tracked = unexplained
                    .iter()
                    .fold(0u64, |n, (a, b)| n.saturating_add(width(*a, *b)));
                Account {
                    device: device.clone(),
                    boot_id: *boot_id,
                    first_seq: s.first,
                    last_seq: s.max,
                    batches: s.batches,
                    records: s.records,
                    duplicates: s.duplicates,
                    dropped: s.dropped.count(),
                    unexplained,
                    unexplained_batches: tracked.saturating_add(s.forgotten_unexplained),
                    untracked: s.untracked,
                }
            })
            .collect()
    }

    /// What was forgotten to stay within [`MAX_STREAMS`].
    pub fn forgotten(&self) -> Forgotten {
        self.forgotten
    }

    fn stream(&mut self, device: &str, boot_id: u64) -> Option<&mut Stream> {
        self.clock += 1;
        let clock = self.clock;
        let s = self.streams.get_mut(&(device.to_string(), boot_id))?;
        s.last_used = clock;
        Some(s)
    }

    fn insert(&mut self, device: &str, boot_id: u64, stream: Stream) {
        if self.streams.len() >= MAX_STREAMS {
            // A linear scan, but only when full, over at most MAX_STREAMS entries.
            let oldest = self
                .streams
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            if let Some(s) = oldest.and_then(|k| self.streams.remove(&k)) {
                let unexplained = s.missing.minus(&s.dropped);
                self.forgotten.streams += 1;
                self.forgotten.unexplained = unexplained
                    .iter()
                    .fold(self.forgotten.unexplained, |n, (a, b)| {
                        n.saturating_add(width(*a, *b))
                    })
                    .saturating_add(s.forgotten_unexplained);
            }
        }
        self.streams.insert((device.to_string(), boot_id), stream);
    }
}

impl Stream {
    /// Forgets the lowest seqs until every set is within [`MAX_RANGES`].
    fn bound(&mut self) {
        loop {
            let over = [&self.received, &self.missing, &self.dropped]
                .into_iter()
                .find(|r| r.len() > MAX_RANGES);
            // A set over the cap has at least two ranges, so its lowest one ends below
            // `max` and the new floor stays within the span.
            let Some(floor) = over
                .and_then(Ranges::lowest_end)
                .and_then(|e| e.checked_add(1))
            else {
                return;
            };
            let unexplained = self.missing.below(floor).minus(&self.dropped.below(floor));
            self.forgotten_unexplained = unexplained
                .iter()
                .fold(self.forgotten_unexplained, |n, (a, b)| {
                    n.saturating_add(width(*a, *b))
                });
            self.received.remove_below(floor);
            self.missing.remove_below(floor);
            self.dropped.remove_below(floor);
            self.floor = floor;
            self.first = self.first.max(floor);
            self.untracked = self.untracked.saturating_add(1);
        }
    }
}

/// How many seqs `a..=b` holds, saturating at `u64::MAX` for the full range.
fn width(a: u64, b: u64) -> u64 {
    (b - a).saturating_add(1)
}

/// A set of seqs as disjoint, non-adjacent inclusive ranges `start -> end`, merged on
/// insert: it costs one entry per run of seqs, whatever the seq values.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    pub(super) fn one(a: u64, b: u64) -> Self {
        Self(BTreeMap::from([(a, b)]))
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn contains(&self, x: u64) -> bool {
        self.0
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &end)| x <= end)
    }

    /// Adds `a..=b` (`a <= b`), merging with overlapping and adjacent ranges.
    pub(super) fn insert(&mut self, a: u64, b: u64) {
        let (mut a, mut b) = (a, b);
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e.saturating_add(1) >= a {
                a = s;
                b = b.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..).next() {
            if s > b.saturating_add(1) {
                break;
            }
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    /// Removes `x`; says whether it was there.
    pub(super) fn remove(&mut self, x: u64) -> bool {
        let Some((&s, &e)) = self.0.range(..=x).next_back() else {
            return false;
        };
        if x > e {
            return false;
        }
        self.0.remove(&s);
        if s < x {
            self.0.insert(s, x - 1);
        }
        if x < e {
            self.0.insert(x + 1, e);
        }
        true
    }

    pub(super) fn lowest_end(&self) -> Option<u64> {
        self.0.first_key_value().map(|(_, &e)| e)
    }

    /// The part below `floor`.
    pub(super) fn below(&self, floor: u64) -> Ranges {
        Ranges(
            self.0
                .range(..floor)
                .map(|(&s, &e)| (s, e.min(floor - 1)))
                .collect(),
        )
    }

    pub(super) fn remove_below(&mut self, floor: u64) {
        let keep = self.0.split_off(&floor);
        let straddling = self.0.last_key_value().map(|(_, &e)| e);
        self.0 = keep;
        if let Some(e) = straddling.filter(|&e| e >= floor) {
            self.0.insert(floor, e);
        }
    }

    /// How many seqs the set holds (saturating).
    pub(super) fn count(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |n, (&a, &b)| n.saturating_add(width(a, b)))
    }

    /// `self` without the seqs of `other`, as ranges; at most
    /// `self.len() + other.len()` of them.
    pub(super) fn minus(&self, other: &Ranges) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (&a, &b) in &self.0 {
            // Ranges of `other` that overlap a..=b, lowest first.
            let mut overlapping: Vec<(u64, u64)> = other
                .0
                .range(..=b)
                .rev()
                .take_while(|(_, &e)| e >= a)
                .map(|(&s, &e)| (s, e))
                .collect();
            overlapping.reverse();
            let mut from = Some(a);
            for (s, e) in overlapping {
                let Some(f) = from else { break };
                if s > f {
                    out.push((f, s - 1));
                }
                // e < b here, so e + 1 cannot overflow.
                from = (e < b).then(|| f.max(e + 1));
            }
            if let Some(f) = from {
                out.push((f, b));
            }
        }
        out
    }
}
