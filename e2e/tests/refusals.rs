//! Every bad input is refused with one line, a distinct exit code, and before a single
//! payload byte is deserialized. kilnd logs "deserializing verified payload" (info)
//! right before `Module::deserialize`; the positive control shows that line
//! appears for a good artifact, and every refusal asserts it never does.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_protocol::artifact::{self, Envelope};
use kiln_protocol::keys::{SecretKey, TrustedKeys};

use crate::util::{compile, path_str, shared, source, Device, Run};

const LOAD_PROBE: &str = "deserializing verified payload";

/// Runs `kilnd run` with debug logging and asserts a one-line refusal with `code`.
#[track_caller]
fn refused(device: &Device, artifact: &Path, code: i32, needles: &[&str]) -> Run {
    let mut cmd = device.run_command(artifact, &[]);
    cmd.env("KILN_LOG", "debug");
    let run = Run::new(cmd);
    assert!(
        !run.stderr.contains(LOAD_PROBE),
        "payload was deserialized\n{run}"
    );
    run.assert_refused(code, needles);
    run
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn header_and_manifest_len(bytes: &[u8]) -> usize {
    88 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize
}

#[test]
fn positive_control_a_good_artifact_is_deserialized() {
    let artifact = shared().artifact("compute.wat", "x86_64-linux");
    let mut cmd = Device::new("x86_64-linux").run_command(&artifact, &[]);
    cmd.env("KILN_LOG", "debug");
    let run = Run::new(cmd);
    run.assert_code(0);
    assert!(run.stderr.contains(LOAD_PROBE), "{run}");
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let good = fs::read(shared().artifact("hello.wasm", "x86_64-linux")).unwrap();
    let manifest_end = header_and_manifest_len(&good);
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new("x86_64-linux");
    // magic, version, flags, manifest length, key id, signature, manifest, payload
    let positions = [
        (0, 72),
        (8, 74),
        (10, 74),
        (13, 83),
        (16, 84),
        (40, 83),
        (88, 83),
        ((88 + manifest_end) / 2, 83),
        (manifest_end, 83),
        ((manifest_end + good.len()) / 2, 83),
        (good.len() - 1, 83),
    ];
    for (at, code) in positions {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        let path = write(dir.path(), &format!("flip-{at}.kiln"), &bad);
        refused(&device, &path, code, &[&format!("flip-{at}.kiln")]);
    }
}

#[test]
fn truncated_and_empty_files_are_refused() {
    let good = fs::read(shared().artifact("hello.wasm", "x86_64-linux")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new("x86_64-linux");
    let manifest_end = header_and_manifest_len(&good);
    for len in [4, 50, manifest_end - 1, manifest_end, good.len() - 1] {
        let path = write(dir.path(), &format!("cut-{len}.kiln"), &good[..len]);
        refused(&device, &path, 83, &["truncated"]);
    }
    let empty = write(dir.path(), "empty.kiln", b"");
    refused(&device, &empty, 72, &["empty.kiln", "file is empty"]);
}

#[test]
fn a_plain_wasm_file_is_refused_with_advice() {
    refused(
        &Device::new("x86_64-linux"),
        &source("hello.wasm"),
        72,
        &["hello.wasm", "plain WebAssembly module", "kiln compile"],
    );
}

#[test]
fn an_artifact_from_an_untrusted_key_is_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let rogue = dir.path().join("rogue.key");
    KeygenCommand::try_parse_from(["keygen", "-o", path_str(&rogue)])
        .unwrap()
        .execute()
        .unwrap();
    let artifact = dir.path().join("rogue.kiln");
    compile(
        &source("compute.wat"),
        "x86_64-linux",
        &rogue,
        &artifact,
        &[],
    );
    let rogue_id = Envelope::parse(&fs::read(&artifact).unwrap())
        .unwrap()
        .key_id
        .to_string();
    refused(
        &Device::new("x86_64-linux"),
        &artifact,
        84,
        &["rogue.kiln", "not trusted", &rogue_id],
    );
}

#[test]
fn a_newer_format_version_is_refused() {
    let mut bytes = fs::read(shared().artifact("compute.wat", "x86_64-linux")).unwrap();
    bytes[8] = 2;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "future.kiln", &bytes);
    refused(
        &Device::new("x86_64-linux"),
        &path,
        74,
        &["format version 2", "update kilnd"],
    );
}

#[test]
fn a_riscv64_artifact_on_aarch64_is_refused_naming_both_targets() {
    let artifact = shared().artifact("compute.wat", "riscv64-linux");
    refused(
        &Device::new("aarch64-linux"),
        &artifact,
        85,
        &["riscv64gc-unknown-linux-gnu", "aarch64-unknown-linux-gnu"],
    );
}

#[test]
fn an_artifact_needing_a_cpu_feature_the_machine_lacks_is_refused() {
    // x86-64-v3 code (AVX2, BMI2, ...) on an emulated CPU without those features.
    let artifact = shared().artifact("compute.wat", "x86_64-v3-linux");
    let mut device = Device::new("x86_64-linux");
    device.profile.qemu = vec!["qemu-x86_64".into(), "-cpu".into(), "qemu64".into()];
    refused(&device, &artifact, 86, &["avx2", "bmi2", "lacks"]);
}

/// Re-signs a good artifact with a manifest changed by `edit`, as a future kiln might.
fn resealed(edit: impl FnOnce(&mut kiln_protocol::manifest::Manifest)) -> Vec<u8> {
    let bytes = fs::read(shared().artifact("compute.wat", "x86_64-linux")).unwrap();
    let key = SecretKey::from_text(&fs::read_to_string(shared().key()).unwrap()).unwrap();
    let trust = TrustedKeys::new(vec![key.public()]);
    let verified = Envelope::parse(&bytes).unwrap().verify(&trust).unwrap();
    let mut manifest = verified.manifest;
    edit(&mut manifest);
    artifact::seal(&manifest, verified.payload, &key).unwrap()
}

#[test]
fn another_wasmer_version_or_a_newer_abi_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new("x86_64-linux");
    let other = write(
        dir.path(),
        "wasmer.kiln",
        &resealed(|m| m.engine.wasmer = "7.5.0".into()),
    );
    refused(&device, &other, 87, &["wasmer 7.5.0", "7.4.2"]);
    let abi = write(
        dir.path(),
        "abi.kiln",
        &resealed(|m| m.engine.kiln_abi = kiln_protocol::KILN_ABI_VERSION + 1),
    );
    let newer = format!("kiln ABI {}", kiln_protocol::KILN_ABI_VERSION + 1);
    refused(&device, &abi, 87, &[&newer]);
}

#[test]
fn missing_files_and_bad_trust_keys_are_named() {
    let device = Device::new("x86_64-linux");
    device
        .kilnd(&[
            "run",
            "/nonexistent/app.kiln",
            "--trust",
            path_str(&shared().trust()),
        ])
        .assert_refused(71, &["/nonexistent/app.kiln"]);
    let artifact = shared().artifact("compute.wat", "x86_64-linux");
    device
        .kilnd(&[
            "run",
            path_str(&artifact),
            "--trust",
            "/nonexistent/fleet.pub",
        ])
        .assert_refused(71, &["/nonexistent/fleet.pub"]);
    device
        .kilnd(&[
            "run",
            path_str(&artifact),
            "--trust",
            path_str(&shared().key()),
        ])
        .assert_refused(
            84,
            &["fleet.key", "expected a public key but found a secret key"],
        );
}
