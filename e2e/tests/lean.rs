//! The lean kilnd (`--no-default-features --features tls`: no WASI) on an emulated
//! device: it runs kiln-ABI reactors under the same sandbox as the full build, keeps a
//! healthy one running while misbehaving neighbours are contained, and refuses a WASI
//! module at load, naming the imports it lacks.

use std::time::Duration;

use kiln_e2e::LEAN_DEVICES;

use crate::sandbox::{module_entry, of, outlived, Serve};
use crate::util::{shared, Device};

#[test]
fn the_lean_kilnd_refuses_a_wasi_module_naming_what_it_imports() {
    for target in LEAN_DEVICES {
        let device = Device::lean(target);
        let hello = shared().artifact("hello.wasm", target);
        device.run(&hello, &[]).assert_refused(
            79,
            &[
                "module `hello` imports `wasi_snapshot_preview1`.",
                "it provides kiln",
                "the lean kilnd, built without WASI",
            ],
        );
    }
}

#[test]
fn the_lean_kilnd_keeps_a_reactor_running_while_its_neighbours_are_contained() {
    for target in LEAN_DEVICES {
        let device = Device::lean(target);
        let s = shared();
        let fixture = |name: &str| s.artifact(&format!("fixtures/{name}.wat"), target);
        let contained = "timeout_ms = 1000\nrestart = { backoff_ms = 100, max_crashes = 2 }";
        let mut config = module_entry(
            "counter",
            &fixture("counter"),
            "tick_ms = 100\ntimeout_ms = 20000\nconfig = \"1\"",
        );
        config += &module_entry(
            "spin-fuel",
            &s.artifact_with("fixtures/spin.wat", target, &["--fuel", "5000000"]),
            "timeout_ms = 60000\nrestart = { backoff_ms = 100, max_crashes = 2 }",
        );
        config += &module_entry("spin", &fixture("spin"), contained);
        config += &module_entry(
            "memory-bomb",
            &fixture("memory-bomb"),
            &format!("memory_limit = \"4MiB\"\n{contained}"),
        );
        config += &module_entry(
            "trap-tick",
            &fixture("trap-tick"),
            "tick_ms = 50\ntimeout_ms = 20000\nrestart = { backoff_ms = 300, max_crashes = 2 }",
        );
        let misbehaving = ["spin-fuel", "spin", "memory-bomb", "trap-tick"];
        let mut serve = Serve::start(&device, &config);
        let records = serve.wait_until(Duration::from_secs(180), |records| {
            outlived(records, "counter", &misbehaving)
        });
        assert_eq!(of(&records, "counter", "started").len(), 1, "{target}");
        assert!(of(&records, "counter", "stopped").is_empty(), "{target}");
        // The same reasons as under the full build: the sandbox is not WASI's.
        for (module, reason) in [
            ("spin-fuel", "fuel-exhausted: fuel exhausted in kiln_tick"),
            (
                "spin",
                "watchdog: watchdog: kiln_tick did not return within 1000 ms",
            ),
            ("memory-bomb", "trap: trapped in kiln_tick: unreachable"),
            (
                "trap-tick",
                "trap: trapped in kiln_tick: integer divide by zero",
            ),
        ] {
            let whys: Vec<String> = of(&records, module, "stopped")
                .iter()
                .map(|r| {
                    format!(
                        "{}: {}",
                        r["reason"].as_str().unwrap(),
                        r["why"].as_str().unwrap()
                    )
                })
                .collect();
            assert_eq!(whys.len(), 2, "{target} {module}: {whys:?}");
            assert!(
                whys.iter().all(|w| w.starts_with(reason)),
                "{target} {module}: expected `{reason}`, got {whys:?}"
            );
        }
    }
}
