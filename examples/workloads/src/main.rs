//! Five workloads an edge module might run, and two the field publishes figures for
//! (CoreMark, fib(40)), each timed around its kernel only (input generation, start-up
//! and compilation are outside the clock), so the same program built natively and for
//! wasm32-wasip1 compares execution speed and nothing else.
//!
//! ```text
//! workloads <json|sha256|regex|deflate|nbody|coremark|fib>   prints: NAME KERNEL_MS CHECKSUM
//! ```
//!
//! The checksum proves each build did the same work.

use std::time::Instant;

use sha2::{Digest, Sha256};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let work: fn() -> u64 = match name.as_str() {
        "json" => json,
        "sha256" => sha256,
        "regex" => regex,
        "deflate" => deflate,
        "nbody" => nbody,
        "coremark" => coremark,
        "fib" => fib,
        #[cfg(feature = "extra-workload")]
        "fnv" => fnv,
        _ => {
            eprintln!("usage: workloads <json|sha256|regex|deflate|nbody|coremark|fib>");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let checksum = work();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("{name} {ms:.3} {checksum}");
}

/// FNV-1a over a generated log: the one function the transfer bench adds to this
/// program (feature `extra-workload`) to measure what a small code change costs on
/// the wire.
#[cfg(feature = "extra-workload")]
fn fnv() -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in log_text(1 << 20).bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// CoreMark 1.0's 2K performance run (seeds 0, 0, 0x66) for a fixed
/// number of iterations rather than its own ten seconds, so every build does the same
/// work. The checksum is CoreMark's final CRC; a run whose CRCs do not validate exits.
fn coremark() -> u64 {
    const ITERATIONS: u32 = 6_000;
    let config = coremark::Config {
        iterations: std::hint::black_box(ITERATIONS),
        ..Default::default()
    };
    let results = coremark::run(&config);
    // CoreMark counts a run under ten seconds as one more error; this one is short on
    // purpose, so only the CRCs of a recognised run are held against it.
    let short = i32::from(results.total_secs() < 10.0);
    if results.known_id < 0 || results.errors - short != 0 || results.iterations != ITERATIONS {
        eprintln!("coremark: the run did not validate\n{results}");
        std::process::exit(1);
    }
    u64::from(results.crcfinal)
}

/// fib(40), naively recursive: calls and integer adds, the figure wasm3's README
/// tabulates across runtimes and boards.
fn fib() -> u64 {
    fn fib(n: u32) -> u64 {
        if n < 2 {
            u64::from(n)
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    fib(std::hint::black_box(40))
}

/// A deterministic byte stream (xorshift), so every build sees the same input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Text that looks like a device's log: timestamps, levels, addresses, numbers.
fn log_text(bytes: usize) -> String {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let levels = ["INFO", "WARN", "ERROR", "DEBUG"];
    let words = [
        "sensor", "read", "timeout", "retry", "mqtt", "publish", "ok", "link",
    ];
    let mut text = String::with_capacity(bytes + 128);
    while text.len() < bytes {
        let r = rng.next();
        text.push_str(&format!(
            "2026-11-26T03:{:02}:{:02} {} {}.{}.{}.{} {} {} {}\n",
            r % 60,
            (r >> 8) % 60,
            levels[(r >> 16) as usize % 4],
            (r >> 20) % 256,
            (r >> 28) % 256,
            (r >> 36) % 256,
            (r >> 44) % 256,
            words[(r >> 52) as usize % 8],
            words[(r >> 56) as usize % 8],
            r % 100_000
        ));
    }
    text
}

/// Parse a JSON document of 2,000 sensor readings (about 0.7 MB) 10 times.
fn json() -> u64 {
    let mut rng = Rng(42);
    let readings: Vec<String> = (0..2000)
        .map(|i| {
            let r = rng.next();
            let samples: Vec<String> = (0..8).map(|k| ((r >> (k * 7)) % 1000).to_string()).collect();
            format!(
                r#"{{"id":{i},"sensor":"greenhouse-{}","t":{}.{},"ok":{},"tags":["a","b","c"],"samples":[{}],"note":"{}"}}"#,
                r % 16,
                r % 40,
                r % 10,
                r % 2 == 0,
                samples.join(","),
                "x".repeat((r % 400) as usize)
            )
        })
        .collect();
    let doc = format!("[{}]", readings.join(","));
    let mut sum = 0u64;
    for _ in 0..10 {
        let v: serde_json::Value = serde_json::from_str(&doc).expect("valid JSON");
        for reading in v.as_array().expect("array") {
            sum += reading["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| s.as_u64().unwrap_or(0))
                .sum::<u64>();
        }
    }
    sum
}

/// SHA-256 over 32 MiB.
fn sha256() -> u64 {
    let mut rng = Rng(7);
    let block: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
    let mut hasher = Sha256::new();
    for _ in 0..32 {
        hasher.update(&block);
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Scan 4 MB of log text for IPv4 addresses and ERROR lines about timeouts.
fn regex() -> u64 {
    let text = log_text(4 << 20);
    let ip = regex::Regex::new(r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\b").expect("regex");
    let errors = regex::Regex::new(r"(?m)^\S+ ERROR .*timeout.*$").expect("regex");
    let mut sum = 0u64;
    for caps in ip.captures_iter(&text) {
        sum += caps[4].parse::<u64>().unwrap_or(0);
    }
    sum + errors.find_iter(&text).count() as u64
}

/// Compress 1 MB of log text with deflate (level 6), then inflate it again.
fn deflate() -> u64 {
    let text = log_text(1 << 20);
    let packed = miniz_oxide::deflate::compress_to_vec(text.as_bytes(), 6);
    let unpacked = miniz_oxide::inflate::decompress_to_vec(&packed).expect("inflate");
    assert_eq!(unpacked.len(), text.len());
    packed.len() as u64
}

/// The n-body benchmark: five planets, 1,000,000 steps, f64.
fn nbody() -> u64 {
    const PI: f64 = std::f64::consts::PI;
    const SOLAR_MASS: f64 = 4.0 * PI * PI;
    const DAYS: f64 = 365.24;
    let mut bodies: [[f64; 7]; 5] = [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, SOLAR_MASS],
        [
            4.841_431_442_464_72,
            -1.160_320_044_027_428_4,
            -0.103_622_044_471_123_1,
            1.660_076_642_744_037e-3 * DAYS,
            7.699_011_184_197_404e-3 * DAYS,
            -6.904_600_169_720_63e-5 * DAYS,
            9.547_919_384_243_266e-4 * SOLAR_MASS,
        ],
        [
            8.343_366_718_244_58,
            4.124_798_564_124_305,
            -4.035_234_171_143_214e-1,
            -2.767_425_107_268_624e-3 * DAYS,
            4.998_528_012_349_172e-3 * DAYS,
            2.304_172_975_737_639_3e-5 * DAYS,
            2.858_859_806_661_308e-4 * SOLAR_MASS,
        ],
        [
            1.289_436_956_213_913_1e1,
            -1.511_115_140_169_863_1e1,
            -2.233_075_788_926_557_3e-1,
            2.964_601_375_647_616e-3 * DAYS,
            2.378_471_739_594_809_5e-3 * DAYS,
            -2.965_895_685_402_375_6e-5 * DAYS,
            4.366_244_043_351_563e-5 * SOLAR_MASS,
        ],
        [
            1.537_969_711_485_091_1e1,
            -2.591_931_460_998_796_4e1,
            1.792_587_729_503_711_8e-1,
            2.680_677_724_903_893_2e-3 * DAYS,
            1.628_241_700_382_423e-3 * DAYS,
            -9.515_922_545_197_159e-5 * DAYS,
            5.151_389_020_466_114_5e-5 * SOLAR_MASS,
        ],
    ];
    let dt = 0.01;
    for _ in 0..1_000_000 {
        for i in 0..5 {
            for j in i + 1..5 {
                let dx = bodies[i][0] - bodies[j][0];
                let dy = bodies[i][1] - bodies[j][1];
                let dz = bodies[i][2] - bodies[j][2];
                let d2 = dx * dx + dy * dy + dz * dz;
                let mag = dt / (d2 * d2.sqrt());
                let (mi, mj) = (bodies[i][6], bodies[j][6]);
                bodies[i][3] -= dx * mj * mag;
                bodies[i][4] -= dy * mj * mag;
                bodies[i][5] -= dz * mj * mag;
                bodies[j][3] += dx * mi * mag;
                bodies[j][4] += dy * mi * mag;
                bodies[j][5] += dz * mi * mag;
            }
        }
        for b in bodies.iter_mut() {
            b[0] += dt * b[3];
            b[1] += dt * b[4];
            b[2] += dt * b[5];
        }
    }
    let e: f64 = bodies.iter().map(|b| b[0] + b[1] + b[2]).sum();
    (e.abs() * 1e9) as u64
}
