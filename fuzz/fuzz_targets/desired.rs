//! A retained desired state from the broker: open it against the fleet's root (a
//! threshold of its release keys, its fleet), and peek at it and list its signers as
//! `kiln gc` and `kiln sign` do. What opens must peek the same; what peeks for this
//! fleet must open once the release key has added its signature.
#![no_main]

use kiln_protocol::fleet::{SignedDesired, MAX_DESIRED};
use kiln_protocol::trust::MAX_SIGNATURES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = kiln_fuzz::root();
    let opened = SignedDesired::open(data, &root);
    let peeked = SignedDesired::peek(data);
    let signers = SignedDesired::signers(data);
    if let Ok(desired) = &opened {
        assert_eq!(peeked.as_ref(), Ok(desired), "opens but peeks otherwise");
        assert_eq!(desired.fleet, root.fleet);
        assert!(signers.is_ok());
        let _ = desired.check_fresh(desired.issued_ms);
    }
    if let (Ok(desired), Ok(signers)) = (&peeked, &signers) {
        let key = kiln_fuzz::key();
        let others = signers
            .iter()
            .filter(|id| **id != key.public().id())
            .count();
        let signed = SignedDesired::add_signature(data, &key).expect("what peeks can be signed");
        if desired.fleet == root.fleet && others < MAX_SIGNATURES && signed.len() <= MAX_DESIRED {
            assert_eq!(
                SignedDesired::open(&signed, &root).as_ref(),
                Ok(desired),
                "signed by the release key but not opened"
            );
        }
    }
    for desired in opened.into_iter().chain(peeked) {
        for m in &desired.modules {
            for a in &m.artifacts {
                if a.check().is_ok() {
                    let _ = a.transfer_from(Some([0; 32]), false);
                }
            }
            let _ = m.artifact_for("aarch64-unknown-linux-gnu", &["neon".into()]);
        }
    }
});
