//! A `Chunk` message from the broker, decoded as the device or `kiln` does.
#![no_main]

use kiln_protocol::transfer::Chunk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::decode::<Chunk>(data);
});
