//! The device registry's head from the broker (or a whole registry from before parts),
//! opened against the fixed root (its release role signs the registry), with no parts
//! retained: only a head signed by it, for its fleet, naming no part, opens, and what
//! opens signs and opens again the same. The parts' own decoder is `registry_part`.
#![no_main]

use kiln_protocol::trust::{Registry, SignedRegistry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = kiln_fuzz::root();
    let Ok(registry) = SignedRegistry::open(data, |_| None, &root) else {
        return;
    };
    assert_eq!(registry.fleet, root.fleet);
    for enrolled in &registry.devices {
        let _ = registry.key_of(&enrolled.device);
    }
    let key = kiln_fuzz::key();
    if let Ok(again) = registry.sign(&[&key]) {
        assert_eq!(
            SignedRegistry::open(&again.head, |s| again.part(s), &root).as_ref(),
            Ok(&registry)
        );
    }
    // Enrolling replaces the device's key and keeps one entry per device.
    if let Some(first) = registry.devices.first() {
        let mut changed: Registry = registry.clone();
        changed.enroll(&first.device, &key.public());
        assert_eq!(changed.key_of(&first.device), Some(key.public()));
        let count = |r: &Registry| {
            r.devices
                .iter()
                .filter(|e| e.device == first.device)
                .count()
        };
        assert_eq!(count(&changed), 1);
    }
});
