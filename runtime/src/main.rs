use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[cfg(feature = "conformance")]
use kiln_protocol::script::Script;
use kiln_protocol::worker::Reply;
use kiln_runtime::exit::{Code, Failure};
#[cfg(feature = "conformance")]
use kiln_runtime::sandbox::conformance;
use kiln_runtime::sandbox::guest::{self, GuestOptions};
use kiln_runtime::sandbox::limits;
use kiln_runtime::sandbox::load::{load_artifact, read_trusted_keys};
use kiln_runtime::sandbox::wasi::{DirMapping, WasiOptions};

const AFTER_HELP: &str = "\
Examples:
  kilnd run app.kiln --trust fleet.pub
  kilnd run app.kiln --trust fleet.pub --dir ./data:/data --env MODE=prod -- --verbose input.txt
  kilnd serve --config /etc/kiln/kilnd.toml";

/// kilnd: headless runtime for signed kiln artifacts
#[derive(Parser)]
#[command(name = "kilnd", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(RunCommand),
    Serve(ServeCommand),
    /// Test builds only (feature `conformance`)
    #[cfg(feature = "conformance")]
    Conformance(ConformanceCommand),
    /// Internal: one module's worker process, started by `kilnd serve`
    #[command(hide = true)]
    Worker,
}

/// Supervise the modules of a config, each in its own worker process under its
/// limits; reports starts, stops (with the reason), logs and telemetry as JSON lines
/// on stdout
#[derive(Parser)]
#[command(after_help = SERVE_HELP)]
struct ServeCommand {
    /// Daemon config (kilnd.toml)
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

const SERVE_HELP: &str = "\
Example kilnd.toml:
  trust = [\"fleet.pub\"]

  [[module]]
  artifact = \"sensor-filter.kiln\"
  tick_ms = 1000
  config = \"alpha=0.3\"
  memory_limit = \"4MiB\"
  fuel_per_call = 5000000
  timeout_ms = 1000
  restart = { backoff_ms = 500, backoff_max_ms = 30000, max_crashes = 5, window_s = 300 }";

#[cfg(feature = "conformance")]
/// Replay a spec-test script compiled by `kiln conformance`; prints `ok LINE` or
/// `fail LINE WHY` per command, exits 0 when all passed and 1 otherwise
#[derive(Parser)]
struct ConformanceCommand {
    /// Script written by `kiln conformance --emit-dir`
    #[arg(value_name = "SCRIPT")]
    script: PathBuf,
    /// Public key the script's artifacts must be signed with (repeatable)
    #[arg(long, value_name = "KEY.pub", required = true)]
    trust: Vec<PathBuf>,
}

#[cfg(feature = "conformance")]
impl ConformanceCommand {
    fn execute(self) -> Result<i32, Failure> {
        let trust = read_trusted_keys(&self.trust)?;
        let file = self.script.display();
        let bytes = std::fs::read(&self.script).map_err(|e| {
            Failure::new(Code::NoInput, format!("cannot read script `{file}`: {e}"))
        })?;
        let Script::V1(script) = postcard::from_bytes::<Script>(&bytes).map_err(|e| {
            Failure::new(
                Code::NotArtifact,
                format!("script `{file}` does not decode: {e}"),
            )
        })?;
        let mut stdout = std::io::stdout().lock();
        let tally = conformance::replay(&script, &trust, &mut stdout)
            .map_err(|e| Failure::new(Code::Internal, format!("cannot write results: {e}")))?;
        Ok(i32::from(tally.failed > 0))
    }
}

/// Verify an artifact and run its WASI `_start`; exits with the module's exit code
#[derive(Parser)]
#[command(after_help = AFTER_HELP)]
struct RunCommand {
    /// Artifact built by `kiln compile`
    #[arg(value_name = "ARTIFACT")]
    artifact: PathBuf,
    /// Public key whose signatures are accepted (repeatable, at least one)
    #[arg(long, value_name = "KEY.pub", required = true)]
    trust: Vec<PathBuf>,
    /// Make a host directory visible to the module: HOST[:GUEST] (repeatable)
    #[arg(long, value_name = "HOST[:GUEST]")]
    dir: Vec<DirMapping>,
    /// Environment variable for the module: KEY=VALUE (repeatable); nothing else is passed
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Print where the time went (read, verify, deserialize, instantiate, run) on stderr
    #[arg(long)]
    timings: bool,
    /// Arguments for the module (after `--`)
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

impl RunCommand {
    fn execute(self) -> Result<i32, Failure> {
        let trust = read_trusted_keys(&self.trust)?;
        let loaded = load_artifact(&self.artifact, &trust, None, |m| {
            limits::engine(
                m.settings
                    .memory_limit_pages
                    .unwrap_or(limits::DEFAULT_MEMORY_PAGES),
            )
        })?;
        let name = loaded.manifest.name.clone();
        if !loaded.manifest.is_command() {
            return Err(Failure::new(
                Code::LoadFailed,
                format!(
                    "artifact `{}`: module `{name}` has no `_start`, so it is not a WASI command; reactor modules run under `kilnd serve`",
                    self.artifact.display()
                ),
            ));
        }
        let fuel = loaded.manifest.settings.metering;
        let opts = GuestOptions {
            wasi: WasiOptions {
                args: self.args,
                env: self.env,
                dirs: self.dir,
            },
            config: Vec::new(),
            fuel,
            emit: std::sync::Arc::new(move |reply| print_record(&name, reply)),
            capture_stdio: false,
        };
        guest::run_command(loaded, opts, self.timings)
    }
}

/// `kilnd run` shows what a module sends through the kiln ABI on stderr.
fn print_record(module: &str, reply: Reply) {
    match reply {
        Reply::Telemetry { stream, data } => {
            eprintln!(
                "{module}: telemetry {stream}: {}",
                String::from_utf8_lossy(&data)
            )
        }
        Reply::Log { level, line, .. } => eprintln!("{module}: {}: {line}", level.as_str()),
        _ => {}
    }
}

/// `KILN_LOG=debug|info|warn|error` turns on kilnd's own log on stderr; `kilnd run`
/// is silent by default so the module's output is all the user sees.
fn init_logging(serving: bool) {
    let level = match std::env::var("KILN_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("info") => tracing::Level::INFO,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ if serving => tracing::Level::INFO,
        _ => return,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let serving = std::env::args()
        .nth(1)
        .is_some_and(|a| a == "serve" || a == "worker");
    init_logging(serving);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(run) => run.execute(),
        Command::Serve(s) => kiln_runtime::daemon::serve::serve(&s.config),
        #[cfg(feature = "conformance")]
        Command::Conformance(c) => c.execute(),
        Command::Worker => Ok(kiln_runtime::sandbox::worker::serve()),
    };
    match result {
        // WASI exit codes are 0..=255 on POSIX; anything larger wraps like a shell would.
        Ok(code) => ExitCode::from(code as u8),
        Err(failure) => {
            eprintln!("kilnd: error: {failure}");
            ExitCode::from(failure.code as u8)
        }
    }
}
