//! Cold start. In the worker: the `started` record of `kilnd serve` for the
//! sensor-filter reactor. As a whole process: `kilnd run hello.kiln` against the same
//! program built natively for the target, with kilnd's own split of where the time
//! went (`--timings`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::{path_str, target_dir};
use serde_json::Value;

use kiln_e2e::procfs::{children_of, parent_of, pss_kib, rollup_kib};

use crate::target::{rss_kib, Target};
use crate::{median, table};

/// How the module's memory is compiled: reserved (kiln's default: 8 GiB of address
/// space per memory, no bounds checks in code) or with `kiln compile --bounds-checks`.
pub const MEMORY: [(&str, &[&str]); 2] =
    [("reserved", &[]), ("bounds-checked", &["--bounds-checks"])];

/// The modules whose worker start is measured: a Rust reactor that imports WASI, and
/// a small kiln-ABI reactor that does not (so its worker starts no I/O runtime).
const WORKERS: [(&str, &str); 2] = [
    ("sensor_filter.wasm", "sensor-filter"),
    ("fixtures/counter.wat", "counter"),
];

pub fn measure(target: &Target, runs: usize) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (source, label) in WORKERS {
        for (memory, flags) in MEMORY {
            rows.push(worker_start(target, runs, (source, label), memory, flags));
        }
    }
    for (memory, flags) in MEMORY {
        rows.push(process_start(target, runs, memory, flags));
    }
    rows.push(device_memory(target, runs));
    rows
}

/// Prints the two tables: per target, worker rows first, then process rows.
pub fn print(rows: &[Vec<String>], runs: usize) {
    let workers = WORKERS.len() * MEMORY.len();
    let per_target = workers + MEMORY.len() + 1;
    let (mut worker, mut process, mut device) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in rows.chunks(per_target) {
        worker.extend_from_slice(&chunk[..workers]);
        process.extend_from_slice(&chunk[workers..workers + MEMORY.len()]);
        device.push(chunk[workers + MEMORY.len()].clone());
    }
    print_worker(&worker, runs);
    print_process(&process, runs);
    print_device(&device, runs);
}

fn print_device(rows: &[Vec<String>], runs: usize) {
    report!("\n### A whole device's memory, median of {runs}\n");
    report!("`kilnd serve` with sensor-filter (Rust, WASI) and two small kiln-ABI reactors");
    report!("(`fixtures/counter.wat`), 1.5 s after they started: PSS of each process from");
    report!("`/proc/PID/smaps_rollup`, and a small reactor's worker's Private_Dirty. Workers are");
    report!("forked by the zygote and share its pages until they write to them; the zygote's");
    report!("spare is the worker it keeps forked ahead of the next start.\n");
    table(
        &[
            "target",
            "mode",
            "serve",
            "zygote",
            "spare",
            "sensor-filter",
            "reactor 1",
            "reactor 2",
            "total PSS",
            "reactor Private_Dirty",
        ],
        rows,
    );
}

/// PSS of serve, the zygote and each worker, and a small reactor's Private_Dirty.
fn device_memory(target: &Target, runs: usize) -> Vec<String> {
    let sensor = target.artifact("sensor_filter.wasm", "sensor-filter-reserved", &[]);
    let counter = target.artifact("fixtures/counter.wat", "counter", &[]);
    let mut config = module("sensor", &sensor, "");
    for name in ["r1", "r2"] {
        config += &module(name, &counter, "config = \"1\"\ntick_ms = 1000\n");
    }
    let config = target.config("device-memory", &config);
    let mut samples: Vec<Vec<f64>> = Vec::new();
    for _ in 0..runs {
        let (mut child, mut records) = target.serve(&config);
        let mut pids = std::collections::BTreeMap::new();
        while pids.len() < 3 {
            let r = records.next().expect("three started records");
            if r["kind"] == "started" {
                pids.insert(
                    r["module"].as_str().unwrap_or("").to_string(),
                    r["pid"].as_u64().unwrap_or(0),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        let zygote = parent_of(pids["r1"] as u32).unwrap_or(0) as u64;
        let kib = |pid: u64| pss_kib(pid as u32).unwrap_or(0) as f64 / 1024.0;
        // The zygote's spare (a worker forked ahead of the next start) is the device's too.
        let spare: f64 = children_of(zygote as u32)
            .into_iter()
            .filter(|pid| !pids.values().any(|w| *w == u64::from(*pid)))
            .map(|pid| kib(pid.into()))
            .sum();
        let row = vec![
            kib(child.id() as u64),
            kib(zygote),
            spare,
            kib(pids["sensor"]),
            kib(pids["r1"]),
            kib(pids["r2"]),
            rollup_kib(pids["r1"] as u32, "Private_Dirty").unwrap_or(0) as f64 / 1024.0,
        ];
        let _ = child.kill();
        let _ = child.wait();
        samples.push(row);
    }
    let col = |i: usize| median(samples.iter().map(|r| r[i]));
    let mut row = vec![target.name.clone(), target.mode().into()];
    for i in 0..6 {
        row.push(format!("{:.1} MiB", col(i)));
    }
    row.push(format!(
        "{:.1} MiB",
        median(samples.iter().map(|r| r[..6].iter().sum::<f64>()))
    ));
    row.push(format!("{:.2} MiB", col(6)));
    row
}

fn module(name: &str, artifact: &std::path::Path, extra: &str) -> String {
    format!(
        "[[module]]\nname = \"{name}\"\nartifact = {:?}\ntimeout_ms = 60000\nrestart = {{ backoff_ms = 10 }}\n{extra}",
        path_str(artifact)
    )
}

fn print_process(rows: &[Vec<String>], runs: usize) {
    report!("\n### Cold start of a whole process: hello (Rust, WASI), median of {runs}\n");
    report!("`kilnd run hello.kiln` from exec to exit, against the same source built natively");
    report!("for the target (both under qemu-user for the emulated targets); the split is what");
    report!("`kilnd run --timings` reports for its own steps.\n");
    table(
        &[
            "target",
            "mode",
            "memory",
            "native hello",
            "kilnd run hello.kiln",
            "read",
            "verify",
            "deserialize",
            "instantiate",
            "run",
        ],
        rows,
    );
}

/// The hello example built natively for the target (scripts/bench.sh builds it).
pub fn native_program(name: &str, triple: &str) -> PathBuf {
    target_dir()
        .join("examples")
        .join(triple)
        .join("release")
        .join(name)
}

fn process_start(target: &Target, runs: usize, memory: &str, flags: &[&str]) -> Vec<String> {
    let artifact = target.artifact("hello.wasm", &format!("hello-{memory}"), flags);
    let native = native_program("hello", &target.profile.triple);
    let wall = |mut cmd: Command| {
        let started = Instant::now();
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?} failed: {out:?}");
        (started.elapsed().as_secs_f64() * 1000.0, out)
    };
    let native_cmd = || {
        let mut cmd = target.profile.command(&native);
        cmd.arg("bench");
        cmd
    };
    let kiln_cmd = || {
        let trust = target.trust();
        let mut cmd = target.kilnd(&[
            "run",
            path_str(&artifact),
            "--trust",
            path_str(&trust),
            "--timings",
            "--",
            "bench",
        ]);
        cmd.env_remove("KILN_LOG");
        cmd
    };
    // One warm-up each: the page cache, not the first run, is what a device has.
    wall(native_cmd());
    wall(kiln_cmd());
    let native_ms = median((0..runs).map(|_| wall(native_cmd()).0));
    let mut splits: Vec<Vec<f64>> = Vec::new();
    let kiln_ms = median((0..runs).map(|_| {
        let (ms, out) = wall(kiln_cmd());
        splits.push(timings(&String::from_utf8_lossy(&out.stderr)));
        ms
    }));
    let part = |i: usize| format!("{:.2} ms", median(splits.iter().map(|s| s[i])));
    vec![
        target.name.clone(),
        target.mode().into(),
        memory.into(),
        format!("{native_ms:.1} ms"),
        format!("{kiln_ms:.1} ms"),
        part(0),
        part(1),
        part(2),
        part(3),
        part(4),
    ]
}

/// `kilnd: timings: read A ms, verify B ms, deserialize C ms, instantiate D ms, run E ms`
pub fn timings(stderr: &str) -> Vec<f64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("timings:"))
        .unwrap_or_else(|| panic!("no timings from kilnd run: {stderr}"));
    line.split(", ")
        .filter_map(|part| {
            let ms = part.trim().strip_suffix(" ms")?;
            ms.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

fn print_worker(start_rows: &[Vec<String>], runs: usize) {
    report!("\n### Worker start: sensor-filter (Rust reactor, WASI) and counter.wat (small kiln-ABI reactor), median of {runs}\n");
    report!(
        "spawn + read + verify + deserialize + instantiate + kiln_init + first kiln_tick, as the"
    );
    report!(
        "supervisor's `started` record reports it: `start` is the first worker of a fresh kilnd,\n`restart` the same worker forked again by the warm zygote after a SIGKILL (the split\nis the first start's). Idle RSS and PSS are the worker's 1.5 s later (PSS counts\nkilnd's shared code once across workers; under qemu both include the emulator).\n"
    );
    table(
        &[
            "target",
            "mode",
            "module",
            "memory",
            "start",
            "restart",
            "verify",
            "deserialize",
            "instantiate",
            "init",
            "first tick",
            "idle RSS",
            "idle PSS",
        ],
        start_rows,
    );
}

fn worker_start(
    target: &Target,
    runs: usize,
    (source, label): (&str, &str),
    memory: &str,
    flags: &[&str],
) -> Vec<String> {
    let artifact = target.artifact(source, &format!("{label}-{memory}"), flags);
    let config = target.config(
        &format!("{label}-start-{memory}"),
        // The counter publishes this many records per tick; sensor-filter needs none.
        &module(
            "m",
            &artifact,
            if source.ends_with(".wat") {
                "config = \"1\"\n"
            } else {
                ""
            },
        ),
    );
    let mut samples: Vec<(Value, f64, f64, f64)> = Vec::new();
    for _ in 0..runs {
        let (mut child, mut records) = target.serve(&config);
        let started = records
            .find(|r| r["kind"] == "started")
            .expect("a started record");
        std::thread::sleep(Duration::from_millis(1500));
        let pid = started["pid"].as_u64().unwrap_or(0);
        let idle = rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
        let pss = pss_kib(pid as u32).unwrap_or(0) as f64 / 1024.0;
        // A restart: the zygote is warm, as it is for every start but kilnd's first.
        // SAFETY: SIGKILL to the worker's pid, which its zygote has not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let restarted = records
            .find(|r| r["kind"] == "started")
            .expect("a second started record");
        let _ = child.kill();
        let _ = child.wait();
        samples.push((
            started,
            idle,
            pss,
            restarted["start_ms"].as_f64().unwrap_or(0.0),
        ));
    }
    let field = |name: &str| {
        median(
            samples
                .iter()
                .map(|(r, ..)| r[name].as_f64().unwrap_or(0.0)),
        )
    };
    vec![
        target.name.clone(),
        target.mode().into(),
        label.into(),
        memory.into(),
        format!("{:.1} ms", field("start_ms")),
        format!(
            "{:.1} ms",
            median(samples.iter().map(|(.., restart)| *restart))
        ),
        format!("{:.2} ms", field("verify_ms")),
        format!("{:.2} ms", field("deserialize_ms")),
        format!("{:.2} ms", field("instantiate_ms")),
        format!("{:.2} ms", field("init_ms")),
        format!("{:.2} ms", field("first_tick_ms")),
        format!("{:.1} MiB", median(samples.iter().map(|(_, rss, ..)| *rss))),
        format!(
            "{:.1} MiB",
            median(samples.iter().map(|(_, _, pss, _)| *pss))
        ),
    ]
}
