//! A `Status` message from the broker, decoded as the device or `kiln` does: the raw
//! enum (which must round-trip), then opened on a device's status topic, its
//! signature checked. An unsigned message opens unsigned; a signed one opens only as
//! signed by the key it carries.
#![no_main]

use kiln_protocol::fleet::{Status, StatusV2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = kiln_fuzz::decode::<Status>(data);
    let opened = Status::open(kiln_fuzz::STATUS_TOPIC, data);
    match (&raw, &opened) {
        (None, Ok(_)) => panic!("opens but does not decode"),
        (Some(Status::V1(s)), _) => {
            assert_eq!(opened, Ok((StatusV2::from(s.clone()), None)));
        }
        (Some(Status::V2(s)), _) => assert_eq!(opened, Ok((s.clone(), None))),
        (Some(Status::Signed(signed)), Ok((_, signer))) => {
            let signer = signer.as_ref().expect("a signed status has a signer");
            assert_eq!(signer.to_bytes(), signed.key);
            assert!(kiln_fuzz::decode::<Status>(&signed.body).is_some());
        }
        _ => {}
    }
});
