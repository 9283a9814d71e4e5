//! `kilnd-sim` run by the harness: simulated devices (kilnd's device side, the worker
//! simulated) for the 100-device tests and `scripts/fleet-scale.sh`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `kilnd-sim` with `n` devices of group `lab`, killed on drop.
pub struct Sim {
    child: Child,
    /// How long the devices took to connect, as kilnd-sim measured it.
    pub connect_ms: u64,
    _data: tempfile::TempDir,
}

impl Sim {
    /// Starts `n` devices of the fleet whose root document is `root`; `crash` are
    /// `VERSION:PERCENT` shares of devices whose worker crashes on that version.
    /// Returns once every device is connected.
    pub fn start(broker: &str, root: &Path, n: usize, crash: &[&str]) -> Self {
        Self::start_with(broker, root, n, crash, &[])
    }

    /// [`Sim::start`] with more kilnd-sim flags (`--riscv N`).
    pub fn start_with(broker: &str, root: &Path, n: usize, crash: &[&str], extra: &[&str]) -> Self {
        Self::start_modelled(broker, root, n, crash, &[], extra)
    }

    /// [`Sim::start_with`] and module models (`VERSION:traps=PER_MILLE,...`, see
    /// `kilnd-sim --help`): how a module of each version behaves, for health gates.
    pub fn start_modelled(
        broker: &str,
        root: &Path,
        n: usize,
        crash: &[&str],
        models: &[&str],
        extra: &[&str],
    ) -> Self {
        // The devices' data dirs in memory where the machine has a tmpfs: thousands of
        // devices each syncing its state and slots to one disk waited on the disk, not
        // on the broker (at 10,000, their agents fell minutes behind).
        let shm = std::path::Path::new("/dev/shm");
        let data = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let mut cmd = Command::new(crate::sim_path());
        cmd.args(["--broker", broker, "--root"])
            .arg(root)
            .arg("--data")
            .arg(data.path())
            .args(["--devices", &n.to_string()]);
        if !extra.contains(&"--telemetry-ms") {
            cmd.args(["--telemetry-ms", "2000"]);
        }
        for c in crash {
            cmd.args(["--crash", c]);
        }
        for m in models {
            cmd.args(["--model", m]);
        }
        cmd.args(extra);
        // Its stderr is kept beside the devices' data, for a start that fails.
        let stderr = data.path().join("kilnd-sim.stderr");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start kilnd-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // `kilnd-sim: N devices connected in M ms`
        let connect_ms = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| {
                let said = std::fs::read_to_string(&stderr).unwrap_or_default();
                let lines: Vec<&str> = said.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                panic!("kilnd-sim did not start: {line}{tail}")
            });
        Sim {
            child,
            connect_ms,
            _data: data,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
