//! `kiln dashboard` in headless Chromium (WebDriver), against a real mosquitto and real
//! devices: kilnd natively and one aarch64 kilnd under qemu-user. The page shows both
//! devices with their versions, a push appears without a reload, a rollback shows its
//! reason, a numeric telemetry stream is charted, a gated rollout shows its gate's
//! table wave by wave, and forged or malformed messages are shown as invalid without
//! breaking the page or adding markup. A second test loads the page with 1,000
//! simulated devices and measures it. Screenshots are kept in
//! `$CARGO_TARGET_DIR/artifacts/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::browser::Browser;
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::sim::Sim;
use kiln_e2e::{kiln_path, path_str, target_dir};
use kiln_protocol::fleet::{Topics, DEFAULT_PREFIX};
use kiln_protocol::telemetry::{Batch, BatchV1, Body, Record};

use crate::fleet::{app, push, wait_online, Watch};
use crate::util::{shared, FleetDevice};

const LIMIT: Duration = Duration::from_secs(60);
const HEALTH: [&str; 4] = ["--health-window-ms", "1000", "--tick-ms", "200"];

/// `kiln dashboard` on a free loopback port, killed on drop.
struct Dashboard {
    child: Child,
    url: String,
}

impl Dashboard {
    fn start(broker: &Broker, root: &std::path::Path) -> Self {
        let port = kiln_e2e::free_port();
        let child = Command::new(kiln_path())
            .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--broker", &broker.url(), "--root", path_str(root)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "kiln dashboard did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Dashboard {
            child,
            url: format!("http://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn artifact(name: &str) -> PathBuf {
    let dir = target_dir().join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A script: true once `device`'s row shows module `app` at `version`, running.
fn shows(device: &str, version: u64) -> String {
    format!(
        "const r = document.querySelector('tr[data-device=\"{device}\"] span[data-module=\"app\"]'); return r !== null && r.textContent === 'app v{version} running';"
    )
}

#[test]
fn the_page_follows_real_devices_live_and_shows_what_is_wrong() {
    let broker = Broker::start();
    let names = [("x86_64-linux", "dash-x86"), ("aarch64-linux", "dash-arm")];
    let mut devices = Vec::new();
    let mut watches = Vec::new();
    for (target, id) in names {
        watches.push(Watch::start(&broker, id));
        let mut d = FleetDevice::new(target, id, &broker);
        d.groups = vec!["lab".into()];
        // Health every second, for the rollout's gate below.
        d.mqtt_extra = "[telemetry]\nhealth_s = 1\n".into();
        d.start(None);
        wait_online(&broker.url(), id);
        devices.push(d);
    }
    for (i, (target, id)) in names.iter().enumerate() {
        push(&broker, &app(target, 1, false), id, &HEALTH);
        watches[i].wait_committed(1, LIMIT);
    }
    let dashboard = Dashboard::start(&broker, &shared().root());
    let browser = Browser::start();
    browser.goto(&dashboard.url);

    // Both devices, their targets and v1.
    for (target, id) in names {
        browser.wait_for(LIMIT, &format!("{id} runs v1"), &shows(id, 1));
        let triple = if target.starts_with("x86_64") {
            "x86_64-unknown-linux-gnu"
        } else {
            "aarch64-unknown-linux-gnu"
        };
        let row = browser.eval(&format!(
            "return document.querySelector('tr[data-device=\"{id}\"]').textContent;"
        ));
        assert!(row.as_str().unwrap().contains(triple), "{row}");
    }
    let counts = browser.eval("return document.getElementById('counts').textContent;");
    assert!(
        counts.as_str().unwrap().contains("app v1: 2 devices"),
        "{counts}"
    );
    let loads = browser.eval("return performance.getEntriesByType('navigation').length;");

    // A push appears without a reload.
    push(&broker, &app("x86_64-linux", 2, false), "dash-x86", &HEALTH);
    browser.wait_for(LIMIT, "dash-x86 shows v2", &shows("dash-x86", 2));
    assert_eq!(
        browser.eval("return performance.getEntriesByType('navigation').length;"),
        loads,
        "no reload"
    );

    // A crashing v3 rolls back: the row says so, with the reason.
    push(&broker, &app("x86_64-linux", 3, true), "dash-x86", &HEALTH);
    let last = browser.wait_for(
        LIMIT,
        "the rollback and its reason",
        "const c = document.querySelector('tr[data-device=\"dash-x86\"] .last-event'); return c && c.textContent.includes('rolled back') ? c.textContent : null;",
    );
    assert!(
        last.as_str().unwrap().contains("app v3: rolled back"),
        "{last}"
    );

    // The device view charts the sensor's numeric telemetry.
    browser.eval("document.querySelector('tr[data-device=\"dash-x86\"]').click(); return true;");
    browser.wait_for(
        LIMIT,
        "a chart of app/temperature.filtered",
        "const c = document.querySelector('.chart[data-series=\"app/temperature.filtered\"] polyline'); return c && c.getAttribute('points').split(' ').length >= 2;",
    );
    let history = browser.eval("return document.getElementById('d-history').textContent;");
    assert!(
        history.as_str().unwrap().contains("rolled back"),
        "{history}"
    );

    // A rollout to the group: the rollout view shows its waves and outcomes.
    let key = shared().key();
    let kiln = |args: &[&str]| {
        let out = Command::new(kiln_path())
            .args(args)
            .args(["--sign", path_str(&key), "--broker", &broker.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    kiln(&["enroll", "--group", "lab"]);
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    let mut rollout = vec![
        "rollout",
        path_str(&wasm),
        "--group",
        "lab",
        "--name",
        "app",
    ];
    rollout.extend(["--version", "4", "--waves", "1"]);
    rollout.extend(["--gate", "traps <= 2x control", "--soak", "2s"]);
    rollout.extend(HEALTH);
    kiln(&rollout);
    let waves = browser.wait_for(
        LIMIT,
        "the rollout view",
        "const r = document.querySelector('.rollout[data-group=\"lab\"]'); return r && r.textContent.includes('complete') ? r.textContent : null;",
    );
    let waves = waves.as_str().unwrap();
    assert!(
        waves.contains("app v4")
            && waves.contains("wave 1: dash-arm")
            && waves.contains("wave 2: dash-x86"),
        "{waves}"
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('.rollout .chip.committed').length;"),
        serde_json::json!(2)
    );
    // Its gate's table: a row per wave, each judged after its soak (passed, or gone
    // on unjudged if a period was short of calls), none a breach.
    let rows = browser.eval(
        "return [...document.querySelectorAll('.rollout[data-group=\"lab\"] .gate[data-gate=\"traps <= 2x control\"] tr[data-wave]')].map(r => [r.dataset.wave, r.className, r.querySelector('.verdict').textContent, r.textContent]);",
    );
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string(), "{rows:?}");
        assert_ne!(row[1], "bad", "{rows:?}");
        assert!(matches!(row[2].as_str(), Some("pass" | "wait")), "{rows:?}");
        assert!(
            row[3].as_str().unwrap().contains("(2x control)"),
            "{rows:?}"
        );
    }
    // Enrolled: the open device view says its reports verify.
    browser.wait_for(
        LIMIT,
        "identity verified",
        "return document.getElementById('d-summary').textContent.includes('identity verified');",
    );

    // Forged and malformed messages: shown as invalid, no markup added, page alive.
    let topics = Topics::new(DEFAULT_PREFIX);
    broker.publish_retained(&topics.status("dash-x86"), b"\x01<b>forged</b>".to_vec());
    let hostile = Record {
        at_ms: 1,
        module: Some("app".into()),
        body: Body::Telemetry {
            stream: "<img src=x onerror=window.pwned=1>".into(),
            data: b"<script>window.pwned=2</script>".to_vec(),
        },
    };
    let batch = Batch::encode(&BatchV1 {
        device: "dash-x86".into(),
        boot_id: 42,
        seq: 0,
        records: vec![hostile],
    });
    broker.publish_retained(&topics.telemetry("dash-x86"), batch);
    broker.publish_retained(&topics.telemetry("dash-arm"), b"not a batch".to_vec());
    browser.wait_for(
        LIMIT,
        "invalid messages shown",
        "const a = document.querySelector('tr[data-device=\"dash-x86\"] .invalid'); const b = document.querySelector('tr[data-device=\"dash-arm\"] .invalid'); return a && b;",
    );
    let hostile_text = browser.wait_for(
        LIMIT,
        "the hostile stream shown as text",
        "const c = document.querySelector('.chart[data-series^=\"app/<img\"]'); return c ? c.textContent : null;",
    );
    assert!(
        hostile_text.as_str().unwrap().contains("<script>"),
        "{hostile_text}"
    );
    assert_eq!(
        browser.eval("return [document.querySelectorAll('#devices img, #device img, #devices b, #device script').length, window.pwned === undefined];"),
        serde_json::json!([0, true]),
        "device text never becomes markup"
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('#devices tr').length;"),
        serde_json::json!(2)
    );
    let shot = artifact("dashboard.png");
    browser.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

#[test]
fn the_page_stays_responsive_with_a_thousand_devices() {
    let broker = Broker::start();
    let n = 1000;
    let sim = Sim::start(&broker.url(), &shared().root(), n, &[]);
    let dashboard = Dashboard::start(&broker, &shared().root());
    // Every status is in the dashboard before the page opens.
    std::thread::sleep(Duration::from_secs(3));
    let browser = Browser::start();
    let opened = Instant::now();
    browser.goto(&dashboard.url);
    browser.wait_for(
        LIMIT,
        "1000 rows",
        &format!("return document.querySelectorAll('#devices tr').length === {n};"),
    );
    let first = browser.eval("return window.kiln.firstRenderMs;");
    let loaded = opened.elapsed();
    // Live updates keep coming (telemetry every 2 s from each device): the latency of
    // the latest, from the server's send to the page's render.
    let before = browser
        .eval("return window.kiln.updates;")
        .as_u64()
        .unwrap();
    browser.wait_for(
        LIMIT,
        "updates",
        &format!("return window.kiln.updates > {before} + 5;"),
    );
    let latency = browser.eval("return window.kiln.lastUpdateLatencyMs;");
    println!(
        "dashboard with {n} devices: first render {first} ms after the script started, all rows in {} ms after navigation, update latency {latency} ms",
        loaded.as_millis()
    );
    browser.screenshot(&artifact("dashboard-1000.png"));
    drop(sim);
}
