//! Issue 30, the host side: the fleet tool tells the truth and refuses what it knows
//! will fail. One test per numbered item of the issue (3 to 9), each run against
//! mosquitto and a real kilnd with the `kiln` binary as a user runs it, plus a test
//! that every `--json` parses and one that every command's result is on stdout.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{kiln_path, Run};
use kiln_protocol::fleet::{Topics, DEFAULT_PREFIX};
use serde_json::Value;

use crate::fleet::retained;
use crate::trust::{Fleet, LIMIT, QUICK};
use crate::util::{eventually, path_str};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `kiln ARGS` in `dir`, without a broker flag (offline commands, or a broker given).
fn kiln_in(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(kiln_path());
    cmd.current_dir(dir).args(args);
    Run::new(cmd)
}

/// One line on stderr, `kiln: error: ...`, containing every needle.
#[track_caller]
fn one_line_error(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, Some(code), "wrong exit code\n{run}");
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line\n{run}");
    for n in needles {
        assert!(errors[0].contains(n), "the error lacks `{n}`\n{run}");
    }
}

/// The app module of the reported state of `device`, from `kiln devices --json`.
fn reported_app(fleet: &Fleet, device: &str) -> Option<(u64, String)> {
    let v = crate::trust::kiln_devices(fleet, device);
    let m = v["reported"]["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "app")?
        .clone();
    Some((m["version"].as_u64()?, m["state"].as_str()?.to_string()))
}

/// A module that is neither a WASI command nor a kiln reactor.
const INERT: &str = "(module (func (export \"helper\")))";

/// Item 3: push and rollout refuse, before publishing, what devices would refuse,
/// each refusal naming the device and the reason with its own exit code; --force and
/// --allow-downgrade override where that makes sense; --dry-run prints the state in
/// full and publishes nothing; --wait reports each device.
#[test]
fn push_and_rollout_refuse_what_they_know_will_fail() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truth3");
    let (watch, _device) = fleet.started(&broker, "t3-dev", &["t3-lab"]);
    let v2 = fleet.app(2, "fleet.key");
    let v2s = path_str(&v2);
    let mut args = vec![
        "push",
        v2s,
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
        "--wait",
    ];
    args.extend(QUICK);
    let out = fleet.kiln(&args).ok("push --wait");
    assert!(
        out.stdout.contains("t3-dev: runs app v2"),
        "--wait reports each device on stdout\n{out}"
    );
    watch.wait_running(2, LIMIT);

    // A misspelt device or group: 68, named, and nothing left on the broker.
    let typo = fleet.kiln(&["push", v2s, "--device", "t3-dve", "--sign", "fleet.key"]);
    one_line_error(&typo, 68, &["t3-dve"]);
    let topics = Topics::new(DEFAULT_PREFIX);
    assert!(retained(&broker.url(), &topics.desired("t3-dve")).is_empty());
    let typo = fleet.kiln(&["push", v2s, "--group", "t3-lba", "--sign", "fleet.key"]);
    one_line_error(&typo, 68, &["t3-lba"]);
    let typo = fleet.kiln(&["rollout", v2s, "--group", "t3-lba", "--sign", "fleet.key"]);
    one_line_error(&typo, 68, &["t3-lba"]);

    // An artifact for another target: 78, the device named; --force publishes.
    let arm = fleet.path("app-arm.kiln");
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    fleet
        .kiln(&[
            "compile",
            path_str(&wasm),
            "--target",
            "aarch64-linux",
            "--name",
            "app",
            "--version",
            "3",
            "--sign",
            "fleet.key",
            "-o",
            path_str(&arm),
        ])
        .ok("compile for aarch64");
    let foreign = fleet.kiln(&[
        "push",
        path_str(&arm),
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
    ]);
    one_line_error(&foreign, 78, &["t3-dev", "--force"]);

    // A version below what the device runs: 78, unless --allow-downgrade.
    let v1 = fleet.app(1, "fleet.key");
    let down = fleet.kiln(&[
        "push",
        path_str(&v1),
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
    ]);
    one_line_error(&down, 78, &["t3-dev", "v2", "--allow-downgrade"]);
    let down = fleet.kiln(&[
        "rollout",
        path_str(&v1),
        "--group",
        "t3-lab",
        "--sign",
        "fleet.key",
    ]);
    one_line_error(&down, 78, &["t3-dev", "--allow-downgrade"]);

    // Limits the artifact cannot meet, and a module with nothing to run.
    let v3 = fleet.app(3, "fleet.key");
    let v3s = path_str(&v3);
    let fuel = fleet.kiln(&[
        "push",
        v3s,
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
        "--fuel-per-call",
        "1000",
    ]);
    one_line_error(&fuel, 78, &["metering"]);
    let tick = fleet.kiln(&[
        "push",
        v3s,
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
        "--tick-ms",
        "0",
    ]);
    assert_eq!(tick.code, Some(2), "--tick-ms 0 is a usage error\n{tick}");
    std::fs::write(fleet.path("inert.wat"), INERT).unwrap();
    fleet
        .kiln(&[
            "compile",
            "inert.wat",
            "--target",
            "x86_64-linux",
            "--name",
            "app",
            "--version",
            "4",
            "--sign",
            "fleet.key",
            "-o",
            "inert.kiln",
        ])
        .ok("compile inert");
    let inert = fleet.kiln(&[
        "push",
        "inert.kiln",
        "--device",
        "t3-dev",
        "--sign",
        "fleet.key",
    ]);
    one_line_error(&inert, 78, &["neither a WASI command", "reactor"]);

    // --dry-run: the state in full on stdout, nothing published.
    let before = retained(&broker.url(), &topics.desired("t3-dev"));
    let dry = fleet
        .kiln(&[
            "push",
            v3s,
            "--device",
            "t3-dev",
            "--sign",
            "fleet.key",
            "--dry-run",
        ])
        .ok("dry run");
    assert!(dry.stdout.contains("module       app v3"), "{dry}");
    assert!(dry.stdout.contains("artifact   x86_64"), "{dry}");
    assert_eq!(retained(&broker.url(), &topics.desired("t3-dev")), before);
    fleet
        .kiln(&["enroll", "--group", "t3-lab", "--sign", "fleet.key"])
        .ok("enroll");
    let dry = fleet
        .kiln(&[
            "rollout",
            v3s,
            "--group",
            "t3-lab",
            "--sign",
            "fleet.key",
            "--dry-run",
        ])
        .ok("rollout dry run");
    assert!(dry.stdout.contains("wave 1: t3-dev"), "{dry}");
    assert!(dry.stdout.contains("module       app v3"), "{dry}");
    assert!(retained(&broker.url(), &topics.rollout("t3-lab")).is_empty());

    // --force: a device not started yet gets its state, said on stderr.
    let forced = fleet
        .kiln(&[
            "push",
            v2s,
            "--device",
            "t3-new",
            "--sign",
            "fleet.key",
            "--force",
        ])
        .ok("push --force");
    assert!(forced.stderr.contains("t3-new"), "{forced}");
    assert!(!retained(&broker.url(), &topics.desired("t3-new")).is_empty());
}

/// Item 4: `kiln remove` drops a module from a device's desired state (signed like
/// push) and the device stops it; `kiln decommission` clears the device's retained
/// topics and its registry entry.
#[test]
fn a_module_can_be_removed_and_a_device_decommissioned() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truth4");
    let (watch, mut device) = fleet.started(&broker, "t4-dev", &[]);
    fleet
        .push(
            &fleet.app(1, "fleet.key"),
            ["--device", "t4-dev"],
            "fleet.key",
        )
        .ok("push");
    watch.wait_running(1, LIMIT);

    let out = fleet
        .kiln(&["remove", "app", "--device", "t4-dev", "--sign", "fleet.key"])
        .ok("remove");
    assert!(
        out.stdout.contains("removed app from device t4-dev"),
        "{out}"
    );
    eventually(
        LIMIT,
        || reported_app(&fleet, "t4-dev").is_none(),
        || format!("app still reported: {:?}", reported_app(&fleet, "t4-dev")),
    );
    let again = fleet.kiln(&["remove", "app", "--device", "t4-dev", "--sign", "fleet.key"]);
    one_line_error(&again, 68, &["app", "t4-dev"]);

    fleet
        .kiln(&["enroll", "t4-dev", "--sign", "fleet.key"])
        .ok("enroll");
    let online = fleet.kiln(&["decommission", "t4-dev", "--sign", "fleet.key"]);
    one_line_error(&online, 75, &["t4-dev", "online"]);
    device.stop();
    let out = fleet
        .kiln(&["decommission", "t4-dev", "--sign", "fleet.key", "--json"])
        .ok("decommission");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["device"], "t4-dev");
    assert_eq!(v["unenrolled"], true);
    let topics = Topics::new(DEFAULT_PREFIX);
    assert!(retained(
        &broker.url(),
        &format!("{}/devices/t4-dev/#", topics.prefix())
    )
    .is_empty());
    let devices = fleet.kiln(&["devices", "--json"]).ok("devices");
    assert!(!devices.stdout.contains("t4-dev"), "{devices}");
}

/// Item 5: artifacts (and release files, roots) are 0644 whatever the umask; keys 0600.
#[test]
fn artifacts_are_world_readable_and_keys_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    let umask = |args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.current_dir(dir.path())
            .arg("-c")
            .arg("umask 077 && exec \"$0\" \"$@\"")
            .arg(kiln_path())
            .args(args);
        Run::new(cmd)
    };
    umask(&["keygen", "-o", "fleet.key"]).ok("keygen");
    let p = |n: &str| dir.path().join(n);
    assert_eq!(mode(&p("fleet.key")), 0o600);
    assert_eq!(mode(&p("fleet-root.key")), 0o600);
    umask(&[
        "compile",
        path_str(&wasm),
        "--target",
        "x86_64-linux",
        "--sign",
        "fleet.key",
        "-o",
        "app.kiln",
    ])
    .ok("compile");
    assert_eq!(
        mode(&p("app.kiln")),
        0o644,
        "an artifact is signed, not secret"
    );
    umask(&[
        "release",
        path_str(&wasm),
        "--target",
        "x86_64-linux",
        "--sign",
        "fleet.key",
        "-o",
        "app.kilnrel",
    ])
    .ok("release");
    assert_eq!(mode(&p("app.kilnrel")), 0o644);
}

/// Item 6: key checks in the order that gives the right advice.
#[test]
fn key_advice_is_right_and_the_root_key_never_signs_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    kiln_in(d, &["keygen", "-o", "fleet.key"]).ok("keygen");
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    let compile = |key: &str| {
        kiln_in(
            d,
            &[
                "compile",
                path_str(&wasm),
                "--target",
                "x86_64-linux",
                "--sign",
                key,
                "-o",
                "app.kiln",
            ],
        )
    };
    std::fs::create_dir(d.join("keys")).unwrap();
    std::fs::set_permissions(d.join("keys"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = compile("keys");
    one_line_error(&out, 77, &["directory"]);
    assert!(!out.stderr.contains("chmod"), "{out}");
    let out = compile("fleet.pub");
    one_line_error(&out, 77, &["public key", "fleet.key"]);
    assert!(!out.stderr.contains("chmod"), "{out}");
    let out = compile("fleet-root.key");
    one_line_error(&out, 77, &["root key"]);
    assert!(!d.join("app.kiln").exists());
    // A release key readable by others still gets the chmod advice.
    std::fs::set_permissions(d.join("fleet.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    one_line_error(&compile("fleet.key"), 77, &["chmod 600"]);
}

/// Item 7: LAST EVENT names the module it is about.
#[test]
fn the_last_event_names_its_module() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truth7");
    let (watch, _device) = fleet.started(&broker, "t7-dev", &[]);
    fleet
        .push(
            &fleet.app(1, "fleet.key"),
            ["--device", "t7-dev"],
            "fleet.key",
        )
        .ok("push");
    watch.wait_committed(1, LIMIT);
    eventually(
        LIMIT,
        || {
            let out = fleet.kiln(&["devices"]);
            out.stdout
                .lines()
                .any(|l| l.starts_with("t7-dev") && l.contains("app: "))
        },
        || format!("{}", fleet.kiln(&["devices"])),
    );
}

/// Item 8: a push says what it is doing phase by phase on stderr (a line per phase
/// when stderr is not a terminal); a truncated artifact fails `kiln inspect` with 65.
#[test]
fn push_shows_its_phases_and_inspect_refuses_a_truncated_artifact() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truth8");
    let (_watch, _device) = fleet.started(&broker, "t8-dev", &[]);
    let app = fleet.app(1, "fleet.key");
    let out = fleet
        .push(&app, ["--device", "t8-dev"], "fleet.key")
        .ok("push");
    assert!(
        out.stderr.contains("compressing the artifact for x86_64"),
        "{out}"
    );
    assert!(out.stderr.contains("uploaded"), "{out}");
    let bytes = std::fs::read(&app).unwrap();
    std::fs::write(fleet.path("cut.kiln"), &bytes[..bytes.len() - 100]).unwrap();
    let out = kiln_in(fleet.dir.path(), &["inspect", "cut.kiln"]);
    one_line_error(&out, 65, &["cut.kiln", "truncated"]);
    assert!(out.stdout.is_empty(), "{out}");
}

/// A TCP peer that answers like a web server, not a broker.
fn http_peer() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut stream = stream;
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}

/// Item 9: the password from a file, host names where addresses go, a non-MQTT peer
/// in one plain line, a kilnd without the replayer named as such, and keygen refusing
/// to make a second fleet's root beside the first.
#[test]
fn the_tool_says_plainly_what_it_gets_and_never_trusts_another_root_by_accident() {
    // --password-file: mosquitto checks a password it is given.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let passwd = d.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    let made = Command::new("mosquitto_passwd")
        .args(["-b", path_str(&passwd), "ops", "s3cret"])
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut broker = Broker::start();
    broker.extra_config = format!("password_file {}\n", passwd.display());
    broker.restart();
    std::fs::write(d.join("right"), "s3cret\n").unwrap();
    std::fs::write(d.join("wrong"), "guess\n").unwrap();
    let url = broker.url();
    let devices = |file: &str| {
        kiln_in(
            d,
            &[
                "devices",
                "--broker",
                &url,
                "--username",
                "ops",
                "--password-file",
                file,
            ],
        )
    };
    devices("right").ok("the right password from a file");
    assert_eq!(devices("wrong").code, Some(69));
    let help = kiln_in(d, &["push", "--help"]);
    assert!(help.stdout.contains("KILN_BROKER_PASSWORD"), "{help}");

    // A web server where the broker should be: one line, no Rust value.
    let port = http_peer();
    let out = kiln_in(
        d,
        &["devices", "--broker", &format!("mqtt://127.0.0.1:{port}")],
    );
    one_line_error(&out, 69, &["not", "MQTT"]);
    assert!(!out.stderr.contains('{'), "a Debug value\n{out}");

    // `localhost:PORT` is an address to listen on.
    kiln_in(d, &["keygen", "-o", "fleet.key"]).ok("keygen");
    let mut dash = Command::new(kiln_path())
        .current_dir(d)
        .args([
            "dashboard",
            "--listen",
            "localhost:0",
            "--broker",
            &broker.url(),
        ])
        .args(["--username", "ops", "--password-file", "right"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dash_ok = false;
    let mut stderr = String::new();
    {
        use std::io::{BufRead, BufReader};
        let reader = BufReader::new(dash.stderr.take().unwrap());
        for line in reader.lines().map_while(Result::ok).take(5) {
            stderr.push_str(&line);
            stderr.push('\n');
            if line.contains("http://127.0.0.1:") {
                dash_ok = true;
                break;
            }
        }
    }
    let _ = dash.kill();
    let _ = dash.wait();
    assert!(dash_ok, "dashboard --listen localhost:0\n{stderr}");
    assert!(!stderr.contains("invalid value"), "{stderr}");

    // A kilnd without the replayer (a shipped one, or the lean one) is said as such,
    // with no count of failures (aarch64, under qemu, as the issue found it).
    // The lean build is built without it too and kept apart from the builds that
    // replace `kilnd` (scripts/build.sh); asked first, so the test says which it is.
    let shipped = kiln_e2e::lean_kilnd_path(&kiln_e2e::profile("aarch64-linux"));
    std::fs::write(
        d.join("one.wast"),
        "(module (func (export \"f\") (result i32) (i32.const 1)))\n(assert_return (invoke \"f\") (i32.const 1))\n",
    )
    .unwrap();
    let out = kiln_in(
        d,
        &[
            "conformance",
            "one.wast",
            "--target",
            "aarch64-linux",
            "--kilnd",
            path_str(&shipped),
        ],
    );
    one_line_error(&out, 65, &["cannot replay"]);
    assert!(!out.stderr.contains("unexpected failure"), "{out}");

    // keygen beside an existing fleet.root: refused, nothing written.
    let out = kiln_in(d, &["keygen", "-o", "new.key"]);
    one_line_error(&out, 73, &["fleet.root", "--no-root"]);
    assert!(!d.join("new.key").exists() && !d.join("new.root").exists());
    kiln_in(d, &["keygen", "-o", "new.key", "--no-root"]).ok("another release key");
}

/// Item 9: every subcommand with `--json` prints JSON a script can parse, with the
/// documented fields.
#[test]
fn every_json_output_parses() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truthj");
    let (watch, _device) = fleet.started(&broker, "tj-dev", &["tj-lab"]);
    let app = fleet.app(1, "fleet.key");
    let lines = |run: &Run| -> Vec<Value> {
        assert!(!run.stdout.trim().is_empty(), "no JSON\n{run}");
        run.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{run}")))
            .collect()
    };
    let mut args = vec![
        "push",
        path_str(&app),
        "--device",
        "tj-dev",
        "--sign",
        "fleet.key",
        "--json",
    ];
    args.extend(QUICK);
    let v = &lines(&fleet.kiln(&args).ok("push --json"))[0];
    assert_eq!(v["scope"]["device"], "tj-dev");
    assert_eq!(v["module"], "app");
    assert_eq!(v["version"], 1);
    assert!(v["serial"].as_u64().is_some());
    assert_eq!(v["devices"][0]["device"], "tj-dev");
    assert_eq!(v["devices"][0]["result"], "took");
    watch.wait_running(1, LIMIT);

    let v = &lines(
        &fleet
            .kiln(&["enroll", "tj-dev", "--sign", "fleet.key", "--json"])
            .ok("enroll"),
    )[0];
    assert_eq!(v["enrolled"][0]["device"], "tj-dev");
    assert_eq!(v["enrolled"][0]["change"], "enrolled");
    assert!(v["registry_serial"].as_u64().is_some());

    let v = &lines(&fleet.kiln(&["devices", "--json"]).ok("devices"))[0];
    assert_eq!(v["device"], "tj-dev");

    let watched = fleet
        .kiln(&["watch", "--device", "tj-dev", "--json", "--duration", "3"])
        .ok("watch");
    for v in lines(&watched) {
        assert_eq!(v["device"], "tj-dev", "{watched}");
    }

    let v = &lines(&fleet.kiln(&["gc", "--dry-run", "--json"]).ok("gc"))[0];
    assert_eq!(v["dry_run"], true);
    assert!(v["removed"].is_array() && v["referenced"].is_array());

    let v2 = fleet.app(2, "fleet.key");
    let mut args = vec![
        "rollout",
        path_str(&v2),
        "--group",
        "tj-lab",
        "--sign",
        "fleet.key",
    ];
    args.extend(QUICK);
    fleet.kiln(&args).ok("rollout");
    let v = &lines(&fleet.kiln(&["rollout", "status", "--json"]).ok("status"))[0];
    assert_eq!(v["group"], "tj-lab");
    assert_eq!(v["phase"], "complete");
    assert_eq!(v["counts"]["committed"], 1);
    assert_eq!(v["devices"][0]["outcome"], "committed");

    let v = &lines(
        &fleet
            .kiln(&[
                "push",
                path_str(&v2),
                "--group",
                "tj-lab",
                "--sign",
                "fleet.key",
                "--dry-run",
                "--json",
            ])
            .ok("dry run --json"),
    )[0];
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["scope"]["group"], "tj-lab");

    let v =
        &lines(&kiln_in(fleet.dir.path(), &["inspect", path_str(&app), "--json"]).ok("inspect"))[0];
    assert_eq!(v["manifest"]["name"], "app");

    let v = &lines(
        &fleet
            .kiln(&[
                "remove",
                "app",
                "--group",
                "tj-lab",
                "--sign",
                "fleet.key",
                "--json",
            ])
            .ok("remove --json"),
    )[0];
    assert_eq!(v["removed"], "app");
    assert_eq!(v["scope"]["group"], "tj-lab");
}

/// Item 9: what a command produces is on stdout, so `kiln X > file` keeps it; stderr
/// has progress and diagnostics only.
#[test]
fn every_result_goes_to_stdout() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, "truths");
    let (watch, _device) = fleet.started(&broker, "ts-dev", &["ts-lab"]);
    let app = fleet.app(1, "fleet.key");
    let out = fleet
        .push(&app, ["--device", "ts-dev"], "fleet.key")
        .ok("push");
    assert!(out.stdout.contains("pushed app v1"), "{out}");
    assert!(out.stdout.contains("ts-dev: took serial"), "{out}");
    watch.wait_running(1, LIMIT);
    let out = fleet
        .kiln(&["enroll", "ts-dev", "--sign", "fleet.key"])
        .ok("enroll");
    assert!(out.stdout.contains("ts-dev: enrolled"), "{out}");
    assert!(out.stdout.contains("registry serial"), "{out}");
    let out = fleet.kiln(&["gc", "--dry-run"]).ok("gc");
    assert!(out.stdout.contains("gc: would remove"), "{out}");
    let v2 = fleet.app(2, "fleet.key");
    let mut args = vec![
        "rollout",
        path_str(&v2),
        "--group",
        "ts-lab",
        "--sign",
        "fleet.key",
    ];
    args.extend(QUICK);
    let out = fleet.kiln(&args).ok("rollout");
    assert!(out.stdout.contains("rollout complete"), "{out}");
    let out = fleet.kiln(&["rollout", "status"]).ok("status");
    assert!(out.stdout.contains("ts-lab"), "{out}");
    let out = fleet
        .kiln(&[
            "push",
            path_str(&v2),
            "--device",
            "ts-dev",
            "--unsigned",
            "s.kilnstate",
        ])
        .ok("unsigned");
    assert!(
        out.stdout.contains("wrote the unsigned desired state"),
        "{out}"
    );
}
