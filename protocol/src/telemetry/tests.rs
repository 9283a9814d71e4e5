#[test]
fn a_stopped_record_is_clean_exactly_when_its_stop_was() {
    use crate::worker::Stop;
    let call = || "kiln_tick".to_string();
    for stop in [
        Stop::Exited(0),
        Stop::Exited(3),
        Stop::LoadFailed {
            code: 79,
            message: "x".into(),
        },
        Stop::InitFailed(1),
        Stop::Trap {
            call: call(),
            message: "unreachable".into(),
        },
        Stop::FuelExhausted {
            call: call(),
            budget: 1,
        },
        Stop::Watchdog {
            call: call(),
            limit_ms: 1,
        },
        Stop::Signal {
            signal: 9,
            name: "SIGKILL".into(),
        },
        Stop::Lost("gone".into()),
        Stop::Requested { swap: true },
        Stop::Requested { swap: false },
        Stop::SelfTestFailed(1),
    ] {
        let wire = Stopped {
            reason: stop.kind().into(),
            why: stop.to_string(),
            exit_code: match stop {
                Stop::Exited(c) => Some(c),
                _ => None,
            },
            uptime_ms: 0,
            peak_rss_kib: None,
            crashes_in_window: 0,
            restart_in_ms: None,
        };
        assert_eq!(wire.is_clean(), stop.is_clean(), "{stop:?}");
    }
}

use super::tracker::Ranges;
use super::*;

fn record(n: u32) -> Record {
    Record {
        at_ms: 1_700_000_000_000 + n as u64,
        module: Some("sensor".into()),
        body: Body::Telemetry {
            stream: "t".into(),
            data: n.to_le_bytes().to_vec(),
        },
    }
}

#[test]
fn a_batch_survives_the_wire_and_junk_is_refused() {
    let batch = BatchV1 {
        device: "pi-01".into(),
        boot_id: 0xfeed,
        seq: 7,
        records: (0..3).map(record).collect(),
    };
    let bytes = Batch::encode(&batch);
    assert_eq!(Batch::decode(&bytes).unwrap(), batch);
    assert!(Batch::decode(&bytes[..bytes.len() - 1]).is_err());
    assert!(Batch::decode(&[9, 9, 9])
        .unwrap_err()
        .to_string()
        .contains("not a telemetry batch"));
    assert!(Batch::decode(&vec![0; MAX_BATCH + 1])
        .unwrap_err()
        .to_string()
        .contains("limit"));
}

#[test]
fn the_tracker_names_gaps_duplicates_late_arrivals_and_explained_drops() {
    let mut t = Tracker::default();
    assert_eq!(
        t.batch("d", 1, 0, 2),
        Verdict::New {
            gap: None,
            late: false
        }
    );
    assert_eq!(t.batch("d", 1, 0, 2), Verdict::Duplicate);
    assert_eq!(
        t.batch("d", 1, 4, 2),
        Verdict::New {
            gap: Some((1, 3)),
            late: false
        }
    );
    assert_eq!(
        t.batch("d", 1, 2, 2),
        Verdict::New {
            gap: None,
            late: true
        }
    );
    // Another boot is its own stream.
    assert!(matches!(
        t.batch("d", 2, 0, 1),
        Verdict::New { gap: None, .. }
    ));
    t.dropped(
        "d",
        &Dropped {
            boot_id: 1,
            first_seq: 1,
            last_seq: 1,
            batches: 1,
            records: 2,
        },
    );
    let a = &t.accounts()[0];
    assert_eq!((a.batches, a.records, a.duplicates), (3, 6, 1));
    assert_eq!(a.dropped, 1);
    assert_eq!(a.unexplained, vec![(3, 3)], "1 was dropped, 2 came late");
    assert_eq!(a.unexplained_batches, 1);
}

/// New record kinds are appended: every earlier kind keeps its tag, so batches
/// spooled or retained by an older kilnd still decode.
#[test]
fn discarded_is_appended_after_every_earlier_kind() {
    let tag = |body: Body| postcard::to_stdvec(&body).unwrap()[0];
    assert_eq!(tag(Body::TickFailed { status: 0 }), 3);
    let dropped = Dropped {
        boot_id: 1,
        first_seq: 0,
        last_seq: 0,
        batches: 1,
        records: 1,
    };
    assert_eq!(tag(Body::Dropped(dropped)), 8);
    let discarded = Body::Discarded(Discarded {
        cause: Cause::RateLimit,
        records: 3,
        bytes: 300,
    });
    assert_eq!(tag(discarded.clone()), 9);
    let record = Record {
        at_ms: 5,
        module: Some("flood".into()),
        body: discarded,
    };
    let bytes = postcard::to_stdvec(&record).unwrap();
    assert_eq!(postcard::from_bytes::<Record>(&bytes).unwrap(), record);
    assert_eq!(record.encoded_len(), bytes.len());
}

#[test]
fn drop_ranges_of_one_boot_merge() {
    let d = |boot_id, first_seq, last_seq| Dropped {
        boot_id,
        first_seq,
        last_seq,
        batches: last_seq - first_seq + 1,
        records: 10,
    };
    let merged = coalesce(vec![d(1, 3, 4), d(2, 0, 0), d(1, 0, 2), d(1, 9, 9)]);
    assert_eq!(
        merged,
        vec![
            Dropped {
                records: 20,
                ..d(1, 0, 4)
            },
            d(1, 9, 9),
            d(2, 0, 0)
        ]
    );
}

#[test]
fn a_forged_seq_near_two_to_the_63_costs_one_range_not_two_to_the_63_entries() {
    let mut t = Tracker::default();
    t.batch("d", 1, 0, 1);
    assert_eq!(
        t.batch("d", 1, 1 << 63, 1),
        Verdict::New {
            gap: Some((1, (1 << 63) - 1)),
            late: false
        }
    );
    assert_eq!(
        t.batch("d", 1, u64::MAX, 1),
        Verdict::New {
            gap: Some(((1 << 63) + 1, u64::MAX - 1)),
            late: false
        }
    );
    assert_eq!(t.batch("d", 1, u64::MAX, 1), Verdict::Duplicate);
    t.dropped(
        "d",
        &Dropped {
            boot_id: 1,
            first_seq: 0,
            last_seq: u64::MAX,
            batches: 0,
            records: 0,
        },
    );
    let a = &t.accounts()[0];
    assert_eq!(a.dropped, u64::MAX, "2^64 seqs saturate");
    assert_eq!(a.unexplained, vec![]);
    let s = &t.streams[&("d".to_string(), 1)];
    assert!(s.missing.len() <= 2 && s.received.len() == 3 && s.dropped.len() == 1);
}

#[test]
fn a_drop_report_above_the_newest_seq_leaves_the_seqs_between_missing() {
    let mut t = Tracker::default();
    t.batch("d", 1, 5, 1);
    t.dropped(
        "d",
        &Dropped {
            boot_id: 1,
            first_seq: 8,
            last_seq: 9,
            batches: 2,
            records: 2,
        },
    );
    // 6 and 7 were never counted received: they are new, late, and shown.
    assert_eq!(
        t.batch("d", 1, 6, 1),
        Verdict::New {
            gap: None,
            late: true
        }
    );
    assert_eq!(t.accounts()[0].unexplained, vec![(7, 7)]);
    // A report whose range is backwards is ignored, not trusted.
    t.dropped(
        "d",
        &Dropped {
            boot_id: 1,
            first_seq: 9,
            last_seq: 3,
            batches: 0,
            records: 0,
        },
    );
    assert_eq!(t.accounts()[0].dropped, 2);
}

#[test]
fn a_broker_forging_a_boot_per_batch_makes_the_tracker_forget_not_grow() {
    let mut t = Tracker::default();
    t.batch("d", 0, 0, 1);
    t.batch("d", 0, 2, 1); // seq 1 unexplained
    for boot in 1..=(MAX_STREAMS as u64 + 10) {
        t.batch("d", boot, 0, 1);
    }
    assert_eq!(t.streams.len(), MAX_STREAMS);
    assert_eq!(
        t.forgotten(),
        Forgotten {
            streams: 11,
            unexplained: 1
        }
    );
    // The streams still in use were kept, the oldest went first.
    assert!(t
        .streams
        .contains_key(&("d".to_string(), MAX_STREAMS as u64 + 10)));
    assert!(!t.streams.contains_key(&("d".to_string(), 0)));
}

#[test]
fn past_max_ranges_the_lowest_seqs_are_forgotten_and_counted() {
    let mut t = Tracker::default();
    // Every other seq: one received range and one missing range each.
    for n in 0..(MAX_RANGES as u64 * 3) {
        t.batch("d", 1, n * 2, 1);
    }
    let s = &t.streams[&("d".to_string(), 1)];
    assert!(s.received.len() <= MAX_RANGES && s.missing.len() <= MAX_RANGES);
    assert!(s.floor > 0);
    let a = &t.accounts()[0];
    assert!(a.untracked > 0);
    assert_eq!(
        a.unexplained_batches,
        MAX_RANGES as u64 * 3 - 1,
        "forgotten holes still count"
    );
    assert_eq!(t.batch("d", 1, 1, 1), Verdict::Untracked);
}

#[test]
fn ranges_merge_split_and_subtract() {
    let mut r = Ranges::default();
    r.insert(5, 9);
    r.insert(11, 12);
    r.insert(10, 10);
    assert_eq!(r, Ranges::one(5, 12));
    r.insert(0, u64::MAX);
    assert_eq!(r, Ranges::one(0, u64::MAX));
    assert!(r.remove(7));
    assert!(!r.remove(7));
    assert_eq!(r.len(), 2);
    assert_eq!(r.count(), u64::MAX);
    let mut other = Ranges::one(2, 3);
    other.insert(u64::MAX, u64::MAX);
    assert_eq!(r.minus(&other), vec![(0, 1), (4, 6), (8, u64::MAX - 1)]);
    r.remove_below(5);
    assert_eq!(r.lowest_end(), Some(6));
    assert_eq!(r.below(8), Ranges::one(5, 6));
}

mod properties {
    use std::collections::BTreeMap;
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::super::*;

    /// Seqs a forger would pick as well as the ones a device sends.
    fn seq() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..64,
            0u64..100_000,
            (0u64..64).prop_map(|d| (1 << 63) + d),
            (0u64..64).prop_map(|d| u64::MAX - d),
            any::<u64>(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Batch { boot: u64, seq: u64 },
        Dropped { boot: u64, first: u64, last: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let boot = prop_oneof![0u64..4, any::<u64>()];
        prop_oneof![
            4 => (boot.clone(), seq()).prop_map(|(boot, seq)| Op::Batch { boot, seq }),
            1 => (boot, seq(), seq()).prop_map(|(boot, first, last)| Op::Dropped { boot, first, last }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn memory_stays_bounded_whatever_the_seqs(ops in prop::collection::vec(op(), 1..1000)) {
            let mut t = Tracker::default();
            for op in ops {
                match op {
                    Op::Batch { boot, seq } => {
                        t.batch("d", boot, seq, 1);
                    }
                    Op::Dropped { boot, first, last } => t.dropped(
                        "d",
                        &Dropped { boot_id: boot, first_seq: first, last_seq: last, batches: 1, records: 1 },
                    ),
                }
                prop_assert!(t.streams.len() <= MAX_STREAMS);
                for s in t.streams.values() {
                    prop_assert!(s.received.len() <= MAX_RANGES);
                    prop_assert!(s.missing.len() <= MAX_RANGES);
                    prop_assert!(s.dropped.len() <= MAX_RANGES);
                }
            }
            for a in t.accounts() {
                prop_assert!(a.unexplained.len() <= 2 * MAX_RANGES);
                prop_assert!(a.first_seq <= a.last_seq);
            }
        }

        #[test]
        fn verdicts_agree_with_a_set_of_seen_seqs(
            ops in prop::collection::vec((0u64..3, 0u64..200), 1..300)
        ) {
            let mut t = Tracker::default();
            let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            let mut duplicates: BTreeMap<u64, u64> = BTreeMap::new();
            for (boot, seq) in ops {
                let seen = model.entry(boot).or_default();
                let expected = match seen.last() {
                    _ if seen.contains(&seq) => {
                        *duplicates.entry(boot).or_default() += 1;
                        Verdict::Duplicate
                    }
                    None => Verdict::New { gap: None, late: false },
                    Some(&max) if seq > max => Verdict::New {
                        gap: (seq > max + 1).then(|| (max + 1, seq - 1)),
                        late: false,
                    },
                    Some(_) => Verdict::New { gap: None, late: true },
                };
                seen.insert(seq);
                prop_assert_eq!(t.batch("d", boot, seq, 2), expected, "boot {} seq {}", boot, seq);
            }
            let accounts = t.accounts();
            prop_assert_eq!(accounts.len(), model.len());
            for a in accounts {
                let seen = &model[&a.boot_id];
                let (first, last) = (*seen.first().unwrap(), *seen.last().unwrap());
                let holes: Vec<u64> = (first..=last).filter(|n| !seen.contains(n)).collect();
                let listed: Vec<u64> = a.unexplained.iter().flat_map(|&(x, y)| x..=y).collect();
                prop_assert_eq!(listed, holes.clone());
                prop_assert_eq!(a.unexplained_batches, holes.len() as u64);
                prop_assert_eq!((a.first_seq, a.last_seq), (first, last));
                prop_assert_eq!(a.batches, seen.len() as u64);
                prop_assert_eq!(a.records, 2 * seen.len() as u64);
                prop_assert_eq!(a.duplicates, duplicates.get(&a.boot_id).copied().unwrap_or(0));
                prop_assert_eq!(a.untracked, 0);
            }
        }
    }
}
