//! Modules compiled on the host run on every target with the right output and exit code.

use std::fs;

use crate::util::{path_str, shared, Device, Run};
use crate::DEVICES;

#[test]
fn hello_gets_args_env_a_preopened_file_and_its_exit_code_on_every_target() {
    let data = tempfile::tempdir().unwrap();
    fs::write(data.path().join("config.txt"), "sensor=42\n").unwrap();
    let mapping = format!("{}:/data", path_str(data.path()));
    for device in DEVICES {
        let artifact = shared().artifact("hello.wasm", device);
        Device::new(device)
            .run(
                &artifact,
                &[
                    "--dir",
                    &mapping,
                    "--env",
                    "GREETING=hej",
                    "--",
                    "board",
                    "--read",
                    "/data/config.txt",
                    "--exit",
                    "7",
                ],
            )
            .assert_code(7)
            .assert_stdout("hej, board! (6 args)\n/data/config.txt: sensor=42\n");
    }
}

#[test]
fn a_module_sees_only_the_directories_it_was_given() {
    let artifact = shared().artifact("hello.wasm", "x86_64-linux");
    let run =
        Device::new("x86_64-linux").run(&artifact, &["--", "board", "--read", "/etc/hostname"]);
    run.assert_code(3).assert_stdout("hello, board! (4 args)\n");
    assert!(run.stderr.contains("cannot read /etc/hostname"), "{run}");
}

#[test]
fn the_host_environment_does_not_leak_into_the_module() {
    let artifact = shared().artifact("hello.wasm", "x86_64-linux");
    // GREETING is set for kilnd itself but not passed with --env: the module must not see it.
    let mut cmd = Device::new("x86_64-linux").run_command(&artifact, &["--", "x"]);
    cmd.env("GREETING", "leaked");
    Run::new(cmd)
        .assert_code(0)
        .assert_stdout("hello, x! (2 args)\n");
}

#[test]
fn compute_gives_the_same_answer_on_every_target() {
    for device in DEVICES {
        let artifact = shared().artifact("compute.wat", device);
        Device::new(device)
            .run(&artifact, &[])
            .assert_code(0)
            .assert_stdout("primes below 1000000: 78498, sum 37550402023\n");
    }
}

#[test]
fn a_board_profile_runs_on_its_emulated_cpu() {
    let artifact = shared().artifact("hello.wasm", "rpi4-aarch64");
    Device::new("rpi4-aarch64")
        .run(&artifact, &["--", "pi"])
        .assert_code(0)
        .assert_stdout("hello, pi! (2 args)\n");
}

#[test]
fn traps_end_in_one_line_naming_the_trap_on_every_target() {
    for device in DEVICES {
        let trap = Device::new(device).run(&shared().artifact("fixtures/trap.wat", device), &[]);
        trap.assert_code(80);
        assert_eq!(trap.stdout, "about to trap\n", "{trap}");
        assert_eq!(
            trap.stderr, "kilnd: error: module `trap` trapped: unreachable [unreachable]\n",
            "{trap}"
        );

        let overflow =
            Device::new(device).run(&shared().artifact("fixtures/overflow.wat", device), &[]);
        overflow.assert_refused(80, &["module `overflow` trapped: call stack exhausted"]);
    }
}

#[test]
fn an_import_no_device_provides_is_named() {
    let artifact = shared().artifact("fixtures/unknown-import.wat", "x86_64-linux");
    Device::new("x86_64-linux")
        .run(&artifact, &[])
        .assert_refused(79, &["`vendor`.`blink_led`", "does not provide"]);
}

#[test]
fn bounds_checked_artifacts_run_alike_and_still_trap_out_of_bounds() {
    for device in DEVICES {
        for flags in [&[][..], &["--bounds-checks"][..]] {
            let d = Device::new(device);
            let oob = shared().artifact_with("fixtures/out-of-bounds.wat", device, flags);
            d.run(&oob, &[]).assert_code(0);
            let run = d.run(&oob, &["--", "store"]);
            assert!(
                run.code == Some(80) && run.stderr.contains("out of bounds"),
                "{device} {flags:?}: the store past the memory must trap\n{run}"
            );
            let hello = shared().artifact_with("hello.wasm", device, flags);
            d.run(&hello, &["--", "x"])
                .assert_code(0)
                .assert_stdout("hello, x! (2 args)\n");
        }
    }
}

/// Issue 31: a large C++ program built with wasm exceptions trapped on riscv64 only.
/// fixtures/exceptions.wat throws and catches the ways such programs do (catch then
/// touch memory, many values live across a throwing call, cleanups that rethrow,
/// call_indirect, multi-value tags, stack arguments, 15000 rethrows through 5000
/// frames); every target, with and without --bounds-checks, must print the same.
#[test]
fn exceptions_unwind_alike_on_every_target() {
    let expected =
        "1 107\n2 305000\n3 5750\n4 7308226226776\n4 2100\n5 488671864700\n6 109\n7 21\n";
    for device in DEVICES {
        for flags in [&[][..], &["--bounds-checks"][..]] {
            let artifact = shared().artifact_with("fixtures/exceptions.wat", device, flags);
            let run = Device::new(device).run(&artifact, &[]);
            assert!(
                run.code == Some(0) && run.stdout == expected,
                "{device} {flags:?}: exceptions must unwind as on every other target\n{run}"
            );
        }
    }
}
