use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_protocol::manifest::parse_memory_size;

use crate::build::args::{read_source, BuildArgs};
use crate::build::release_file::encode_file;
use crate::build::targets::ResolvedTarget;
use crate::exit::{coded, Code};
use crate::fleet::keyfile;
use crate::fleet::release::verify_all;
use crate::text::human_size;
use kiln_protocol::keys::TrustedKeys;

const AFTER_HELP: &str = "\
A release file holds one signed artifact per target. `kiln push` and `kiln rollout` take
it as they take an artifact; each device installs the artifact for its own triple and CPU
features. The key signs each artifact here; publishing needs the broker, not the key's
machine (push verifies the artifacts with the key it signs the desired state with).

Examples:
  kiln release app.wasm --target aarch64-linux --target riscv64-linux --sign fleet.key --version 3 -o app.kilnrel
  kiln push app.kilnrel --group lab --sign fleet.key";

/// Compile one module for several targets into one signed release file
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ReleaseCommand {
    /// WebAssembly module, binary (.wasm) or text (.wat)
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,
    /// Target profile (see `kiln targets`) or raw triple to compile for (repeatable)
    #[arg(long = "target", value_name = "PROFILE|TRIPLE", required = true)]
    pub targets: Vec<String>,
    /// Secret key to sign the artifacts with
    #[arg(long, value_name = "KEY")]
    pub sign: PathBuf,
    #[command(flatten)]
    pub build: BuildArgs,
    /// Default cap on the module's linear memory: pages (64 KiB each) or a size
    #[arg(long, value_name = "PAGES|SIZE", value_parser = parse_memory_size)]
    pub memory_limit: Option<u32>,
    /// Release file to write
    #[arg(short, long, value_name = "OUTPUT")]
    pub output: PathBuf,
}

impl ReleaseCommand {
    pub fn execute(self) -> Result<()> {
        self.build.module_name(&self.input)?;
        let profiles = self.build.profiles()?;
        let targets = self
            .targets
            .iter()
            .map(|t| ResolvedTarget::resolve(t, &[], &profiles).map_err(|e| coded(Code::Usage, e)))
            .collect::<Result<Vec<_>>>()?;
        let key = keyfile::read_secret(&self.sign).map_err(|e| coded(Code::Key, e))?;
        crate::fleet::trust::refuse_root_key_beside(&self.sign, &key)?;
        let source = read_source(&self.input)?;
        let mut artifacts = Vec::new();
        for target in targets {
            let label = target.label();
            let c = self
                .build
                .compile(&self.input, &source, target, self.memory_limit, &key)?;
            eprintln!(
                "compiled {} for {label}: artifact {} in {:.2}s",
                self.input.display(),
                human_size(c.bytes.len() as u64),
                c.compile_time.as_secs_f64()
            );
            artifacts.push((label, c.bytes));
        }
        let built = verify_all(artifacts, &TrustedKeys::new(vec![key.public()]))?;
        let bytes: Vec<Vec<u8>> = built.iter().map(|b| b.bytes.clone()).collect();
        let file = encode_file(&bytes);
        crate::files::write_public(&self.output, &file)
            .with_context(|| format!("cannot write `{}`", self.output.display()))
            .map_err(|e| coded(Code::CannotWrite, e))?;
        let m = &built[0].manifest;
        eprintln!(
            "wrote {} v{} for {} targets -> {} ({}), signed by key {}",
            m.name,
            m.version,
            built.len(),
            self.output.display(),
            human_size(file.len() as u64),
            key.public().id()
        );
        Ok(())
    }
}
