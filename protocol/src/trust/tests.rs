use proptest::prelude::*;

use super::*;

fn keys(n: usize) -> Vec<SecretKey> {
    (0..n).map(|_| SecretKey::generate().unwrap()).collect()
}

fn publics(keys: &[SecretKey]) -> Vec<PublicKey> {
    keys.iter().map(SecretKey::public).collect()
}

fn root(version: u64, root_keys: &[SecretKey], release: &[SecretKey], k: u32) -> Root {
    Root {
        fleet: "acme".into(),
        version,
        issued_ms: 1_700_000_000_000 + version,
        root: Role::new(&publics(root_keys), k),
        release: Role::new(&publics(release), 1),
        registry: None,
        expires_ms: None,
    }
}

fn refs(keys: &[SecretKey]) -> Vec<&SecretKey> {
    keys.iter().collect()
}

#[test]
fn a_rotation_is_followed_and_the_old_release_key_is_gone() {
    let (r, old, new) = (keys(1), keys(1), keys(1));
    let mut chain = Chain::new(root(1, &r, &old, 1).sign(&refs(&r)).unwrap()).unwrap();
    assert_eq!(chain.root().release.ids(), vec![old[0].public().id()]);
    let v2 = root(2, &r, &new, 1).sign(&refs(&r)).unwrap();
    assert_eq!(chain.advance(&v2).unwrap().version, 2);
    assert_eq!(chain.root().release.ids(), vec![new[0].public().id()]);
    assert!(chain
        .root()
        .release
        .trusted()
        .find(old[0].public().id())
        .is_none());
}

#[test]
fn a_new_root_key_must_sign_its_own_root_as_well() {
    let (r1, r2, rel) = (keys(1), keys(1), keys(1));
    let mut chain = Chain::new(root(1, &r1, &rel, 1).sign(&refs(&r1)).unwrap()).unwrap();
    let only_old = root(2, &r2, &rel, 1).sign(&refs(&r1)).unwrap();
    let err = chain.advance(&only_old).unwrap_err();
    assert!(err.contains("by its own root keys"), "{err}");
    let only_new = root(2, &r2, &rel, 1).sign(&refs(&r2)).unwrap();
    let err = chain.advance(&only_new).unwrap_err();
    assert!(err.contains("by root v1's root keys"), "{err}");
    let both = root(2, &r2, &rel, 1).sign(&[&r1[0], &r2[0]]).unwrap();
    assert_eq!(chain.advance(&both).unwrap().version, 2);
    assert_eq!(chain.root().root.ids(), vec![r2[0].public().id()]);
}

#[test]
fn skipping_a_version_or_another_fleet_or_a_wrong_root_is_refused() {
    let (r, rel, rogue) = (keys(1), keys(1), keys(1));
    let mut chain = Chain::new(root(1, &r, &rel, 1).sign(&refs(&r)).unwrap()).unwrap();
    let v3 = root(3, &r, &rel, 1).sign(&refs(&r)).unwrap();
    let err = chain.advance(&v3).unwrap_err();
    assert!(err.contains("does not follow root v1"), "{err}");
    let mut other = root(2, &r, &rel, 1);
    other.fleet = "staging".into();
    let err = chain.advance(&other.sign(&refs(&r)).unwrap()).unwrap_err();
    assert!(err.contains("fleet staging"), "{err}");
    let forged = root(2, &rogue, &rel, 1).sign(&refs(&rogue)).unwrap();
    let err = chain.advance(&forged).unwrap_err();
    assert!(err.contains("0 of the 1 signatures"), "{err}");
    assert_eq!(chain.root().version, 1, "nothing changed");
}

#[test]
fn a_threshold_counts_distinct_valid_signatures_of_the_role() {
    let (r, rel) = (keys(3), keys(1));
    let v1 = root(1, &r, &rel, 2);
    let one = v1.sign(&[&r[0]]).unwrap();
    let err = SignedRoot::open_initial(&one).unwrap_err();
    assert!(err.contains("1 of the 2 signatures"), "{err}");
    // The same key twice is still one signer.
    let twice = v1.sign(&[&r[0], &r[0]]).unwrap();
    assert!(SignedRoot::open_initial(&twice).is_err());
    let two = v1.sign(&[&r[0], &r[2]]).unwrap();
    assert_eq!(SignedRoot::open_initial(&two).unwrap(), v1);
}

#[test]
fn follow_takes_roots_in_order_whatever_order_they_arrive_in() {
    let (r, rel) = (keys(1), keys(4));
    let docs: Vec<Vec<u8>> = (1..=4)
        .map(|v| {
            root(v, &r, &rel[v as usize - 1..v as usize], 1)
                .sign(&refs(&r))
                .unwrap()
        })
        .collect();
    let mut chain = Chain::new(docs[0].clone()).unwrap();
    let arriving = [&docs[3], &docs[1], &docs[0], &docs[2]];
    let (taken, errors) = chain.follow(arriving.iter().map(|d| d.as_slice()));
    assert_eq!(taken, vec![2, 3, 4]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(chain.root().release.ids(), vec![rel[3].public().id()]);
}

#[test]
fn the_registry_opens_only_with_the_registry_role_for_its_fleet() {
    let (r, rel, reg) = (keys(1), keys(1), keys(1));
    let mut doc = root(1, &r, &rel, 1);
    let device = keys(1);
    let mut registry = Registry {
        fleet: "acme".into(),
        serial: 1,
        devices: Vec::new(),
    };
    registry.enroll("dev-01", &device[0].public());
    // Without a registry role, the release role signs it.
    let by_release = registry.sign(&refs(&rel)).unwrap();
    let open =
        |p: &crate::parts::Published, doc: &Root| SignedRegistry::open(&p.head, |s| p.part(s), doc);
    let opened = open(&by_release, &doc).unwrap();
    assert_eq!(opened.key_of("dev-01"), Some(device[0].public()));
    doc.registry = Some(Role::new(&publics(&reg), 1));
    assert!(open(&by_release, &doc).is_err());
    assert!(open(&registry.sign(&refs(&reg)).unwrap(), &doc).is_ok());
    registry.fleet = "staging".into();
    let err = open(&registry.sign(&refs(&reg)).unwrap(), &doc).unwrap_err();
    assert!(err.contains("fleet staging"), "{err}");
}

#[test]
fn a_registry_of_100000_devices_is_a_head_and_parts_each_within_one_message() {
    let (r, rel) = (keys(1), keys(1));
    let doc = root(1, &r, &rel, 1);
    let key = keys(1)[0].public();
    let mut registry = Registry {
        fleet: "acme".into(),
        serial: 7,
        devices: Vec::new(),
    };
    for i in 0..100_000 {
        registry.enroll(&format!("device-{i:06}"), &key);
    }
    let published = registry.sign(&refs(&rel)).unwrap();
    assert!(published.head.len() < 16 * 1024, "{}", published.head.len());
    let largest = published.parts.iter().map(|(_, b)| b.len()).max().unwrap();
    assert!(largest < crate::parts::MAX_PART / 2, "{largest}");
    let opened = SignedRegistry::open(&published.head, |s| published.part(s), &doc).unwrap();
    assert_eq!(opened, registry);
    assert_eq!(opened.key_of("device-054321"), Some(key.clone()));
    assert_eq!(opened.key_of("device-100000"), None);

    // One part missing: incomplete (read again), not untrusted.
    let (gone, _) = published.parts[3].clone();
    let err = SignedRegistry::verify(
        &published.head,
        |s| (*s != gone).then(|| published.part(s)).flatten(),
        &doc,
    )
    .unwrap_err();
    assert!(matches!(err, OpenError::Incomplete(_)), "{err}");
    // The same part of another registry (an older enrollment replayed) put in its
    // place: refused.
    let mut older = registry.clone();
    older.enroll("device-000001", &keys(1)[0].public());
    let old = older.sign(&refs(&rel)).unwrap();
    let theirs: Vec<&Vec<u8>> = old
        .parts
        .iter()
        .filter(|(sha, _)| published.part(sha).is_none())
        .map(|(_, b)| b)
        .collect();
    assert_eq!(theirs.len(), 1, "one part differs");
    let err = SignedRegistry::verify(
        &published.head,
        |s| {
            if old.part(s).is_none() {
                Some(theirs[0].as_slice())
            } else {
                published.part(s)
            }
        },
        &doc,
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not hash"), "{err}");
}

#[test]
fn a_registry_kept_whole_before_parts_still_opens() {
    let (r, rel) = (keys(1), keys(1));
    let doc = root(1, &r, &rel, 1);
    let device = keys(1)[0].public();
    let mut registry = Registry {
        fleet: "acme".into(),
        serial: 3,
        devices: Vec::new(),
    };
    registry.enroll("dev-02", &device);
    registry.enroll("dev-01", &device);
    let whole = registry.sign_whole(&refs(&rel)).unwrap();
    let opened = SignedRegistry::open(&whole, |_| None, &doc).unwrap();
    assert_eq!(opened, registry);
    assert_eq!(opened.key_of("dev-01"), Some(device));
}

#[test]
fn a_root_with_an_expiry_travels_apart_and_goes_stale() {
    let (r, rel) = (keys(1), keys(1));
    let mut v1 = root(1, &r, &rel, 1);
    let plain = v1.sign(&refs(&r)).unwrap();
    assert!(matches!(
        postcard::from_bytes(&plain).unwrap(),
        SignedRoot::V1 { .. }
    ));
    v1.expires_ms = Some(2_000);
    let dated = v1.sign(&refs(&r)).unwrap();
    assert!(matches!(
        postcard::from_bytes(&dated).unwrap(),
        SignedRoot::V2 { .. }
    ));
    let opened = SignedRoot::open_initial(&dated).unwrap();
    assert_eq!(opened, v1);
    assert_eq!(opened.stale_at(1_999), None);
    assert!(opened.stale_at(2_000).unwrap().contains("expired"));
    // The expiry is signed: moving it breaks the signature.
    let mut chain = Chain::new(dated).unwrap();
    let mut v2 = root(2, &r, &rel, 1);
    v2.expires_ms = Some(9_000);
    assert_eq!(
        chain
            .advance(&v2.sign(&refs(&r)).unwrap())
            .unwrap()
            .expires_ms,
        Some(9_000)
    );
}

#[test]
fn invalid_roles_are_named() {
    let (r, rel) = (keys(2), keys(1));
    let mut doc = root(1, &r, &rel, 3);
    assert!(doc.check().unwrap_err().contains("needs 3 of its 2 keys"));
    doc.root.threshold = 1;
    doc.root.keys[1] = doc.root.keys[0];
    assert!(doc.check().unwrap_err().contains("twice"));
    doc.root.keys.truncate(1);
    doc.version = 0;
    assert!(doc.check().unwrap_err().contains("version 0"));
}

proptest! {
    /// Whatever roots an attacker mixes in (other keys, skipped versions, other
    /// fleets), a chain ends at the highest version reachable one step at a time
    /// with valid signatures, and its release keys are that root's.
    #[test]
    fn a_chain_only_moves_along_valid_steps(
        steps in proptest::collection::vec((0u8..4, any::<bool>()), 1..8),
    ) {
        let r = keys(1);
        let rogue = keys(1);
        let rel = keys(1);
        let first = root(1, &r, &rel, 1).sign(&refs(&r)).unwrap();
        let mut chain = Chain::new(first).unwrap();
        let mut expect = 1u64;
        for (kind, _) in steps {
            let v = chain.root().version;
            let (doc, valid) = match kind {
                0 => (root(v + 1, &r, &rel, 1).sign(&refs(&r)).unwrap(), true),
                1 => (root(v + 2, &r, &rel, 1).sign(&refs(&r)).unwrap(), false),
                2 => (root(v + 1, &r, &rel, 1).sign(&refs(&rogue)).unwrap(), false),
                _ => {
                    let mut d = root(v + 1, &r, &rel, 1);
                    d.fleet = "other".into();
                    (d.sign(&refs(&r)).unwrap(), false)
                }
            };
            let taken = chain.advance(&doc).is_ok();
            prop_assert_eq!(taken, valid);
            if valid {
                expect += 1;
            }
            prop_assert_eq!(chain.root().version, expect);
        }
    }

    /// Bytes that are not a root document never panic and never open.
    #[test]
    fn garbage_never_opens(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(SignedRoot::open_initial(&bytes).is_err());
    }
}
