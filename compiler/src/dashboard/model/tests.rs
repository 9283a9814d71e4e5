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

#[test]
fn a_gated_rollout_shows_each_gates_signal_per_started_wave_against_its_control() {
    use crate::fleet::rollout::health::tests::roll_out;
    // d1 (wave 1) committed and passed; wave 2 (d2, d3) is being sent, so no device
    // is left waiting and wave 1's `x control` compares with its baseline.
    let good = rollout_json(&roll_out(0, 1.1));
    assert_eq!(good["cohort"], json!([]), "the whole group");
    let mut canaries = roll_out(0, 1.1);
    canaries.policy.cohort = vec!["tag=canary".into()];
    assert_eq!(rollout_json(&canaries)["cohort"], json!(["tag=canary"]));
    let gates = good["gates"].as_array().unwrap();
    assert_eq!(gates.len(), 2);
    assert_eq!(gates[0]["gate"], "traps <= 2x control");
    assert_eq!(gates[1]["gate"], "sensor.error_rate <= 1.5x baseline");
    let traps = gates[0]["waves"].as_array().unwrap();
    assert_eq!(traps.len(), 2, "both waves started: {traps:?}");
    let w1 = &traps[0];
    assert_eq!(w1["wave"], 1);
    assert_eq!(w1["wave_value"], json!({ "value": 0.0, "devices": 1 }));
    assert_eq!(w1["control"], json!({ "value": 0.0, "devices": 1 }));
    assert_eq!(w1["baseline"], json!({ "value": 0.0, "devices": 1 }));
    assert_eq!(w1["control_is_baseline"], true);
    // No traps anywhere: two traps' worth of the wave's 3000 calls.
    assert_eq!(w1["bound"], "2x control");
    let limit = w1["limit"].as_f64().unwrap();
    assert!((limit - 2.0 / 3000.0).abs() < 1e-12, "{limit}");
    assert_eq!((&w1["sample"], &w1["min"]), (&json!(1), &json!(1)));
    assert_eq!(
        (&w1["verdict"], &w1["now"]),
        (&json!("pass"), &json!("pass"))
    );
    assert_eq!(w1["line"], Value::Null);
    let metric = &gates[1]["waves"][0];
    assert_eq!(metric["wave_value"]["value"], 1.1);
    assert_eq!(metric["baseline"]["value"], 1.0);
    assert_eq!(metric["limit"], 1.5);
    assert_eq!(metric["verdict"], "pass");
    // Wave 2 is out but none of it committed yet: no data (its baseline is that of
    // its committed devices), not judged.
    let w2 = &traps[1];
    for cohort in ["wave_value", "control", "baseline"] {
        assert_eq!(w2[cohort]["devices"], 0, "{cohort}");
    }
    assert_eq!(
        (&w2["verdict"], &w2["now"]),
        (&json!("not yet judged"), &json!("wait"))
    );

    // Five traps a period halt wave 1 on the trap gate: the history's line keeps the
    // values it was judged on (d1 was given back, so it no longer counts in the
    // wave); the metric gate did not breach. Wave 2 never started.
    let halted = rollout_json(&roll_out(5, 1.0));
    let traps = halted["gates"][0]["waves"].as_array().unwrap();
    assert_eq!(traps.len(), 1);
    assert_eq!(traps[0]["verdict"], "breach");
    let line = traps[0]["line"].as_str().unwrap();
    assert!(
        line.starts_with("traps <= 2x control: 0.005 in the wave against 0 in the control"),
        "{line}"
    );
    assert_eq!(halted["gates"][1]["waves"][0]["verdict"], "not breached");
    assert_eq!(halted["gates"][1]["waves"][0]["line"], Value::Null);
}

#[test]
fn a_rollout_without_gates_has_an_empty_gate_list() {
    use crate::fleet::rollout::health::tests::roll_out;
    let mut r = roll_out(0, 1.0);
    r.policy.gates.clear();
    assert_eq!(rollout_json(&r)["gates"], json!([]));
    r.policy.gates = vec!["traps <= lots".into()];
    let bad = rollout_json(&r);
    assert_eq!(bad["gates"][0]["gate"], "traps <= lots");
    assert!(
        bad["gates"][0]["error"].as_str().unwrap().contains("lots"),
        "{bad}"
    );
}
