//! Hostile inputs for every decoder that `fuzz/` fuzzes, on stable: truncations, huge
//! declared lengths, unknown tags, forged seqs. Each must end in a clean `Err` (or a
//! bounded result), never a panic, an abort or a large allocation. A crash the fuzzer
//! finds becomes a test here, named after what it broke, with its exact bytes.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Cursor;

use kiln_protocol::artifact::{self, ArtifactError, Envelope, MAGIC};
use kiln_protocol::fleet::{
    seal_report, Desired, DesiredModule, Event, ModuleLimits, Reported, Scope, SignedDesired,
    Status, StatusV1, MAX_DESIRED,
};
use kiln_protocol::keys::{SecretKey, TrustedKeys};
use kiln_protocol::manifest::Manifest;
use kiln_protocol::telemetry::{self, Batch, Dropped, Tracker, MAX_RANGES, MAX_STREAMS};
use kiln_protocol::transfer::{self, decode, sha256, Chunk, ChunkList, Codec, Transfer};
use kiln_protocol::trust::{
    sign_all, Chain, Role, Root, SignedRegistry, SignedRoot, MAX_REGISTRY, MAX_ROLE_KEYS, MAX_ROOT,
};
use kiln_protocol::worker::{read_frame, FromWorker, ToWorker, MAX_FRAME};

/// The fuzz targets' fixed key (fuzz/src/lib.rs).
fn key() -> SecretKey {
    SecretKey::from_text(
        "kiln-secret-key-v1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .unwrap()
}

fn trust() -> TrustedKeys {
    TrustedKeys::new(vec![key().public()])
}

/// The fuzz targets' fixed root (fuzz/src/lib.rs): fleet `fuzz`, v1, `key()` holds the
/// root and release roles, 1 of 1.
fn root() -> Root {
    let role = Role::new(&[key().public()], 1);
    Root {
        fleet: "fuzz".into(),
        version: 1,
        issued_ms: 1_700_000_000_000,
        root: role.clone(),
        release: role,
        registry: None,
        expires_ms: None,
    }
}

fn root_bytes() -> Vec<u8> {
    root().sign(&[&key()]).unwrap()
}

/// A desired state for the fuzz fleet, with `config` bytes of config.
fn desired(config: usize) -> Desired {
    Desired {
        fleet: "fuzz".into(),
        scope: Scope::Device("d".into()),
        serial: 1,
        issued_ms: 1_700_000_000_000,
        expires_ms: 1_800_000_000_000,
        mirrors: Vec::new(),
        modules: vec![DesiredModule {
            name: "m".into(),
            version: 1,
            artifacts: vec![],
            config: vec![0x5a; config],
            limits: ModuleLimits::default(),
            allow_downgrade: false,
            health_window_ms: 0,
        }],
    }
}

/// A postcard `Vec<u8>`: its length, then the bytes.
fn bytes(b: &[u8]) -> Vec<u8> {
    [varint(b.len() as u64), b.to_vec()].concat()
}

/// A postcard `String`.
fn string(s: &str) -> Vec<u8> {
    bytes(s.as_bytes())
}

/// A postcard `Vec<Sig>` of one signature: `key_id`, then `signature` as a `Vec<u8>`.
fn one_sig(key_id: [u8; 8], signature: &[u8]) -> Vec<u8> {
    [vec![1], key_id.to_vec(), bytes(signature)].concat()
}

/// A postcard varint, as a hostile peer would write a length.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Every prefix of `bytes`, shorter than the whole.
fn truncations(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    (0..bytes.len()).map(move |n| &bytes[..n])
}

// artifact

#[test]
fn artifact_with_a_manifest_length_over_the_limit_is_refused_before_reading_it() {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.resize(88, 0);
    assert_eq!(
        Envelope::parse(&header).unwrap_err(),
        ArtifactError::ManifestTooLarge(u32::MAX)
    );
    // Within the limit, but longer than the file.
    header[12..16].copy_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(matches!(
        Envelope::parse(&header),
        Err(ArtifactError::Truncated {
            part: "manifest",
            ..
        })
    ));
}

#[test]
fn artifact_truncated_anywhere_or_signed_by_a_stranger_is_refused() {
    let payload = [0x5a; 64];
    let sealed = artifact::seal(&Manifest::example(&payload), &payload, &key()).unwrap();
    for cut in truncations(&sealed) {
        assert!(Envelope::parse(cut)
            .and_then(|e| e.verify(&trust()))
            .is_err());
    }
    let stranger = TrustedKeys::new(vec![SecretKey::generate().unwrap().public()]);
    assert!(matches!(
        Envelope::parse(&sealed).unwrap().verify(&stranger),
        Err(ArtifactError::UntrustedSigner { .. })
    ));
}

#[test]
fn artifact_manifest_with_huge_declared_vec_lengths_does_not_decode() {
    let payload = [1u8; 8];
    let sealed = artifact::seal(&Manifest::example(&payload), &payload, &key()).unwrap();
    // The manifest starts with the name: declare it 2^62 bytes long.
    let mut forged = sealed[..88].to_vec();
    forged.extend(varint(1 << 62));
    forged.extend_from_slice(b"abc");
    let manifest_len = (forged.len() - 88) as u32;
    forged[12..16].copy_from_slice(&manifest_len.to_le_bytes());
    let envelope = Envelope::parse(&forged).unwrap();
    assert!(envelope.manifest_unverified().is_err());
    assert!(envelope.verify(&trust()).is_err());
}

// fleet::SignedDesired

#[test]
fn desired_state_with_huge_body_and_signature_lengths_is_malformed() {
    // V3, body of 2^40 bytes declared, then almost nothing.
    let mut forged = vec![2];
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[1, 2, 3]);
    let err = SignedDesired::open(&forged, &root())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("malformed desired state"), "{err}");
    assert!(SignedDesired::peek(&forged).is_err());
    assert!(SignedDesired::signers(&forged).is_err());
    assert!(SignedDesired::add_signature(&forged, &key()).is_err());
    // A one-byte body, then one signature declared 2^40 bytes long.
    let mut forged = vec![2, 1, 0x55, 1];
    forged.extend_from_slice(&key().public().id().0);
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[1, 2, 3]);
    let err = SignedDesired::open(&forged, &root())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("malformed desired state"), "{err}");
    assert!(SignedDesired::peek(&forged).is_err());
    // A valid state cut anywhere.
    let signed = SignedDesired::sign(&desired(16), &[&key()]);
    assert!(SignedDesired::open(&signed, &root()).is_ok());
    for cut in truncations(&signed) {
        assert!(SignedDesired::open(cut, &root()).is_err());
    }
}

#[test]
fn desired_state_signature_of_the_wrong_length_does_not_count() {
    // The release key's id, a signature of every length but 64: not sliced, not a
    // panic, just no valid signature, so the threshold is not met.
    let body = postcard::to_stdvec(&desired(4)).unwrap();
    for len in [0, 3, 63, 65, 1000] {
        let mut forged = vec![2];
        forged.extend(bytes(&body));
        forged.extend(one_sig(key().public().id().0, &vec![7; len]));
        let err = SignedDesired::open(&forged, &root())
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 of the 1 signatures"), "{len}: {err}");
        assert!(err.contains("does not verify"), "{len}: {err}");
        // Unchecked, it still shows.
        assert_eq!(SignedDesired::peek(&forged).unwrap(), desired(4));
    }
}

#[test]
fn desired_state_declaring_two_to_the_40_signatures_is_malformed() {
    let body = postcard::to_stdvec(&desired(4)).unwrap();
    let mut forged = vec![2];
    forged.extend(bytes(&body));
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&key().public().id().0);
    forged.extend(bytes(&[0; 64]));
    let err = SignedDesired::open(&forged, &root())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("malformed desired state"), "{err}");
    assert!(SignedDesired::signers(&forged).is_err());
}

#[test]
fn desired_state_over_max_desired_is_refused_before_decoding() {
    // A validly signed state of exactly MAX_DESIRED bytes opens; one byte more is
    // refused by its size, not by what a decoder made of it.
    let len = |config: usize| SignedDesired::sign(&desired(config), &[&key()]).len();
    let config = 100_000 + MAX_DESIRED - len(100_000);
    let at_limit = SignedDesired::sign(&desired(config), &[&key()]);
    assert_eq!(at_limit.len(), MAX_DESIRED);
    assert_eq!(
        SignedDesired::open(&at_limit, &root()).unwrap(),
        desired(config)
    );
    let over = SignedDesired::sign(&desired(config + 1), &[&key()]);
    assert_eq!(over.len(), MAX_DESIRED + 1);
    let limit = kiln_protocol::trust::OpenError::Malformed(format!(
        "desired state is {} bytes (limit {MAX_DESIRED})",
        over.len()
    ));
    assert_eq!(
        SignedDesired::open(&over, &root()).unwrap_err(),
        limit.to_string()
    );
    assert_eq!(SignedDesired::peek(&over).unwrap_err(), limit);
    assert_eq!(SignedDesired::signers(&over).unwrap_err(), limit);
    assert_eq!(
        SignedDesired::add_signature(&over, &key()).unwrap_err(),
        limit
    );
    // Bytes that would not decode at all get the same answer.
    let junk = vec![0xff; MAX_DESIRED + 1];
    assert!(SignedDesired::open(&junk, &root())
        .unwrap_err()
        .to_string()
        .contains("limit"));
}

// trust: root documents and the device registry

#[test]
fn root_document_declaring_a_huge_body_is_malformed_and_changes_nothing() {
    // V1, a body of 2^40 bytes declared, then three.
    let mut forged = vec![0];
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[1, 2, 3]);
    let err = SignedRoot::open_initial(&forged).unwrap_err();
    assert!(err.starts_with("malformed root document"), "{err}");
    assert!(SignedRoot::peek(&forged).is_err());
    assert!(SignedRoot::open_next(&forged, &root()).is_err());
    let start = Chain::new(root_bytes()).unwrap();
    let mut chain = start.clone();
    assert!(chain.advance(&forged).is_err());
    let (taken, errors) = chain.follow([forged.as_slice()]);
    assert!(taken.is_empty());
    assert_eq!(errors.len(), 1);
    assert_eq!(chain, start);
    // The fixed root cut anywhere, and a document over the limit.
    for cut in truncations(&root_bytes()) {
        assert!(SignedRoot::open_initial(cut).is_err());
        assert!(SignedRoot::peek(cut).is_err());
    }
    let err = SignedRoot::peek(&vec![0; MAX_ROOT + 1]).unwrap_err();
    assert!(err.contains("limit"), "{err}");
}

/// The start of a root body for fleet `fuzz`, v1: fleet, version, issued_ms.
fn root_body_head() -> Vec<u8> {
    [string("fuzz"), varint(1), varint(1_700_000_000_000)].concat()
}

#[test]
fn root_whose_role_declares_two_to_the_40_keys_is_malformed() {
    let mut body = root_body_head();
    body.extend(varint(1 << 40));
    body.extend_from_slice(&key().public().to_bytes());
    body.extend(varint(1));
    let mut forged = vec![0];
    forged.extend(bytes(&body));
    forged.extend(one_sig(key().public().id().0, &[0; 64]));
    let err = SignedRoot::open_initial(&forged).unwrap_err();
    assert!(err.starts_with("malformed root document body"), "{err}");
    assert!(SignedRoot::peek(&forged).is_err());
    assert!(Chain::new(root_bytes()).unwrap().advance(&forged).is_err());
}

#[test]
fn root_whose_role_names_more_than_max_role_keys_is_invalid() {
    // Well formed, but one key too many (the same key: the count is checked first).
    let mut doc = root();
    doc.root.keys = vec![key().public().to_bytes(); MAX_ROLE_KEYS + 1];
    assert!(doc.sign(&[&key()]).is_err(), "sign checks it too");
    let body = postcard::to_stdvec(&doc).unwrap();
    let forged = postcard::to_stdvec(&SignedRoot::V1 {
        body,
        signatures: vec![],
    })
    .unwrap();
    let err = SignedRoot::open_initial(&forged).unwrap_err();
    assert!(err.contains("names 17 keys"), "{err}");
}

#[test]
fn root_declaring_two_to_the_40_signatures_is_malformed() {
    let body = postcard::to_stdvec(&root()).unwrap();
    let mut forged = vec![0];
    forged.extend(bytes(&body));
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&key().public().id().0);
    forged.extend(bytes(&[0; 64]));
    let err = SignedRoot::open_initial(&forged).unwrap_err();
    assert!(err.starts_with("malformed root document"), "{err}");
    assert!(SignedRoot::peek(&forged).is_err());
    // A signature of the wrong length by the root key does not count.
    let mut forged = vec![0];
    forged.extend(bytes(&body));
    forged.extend(one_sig(key().public().id().0, &[1, 2, 3]));
    let err = SignedRoot::open_initial(&forged).unwrap_err();
    assert!(err.contains("0 of the 1 signatures"), "{err}");
}

#[test]
fn registry_with_huge_declared_lengths_is_malformed() {
    // A body of 2^40 bytes; 2^40 signatures; a body declaring 2^40 devices.
    let mut huge_body = vec![0];
    huge_body.extend(varint(1 << 40));
    huge_body.extend_from_slice(&[1, 2, 3]);
    let mut huge_sigs = vec![0];
    huge_sigs.extend(bytes(b"x"));
    huge_sigs.extend(varint(1 << 40));
    huge_sigs.extend_from_slice(&[0; 8]);
    for forged in [huge_body, huge_sigs] {
        let err = SignedRegistry::open(&forged, |_| None, &root()).unwrap_err();
        assert!(err.starts_with("malformed registry"), "{err}");
    }
    let err = SignedRegistry::open(&vec![0; MAX_REGISTRY + 1], |_| None, &root()).unwrap_err();
    assert!(err.contains("limit"), "{err}");
    // Signed by the release key, so the body is decoded: 2^40 devices declared. The
    // signature is over `CONTEXT || body` (trust.rs).
    let mut body = string("fuzz");
    body.extend(varint(1));
    body.extend(varint(1 << 40));
    body.extend(string("d"));
    let signatures = sign_all(b"kiln registry v1\0", &body, &[&key()]);
    let forged = postcard::to_stdvec(&SignedRegistry::V1 {
        body: body.clone(),
        signatures,
    })
    .unwrap();
    let err = SignedRegistry::open(&forged, |_| None, &root()).unwrap_err();
    assert!(err.starts_with("malformed registry body"), "{err}");
    // A signature by the same key over another context does not count, and then the
    // body is never decoded.
    let signatures = sign_all(b"kiln root v1\0", &body, &[&key()]);
    let forged = postcard::to_stdvec(&SignedRegistry::V1 { body, signatures }).unwrap();
    let err = SignedRegistry::open(&forged, |_| None, &root()).unwrap_err();
    assert!(err.contains("0 of the 1 signatures"), "{err}");
}

/// fuzz/artifacts/root/crash-972daf43b0bf5c2bf29e5fdcb1102041595fe811: root
/// v18446744073709551615 (`u64::MAX`) of fleet `fuzz`, signed by `key()` (the `root`
/// target's seed `last-version`).
const ROOT_AT_THE_LAST_VERSION: &str = concat!(
    "005a0466757a7affffffffffffffffff0180d095ffbc310103a107bff3ce10be",
    "1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8010103a107bff3ce",
    "10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b801000156475a",
    "a75463474c40d3af34d1e99363a6828856779e2438e968316060324318161232",
    "6ebcd6d87ce4c09ef1c29f536f6aafebd93664bf1b4a7ebd37ab90ba5e3c6b4b",
    "93be2406b20b",
);

#[test]
fn root_at_the_last_version_offered_another_root_does_not_overflow() {
    // A device (or `kiln root`) whose chain is at the last version, offered any
    // self-signed root of its fleet: `SignedRoot::open_next` computes
    // `current.version + 1`, which overflows (a panic with overflow checks on, as in
    // debug builds and the fuzz build; a wrap to 0 without). It must be a refusal.
    let last = hex::decode(ROOT_AT_THE_LAST_VERSION).unwrap();
    let mut chain = Chain::new(last.clone()).unwrap();
    assert_eq!(chain.root().version, u64::MAX);
    let err = chain.advance(&root_bytes()).unwrap_err();
    assert!(err.contains("does not follow"), "{err}");
    assert_eq!(chain.bytes(), last.as_slice());
    assert!(SignedRoot::open_next(&root_bytes(), chain.root()).is_err());
}

// fleet::Chunk, Status, Reported, Event

#[test]
fn chunk_declaring_more_data_than_it_carries_is_an_error() {
    let mut forged = vec![0];
    forged.extend_from_slice(&[0xab; 32]);
    forged.extend(varint(7));
    forged.extend(varint(u64::from(u32::MAX)));
    forged.extend_from_slice(&[0; 16]);
    assert!(postcard::from_bytes::<Chunk>(&forged).is_err());
    // An index that does not fit a u32.
    let mut forged = vec![0];
    forged.extend_from_slice(&[0xab; 32]);
    forged.extend(varint(1 << 40));
    forged.push(0);
    assert!(postcard::from_bytes::<Chunk>(&forged).is_err());
}

#[test]
fn status_with_huge_string_and_list_lengths_is_an_error() {
    let mut forged = vec![0];
    forged.extend(varint(u64::MAX));
    assert!(postcard::from_bytes::<Status>(&forged).is_err());
    // device "d", online, facts present, triple "", a list of 2^60 cpu features.
    let mut forged = vec![0, 1, b'd', 1, 1, 0];
    forged.extend(varint(1 << 60));
    forged.extend_from_slice(b"\x01a");
    assert!(postcard::from_bytes::<Status>(&forged).is_err());
    // An unknown version tag.
    assert!(postcard::from_bytes::<Status>(&[9, 1, b'd', 1, 0]).is_err());
}

#[test]
fn reported_with_a_huge_module_count_is_an_error() {
    let mut forged = vec![0, 7];
    forged.extend(varint(u64::from(u32::MAX)));
    forged.extend_from_slice(&[1, b'm']);
    assert!(postcard::from_bytes::<Reported>(&forged).is_err());
    // A module state past the last variant.
    let mut forged = vec![0, 7, 1, 1, b'm', 3];
    forged.extend_from_slice(&[0; 32]);
    forged.extend_from_slice(&[9, 0]);
    assert!(postcard::from_bytes::<Reported>(&forged).is_err());
}

#[test]
fn event_with_a_bad_reason_is_an_error() {
    // V1, at_ms 1, module "m", version 1, RolledBack, a reason of 2^50 bytes.
    let mut forged = vec![0, 1, 1, b'm', 1, 5];
    forged.extend(varint(1 << 50));
    forged.extend_from_slice(b"why");
    assert!(postcard::from_bytes::<Event>(&forged).is_err());
    // The same with a 3-byte reason that is not UTF-8.
    let forged = [0, 1, 1, b'm', 1, 5, 3, 0xff, 0xfe, 0xfd];
    assert!(postcard::from_bytes::<Event>(&forged).is_err());
}

#[test]
fn signed_device_message_whose_body_declares_a_huge_length_is_malformed() {
    // Status::Signed(DeviceSigned { body: 2^40 bytes declared, .. }).
    let mut forged = vec![1];
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[0; 40]);
    let topic = "kiln/v1/devices/d/status";
    let err = Status::open(topic, &forged).unwrap_err().to_string();
    assert!(err.starts_with("malformed"), "{err}");
    // The same for Reported and Event, whose Signed variant is tag 1 too.
    assert!(Reported::open("kiln/v1/devices/d/reported", &forged).is_err());
    assert!(Event::open("kiln/v1/devices/d/events", &forged).is_err());
    // A body that decodes, a key, and a signature declared 2^40 bytes long.
    let mut forged = vec![1];
    forged.extend(bytes(&[0, 1, b'd', 0, 0]));
    forged.extend_from_slice(&key().public().to_bytes());
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[0; 8]);
    assert!(Status::open(topic, &forged)
        .unwrap_err()
        .to_string()
        .starts_with("malformed"));
    // A validly signed message whose signed body declares 2^40 bytes: the
    // signature is over `CONTEXT || topic || 0 || body` (fleet.rs).
    let mut body = vec![0];
    body.extend(varint(1 << 40));
    body.extend_from_slice(b"dev");
    let message = [
        b"kiln status v1\0".as_slice(),
        topic.as_bytes(),
        &[0],
        &body,
    ]
    .concat();
    let mut forged = vec![1];
    forged.extend(bytes(&body));
    forged.extend_from_slice(&key().public().to_bytes());
    forged.extend(bytes(&key().sign(&message)));
    let err = Status::open(topic, &forged).unwrap_err().to_string();
    assert!(err.starts_with("malformed signed body"), "{err}");
    // What seal_report makes opens, on its own topic only, and cut anywhere it fails.
    let status = Status::V1(StatusV1 {
        device: "d".into(),
        online: true,
        facts: None,
    });
    let sealed = seal_report(&status, topic, &key());
    let (opened, signer) = Status::open(topic, &sealed).unwrap();
    assert_eq!(
        (opened.device.as_str(), signer),
        ("d", Some(key().public()))
    );
    assert!(Status::open("kiln/v1/devices/e/status", &sealed).is_err());
    for cut in truncations(&sealed) {
        assert!(Status::open(topic, cut).is_err());
    }
}

// telemetry

#[test]
fn telemetry_batch_with_a_huge_record_count_or_over_the_limit_is_refused() {
    let mut forged = vec![0, 1, b'd', 1, 1];
    forged.extend(varint(1 << 62));
    forged.extend_from_slice(&[0; 8]);
    assert!(Batch::decode(&forged)
        .unwrap_err()
        .to_string()
        .starts_with("not a telemetry batch"));
    assert!(Batch::decode(&vec![0; telemetry::MAX_BATCH + 1])
        .unwrap_err()
        .to_string()
        .contains("limit"));
    assert!(Batch::decode(&[]).is_err());
}

#[test]
fn telemetry_drop_report_over_every_seq_does_not_allocate_per_seq() {
    let dropped = Dropped {
        boot_id: 1,
        first_seq: 0,
        last_seq: u64::MAX,
        batches: u64::MAX,
        records: u64::MAX,
    };
    let mut tracker = Tracker::default();
    tracker.batch("d", 1, 1 << 63, 1);
    tracker.dropped("d", &dropped);
    tracker.batch("d", 1, 5, 1);
    let account = &tracker.accounts()[0];
    assert_eq!((account.first_seq, account.last_seq), (0, u64::MAX));
    assert!(account.unexplained.is_empty());
    // The JSON of such a record is plain numbers too.
    let record = telemetry::Record {
        at_ms: u64::MAX,
        module: None,
        body: telemetry::Body::Dropped(dropped),
    };
    let encoded = Batch::encode(&telemetry::BatchV1 {
        device: "d".into(),
        boot_id: 1,
        seq: u64::MAX,
        records: vec![record],
    });
    assert_eq!(Batch::decode(&encoded).unwrap().seq, u64::MAX);
}

// tracker

#[test]
fn tracker_fed_alternating_seqs_and_fresh_boots_stays_within_its_caps() {
    let mut tracker = Tracker::default();
    for n in 0..(4 * MAX_RANGES as u64) {
        tracker.batch("d", 0, n * 2 + (1 << 62), 1);
    }
    for boot in 1..=(2 * MAX_STREAMS as u64) {
        tracker.batch("d", boot, u64::MAX, 1);
    }
    let accounts = tracker.accounts();
    assert_eq!(accounts.len(), MAX_STREAMS);
    assert!(tracker.forgotten().streams >= MAX_STREAMS as u64);
    assert!(tracker.forgotten().unexplained > 0, "boot 0's holes");
}

// worker frames

#[test]
fn worker_frame_declaring_over_max_frame_is_refused_before_allocating() {
    for len in [MAX_FRAME + 1, u32::MAX] {
        let mut input = Cursor::new(len.to_le_bytes().to_vec());
        let err = read_frame::<FromWorker>(&mut input).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }
}

#[test]
fn worker_frame_declaring_max_frame_and_sending_little_is_an_eof_error() {
    let mut bytes = MAX_FRAME.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0, 3, 0]);
    let err = read_frame::<FromWorker>(&mut Cursor::new(bytes)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("ends after 3"), "{err}");
}

#[test]
fn worker_frames_truncated_or_with_bad_tags_are_errors() {
    // The stream may end between frames, not inside a length prefix.
    assert!(read_frame::<ToWorker>(&mut Cursor::new(vec![]))
        .unwrap()
        .is_none());
    for cut in [&[1u8][..], &[1, 0], &[1, 0, 0]] {
        let err = read_frame::<ToWorker>(&mut Cursor::new(cut.to_vec())).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{cut:?}");
    }
    // Message { topic: 2^60 bytes } in a frame of 12.
    let mut body = vec![0, 2];
    body.extend(varint(1 << 60));
    body.resize(12, 0);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    assert!(read_frame::<ToWorker>(&mut Cursor::new(frame)).is_err());
    // An unknown request and an unknown reply.
    assert!(read_frame::<ToWorker>(&mut Cursor::new(vec![2, 0, 0, 0, 0, 9])).is_err());
    assert!(read_frame::<FromWorker>(&mut Cursor::new(vec![2, 0, 0, 0, 0, 9])).is_err());
}

// transfer: chunk lists and streams

#[test]
fn chunk_list_declaring_a_huge_count_is_refused_without_allocating_it() {
    // V1 { sha256, len, chunk_size, chunks: 2^40 hashes declared }, then nothing.
    let mut forged = vec![0];
    forged.extend_from_slice(&[7; 32]);
    forged.extend(varint(1 << 30));
    forged.extend(varint(4096));
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[1, 2, 3]);
    let transfer = Transfer {
        codec: Codec::Zstd,
        sha256: [7; 32],
        len: 1 << 30,
        chunk_size: 4096,
        list: sha256(&forged),
    };
    assert!(ChunkList::open(&forged, &transfer).is_err());
    assert!(ChunkList::peek(&forged).is_err());
    for cut in truncations(&forged) {
        assert!(ChunkList::peek(cut).is_err());
    }
}

#[test]
fn a_stream_is_decoded_only_to_its_signed_length() {
    let artifact = vec![5u8; 10_000];
    let stream = transfer::compress(&artifact);
    // Longer or shorter than the frame says, or beyond the largest artifact.
    assert!(decode(Codec::Zstd, &stream, None, 9_999).is_err());
    assert!(decode(Codec::Zstd, &stream, None, 10_001).is_err());
    assert!(decode(Codec::Zstd, &stream, None, u64::MAX).is_err());
    assert!(decode(Codec::Raw, &artifact, None, u64::MAX).is_err());
    // A patch without its base; cut streams; junk.
    assert!(decode(Codec::ZstdPatch, &stream, None, 10_000).is_err());
    for cut in truncations(&stream) {
        assert!(decode(Codec::Zstd, cut, None, 10_000).is_err());
    }
    assert!(decode(Codec::Zstd, b"\x28\xb5\x2f\xfd junk", None, 10_000).is_err());
    assert_eq!(
        decode(Codec::Zstd, &stream, None, 10_000).unwrap(),
        artifact
    );
}

/// fuzz/artifacts/cohort/crash-d162c4995675338b17a478a7fdbfb616d5c8bc9f: a `kilnd`
/// condition whose pre-release held form feeds and spaces parsed, but showed as text
/// that parsed to another condition (the record keeps conditions as text). A
/// pre-release is now semver's: dot-separated identifiers of `[0-9A-Za-z-]`.
#[test]
fn a_kilnd_condition_with_control_characters_in_its_pre_release_is_refused() {
    use kiln_protocol::rollout::cohort::Condition;
    let input: &[u8] = b"kilnd=2.05.4---\x0c\x0cki    +                \x0c\x0c\x0c\x0c\x0c\x0c\x0c---\x0c\x0cki         ---\x0c\x0cki              \x09";
    let text = std::str::from_utf8(input).unwrap();
    assert!(Condition::parse(text).is_err());
    // What the fuzz target holds every condition to.
    for text in ["kilnd=2.05.4---ki", "kilnd >= 0.9.0-rc.1+b", "tag=canary"] {
        let parsed = Condition::parse(text).unwrap();
        assert_eq!(Condition::parse(&parsed.to_string()), Ok(parsed), "{text}");
    }
}

#[test]
fn a_registry_part_declaring_2_pow_40_entries_is_refused_without_allocating_them() {
    // Part 0 declaring 2^40 entries, named by a head by its hash (so it is decoded).
    let mut forged = vec![0];
    forged.extend(varint(1 << 40));
    forged.extend(string("d"));
    let refs = [kiln_protocol::parts::PartRef {
        part: 0,
        entries: 1,
        sha256: kiln_protocol::transfer::sha256(&forged),
    }];
    let err = kiln_protocol::parts::join::<[u8; 32]>(
        &refs,
        |_| Some(forged.as_slice()),
        kiln_protocol::parts::MAX_PART,
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not decode"), "{err}");
}

/// A mirror's answer (`http_head`): a head that never ends, endless header lines, a
/// Content-Length beyond any bound, NULs and bare line feeds all end in a clean `Err`
/// or a wait, bounded by the 8 KiB head limit however many bytes arrive.
#[test]
fn hostile_mirror_answers_are_refused_within_the_head_bound() {
    use kiln_protocol::mirror::{parse_head, MAX_HEAD};
    let endless = [
        b"HTTP/1.1 200 OK\r\n".as_slice(),
        &vec![b'a'; 10 * MAX_HEAD],
    ]
    .concat();
    assert!(parse_head(&endless).is_err());
    let lines: Vec<u8> = (0..5000)
        .flat_map(|i| format!("X-{i}: y\r\n").into_bytes())
        .collect();
    let many = [b"HTTP/1.1 200 OK\r\n".as_slice(), &lines, b"\r\n"].concat();
    assert!(parse_head(&many).is_err());
    let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\n";
    let head = parse_head(huge).unwrap().unwrap();
    assert!(head.body_len(1 << 20, None).is_err());
    let longer = b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n";
    assert!(parse_head(longer).is_err());
    assert!(parse_head(b"HTTP/1.1 200 OK\r\nX: \0\r\n\r\n").is_err());
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\nContent-Length: 1\n\n").unwrap(),
        None
    );
    assert!(parse_head(b"\r\n\r\n").is_err());
}
