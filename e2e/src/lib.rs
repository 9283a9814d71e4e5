//! The harness that drives the real binaries: end-to-end tests (`tests/`), the
//! benchmark (`src/bin/bench/`) and the chaos soak (`src/bin/soak/`). `kiln` compiles on the host, in-process; the `kilnd`
//! built for each target (by `scripts/build.sh`) runs natively or under qemu-user.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a panic is the failure report

pub mod bench_page;
pub mod board;
pub mod browser;
pub mod elf;
pub mod mosquitto;
pub mod nats;
pub mod nginx;
pub mod procfs;
pub mod rng;
pub mod sim;

use std::path::{Path, PathBuf};

use clap::Parser;
use kiln_compiler::commands::compile::CompileCommand;
use kiln_protocol::target::TargetProfile;

/// The device profiles every behaviour is checked on: native, and two under qemu-user.
pub const DEVICES: [&str; 3] = ["x86_64-linux", "aarch64-linux", "riscv64-linux"];

/// A loopback port nobody listens on (for a broker, a page, a WebDriver).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The cargo target dir this harness was built in: `CARGO_TARGET_DIR`, or the parent
/// of the profile directory holding this executable (`<dir>/debug/deps/e2e-*`,
/// `<dir>/release/bench`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("own executable path");
    exe.ancestors()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        })
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn profile(name: &str) -> TargetProfile {
    let path = repo().join("targets").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    TargetProfile::parse(name, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The release `kilnd` the tests run for the profile's triple: built alone by
/// `scripts/build.sh` with the test-only features `conformance` and `test-hooks`, and
/// kept beside the shipped one as `kilnd-test`.
pub fn kilnd_path(profile: &TargetProfile) -> PathBuf {
    built(&profile.triple, "kilnd-test")
}

/// The shipped `kilnd` (default features only), as a device gets it.
pub fn shipped_kilnd_path(profile: &TargetProfile) -> PathBuf {
    built(&profile.triple, "kilnd")
}
/// `kilnd-sim`: simulated devices (kilnd's device side, the worker simulated) for
/// fleet-scale tests; built with the tests' kilnd for the build machine only.
pub fn sim_path() -> PathBuf {
    built("x86_64-unknown-linux-gnu", "kilnd-sim")
}

/// The lean `kilnd` (no WASI: kiln-ABI reactors only), built by `scripts/build.sh`
/// for the triples in [`LEAN_DEVICES`] as `kilnd-lean`.
pub fn lean_kilnd_path(profile: &TargetProfile) -> PathBuf {
    built(&profile.triple, "kilnd-lean")
}

/// Where CI builds and tests the lean kilnd: one emulated target (each lean build is
/// another wasmer build).
pub const LEAN_DEVICES: [&str; 1] = ["aarch64-linux"];

fn built(triple: &str, name: &str) -> PathBuf {
    let path = target_dir().join(triple).join("release").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with scripts/build.sh",
        path.display(),
    );
    path
}

/// The host tool `kiln` (debug build, as scripts/build.sh makes it), for commands a
/// test runs as a separate process, like `kiln watch`.
pub fn kiln_path() -> PathBuf {
    let path = target_dir().join("debug/kiln");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p kiln-compiler` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A built example or fixture, by file name: `hello.wasm`, `sensor_filter.wasm` (Rust,
/// built by scripts/test.sh for wasm32-wasip1), `compute.wat`, or `fixtures/*.wat`.
pub fn source(name: &str) -> PathBuf {
    if name.ends_with(".wasm") {
        let path = target_dir()
            .join("examples/wasm32-wasip1/release")
            .join(name);
        assert!(
            path.exists(),
            "{} is missing: build the examples with scripts/build.sh",
            path.display(),
        );
        return path;
    }
    repo().join("examples").join(name)
}

/// Runs `kiln compile` in-process, exactly as the command line would.
pub fn compile(input: &Path, target: &str, key: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "compile".to_string(),
        input.display().to_string(),
        "--target".into(),
        target.into(),
        "--sign".into(),
        key.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    CompileCommand::try_parse_from(&args)
        .expect("compile args")
        .execute()
        .unwrap_or_else(|e| panic!("kiln {}: {e:#}", args.join(" ")));
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A finished process with everything needed to explain a failed assertion.
pub struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `cmd` to the end, with no stdin.
    pub fn new(mut cmd: std::process::Command) -> Self {
        let command = format!("{cmd:?}");
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        Self {
            command,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "wrong exit code\n{self}");
        self
    }

    #[track_caller]
    pub fn assert_stdout(&self, expected: &str) -> &Self {
        assert_eq!(self.stdout, expected, "wrong stdout\n{self}");
        self
    }

    /// kilnd refused: exactly one line on stderr, `kilnd: error: ...` containing every
    /// `needle`, nothing on stdout (the module never ran).
    #[track_caller]
    pub fn assert_refused(&self, code: i32, needles: &[&str]) -> &Self {
        self.assert_code(code);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr\n{self}");
        assert!(
            lines[0].starts_with("kilnd: error: "),
            "not a kilnd error line\n{self}"
        );
        for needle in needles {
            assert!(lines[0].contains(needle), "stderr lacks `{needle}`\n{self}");
        }
        assert_eq!(self.stdout, "", "the module produced output\n{self}");
        self
    }

    /// Exit 0, or the failure says `why`.
    #[track_caller]
    pub fn ok(self, why: &str) -> Self {
        assert_eq!(self.code, Some(0), "{why}\n{self}");
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "exit code: {:?}", self.code)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}
