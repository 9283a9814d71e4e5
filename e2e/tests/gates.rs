//! Health gates on real devices: kilnd natively and the aarch64 kilnd under qemu-user,
//! each sending its modules' health every two seconds, and `kiln rollout --gate`
//! judging a wave on it. The 100-device runs of the same policy are scale.rs's.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{kiln_path, source};
use kiln_protocol::fleet::EventKind;
use serde_json::Value;

use crate::fleet::{app, push, wait_online, Watch};
use crate::util::{path_str, shared, FleetDevice};

/// The devices, by name: the rollout's waves go in name order, so the first two (one
/// of each target) are wave 1 and the third, native, is the control.
const DEVICES: [(&str, &str); 3] = [
    ("aarch64-linux", "gate-arm"),
    ("x86_64-linux", "gate-x86"),
    ("x86_64-linux", "gate-x86-control"),
];
const GATE: &str = "traps <= 1x control";
/// Long enough for the module's 200th tick (20 s after it starts at a 100 ms tick)
/// and the health period that reports it.
const SOAK: &str = "40s";
const LIMIT: Duration = Duration::from_secs(120);

/// `kiln ARGS --broker URL`, signing with the tests' fleet key when `sign`, else
/// trusting the tests' root.
fn kiln(url: &str, args: &[&str], sign: bool) -> Output {
    let (key, root) = (shared().key(), shared().root());
    let mut cmd = Command::new(kiln_path());
    cmd.args(args).args(["--broker", url]);
    match sign {
        true => cmd.args(["--sign", path_str(&key)]),
        false => cmd.args(["--root", path_str(&root)]),
    };
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_module_that_traps_every_200th_tick_commits_and_the_gate_halts_its_rollout() {
    let broker = Broker::start();
    let url = broker.url();
    let mut devices = Vec::new();
    let mut watches = Vec::new();
    for (target, id) in DEVICES {
        watches.push(Watch::start(&broker, id));
        let mut d = FleetDevice::new(target, id, &broker);
        d.groups = vec!["lab".into()];
        d.mqtt_extra = "[telemetry]\nhealth_s = 2\n".into();
        d.start(None);
        devices.push(d);
    }
    let health = ["--health-window-ms", "4000", "--tick-ms", "100"];
    for (i, (target, id)) in DEVICES.iter().enumerate() {
        wait_online(&url, id);
        push(&broker, &app(target, 1, false), id, &health);
        watches[i].wait_committed(1, LIMIT);
    }
    let enrolled = kiln(&url, &["enroll", "--group", "lab"], true);
    assert!(enrolled.status.success(), "{}", text(&enrolled));

    // v2 traps on its 200th tick: 20 s after it starts, well after the update agent's
    // 4 s health window. Every device of wave 1 commits it; the gate, comparing the
    // wave's traps per call with the control's (none), halts the rollout after the
    // soak and gives the wave back.
    let fixture = source("fixtures/trap-every-200.wat");
    let mut args = vec![
        "rollout",
        path_str(&fixture),
        "--name",
        "app",
        "--version",
        "2",
        "--group",
        "lab",
        "--waves",
        "2",
        "--gate",
        GATE,
        "--soak",
        SOAK,
        "--revert",
        "--wave-timeout",
        "120s",
    ];
    args.extend(health);
    let begun = Instant::now();
    let run = kiln(&url, &args, true);
    let took = begun.elapsed();
    let out = text(&run);
    assert_eq!(run.status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("gate {GATE}: ")), "{out}");
    for (i, (_, id)) in DEVICES[..2].iter().enumerate() {
        assert!(
            watches[i]
                .events()
                .iter()
                .any(|(m, v, k)| m == "app" && *v == 2 && *k == EventKind::Committed),
            "{id} committed v2: it passed the health window\n{out}"
        );
    }
    assert!(
        watches[2].events().iter().all(|(_, v, _)| *v == 1),
        "the control was never sent v2"
    );

    let status = kiln(
        &url,
        &["rollout", "status", "--group", "lab", "--json"],
        false,
    );
    assert!(status.status.success(), "{}", text(&status));
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    let phase = s["phase"].as_str().unwrap();
    assert!(
        phase.starts_with(&format!("halted in wave 1: gate {GATE}: ")),
        "{phase}"
    );
    let verdicts = s["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 1, "{s}");
    assert_eq!(verdicts[0]["verdict"], "breach", "{s}");
    let breach = verdicts[0]["lines"][0].as_str().unwrap();
    assert!(breach.contains("against 0 in the control"), "{breach}");
    // Both wave devices trapped; the breach names the worst of them.
    assert!(
        breach.contains("gate-arm") || breach.contains("gate-x86"),
        "{breach}"
    );
    eprintln!("halted after {took:?}: {breach}");

    // Given back (--revert): both wave devices go down to v1 again.
    for (i, _) in DEVICES[..2].iter().enumerate() {
        watches[i].wait_running(1, LIMIT);
    }
    devices.iter_mut().for_each(FleetDevice::kill);
}
