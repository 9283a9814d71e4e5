//! Metering overhead: the same module compiled plain and with `--fuel`.

use std::path::Path;

use kiln_e2e::path_str;

use crate::start::timings;
use crate::target::Target;
use crate::{median, table};

pub fn print(metering_rows: &[Vec<String>], runs: usize) {
    report!("\n### Metering: compute.wat (sieve of 1,000,000), `_start` time, median of {runs}\n");
    table(
        &["target", "mode", "plain", "metered (--fuel)", "overhead"],
        metering_rows,
    );
}

pub fn measure(target: &Target, runs: usize) -> Vec<Vec<String>> {
    vec![row(target, runs)]
}

fn row(target: &Target, runs: usize) -> Vec<String> {
    let plain = target.artifact("compute.wat", "compute", &[]);
    let metered = target.artifact("compute.wat", "compute-fuel", &["--fuel", "100000000000"]);
    let time = |artifact: &Path| {
        median((0..runs).map(|_| {
            let out = target
                .kilnd(&[
                    "run",
                    path_str(artifact),
                    "--trust",
                    path_str(&target.trust()),
                    "--timings",
                ])
                .output()
                .expect("kilnd run");
            // read, verify, deserialize, instantiate, run: the run is the fifth.
            timings(&String::from_utf8_lossy(&out.stderr))[4]
        }))
    };
    let (p, m) = (time(&plain), time(&metered));
    vec![
        target.name.clone(),
        target.mode().into(),
        format!("{p:.1} ms"),
        format!("{m:.1} ms"),
        format!("{:+.0}%", (m / p - 1.0) * 100.0),
    ]
}
