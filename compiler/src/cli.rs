//! `kiln`'s command line: one subcommand a file in [`crate::commands`]. `main` runs
//! it; `kiln-dist` renders its man pages and shell completions from it.

use clap::{Parser, Subcommand};

use crate::commands::{
    acl::AclCommand, compile::CompileCommand, completions::CompletionsCommand,
    conformance::ConformanceCommand, dashboard::DashboardCommand,
    decommission::DecommissionCommand, devices::DevicesCommand, enroll::EnrollCommand,
    gc::GcCommand, inspect::InspectCommand, keygen::KeygenCommand, provision::ProvisionCommand,
    push::PushCommand, refresh::RefreshCommand, release::ReleaseCommand, remove::RemoveCommand,
    rollout::RolloutCommand, root::RootCommand, send::SendCommand, sign::SignCommand,
    tag::TagCommand, targets::TargetsCommand, watch::WatchCommand,
};

const AFTER_HELP: &str = "\
Results go to stdout, progress and diagnostics to stderr; NO_COLOR turns colour off.

Examples:
  kiln keygen -o fleet.key
  kiln compile app.wasm --target aarch64-linux --sign fleet.key -o app.kiln
  kiln inspect app.kiln --trust fleet.pub
  kiln push app.kiln --device dev-01 --sign fleet.key --broker mqtt://broker.lan:1883
  kiln push app.wasm --group lab --version 2 --sign fleet.key     # compiled for the group's targets
  kiln rollout app.kiln --group lab --sign fleet.key --waves 1,10,100
  kiln tag dev-01 dev-02 --add canary --sign fleet.key
  kiln rollout app.kiln --group lab --sign fleet.key --where tag=canary
  kiln provision --out out --device pi-01 --broker mqtts://broker.lan:8883 --root fleet.root --ca ca.pem --password
  kiln enroll --group lab --sign fleet.key
  kiln remove app --device dev-01 --sign fleet.key
  kiln decommission dev-07 --sign fleet.key
  kiln root rotate --root fleet.root --sign fleet-root.key --release-key new.pub
  kiln devices
  kiln watch --device dev-01
  kiln dashboard                  # the fleet live at http://127.0.0.1:8080/
  kiln gc
  kiln targets";

/// Kiln: compile WebAssembly into signed native artifacts for edge devices
#[derive(Parser, Debug)]
#[command(name = "kiln", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size of the largest command's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    Keygen(KeygenCommand),
    Compile(CompileCommand),
    Inspect(InspectCommand),
    Targets(TargetsCommand),
    Conformance(ConformanceCommand),
    Release(ReleaseCommand),
    Push(PushCommand),
    Remove(RemoveCommand),
    Devices(DevicesCommand),
    Watch(WatchCommand),
    Dashboard(DashboardCommand),
    Rollout(RolloutCommand),
    Tag(TagCommand),
    Send(SendCommand),
    Root(RootCommand),
    Sign(SignCommand),
    Enroll(EnrollCommand),
    Decommission(DecommissionCommand),
    Refresh(RefreshCommand),
    Gc(GcCommand),
    Acl(AclCommand),
    Provision(ProvisionCommand),
    Completions(CompletionsCommand),
}

impl Command {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Keygen(c) => c.execute(),
            Command::Compile(c) => c.execute(),
            Command::Inspect(c) => c.execute(),
            Command::Targets(c) => c.execute(),
            Command::Conformance(c) => c.execute(),
            Command::Release(c) => c.execute(),
            Command::Push(c) => c.execute(),
            Command::Remove(c) => c.execute(),
            Command::Devices(c) => c.execute(),
            Command::Watch(c) => c.execute(),
            Command::Dashboard(c) => c.execute(),
            Command::Rollout(c) => c.execute(),
            Command::Tag(c) => c.execute(),
            Command::Send(c) => c.execute(),
            Command::Root(c) => c.execute(),
            Command::Sign(c) => c.execute(),
            Command::Enroll(c) => c.execute(),
            Command::Decommission(c) => c.execute(),
            Command::Refresh(c) => c.execute(),
            Command::Gc(c) => c.execute(),
            Command::Acl(c) => c.execute(),
            Command::Provision(c) => c.execute(),
            Command::Completions(c) => c.execute(),
        }
    }
}
