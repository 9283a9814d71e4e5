//! `kiln-dist docs --out DIR`: the man pages (`DIR/man/*.1`, one per command and
//! subcommand) and shell completions (`DIR/completions/`) of `kiln` and `kilnd`,
//! rendered from the same clap definitions the binaries parse, so they cannot drift.
//! `scripts/package.sh` puts kilnd's into the .deb.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

/// Shipping helpers for Kiln's packages
#[derive(Parser)]
#[command(name = "kiln-dist")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write man pages and shell completions for kiln and kilnd
    Docs {
        /// Directory to write `man/` and `completions/` into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let Command::Docs { out } = Cli::parse().command;
    for cmd in [
        kiln_compiler::cli::Cli::command(),
        kiln_protocol::kilnd_cli::Cli::command(),
    ] {
        write_docs(cmd, &out)?;
    }
    Ok(())
}

/// Renders one program's pages and completions under `out`.
fn write_docs(mut cmd: clap::Command, out: &Path) -> Result<()> {
    cmd.build();
    let name = cmd.get_name().to_string();
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    write_man(&cmd, &name, &man)?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
        write(&completions.join(file), &script)?;
    }
    Ok(())
}

/// `NAME.1`, then `NAME-SUB.1` for each visible subcommand.
fn write_man(cmd: &clap::Command, page: &str, dir: &Path) -> Result<()> {
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(page.to_string()))
        .render(&mut text)
        .with_context(|| format!("cannot render the man page of `{page}`"))?;
    write(&dir.join(format!("{page}.1")), &text)?;
    for sub in documented(cmd) {
        write_man(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

/// The subcommands a user is told about: not the hidden ones (kilnd's `worker`), and
/// not clap's own `help`.
fn documented(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_a_page_and_every_shell_a_script() {
        let dir = tempfile::tempdir().unwrap();
        for cmd in [
            kiln_compiler::cli::Cli::command(),
            kiln_protocol::kilnd_cli::Cli::command(),
        ] {
            write_docs(cmd, dir.path()).unwrap();
        }
        let page = std::fs::read_to_string(dir.path().join("man/kilnd-check.1")).unwrap();
        assert!(page.contains("kilnd\\-check"), "{page}");
        assert!(page.contains("Examples:"), "the example is missing: {page}");
        assert!(dir.path().join("man/kiln-compile.1").is_file());
        assert!(
            !dir.path().join("man/kilnd-worker.1").exists(),
            "hidden commands stay hidden"
        );
        let bash = std::fs::read_to_string(dir.path().join("completions/kilnd.bash")).unwrap();
        assert!(
            bash.contains("serve") && bash.contains("--config"),
            "{bash}"
        );
        for f in ["_kiln", "kiln.fish", "_kilnd", "kilnd.fish", "kiln.bash"] {
            assert!(dir.path().join("completions").join(f).is_file(), "{f}");
        }
    }

    /// What a user sees after the options of every visible (sub)command: examples
    /// last, every line after `Examples:` an indented command line.
    #[test]
    fn every_help_ends_with_examples() {
        fn walk(cmd: &clap::Command, path: &str) {
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let (_, examples) = help
                .rsplit_once("Examples:\n")
                .unwrap_or_else(|| panic!("`{path} --help` has no examples"));
            assert!(
                examples.lines().all(|l| l.starts_with("  ")),
                "`{path} --help` does not end with its examples:\n{examples}"
            );
            for sub in documented(cmd) {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        for mut cmd in [
            kiln_compiler::cli::Cli::command(),
            kiln_protocol::kilnd_cli::Cli::command(),
        ] {
            cmd.build();
            cmd.clone().debug_assert();
            walk(&cmd, cmd.get_name());
        }
    }
}
