//! The fleet side at a hundred devices (the suite's small version of
//! `scripts/fleet-scale.sh`): `kilnd-sim` runs kilnd's device side for each device (its
//! own MQTT session, update agent, store and telemetry spool) with the worker
//! simulated, against a real mosquitto, and kiln's own commands drive it. The rollout
//! policy is tested here: growing waves, failure thresholds, a second operator's
//! rollout refused, pause, abort in flight, retry, a driver killed and taken over, and
//! the broker restarting under a rollout.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::sim::Sim;
use kiln_e2e::{kiln_path, Run};
use serde_json::Value;

use crate::trust::Fleet;
use crate::util::path_str;

const QUICK: [&str; 2] = ["--health-window-ms", "1000"];

fn sim(fleet: &Fleet, n: usize, crash: &[&str]) -> Sim {
    Sim::start(&fleet.broker, &fleet.path("fleet.root"), n, crash)
}

/// Every device's `kiln devices --json` line.
fn devices(fleet: &Fleet) -> Vec<Value> {
    let out = fleet.kiln(&["devices", "--json"]).ok("kiln devices");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The version of `app` each device reports running, by device.
fn running(fleet: &Fleet) -> Vec<(String, Option<u64>)> {
    devices(fleet)
        .iter()
        .map(|d| {
            let version = d["reported"]["modules"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == "app" && m["state"] == "running")
                .and_then(|m| m["version"].as_u64());
            (d["device"].as_str().unwrap().to_string(), version)
        })
        .collect()
}

fn rollout(fleet: &Fleet, version: u64, policy: &[&str]) -> Run {
    let app = fleet.app(version, "fleet.key");
    let mut args = vec![
        "rollout",
        path_str(&app),
        "--group",
        "lab",
        "--sign",
        "fleet.key",
    ];
    args.extend(policy);
    args.extend(QUICK);
    fleet.kiln(&args)
}

/// `kiln ARGS` in the background (a rollout another operator will stop).
fn spawn_kiln(fleet: &Fleet, args: &[&str]) -> Child {
    Command::new(kiln_path())
        .current_dir(fleet.dir.path())
        .args(args)
        .args(["--broker", &fleet.broker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn status(fleet: &Fleet) -> String {
    fleet
        .kiln(&["rollout", "status", "--group", "lab"])
        .ok("rollout status")
        .stdout
}

/// Polls `check` every half second (each poll runs kiln) until it holds.
#[track_caller]
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The rollout status once it contains `needle`.
#[track_caller]
fn wait_status(fleet: &Fleet, needle: &str) -> String {
    let mut last = String::new();
    wait_for(Duration::from_secs(60), needle, || {
        // No record yet is not an error here.
        last = fleet.kiln(&["rollout", "status", "--group", "lab"]).stdout;
        last.contains(needle)
    });
    last
}

#[test]
fn a_hundred_devices_take_growing_waves_and_the_policy_halts_pauses_aborts_and_retries() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "scale");
    let _sim = sim(&fleet, 100, &["3:20", "4:20"]);
    hundred_devices_take_a_push_and_growing_waves(&fleet);

    // v3 crashes on a fifth of the devices. A rollout in flight holds the group: a
    // second operator's is refused, naming it; a pause stops the driver after the
    // wave; an abort gives the wave back, and devices not reached never get v3.
    let app3 = fleet.app(3, "fleet.key");
    let first = spawn_kiln(
        &fleet,
        &[
            "rollout",
            path_str(&app3),
            "--group",
            "lab",
            "--sign",
            "fleet.key",
            "--waves",
            "10",
            "--wave-size",
            "30",
            "--max-failures",
            "50%",
            "--max-total-failures",
            "50%",
            "--health-window-ms",
            "4000",
        ],
    );
    wait_status(&fleet, "running wave 1");
    let second = rollout(&fleet, 3, &[]);
    assert_eq!(second.code, Some(75), "{second}");
    assert!(
        second.stderr.contains("is running wave 1") && second.stderr.contains("kiln rollout abort"),
        "{second}"
    );
    fleet
        .kiln(&["rollout", "pause", "--group", "lab", "--sign", "fleet.key"])
        .ok("pause");
    let paused = first.wait_with_output().unwrap();
    assert!(paused.status.success(), "{paused:?}");
    assert!(String::from_utf8_lossy(&paused.stderr).contains("paused by"));
    let s = wait_status(&fleet, "phase:    paused in wave 1");
    assert!(s.contains("wave 2:   30 devices: 30 waiting"), "{s}");
    fleet
        .kiln(&["rollout", "abort", "--group", "lab", "--sign", "fleet.key"])
        .ok("abort");
    let s = status(&fleet);
    assert!(s.contains("phase:    aborted in wave 1 by"), "{s}");
    std::thread::sleep(Duration::from_secs(6));
    let now = running(&fleet);
    let reached: Vec<&str> = now
        .iter()
        .filter(|(_, v)| *v == Some(3))
        .map(|(d, _)| d.as_str())
        .collect();
    assert!(
        reached.iter().all(|d| *d < "sim-0010"),
        "only the first wave was ever sent v3: {reached:?}"
    );
    assert!(
        now.iter()
            .filter(|(d, _)| d.as_str() >= "sim-0010")
            .all(|(_, v)| *v == Some(2)),
        "devices not reached run v2"
    );

    // With at most 5% failing overall, v4 (a fifth crash) halts; a retry sends it
    // again to the failed devices, which refuse it (they remember rolling it back),
    // and the rollout halts again.
    let halted = rollout(
        &fleet,
        4,
        &[
            "--waves",
            "10",
            "--wave-size",
            "30",
            "--max-failures",
            "100%",
            "--max-total-failures",
            "5%",
            "--wave-timeout",
            "60s",
        ],
    );
    assert_eq!(halted.code, Some(1), "{halted}");
    assert!(
        halted.stderr.contains("devices failed (allowed: 5%)")
            && halted
                .stderr
                .contains("rolled back: crashed during its health window: simulated crash"),
        "{halted}"
    );
    let s = status(&fleet);
    assert!(s.contains("phase:    halted in wave"), "{s}");
    assert!(s.contains("(given back)"), "{s}");
    let retry = fleet.kiln(&["rollout", "retry", "--group", "lab", "--sign", "fleet.key"]);
    assert_eq!(retry.code, Some(1), "{retry}");
    assert!(retry.stderr.contains("rollout halted"), "{retry}");
    // The devices that crashed on v4 run what they ran before.
    let after = running(&fleet);
    assert!(
        after.iter().all(|(_, v)| matches!(v, Some(2..=4))),
        "{after:?}"
    );

    // gc keeps what the devices and the group name.
    fleet.kiln(&["gc"]).ok("gc");
}

/// Every device of a hundred enrolls, takes v1 from a push to the group, then v2 from
/// a rollout in waves of 1, 10, 40, 40 and 9.
fn hundred_devices_take_a_push_and_growing_waves(fleet: &Fleet) {
    wait_for(Duration::from_secs(30), "100 devices", || {
        devices(fleet).len() == 100
    });
    let enrolled = fleet
        .kiln(&["enroll", "--group", "lab", "--sign", "fleet.key"])
        .ok("enroll");
    assert!(
        enrolled.stdout.contains("100 devices enrolled"),
        "{enrolled}"
    );
    let v1 = fleet.app(1, "fleet.key");
    let mut push = vec![
        "push",
        path_str(&v1),
        "--group",
        "lab",
        "--sign",
        "fleet.key",
    ];
    push.extend(QUICK);
    fleet.kiln(&push).ok("push v1 to 100 devices");
    wait_for(Duration::from_secs(60), "every device runs v1", || {
        running(fleet).iter().all(|(_, v)| *v == Some(1))
    });
    let run = rollout(fleet, 2, &["--waves", "1,10", "--wave-size", "40"]).ok("rollout v2");
    assert!(
        run.stdout
            .contains("100 devices in 5 waves (1, 10, 40, 40, 9)"),
        "{run}"
    );
    assert!(
        run.stdout
            .contains("rollout complete: 100 devices run app v2"),
        "{run}"
    );
    assert!(running(fleet).iter().all(|(_, v)| *v == Some(2)));
    assert!(status(fleet).contains("phase:    complete"));
}

#[test]
fn a_hundred_devices_on_aedes_take_a_push_and_growing_waves_and_send_telemetry() {
    let broker = Broker::start_aedes();
    let fleet = Fleet::new(&broker, "aedes");
    let _sim = sim(&fleet, 100, &[]);
    hundred_devices_take_a_push_and_growing_waves(&fleet);
    assert!(
        crate::topologies::first_batch(&broker, "sim-0042").is_some(),
        "no telemetry batch from sim-0042"
    );
}

#[test]
fn a_rollout_outlives_its_driver_and_a_broker_restart() {
    let mut broker = Broker::start();
    let fleet = Fleet::new(&broker, "survive");
    // The last two say they are riscv64: the x86_64-only release leaves them out.
    let _sim = Sim::start_with(
        &fleet.broker,
        &fleet.path("fleet.root"),
        22,
        &[],
        &["--riscv", "2"],
    );
    wait_for(Duration::from_secs(30), "22 devices", || {
        devices(&fleet).len() == 22
    });
    fleet
        .kiln(&["enroll", "--group", "lab", "--sign", "fleet.key"])
        .ok("enroll");
    let app1 = fleet.app(1, "fleet.key");
    let mut driver = spawn_kiln(
        &fleet,
        &[
            "rollout",
            path_str(&app1),
            "--group",
            "lab",
            "--sign",
            "fleet.key",
            "--waves",
            "2,4",
            "--wave-size",
            "7",
            "--health-window-ms",
            "3000",
        ],
    );
    let s = wait_status(&fleet, "running wave 2");
    for foreign in ["sim-0020", "sim-0021"] {
        assert!(
            s.contains(&format!(
                "left out: {foreign}: release app v1 has no artifact"
            )),
            "{s}"
        );
    }
    // The operator's laptop closes.
    driver.kill().unwrap();
    driver.wait().unwrap();
    let early = fleet.kiln(&["rollout", "resume", "--group", "lab", "--sign", "fleet.key"]);
    assert_eq!(early.code, Some(75), "{early}");
    assert!(early.stderr.contains("--take-over"), "{early}");

    // Another operator takes it up; the broker restarts under it.
    let mut resumed = spawn_kiln(
        &fleet,
        &[
            "rollout",
            "resume",
            "--group",
            "lab",
            "--sign",
            "fleet.key",
            "--take-over",
        ],
    );
    wait_status(&fleet, "running wave 3");
    broker.restart();
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        if let Some(status) = resumed.try_wait().unwrap() {
            // The result on stdout, the reconnection on stderr.
            let mut err = String::new();
            std::io::Read::read_to_string(resumed.stdout.as_mut().unwrap(), &mut err).unwrap();
            std::io::Read::read_to_string(resumed.stderr.as_mut().unwrap(), &mut err).unwrap();
            break (status, err);
        }
        assert!(Instant::now() < deadline, "the resumed rollout did not end");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.0.success(), "{}", out.1);
    assert!(out.1.contains("reconnecting"), "{}", out.1);
    assert!(
        out.1.contains("rollout complete: 20 devices run app v1"),
        "{}",
        out.1
    );
    let s = status(&fleet);
    assert!(s.contains("phase:    complete"), "{s}");
    assert!(s.contains("driven by"), "{s}");
    wait_for(
        Duration::from_secs(30),
        "every x86_64 device runs v1",
        || {
            running(&fleet)
                .iter()
                .all(|(d, v)| *v == Some(1) || d.as_str() >= "sim-0020")
        },
    );
}
