//! Execution speed: seven workloads (examples/workloads), one Rust source built natively
//! and for wasm32-wasip1: five an edge module might run, and two the field publishes
//! figures for, CoreMark 1.0 (its crates.io Rust port) and fib(40). Each workload
//! times its own kernel, so start-up and compilation are left out and only execution
//! is compared. Peers run the same .wasm where they install (x86_64): wasmtime from
//! PyPI (precompiled, like kiln), Node.js's WASI (V8), and wasmi, an interpreter, as
//! the floor.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_e2e::{path_str, repo, source};

use crate::start::native_program;
use crate::target::Target;
use crate::{first_line, median, table};

pub const WORKLOADS: [&str; 7] = [
    "json", "sha256", "regex", "deflate", "nbody", "coremark", "fib",
];

#[derive(Clone, Copy)]
pub enum Peer {
    Wasmtime,
    Node,
    Wasmi,
}

/// python3 with the wasmtime package scripts/peers.sh installed.
fn python() -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", tools().join("python"));
    cmd
}

/// Where scripts/peers.sh installs the peers.
fn tools() -> PathBuf {
    std::env::var_os("KILN_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/tools")
        })
}

impl Peer {
    /// The command that runs `wasm` (or its precompiled form) with `args`.
    fn command(self, wasm: &Path, args: &[&str]) -> Command {
        match self {
            Peer::Wasmtime => {
                let mut cmd = python();
                cmd.arg(repo().join("e2e/peers/wasmtime_run.py"))
                    .arg("run")
                    .arg(wasm.with_extension("cwasm"))
                    .args(args);
                cmd
            }
            Peer::Node => {
                let mut cmd = Command::new("node");
                cmd.arg("--no-warnings")
                    .arg(repo().join("e2e/peers/node_wasi.mjs"))
                    .arg(wasm)
                    .args(args);
                cmd
            }
            Peer::Wasmi => {
                let mut cmd = Command::new(tools().join("bin/wasmi"));
                cmd.arg(wasm).args(args);
                cmd
            }
        }
    }

    /// Does what loading needs ahead of time (wasmtime: precompile); false if the peer
    /// is not installed.
    pub fn prepare(self, wasm: &Path) -> bool {
        match self {
            Peer::Wasmtime => python()
                .arg(repo().join("e2e/peers/wasmtime_run.py"))
                .arg("precompile")
                .arg(wasm)
                .arg(wasm.with_extension("cwasm"))
                .status()
                .is_ok_and(|s| s.success()),
            Peer::Node => Command::new("node").arg("--version").output().is_ok(),
            Peer::Wasmi => tools().join("bin/wasmi").exists(),
        }
    }
}

pub fn peer_version(peer: Peer) -> String {
    match peer {
        Peer::Wasmtime => {
            let code = "import importlib.metadata as m; print(m.version('wasmtime'))";
            python()
                .args(["-c", code])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "not installed".into())
        }
        Peer::Node => first_line("node", &["--version"]),
        Peer::Wasmi => {
            let v = first_line(path_str(&tools().join("bin/wasmi")), &["--version"]);
            v.trim_start_matches("wasmi ").to_string()
        }
    }
}

pub fn print(rows: &[Vec<String>], runs: usize) {
    report!("\n### Execution speed: workloads, kernel time, median of {runs}\n");
    for line in [
        "Each workload times its own kernel (start-up and compilation excluded). `native` is the",
        "same Rust source built for the target; `kiln` is `kilnd run` of its artifact, and",
        "`--bounds-checks` the same module compiled with explicit memory bounds checks instead",
        "of the 8 GiB reservation. Ratios are over native. Peers run the same .wasm where they",
        "install: wasmtime (precompiled, PyPI), Node.js (V8, node:wasi), wasmi (an interpreter).",
        "`coremark` is CoreMark 1.0's performance run (crates.io's Rust port, 6,000 iterations,",
        "its CRCs checked), `fib` a naively recursive fib(40).",
        "Under qemu-user both sides are emulated, so only the ratios mean something there.",
    ] {
        report!("{line}");
    }
    report!();
    table(
        &[
            "target",
            "mode",
            "workload",
            "native",
            "kiln",
            "kiln / native",
            "kiln --bounds-checks",
            "wasmtime",
            "node",
            "wasmi (interp.)",
        ],
        rows,
    );
}

pub fn measure(target: &Target, runs: usize) -> Vec<Vec<String>> {
    let wasm = source("workloads.wasm");
    let artifact = target.artifact("workloads.wasm", "workloads", &[]);
    let checked = target.artifact("workloads.wasm", "workloads-checked", &["--bounds-checks"]);
    let native = native_program("workloads", &target.profile.triple);
    let trust = target.trust();
    // Peers run on the build machine only: their packages are x86_64.
    let peers: Vec<(Peer, bool)> = [Peer::Wasmtime, Peer::Node, Peer::Wasmi]
        .into_iter()
        .map(|p| (p, target.profile.qemu.is_empty() && p.prepare(&wasm)))
        .collect();
    let mut rows = Vec::new();
    for workload in WORKLOADS {
        let mut checksum = None;
        let mut time = |make: &dyn Fn() -> Command| {
            median((0..runs).map(|_| {
                let (ms, sum) = kernel(make());
                match &checksum {
                    None => checksum = Some(sum),
                    Some(c) => assert_eq!(*c, sum, "{workload}: a runtime computed something else"),
                }
                ms
            }))
        };
        let native_ms = time(&|| {
            let mut cmd = target.profile.command(&native);
            cmd.arg(workload);
            cmd
        });
        let kiln = |artifact: &Path| {
            let args = [
                "run",
                path_str(artifact),
                "--trust",
                path_str(&trust),
                "--",
                workload,
            ];
            target.kilnd(&args)
        };
        let kiln_ms = time(&|| kiln(&artifact));
        let checked_ms = time(&|| kiln(&checked));
        let mut row = vec![
            target.name.clone(),
            target.mode().into(),
            workload.into(),
            format!("{native_ms:.1} ms"),
            format!("{kiln_ms:.1} ms"),
            format!("{:.2}x", kiln_ms / native_ms),
            format!("{checked_ms:.1} ms ({:.2}x)", checked_ms / native_ms),
        ];
        for (peer, available) in &peers {
            row.push(if *available {
                let ms = time(&|| peer.command(&wasm, &[workload]));
                format!("{ms:.1} ms ({:.2}x)", ms / native_ms)
            } else {
                "-".into()
            });
        }
        rows.push(row);
    }
    rows
}

/// Runs one workload and reads `NAME KERNEL_MS CHECKSUM` from its stdout.
fn kernel(mut cmd: Command) -> (f64, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let fields: Vec<&str> = line.split_whitespace().collect();
    match (out.status.success(), fields.as_slice()) {
        (true, [_, ms, sum]) => (ms.parse().unwrap_or(f64::NAN), sum.to_string()),
        _ => panic!(
            "{cmd:?} failed: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
