//! An artifact file from disk or MQTT: parse the envelope, verify it against a trusted
//! key, and (as `kiln inspect` does) decode the manifest without trusting it.
#![no_main]

use kiln_protocol::artifact::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = kiln_fuzz::trust();
    if let Ok(envelope) = Envelope::parse(data) {
        let _ = envelope.manifest_unverified();
        let _ = envelope.verify(&trust);
    }
});
