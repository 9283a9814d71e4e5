//! `kiln` driven as a user drives it: the real binary, real files, exit codes and messages.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("KILN_TARGETS_DIR")
        .output()
        .expect("run kiln")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn ok(out: Output) -> Output {
    assert!(out.status.success(), "kiln failed\n{}", text(&out));
    out
}

#[track_caller]
fn fails(out: Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected\n{}",
        text(&out)
    );
    assert!(stderr.starts_with("kiln: error: "), "{}", text(&out));
    assert!(
        stderr.contains(needle),
        "stderr lacks `{needle}`\n{}",
        text(&out)
    );
}

#[track_caller]
fn assert_contains_all(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

fn compute_wat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/compute.wat")
}

/// A temp dir with `fleet.key` / `fleet.pub` in it.
fn keyed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(kiln(dir.path(), &["keygen", "-o", "fleet.key"]));
    dir
}

fn compile(dir: &Path, target: &str, out: &str) -> Output {
    let wat = compute_wat();
    kiln(
        dir,
        &[
            "compile",
            wat.to_str().unwrap(),
            "--target",
            target,
            "--sign",
            "fleet.key",
            "-o",
            out,
        ],
    )
}

#[test]
fn keygen_writes_a_private_secret_key_and_never_overwrites_it() {
    let dir = keyed_dir();
    let mode = fs::metadata(dir.path().join("fleet.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let public = fs::read_to_string(dir.path().join("fleet.pub")).unwrap();
    assert!(public.contains("-----BEGIN PUBLIC KEY-----"), "{public}");
    let before = fs::read(dir.path().join("fleet.key")).unwrap();
    fails(
        kiln(dir.path(), &["keygen", "-o", "fleet.key"]),
        73,
        "fleet.key",
    );
    assert_eq!(
        fs::read(dir.path().join("fleet.key")).unwrap(),
        before,
        "key was overwritten"
    );
}

/// keygen sets up the trust model in one step, in formats OpenSSL reads; a state
/// signed by an outside signer (here `openssl pkeyutl`, as an HSM or KMS client
/// would) through `kiln sign --command` verifies under the root.
#[test]
fn keygen_makes_a_root_and_an_outside_signer_signs_a_state_through_kiln_sign() {
    use kiln_protocol::fleet::{Desired, Scope, SignedDesired};
    use kiln_protocol::trust::Chain;
    let dir = keyed_dir();
    for f in ["fleet-root.key", "fleet.root"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let shown = ok(kiln(dir.path(), &["root", "show", "fleet.root"]));
    assert_contains_all(
        &String::from_utf8_lossy(&shown.stdout),
        &["root v1", "release 1 of"],
    );
    let root = Chain::new(fs::read(dir.path().join("fleet.root")).unwrap()).unwrap();
    let d = Desired {
        fleet: root.root().fleet.clone(),
        scope: Scope::Group("lab".into()),
        serial: 7,
        issued_ms: 1,
        expires_ms: u64::MAX,
        mirrors: Vec::new(),
        modules: Vec::new(),
    };
    let mut file = b"KILNSTATE\x01".to_vec();
    file.extend(SignedDesired::sign(&d, &[]));
    fs::write(dir.path().join("lab.kilnstate"), file).unwrap();
    let sign_with = |command: &str| {
        let args = [
            "sign",
            "lab.kilnstate",
            "--public",
            "fleet.pub",
            "--command",
        ];
        kiln(dir.path(), &[&args[..], &[command]].concat())
    };
    ok(sign_with(
        "openssl pkeyutl -sign -rawin -inkey fleet.key -in \"$KILN_MESSAGE\"",
    ));
    let signed = fs::read(dir.path().join("lab.kilnstate")).unwrap();
    assert_eq!(SignedDesired::open(&signed[10..], root.root()), Ok(d));
    // A command whose signature is not by that key is refused; the file is unchanged.
    let out = sign_with("head -c 64 /dev/zero");
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
    assert_eq!(fs::read(dir.path().join("lab.kilnstate")).unwrap(), signed);
}

#[test]
fn compiling_twice_gives_byte_identical_artifacts_for_every_target() {
    let dir = keyed_dir();
    for target in ["x86_64-linux", "aarch64-linux", "riscv64-linux"] {
        ok(compile(dir.path(), target, "a.kiln"));
        ok(compile(dir.path(), target, "b.kiln"));
        let a = fs::read(dir.path().join("a.kiln")).unwrap();
        let b = fs::read(dir.path().join("b.kiln")).unwrap();
        assert!(a == b, "{target}: artifacts differ");
    }
}

#[test]
fn compile_prints_what_it_built() {
    let dir = keyed_dir();
    let out = ok(compile(dir.path(), "riscv64-linux", "app.kiln"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_contains_all(
        &stderr,
        &[
            "compute.wat",
            "app.kiln",
            "riscv64-linux",
            "riscv64gc-unknown-linux-gnu",
            "KiB",
            "signed by key",
        ],
    );
}

#[test]
fn inspect_shows_the_manifest_and_a_valid_signature() {
    let dir = keyed_dir();
    ok(compile(dir.path(), "aarch64-linux", "app.kiln"));
    let out = ok(kiln(
        dir.path(),
        &["inspect", "app.kiln", "--trust", "fleet.pub", "--json"],
    ));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["signature"], "valid");
    assert_eq!(json["manifest"]["name"], "compute");
    assert_eq!(
        json["manifest"]["target"]["triple"],
        "aarch64-unknown-linux-gnu"
    );
    assert_eq!(json["manifest"]["target"]["cpu_features"][0], "neon");
    assert_eq!(json["manifest"]["engine"]["wasmer"], "7.4.2");
    assert_eq!(json["manifest"]["exports"][0], "_start");
    assert_eq!(
        json["manifest"]["imports"][0]["module"],
        "wasi_snapshot_preview1"
    );

    let out = ok(kiln(dir.path(), &["inspect", "app.kiln"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("not checked"), "{stdout}");
    assert!(
        stdout.contains("aarch64-unknown-linux-gnu (profile aarch64-linux)"),
        "{stdout}"
    );
}

#[test]
fn inspect_reports_a_tampered_artifact_and_fails() {
    let dir = keyed_dir();
    ok(compile(dir.path(), "x86_64-linux", "app.kiln"));
    let path = dir.path().join("app.kiln");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    let out = kiln(dir.path(), &["inspect", "app.kiln", "--trust", "fleet.pub"]);
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("INVALID: payload sha256"),
        "{}",
        text(&out)
    );
}

#[test]
fn bad_inputs_get_one_line_and_a_distinct_code() {
    let dir = keyed_dir();
    fs::write(dir.path().join("bad.wat"), "(module (func (result i32)))").unwrap();
    fails(
        kiln(
            dir.path(),
            &[
                "compile",
                "bad.wat",
                "--target",
                "x86_64-linux",
                "--sign",
                "fleet.key",
                "-o",
                "x.kiln",
            ],
        ),
        65,
        "cannot compile `bad.wat`",
    );
    fails(
        kiln(
            dir.path(),
            &[
                "compile",
                "nope.wasm",
                "--target",
                "x86_64-linux",
                "--sign",
                "fleet.key",
                "-o",
                "x.kiln",
            ],
        ),
        66,
        "nope.wasm",
    );
    fails(
        compile(dir.path(), "arm-board", "x.kiln"),
        2,
        "unknown target `arm-board`",
    );
    fs::set_permissions(
        dir.path().join("fleet.key"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fails(
        compile(dir.path(), "x86_64-linux", "x.kiln"),
        77,
        "chmod 600",
    );
    assert!(
        !dir.path().join("x.kiln").exists(),
        "a failed compile left an output file"
    );
}

#[test]
fn a_module_name_that_would_escape_a_directory_is_refused_before_any_work() {
    let dir = keyed_dir();
    let wat = compute_wat();
    let wat = wat.to_str().unwrap();
    let args = |name: &'static str| {
        [
            "compile",
            wat,
            "--target",
            "x86_64-linux",
            "--sign",
            "fleet.key",
            "-o",
            "x.kiln",
            "--name",
            name,
        ]
    };
    fails(
        kiln(dir.path(), &args("../../escaped")),
        2,
        "module name `../../escaped` contains `/`",
    );
    fails(
        kiln(dir.path(), &args("red\u{1b}[31m")),
        2,
        "module name `red\\u{1b}[31m`",
    );
    // A name derived from the file name is checked as well, and says how to fix it.
    fs::copy(compute_wat(), dir.path().join("my app.wat")).unwrap();
    fails(
        kiln(
            dir.path(),
            &[
                "compile",
                "my app.wat",
                "--target",
                "x86_64-linux",
                "--sign",
                "fleet.key",
                "-o",
                "x.kiln",
            ],
        ),
        2,
        "pass --name",
    );
    assert!(!dir.path().join("x.kiln").exists());
}

#[test]
fn fleet_commands_refuse_bad_device_and_group_names_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, so reaching the broker would fail differently.
    let broker = ["--broker", "mqtt://127.0.0.1:1"];
    let push = |target: &'static str, name: &'static str| {
        kiln(
            dir.path(),
            &[
                &["push", "app.kiln", "--sign", "fleet.key", target, name],
                &broker[..],
            ]
            .concat(),
        )
    };
    fails(
        push("--device", "lab/+"),
        2,
        "device name `lab/+` contains `/`",
    );
    fails(push("--group", "#"), 2, "group name `#` contains `#`");
    fails(
        kiln(
            dir.path(),
            &[
                &[
                    "rollout",
                    "app.kiln",
                    "--sign",
                    "fleet.key",
                    "--group",
                    "..",
                ],
                &broker[..],
            ]
            .concat(),
        ),
        2,
        "group name `..` is not allowed",
    );
    fails(
        kiln(
            dir.path(),
            &[&["watch", "--device", "a b"], &broker[..]].concat(),
        ),
        2,
        "device name `a b` contains ` `",
    );
}

#[test]
fn targets_lists_every_profile_with_its_triple() {
    let out = ok(kiln(Path::new("."), &["targets"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_contains_all(
        &stdout,
        &[
            "aarch64-linux",
            "riscv64gc-unknown-linux-gnu",
            "x86_64-v3-linux",
            "avx2",
            "rpi4-aarch64",
        ],
    );
}

#[test]
fn a_targets_dir_with_a_typo_is_rejected_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("board.toml"),
        "name = \"board\"\ntriple = \"aarch64-unknown-linux-gnu\"\ncpu_feature = [\"neon\"]\ndescription = \"x\"\n",
    )
    .unwrap();
    let out = kiln(dir.path(), &["targets", "--targets-dir", "."]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("board.toml") && stderr.contains("cpu_feature"),
        "{stderr}"
    );
}

#[test]
fn the_dashboard_listens_off_loopback_only_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(dir.path(), &["dashboard", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--allow-remote"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
