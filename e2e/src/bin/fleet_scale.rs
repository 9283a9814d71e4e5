//! `scripts/fleet-scale.sh`: a simulated fleet (kilnd-sim, default 1,000 devices) on
//! this machine against a real mosquitto, driven by kiln's own commands (the host
//! build users install), measured: push to every device committed, a rollout in
//! growing waves, a bad release halted, `kiln devices`, gc; the broker's traffic per
//! device per update; peak memory of kiln and of the broker. Prints a markdown table.
//!
//! With `--brokers 3` (or more), a nats-server cluster on loopback instead
//! (`kiln_e2e::nats`): the devices spread over its nodes, kiln on the first, and node
//! 1 is killed in the middle of the rollout (and restarted ten seconds later), which
//! must still complete with every device committed once. The same figures, the brokers' summed over the nodes.

#![allow(clippy::unwrap_used)] // a harness: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::nats::Cluster;
use kiln_e2e::procfs::pss_kib;
use kiln_e2e::sim::Sim;
use kiln_e2e::{path_str, source};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Measure the fleet side with simulated devices
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// The kiln to measure (the host-profile build)
    #[arg(long)]
    kiln: PathBuf,
    /// 1: one mosquitto; 3 or more: a nats-server cluster of that many nodes, one of
    /// them killed in the middle of the rollout
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
    brokers: u8,
    /// How often each device's running module publishes a telemetry value (kilnd-sim's
    /// `--telemetry-ms`): on a cluster every QoS 1 publish is a JetStream write
    #[arg(long, default_value_t = 5000)]
    telemetry_ms: u64,
    /// The first push's artifacts from an HTTP mirror (Debian's nginx) instead of the
    /// broker: `kiln push --mirror-dir --mirror-url` (a rollout fetches from the broker)
    #[arg(long)]
    mirror: bool,
}

/// The broker side: one mosquitto, or a nats-server cluster.
enum Brokers {
    Mosquitto(Broker),
    Nats {
        cluster: Cluster,
        /// Each node's counters as last read (a killed node's stay as they were
        /// just before it died), what its earlier lives counted (a restarted node
        /// counts from zero), and its peak RSS.
        last: Vec<[u64; 4]>,
        before: Vec<[u64; 4]>,
        hwm_kib: Vec<u64>,
    },
}

impl Brokers {
    /// Messages and bytes in and out, under mosquitto's `$SYS` names; a cluster's
    /// summed over its nodes (what crosses between nodes, and JetStream's own
    /// replication, counted too).
    fn counters(&mut self) -> BTreeMap<String, u64> {
        match self {
            Brokers::Mosquitto(broker) => sys_counters(broker.port),
            Brokers::Nats {
                cluster,
                last,
                before,
                hwm_kib,
            } => {
                for (i, pid) in cluster.node_pids().into_iter().enumerate() {
                    if let Some(c) = cluster.counters(i) {
                        if c[0] < last[i][0] {
                            for k in 0..4 {
                                before[i][k] += last[i][k];
                            }
                        }
                        last[i] = c;
                    }
                    if let Some(pid) = pid {
                        hwm_kib[i] = hwm_kib[i].max(vm_hwm_kib(pid));
                    }
                }
                let keys = [
                    "messages/received",
                    "messages/sent",
                    "bytes/received",
                    "bytes/sent",
                ];
                keys.iter()
                    .enumerate()
                    .map(|(k, key)| {
                        (
                            format!("$SYS/broker/{key}"),
                            last.iter().chain(before.iter()).map(|c| c[k]).sum(),
                        )
                    })
                    .collect()
            }
        }
    }

    /// PSS of the broker processes now, and their peak RSS, summed.
    fn memory(&mut self) -> (u64, u64) {
        match self {
            Brokers::Mosquitto(broker) => {
                let pid = broker.pid().unwrap();
                (pss_kib(pid).unwrap_or(0), vm_hwm_kib(pid))
            }
            Brokers::Nats { cluster, .. } => {
                let pids: Vec<u32> = cluster.node_pids().into_iter().flatten().collect();
                let _ = self.counters();
                let Brokers::Nats { hwm_kib, .. } = self else {
                    unreachable!()
                };
                (
                    pids.iter().map(|p| pss_kib(*p).unwrap_or(0)).sum(),
                    hwm_kib.iter().sum(),
                )
            }
        }
    }

    fn port(&self) -> u16 {
        match self {
            Brokers::Mosquitto(broker) => broker.port,
            Brokers::Nats { cluster, .. } => cluster.mqtt_port(0),
        }
    }

    fn name(&self) -> String {
        match self {
            Brokers::Mosquitto(_) => "mosquitto".into(),
            Brokers::Nats { cluster, .. } => {
                format!("nats-server, {} nodes summed", cluster.len())
            }
        }
    }
}

/// One run of kiln, measured.
struct Measured {
    wall: Duration,
    /// Sampled every 20 ms while it ran.
    peak_pss_kib: u64,
    max_rss_kib: u64,
    code: i32,
    stdout: String,
    stderr: String,
}

struct Fleet {
    dir: tempfile::TempDir,
    kiln: PathBuf,
    broker: String,
}

impl Fleet {
    // The child is reaped by wait4 below, which also gives its peak RSS.
    #[allow(clippy::zombie_processes)]
    fn kiln(&self, args: &[&str]) -> Measured {
        let out = self.dir.path().join("out");
        let err = self.dir.path().join("err");
        let mut cmd = Command::new(&self.kiln);
        cmd.current_dir(self.dir.path()).args(args);
        if !matches!(args[0], "keygen" | "compile") {
            cmd.args(["--broker", &self.broker]);
        }
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut peak = 0;
        let (code, max_rss_kib) = loop {
            peak = peak.max(pss_kib(pid).unwrap_or(0));
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value to overwrite.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: pid is our child; status and usage are valid for writes.
            let done = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
            if done == pid as i32 {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
                break (code, usage.ru_maxrss as u64);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Measured {
            wall: started.elapsed(),
            peak_pss_kib: peak,
            max_rss_kib,
            code,
            stdout: std::fs::read_to_string(out).unwrap_or_default(),
            stderr: std::fs::read_to_string(err).unwrap_or_default(),
        }
    }

    fn ok(&self, args: &[&str]) -> Measured {
        let m = self.kiln(args);
        assert!(
            m.code == 0,
            "kiln {} failed ({}):\n{}",
            args.join(" "),
            m.code,
            m.stderr
        );
        m
    }

    fn app(&self, version: u64) -> PathBuf {
        let out = self.dir.path().join(format!("app-{version}.kiln"));
        let wasm = source("sensor_filter.wasm");
        let v = version.to_string();
        self.ok(&[
            "compile",
            path_str(&wasm),
            "--target",
            "x86_64-linux",
            "--name",
            "app",
            "--version",
            &v,
            "--sign",
            "fleet.key",
            "-o",
            path_str(&out),
        ]);
        out
    }

    /// How many devices run `app` at `version`, and how long `kiln devices` took.
    fn running(&self, version: u64) -> (usize, Measured) {
        self.running_else(version)
            .unwrap_or_else(|m| panic!("kiln devices --json failed ({}):\n{}", m.code, m.stderr))
    }

    /// [`Fleet::running`], or the failed run of `kiln devices`.
    fn running_else(&self, version: u64) -> Result<(usize, Measured), Measured> {
        let m = self.kiln(&["devices", "--json"]);
        if m.code != 0 {
            return Err(m);
        }
        let n = m
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|d| {
                d["reported"]["modules"].as_array().is_some_and(|ms| {
                    ms.iter().any(|m| {
                        m["name"] == "app" && m["state"] == "running" && m["version"] == version
                    })
                })
            })
            .count();
        Ok((n, m))
    }
}

/// mosquitto's `$SYS` counters (retained, refreshed every second with `sys_interval 1`).
fn sys_counters(port: u16) -> BTreeMap<String, u64> {
    let mut options = MqttOptions::new(
        format!("scale-sys-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 16);
    client
        .subscribe("$SYS/broker/messages/+", QoS::AtMostOnce)
        .unwrap();
    client
        .subscribe("$SYS/broker/bytes/+", QoS::AtMostOnce)
        .unwrap();
    let mut out = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Ok(event) =
        connection.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            if let Ok(n) = String::from_utf8_lossy(&p.payload).trim().parse() {
                out.insert(p.topic.clone(), n);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let _ = client.disconnect();
    out
}

/// Messages and bytes through the broker (in and out) between two snapshots, per device.
fn traffic(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    devices: usize,
) -> String {
    let delta = |k: &str| {
        let key = format!("$SYS/broker/{k}");
        after
            .get(&key)
            .unwrap_or(&0)
            .saturating_sub(*before.get(&key).unwrap_or(&0))
    };
    let messages = delta("messages/received") + delta("messages/sent");
    let bytes = delta("bytes/received") + delta("bytes/sent");
    format!(
        "{:.1} messages, {:.1} KiB",
        messages as f64 / devices as f64,
        bytes as f64 / devices as f64 / 1024.0
    )
}

/// A measured row, also said on stderr at once (a run that fails later keeps it).
fn push_row(rows: &mut Vec<(String, String)>, row: (String, String)) {
    eprintln!("fleet-scale: {}: {}", row.0, row.1);
    rows.push(row);
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Polls `kiln devices` until `n` devices run `version`. A poll the broker fails (a
/// cluster's node refusing or stalling under the update) is counted, said, and
/// polled again.
fn wait_running(fleet: &Fleet, version: u64, n: usize, limit: Duration) -> Measured {
    let deadline = Instant::now() + limit;
    let (mut have, mut failed) = (0, 0);
    loop {
        match fleet.running_else(version) {
            Ok((now, m)) if now >= n => {
                if failed > 0 {
                    eprintln!("fleet-scale: {failed} polls of `kiln devices` failed on the way");
                }
                return m;
            }
            Ok((now, _)) => have = now,
            Err(m) => {
                failed += 1;
                let why = m.stderr.lines().last().unwrap_or("").to_string();
                eprintln!("fleet-scale: `kiln devices` failed ({failed} so far, {have} of {n} on v{version}): {why}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} devices run v{version} after {limit:?} ({failed} polls failed)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() {
    let args = Args::parse();
    let n = args.devices;
    let mut brokers = match args.brokers {
        1 => {
            let mut broker = Broker::start();
            broker.extra_config = "sys_interval 1\nmax_queued_messages 10000\n".into();
            broker.restart();
            Brokers::Mosquitto(broker)
        }
        2 => {
            eprintln!(
                "fleet-scale: error: a cluster needs 3 nodes or more (a quorum that survives one)"
            );
            std::process::exit(64);
        }
        nodes => {
            let Some(cluster) = Cluster::start(nodes.into()) else {
                eprintln!("fleet-scale: error: nats-server is not installed (scripts/setup.sh installs it)");
                std::process::exit(69);
            };
            let nodes = cluster.len();
            Brokers::Nats {
                cluster,
                last: vec![[0; 4]; nodes],
                before: vec![[0; 4]; nodes],
                hwm_kib: vec![0; nodes],
            }
        }
    };
    let urls = match &brokers {
        Brokers::Mosquitto(broker) => broker.url(),
        Brokers::Nats { cluster, .. } => cluster.urls(),
    };
    let fleet = Fleet {
        dir: tempfile::tempdir().unwrap(),
        kiln: args.kiln.clone(),
        broker: urls,
    };
    fleet.ok(&["keygen", "-o", "fleet.key", "--fleet", "scale"]);
    let apps: Vec<PathBuf> = (1..=3).map(|v| fleet.app(v)).collect();
    let root = fleet.dir.path().join("fleet.root");
    let mirror_dir = fleet.dir.path().join("mirror");
    let nginx = args.mirror.then(|| {
        std::fs::create_dir_all(&mirror_dir).unwrap();
        kiln_e2e::nginx::Nginx::start(None, &mirror_dir)
    });
    let mirror_args: Vec<String> = match &nginx {
        Some(nginx) => vec![
            "--mirror-dir".into(),
            path_str(&mirror_dir).into(),
            "--mirror-url".into(),
            nginx.url(),
        ],
        None => Vec::new(),
    };
    let mirror_args: Vec<&str> = mirror_args.iter().map(String::as_str).collect();
    eprintln!("fleet-scale: starting {n} simulated devices");
    let telemetry_ms = args.telemetry_ms.to_string();
    let sim = Sim::start_with(
        &fleet.broker,
        &root,
        n,
        &["3:10"],
        &["--telemetry-ms", &telemetry_ms],
    );
    let mut rows: Vec<(String, String)> = Vec::new();
    push_row(
        &mut rows,
        (
            format!("{n} devices connect (kilnd-sim, 200/s)"),
            format!("{:.1} s", sim.connect_ms as f64 / 1000.0),
        ),
    );
    // Every device's status is in before anything counts them.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused = 0;
    loop {
        // A node too busy to take kiln's session is counted, not fatal, here.
        let m = fleet.kiln(&["devices", "--json"]);
        if m.code != 0 {
            refused += 1;
        } else if m.stdout.lines().count() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every device reported a status ({refused} polls failed): {}",
            m.stderr
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    if refused > 0 {
        eprintln!(
            "fleet-scale: {refused} polls of `kiln devices` failed while the devices came up"
        );
    }
    let enroll = fleet.ok(&["enroll", "--group", "lab", "--sign", "fleet.key"]);
    push_row(
        &mut rows,
        (format!("`kiln enroll` {n} devices"), secs(enroll.wall)),
    );

    let quick = ["--health-window-ms", "2000"];
    let s0 = brokers.counters();
    let started = Instant::now();
    let mut push = vec![
        "push",
        path_str(&apps[0]),
        "--group",
        "lab",
        "--sign",
        "fleet.key",
    ];
    push.extend(quick);
    push.extend(&mirror_args);
    let served = nginx.as_ref().map_or(0, |n| n.sent().0);
    let pushed = fleet.ok(&push);
    wait_running(&fleet, 1, n, Duration::from_secs(600));
    let committed = started.elapsed();
    push_row(
        &mut rows,
        (
            format!("`kiln push` to a group of {n} (the command)"),
            secs(pushed.wall),
        ),
    );
    push_row(
        &mut rows,
        (
            format!("push to all {n} committed (2 s health window)"),
            secs(committed),
        ),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let s1 = brokers.counters();
    push_row(
        &mut rows,
        (
            "broker traffic per device, one group update (all of it, in and out, telemetry too)"
                .into(),
            traffic(&s0, &s1, n),
        ),
    );
    if let Some(nginx) = &nginx {
        let (sent, requests) = nginx.sent();
        // A run that says it measured the mirror must have used it.
        assert!(
            requests > 0,
            "--mirror: nginx served no request; the devices took the update from the broker"
        );
        push_row(
            &mut rows,
            (
                "the mirror (nginx, HTTP): body bytes sent per device, one group update".into(),
                format!(
                    "{:.0} B ({requests} requests in all)",
                    (sent - served) as f64 / n as f64
                ),
            ),
        );
    }

    // `kiln rollout APP` to group lab in waves of 1, 10, 100 and the rest.
    let rollout = |app: &Path, policy: &[&str]| {
        let mut args = vec![
            "rollout",
            path_str(app),
            "--group",
            "lab",
            "--sign",
            "fleet.key",
        ];
        args.extend(["--waves", "1,10,100"]);
        args.extend(policy);
        args.extend(quick);
        fleet.kiln(&args)
    };
    let rolled = match &mut brokers {
        Brokers::Mosquitto(_) => rollout(&apps[1], &[]),
        Brokers::Nats { .. } => {
            // Node 1 (the devices that started there; kiln is on node 0) is killed
            // once the rollout's big wave is under way.
            let (rolled, killed_at) = std::thread::scope(|scope| {
                let driver = scope.spawn(|| rollout(&apps[1], &[]));
                let mut killed_at = None;
                let mut refused_before_kill = 0;
                while !driver.is_finished() {
                    let committed = fleet
                        .kiln(&["rollout", "status", "--group", "lab", "--json"])
                        .stdout;
                    let committed = serde_json::from_str::<serde_json::Value>(committed.trim())
                        .ok()
                        .and_then(|s| s["counts"]["committed"].as_u64());
                    if committed.is_some_and(|c| c >= 111.min(n as u64 / 2)) {
                        let _ = brokers.counters();
                        let Brokers::Nats { cluster, .. } = &mut brokers else {
                            unreachable!()
                        };
                        refused_before_kill = cluster.log_count("Unable to add JetStream consumer");
                        cluster.kill(1);
                        killed_at = committed;
                        // Down for ten seconds, as a crashed node systemd restarts (a
                        // node that stays down strands the subscriptions whose
                        // consumer it held: docs/src/brokers.md).
                        std::thread::sleep(Duration::from_secs(10));
                        cluster.start_again(1);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                (driver.join().unwrap(), (killed_at, refused_before_kill))
            });
            let (killed_at, refused_before_kill) = killed_at;
            push_row(&mut rows, (
                "subscriptions the nodes refused before the kill (connect, enroll, push, waves)"
                    .into(),
                refused_before_kill.to_string(),
            ));
            let killed_at = killed_at.expect("the rollout ended before node 1 could be killed");
            push_row(&mut rows, (
                "node 1 killed (SIGKILL) during the rollout, back 10 s later; devices committed then".into(),
                format!("{killed_at} of {n}"),
            ));
            rolled
        }
    };
    assert!(rolled.code == 0, "rollout v2 failed:\n{}", rolled.stderr);
    if let Brokers::Nats { .. } = brokers {
        every_device_committed_once(&fleet, n);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let s2 = brokers.counters();
    // The plan line is the command's result: on stdout (stderr before issue 30).
    let waves = rolled
        .stdout
        .lines()
        .chain(rolled.stderr.lines())
        .find(|l| l.contains(" waves ("))
        .map(|l| {
            l.rsplit('(')
                .next()
                .unwrap_or("")
                .trim_end_matches(')')
                .to_string()
        })
        .unwrap_or_default();
    push_row(
        &mut rows,
        (
            format!("`kiln rollout` in waves of {waves}, to complete"),
            secs(rolled.wall),
        ),
    );
    push_row(
        &mut rows,
        (
            "broker traffic per device, one rollout".into(),
            traffic(&s1, &s2, n),
        ),
    );
    push_row(
        &mut rows,
        (
            "`kiln rollout`: peak PSS / max RSS".into(),
            format!("{} / {}", mib(rolled.peak_pss_kib), mib(rolled.max_rss_kib)),
        ),
    );

    // v3 crashes on a tenth of the devices: 1% allowed in all halts it (on one
    // broker; the cluster's run ends with its node loss).
    if let Brokers::Mosquitto(_) = brokers {
        halted_rollout(&fleet, &apps[2], &rollout, &mut rows);
    }

    let mut walls = Vec::new();
    let mut devices = None;
    for _ in 0..3 {
        let (_, m) = fleet.running(2);
        walls.push(m.wall);
        devices = Some(m);
    }
    walls.sort();
    let devices = devices.unwrap();
    push_row(
        &mut rows,
        (
            format!("`kiln devices` of {n} (median of 3)"),
            secs(walls[1]),
        ),
    );
    push_row(
        &mut rows,
        (
            "`kiln devices`: peak PSS / max RSS".into(),
            format!(
                "{} / {}",
                mib(devices.peak_pss_kib),
                mib(devices.max_rss_kib)
            ),
        ),
    );
    let group = fleet.kiln(&["devices", "--group", "lab", "--where", "tag=none"]);
    push_row(
        &mut rows,
        (
            format!("`kiln devices --group lab --where tag=none` of {n} (none match)"),
            format!("{} (exit {})", secs(group.wall), group.code),
        ),
    );
    dashboard(&fleet, &root, n, &mut rows);
    let gc = fleet.ok(&["gc"]);
    push_row(&mut rows, ("`kiln gc`".into(), secs(gc.wall)));
    if let Brokers::Nats { cluster, .. } = &brokers {
        push_row(&mut rows, (
            "subscriptions the nodes refused (SUBACK 0x80: a consumer not created in 4 s), all run"
                .into(),
            cluster
                .log_count("Unable to add JetStream consumer")
                .to_string(),
        ));
        push_row(
            &mut rows,
            (
                "connections the nodes refused (a session not loaded in time), all run".into(),
                cluster.log_count("unable to connect").to_string(),
            ),
        );
    }
    let (pss, hwm) = brokers.memory();
    push_row(
        &mut rows,
        (
            format!("{}: PSS / peak RSS at the end", brokers.name()),
            format!("{} / {}", mib(pss), mib(hwm)),
        ),
    );
    let sim_pss = pss_kib(sim.pid()).unwrap_or(0);
    push_row(
        &mut rows,
        (
            format!("kilnd-sim: PSS for {n} device sides"),
            format!("{} ({} KiB a device)", mib(sim_pss), sim_pss / n as u64),
        ),
    );
    let retained = retained_bytes(brokers.port(), &fleet.dir.path().join("x"));
    push_row(&mut rows, ("retained on the broker".into(), retained));

    let on = match &brokers {
        Brokers::Mosquitto(_) => "one mosquitto".to_string(),
        Brokers::Nats { cluster, .. } => format!(
            "a {}-node nats-server cluster, node 1 killed mid-rollout and restarted",
            cluster.len()
        ),
    };
    println!("\n### Fleet scale: {n} simulated devices, {on}, this machine\n");
    println!("| step | measured |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

/// A release crashing on a tenth of the devices, halted by its 1% allowance.
/// `kiln dashboard` over the whole fleet in a real browser (chromium, headless): the
/// time from navigation until every device's row is on the page, the page's own
/// first render, the latency of a live update, and the dashboard's memory.
fn dashboard(fleet: &Fleet, root: &Path, n: usize, rows: &mut Vec<(String, String)>) {
    let port = kiln_e2e::free_port();
    let mut child = Command::new(&fleet.kiln)
        .current_dir(fleet.dir.path())
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--broker", &fleet.broker, "--root", path_str(root)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kiln dashboard did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every retained status in before the page opens.
    std::thread::sleep(Duration::from_secs(5));
    let browser = kiln_e2e::browser::Browser::start();
    let opened = Instant::now();
    browser.goto(&format!("http://127.0.0.1:{port}/"));
    browser.wait_for(
        Duration::from_secs(600),
        "every row",
        &format!("return document.querySelectorAll('#devices tr').length === {n};"),
    );
    let loaded = opened.elapsed();
    let first = browser.eval("return window.kiln.firstRenderMs;");
    let before = browser
        .eval("return window.kiln.updates;")
        .as_u64()
        .unwrap_or(0);
    browser.wait_for(
        Duration::from_secs(120),
        "live updates",
        &format!("return window.kiln.updates > {before} + 5;"),
    );
    let latency = browser.eval("return window.kiln.lastUpdateLatencyMs;");
    let (pss, hwm) = (pss_kib(child.id()).unwrap_or(0), vm_hwm_kib(child.id()));
    push_row(
        rows,
        (
            format!("`kiln dashboard` with {n} devices in chromium: every row on the page / the page's first render / a live update's latency"),
            format!("{} / {first} ms / {latency} ms", secs(loaded)),
        ),
    );
    push_row(
        rows,
        (
            "`kiln dashboard`: PSS / peak RSS".into(),
            format!("{} / {}", mib(pss), mib(hwm)),
        ),
    );
    drop(browser);
    let _ = child.kill();
    let _ = child.wait();
}

fn halted_rollout(
    fleet: &Fleet,
    app: &Path,
    rollout: &dyn Fn(&Path, &[&str]) -> Measured,
    rows: &mut Vec<(String, String)>,
) {
    let policy = ["--max-failures", "100%", "--max-total-failures", "1%"];
    let halted = rollout(app, &policy);
    assert_eq!(halted.code, 1, "the bad release halts:\n{}", halted.stderr);
    // `kiln: error: rollout halted in wave 3: 11 of 1000 devices failed (allowed: 1%): ...`
    let why = halted
        .stderr
        .lines()
        .find_map(|l| l.split_once("rollout halted in ").map(|(_, w)| w))
        .and_then(|w| w.split(" (allowed").next())
        .unwrap_or("")
        .to_string();
    push_row(
        rows,
        (
            "a release crashing on 10% halts (1% allowed)".into(),
            format!("{} ({why})", secs(halted.wall)),
        ),
    );
    let status = fleet.ok(&["rollout", "status", "--group", "lab"]);
    push_row(
        rows,
        ("`kiln rollout status` of it".into(), secs(status.wall)),
    );
}

/// The record has every device once, committed; every device runs v2 and is online.
fn every_device_committed_once(fleet: &Fleet, n: usize) {
    let status = fleet.ok(&["rollout", "status", "--group", "lab", "--json"]);
    let s: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(s["phase"], "complete", "{s}");
    assert_eq!(s["counts"]["committed"], n, "{s}");
    let devices = s["devices"].as_array().unwrap();
    assert_eq!(devices.len(), n, "{s}");
    assert!(devices.iter().all(|d| d["outcome"] == "committed"), "{s}");
    wait_running(fleet, 2, n, Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let online = fleet
            .ok(&["devices", "--json"])
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|d| d["status"]["online"] == true)
            .count();
        if online == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {online} of {n} devices online on the nodes left"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Retained messages and their bytes, by kind of topic.
fn retained_bytes(port: u16, _scratch: &Path) -> String {
    let mut options = MqttOptions::new(
        format!("scale-ret-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(options, 64);
    client.subscribe("kiln/v1/#", QoS::AtMostOnce).unwrap();
    let mut kinds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut quiet = Instant::now();
    loop {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain => {
                quiet = Instant::now();
                let parts: Vec<&str> = p.topic.split('/').collect();
                let kind = match parts.get(2) {
                    Some(&"devices") => parts.get(4).copied().unwrap_or("?"),
                    Some(other) => other,
                    None => "?",
                };
                let e = kinds.entry(kind.to_string()).or_default();
                e.0 += 1;
                e.1 += p.payload.len() as u64;
            }
            _ if quiet.elapsed() > Duration::from_secs(2) => break,
            _ => {}
        }
    }
    let _ = client.disconnect();
    kinds
        .iter()
        .map(|(k, (n, b))| format!("{k} {n} ({:.0} KiB)", *b as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}
