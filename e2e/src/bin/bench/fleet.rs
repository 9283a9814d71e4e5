//! The fleet over MQTT (mosquitto on loopback): how long an update takes from `kiln
//! push` until the device runs it, and how many telemetry records one device sustains.

use std::time::{Duration, Instant};

use clap::Parser;
use kiln_compiler::commands::push::PushCommand;
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{compile, path_str};

use crate::target::Target;
use crate::{median, table};

pub fn print_update(update_rows: &[Vec<String>], runs: usize) {
    report!("\n### Fleet update over MQTT (mosquitto on loopback), median of {runs}\n");
    report!(
        "A reactor whose data segment makes the artifact the given size. `upload` is `kiln push`"
    );
    report!(
        "until the broker acknowledged every chunk and the desired state; `push -> running` ends"
    );
    report!("when the device reports the new version started (chunks fetched, verified, staged,");
    report!("started in a worker); throughput is artifact bytes over that time.\n");
    table(
        &[
            "target",
            "mode",
            "artifact",
            "upload",
            "push -> running",
            "throughput",
        ],
        update_rows,
    );
}

pub fn print_telemetry(telemetry_rows: &[Vec<String>], _runs: usize) {
    report!("\n### Telemetry over MQTT (mosquitto on loopback), one device\n");
    report!(
        "The counter fixture publishes {BURST} records of 8 bytes per 1 ms tick (the offered load);"
    );
    report!(
        "kilnd batches them (16 KiB or 1 s), writes each batch durably to its spool (fsync), then"
    );
    report!(
        "publishes it with QoS 1. `received` is what a subscriber decoded per second over {TELEMETRY_SECS} s"
    );
    report!(
        "after a 2 s warm-up; bytes per record are the batches' payload bytes over their records,"
    );
    report!(
        "against the same record as a JSON line (kilnd's stdout form); spool write is the time per"
    );
    report!(
        "durable append as kilnd's device-stats record reports it. A backlog near 0 batches means"
    );
    report!("kilnd kept up with the module, and `received` is what the module produced.\n");
    table(
        &[
            "target",
            "mode",
            "received",
            "postcard B/record",
            "JSON B/record",
            "spool write per batch",
            "spool write per record",
            "records per batch",
            "spool backlog at end",
        ],
        telemetry_rows,
    );
}

/// A reactor module carrying `size` bytes of data (distinct per version).
fn sized_module(size: usize, version: u64) -> String {
    let mut data = String::with_capacity(size * 3);
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ version;
    for _ in 0..size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push_str(&format!("\\{:02x}", x as u8));
    }
    let pages = size / 65536 + 2;
    format!(
        "(module (memory (export \"memory\") {pages}) (data (i32.const 0) \"{data}\")\n (func (export \"kiln_tick\") (result i32) i32.const 0))"
    )
}

/// `kilnd serve` as fleet device `device` of `broker` (config named `name`), and the
/// version of each worker it starts, as it starts.
pub fn fleet_device(
    target: &Target,
    broker: &Broker,
    name: &str,
    device: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<u64>) {
    let config = target.config(
        name,
        &format!(
            "device = {device:?}\ndata_dir = \"data\"\n[mqtt]\nbroker = {:?}\n",
            broker.url()
        ),
    );
    let (child, records) = target.serve(&config);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        for r in records.filter(|r| r["kind"] == "started") {
            let _ = tx.send(r["version"].as_u64().unwrap_or(0));
        }
    });
    // Its birth message.
    std::thread::sleep(Duration::from_secs(1));
    (child, rx)
}

pub fn update_latency(target: &Target, runs: usize) -> Vec<Vec<String>> {
    let broker = Broker::start();
    let device = format!("bench-{}", target.name);
    let (mut child, rx) = fleet_device(target, &broker, &device, &device);
    let mut rows = Vec::new();
    let mut version = 0;
    for (label, size) in [("100 KiB", 100 * 1024), ("1 MiB", 1024 * 1024)] {
        let mut uploads = Vec::new();
        let mut latencies = Vec::new();
        let mut artifact_len = 0;
        for _ in 0..runs {
            version += 1;
            let wat = target.dir.join(format!("sized-{version}.wat"));
            std::fs::write(&wat, sized_module(size, version)).expect("write wat");
            let out = target
                .dir
                .join(format!("sized-{version}-{}.kiln", target.name));
            let v = version.to_string();
            compile(
                &wat,
                &target.name,
                &target.key,
                &out,
                &["--name", "sized", "--version", &v],
            );
            artifact_len = std::fs::metadata(&out).map_or(0, |m| m.len());
            let started = Instant::now();
            PushCommand::try_parse_from([
                "push",
                path_str(&out),
                "--device",
                &device,
                "--sign",
                path_str(&target.key),
                "--broker",
                &broker.url(),
                "--health-window-ms",
                "1000",
                "--timeout-ms",
                "60000",
                // `upload` stays what it was: chunks and desired state acknowledged by
                // the broker, without waiting for the device to confirm.
                "--confirm-timeout-s",
                "0",
            ])
            .expect("push args")
            .execute()
            .expect("kiln push");
            uploads.push(started.elapsed().as_secs_f64() * 1000.0);
            loop {
                match rx.recv_timeout(Duration::from_secs(120)) {
                    Ok(v) if v == version => break,
                    Ok(_) => continue,
                    Err(e) => panic!("device never ran v{version}: {e}"),
                }
            }
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            // Let the health window pass so the next push starts from a committed state.
            std::thread::sleep(Duration::from_millis(1200));
        }
        let latency = median(latencies.into_iter());
        rows.push(vec![
            target.name.clone(),
            target.mode().into(),
            format!("{label} ({} KiB)", artifact_len / 1024),
            format!("{:.0} ms", median(uploads.into_iter())),
            format!("{latency:.0} ms"),
            format!(
                "{:.1} MiB/s",
                artifact_len as f64 / (1024.0 * 1024.0) / (latency / 1000.0)
            ),
        ]);
    }
    let _ = child.kill();
    let _ = child.wait();
    rows
}

/// Records per tick of the counter fixture in the telemetry bench: more than the
/// telemetry path takes, so that the rate measured is kilnd's, not the module's. The
/// module's rate limit is lifted for the same reason.
const BURST: u32 = 1000;
const TELEMETRY_SECS: u64 = 5;
const JSON_SAMPLE: u64 = 10_000;

#[derive(Default)]
struct Received {
    records: u64,
    counters: u64,
    payload_bytes: u64,
    batches: u64,
    /// The first `JSON_SAMPLE` telemetry records as JSON lines would be.
    json_bytes: u64,
    json_records: u64,
    /// The latest device-stats record: (spool appends, their total µs, batches waiting).
    spool: Option<(u64, u64, u64)>,
}

/// One run of a few seconds per target: the rate is steady after the warm-up.
pub fn telemetry_throughput(target: &Target, _runs: usize) -> Vec<Vec<String>> {
    vec![telemetry_row(target)]
}

fn telemetry_row(target: &Target) -> Vec<String> {
    let broker = Broker::start();
    let device = format!("tele-{}", target.name);
    let counter = target.artifact("fixtures/counter.wat", "counter", &[]);
    let config = target.config(
        &device,
        &format!(
            "device = {device:?}\ndata_dir = \"data\"\n[mqtt]\nbroker = {:?}\n[telemetry]\nstats_s = 1\nstdout = false\n[[module]]\nname = \"counter\"\nartifact = {:?}\nconfig = \"{BURST}\"\ntick_ms = 1\ntimeout_ms = 20000\nrate = {{ records_per_s = 10000000, bytes_per_s = 1000000000 }}\n",
            broker.url(),
            path_str(&counter)
        ),
    );
    let received = std::sync::Arc::new(std::sync::Mutex::new(Received::default()));
    subscribe_telemetry(&broker, &device, received.clone());
    let (mut child, _records) = target.serve(&config);
    std::thread::sleep(Duration::from_secs(2));
    let take = || {
        let r = received.lock().unwrap_or_else(|e| e.into_inner());
        (r.records, r.counters, r.payload_bytes, r.batches, r.spool)
    };
    let (_, c0, _, _, _) = take();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(TELEMETRY_SECS));
    let (records, c1, bytes, batches, spool) = take();
    let json_len = received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .json_bytes as f64
        / c1.clamp(1, JSON_SAMPLE) as f64;
    let rate = (c1 - c0) as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let (appends, append_us, waiting) = spool.unwrap_or((0, 0, 0));
    let per_batch_us = append_us as f64 / appends.max(1) as f64;
    let per_record = records as f64 / batches.max(1) as f64;
    vec![
        target.name.clone(),
        target.mode().into(),
        format!("{rate:.0} records/s"),
        format!("{:.1}", bytes as f64 / records.max(1) as f64),
        format!("{json_len:.1}"),
        format!("{:.2} ms", per_batch_us / 1000.0),
        format!("{:.1} µs", per_batch_us / per_record.max(1.0)),
        format!("{per_record:.0}"),
        format!("{waiting}"),
    ]
}

/// Counts what arrives on the device's telemetry topic.
fn subscribe_telemetry(
    broker: &Broker,
    device: &str,
    received: std::sync::Arc<std::sync::Mutex<Received>>,
) {
    use kiln_protocol::telemetry::{to_json, Batch, Body};
    use rumqttc::{Client, MqttOptions, Packet, QoS};
    let topic =
        kiln_protocol::fleet::Topics::new(kiln_protocol::fleet::DEFAULT_PREFIX).telemetry(device);
    let mut options = MqttOptions::new(format!("bench-sub-{device}"), "127.0.0.1", broker.port);
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(options, 10);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(&topic, QoS::AtLeastOnce);
                }
                Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    let Ok(batch) = Batch::decode(&p.payload) else {
                        continue;
                    };
                    let mut r = received.lock().unwrap_or_else(|e| e.into_inner());
                    r.batches += 1;
                    r.payload_bytes += p.payload.len() as u64;
                    r.records += batch.records.len() as u64;
                    for record in &batch.records {
                        match &record.body {
                            Body::Telemetry { .. } => {
                                r.counters += 1;
                                // A sample: in this debug build, JSON for every record
                                // would make the subscriber the bottleneck.
                                if r.json_records < JSON_SAMPLE {
                                    r.json_records += 1;
                                    r.json_bytes += to_json(record).to_string().len() as u64 + 1;
                                }
                            }
                            Body::DeviceStats(s) => {
                                r.spool =
                                    Some((s.spool_appends, s.spool_append_us, s.spool_batches))
                            }
                            _ => {}
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed to telemetry");
}
