//! The spec suite through kiln's own pipeline on every target: a representative core
//! subset here (the full run is `scripts/conformance.sh`), plus proof that the
//! harness reports a wrong result instead of passing it.

use std::path::PathBuf;

use clap::Parser;
use kiln_compiler::commands::conformance::ConformanceCommand;

use crate::util::{kilnd_path, path_str, profile, repo};
use crate::DEVICES;

/// MVP numerics, control flow, memory, calls, conversions, traps, bulk memory,
/// reference types and SIMD.
const SUBSET: [&str; 24] = [
    "i32.wast",
    "i64.wast",
    "f32.wast",
    "f64_cmp.wast",
    "conversions.wast",
    "float_exprs.wast",
    "block.wast",
    "br_table.wast",
    "loop.wast",
    "if.wast",
    "call.wast",
    "call_indirect.wast",
    "fac.wast",
    "memory.wast",
    "memory_grow.wast",
    "memory_trap.wast",
    "traps.wast",
    "bulk.wast",
    "memory_copy.wast",
    "table_get.wast",
    "ref_func.wast",
    "linking.wast",
    "simd_i32x4_arith.wast",
    "simd_f32x4_arith.wast",
];

/// The subset's files as the repository carries them (conformance/testsuite, with the
/// suite's license), or a full copy of the suite named by KILN_WASM_TESTSUITE.
fn suite() -> PathBuf {
    std::env::var_os("KILN_WASM_TESTSUITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("conformance/testsuite"))
}

fn conformance(device: &str, files: &[PathBuf]) -> anyhow::Result<()> {
    let kilnd = kilnd_path(&profile(device));
    let expectations = repo().join("conformance/expectations.toml");
    let mut args: Vec<String> = vec!["conformance".into()];
    args.extend(files.iter().map(|f| path_str(f).to_string()));
    for flag in [
        "--target",
        device,
        "--kilnd",
        path_str(&kilnd),
        "--expectations",
        path_str(&expectations),
    ] {
        args.push(flag.to_string());
    }
    ConformanceCommand::try_parse_from(&args)?.execute()
}

#[test]
fn the_core_subset_conforms_on_every_target() {
    let files: Vec<PathBuf> = SUBSET.iter().map(|f| suite().join(f)).collect();
    for file in &files {
        assert!(
            file.exists(),
            "{} is missing: is the spec suite at {}?",
            file.display(),
            suite().display()
        );
    }
    for device in DEVICES {
        if let Err(e) = conformance(device, &files) {
            panic!("{device}: {e:#}");
        }
    }
}

#[test]
fn a_wrong_result_is_reported_not_passed() {
    let dir = tempfile::tempdir().unwrap();
    let wast = dir.path().join("wrong.wast");
    std::fs::write(
        &wast,
        r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))
(assert_return (invoke "add" (i32.const 1) (i32.const 2)) (i32.const 3))
(assert_return (invoke "add" (i32.const 1) (i32.const 2)) (i32.const 4))
(assert_trap (invoke "add" (i32.const 1) (i32.const 2)) "unreachable")
(assert_exception (invoke "add" (i32.const 1) (i32.const 2)))
"#,
    )
    .unwrap();
    for device in DEVICES {
        let err = conformance(device, std::slice::from_ref(&wast))
            .expect_err("wrong results must fail the run");
        assert!(
            err.to_string().contains("3 unexpected failure(s)"),
            "{device}: {err:#}"
        );
    }
}
