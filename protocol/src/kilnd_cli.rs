//! kilnd's command line. kilnd parses it; `kiln-dist` renders its man pages and shell
//! completions from the same definitions without linking the daemon.
//!
//! ```
//! use clap::Parser;
//! use kiln_protocol::kilnd_cli::{Cli, Command};
//!
//! let cli = Cli::try_parse_from(["kilnd", "check"]).unwrap();
//! let Command::Check(check) = cli.command else { unreachable!() };
//! assert_eq!(check.config.config, std::path::Path::new("/etc/kiln/kilnd.toml"));
//! ```

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dirs::DirMapping;

/// Where the packaged kilnd keeps its config, and where `serve` and `check` look
/// without `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/kiln/kilnd.toml";

/// The text after `kilnd --help`.
pub const AFTER_HELP: &str = "\
Environment:
  KILN_LOG=debug|info|warn|error   kilnd's own log on stderr (serve: info by default)
  KILND_CONFIG=FILE                the config of serve and check
  KILND_ZYGOTE=0                   serve executes each worker instead of forking it
                                   from its zygote
  NO_COLOR                         plain log lines even on a terminal
  NOTIFY_SOCKET, WATCHDOG_USEC     set by systemd: serve reports READY and pings the
                                   watchdog from its supervisor loop

Examples:
  kilnd run app.kiln --trust fleet.pub
  kilnd check
  kilnd serve --config /etc/kiln/kilnd.toml
  kilnd provision --from /boot/firmware/kiln";

/// The line under `kilnd --help`'s usage.
pub const ABOUT: &str = "kilnd: headless runtime for signed kiln artifacts";

/// kilnd's shipped subcommands.
#[derive(Parser, Debug)]
#[command(name = "kilnd", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Run(RunArgs),
    Serve(ServeArgs),
    Check(CheckArgs),
    Provision(ProvisionArgs),
    /// Internal: one module's worker process, started by `kilnd serve`
    #[command(hide = true)]
    Worker,
    /// Internal: the process that forks workers for `kilnd serve`
    #[command(hide = true)]
    Zygote,
}

const RUN_HELP: &str = "\
Examples:
  kilnd run app.kiln --trust fleet.pub
  kilnd run app.kiln --trust /etc/kiln/trust --dir ./data:/data --env MODE=prod -- --verbose input.txt
  kilnd run app.kiln --trust fleet.pub --timings
  kilnd run tool.kiln --trust fleet.pub --dir ./rootfs:/ -- /input.txt   # ./rootfs is the module's whole file system";

/// Verify an artifact and run its WASI `_start`; exits with the module's exit code
#[derive(Args, Debug)]
#[command(after_help = RUN_HELP)]
pub struct RunArgs {
    /// Artifact built by `kiln compile`
    #[arg(value_name = "ARTIFACT")]
    pub artifact: PathBuf,
    /// Public key whose signatures are accepted, or a directory of `*.pub` keys
    /// (repeatable, at least one)
    #[arg(long, value_name = "KEY.pub|DIR", required = true)]
    pub trust: Vec<PathBuf>,
    /// Make a host directory visible to the module: HOST[:GUEST] (repeatable); GUEST
    /// `/` makes HOST the module's whole file system
    #[arg(long, value_name = "HOST[:GUEST]")]
    pub dir: Vec<DirMapping>,
    /// Environment variable for the module: KEY=VALUE (repeatable); nothing else is passed
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Print where the time went (read, verify, deserialize, instantiate, run) on stderr
    #[arg(long)]
    pub timings: bool,
    /// Arguments for the module (after `--`)
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The daemon config `serve` and `check` read.
#[derive(Args, Debug)]
pub struct ConfigArg {
    /// Daemon config (kilnd.toml)
    #[arg(long, value_name = "FILE", env = "KILND_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

const SERVE_HELP: &str = "\
A kilnd.toml (paths are relative to it; unknown keys are errors):
  trust = [\"fleet.pub\"]                          # or a directory of *.pub keys

  [[module]]
  artifact = \"sensor-filter.kiln\"
  tick_ms = 1000
  config = \"alpha=0.3\"
  memory_limit = \"4MiB\"
  fuel_per_call = 5000000
  timeout_ms = 1000
  restart = { backoff_ms = 500, backoff_max_ms = 30000, max_crashes = 5, window_s = 300 }

  [mqtt]                                        # follow desired state from a broker
  broker = \"mqtts://broker.lan:8883\"
  ca = \"ca.pem\"

Examples:
  kilnd serve                                   # /etc/kiln/kilnd.toml
  kilnd serve --config ./kilnd.toml";

/// Supervise the modules of a config, each in its own worker process under its
/// limits, and follow the fleet's desired state when the config names a broker;
/// reports starts, stops (with the reason), logs and telemetry as JSON lines on stdout
#[derive(Args, Debug)]
#[command(after_help = SERVE_HELP)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

const CHECK_HELP: &str = "\
Exits 0 when kilnd serve would start with this config: it parses, its limits are in
range, its trusted keys read, every artifact it names verifies against them and can run
on this device, and the data dir is writable. Nothing is run or written.

Examples:
  kilnd check                                   # /etc/kiln/kilnd.toml
  kilnd check --config ./kilnd.toml && systemctl restart kilnd";

/// Validate a config and verify the artifacts it names, without running them
#[derive(Args, Debug)]
#[command(after_help = CHECK_HELP)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

const PROVISION_HELP: &str = "\
Takes a bundle that `kiln provision` wrote for this device (its DIR/NAME/kiln folder,
copied to the boot partition as /boot/firmware/kiln) and installs it into the config
directory. Everything is checked before anything is written: the bundle's kilnd.toml
loads as `kilnd check` loads it, every file it names is in the bundle, the trust
directory holds a root document or a public key that reads, and no file is over
1 MiB. Then each file is written atomically (temp file, fsync, rename, fsync of the
directory): kilnd.toml and keys 0640 root:kiln (0600 root when there is no group
kiln), trust/ 0755 with 0644 files, certificates 0644. A file it replaces that
differs is kept beside it as NAME.pre-provision (NAME.pre-provision.1, ...), and so is
any key or root in trust/ the bundle does not hold. Last, the bundle is deleted, so
the boot medium no longer carries the device's credentials.

Without a bundle at --from it says so and exits 0: kilnd-provision.service runs it at
every boot where /boot/firmware/kiln/kilnd.toml exists, before kilnd.service.

Examples:
  kilnd provision --from /boot/firmware/kiln
  kilnd provision --from ./out/pi-01/kiln --etc /mnt/rootfs/etc/kiln   # an image's root";

/// Install a provisioning bundle from `kiln provision` into /etc/kiln (at first boot),
/// then delete the bundle
#[derive(Args, Debug)]
#[command(after_help = PROVISION_HELP)]
pub struct ProvisionArgs {
    /// The bundle: a folder holding kilnd.toml and trust/
    #[arg(long, value_name = "DIR", default_value = crate::provision::BOOT_BUNDLE)]
    pub from: PathBuf,
    /// The config directory to install into; the group `kiln` is looked up in the
    /// `group` file beside it (/etc/group for /etc/kiln)
    #[arg(long, value_name = "DIR", default_value = crate::provision::ETC)]
    pub etc: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_the_module_arguments_after_the_double_dash() {
        let cli = Cli::try_parse_from([
            "kilnd", "run", "a.kiln", "--trust", "k.pub", "--env", "A=1", "--", "--x", "y",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.args, ["--x", "y"]);
        assert_eq!(run.env, [("A".to_string(), "1".to_string())]);
        assert!(Cli::try_parse_from(["kilnd", "run", "a.kiln", "--env", "=1"]).is_err());
    }
}
