//! The fleet side at a hundred devices (the suite's small version of
//! `scripts/fleet-scale.sh`): `kilnd-sim` runs kilnd's device side for each device (its
//! own MQTT session, update agent, store and telemetry spool) with the worker
//! simulated, against a real mosquitto, and kiln's own commands drive it. The rollout
//! policy is tested here: growing waves, failure thresholds, a second operator's
//! rollout refused, pause, abort in flight, retry, a driver killed and taken over, and
//! the broker restarting under a rollout; and the health gates, on the signed health
//! each simulated device sends of a module model (`kilnd-sim --model`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::sim::Sim;
use kiln_e2e::{kiln_path, Run};
use serde_json::Value;

use crate::trust::Fleet;
use crate::util::path_str;

pub(crate) const QUICK: [&str; 2] = ["--health-window-ms", "1000"];

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
pub(crate) fn spawn_kiln(fleet: &Fleet, args: &[&str]) -> Child {
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
pub(crate) fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
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
pub(crate) fn wait_status(fleet: &Fleet, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // No record yet is not an error here.
        let last = fleet.kiln(&["rollout", "status", "--group", "lab"]);
        if last.stdout.contains(needle) {
            return last.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after 60 s waiting for `{needle}` in the rollout status; the last:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_hundred_devices_take_growing_waves_and_the_policy_halts_pauses_aborts_and_retries() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "scale");
    let _sim = sim(&fleet, 100, &["3:20", "4:20"]);
    hundred_devices_take_a_push_and_growing_waves(&fleet);

    // v3 crashes on a fifth of the devices. A rollout in flight holds the group: a
    // second operator's is refused, naming it; a pause stops the driver after the
    // wave; an abort gives the wave back, and devices not reached never get v3. The
    // health window (so wave 1) is long enough that both operators' commands land in
    // wave 1 on a loaded machine: a pause heard after wave 1 ended holds wave 2.
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
            "15000",
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
    let said = String::from_utf8_lossy(&paused.stderr);
    assert!(said.contains("paused by"), "{said}");
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

/// Every device of `n` enrolls in group `lab` and takes v1 from a push to it.
fn devices_enroll_and_run_v1(fleet: &Fleet, n: usize) {
    devices_enroll_and_run_v1_with(fleet, n, &[]);
}

/// [`devices_enroll_and_run_v1`], the push given `more` arguments.
fn devices_enroll_and_run_v1_with(fleet: &Fleet, n: usize, more: &[&str]) {
    wait_for(Duration::from_secs(30), &format!("{n} devices"), || {
        devices(fleet).len() == n
    });
    let enrolled = fleet
        .kiln(&["enroll", "--group", "lab", "--sign", "fleet.key"])
        .ok("enroll");
    assert!(
        enrolled.stdout.contains(&format!("{n} devices enrolled")),
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
    push.extend(more);
    fleet.kiln(&push).ok("push v1 to the group");
    wait_for(Duration::from_secs(60), "every device runs v1", || {
        running(fleet).iter().all(|(_, v)| *v == Some(1))
    });
}

/// Every device of a hundred enrolls, takes v1 from a push to the group, then v2 from
/// a rollout in waves of 1, 10, 40, 40 and 9.
fn hundred_devices_take_a_push_and_growing_waves(fleet: &Fleet) {
    devices_enroll_and_run_v1(fleet, 100);
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

/// kilnd-sim's devices fetch a full update from an HTTP mirror (Debian's nginx) as
/// kilnd does, with kilnd's own client: what `scripts/fleet-scale.sh --mirror`
/// measures at 10,000.
#[test]
fn a_hundred_devices_take_a_full_update_from_an_http_mirror() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "mirror");
    let dir = fleet.dir.path().join("mirror");
    std::fs::create_dir_all(&dir).unwrap();
    let nginx = kiln_e2e::nginx::Nginx::start(None, &dir);
    let _sim = sim(&fleet, 100, &[]);
    let url = nginx.url();
    devices_enroll_and_run_v1_with(
        &fleet,
        100,
        &["--mirror-dir", path_str(&dir), "--mirror-url", &url],
    );
    // Each device's chunk list and chunks, from nginx.
    let (sent, requests) = nginx.sent();
    assert!(
        requests >= 200 && sent >= 100 * 50_000,
        "nginx served {requests} requests, {sent} bytes"
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

/// How `app` behaves on every device, by version (`kilnd-sim --model`): v1, and any
/// version not named, traps 5 calls in a thousand and publishes a latency of about
/// 100; v2 traps twice as often (after its health window: the update agent commits
/// it); v3 publishes a latency 30% higher; v4 is as good as v1.
const MODELS: [&str; 3] = [
    "*:traps=5,metric=latency_ms:100",
    "2:traps=10,metric=latency_ms:100",
    "3:traps=5,metric=latency_ms:130",
];

/// Health every 2 s, 250 calls a second per device, fixed draws.
const MODELLED: [&str; 6] = [
    "--health-ms",
    "2000",
    "--calls-per-s",
    "250",
    "--seed",
    "36",
];

const SOAK_MS: u64 = 8000;

/// Gated waves of 10, 30 and 60, soaking 8 s (four health periods); a breach gives
/// the wave back (`--revert`).
const GATED: [&str; 9] = [
    "--waves",
    "10,30",
    "--gate",
    "traps <= 1.5x control min 5",
    "--gate",
    "app.latency_ms <= 1.2x control min 5",
    "--soak",
    "8s",
    "--revert",
];

/// `kiln rollout status --json` of the group.
fn status_json(fleet: &Fleet) -> Value {
    let out = fleet
        .kiln(&["rollout", "status", "--group", "lab", "--json"])
        .ok("rollout status --json");
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Rolls out `version` with the gates, expecting a halt in wave 1 on `gate`; returns
/// the breach as the record says it, the wave given back.
#[track_caller]
fn halts_in_wave_1(fleet: &Fleet, version: u64, gate: &str) -> String {
    let begun = Instant::now();
    let run = rollout(fleet, version, &GATED);
    let took = begun.elapsed();
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr.contains(&format!("gate {gate}: ")),
        "v{version} halts on `{gate}`: {run}"
    );
    let s = status_json(fleet);
    assert_eq!(s["version"], version, "{s}");
    let phase = s["phase"].as_str().unwrap();
    assert!(
        phase.starts_with(&format!("halted in wave 1: gate {gate}: ")),
        "{phase}"
    );
    // Exposed in wave 1 (10 devices, committed: it passed the agent's health window),
    // and judged at the end of that wave's soak: never a second soak, never wave 2.
    assert_eq!(s["counts"]["committed"], 10, "{s}");
    assert_eq!(s["counts"]["waiting"], 90, "{s}");
    let verdicts = s["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 1, "{s}");
    assert_eq!(verdicts[0]["wave"], 1);
    assert_eq!(verdicts[0]["verdict"], "breach");
    let breach = verdicts[0]["lines"][0].as_str().unwrap().to_string();
    assert!(breach.starts_with(&format!("{gate}: ")), "{breach}");
    let at = verdicts[0]["at_ms"].as_u64().unwrap() - s["started_ms"].as_u64().unwrap();
    assert!(
        (SOAK_MS..2 * SOAK_MS).contains(&at),
        "judged {at} ms after the start: within the first soak"
    );
    let back: Vec<&Value> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["given_back"] == true)
        .collect();
    assert_eq!(back.len(), 10, "--revert gives wave 1 back: {s}");
    eprintln!("v{version}: halted {at} ms after the start ({took:?} in all): {breach}");
    // Given back, wave 1 goes down to what it had (the group's entry, signed again
    // allowing the downgrade: it had committed the release).
    let mut wave1 = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        wave1 = running(fleet)
            .into_iter()
            .filter(|(d, _)| d.as_str() < "sim-0010")
            .map(|(_, v)| v)
            .collect();
        if wave1.iter().all(|v| *v == Some(1)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("v{version}: wave 1 runs {wave1:?} after the halt");
    assert!(
        wave1.len() == 10 && wave1.iter().all(|v| *v == Some(1)),
        "v{version}: wave 1 was given back but runs {wave1:?}"
    );
    breach
}

#[test]
fn a_hundred_devices_halt_a_rollout_on_their_health_and_complete_a_good_one() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "gates");
    let _sim = Sim::start_modelled(
        &fleet.broker,
        &fleet.path("fleet.root"),
        100,
        &[],
        &MODELS,
        &MODELLED,
    );
    devices_enroll_and_run_v1(&fleet, 100);

    // (a) Twice the traps: the update agent commits v2 on all of wave 1, and the
    // trap gate halts it after the wave's soak, against the 90 devices on v1.
    let breach = halts_in_wave_1(&fleet, 2, "traps <= 1.5x control min 5");
    assert!(breach.contains("in the control"), "{breach}");

    // (b) A published metric 30% higher: the metric gate halts it likewise; its
    // traps are those of v1, and that gate passes.
    let breach = halts_in_wave_1(&fleet, 3, "app.latency_ms <= 1.2x control min 5");
    let s = status_json(&fleet);
    assert!(
        !s["phase"].as_str().unwrap().contains("more gates above"),
        "only the metric is above its bound: {s}"
    );
    assert!(breach.contains("in the control"), "{breach}");

    // (c) As good as v1: every wave passes its gates, the last (no control left)
    // against its own baseline, and the rollout completes.
    let begun = Instant::now();
    let run = rollout(&fleet, 4, &GATED).ok("rollout v4");
    assert!(
        run.stdout.contains("100 devices in 3 waves (10, 30, 60)"),
        "{run}"
    );
    assert!(
        run.stdout
            .contains("rollout complete: 100 devices run app v4"),
        "{run}"
    );
    let s = status_json(&fleet);
    assert_eq!(s["phase"], "complete", "{s}");
    let verdicts: Vec<(u64, &str)> = s["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["wave"].as_u64().unwrap(), v["verdict"].as_str().unwrap()))
        .collect();
    assert_eq!(verdicts, [(1, "pass"), (2, "pass"), (3, "pass")], "{s}");
    eprintln!("v4: complete in {:?}", begun.elapsed());
    assert!(running(&fleet).iter().all(|(_, v)| *v == Some(4)));
}

/// A cohort (issue 36): of ten devices, the three tagged `canary` take v2 and the
/// seven others stay on v1 (neither sent it nor given it by the group's desired
/// state at the end); a tag signed outside the fleet's release keys selects nothing;
/// status shows the cohort; one that selects no member is refused.
#[test]
fn a_rollout_where_tag_canary_takes_only_the_tagged_devices() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "cohort");
    let _sim = sim(&fleet, 10, &[]);
    devices_enroll_and_run_v1(&fleet, 10);

    let canaries = ["sim-0001", "sim-0004", "sim-0007"];
    let mut tag = vec!["tag"];
    tag.extend(canaries);
    tag.extend(["--add", "canary", "--add", "east", "--sign", "fleet.key"]);
    let tagged = fleet.kiln(&tag).ok("kiln tag");
    assert!(
        tagged.stdout.contains("sim-0004: canary, east (serial "),
        "{tagged}"
    );
    fleet
        .kiln(&["tag", "sim-0007", "--remove", "east", "--sign", "fleet.key"])
        .ok("kiln tag --remove");
    // A key the root does not name as a release key: kiln refuses to publish what
    // would not verify.
    fleet
        .kiln(&["keygen", "-o", "spare.key", "--no-root"])
        .ok("keygen spare");
    let refused = fleet.kiln(&["tag", "sim-0002", "--add", "canary", "--sign", "spare.key"]);
    assert_ne!(refused.code, Some(0), "{refused}");
    assert!(refused.stderr.contains("would not verify"), "{refused}");
    // A forger's own root of the same fleet name tags sim-0002: its record does not
    // verify under the fleet's root, so it is named and selects nothing.
    std::fs::create_dir(fleet.path("forger")).unwrap();
    fleet
        .kiln(&["keygen", "-o", "forger/fleet.key", "--fleet", "cohort"])
        .ok("keygen forger");
    fleet
        .kiln(&[
            "tag",
            "sim-0002",
            "--add",
            "canary",
            "--sign",
            "forger/fleet.key",
        ])
        .ok("tag under the forger's root");
    let listed = devices(&fleet);
    let tags_of = |d: &str| {
        listed
            .iter()
            .find(|x| x["device"] == d)
            .map(|x| x["tags"].clone())
            .unwrap()
    };
    assert_eq!(tags_of("sim-0004"), serde_json::json!(["canary", "east"]));
    assert_eq!(tags_of("sim-0007"), serde_json::json!(["canary"]));
    assert_eq!(tags_of("sim-0002"), serde_json::json!([]));
    // kiln devices chooses as the rollout will: the canaries, by their verified tags.
    let chosen = fleet
        .kiln(&[
            "devices",
            "--json",
            "--group",
            "lab",
            "--where",
            "tag=canary",
        ])
        .ok("kiln devices --where");
    let names: Vec<String> = chosen
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["device"].to_string())
        .collect();
    assert_eq!(names, canaries.map(|c| format!("{c:?}")), "{chosen}");
    assert!(
        chosen
            .stderr
            .contains("3 of 10 devices: tag=canary and group=lab"),
        "{chosen}"
    );

    let none = rollout(&fleet, 2, &["--where", "tag=nobody", "--dry-run"]);
    assert_eq!(none.code, Some(68), "{none}");
    assert!(
        none.stderr
            .contains("--where tag=nobody selects none of its 10 members"),
        "{none}"
    );
    let bad = rollout(&fleet, 2, &["--where", "tag>canary"]);
    assert_eq!(bad.code, Some(2), "{bad}");
    assert!(bad.stderr.contains("--where: "), "{bad}");

    let run = rollout(
        &fleet,
        2,
        &[
            "--where",
            "tag=canary",
            "--where",
            "kilnd>=0.0.1",
            "--waves",
            "1",
        ],
    )
    .ok("rollout v2 to the canaries");
    assert!(
        run.stderr.contains(
            "cohort: --where tag=canary and kilnd>=0.0.1 selects 3 of the 10 members of group lab"
        ),
        "{run}"
    );
    assert!(
        run.stderr.contains("ignoring the tags of sim-0002"),
        "{run}"
    );
    assert!(run.stdout.contains("3 devices in 2 waves (1, 2)"), "{run}");
    assert!(
        run.stdout
            .contains("rollout complete: 3 devices run app v2"),
        "{run}"
    );
    // The others never move: wait a little for a stray group state to arrive.
    std::thread::sleep(Duration::from_secs(3));
    for (device, version) in running(&fleet) {
        let want = if canaries.contains(&device.as_str()) {
            2
        } else {
            1
        };
        assert_eq!(version, Some(want), "{device}");
    }
    let text = status(&fleet);
    assert!(
        text.contains("cohort:   the members where tag=canary and kilnd>=0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("cohort: --where tag=canary and kilnd>=0.0.1 selects 3 of the 10 members"),
        "the record's history says how many it took: {text}"
    );
    let s = status_json(&fleet);
    assert_eq!(
        s["policy"]["cohort"],
        serde_json::json!(["tag=canary", "kilnd>=0.0.1"]),
        "{s}"
    );
    assert_eq!(s["devices"].as_array().unwrap().len(), 3, "{s}");
}
