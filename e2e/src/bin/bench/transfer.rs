//! What an update costs a device on a thin link (issue 17): the bytes it receives and
//! the time from `kiln push` until it runs the new version, for four kinds of update,
//! each sent whole (`--wire raw`), compressed (`--no-delta`) and as a patch from the
//! version the device runs (the default), for the workloads example and a module
//! whose artifact is over 10 MB.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use std::process::Command;

use kiln_e2e::mosquitto::Broker;
use kiln_e2e::path_str;
use kiln_protocol::transfer::{decode, Codec, Prepared, Transfer, DEFAULT_CHUNK};

use crate::compile::{host_kiln, synthetic_module_with, uleb as leb};
use crate::fleet::fleet_device;
use crate::target::Target;
use crate::{median, table};

/// The updates, in the order a device takes them.
const UPDATES: [&str; 4] = [
    "first install",
    "one function added",
    "config only",
    "codegen-wide rebuild",
];

const MODES: [(&str, &[&str]); 3] = [
    ("raw", &["--wire", "raw"]),
    ("zstd", &["--no-delta"]),
    ("delta", &[]),
];

pub fn print(rows: &[Vec<String>], _runs: usize) {
    report!(
        "\n### Update transfers: bytes on the wire and push -> running (mosquitto on loopback)\n"
    );
    report!("Bytes are every payload the device receives for the artifact (chunk list and chunks;");
    report!("the signed desired state, about 0.5 KiB, comes on top), as a share of the artifact.");
    report!("`delta` is a zstd patch from the version the device runs, made by `kiln push` from");
    report!(
        "what the device reports. Times run from the release `kiln push` (which compresses at zstd level 19"
    );
    report!("and makes the patches) until the device's worker started the new version. The");
    report!("codegen-wide rebuild recompiles the new source with --bounds-checks: it changes the");
    report!("code of every function, as a wasmer upgrade would (this build has one wasmer).\n");
    table(
        &[
            "target",
            "module",
            "update",
            "artifact",
            "raw",
            "zstd",
            "delta",
            "push -> running raw / zstd / delta",
        ],
        rows,
    );
}

pub fn print_decode(rows: &[Vec<String>]) {
    report!("\n### Decoding on the device (x86_64, in process, median of 5)\n");
    report!("What a device spends turning a transfer back into the artifact before it checks the");
    report!("sha256 and signature as for any artifact (zstd's C code optimized, as in kilnd).\n");
    table(&["module", "artifact", "zstd decode", "patch decode"], rows);
}

/// One module's four artifacts (v1, v2 one function added, v2 again with another
/// config, v4 codegen-wide) for `target`.
struct Family {
    label: String,
    artifacts: [PathBuf; 3],
}

fn families(target: &Target) -> Vec<Family> {
    let mut out = Vec::new();
    let workloads = as_reactor(&workloads_wasm(false), &target.dir.join("workloads.wasm"));
    let extra = as_reactor(
        &workloads_wasm(true),
        &target.dir.join("workloads-extra.wasm"),
    );
    let synthetic = target.dir.join("synthetic-4mb.wasm");
    let synthetic_extra = target.dir.join("synthetic-4mb-extra.wasm");
    if !synthetic.exists() {
        std::fs::write(&synthetic, synthetic_module_with(4_000_000, 11, false)).expect("write");
        std::fs::write(&synthetic_extra, synthetic_module_with(4_000_000, 11, true))
            .expect("write");
    }
    let synthetic = as_reactor(&synthetic, &target.dir.join("synthetic-4mb-reactor.wasm"));
    let synthetic_extra = as_reactor(
        &synthetic_extra,
        &target.dir.join("synthetic-4mb-extra-reactor.wasm"),
    );
    for (label, v1, v2) in [
        ("workloads", workloads, extra),
        ("synthetic 4 MB", synthetic, synthetic_extra),
    ] {
        let build = |source: &Path, version: u64, extra: &[&str]| {
            let out = target.dir.join(format!(
                "xfer-{}-{version}-{}.kiln",
                label.replace(' ', "-"),
                target.name
            ));
            let v = version.to_string();
            let status = Command::new(host_kiln())
                .args(["compile", path_str(source), "--target", &target.name])
                .args(["--sign", path_str(&target.key), "-o", path_str(&out)])
                .args(["--name", "app", "--version", &v])
                .args(extra)
                .status()
                .expect("run the release kiln (scripts/bench.sh builds it)");
            assert!(status.success(), "kiln compile {}", source.display());
            out
        };
        out.push(Family {
            label: label.into(),
            artifacts: [
                build(&v1, 1, &[]),
                build(&v2, 2, &[]),
                build(&v2, 4, &["--bounds-checks"]),
            ],
        });
    }
    out
}

/// The workloads example for wasm32-wasip1 (`scripts/bench.sh` builds both).
fn workloads_wasm(extra: bool) -> PathBuf {
    let dir = if extra { "examples-extra" } else { "examples" };
    kiln_e2e::target_dir()
        .join(dir)
        .join("wasm32-wasip1/release/workloads.wasm")
}

/// A copy of a module made a kiln reactor: a WASI command's `_start` renamed out of the way
/// (to `_stort`, the same length) and a `kiln_tick` that returns 0 appended, so a
/// device runs it, commits it, and has it as the base of the next update. (A fleet
/// module that is a command runs to its end and never counts as started.) The new
/// type and function go last, so no existing index moves.
fn as_reactor(command: &Path, out: &Path) -> PathBuf {
    let bytes = std::fs::read(command).expect("workloads.wasm (scripts/bench.sh builds it)");
    let mut sections = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let (size, n) = read_uleb(&bytes[at + 1..]);
        let body = at + 1 + n;
        sections.push((bytes[at], bytes[body..body + size].to_vec()));
        at = body + size;
    }
    let count = |body: &[u8]| read_uleb(body).0;
    let types = sections
        .iter()
        .find(|(id, _)| *id == 1)
        .map_or(0, |(_, b)| count(b));
    let imported = sections
        .iter()
        .find(|(id, _)| *id == 2)
        .map_or(0, |(_, b)| imported_functions(b));
    let defined = sections
        .iter()
        .find(|(id, _)| *id == 3)
        .map_or(0, |(_, b)| count(b));
    let append = |body: &[u8], item: &[u8]| {
        let (n, len) = read_uleb(body);
        let mut out = leb(n as u32 + 1);
        out.extend_from_slice(&body[len..]);
        out.extend_from_slice(item);
        out
    };
    let mut module = bytes[..8].to_vec();
    for (id, body) in sections {
        let body = match id {
            1 => append(&body, &[0x60, 0, 1, 0x7f]),
            3 => append(&body, &leb(types as u32)),
            7 => {
                let mut body = body;
                let name = b"\x06_start\x00";
                if let Some(i) = body.windows(name.len()).position(|w| w == name) {
                    body[i + 4] = b'o';
                }
                let mut export = leb(9);
                export.extend_from_slice(b"kiln_tick\x00");
                export.extend(leb((imported + defined) as u32));
                append(&body, &export)
            }
            10 => append(&body, &[4, 0, 0x41, 0, 0x0b]),
            _ => body,
        };
        module.push(id);
        module.extend(leb(body.len() as u32));
        module.extend(body);
    }
    std::fs::write(out, &module).expect("write the reactor copy");
    out.to_path_buf()
}

/// How many functions an import section imports.
fn imported_functions(body: &[u8]) -> usize {
    let (n, mut at) = read_uleb(body);
    let mut functions = 0;
    for _ in 0..n {
        for _ in 0..2 {
            let (len, k) = read_uleb(&body[at..]);
            at += k + len;
        }
        let kind = body[at];
        at += 1;
        match kind {
            0 => {
                functions += 1;
                at += read_uleb(&body[at..]).1;
            }
            // memory: limits; table: reftype, limits; global: valtype, mutability
            2 => at += limits(&body[at..]),
            1 => at += 1 + limits(&body[at + 1..]),
            _ => at += 2,
        }
    }
    functions
}

fn limits(bytes: &[u8]) -> usize {
    let flags = bytes[0];
    let mut at = 1 + read_uleb(&bytes[1..]).1;
    if flags & 1 != 0 {
        at += read_uleb(&bytes[at..]).1;
    }
    at
}

/// A LEB128 u32 and how many bytes it took.
fn read_uleb(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    for (i, b) in bytes.iter().enumerate().take(5) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    (value, 5)
}

/// Every payload a device receives for a transfer: its chunk list and chunks.
fn wire(p: &Prepared) -> u64 {
    let chunks: u64 = p.chunk_messages().map(|(_, m)| m.len() as u64).sum();
    chunks + p.list_message.len() as u64
}

fn share(bytes: u64, of: u64) -> String {
    format!(
        "{:.1} MB ({:.1}%)",
        bytes as f64 / 1e6,
        bytes as f64 * 100.0 / of as f64
    )
}

pub fn measure(target: &Target, _runs: usize) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for family in families(target) {
        let bytes: Vec<Vec<u8>> = family
            .artifacts
            .iter()
            .map(|p| std::fs::read(p).expect("artifact"))
            .collect();
        // Per update: (artifact, base the device runs).
        let steps: [(&[u8], Option<&[u8]>); 4] = [
            (&bytes[0], None),
            (&bytes[1], Some(&bytes[0])),
            (&bytes[1], Some(&bytes[1])),
            (&bytes[2], Some(&bytes[1])),
        ];
        let times = push_times(target, &family);
        for (i, (artifact, base)) in steps.iter().enumerate() {
            let len = artifact.len() as u64;
            let same = base.is_some_and(|b| b == *artifact);
            let (raw, zstd, delta) = if same {
                (0, 0, 0)
            } else {
                let zstd = wire(&Transfer::full(artifact, Codec::Zstd, DEFAULT_CHUNK));
                let delta = match base {
                    Some(b) => wire(&Transfer::patch(b, artifact, DEFAULT_CHUNK)).min(zstd),
                    None => zstd,
                };
                (
                    wire(&Transfer::full(artifact, Codec::Raw, DEFAULT_CHUNK)),
                    zstd,
                    delta,
                )
            };
            let t = &times[i];
            rows.push(vec![
                target.name.clone(),
                family.label.clone(),
                UPDATES[i].into(),
                format!("{:.1} MB", len as f64 / 1e6),
                share(raw, len),
                share(zstd, len),
                if base.is_none() {
                    "(no base)".into()
                } else {
                    share(delta, len)
                },
                format!("{:.1} / {:.1} / {:.1} s", t[0], t[1], t[2]),
            ]);
        }
    }
    rows
}

/// Seconds from push to running, per update and mode: a fresh device per mode takes
/// the four updates in order.
fn push_times(target: &Target, family: &Family) -> Vec<[f64; 3]> {
    let mut times = vec![[0.0; 3]; UPDATES.len()];
    for (m, (mode, flags)) in MODES.iter().enumerate() {
        let broker = Broker::start();
        let device = format!("xfer-{}-{mode}", target.name);
        let name = format!("{device}-{}", family.label.replace(' ', "-"));
        let (mut child, rx) = fleet_device(target, &broker, &name, &device);
        let config_file = target.dir.join("xfer.conf");
        let url = broker.url();
        for (i, artifact) in [0, 1, 1, 2].into_iter().enumerate() {
            std::fs::write(&config_file, format!("update {i}")).expect("config");
            let path = &family.artifacts[artifact];
            let started = Instant::now();
            eprintln!(
                "bench: {}: {} {mode}: {}",
                target.name, family.label, UPDATES[i]
            );
            let mut args = vec![
                "push",
                path_str(path),
                "--device",
                &device,
                "--sign",
                path_str(&target.key),
                "--broker",
                &url,
                "--config",
                path_str(&config_file),
                "--health-window-ms",
                "500",
                "--timeout-ms",
                "60000",
                "--confirm-timeout-s",
                "0",
            ];
            args.extend_from_slice(flags);
            let status = Command::new(host_kiln())
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run the release kiln");
            assert!(status.success(), "kiln {}", args.join(" "));
            wait_started(&rx, [1, 2, 2, 4][i]);
            times[i][m] = started.elapsed().as_secs_f64();
            // The health window passes, so the next push starts from a committed state
            // the device has reported.
            std::thread::sleep(Duration::from_millis(1500));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    times
}

fn wait_started(rx: &Receiver<u64>, version: u64) {
    loop {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(v) if v == version => return,
            Ok(_) => continue,
            Err(e) => panic!("the device never ran v{version}: {e}"),
        }
    }
}

/// Decode times natively, for the decision to keep artifacts decoded (docs/src/transfers.md).
pub fn decode_times(target: &Target) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for family in families(target) {
        let v1 = std::fs::read(&family.artifacts[0]).expect("artifact");
        let v2 = std::fs::read(&family.artifacts[1]).expect("artifact");
        let full = Transfer::full(&v2, Codec::Zstd, DEFAULT_CHUNK);
        let patch = Transfer::patch(&v1, &v2, DEFAULT_CHUNK);
        let len = v2.len() as u64;
        let time = |f: &dyn Fn()| {
            median((0..5).map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1000.0
            }))
        };
        let z = time(&|| {
            decode(Codec::Zstd, &full.stream, None, len).expect("decode");
        });
        let p = time(&|| {
            decode(Codec::ZstdPatch, &patch.stream, Some(&v1), len).expect("patch");
        });
        rows.push(vec![
            family.label.clone(),
            format!("{:.1} MB", len as f64 / 1e6),
            format!("{z:.1} ms"),
            format!("{p:.1} ms"),
        ]);
    }
    rows
}
