//! The `serial` capability (docs/src/capabilities.md): a GPS receiver simulated on pty
//! pairs (the test writes NMEA sentences to each master; kilnd.toml grants each slave
//! by name), read by the C module (examples/c/nmea.c) and its Rust twin
//! (examples/nmea), each compiled by `kiln compile` for every target and run under
//! `kilnd serve`: both publish the same fixes, on every target. A module that imports
//! the capability without a grant is refused at load, naming it; a module opens the
//! port granted under a name and no other. GPIO and I2C grants are refused or named
//! here when missing; the board test runs them against the kernel's simulators.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sandbox::{module_entry, of, Serve};
use crate::util::{shared, Device};
use crate::DEVICES;

/// A pty pair: the master is the receiver's end, the slave the device file kilnd.toml
/// grants. The slave stays open here, so what is written before a worker opens it
/// waits in the pty.
struct Pty {
    master: File,
    _slave: File,
    path: String,
}

fn pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty fills two descriptors and a name buffer of its size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two open descriptors this test now owns, and a
    // NUL-terminated name.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            _slave: File::from_raw_fd(slave),
            path: std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned(),
        }
    }
}

/// `$body*HH`, with the checksum NMEA 0183 gives it.
fn sentence(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

/// What the receiver sends: fixes north-east and south-west, a sentence that is not a
/// fix, one whose checksum is wrong, one longer than NMEA allows, one whose latitude
/// is not a number; then a last fix.
fn receiver_output() -> Vec<String> {
    let long = format!("GPGGA,{}", "9".repeat(90));
    vec![
        sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
        sentence("GPRMC,123520,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"),
        "$GPGGA,123521,4807.040,N,01131.002,E,1,08,0.9,545.6,M,46.9,M,,*00\r\n".into(),
        sentence(&long),
        sentence("GPGGA,123522,33x5.000,S,07040.500,W,1,05,1.2,12.0,M,,M,,"),
        sentence("GNGGA,123523,3345.500,S,07040.500,W,2,11,0.7,-3.5,M,,M,,"),
        sentence("GPGGA,123524.00,5231.2000,N,01324.3000,E,1,09,0.8,34,M,,M,,"),
    ]
}

/// The fixes both modules must publish for [`receiver_output`].
const FIXES: [&str; 3] = [
    r#"{"time":"123519","lat_udeg":48117300,"lon_udeg":11516666,"sats":8,"alt_dm":5454,"bad":0}"#,
    r#"{"time":"123523","lat_udeg":-33758333,"lon_udeg":-70675000,"sats":11,"alt_dm":-35,"bad":3}"#,
    r#"{"time":"123524","lat_udeg":52520000,"lon_udeg":13405000,"sats":9,"alt_dm":340,"bad":3}"#,
];

fn fixes(records: &[Value], module: &str) -> Vec<String> {
    of(records, module, "telemetry")
        .iter()
        .filter(|r| r["stream"] == "fix")
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect()
}

fn logged(records: &[Value], module: &str, needle: &str) -> bool {
    of(records, module, "log")
        .iter()
        .any(|r| r["line"].as_str().is_some_and(|l| l.contains(needle)))
}

#[test]
fn c_and_rust_modules_read_the_granted_serial_port_alike_on_every_target() {
    for target in DEVICES {
        let started = Instant::now();
        let s = shared();
        let c = s.artifact("c/nmea.wasm", target);
        let rust = s.artifact("nmea.wasm", target);
        let (mut gps, mut gps2, spare) = (pty(), pty(), pty());
        let run = "tick_ms = 50\ntimeout_ms = 20000\n";
        let mut config = String::new();
        for (name, port, modules) in [
            ("gps", &gps, "\"c\""),
            ("gps2", &gps2, "\"rust\""),
            ("spare", &spare, "\"wrong-name\""),
        ] {
            config += &format!(
                "[[serial]]\nname = {name:?}\npath = {:?}\nbaud = 4800\nmodules = [{modules}]\n",
                port.path
            );
        }
        config += &module_entry("c", &c, run);
        config += &module_entry("rust", &rust, &format!("{run}config = \"port=gps2\""));
        // Granted no port at all, and granted `spare` but opening `gps`.
        config += &module_entry("ungranted", &c, run);
        config += &module_entry("wrong-name", &rust, run);
        let mut serve = Serve::start(&Device::new(target), &config);
        serve.wait_until(Duration::from_secs(120), |r| {
            logged(r, "c", "reading NMEA from serial port `gps`")
                && logged(r, "rust", "reading NMEA from serial port `gps2`")
        });
        for line in receiver_output() {
            gps.master.write_all(line.as_bytes()).unwrap();
            gps2.master.write_all(line.as_bytes()).unwrap();
        }
        let records = serve.wait_until(Duration::from_secs(60), |r| {
            fixes(r, "c").len() >= FIXES.len()
                && fixes(r, "rust").len() >= FIXES.len()
                && !of(r, "ungranted", "stopped").is_empty()
                && logged(r, "wrong-name", "no serial port `gps`")
        });
        let explain = serve.explain();
        assert_eq!(fixes(&records, "c"), FIXES, "{target}: C\n{explain}");
        assert_eq!(fixes(&records, "rust"), FIXES, "{target}: Rust\n{explain}");

        let refusal = of(&records, "ungranted", "stopped")[0];
        assert_eq!(refusal["reason"], "load-failed", "{target}: {refusal}");
        let why = refusal["why"].as_str().unwrap();
        assert!(
            why.contains("imports `kiln`.`serial_open`")
                && why.contains("not granted the `serial` capability"),
            "{target}: {why}"
        );
        assert!(
            logged(
                &records,
                "wrong-name",
                "no serial port `gps`: not granted to this module"
            ),
            "{target}\n{explain}"
        );
        eprintln!(
            "{target}: C and Rust read the same {} fixes in {:.1}s",
            FIXES.len(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// The `gpio` and `i2c` capabilities where there is no such hardware (the board test,
/// `board::gpio_and_i2c_reach_the_module_granted_them`, has it): the panel module
/// granted nothing is refused at load naming the first capability it lacks, and one
/// granted a chip that is not there fails its start naming the grant and the path.
#[test]
fn gpio_and_i2c_grants_are_refused_or_named_when_missing() {
    let target = "x86_64-linux";
    let s = shared();
    let panel = s.artifact("c/panel.wasm", target);
    let run = "tick_ms = 50\n";
    let mut config = String::from(
        "[[gpio]]\nname = \"buttons\"\nchip = \"/dev/kiln-no-such-gpiochip\"\nlines = [0, 1]\ndirection = \"input\"\nmodules = [\"missing\"]\n",
    );
    config += &module_entry("ungranted", &panel, run);
    config += &module_entry("missing", &panel, run);
    let mut serve = Serve::start(&Device::new(target), &config);
    let records = serve.wait_until(Duration::from_secs(60), |r| {
        !of(r, "ungranted", "stopped").is_empty() && !of(r, "missing", "stopped").is_empty()
    });
    let why = |module: &str| {
        of(&records, module, "stopped")[0]["why"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ungranted = why("ungranted");
    assert!(
        ungranted.contains("imports `kiln`.`gpio_open`")
            && ungranted.contains("not granted the `gpio` capability"),
        "{ungranted}"
    );
    let missing = why("missing");
    assert!(
        missing.contains(
            "cannot open gpio lines `buttons` (`/dev/kiln-no-such-gpiochip`, granted in kilnd.toml)"
        ),
        "{missing}"
    );
}

fn temps(records: &[Value], module: &str) -> Vec<String> {
    of(records, module, "telemetry")
        .iter()
        .filter(|r| r["stream"] == "temp")
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect()
}

/// The `file` capability on every target: the C module `examples/c/iio.c` reads an
/// IIO-style temperature attribute granted as `temp` (here a file the test rewrites,
/// as the kernel would update the attribute) and publishes each value it reads; a
/// module granted nothing is refused at load naming the capability.
#[test]
fn a_granted_file_is_read_as_it_is_now_on_every_target() {
    for target in DEVICES {
        let s = shared();
        let iio = s.artifact("c/iio.wasm", target);
        let dir = tempfile::tempdir().unwrap();
        let attribute = dir.path().join("in_temp_input");
        std::fs::write(&attribute, "23456\n").unwrap();
        let mut config = format!(
            "[[file]]\nname = \"temp\"\npath = {:?}\nmodules = [\"iio\"]\n",
            attribute.to_string_lossy()
        );
        config += &module_entry("iio", &iio, "tick_ms = 50\ntimeout_ms = 20000\n");
        config += &module_entry("ungranted", &iio, "tick_ms = 50\n");
        let mut serve = Serve::start(&Device::new(target), &config);
        serve.wait_until(Duration::from_secs(120), |r| {
            temps(r, "iio").iter().any(|t| t == r#"{"mC":23456}"#)
        });
        std::fs::write(&attribute, "-1250\n").unwrap();
        let records = serve.wait_until(Duration::from_secs(60), |r| {
            temps(r, "iio").iter().any(|t| t == r#"{"mC":-1250}"#)
                && !of(r, "ungranted", "stopped").is_empty()
        });
        let why = of(&records, "ungranted", "stopped")[0]["why"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            why.contains("imports `kiln`.`file_open`")
                && why.contains("not granted the `file` capability"),
            "{target}: {why}"
        );
        assert!(
            temps(&records, "iio").iter().all(|t| !t.contains("error")),
            "{target}: {:?}",
            temps(&records, "iio")
        );
    }
}
