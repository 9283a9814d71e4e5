//! A retained desired state from the broker: open it with a trusted key, and peek at
//! it as `kiln gc` does.
#![no_main]

use kiln_protocol::fleet::SignedDesired;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = kiln_fuzz::trust();
    if let Ok(desired) = SignedDesired::open(data, &trust) {
        for m in &desired.modules {
            let _ = m.artifact.check();
        }
    }
    if let Ok(desired) = SignedDesired::peek(data) {
        for m in &desired.modules {
            if m.artifact.check().is_ok() {
                let _ = m.artifact.chunk_len(m.artifact.chunks.len() as u32);
            }
        }
    }
});
