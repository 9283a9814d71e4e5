//! A deployment `Event` from the broker, decoded and shown as `kiln watch` does.
#![no_main]

use kiln_protocol::fleet::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(Event::V1(e)) = kiln_fuzz::decode::<Event>(data) {
        let _ = e.kind.to_string();
    }
});
