//! The README's "Your first hour" runs as written: its shell blocks, in order, in a
//! fresh directory, against an aarch64 kilnd under qemu-user. Three things differ,
//! each because a test cannot do as a newcomer does: the build step is skipped
//! (`scripts/build.sh` has run), `kiln` on the PATH is this build's, and the broker's
//! port is a free one (tests run side by side). `kiln dashboard`, which serves until
//! stopped, is given three seconds. The device must end with app v2 committed.

use std::process::Command;

/// The shell blocks of the README section `heading`, in order.
fn blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme.find(heading).expect("the first-hour section");
    let rest = &readme[start + heading.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push(body.join("\n"));
        }
    }
    out
}

#[test]
fn the_readmes_first_hour_updates_an_emulated_device_over_mqtt() {
    let repo = kiln_e2e::repo();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let blocks = blocks(
        &readme,
        "## Your first hour: from a fresh clone to a device updated over MQTT",
    );
    assert!(
        blocks.len() >= 5,
        "the walk has its five steps: {blocks:#?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = kiln_e2e::free_port().to_string();
    let kiln_dir = kiln_e2e::kiln_path().parent().unwrap().to_path_buf();
    let target = kiln_e2e::target_dir();
    let adapt = |b: &String| {
        b.replace("18830", &port)
            .lines()
            .map(|l| {
                if l.starts_with("kiln dashboard") {
                    "timeout 3 kiln dashboard --listen 127.0.0.1:0 || true".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Step 1 builds and installs (done). Step 2 runs in the clone, the rest where a
    // newcomer would make `hour/`: here, a temp dir.
    let rest: Vec<String> = blocks[2..].iter().map(adapt).collect();
    let script = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n\
         export PATH={kiln}:$PATH\nT={target}\ncd {repo}\n{step2}\ncd {tmp}\n{rest}\n\
         for i in $(seq 90); do\n\
           kiln devices --root fleet.root --json > devices.json\n\
           grep -q '\"version\":2' devices.json && break\n\
           sleep 1\n\
         done\n",
        kiln = kiln_dir.display(),
        target = target.display(),
        repo = repo.display(),
        step2 = adapt(&blocks[1]),
        tmp = dir.path().display(),
        rest = rest.join("\n"),
    );
    let path = dir.path().join("first-hour.sh");
    std::fs::write(&path, &script).unwrap();
    let run = Command::new("timeout")
        .args(["900", "bash", path.to_str().unwrap()])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the walk failed ({:?})\n--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        run.status
    );
    let hour = dir.path().join("hour");
    let devices = std::fs::read_to_string(hour.join("devices.json")).unwrap_or_default();
    assert!(
        devices.contains("\"version\":2") && devices.contains("pi-01"),
        "pi-01 does not run app v2: {devices}\n{stderr}"
    );
}
