use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

use crate::build::targets;

const AFTER_HELP: &str = "\
Examples:
  kiln targets
  kiln targets --targets-dir ./my-boards";

/// List the target profiles `kiln compile --target` accepts
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct TargetsCommand {
    /// Read profiles from this folder of TOML files instead of the built-in ones
    #[arg(long, value_name = "DIR", env = "KILN_TARGETS_DIR")]
    pub targets_dir: Option<PathBuf>,
}

impl TargetsCommand {
    pub fn execute(self) -> Result<()> {
        let profiles = targets::load(self.targets_dir.as_deref())?;
        let width = profiles.iter().map(|p| p.name.len()).max().unwrap_or(0);
        let twidth = profiles.iter().map(|p| p.triple.len()).max().unwrap_or(0);
        for p in profiles {
            let features = if p.cpu_features.is_empty() {
                "-".to_string()
            } else {
                p.cpu_features.join(",")
            };
            println!(
                "{:width$}  {:twidth$}  {}  [{}]",
                p.name, p.triple, p.description, features
            );
        }
        Ok(())
    }
}
