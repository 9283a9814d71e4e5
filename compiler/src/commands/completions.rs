use std::io::Write;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::exit::{coded, Code};

const AFTER_HELP: &str = "\
Examples:
  kiln completions bash > ~/.local/share/bash-completion/completions/kiln
  kiln completions zsh > ~/.zfunc/_kiln
  kiln completions fish > ~/.config/fish/completions/kiln.fish";

/// Print a shell completion script for kiln on stdout
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct CompletionsCommand {
    /// bash, zsh, fish, elvish or powershell
    #[arg(value_name = "SHELL")]
    pub shell: Shell,
}

impl CompletionsCommand {
    pub fn execute(self) -> Result<()> {
        let mut script = Vec::new();
        clap_complete::generate(self.shell, &mut Cli::command(), "kiln", &mut script);
        std::io::stdout()
            .write_all(&script)
            .context("cannot write to stdout")
            .map_err(|e| coded(Code::CannotWrite, e))
    }
}
