//! A part of a rollout record (its members), behind a head the release role signed:
//! the first bytes say how many places the head gives the two waves and the skipped
//! list and how many entries the part holds, the rest are the part. Whatever opens
//! has every place taken once, every member in its wave, and seals and opens again
//! the same.
#![no_main]

use kiln_protocol::parts::{part_of, PartRef};
use kiln_protocol::rollout::{sign_head, Rollout};
use kiln_protocol::transfer::sha256;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [w0, w1, skipped, entries, part @ ..] = data else {
        return;
    };
    let root = kiln_fuzz::root();
    let key = kiln_fuzz::key();
    let record = kiln_fuzz::rollout();
    // Every part number a name of the part could have: the part's own first name's.
    let number = part_of(&String::from_utf8_lossy(part.get(2..).unwrap_or_default()));
    for n in [number, 0] {
        let refs = vec![PartRef {
            part: n,
            entries: u32::from(*entries),
            sha256: sha256(part),
        }];
        let waves = vec![u32::from(*w0), u32::from(*w1)];
        let head = sign_head(&record, waves, u32::from(*skipped), refs, &[&key]);
        let Ok(opened) = Rollout::open(&head, |_| Some(part), &root, "lab") else {
            continue;
        };
        let placed: usize = opened.waves.iter().map(Vec::len).sum();
        assert_eq!(placed, opened.devices.len());
        for (w, wave) in opened.waves.iter().enumerate() {
            assert!(wave.iter().all(|d| opened.devices[d].wave as usize == w));
        }
        assert_eq!(opened.skipped.len(), usize::from(*skipped));
        let again = opened.seal(&[&key]).expect("what opened seals");
        assert_eq!(
            Rollout::open(&again.head, |s| again.part(s), &root, "lab").as_ref(),
            Ok(&opened)
        );
    }
});
