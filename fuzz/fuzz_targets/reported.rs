//! A `Reported` message from the broker, decoded as the device or `kiln` does.
#![no_main]

use kiln_protocol::fleet::Reported;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::decode::<Reported>(data);
});
