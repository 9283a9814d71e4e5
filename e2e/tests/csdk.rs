//! The C SDK (guest/c/kiln.h): the sensor filter written in C (examples/c, built with
//! clang-19 by scripts/c-examples.sh), compiled by `kiln compile` for each target,
//! publishes the same records as the Rust one under `kilnd serve` with the same
//! config; the C alarm reactor gets those records as messages. Docs: docs/src/c-sdk.md.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sandbox::{module_entry, of, Serve};
use crate::util::{shared, Device};
use crate::DEVICES;

/// Ticks compared per target: the wave crosses the alarm's threshold on the way.
const TICKS: usize = 30;
const CONFIG: &str = "config = \"sensor=greenhouse-1\\nalpha=0.5\"";
const ABOVE: f64 = 22.5;

/// The log lines `module` printed, in order.
fn log_lines<'a>(records: &'a [Value], module: &str) -> Vec<&'a str> {
    of(records, module, "log")
        .iter()
        .map(|r| r["line"].as_str().unwrap())
        .collect()
}

fn texts(records: &[Value], module: &str) -> Vec<String> {
    of(records, module, "telemetry")
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_c_sensor_filter_publishes_the_rust_ones_records_on_every_target() {
    for target in DEVICES {
        let started = Instant::now();
        let s = shared();
        let rust = s.artifact("sensor_filter.wasm", target);
        let c = s.artifact("c/sensor_filter.wasm", target);
        let alarm = s.artifact("c/alarm.wasm", target);
        let tick = format!("tick_ms = 50\ntimeout_ms = 20000\n{CONFIG}");
        let mut config = module_entry("rust", &rust, &tick);
        config += &module_entry("c", &c, &tick);
        config += &module_entry(
            "alarm",
            &alarm,
            &format!("inbox = [\"c/temperature\"]\ntimeout_ms = 20000\nconfig = \"above={ABOVE}\""),
        );
        let mut serve = Serve::start(&Device::new(target), &config);
        let records = serve.wait_until(Duration::from_secs(120), |r| {
            texts(r, "rust").len() >= TICKS && texts(r, "c").len() >= TICKS
        });
        let explain = serve.explain();

        let (rust_records, c_records) = (texts(&records, "rust"), texts(&records, "c"));
        assert_eq!(
            c_records[..TICKS],
            rust_records[..TICKS],
            "{target}: the C sensor filter's records differ from the Rust one's\n{explain}"
        );
        // Both read their config and said so the same way.
        for module in ["rust", "c"] {
            assert_eq!(
                log_lines(&records, module),
                ["sensor greenhouse-1 ready, alpha 0.5"],
                "{target} {module}\n{explain}"
            );
        }

        // The alarm reactor saw the C filter's records through kiln_on_message, in
        // order: one alarm for each above the threshold, up to the last it got.
        let readings: Vec<Value> = c_records
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect();
        // (An alarm may be printed before the record it answers: those are left out.)
        let seen = readings.len() as u64;
        let alarms: Vec<Value> = texts(&records, "alarm")
            .iter()
            .map(|t| serde_json::from_str::<Value>(t).unwrap())
            .filter(|a| a["n"].as_u64().is_some_and(|n| n <= seen))
            .collect();
        assert!(
            !alarms.is_empty(),
            "{target}: no alarm within {TICKS} ticks\n{explain}"
        );
        let last = alarms.last().unwrap()["n"].as_u64().unwrap();
        let expected: Vec<(u64, f64)> = readings
            .iter()
            .filter(|r| r["filtered"].as_f64().unwrap() > ABOVE && r["n"].as_u64().unwrap() <= last)
            .map(|r| (r["n"].as_u64().unwrap(), r["filtered"].as_f64().unwrap()))
            .collect();
        let got: Vec<(u64, f64)> = alarms
            .iter()
            .map(|a| {
                assert_eq!(a["from"], "c/temperature", "{target}: {a}");
                assert_eq!(a["above"].as_f64(), Some(ABOVE), "{target}: {a}");
                (a["n"].as_u64().unwrap(), a["filtered"].as_f64().unwrap())
            })
            .collect();
        assert_eq!(got, expected, "{target}: alarms\n{explain}");
        assert!(
            got.len() < last as usize,
            "{target}: every record raised an alarm\n{explain}"
        );
        eprintln!(
            "{target}: {TICKS} records alike (the last: {}), {} alarms up to tick {last}, {:.1} s",
            c_records[TICKS - 1],
            got.len(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// A bad config fails the start of both alike, with the same line.
#[test]
fn the_c_sensor_filter_refuses_a_bad_alpha_like_the_rust_one() {
    let target = "x86_64-linux";
    let s = shared();
    let bad =
        "timeout_ms = 20000\nconfig = \"alpha=2\"\nrestart = { backoff_ms = 100, max_crashes = 1 }";
    let mut config = module_entry("rust", &s.artifact("sensor_filter.wasm", target), bad);
    config += &module_entry("c", &s.artifact("c/sensor_filter.wasm", target), bad);
    let mut serve = Serve::start(&Device::new(target), &config);
    let records = serve.wait_until(Duration::from_secs(60), |r| {
        !of(r, "rust", "failed").is_empty() && !of(r, "c", "failed").is_empty()
    });
    let explain = serve.explain();
    for module in ["rust", "c"] {
        assert_eq!(
            log_lines(&records, module).first().copied(),
            Some("init failed: alpha `2` must be a number in (0, 1]"),
            "{module}\n{explain}"
        );
    }
}

/// The C module's artifact is small: a fraction of the Rust one's for the same work.
#[test]
fn the_c_sensor_filter_artifact_is_small() {
    for target in DEVICES {
        let size = |name: &str| {
            std::fs::metadata(shared().artifact(name, target))
                .unwrap()
                .len()
        };
        let wasm = |name: &str| std::fs::metadata(kiln_e2e::source(name)).unwrap().len();
        let (c, rust) = (size("c/sensor_filter.wasm"), size("sensor_filter.wasm"));
        eprintln!(
            "{target}: sensor filter artifact: C {c} bytes (wasm {}), Rust {rust} bytes (wasm {})",
            wasm("c/sensor_filter.wasm"),
            wasm("sensor_filter.wasm")
        );
        assert!(
            c < rust && c < 256 * 1024,
            "{target}: the C artifact is {c} bytes, the Rust one {rust}"
        );
    }
}

/// A C module built with KILN_NO_LIBC, and the Zig one (examples/zig, built for
/// wasm32-freestanding), import nothing but `kiln`: the lean kilnd (no WASI) runs
/// them, and they publish what the counter fixture (WAT) publishes.
#[test]
fn c_and_zig_modules_without_libc_run_on_the_lean_kilnd_like_the_wat_counter() {
    for target in kiln_e2e::LEAN_DEVICES {
        let s = shared();
        let tick = "tick_ms = 50\ntimeout_ms = 20000\nconfig = \"3\"";
        let mut config = module_entry("wat", &s.artifact("fixtures/counter.wat", target), tick);
        config += &module_entry("c", &s.artifact("c/counter.wasm", target), tick);
        config += &module_entry("zig", &s.artifact("zig/counter.wasm", target), tick);
        let mut serve = Serve::start(&Device::lean(target), &config);
        let records = serve.wait_until(Duration::from_secs(120), |r| {
            ["wat", "c", "zig"].iter().all(|m| texts(r, m).len() >= 30)
        });
        let explain = serve.explain();
        let expected: Vec<String> = (1..=30).map(|n| format!("{n:08x}")).collect();
        assert_eq!(
            texts(&records, "wat")[..30],
            expected[..],
            "{target}\n{explain}"
        );
        assert_eq!(
            texts(&records, "c")[..30],
            expected[..],
            "{target}\n{explain}"
        );
        assert_eq!(
            texts(&records, "zig")[..30],
            expected[..],
            "{target}\n{explain}"
        );
        eprintln!(
            "{target}: lean kilnd: the C counter ({} bytes of wasm) and the Zig one ({} bytes) published 1..=30 like the WAT one",
            std::fs::metadata(kiln_e2e::source("c/counter.wasm")).unwrap().len(),
            std::fs::metadata(kiln_e2e::source("zig/counter.wasm")).unwrap().len()
        );
    }
}
