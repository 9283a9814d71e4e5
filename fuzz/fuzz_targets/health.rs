//! A `Health` message from the broker, decoded as `kiln` does: the raw enum (whose
//! encoding must survive a round trip), then opened on a device's health topic, its
//! size bounded, its signature checked and its summaries validated. What opens is
//! valid, and seals and opens again the same.
#![no_main]

use kiln_protocol::fleet::{Health, MAX_HEALTH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Not `kiln_fuzz::decode`: a raw sketch may hold a NaN, which is not equal to
    // itself, so the round trip is judged on the bytes.
    let raw = postcard::from_bytes::<Health>(data).ok();
    if let Some(raw) = &raw {
        let again = postcard::to_stdvec(raw).expect("a decoded message encodes");
        let back = postcard::from_bytes::<Health>(&again).expect("an encoded message decodes");
        assert_eq!(postcard::to_stdvec(&back).expect("it encodes again"), again);
    }
    let topic = kiln_fuzz::HEALTH_TOPIC;
    let Ok((health, signer)) = Health::open(topic, data) else {
        return;
    };
    assert!(data.len() <= MAX_HEALTH);
    assert_eq!(health.validate(), Ok(()));
    match raw {
        None => panic!("opens but does not decode"),
        Some(Health::V1(r)) => {
            assert_eq!(r, health);
            assert!(signer.is_none());
        }
        Some(Health::Signed(signed)) => {
            let signer = signer.expect("a signed health has a signer");
            assert_eq!(signer.to_bytes(), signed.key);
        }
    }
    let key = kiln_fuzz::device_key();
    let sealed = health.seal(topic, &key).expect("a valid health seals");
    assert_eq!(
        Health::open(topic, &sealed),
        Ok((health, Some(key.public())))
    );
});
