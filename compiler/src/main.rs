use std::process::ExitCode;

use clap::Parser;
use kiln_compiler::cli::Cli;
use kiln_compiler::exit;

fn main() -> ExitCode {
    match Cli::parse().command.execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kiln: error: {}", exit::one_line(&err));
            ExitCode::from(exit::code_of(&err) as u8)
        }
    }
}
