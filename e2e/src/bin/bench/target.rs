//! One target profile as the bench uses it: its kilnd (wrapped in qemu-user when the
//! profile says so), artifacts compiled for it, and `kilnd serve` configs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kiln_e2e::{compile, path_str, profile, shipped_kilnd_path, source};
use kiln_protocol::target::TargetProfile;
use serde_json::Value;

pub struct Target {
    pub name: String,
    pub profile: TargetProfile,
    pub kilnd: PathBuf,
    pub dir: PathBuf,
    pub key: PathBuf,
}

impl Target {
    pub fn new(name: &str, dir: &Path, key: &Path) -> Self {
        let profile = profile(name);
        Self {
            name: name.into(),
            kilnd: shipped_kilnd_path(&profile),
            profile,
            dir: dir.into(),
            key: key.into(),
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.profile.qemu.is_empty() {
            "native"
        } else {
            "qemu-user"
        }
    }

    pub fn artifact(&self, source_name: &str, label: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir.join(format!("{label}-{}.kiln", self.name));
        if !out.exists() {
            compile(&source(source_name), &self.name, &self.key, &out, extra);
        }
        out
    }

    pub fn kilnd(&self, args: &[&str]) -> Command {
        let mut cmd = self.profile.command(&self.kilnd);
        cmd.args(args).env_remove("KILN_LOG");
        cmd
    }

    /// The fleet's root document (`kiln keygen` wrote it beside the key): what a fleet
    /// device trusts, and what `--trust` takes as well.
    pub fn trust(&self) -> PathBuf {
        self.key.with_extension("root")
    }

    /// Writes `{name}/kilnd.toml`: trust, the worker launcher, then `rest`.
    pub fn config(&self, name: &str, rest: &str) -> PathBuf {
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
    pub fn serve(&self, config: &Path) -> (Child, impl Iterator<Item = Value>) {
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

/// Resident memory of a process.
pub fn rss_kib(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
