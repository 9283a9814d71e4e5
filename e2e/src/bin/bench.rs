//! `bench`: measures kiln on this machine and prints one table per section, with the
//! machine, tool versions and whether each target ran natively or under qemu-user.
//! Figures under emulation measure the emulator, not a board: compare ratios there.
//!
//! ```text
//! scripts/bench.sh [--runs N] [--targets x86_64-linux,aarch64-linux]
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_compiler::commands::push::PushCommand;
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{compile, kilnd_path, path_str, profile, source, DEVICES};
use kiln_protocol::target::TargetProfile;
use serde_json::Value;

/// Measure kiln on this machine and print the tables the README quotes
#[derive(Parser)]
struct Args {
    /// Repetitions per figure; the median is shown
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Target profiles to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = DEVICES.map(String::from))]
    targets: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("bench.key");
    KeygenCommand::try_parse_from(["keygen", "-o", path_str(&key)])
        .expect("keygen args")
        .execute()
        .expect("keygen");
    print_machine(&args);

    let mut start_rows = Vec::new();
    let mut metering_rows = Vec::new();
    let mut update_rows = Vec::new();
    for name in &args.targets {
        let target = Target::new(name, dir.path(), &key);
        eprintln!("bench: {name}: worker start x{}", args.runs);
        start_rows.push(worker_start(&target, args.runs));
        eprintln!("bench: {name}: metering x{}", args.runs);
        metering_rows.push(metering(&target, args.runs));
        eprintln!("bench: {name}: fleet updates x{}", args.runs);
        update_rows.extend(update_latency(&target, args.runs));
    }

    println!(
        "\n### Worker start: sensor-filter (Rust reactor), median of {} cold starts\n",
        args.runs
    );
    println!(
        "spawn + read + verify + deserialize + instantiate + kiln_init + first kiln_tick, as the"
    );
    println!(
        "supervisor's `started` record reports it; idle RSS is the worker's VmRSS 1.5 s later.\n"
    );
    table(
        &[
            "target",
            "mode",
            "start",
            "verify",
            "deserialize",
            "instantiate",
            "init",
            "first tick",
            "idle RSS",
        ],
        &start_rows,
    );
    println!(
        "\n### Metering: compute.wat (sieve of 1,000,000), `_start` time, median of {}\n",
        args.runs
    );
    table(
        &["target", "mode", "plain", "metered (--fuel)", "overhead"],
        &metering_rows,
    );
    println!(
        "\n### Fleet update over MQTT (mosquitto on loopback), median of {}\n",
        args.runs
    );
    println!(
        "A reactor whose data segment makes the artifact the given size. `upload` is `kiln push`"
    );
    println!(
        "until the broker acknowledged every chunk and the desired state; `push -> running` ends"
    );
    println!("when the device reports the new version started (chunks fetched, verified, staged,");
    println!("started in a worker); throughput is artifact bytes over that time.\n");
    table(
        &[
            "target",
            "mode",
            "artifact",
            "upload",
            "push -> running",
            "throughput",
        ],
        &update_rows,
    );
}

struct Target {
    name: String,
    profile: TargetProfile,
    kilnd: PathBuf,
    dir: PathBuf,
    key: PathBuf,
}

impl Target {
    fn new(name: &str, dir: &Path, key: &Path) -> Self {
        let profile = profile(name);
        Self {
            name: name.into(),
            kilnd: kilnd_path(&profile),
            profile,
            dir: dir.into(),
            key: key.into(),
        }
    }

    fn mode(&self) -> &'static str {
        if self.profile.qemu.is_empty() {
            "native"
        } else {
            "qemu-user"
        }
    }

    fn artifact(&self, source_name: &str, label: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir.join(format!("{label}-{}.kiln", self.name));
        if !out.exists() {
            compile(&source(source_name), &self.name, &self.key, &out, extra);
        }
        out
    }

    fn kilnd(&self, args: &[&str]) -> Command {
        let mut cmd = self.profile.command(&self.kilnd);
        cmd.args(args).env_remove("KILN_LOG");
        cmd
    }

    fn trust(&self) -> PathBuf {
        self.key.with_extension("pub")
    }

    /// Writes `{name}/kilnd.toml`: trust, the worker launcher, then `rest`.
    fn config(&self, name: &str, rest: &str) -> PathBuf {
        let launcher: Vec<String> = self.profile.qemu.iter().map(|a| format!("{a:?}")).collect();
        let dir = self.dir.join(format!("{name}-{}", self.name));
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join("kilnd.toml");
        let text = format!(
            "trust = [{:?}]\nworker_launcher = [{}]\n{rest}",
            path_str(&self.trust()),
            launcher.join(", ")
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Starts `kilnd serve` and returns it with its stream of JSON records.
    fn serve(&self, config: &Path) -> (Child, impl Iterator<Item = Value>) {
        let mut child = self
            .kilnd(&["serve", "--config", path_str(config)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kilnd serve");
        let stdout = child.stdout.take().expect("stdout");
        let records = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok());
        (child, records)
    }
}

fn worker_start(target: &Target, runs: usize) -> Vec<String> {
    let artifact = target.artifact("sensor_filter.wasm", "sensor-filter", &[]);
    let config = target.config(
        "sensor",
        &format!(
            "[[module]]\nname = \"sensor\"\nartifact = {:?}\ntimeout_ms = 60000\n",
            path_str(&artifact)
        ),
    );
    let mut samples: Vec<(Value, f64)> = Vec::new();
    for _ in 0..runs {
        let (mut child, mut records) = target.serve(&config);
        let started = records
            .find(|r| r["kind"] == "started")
            .expect("a started record");
        std::thread::sleep(Duration::from_millis(1500));
        let pid = started["pid"].as_u64().unwrap_or(0);
        let idle = rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
        let _ = child.kill();
        let _ = child.wait();
        samples.push((started, idle));
    }
    let field = |name: &str| median(samples.iter().map(|(r, _)| r[name].as_f64().unwrap_or(0.0)));
    vec![
        target.name.clone(),
        target.mode().into(),
        format!("{:.1} ms", field("start_ms")),
        format!("{:.2} ms", field("verify_ms")),
        format!("{:.2} ms", field("deserialize_ms")),
        format!("{:.2} ms", field("instantiate_ms")),
        format!("{:.2} ms", field("init_ms")),
        format!("{:.2} ms", field("first_tick_ms")),
        format!("{:.1} MiB", median(samples.iter().map(|(_, rss)| *rss))),
    ]
}

fn metering(target: &Target, runs: usize) -> Vec<String> {
    let plain = target.artifact("compute.wat", "compute", &[]);
    let metered = target.artifact("compute.wat", "compute-fuel", &["--fuel", "100000000000"]);
    let time = |artifact: &Path| {
        median((0..runs).map(|_| {
            let out = target
                .kilnd(&[
                    "run",
                    path_str(artifact),
                    "--trust",
                    path_str(&target.trust()),
                    "--timings",
                ])
                .output()
                .expect("kilnd run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            stderr
                .split(", run ")
                .nth(1)
                .and_then(|s| s.trim_end().strip_suffix(" ms"))
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no timings from kilnd run: {stderr}"))
        }))
    };
    let (p, m) = (time(&plain), time(&metered));
    vec![
        target.name.clone(),
        target.mode().into(),
        format!("{p:.1} ms"),
        format!("{m:.1} ms"),
        format!("{:+.0}%", (m / p - 1.0) * 100.0),
    ]
}

/// A reactor module carrying `size` bytes of data (distinct per version).
fn sized_module(size: usize, version: u64) -> String {
    let mut data = String::with_capacity(size * 3);
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ version;
    for _ in 0..size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push_str(&format!("\\{:02x}", x as u8));
    }
    let pages = size / 65536 + 2;
    format!(
        "(module (memory (export \"memory\") {pages}) (data (i32.const 0) \"{data}\")\n (func (export \"kiln_tick\") (result i32) i32.const 0))"
    )
}

fn update_latency(target: &Target, runs: usize) -> Vec<Vec<String>> {
    let broker = Broker::start();
    let device = format!("bench-{}", target.name);
    let config = target.config(
        &device,
        &format!(
            "device = {device:?}\ndata_dir = \"data\"\n[mqtt]\nbroker = {:?}\n",
            broker.url()
        ),
    );
    let (mut child, records) = target.serve(&config);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        for r in records.filter(|r| r["kind"] == "started") {
            let _ = tx.send(r["version"].as_u64().unwrap_or(0));
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut rows = Vec::new();
    let mut version = 0;
    for (label, size) in [("100 KiB", 100 * 1024), ("1 MiB", 1024 * 1024)] {
        let mut uploads = Vec::new();
        let mut latencies = Vec::new();
        let mut artifact_len = 0;
        for _ in 0..runs {
            version += 1;
            let wat = target.dir.join(format!("sized-{version}.wat"));
            std::fs::write(&wat, sized_module(size, version)).expect("write wat");
            let out = target
                .dir
                .join(format!("sized-{version}-{}.kiln", target.name));
            let v = version.to_string();
            compile(
                &wat,
                &target.name,
                &target.key,
                &out,
                &["--name", "sized", "--version", &v],
            );
            artifact_len = std::fs::metadata(&out).map_or(0, |m| m.len());
            let started = Instant::now();
            PushCommand::try_parse_from([
                "push",
                path_str(&out),
                "--device",
                &device,
                "--sign",
                path_str(&target.key),
                "--broker",
                &broker.url(),
                "--health-window-ms",
                "1000",
                "--timeout-ms",
                "60000",
            ])
            .expect("push args")
            .execute()
            .expect("kiln push");
            uploads.push(started.elapsed().as_secs_f64() * 1000.0);
            loop {
                match rx.recv_timeout(Duration::from_secs(120)) {
                    Ok(v) if v == version => break,
                    Ok(_) => continue,
                    Err(e) => panic!("device never ran v{version}: {e}"),
                }
            }
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            // Let the health window pass so the next push starts from a committed state.
            std::thread::sleep(Duration::from_millis(1200));
        }
        let latency = median(latencies.into_iter());
        rows.push(vec![
            target.name.clone(),
            target.mode().into(),
            format!("{label} ({} KiB)", artifact_len / 1024),
            format!("{:.0} ms", median(uploads.into_iter())),
            format!("{latency:.0} ms"),
            format!(
                "{:.1} MiB/s",
                artifact_len as f64 / (1024.0 * 1024.0) / (latency / 1000.0)
            ),
        ]);
    }
    let _ = child.kill();
    let _ = child.wait();
    rows
}

fn print_machine(args: &Args) {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_else(|| "not found".into())
    };
    println!(
        "## kiln bench, {}",
        run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    println!();
    println!(
        "- machine: {} ({} cores), {}",
        run("uname", &["-m"]),
        run("nproc", &[]),
        run("uname", &["-sr"])
    );
    println!(
        "- wasmer {} (kilnd and kiln), {}",
        kiln_compiler::aot::WASMER_VERSION,
        run("qemu-aarch64", &["--version"])
    );
    println!(
        "- targets: {}; runs per figure: {}",
        args.targets.join(", "),
        args.runs
    );
}

fn rss_kib(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}
