//! Fleet updates against a real mosquitto on a free loopback port: `kiln push` on the
//! host, `kilnd serve` with `[mqtt]` as the device (natively, and the aarch64 build under
//! qemu-user), events and reported state read back from the broker.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use kiln_compiler::commands::gc::GcCommand;
use kiln_compiler::commands::push::PushCommand;
use kiln_compiler::commands::rollout::RolloutCommand;
use kiln_protocol::fleet::{
    sha256, Desired, Event, EventKind, Reported, ReportedV1, Scope, SignedDesired, TargetArtifact,
    Topics, Upload, DEFAULT_PREFIX,
};
use kiln_protocol::keys::SecretKey;
use kiln_protocol::transfer::{Chunk, Codec, MAX_ARTIFACT};
use rumqttc::{Client, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::util::{eventually, fleet_id, now_ms, path_str, shared, FleetDevice, Tmpfs};
use kiln_e2e::mosquitto::{Broker, Pki};

/// Every event and the latest reported state of a device, as the broker delivers them.
pub(crate) struct Watch {
    events: Arc<Mutex<Vec<(String, u64, EventKind)>>>,
    reported: Arc<Mutex<Option<ReportedV1>>>,
}

impl Watch {
    pub(crate) fn start(broker: &Broker, device: &str) -> Self {
        let topics = Topics::new(DEFAULT_PREFIX);
        let mut options =
            MqttOptions::new(format!("test-watch-{device}"), "127.0.0.1", broker.port);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 10);
        let events = Arc::new(Mutex::new(Vec::new()));
        let reported = Arc::new(Mutex::new(None));
        let (e, r) = (events.clone(), reported.clone());
        let (events_topic, reported_topic) = (topics.events(device), topics.reported(device));
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&events_topic, QoS::AtLeastOnce);
                        let _ = client.subscribe(&reported_topic, QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == events_topic {
                            if let Ok((ev, _)) = Event::open(&p.topic, &p.payload) {
                                e.lock().unwrap().push((ev.module, ev.version, ev.kind));
                            }
                        } else if let Ok((rep, _)) = Reported::open(&p.topic, &p.payload) {
                            *r.lock().unwrap() = Some(rep);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        Self { events, reported }
    }

    pub(crate) fn events(&self) -> Vec<(String, u64, EventKind)> {
        self.events.lock().unwrap().clone()
    }

    pub(crate) fn wait_event(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&(String, u64, EventKind)) -> bool,
    ) {
        eventually(
            limit,
            || self.events().iter().any(&pred),
            || format!("no event {what}; events: {:#?}", self.events()),
        );
    }

    pub(crate) fn wait_committed(&self, version: u64, limit: Duration) {
        self.wait_event(limit, &format!("committed v{version}"), |(m, v, k)| {
            m == "app" && *v == version && *k == EventKind::Committed
        });
    }

    /// Waits until the reported state says `app` runs `version`.
    pub(crate) fn wait_running(&self, version: u64, limit: Duration) {
        eventually(
            limit,
            || self.reported_app() == Some((version, "Running".into())),
            || {
                format!(
                    "reported {:?}, want v{version} running",
                    self.reported_app()
                )
            },
        );
    }

    /// The latest reported state the broker delivered.
    pub(crate) fn reported(&self) -> Option<ReportedV1> {
        self.reported.lock().unwrap().clone()
    }

    /// Forgets the reported state, so the next one seen is one the device sent after.
    pub(crate) fn forget_reported(&self) {
        *self.reported.lock().unwrap() = None;
    }

    /// `(version, state)` of module `app` in the retained reported state.
    fn reported_app(&self) -> Option<(u64, String)> {
        let r = self.reported()?;
        let m = r.modules.iter().find(|m| m.name == "app")?;
        Some((m.version, format!("{:?}", m.state)))
    }
}

/// A short health window and tick, and artifacts sent whole: for the tests that read
/// chunks on the broker as the artifact's own bytes.
const QUICK_RAW: [&str; 6] = [
    "--health-window-ms",
    "1000",
    "--tick-ms",
    "100",
    "--wire",
    "raw",
];

/// `kiln push` in-process, as the command line would run it.
pub(crate) fn push(broker: &Broker, artifact: &Path, device: &str, extra: &[&str]) {
    try_push(&broker.url(), artifact, ["--device", device], extra)
        .unwrap_or_else(|e| panic!("kiln push {} to {device}: {e:#}", artifact.display()));
}

/// `kiln push ARTIFACT --device D|--group G --sign fleet.key --broker URL EXTRA...`
pub(crate) fn try_push(
    url: &str,
    artifact: &Path,
    to: [&str; 2],
    extra: &[&str],
) -> anyhow::Result<()> {
    let key = shared().key();
    let mut args = vec![
        "push",
        path_str(artifact),
        to[0],
        to[1],
        "--sign",
        path_str(&key),
    ];
    args.extend(["--broker", url]);
    // These tests were written for a push that publishes whatever it is given: to a
    // device that has not said it is online yet, a version the device is to refuse.
    // kiln's own refusals before publishing are e2e/tests/truth.rs's.
    args.push("--force");
    args.extend_from_slice(extra);
    PushCommand::try_parse_from(&args)
        .expect("push args")
        .execute()
}

/// The app module at `version`: the sensor reactor, or (`crashing`) one that traps on
/// its third tick.
pub(crate) fn app(target: &str, version: u64, crashing: bool) -> PathBuf {
    let source = if crashing {
        "fixtures/trap-tick.wat"
    } else {
        "sensor_filter.wasm"
    };
    let v = version.to_string();
    shared().artifact_with(source, target, &["--name", "app", "--version", &v])
}

/// A broker, a watch and a native device named `id` that has committed app v1.
pub(crate) fn device_at_v1(id: &str, health: &[&str]) -> (Broker, Watch, FleetDevice) {
    let broker = Broker::start();
    let watch = Watch::start(&broker, id);
    let mut device = FleetDevice::new("x86_64-linux", id, &broker);
    device.start(None);
    push(&broker, &app("x86_64-linux", 1, false), id, health);
    watch.wait_committed(1, Duration::from_secs(30));
    (broker, watch, device)
}

fn fleet_update_cycle(target: &str, window: &str, limit: Duration) {
    let broker = Broker::start();
    let watch = Watch::start(&broker, "dev-01");
    let mut device = FleetDevice::new(target, "dev-01", &broker);
    device.start(None);
    let health = [
        "--health-window-ms",
        window,
        "--tick-ms",
        "100",
        "--timeout-ms",
        "20000",
    ];

    push(&broker, &app(target, 1, false), "dev-01", &health);
    watch.wait_committed(1, limit);
    push(&broker, &app(target, 2, false), "dev-01", &health);
    watch.wait_committed(2, limit);

    // v3 traps on its third tick, inside the health window: the device rolls back.
    push(&broker, &app(target, 3, true), "dev-01", &health);
    watch.wait_event(limit, "rolled-back v3", |(m, v, k)| {
        m == "app" && *v == 3 && matches!(k, EventKind::RolledBack { reason } if reason.contains("integer divide by zero"))
    });
    watch.wait_running(2, limit);
    // v2 runs again after v3: the last start is v2's.
    eventually(
        limit,
        || {
            let started = device.started_versions();
            started.last() == Some(&2) && started.contains(&3)
        },
        || format!("started {:?}", device.started_versions()),
    );

    // v4 starts and ticks, but its self-test fails: rolled back as well.
    let v4 = shared().artifact_with(
        "fixtures/self-test-fails.wat",
        target,
        &["--name", "app", "--version", "4"],
    );
    push(&broker, &v4, "dev-01", &health);
    watch.wait_event(limit, "rolled-back v4", |(m, v, k)| {
        m == "app" && *v == 4 && matches!(k, EventKind::RolledBack { reason } if reason.contains("kiln_self_test returned 3"))
    });
    watch.wait_running(2, limit);

    // Anti-rollback: v1 again is refused while v2 keeps running...
    push(&broker, &app(target, 1, false), "dev-01", &health);
    watch.wait_event(limit, "rejected v1", |(m, v, k)| {
        m == "app" && *v == 1 && matches!(k, EventKind::Rejected { reason } if reason.contains("lower than committed version 2"))
    });
    assert_eq!(device.started_versions().last(), Some(&2));
    // ...unless the signed desired state allows the downgrade.
    let mut downgrade = health.to_vec();
    downgrade.push("--allow-downgrade");
    push(&broker, &app(target, 1, false), "dev-01", &downgrade);
    watch.wait_committed(1, limit);
    let kinds: Vec<String> = watch
        .events()
        .iter()
        .filter(|(m, v, _)| m == "app" && *v == 2)
        .map(|(_, _, k)| k.name().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "downloading",
            "verified",
            "staged",
            "activated",
            "committed"
        ],
        "{target}: the steps of one update"
    );
}

#[test]
fn push_commit_crash_rollback_and_anti_rollback_on_x86_64() {
    fleet_update_cycle("x86_64-linux", "1500", Duration::from_secs(30));
}

#[test]
fn push_commit_crash_rollback_and_anti_rollback_on_aarch64_under_qemu() {
    fleet_update_cycle("aarch64-linux", "4000", Duration::from_secs(90));
}

#[test]
fn an_offline_device_converges_and_a_broker_restart_mid_transfer_is_survived() {
    let broker_holder = Broker::start();
    let mut broker = broker_holder;
    let watch = Watch::start(&broker, "dev-02");
    let health = [
        "--health-window-ms",
        "1000",
        "--tick-ms",
        "100",
        "--chunk-size",
        "16384",
        // Sent whole, so the chunks are the artifact's own bytes.
        "--wire",
        "raw",
    ];
    // Pushed while the device is off: desired state and chunks wait, retained.
    let v1 = app("x86_64-linux", 1, false);
    push(&broker, &v1, "dev-02", &health);
    // Clear two chunks, so the device can only get part of the transfer.
    let bytes = std::fs::read(&v1).unwrap();
    let sha = sha256(&bytes);
    let topics = Topics::new(DEFAULT_PREFIX);
    let saved: Vec<(u32, Vec<u8>)> = [3u32, 9]
        .into_iter()
        .map(|n| {
            let chunk = Chunk::V1 {
                sha256: sha,
                index: n,
                data: bytes[n as usize * 16384..(n as usize + 1) * 16384].to_vec(),
            };
            (n, postcard::to_stdvec(&chunk).unwrap())
        })
        .collect();
    for (n, _) in &saved {
        broker.publish_retained(&topics.chunk(&sha, *n), Vec::new());
    }
    let mut device = FleetDevice::new("x86_64-linux", "dev-02", &broker);
    device.start(None);
    watch.wait_event(Duration::from_secs(30), "downloading", |(m, _, k)| {
        m == "app" && matches!(k, EventKind::Downloading { .. })
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        device.started_versions().is_empty(),
        "nothing can run before the transfer is complete"
    );

    // The broker goes away and comes back; the device reconnects, resubscribes, and
    // the missing chunks arrive.
    broker.restart();
    for (n, payload) in saved {
        broker.publish_retained(&topics.chunk(&sha, n), payload);
    }
    watch.wait_committed(1, Duration::from_secs(30));
    assert_eq!(device.started_versions(), [1]);
}

#[test]
fn bad_desired_states_and_chunks_are_rejected_and_the_running_module_untouched() {
    let health = QUICK_RAW;
    let (broker, watch, mut device) = device_at_v1("dev-03", &health);
    let topics = Topics::new(DEFAULT_PREFIX);
    let desired_topic = topics.desired("dev-03");

    // Signed by a key the device does not trust.
    let stranger = SecretKey::generate().unwrap();
    let desired = Desired {
        fleet: fleet_id(),
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        scope: Scope::Device("dev-03".into()),
        serial: 99,
        mirrors: Vec::new(),
        modules: vec![],
    };
    broker.publish_retained(&desired_topic, SignedDesired::sign(&desired, &[&stranger]));
    watch.wait_event(
        Duration::from_secs(10),
        "untrusted",
        |(_, _, k)| matches!(k, EventKind::Rejected { reason } if reason.contains("0 of the 1 signatures")),
    );
    // Malformed bytes.
    broker.publish_retained(&desired_topic, vec![0, 1, 2, 3, 250]);
    watch.wait_event(
        Duration::from_secs(10),
        "malformed",
        |(_, _, k)| matches!(k, EventKind::Rejected { reason } if reason.contains("malformed")),
    );
    // Validly signed, but for another device.
    let key = kiln_compiler::keyfile::read_secret(&shared().key()).unwrap();
    let other = Desired {
        fleet: fleet_id(),
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        scope: Scope::Device("dev-04".into()),
        serial: 100,
        mirrors: Vec::new(),
        modules: vec![],
    };
    broker.publish_retained(&desired_topic, SignedDesired::sign(&other, &[&key]));
    watch.wait_event(Duration::from_secs(10), "other device", |(_, _, k)| {
        matches!(k, EventKind::Rejected { reason } if reason.contains("Device(\"dev-04\")"))
    });

    // An endless transfer: a signed desired state naming an artifact above the limit.
    let (mut huge, _) = TargetArtifact::whole(
        &[0u8; 1024],
        "x86_64-unknown-linux-gnu",
        Vec::new(),
        Codec::Raw,
        1024,
    );
    huge.len = MAX_ARTIFACT + 1;
    let oversized = Desired {
        fleet: fleet_id(),
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        scope: Scope::Device("dev-03".into()),
        serial: fresh_serial(),
        mirrors: Vec::new(),
        modules: vec![kiln_protocol::fleet::DesiredModule {
            name: "app".into(),
            version: 9,
            artifacts: vec![huge],
            config: vec![],
            limits: Default::default(),
            allow_downgrade: false,
            health_window_ms: 1000,
        }],
    };
    broker.publish_retained(&desired_topic, SignedDesired::sign(&oversized, &[&key]));
    watch.wait_event(Duration::from_secs(10), "oversized", |(_, v, k)| {
        *v == 9
            && matches!(k, EventKind::Rejected { reason } if reason.contains(&format!("(limit {MAX_ARTIFACT})")))
    });

    // A tampered chunk: v2's first chunk replaced before the device asks for it.
    let v2 = app("x86_64-linux", 2, false);
    let bytes = std::fs::read(&v2).unwrap();
    let sha = sha256(&bytes);
    let mut evil = bytes[..65536].to_vec();
    evil[100] ^= 0xff;
    let tampered = postcard::to_stdvec(&Chunk::V1 {
        sha256: sha,
        index: 0,
        data: evil,
    })
    .unwrap();
    // Device offline while the chunks are published, so the tampered one is what waits.
    device.kill();
    push(&broker, &v2, "dev-03", &health);
    broker.publish_retained(&topics.chunk(&sha, 0), tampered);
    // And chunk 1's topic carries a chunk of another artifact.
    let foreign = postcard::to_stdvec(&Chunk::V1 {
        sha256: [7; 32],
        index: 1,
        data: vec![0; 16],
    })
    .unwrap();
    broker.publish_retained(&topics.chunk(&sha, 1), foreign);
    device.start(None);
    watch.wait_event(Duration::from_secs(30), "chunk of another artifact", |(_, v, k)| {
        *v == 2 && matches!(k, EventKind::Rejected { reason } if reason.contains("chunk 1") && reason.contains("carries chunk 1 of 070707070707"))
    });
    watch.wait_event(Duration::from_secs(30), "tampered chunk", |(_, v, k)| {
        *v == 2 && matches!(k, EventKind::Rejected { reason } if reason.contains("chunk 0") && reason.contains("sha256 mismatch"))
    });
    // The committed v1 keeps running; nothing of v2 started.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(device.started_versions(), [1, 1], "{}", device.stderr());
    watch.wait_running(1, Duration::from_secs(10));
}

#[test]
fn sigkill_at_every_step_of_an_update_leaves_the_old_or_the_new_module_running() {
    let health = ["--health-window-ms", "1000", "--tick-ms", "100"];
    for (step, first_after_restart) in [
        ("download", 1),
        ("stage", 1),
        ("activate", 1),
        ("commit", 2),
    ] {
        let (broker, watch, mut device) = device_at_v1("dev-05", &health);
        device.kill();

        push(&broker, &app("x86_64-linux", 2, false), "dev-05", &health);
        device.start(Some(step));
        device.wait_dead(Duration::from_secs(30));
        let before = device.started_versions().len();
        device.start(None);
        eventually(
            Duration::from_secs(30),
            || device.started_versions().len() > before,
            || {
                format!(
                    "{step}: nothing started after the restart\n{}",
                    device.stderr()
                )
            },
        );
        assert_eq!(
            device.started_versions()[before],
            first_after_restart,
            "{step}: the first module after the restart"
        );
        // And the update then completes (after `commit` it already had).
        watch.wait_running(2, Duration::from_secs(30));
    }
}

/// The modules (name, version) of the retained desired state on `topic`.
fn desired_modules(url: &str, topic: &str) -> Option<Vec<(String, u64)>> {
    let payload = retained(url, topic).remove(topic)?;
    let d = SignedDesired::peek(&payload).unwrap();
    Some(
        d.modules
            .iter()
            .map(|m| (m.name.clone(), m.version))
            .collect(),
    )
}

#[test]
fn rollout_hands_over_to_the_group_halts_at_a_canary_that_rolls_back_and_gc_removes_only_unreferenced_chunks(
) {
    let broker = Broker::start();
    let names = ["dev-a", "dev-b", "dev-c"];
    let watches: Vec<Watch> = names.iter().map(|n| Watch::start(&broker, n)).collect();
    let mut devices: Vec<FleetDevice> = names
        .iter()
        .map(|n| {
            let mut d = FleetDevice::new("x86_64-linux", n, &broker);
            d.groups = vec!["lab".into()];
            d.start(None);
            d
        })
        .collect();
    let key = shared().key();
    let url = broker.url();
    for n in names {
        wait_online(&url, n);
    }
    // Only reports signed by enrolled keys count as a wave's success.
    let enroll = [
        "enroll",
        "--group",
        "lab",
        "--sign",
        path_str(&key),
        "--broker",
        &url,
    ];
    kiln_compiler::commands::enroll::EnrollCommand::try_parse_from(enroll)
        .unwrap()
        .execute()
        .expect("enroll");
    let topics = Topics::new(DEFAULT_PREFIX);
    // Sent whole, so gc's view of the broker is by artifact.
    let health = QUICK_RAW;
    let rollout = |artifact: &Path| {
        let mut args = vec![
            "rollout",
            path_str(artifact),
            "--group",
            "lab",
            "--sign",
            path_str(&key),
            "--broker",
            &url,
            "--wave-timeout",
            "60s",
        ];
        args.extend(health);
        RolloutCommand::try_parse_from(args).unwrap().execute()
    };
    let app_v = |v: u64| Some(vec![("app".to_string(), v)]);
    rollout(&app("x86_64-linux", 1, false)).expect("v1 rolls out to every device");
    for w in &watches {
        w.wait_running(1, Duration::from_secs(10));
    }
    // The group's desired state now names v1; the devices' own name nothing, so they
    // do not shadow the group's.
    assert_eq!(
        desired_modules(&url, &topics.group_desired("lab")),
        app_v(1)
    );
    for n in names {
        assert_eq!(
            desired_modules(&url, &topics.desired(n)),
            Some(vec![]),
            "{n}: its own desired state is signed and empty"
        );
    }

    // v2 crashes: the canary (dev-a, first by name) rolls back and the rollout halts.
    let err = rollout(&app("x86_64-linux", 2, true)).expect_err("a rollback halts the rollout");
    let err = format!("{err:#}");
    assert!(
        err.contains("rollout halted in wave 1: 1 of 1 devices of the wave failed (allowed: 0): dev-a: rolled back"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    for w in &watches {
        assert_eq!(
            w.reported_app(),
            Some((1, "Running".into())),
            "every device still runs v1"
        );
    }
    assert!(
        watches[1].events().iter().all(|(_, v, _)| *v == 1),
        "dev-b was never asked for v2"
    );
    assert_eq!(
        desired_modules(&url, &topics.desired("dev-a")),
        Some(vec![]),
        "the canary that did not commit falls back to the group's v1"
    );
    assert_eq!(
        desired_modules(&url, &topics.group_desired("lab")),
        app_v(1)
    );

    // A push to the group reaches every device: no device-scoped entry shadows it.
    let v3 = app("x86_64-linux", 3, false);
    try_push(&url, &v3, ["--group", "lab"], &health).expect("push v3 to the group");
    for w in &watches {
        w.wait_committed(3, Duration::from_secs(30));
        w.wait_running(3, Duration::from_secs(10));
    }

    // v1 and v2 are referenced by nobody now.
    let sha = |p: &Path| sha256(&std::fs::read(p).unwrap());
    let (v1, v2) = (
        sha(&app("x86_64-linux", 1, false)),
        sha(&app("x86_64-linux", 2, true)),
    );
    gc(&url, &[]);
    assert_eq!(
        artifacts_on(&url),
        BTreeSet::from([v1, v2, sha(&v3)]),
        "uploads younger than the grace period stay"
    );
    gc(&url, &["--grace-s", "0"]);
    assert_eq!(
        artifacts_on(&url),
        BTreeSet::from([sha(&v3)]),
        "only the referenced v3 stays"
    );
    devices.iter_mut().for_each(FleetDevice::kill);
}

#[test]
fn device_and_fleet_tool_reach_a_tls_broker_that_requires_client_certificates() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let mut device = FleetDevice::new("x86_64-linux", "dev-tls", &broker);
    device.broker = url.clone();
    device.mqtt_extra = format!(
        "ca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
        path_str(&pki.ca),
        path_str(&pki.client_cert),
        path_str(&pki.client_key)
    );
    device.start(None);
    let v1 = app("x86_64-linux", 1, false);
    let tls = [
        "--ca",
        path_str(&pki.ca),
        "--client-cert",
        path_str(&pki.client_cert),
        "--client-key",
        path_str(&pki.client_key),
    ];
    let push_args = |extra: &[&str]| {
        let extra = [&["--health-window-ms", "1000"], extra].concat();
        try_push(&url, &v1, ["--device", "dev-tls"], &extra)
    };
    // Without a client certificate the broker turns the fleet tool away.
    let refused = push_args(&[&tls[..2]].concat()).expect_err("no client certificate");
    assert_eq!(
        kiln_compiler::exit::code_of(&refused) as u8,
        69,
        "{refused:#}"
    );
    push_args(&tls).expect("push over TLS");
    eventually(
        Duration::from_secs(30),
        || device.started_versions() == [1],
        || format!("v1 never ran over TLS\n{}", device.stderr()),
    );
}

#[test]
fn a_device_follows_its_groups_desired_state() {
    let broker = Broker::start();
    let watch = Watch::start(&broker, "dev-g");
    let mut device = FleetDevice::new("x86_64-linux", "dev-g", &broker);
    device.groups = vec!["field".into()];
    device.start(None);
    let v1 = app("x86_64-linux", 1, false);
    try_push(
        &broker.url(),
        &v1,
        ["--group", "field"],
        &["--health-window-ms", "1000"],
    )
    .unwrap();
    watch.wait_committed(1, Duration::from_secs(30));
    watch.wait_running(1, Duration::from_secs(10));
}

#[test]
fn kiln_devices_shows_the_fleet_and_a_killed_device_goes_offline_by_its_last_will() {
    let (broker, watch, mut device) = device_at_v1("dev-w", &["--health-window-ms", "500"]);
    watch.wait_running(1, Duration::from_secs(30));
    let kiln = kiln_e2e::target_dir().join("debug/kiln");
    let devices = || -> Value {
        let out = Command::new(&kiln)
            .args(["devices", "--json", "--broker", &broker.url()])
            .output()
            .expect("kiln devices");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(text.lines().find(|l| l.contains("dev-w")).unwrap_or("null")).unwrap()
    };
    let row = devices();
    assert_eq!(row["status"]["online"], true, "{row}");
    assert_eq!(row["status"]["triple"], "x86_64-unknown-linux-gnu");
    assert_eq!(row["reported"]["modules"][0]["name"], "app");
    assert_eq!(row["reported"]["modules"][0]["version"], 1);
    assert_eq!(row["reported"]["modules"][0]["state"], "running");

    // SIGKILL: no clean goodbye, so the broker publishes the device's last will.
    device.kill();
    eventually(
        Duration::from_secs(10),
        || devices()["status"]["online"] == false,
        || format!("{}", devices()),
    );
}

#[test]
fn pushes_in_quick_succession_end_at_the_newest_version() {
    let health = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let (broker, watch, device) = device_at_v1("dev-q", &health);
    // v3 arrives while v2 is still downloading or on trial: the device ends at v3.
    push(&broker, &app("x86_64-linux", 2, false), "dev-q", &health);
    push(&broker, &app("x86_64-linux", 3, false), "dev-q", &health);
    watch.wait_committed(3, Duration::from_secs(30));
    watch.wait_running(3, Duration::from_secs(10));
    assert_eq!(device.started_versions().last(), Some(&3));
}

#[test]
fn a_revert_during_a_trial_ends_on_the_old_version_and_the_next_one_installs() {
    let quick = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let (broker, watch, device) = device_at_v1("dev-r", &quick);
    // v2 goes on a long trial; the operator pushes v1 back during it.
    let long = ["--health-window-ms", "20000", "--tick-ms", "100"];
    push(&broker, &app("x86_64-linux", 2, false), "dev-r", &long);
    watch.wait_event(Duration::from_secs(30), "activated v2", |(m, v, k)| {
        m == "app" && *v == 2 && *k == EventKind::Activated
    });
    push(&broker, &app("x86_64-linux", 1, false), "dev-r", &quick);
    watch.wait_event(Duration::from_secs(10), "v2's trial ended", |(m, v, k)| {
        m == "app" && *v == 2 && matches!(k, EventKind::RolledBack { .. })
    });
    watch.wait_running(1, Duration::from_secs(10));
    // Past v2's health window: it was never committed, and the floor did not rise.
    std::thread::sleep(Duration::from_secs(20));
    assert!(
        !watch
            .events()
            .iter()
            .any(|(m, v, k)| m == "app" && *v == 2 && *k == EventKind::Committed),
        "{:#?}",
        watch.events()
    );
    assert_eq!(watch.reported_app(), Some((1, "Running".into())));
    push(&broker, &app("x86_64-linux", 3, false), "dev-r", &quick);
    watch.wait_committed(3, Duration::from_secs(30));
    assert_eq!(device.started_versions().last(), Some(&3));
}

#[test]
fn a_broker_restarted_without_persistence_still_takes_the_next_push() {
    let quick = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let (mut broker, watch, _device) = device_at_v1("dev-p", &quick);
    push(&broker, &app("x86_64-linux", 2, false), "dev-p", &quick);
    watch.wait_committed(2, Duration::from_secs(30));
    // The broker forgets every retained desired state and its serial.
    broker.restart_forgetting();
    push(&broker, &app("x86_64-linux", 3, false), "dev-p", &quick);
    watch.wait_committed(3, Duration::from_secs(30));
    assert!(
        !watch.events().iter().any(
            |(_, _, k)| matches!(k, EventKind::Rejected { reason } if reason.contains("serial"))
        ),
        "{:#?}",
        watch.events()
    );
}

#[test]
fn oversized_retained_messages_are_reported_and_the_device_stays_connected() {
    let quick = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let (broker, watch, device) = device_at_v1("dev-big", &quick);
    let topics = Topics::new(DEFAULT_PREFIX);
    // 3 MiB on the device's desired topic: over kiln's limit, under the link's.
    broker.publish_retained(&topics.desired("dev-big"), vec![7; 3 << 20]);
    watch.wait_event(Duration::from_secs(20), "oversized desired state", |(_, _, k)| {
        matches!(k, EventKind::Rejected { reason } if reason.contains("3145728 bytes (limit"))
    });
    // A signed desired state whose first chunk is 3 MiB of junk.
    let bytes = std::fs::read(app("x86_64-linux", 2, false)).unwrap();
    let (artifact, transfer) = TargetArtifact::whole(
        &bytes,
        "x86_64-unknown-linux-gnu",
        Vec::new(),
        Codec::Raw,
        4096,
    );
    let sha = transfer.transfer.sha256;
    broker.publish_retained(&topics.list(&sha), transfer.list_message.clone());
    for (n, chunk) in transfer.chunk_messages().skip(1) {
        broker.publish_retained(&topics.chunk(&sha, n), chunk);
    }
    broker.publish_retained(&topics.chunk(&sha, 0), vec![1; 3 << 20]);
    let key = kiln_compiler::keyfile::read_secret(&shared().key()).unwrap();
    let desired = Desired {
        fleet: fleet_id(),
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        scope: Scope::Device("dev-big".into()),
        serial: fresh_serial(),
        mirrors: Vec::new(),
        modules: vec![kiln_protocol::fleet::DesiredModule {
            name: "app".into(),
            version: 2,
            artifacts: vec![artifact],
            config: Vec::new(),
            limits: Default::default(),
            allow_downgrade: false,
            health_window_ms: 1500,
        }],
    };
    broker.publish_retained(
        &topics.desired("dev-big"),
        SignedDesired::sign(&desired, &[&key]),
    );
    watch.wait_event(Duration::from_secs(20), "oversized chunk", |(_, _, k)| {
        matches!(k, EventKind::Rejected { reason } if reason.contains("chunk 0") && reason.contains("limit"))
    });
    // The link never dropped, and a good update pushed after it commits.
    push(&broker, &app("x86_64-linux", 3, false), "dev-big", &quick);
    watch.wait_committed(3, Duration::from_secs(30));
    assert!(
        !device.stderr().contains("connection lost"),
        "{}",
        device.stderr()
    );
}

/// Issue 12: a module that floods took the device off the broker, and fleet updates
/// stopped with it. Next to three local flooders (megabyte lines, a 64 KiB publish
/// loop, a log loop), an update still downloads, passes its health window and
/// commits, twice.
#[test]
fn fleet_updates_commit_next_to_flooding_local_modules() {
    let target = "x86_64-linux";
    let broker = Broker::start();
    let watch = Watch::start(&broker, "dev-flood");
    let mut device = FleetDevice::new(target, "dev-flood", &broker);
    let mut modules = String::from("[telemetry]\nstdout = false\n");
    for name in ["long-lines", "flood-publish", "flood-log"] {
        let artifact = shared().artifact(&format!("fixtures/{name}.wat"), target);
        modules += &format!(
            "[[module]]\nname = {name:?}\nartifact = {:?}\ntick_ms = 10\n",
            path_str(&artifact)
        );
    }
    device.mqtt_extra = modules;
    device.start(None);
    let health = ["--health-window-ms", "1500", "--tick-ms", "100"];
    push(&broker, &app(target, 1, false), "dev-flood", &health);
    watch.wait_committed(1, Duration::from_secs(60));
    push(&broker, &app(target, 2, false), "dev-flood", &health);
    watch.wait_committed(2, Duration::from_secs(60));
    assert!(
        !device.stderr().contains("broker connection lost"),
        "{}",
        device.stderr()
    );
}
/// Everything retained under `filter`, read the way the fleet tool reads it.
pub(crate) fn retained(url: &str, filter: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    retained_as(url, None, filter)
}

/// What the broker retains under `filter`, read as MQTT user `user`.
pub(crate) fn retained_as(
    url: &str,
    user: Option<&str>,
    filter: &str,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut session = kiln_compiler::broker::Session::connect(
        &kiln_protocol::mqtt::Connect {
            broker: url.to_string(),
            username: user.map(str::to_string),
            ..Default::default()
        },
        DEFAULT_PREFIX,
    )
    .unwrap();
    let out = session.retained(filter).unwrap();
    session.disconnect();
    out
}

/// The artifacts that have chunks on the broker.
fn artifacts_on(url: &str) -> BTreeSet<[u8; 32]> {
    let topics = Topics::new(DEFAULT_PREFIX);
    retained(url, &topics.all_artifacts())
        .keys()
        .filter_map(|t| topics.parse_artifact(t))
        .collect()
}

fn gc(url: &str, extra: &[&str]) {
    let mut args = vec!["gc", "--broker", url];
    args.extend_from_slice(extra);
    GcCommand::try_parse_from(&args)
        .unwrap()
        .execute()
        .unwrap_or_else(|e| panic!("kiln {}: {e:#}", args.join(" ")));
}

#[test]
fn gc_keeps_the_chunks_of_an_upload_whose_desired_state_is_not_out_yet() {
    let broker = Broker::start();
    let url = broker.url();
    let key = shared().key();
    let topics = Topics::new(DEFAULT_PREFIX);
    // What `kiln push` does before its desired state: the marker, then the chunks.
    let upload = |source: &str| -> [u8; 32] {
        let artifact = shared().artifact_with(source, "x86_64-linux", &["--name", "gc"]);
        let push = PushCommand::try_parse_from([
            "push",
            path_str(&artifact),
            "--device",
            "nobody",
            "--sign",
            path_str(&key),
            "--broker",
            &url,
            "--chunk-size",
            "1024",
        ])
        .unwrap();
        let mut session = push.release.broker.connect().unwrap();
        let scope = Scope::Device("nobody".into());
        let mut release = push.release.load(&mut session, &scope).unwrap();
        release.upload(&mut session).unwrap();
        session.disconnect();
        release.module.artifacts[0].full.sha256
    };
    let uploading = upload("compute.wat");
    let orphan = upload("fixtures/trap-tick.wat");
    // An artifact with neither a marker nor a reference (a push from before markers,
    // or one whose marker gc already removed) goes, as it always did.
    broker.publish_retained(&topics.upload(&orphan), Vec::new());
    let markers = retained(&url, &topics.all_uploads());
    assert_eq!(
        markers.keys().collect::<Vec<_>>(),
        [&topics.upload(&uploading)]
    );
    let Ok(Upload::V1 { sha256, chunks, .. }) =
        postcard::from_bytes(&markers[&topics.upload(&uploading)])
    else {
        panic!("the marker does not decode");
    };
    assert_eq!(sha256, uploading);
    assert!(chunks > 1, "{chunks} chunks");
    assert_eq!(artifacts_on(&url), BTreeSet::from([uploading, orphan]));

    gc(&url, &[]);
    assert_eq!(
        artifacts_on(&url),
        BTreeSet::from([uploading]),
        "within the grace period the upload stays, the orphan goes"
    );
    assert_eq!(retained(&url, &topics.all_uploads()).len(), 1);

    gc(&url, &["--grace-s", "0"]);
    assert!(artifacts_on(&url).is_empty(), "a stale upload goes");
    assert!(
        retained(&url, &topics.all_uploads()).is_empty(),
        "and its marker with it"
    );
}

/// Waits until `device`'s retained status says it is online.
pub(crate) fn wait_online(url: &str, device: &str) {
    let topic = Topics::new(DEFAULT_PREFIX).status(device);
    eventually(
        Duration::from_secs(30),
        || {
            retained(url, &topic).get(&topic).is_some_and(
                |p| matches!(kiln_protocol::fleet::Status::open(&topic, p), Ok((s, _)) if s.online),
            )
        },
        || format!("{device} is not online"),
    );
}

#[test]
fn a_push_that_an_online_device_refuses_fails_naming_the_device_and_its_reason() {
    let broker = Broker::start();
    let url = broker.url();
    let mut device = FleetDevice::new("x86_64-linux", "dev-r", &broker);
    device.start(None);
    wait_online(&url, "dev-r");
    // An artifact and a desired state signed by a key the device does not trust.
    let dir = tempfile::tempdir().unwrap();
    let stranger = dir.path().join("stranger.key");
    kiln_compiler::commands::keygen::KeygenCommand::try_parse_from([
        "keygen",
        "-o",
        path_str(&stranger),
    ])
    .unwrap()
    .execute()
    .unwrap();
    let artifact = dir.path().join("app.kiln");
    crate::util::compile(
        &crate::util::source("compute.wat"),
        "x86_64-linux",
        &stranger,
        &artifact,
        &["--name", "app"],
    );
    let err = PushCommand::try_parse_from([
        "push",
        path_str(&artifact),
        "--device",
        "dev-r",
        "--sign",
        path_str(&stranger),
        "--broker",
        &url,
    ])
    .unwrap()
    .execute()
    .expect_err("the device refuses the state");
    let message = format!("{err:#}");
    assert_eq!(kiln_compiler::exit::code_of(&err) as u8, 76, "{message}");
    assert!(
        message.contains("refused by dev-r: ") && message.contains("0 of the 1 signatures"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn a_read_only_or_full_data_dir_refuses_updates_and_the_committed_module_runs_on() {
    let quick = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let broker = Broker::start();
    let watch = Watch::start(&broker, "dev-disk");
    let mut device = FleetDevice::new("x86_64-linux", "dev-disk", &broker);
    device.mqtt_extra = "[telemetry]\nspool_limit = \"256KiB\"\n".into();
    let data = Tmpfs::mount(&device.dir.join("data"), "16m");
    device.start(None);
    push(&broker, &app("x86_64-linux", 1, false), "dev-disk", &quick);
    watch.wait_committed(1, Duration::from_secs(30));
    let refusals = || {
        watch
            .events()
            .iter()
            .filter(|(_, _, k)| matches!(k, EventKind::Rejected { reason } if reason.contains("updates refused")))
            .count()
    };
    let ticks = || device.records.lock().unwrap().len();

    // Read-only (a remount after an fs error): v2 is refused with the reason.
    data.read_only(true);
    // The device says no at once, and kiln push says why and fails.
    let err = try_push(
        &broker.url(),
        &app("x86_64-linux", 2, false),
        ["--device", "dev-disk"],
        &quick,
    )
    .expect_err("a device that cannot save refuses the update");
    assert!(format!("{err:#}").contains("updates refused"), "{err:#}");
    eventually(
        Duration::from_secs(20),
        || refusals() >= 1,
        || format!("{:#?}", watch.events()),
    );
    let before = ticks();
    std::thread::sleep(Duration::from_secs(2));
    assert!(ticks() > before, "the committed module stopped");
    assert_eq!(watch.reported_app(), Some((1, "Running".into())));
    // Writable again: the update that arrived meanwhile goes ahead.
    data.read_only(false);
    watch.wait_committed(2, Duration::from_secs(30));

    // Full: the same, with ENOSPC.
    let filler = data.fill();
    let err = try_push(
        &broker.url(),
        &app("x86_64-linux", 3, false),
        ["--device", "dev-disk"],
        &quick,
    )
    .expect_err("a device with a full disk refuses the update");
    assert!(format!("{err:#}").contains("updates refused"), "{err:#}");
    eventually(
        Duration::from_secs(20),
        || refusals() >= 2,
        || format!("{:#?}", watch.events()),
    );
    assert_eq!(watch.reported_app(), Some((2, "Running".into())));
    std::fs::remove_file(filler).unwrap();
    watch.wait_committed(3, Duration::from_secs(30));
    assert_eq!(device.started_versions().last(), Some(&3));
}

/// A serial above any that `kiln push` has used so far (it never goes below the time in
/// milliseconds).
pub(crate) fn fresh_serial() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ms + 60_000
}

/// Issue 13, finding 7: an older signed artifact copied into the committed slot passed
/// the anti-rollback floor, because the worker loaded whatever verified at the path.
/// The worker is now told the sha256, name and version to expect.
#[test]
fn an_older_signed_artifact_copied_into_the_slot_is_refused_by_the_worker() {
    let quick = ["--health-window-ms", "1500", "--tick-ms", "100"];
    let (broker, watch, mut device) = device_at_v1("dev-slot", &quick);
    push(&broker, &app("x86_64-linux", 2, false), "dev-slot", &quick);
    watch.wait_committed(2, Duration::from_secs(30));
    device.kill();
    // v2 went to slot B; put v1, validly signed, in its place.
    let slot = device.dir.join("data/modules/app/b.kiln");
    assert!(slot.exists());
    std::fs::copy(app("x86_64-linux", 1, false), &slot).unwrap();
    let before = device.started_versions().len();
    device.start(None);
    eventually(
        Duration::from_secs(30),
        || {
            device
                .stderr()
                .contains("is not the artifact staged for app v2")
        },
        || device.stderr(),
    );
    assert_eq!(
        device.started_versions().len(),
        before,
        "nothing started from the tampered slot"
    );
}
