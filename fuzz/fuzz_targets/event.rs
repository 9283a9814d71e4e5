//! A deployment `Event` from the broker, decoded (the raw enum must round-trip),
//! opened on a device's events topic with its signature checked, and shown as
//! `kiln watch` does.
#![no_main]

use kiln_protocol::fleet::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = kiln_fuzz::decode::<Event>(data);
    let opened = Event::open(kiln_fuzz::EVENTS_TOPIC, data);
    match (&raw, &opened) {
        (None, Ok(_)) => panic!("opens but does not decode"),
        (Some(Event::V1(e)), _) => assert_eq!(opened, Ok((e.clone(), None))),
        (Some(Event::Signed(signed)), Ok((_, signer))) => {
            let signer = signer.as_ref().expect("a signed event has a signer");
            assert_eq!(signer.to_bytes(), signed.key);
            assert!(kiln_fuzz::decode::<Event>(&signed.body).is_some());
        }
        _ => {}
    }
    if let Ok((e, _)) = &opened {
        let _ = e.kind.to_string();
    }
});
