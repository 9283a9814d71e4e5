//! kilnd as a systemd service: `serve` speaks sd_notify on the socket systemd gives
//! it (READY, watchdog pings from its records loop, STOPPING), logs with syslog
//! priorities when its stderr is the journal, and `kilnd check` answers whether a
//! config would start, without running anything.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{path_str, shared, Device};
use crate::DEVICES;

/// A notify socket like systemd's, and what kilnd sent to it, with arrival times.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            socket,
            _dir: dir,
            path,
        }
    }

    /// Every message until `until` holds for one or `limit` passes.
    fn collect(&self, limit: Duration, until: impl Fn(&str) -> bool) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&text);
                got.push((Instant::now(), text));
                if done {
                    break;
                }
            }
        }
        got
    }
}

/// A config with one healthy reactor, written next to a copy of the trusted key.
fn config(device: &Device, dir: &Path) -> std::path::PathBuf {
    let artifact = shared().artifact("fixtures/counter.wat", device.profile.name.as_str());
    let path = dir.join("kilnd.toml");
    std::fs::write(
        &path,
        format!(
            "trust = [{:?}]\n{}\n[[module]]\nname = \"counter\"\nartifact = {:?}\ntick_ms = 100\n",
            path_str(&shared().trust()),
            device.launcher_line(),
            path_str(&artifact),
        ),
    )
    .unwrap();
    path
}

#[test]
fn serve_is_ready_then_pings_the_watchdog_until_its_loop_hangs() {
    for name in DEVICES {
        let device = Device::new(name);
        let dir = tempfile::tempdir().unwrap();
        let config = config(&device, dir.path());
        let notify = NotifySocket::bind();
        let mut cmd = device.command(&["serve", "--config", path_str(&config)]);
        // Pings every 200 ms; the test build's records loop hangs after 3 s.
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "400000")
            .env("KILN_STUCK_MS", "3000")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let got = notify.collect(Duration::from_secs(8), |_| false);
        child.kill().unwrap();
        child.wait().unwrap();

        let explain = || {
            format!(
                "{name}: {:?}",
                got.iter().map(|(_, m)| m).collect::<Vec<_>>()
            )
        };
        assert!(
            got.first()
                .is_some_and(|(_, m)| m.starts_with("READY=1\nSTATUS=1 local module(s)")),
            "the first message is not READY with a status: {}",
            explain()
        );
        let pings: Vec<Instant> = got
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(at, _)| *at)
            .collect();
        assert!(pings.len() >= 5, "too few watchdog pings: {}", explain());
        let last = *pings.last().unwrap();
        let quiet = got.last().unwrap().0.max(last);
        assert!(
            Instant::now().duration_since(last) > Duration::from_secs(2),
            "{name}: pings went on after the loop hung (last {:?} ago, {quiet:?})",
            Instant::now().duration_since(last)
        );
        let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| *g < Duration::from_millis(1000)),
            "{name}: a gap between pings while the loop turned: {gaps:?}"
        );
    }
}

#[test]
fn serve_announces_stopping_and_logs_with_journal_priorities() {
    let device = Device::new("x86_64-linux");
    let dir = tempfile::tempdir().unwrap();
    let config = config(&device, dir.path());
    let notify = NotifySocket::bind();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut cmd = device.command(&["serve", "--config", path_str(&config)]);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut child = cmd.spawn().unwrap();
    let ready = notify.collect(Duration::from_secs(10), |m| m.starts_with("READY=1"));
    assert!(
        ready.last().is_some_and(|(_, m)| m.starts_with("READY=1")),
        "{ready:?}"
    );
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = notify.collect(Duration::from_secs(10), |m| m == "STOPPING=1");
    assert!(
        stopping.iter().any(|(_, m)| m == "STOPPING=1"),
        "{stopping:?}"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !log.is_empty()
            && log
                .lines()
                .all(|l| l.starts_with("<6>") || l.starts_with("<4>")),
        "each journal line starts with its priority:\n{log}"
    );
}

#[test]
fn check_answers_for_a_config_without_running_it() {
    for name in DEVICES {
        let device = Device::new(name);
        let dir = tempfile::tempdir().unwrap();
        let config = config(&device, dir.path());
        let run = device.kilnd(&["check", "--config", path_str(&config)]);
        run.assert_code(0);
        assert!(
            run.stdout.contains("module counter: counter@1 for ")
                && run.stdout.contains("verified")
                && run
                    .stdout
                    .ends_with(&format!("config {}: ok\n", config.display())),
            "{run}"
        );
        assert_eq!(run.stderr, "", "{run}");

        // An artifact for another architecture is refused as `run` would refuse it.
        let other = if name == "riscv64-linux" {
            "aarch64-linux"
        } else {
            "riscv64-linux"
        };
        let foreign = shared().artifact("fixtures/counter.wat", other);
        let text = std::fs::read_to_string(&config).unwrap();
        let start = text.find("artifact = ").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        let bad = format!(
            "{}artifact = {:?}{}",
            &text[..start],
            path_str(&foreign),
            &text[end..]
        );
        std::fs::write(&config, &bad).unwrap();
        device
            .kilnd(&["check", "--config", path_str(&config)])
            .assert_refused(85, &[path_str(&foreign)]);

        // A fuel limit on a module compiled without metering is what its worker refuses.
        let own = shared().artifact("fixtures/counter.wat", name);
        std::fs::write(
            &config,
            format!(
                "{}artifact = {:?}\nfuel_per_call = 1000{}",
                &text[..start],
                path_str(&own),
                &text[end..]
            ),
        )
        .unwrap();
        device
            .kilnd(&["check", "--config", path_str(&config)])
            .assert_refused(79, &["module `counter`", "compiled without metering"]);
    }
}

#[test]
fn check_refuses_an_empty_trust_directory_and_a_config_with_nothing_to_run() {
    let device = Device::new("x86_64-linux");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("trust")).unwrap();
    let config = dir.path().join("kilnd.toml");
    std::fs::write(
        &config,
        "trust = [\"trust\"]\n[mqtt]\nbroker = \"mqtt://127.0.0.1\"\n",
    )
    .unwrap();
    device
        .kilnd(&["check", "--config", path_str(&config)])
        .assert_refused(81, &[path_str(&config), "holds no `*.pub` key"]);
    std::fs::copy(shared().trust(), dir.path().join("trust/fleet.pub")).unwrap();
    std::fs::write(&config, "trust = [\"trust\"]\n").unwrap();
    device
        .kilnd(&["check", "--config", path_str(&config)])
        .assert_refused(81, &["no [[module]] to run and no [mqtt]"]);
    std::fs::write(
        &config,
        "trust = [\"trust\"]\ndata_dir = \"state\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1\"\n",
    )
    .unwrap();
    // A device that follows a broker needs the fleet's root document.
    device
        .kilnd(&["check", "--config", path_str(&config)])
        .assert_refused(81, &["needs the fleet's root document"]);
    std::fs::copy(shared().root(), dir.path().join("trust/fleet.root")).unwrap();
    let run = device.kilnd(&["check", "--config", path_str(&config)]);
    run.assert_code(0);
    // The key of fleet.pub is the root's release key: one key.
    assert!(run.stdout.starts_with("trust: 1 ("), "{run}");
    assert!(run.stdout.contains("\nroot: fleet "), "{run}");
    assert!(
        run.stdout.contains("mqtt: mqtt://127.0.0.1 as device "),
        "{run}"
    );
}
