//! Kiln across topologies and brokers: devices on a gateway mosquitto bridged to a
//! central one, where the fleet tool connects (as a factory runs it), and devices on
//! aedes, a second MQTT implementation, a device given two brokers that fails over
//! when one dies, and a broker that refuses subscriptions. Updates, patches, reports, events and telemetry all get through; so
//! does a broker restart. And the ACL `kiln acl` writes.

use std::time::{Duration, Instant};

use kiln_e2e::mosquitto::Broker;
use kiln_protocol::fleet::{Topics, DEFAULT_PREFIX};
use kiln_protocol::telemetry::Batch;
use rumqttc::{Client, MqttOptions, Packet, QoS};

use crate::fleet::{app, push, retained_as, wait_online, Watch};
use crate::util::FleetDevice;

const LIMIT: Duration = Duration::from_secs(60);
/// The fleet tool's MQTT user under the generated ACL.
const OPERATOR: &str = "kiln-operator";

/// The first telemetry batch of `device` that arrives at `broker`.
pub(crate) fn first_batch(broker: &Broker, device: &str) -> Option<u64> {
    let topic = Topics::new(DEFAULT_PREFIX).telemetry(device);
    let mut options = MqttOptions::new("test-telemetry", "127.0.0.1", broker.port);
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(options, 10);
    client.subscribe(&topic, QoS::AtLeastOnce).unwrap();
    let deadline = Instant::now() + LIMIT;
    for event in connection.iter() {
        if Instant::now() > deadline {
            break;
        }
        if let Ok(rumqttc::Event::Incoming(Packet::Publish(p))) = event {
            if p.topic == topic {
                let batch = Batch::decode(&p.payload).ok()?;
                let _ = client.disconnect();
                return Some(batch.seq);
            }
        }
    }
    None
}

#[test]
fn a_device_behind_a_bridged_gateway_updates_and_reports_to_the_central_broker() {
    let central = Broker::start();
    let mut gateway = Broker::start_bridged(&central, DEFAULT_PREFIX);
    updates_reports_and_survives_a_restart(Some(&central), &mut gateway);
}

/// A device and the fleet tool given two brokers (`URL,URL`, as a cluster's nodes):
/// the first dies, the device moves to the second on its own, and a push naming both
/// reaches it there. The brokers are two lone mosquittos, so nothing retained crosses
/// over: the device's birth message on the second is its own, sent on reconnecting.
#[test]
fn a_device_given_two_brokers_moves_to_the_second_when_the_first_dies() {
    let mut first = Broker::start();
    let second = Broker::start();
    let both = format!("{},{}", first.url(), second.url());
    let watch_first = Watch::start(&first, "dev-two");
    let watch_second = Watch::start(&second, "dev-two");
    let mut device = FleetDevice::new("x86_64-linux", "dev-two", &first);
    device.broker = both.clone();
    device.start(None);
    wait_online(&first.url(), "dev-two");
    let health = ["--health-window-ms", "1000", "--tick-ms", "100"];
    push(&first, &app("x86_64-linux", 1, false), "dev-two", &health);
    watch_first.wait_committed(1, LIMIT);
    // A long-lived fleet tool session (a rollout's driver, the dashboard) on both.
    let mut session = kiln_compiler::broker::Session::connect(
        &kiln_protocol::mqtt::Connect::to(both.clone()),
        DEFAULT_PREFIX,
    )
    .unwrap();
    assert_eq!(session.broker(), first.url());

    first.kill();
    let killed = Instant::now();
    wait_online(&second.url(), "dev-two");
    eprintln!(
        "online on the second broker {:?} after the first died",
        killed.elapsed()
    );
    let log = device.stderr();
    assert!(
        log.contains("broker connection lost") && log.contains(&format!("next={}", second.url())),
        "the device says where it goes next:\n{log}"
    );
    // The fleet tool, given both, finds the first gone and publishes on the second.
    crate::fleet::try_push(
        &both,
        &app("x86_64-linux", 2, false),
        ["--device", "dev-two"],
        &health,
    )
    .expect("a push naming both brokers goes through the second");
    watch_second.wait_committed(2, LIMIT);
    assert_eq!(device.started_versions().last(), Some(&2));
    // The session's broker is gone: it connects again to the next one.
    session
        .reconnect()
        .expect("the session moves to the second broker");
    assert_eq!(session.broker(), second.url());
    session.disconnect();
    // kiln watch, given both, finds the first gone and watches on the second.
    let out = std::process::Command::new(kiln_e2e::kiln_path())
        .args([
            "watch",
            "--device",
            "dev-two",
            "--duration",
            "2",
            "--broker",
            &both,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("on {}", second.url())), "{stderr}");
}

/// A broker that refuses subscriptions (SUBACK 0x80: an ACL, or a loaded cluster; here
/// aedes told to refuse two filters): the device names the refusal in an event and
/// keeps its other subscriptions, and the fleet tool stops with exit 69 naming the
/// filter instead of showing an empty fleet.
#[test]
fn a_subscription_the_broker_refuses_is_named_by_the_device_and_the_fleet_tool() {
    let topics = Topics::new(DEFAULT_PREFIX);
    let west = topics.group_desired("west");
    let mut broker = Broker::start_aedes();
    broker.deny_subscribe = vec![west.clone()];
    broker.restart();
    let watch = Watch::start(&broker, "dev-deny");
    let mut device = FleetDevice::new("x86_64-linux", "dev-deny", &broker);
    device.groups = vec!["lab".into(), "west".into()];
    device.start(None);
    wait_online(&broker.url(), "dev-deny");
    watch.wait_event(LIMIT, "the refusal", |(m, _, k)| {
        m == "*"
            && k.to_string()
                .contains(&format!("the broker refused the subscription to {west}"))
    });
    // Its own desired state still arrives.
    let health = ["--health-window-ms", "1000", "--tick-ms", "100"];
    push(&broker, &app("x86_64-linux", 1, false), "dev-deny", &health);
    watch.wait_committed(1, LIMIT);
    // And it asks again (5 s later), and is refused again.
    crate::util::eventually(
        LIMIT,
        || {
            device
                .stderr()
                .lines()
                .filter(|l| l.contains("the broker refused a subscription") && l.contains(&west))
                .count()
                >= 2
        },
        || format!("asked once only:\n{}", device.stderr()),
    );

    // Now every device's reported state is refused (to the fleet tool too).
    broker.deny_subscribe.push(topics.all_devices("reported"));
    broker.restart();
    let out = std::process::Command::new(kiln_e2e::kiln_path())
        .args(["devices", "--broker", &broker.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "refused the subscription to `{}`",
            topics.all_devices("reported")
        )),
        "{stderr}"
    );
}

#[test]
fn a_device_on_aedes_updates_and_reports_as_on_mosquitto() {
    let mut aedes = Broker::start_aedes();
    updates_reports_and_survives_a_restart(None, &mut aedes);
}

/// What every topology must carry: a device on `devices` (the fleet tool on `central`,
/// or on the same broker) announces itself, takes v1, then v2 as a patch from what it
/// reported, sends telemetry, and after its broker restarts takes v3.
fn updates_reports_and_survives_a_restart(central: Option<&Broker>, devices: &mut Broker) {
    let fleet_side = |devices: &Broker| central.map_or(devices.url(), Broker::url);
    let watch = Watch::start(central.unwrap_or(devices), "dev-gw");
    let mut device = FleetDevice::new("x86_64-linux", "dev-gw", devices);
    device.start(None);
    // Its birth message reached the fleet tool's broker, retained.
    wait_online(&fleet_side(devices), "dev-gw");
    let health = ["--health-window-ms", "1000", "--tick-ms", "100"];
    push(
        central.unwrap_or(devices),
        &app("x86_64-linux", 1, false),
        "dev-gw",
        &health,
    );
    watch.wait_committed(1, LIMIT);
    // v2 travels as a patch from v1 the device reported.
    push(
        central.unwrap_or(devices),
        &app("x86_64-linux", 2, false),
        "dev-gw",
        &health,
    );
    watch.wait_committed(2, LIMIT);
    assert_eq!(device.started_versions().last(), Some(&2));
    assert!(
        first_batch(central.unwrap_or(devices), "dev-gw").is_some(),
        "no telemetry batch reached the fleet tool's broker"
    );
    // The device's broker restarts (a power cut in the factory): the device reconnects
    // to it, and the next update still arrives.
    devices.restart();
    wait_online(&fleet_side(devices), "dev-gw");
    push(
        central.unwrap_or(devices),
        &app("x86_64-linux", 3, false),
        "dev-gw",
        &health,
    );
    watch.wait_committed(3, LIMIT);
}

#[test]
fn under_the_generated_acl_a_device_updates_but_cannot_speak_for_others() {
    use kiln_compiler::commands::acl::{render, AclFormat};
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("kiln.acl");
    std::fs::write(
        &acl,
        render(AclFormat::Mosquitto, DEFAULT_PREFIX, OPERATOR, &[]),
    )
    .unwrap();
    // mosquitto drops to its own user: it must be able to read the file.
    for (p, mode) in [(acl_dir.path(), 0o755), (acl.as_path(), 0o644)] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut broker = Broker::start();
    broker.extra_config = format!("acl_file {}\n", acl.display());
    broker.restart();
    let url = broker.url();
    let topics = Topics::new(DEFAULT_PREFIX);
    let mut device = FleetDevice::new("x86_64-linux", "dev-acl", &broker);
    device.mqtt_extra = "username = \"dev-acl\"\n".into();
    device.start(None);
    let reported = topics.reported("dev-acl");
    let running = |version: u64| {
        retained_as(&url, Some(OPERATOR), &reported)
            .get(&reported)
            .and_then(|p| kiln_protocol::fleet::Reported::open(&reported, p).ok())
            .is_some_and(|(r, _)| {
                r.modules.iter().any(|m| {
                    m.name == "app" && m.version == version && format!("{:?}", m.state) == "Running"
                })
            })
    };
    let health = [
        "--health-window-ms",
        "1000",
        "--tick-ms",
        "100",
        "--username",
        OPERATOR,
    ];
    push(&broker, &app("x86_64-linux", 1, false), "dev-acl", &health);
    crate::util::eventually(LIMIT, || running(1), || "dev-acl does not run v1".into());

    // As dev-acl, it cannot report for another device nor write its own desired state.
    let other = topics.reported("dev-other");
    broker.publish_retained_as(Some("dev-acl"), &other, vec![0, 9, 0]);
    let desired = topics.desired("dev-acl");
    let before = retained_as(&url, Some(OPERATOR), &desired);
    broker.publish_retained_as(Some("dev-acl"), &desired, vec![1, 2, 3]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(retained_as(&url, Some(OPERATOR), &other).is_empty());
    assert_eq!(retained_as(&url, Some(OPERATOR), &desired), before);
    // Still confined, the device takes the next release.
    push(&broker, &app("x86_64-linux", 2, false), "dev-acl", &health);
    crate::util::eventually(LIMIT, || running(2), || "dev-acl does not run v2".into());
}
