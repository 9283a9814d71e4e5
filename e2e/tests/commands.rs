//! `kiln send` against a real mosquitto: a command reaches a module on an x86_64 device
//! and on the aarch64 build under qemu-user and the module's reply comes back signed by
//! the device; a command signed by a key the root does not name, a replay of a taken
//! one and an oversized one are refused, and none reaches the module.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::mosquitto::Broker;
use kiln_protocol::command::{self, Outcome, Reply, To};
use kiln_protocol::fleet::{open_report, EventKind, Topics, DEFAULT_PREFIX};
use kiln_protocol::keys::SecretKey;
use rumqttc::{Client, MqttOptions, Packet, QoS};

use crate::fleet::{push, Watch};
use crate::util::{fleet_id, now_ms, path_str, shared, FleetDevice};
use kiln_e2e::Run;

/// A device of `target` named `id` running the `commanded` fixture as module `app`.
fn commanded(target: &str, id: &str) -> (Broker, Watch, FleetDevice) {
    let broker = Broker::start();
    let watch = Watch::start(&broker, id);
    let mut device = FleetDevice::new(target, id, &broker);
    device.start(None);
    let app = shared().artifact_with(
        "fixtures/commanded.wat",
        target,
        &["--name", "app", "--version", "1"],
    );
    push(&broker, &app, id, &["--health-window-ms", "500"]);
    watch.wait_committed(1, Duration::from_secs(90));
    (broker, watch, device)
}

/// `kiln enroll ID`: its identity key, from its status, into the registry.
fn enroll(broker: &Broker, id: &str) {
    let mut cmd = Command::new(kiln_e2e::kiln_path());
    cmd.args(["enroll", id, "--sign"])
        .arg(path_str(&shared().key()))
        .args(["--broker", &broker.url()]);
    Run::new(cmd).ok("kiln enroll");
}

/// `kiln send --device ID --sign fleet.key --broker URL ARGS...` (`--module app`
/// unless ARGS name one).
fn send(broker: &Broker, id: &str, args: &[&str]) -> Run {
    let key = shared().key();
    let mut cmd = Command::new(kiln_e2e::kiln_path());
    cmd.args(["send", "--device", id, "--sign"])
        .arg(path_str(&key))
        .args(["--broker", &broker.url()])
        .args(args);
    if !args.contains(&"--module") {
        cmd.args(["--module", "app"]);
    }
    Run::new(cmd)
}

fn reaches_the_module_and_the_reply_comes_back(target: &str, id: &str) {
    let (broker, _watch, _device) = commanded(target, id);
    // Before the device is enrolled its reply is shown, said to be from a key the
    // registry does not hold; after, it is checked against the enrolled key.
    let out = send(&broker, id, &["--topic", "open", "--data", "30"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        out.stdout.trim(),
        format!("{id}: status 0: command/open=30 (key not enrolled)"),
        "{out}"
    );
    enroll(&broker, id);
    let out = send(&broker, id, &["--topic", "open", "--data", "30"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        out.stdout.trim(),
        format!("{id}: status 0: command/open=30"),
        "{out}"
    );

    // The module's own status and a bounded wait, as a script reads them.
    let failed = send(
        &broker,
        id,
        &["--topic", "open", "--data", "fail", "--json"],
    );
    assert_eq!(failed.code, Some(1), "{failed}");
    let row: serde_json::Value = serde_json::from_str(failed.stdout.trim()).unwrap();
    assert_eq!(
        (
            &row["outcome"],
            &row["status"],
            &row["reply"],
            &row["enrolled"]
        ),
        (
            &"answered".into(),
            &7.into(),
            &"command/open=fail".into(),
            &true.into()
        ),
        "{row}"
    );
    // A module the device does not run: refused by the device, named.
    let none = send(&broker, id, &["--topic", "open", "--module", "nope"]);
    assert_eq!(none.code, Some(76), "{none}");
    assert!(
        none.stdout
            .contains("refused: module nope does not run on this device"),
        "{none}"
    );
}

#[test]
fn kiln_send_reaches_a_module_and_its_reply_comes_back_on_x86_64() {
    reaches_the_module_and_the_reply_comes_back("x86_64-linux", "cmd-x86");
}

#[test]
fn kiln_send_reaches_a_module_and_its_reply_comes_back_on_aarch64_under_qemu() {
    reaches_the_module_and_the_reply_comes_back("aarch64-linux", "cmd-arm");
}

/// The broker as an attacker sees it: any client may publish on a command topic.
struct Attacker {
    client: Client,
    replies: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Attacker {
    fn connect(broker: &Broker, id: &str) -> Self {
        let topics = Topics::new(DEFAULT_PREFIX);
        let mut options = MqttOptions::new(format!("attacker-{id}"), "127.0.0.1", broker.port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 10);
        let (tx, replies) = std::sync::mpsc::channel();
        let topic = topics.replies(id);
        let subscriber = client.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = subscriber.subscribe(&topic, QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        Self { client, replies }
    }

    fn publish(&self, id: &str, payload: Vec<u8>) {
        let topic = Topics::new(DEFAULT_PREFIX).commands(id);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// The next reply the device signed, within `limit`.
    fn reply(&self, id: &str, limit: Duration) -> Option<command::ReplyV1> {
        let topic = Topics::new(DEFAULT_PREFIX).replies(id);
        let bytes = self.replies.recv_timeout(limit).ok()?;
        match open_report::<Reply>(&topic, &bytes) {
            Ok((Reply::V1(r), Some(_))) => Some(r),
            other => panic!("not a signed reply: {other:?}"),
        }
    }
}

#[test]
fn untrusted_replayed_and_oversized_commands_are_refused_and_never_reach_the_module() {
    let id = "cmd-refusals";
    let (broker, watch, _device) = commanded("x86_64-linux", id);
    let attacker = Attacker::connect(&broker, id);
    let now = now_ms();
    let command = |n: u64| command::Command {
        fleet: fleet_id(),
        to: To::Device(id.into()),
        module: "app".into(),
        topic: "open".into(),
        data: b"1".to_vec(),
        id: n,
        issued_ms: now,
        expires_ms: now + 60_000,
        reply: true,
    };
    let release = SecretKey::from_text(&std::fs::read_to_string(shared().key()).unwrap()).unwrap();
    let answered = |r: &command::ReplyV1| match &r.outcome {
        Outcome::Answered { status, data } => Some((*status, data.clone())),
        _ => None,
    };

    // Signed by the fleet's release key: taken, answered.
    let genuine = command(1).sign(&[&release]).unwrap();
    attacker.publish(id, genuine.clone());
    let first = attacker
        .reply(id, Duration::from_secs(10))
        .expect("a reply");
    assert_eq!(
        (first.id, answered(&first)),
        (1, Some((0, b"command/open=1".to_vec())))
    );

    // The same bytes again (a captured command played back): refused, said why.
    attacker.publish(id, genuine);
    let replay = attacker
        .reply(id, Duration::from_secs(10))
        .expect("a reply");
    assert!(
        matches!(&replay.outcome, Outcome::Refused(why) if why.contains("replay")),
        "{replay:?}"
    );

    // Signed by a key the root does not name: no reply to a stranger, an event.
    let stranger = SecretKey::generate().unwrap();
    attacker.publish(id, command(2).sign(&[&stranger]).unwrap());
    // Bigger than any command: refused before it is decoded.
    attacker.publish(id, vec![0u8; command::MAX_COMMAND + 1]);
    watch.wait_event(Duration::from_secs(10), "untrusted command refused", |(_, _, k)| {
        matches!(k, EventKind::Rejected { reason } if reason.contains("command refused") && reason.contains("signatures it needs"))
    });
    watch.wait_event(Duration::from_secs(10), "oversized command refused", |(_, _, k)| {
        matches!(k, EventKind::Rejected { reason } if reason.contains("command refused") && reason.contains("limit"))
    });
    assert!(
        attacker.reply(id, Duration::from_secs(2)).is_none(),
        "a reply to a command the device did not trust"
    );

    // kiln refuses an oversized command itself, naming the limit, before the broker.
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), vec![b'x'; command::MAX_DATA + 1]).unwrap();
    let out = send(
        &broker,
        id,
        &["--topic", "open", "--data-file", path_str(big.path())],
    );
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("16384"), "{out}");

    // And the device still answers a genuine one.
    let ok = send(&broker, id, &["--topic", "close"]);
    assert_eq!(ok.code, Some(0), "{ok}");
    assert_eq!(
        ok.stdout.trim(),
        format!("{id}: status 0: command/close= (key not enrolled)")
    );
}
