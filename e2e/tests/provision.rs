//! Provisioning as firmware teams do it: `kiln provision` writes a bundle per device,
//! the device's `kilnd provision` installs it into its /etc/kiln (here a scratch root:
//! `--etc ROOT/etc/kiln`, the group `kiln` from ROOT/etc/group), and `kilnd check`
//! accepts what was installed. Each refusal is one line naming the file, with its exit
//! code from the shared table, and writes nothing.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_protocol::exit::Code;

use crate::util::{path_str, repo, shared, Device, Run};

/// The gid the scratch root's /etc/group gives `kiln`.
const KILN_GID: u32 = 4242;

fn kiln(args: &[&str]) -> Run {
    let mut cmd = Command::new(kiln_e2e::kiln_path());
    cmd.args(args);
    Run::new(cmd)
}

/// kiln refused: one line on stderr, `kiln: error: ...` with every needle.
#[track_caller]
fn kiln_refused(run: &Run, code: Code, needles: &[&str]) {
    run.assert_code(code as i32);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{run}");
    assert!(lines[0].starts_with("kiln: error: "), "{run}");
    for needle in needles {
        assert!(lines[0].contains(needle), "stderr lacks `{needle}`\n{run}");
    }
}

fn device() -> Device {
    Device::new("x86_64-linux")
}

/// A scratch root with the packaged /etc/kiln (the commented template, an empty
/// trust/) and a group file naming `kiln`.
fn scratch_root(dir: &Path) -> PathBuf {
    let etc = dir.join("root/etc/kiln");
    fs::create_dir_all(etc.join("trust")).unwrap();
    fs::copy(repo().join("dist/kilnd.toml"), etc.join("kilnd.toml")).unwrap();
    fs::write(
        dir.join("root/etc/group"),
        format!("root:x:0:\nkiln:x:{KILN_GID}:\n"),
    )
    .unwrap();
    etc
}

/// `kiln provision` for one device into `out`, with the shared fleet's root.
fn provision_one(out: &Path, name: &str, data: &Path, extra: &[&str]) -> Run {
    let root = shared().root();
    let mut args = vec![
        "provision",
        "--out",
        path_str(out),
        "--device",
        name,
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--root",
        path_str(&root),
        "--data-dir",
        path_str(data),
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn a_batch_is_provisioned_installed_at_first_boot_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data");
    let list = dir.path().join("devices.txt");
    fs::write(
        &list,
        "# the lab's first three\npi-01,lab\npi-02,lab;west  # by the door\n\npi-03\n",
    )
    .unwrap();
    let root = shared().root();
    let run = kiln(&[
        "provision",
        "--out",
        path_str(&out),
        "--devices",
        path_str(&list),
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--root",
        path_str(&root),
        "--group",
        "all",
        "--password",
        "--data-dir",
        path_str(&data),
    ])
    .ok("kiln provision must write three bundles");
    assert!(run.stderr.contains("credentials.txt"), "{run}");
    assert!(run.stderr.contains("mosquitto_passwd -U"), "{run}");

    // credentials.txt: one `name:password` line per device, 0600, the passwords the
    // bundles hold.
    let credentials = out.join("credentials.txt");
    assert_eq!(mode_owner(&credentials).0, 0o600);
    let text = fs::read_to_string(&credentials).unwrap();
    let lines: Vec<(&str, &str)> = text.lines().map(|l| l.split_once(':').unwrap()).collect();
    assert_eq!(
        lines.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        ["pi-01", "pi-02", "pi-03"]
    );
    for (name, password) in &lines {
        let bundle = out.join(name).join("kiln");
        let config: toml::Table =
            toml::from_str(&fs::read_to_string(bundle.join("kilnd.toml")).unwrap()).unwrap();
        assert_eq!(config["device"].as_str(), Some(*name));
        assert_eq!(config["mqtt"]["username"].as_str(), Some(*name));
        assert_eq!(config["mqtt"]["password"].as_str(), Some(*password));
        assert_eq!(password.len(), 32);
        assert!(bundle.join("trust/fleet.root").is_file());
        assert_eq!(mode_owner(&bundle.join("kilnd.toml")).0, 0o600);
    }
    assert_ne!(lines[0].1, lines[1].1, "every device has its own password");
    let pi02: toml::Table =
        toml::from_str(&fs::read_to_string(out.join("pi-02/kiln/kilnd.toml")).unwrap()).unwrap();
    let groups: Vec<&str> = pi02["mqtt"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert_eq!(groups, ["all", "lab", "west"]);

    // pi-02's bundle on its boot partition; its first boot installs it.
    let boot = dir.path().join("boot/firmware/kiln");
    fs::create_dir_all(boot.parent().unwrap()).unwrap();
    fs::rename(out.join("pi-02/kiln"), &boot).unwrap();
    let etc = scratch_root(dir.path());
    let template = fs::read(etc.join("kilnd.toml")).unwrap();
    let run = device()
        .kilnd(&[
            "provision",
            "--from",
            path_str(&boot),
            "--etc",
            path_str(&etc),
        ])
        .ok("kilnd provision must install the bundle");
    for line in [
        format!("installed {}/trust/fleet.root (0644 root)", etc.display()),
        format!("installed {}/kilnd.toml (0640 root:kiln)", etc.display()),
        format!(
            "kept {}/kilnd.toml.pre-provision (the {}/kilnd.toml it replaces)",
            etc.display(),
            etc.display()
        ),
        format!("deleted the bundle {}", boot.display()),
    ] {
        assert!(
            run.stdout.lines().any(|l| l == line),
            "no line `{line}`\n{run}"
        );
    }
    assert!(run.stdout.contains("next: "), "{run}");
    assert!(
        !boot.exists(),
        "the bundle (with the password) must be gone\n{run}"
    );
    assert_eq!(mode_owner(&etc.join("kilnd.toml")), (0o640, 0, KILN_GID));
    assert_eq!(mode_owner(&etc.join("trust")), (0o755, 0, 0));
    assert_eq!(mode_owner(&etc.join("trust/fleet.root")), (0o644, 0, 0));
    assert_eq!(
        fs::read(etc.join("kilnd.toml.pre-provision")).unwrap(),
        template,
        "the packaged template is kept, not lost"
    );

    // What was installed is what kilnd serve would start with.
    let config = etc.join("kilnd.toml");
    let run = device()
        .kilnd(&["check", "--config", path_str(&config)])
        .ok("kilnd check must accept the provisioned config");
    assert!(
        run.stdout
            .contains("mqtt: mqtt://127.0.0.1:1883 as device pi-02"),
        "{run}"
    );

    // Every later boot: no bundle, nothing to do, success.
    let run = device()
        .kilnd(&[
            "provision",
            "--from",
            path_str(&boot),
            "--etc",
            path_str(&etc),
        ])
        .ok("kilnd provision without a bundle must succeed");
    assert!(run.stdout.contains("nothing to provision"), "{run}");
}

#[test]
fn a_bad_bundle_is_refused_naming_the_file_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data");
    provision_one(&out, "pi-07", &data, &[]).ok("kiln provision pi-07");
    let bundle = out.join("pi-07/kiln");
    let etc = scratch_root(dir.path());
    let template = fs::read(etc.join("kilnd.toml")).unwrap();
    let install = || {
        device().kilnd(&[
            "provision",
            "--from",
            path_str(&bundle),
            "--etc",
            path_str(&etc),
        ])
    };
    let unchanged = |run: &Run| {
        assert_eq!(fs::read(etc.join("kilnd.toml")).unwrap(), template, "{run}");
        assert_eq!(fs::read_dir(etc.join("trust")).unwrap().count(), 0, "{run}");
        assert!(bundle.join("kilnd.toml").exists(), "{run}");
    };

    // A broken kilnd.toml: the config's own error, with the file and line.
    let good = fs::read(bundle.join("kilnd.toml")).unwrap();
    fs::write(
        bundle.join("kilnd.toml"),
        b"device = \"pi-07\"\ntrust = [\n",
    )
    .unwrap();
    let run = install();
    run.assert_refused(
        Code::Config as i32,
        &[&format!("{}/kilnd.toml", bundle.display()), "line"],
    );
    unchanged(&run);
    fs::write(bundle.join("kilnd.toml"), &good).unwrap();

    // No root in the bundle: the device would trust nothing.
    let root_doc = bundle.join("trust/fleet.root");
    let saved = fs::read(&root_doc).unwrap();
    fs::remove_file(&root_doc).unwrap();
    let run = install();
    run.assert_refused(
        Code::Untrusted as i32,
        &[
            &format!("{}/trust", bundle.display()),
            "no `*.root` document",
        ],
    );
    unchanged(&run);

    // A root document that does not verify.
    fs::write(&root_doc, b"not a root document").unwrap();
    let run = install();
    run.assert_refused(Code::Untrusted as i32, &[path_str(&root_doc)]);
    unchanged(&run);
    fs::write(&root_doc, &saved).unwrap();

    // A file the config names that the bundle lacks.
    let mut text = String::from_utf8(good.clone()).unwrap();
    text = text.replace("mqtt://127.0.0.1:1883", "mqtts://127.0.0.1:8883");
    text = text.replace("[mqtt]\n", "[mqtt]\nca = \"ca.pem\"\n");
    fs::write(bundle.join("kilnd.toml"), text).unwrap();
    let run = install();
    run.assert_refused(
        Code::Config as i32,
        &[&format!("{}/ca.pem", bundle.display())],
    );
    unchanged(&run);
    fs::write(bundle.join("kilnd.toml"), &good).unwrap();

    // The good bundle installs.
    install().ok("the repaired bundle must install");
}

#[test]
fn kiln_provision_refuses_a_secret_as_root_and_an_existing_device_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data");

    // The root key, or any .key file, never goes into a bundle.
    let secret = shared().dir.path().join("fleet-root.key");
    let mut args = vec![
        "provision",
        "--out",
        path_str(&out),
        "--device",
        "pi-05",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--root",
        path_str(&secret),
    ];
    kiln_refused(&kiln(&args), Code::Key, &[path_str(&secret), "secret key"]);
    assert!(!out.exists(), "nothing may be written");
    // Nor a file that is no root document.
    let bogus = dir.path().join("fleet.root");
    fs::write(&bogus, "not a root").unwrap();
    args[8] = path_str(&bogus);
    kiln_refused(&kiln(&args), Code::Key, &[path_str(&bogus)]);
    assert!(!out.exists(), "nothing may be written");

    // A device folder is never overwritten without --force.
    provision_one(&out, "pi-05", &data, &[]).ok("first provision");
    let first = fs::read(out.join("pi-05/kiln/kilnd.toml")).unwrap();
    let run = provision_one(
        &out,
        "pi-05",
        &data,
        &["--not-before", "2030-01-01T00:00:00Z"],
    );
    kiln_refused(
        &run,
        Code::CannotWrite,
        &[&format!("{}/pi-05", out.display()), "--force"],
    );
    assert_eq!(fs::read(out.join("pi-05/kiln/kilnd.toml")).unwrap(), first);
    provision_one(
        &out,
        "pi-05",
        &data,
        &["--not-before", "2030-01-01T00:00:00Z", "--force"],
    )
    .ok("--force replaces the bundle");
    let text = fs::read_to_string(out.join("pi-05/kiln/kilnd.toml")).unwrap();
    assert!(
        text.contains("not_before = \"2030-01-01T00:00:00Z\""),
        "{text}"
    );

    // A bad line of a device list names the list and the line.
    let list = dir.path().join("devices.txt");
    fs::write(&list, "pi-06\npi 07,lab\n").unwrap();
    let root = shared().root();
    let run = kiln(&[
        "provision",
        "--out",
        path_str(&out),
        "--devices",
        path_str(&list),
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--root",
        path_str(&root),
    ]);
    kiln_refused(
        &run,
        Code::InvalidInput,
        &[&format!("device list `{}` line 2", list.display())],
    );
    assert!(
        !out.join("pi-06").exists(),
        "no device of a bad list is written"
    );
}

#[test]
fn a_tls_device_gets_its_ca_and_client_key_with_the_key_readable_by_kiln_only() {
    let pki = kiln_e2e::mosquitto::Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(&pki.client_cert, certs.join("pi-tls.pem")).unwrap();
    fs::copy(&pki.client_key, certs.join("pi-tls.key")).unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data");
    let root = shared().root();
    kiln(&[
        "provision",
        "--out",
        path_str(&out),
        "--device",
        "pi-tls",
        "--broker",
        "mqtts://127.0.0.1:8883",
        "--root",
        path_str(&root),
        "--ca",
        path_str(&pki.ca),
        "--client-certs",
        path_str(&certs),
        "--data-dir",
        path_str(&data),
    ])
    .ok("kiln provision with a CA and client certificates");
    let bundle = out.join("pi-tls/kiln");
    assert_eq!(mode_owner(&bundle.join("pi-tls.key")).0, 0o600);
    assert_eq!(
        mode_owner(&bundle.join("kilnd.toml")).0,
        0o644,
        "no secret in it"
    );

    let etc = scratch_root(dir.path());
    let run = device()
        .kilnd(&[
            "provision",
            "--from",
            path_str(&bundle),
            "--etc",
            path_str(&etc),
        ])
        .ok("kilnd provision of a TLS bundle");
    assert!(
        !bundle.exists(),
        "the client key must leave the bundle\n{run}"
    );
    assert_eq!(mode_owner(&etc.join("ca.pem")), (0o644, 0, 0));
    assert_eq!(mode_owner(&etc.join("pi-tls.pem")), (0o644, 0, 0));
    assert_eq!(mode_owner(&etc.join("pi-tls.key")), (0o640, 0, KILN_GID));
    assert_eq!(mode_owner(&etc.join("kilnd.toml")), (0o640, 0, KILN_GID));
    let config = etc.join("kilnd.toml");
    let run = device()
        .kilnd(&["check", "--config", path_str(&config)])
        .ok("kilnd check must accept the provisioned TLS config");
    assert!(
        run.stdout
            .contains("mqtts://127.0.0.1:8883 as device pi-tls"),
        "{run}"
    );

    // mqtts:// without --ca, and --ca with plain mqtt://, are refused before writing.
    let run = provision_one(
        &dir.path().join("out2"),
        "pi-x",
        &data,
        &["--client-certs", path_str(&certs)],
    );
    kiln_refused(&run, Code::Usage, &["mqtts://"]);
    assert!(!dir.path().join("out2").exists());
}
