//! Test harness: finds the binaries under test, compiles fixtures once per target, and
//! runs `kilnd` the way a user would (wrapped in the profile's qemu command for other
//! architectures). On failure it prints the command, status, stdout and stderr.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_e2e::mosquitto::Broker;
pub use kiln_e2e::{compile, kilnd_path, path_str, profile, repo, source, Run};
use kiln_protocol::target::TargetProfile;
use serde_json::Value;

/// Source name, target, extra `kiln compile` options.
type CompileKey = (String, String, Vec<String>);

/// One temp dir for the whole test run holding the fleet key pair and the compiled
/// artifacts, so each (source, target) pair is compiled once.
pub struct Shared {
    pub dir: tempfile::TempDir,
    compiled: Mutex<HashMap<CompileKey, PathBuf>>,
}

pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("fleet.key");
        KeygenCommand::try_parse_from(["keygen", "-o", key.to_str().expect("utf-8 path")])
            .expect("keygen args")
            .execute()
            .expect("keygen");
        Shared {
            dir,
            compiled: Mutex::new(HashMap::new()),
        }
    })
}

impl Shared {
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("fleet.key")
    }

    pub fn trust(&self) -> PathBuf {
        self.dir.path().join("fleet.pub")
    }

    /// The fleet's root document (`kiln keygen` writes it beside the key).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("fleet.root")
    }

    /// Compiles `name` for `target` with `kiln compile` (once) and returns the artifact.
    pub fn artifact(&self, name: &str, target: &str) -> PathBuf {
        self.artifact_with(name, target, &[])
    }

    /// Like [`Shared::artifact`], with extra `kiln compile` options.
    pub fn artifact_with(&self, name: &str, target: &str, extra: &[&str]) -> PathBuf {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let key = (name.to_string(), target.to_string(), extra.clone());
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = compiled.get(&key) {
            return path.clone();
        }
        let stem = Path::new(name)
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        let out = self
            .dir
            .path()
            .join(format!("{stem}-{target}-{}.kiln", compiled.len()));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        compile(&source(name), target, &self.key(), &out, &extra);
        compiled.insert(key, out.clone());
        out
    }
}

/// The fleet id of the tests' root document (`fleet.root`), which desired states name.
pub fn fleet_id() -> String {
    let bytes = std::fs::read(shared().root()).expect("fleet.root");
    kiln_protocol::trust::SignedRoot::peek(&bytes)
        .expect("root document")
        .fleet
}

/// Unix milliseconds now: the one clock (`kiln_protocol::clock`).
pub use kiln_protocol::clock::now_ms;

/// A device: the `kilnd` of a target profile, wrapped in its qemu command (tests may
/// change `profile.qemu`, e.g. to emulate an older CPU).
pub struct Device {
    pub profile: TargetProfile,
    /// The kilnd this device runs: the tests' full build, or the lean one.
    pub kilnd: PathBuf,
}

impl Device {
    pub fn new(profile_name: &str) -> Self {
        let profile = profile(profile_name);
        Self {
            kilnd: kilnd_path(&profile),
            profile,
        }
    }

    /// A device running the lean kilnd (no WASI).
    pub fn lean(profile_name: &str) -> Self {
        let profile = profile(profile_name);
        Self {
            kilnd: kiln_e2e::lean_kilnd_path(&profile),
            profile,
        }
    }

    /// The `worker_launcher` line of a kilnd.toml for this device: its qemu command
    /// under emulation (no binfmt_misc here), nothing natively.
    pub fn launcher_line(&self) -> String {
        let launcher: Vec<String> = self.profile.qemu.iter().map(|a| format!("{a:?}")).collect();
        format!("worker_launcher = [{}]", launcher.join(", "))
    }

    /// `kilnd ARGS...` as the device would run it.
    pub fn kilnd(&self, args: &[&str]) -> Run {
        Run::new(self.command(args))
    }

    /// The command line behind [`Device::kilnd`], to adjust before running.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.profile.command(&self.kilnd);
        cmd.args(args).env_remove("KILN_LOG");
        cmd
    }

    /// `kilnd run ARTIFACT --trust fleet.pub EXTRA...`
    pub fn run(&self, artifact: &Path, extra: &[&str]) -> Run {
        Run::new(self.run_command(artifact, extra))
    }

    pub fn run_command(&self, artifact: &Path, extra: &[&str]) -> Command {
        let trust = shared().trust();
        let mut args = vec!["run", path_str(artifact), "--trust", path_str(&trust)];
        args.extend_from_slice(extra);
        self.command(&args)
    }
}

/// Polls `done` until it holds; fails with `explain()` after `limit`.
pub fn eventually(limit: Duration, done: impl Fn() -> bool, explain: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A device: `kilnd serve` with a broker, its data dir kept across restarts.
pub struct FleetDevice {
    pub device: Device,
    pub id: String,
    pub dir: PathBuf,
    pub broker: String,
    child: Option<Child>,
    /// Reads kilnd's stdout until it closes.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Every JSON line kilnd printed on stdout.
    pub records: Arc<Mutex<Vec<Value>>>,
    pub groups: Vec<String>,
    /// Extra lines after the [mqtt] section's own: more keys, or further tables.
    pub mqtt_extra: String,
    /// Extra top-level lines, before `[mqtt]` (`mirror`, `mirror_ca`).
    pub top_extra: String,
    /// The root document it is provisioned with (the tests' shared fleet by default).
    pub root: PathBuf,
    _keep: Option<tempfile::TempDir>,
}

impl FleetDevice {
    pub fn new(target: &str, id: &str, broker: &Broker) -> Self {
        let keep = tempfile::tempdir().unwrap();
        Self {
            device: Device::new(target),
            id: id.into(),
            dir: keep.path().to_path_buf(),
            broker: broker.url(),
            child: None,
            reader: None,
            records: Arc::default(),
            groups: Vec::new(),
            mqtt_extra: String::new(),
            top_extra: String::new(),
            root: shared().root(),
            _keep: Some(keep),
        }
    }

    pub fn start(&mut self, fault: Option<&str>) {
        let launcher: Vec<String> = self
            .device
            .profile
            .qemu
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        let config = self.dir.join("kilnd.toml");
        std::fs::write(
            &config,
            format!(
                "device = {:?}\ndata_dir = \"data\"\ntrust = [{:?}]\nworker_launcher = [{}]\n{}[mqtt]\nbroker = {:?}\ngroups = {:?}\n{}",
                self.id,
                path_str(&self.root),
                launcher.join(", "),
                self.top_extra,
                self.broker,
                self.groups,
                self.mqtt_extra
            ),
        )
        .unwrap();
        let mut cmd = self
            .device
            .command(&["serve", "--config", path_str(&config)]);
        if let Some(step) = fault {
            cmd.env("KILN_FAULT", step);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.txt"))
            .unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn kilnd serve");
        let stdout = child.stdout.take().unwrap();
        let records = self.records.clone();
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    records.lock().unwrap().push(v);
                }
            }
        }));
        self.child = Some(child);
    }

    /// kilnd's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.read_to_end();
    }

    /// Waits until every line kilnd printed is in `records`.
    fn read_to_end(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Stops kilnd as a service manager would (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        self.read_to_end();
    }

    /// Waits for kilnd to die on its own (fault injection).
    pub fn wait_dead(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kilnd did not die\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Versions of `app` started so far, in order.
    pub fn started_versions(&self) -> Vec<u64> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["module"] == "app" && r["kind"] == "started")
            .filter_map(|r| r["version"].as_u64())
            .collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap_or_default()
    }
}

impl Drop for FleetDevice {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small tmpfs mounted for one test (the tests run as root, as CI does): a data dir
/// that can run full or be remounted read-only. Unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        Self::mount_cmd(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            path,
        );
        Self { path: path.into() }
    }

    pub fn read_only(&self, ro: bool) {
        let opts = if ro { "remount,ro" } else { "remount,rw" };
        Self::mount_cmd(&["-o", opts], &self.path);
    }

    fn mount_cmd(args: &[&str], path: &Path) {
        let status = Command::new("mount")
            .args(args)
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount {args:?} {} (needs root)",
            path.display()
        );
    }

    /// Fills what is free with one file; returns its path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
