//! Health gates, wave schedules and sampled waves in [`Rollout::step`].

use super::*;
use crate::rollout::gate::{judge, Cohort, Gate, HealthSummary, Sketch, Verdict};
use crate::rollout::v1::{DeviceV1, PolicyV1, RolloutV1};

const SOAK: u64 = 10_000;
const MINUTE: u64 = 60_000;

/// A policy with `gates`, a soak of 10 s, and no failure allowed.
fn gated_policy(gates: &[&str]) -> Policy {
    let mut p = Policy::new(Threshold::Count(0), Threshold::Count(0), 60_000, false);
    p.gates = gates.iter().map(|g| g.to_string()).collect();
    p.soak_ms = SOAK;
    p
}

fn summary(calls: u64, traps: u64) -> HealthSummary {
    HealthSummary {
        calls,
        traps,
        ..HealthSummary::new("app")
    }
}

/// A period's `seq` no report of these tests had: each counts (the same one again is
/// `a_period_read_again_counts_once`'s).
fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `device` reports `calls` calls of `app` with `traps` traps.
fn health(device: &str, calls: u64, traps: u64) -> Input {
    Input::Health {
        device: device.into(),
        seq: next_seq(),
        summaries: vec![summary(calls, traps)],
    }
}

fn returned(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Return(d) => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn said(r: &Rollout, text: &str) -> bool {
    r.history.iter().any(|(_, line)| line.contains(text))
}

/// Four devices (a canary, then three) that reported one trap in 1000 calls each
/// before the start; the canary sent at 1 and committed at 2.
fn canary_committed(gates: &[&str], revert: bool) -> Rollout {
    let mut p = gated_policy(gates);
    p.revert = revert;
    let mut r = rollout(4, &[1], p);
    for d in names(4) {
        r.step(0, health(&d, 1000, 1));
    }
    assert_eq!(sent(&r.step(1, Input::Start)), ["d000"]);
    assert!(r.step(2, committed("d000")).is_empty(), "the wave soaks");
    assert_eq!(
        r.hold,
        Some(Hold::Soak {
            wave: 0,
            since_ms: 2
        })
    );
    assert_eq!(r.deadline_ms(), Some(2 + SOAK));
    r
}

#[test]
fn policies_are_checked_and_each_error_names_what_is_wrong() {
    let base = || gated_policy(&["traps <= 2x control"]);
    assert_eq!(base().check(), Ok(()));
    assert_eq!(
        Policy::new(Threshold::Count(0), Threshold::Count(0), 1, false).check(),
        Ok(())
    );
    let mut p = base();
    p.gates.push("traps <= 2y control".into());
    assert!(p
        .check()
        .unwrap_err()
        .contains("gate `traps <= 2y control`"));
    let mut p = base();
    p.gates = vec!["traps <= 1".into(); MAX_GATES + 1];
    assert!(p.check().unwrap_err().contains("at most 16"));
    let mut p = base();
    p.soak_ms = 0;
    assert!(p.check().unwrap_err().contains("soak"));
    for bad in [0, 101] {
        let mut p = base();
        p.sample_percent = Some(bad);
        assert!(p.check().unwrap_err().contains("sample"));
    }
    for (window, why) in [((10, 10), "empty"), ((0, 1440), "0 to 1439")] {
        let mut p = base();
        p.window = Some(window);
        assert!(p.check().unwrap_err().contains(why), "{window:?}");
    }
}

#[test]
fn a_wave_soaks_then_passes_its_gates_and_the_next_goes_out() {
    let mut r = canary_committed(&["traps <= 2x control"], false);
    r.step(3, health("d000", 1000, 1));
    assert!(
        r.step(2 + SOAK - 1, Input::Tick).is_empty(),
        "still soaking"
    );
    assert_eq!(
        sent(&r.step(2 + SOAK, Input::Tick)),
        ["d001", "d002", "d003"]
    );
    assert!(said(&r, "wave 1 passed its gates"));
    assert_eq!(r.hold, None);
}

#[test]
fn a_breach_halts_naming_the_signal_the_values_and_the_devices_and_reverts() {
    let mut r = canary_committed(&["traps <= 2x control"], true);
    r.step(3, health("d000", 1000, 9));
    let out = r.step(2 + SOAK, Input::Tick);
    assert_eq!(returned(&out), ["d000"], "a reverting policy gives it back");
    assert!(sent(&out).is_empty());
    let Phase::Halted { wave: 0, why } = &r.phase else {
        panic!("{:?}", r.phase);
    };
    assert!(
        why.starts_with("gate traps <= 2x control: 0.009 in the wave"),
        "{why}"
    );
    assert!(
        why.contains("against 0.001 in the control") && why.contains("d000"),
        "{why}"
    );
    assert!(said(&r, "halted: gate traps"));
}

#[test]
fn without_revert_a_breach_keeps_what_committed() {
    let mut r = canary_committed(&["traps <= 2x control"], false);
    r.step(3, health("d000", 1000, 9));
    assert!(r.step(2 + SOAK, Input::Tick).is_empty());
    assert!(matches!(r.phase, Phase::Halted { wave: 0, .. }));
    assert!(!r.devices["d000"].returned);
}

#[test]
fn a_wave_short_of_its_sample_waits_one_more_soak_then_goes_on_unjudged() {
    let mut r = canary_committed(&["traps <= 2x control min 3"], false);
    r.step(3, health("d000", 1000, 900));
    assert!(
        r.step(2 + SOAK, Input::Tick).is_empty(),
        "one device of three"
    );
    assert_eq!(r.deadline_ms(), Some(2 + 2 * SOAK));
    assert!(r.step(2 + 2 * SOAK - 1, Input::Tick).is_empty());
    assert_eq!(sent(&r.step(2 + 2 * SOAK, Input::Tick)).len(), 3);
    assert!(said(
        &r,
        "wave 1 goes on unjudged: too few devices for traps <= 2x control min 3"
    ));
}

#[test]
fn a_device_silent_after_it_committed_is_offline_in_the_wave() {
    let mut r = canary_committed(&["offline <= 0"], false);
    r.step(2 + SOAK, Input::Tick);
    assert!(
        matches!(&r.phase, Phase::Halted { why, .. } if why.contains("offline") && why.contains("d000")),
        "{:?}",
        r.phase
    );
}

#[test]
fn the_last_wave_is_judged_against_its_baseline_for_want_of_a_control() {
    for (after, halts) in [(1, false), (5, true)] {
        let mut r = canary_committed(&["traps <= 2x control"], false);
        r.step(3, health("d000", 1000, 1));
        r.step(2 + SOAK, Input::Tick);
        let t = 3 + SOAK;
        for d in ["d001", "d002", "d003"] {
            r.step(t, committed(d));
            r.step(t, health(d, 1000, after));
        }
        let out = r.step(t + SOAK, Input::Tick);
        assert_eq!(
            matches!(r.phase, Phase::Halted { .. }),
            halts,
            "{:?}",
            r.phase
        );
        assert_eq!(out.is_empty(), halts, "{out:?}");
        assert!(said(
            &r,
            "no control left: `x control` gates compare with the baseline"
        ));
        let (_, control, baseline, no_control) = r.cohorts(1);
        assert!(no_control);
        assert_eq!(control, baseline);
    }
}

#[test]
fn health_is_kept_only_for_the_gates_and_the_baseline_is_what_came_before_the_send() {
    let latency = Sketch::of(&[4.0, 6.0]);
    let report = |d: &str| Input::Health {
        device: d.into(),
        seq: next_seq(),
        summaries: vec![
            HealthSummary {
                metrics: BTreeMap::from([("latency".into(), latency), ("other".into(), latency)]),
                ..summary(1000, 2)
            },
            HealthSummary::new("unwatched"),
        ],
    };
    let mut plain = rollout(
        2,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    plain.step(0, report("d000"));
    assert!(
        plain.devices["d000"].health.is_empty(),
        "no gates: nothing kept"
    );

    let mut r = rollout(2, &[1], gated_policy(&["app.latency <= 5"]));
    r.step(0, report("d000"));
    r.step(0, report("d000"));
    let kept = &r.devices["d000"].health;
    assert_eq!(kept.keys().collect::<Vec<_>>(), ["app"]);
    assert_eq!(kept["app"].traps, 4, "reports add up");
    assert_eq!(kept["app"].metrics.keys().collect::<Vec<_>>(), ["latency"]);
    r.step(1, Input::Start);
    assert!(r.devices["d000"].health.is_empty());
    assert_eq!(r.devices["d000"].baseline["app"].calls, 2000);
    r.step(2, report("d000"));
    assert!(
        r.devices["d000"].health.is_empty(),
        "sent: which version is unknown"
    );
    r.step(3, committed("d000"));
    r.step(
        4,
        Input::Health {
            device: "d000".into(),
            seq: next_seq(),
            summaries: Vec::new(),
        },
    );
    assert_eq!(
        r.devices["d000"].health["app"],
        HealthSummary::new("app"),
        "heard from"
    );
    let bad = HealthSummary {
        module: "no such".into(),
        ..summary(1, 1)
    };
    r.step(
        5,
        Input::Health {
            device: "d000".into(),
            seq: next_seq(),
            summaries: vec![bad],
        },
    );
    r.step(
        5,
        Input::Health {
            device: "stranger".into(),
            seq: next_seq(),
            summaries: vec![summary(1, 1)],
        },
    );
    assert_eq!(r.devices["d000"].health["app"].calls, 0);
}

#[test]
fn an_interval_holds_the_next_wave() {
    let mut p = policy(Threshold::Count(0), Threshold::Count(0), false);
    p.wave_interval_ms = Some(100_000);
    let mut r = rollout(3, &[1], p);
    r.step(1, Input::Start);
    assert!(r.step(2, committed("d000")).is_empty());
    assert_eq!(r.hold, Some(Hold::Schedule { wave: 1 }));
    assert!(said(&r, "wave 2 waits 100s for the schedule"));
    assert_eq!(r.deadline_ms(), Some(100_001));
    assert!(r.step(100_000, Input::Tick).is_empty());
    r.step(100_000, Input::Pause { by: "ann".into() });
    assert!(r.step(100_001, Input::Tick).is_empty(), "paused");
    assert_eq!(sent(&r.step(100_002, Input::Resume)), ["d001", "d002"]);
    assert_eq!(r.wave_starts, [1, 100_002]);
}

#[test]
fn a_window_holds_even_the_first_wave() {
    let mut p = policy(Threshold::Count(0), Threshold::Count(0), false);
    p.window = Some((60, 120));
    let mut r = rollout(2, &[1], p);
    assert!(
        r.step(0, Input::Start).is_empty(),
        "midnight is outside 01:00-02:00"
    );
    assert_eq!(r.hold, Some(Hold::Schedule { wave: 0 }));
    assert_eq!(r.deadline_ms(), Some(60 * MINUTE));
    assert!(r.step(60 * MINUTE - 1, Input::Tick).is_empty());
    assert!(
        r.step(60 * MINUTE - 1, Input::Start).is_empty(),
        "started once"
    );
    assert_eq!(sent(&r.step(60 * MINUTE, Input::Tick)), ["d000"]);
    // Past 02:00 the next wave waits for the next day's window.
    r.step(120 * MINUTE, committed("d000"));
    assert_eq!(r.deadline_ms(), Some(DAY + 60 * MINUTE));
}

const DAY: u64 = 1440 * MINUTE;

#[test]
fn windows_may_span_midnight() {
    let night = (23 * 60, 2 * 60);
    let at = |h: u64, m: u64| DAY + (h * 60 + m) * MINUTE;
    assert!(
        in_window(night, at(23, 30)) && in_window(night, at(0, 0)) && in_window(night, at(1, 59))
    );
    assert!(!in_window(night, at(2, 0)) && !in_window(night, at(12, 0)));
    assert_eq!(next_open(night, at(12, 0)), at(23, 0));
    assert_eq!(next_open(night, at(1, 0)), at(1, 0));
    let day = (9 * 60, 17 * 60);
    assert!(in_window(day, at(9, 0)) && !in_window(day, at(17, 0)));
    assert_eq!(next_open(day, at(18, 0)), at(24 + 9, 0));
    assert_eq!(next_open(day, at(8, 0)), at(9, 0));
}

fn sampled(seed: u64, percent: u8) -> Rollout {
    let mut p = policy(Threshold::Count(0), Threshold::Count(0), false);
    p.sample_percent = Some(percent);
    let mut r = rollout(10, &[1, 2], p);
    r.seed = seed;
    r
}

/// Drives a sampled rollout to its end; returns each wave's devices.
fn draws(mut r: Rollout) -> Vec<Vec<String>> {
    let mut waves = vec![sent(&r.step(1, Input::Start))];
    while r.phase != Phase::Complete {
        let last = waves.last().unwrap().clone();
        let mut next = Vec::new();
        for d in &last {
            next.extend(sent(&r.step(2, committed(d))));
        }
        waves.push(next);
    }
    waves.pop();
    waves
}

#[test]
fn a_sampled_wave_is_a_share_drawn_from_the_seed_and_no_device_twice() {
    assert_eq!(
        sampled(7, 30).waves,
        [names(10)],
        "one pool; the plan is not used"
    );
    let waves = draws(sampled(7, 30));
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
    let mut all: Vec<String> = waves.concat();
    all.sort();
    assert_eq!(all, names(10), "every device once");
    assert_eq!(draws(sampled(7, 30)), waves, "the same seed draws alike");
    assert_ne!(draws(sampled(8, 30))[0], waves[0]);
    assert_ne!(waves[0], names(3), "not the first in order");
    let mut r = sampled(7, 30);
    r.step(1, Input::Start);
    assert_eq!(r.waves.iter().map(Vec::len).collect::<Vec<_>>(), [3, 7]);
    for (i, w) in r.waves.iter().enumerate() {
        assert!(w.iter().all(|d| r.devices[d].wave == i as u32));
    }
    assert_eq!(draws(sampled(1, 100)), [names(10)]);
}

#[test]
fn a_v1_record_opens_with_no_gates_and_goes_on() {
    let key = SecretKey::generate().unwrap();
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(1), Threshold::Count(2), true),
    );
    r.step(1, Input::Start);
    let old = RolloutV1 {
        fleet: r.fleet.clone(),
        group: r.group.clone(),
        id: r.id.clone(),
        serial: 4,
        started_by: r.started_by.clone(),
        driver: r.driver.clone(),
        started_ms: r.started_ms,
        updated_ms: 1,
        module: r.module.clone(),
        policy: PolicyV1 {
            wave_failures: Threshold::Count(1),
            total_failures: Threshold::Count(2),
            wave_timeout_ms: 60_000,
            revert: true,
        },
        waves: r.waves.clone(),
        devices: r
            .devices
            .iter()
            .map(|(n, d)| {
                let v1 = DeviceV1 {
                    wave: d.wave,
                    outcome: d.outcome.clone(),
                    before: None,
                    returned: false,
                };
                (n.clone(), v1)
            })
            .collect(),
        skipped: Vec::new(),
        unexpected: BTreeSet::new(),
        phase: r.phase.clone(),
        history: r.history.clone(),
    };
    let body = postcard::to_stdvec(&old).unwrap();
    let signatures = sign_all(CONTEXT_V1, &body, &[&key]);
    let bytes = postcard::to_stdvec(&SignedRollout::V1 { body, signatures }).unwrap();
    let mut opened = Rollout::open(&bytes, |_| None, &Root::of_one_key(&key), "lab").unwrap();
    assert_eq!(opened.policy, r.policy);
    assert_eq!((opened.serial, &opened.wave_starts), (4, &vec![0]));
    assert!(opened.step(2, Input::Start).is_empty(), "not started again");
    assert_eq!(sent(&opened.step(3, committed("d000"))), ["d001", "d002"]);
    let again = opened.seal(&[&key]).unwrap();
    assert_eq!(
        open_sealed(&again, &Root::of_one_key(&key), "lab").unwrap(),
        opened
    );
}

#[test]
fn a_record_whose_policy_does_not_hold_does_not_open() {
    let key = SecretKey::generate().unwrap();
    let mut r = rollout(2, &[1], gated_policy(&["traps <= 2x control"]));
    r.policy.gates.push("latency < 3".into());
    let e = open_sealed(&r.seal(&[&key]).unwrap(), &Root::of_one_key(&key), "lab").unwrap_err();
    assert!(e.contains("gate `latency < 3`"), "{e}");
    r.policy.gates.pop();
    r.devices.get_mut("d000").unwrap().health.insert(
        "app".into(),
        HealthSummary {
            module: "bad name".into(),
            ..summary(1, 0)
        },
    );
    let e = open_sealed(&r.seal(&[&key]).unwrap(), &Root::of_one_key(&key), "lab").unwrap_err();
    assert!(e.contains("health of d000"), "{e}");
}

/// What a device of the model does.
#[derive(Debug, Clone, Copy)]
struct Behaves {
    /// Traps in 1000 calls before the update, and after.
    old_traps: u64,
    new_traps: u64,
    /// Sends health reports at all.
    reports: bool,
}

#[derive(Debug, Clone)]
enum Move {
    /// The device commits if it was sent the release.
    Commit(usize),
    /// The device reports its health (if it reports).
    Report(usize),
    Clock(u64),
    Pause,
    Resume,
}

fn move_strategy(n: usize) -> impl Strategy<Value = Move> {
    prop_oneof![
        4 => (0..n).prop_map(Move::Commit),
        6 => (0..n).prop_map(Move::Report),
        3 => (1u64..3 * 3_600_000).prop_map(Move::Clock),
        1 => Just(Move::Pause),
        1 => Just(Move::Resume),
    ]
}

fn gate_strategy() -> impl Strategy<Value = String> {
    let min = 1u32..4;
    prop_oneof![
        (1u32..4, min.clone()).prop_map(|(x, m)| format!("traps <= {x}x control min {m}")),
        (1u32..4, min.clone()).prop_map(|(x, m)| format!("traps <= {x}x baseline min {m}")),
        (0u32..20, min.clone()).prop_map(|(c, m)| format!("traps <= {c} min {m}")),
        (0u32..60, min).prop_map(|(p, m)| format!("offline <= {p}% min {m}")),
    ]
}

/// The model's own account of the devices' health: what each reported before it
/// was sent the release, what it had at the send (the baseline), and after it
/// committed.
#[derive(Default)]
struct Ledger {
    before: BTreeMap<String, HealthSummary>,
    baseline: BTreeMap<String, HealthSummary>,
    after: BTreeMap<String, HealthSummary>,
    sent: BTreeSet<String>,
}

impl Ledger {
    fn report(&mut self, r: &Rollout, device: &str, traps: u64) {
        let s = summary(1000, traps);
        let into = match r.devices[device].outcome {
            _ if !self.sent.contains(device) => &mut self.before,
            Outcome::Committed { .. } => &mut self.after,
            _ => return,
        };
        into.entry(device.into())
            .or_insert_with(|| HealthSummary::new("app"))
            .merge(&s);
    }

    fn send(&mut self, device: &str) {
        self.sent.insert(device.into());
        if let Some(s) = self.before.remove(device) {
            self.baseline.insert(device.into(), s);
        }
    }

    /// The verdict on `wave` from the model's own account.
    fn verdict(&self, r: &Rollout, gates: &[Gate], wave: u32) -> Verdict {
        let (mut w, mut control, mut baseline) =
            (Cohort::new("app"), Cohort::new("app"), Cohort::new("app"));
        let put = |c: &mut Cohort, d: &str, s: Option<&HealthSummary>| match s {
            Some(s) => c.report(d, s).unwrap(),
            None => c.offline(d).unwrap(),
        };
        for (name, d) in &r.devices {
            if !self.sent.contains(name) {
                put(&mut control, name, self.before.get(name));
            } else if d.wave == wave && matches!(d.outcome, Outcome::Committed { .. }) {
                put(&mut w, name, self.after.get(name));
                if let Some(s) = self.baseline.get(name) {
                    baseline.report(name, s).unwrap();
                }
            }
        }
        if control.reporting() + control.offline_devices().len() == 0 {
            control = baseline.clone();
        }
        judge(gates, &w, &control, &baseline)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Devices that report their health, commit and go quiet, operators who pause,
    /// the clock: a gate halts only on a breach over its minimum sample, always halts
    /// on one at the soak's end, no wave goes on before its soak ends; no wave starts
    /// outside the window or sooner than the interval; a sampled wave never takes a
    /// device twice; and left to itself the rollout ends.
    #[test]
    fn gates_halt_on_breaches_only_and_the_schedule_holds(
        behaviours in prop::collection::vec(
            (0u64..4, 0u64..12, prop::bool::weighted(0.85))
                .prop_map(|(old_traps, new_traps, reports)| Behaves { old_traps, new_traps, reports }),
            1..14,
        ),
        sizes in prop::collection::vec(1usize..4, 0..3),
        gates in prop::collection::vec(gate_strategy(), 0..3),
        sample in prop::option::of(1u8..=100),
        interval in prop::option::of(0u64..4 * 3_600_000),
        window in prop::option::of((0u16..1440, 1u16..1440).prop_map(|(s, len)| (s, (s + len) % 1440))),
        start in 0u64..2 * DAY,
        moves in prop::collection::vec(move_strategy(14), 0..150),
    ) {
        let n = behaviours.len();
        let mut p = gated_policy(&[]);
        // Only gates halt: silent devices fail, but never too many.
        p.wave_failures = Threshold::Percent(100);
        p.total_failures = Threshold::Percent(100);
        p.gates = gates.clone();
        p.soak_ms = 30 * MINUTE;
        p.sample_percent = sample;
        p.wave_interval_ms = interval;
        p.window = window.filter(|(s, e)| s != e);
        prop_assert_eq!(p.check(), Ok(()));
        let parsed = p.parsed_gates().unwrap();
        let mut r = rollout(n, &sizes, p);
        let mut ledger = Ledger::default();
        let mut last_start: Option<u64> = None;
        let mut soaked: BTreeSet<u32> = BTreeSet::new();
        let mut now = start;
        let mut apply = |r: &mut Rollout, ledger: &mut Ledger, now: u64, input: Input| -> Result<(), TestCaseError> {
            let before = r.clone();
            let tick = input == Input::Tick;
            // The soak under way, and the model's verdict on its wave as it stands.
            let soak = match before.hold {
                Some(Hold::Soak { wave, since_ms }) => Some((wave, since_ms, ledger.verdict(&before, &parsed, wave))),
                _ => None,
            };
            let out = r.step(now, input);
            if let Some((wave, since, verdict)) = &soak {
                let over = now >= since + r.policy.soak_ms;
                let breach = matches!(verdict, Verdict::Breach(_));
                let judged = matches!(r.phase, Phase::Running { .. } | Phase::Halted { .. } | Phase::Complete);
                if r.hold != before.hold && judged {
                    // The wave was judged: at the soak's end, and it went on only without a breach.
                    prop_assert!(over, "wave {wave} judged inside its soak");
                    prop_assert_eq!(breach, matches!(r.phase, Phase::Halted { .. }));
                    soaked.insert(*wave);
                }
                if tick && over && breach && matches!(before.phase, Phase::Running { .. }) {
                    prop_assert!(matches!(r.phase, Phase::Halted { .. }), "{:?}", r.phase);
                }
            }
            for a in &out {
                let Action::Send(devices) = a else { continue };
                if let Some(w) = r.policy.window {
                    prop_assert!(in_window(w, now), "a wave started at {now} outside {w:?}");
                }
                if let (Some(last), Some(i)) = (last_start, r.policy.wave_interval_ms) {
                    prop_assert!(now >= last + i, "a wave started {}ms after the last", now - last);
                }
                if let (Some(pct), false) = (r.policy.sample_percent, devices.len() == before.counts().0) {
                    prop_assert_eq!(devices.len(), schedule::sample_size(pct, n));
                }
                last_start = Some(now);
                for d in devices {
                    prop_assert!(!ledger.sent.contains(d), "{d} sent twice");
                    ledger.send(d);
                }
                // The wave before it soaked.
                if let Phase::Running { wave, .. } = r.phase {
                    if wave > 0 && !parsed.is_empty() {
                        prop_assert!(soaked.contains(&(wave - 1)), "wave {wave} went out unjudged");
                    }
                }
            }
            if let (Phase::Running { .. } | Phase::Paused { .. }, Phase::Halted { why, .. }) = (&before.phase, &r.phase) {
                prop_assert!(why.starts_with("gate "), "{why}");
                prop_assert!(matches!(soak, Some((_, _, Verdict::Breach(_)))), "{why}");
            }
            Ok(())
        };
        apply(&mut r, &mut ledger, now, Input::Start)?;
        for m in moves {
            now += 1;
            let input = match m {
                Move::Commit(i) if i < n => {
                    let device = format!("d{i:03}");
                    if !r.pending().contains(device.as_str()) {
                        continue;
                    }
                    committed(&device)
                }
                Move::Report(i) if i < n && behaviours[i].reports => {
                    let device = format!("d{i:03}");
                    let b = behaviours[i];
                    let updated = matches!(r.devices[&device].outcome, Outcome::Committed { .. });
                    let traps = if updated { b.new_traps } else { b.old_traps };
                    ledger.report(&r, &device, traps);
                    health(&device, 1000, traps)
                }
                Move::Commit(_) | Move::Report(_) => continue,
                Move::Clock(ms) => { now += ms; Input::Tick }
                Move::Pause => Input::Pause { by: "ann".into() },
                Move::Resume => Input::Resume,
            };
            apply(&mut r, &mut ledger, now, input)?;
        }
        // Left to itself (devices commit and report, the clock runs to each deadline),
        // a rollout that is not paused ends.
        apply(&mut r, &mut ledger, now, Input::Resume)?;
        for _ in 0..4 * (n + 2) {
            if !matches!(r.phase, Phase::Running { .. }) {
                break;
            }
            for (i, b) in behaviours.iter().enumerate() {
                let device = format!("d{i:03}");
                if r.pending().contains(device.as_str()) {
                    apply(&mut r, &mut ledger, now, committed(&device))?;
                }
                if b.reports {
                    let updated = matches!(r.devices[&device].outcome, Outcome::Committed { .. });
                    let traps = if updated { b.new_traps } else { b.old_traps };
                    ledger.report(&r, &device, traps);
                    apply(&mut r, &mut ledger, now, health(&device, 1000, traps))?;
                }
            }
            now = r.deadline_ms().unwrap_or(now).max(now + 1);
            apply(&mut r, &mut ledger, now, Input::Tick)?;
        }
        prop_assert!(!matches!(r.phase, Phase::Running { .. }), "{:?}", r.phase);
        let every = ledger.sent.len() == n;
        prop_assert!(r.phase != Phase::Complete || every);
    }
}

#[test]
fn a_gated_record_of_a_thousand_devices_with_their_health_fits() {
    let key = SecretKey::generate().unwrap();
    let mut r = rollout(
        1000,
        &[1, 10, 100],
        gated_policy(&["traps <= 2x control", "app.latency <= 1.2x baseline"]),
    );
    let full = |d: &str| Input::Health {
        device: d.into(),
        seq: next_seq(),
        summaries: vec![HealthSummary {
            fuel_used: u64::MAX / 3,
            peak_memory_bytes: 1 << 40,
            metrics: BTreeMap::from([("latency".into(), Sketch::of(&[1.5e9, -2.5e9]))]),
            ..summary(u64::MAX / 2, u64::MAX / 4)
        }],
    };
    let plain = r.seal(&[&key]).unwrap().bytes();
    for d in names(1000) {
        r.step(0, full(&d));
        r.devices.get_mut(&d).unwrap().baseline = r.devices[&d].health.clone();
    }
    let sealed = r.seal(&[&key]).unwrap();
    let per_device = (sealed.bytes() - plain) / 1000;
    assert!(per_device < 240, "{per_device} bytes of health a device");
    // A part holds some 4 of these devices (9 in the fullest); at 100,000 devices,
    // some 400 (a few hundred KiB at the fullest): within a part's limit.
    let largest = sealed.parts.iter().map(|(_, b)| b.len()).max().unwrap();
    assert!(largest * 100 < MAX_ROLLOUT / 4, "{largest} bytes");
}

#[test]
fn a_period_read_again_counts_once() {
    let mut r = rollout(2, &[1], gated_policy(&["traps <= 2x control"]));
    let period = |seq| Input::Health {
        device: "d001".into(),
        seq,
        summaries: vec![summary(1000, 3)],
    };
    r.step(0, period(7));
    // The same retained message, read by a driver that took the rollout up from the
    // record: the record knows it counted period 7.
    let key = SecretKey::generate().unwrap();
    let sealed = r.seal(&[&key]).unwrap();
    let mut taken_up = open_sealed(&sealed, &Root::of_one_key(&key), "lab").unwrap();
    taken_up.step(1, period(7));
    assert_eq!(taken_up.devices["d001"].health["app"].traps, 3);
    taken_up.step(2, period(8));
    // kilnd restarted: its periods count from 1 again, and they count.
    taken_up.step(3, period(1));
    assert_eq!(taken_up.devices["d001"].health["app"].traps, 9);
    assert_eq!(taken_up.devices["d001"].health_seq, Some(1));
}
