//! Writes the seed corpora under `fuzz/corpus/<target>/`: a few valid encodings of each
//! message, so the fuzzer starts from inputs that get past the first check.
//!
//! `cargo run --example seeds` (from `fuzz/`); the output is committed.

use std::fs;
use std::path::Path;

use kiln_protocol::abi::Level;
use kiln_protocol::artifact;
use kiln_protocol::fleet::{
    seal_report, Desired, DesiredModule, DeviceFacts, Event, EventKind, EventV1, Health, HealthV1,
    ModuleHealth, ModuleLimits, ModuleReport, ModuleState, Reported, ReportedV1, Scope,
    SignedDesired, Status, StatusV1, StatusV2, Tags, TargetArtifact, TrustReport, MAX_TAGS,
};
use kiln_protocol::manifest::Manifest;
use kiln_protocol::rollout::gate::{HealthSummary, Sketch};
use kiln_protocol::telemetry::{
    Batch, BatchV1, Body, DeviceStats, Dropped, ModuleStats, Record, Started, Stopped,
};
use kiln_protocol::transfer::{Chunk, Codec, Transfer};
use kiln_protocol::trust::{Chain, Registry, Role, Root, SignedRegistry, SignedRoot};
use kiln_protocol::worker::{
    self, Done, FromWorker, Limits, LogSource, Ready, Reply, Request, StartSpec, Stop, ToWorker,
};
use serde::Serialize;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let key = kiln_fuzz::key();
    let device_key = kiln_fuzz::device_key();
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)
    };

    let payload = [0x5au8; 64];
    let sealed = artifact::seal(&Manifest::example(&payload), &payload, &key)
        .expect("the example manifest seals");
    write("artifact", "example", &sealed)?;
    write("artifact", "header-only", &sealed[..88])?;

    let module = DesiredModule {
        name: "sensor".into(),
        version: 3,
        artifacts: vec![
            TargetArtifact::whole(
                &[7u8; 3000],
                "aarch64-unknown-linux-gnu",
                vec!["neon".into()],
                Codec::Zstd,
                1024,
            )
            .0,
        ],
        config: b"alpha=0.3".to_vec(),
        limits: ModuleLimits {
            tick_ms: Some(100),
            memory_limit_pages: Some(16),
            fuel_per_call: Some(1_000_000),
            timeout_ms: Some(500),
        },
        allow_downgrade: false,
        health_window_ms: 5000,
    };
    let issued_ms = 1_700_000_000_000;
    let device = Desired {
        fleet: kiln_fuzz::FLEET.into(),
        scope: Scope::Device("dev-01".into()),
        serial: 7,
        issued_ms,
        expires_ms: issued_ms + 30 * 24 * 3600 * 1000,
        mirrors: Vec::new(),
        modules: vec![module.clone()],
    };
    let group = Desired {
        fleet: kiln_fuzz::FLEET.into(),
        scope: Scope::Group("lab".into()),
        serial: 1,
        issued_ms,
        expires_ms: issued_ms + 3600 * 1000,
        mirrors: Vec::new(),
        modules: vec![],
    };
    let fuzz_root = kiln_fuzz::root();
    let signed = SignedDesired::sign(&device, &[&key]);
    assert_eq!(SignedDesired::open(&signed, &fuzz_root), Ok(device.clone()));
    write("desired", "device", &signed)?;
    write("desired", "group", &SignedDesired::sign(&group, &[&key]))?;
    // What `kiln push --unsigned` writes for `kiln sign`; signed by the release key and
    // a stranger; for another fleet.
    write("desired", "unsigned", &SignedDesired::sign(&device, &[]))?;
    write(
        "desired",
        "two-signers",
        &SignedDesired::sign(&group, &[&device_key, &key]),
    )?;
    let staging = Desired {
        fleet: "staging".into(),
        ..group.clone()
    };
    write(
        "desired",
        "other-fleet",
        &SignedDesired::sign(&staging, &[&key]),
    )?;
    // kiln 0.2's format, refused by name.
    let legacy = SignedDesired::V2 {
        body: vec![1, 2, 3],
        key_id: key.public().id().0,
        signature: vec![0; 64],
    };
    write("desired", "legacy-v2", &pc(&legacy))?;

    // Root documents: v1 (the fixed one), v2 after it, v3 rotating the root key to
    // another (signed by both), and a set of them for `Chain::follow`.
    let v1 = kiln_fuzz::root_bytes();
    let v2 = Root {
        version: 2,
        issued_ms: issued_ms + 1,
        ..kiln_fuzz::root()
    };
    let v2_bytes = v2.sign(&[&key]).expect("root v2 signs");
    let v3 = Root {
        version: 3,
        issued_ms: issued_ms + 2,
        root: Role::new(&[device_key.public()], 1),
        release: Role::new(&[key.public(), device_key.public()], 1),
        registry: Some(Role::new(&[device_key.public()], 1)),
        ..v2.clone()
    };
    let v3_bytes = v3.sign(&[&key, &device_key]).expect("root v3 signs");
    assert_eq!(
        SignedRoot::open_next(&v2_bytes, &kiln_fuzz::root()),
        Ok(v2.clone())
    );
    assert_eq!(SignedRoot::open_next(&v3_bytes, &v2), Ok(v3));
    let follow = [&v3_bytes[..], &v1, b"junk", &v2_bytes];
    let mut chain = Chain::new(v1.clone()).expect("root v1 opens");
    let (taken, errors) = chain.follow(follow);
    assert_eq!((taken, errors.len()), (vec![2, 3], 1), "{errors:?}");
    write("root", "v1", &v1)?;
    write("root", "v2", &v2_bytes)?;
    write("root", "v3-rotated", &v3_bytes)?;
    write("root", "follow", &kiln_fuzz::join(&follow))?;
    // A root at the last version a u64 holds: whatever a device is offered after it.
    let last = Root {
        version: u64::MAX,
        ..kiln_fuzz::root()
    };
    write(
        "root",
        "last-version",
        &last.sign(&[&key]).expect("the last root signs"),
    )?;

    // A rollout record of three devices in two waves, its first wave sent: its head
    // (the rollout target, with no part retained: refused as incomplete, unless a
    // mutation makes it a record from before parts) and, for rollout_part, its one
    // part behind the counts the head gives (two waves, one skipped).
    let mut rollout = kiln_fuzz::rollout();
    let sealed = rollout.seal(&[&key]).expect("record seals");
    write("rollout", "first-wave-sent-head", &sealed.head)?;
    // For rollout_part, a record whose members all share one part: four names of
    // part 0 (one wave of one, one of two, one left out), the counts the head gives,
    // then the part.
    let same: Vec<String> = (0..)
        .map(|i| format!("d{i}"))
        .filter(|d| kiln_protocol::parts::part_of(d) == 0)
        .take(4)
        .collect();
    let mut shared = kiln_protocol::rollout::Rollout::new(
        kiln_fuzz::FLEET,
        "lab",
        "fuzz@seed",
        1,
        rollout.module.clone(),
        rollout.policy.clone(),
        kiln_protocol::rollout::plan_waves(&same[..3], &[1], None),
        Default::default(),
        vec![(same[3].clone(), "no artifact for riscv64".into())],
    );
    shared.step(2, kiln_protocol::rollout::Input::Start);
    let one = shared.seal(&[&key]).expect("record seals");
    assert_eq!(one.parts.len(), 1);
    let mut part = vec![1, 2, 1, 4];
    part.extend(&one.parts[0].1);
    write("rollout_part", "one-part", &part)?;
    rollout.step(3, kiln_protocol::rollout::Input::Abort { by: "ops".into() });
    let sealed = rollout.seal(&[&key]).expect("record seals");
    write("rollout", "aborted-head", &sealed.head)?;

    let mut registry = Registry {
        fleet: kiln_fuzz::FLEET.into(),
        serial: 1,
        devices: Vec::new(),
    };
    registry.enroll("dev-01", &device_key.public());
    registry.enroll("dev-02", &key.public());
    let signed = registry.sign(&[&key]).expect("registry signs");
    assert_eq!(
        SignedRegistry::open(&signed.head, |s| signed.part(s), &fuzz_root),
        Ok(registry.clone())
    );
    // The registry target opens heads with no part retained: a whole registry from
    // before parts, and an empty one; a head naming parts exercises refusal.
    write(
        "registry",
        "two-devices-whole",
        &registry.sign_whole(&[&key]).expect("registry signs"),
    )?;
    write("registry", "two-devices-head", &signed.head)?;
    for (i, (_, part)) in signed.parts.iter().enumerate() {
        write("registry_part", &format!("two-devices-{i}"), part)?;
    }
    let empty = Registry {
        fleet: kiln_fuzz::FLEET.into(),
        ..Registry::default()
    };
    write(
        "registry",
        "empty",
        &empty.sign(&[&key]).expect("registry signs").head,
    )?;
    write(
        "registry",
        "by-a-stranger",
        &registry.sign(&[&device_key]).expect("registry signs").head,
    )?;

    let chunk = Chunk::V1 {
        sha256: [0xab; 32],
        index: 2,
        data: vec![1, 2, 3, 4, 5, 6, 7, 8],
    };
    write("chunk", "small", &pc(&chunk))?;

    // A selector byte (the declared length in KiB), then a base and a stream.
    let base = [3u8; 2048];
    let mut next = base.to_vec();
    next[100] = 9;
    let patch = Transfer::patch(&base, &next, 1024);
    let whole = Transfer::full(&next, Codec::Zstd, 1024);
    write("transfer", "list", &whole.list_message)?;
    let mut seed = vec![2u8];
    seed.extend(base.iter().take(1024));
    seed.extend(&patch.stream);
    write("transfer", "patch", &seed)?;
    let mut seed = vec![2u8];
    seed.extend(&whole.stream);
    write("transfer", "zstd", &seed)?;

    // Mirror answers as nginx sends them (even first byte: a head), and mirror URLs
    // (odd first byte).
    for (name, head) in [
        ("nginx-200", "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 20:00:00 GMT\r\nContent-Type: application/octet-stream\r\nContent-Length: 16384\r\nLast-Modified: Sun, 06 Dec 2026 19:59:59 GMT\r\nConnection: keep-alive\r\nETag: \"6934d7ff-4000\"\r\nAccept-Ranges: bytes\r\n\r\n"),
        ("nginx-404", "HTTP/1.1 404 Not Found\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 153\r\nConnection: keep-alive\r\n\r\n<html>"),
        ("redirect", "HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/x\r\nContent-Length: 0\r\n\r\n"),
        ("chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"),
        ("http10-close", "HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nabcd"),
        ("cut", "HTTP/1.1 200 OK\r\nContent-Len"),
    ] {
        write("http_head", name, &[&[0u8][..], head.as_bytes()].concat())?;
    }
    for (name, url) in [
        ("url-https", "https://mirror.example.com:8443/kiln"),
        ("url-v6", "http://[::1]/fleet/"),
    ] {
        write("http_head", name, &[&[1u8][..], url.as_bytes()].concat())?;
    }

    let facts = DeviceFacts {
        triple: "aarch64-unknown-linux-gnu".into(),
        cpu_features: vec!["neon".into()],
        kilnd: "0.1.0".into(),
        wasmer: "7.4.2".into(),
        kiln_abi: 1,
        groups: vec!["lab".into(), "floor-2".into()],
        boot_id: 0xfeed,
    };
    let online = Status::V1(StatusV1 {
        device: "dev-01".into(),
        online: true,
        facts: Some(facts),
    });
    let offline = Status::V1(StatusV1 {
        device: "dev-01".into(),
        online: false,
        facts: None,
    });
    write("status", "online", &pc(&online))?;
    write("status", "offline", &pc(&offline))?;
    let topic = kiln_fuzz::STATUS_TOPIC;
    write(
        "status",
        "signed-v1",
        &seal_report(&online, topic, &device_key),
    )?;
    let Status::V1(online) = online else {
        unreachable!("built as V1")
    };
    let current = Status::V2(StatusV2 {
        trust: Some(TrustReport {
            fleet: kiln_fuzz::FLEET.into(),
            root_version: 2,
            identity: device_key.public().to_bytes(),
            oldest_issued_ms: issued_ms,
            stale: Some("no desired state for 3 days".into()),
        }),
        ..StatusV2::from(online)
    });
    write("status", "v2", &pc(&current))?;
    let signed = seal_report(&current, topic, &device_key);
    let opened = Status::open(topic, &signed).expect("a sealed status opens");
    assert_eq!(opened.1, Some(device_key.public()));
    write("status", "signed-v2", &signed)?;
    write(
        "status",
        "signed-offline",
        &seal_report(&offline, topic, &device_key),
    )?;

    let reported = Reported::V1(ReportedV1 {
        serial: 7,
        modules: vec![ModuleReport {
            name: "sensor".into(),
            version: 3,
            sha256: [0xcd; 32],
            state: ModuleState::Running,
            last_event: "committed".into(),
        }],
    });
    write("reported", "one-module", &pc(&reported))?;
    write(
        "reported",
        "signed",
        &seal_report(&reported, kiln_fuzz::REPORTED_TOPIC, &device_key),
    )?;
    // The host's reader: a topic byte (0 status, 1 reported, 3 another device's
    // reported), then the message.
    let signed_reported = seal_report(&reported, kiln_fuzz::REPORTED_TOPIC, &device_key);
    write(
        "device_message",
        "reported",
        &[&[1u8][..], &signed_reported].concat(),
    )?;
    write(
        "device_message",
        "moved",
        &[&[3u8][..], &signed_reported].concat(),
    )?;
    write("device_message", "status", &[&[0u8][..], &signed].concat())?;

    let kinds = [
        ("downloading", EventKind::Downloading { have: 1, total: 3 }),
        ("committed", EventKind::Committed),
        (
            "rolled-back",
            EventKind::RolledBack {
                reason: "trap in kiln_tick".into(),
            },
        ),
        (
            "rejected",
            EventKind::Rejected {
                reason: "untrusted key".into(),
            },
        ),
        (
            "fell-back",
            EventKind::FellBack {
                reason: "patch base missing".into(),
            },
        ),
        (
            "trusted",
            EventKind::Trusted {
                reason: "root v2".into(),
            },
        ),
        (
            "stale",
            EventKind::Stale {
                reason: "newest desired state is 3 days old".into(),
            },
        ),
    ];
    for (name, kind) in kinds {
        let event = Event::V1(EventV1 {
            at_ms: 1_700_000_000_000,
            module: "sensor".into(),
            version: 3,
            kind,
        });
        write("event", name, &pc(&event))?;
        let signed = seal_report(&event, kiln_fuzz::EVENTS_TOPIC, &device_key);
        write("event", &format!("signed-{name}"), &signed)?;
    }

    // A period of two versions of one module (updated during it) and another module.
    let summary = |module: &str, traps: u64| HealthSummary {
        calls: 1200,
        traps,
        restarts: traps,
        records_sent: 60,
        records_dropped: 1,
        fuel_used: 3_400_000,
        peak_memory_bytes: 6 << 20,
        metrics: [("error_rate".to_string(), Sketch::of(&[0.25, 1.0, 0.5]))].into(),
        ..HealthSummary::new(module)
    };
    let health = HealthV1 {
        seq: 2,
        period_ms: 60_000,
        modules: vec![
            ModuleHealth {
                version: 3,
                summary: summary("sensor", 0),
            },
            ModuleHealth {
                version: 4,
                summary: summary("sensor", 2),
            },
            ModuleHealth {
                version: 1,
                summary: HealthSummary::new("filter"),
            },
        ],
    };
    write("health", "unsigned", &pc(&Health::V1(health.clone())))?;
    let signed_health = health
        .seal(kiln_fuzz::HEALTH_TOPIC, &device_key)
        .expect("the seed health is valid");
    write("health", "signed", &signed_health)?;

    let records = vec![
        Body::Telemetry {
            stream: "temp".into(),
            data: b"21.5".to_vec(),
        },
        Body::Log {
            level: Level::Warn,
            source: LogSource::Stderr,
            line: "sensor not ready".into(),
        },
        Body::Started(Started {
            attempt: 1,
            pid: 42,
            version: 3,
            command: false,
            start_us: 1000,
            verify_us: 100,
            deserialize_us: 200,
            instantiate_us: 300,
            init_us: 400,
            first_tick_us: Some(50),
            fuel_used: Some(77),
            memory_pages: 17,
            rss_kib: Some(2048),
        }),
        Body::TickFailed { status: -1 },
        Body::Stopped(Stopped {
            reason: "trap".into(),
            why: "trapped in kiln_tick: unreachable".into(),
            exit_code: None,
            uptime_ms: 1234,
            peak_rss_kib: Some(4096),
            crashes_in_window: 1,
            restart_in_ms: Some(1000),
        }),
        Body::Failed {
            crashes: 5,
            window_s: 60,
        },
        Body::ModuleStats(ModuleStats {
            cpu_ms: 10,
            rss_kib: Some(1024),
            memory_pages: 17,
            calls: 100,
            fuel_used: 5000,
            traps: 1,
            restarts: 1,
        }),
        Body::DeviceStats(DeviceStats {
            uptime_s: 60,
            load_milli: 250,
            mem_available_kib: 100_000,
            disk_free_kib: 1_000_000,
            kilnd_rss_kib: 8000,
            spool_batches: 2,
            spool_bytes: 300,
            dropped_batches: 3,
            dropped_records: 30,
            spool_appends: 9,
            spool_append_us: 900,
        }),
        Body::Dropped(Dropped {
            boot_id: 0xfeed,
            first_seq: 2,
            last_seq: 4,
            batches: 3,
            records: 30,
        }),
    ];
    let batch = BatchV1 {
        device: "dev-01".into(),
        boot_id: 0xfeed,
        seq: 9,
        records: records
            .into_iter()
            .enumerate()
            .map(|(n, body)| Record {
                at_ms: 1_700_000_000_000 + n as u64,
                module: (n % 2 == 0).then(|| "sensor".to_string()),
                body,
            })
            .collect(),
    };
    write("telemetry_batch", "every-kind", &Batch::encode(&batch))?;
    let empty = BatchV1 {
        records: vec![],
        ..batch
    };
    write("telemetry_batch", "empty", &Batch::encode(&empty))?;

    // Tracker steps: 17 bytes each, a kind/boot byte then two u64 seqs.
    let step = |kind_boot: u8, a: u64, b: u64| -> Vec<u8> {
        [&[kind_boot][..], &a.to_le_bytes(), &b.to_le_bytes()].concat()
    };
    let in_order: Vec<u8> = (0..8).flat_map(|n| step(1, n, 0)).collect();
    write("tracker", "in-order", &in_order)?;
    let forged = [
        step(1, 0, 0),
        step(1, 1 << 63, 0),
        step(0x81, 5, u64::MAX),
        step(1, 3, 0),
        step(2, u64::MAX, 0),
    ]
    .concat();
    write("tracker", "forged", &forged)?;

    let frames_from = [
        FromWorker::V1(Reply::Ready(Ready {
            name: "sensor".into(),
            version: 3,
            command: false,
            ticks: true,
            verify_us: 1,
            deserialize_us: 2,
            instantiate_us: 3,
            init_us: 4,
            memory_pages: 17,
        })),
        FromWorker::V1(Reply::Telemetry {
            stream: "temp".into(),
            data: b"21.5".to_vec(),
        }),
        FromWorker::V1(Reply::Log {
            level: Level::Info,
            source: LogSource::Abi,
            line: "hello".into(),
        }),
        FromWorker::V1(Reply::Done(Done {
            status: 0,
            elapsed_us: 5,
            fuel_used: Some(7),
            memory_pages: 17,
        })),
        FromWorker::V1(Reply::Fatal(Stop::Trap {
            call: "kiln_tick".into(),
            message: "unreachable".into(),
        })),
    ];
    write("worker_from", "session", &frames(&frames_from))?;
    write("worker_from", "done", &frames(&frames_from[3..4]))?;

    let frames_to = [
        ToWorker::V1(Request::Start(Box::new(StartSpec {
            artifact: "/var/lib/kilnd/modules/sensor/3.kiln".into(),
            trusted_keys: vec![key.public().to_text()],
            config: b"alpha=0.3".to_vec(),
            limits: Limits {
                memory_pages: Some(16),
                fuel_per_call: Some(1000),
            },
            args: vec!["sensor".into()],
            env: vec![("RUST_LOG".into(), "info".into())],
            dirs: vec![("/var/lib/kilnd/data/sensor".into(), "/data".into())],
            expect: None,
            first_tick: true,
            grants: kiln_protocol::capability::Grants {
                serial: vec![kiln_protocol::capability::SerialPort {
                    name: "gps".into(),
                    path: "/dev/ttyUSB0".into(),
                    baud: 4800,
                    framing: kiln_protocol::capability::Framing::default(),
                }],
                gpio: vec![kiln_protocol::capability::GpioLines {
                    name: "relays".into(),
                    chip: "/dev/gpiochip0".into(),
                    lines: vec![0, 3],
                    output: false,
                    edges: kiln_protocol::capability::Edges::Both,
                }],
                i2c: vec![kiln_protocol::capability::I2cDevice {
                    name: "eeprom".into(),
                    bus: "/dev/i2c-1".into(),
                    address: 0x50,
                }],
                files: vec![kiln_protocol::capability::ReadFile {
                    name: "temp".into(),
                    path: "/sys/bus/iio/devices/iio:device0/in_temp_input".into(),
                }],
            },
        }))),
        ToWorker::V1(Request::Tick),
        ToWorker::V1(Request::Message {
            topic: "sensor/cmd".into(),
            data: vec![1, 2, 3],
        }),
        ToWorker::V1(Request::Message {
            topic: "command/open".into(),
            data: b"30".to_vec(),
        }),
        ToWorker::V1(Request::Run),
    ];
    write("worker_to", "session", &frames(&frames_to))?;
    write("worker_to", "tick", &frames(&frames_to[1..2]))?;

    // Tags signed by the fixed root's release key for dev-01 (the target opens them
    // on dev-01's topic): none, a few, and the most a record may hold.
    let tags = |names: &[String]| Tags {
        fleet: kiln_fuzz::FLEET.into(),
        device: "dev-01".into(),
        serial: 7,
        issued_ms: 1_700_000_000_000,
        tags: names.iter().cloned().collect(),
    };
    let few = ["canary".to_string(), "site-berlin".into(), "rev_b".into()];
    let most: Vec<String> = (0..MAX_TAGS).map(|i| format!("tag-{i:02}")).collect();
    for (name, names) in [("none", &[][..]), ("few", &few[..]), ("most", &most[..])] {
        let sealed = tags(names).seal(&[&key]).expect("valid tags seal");
        write("tags", name, &sealed)?;
    }

    // Commands signed by the fixed root's release key (mode 0: the envelope as it
    // travels), and a command's body alone (mode 1: the target signs it).
    let command = kiln_protocol::command::Command {
        fleet: kiln_fuzz::FLEET.into(),
        to: kiln_protocol::command::To::Device("d".into()),
        module: "valve".into(),
        topic: "open".into(),
        data: b"30".to_vec(),
        id: 0x1234_5678_9abc_def0,
        issued_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_060_000,
        reply: true,
    };
    let signed = command.sign(&[&key]).expect("a valid command signs");
    write("command", "signed", &[&[0u8][..], &signed].concat())?;
    let body = postcard::to_stdvec(&command).expect("encodes");
    write("command", "body", &[&[1u8][..], &body].concat())?;
    let group = kiln_protocol::command::Command {
        to: kiln_protocol::command::To::Group("g".into()),
        data: Vec::new(),
        reply: false,
        ..command
    };
    let body = postcard::to_stdvec(&group).expect("encodes");
    write("command", "group-body", &[&[1u8][..], &body].concat())?;

    // Conditions, and a device's attributes after a newline.
    for (name, text) in [
        (
            "tag",
            "tag=canary\nx86_64-unknown-linux-gnu avx2 sse4.2 0.9.1 lab canary",
        ),
        (
            "version",
            "kilnd>=0.9.0-rc.1\naarch64-unknown-linux-gnu neon - 0.9.0 lab",
        ),
        ("target", "target != riscv64gc-unknown-linux-gnu"),
    ] {
        write("cohort", name, text.as_bytes())?;
    }
    Ok(())
}

fn frames<T: Serialize>(messages: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        worker::write_frame(&mut out, m).expect("writing to a Vec cannot fail");
    }
    out
}

/// One postcard message, as the broker carries it.
fn pc<T: Serialize>(message: &T) -> Vec<u8> {
    postcard::to_stdvec(message).expect("plain data encodes")
}
