//! The WebAssembly WASI testsuite (its 46 wasm32-wasip1 Rust tests, carried in
//! conformance/wasi and built by scripts/build.sh) through kiln's own pipeline on every
//! target: `kiln compile`, then `kilnd run` natively and under qemu-user, each test run
//! as the suite's doc/specification.md says (its args, only its env, its root directory
//! preopened as `/`, then its exit code and output checked). Failures a target is
//! expected to have are listed with their reason in conformance/wasi/expectations.toml;
//! any other failure, and any listed test that passes, fails the run. Also: nothing
//! outside a module's directories is reachable through `..` or symlinks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::util::{compile, path_str, repo, shared, Device};
use crate::DEVICES;

/// The suite's wasm32-wasip1 Rust tests at the snapshot in conformance/wasi/SNAPSHOT.
const SUITE_SIZE: usize = 46;
/// Its C tests (conformance/wasi/c), built with Debian's clang and wasi-libc; named
/// `c/NAME` here and in the expectations file.
const C_SUITE_SIZE: usize = 14;
const C_PREFIX: &str = "c/";
/// What each target must pass at least, whatever the expectations file says: all of
/// them, as wasmtime does (44 and 13 on wasmer-wasix; all since kilnd's own WASI).
const MIN_PASSING: usize = SUITE_SIZE;
const C_MIN_PASSING: usize = C_SUITE_SIZE;

fn suite_dir() -> PathBuf {
    repo().join("conformance/wasi")
}

/// The test binaries scripts/build.sh builds from conformance/wasi, by test name: the
/// Rust tests, then the C tests as `c/NAME`.
fn binaries() -> Vec<(String, PathBuf)> {
    let built = kiln_e2e::target_dir().join("wasi-testsuite");
    let mut found = wasm_files(&built.join("wasm32-wasip1/release"), "", SUITE_SIZE);
    found.extend(wasm_files(&built.join("c"), C_PREFIX, C_SUITE_SIZE));
    found
}

fn wasm_files(dir: &Path, prefix: &str, want: usize) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the tests with scripts/build.sh",
                dir.display()
            )
        })
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy();
            (format!("{prefix}{stem}"), p)
        })
        .collect();
    found.sort();
    assert_eq!(
        found.len(),
        want,
        "{} holds {} test binaries, not {want}: rebuild them with scripts/build.sh",
        dir.display(),
        found.len()
    );
    found
}

/// Where a test's specification and root directory are, and its file name there.
fn spec_dir(name: &str) -> (PathBuf, &str) {
    match name.strip_prefix(C_PREFIX) {
        Some(c) => (suite_dir().join("c"), c),
        None => (suite_dir().join("src/bin"), name),
    }
}

/// A test's specification (the suite's legacy form, which every wasm32-wasip1 Rust test
/// uses): `NAME.json` beside its source, or the defaults when there is none.
#[derive(Debug, Default)]
struct Spec {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Relative to the test's directory; preopened as the guest's `/`.
    root: Option<String>,
    exit_code: i32,
    stdout: Option<String>,
    stderr: Option<String>,
}

fn spec(name: &str) -> Spec {
    let (dir, file) = spec_dir(name);
    let path = dir.join(format!("{file}.json"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Spec::default();
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let obj = json
        .as_object()
        .unwrap_or_else(|| panic!("{}: not a JSON object", path.display()));
    let mut spec = Spec::default();
    for (key, value) in obj {
        let bad = || -> ! { wrong(&path, &format!("`{key}` has a value of the wrong type")) };
        let text = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| bad());
        match key.as_str() {
            "args" => {
                spec.args = value
                    .as_array()
                    .unwrap_or_else(|| bad())
                    .iter()
                    .map(text)
                    .collect();
            }
            "env" => {
                spec.env = value
                    .as_object()
                    .unwrap_or_else(|| bad())
                    .iter()
                    .map(|(k, v)| (k.clone(), text(v)))
                    .collect();
            }
            "root" => spec.root = value.as_str().map(str::to_string),
            "exit_code" => {
                spec.exit_code = value
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .unwrap_or_else(|| bad());
            }
            "stdout" => spec.stdout = Some(text(value)),
            "stderr" => spec.stderr = Some(text(value)),
            // The operation-based form (sockets, http) is for the wasip3 tests.
            other => wrong(
                &path,
                &format!("`{other}` is not a key of the legacy specification this runner follows"),
            ),
        }
    }
    spec
}

/// A specification or expectations file this runner cannot follow.
fn wrong(path: &Path, why: &str) -> ! {
    panic!("{}: {why}", path.display())
}

/// One expected failure from conformance/wasi/expectations.toml.
#[derive(Debug)]
struct Expected {
    test: String,
    /// Device profiles it fails on; every target when absent.
    targets: Option<Vec<String>>,
    reason: String,
}

impl Expected {
    fn covers(&self, test: &str, device: &str) -> bool {
        self.test == test
            && self
                .targets
                .as_ref()
                .is_none_or(|targets| targets.iter().any(|t| t == device))
    }
}

fn expectations(path: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bad = |why: &str| -> ! { wrong(path, why) };
    let mut out = Vec::new();
    for (key, value) in &table {
        if key != "fail" {
            bad(&format!("unknown table `{key}` (only [[fail]])"));
        }
        for entry in value
            .as_array()
            .unwrap_or_else(|| bad("`fail` is not [[fail]]"))
        {
            let entry = entry
                .as_table()
                .unwrap_or_else(|| bad("a [[fail]] is not a table"));
            let text = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(str::to_string);
            for k in entry.keys() {
                if !["test", "targets", "reason"].contains(&k.as_str()) {
                    bad(&format!("unknown key `{k}` in a [[fail]]"));
                }
            }
            let targets = entry.get("targets").map(|v| {
                v.as_array()
                    .unwrap_or_else(|| bad("`targets` is not a list"))
                    .iter()
                    .map(|t| {
                        t.as_str()
                            .unwrap_or_else(|| bad("a target is not a string"))
                            .to_string()
                    })
                    .collect()
            });
            out.push(Expected {
                test: text("test").unwrap_or_else(|| bad("a [[fail]] without `test`")),
                targets,
                reason: text("reason")
                    .filter(|r| !r.trim().is_empty())
                    .unwrap_or_else(|| bad("a [[fail]] without its `reason`")),
            });
        }
    }
    out
}

/// Compares one target's outcomes (test name to failure, None for a pass) with the
/// expectations: every problem, one line each. A failure not listed and a listed test
/// that passes are both problems; so is a listed test the suite does not have.
fn judge(
    device: &str,
    outcomes: &BTreeMap<String, Option<String>>,
    expected: &[Expected],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (test, failure) in outcomes {
        let listed = expected.iter().find(|e| e.covers(test, device));
        match (failure, listed) {
            (Some(why), None) => problems.push(format!("{device}: {test} failed unexpectedly: {why}")),
            (None, Some(e)) => problems.push(format!(
                "{device}: {test} passed but is listed as failing ({}): remove it from the expectations",
                e.reason
            )),
            _ => {}
        }
    }
    for e in expected {
        if !outcomes.contains_key(&e.test) {
            problems.push(format!(
                "expectations name `{}`, which the suite does not have",
                e.test
            ));
        }
    }
    problems
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
            // The repository's copy may be read-only (the suite ships it so); the
            // tests write into theirs.
            let mut perms = std::fs::metadata(&dest).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)] // a private temp copy
            perms.set_readonly(false);
            std::fs::set_permissions(&dest, perms).unwrap();
        }
    }
}

/// Runs one compiled test as the specification says; None when it passed, else why not.
fn run_test(device: &Device, name: &str, artifact: &Path) -> Option<String> {
    let spec = spec(name);
    // A fresh copy of the root per run: the spec's clean-up of `*.cleanup` files, and
    // room for the targets to run side by side.
    let scratch = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = Vec::new();
    if let Some(root) = &spec.root {
        let copy = scratch.path().join(root);
        copy_dir(&spec_dir(name).0.join(root), &copy);
        args.extend(["--dir".into(), format!("{}:/", path_str(&copy))]);
    }
    for (k, v) in &spec.env {
        args.extend(["--env".into(), format!("{k}={v}")]);
    }
    args.push("--".into());
    args.extend(spec.args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = device.run(artifact, &args);
    let mut mismatches = Vec::new();
    if run.code != Some(spec.exit_code) {
        mismatches.push(format!("exit code {:?}, not {}", run.code, spec.exit_code));
    }
    if spec.stdout.as_ref().is_some_and(|s| *s != run.stdout) {
        mismatches.push("wrong stdout".into());
    }
    if spec.stderr.as_ref().is_some_and(|s| *s != run.stderr) {
        mismatches.push("wrong stderr".into());
    }
    if mismatches.is_empty() {
        return None;
    }
    let last = run
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Some(format!(
        "{}; stderr ends `{last}`\n{run}",
        mismatches.join(", ")
    ))
}

/// Compiles and runs every test for `device`, two at a time (the build machine has two
/// cores; Cranelift and qemu keep both busy).
fn run_suite(device: &str, tests: &[(String, PathBuf)]) -> BTreeMap<String, Option<String>> {
    let out = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(BTreeMap::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let kilnd = Device::new(device);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, wasm)) = tests.get(i) else {
                        break;
                    };
                    let artifact = out.path().join(format!("{}.kiln", name.replace('/', "-")));
                    compile(wasm, device, &shared().key(), &artifact, &[]);
                    let outcome = run_test(&kilnd, name, &artifact);
                    outcomes.lock().unwrap().insert(name.clone(), outcome);
                }
            });
        }
    });
    outcomes.into_inner().unwrap()
}

#[test]
fn the_wasi_testsuite_passes_on_every_target_as_expected() {
    let tests = binaries();
    let expected = expectations(&suite_dir().join("expectations.toml"));
    let mut problems = Vec::new();
    for device in DEVICES {
        let outcomes = run_suite(device, &tests);
        for (set, c) in [("Rust", false), ("C", true)] {
            let ours = || {
                outcomes
                    .iter()
                    .filter(|(t, _)| t.starts_with(C_PREFIX) == c)
            };
            let passed = ours().filter(|(_, o)| o.is_none()).count();
            let failed: Vec<&str> = ours()
                .filter(|(_, o)| o.is_some())
                .map(|(t, _)| t.as_str())
                .collect();
            // One line per target and set, for the docs' table (scripts/wasi-testsuite.sh).
            eprintln!(
                "wasi testsuite ({set}): kiln on {device}: {passed}/{} passed; failed: {}",
                ours().count(),
                if failed.is_empty() {
                    "none".into()
                } else {
                    failed.join(", ")
                }
            );
            let (size, min) = if c {
                (C_SUITE_SIZE, C_MIN_PASSING)
            } else {
                (SUITE_SIZE, MIN_PASSING)
            };
            if passed < min {
                problems.push(format!(
                    "{device}: {passed} of {size} {set} tests passed, fewer than {min}"
                ));
            }
        }
        problems.extend(judge(device, &outcomes, &expected));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn a_wrong_expectation_is_reported_not_passed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("expectations.toml");
    std::fs::write(
        &file,
        r#"
[[fail]]
test = "passes"
reason = "listed, but it passes"

[[fail]]
test = "fails_on_riscv"
targets = ["riscv64-linux"]
reason = "listed for riscv64 only"

[[fail]]
test = "gone"
reason = "not in the suite"
"#,
    )
    .unwrap();
    let expected = expectations(&file);
    let outcomes: BTreeMap<String, Option<String>> = [
        ("passes", None),
        ("fails_on_riscv", Some("exit code Some(101), not 0")),
        ("fails_unlisted", Some("exit code Some(101), not 0")),
    ]
    .into_iter()
    .map(|(t, o)| (t.to_string(), o.map(str::to_string)))
    .collect();
    let problems = judge("x86_64-linux", &outcomes, &expected);
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        has("passes passed but is listed as failing"),
        "{problems:#?}"
    );
    assert!(has("fails_on_riscv failed unexpectedly"), "{problems:#?}");
    assert!(has("fails_unlisted failed unexpectedly"), "{problems:#?}");
    assert!(
        has("`gone`, which the suite does not have"),
        "{problems:#?}"
    );
    let riscv = judge("riscv64-linux", &outcomes, &expected);
    assert!(
        !riscv.iter().any(|p| p.contains("fails_on_riscv")),
        "{riscv:#?}"
    );
}

/// The preopens have every right now, so the sandbox is the file system behind them:
/// a symlink in a mapped directory that points outside it, absolute or relative, and a
/// path that climbs out with `..`, reach nothing of the host, with the directory mapped
/// at `/` or below it.
#[test]
fn nothing_outside_the_mapped_directories_is_reachable_through_dotdot_or_symlinks() {
    let outer = tempfile::tempdir().unwrap();
    let secret = outer.path().join("secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    let data = outer.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("inside.txt"), "inside\n").unwrap();
    std::os::unix::fs::symlink(&secret, data.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", data.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("../../secret.txt", data.join("sub/deep-link")).unwrap();
    std::os::unix::fs::symlink(outer.path(), data.join("dir-link")).unwrap();
    for device in DEVICES {
        let artifact = shared().artifact("hello.wasm", device);
        for (guest, prefix) in [("/", ""), ("/data", "/data")] {
            let mapping = format!("{}:{guest}", path_str(&data));
            let read = |path: &str| {
                Device::new(device).run(&artifact, &["--dir", &mapping, "--", "x", "--read", path])
            };
            read(&format!("{prefix}/inside.txt"))
                .assert_code(0)
                .assert_stdout(&format!(
                    "hello, x! (4 args)\n{prefix}/inside.txt: inside\n"
                ));
            for path in [
                format!("{prefix}/abs-link"),
                format!("{prefix}/rel-link"),
                format!("{prefix}/sub/deep-link"),
                format!("{prefix}/dir-link/secret.txt"),
                format!("{prefix}/../secret.txt"),
                format!("{prefix}/sub/../../secret.txt"),
                "../secret.txt".to_string(),
                path_str(&secret).to_string(),
            ] {
                let run = read(&path);
                assert!(
                    run.code == Some(3) && !run.stdout.contains("host secret"),
                    "{device}: {path} with --dir {mapping} reached the host\n{run}"
                );
            }
        }
    }
}
