//! The release copies of the Yocto recipe that `scripts/release-source.sh --no-vendor`
//! writes, checked without a network in seconds: `kilnd-crates.inc` lists every
//! crates.io package of the committed `Cargo.lock` (cargo resolves the whole lock file)
//! with Cargo.lock's checksum, so in particular every crate kilnd's build needs for the
//! device targets; and the recipe fetches the tarball the script made, by its checksum.
//!
//! Run with `cargo test -p kiln-dist --test release_source`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The triples kilnd ships for (scripts/build.sh).
const DEVICE_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "riscv64gc-unknown-linux-gnu",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (name, version) -> checksum of each crates.io package of a Cargo.lock.
fn locked(lock: &str) -> BTreeMap<(String, String), String> {
    let mut crates = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|line| {
                line.strip_prefix(key)
                    .and_then(|rest| rest.strip_prefix(" = \""))
                    .and_then(|rest| rest.strip_suffix('"'))
                    .map(str::to_owned)
            })
        };
        let Some(source) = field("source") else {
            continue; // a workspace member
        };
        assert!(
            source == "registry+https://github.com/rust-lang/crates.io-index",
            "Cargo.lock has a crate from {source}, which a crate:// list cannot hold"
        );
        crates.insert(
            (field("name").unwrap(), field("version").unwrap()),
            field("checksum").expect("a crates.io package has a checksum"),
        );
    }
    crates
}

#[test]
fn the_yocto_recipe_fetches_every_locked_crate_with_its_checksum() {
    let root = root();
    let out = tempfile::tempdir().unwrap();
    run(Command::new(root.join("scripts/release-source.sh"))
        .args(["--no-vendor", "--out"])
        .arg(out.path()));

    // The script archives HEAD, so its Cargo.lock is the committed one.
    let lock = locked(&run(Command::new("git")
        .current_dir(&root)
        .args(["show", "HEAD:Cargo.lock"])));
    assert!(lock.len() > 100, "Cargo.lock lists {} crates", lock.len());

    let version = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("version = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .expect("a version in [workspace.package]")
        .to_owned();
    let dir = out.path().join("meta-kiln/recipes-kiln/kilnd");
    let inc = std::fs::read_to_string(dir.join("kilnd-crates.inc")).unwrap();

    let uris: BTreeSet<(String, String)> = inc
        .lines()
        .filter_map(|l| l.trim().strip_prefix("crate://crates.io/"))
        .map(|l| {
            let (name, version) = l.trim_end_matches(" \\").split_once('/').unwrap();
            (name.to_owned(), version.to_owned())
        })
        .collect();
    let sums: BTreeMap<String, String> = inc
        .lines()
        .filter_map(|l| l.strip_prefix("SRC_URI["))
        .map(|l| {
            let (key, sum) = l.split_once(".sha256sum] = \"").unwrap();
            (key.to_owned(), sum.trim_end_matches('"').to_owned())
        })
        .collect();
    let want: BTreeSet<(String, String)> = lock.keys().cloned().collect();
    let missing: Vec<_> = want.difference(&uris).collect();
    let extra: Vec<_> = uris.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "kilnd-crates.inc and Cargo.lock disagree: missing {missing:?}, not locked {extra:?}"
    );
    for ((name, version), checksum) in &lock {
        assert_eq!(
            sums.get(&format!("{name}-{version}")),
            Some(checksum),
            "the checksum of {name} {version} in kilnd-crates.inc"
        );
    }
    assert_eq!(sums.len(), lock.len(), "one checksum per crate");

    // Every registry crate kilnd's build uses on a device target (normal and build
    // dependencies, proc macros included) is among them.
    for target in DEVICE_TARGETS {
        let tree = run(Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "tree",
                "--locked",
                "--offline",
                "--quiet",
                "-p",
                "kiln-runtime",
            ])
            .args(["--target", target, "-e", "normal,build", "--prefix", "none"])
            .args(["--format", "{p}"]));
        let used: BTreeSet<(String, String)> = tree
            .lines()
            .filter(|l| !l.contains(" (/")) // a workspace member
            .filter_map(|l| {
                let (name, rest) = l.split_once(" v")?;
                let version = rest.split(' ').next()?;
                Some((name.to_owned(), version.to_owned()))
            })
            .collect();
        assert!(used.len() > 50, "cargo tree lists {} crates", used.len());
        let unlisted: Vec<_> = used.difference(&uris).collect();
        assert!(
            unlisted.is_empty(),
            "kilnd for {target} needs crates kilnd-crates.inc lacks: {unlisted:?}"
        );
    }

    // The recipe, named after the version, fetches the tarball the script made.
    let recipe = std::fs::read_to_string(dir.join(format!("kilnd_{version}.bb"))).unwrap();
    let tarball = out.path().join(format!("kiln-{version}.tar.gz"));
    let sha = run(Command::new("sha256sum").arg(&tarball));
    let sha = sha.split(' ').next().unwrap();
    assert!(
        recipe.contains(&format!("SRC_URI[sha256sum] = \"{sha}\"")),
        "the recipe's SRC_URI[sha256sum] is the tarball's ({sha})"
    );
    assert!(recipe.contains("/kiln-${PV}.tar.gz\""));
    assert!(recipe.contains("require ${BPN}-crates.inc"));
    assert!(
        !recipe.contains('@') && !recipe.contains("TEMPLATE"),
        "a placeholder or the template's comment is left in the release recipe"
    );
}
