use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_compiler::commands::{
    compile::CompileCommand, conformance::ConformanceCommand, devices::DevicesCommand,
    gc::GcCommand, inspect::InspectCommand, keygen::KeygenCommand, push::PushCommand,
    rollout::RolloutCommand, targets::TargetsCommand, watch::WatchCommand,
};
use kiln_compiler::exit;

const AFTER_HELP: &str = "\
Examples:
  kiln keygen -o fleet.key
  kiln compile app.wasm --target aarch64-linux --sign fleet.key -o app.kiln
  kiln inspect app.kiln --trust fleet.pub
  kiln push app.kiln --device dev-01 --sign fleet.key --broker mqtt://broker.lan:1883
  kiln rollout app.kiln --group lab --sign fleet.key --canary 1
  kiln devices
  kiln watch --device dev-01
  kiln gc
  kiln targets";

/// Kiln: compile WebAssembly into signed native artifacts for edge devices
#[derive(Parser)]
#[command(name = "kiln", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Keygen(KeygenCommand),
    Compile(CompileCommand),
    Inspect(InspectCommand),
    Targets(TargetsCommand),
    Conformance(ConformanceCommand),
    Push(PushCommand),
    Devices(DevicesCommand),
    Watch(WatchCommand),
    Rollout(RolloutCommand),
    Gc(GcCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(c) => c.execute(),
        Command::Compile(c) => c.execute(),
        Command::Inspect(c) => c.execute(),
        Command::Targets(c) => c.execute(),
        Command::Conformance(c) => c.execute(),
        Command::Push(c) => c.execute(),
        Command::Devices(c) => c.execute(),
        Command::Watch(c) => c.execute(),
        Command::Rollout(c) => c.execute(),
        Command::Gc(c) => c.execute(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kiln: error: {}", exit::one_line(&err));
            ExitCode::from(exit::code_of(&err) as u8)
        }
    }
}
