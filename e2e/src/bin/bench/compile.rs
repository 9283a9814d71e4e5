//! `compile`: how long the release `kiln` (the `host` profile that users install)
//! takes to compile a large module for each target, and at what rate of wasm. The
//! module is synthetic and the same on every run (seeded): functions of 0.1-4 KiB of
//! code with locals, integer arithmetic, memory traffic, branches, loops and calls,
//! the shape of compiled C/Rust, to the size asked for (49 MB by default: the size of
//! the large modules users ship).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_e2e::path_str;

use crate::speed::Peer;
use crate::target::Target;

/// The release kiln, as `cargo install --path compiler --profile host` builds it.
pub fn host_kiln() -> PathBuf {
    kiln_e2e::target_dir().join("host").join("kiln")
}

pub fn measure(target: &Target, runs: usize, module_mb: usize) -> Vec<Vec<String>> {
    let wasm = target.dir.join(format!("synthetic-{module_mb}mb.wasm"));
    if !wasm.exists() {
        std::fs::write(&wasm, synthetic_module(module_mb * 1_000_000, 7)).expect("write module");
    }
    let len = std::fs::metadata(&wasm).expect("module").len();
    let out = target.dir.join(format!("synthetic-{}.kiln", target.name));
    let mut secs = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        compile(&wasm, &target.name, &target.key, &out);
        secs.push(started.elapsed().as_secs_f64());
    }
    let median = crate::median(secs.into_iter());
    let artifact = std::fs::metadata(&out).expect("artifact").len();
    // wasmtime precompiles for the machine it runs on, so on the build machine only:
    // the same module, the same cores, its default configuration (Cranelift, functions
    // compiled in parallel), timed around the whole process like kiln's.
    let wasmtime = if target.profile.qemu.is_empty() && Peer::Wasmtime.prepare(&wasm) {
        let wt = crate::median((0..runs).map(|_| {
            let started = Instant::now();
            assert!(Peer::Wasmtime.prepare(&wasm), "wasmtime precompile failed");
            started.elapsed().as_secs_f64()
        }));
        format!(
            "{wt:.1} s, {:.1} MB/s (kiln's rate {:.2}x)",
            len as f64 / 1e6 / wt,
            wt / median
        )
    } else {
        "-".into()
    };
    vec![vec![
        target.name.clone(),
        format!("{:.1} MB", len as f64 / 1e6),
        format!("{median:.1} s"),
        format!("{:.1} MB/s", len as f64 / 1e6 / median),
        format!("{:.1} MB", artifact as f64 / 1e6),
        wasmtime,
    ]]
}

fn compile(wasm: &Path, target: &str, key: &Path, out: &Path) {
    let status = Command::new(host_kiln())
        .args(["compile", path_str(wasm), "--target", target, "--sign"])
        .args([path_str(key), "-o", path_str(out)])
        .status()
        .expect("run the release kiln (scripts/bench.sh builds it)");
    assert!(status.success(), "kiln compile {} failed", wasm.display());
}

pub fn print(rows: &[Vec<String>], runs: usize) {
    report!("### Compile a large module (release kiln, median of {runs})");
    report!();
    report!(
        "| target | wasm | wall time | wasm rate | artifact | wasmtime, same module and cores |"
    );
    report!("|---|---|---|---|---|---|");
    for row in rows {
        report!("| {} |", row.join(" | "));
    }
    report!();
}

/// A valid module of about `size` bytes: one memory, one function type
/// `(i32, i32) -> i32`, and as many functions as the size takes, each exported.
pub fn synthetic_module(size: usize, seed: u64) -> Vec<u8> {
    synthetic_module_with(size, seed, false)
}

/// [`synthetic_module`], with `extra` one more function in the middle: what a small
/// code change does to the module (the functions after it move up one index).
pub fn synthetic_module_with(size: usize, seed: u64, extra: bool) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut bodies = Vec::new();
    let mut total = 0;
    while total < size {
        let body = function_body(&mut rng, bodies.len() as u32);
        total += body.len() + 4;
        bodies.push(body);
    }
    if extra {
        let at = bodies.len() / 2;
        let body = function_body(&mut Rng(seed.wrapping_mul(31) | 1), at as u32);
        bodies.insert(at, body);
    }
    let n = bodies.len() as u32;
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    // type: (i32 i32) -> i32
    section(&mut module, 1, &[1, 0x60, 2, 0x7f, 0x7f, 1, 0x7f]);
    let mut funcs = uleb(n);
    funcs.extend(std::iter::repeat_n(0, n as usize)); // every function: type 0
    section(&mut module, 3, &funcs);
    section(&mut module, 5, &[1, 0, 1]); // memory: min 1 page
    let mut exports = uleb(n);
    for i in 0..n {
        let name = format!("f{i}");
        exports.extend(uleb(name.len() as u32));
        exports.extend(name.as_bytes());
        exports.push(0);
        exports.extend(uleb(i));
    }
    section(&mut module, 7, &exports);
    let mut code = uleb(n);
    for body in bodies {
        code.extend(uleb(body.len() as u32));
        code.extend(body);
    }
    section(&mut module, 10, &code);
    module
}

const LOCALS: u32 = 8;

/// Locals 0-1 are the parameters, 2..2+LOCALS the function's own.
fn function_body(rng: &mut Rng, index: u32) -> Vec<u8> {
    let mut b = vec![1];
    b.extend(uleb(LOCALS));
    b.push(0x7f);
    let target = 100 + rng.below(4000) as usize;
    while b.len() < target {
        statement(rng, &mut b, index, 0);
    }
    b.extend([0x20, 2 + rng.below(LOCALS) as u8]); // local.get: the result
    b.push(0x0b);
    b
}

fn statement(rng: &mut Rng, b: &mut Vec<u8>, index: u32, depth: u32) {
    let local = |rng: &mut Rng| rng.below(LOCALS + 2) as u8;
    match rng.below(10) {
        // store: mem[(x & 0xfffc)] = y
        0 => {
            expr(rng, b, 2);
            b.extend([0x41]);
            b.extend(sleb(0xfffc));
            b.push(0x71);
            expr(rng, b, 2);
            b.extend([0x36, 2, 0]);
        }
        // if (x) { ... } else { ... }
        1 if depth < 3 => {
            expr(rng, b, 2);
            b.extend([0x04, 0x40]);
            for _ in 0..1 + rng.below(3) {
                statement(rng, b, index, depth + 1);
            }
            b.push(0x05);
            statement(rng, b, index, depth + 1);
            b.push(0x0b);
        }
        // a counted loop: l = n; loop { ...; l -= 1; br_if l != 0 }
        2 if depth < 2 => {
            let counter = 2 + rng.below(LOCALS) as u8;
            b.push(0x41);
            b.extend(sleb(1 + rng.below(16) as i32));
            b.extend([0x21, counter, 0x03, 0x40]);
            for _ in 0..1 + rng.below(4) {
                statement(rng, b, index, depth + 1);
            }
            b.extend([0x20, counter, 0x41, 1, 0x6b, 0x22, counter, 0x0d, 0]);
            b.push(0x0b);
        }
        // a call to an earlier function
        3 if index > 0 => {
            expr(rng, b, 1);
            expr(rng, b, 1);
            b.push(0x10);
            b.extend(uleb(rng.below(index)));
            b.extend([0x21, 2 + rng.below(LOCALS) as u8]);
        }
        _ => {
            expr(rng, b, 3);
            let to = local(rng);
            b.extend([0x21, to]);
        }
    }
}

/// Pushes one i32.
fn expr(rng: &mut Rng, b: &mut Vec<u8>, depth: u32) {
    const BINARY: [u8; 10] = [0x6a, 0x6b, 0x6c, 0x71, 0x72, 0x73, 0x74, 0x76, 0x77, 0x46];
    match if depth == 0 {
        rng.below(3)
    } else {
        rng.below(6)
    } {
        0 => b.extend([0x20, rng.below(LOCALS + 2) as u8]),
        1 => {
            b.push(0x41);
            b.extend(sleb(rng.next() as i32 >> rng.below(28)));
        }
        2 => {
            // load mem[(local & 0xfffc)]
            b.extend([0x20, rng.below(LOCALS + 2) as u8, 0x41]);
            b.extend(sleb(0xfffc));
            b.extend([0x71, 0x28, 2, 0]);
        }
        _ => {
            expr(rng, b, depth - 1);
            expr(rng, b, depth - 1);
            b.push(BINARY[rng.below(BINARY.len() as u32) as usize]);
        }
    }
}

fn section(module: &mut Vec<u8>, id: u8, content: &[u8]) {
    module.push(id);
    module.extend(uleb(content.len() as u32));
    module.extend(content);
}

pub fn uleb(mut v: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn sleb(mut v: i32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return out;
        }
    }
}

/// xorshift64: the same module from the same seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator's output is a module Cranelift accepts, and the same every time.
    #[test]
    fn the_synthetic_module_is_valid_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("m.wasm");
        let module = synthetic_module(300_000, 7);
        assert_eq!(module, synthetic_module(300_000, 7));
        assert!(
            module.len() >= 300_000 && module.len() < 310_000,
            "{}",
            module.len()
        );
        std::fs::write(&wasm, &module).unwrap();
        let key = dir.path().join("k.key");
        let kiln = kiln_e2e::kiln_path();
        let ok = |args: &[&str]| {
            let out = Command::new(&kiln).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(&["keygen", "-o", path_str(&key)]);
        let out = dir.path().join("m.kiln");
        ok(&[
            "compile",
            path_str(&wasm),
            "--target",
            "x86_64-linux",
            "--sign",
            path_str(&key),
            "-o",
            path_str(&out),
        ]);
    }
}
