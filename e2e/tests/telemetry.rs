//! Telemetry over MQTT against a real mosquitto: `kilnd serve` runs the `counter`
//! fixture (each record is the next value of a counter), `kiln watch --json` is the
//! consumer. The broker goes away, kilnd is SIGKILLed while offline, the spool fills
//! up; afterwards every batch is accounted for by (device, boot_id, seq), and every
//! counter value kilnd printed reached the consumer exactly once, or its batch was
//! reported dropped.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_e2e::kiln_path;
use kiln_e2e::mosquitto::Broker;
use kiln_protocol::telemetry::Batch;
use serde_json::Value;

use crate::util::{eventually, path_str, shared, FleetDevice};

/// `kiln watch --json --session NAME` as a separate process, its lines collected.
struct Watcher {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Watcher {
    fn start(broker: &Broker, session: &str) -> Self {
        let mut child = Command::new(kiln_path())
            .args(["watch", "--json", "--session", session, "--broker"])
            .arg(broker.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln watch");
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("kiln watch printed non-JSON `{line}`: {e}"));
                l.lock().unwrap().push(v);
            }
        });
        let e = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                e.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let watcher = Self {
            child: Some(child),
            lines,
            stderr,
        };
        eventually(
            Duration::from_secs(10),
            || watcher.stderr().contains("watching"),
            || format!("kiln watch did not subscribe: {}", watcher.stderr()),
        );
        watcher
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|v| v["kind"] == kind)
            .collect()
    }

    /// Counter values received, in arrival order.
    fn counters(&self) -> Vec<u64> {
        counters(&self.lines())
    }

    /// Stops it like Ctrl-C: it prints one summary line per (device, boot) and exits
    /// 1 if a batch is missing that no drop report explains.
    fn stop(&mut self) -> (Option<i32>, Vec<Value>) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100)); // let the reader finish
        (status.code(), self.of_kind("summary"))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Values of the counter fixture's records among `lines` (kilnd's or watch's JSON).
fn counters(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .filter(|v| v["kind"] == "telemetry" && v["stream"] == "n")
        .map(|v| u64::from_str_radix(v["text"].as_str().unwrap(), 16).unwrap())
        .collect()
}

/// A broker, `kiln watch` on it, and a device (`id`) running the counter fixture (5
/// records every 20 ms) with `telemetry` settings, once its records reach the watcher.
fn streaming(target: &str, id: &str, telemetry: &str) -> (Broker, Watcher, FleetDevice) {
    let broker = Broker::start();
    let watch = Watcher::start(&broker, id);
    let artifact = shared().artifact("fixtures/counter.wat", target);
    let mut device = FleetDevice::new(target, id, &broker);
    device.mqtt_extra = format!(
        "[telemetry]\n{telemetry}\n[[module]]\nname = \"counter\"\nartifact = {:?}\nconfig = \"5\"\ntick_ms = 20\ntimeout_ms = 20000\n",
        path_str(&artifact)
    );
    device.start(None);
    eventually(
        Duration::from_secs(60),
        || watch.counters().len() > 50,
        || format!("no telemetry reached kiln watch\n{}", device.stderr()),
    );
    (broker, watch, device)
}

fn spool_dir(device: &FleetDevice) -> PathBuf {
    device.dir.join("data/telemetry")
}

/// `(boot_id, seq)` of each batch in the spool, read the way a consumer would (a
/// batch acknowledged while this reads is gone, and skipped).
fn spooled(dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            path.extension()?.eq("batch").then_some(())?;
            let b = Batch::decode(&std::fs::read(path).ok()?).unwrap();
            Some((b.boot_id, b.seq))
        })
        .collect()
}

/// Asserts `values` is exactly 1..=n, each once.
#[track_caller]
fn assert_each_once(values: &[u64], what: &str) {
    let n = values.len() as u64;
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    assert!(n > 0, "{what}: no counter values");
    assert_eq!(
        sorted,
        (1..=n).collect::<Vec<_>>(),
        "{what}: counter values are not 1..={n} each once"
    );
}

fn broker_outage_loses_nothing(target: &str, id: &str) {
    let (mut broker, mut watch, mut device) = streaming(target, id, "batch_ms = 100\nstats_s = 1");

    broker.stop();
    let offline_from = now_ms();
    std::thread::sleep(Duration::from_secs(3));
    let offline_until = now_ms();
    broker.restart();
    // Everything the device spooled while the broker was away, then live records.
    eventually(
        Duration::from_secs(30),
        || {
            let spool = spooled(&spool_dir(&device));
            spool.is_empty() && watch.counters().len() as u64 > 25 * 3 + 50
        },
        || format!("the spool did not drain\n{}", device.stderr()),
    );
    device.stop();
    // kilnd seals and publishes its last batch on SIGTERM.
    let printed = counters(&device.records.lock().unwrap());
    eventually(
        Duration::from_secs(10),
        || watch.counters().len() >= printed.len(),
        || {
            format!(
                "kiln watch has {} counter records, kilnd printed {}",
                watch.counters().len(),
                printed.len()
            )
        },
    );
    let (code, summary) = watch.stop();

    assert!(
        device.stderr().contains("broker connection lost"),
        "the device never noticed the outage\n{}",
        device.stderr()
    );
    let received = watch.counters();
    assert_each_once(&printed, "kilnd's stdout");
    assert_eq!(
        received.len(),
        printed.len(),
        "every record kilnd made reached the consumer once"
    );
    assert_each_once(&received, "kiln watch");
    let during = watch
        .of_kind("telemetry")
        .iter()
        .filter(|v| (offline_from..offline_until).contains(&v["at_ms"].as_u64().unwrap()))
        .count();
    assert!(
        during > 50,
        "records made during the outage were replayed: {during}"
    );
    assert!(
        watch.of_kind("gap").is_empty(),
        "{:?}",
        watch.of_kind("gap")
    );
    assert_eq!(summary.len(), 1, "one boot: {summary:?}");
    assert_eq!(summary[0]["first_seq"], 0);
    assert_eq!(summary[0]["unexplained"], serde_json::json!([]));
    assert_eq!(summary[0]["dropped"], 0);
    assert_eq!(code, Some(0), "kiln watch found no gap\n{}", watch.stderr());

    // kilnd's own stats came along: the module's and the device's.
    let module_stats = watch.of_kind("module-stats");
    let last = module_stats.last().expect("module stats");
    assert_eq!(last["module"], "counter");
    assert!(last["calls"].as_u64().unwrap() > 10, "{last}");
    assert!(last["rss_kib"].as_u64().unwrap() > 1000, "{last}");
    let device_stats = watch.of_kind("device-stats");
    let peak_spool = device_stats
        .iter()
        .map(|v| v["spool_batches"].as_u64().unwrap())
        .max()
        .expect("device stats");
    assert!(
        peak_spool >= 10,
        "the stats showed the spool filling during the outage: {peak_spool}"
    );
    assert!(device_stats
        .iter()
        .all(|v| v["mem_available_kib"].as_u64().unwrap() > 0));
}

#[test]
fn a_broker_outage_loses_no_telemetry() {
    broker_outage_loses_nothing("x86_64-linux", "outage-x86");
}

#[test]
fn a_broker_outage_loses_no_telemetry_from_an_emulated_aarch64_device() {
    broker_outage_loses_nothing("aarch64-linux", "outage-arm");
}

#[test]
fn kilnd_killed_while_offline_replays_its_spool_and_duplicates_show_once() {
    let (mut broker, mut watch, mut device) =
        streaming("x86_64-linux", "kill-01", "batch_ms = 100");
    broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    device.kill(); // SIGKILL: whatever was spooled must survive
    let first_run = counters(&device.records.lock().unwrap());
    let spool = spooled(&spool_dir(&device));
    let (boot, last_spooled) = *spool.iter().max_by_key(|(_, seq)| *seq).unwrap();
    assert!(
        spool.len() >= 10,
        "batches spooled while offline: {spool:?}"
    );
    let copies = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(spool_dir(&device)).unwrap() {
        let path = e.unwrap().path();
        std::fs::copy(&path, copies.path().join(path.file_name().unwrap())).unwrap();
    }

    device.records.lock().unwrap().clear();
    device.start(None); // still offline: a new boot spools behind the old one
    std::thread::sleep(Duration::from_secs(1));
    broker.restart();
    let boots = || {
        watch
            .of_kind("telemetry")
            .iter()
            .map(|v| v["boot_id"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    let old_boot = format!("{boot:016x}");
    let old_seqs = || {
        watch
            .lines()
            .iter()
            .filter(|v| v["boot_id"] == old_boot.as_str())
            .filter_map(|v| v["seq"].as_u64())
            .max()
    };
    eventually(
        Duration::from_secs(30),
        || boots().len() == 2 && old_seqs() == Some(last_spooled),
        || format!("boots {:?}, old boot up to {:?}", boots(), old_seqs()),
    );
    device.stop();

    // The same batches again, as if the acknowledgements had been lost.
    for e in std::fs::read_dir(copies.path()).unwrap() {
        let path = e.unwrap().path();
        std::fs::copy(&path, spool_dir(&device).join(path.file_name().unwrap())).unwrap();
    }
    device.start(None);
    eventually(
        Duration::from_secs(30),
        || watch.of_kind("duplicate").len() >= spool.len(),
        || format!("duplicates seen: {}", watch.of_kind("duplicate").len()),
    );
    device.stop();
    let (code, summary) = watch.stop();

    let old: Vec<u64> = counters(
        &watch
            .lines()
            .into_iter()
            .filter(|v| v["boot_id"] == old_boot.as_str())
            .collect::<Vec<_>>(),
    );
    assert_each_once(&old, "the killed boot, after dedup");
    assert!(
        old.len() <= first_run.len() && old.len() + 60 >= first_run.len(),
        "all but the open batch at the kill arrived: {} of {}",
        old.len(),
        first_run.len()
    );
    assert_eq!(summary.len(), 3, "three boots: {summary:?}");
    for s in &summary {
        assert_eq!(s["unexplained"], serde_json::json!([]), "{s}");
        assert_eq!(s["first_seq"], 0, "{s}");
    }
    let old_summary = summary.iter().find(|s| s["boot_id"] == old_boot.as_str());
    assert!(
        old_summary.unwrap()["duplicates"].as_u64().unwrap() >= spool.len() as u64,
        "{summary:?}"
    );
    assert_eq!(code, Some(0));
}

#[test]
fn a_full_spool_drops_the_oldest_batches_and_reports_exactly_those() {
    let (mut broker, mut watch, mut device) = streaming(
        "x86_64-linux",
        "full-01",
        "batch_ms = 50\nbatch_bytes = 1024\nspool_limit = \"8KiB\"\nstats_s = 0\nwindow = 2",
    );
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    eventually(
        Duration::from_secs(30),
        || spooled(&spool_dir(&device)).is_empty() && !watch.of_kind("dropped").is_empty(),
        || format!("dropped reports: {:?}", watch.of_kind("dropped")),
    );
    device.stop();
    let printed = device.records.lock().unwrap().len() as u64;
    let dropped = watch.of_kind("dropped");
    let dropped_records: u64 = dropped.iter().map(|d| d["records"].as_u64().unwrap()).sum();
    let dropped_batches: u64 = dropped.iter().map(|d| d["batches"].as_u64().unwrap()).sum();
    let received = |w: &Watcher| {
        w.lines()
            .iter()
            // Records carry their batch's seq; notes about batches (duplicate, late)
            // carry a seq but no module.
            .filter(|v| v["seq"].is_u64() && v.get("module").is_some())
            .filter(|v| v["kind"] != "dropped")
            .count() as u64
    };
    eventually(
        Duration::from_secs(10),
        || received(&watch) + dropped_records >= printed,
        || {
            format!(
                "received {} + dropped {dropped_records} < printed {printed}",
                received(&watch)
            )
        },
    );
    let (code, summary) = watch.stop();

    assert!(dropped_batches > 0);
    assert_eq!(
        received(&watch) + dropped_records,
        printed,
        "every record kilnd made either arrived or was counted dropped"
    );
    assert_eq!(summary.len(), 1, "{summary:?}");
    let s = &summary[0];
    let span = s["last_seq"].as_u64().unwrap() - s["first_seq"].as_u64().unwrap() + 1;
    assert_eq!(s["dropped"].as_u64().unwrap(), dropped_batches, "{s}");
    assert_eq!(
        s["batches"].as_u64().unwrap() + dropped_batches,
        span,
        "the seqs missing are exactly the ones reported dropped: {s}"
    );
    assert_eq!(s["unexplained"], serde_json::json!([]));
    assert_eq!(code, Some(0));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn kilnd_stats_count_a_crashing_modules_traps_and_restarts() {
    let broker = Broker::start();
    let mut watch = Watcher::start(&broker, "stats");
    let trap_tick = shared().artifact("fixtures/trap-tick.wat", "x86_64-linux");
    let mut device = FleetDevice::new("x86_64-linux", "stats-01", &broker);
    device.mqtt_extra = format!(
        "[telemetry]\nstats_s = 1\nbatch_ms = 100\n[[module]]\nname = \"trap-tick\"\nartifact = {:?}\ntick_ms = 50\nrestart = {{ backoff_ms = 100, max_crashes = 10 }}\n",
        path_str(&trap_tick)
    );
    device.start(None);
    let stats = || {
        watch
            .of_kind("module-stats")
            .into_iter()
            .rev()
            .find(|v| v["module"] == "trap-tick")
    };
    eventually(
        Duration::from_secs(30),
        || stats().is_some_and(|s| s["traps"].as_u64().unwrap() >= 3),
        || format!("module stats: {:?}\n{}", stats(), device.stderr()),
    );
    device.stop();
    let s = stats().unwrap();
    let (code, _) = watch.stop();
    let (traps, restarts) = (
        s["traps"].as_u64().unwrap(),
        s["restarts"].as_u64().unwrap(),
    );
    // Each trap is followed by a restart, unless the stats were taken during a backoff.
    assert!(
        restarts == traps || restarts + 1 == traps,
        "traps {traps}, restarts {restarts}: {s}"
    );
    assert!(s["calls"].as_u64().unwrap() >= 2 * traps, "{s}");
    assert_eq!(code, Some(0));
}
