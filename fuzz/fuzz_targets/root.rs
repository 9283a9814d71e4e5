//! Root documents from the broker or a provisioning file: opened as a device's first
//! root and peeked (for showing); taken as the next root after the fixed root v1; a
//! chain provisioned with the input offered the fixed root; and a set followed (the
//! input cut into pieces, see `kiln_fuzz::split`). Nothing may panic; a refused root
//! changes nothing; a chain moves one version at a time.
#![no_main]

use kiln_protocol::trust::{Chain, SignedRoot, MAX_ROLE_KEYS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let initial = SignedRoot::open_initial(data);
    let peeked = SignedRoot::peek(data);
    if let Ok(root) = &initial {
        assert_eq!(peeked.as_ref(), Ok(root), "opens but peeks otherwise");
        assert!(root.check().is_ok());
        for role in [&root.root, &root.release, root.registry_role()] {
            assert!(role.keys.len() <= MAX_ROLE_KEYS);
            assert_eq!(role.public_keys().len(), role.keys.len());
        }
        let _ = root.describe();
        // A device provisioned with it, then offered the fleet's root v1.
        let mut provisioned = Chain::new(data.to_vec()).expect("what opens starts a chain");
        let before = provisioned.clone();
        if provisioned.advance(&kiln_fuzz::root_bytes()).is_err() {
            assert_eq!(provisioned, before, "a refused root changed the chain");
        }
    }

    let start = Chain::new(kiln_fuzz::root_bytes()).expect("the fixed root opens");
    let mut chain = start.clone();
    match chain.advance(data) {
        Ok(next) => {
            assert_eq!(next.version, 2);
            assert_eq!(next.fleet, kiln_fuzz::FLEET);
            assert_eq!(chain.bytes(), data);
        }
        Err(_) => assert_eq!(chain, start, "a refused root changed the chain"),
    }

    let pieces = kiln_fuzz::split(data);
    let mut chain = start.clone();
    let (taken, errors) = chain.follow(pieces.iter().copied());
    assert!(taken.len() + errors.len() <= pieces.len());
    for (n, version) in taken.iter().enumerate() {
        assert_eq!(*version, n as u64 + 2, "skipped a version: {taken:?}");
    }
    assert_eq!(chain.root().version, taken.len() as u64 + 1);
    if taken.is_empty() {
        assert_eq!(chain, start);
    }
});
