use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_protocol::manifest::parse_memory_size;

use crate::build::args::{read_source, BuildArgs};
use crate::build::targets::ResolvedTarget;
use crate::exit::{coded, Code};
use crate::fleet::keyfile;
use crate::text::human_size;

const AFTER_HELP: &str = "\
The same input with the same options gives a byte-identical artifact; set SOURCE_DATE_EPOCH
to record a creation time. Cranelift compiles the functions on every core; a compile that
takes over a second shows its progress on stderr.

Examples:
  kiln compile app.wasm --target aarch64-linux --sign fleet.key -o app.kiln
  kiln compile filter.wat --target riscv64-linux --sign fleet.key -o filter.kiln --name filter --version 7
  kiln compile app.wasm --target x86_64-unknown-linux-gnu --cpu-feature avx2 --sign fleet.key -o app.kiln
  kiln compile sensor.wasm --target aarch64-linux --sign fleet.key -o sensor.kiln --fuel 5000000 --memory-limit 4MiB";

/// Compile a .wasm or .wat module into a signed native artifact for a device
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct CompileCommand {
    /// WebAssembly module, binary (.wasm) or text (.wat)
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,

    /// Target profile (see `kiln targets`) or a raw target triple
    #[arg(long, value_name = "PROFILE|TRIPLE")]
    pub target: String,

    /// Extra CPU feature the device is known to have (repeatable), e.g. avx2
    #[arg(long = "cpu-feature", value_name = "FEATURE")]
    pub cpu_features: Vec<String>,

    /// Secret key to sign the artifact with (from `kiln keygen`)
    #[arg(long, value_name = "KEY")]
    pub sign: PathBuf,

    #[command(flatten)]
    pub build: BuildArgs,

    /// Default cap on the module's linear memory: pages (64 KiB each) or a size such
    /// as 16MiB; a deployment may set its own
    #[arg(long, value_name = "PAGES|SIZE", value_parser = parse_memory_size)]
    pub memory_limit: Option<u32>,

    /// Artifact to write
    #[arg(short, long, value_name = "OUTPUT")]
    pub output: PathBuf,
}

impl CompileCommand {
    pub fn execute(self) -> Result<()> {
        self.build.module_name(&self.input)?;
        let profiles = self.build.profiles()?;
        let target = ResolvedTarget::resolve(&self.target, &self.cpu_features, &profiles)
            .map_err(|e| coded(Code::Usage, e))?;
        let key = keyfile::read_secret(&self.sign).map_err(|e| coded(Code::Key, e))?;
        crate::fleet::trust::refuse_root_key_beside(&self.sign, &key)?;
        let source = read_source(&self.input)?;
        let label = target.label();
        let features = target.feature_names();
        let compiled = self
            .build
            .compile(&self.input, &source, target, self.memory_limit, &key)?;
        let len = compiled.bytes.len() as u64;
        if len > kiln_protocol::files::MAX_LOCAL_ARTIFACT {
            return Err(coded(
                Code::InvalidInput,
                anyhow::anyhow!(
                    "{}: the artifact would be {}, more than the {} kilnd reads; not written",
                    self.input.display(),
                    human_size(len),
                    human_size(kiln_protocol::files::MAX_LOCAL_ARTIFACT)
                ),
            ));
        }
        crate::files::write_public(&self.output, &compiled.bytes)
            .with_context(|| format!("cannot write `{}`", self.output.display()))
            .map_err(|e| coded(Code::CannotWrite, e))?;
        let seconds = compiled.compile_time.as_secs_f64();
        eprintln!(
            "compiled {} -> {} for {label}{}: wasm {} -> artifact {} in {:.2}s ({} of wasm on {} threads), signed by key {}",
            self.input.display(),
            self.output.display(),
            if features.is_empty() {
                String::new()
            } else {
                format!(" [{}]", features.join(","))
            },
            human_size(compiled.manifest.source.len),
            human_size(compiled.bytes.len() as u64),
            seconds,
            rate(compiled.manifest.source.len, seconds),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            key.public().id(),
        );
        if len > kiln_protocol::transfer::MAX_ARTIFACT {
            eprintln!(
                "kiln: warning: {} is {}: kilnd runs it from a file (up to {}), but a push or \
                 rollout carries at most {} an artifact",
                self.output.display(),
                human_size(len),
                human_size(kiln_protocol::files::MAX_LOCAL_ARTIFACT),
                human_size(kiln_protocol::transfer::MAX_ARTIFACT),
            );
        }
        Ok(())
    }
}

/// Bytes per second, as MB/s (or KB/s for the tiny modules of tests).
fn rate(bytes: u64, seconds: f64) -> String {
    let per_s = bytes as f64 / seconds.max(1e-6);
    if per_s >= 1e6 {
        format!("{:.1} MB/s", per_s / 1e6)
    } else {
        format!("{:.0} KB/s", per_s / 1e3)
    }
}
