//! A `Reported` message from the broker, decoded as the device or `kiln` does: the
//! raw enum (which must round-trip), then opened on a device's reported topic, its
//! signature checked.
#![no_main]

use kiln_protocol::fleet::Reported;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = kiln_fuzz::decode::<Reported>(data);
    let opened = Reported::open(kiln_fuzz::REPORTED_TOPIC, data);
    match (&raw, &opened) {
        (None, Ok(_)) => panic!("opens but does not decode"),
        (Some(Reported::V1(r)), _) => assert_eq!(opened, Ok((r.clone(), None))),
        (Some(Reported::Signed(signed)), Ok((_, signer))) => {
            let signer = signer.as_ref().expect("a signed report has a signer");
            assert_eq!(signer.to_bytes(), signed.key);
            assert!(kiln_fuzz::decode::<Reported>(&signed.body).is_some());
        }
        _ => {}
    }
});
