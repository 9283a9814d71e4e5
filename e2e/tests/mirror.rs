//! Artifacts from an HTTP(S) mirror (issue 34) against Debian's nginx over TLS and a
//! real mosquitto: `kiln push --mirror-dir DIR --mirror-url URL` writes the transfers
//! where nginx serves them and names the mirror in the signed desired state; kilnd
//! fetches the chunk list and chunks there and the broker carries only control. Then a
//! mirror serving the wrong bytes for a chunk, and a dead mirror: each device says why
//! in a `fell-back` event, takes the transfer from the broker and commits.
//!
//! The devices are an x86_64 kilnd and an aarch64 one under qemu-user. Each reaches
//! mosquitto through a counting proxy of the test's own, so the
//! bytes the broker sends each device are measured exactly; what the mirror sent is
//! nginx's own access log (`$body_bytes_sent`).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiln_compiler::commands::gc::GcCommand;
use kiln_compiler::commands::push::PushCommand;
use kiln_protocol::fleet::{EventKind, SignedDesired, Topics, DEFAULT_PREFIX};

use crate::fleet::{retained, wait_online, Watch};
use crate::util::{path_str, shared, FleetDevice};
use kiln_e2e::mosquitto::{Broker, Pki};
use kiln_e2e::nginx::Nginx;

/// A TCP proxy in front of the broker for one device, counting the bytes each way.
struct Counting {
    port: u16,
    /// Broker to device, and device to broker.
    down: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
}

impl Counting {
    fn start(broker_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, up) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (d, u) = (down.clone(), up.clone());
        std::thread::spawn(move || {
            for device in listener.incoming().map_while(Result::ok) {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)) else {
                    continue;
                };
                pump(&broker, &device, d.clone());
                pump(&device, &broker, u.clone());
            }
        });
        Self { port, down, up }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }

    fn up(&self) -> u64 {
        self.up.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, adding what passes to `count`, until either side closes.
fn pump(from: &TcpStream, to: &TcpStream, count: Arc<AtomicU64>) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

struct Phase {
    name: &'static str,
    /// Per device: bytes the broker sent it, and bytes it sent the broker (its
    /// events, reports and the module's telemetry).
    broker: Vec<u64>,
    device: Vec<u64>,
    mirror: u64,
}

#[test]
fn a_full_update_comes_from_the_https_mirror_and_a_bad_or_dead_mirror_falls_back_to_the_broker() {
    // The mosquitto harness's throwaway PKI: a CA and a certificate for 127.0.0.1.
    let pki = &Pki::generate();
    let broker = Broker::start();
    let url = broker.url();
    let served = tempfile::tempdir().unwrap();
    let mirror_dir = served.path().join("kiln");
    std::fs::create_dir_all(&mirror_dir).unwrap();
    let mut nginx = Nginx::start(Some(pki), &mirror_dir);

    // A native device and an aarch64 one under qemu-user, as in transfers.rs.
    let targets = [
        ("x86_64-linux", "mirror-x86"),
        ("aarch64-linux", "mirror-arm"),
    ];
    let mut devices = Vec::new();
    let mut watches = Vec::new();
    let mut proxies = Vec::new();
    for (target, id) in targets {
        let proxy = Counting::start(broker.port);
        let mut d = FleetDevice::new(target, id, &broker);
        d.broker = proxy.url();
        d.groups = vec!["mirrored".into()];
        // The mirror's CA; the mirror itself comes from the signed desired state.
        d.top_extra = format!("mirror_ca = {:?}\n", path_str(&pki.ca));
        d.start(None);
        watches.push(Watch::start(&broker, id));
        devices.push(d);
        proxies.push(proxy);
    }
    for d in &devices {
        wait_online(&url, &d.id);
    }
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    let key = shared().key();
    let mirror_url = nginx.url();
    let push = |version: &str, mirror: bool| {
        let mut args = vec![
            "push",
            path_str(&wasm),
            "--group",
            "mirrored",
            "--name",
            "app",
            "--version",
            version,
            "--sign",
            path_str(&key),
            "--broker",
            &url,
            "--health-window-ms",
            "2000",
            "--tick-ms",
            "100",
            "--timeout-ms",
            "20000",
            // Full updates, every time: the whole artifact travels.
            "--no-delta",
            "--chunk-size",
            "16384",
        ];
        match mirror {
            true => args.extend([
                "--mirror-dir",
                path_str(&mirror_dir),
                "--mirror-url",
                &mirror_url,
            ]),
            false => args.push("--no-mirror"),
        }
        PushCommand::try_parse_from(&args)
            .unwrap()
            .execute()
            .unwrap_or_else(|e| panic!("kiln {}: {e:#}", args.join(" ")));
    };
    let measure = |name: &'static str, version: u64, mirror: bool, nginx: &Nginx| {
        let before: Vec<u64> = proxies.iter().map(Counting::down).collect();
        let sent_before: Vec<u64> = proxies.iter().map(Counting::up).collect();
        let (served_before, _) = nginx.sent();
        push(&version.to_string(), mirror);
        for (w, d) in watches.iter().zip(&devices) {
            w.wait_event(
                Duration::from_secs(180),
                &format!("{} committed v{version}\n{}", d.id, d.stderr()),
                |(m, v, k)| m == "app" && *v == version && *k == EventKind::Committed,
            );
        }
        Phase {
            name,
            broker: proxies
                .iter()
                .zip(before)
                .map(|(p, b)| p.down() - b)
                .collect(),
            device: proxies
                .iter()
                .zip(sent_before)
                .map(|(p, b)| p.up() - b)
                .collect(),
            mirror: nginx.sent().0 - served_before,
        }
    };
    let topics = Topics::new(DEFAULT_PREFIX);
    // The mirrors the group's state names, and each device's stream length, in the
    // devices' order.
    let stream_lens = || {
        let topic = topics.group_desired("mirrored");
        let state = SignedDesired::peek(&retained(&url, &topic)[&topic]).unwrap();
        let lens: Vec<u64> = devices
            .iter()
            .map(|d| {
                let triple = &d.device.profile.triple;
                let a = state.modules[0]
                    .artifacts
                    .iter()
                    .find(|a| a.triple == *triple);
                a.unwrap_or_else(|| panic!("no artifact for {triple}"))
                    .full
                    .len
            })
            .collect();
        (state.mirrors, lens)
    };

    // v1 through the broker only: what a full update costs it.
    let broker_only = measure("v1, broker only", 1, false, &nginx);
    let (mirrors, v1_lens) = stream_lens();
    assert!(mirrors.is_empty());
    // v2 through the mirror.
    let mirrored = measure("v2, through the mirror", 2, true, &nginx);
    let (mirrors, v2_lens) = stream_lens();
    assert_eq!(mirrors, vec![mirror_url.clone()]);
    assert!(
        v2_lens.iter().all(|l| *l > 2 * 16384),
        "{v2_lens:?}: chunks 0 and 1 are whole (the swap below needs it)"
    );
    for (i, d) in devices.iter().enumerate() {
        assert!(
            broker_only.broker[i] > v1_lens[i],
            "{}: v1's {} byte stream came through the broker ({} bytes)",
            d.id,
            v1_lens[i],
            broker_only.broker[i]
        );
        assert!(
            mirrored.broker[i] * 10 < broker_only.broker[i],
            "{}: with the mirror the broker sent {} bytes, without it {}",
            d.id,
            mirrored.broker[i],
            broker_only.broker[i]
        );
    }
    let streams: u64 = v2_lens.iter().sum();
    assert!(
        mirrored.mirror >= streams,
        "nginx sent {} body bytes for {} bytes of streams\n{}",
        mirrored.mirror,
        streams,
        nginx.log("access.log")
    );
    for w in &watches {
        assert!(!w
            .events()
            .iter()
            .any(|(_, _, k)| matches!(k, EventKind::FellBack { .. })));
    }

    // v3: the mirror serves the wrong bytes for chunk 0 (right length).
    nginx.run(true);
    let swapped = measure("v3, mirror serves a wrong chunk", 3, true, &nginx);
    // v4: the mirror is down.
    nginx.stop();
    let dead = measure("v4, mirror down", 4, true, &nginx);
    for (w, d) in watches.iter().zip(&devices) {
        let fell: Vec<(u64, String)> = w
            .events()
            .into_iter()
            .filter_map(|(m, v, k)| match k {
                EventKind::FellBack { reason } if m == "app" => Some((v, reason)),
                _ => None,
            })
            .collect();
        let at = |version: u64| -> Vec<&String> {
            fell.iter()
                .filter(|(v, _)| *v == version)
                .map(|(_, r)| r)
                .collect()
        };
        let (v3, v4) = (at(3), at(4));
        assert!(
            v3.len() == 1
                && v3[0].starts_with("the mirror failed for ")
                && v3[0].ends_with("chunk 0: sha256 mismatch"),
            "{}: {fell:#?}",
            d.id
        );
        assert!(
            v4.len() == 1
                && v4[0].contains(&format!("GET {}", mirror_url.trim_end_matches("/fleet")))
                && v4[0].contains("Connection refused"),
            "{}: {fell:#?}",
            d.id
        );
    }
    for (i, d) in devices.iter().enumerate() {
        for phase in [&swapped, &dead] {
            assert!(
                phase.broker[i] * 2 > broker_only.broker[i],
                "{}: {}: the broker sent {} bytes",
                d.id,
                phase.name,
                phase.broker[i]
            );
        }
    }
    eprintln!("bytes per device (broker to device; nginx bodies for all devices):");
    for phase in [&broker_only, &mirrored, &swapped, &dead] {
        eprintln!(
            "  {:<34} broker to device {:?}  device to broker {:?}  mirror {}",
            phase.name, phase.broker, phase.device, phase.mirror
        );
    }
    eprintln!("  v1 streams {v1_lens:?}, v2 streams {v2_lens:?}");
    devices.iter_mut().for_each(FleetDevice::kill);

    // kiln gc --mirror-dir: the files of v2 and v3 go, v4's (referenced) stay.
    let mirrored = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir.join("artifacts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(mirrored(&mirror_dir).len(), 3 * targets.len());
    let topic = topics.group_desired("mirrored");
    let state = SignedDesired::peek(&retained(&url, &topic)[&topic]).unwrap();
    let v4: BTreeSet<String> = state.modules[0]
        .artifacts
        .iter()
        .map(|a| a.full.sha256.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let gc = [
        "gc",
        "--broker",
        &url,
        "--grace-s",
        "0",
        "--mirror-dir",
        path_str(&mirror_dir),
    ];
    GcCommand::try_parse_from(gc).unwrap().execute().unwrap();
    assert_eq!(mirrored(&mirror_dir), v4);
}
