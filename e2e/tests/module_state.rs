//! Issue 30, items 1 to 3 on the device's side: the fleet view tells what a module
//! really does (a module that crash-loops after its trial is not "running"), a WASI
//! command that ran and exited 0 is healthy, and `kilnd check` refuses what `kilnd
//! serve` would refuse (so the unit's ExecStartPre catches it), with the same error.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::mosquitto::Broker;
use kiln_protocol::fleet::EventKind;
use serde_json::Value;

use crate::fleet::{app, push, Watch};
use crate::util::{eventually, path_str, shared, Device, FleetDevice};

const LIMIT: Duration = Duration::from_secs(60);

/// `(state, version, last_event)` of `module` on `device`, as `kiln devices --json`
/// shows it.
fn shown(broker: &Broker, device: &str, module: &str) -> Option<(String, u64, String)> {
    let out = Command::new(kiln_e2e::kiln_path())
        .args(["devices", "--json", "--broker", &broker.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let row: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["device"] == device)?;
    let m = row["reported"]["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == module)?
        .clone();
    Some((
        m["state"].as_str()?.to_string(),
        m["version"].as_u64()?,
        m["last_event"].as_str()?.to_string(),
    ))
}

#[test]
fn a_module_that_crash_loops_after_its_trial_shows_failed_and_a_command_that_exits_0_is_healthy() {
    let broker = Broker::start();
    let watch = Watch::start(&broker, "dev-s");
    let mut device = FleetDevice::new("x86_64-linux", "dev-s", &broker);
    device.start(None);
    // Traps on its third tick (300 ms in), after a 200 ms health window: committed,
    // then it crash-loops until its supervisor gives up (5 crashes).
    let quick = ["--health-window-ms", "200", "--tick-ms", "100"];
    push(&broker, &app("x86_64-linux", 1, true), "dev-s", &quick);
    watch.wait_committed(1, LIMIT);
    eventually(
        LIMIT,
        || shown(&broker, "dev-s", "app").is_some_and(|(s, ..)| s == "failed"),
        || format!("app is {:?}, want failed", shown(&broker, "dev-s", "app")),
    );
    let (_, version, why) = shown(&broker, "dev-s", "app").unwrap();
    assert_eq!(version, 1, "the version it ran");
    assert!(why.contains("gave up after 5 crashes"), "{why}");
    assert!(device.stderr().contains("module failed; not restarting"));

    // A WASI command: it runs, prints, exits 0 inside its health window. Healthy.
    let hello = shared().artifact_with(
        "hello.wasm",
        "x86_64-linux",
        &["--name", "hello", "--version", "1"],
    );
    push(&broker, &hello, "dev-s", &["--health-window-ms", "5000"]);
    watch.wait_event(LIMIT, "hello committed", |(m, v, k)| {
        m == "hello" && *v == 1 && *k == EventKind::Committed
    });
    assert!(
        !watch
            .events()
            .iter()
            .any(|(m, _, k)| m == "hello" && matches!(k, EventKind::RolledBack { .. })),
        "{:#?}",
        watch.events()
    );
    eventually(
        LIMIT,
        || shown(&broker, "dev-s", "hello").is_some_and(|(s, ..)| s == "exited"),
        || format!("hello is {:?}", shown(&broker, "dev-s", "hello")),
    );
}

#[test]
fn kilnd_check_refuses_what_serve_would_refuse_with_the_same_error() {
    let device = Device::new("x86_64-linux");
    let dir = tempfile::tempdir().unwrap();
    let artifact = shared().artifact("fixtures/counter.wat", "x86_64-linux");
    let not_a_cert = dir.path().join("ca.pem");
    std::fs::write(&not_a_cert, "this is not a certificate\n").unwrap();
    let missing = dir.path().join("no-such-dir");
    let base = format!(
        "device = \"dev-c\"\ndata_dir = {:?}\ntrust = [{:?}]\n{}\n",
        path_str(&dir.path().join("data")),
        path_str(&shared().root()),
        device.launcher_line(),
    );
    let module = format!(
        "[[module]]\nname = \"counter\"\nartifact = {:?}\ntick_ms = 100\n",
        path_str(&artifact)
    );
    let cases = [
        (
            "mqtts without a CA",
            format!("{base}[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"\n"),
            "give the CA certificate",
        ),
        (
            "a CA that is not a certificate",
            format!(
                "{base}[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"\nca = {:?}\n",
                path_str(&not_a_cert)
            ),
            "holds no PEM certificate",
        ),
        (
            "a dirs host path that does not exist",
            format!("{base}{module}dirs = [\"{}:/data\"]\n", path_str(&missing)),
            "no-such-dir",
        ),
    ];
    for (what, text, needle) in cases {
        let config = dir.path().join("kilnd.toml");
        std::fs::write(&config, &text).unwrap();
        let check = device.kilnd(&["check", "--config", path_str(&config)]);
        assert_ne!(check.code, Some(0), "{what}: check passed\n{check}");
        assert!(check.stderr.contains(needle), "{what}\n{check}");
        // serve refuses it at once, with the same code and line (it used to retry
        // forever, exit later, or fail the module for good).
        let serve = device.kilnd(&["serve", "--config", path_str(&config)]);
        assert_eq!(serve.code, check.code, "{what}\n{serve}");
        assert_eq!(serve.stderr.trim(), check.stderr.trim(), "{what}\n{serve}");
    }
}
