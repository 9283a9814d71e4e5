use super::*;
use kiln_protocol::fleet::{seal_report, DeviceFacts, Status, StatusV2, DEFAULT_PREFIX};
use kiln_protocol::keys::SecretKey;
use kiln_protocol::telemetry::{BatchV1, Record};
use kiln_protocol::trust::Role;

fn fleet(limits: Limits) -> (Fleet, SecretKey) {
    let release = SecretKey::generate().unwrap();
    let root = Root {
        fleet: "acme".into(),
        version: 1,
        issued_ms: 0,
        root: Role::new(&[release.public()], 1),
        release: Role::new(&[release.public()], 1),
        registry: None,
        expires_ms: None,
    };
    let topics = Topics::new(DEFAULT_PREFIX);
    (
        Fleet::new(topics, root, Registry::default(), limits),
        release,
    )
}

fn status(device: &str, key: &SecretKey) -> (String, Vec<u8>) {
    let topic = Topics::new(DEFAULT_PREFIX).status(device);
    let s = Status::V2(StatusV2 {
        device: device.into(),
        online: true,
        facts: Some(DeviceFacts {
            triple: "aarch64-unknown-linux-gnu".into(),
            cpu_features: vec![],
            kilnd: "0.1.0".into(),
            wasmer: "7".into(),
            kiln_abi: 1,
            groups: vec!["lab".into()],
            boot_id: 1,
        }),
        trust: None,
    });
    let bytes = seal_report(&s, &topic, key);
    (topic, bytes)
}

fn batch(device: &str, seq: u64, records: Vec<Record>) -> (String, Vec<u8>) {
    let topic = Topics::new(DEFAULT_PREFIX).telemetry(device);
    let bytes = Batch::encode(&BatchV1 {
        device: device.into(),
        boot_id: 7,
        seq,
        records,
    });
    (topic, bytes)
}

fn telemetry(at_ms: u64, stream: &str, data: &str) -> Record {
    Record {
        at_ms,
        module: Some("filter".into()),
        body: Body::Telemetry {
            stream: stream.into(),
            data: data.as_bytes().to_vec(),
        },
    }
}

#[test]
fn a_signed_status_fills_the_row_and_a_forged_one_is_kept_as_invalid() {
    let (mut f, _) = fleet(Limits::default());
    let key = SecretKey::generate().unwrap();
    let (topic, bytes) = status("pi-01", &key);
    assert_eq!(
        f.on_message(&topic, &bytes, 5),
        Changed::Device("pi-01".into())
    );
    let row = f.summary("pi-01").unwrap();
    assert_eq!(row["target"], "aarch64-unknown-linux-gnu");
    assert_eq!(row["online"], true);
    assert_eq!(row["identity"], "unenrolled");
    // Signed for another device's topic: refused, and said.
    let (_, other) = status("pi-02", &key);
    f.on_message(&topic, &other, 6);
    let row = f.summary("pi-01").unwrap();
    assert_eq!(row["invalid_count"], 1);
    assert!(row["invalid"]["why"]
        .as_str()
        .unwrap()
        .starts_with("status:"));
    // Garbage too; a topic naming no device is ignored, not a row.
    f.on_message(&topic, b"\xff\x00<script>", 7);
    assert_eq!(f.summary("pi-01").unwrap()["invalid_count"], 2);
    f.on_message("kiln/v1/devices/bad name/status", &bytes, 8);
    assert_eq!(f.device_names(), ["pi-01"]);
}

#[test]
fn numeric_telemetry_becomes_series_and_text_stays_text() {
    let (mut f, _) = fleet(Limits {
        points: 3,
        ..Limits::default()
    });
    let records = (0..5)
        .map(|i| {
            telemetry(
                i,
                "filtered",
                &format!("{{\"filtered\": {i}.5, \"raw\": \"x\"}}"),
            )
        })
        .chain([
            telemetry(6, "level", "42"),
            telemetry(7, "<img src=x onerror=alert(1)>", "hello"),
        ])
        .collect();
    let (topic, bytes) = batch("pi-01", 0, records);
    f.on_message(&topic, &bytes, 10);
    let d = f.detail("pi-01").unwrap();
    let filtered = &d["series"]["filter/filtered.filtered"]["points"];
    assert_eq!(filtered.as_array().unwrap().len(), 3, "bounded to 3 points");
    assert_eq!(filtered[2], json!([4, 4.5]));
    assert_eq!(d["series"]["filter/level"]["points"][0], json!([6, 42.0]));
    // Kept as data; the page puts it in text nodes only.
    assert_eq!(
        d["series"]["filter/<img src=x onerror=alert(1)>"]["text"],
        "hello"
    );
}

#[test]
fn gaps_duplicates_and_foreign_batches_are_counted_not_hidden() {
    let (mut f, _) = fleet(Limits::default());
    let (topic, b0) = batch("pi-01", 0, vec![telemetry(1, "s", "1")]);
    let (_, b3) = batch("pi-01", 3, vec![telemetry(2, "s", "2")]);
    f.on_message(&topic, &b0, 1);
    f.on_message(&topic, &b3, 2);
    f.on_message(&topic, &b3, 3);
    let t = &f.summary("pi-01").unwrap()["telemetry"];
    assert_eq!(
        (
            t["batches"].as_u64(),
            t["gaps"].as_u64(),
            t["duplicates"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(t["last_gap"], "batches 1..=2 missing");
    let (_, foreign) = batch("pi-02", 4, vec![]);
    f.on_message(&topic, &foreign, 4);
    assert!(f.summary("pi-01").unwrap()["invalid"]["why"]
        .as_str()
        .unwrap()
        .contains("a batch from `pi-02`"));
}

#[test]
fn memory_is_bounded_by_the_limits_whatever_devices_send() {
    let (mut f, _) = fleet(Limits {
        points: 4,
        history: 4,
        series: 2,
        devices: 3,
    });
    for i in 0..10 {
        let records = (0..10)
            .map(|s| telemetry(i, &format!("s{s}"), "1"))
            .collect();
        let (topic, bytes) = batch(&format!("d{i}"), 0, records);
        f.on_message(&topic, &bytes, i);
    }
    assert_eq!(f.device_names().len(), 3);
    assert_eq!(f.ignored, 7);
    let d = f.detail("d0").unwrap();
    assert_eq!(d["series"].as_object().unwrap().len(), 2);
}
