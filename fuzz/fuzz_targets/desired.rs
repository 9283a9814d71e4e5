//! A retained desired state from the broker: open it with a trusted key, and peek at
//! it as `kiln gc` does.
#![no_main]

use kiln_protocol::fleet::SignedDesired;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = kiln_fuzz::trust();
    let opened = SignedDesired::open(data, &trust);
    let peeked = SignedDesired::peek(data);
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
