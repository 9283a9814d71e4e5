//! A group's rollout record's head from the broker (or a whole record from before
//! parts), opened against the fixed root (its release role signs records) with no part
//! retained: only a record signed by it, for its fleet and the group asked for, opens
//! (the parts' decoder is `rollout_part`); what opens seals and opens again the same, and any step
//! on it keeps the record's own rules (no device sent the release after an abort).
//! `Rollout::verify_head` (a driver's reading of another writer's head) is fed the
//! same bytes.
#![no_main]

use kiln_protocol::rollout::{Action, Input, Phase, Rollout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = kiln_fuzz::root();
    // The head alone, as a driver reads another writer's head delivered on its topic:
    // it opens whenever the whole record does, and says the same of it.
    let head = Rollout::verify_head(data, &root, "lab");
    let Ok(record) = Rollout::open(data, |_| None, &root, "lab") else {
        return;
    };
    let head = head.expect("a record that opens has a head that opens");
    assert_eq!(
        (&head.id, head.serial, &head.phase, &head.driver),
        (&record.id, record.serial, &record.phase, &record.driver)
    );
    assert_eq!(
        (record.fleet.as_str(), record.group.as_str()),
        (root.fleet.as_str(), "lab")
    );
    let key = kiln_fuzz::key();
    if let Ok(again) = record.seal(&[&key]) {
        assert_eq!(
            Rollout::open(&again.head, |s| again.part(s), &root, "lab").as_ref(),
            Ok(&record)
        );
    }
    let _ = (
        record.label(),
        record.counts(),
        record.pending(),
        record.deadline_ms(),
    );
    let first = record.devices.keys().next().cloned().unwrap_or_default();
    for input in [
        Input::Start,
        Input::Committed {
            device: first.clone(),
        },
        Input::Failed {
            device: first,
            why: "fuzz".into(),
        },
        Input::Tick,
        Input::Resume,
        Input::Retry,
        Input::Abort { by: "fuzz".into() },
        Input::Tick,
        Input::Retry,
    ] {
        let mut r = record.clone();
        let aborted = matches!(r.phase, Phase::Aborted { .. });
        let out = r.step(u64::MAX / 2, input);
        if aborted {
            assert!(!out.iter().any(|a| matches!(a, Action::Send(_))));
        }
    }
});
