//! The board in the loop (`scripts/board.sh`, docs/src/boards.md): Debian 12 arm64 under
//! `qemu-system-aarch64 -M virt`, or Debian 13 riscv64 under `qemu-system-riscv64 -M
//! virt`, with systemd, the kilnd .deb installed, the device
//! provisioned from its boot partition at first boot, and the fleet driven from the
//! host with `kiln` against a mosquitto on the host's loopback.
//!
//! Ignored in a plain `cargo test`: they need the image, which `scripts/board.sh`
//! builds, caches and passes in `KILN_BOARD_IMAGE` (with the .deb in `KILN_BOARD_DEB`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_e2e::board::{Board, Image};
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::rng::Rng;
use kiln_protocol::fleet::{EventKind, ModuleState, Topics, DEFAULT_PREFIX};

use crate::fleet::Watch;
use crate::telemetry::Watcher;
use crate::trust::Fleet;
use crate::util::{eventually, path_str};

/// Everything on the emulated board is slower than on a device: a boot takes tens of
/// seconds, a module's first start a few.
const LIMIT: Duration = Duration::from_secs(240);
/// A push's health window and tick (the sensor reactor, module `app`).
const QUICK: [&str; 6] = [
    "--health-window-ms",
    "2000",
    "--tick-ms",
    "200",
    "--confirm-timeout-s",
    "0",
];

/// Every process of kilnd.service: kilnd, its zygote and the workers (the zygote's
/// children), from the unit's cgroup.
const KILND_PROCS: &str = "cat /sys/fs/cgroup/system.slice/kilnd.service/cgroup.procs";

/// A provisioned board with kilnd installed, a fleet of its own, a broker, and a
/// watch on the device's events.
struct Lab {
    broker: Broker,
    fleet: Fleet,
    board: Board,
    watch: Watch,
    id: String,
}

impl Lab {
    /// Flashes the image, puts the provisioning bundle on the boot partition, installs
    /// the .deb on the first boot, and boots again: the first boot with kilnd, where
    /// `kilnd-provision.service` installs the bundle before `kilnd.service` starts.
    fn new(id: &str) -> Self {
        let broker = Broker::start();
        let fleet = Fleet::new(&broker, "board");
        let watch = Watch::start(&broker, id);
        let out = fleet.path("provision");
        fleet
            .kiln(&[
                "provision",
                "--out",
                path_str(&out),
                "--device",
                id,
                "--broker",
                &format!("mqtt://10.0.2.2:{}", broker.port),
                "--root",
                "fleet.root",
                "--group",
                "boards",
            ])
            .ok("kiln provision");
        let mut board = Board::new(&Image::from_env(), Some(&out.join(id).join("kiln")));
        let took = board.boot();
        eprintln!("board: first boot (no kilnd) answered ssh after {took:.1?}");
        let deb = std::env::var("KILN_BOARD_DEB").expect("KILN_BOARD_DEB (scripts/board.sh)");
        board.put(Path::new(&deb), "/tmp/kilnd.deb");
        board.sh("dpkg -i /tmp/kilnd.deb >/dev/null && rm /tmp/kilnd.deb");
        // Installed but not provisioned: the unit waits for a trusted key.
        assert_eq!(
            board.sh("systemctl is-active kilnd || true").trim(),
            "inactive"
        );
        let took = board.reboot();
        eprintln!("board: second boot (kilnd, provisioning) answered ssh after {took:.1?}");
        let lab = Self {
            broker,
            fleet,
            board,
            watch,
            id: id.into(),
        };
        lab.wait_active();
        lab.wait_online();
        lab
    }

    fn wait_active(&self) {
        eventually(
            LIMIT,
            || {
                self.board
                    .try_ssh("systemctl is-active kilnd", Duration::from_secs(30))
                    .is_some_and(|o| o.stdout.starts_with(b"active"))
            },
            || self.journal(),
        );
    }

    fn wait_online(&self) {
        let topic = Topics::new(DEFAULT_PREFIX).status(&self.id);
        eventually(
            LIMIT,
            || {
                crate::fleet::retained(&self.broker.url(), &topic)
                    .get(&topic)
                    .is_some_and(|p| {
                        matches!(kiln_protocol::fleet::Status::open(&topic, p), Ok((s, _)) if s.online)
                    })
            },
            || format!("{} is not online\n{}", self.id, self.journal()),
        );
    }

    /// kilnd's journal this boot (the last 60 lines), for failure reports.
    fn journal(&self) -> String {
        self.board
            .try_ssh(
                "journalctl -b -u kilnd -u kilnd-provision --no-pager -n 60",
                Duration::from_secs(60),
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|| self.board.console())
    }

    /// `source` compiled for the board as module `name` at `version`, signed by `key`.
    fn artifact(&self, source: &str, name: &str, version: u64, key: &str) -> PathBuf {
        self.fleet
            .compile(source, self.board.image().target(), name, version, key)
    }

    /// `kiln push` of the sensor reactor as `app` at `version`.
    fn push_app(&self, version: u64, key: &str) {
        let artifact = self.artifact("sensor_filter.wasm", "app", version, key);
        self.push(&artifact, key, &QUICK);
    }

    fn push(&self, artifact: &Path, key: &str, extra: &[&str]) {
        let mut args = vec![
            "push",
            path_str(artifact),
            "--device",
            &self.id,
            "--sign",
            key,
            "--force",
        ];
        args.extend_from_slice(extra);
        self.fleet.kiln(&args).ok("push");
    }

    /// The counter fixture as module `counter`: 5 records every 100 ms, a steady
    /// stream of telemetry batches (one a second).
    fn push_counter(&self) {
        let artifact = self.artifact("fixtures/counter.wat", "counter", 1, "fleet.key");
        let config = self.fleet.path("counter.config");
        std::fs::write(&config, "5").unwrap();
        self.push(
            &artifact,
            "fleet.key",
            &[
                "--config",
                path_str(&config),
                "--tick-ms",
                "100",
                "--confirm-timeout-s",
                "0",
            ],
        );
    }

    /// Waits until the device reports `module` running at `version`.
    fn wait_running(&self, module: &str, version: u64) {
        eventually(
            LIMIT,
            || self.running(module) == Some(version),
            || {
                format!(
                    "{module} v{version} is not running: reported {:?}\n{}",
                    self.watch.reported(),
                    self.journal()
                )
            },
        );
    }

    /// The version of `module` the device reports running (and committed).
    fn running(&self, module: &str) -> Option<u64> {
        let reported = self.watch.reported()?;
        let m = reported.modules.iter().find(|m| m.name == module)?;
        (m.state == ModuleState::Running).then_some(m.version)
    }
}

/// The short version `.ci/run` runs: one board, one update, one power cut in the middle
/// of the next update, and the device back on a committed, verified module set.
#[test]
#[ignore = "needs the board image: scripts/board.sh --short"]
fn short_one_boot_one_update_one_power_cut() {
    let mut lab = Lab::new("board-short");
    assert_provisioned(&lab);
    lab.push_app(1, "fleet.key");
    lab.watch.wait_committed(1, LIMIT);
    lab.wait_running("app", 1);

    let old_state = desired_state(&lab);
    lab.push_app(2, "fleet.key");
    // In the middle of the update: after the device took the desired state and began
    // the transfer, before the health window can have ended.
    lab.watch.wait_event(LIMIT, "v2 downloading", |(m, v, k)| {
        m == "app" && *v == 2 && matches!(k, EventKind::Downloading { .. } | EventKind::Staged)
    });
    lab.board.cut();
    let took = lab.board.boot();
    eprintln!("board: boot after the power cut answered ssh after {took:.1?}");
    lab.wait_active();
    // The way in when ssh does not answer: a root shell on the serial console.
    let shown = lab.board.on_console("systemctl is-active kilnd");
    // (The line of `active` may begin with a terminal's escape and a carriage return.)
    let lines: Vec<&str> = shown
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect();
    // A terminal in bracketed-paste mode puts `ESC [?2004l` before the answer, and the
    // next command's echo may follow the marker on its line.
    let answer = |l: &str| l.rsplit('l').next() == Some("active") || l == "active";
    assert!(
        lines
            .windows(2)
            .any(|w| answer(w[0]) && w[1].starts_with("console-done-42")),
        "no shell on the serial console:\n{shown}"
    );
    lab.wait_running("app", 2);
    lab.watch.wait_committed(2, LIMIT);
    assert_old_state_refused(&lab, &old_state);
    assert_no_denied_syscalls(&lab);
    eprintln!(
        "board: {} boots, {} did not answer ssh and were power-cycled",
        lab.board.boots, lab.board.unreachable
    );
}

/// The device's desired state as the broker holds it now (signed, retained).
fn desired_state(lab: &Lab) -> Vec<u8> {
    let topic = Topics::new(DEFAULT_PREFIX).desired(&lab.id);
    crate::fleet::retained(&lab.broker.url(), &topic)
        .remove(&topic)
        .expect("a retained desired state")
}

/// The device's floors survived every cut: an older desired state, replayed as the
/// broker (or an attacker on it) could, is refused as a replay and what runs stays.
fn assert_old_state_refused(lab: &Lab, old: &[u8]) {
    let running = lab.running("app").expect("app runs");
    lab.broker
        .publish_retained(&Topics::new(DEFAULT_PREFIX).desired(&lab.id), old.to_vec());
    crate::trust::refused(&lab.watch, "an old state replayed", "(a replay)");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lab.running("app"), Some(running), "{}", lab.journal());
}

/// What provisioning left on the board: the bundle installed and gone from the boot
/// partition, the identity key made by kilnd at its first start.
fn assert_provisioned(lab: &Lab) {
    let out = lab.board.sh(
        "test -e /boot/firmware/kiln && echo BUNDLE-LEFT; \
         stat -c '%a %U:%G %n' /etc/kiln/kilnd.toml /etc/kiln/trust/*.root /var/lib/kiln/identity.key; \
         journalctl -b -u kilnd-provision --no-pager -o cat | tail -n 20",
    );
    assert!(
        !out.contains("BUNDLE-LEFT"),
        "the bundle is still on the boot partition:\n{out}"
    );
    assert!(
        out.contains("600 kiln:kiln /var/lib/kiln/identity.key"),
        "{out}"
    );
    assert!(out.contains("640 root:kiln /etc/kiln/kilnd.toml"), "{out}");
    assert!(
        out.contains("deleted the bundle /boot/firmware/kiln"),
        "{out}"
    );
}

/// A refused system call fails with EPERM (SystemCallErrorNumber=EPERM): any in the
/// journal would name it. None may show up.
fn assert_no_denied_syscalls(lab: &Lab) {
    let out = lab
        .board
        .sh("journalctl -u kilnd --no-pager -o cat | grep -ci 'operation not permitted' || true");
    assert_eq!(out.trim(), "0", "{}", lab.journal());
}

/// kilnd as systemd runs it on the board (arm64 or riscv64): started by the unit after
/// `kilnd check`, READY and watchdog pings, the sandbox and the system call filter in
/// force on kilnd and its workers, journal priorities, a hung kilnd restarted by the watchdog, and a
/// broken config stopped by `ExecStartPre`.
#[test]
#[ignore = "needs the board image: scripts/board.sh"]
fn systemd_runs_kilnd_with_its_sandbox_watchdog_and_checks() {
    let lab = Lab::new("board-systemd");
    assert_provisioned(&lab);
    lab.push_app(1, "fleet.key");
    lab.wait_running("app", 1);

    // READY=1 was received (Type=notify is active only after it) and the watchdog is
    // armed and fed: its timestamp moves.
    let show = |props: &str| lab.board.sh(&format!("systemctl show kilnd -p {props}"));
    let first = show(
        "Type,ActiveState,SubState,WatchdogUSec,WatchdogTimestampMonotonic,NRestarts,ExecStartPre",
    );
    assert!(first.contains("Type=notify"), "{first}");
    assert!(
        first.contains("ActiveState=active") && first.contains("SubState=running"),
        "{first}"
    );
    assert!(first.contains("WatchdogUSec=30s"), "{first}");
    assert!(first.contains("kilnd check"), "{first}");
    let fed = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("WatchdogTimestampMonotonic="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = fed(&first);
    std::thread::sleep(Duration::from_secs(20));
    let after = fed(&show("WatchdogTimestampMonotonic"));
    assert!(
        after > before,
        "no watchdog ping in 20 s: {before} then {after}"
    );

    // The sandbox, read off the kernel for kilnd and for each worker: a seccomp filter,
    // no new privileges, no capabilities, a read-only /usr and /etc.
    let main = lab
        .board
        .sh("systemctl show kilnd -p MainPID --value")
        .trim()
        .to_string();
    let procs = lab.board.sh(KILND_PROCS);
    let pids: Vec<&str> = procs.split_whitespace().collect();
    assert!(pids.len() >= 3, "kilnd, its zygote and a worker: {procs}");
    for pid in &pids {
        let status = lab.board.sh(&format!(
            "grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/{pid}/status"
        ));
        for want in [
            "Seccomp:\t2",
            "NoNewPrivs:\t1",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
        ] {
            assert!(status.contains(want), "pid {pid}: {want} not in\n{status}");
        }
        // ProtectSystem=strict: the root, and with it /usr and /etc, is mounted
        // read-only in the unit's namespace; only the state directory is writable.
        let mounts = lab.board.sh(&format!("cat /proc/{pid}/mountinfo"));
        let options = |point: &str| {
            mounts
                .lines()
                .find(|l| l.split(' ').nth(4) == Some(point))
                .and_then(|l| l.split(' ').nth(5))
                .map(str::to_string)
        };
        assert!(
            options("/").is_some_and(|o| o.starts_with("ro,")),
            "pid {pid}: / is not read-only\n{mounts}"
        );
        for point in ["/usr", "/etc"] {
            assert!(
                options(point).is_none_or(|o| o.starts_with("ro,")),
                "pid {pid}: {point} is writable\n{mounts}"
            );
        }
        assert!(
            options("/var/lib/kiln").is_some_and(|o| o.starts_with("rw,")),
            "pid {pid}: /var/lib/kiln is not writable\n{mounts}"
        );
    }
    let security = lab
        .board
        .sh("systemd-analyze security kilnd --no-pager | tail -n 1");
    eprintln!("board: systemd-analyze security kilnd: {}", security.trim());

    // Journal priorities: kilnd's info lines are priority 6; a module's trap (a warning
    // or an error) is below that and `journalctl -p warning` shows it.
    let priorities = lab
        .board
        .sh("journalctl -u kilnd -b -o json --no-pager | grep -o '\"PRIORITY\":\"[0-9]\"' | sort | uniq -c");
    assert!(priorities.contains("\"PRIORITY\":\"6\""), "{priorities}");
    lab.push(
        &lab.artifact("fixtures/trap-tick.wat", "app", 2, "fleet.key"),
        "fleet.key",
        &QUICK,
    );
    lab.watch.wait_event(LIMIT, "rolled-back v2", |(m, v, k)| {
        m == "app" && *v == 2 && matches!(k, EventKind::RolledBack { .. })
    });
    let warnings = lab
        .board
        .sh("journalctl -u kilnd -b -p warning --no-pager -o cat");
    assert!(
        warnings.contains("app"),
        "no warning names the trapping module:\n{warnings}"
    );
    lab.wait_running("app", 1);

    // A hung kilnd (every thread stopped) stops feeding the watchdog: after WatchdogSec
    // systemd aborts it and, with Restart=on-failure, starts it again.
    lab.board.sh("systemctl kill -s STOP kilnd");
    let hung = Instant::now();
    eventually(
        LIMIT,
        || {
            let now = lab
                .board
                .sh("systemctl show kilnd -p MainPID --value; systemctl is-active kilnd || true");
            let mut lines = now.lines();
            lines.next().map(str::trim) != Some(main.as_str()) && lines.next() == Some("active")
        },
        || lab.journal(),
    );
    let restarted = lab
        .board
        .sh("journalctl -u kilnd -b --no-pager -o cat | grep -i watchdog || true");
    assert!(restarted.contains("Watchdog timeout"), "{restarted}");
    eprintln!(
        "board: a hung kilnd was restarted by the watchdog {:.0?} after it hung",
        hung.elapsed()
    );
    lab.wait_running("app", 1);

    // A broken config: `kilnd check` in ExecStartPre refuses it with one line naming the
    // file, and the unit does not start; the old config back, it starts.
    lab.board
        .sh("cp /etc/kiln/kilnd.toml /root/kilnd.toml && echo '[[module' >> /etc/kiln/kilnd.toml");
    let restart = lab
        .board
        .try_ssh("systemctl restart kilnd", LIMIT)
        .expect("systemctl restart");
    assert!(
        !restart.status.success(),
        "kilnd started with a broken config"
    );
    let check = lab
        .board
        .sh("journalctl -u kilnd -b --no-pager -o cat -n 20");
    assert!(check.contains("/etc/kiln/kilnd.toml"), "{check}");
    lab.board
        .sh("cp /root/kilnd.toml /etc/kiln/kilnd.toml && systemctl reset-failed kilnd && systemctl start kilnd");
    lab.wait_active();
    lab.wait_running("app", 1);
    assert_no_denied_syscalls(&lab);
}

/// The fleet's life on the board: an update, a rollback, a key rotation, and telemetry
/// that crosses a clean reboot with every batch accounted for.
#[test]
#[ignore = "needs the board image: scripts/board.sh"]
fn update_rollback_key_rotation_and_telemetry_across_a_reboot() {
    let mut lab = Lab::new("board-fleet");
    let mut watcher = Watcher::start(&lab.broker, "board-fleet");
    lab.push_counter();
    lab.push_app(1, "fleet.key");
    lab.wait_running("app", 1);
    lab.wait_running("counter", 1);
    lab.push_app(2, "fleet.key");
    lab.watch.wait_committed(2, LIMIT);

    // A version that traps on its third tick rolls back to v2.
    lab.push(
        &lab.artifact("fixtures/trap-tick.wat", "app", 3, "fleet.key"),
        "fleet.key",
        &QUICK,
    );
    lab.watch.wait_event(LIMIT, "rolled-back v3", |(m, v, k)| {
        m == "app" && *v == 3 && matches!(k, EventKind::RolledBack { .. })
    });
    lab.wait_running("app", 2);

    // The release key leaked: root v2 names a new one; the board takes the new root
    // and then v4 signed with the new key, and refuses what the old key signs.
    lab.fleet
        .kiln(&["keygen", "-o", "new.key", "--no-root"])
        .ok("keygen");
    lab.fleet.rotate_release(&["new.pub"], 1);
    lab.watch.wait_event(
        LIMIT,
        "root v2 taken",
        |(_, _, k)| matches!(k, EventKind::Trusted { reason } if reason.contains("root v2")),
    );
    lab.fleet
        .kiln(&["refresh", "--all", "--sign", "new.key", "--adopt"])
        .ok("refresh --adopt");
    lab.push_app(4, "new.key");
    lab.watch.wait_committed(4, LIMIT);
    let old = lab.fleet.kiln(&[
        "push",
        path_str(&lab.artifact("sensor_filter.wasm", "app", 5, "fleet.key")),
        "--device",
        "board-fleet",
        "--sign",
        "fleet.key",
        "--force",
    ]);
    assert_ne!(old.code, Some(0), "{old}");

    // Telemetry across a clean reboot: the spool is flushed at SIGTERM, the new boot
    // starts a new boot_id; nothing is missing.
    let took = lab.board.reboot();
    eprintln!("board: reboot answered ssh after {took:.1?}");
    lab.wait_active();
    lab.wait_running("app", 4);
    lab.wait_running("counter", 1);
    eventually(
        LIMIT,
        || boots_seen(&watcher) >= 2,
        || {
            format!(
                "telemetry of the second boot did not arrive: {:?}",
                watcher.of_kind("summary")
            )
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    let (code, summaries) = watcher.stop();
    assert_eq!(
        code,
        Some(0),
        "kiln watch found missing batches: {summaries:#?}"
    );
    assert!(summaries.len() >= 2, "{summaries:#?}");
    for s in &summaries {
        assert_eq!(s["first_seq"], 0, "{s}");
    }
}

/// (boot_id)s whose counter records reached kiln watch.
fn boots_seen(watcher: &Watcher) -> usize {
    let boots: std::collections::BTreeSet<String> = watcher
        .lines()
        .iter()
        .filter(|v| v["kind"] == "telemetry")
        .filter_map(|v| v["boot_id"].as_str().map(str::to_string))
        .collect();
    boots.len()
}

/// Power cuts: the VM killed with no shutdown and no sync at a point drawn from the seed,
/// in the middle of an update or of the telemetry stream, `KILN_BOARD_CUTS` times.
/// After each boot the device runs a committed, verified module set at or above every
/// version it had committed (its floors hold) and converges on the desired one; at the
/// end every telemetry batch of every boot reached the consumer or was reported dropped.
#[test]
#[ignore = "needs the board image: scripts/board.sh"]
fn power_cuts_during_updates_and_telemetry_leave_a_working_device() {
    let cuts: u32 = std::env::var("KILN_BOARD_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("KILN_BOARD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261206);
    let mut rng = Rng::new(seed);
    let mut lab = Lab::new("board-power");
    let mut watcher = Watcher::start(&lab.broker, "board-power");
    lab.push_counter();
    lab.push_app(1, "fleet.key");
    lab.wait_running("app", 1);
    lab.wait_running("counter", 1);
    let old_state = desired_state(&lab);
    let mut version = 1;
    let (mut in_update, mut in_stream) = (0, 0);
    let started = Instant::now();
    for cut in 1..=cuts {
        let floor = version;
        // Half the cuts fall in an update (push, then cut within the next 12 s: the
        // transfer, staging, the switch, the health window, the commit), half in the
        // telemetry stream alone.
        let update = rng.below(2) == 0;
        let delay = Duration::from_millis(rng.range(0, 12_000));
        if update {
            version += 1;
            in_update += 1;
            lab.push_app(version, "fleet.key");
        } else {
            in_stream += 1;
        }
        std::thread::sleep(delay);
        lab.board.cut();
        lab.watch.forget_reported();
        let took = lab.board.boot();
        lab.wait_active();
        // The first state the device reports after the boot: app never below the
        // version it had committed before the cut (its floor); then the desired one.
        eventually(
            LIMIT,
            || lab.watch.reported().is_some(),
            || {
                format!(
                    "cut {cut}: no reported state after the boot\n{}",
                    lab.journal()
                )
            },
        );
        let first = lab.watch.reported().unwrap();
        let app = first.modules.iter().find(|m| m.name == "app");
        assert!(
            app.is_some_and(|m| m.version >= floor),
            "cut {cut}: after the boot app is {app:?}, below its floor v{floor}"
        );
        lab.wait_running("app", version);
        lab.wait_running("counter", 1);
        eprintln!(
            "board: cut {cut}/{cuts} ({}, after {delay:.1?}): boot {took:.1?}, app v{version} running",
            if update { "update" } else { "telemetry" }
        );
    }
    assert_old_state_refused(&lab, &old_state);
    // The last boot's batches, and any spooled ones it sends late, reach kiln watch.
    std::thread::sleep(Duration::from_secs(10));
    let (code, summaries) = watcher.stop();
    let batches: u64 = summaries.iter().filter_map(|s| s["batches"].as_u64()).sum();
    let dropped: u64 = summaries.iter().filter_map(|s| s["dropped"].as_u64()).sum();
    eprintln!(
        "board: {cuts} power cuts from seed {seed} ({in_update} in updates, {in_stream} in the telemetry stream) \
         in {:.0?}: 0 bricked, {} boots of kilnd, {batches} batches received, {dropped} reported dropped, exit {code:?}; \
         {} boots did not answer ssh and were power-cycled",
        started.elapsed(),
        summaries.len(),
        lab.board.unreachable
    );
    assert_eq!(
        code,
        Some(0),
        "kiln watch found batches neither received nor reported dropped: {summaries:#?}"
    );
}

/// Memory and start figures on the board (emulated full-system: an emulated Cortex-A72
/// under TCG on the build machine, not a board's speed): PSS of kilnd and each worker,
/// a worker's start, and `kilnd run hello` against a native hello.
#[test]
#[ignore = "needs the board image: scripts/board.sh"]
fn figures_on_the_emulated_board() {
    let lab = Lab::new("board-figures");
    lab.push_app(1, "fleet.key");
    lab.wait_running("app", 1);
    std::thread::sleep(Duration::from_secs(10));
    let pss = lab.board.sh(&format!(
        "for p in $({KILND_PROCS}); do echo \"$p $(awk '/^Pss:/{{print $2}}' /proc/$p/smaps_rollup) $(awk '/^Rss:/{{print $2}}' /proc/$p/smaps_rollup) $(tr '\\0' ' ' </proc/$p/cmdline | cut -c1-60)\"; done"
    ));
    let total: u64 = pss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    eprintln!("board figures: pid pss_kib rss_kib cmdline\n{pss}board figures: PSS of kilnd.service in all: {total} KiB");
    let hello = lab.artifact("hello.wasm", "hello", 1, "fleet.key");
    lab.board.put(&hello, "/tmp/hello.kiln");
    lab.board
        .put(&lab.fleet.path("fleet.pub"), "/tmp/fleet.pub");
    let timing = lab.board.sh(
        "t0=$(date +%s%N); for i in 1 2 3 4 5 6 7 8 9 10; do kilnd run /tmp/hello.kiln --trust /tmp/fleet.pub >/dev/null; done; \
         t1=$(date +%s%N); for i in 1 2 3 4 5 6 7 8 9 10; do /bin/echo hello >/dev/null; done; t2=$(date +%s%N); \
         echo \"kilnd_run_hello_ms=$(( (t1 - t0) / 10000000 )) native_echo_ms=$(( (t2 - t1) / 10000000 ))\"",
    );
    eprintln!("board figures: {}", timing.trim());
    let starts = lab
        .board
        .sh("journalctl -u kilnd -b -o cat --no-pager | grep -i 'started' | tail -n 3");
    eprintln!("board figures: worker starts:\n{starts}");
}

/// The `gpio` and `i2c` capabilities on a real kernel (issue 35): a simulated GPIO
/// chip (`gpio-sim`, configured through configfs) and an I2C EEPROM (`i2c-stub` at
/// 0x50) on the arm64 board (both built for its kernel by scripts/board-modules.sh), granted in kilnd.toml to the C panel module
/// (examples/c/panel.c) and opened by its worker before it confines itself. A button
/// pressed on the simulated chip (a pull-up on an input line) reaches the module as an
/// edge and lights the matching LED (an output line the test reads back), `kiln send`
/// lights the other, the EEPROM keeps what the module wrote across its restarts, and
/// no system call of the worker is refused.
#[test]
#[ignore = "needs the board image: scripts/board.sh"]
fn gpio_and_i2c_reach_the_module_granted_them() {
    // Debian's kernel builds neither simulator: scripts/board-modules.sh builds them
    // for the image's kernel (arm64 only).
    let Some(modules) = std::env::var_os("KILN_BOARD_MODULES") else {
        eprintln!("board: no gpio-sim and i2c-stub for this image (KILN_BOARD_MODULES, arm64 only): skipped");
        return;
    };
    let modules = PathBuf::from(modules);
    let lab = Lab::new("board-hw");
    for ko in ["gpio-sim.ko", "i2c-stub.ko"] {
        lab.board.put(&modules.join(ko), &format!("/tmp/{ko}"));
    }
    // The hardware, simulated by the kernel. gpio-sim's chip: 4 lines, 0-1 the
    // buttons, 2-3 the LEDs.
    let found = lab.board.sh(
        "set -e; modprobe configfs; insmod /tmp/gpio-sim.ko; modprobe i2c-dev; \
         insmod /tmp/i2c-stub.ko chip_addr=0x50; \
         mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config; \
         d=/sys/kernel/config/gpio-sim/kiln; mkdir -p $d/bank0; echo 4 > $d/bank0/num_lines; \
         echo 1 > $d/live; chip=$(cat $d/bank0/chip_name); \
         bus=$(grep -l 'SMBus stub' /sys/class/i2c-dev/*/name | head -1 | xargs dirname | xargs basename); \
         echo \"$(cat $d/dev_name) $chip $bus\"",
    );
    let parts: Vec<&str> = found.split_whitespace().collect();
    let [dev, chip, bus] = parts[..] else {
        panic!("gpio-sim and i2c-stub: {found}");
    };
    // What a firmware team's image does for the hardware it grants: the device nodes
    // to kilnd's user, and a drop-in giving kilnd.service those devices (its
    // PrivateDevices=yes hides every other).
    lab.board.sh(&format!(
        "set -e; chown kiln /dev/{chip} /dev/{bus}; mkdir -p /etc/systemd/system/kilnd.service.d; \
         printf '[Service]\\nPrivateDevices=no\\nDevicePolicy=closed\\nDeviceAllow=/dev/{chip} rw\\nDeviceAllow=/dev/{bus} rw\\n' \
           > /etc/systemd/system/kilnd.service.d/hardware.conf; \
         printf '\\n[[gpio]]\\nname = \"buttons\"\\nchip = \"/dev/{chip}\"\\nlines = [0, 1]\\ndirection = \"input\"\\nedges = \"both\"\\nmodules = [\"panel\"]\\n\\n[[gpio]]\\nname = \"leds\"\\nchip = \"/dev/{chip}\"\\nlines = [2, 3]\\ndirection = \"output\"\\nmodules = [\"panel\"]\\n\\n[[i2c]]\\nname = \"eeprom\"\\nbus = \"/dev/{bus}\"\\naddress = 0x50\\nmodules = [\"panel\"]\\n' \
           >> /etc/kiln/kilnd.toml; \
         systemctl daemon-reload; systemctl restart kilnd"
    ));
    lab.wait_active();
    lab.wait_online();
    let watcher = Watcher::start(&lab.broker, "board-hw");
    let panel = lab.artifact("c/panel.wasm", "panel", 1, "fleet.key");
    lab.push(
        &panel,
        "fleet.key",
        &["--tick-ms", "200", "--confirm-timeout-s", "0"],
    );
    lab.wait_running("panel", 1);
    let records = || -> Vec<serde_json::Value> {
        watcher
            .of_kind("telemetry")
            .iter()
            .filter(|v| v["stream"] == "panel")
            .filter_map(|v| serde_json::from_str(v["text"].as_str()?).ok())
            .collect()
    };
    let last = || records().last().cloned().unwrap_or_default();
    let sim = format!("/sys/devices/platform/{dev}/{chip}");
    eventually(
        LIMIT,
        || last()["marker"] == "4b494c4e" && last()["buttons"] == 0,
        || format!("{:?}\n{}", records(), lab.journal()),
    );
    let boots = last()["boots"].as_u64().unwrap();
    assert_eq!(
        lab.board.sh(&format!("cat {sim}/sim_gpio2/value")).trim(),
        "0"
    );
    // Button 0 pressed: LED 0 (line 2) lights, and the press reached the module as
    // an edge (a message on gpio/buttons).
    lab.board
        .sh(&format!("echo pull-up > {sim}/sim_gpio0/pull"));
    eventually(
        LIMIT,
        || {
            let r = last();
            r["buttons"] == 1 && r["leds"] == 1 && r["edges"].as_u64() >= Some(1)
        },
        || format!("{:?}", records()),
    );
    eventually(
        Duration::from_secs(30),
        || lab.board.sh(&format!("cat {sim}/sim_gpio2/value")).trim() == "1",
        || lab.board.sh(&format!("grep . {sim}/sim_gpio*/value")),
    );
    assert_eq!(
        lab.board.sh(&format!("cat {sim}/sim_gpio3/value")).trim(),
        "0"
    );
    // The fleet lights LED 1 (line 3) with a command, signed and answered.
    let sent = lab.fleet.kiln(&[
        "send",
        "--device",
        &lab.id,
        "--module",
        "panel",
        "--topic",
        "leds",
        "--data",
        "2",
        "--sign",
        "fleet.key",
        "--timeout",
        "60s",
    ]);
    assert_eq!(sent.code, Some(0), "{sent}");
    assert!(sent.stdout.contains("status 0: leds=2"), "{sent}");
    eventually(
        Duration::from_secs(30),
        || lab.board.sh(&format!("cat {sim}/sim_gpio3/value")).trim() == "1",
        || lab.board.sh(&format!("grep . {sim}/sim_gpio*/value")),
    );
    // The EEPROM keeps the boot count across a restart of the module's worker.
    lab.board.sh("systemctl restart kilnd");
    lab.wait_active();
    eventually(
        LIMIT,
        || last()["boots"].as_u64() == Some(boots + 1),
        || format!("{:?}\n{}", records(), lab.journal()),
    );
    assert_no_denied_syscalls(&lab);
    assert!(
        records().iter().all(|r| r.get("error").is_none()),
        "{:?}",
        records()
    );
}
