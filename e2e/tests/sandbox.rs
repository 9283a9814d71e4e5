//! The module sandbox: `kilnd serve` keeps a healthy module running while misbehaving
//! modules next to it are contained, reported and restarted with backoff; limits are
//! signed into artifacts and enforced by `kilnd run` too.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_e2e::procfs::{children_of, parent_of};
use serde_json::Value;

use crate::util::{path_str, shared, Device};
use crate::DEVICES;

/// A running `kilnd serve` and every JSON record it printed so far.
pub struct Serve {
    child: Child,
    records: Arc<Mutex<Vec<Value>>>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Serve {
    /// Starts `kilnd serve` on `device` with `config` (the trust line and, under qemu,
    /// the worker launcher are added here).
    pub fn start(device: &Device, config: &str) -> Self {
        Self::start_with(device, config, &[])
    }

    /// [`Serve::start`] with extra environment variables for kilnd (and so its workers).
    pub fn start_with(device: &Device, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "trust = [{:?}]\n{}\n{config}",
            path_str(&shared().trust()),
            device.launcher_line()
        );
        let path = dir.path().join("kilnd.toml");
        std::fs::write(&path, text).unwrap();
        let stderr = dir.path().join("stderr.txt");
        let mut cmd = device.command(&["serve", "--config", path_str(&path)]);
        cmd.envs(env.iter().copied());
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd.spawn().expect("spawn kilnd serve");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = records.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("kilnd serve printed a non-JSON line `{line}`: {e}")
                });
                sink.lock().unwrap().push(value);
            }
        });
        Self {
            child,
            records,
            stderr,
            _dir: dir,
        }
    }

    pub fn records(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the records so far; panics with them if it never does.
    pub fn wait_until(&mut self, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let records = self.records();
            if done(&records) {
                return records;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                let records = self.records();
                if done(&records) {
                    return records;
                }
                panic!("kilnd serve exited ({status}) early\n{}", self.explain());
            }
            if Instant::now() > deadline {
                panic!("timed out after {limit:?}\n{}", self.explain());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for kilnd serve to exit on its own and returns its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("kilnd serve did not exit\n{}", self.explain());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn explain(&self) -> String {
        let records: Vec<String> = self.records().iter().map(|r| r.to_string()).collect();
        format!(
            "--- records ---\n{}\n--- stderr ---\n{}",
            records.join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // Workers die with their supervisor (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn of<'a>(records: &'a [Value], module: &str, kind: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["module"] == module && r["kind"] == kind)
        .collect()
}

/// Done when every misbehaving module was given up on (`failed`) and the healthy one
/// has published at least three more records since the last of them.
pub fn outlived(records: &[Value], healthy: &str, misbehaving: &[&str]) -> bool {
    let failed: Option<Vec<u64>> = misbehaving
        .iter()
        .map(|m| {
            of(records, m, "failed")
                .first()
                .and_then(|r| r["at_ms"].as_u64())
        })
        .collect();
    let Some(last) = failed.and_then(|f| f.into_iter().max()) else {
        return false;
    };
    of(records, healthy, "telemetry")
        .iter()
        .filter(|r| r["at_ms"].as_u64() > Some(last))
        .count()
        >= 3
}

pub fn module_entry(name: &str, artifact: &Path, extra: &str) -> String {
    format!(
        "\n[[module]]\nname = {name:?}\nartifact = {:?}\n{extra}\n",
        path_str(artifact)
    )
}

const MISBEHAVING: [&str; 6] = [
    "spin-fuel",
    "spin",
    "hang-host",
    "memory-bomb",
    "deep-recursion",
    "trap-tick",
];

#[test]
fn a_healthy_module_keeps_running_while_each_misbehaving_neighbour_is_contained() {
    for target in DEVICES {
        let device = Device::new(target);
        let s = shared();
        let fixture = |name: &str| s.artifact(&format!("fixtures/{name}.wat"), target);
        // Calls under qemu are slower; the healthy module gets a generous watchdog so
        // only misbehaviour trips it.
        let contained = "timeout_ms = 1000\nrestart = { backoff_ms = 100, max_crashes = 2 }";
        let mut config = String::new();
        config += &module_entry(
            "sensor",
            &s.artifact("sensor_filter.wasm", target),
            "tick_ms = 100\ntimeout_ms = 20000\nconfig = \"sensor=greenhouse-1\\nalpha=0.5\"",
        );
        config += &module_entry(
            "echo",
            &fixture("echo"),
            "inbox = [\"sensor/temperature\"]\ntimeout_ms = 20000",
        );
        config += &module_entry(
            "spin-fuel",
            &s.artifact_with("fixtures/spin.wat", target, &["--fuel", "5000000"]),
            "timeout_ms = 60000\nrestart = { backoff_ms = 100, max_crashes = 2 }",
        );
        config += &module_entry("spin", &fixture("spin"), contained);
        config += &module_entry("hang-host", &fixture("hang-host"), contained);
        config += &module_entry(
            "memory-bomb",
            &fixture("memory-bomb"),
            &format!("memory_limit = \"4MiB\"\n{contained}"),
        );
        config += &module_entry("deep-recursion", &fixture("deep-recursion"), contained);
        config += &module_entry(
            "trap-tick",
            &fixture("trap-tick"),
            "tick_ms = 50\ntimeout_ms = 20000\nrestart = { backoff_ms = 300, max_crashes = 3 }",
        );
        let mut serve = Serve::start(&device, &config);

        let records = serve.wait_until(Duration::from_secs(180), |records| {
            outlived(records, "sensor", &MISBEHAVING)
        });
        let explain = serve.explain();
        let why = |module: &str| -> Vec<String> {
            of(&records, module, "stopped")
                .iter()
                .map(|r| {
                    format!(
                        "{}: {}",
                        r["reason"].as_str().unwrap(),
                        r["why"].as_str().unwrap()
                    )
                })
                .collect()
        };

        // The healthy module: started once, never stopped, counting without a gap; its
        // records reached the echo module through the kiln ABI's messages.
        assert_eq!(
            of(&records, "sensor", "started").len(),
            1,
            "{target}\n{explain}"
        );
        assert!(
            of(&records, "sensor", "stopped").is_empty(),
            "{target}\n{explain}"
        );
        let readings: Vec<Value> = of(&records, "sensor", "telemetry")
            .iter()
            .map(|r| serde_json::from_str(r["text"].as_str().unwrap()).unwrap())
            .collect();
        for (i, reading) in readings.iter().enumerate() {
            assert_eq!(
                reading["n"],
                i as u64 + 1,
                "{target}: gap in sensor ticks\n{explain}"
            );
            assert_eq!(
                reading["sensor"], "greenhouse-1",
                "{target}: config not read"
            );
        }
        let echoed: Vec<&str> = of(&records, "echo", "telemetry")
            .iter()
            .map(|r| r["text"].as_str().unwrap())
            .collect();
        assert!(
            !echoed.is_empty()
                && echoed.iter().all(|e| of(&records, "sensor", "telemetry")
                    .iter()
                    .any(|r| r["text"].as_str() == Some(e))),
            "{target}: echo did not receive the sensor's telemetry\n{explain}"
        );

        // Each misbehaviour: stopped for the right reason every time, then given up on.
        let expect = [
            (
                "spin-fuel",
                "fuel-exhausted: fuel exhausted in kiln_tick (budget 5000000 per call)",
            ),
            (
                "spin",
                "watchdog: watchdog: kiln_tick did not return within 1000 ms",
            ),
            (
                "hang-host",
                "watchdog: watchdog: kiln_tick did not return within 1000 ms",
            ),
            ("memory-bomb", "trap: trapped in kiln_tick: unreachable"),
            (
                "deep-recursion",
                "trap: trapped in kiln_tick: call stack exhausted",
            ),
            (
                "trap-tick",
                "trap: trapped in kiln_tick: integer divide by zero",
            ),
        ];
        for (module, reason) in expect {
            let whys = why(module);
            let crashes = if module == "trap-tick" { 3 } else { 2 };
            assert_eq!(whys.len(), crashes, "{target} {module}\n{explain}");
            assert!(
                whys.iter().all(|w| w.starts_with(reason)),
                "{target} {module}: expected `{reason}`, got {whys:?}"
            );
            let failed = of(&records, module, "failed");
            assert_eq!(failed.len(), 1, "{target} {module}\n{explain}");
            assert_eq!(failed[0]["crashes"], crashes as u64);
        }

        // The memory cap held: growth was refused inside the guest at 4 MiB, and the
        // worker's peak RSS stayed far below what the bomb asked for.
        let logs: Vec<&str> = of(&records, "memory-bomb", "log")
            .iter()
            .map(|r| r["line"].as_str().unwrap())
            .collect();
        assert_eq!(
            logs,
            ["memory.grow refused at 64", "memory.grow refused at 64"],
            "{target}\n{explain}"
        );
        for stop in of(&records, "memory-bomb", "stopped") {
            let peak = stop["peak_rss_kib"].as_u64().unwrap();
            assert!(peak < 200 * 1024, "{target}: worker peak RSS {peak} KiB");
        }

        // Restart with backoff: 300 ms, then 600 ms, then given up; each worker starts
        // afresh (the module counts from 1 again) no sooner than its backoff.
        let stops = of(&records, "trap-tick", "stopped");
        let backoffs: Vec<Value> = stops.iter().map(|r| r["restart_in_ms"].clone()).collect();
        assert_eq!(
            backoffs,
            [Value::from(300), Value::from(600), Value::Null],
            "{target}"
        );
        let starts = of(&records, "trap-tick", "started");
        assert_eq!(starts.len(), 3, "{target}\n{explain}");
        for (stop, next) in stops.iter().zip(starts.iter().skip(1)) {
            let waited = next["at_ms"].as_u64().unwrap() - stop["at_ms"].as_u64().unwrap();
            let backoff = stop["restart_in_ms"].as_u64().unwrap();
            assert!(
                waited >= backoff,
                "{target}: restarted after {waited} ms, backoff {backoff} ms"
            );
        }
        let ticks: Vec<&str> = of(&records, "trap-tick", "telemetry")
            .iter()
            .map(|r| r["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            ticks,
            ["tick 1", "tick 2", "tick 1", "tick 2", "tick 1", "tick 2"],
            "{target}"
        );
    }
}

#[test]
fn a_command_module_under_serve_has_its_output_captured_and_ends_cleanly() {
    let device = Device::new("x86_64-linux");
    let hello = shared().artifact("hello.wasm", "x86_64-linux");
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("config.txt"), "sensor=42\n").unwrap();
    let config = module_entry(
        "hello",
        &hello,
        &format!(
            "args = [\"board\", \"--read\", \"/data/config.txt\"]\nenv = {{ GREETING = \"hej\" }}\ndirs = [\"{}:/data\"]",
            path_str(data.path())
        ),
    );
    let mut serve = Serve::start(&device, &config);
    assert_eq!(
        serve.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        serve.explain()
    );
    let records = serve.records();
    let lines: Vec<(&str, &str)> = of(&records, "hello", "log")
        .iter()
        .map(|r| (r["source"].as_str().unwrap(), r["line"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            ("stdout", "hej, board! (4 args)"),
            ("stdout", "/data/config.txt: sensor=42")
        ],
        "{}",
        serve.explain()
    );
    let stopped = of(&records, "hello", "stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["exit_code"], 0);
    assert_eq!(stopped[0]["restart_in_ms"], Value::Null);
}

#[test]
fn an_artifact_that_cannot_start_is_failed_at_once_and_serve_says_so() {
    let device = Device::new("x86_64-linux");
    // Asking an artifact built without metering for fuel is refused, not ignored.
    let config = module_entry(
        "spin",
        &shared().artifact("fixtures/spin.wat", "x86_64-linux"),
        "fuel_per_call = 1000",
    );
    let mut serve = Serve::start(&device, &config);
    assert_eq!(
        serve.wait_exit(Duration::from_secs(30)),
        Some(82),
        "{}",
        serve.explain()
    );
    let records = serve.records();
    let stopped = of(&records, "spin", "stopped");
    assert_eq!(stopped.len(), 1, "{}", serve.explain());
    assert_eq!(stopped[0]["reason"], "load-failed");
    assert!(
        stopped[0]["why"]
            .as_str()
            .unwrap()
            .contains("compiled without metering; compile it with `kiln compile --fuel N`"),
        "{}",
        serve.explain()
    );
    assert_eq!(of(&records, "spin", "failed").len(), 1);
}

#[test]
fn a_bad_config_is_one_line_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kilnd.toml");
    std::fs::write(
        &path,
        "trust = [\"fleet.pub\"]\n[[module]]\nartifact = \"a.kiln\"\ntick = 5\n",
    )
    .unwrap();
    Device::new("x86_64-linux")
        .kilnd(&["serve", "--config", path_str(&path)])
        .assert_refused(81, &["kilnd.toml` line 4", "unknown field `tick`"]);
}

#[test]
fn kilnd_run_enforces_the_fuel_and_memory_cap_signed_into_the_artifact() {
    let device = Device::new("x86_64-linux");
    let s = shared();
    let starved = s.artifact_with("compute.wat", "x86_64-linux", &["--fuel", "1000000"]);
    device.run(&starved, &[]).assert_refused(
        80,
        &["module `compute` fuel exhausted in _start (budget 1000000 per call)"],
    );
    let fed = s.artifact_with("compute.wat", "x86_64-linux", &["--fuel", "100000000000"]);
    device
        .run(&fed, &[])
        .assert_code(0)
        .assert_stdout("primes below 1000000: 78498, sum 37550402023\n");
    let cramped = s.artifact_with("hello.wasm", "x86_64-linux", &["--memory-limit", "1MiB"]);
    device.run(&cramped, &[]).assert_refused(
        79,
        &["needs 17 pages of memory at start, above its cap of 16 pages"],
    );
}

#[test]
fn a_worker_killed_from_outside_is_reported_and_restarted_while_the_supervisor_lives() {
    let (mut serve, records) = restarting_sensor();
    // A panic inside wasmer aborts the worker (SIGABRT; kilnd is built panic=abort),
    // and the kernel's OOM killer sends SIGKILL.
    drop(records);
    for (n, (signal, why)) in [
        ("ABRT", "killed by signal 6 (SIGABRT)"),
        ("KILL", "killed by signal 9 (SIGKILL)"),
    ]
    .into_iter()
    .enumerate()
    {
        let pid = of(&serve.records(), "sensor", "started")[n]["pid"]
            .as_i64()
            .unwrap();
        kill(signal, pid as u64);
        let records = serve.wait_until(Duration::from_secs(30), |r| {
            of(r, "sensor", "started").len() == n + 2
        });
        let stopped = of(&records, "sensor", "stopped");
        assert_eq!(stopped.len(), n + 1, "{}", serve.explain());
        assert_eq!(stopped[n]["reason"], "signal");
        assert_eq!(stopped[n]["why"], why);
        assert_eq!(stopped[n]["restart_in_ms"], 50 << n);
        let restarted = of(&records, "sensor", "started")[n + 1];
        assert_eq!(restarted["attempt"], n as u64 + 2);
        assert_ne!(restarted["pid"].as_i64(), Some(pid));
    }
}

/// The sensor's first worker and the zygote that forked it.
fn first_worker_and_zygote(records: &[Value]) -> (u32, u32) {
    let worker = of(records, "sensor", "started")[0]["pid"].as_u64().unwrap() as u32;
    (worker, parent_of(worker).unwrap())
}

/// Workers are forked by `kilnd zygote`, a child of `kilnd serve` that reads no
/// config; a zygote that dies takes its workers with it, and kilnd starts a new one
/// and restarts them through it.
#[test]
fn workers_are_forked_by_a_zygote_and_a_lost_zygote_is_replaced() {
    let (mut serve, records) = restarting_sensor();
    let (_, zygote) = first_worker_and_zygote(&records);
    assert_eq!(
        parent_of(zygote),
        Some(serve.child.id()),
        "the zygote is serve's child"
    );
    let cmdline = std::fs::read(format!("/proc/{zygote}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(
        args[1..],
        [&b"zygote"[..]],
        "no config, no key, no argument"
    );

    kill("KILL", zygote.into());
    let records = serve.wait_until(Duration::from_secs(30), |r| {
        of(r, "sensor", "started").len() == 2
    });
    let stopped = of(&records, "sensor", "stopped");
    let why = stopped[0]["why"].as_str().unwrap();
    assert!(
        why.contains("the zygote that forked it died"),
        "{}",
        serve.explain()
    );
    let again = of(&records, "sensor", "started")[1]["pid"]
        .as_u64()
        .unwrap();
    let second = parent_of(again as u32).unwrap();
    assert_ne!(second, zygote);
    assert_eq!(parent_of(second), Some(serve.child.id()));
    assert!(serve.explain().contains("the zygote has ended"));
}

/// Once idle, the zygote keeps one worker forked ahead of need, a spare: the next start
/// is handed to it (a restart gets the spare's pid, so no fork is on its way), and a
/// new spare follows.
#[test]
fn an_idle_zygote_keeps_a_spare_that_the_next_start_becomes() {
    let (mut serve, records) = restarting_sensor();
    let (worker, zygote) = first_worker_and_zygote(&records);
    let other_child = |than: u32| {
        wait_for(Duration::from_secs(10), || {
            children_of(zygote).into_iter().find(|p| *p != than)
        })
    };
    let spare = other_child(worker).expect("the zygote forks a spare once idle");
    kill("KILL", worker.into());
    let records = serve.wait_until(Duration::from_secs(30), |r| {
        of(r, "sensor", "started").len() == 2
    });
    assert_eq!(
        of(&records, "sensor", "started")[1]["pid"].as_u64(),
        Some(u64::from(spare)),
        "the restart is the spare; {}",
        serve.explain()
    );
    assert!(other_child(spare).is_some(), "a new spare follows");
}

/// The issue-29 reproduction: a zygote restarted by a module's spawn died with that
/// module's supervisor thread (`PR_SET_PDEATHSIG` follows the forking thread) and took
/// every other worker with it. Here the zygote is killed three times while only a
/// trapping module `t` is spawning, so each replacement is asked for by `t`; a healthy
/// module `c` added by SIGHUP then outlives `t` being marked failed.
#[test]
fn a_healthy_module_outlives_the_failure_of_the_module_that_restarted_the_zygote() {
    let device = Device::new("x86_64-linux");
    let trap = shared().artifact("fixtures/trap-tick.wat", "x86_64-linux");
    let sensor = shared().artifact("sensor_filter.wasm", "x86_64-linux");
    let t = |max_crashes: u32| {
        module_entry(
            "t",
            &trap,
            &format!(
                "tick_ms = 100\nrestart = {{ backoff_ms = 100, backoff_max_ms = 100, max_crashes = {max_crashes}, window_s = 1 }}"
            ),
        )
    };
    let mut serve = Serve::start(&device, &t(1000));
    let serve_pid = serve.child.id();
    let mut zygotes = Vec::new();
    for round in 0..3 {
        let zygote = wait_for(Duration::from_secs(30), || zygote_of(serve_pid))
            .unwrap_or_else(|| panic!("round {round}: no zygote\n{}", serve.explain()));
        assert!(!zygotes.contains(&zygote), "round {round}: the old zygote");
        zygotes.push(zygote);
        kill("KILL", zygote.into());
        // `t` keeps crashing and spawning; its next spawn starts the next zygote.
        let next = wait_for(Duration::from_secs(30), || {
            zygote_of(serve_pid).filter(|z| *z != zygote)
        });
        assert!(
            next.is_some(),
            "round {round}: no new zygote\n{}",
            serve.explain()
        );
    }

    // The operator adds `c`, then lowers `t`'s crash allowance so that it is failed.
    let config_path = serve._dir.path().join("kilnd.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        format!("{config}{}", module_entry("c", &sensor, "tick_ms = 50")),
    )
    .unwrap();
    kill("HUP", serve_pid.into());
    serve.wait_until(Duration::from_secs(30), |r| {
        of(r, "c", "telemetry").len() >= 3
    });
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, config.replace(&t(1000), &t(1))).unwrap();
    kill("HUP", serve_pid.into());
    let records = serve.wait_until(Duration::from_secs(30), |r| outlived(r, "c", &["t"]));
    // And `c` goes on well after `t`'s supervisor has ended.
    let seen = of(&records, "c", "telemetry").len();
    let records = serve.wait_until(Duration::from_secs(30), |r| {
        of(r, "c", "telemetry").len() >= seen + 20
    });
    assert_eq!(of(&records, "c", "started").len(), 1, "{}", serve.explain());
    assert!(
        of(&records, "c", "stopped").is_empty(),
        "c was stopped\n{}",
        serve.explain()
    );
}

/// The live zygote of `kilnd serve` `serve`: its child whose command ends in `zygote`.
fn zygote_of(serve: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let last = cmdline.split(|b| *b == 0).rfind(|a| !a.is_empty())?;
        (parent_of(pid) == Some(serve) && last == b"zygote").then_some(pid)
    })
}

/// Polls `probe` until it finds something or `limit` passes.
fn wait_for<T>(limit: Duration, probe: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kilnd serve` running sensor-filter natively with a quick restart policy, and its
/// records once the first worker has started.
fn restarting_sensor() -> (Serve, Vec<Value>) {
    let device = Device::new("x86_64-linux");
    let sensor = shared().artifact("sensor_filter.wasm", "x86_64-linux");
    let config = module_entry(
        "sensor",
        &sensor,
        "tick_ms = 100\nrestart = { backoff_ms = 50, max_crashes = 3 }",
    );
    let mut serve = Serve::start(&device, &config);
    let records = serve.wait_until(Duration::from_secs(30), |r| {
        !of(r, "sensor", "started").is_empty()
    });
    (serve, records)
}

/// Sends `signal` (a name such as KILL) to `pid` from outside, as an operator would.
fn kill(signal: &str, pid: u64) {
    let killed = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn sighup_swaps_a_changed_module_between_calls_and_sigterm_stops_cleanly() {
    let device = Device::new("x86_64-linux");
    let sensor = shared().artifact("sensor_filter.wasm", "x86_64-linux");
    let entry = |id: &str| {
        module_entry(
            "sensor",
            &sensor,
            &format!("tick_ms = 50\nconfig = \"sensor={id}\""),
        )
    };
    let mut serve = Serve::start(&device, &entry("before"));
    let sensor_ids = |records: &[Value]| -> Vec<(String, u64)> {
        of(records, "sensor", "telemetry")
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_str(r["text"].as_str().unwrap()).unwrap();
                (
                    v["sensor"].as_str().unwrap().to_string(),
                    v["n"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    serve.wait_until(Duration::from_secs(30), |r| sensor_ids(r).len() >= 3);

    // The operator edits the config and sends SIGHUP.
    let config = std::fs::read_to_string(serve._dir.path().join("kilnd.toml")).unwrap();
    let edited = config.replace("sensor=before", "sensor=after");
    std::fs::write(serve._dir.path().join("kilnd.toml"), edited).unwrap();
    let pid = serve.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let records = serve.wait_until(Duration::from_secs(30), |r| {
        sensor_ids(r).iter().filter(|(id, _)| id == "after").count() >= 3
    });
    let stopped = of(&records, "sensor", "stopped");
    assert_eq!(stopped.len(), 1, "{}", serve.explain());
    assert_eq!(stopped[0]["reason"], "swapped");
    assert_eq!(stopped[0]["restart_in_ms"], 0);
    // Between calls: the old worker's ticks run 1, 2, 3, ... without a gap, then the
    // new one starts at 1 with the new config; nothing trapped or was lost.
    let ids = sensor_ids(&records);
    let split = ids.iter().position(|(id, _)| id == "after").unwrap();
    assert!(ids[..split].iter().all(|(id, _)| id == "before"));
    for (i, (_, n)) in ids[..split].iter().enumerate() {
        assert_eq!(*n, i as u64 + 1);
    }
    for (i, (id, n)) in ids[split..].iter().enumerate() {
        assert_eq!((id.as_str(), *n), ("after", i as u64 + 1));
    }

    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(
        serve.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        serve.explain()
    );
    let stopped = of(&serve.records(), "sensor", "stopped").len();
    let last = serve
        .records()
        .into_iter()
        .rev()
        .find(|r| r["kind"] == "stopped")
        .unwrap();
    assert_eq!(
        (stopped, last["reason"].as_str()),
        (2, Some("stopped")),
        "{}",
        serve.explain()
    );
}
