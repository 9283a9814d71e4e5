//! How a module is compiled, whatever the target: the flags `compile`, `release` and a
//! `push` or `rollout` of a .wasm share, and the compile with its progress meter.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use kiln_protocol::keys::SecretKey;
use kiln_protocol::manifest::CompileSettings;
use kiln_protocol::names::{self, Kind};
use kiln_protocol::target::TargetProfile;

use crate::build::aot::{self, AotError, CompileOptions};
use crate::build::targets::{self, ResolvedTarget};
use crate::build::Error;
use crate::names::valid_name;

/// How a module is compiled, whatever the target: what `compile`, `release` and a
/// `push` of a .wasm share.
#[derive(Args, Debug, Clone, Default)]
pub struct BuildArgs {
    /// Module name recorded in the manifest [default: input file stem]
    #[arg(long)]
    pub name: Option<String>,

    /// Module version (monotonic; devices refuse to roll back to a lower one) [default: 1]
    #[arg(long)]
    pub version: Option<u64>,

    /// Compile in wasmer metering with this many fuel points per call (one per
    /// operator); running out is a clean trap the device reports
    #[arg(long, value_name = "POINTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub fuel: Option<u64>,

    /// Check every memory access in code instead of reserving 8 GiB of address space
    /// per instance: instances start faster (much faster under qemu-user 7.x), and
    /// memory-heavy code runs somewhat slower
    #[arg(long)]
    pub bounds_checks: bool,

    /// Read target profiles from this folder instead of the built-in ones
    #[arg(long, value_name = "DIR", env = "KILN_TARGETS_DIR")]
    pub targets_dir: Option<PathBuf>,
}

impl BuildArgs {
    /// `--name`, or the input's file stem; checked before any work is done, since it
    /// becomes a topic level and a file name on every device.
    pub fn module_name(&self, input: &Path) -> Result<String> {
        if let Some(name) = &self.name {
            valid_name(Kind::Module, name)?;
            return Ok(name.clone());
        }
        let stem = input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "cannot derive a module name from `{}`; pass --name",
                    input.display()
                ))
            })?;
        names::check(Kind::Module, &stem)
            .map_err(|e| Error::Usage(format!("input `{}`: {e}; pass --name", input.display())))?;
        Ok(stem)
    }

    pub fn profiles(&self) -> Result<Vec<TargetProfile>> {
        Ok(targets::load(self.targets_dir.as_deref()).map_err(Error::invalid)?)
    }

    /// Compiles `source` (read from `input`) for `target`, with a progress meter.
    pub fn compile(
        &self,
        input: &Path,
        source: &[u8],
        target: ResolvedTarget,
        memory_limit: Option<u32>,
        key: &SecretKey,
    ) -> Result<aot::Compiled> {
        let opts = CompileOptions {
            target,
            name: self.module_name(input)?,
            version: self.version.unwrap_or(1),
            created_at: source_date_epoch()?,
            settings: CompileSettings {
                metering: self.fuel,
                memory_limit_pages: memory_limit,
            },
            bounds_checks: self.bounds_checks,
        };
        let meter = Arc::new(Meter::new(format!(
            "compiling {} for {}",
            input.display(),
            opts.target.label()
        )));
        let report = meter.clone();
        let progress: aot::Progress = Arc::new(move |done, total| report.show(done, total));
        let compiled = aot::compile_with_progress(source, &opts, key, Some(progress));
        meter.finish();
        compiled.map_err(|e| {
            let invalid = matches!(e, AotError::Parse(_) | AotError::Compile(_));
            let e = anyhow!(e).context(format!("cannot compile `{}`", input.display()));
            if invalid {
                Error::invalid(e).into()
            } else {
                Error::failed(e).into()
            }
        })
    }
}

/// Reads a module to compile.
pub fn read_source(input: &Path) -> Result<Vec<u8>> {
    fs::read(input)
        .with_context(|| format!("cannot read `{}`", input.display()))
        .map_err(|e| Error::unreadable(e).into())
}

/// Shows how far a long compile is on stderr: nothing for the first second, then a
/// line that updates in place on a terminal, or a line every 5 s in a log.
struct Meter {
    label: String,
    started: Instant,
    tty: bool,
    /// When a line was last shown, and how wide it was.
    last: Mutex<Option<(Instant, usize)>>,
}

impl Meter {
    fn new(label: String) -> Self {
        Self {
            label,
            started: Instant::now(),
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last: Mutex::new(None),
        }
    }

    fn show(&self, done: u64, total: u64) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.started);
        if elapsed < Duration::from_secs(1) {
            return;
        }
        let every = Duration::from_millis(if self.tty { 100 } else { 5000 });
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|(at, _)| now.duration_since(at) < every) {
            return;
        }
        let percent = done.min(total) * 100 / total.max(1);
        let line = format!(
            "{}: {percent}% after {:.0}s",
            self.label,
            elapsed.as_secs_f64()
        );
        if self.tty {
            let width = last.map_or(0, |(_, w)| w);
            eprint!("\r{line:width$}");
        } else {
            eprintln!("{line}");
        }
        *last = Some((now, line.len()));
    }

    /// Clears the live line, so the summary starts on a clean one.
    fn finish(&self) {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let (true, Some((_, width))) = (self.tty, *last) {
            eprint!("\r{:width$}\r", "");
        }
    }
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            Error::Usage(format!(
                "SOURCE_DATE_EPOCH `{v}` is not a number of seconds"
            ))
            .into()
        }),
        Err(_) => Ok(None),
    }
}
