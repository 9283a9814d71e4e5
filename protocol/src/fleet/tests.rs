use super::*;
use crate::keys::{PublicKey, SecretKey};
use crate::transfer::{Codec, Transfer, MAX_ARTIFACT};
use crate::trust::Root;

fn desired() -> Desired {
    Desired {
        fleet: "acme".into(),
        scope: Scope::Device("dev-01".into()),
        serial: 3,
        issued_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_000_000 + 86_400_000,
        mirrors: Vec::new(),
        modules: vec![DesiredModule {
            name: "app".into(),
            version: 2,
            artifacts: vec![target("aarch64-unknown-linux-gnu", &["neon"], 7)],
            config: b"alpha=0.3".to_vec(),
            limits: ModuleLimits::default(),
            allow_downgrade: false,
            health_window_ms: 5000,
        }],
    }
}

#[test]
fn an_expired_state_is_refused_with_its_dates() {
    let d = desired();
    assert_eq!(d.check_fresh(d.expires_ms - 1), Ok(()));
    let err = d.check_fresh(d.expires_ms).unwrap_err().to_string();
    assert_eq!(
        err,
        "desired state serial 3 expired at 2023-11-15T22:13:20Z (issued 2023-11-14T22:13:20Z)"
    );
}

fn target(triple: &str, features: &[&str], seed: u8) -> TargetArtifact {
    let bytes = [seed; 100_000];
    let full = Transfer::full(&bytes, Codec::Zstd, crate::transfer::DEFAULT_CHUNK);
    TargetArtifact {
        triple: triple.into(),
        cpu_features: features.iter().map(|f| f.to_string()).collect(),
        sha256: sha256(&bytes),
        len: bytes.len() as u64,
        full: full.transfer,
        patches: Vec::new(),
    }
}

fn root_for(release: &[&SecretKey], threshold: u32) -> (Root, SecretKey) {
    let root_key = SecretKey::generate().unwrap();
    let keys: Vec<PublicKey> = release.iter().map(|k| k.public()).collect();
    let root = Root {
        fleet: "acme".into(),
        version: 1,
        issued_ms: 0,
        root: crate::trust::Role::new(&[root_key.public()], 1),
        release: crate::trust::Role::new(&keys, threshold),
        registry: None,
        expires_ms: None,
    };
    (root, root_key)
}

#[test]
fn signed_desired_state_opens_only_with_release_signatures_for_its_fleet() {
    let key = SecretKey::generate().unwrap();
    let other = SecretKey::generate().unwrap();
    let (root, _) = root_for(&[&key], 1);
    let bytes = SignedDesired::sign(&desired(), &[&key]);
    assert_eq!(SignedDesired::open(&bytes, &root), Ok(desired()));

    let foreign = SignedDesired::sign(&desired(), &[&other]);
    let err = SignedDesired::open(&foreign, &root)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 of the 1 signatures"), "{err}");
    let mut tampered = bytes.clone();
    let at = tampered.len() - 70;
    tampered[at] ^= 1;
    assert!(SignedDesired::open(&tampered, &root).is_err());
    assert!(SignedDesired::open(b"\x07garbage", &root)
        .unwrap_err()
        .to_string()
        .starts_with("malformed desired state"));

    let mut staging = desired();
    staging.fleet = "staging".into();
    let err = SignedDesired::open(&SignedDesired::sign(&staging, &[&key]), &root)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is for fleet staging"), "{err}");
}

#[test]
fn a_threshold_is_met_by_signatures_added_one_at_a_time() {
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let (root, _) = root_for(&[&a, &b], 2);
    let unsigned = SignedDesired::sign(&desired(), &[]);
    assert!(SignedDesired::open(&unsigned, &root).is_err());
    let one = SignedDesired::add_signature(&unsigned, &a).unwrap();
    let err = SignedDesired::open(&one, &root).unwrap_err().to_string();
    assert!(err.contains("1 of the 2 signatures"), "{err}");
    let again = SignedDesired::add_signature(&one, &a).unwrap();
    assert_eq!(SignedDesired::signers(&again).unwrap().len(), 1);
    let two = SignedDesired::add_signature(&one, &b).unwrap();
    assert_eq!(SignedDesired::open(&two, &root), Ok(desired()));
    // The same signature made outside kiln (an HSM) over the signing message.
    let message = SignedDesired::signing_message(&one).unwrap();
    let raw = b.sign(&message);
    let external = SignedDesired::add_raw_signature(&one, &b.public(), &raw).unwrap();
    assert_eq!(SignedDesired::open(&external, &root), Ok(desired()));
    let wrong = SignedDesired::add_raw_signature(&one, &a.public(), &raw)
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("does not verify"), "{wrong}");
}

#[test]
fn device_messages_verify_only_for_their_topic_and_unsigned_ones_say_so() {
    let key = SecretKey::generate().unwrap();
    let topic = "kiln/v1/devices/dev-01/reported";
    let report = Reported::V1(ReportedV1 {
        serial: 9,
        modules: Vec::new(),
    });
    let sealed = seal_report(&report, topic, &key);
    let (opened, signer) = Reported::open(topic, &sealed).unwrap();
    assert_eq!(opened.serial, 9);
    assert_eq!(signer, Some(key.public()));
    // Moved to another device's topic, it no longer verifies.
    let err = Reported::open("kiln/v1/devices/dev-02/reported", &sealed).unwrap_err();
    assert!(matches!(err, ReportError::Forged(_)), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
    let plain = postcard::to_stdvec(&report).unwrap();
    assert_eq!(Reported::open(topic, &plain).unwrap().1, None);
    // A status of kiln 0.2 still reads, as a status without trust.
    let old = postcard::to_stdvec(&Status::V1(StatusV1 {
        device: "d".into(),
        online: true,
        facts: None,
    }))
    .unwrap();
    let (status, signer) = Status::open("t", &old).unwrap();
    assert_eq!((status.trust, signer), (None, None));
}

#[test]
fn a_device_takes_the_most_specific_artifact_it_can_run_or_says_why_none() {
    let mut m = desired().modules.remove(0);
    m.artifacts = vec![
        target("x86_64-unknown-linux-gnu", &[], 1),
        target("x86_64-unknown-linux-gnu", &["avx2", "bmi2"], 2),
        target("riscv64gc-unknown-linux-gnu", &[], 3),
    ];
    let x86 = |features: &[&str]| {
        let f: Vec<String> = features.iter().map(|s| s.to_string()).collect();
        m.artifact_for("x86_64-unknown-linux-musl", &f)
            .map(|a| a.cpu_features.len())
    };
    assert_eq!(x86(&["avx2", "bmi2", "sse4.2"]), Ok(2));
    assert_eq!(x86(&["avx2"]), Ok(0));
    let why = m
        .find_artifact("aarch64-unknown-linux-gnu", &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        why,
        "release app v2 has no artifact for this aarch64-unknown-linux-gnu device (it has: x86_64-unknown-linux-gnu, x86_64-unknown-linux-gnu+avx2+bmi2, riscv64gc-unknown-linux-gnu)"
    );
    let t = &m.artifacts[0];
    assert_eq!(t.check(), Ok(()));
    let patch = Patch {
        base: [9; 32],
        transfer: Transfer::patch(&[1; 90_000], &[1; 100_000], 4096).transfer,
    };
    let mut t = t.clone();
    t.patches.push(patch);
    assert_eq!(t.check(), Ok(()));
    assert_eq!(t.transfer_from(Some([9; 32]), false).1, Some([9; 32]));
    assert_eq!(t.transfer_from(Some([9; 32]), true).1, None);
    assert_eq!(t.transfer_from(Some([8; 32]), false).0, &t.full);
    let mut bad = t.clone();
    bad.patches[0].transfer.codec = Codec::Zstd;
    assert!(bad.check().is_err());
    let mut huge = t.clone();
    huge.len = MAX_ARTIFACT + 1;
    assert!(huge.check().is_err());
}

#[test]
fn a_desired_state_stays_small_whatever_the_artifact_size() {
    // 120 MB of artifact, raw: still a few hundred bytes of desired state.
    let mut d = desired();
    let t = &mut d.modules[0].artifacts[0];
    t.len = 120 << 20;
    t.full = Transfer {
        codec: Codec::Raw,
        sha256: [3; 32],
        len: 120 << 20,
        chunk_size: 64 << 10,
        list: [4; 32],
    };
    assert_eq!(t.check(), Ok(()));
    let key = SecretKey::generate().unwrap();
    assert!(SignedDesired::sign(&d, &[&key]).len() < 512);
}

#[test]
fn a_desired_state_of_an_earlier_kiln_is_refused_by_name() {
    let old = postcard::to_stdvec(&SignedDesired::V2 {
        body: vec![1, 2, 3],
        key_id: [0; 8],
        signature: vec![0; 64],
    })
    .unwrap();
    let key = SecretKey::generate().unwrap();
    let (root, _) = root_for(&[&key], 1);
    assert!(SignedDesired::open(&old, &root)
        .unwrap_err()
        .to_string()
        .contains("an earlier kiln's format"));
}

#[test]
fn broker_urls_name_host_port_and_tls() {
    let b = parse_broker("mqtts://broker.lan").unwrap();
    assert_eq!((b.host.as_str(), b.port, b.tls), ("broker.lan", 8883, true));
    let b = parse_broker("mqtt://127.0.0.1:1884").unwrap();
    assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
    assert!(parse_broker("http://x").is_err());
    assert!(parse_broker("mqtt://:1883").is_err());
    // A list given where one broker is read is refused, not read as host `a:1,mqtt://b`.
    assert!(parse_broker("mqtt://a:1,mqtt://b").is_err());
}

#[test]
fn broker_lists_keep_their_order_and_refuse_empty_entries_and_too_many() {
    let list = parse_brokers("mqtt://a:1 , mqtts://b,mqtt://c:3").unwrap();
    let shown: Vec<(&str, &str, u16, bool)> = list
        .iter()
        .map(|(t, u)| (t.as_str(), u.host.as_str(), u.port, u.tls))
        .collect();
    assert_eq!(
        shown,
        [
            ("mqtt://a:1", "a", 1, false),
            ("mqtts://b", "b", 8883, true),
            ("mqtt://c:3", "c", 3, false)
        ]
    );
    assert_eq!(parse_brokers("mqtt://a").unwrap().len(), 1);
    for bad in ["mqtt://a,", ",mqtt://a", "mqtt://a,,mqtt://b", ""] {
        assert!(parse_brokers(bad).is_err(), "{bad:?}");
    }
    let many = vec!["mqtt://a"; MAX_BROKERS + 1].join(",");
    assert_eq!(
        parse_brokers(&many).unwrap_err().to_string(),
        format!(
            "broker list names {} brokers (at most {MAX_BROKERS})",
            MAX_BROKERS + 1
        )
    );
}

#[test]
fn topics_are_built_and_parsed_in_one_place() {
    let t = Topics::new("kiln/v1/");
    assert_eq!(t.status("dev-01"), "kiln/v1/devices/dev-01/status");
    let sha = [0xab; 32];
    let chunk = t.chunk(&sha, 7);
    assert_eq!(t.parse_chunk(&chunk), Some((sha, 7)));
    assert_eq!(
        t.parse_device("kiln/v1/devices/d/events"),
        Some(("d", "events"))
    );
    assert_eq!(t.health("d"), "kiln/v1/devices/d/health");
    assert_eq!(t.parse_device(&t.health("d")), Some(("d", "health")));
    assert_eq!(t.all_devices("health"), "kiln/v1/devices/+/health");
    assert_eq!(t.parse_chunk("other/artifacts/zz/1"), None);
    let upload = t.upload(&sha);
    assert_eq!(upload, format!("kiln/v1/uploads/{}", hex::encode(sha)));
    assert_eq!(t.parse_upload(&upload), Some(sha));
    assert_eq!(t.parse_upload(&chunk), None);
    assert_eq!(t.parse_upload("kiln/v1/uploads/abcd"), None);
    assert_eq!(t.parse_artifact(&t.list(&sha)), Some(sha));
    assert_eq!(t.parse_artifact(&chunk), Some(sha));
    assert_eq!(t.parse_chunk(&t.list(&sha)), None);
    assert_eq!(
        t.parse_artifact(&format!("kiln/v1/artifacts/{}/x", hex::encode(sha))),
        None
    );
    assert_eq!(t.all_uploads(), "kiln/v1/uploads/+");
    assert_eq!(t.parse_root(&t.root(12)), Some(12));
    assert_eq!(t.parse_root("kiln/v1/roots/x"), None);
}

/// Upload markers written by this release; later releases must keep decoding them.
#[test]
fn upload_v1_fixture_still_decodes() {
    let marker = Upload::V1 {
        sha256: [0xab; 32],
        started_ms: 1_700_000_000_000,
        chunks: 3,
    };
    let bytes = postcard::to_stdvec(&marker).unwrap();
    let mut fixture = vec![0];
    fixture.extend([0xab; 32]);
    fixture.extend([128, 208, 149, 255, 188, 49, 3]);
    assert_eq!(bytes, fixture);
    assert_eq!(postcard::from_bytes::<Upload>(&fixture).unwrap(), marker);
}

/// The desired state as kiln signed it before mirrors: the same fields, no more.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct DesiredBeforeMirrors {
    fleet: String,
    scope: Scope,
    serial: u64,
    issued_ms: u64,
    expires_ms: u64,
    modules: Vec<DesiredModule>,
}

#[test]
fn mirrors_travel_at_the_end_of_the_body_and_both_kinds_of_kilnd_read_both_kinds_of_state() {
    let plain = desired();
    let old = DesiredBeforeMirrors {
        fleet: plain.fleet.clone(),
        scope: plain.scope.clone(),
        serial: plain.serial,
        issued_ms: plain.issued_ms,
        expires_ms: plain.expires_ms,
        modules: plain.modules.clone(),
    };
    // Without mirrors the body is byte for byte what an older kiln signed.
    let body = postcard::to_stdvec(&plain).unwrap();
    assert_eq!(body, postcard::to_stdvec(&old).unwrap());
    assert_eq!(postcard::from_bytes::<Desired>(&body).unwrap(), plain);
    // With them, this kilnd reads them, and an older one reads the rest.
    let mirrored = Desired {
        mirrors: vec!["https://m.lan/fleet".into(), "http://10.0.0.2".into()],
        ..desired()
    };
    let body = postcard::to_stdvec(&mirrored).unwrap();
    assert_eq!(postcard::from_bytes::<Desired>(&body).unwrap(), mirrored);
    assert_eq!(
        postcard::from_bytes::<DesiredBeforeMirrors>(&body).unwrap(),
        old
    );
    // A signed state with mirrors opens with them.
    let key = SecretKey::generate().unwrap();
    let (root, _) = root_for(&[&key], 1);
    let signed = SignedDesired::sign(&mirrored, &[&key]);
    assert_eq!(SignedDesired::open(&signed, &root).unwrap(), mirrored);
}
