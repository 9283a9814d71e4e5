//! The cohort in the signed record: sealed and opened with it, a v2 record (before
//! cohorts) still opens, and a record whose cohort does not parse does not.

use super::*;
use crate::rollout::v2::RolloutV2;

fn with_cohort(cohort: &[&str]) -> Policy {
    let mut p = policy(Threshold::Count(0), Threshold::Count(0), false);
    p.cohort = cohort.iter().map(|c| c.to_string()).collect();
    p
}

#[test]
fn the_cohort_is_sealed_in_the_record_and_opens_with_it() {
    let key = SecretKey::generate().unwrap();
    let r = rollout(3, &[1], with_cohort(&["tag=canary", "kilnd>=0.9.0"]));
    let opened = open_sealed(&r.seal(&[&key]).unwrap(), &Root::of_one_key(&key), "lab").unwrap();
    assert_eq!(opened.policy.cohort, ["tag=canary", "kilnd>=0.9.0"]);
    assert_eq!(opened, r);
}

#[test]
fn a_v2_record_opens_as_one_with_no_cohort_and_goes_on() {
    let key = SecretKey::generate().unwrap();
    let mut r = rollout(3, &[1], with_cohort(&[]));
    r.step(1, Input::Start);
    r.serial = 7;
    let body = postcard::to_stdvec(&RolloutV2::from(&r)).unwrap();
    let signatures = sign_all(CONTEXT_V2, &body, &[&key]);
    let bytes = postcard::to_stdvec(&SignedRollout::V2 { body, signatures }).unwrap();
    let mut opened = Rollout::open(&bytes, |_| None, &Root::of_one_key(&key), "lab").unwrap();
    assert_eq!(opened, r);
    assert!(opened.policy.cohort.is_empty());
    assert_eq!(sent(&opened.step(2, committed("d000"))), ["d001", "d002"]);
    // Written again, it is a v4 record (a head and parts).
    let again = opened.seal(&[&key]).unwrap();
    let envelope: SignedRollout = postcard::from_bytes(&again.head).unwrap();
    assert!(matches!(envelope, SignedRollout::V4 { .. }));
    assert_eq!(
        open_sealed(&again, &Root::of_one_key(&key), "lab").unwrap(),
        opened
    );
    // A v2 body signed as v3 (or the reverse) does not open: the contexts differ.
    let SignedRollout::V2 { body, signatures } = postcard::from_bytes(&bytes).unwrap() else {
        unreachable!()
    };
    let swapped = postcard::to_stdvec(&SignedRollout::V3 { body, signatures }).unwrap();
    assert!(Rollout::open(&swapped, |_| None, &Root::of_one_key(&key), "lab").is_err());
}

#[test]
fn a_record_whose_cohort_does_not_parse_does_not_open() {
    let key = SecretKey::generate().unwrap();
    let r = rollout(2, &[1], with_cohort(&["colour=red"]));
    let e = open_sealed(&r.seal(&[&key]).unwrap(), &Root::of_one_key(&key), "lab").unwrap_err();
    assert!(e.contains("`colour` is not an attribute"), "{e}");
}

#[test]
fn a_cohort_completes_without_giving_the_group_the_release() {
    let mut r = rollout(3, &[1], with_cohort(&["tag=canary"]));
    assert_eq!(sent(&r.step(1, Input::Start)), ["d000"]);
    assert_eq!(sent(&r.step(2, committed("d000"))), ["d001", "d002"]);
    r.step(3, committed("d001"));
    let last = r.step(4, committed("d002"));
    assert_eq!(r.phase, Phase::Complete);
    assert!(
        !last.iter().any(|a| matches!(a, Action::Finish(_))),
        "{last:?}"
    );
    assert!(r
        .history
        .last()
        .unwrap()
        .1
        .contains("cohort keeps the release"));
    // Without one, the group's desired state takes it.
    let mut whole = rollout(1, &[1], with_cohort(&[]));
    whole.step(1, Input::Start);
    let last = whole.step(2, committed("d000"));
    assert_eq!(last, [Action::Finish(vec!["d000".into()])]);
}
