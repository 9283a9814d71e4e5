//! Hostile inputs for every decoder that `fuzz/` fuzzes, on stable: truncations, huge
//! declared lengths, unknown tags, forged seqs. Each must end in a clean `Err` (or a
//! bounded result), never a panic, an abort or a large allocation. A crash the fuzzer
//! finds becomes a test here, named after what it broke, with its exact bytes.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Cursor;

use kiln_protocol::artifact::{self, ArtifactError, Envelope, MAGIC};
use kiln_protocol::fleet::{Event, Reported, SignedDesired, Status};
use kiln_protocol::keys::{SecretKey, TrustedKeys};
use kiln_protocol::manifest::Manifest;
use kiln_protocol::telemetry::{self, Batch, Dropped, Tracker, MAX_RANGES, MAX_STREAMS};
use kiln_protocol::transfer::{self, decode, sha256, Chunk, ChunkList, Codec, Transfer};
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
    // V2, body of 2^40 bytes declared, then almost nothing.
    let mut forged = vec![1];
    forged.extend(varint(1 << 40));
    forged.extend_from_slice(&[1, 2, 3]);
    let err = SignedDesired::open(&forged, &trust()).unwrap_err();
    assert!(err.starts_with("malformed desired state"), "{err}");
    assert!(SignedDesired::peek(&forged).is_err());
    for cut in truncations(&[1, 1, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 64]) {
        assert!(SignedDesired::open(cut, &trust()).is_err());
    }
}

#[test]
fn desired_state_signature_of_the_wrong_length_is_refused_not_sliced() {
    let key = key();
    let mut forged = vec![1, 1, 0x55];
    forged.extend_from_slice(&key.public().id().0);
    forged.extend(varint(3));
    forged.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        SignedDesired::open(&forged, &trust()).unwrap_err(),
        "desired state has a malformed signature"
    );
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

// telemetry

#[test]
fn telemetry_batch_with_a_huge_record_count_or_over_the_limit_is_refused() {
    let mut forged = vec![0, 1, b'd', 1, 1];
    forged.extend(varint(1 << 62));
    forged.extend_from_slice(&[0; 8]);
    assert!(Batch::decode(&forged)
        .unwrap_err()
        .starts_with("not a telemetry batch"));
    assert!(Batch::decode(&vec![0; telemetry::MAX_BATCH + 1])
        .unwrap_err()
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
