//! The trust model against mosquitto and real devices: key rotation reaching online
//! and offline devices, signing apart from publishing with a k-of-n threshold, and
//! every attack of the threat table (docs/src/trust.md) refused with an event while what runs
//! stays. Each test has a fleet of its own (its own root), made by `kiln keygen`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{kiln_path, Run};
use kiln_protocol::fleet::{
    seal_report, Desired, EventKind, Reported, ReportedV1, Scope, SignedDesired, Topics,
    DEFAULT_PREFIX,
};
use kiln_protocol::keys::SecretKey;
use kiln_protocol::trust::{Role, Root, SignedRoot};
use serde_json::Value;

use crate::fleet::{retained, Watch};
use crate::util::{eventually, now_ms, path_str, FleetDevice};

pub(crate) const QUICK: [&str; 4] = ["--health-window-ms", "1000", "--tick-ms", "100"];
pub(crate) const LIMIT: Duration = Duration::from_secs(30);

/// A fleet of its own: `kiln keygen` run in a temp dir, and the `kiln` binary run there
/// (so `fleet.root` beside `fleet.key` is found as a user's would be).
pub(crate) struct Fleet {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) broker: String,
}

impl Fleet {
    pub(crate) fn new(broker: &Broker, id: &str) -> Self {
        let fleet = Self {
            dir: tempfile::tempdir().unwrap(),
            broker: broker.url(),
        };
        fleet
            .kiln(&["keygen", "-o", "fleet.key", "--fleet", id])
            .ok("keygen");
        fleet
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kiln ARGS --broker URL` for the commands that talk to the broker.
    pub(crate) fn kiln(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(kiln_path());
        cmd.current_dir(self.dir.path()).args(args);
        let offline = matches!(
            args[0],
            "keygen" | "sign" | "compile" | "release" | "provision"
        );
        if !offline && args.get(1) != Some(&"rotate") && args.get(1) != Some(&"show") {
            cmd.args(["--broker", &self.broker]);
        }
        Run::new(cmd)
    }

    /// The sensor reactor as module `app` at `version`, compiled for x86_64 and signed
    /// with this fleet's `key`.
    pub(crate) fn app(&self, version: u64, key: &str) -> PathBuf {
        self.compile("sensor_filter.wasm", "x86_64-linux", "app", version, key)
    }

    /// `source` (as [`kiln_e2e::source`] names it) compiled for `target` as module
    /// `name` at `version`, signed with this fleet's `key`; compiled once.
    pub(crate) fn compile(
        &self,
        source: &str,
        target: &str,
        name: &str,
        version: u64,
        key: &str,
    ) -> PathBuf {
        let out = self.path(&format!("{name}-{target}-{version}-{key}.kiln"));
        if !out.exists() {
            let v = version.to_string();
            self.kiln(&[
                "compile",
                path_str(&kiln_e2e::source(source)),
                "--target",
                target,
                "--name",
                name,
                "--version",
                &v,
                "--sign",
                key,
                "-o",
                path_str(&out),
            ])
            .ok("compile");
        }
        out
    }

    /// Root version n+1 with `keys` as the release role (k of them needed), signed by
    /// the offline root key, and published.
    pub(crate) fn rotate_release(&self, keys: &[&str], k: u32) {
        let k = k.to_string();
        let mut args = vec![
            "root",
            "rotate",
            "--root",
            "fleet.root",
            "--sign",
            "fleet-root.key",
        ];
        for key in keys {
            args.extend(["--release-key", key]);
        }
        args.extend(["--release-threshold", &k]);
        self.kiln(&args).ok("rotate");
        self.kiln(&["root", "publish", "fleet.root"])
            .ok("publish root");
    }

    pub(crate) fn push(&self, artifact: &Path, to: [&str; 2], key: &str) -> Run {
        let mut args = vec!["push", path_str(artifact), to[0], to[1], "--sign", key];
        args.extend(QUICK);
        self.kiln(&args)
    }

    pub(crate) fn device(&self, broker: &Broker, id: &str, groups: &[&str]) -> FleetDevice {
        let mut device = FleetDevice::new("x86_64-linux", id, broker);
        device.root = self.path("fleet.root");
        device.groups = groups.iter().map(|g| g.to_string()).collect();
        device
    }

    /// A device of this fleet, started, online, with a watch on its events.
    pub(crate) fn started(
        &self,
        broker: &Broker,
        id: &str,
        groups: &[&str],
    ) -> (Watch, FleetDevice) {
        let watch = Watch::start(broker, id);
        let mut device = self.device(broker, id, groups);
        device.start(None);
        crate::fleet::wait_online(&broker.url(), id);
        (watch, device)
    }

    pub(crate) fn key(&self, name: &str) -> SecretKey {
        kiln_compiler::keyfile::read_secret(&self.path(name)).unwrap()
    }

    pub(crate) fn root(&self) -> Root {
        SignedRoot::peek(&std::fs::read(self.path("fleet.root")).unwrap()).unwrap()
    }

    /// A desired state for `device` holding no module, signed by `keys`.
    pub(crate) fn state(
        &self,
        device: &str,
        serial: u64,
        keys: &[&SecretKey],
    ) -> (Desired, Vec<u8>) {
        let d = Desired {
            fleet: self.root().fleet,
            scope: Scope::Device(device.into()),
            serial,
            issued_ms: now_ms(),
            expires_ms: now_ms() + 3_600_000,
            mirrors: Vec::new(),
            modules: Vec::new(),
        };
        let signed = SignedDesired::sign(&d, keys);
        (d, signed)
    }
}

pub(crate) fn refused(watch: &Watch, what: &str, needle: &str) {
    watch.wait_event(LIMIT, what, |(m, _, k)| {
        m == "*" && matches!(k, EventKind::Rejected { reason } if reason.contains(needle))
    });
}

pub(crate) fn kiln_devices(fleet: &Fleet, device: &str) -> Value {
    let out = fleet.kiln(&["devices", "--json"]).ok("kiln devices");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(device))
        .unwrap_or("null");
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_key_rotation_reaches_online_and_offline_devices_and_the_old_key_is_refused_after() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "rotation");
    let (on_watch, off_watch) = (
        Watch::start(&broker, "dev-on"),
        Watch::start(&broker, "dev-off"),
    );
    let mut on = fleet.device(&broker, "dev-on", &["g"]);
    let mut off = fleet.device(&broker, "dev-off", &["g"]);
    on.start(None);
    off.start(None);
    crate::fleet::wait_online(&broker.url(), "dev-on");
    crate::fleet::wait_online(&broker.url(), "dev-off");
    fleet
        .push(&fleet.app(1, "fleet.key"), ["--group", "g"], "fleet.key")
        .ok("push v1");
    on_watch.wait_committed(1, LIMIT);
    off_watch.wait_committed(1, LIMIT);
    off.stop();

    // The release key leaked: a new one replaces it in root v2, signed offline by the
    // root key; the current states are signed again with the new key.
    fleet
        .kiln(&["keygen", "-o", "new.key", "--no-root"])
        .ok("keygen");
    fleet.rotate_release(&["new.pub"], 1);
    on_watch.wait_event(
        LIMIT,
        "root v2 taken",
        |(_, _, k)| matches!(k, EventKind::Trusted { reason } if reason.contains("root v2")),
    );
    // What the old key signed is re-signed only as an explicit decision (--adopt).
    let plain = fleet.kiln(&["refresh", "--all", "--sign", "new.key"]);
    assert_eq!(plain.code, Some(77), "{plain}");
    assert!(plain.stderr.contains("--adopt"), "{plain}");
    fleet
        .kiln(&["refresh", "--all", "--sign", "new.key", "--adopt"])
        .ok("refresh --adopt");

    // v2 with the new key: the online device takes it at once, the offline one when
    // it comes back (root v2 first, then the state).
    fleet
        .push(&fleet.app(2, "new.key"), ["--group", "g"], "new.key")
        .ok("push v2");
    on_watch.wait_committed(2, LIMIT);
    off.start(None);
    off_watch.wait_committed(2, LIMIT);

    // kiln itself refuses to sign with the old key...
    let old = fleet.push(&fleet.app(3, "fleet.key"), ["--group", "g"], "fleet.key");
    assert_ne!(old.code, Some(0), "{old}");
    assert!(old.stderr.contains("not trusted"), "{old}");
    // ...and a state signed with it, published by someone holding it, is refused.
    let (_, forged) = fleet.state("dev-on", now_ms() * 10, &[&fleet.key("fleet.key")]);
    broker.publish_retained(&Topics::new(DEFAULT_PREFIX).desired("dev-on"), forged);
    refused(&on_watch, "old key", "0 of the 1 signatures");
    on_watch.wait_running(2, LIMIT);
    assert_eq!(on.started_versions().last(), Some(&2));
}

#[test]
fn a_state_needs_its_threshold_and_is_signed_apart_from_publishing() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "twokeys");
    let (watch, _device) = fleet.started(&broker, "dev-t", &[]);
    // Two release keys, both needed.
    for k in ["alice", "bob"] {
        fleet
            .kiln(&["keygen", "-o", &format!("{k}.key"), "--no-root"])
            .ok("keygen");
    }
    fleet.rotate_release(&["alice.pub", "bob.pub"], 2);

    // The release is built and signed by the signer (no broker); the publisher (no key)
    // uploads it and writes the state; each signer signs the file; the publisher
    // publishes it.
    let release = fleet.path("app.kilnrel");
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    fleet
        .kiln(&[
            "release",
            path_str(&wasm),
            "--target",
            "x86_64-linux",
            "--name",
            "app",
            "--version",
            "1",
            "--sign",
            "alice.key",
            "-o",
            path_str(&release),
        ])
        .ok("release");
    let mut args = vec!["push", path_str(&release), "--device", "dev-t"];
    args.extend(QUICK);
    args.extend(["--unsigned", "dev-t.kilnstate", "--root", "fleet.root"]);
    fleet.kiln(&args).ok("push --unsigned");
    let shown = fleet
        .kiln(&["sign", "dev-t.kilnstate", "--key", "alice.key"])
        .ok("sign alice");
    // Everything the signature commits to is shown before it is made.
    for fact in [
        "serial",
        "downgrade  refused",
        "health     1000 ms",
        "tick_ms 100",
        "config     0 B",
        "artifact   x86_64-unknown-linux-gnu",
    ] {
        assert!(shown.stdout.contains(fact), "`{fact}` in {shown}");
    }
    let early = fleet.kiln(&["push", "dev-t.kilnstate", "--root", "fleet.root"]);
    assert_ne!(early.code, Some(0), "{early}");
    assert!(early.stderr.contains("1 of the 2 signatures"), "{early}");
    // Published anyway by someone with broker access: the device refuses it too.
    let one = std::fs::read(fleet.path("dev-t.kilnstate")).unwrap();
    let topic = Topics::new(DEFAULT_PREFIX).desired("dev-t");
    broker.publish_retained(&topic, one[b"KILNSTATE\x01".len()..].to_vec());
    refused(&watch, "threshold", "1 of the 2 signatures");
    fleet
        .kiln(&["sign", "dev-t.kilnstate", "--key", "bob.key"])
        .ok("sign bob");
    fleet
        .kiln(&["push", "dev-t.kilnstate", "--root", "fleet.root"])
        .ok("publish");
    watch.wait_committed(1, LIMIT);
}

#[test]
fn replays_expired_states_other_fleets_and_reused_serials_are_refused() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "prod");
    let (watch, device) = fleet.started(&broker, "dev-r", &[]);
    let topic = Topics::new(DEFAULT_PREFIX).desired("dev-r");
    fleet
        .push(
            &fleet.app(1, "fleet.key"),
            ["--device", "dev-r"],
            "fleet.key",
        )
        .ok("push v1");
    watch.wait_committed(1, LIMIT);
    let v1_state = retained(&broker.url(), &topic)[&topic].clone();
    fleet
        .push(
            &fleet.app(2, "fleet.key"),
            ["--device", "dev-r"],
            "fleet.key",
        )
        .ok("push v2");
    watch.wait_committed(2, LIMIT);
    let key = fleet.key("fleet.key");

    // An old state replayed: older than what was applied.
    broker.publish_retained(&topic, v1_state.clone());
    refused(&watch, "replay", "(a replay)");
    // A state from staging (same release key, another fleet id).
    let (mut d, _) = fleet.state("dev-r", now_ms() * 10, &[&key]);
    d.fleet = "staging".into();
    broker.publish_retained(&topic, SignedDesired::sign(&d, &[&key]));
    refused(&watch, "staging", "is for fleet staging");
    // An expired state.
    let (mut d, _) = fleet.state("dev-r", now_ms() * 10, &[&key]);
    d.expires_ms = now_ms() - 1000;
    broker.publish_retained(&topic, SignedDesired::sign(&d, &[&key]));
    refused(&watch, "expired", "expired at");
    // The applied serial again, with another body.
    let reported = Reported::open(
        &Topics::new(DEFAULT_PREFIX).reported("dev-r"),
        &retained(
            &broker.url(),
            &Topics::new(DEFAULT_PREFIX).reported("dev-r"),
        )[&Topics::new(DEFAULT_PREFIX).reported("dev-r")],
    )
    .unwrap()
    .0
    .serial;
    let (_, reused) = fleet.state("dev-r", reported, &[&key]);
    broker.publish_retained(&topic, reused);
    refused(&watch, "reused serial", "already applied with another body");
    watch.wait_running(2, LIMIT);
    assert_eq!(device.started_versions().last(), Some(&2));

    // A device provisioned now never takes the v1 state (issued before), though it is
    // signed, for it, and not expired.
    let fresh_watch = Watch::start(&broker, "dev-new");
    let mut fresh = fleet.device(&broker, "dev-new", &[]);
    fresh.mqtt_extra = format!("not_before = {:?}\n", kiln_protocol::fleet::utc(now_ms()));
    let fresh_topic = Topics::new(DEFAULT_PREFIX).desired("dev-new");
    let (mut old, _) = fleet.state("dev-new", 5, &[&key]);
    old.issued_ms = now_ms() - 600_000;
    broker.publish_retained(&fresh_topic, SignedDesired::sign(&old, &[&key]));
    fresh.start(None);
    refused(
        &fresh_watch,
        "pre-provisioning",
        "before this device was provisioned",
    );
}

#[test]
fn a_broker_that_keeps_serving_an_old_state_is_reported_as_stale() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "freeze");
    let watch = Watch::start(&broker, "dev-f");
    let mut device = fleet.device(&broker, "dev-f", &[]);
    device.mqtt_extra = "stale_after_s = 3\n".into();
    device.start(None);
    fleet
        .push(
            &fleet.app(1, "fleet.key"),
            ["--device", "dev-f"],
            "fleet.key",
        )
        .ok("push v1");
    watch.wait_committed(1, LIMIT);
    // Nothing newer arrives (the broker withholds it): after the bound the device says so.
    watch.wait_event(LIMIT, "stale", |(m, _, k)| {
        m == "*" && matches!(k, EventKind::Stale { reason } if reason.contains("newer ones may be withheld"))
    });
    eventually(
        LIMIT,
        || kiln_devices(&fleet, "dev-f")["status"]["stale"].is_string(),
        || format!("{}", kiln_devices(&fleet, "dev-f")),
    );
    watch.wait_running(1, LIMIT);
    // A refreshed state ends it.
    fleet
        .kiln(&["refresh", "--device", "dev-f", "--sign", "fleet.key"])
        .ok("refresh");
    eventually(
        LIMIT,
        || kiln_devices(&fleet, "dev-f")["status"]["stale"].is_null(),
        || format!("{}", kiln_devices(&fleet, "dev-f")),
    );
}

#[test]
fn roots_that_skip_a_version_or_come_from_another_root_are_refused() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "roots");
    let (watch, _device) = fleet.started(&broker, "dev-k", &[]);
    let topics = Topics::new(DEFAULT_PREFIX);
    let root_key = fleet.key("fleet-root.key");
    let rel = SecretKey::generate().unwrap();
    // Root `version` naming `rel` as the release key, signed by `by`.
    let root = |version: u64, by: &SecretKey| {
        Root {
            version,
            release: Role::new(&[rel.public()], 1),
            ..fleet.root()
        }
        .sign(&[by])
        .unwrap()
    };
    broker.publish_retained(&topics.root(3), root(3, &root_key));
    refused(&watch, "skipped version", "waiting for root v2");
    let rogue = SecretKey::generate().unwrap();
    broker.publish_retained(&topics.root(2), root(2, &rogue));
    refused(&watch, "wrong root", "root document refused");
    // The fleet's own key still rules.
    fleet
        .push(
            &fleet.app(1, "fleet.key"),
            ["--device", "dev-k"],
            "fleet.key",
        )
        .ok("push v1");
    watch.wait_committed(1, LIMIT);
}

#[test]
fn reports_verify_only_against_the_enrolled_key_and_rollout_counts_only_those() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "ids");
    let mut device = fleet.device(&broker, "dev-i", &["lab"]);
    device.start(None);
    crate::fleet::wait_online(&broker.url(), "dev-i");
    assert_eq!(kiln_devices(&fleet, "dev-i")["identity"], "unenrolled");
    // A rollout would wait forever on a device whose reports cannot be verified.
    let mut args = vec![
        "rollout",
        "placeholder",
        "--group",
        "lab",
        "--sign",
        "fleet.key",
    ];
    let v1 = fleet.app(1, "fleet.key");
    args[1] = path_str(&v1);
    let early = fleet.kiln(&args);
    assert_eq!(early.code, Some(77), "{early}");
    assert!(early.stderr.contains("enroll them first"), "{early}");
    fleet
        .kiln(&["enroll", "--group", "lab", "--sign", "fleet.key"])
        .ok("enroll");
    assert_eq!(kiln_devices(&fleet, "dev-i")["identity"], "verified");
    args.extend(QUICK);
    fleet.kiln(&args).ok("rollout");

    // A report forged for dev-i with another key: it no longer verifies.
    let topics = Topics::new(DEFAULT_PREFIX);
    let forger = SecretKey::generate().unwrap();
    let topic = topics.reported("dev-i");
    let report = Reported::V1(ReportedV1 {
        serial: u64::MAX,
        modules: Vec::new(),
    });
    device.stop();
    broker.publish_retained(&topic, seal_report(&report, &topic, &forger));
    assert_eq!(kiln_devices(&fleet, "dev-i")["identity"], "MISMATCH");
    // An unsigned one (as a kilnd before identities would send) is not verified either.
    broker.publish_retained(&topic, postcard::to_stdvec(&report).unwrap());
    let status = kiln_devices(&fleet, "dev-i");
    assert_ne!(status["identity"], "verified", "{status}");
}
