use super::*;
use crate::fleet::ModuleLimits;
use crate::keys::{PublicKey, SecretKey};
use crate::parts::Published;
use crate::trust::{sign_all, Role, Root};
use proptest::prelude::*;

mod cohorts;
mod gates;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("d{i:03}")).collect()
}

fn module(version: u64) -> DesiredModule {
    DesiredModule {
        name: "app".into(),
        version,
        artifacts: Vec::new(),
        config: Vec::new(),
        limits: ModuleLimits::default(),
        allow_downgrade: false,
        health_window_ms: 1000,
    }
}

fn policy(wave: Threshold, total: Threshold, revert: bool) -> Policy {
    Policy::new(wave, total, 60_000, revert)
}

fn rollout(n: usize, sizes: &[usize], policy: Policy) -> Rollout {
    let waves = plan_waves(&names(n), sizes, None);
    Rollout::new(
        "acme",
        "lab",
        "ops@laptop",
        0,
        module(2),
        policy,
        waves,
        BTreeMap::new(),
        Vec::new(),
    )
}

fn committed(d: &str) -> Input {
    Input::Committed { device: d.into() }
}

fn failed(d: &str) -> Input {
    Input::Failed {
        device: d.into(),
        why: "rolled back: exit 3".into(),
    }
}

fn sent(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(d) => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn waves_grow_by_the_sizes_then_take_the_rest() {
    let w = plan_waves(&names(120), &[1, 10, 100], None);
    assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 10, 100, 9]);
    let w = plan_waves(&names(6), &[1], Some(2));
    assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 2, 1]);
    assert_eq!(plan_waves(&names(3), &[5, 10], None).len(), 1);
    assert!(plan_waves(&[], &[1], None).is_empty());
}

#[test]
fn thresholds_parse_as_counts_or_shares() {
    assert_eq!(Threshold::parse("3"), Ok(Threshold::Count(3)));
    assert_eq!(Threshold::parse("10%"), Ok(Threshold::Percent(10)));
    assert!(Threshold::parse("101%").is_err());
    assert!(Threshold::parse("-1").is_err());
    assert_eq!(Threshold::Percent(10).allowed(25), 2);
    assert_eq!(Threshold::Count(0).allowed(25), 0);
}

#[test]
fn each_wave_goes_out_when_the_one_before_has_answered_and_the_last_hands_over_to_the_group() {
    let mut r = rollout(
        4,
        &[1, 2],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    assert_eq!(sent(&r.step(1, Input::Start)), ["d000"]);
    assert_eq!(sent(&r.step(2, committed("d000"))), ["d001", "d002"]);
    assert!(r.step(3, committed("d001")).is_empty());
    assert_eq!(sent(&r.step(4, committed("d002"))), ["d003"]);
    let end = r.step(5, committed("d003"));
    assert_eq!(end, [Action::Finish(names(4))]);
    assert_eq!(r.phase, Phase::Complete);
}

#[test]
fn a_wave_over_its_threshold_halts_and_gives_back_only_what_did_not_commit() {
    let mut r = rollout(
        11,
        &[1, 10],
        policy(Threshold::Percent(10), Threshold::Count(5), false),
    );
    r.step(1, Input::Start);
    r.step(2, committed("d000"));
    // One failure of ten is allowed; the wave goes on.
    assert!(r.step(3, failed("d001")).is_empty());
    r.step(4, committed("d002"));
    let halt = r.step(5, failed("d003"));
    assert!(
        matches!(r.phase, Phase::Halted { wave: 1, .. }),
        "{:?}",
        r.phase
    );
    // The failed two and the seven still pending; not d002 (committed), not d000.
    let back: Vec<String> = (1..11)
        .filter(|i| *i != 2)
        .map(|i| format!("d{i:03}"))
        .collect();
    assert_eq!(halt, [Action::Return(back)]);
    // Late answers change outcomes but never start anything.
    assert!(r.step(6, committed("d004")).is_empty());
    assert!(matches!(r.phase, Phase::Halted { .. }));
}

#[test]
fn a_reverting_policy_gives_back_the_whole_wave_and_keeps_earlier_waves() {
    let mut r = rollout(
        5,
        &[1, 2],
        policy(Threshold::Count(0), Threshold::Count(9), true),
    );
    r.step(1, Input::Start);
    r.step(2, committed("d000"));
    r.step(3, committed("d001"));
    let halt = r.step(4, failed("d002"));
    assert_eq!(
        halt,
        [Action::Return(vec!["d001".into(), "d002".into()])],
        "the canary's wave went through: it keeps the release"
    );
}

#[test]
fn the_overall_threshold_counts_failures_of_every_wave() {
    let mut r = rollout(
        6,
        &[2, 2],
        policy(Threshold::Count(1), Threshold::Count(1), false),
    );
    r.step(1, Input::Start);
    r.step(2, failed("d000"));
    assert_eq!(sent(&r.step(3, committed("d001"))), ["d002", "d003"]);
    r.step(4, failed("d002"));
    assert!(
        matches!(&r.phase, Phase::Halted { why, .. } if why.contains("2 of 6")),
        "{:?}",
        r.phase
    );
}

#[test]
fn silent_devices_fail_at_the_wave_timeout() {
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(0, Input::Start);
    assert!(r.step(59_999, Input::Tick).is_empty());
    let out = r.step(60_000, Input::Tick);
    assert_eq!(out, [Action::Return(vec!["d000".into()])]);
    assert!(matches!(&r.devices["d000"].outcome, Outcome::Failed { why } if why.contains("60s")));
}

#[test]
fn an_abort_in_flight_returns_the_pending_and_nothing_is_sent_after_it() {
    let mut r = rollout(
        4,
        &[1, 2],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(1, Input::Start);
    r.step(2, committed("d000"));
    r.step(3, committed("d001"));
    let out = r.step(4, Input::Abort { by: "bob".into() });
    assert_eq!(out, [Action::Return(vec!["d002".into()])]);
    for input in [
        committed("d002"),
        Input::Tick,
        Input::Resume,
        Input::Retry,
        Input::Start,
    ] {
        assert!(sent(&r.step(10_000_000, input)).is_empty());
    }
    assert_eq!(r.devices["d003"].outcome, Outcome::Waiting);
    assert!(!r.devices["d003"].returned, "never sent, never touched");
}

#[test]
fn a_commit_from_a_device_never_sent_the_release_is_noted_not_counted() {
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(1, Input::Start);
    assert!(r.step(2, committed("d002")).is_empty());
    assert!(r.step(2, committed("stranger")).is_empty());
    assert_eq!(r.devices["d002"].outcome, Outcome::Waiting);
    assert_eq!(r.unexpected.len(), 2);
    assert!(matches!(r.phase, Phase::Running { wave: 0, .. }));
}

#[test]
fn pause_holds_the_next_wave_and_resume_sends_it() {
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(1, Input::Start);
    r.step(2, Input::Pause { by: "ann".into() });
    assert!(r.step(3, committed("d000")).is_empty(), "paused: no wave");
    assert!(
        r.step(999_999, Input::Tick).is_empty(),
        "paused: no timeout"
    );
    assert_eq!(sent(&r.step(4, Input::Resume)), ["d001", "d002"]);
}

#[test]
fn retry_sends_again_to_the_failed_devices_and_those_cut_off() {
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(1, Input::Start);
    r.step(2, committed("d000"));
    r.step(3, failed("d001"));
    assert!(matches!(r.phase, Phase::Halted { wave: 1, .. }));
    // d002 was cut off before it answered: given back, and sent again by a retry.
    assert!(r.devices["d002"].returned);
    assert_eq!(sent(&r.step(4, Input::Retry)), ["d001", "d002"]);
    r.step(5, committed("d001"));
    let end = r.step(6, committed("d002"));
    assert_eq!(end, [Action::Finish(names(3))]);
}

proptest! {
    #[test]
    fn a_record_in_parts_opens_as_it_was_sealed(
        n in 1usize..120,
        sizes in prop::collection::vec(1usize..20, 0..4),
        skipped in prop::collection::btree_set("[a-z]{1,6}", 0..8),
        unexpected in prop::collection::btree_set("[a-z0-9]{1,6}", 0..8),
        steps in prop::collection::vec((0usize..120, any::<bool>()), 0..40),
    ) {
        let key = SecretKey::generate().unwrap();
        let mut waves = plan_waves(&names(n), &sizes, Some(7));
        // Not in name order: the record keeps each wave's order.
        waves.iter_mut().for_each(|w| w.reverse());
        // Left out in no name order either.
        let skipped: Vec<(String, String)> =
            skipped.into_iter().rev().map(|d| (format!("s-{d}"), "no artifact".into())).collect();
        let mut r = Rollout::new(
            "acme", "lab", "ops", 0, module(2),
            policy(Threshold::Count(2), Threshold::Count(5), true),
            waves, BTreeMap::new(), skipped,
        );
        r.unexpected = unexpected;
        r.step(1, Input::Start);
        for (i, (d, ok)) in steps.into_iter().enumerate() {
            let d = format!("d{:03}", d % n);
            r.step(2 + i as u64, if ok { committed(&d) } else { failed(&d) });
        }
        let sealed = r.seal(&[&key]).unwrap();
        prop_assert_eq!(open_sealed(&sealed, &Root::of_one_key(&key), "lab").unwrap(), r);
    }
}

#[test]
fn a_record_of_100000_devices_is_a_head_and_parts() {
    let key = SecretKey::generate().unwrap();
    let devices: Vec<String> = (0..100_000).map(|i| format!("device-{i:06}")).collect();
    let waves = plan_waves(&devices, &[1, 10, 100, 1000], Some(10_000));
    let mut r = Rollout::new(
        "acme",
        "lab",
        "ops",
        0,
        module(2),
        policy(Threshold::Count(2), Threshold::Count(5), true),
        waves,
        BTreeMap::new(),
        Vec::new(),
    );
    r.step(1, Input::Start);
    let sealed = r.seal(&[&key]).unwrap();
    assert!(sealed.head.len() < 16 * 1024, "{}", sealed.head.len());
    let largest = sealed.parts.iter().map(|(_, b)| b.len()).max().unwrap();
    assert!(largest < crate::parts::MAX_PART, "{largest}");
    assert_eq!(
        open_sealed(&sealed, &Root::of_one_key(&key), "lab").unwrap(),
        r
    );
}

/// A sealed record opened again, as a reader of the broker would.
pub(super) fn open_sealed(p: &Published, root: &Root, group: &str) -> Result<Rollout, String> {
    Rollout::open(&p.head, |s| p.part(s), root, group)
}

#[test]
fn a_record_is_signed_by_the_release_role_and_bound_to_its_group() {
    let release = SecretKey::generate().unwrap();
    let other = SecretKey::generate().unwrap();
    let root = Root {
        fleet: "acme".into(),
        version: 1,
        issued_ms: 0,
        root: Role::new(&[other.public()], 1),
        release: Role::new(&[release.public()], 1),
        registry: None,
        expires_ms: None,
    };
    let mut r = rollout(
        3,
        &[1],
        policy(Threshold::Count(0), Threshold::Count(0), false),
    );
    r.step(1, Input::Start);
    let bytes = r.seal(&[&release]).unwrap();
    assert_eq!(open_sealed(&bytes, &root, "lab").unwrap(), r);
    assert!(open_sealed(&bytes, &root, "other").is_err());
    let forged = r.seal(&[&other]).unwrap();
    assert!(open_sealed(&forged, &root, "lab")
        .unwrap_err()
        .contains("signatures"));
    let mut tampered = bytes.clone();
    let n = tampered.head.len();
    tampered.head[n / 2] ^= 1;
    assert!(open_sealed(&tampered, &root, "lab").is_err());
    let mut tampered = bytes.clone();
    let n = tampered.parts[0].1.len();
    tampered.parts[0].1[n / 2] ^= 1;
    let e = open_sealed(&tampered, &root, "lab").unwrap_err();
    assert!(e.contains("does not hash"), "{e}");
    let _ = PublicKey::from_bytes(&release.public().to_bytes()).unwrap();
    // The head alone: its phase and serial, signature and group checked, no members.
    let head = Rollout::verify_head(&bytes.head, &root, "lab").unwrap();
    assert_eq!((head.id.as_str(), head.serial), (r.id.as_str(), r.serial));
    assert_eq!(head.phase, r.phase);
    assert!(head.devices.is_empty() && head.waves.is_empty());
    assert!(Rollout::verify_head(&bytes.head, &root, "other").is_err());
    assert!(Rollout::verify_head(&forged.head, &root, "lab").is_err());
    let mut tampered = bytes.head.clone();
    let n = tampered.len();
    tampered[n / 2] ^= 1;
    assert!(Rollout::verify_head(&tampered, &root, "lab").is_err());
}

/// What a device in the model does when sent the release.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Commits,
    Fails,
    Silent,
}

#[derive(Debug, Clone)]
enum Step {
    /// The device with this index answers as its behaviour says (if it was sent it).
    Answer(usize),
    /// A device that was not sent the release claims to run it.
    Claim(usize),
    Clock(u64),
    Pause,
    Resume,
    Retry,
    Abort,
}

fn step_strategy(n: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..n).prop_map(Step::Answer),
        1 => (0..n).prop_map(Step::Claim),
        2 => (1u64..40_000).prop_map(Step::Clock),
        1 => Just(Step::Pause),
        1 => Just(Step::Resume),
        1 => Just(Step::Retry),
        1 => Just(Step::Abort),
    ]
}

fn threshold() -> impl Strategy<Value = Threshold> {
    prop_oneof![
        (0u32..4).prop_map(Threshold::Count),
        (0u8..60).prop_map(Threshold::Percent)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any mix of devices and operators: no device is sent the release after an abort
    /// or out of its wave's turn, a halt happens exactly when a threshold is passed,
    /// what is given back was sent, and a complete rollout is within the policy.
    #[test]
    fn the_policy_holds_whatever_devices_and_operators_do(
        behaviours in prop::collection::vec(
            prop_oneof![6 => Just(Behaviour::Commits), 2 => Just(Behaviour::Fails), 1 => Just(Behaviour::Silent)],
            1..30,
        ),
        sizes in prop::collection::vec(1usize..5, 0..4),
        wave in threshold(),
        total in threshold(),
        revert in any::<bool>(),
        steps in prop::collection::vec(step_strategy(30), 0..120),
    ) {
        let n = behaviours.len();
        let mut r = rollout(n, &sizes, Policy::new(wave, total, 60_000, revert));
        let mut now = 1u64;
        let mut ever_sent = BTreeSet::new();
        let mut aborted = false;
        let apply = |r: &mut Rollout, now: u64, input: Input, ever_sent: &mut BTreeSet<String>, aborted: &mut bool| {
            let retry = input == Input::Retry;
            let before = r.clone();
            let out = r.step(now, input);
            for action in &out {
                match action {
                    Action::Send(devices) => {
                        prop_assert!(!*aborted, "sent after an abort: {devices:?}");
                        prop_assert!(matches!(r.phase, Phase::Running { .. } | Phase::Halted { .. } | Phase::Complete), "sent while {:?}", r.phase);
                        for d in devices {
                            let was = &before.devices[d];
                            if retry {
                                let again = matches!(was.outcome, Outcome::Failed { .. })
                                    || (matches!(was.outcome, Outcome::Sent { .. }) && was.returned);
                                prop_assert!(again, "retry sent {} ({:?})", d, was.outcome);
                            } else {
                                prop_assert_eq!(&was.outcome, &Outcome::Waiting);
                                // Every earlier wave has answered.
                                for (name, other) in &r.devices {
                                    if other.wave < was.wave {
                                        prop_assert!(!matches!(other.outcome, Outcome::Sent { .. }), "{name} of wave {} pending while {d} of wave {} is sent", other.wave, was.wave);
                                    }
                                }
                            }
                            ever_sent.insert(d.clone());
                        }
                    }
                    Action::Return(devices) => {
                        for d in devices {
                            prop_assert!(ever_sent.contains(d), "{d} given back but never sent");
                        }
                    }
                    Action::Finish(devices) => {
                        prop_assert_eq!(&r.phase, &Phase::Complete);
                        prop_assert_eq!(devices.len(), n);
                    }
                }
            }
            // Halted exactly when a threshold is passed.
            if let (Phase::Running { wave: w, .. }, Phase::Halted { wave: hw, .. }) = (&before.phase, &r.phase) {
                prop_assert_eq!(w, hw);
                let failed = |only: Option<u32>| r.devices.values()
                    .filter(|d| only.is_none_or(|w| d.wave == w))
                    .filter(|d| matches!(d.outcome, Outcome::Failed { .. })).count();
                let over_wave = failed(Some(*w)) > r.policy.wave_failures.allowed(r.waves[*w as usize].len());
                let over_total = failed(None) > r.policy.total_failures.allowed(n);
                prop_assert!(over_wave || over_total);
            }
            if r.phase == Phase::Complete && before.phase != Phase::Complete {
                prop_assert!(r.pending().is_empty());
                prop_assert!(r.counts().3 <= r.policy.total_failures.allowed(n));
            }
            if matches!(r.phase, Phase::Aborted { .. }) {
                *aborted = true;
            }
            // A device never sent the release never leaves Waiting.
            for (name, d) in &r.devices {
                if !ever_sent.contains(name) {
                    prop_assert_eq!(&d.outcome, &Outcome::Waiting);
                }
            }
            Ok(())
        };
        apply(&mut r, now, Input::Start, &mut ever_sent, &mut aborted)?;
        for step in steps {
            now += 1;
            let input = match step {
                Step::Answer(i) if i < n => {
                    let device = format!("d{i:03}");
                    if !r.pending().contains(device.as_str()) {
                        continue;
                    }
                    match behaviours[i] {
                        Behaviour::Commits => committed(&device),
                        Behaviour::Fails => failed(&device),
                        Behaviour::Silent => continue,
                    }
                }
                Step::Answer(_) => continue,
                Step::Claim(i) => committed(&format!("d{:03}", i + n)),
                Step::Clock(ms) => { now += ms; Input::Tick }
                Step::Pause => Input::Pause { by: "ann".into() },
                Step::Resume => Input::Resume,
                Step::Retry => Input::Retry,
                Step::Abort => Input::Abort { by: "bob".into() },
            };
            apply(&mut r, now, input, &mut ever_sent, &mut aborted)?;
        }
        // Left to itself (devices answer, the clock runs), a rollout that is not
        // paused always ends.
        if matches!(r.phase, Phase::Running { .. }) {
            for _ in 0..=r.waves.len() {
                for (i, behaviour) in behaviours.iter().enumerate() {
                    let device = format!("d{i:03}");
                    if r.pending().contains(device.as_str()) {
                        match behaviour {
                            Behaviour::Commits => { apply(&mut r, now, committed(&device), &mut ever_sent, &mut aborted)?; }
                            Behaviour::Fails => { apply(&mut r, now, failed(&device), &mut ever_sent, &mut aborted)?; }
                            Behaviour::Silent => {}
                        }
                    }
                }
                now += 60_000;
                apply(&mut r, now, Input::Tick, &mut ever_sent, &mut aborted)?;
            }
            prop_assert!(!matches!(r.phase, Phase::Running { .. }), "{:?}", r.phase);
        }
    }
}
