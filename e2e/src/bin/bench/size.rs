//! Size of the stripped release `kilnd` per target, as built (all features), without
//! TLS (`--no-default-features --features wasi`), and lean (`--no-default-features
//! --features tls`: no WASI). Each variant is built the way a user would build it;
//! cargo keeps every build, so switching back costs no compile.

use std::process::Command;

use kiln_e2e::repo;

use crate::table;
use crate::target::Target;

pub fn print(rows: &[Vec<String>]) {
    report!("\n### kilnd size (stripped release: opt-level z with wasmer and rkyv at s and the crypto at 3, fat LTO, panic=abort)\n");
    report!("`full` is the default build: WASI (kilnd's own preview 1), fleet updates and telemetry over");
    report!("MQTT, and TLS (rustls with ring). `no TLS` refuses mqtts:// brokers. `lean` has");
    report!("everything but WASI: it runs kiln-ABI reactors and refuses WASI modules. Each is");
    report!("built by scripts/kilnd-build.sh: `full` and `no TLS` as static-pies on x86_64 and");
    report!("aarch64 (glibc's code is in them, about 0.8-1 MB of it), `lean` and every riscv64");
    report!("build dynamically linked. `WASI costs` compares the full build with a lean one");
    report!("linked the same way.\n");
    table(
        &[
            "target",
            "full",
            "no TLS",
            "lean (no WASI)",
            "TLS costs",
            "WASI costs",
        ],
        rows,
    );
}

pub fn measure(targets: &[Target]) -> Vec<Vec<String>> {
    targets
        .iter()
        .map(|t| {
            let full = size_of(t, &[]);
            let no_tls = size_of(t, &["--no-default-features", "--features", "wasi"]);
            let lean_args = ["--no-default-features", "--features", "tls"];
            // What WASI costs, from a lean build linked like the full one; the lean
            // kilnd that ships is linked dynamically.
            let lean_linked_alike = size_of(t, &lean_args);
            let lean = size_of(t, &[&["--dynamic"][..], &lean_args].concat());
            size_of(t, &[]); // leave the default build in place for the other sections
            let kb = |a: u64, b: u64| format!("{:.0} KB", (a as f64 - b as f64) / 1000.0);
            vec![
                t.name.clone(),
                bytes(full),
                bytes(no_tls),
                bytes(lean),
                kb(full, no_tls),
                kb(full, lean_linked_alike),
            ]
        })
        .collect()
}

/// Builds kilnd for the target with `features` as it ships (scripts/kilnd-build.sh:
/// alone, static where glibc allows) and returns its size.
fn size_of(target: &Target, features: &[&str]) -> u64 {
    let triple = &target.profile.triple;
    eprintln!("bench: building kilnd for {triple} {}", features.join(" "));
    let status = Command::new(repo().join("scripts/kilnd-build.sh"))
        .current_dir(repo())
        .arg(triple)
        .args(features)
        .status()
        .expect("scripts/kilnd-build.sh");
    assert!(status.success(), "cannot build kilnd for {triple}");
    std::fs::metadata(&target.kilnd).expect("kilnd").len()
}

fn bytes(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out} B ({:.2} MiB)", n as f64 / (1024.0 * 1024.0))
}
