//! The .deb packages of kilnd and its systemd service, as `scripts/package.sh` builds
//! them from the shipped kilnd of each triple (built by `scripts/build.sh`): what the
//! packages hold, that they are reproducible, that the arm64 one installs into a
//! scratch root (`dpkg --root`, maintainer scripts included) and its kilnd runs the
//! demo's hello under qemu-user, and that the unit passes systemd's own checks.
//!
//! The tests run `scripts/package.sh` once (into `$CARGO_TARGET_DIR/packages/`, where
//! users find the packages too), so they always check the current script and dist/
//! files. They need dpkg, systemd-analyze, qemu-user and strace (Debian 12 has them
//! all; scripts/setup.sh installs qemu-user), no network, and root for `dpkg --root`
//! (as CI runs).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_e2e::mosquitto::Broker;
use kiln_e2e::{compile, path_str, profile, repo, shipped_kilnd_path, source, target_dir, Run};

/// Debian architecture, target profile of its kilnd.
const ARCHES: [(&str, &str); 3] = [
    ("amd64", "x86_64-linux"),
    ("arm64", "aarch64-linux"),
    ("riscv64", "riscv64-linux"),
];

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The man pages the package must carry: one per kilnd subcommand a user runs.
const MAN_PAGES: [&str; 5] = [
    "kilnd",
    "kilnd-run",
    "kilnd-serve",
    "kilnd-check",
    "kilnd-provision",
];

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn package_sh(args: &[&str]) -> Command {
    let mut c = Command::new(repo().join("scripts/package.sh"));
    c.args(args).env("CARGO_TARGET_DIR", target_dir());
    c
}

/// Runs `scripts/package.sh` once for the whole test binary; returns its output dir.
fn packages() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let started = Instant::now();
        Run::new(package_sh(&[])).ok(
            "scripts/package.sh failed: exit 3 means build kilnd first (scripts/build.sh), \
             4 that the man page and completion generator (dist/, kiln-dist) failed",
        );
        eprintln!(
            "scripts/package.sh: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        target_dir().join("packages")
    })
}

fn deb(arch: &str) -> PathBuf {
    packages().join(format!("kilnd_{VERSION}_{arch}.deb"))
}

/// One line of `dpkg-deb -c`: mode, owner, path (without the leading `.`).
struct Entry {
    mode: String,
    owner: String,
    path: String,
}

fn contents(deb: &Path) -> Vec<Entry> {
    let run =
        Run::new(cmd("dpkg-deb", &["-c", path_str(deb)])).ok("dpkg-deb -c must list the package");
    run.stdout
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 6, "unexpected dpkg-deb -c line `{line}`");
            Entry {
                mode: fields[0].into(),
                owner: fields[1].into(),
                path: fields[5].trim_start_matches('.').into(),
            }
        })
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    Run::new(cmd("dpkg-deb", &["-f", path_str(deb), name]))
        .ok("dpkg-deb -f must read the control file")
        .stdout
        .trim()
        .to_string()
}

#[test]
fn every_package_holds_exactly_the_files_it_should_owned_by_root_with_their_modes() {
    for (arch, _) in ARCHES {
        let deb = deb(arch);
        let entries = contents(&deb);
        let mut expected: BTreeMap<String, &str> = [
            ("/usr/bin/kilnd", "-rwxr-xr-x"),
            ("/usr/lib/systemd/system/kilnd.service", "-rw-r--r--"),
            (
                "/usr/lib/systemd/system/kilnd-provision.service",
                "-rw-r--r--",
            ),
            ("/usr/lib/sysusers.d/kilnd.conf", "-rw-r--r--"),
            ("/usr/lib/tmpfiles.d/kilnd.conf", "-rw-r--r--"),
            ("/etc/kiln/kilnd.toml", "-rw-r--r--"),
            ("/etc/kiln/trust/", "drwxr-xr-x"),
            ("/usr/share/bash-completion/completions/kilnd", "-rw-r--r--"),
            ("/usr/share/zsh/vendor-completions/_kilnd", "-rw-r--r--"),
            (
                "/usr/share/fish/vendor_completions.d/kilnd.fish",
                "-rw-r--r--",
            ),
            ("/usr/share/doc/kilnd/copyright", "-rw-r--r--"),
            ("/usr/share/doc/kilnd/changelog.gz", "-rw-r--r--"),
        ]
        .into_iter()
        .map(|(p, m)| (p.to_string(), m))
        .collect();
        for page in MAN_PAGES {
            expected.insert(format!("/usr/share/man/man1/{page}.1.gz"), "-rw-r--r--");
        }
        for e in &entries {
            assert_eq!(
                e.owner, "root/root",
                "{arch}: {} must be owned by root\n",
                e.path
            );
            if e.path.ends_with('/') {
                assert_eq!(
                    e.mode, "drwxr-xr-x",
                    "{arch}: directory {} must be 0755",
                    e.path
                );
                continue;
            }
            // More kilnd pages (one per subcommand) are welcome; the host tool's are not.
            if e.path.starts_with("/usr/share/man/man1/kilnd-") && e.path.ends_with(".1.gz") {
                expected.entry(e.path.clone()).or_insert("-rw-r--r--");
            }
            let want = expected
                .get(&e.path)
                .unwrap_or_else(|| panic!("{arch}: {} is in the package but not expected", e.path));
            assert_eq!(&e.mode, want, "{arch}: wrong mode on {}", e.path);
        }
        for path in expected.keys() {
            assert!(
                entries.iter().any(|e| &e.path == path),
                "{arch}: {path} is missing from {}",
                deb.display()
            );
        }
    }
}

#[test]
fn every_package_carries_the_shipped_kilnd_of_its_triple_byte_for_byte() {
    for (arch, device) in ARCHES {
        let dir = tempfile::tempdir().unwrap();
        Run::new(cmd(
            "dpkg-deb",
            &["-x", path_str(&deb(arch)), path_str(dir.path())],
        ))
        .ok("dpkg-deb -x must unpack the package");
        let copyright =
            std::fs::read_to_string(dir.path().join("usr/share/doc/kilnd/copyright")).unwrap();
        for crate_line in [
            format!("\n kiln-runtime {VERSION}: Apache-2.0\n"),
            "\n wasmer ".to_string(),
            "\n rustls ".to_string(),
        ] {
            assert!(
                copyright.contains(&crate_line),
                "{arch}: the copyright file must list the crates linked into kilnd: no `{}`",
                crate_line.trim()
            );
        }
        let packed = std::fs::read(dir.path().join("usr/bin/kilnd")).unwrap();
        let built = shipped_kilnd_path(&profile(device));
        assert!(
            packed == std::fs::read(&built).unwrap(),
            "{arch}: /usr/bin/kilnd is not {} (the shipped build, not kilnd-test)",
            built.display()
        );
    }
}

#[test]
fn control_names_the_architecture_version_conffile_and_the_glibc_a_dynamic_binary_needs() {
    let host_libc = Run::new(cmd("dpkg-query", &["-W", "-f=${Version}", "libc6"]))
        .ok("dpkg-query must know the host's libc6")
        .stdout;
    for (arch, device) in ARCHES {
        let deb = deb(arch);
        assert_eq!(field(&deb, "Package"), "kilnd");
        assert_eq!(
            field(&deb, "Architecture"),
            arch,
            "{arch}: wrong Architecture"
        );
        assert_eq!(
            field(&deb, "Version"),
            VERSION,
            "{arch}: Version is not the workspace's"
        );
        for name in ["Maintainer", "Section", "Priority", "Description"] {
            assert!(
                !field(&deb, name).is_empty(),
                "{arch}: control lacks {name}"
            );
        }
        let conffiles = Run::new(cmd("dpkg-deb", &["-I", path_str(&deb), "conffiles"]))
            .ok("the package must have a conffiles member")
            .stdout;
        assert_eq!(
            conffiles, "/etc/kiln/kilnd.toml\n",
            "{arch}: wrong conffiles"
        );

        // A static kilnd (x86_64, aarch64) depends on no library. A dynamic one
        // (riscv64): Depends names the newest GLIBC_ symbol version the binary links
        // against: not lower (it would install where it cannot run), and no newer than
        // Debian 12's.
        let shipped = shipped_kilnd_path(&profile(device));
        let depends = field(&deb, "Depends");
        if !kiln_e2e::elf::has_interpreter(&shipped) {
            assert_eq!(depends, "", "{arch}: a static kilnd depends on nothing");
        } else {
            let symbols = Run::new(cmd("objdump", &["-T", path_str(&shipped)]))
                .ok("objdump -T must read kilnd's dynamic symbols")
                .stdout;
            let needed = symbols
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .filter_map(|w| w.strip_prefix("GLIBC_"))
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                .max_by(|a, b| version_cmp(a, b))
                .expect("kilnd has GLIBC_ symbol versions");
            assert!(
                depends.contains(&format!("libc6 (>= {needed})")),
                "{arch}: Depends `{depends}` must ask for the glibc {needed} kilnd links against"
            );
            Run::new(cmd(
                "dpkg",
                &["--compare-versions", needed, "le", &host_libc],
            ))
            .ok(&format!(
                "{arch}: kilnd needs glibc {needed}, newer than this Debian's {host_libc}"
            ));
        }

        // Installed-Size (KiB) is at least what the files weigh.
        let installed: u64 = field(&deb, "Installed-Size").parse().unwrap();
        let binary = std::fs::metadata(shipped_kilnd_path(&profile(device)))
            .unwrap()
            .len();
        assert!(
            installed >= binary / 1024 && installed < binary / 1024 + 200,
            "{arch}: Installed-Size {installed} KiB does not match a {binary}-byte kilnd"
        );
        eprintln!(
            "{arch}: {} bytes, Installed-Size {installed} KiB, Depends: {depends}",
            std::fs::metadata(&deb).unwrap().len()
        );
    }
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

#[test]
fn the_same_inputs_give_the_same_package_bytes_whatever_the_umask() {
    let first = deb("arm64");
    let dir = tempfile::tempdir().unwrap();
    let mut again = Command::new("sh");
    again
        .args([
            "-c",
            "umask 077 && exec \"$0\" --targets arm64 --out \"$1\"",
        ])
        .arg(repo().join("scripts/package.sh"))
        .arg(dir.path())
        .env("CARGO_TARGET_DIR", target_dir());
    Run::new(again).ok("scripts/package.sh --targets arm64 must build again");
    let second = dir.path().join(first.file_name().unwrap());
    assert!(
        std::fs::read(&first).unwrap() == std::fs::read(&second).unwrap(),
        "{} and {} differ: the package is not reproducible",
        first.display(),
        second.display()
    );
}

#[test]
fn a_missing_kilnd_is_named_with_exit_3() {
    let empty = tempfile::tempdir().unwrap();
    let mut c = package_sh(&["--targets", "arm64", "--out", path_str(empty.path())]);
    c.env("CARGO_TARGET_DIR", empty.path());
    let run = Run::new(c);
    assert_eq!(run.code, Some(3), "a missing binary must exit 3\n{run}");
    assert!(
        run.stderr
            .contains("aarch64-unknown-linux-gnu/release/kilnd is missing")
            && run.stderr.contains("scripts/build.sh"),
        "the error must name the binary and how to build it\n{run}"
    );
}

#[test]
fn the_maintainer_scripts_are_posix_sh_and_the_scripts_shellcheck_clean() {
    let debian = repo().join("dist/debian");
    for script in ["postinst", "prerm", "postrm"] {
        let path = debian.join(script);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("#!/bin/sh\n"),
            "{script} must be a /bin/sh script"
        );
        assert!(text.contains("\nset -e\n"), "{script} must `set -e`");
        Run::new(cmd("sh", &["-n", path_str(&path)])).ok(&format!("{script}: sh -n must parse it"));
    }
    if Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("shellcheck is not installed: only `sh -n` was checked");
        return;
    }
    let scripts: Vec<String> = ["postinst", "prerm", "postrm"]
        .iter()
        .map(|s| path_str(&debian.join(s)).to_string())
        .collect();
    let mut sh = cmd("shellcheck", &["-s", "sh"]);
    sh.args(&scripts);
    Run::new(sh).ok("the maintainer scripts must be shellcheck-clean");
    for script in ["scripts/package.sh", "scripts/board.sh"] {
        Run::new(cmd("shellcheck", &[path_str(&repo().join(script))]))
            .ok(&format!("{script} must be shellcheck-clean"));
    }
}

/// A scratch root with the arm64 package installed by dpkg, maintainer scripts run
/// outside it with `DPKG_ROOT` set. Removed on drop.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("var/lib/dpkg");
        for sub in ["info", "updates", "triggers"] {
            std::fs::create_dir_all(db.join(sub)).unwrap();
        }
        std::fs::write(db.join("status"), "").unwrap();
        std::fs::write(db.join("available"), "").unwrap();
        Self { dir }
    }

    fn installed() -> Self {
        let root = Self::new();
        let run = root.dpkg(&["-i", path_str(&deb("arm64"))]);
        assert_eq!(
            run.code,
            Some(0),
            "dpkg --root -i of the arm64 package failed\n{run}"
        );
        root
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn dpkg(&self, args: &[&str]) -> Run {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", path_str(self.dir.path())))
            .args([
                "--force-architecture",
                "--force-depends",
                "--force-script-chrootless",
                "--log=/dev/null",
            ])
            .args(args);
        Run::new(c)
    }

    /// `kilnd ARGS...` from the installed package, under the aarch64 profile's qemu.
    fn kilnd(&self, args: &[&str]) -> Run {
        let mut c = profile("aarch64-linux").command(&self.path("usr/bin/kilnd"));
        c.args(args).env_remove("KILN_LOG");
        Run::new(c)
    }

    /// The uid and gid of `name` in the root's /etc/passwd.
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        passwd_user(&self.path("etc/passwd"), name)
    }
}

/// A fleet key pair and hello compiled for aarch64-linux and signed with it.
struct Hello {
    dir: tempfile::TempDir,
}

impl Hello {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("fleet.key");
        KeygenCommand::try_parse_from(["keygen", "-o", path_str(&key)])
            .unwrap()
            .execute()
            .unwrap();
        let out = dir.path().join("hello.kiln");
        compile(&source("hello.wasm"), "aarch64-linux", &key, &out, &[]);
        Self { dir }
    }

    fn artifact(&self) -> PathBuf {
        self.dir.path().join("hello.kiln")
    }

    fn public(&self) -> PathBuf {
        self.dir.path().join("fleet.pub")
    }

    /// The root document `kiln keygen` wrote beside the key.
    fn root_document(&self) -> PathBuf {
        self.dir.path().join("fleet.root")
    }
}

#[test]
fn the_arm64_package_installs_into_a_scratch_root_and_its_kilnd_runs_hello() {
    let host_before = host_user("kiln");
    let root = Root::installed();
    assert_eq!(
        host_user("kiln"),
        host_before,
        "the maintainer scripts changed the host's users, not the root's"
    );
    for file in [
        "usr/bin/kilnd",
        "usr/lib/systemd/system/kilnd.service",
        "usr/lib/systemd/system/kilnd-provision.service",
        "usr/lib/sysusers.d/kilnd.conf",
        "usr/lib/tmpfiles.d/kilnd.conf",
        "etc/kiln/kilnd.toml",
        "usr/share/man/man1/kilnd.1.gz",
    ] {
        assert!(root.path(file).exists(), "{file} was not installed");
    }

    // postinst: the user (systemd-sysusers), the directories (systemd-tmpfiles), the
    // unit enabled (deb-systemd-helper), all inside the root.
    let (uid, gid) = root
        .user("kiln")
        .expect("postinst must create the system user kiln in the root's /etc/passwd");
    assert!(uid < 1000, "kiln must be a system user, got uid {uid}");
    let state = std::fs::metadata(root.path("var/lib/kiln"))
        .expect("postinst must create /var/lib/kiln in the root");
    assert_eq!(
        (
            state.uid(),
            state.gid(),
            state.permissions().mode() & 0o7777
        ),
        (uid, gid, 0o750),
        "/var/lib/kiln must be 0750 kiln:kiln"
    );
    let trust = std::fs::metadata(root.path("etc/kiln/trust")).unwrap();
    assert_eq!(
        (trust.uid(), trust.permissions().mode() & 0o7777),
        (0, 0o755),
        "/etc/kiln/trust must be 0755 root"
    );
    let wants = root.path("etc/systemd/system/multi-user.target.wants/kilnd.service");
    assert_eq!(
        std::fs::read_link(&wants).ok(),
        Some(PathBuf::from("/usr/lib/systemd/system/kilnd.service")),
        "postinst must enable kilnd.service inside the root"
    );
    let provision = root.path("etc/systemd/system/kilnd.service.wants/kilnd-provision.service");
    assert_eq!(
        std::fs::read_link(&provision).ok(),
        Some(PathBuf::from(
            "/usr/lib/systemd/system/kilnd-provision.service"
        )),
        "postinst must enable kilnd-provision.service (WantedBy=kilnd.service) inside the root"
    );

    let hello = Hello::new();
    let run = root.kilnd(&[
        "run",
        path_str(&hello.artifact()),
        "--trust",
        path_str(&hello.public()),
        "--",
        "board",
    ]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "hello, board! (2 args)\n"),
        "the installed arm64 kilnd must run hello under qemu\n{run}"
    );
}

/// The uid and gid of `name` in a passwd file.
fn passwd_user(passwd: &Path, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name) && f.len() == 7)
            .then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

fn host_user(name: &str) -> Option<(u32, u32)> {
    passwd_user(Path::new("/etc/passwd"), name)
}

#[test]
fn reinstall_keeps_an_edited_config_remove_keeps_state_and_purge_removes_it_but_not_the_user() {
    let root = Root::installed();
    let config = root.path("etc/kiln/kilnd.toml");
    let edited = format!(
        "{}\n# edited on the device\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    std::fs::write(root.path("var/lib/kiln/state"), "device state").unwrap();

    let again = root.dpkg(&["-i", path_str(&deb("arm64"))]);
    assert_eq!(
        again.code,
        Some(0),
        "reinstalling over itself must succeed\n{again}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        edited,
        "an upgrade must keep the admin's /etc/kiln/kilnd.toml (a conffile)"
    );

    let remove = root.dpkg(&["-r", "kilnd"]);
    assert_eq!(remove.code, Some(0), "dpkg -r must succeed\n{remove}");
    assert!(
        !root.path("usr/bin/kilnd").exists(),
        "remove must remove the binary"
    );
    assert!(config.exists(), "remove (not purge) must keep the conffile");
    assert!(
        root.path("var/lib/kiln/state").exists(),
        "remove (not purge) must keep /var/lib/kiln"
    );

    let purge = root.dpkg(&["--purge", "kilnd"]);
    assert_eq!(purge.code, Some(0), "dpkg --purge must succeed\n{purge}");
    assert!(!config.exists(), "purge must remove the conffile");
    assert!(
        !root.path("var/lib/kiln").exists(),
        "purge must remove /var/lib/kiln"
    );
    assert!(
        purge.stderr.contains("removing") && purge.stderr.contains("var/lib/kiln"),
        "purge must say that it removes the state\n{purge}"
    );
    assert!(
        !root
            .path("etc/systemd/system/multi-user.target.wants/kilnd.service")
            .exists(),
        "purge must remove the unit's enable link"
    );
    assert!(
        root.user("kiln").is_some(),
        "purge must keep the kiln user (Debian policy)"
    );
}

#[test]
fn the_unit_passes_systemd_analyze_verify_with_the_installed_binary_and_man_pages() {
    let root = Root::installed();
    // Each unit as installed, with its /usr/bin/kilnd pointed at the root's, so verify
    // checks the packaged binary is there and executable; MANPATH lets it find the
    // packaged man pages that Documentation= names.
    for name in ["kilnd.service", "kilnd-provision.service"] {
        let unit =
            std::fs::read_to_string(root.path(&format!("usr/lib/systemd/system/{name}"))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join(name);
        std::fs::write(
            &copy,
            unit.replace("/usr/bin/kilnd", path_str(&root.path("usr/bin/kilnd"))),
        )
        .unwrap();
        let mut verify = cmd("systemd-analyze", &["verify", "--man=yes", path_str(&copy)]);
        verify.env("MANPATH", root.path("usr/share/man"));
        let run = Run::new(verify);
        assert!(
            run.code == Some(0) && run.stdout.is_empty() && run.stderr.is_empty(),
            "systemd-analyze verify must accept {name} without a warning \
             (an unknown directive, a missing binary or man page)\n{run}"
        );
    }
}

#[test]
fn the_unit_rates_ok_in_systemd_analyze_security() {
    let unit = repo().join("dist/systemd/kilnd.service");
    // --threshold is in tenths: exit non-zero above an exposure of 2.0 ("OK" ends at 3.9).
    let run = Run::new(cmd(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--threshold=20",
            path_str(&unit),
        ],
    ));
    let overall = run
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        run.code,
        Some(0),
        "the sandbox must keep the exposure at 2.0 or below: {overall}\n{run}"
    );
    eprintln!("{}", overall.trim());
}

#[test]
fn the_unit_sets_what_a_security_review_expects_and_not_what_would_break_kilnd() {
    let unit = std::fs::read_to_string(repo().join("dist/systemd/kilnd.service")).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "kiln"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/kiln"),
        ("StateDirectory", "kiln"),
        ("CapabilityBoundingSet", ""),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("OOMPolicy", "continue"),
        (
            "ExecStartPre",
            "/usr/bin/kilnd check --config /etc/kiln/kilnd.toml",
        ),
        (
            "ExecStart",
            "/usr/bin/kilnd serve --config /etc/kiln/kilnd.toml",
        ),
    ] {
        assert_eq!(
            get(key),
            Some(value),
            "kilnd.service must set {key}={value}"
        );
    }
    for key in [
        "WatchdogSec",
        "MemoryMax",
        "TimeoutStopSec",
        "ConditionDirectoryNotEmpty",
    ] {
        assert!(get(key).is_some(), "kilnd.service must set {key}");
    }
    // A worker mprotect()s the artifact's code to PROT_EXEC after copying it in, and
    // reserves 8 GiB of address space per instance: either setting would break it.
    for key in ["MemoryDenyWriteExecute", "LimitAS", "DynamicUser"] {
        assert!(get(key).is_none(), "kilnd.service must not set {key}");
    }
}

/// Every system call name the unit's SystemCallFilter= lines allow.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let listing = Run::new(cmd("systemd-analyze", &["syscall-filter"]))
        .ok("systemd-analyze syscall-filter must list the groups")
        .stdout;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in listing.lines() {
        if line.starts_with('@') {
            current = line.trim().to_string();
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            groups
                .entry(current.clone())
                .or_default()
                .push(line.trim().to_string());
        }
    }
    fn expand(name: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        match groups.get(name) {
            Some(members) if name.starts_with('@') => {
                for m in members {
                    expand(m, groups, out);
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (set, list) = match value.strip_prefix('~') {
            Some(list) => (&mut deny, list),
            None => (&mut allow, value),
        };
        for name in list.split_whitespace() {
            expand(name, &groups, set);
        }
    }
    allow.difference(&deny).cloned().collect()
}

#[test]
fn every_system_call_kilnd_serve_makes_is_one_the_units_filter_allows() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is not installed: this test traces kilnd (apt-get install strace)");
    }
    let unit = std::fs::read_to_string(repo().join("dist/systemd/kilnd.service")).unwrap();
    let allowed = allowed_syscalls(&unit);

    // The shipped x86_64 kilnd, natively: a reactor ticking, a WASI command that reads
    // a preopened file, and the fleet link to a real broker, then SIGTERM.
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    KeygenCommand::try_parse_from(["keygen", "-o", path_str(&key)])
        .unwrap()
        .execute()
        .unwrap();
    for (name, out) in [
        ("sensor_filter.wasm", "sensor.kiln"),
        ("hello.wasm", "hello.kiln"),
    ] {
        compile(
            &source(name),
            "x86_64-linux",
            &key,
            &dir.path().join(out),
            &[],
        );
    }
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/config.txt"), "sensor=1\n").unwrap();
    let config = dir.path().join("kilnd.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"pkg-strace\"\ndata_dir = \"state\"\ntrust = [\"fleet.root\"]\n\
             [mqtt]\nbroker = {:?}\n[telemetry]\nstdout = false\nstats_s = 1\n\
             [[module]]\nartifact = \"sensor.kiln\"\ntick_ms = 50\nconfig = \"sensor=s\\nalpha=0.3\"\n\
             [[module]]\nartifact = \"hello.kiln\"\nargs = [\"x\", \"--read\", \"/data/config.txt\"]\ndirs = [\"data:/data\"]\n",
            broker.url()
        ),
    )
    .unwrap();
    let trace = dir.path().join("trace.txt");
    let kilnd = shipped_kilnd_path(&profile("x86_64-linux"));
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o", path_str(&trace), "--"])
        .arg(&kilnd)
        .args(["serve", "--config", path_str(&config)])
        .env_remove("KILN_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start strace");
    std::thread::sleep(Duration::from_secs(4));
    // The first line of the trace is kilnd's own pid (strace's child).
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    let pid = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    Run::new(cmd("kill", &["-TERM", &pid])).ok("kilnd must still run after 4 s");
    let deadline = Instant::now() + Duration::from_secs(30);
    while strace.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = strace.kill();
            panic!("kilnd serve did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let call = line
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim_start());
        let name: String = call
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && call[name.len()..].starts_with('(') {
            used.insert(name);
        }
    }
    assert!(
        used.contains("connect") && used.contains("mprotect") && used.contains("clone3"),
        "the trace must cover the broker link and the workers: {used:?}"
    );
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "kilnd made system calls kilnd.service's SystemCallFilter= refuses: {refused:?}"
    );
    eprintln!("{} distinct system calls, all allowed", used.len());
}

#[test]
fn kilnd_check_refuses_the_config_as_installed_and_accepts_it_once_configured() {
    let root = Root::installed();
    let config = root.path("etc/kiln/kilnd.toml");
    let check = |root: &Root| root.kilnd(&["check", "--config", path_str(&config)]);

    // As installed: no key and nothing to run, refused in one line naming the file.
    let fresh = check(&root);
    assert!(
        fresh.code.is_some_and(|c| c != 0 && c != 2)
            && fresh.stderr.lines().count() == 1
            && fresh.stderr.contains("kilnd.toml"),
        "kilnd check must refuse the unconfigured config in one line naming it\n{fresh}"
    );

    // A fleet key in /etc/kiln/trust and a local module: accepted.
    let hello = Hello::new();
    std::fs::copy(hello.public(), root.path("etc/kiln/trust/fleet.pub")).unwrap();
    std::fs::create_dir(root.path("etc/kiln/modules")).unwrap();
    let artifact = root.path("etc/kiln/modules/hello.kiln");
    std::fs::copy(hello.artifact(), &artifact).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[[module]]\nartifact = \"modules/hello.kiln\"\nargs = [\"device\"]\n"),
    )
    .unwrap();
    let good = check(&root);
    assert_eq!(
        good.code,
        Some(0),
        "kilnd check must accept a key and a module\n{good}"
    );

    // The artifact modified on the device: refused, naming it.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    let bad = check(&root);
    assert!(
        bad.code.is_some_and(|c| c != 0 && c != 2)
            && bad.stderr.lines().count() == 1
            && bad.stderr.contains("hello.kiln"),
        "kilnd check must refuse a modified artifact in one line naming it\n{bad}"
    );
}

#[test]
fn every_setting_commented_out_in_the_packaged_config_is_a_key_kilnd_knows() {
    // Settings are commented as `#key = value` or `#[table]`, prose as `# text`:
    // uncommenting every setting must give a file kilnd parses. It may still be
    // refused for what it names (the example CA file does not exist), but not for a
    // key or a type (those errors name a line).
    let text = std::fs::read_to_string(repo().join("dist/kilnd.toml")).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let hello = Hello::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("trust")).unwrap();
    std::fs::copy(hello.public(), dir.path().join("trust/fleet.pub")).unwrap();
    // The uncommented [mqtt] makes it a fleet device: it needs the root document.
    std::fs::copy(hello.root_document(), dir.path().join("trust/fleet.root")).unwrap();
    let config = dir.path().join("kilnd.toml");
    std::fs::write(&config, uncommented).unwrap();
    let mut c = profile("x86_64-linux").command(&shipped_kilnd_path(&profile("x86_64-linux")));
    c.args(["check", "--config", path_str(&config)]);
    let run = Run::new(c);
    assert!(
        run.code != Some(2) && !run.stderr.contains(" line ") && !run.stderr.contains("unknown field"),
        "every commented-out setting in dist/kilnd.toml must be a key kilnd knows, with a value of its type\n{run}"
    );
}
