//! The device binary links no compiler.

use std::process::Command;

use crate::util::{kilnd_path, profile, repo};
use crate::DEVICES;

const COMPILERS: [&str; 4] = [
    "wasmer-compiler-cranelift",
    "cranelift-codegen",
    "wasmer-compiler-llvm",
    "wasmer-compiler-singlepass",
];

#[test]
fn kilnd_dependency_tree_has_no_compiler_on_any_target() {
    for device in DEVICES {
        let triple = profile(device).triple;
        let tree = kilnd_tree(&["-e", "normal", "--target", &triple]);
        assert!(tree.contains("wasmer v7.4.2"), "unexpected tree:\n{tree}");
        for compiler in COMPILERS {
            assert!(
                !tree.contains(compiler),
                "{compiler} is in kilnd's tree for {triple}:\n{tree}"
            );
        }
    }
}

const NEEDLE: &str = "cranelift-codegen";

fn contains(path: &std::path::Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn kilnd_binaries_contain_no_compiler_code() {
    // Panic locations keep crate paths even in a stripped binary. Positive control:
    // this test binary links kiln's compiler, so the probe must find it here.
    let me = std::env::current_exe().unwrap();
    assert!(
        contains(&me, NEEDLE),
        "probe cannot see cranelift in {}",
        me.display()
    );
    let lean = kiln_e2e::LEAN_DEVICES.map(|d| kiln_e2e::lean_kilnd_path(&profile(d)));
    for path in DEVICES.map(|d| kilnd_path(&profile(d))).iter().chain(&lean) {
        assert!(
            !contains(path, NEEDLE),
            "{} contains `{NEEDLE}`",
            path.display()
        );
    }
}

/// scripts/kilnd-build.sh links kilnd as a static-pie where glibc allows (x86_64,
/// aarch64): no dynamic loader at its starts, and still at a random address. riscv64
/// stays dynamically linked (Debian's riscv64 glibc has no static-pie start file), and
/// so does the lean kilnd, built for size. The tests' kilnd is linked like the shipped
/// one, so they run what ships.
#[test]
fn kilnd_is_a_static_pie_where_glibc_allows_and_always_position_independent() {
    use kiln_e2e::elf::{has_interpreter, is_position_independent};
    for device in DEVICES {
        let target = profile(device);
        let static_pie = device != "riscv64-linux";
        let lean = kiln_e2e::LEAN_DEVICES
            .contains(&device)
            .then(|| (kiln_e2e::lean_kilnd_path(&target), false)); // built for size
        let builds = [
            (kiln_e2e::shipped_kilnd_path(&target), static_pie),
            (kilnd_path(&target), static_pie),
        ];
        for (path, expect_static) in builds.iter().chain(&lean) {
            assert!(
                is_position_independent(path),
                "{} is not position-independent",
                path.display()
            );
            assert_eq!(
                has_interpreter(path),
                !*expect_static,
                "{}: {}",
                path.display(),
                if *expect_static {
                    "a dynamic loader, where kilnd should be static"
                } else {
                    "no dynamic loader for a dynamic build"
                }
            );
        }
    }
}

/// The shipped build enables no test feature, has no conformance replayer, and a
/// `KILN_FAULT` in its environment changes nothing.
#[test]
fn the_shipped_kilnd_carries_no_test_hooks() {
    let tree = kilnd_tree(&["-e", "features"]);
    for feature in ["\"test-hooks\"", "\"conformance\""] {
        assert!(
            !tree
                .lines()
                .any(|l| l.starts_with("kiln-runtime feature") && l.contains(feature)),
            "shipped kilnd enables {feature}:\n{tree}"
        );
    }
    let shipped = kiln_e2e::shipped_kilnd_path(&profile("x86_64-linux"));
    let help = Command::new(&shipped)
        .arg("--help")
        .output()
        .expect("kilnd --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("serve") && !help.contains("conformance"),
        "{help}"
    );
    let replay = Command::new(&shipped)
        .args(["conformance", "x.script"])
        .output()
        .expect("kilnd conformance");
    assert_eq!(replay.status.code(), Some(2), "an unknown subcommand");
    // The hook is compiled out: the source says so, and the binary has no trace of it.
    let bytes = std::fs::read(&shipped).expect("read kilnd");
    let needle = b"KILN_FAULT";
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "KILN_FAULT in shipped kilnd"
    );
    let test_build = std::fs::read(kilnd_path(&profile("x86_64-linux"))).expect("read kilnd-test");
    assert!(test_build.windows(needle.len()).any(|w| w == needle));
}

/// `cargo tree -p kiln-runtime --prefix none ARGS`: kilnd's tree as its own build sees it.
fn kilnd_tree(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["tree", "-p", "kiln-runtime", "--prefix", "none"])
        .args(args)
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
