#[cfg(feature = "conformance")]
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_protocol::kilnd_cli::{self, RunArgs};
#[cfg(feature = "conformance")]
use kiln_protocol::script::Script;
use kiln_protocol::worker::Reply;
use kiln_runtime::exit::{Code, Failure};
#[cfg(feature = "conformance")]
use kiln_runtime::sandbox::conformance;
use kiln_runtime::sandbox::guest::{self, GuestOptions};
use kiln_runtime::sandbox::limits;
use kiln_runtime::sandbox::load::{load_artifact, read_trusted_keys};
use kiln_runtime::sandbox::wasi::WasiOptions;

/// kilnd's shipped command line (`kiln_protocol::kilnd_cli`), and in test builds the
/// spec-suite replayer.
#[derive(Parser)]
#[command(name = "kilnd", version, about = kilnd_cli::ABOUT, after_help = kilnd_cli::AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Shipped(kilnd_cli::Command),
    /// Test builds only (feature `conformance`)
    #[cfg(feature = "conformance")]
    Conformance(ConformanceCommand),
}

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

/// `kilnd run`: verify an artifact and run its WASI `_start`.
fn run(run: RunArgs) -> Result<i32, Failure> {
    let trust = read_trusted_keys(&run.trust)?;
    let loaded = load_artifact(&run.artifact, &trust, None, |m| {
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
                run.artifact.display()
            ),
        ));
    }
    let fuel = loaded.manifest.settings.metering;
    let opts = GuestOptions {
        wasi: WasiOptions {
            args: run.args,
            env: run.env,
            dirs: run.dir,
        },
        config: Vec::new(),
        fuel,
        emit: std::sync::Arc::new(move |reply| print_record(&name, reply)),
        capture_stdio: false,
        devices: Default::default(),
    };
    guest::run_command(loaded, opts, run.timings)
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

fn main() -> ExitCode {
    let serving = std::env::args()
        .nth(1)
        .is_some_and(|a| a == "serve" || a == "worker" || a == "zygote");
    kiln_runtime::log::init(serving);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Shipped(kilnd_cli::Command::Run(args)) => run(args),
        Command::Shipped(kilnd_cli::Command::Serve(s)) => {
            kiln_runtime::daemon::serve::serve(&s.config.config)
        }
        Command::Shipped(kilnd_cli::Command::Check(c)) => {
            kiln_runtime::daemon::check::check(&c.config.config)
        }
        Command::Shipped(kilnd_cli::Command::Provision(p)) => {
            kiln_runtime::daemon::provision::provision(&p.from, &p.etc)
        }
        Command::Shipped(kilnd_cli::Command::Worker) => Ok(kiln_runtime::sandbox::worker::serve()),
        Command::Shipped(kilnd_cli::Command::Zygote) => Ok(kiln_runtime::sandbox::zygote::serve()),
        #[cfg(feature = "conformance")]
        Command::Conformance(c) => c.execute(),
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
