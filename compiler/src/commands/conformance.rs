use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use kiln_protocol::keys::SecretKey;
use kiln_protocol::script::{Outcome, Script};
use kiln_protocol::target::wrapped_command;
use serde::Deserialize;
use serde_json::json;

use crate::build::conformance::{translate, HostOutcome};
use crate::build::targets::{self, ResolvedTarget};
use crate::exit::{coded, Code};

const AFTER_HELP: &str = "\
Every module is compiled and signed for the target; the scripts run inside that
target's kilnd (under the profile's qemu command). Exit code 0 means no failure that
the expectations file does not list.

Examples:
  kiln conformance ../shared/wasm-testsuite --target aarch64-linux \\
      --kilnd target/aarch64-unknown-linux-gnu/release/kilnd --expectations conformance/expectations.toml
  kiln conformance i32.wast f32.wast --target riscv64-linux --kilnd ./kilnd-riscv64 --json";

/// Run WebAssembly spec scripts (.wast) through kiln's compiler and a device's kilnd
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ConformanceCommand {
    /// .wast files, or directories of them
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,

    /// Target profile (or raw triple, which then runs kilnd natively)
    #[arg(long, value_name = "PROFILE|TRIPLE")]
    pub target: String,

    /// The kilnd binary built for that target
    #[arg(long, value_name = "PATH")]
    pub kilnd: PathBuf,

    /// Skips and known failures, with reasons (TOML)
    #[arg(long, value_name = "FILE")]
    pub expectations: Option<PathBuf>,

    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,

    /// Print the unexpected failures as `[[known]]` TOML entries (with reasons) to
    /// add to the expectations file, instead of failing
    #[arg(long)]
    pub print_known: bool,

    /// Files run at once
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,

    /// Read target profiles from this folder instead of the built-in ones
    #[arg(long, value_name = "DIR", env = "KILN_TARGETS_DIR")]
    pub targets_dir: Option<PathBuf>,
}

/// `conformance/expectations.toml`: what is skipped by name and what is known to fail.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    #[serde(default)]
    pub skip: Vec<Skip>,
    #[serde(default)]
    pub known: Vec<Known>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skip {
    pub files: Vec<String>,
    /// Profiles the skip applies to; all when absent.
    pub targets: Option<Vec<String>>,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Known {
    pub file: String,
    /// Profiles it fails on; all when absent.
    pub targets: Option<Vec<String>>,
    /// Assertion lines; the whole file when absent.
    pub lines: Option<Vec<u32>>,
    pub reason: String,
}

impl Expectations {
    fn skip_reason(&self, file: &str, target: &str) -> Option<&str> {
        self.skip
            .iter()
            .find(|s| {
                s.files.iter().any(|f| f == file)
                    && s.targets
                        .as_ref()
                        .is_none_or(|t| t.iter().any(|t| t == target))
            })
            .map(|s| s.reason.as_str())
    }

    fn known(&self, file: &str, target: &str, line: u32) -> bool {
        self.known.iter().any(|k| {
            k.file == file
                && k.targets
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|t| t == target))
                && k.lines.as_ref().is_none_or(|l| l.contains(&line))
        })
    }
}

#[derive(Debug, Default, Clone)]
pub struct FileReport {
    pub file: String,
    pub passed: usize,
    pub failed: Vec<(u32, String)>,
    pub known: usize,
    pub skipped: usize,
    /// Reason when the whole file is skipped by name.
    pub skipped_file: Option<String>,
}

impl ConformanceCommand {
    pub fn execute(self) -> Result<()> {
        let profiles =
            targets::load(self.targets_dir.as_deref()).map_err(|e| coded(Code::InvalidInput, e))?;
        let target = ResolvedTarget::resolve(&self.target, &[], &profiles)
            .map_err(|e| coded(Code::Usage, e))?;
        let profile = profiles
            .iter()
            .find(|p| Some(&p.name) == target.profile.as_ref());
        let expectations = match &self.expectations {
            Some(path) => read_expectations(path).map_err(|e| coded(Code::InvalidInput, e))?,
            None => Expectations::default(),
        };
        if !self.kilnd.exists() {
            return Err(coded(
                Code::NoInput,
                anyhow!("kilnd `{}` does not exist", self.kilnd.display()),
            ));
        }
        let qemu = profile.map(|p| p.qemu.clone()).unwrap_or_default();
        can_replay(&qemu, &self.kilnd)?;
        let files = wast_files(&self.paths).map_err(|e| coded(Code::NoInput, e))?;
        let work = tempfile::tempdir().context("cannot create a temp dir")?;
        let key = SecretKey::generate()?;
        let trust = work.path().join("spectest.pub");
        std::fs::write(&trust, key.public().to_text())?;
        let runner = Runner {
            target: &target,
            target_name: target
                .profile
                .clone()
                .unwrap_or_else(|| target.triple.to_string()),
            qemu,
            kilnd: &self.kilnd,
            key: &key,
            trust: &trust,
            work: work.path(),
            expectations: &expectations,
        };

        let next = AtomicUsize::new(0);
        let reports = Mutex::new(BTreeMap::new());
        std::thread::scope(|s| {
            for _ in 0..self.jobs.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = files.get(i) else { break };
                    let report = runner.run_file(path);
                    reports
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(report.file.clone(), report);
                });
            }
        });
        let reports: Vec<FileReport> = reports
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_values()
            .collect();
        if self.print_known {
            print!("{}", known_toml(&runner.target_name, &reports));
            return Ok(());
        }
        if self.json {
            println!("{}", report_json(&runner.target_name, &reports));
        } else {
            print_table(&runner.target_name, &reports);
        }
        let unexpected: usize = reports.iter().map(|r| r.failed.len()).sum();
        if unexpected > 0 {
            return Err(coded(
                Code::Failure,
                anyhow!(
                    "{unexpected} unexpected failure(s) on {}",
                    runner.target_name
                ),
            ));
        }
        Ok(())
    }
}

/// Asks the kilnd whether it has the replayer (`kilnd conformance --help`): a shipped
/// kilnd is built without it, and every script would fail for that one reason.
fn can_replay(qemu: &[String], kilnd: &Path) -> Result<()> {
    let out = wrapped_command(qemu, kilnd)
        .args(["conformance", "--help"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            coded(
                Code::NoInput,
                anyhow!("cannot start kilnd `{}`: {e}", kilnd.display()),
            )
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(coded(
        Code::InvalidInput,
        anyhow!(
            "kilnd `{}` cannot replay spec scripts: it was built without the `conformance` feature (shipped builds leave it out); build one with `cargo build -p kiln-runtime --release --features conformance`",
            kilnd.display()
        ),
    ))
}

fn read_expectations(path: &Path) -> Result<Expectations> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow!("invalid expectations `{}`: {}", path.display(), e.message()))
}

fn wast_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(crate::files::with_extension(path, "wast")?);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(anyhow!("`{}` does not exist", path.display()));
        }
    }
    Ok(files)
}

struct Runner<'a> {
    target: &'a ResolvedTarget,
    target_name: String,
    qemu: Vec<String>,
    kilnd: &'a Path,
    key: &'a SecretKey,
    trust: &'a Path,
    work: &'a Path,
    expectations: &'a Expectations,
}

impl Runner<'_> {
    fn run_file(&self, path: &Path) -> FileReport {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut report = FileReport {
            file: file.clone(),
            ..FileReport::default()
        };
        if let Some(reason) = self.expectations.skip_reason(&file, &self.target_name) {
            report.skipped_file = Some(reason.to_string());
            return report;
        }
        let mut outcomes: Vec<(u32, Result<(), String>)> = Vec::new();
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| translate(&file, &text, self.target, self.key))
        {
            Err(why) => outcomes.push((0, Err(format!("cannot read or parse: {why}")))),
            Ok(t) => {
                for h in t.host {
                    match h {
                        HostOutcome::Pass(l) => outcomes.push((l, Ok(()))),
                        HostOutcome::Fail(l, why) => outcomes.push((l, Err(why))),
                        HostOutcome::Skip(..) => report.skipped += 1,
                    }
                }
                outcomes.extend(self.run_device(&file, Script::V1(t.script)));
            }
        }
        for (line, result) in outcomes {
            match result {
                Ok(()) => report.passed += 1,
                Err(_) if self.expectations.known(&file, &self.target_name, line) => {
                    report.known += 1
                }
                Err(why) => report.failed.push((line, why)),
            }
        }
        report.failed.sort();
        report
    }

    /// Runs the script in the target's kilnd; commands it never reported fail with
    /// the reason the device stopped.
    fn run_device(&self, file: &str, script: Script) -> Vec<(u32, Result<(), String>)> {
        let Script::V1(ref v1) = script;
        let lines: Vec<u32> = v1.commands.iter().map(|c| c.line()).collect();
        if lines.is_empty() {
            return Vec::new();
        }
        let path = self.work.join(format!("{file}.script"));
        let written = postcard::to_stdvec(&script)
            .map_err(|e| e.to_string())
            .and_then(|bytes| std::fs::write(&path, bytes).map_err(|e| e.to_string()));
        if let Err(why) = written {
            return lines
                .iter()
                .map(|l| (*l, Err(format!("cannot write script: {why}"))))
                .collect();
        }
        let mut cmd = wrapped_command(&self.qemu, self.kilnd);
        cmd.arg("conformance")
            .arg(&path)
            .arg("--trust")
            .arg(self.trust);
        let output = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                return lines
                    .iter()
                    .map(|l| (*l, Err(format!("cannot start kilnd: {e}"))))
                    .collect()
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut results: Vec<(u32, Result<(), String>)> = stdout
            .lines()
            .filter_map(Outcome::parse)
            .map(|o| match o {
                Outcome::Ok(l) => (l, Ok(())),
                Outcome::Fail(l, why) => (l, Err(why)),
            })
            .collect();
        if results.len() < lines.len() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = format!(
                "kilnd stopped ({}): {}",
                output.status,
                stderr.lines().last().unwrap_or("no message")
            );
            results.extend(
                lines[results.len()..]
                    .iter()
                    .map(|l| (*l, Err(why.clone()))),
            );
        }
        results
    }
}

fn print_table(target: &str, reports: &[FileReport]) {
    println!(
        "{:<40} {:>7} {:>7} {:>7} {:>7}",
        format!("conformance on {target}"),
        "passed",
        "failed",
        "known",
        "skipped"
    );
    for r in reports {
        match &r.skipped_file {
            Some(reason) => println!(
                "{:<40} {:>7} {:>7} {:>7} {:>7}  skipped: {reason}",
                r.file, "-", "-", "-", "all"
            ),
            None => println!(
                "{:<40} {:>7} {:>7} {:>7} {:>7}",
                r.file,
                r.passed,
                r.failed.len(),
                r.known,
                r.skipped
            ),
        }
    }
    for r in reports {
        for (line, why) in r.failed.iter().take(5) {
            println!("FAIL {}:{line}: {why}", r.file);
        }
        if r.failed.len() > 5 {
            println!("FAIL {}: ... and {} more", r.file, r.failed.len() - 5);
        }
    }
    let run: Vec<&FileReport> = reports
        .iter()
        .filter(|r| r.skipped_file.is_none())
        .collect();
    let clean = run
        .iter()
        .filter(|r| r.failed.is_empty() && r.known == 0)
        .count();
    let with_known = run
        .iter()
        .filter(|r| r.failed.is_empty() && r.known > 0)
        .count();
    let sum = |f: fn(&FileReport) -> usize| run.iter().map(|r| f(r)).sum::<usize>();
    let (passed, failed, known) = (sum(|r| r.passed), sum(|r| r.failed.len()), sum(|r| r.known));
    println!(
        "{target}: files {clean}/{} pass, {with_known} more pass except known failures, {} skipped by name; \
         assertions {passed}/{} pass, {failed} unexpected failures, {known} known failures, {} skipped",
        run.len(),
        reports.len() - run.len(),
        passed + failed + known,
        sum(|r| r.skipped),
    );
}

fn report_json(target: &str, reports: &[FileReport]) -> serde_json::Value {
    json!({
        "target": target,
        "files": reports.iter().map(|r| json!({
            "file": r.file,
            "passed": r.passed,
            "failed": r.failed.iter().map(|(l, w)| json!({"line": l, "why": w})).collect::<Vec<_>>(),
            "known": r.known,
            "skipped": r.skipped,
            "skipped_file": r.skipped_file,
        })).collect::<Vec<_>>(),
    })
}

/// Why a failure is expected, from the engine's own message. A command that fails
/// because an earlier module of the file did not compile shares that module's reason.
fn classify(why: &str) -> &'static str {
    const REASONS: [(&[&str], &str); 7] = [
        (
            &["function references", "tables with expression initializers"],
            "function-references proposal: not enabled in wasmer 7.4.2",
        ),
        (
            &["global.get of locally defined global"],
            "extended constant expressions (wasm 3.0): not enabled in wasmer 7.4.2",
        ),
        (
            &["gc feature", "`gc` proposal", "array indexed types"],
            "GC proposal: not implemented by wasmer 7.4.2",
        ),
        (
            &["tail calls"],
            "tail-call proposal: not enabled in wasmer 7.4.2",
        ),
        (
            &["unsupported init expr in element section"],
            "wasmer's translator rejects global.get as an element segment initializer",
        ),
        (
            &["memory64"],
            "memory64 proposal: not enabled in wasmer 7.4.2",
        ),
        (
            &["larger than maximum allowed size"],
            "wasmer caps tables at 2^27 elements (its default tunables)",
        ),
    ];
    REASONS
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| why.contains(n)))
        .map_or("unclassified: see the failure message", |(_, reason)| {
            reason
        })
}

fn known_toml(target: &str, reports: &[FileReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let mut by_reason: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        let mut last = "unclassified: see the failure message";
        for (line, why) in &r.failed {
            if !why.starts_with("no module") {
                last = classify(why);
            }
            by_reason.entry(last).or_default().push(*line);
        }
        for (reason, lines) in by_reason {
            let lines: Vec<String> = lines.iter().map(u32::to_string).collect();
            out.push_str(&format!(
                "\n[[known]]\nfile = {:?}\ntargets = [{target:?}]\nreason = {reason:?}\nlines = [{}]\n",
                r.file,
                lines.join(", ")
            ));
        }
    }
    out
}
