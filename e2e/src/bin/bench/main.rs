//! `bench`: measures kiln on this machine and prints one table per section, with the
//! machine, tool versions and whether each target ran natively or under qemu-user.
//! Figures under emulation measure the emulator, not a board: compare ratios there.
//!
//! ```text
//! scripts/bench.sh [--runs N] [--targets x86_64-linux,aarch64-linux] [--only size,compile,speed]
//! ```
//!
//! One file per section: `size` (kilnd per target and build variant), `compile` (the
//! release kiln on a large module), `start` (cold
//! start, in the worker and as a whole process against the native program), `speed`
//! (workloads against native and peer runtimes), `metering`, `fleet` (update
//! latency and telemetry throughput over MQTT), and `transfer` (bytes on the wire and
//! update time, whole, compressed and patched).
//!
//! Everything it prints is also written, at the end, as a dated page of the book
//! (`docs/src/measurements/YYYY-MM-DD.md`, listed in `SUMMARY.md` and on
//! `measurements.md`; see `kiln_e2e::bench_page`), unless `--no-page`.

/// Every line the bench prints on stdout, kept for the dated page it writes at the end.
static REPORT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// `println!` that also keeps the line for the page.
macro_rules! report {
    () => {
        report!("")
    };
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        let mut kept = crate::REPORT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.push_str(&line);
        kept.push('\n');
    }};
}

mod compile;
mod fleet;
mod metering;
mod size;
mod speed;
mod start;
mod target;
mod transfer;

use std::process::Command;

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_e2e::{bench_page, path_str, DEVICES};

use target::Target;

/// Measure kiln on this machine and print the tables the book's measurement pages quote
#[derive(Parser)]
struct Args {
    /// Repetitions per figure; the median is shown
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Target profiles to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = DEVICES.map(String::from))]
    targets: Vec<String>,
    /// Size of the synthetic module the `compile` section compiles, in MB
    #[arg(long, default_value_t = 49)]
    module_mb: usize,
    /// Sections to run, comma-separated (default: all)
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// The book's source folder the dated page of this run is written into
    #[arg(long, value_name = "DIR", default_value = "docs/src")]
    book: std::path::PathBuf,
    /// Print the tables only; write no page
    #[arg(long)]
    no_page: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Size,
    Compile,
    Start,
    Speed,
    Metering,
    Update,
    Telemetry,
    Transfer,
}

impl Args {
    fn wants(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("bench.key");
    KeygenCommand::try_parse_from(["keygen", "-o", path_str(&key)])
        .expect("keygen args")
        .execute()
        .expect("keygen");
    print_machine(&args);
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|name| Target::new(name, dir.path(), &key))
        .collect();

    if args.wants(Section::Size) {
        size::print(&size::measure(&targets));
    }
    if args.wants(Section::Compile) {
        // A large compile takes a while: at most 3 runs of it.
        let runs = args.runs.min(3);
        let mut rows = Vec::new();
        for target in &targets {
            eprintln!(
                "bench: {}: compile {} MB x{runs}",
                target.name, args.module_mb
            );
            rows.extend(compile::measure(target, runs, args.module_mb));
        }
        compile::print(&rows, runs);
    }
    // Each section measures every target, then prints its table.
    let sections: [(Section, &str, Measure, Print); 6] = [
        (Section::Start, "cold start", start::measure, start::print),
        (Section::Speed, "workloads", speed::measure, speed::print),
        (
            Section::Metering,
            "metering",
            metering::measure,
            metering::print,
        ),
        (
            Section::Update,
            "fleet updates",
            fleet::update_latency,
            fleet::print_update,
        ),
        (
            Section::Telemetry,
            "telemetry",
            fleet::telemetry_throughput,
            fleet::print_telemetry,
        ),
        (
            Section::Transfer,
            "update transfers",
            transfer::measure,
            transfer::print,
        ),
    ];
    for (section, what, measure, print) in sections {
        if !args.wants(section) {
            continue;
        }
        let mut rows = Vec::new();
        for target in &targets {
            eprintln!("bench: {}: {what} x{}", target.name, args.runs);
            rows.extend(measure(target, args.runs));
        }
        print(&rows, args.runs);
    }
    if args.wants(Section::Transfer) {
        if let Some(native) = targets.iter().find(|t| t.profile.qemu.is_empty()) {
            transfer::print_decode(&transfer::decode_times(native));
        }
    }
    if !args.no_page {
        write_page(&args.book);
    }
}

/// Writes what the run printed as the book's dated page for it.
fn write_page(book: &std::path::Path) {
    let report = REPORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let command = std::env::var("KILN_BENCH_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("bench {}", args.join(" "))
    });
    match bench_page::render(&report, command.trim())
        .and_then(|page| bench_page::write(book, &page))
    {
        Ok(path) => eprintln!("bench: wrote {}", path.display()),
        Err(e) => {
            eprintln!("bench: no page written: {e}");
            std::process::exit(1);
        }
    }
}

/// A section's measurement of one target (rows), and how its table is printed.
type Measure = fn(&Target, usize) -> Vec<Vec<String>>;
type Print = fn(&[Vec<String>], usize);

fn print_machine(args: &Args) {
    report!(
        "## kiln bench, {}",
        first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    report!();
    report!(
        "- machine: {} ({} cores), {}; {}",
        first_line("uname", &["-m"]),
        first_line("nproc", &[]),
        first_line("uname", &["-sr"]),
        first_line(
            "sh",
            &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]
        )
        .trim()
    );
    report!(
        "- wasmer {} (kilnd and kiln), {}",
        kiln_compiler::aot::WASMER_VERSION,
        first_line("qemu-aarch64", &["--version"])
    );
    report!(
        "- peers: wasmtime {} (PyPI), node {} (V8, node:wasi), wasmi {} (interpreter)",
        speed::peer_version(speed::Peer::Wasmtime),
        speed::peer_version(speed::Peer::Node),
        speed::peer_version(speed::Peer::Wasmi)
    );
    report!(
        "- load average when it started (1, 5, 15 min): {} (other work on the machine slows what is measured)",
        first_line("cut", &["-d", " ", "-f", "1-3", "/proc/loadavg"])
    );
    report!(
        "- targets: {} (native: x86_64; others under qemu-user, where only ratios mean much); runs per figure: {}",
        args.targets.join(", "),
        args.runs
    );
}

/// The first line a command prints, or `not found`.
pub fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|| "not found".into())
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

pub fn table(header: &[&str], rows: &[Vec<String>]) {
    report!("| {} |", header.join(" | "));
    report!("|{}", "---|".repeat(header.len()));
    for row in rows {
        report!("| {} |", row.join(" | "));
    }
}
