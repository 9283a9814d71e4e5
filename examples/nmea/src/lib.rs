//! A GPS receiver on a serial port (the `serial` capability: kilnd.toml grants the
//! port as `gps` to this module), the Rust twin of `examples/c/nmea.c`: each tick it
//! reads what the receiver sent, and for each NMEA GGA sentence whose checksum holds
//! it publishes on `fix`
//!
//! ```text
//! {"time":"123519","lat_udeg":48117300,"lon_udeg":11516666,"sats":8,"alt_dm":5454,"bad":0}
//! ```
//!
//! in integers, so both print the same bytes. `bad` counts the sentences refused so far
//! (a checksum that does not hold, a field that is not a number, a line longer than 82
//! characters). Config: `port=gps` (the default).

use std::time::Duration;

use kiln_guest::{config_value, log, telemetry, Level, Reactor, Serial};

/// NMEA 0183's longest sentence.
const MAX_LINE: usize = 82;

struct Nmea {
    port: Serial,
    line: Vec<u8>,
    too_long: bool,
    bad: u32,
}

impl Reactor for Nmea {
    fn init() -> Result<Self, String> {
        let name = config_value("port").unwrap_or_else(|| "gps".into());
        let port = Serial::open(&name).map_err(|e| format!("no serial port `{name}`: {e}"))?;
        log(
            Level::Info,
            &format!("reading NMEA from serial port `{name}`"),
        );
        Ok(Nmea {
            port,
            line: Vec::with_capacity(MAX_LINE),
            too_long: false,
            bad: 0,
        })
    }

    fn tick(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 256];
        loop {
            let n = self
                .port
                .read(&mut buf, Duration::ZERO)
                .map_err(|e| format!("serial read failed: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            for &c in &buf[..n] {
                match c {
                    b'\r' => {}
                    b'\n' => {
                        let line = std::mem::take(&mut self.line);
                        if self.too_long {
                            self.bad += 1;
                        } else if !line.is_empty() {
                            self.sentence(&line)?;
                        }
                        self.too_long = false;
                    }
                    _ if self.line.len() < MAX_LINE => self.line.push(c),
                    _ => self.too_long = true,
                }
            }
        }
    }
}

/// A GGA sentence's fix, or `None` if it is refused.
struct Fix {
    time: String,
    lat_udeg: i64,
    lon_udeg: i64,
    sats: i64,
    alt_dm: i64,
}

impl Nmea {
    fn sentence(&mut self, s: &[u8]) -> Result<(), String> {
        match parse(s) {
            Parsed::Fix(f) => telemetry!(
                "fix",
                "{{\"time\":\"{}\",\"lat_udeg\":{},\"lon_udeg\":{},\"sats\":{},\"alt_dm\":{},\"bad\":{}}}",
                f.time,
                f.lat_udeg,
                f.lon_udeg,
                f.sats,
                f.alt_dm,
                self.bad
            ),
            Parsed::Other => Ok(()),
            Parsed::Refused => {
                self.bad += 1;
                Ok(())
            }
        }
    }
}

enum Parsed {
    Fix(Fix),
    Other,
    Refused,
}

fn parse(s: &[u8]) -> Parsed {
    let Ok(s) = std::str::from_utf8(s) else {
        return Parsed::Refused;
    };
    let Some(star) = s.rfind('*') else {
        return Parsed::Refused;
    };
    if !s.starts_with('$') || s.len() - star != 3 {
        return Parsed::Refused;
    }
    let sum = s[1..star].bytes().fold(0u8, |a, b| a ^ b);
    let given = &s[star + 1..];
    let upper_hex = given
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    if !upper_hex || u8::from_str_radix(given, 16) != Ok(sum) {
        return Parsed::Refused;
    }
    if s.get(3..7) != Some("GGA,") {
        return Parsed::Other;
    }
    let fields: Vec<&str> = s[..star].split(',').collect();
    let field = |n: usize| fields.get(n).copied();
    let fix = (|| {
        let time = field(1).filter(|t| t.len() >= 6)?;
        Some(Fix {
            time: time.get(..6)?.to_string(),
            lat_udeg: degrees(field(2)?, field(3)?)?,
            lon_udeg: degrees(field(4)?, field(5)?)?,
            sats: digits(field(7)?)?,
            alt_dm: decimetres(field(9)?)?,
        })
    })();
    fix.map_or(Parsed::Refused, Parsed::Fix)
}

/// Digits only, at least one.
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 12 {
        return None;
    }
    s.parse().ok()
}

/// `ddmm.mmmm` (or `dddmm.mmmm`) and its hemisphere, in micro-degrees.
fn degrees(text: &str, hemisphere: &str) -> Option<i64> {
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) if !f.is_empty() => (w, f),
        Some((w, _)) => (w, "0"),
        None => (text, "0"),
    };
    if whole.len() < 3 || whole.len() > 11 || frac.len() > 6 {
        return None;
    }
    let (ddmm, f) = (digits(whole)?, digits(frac)?);
    let scale = 10i64.pow(frac.len() as u32);
    let minutes = ddmm % 100;
    if minutes >= 60 {
        return None;
    }
    let v = (ddmm / 100) * 1_000_000 + (minutes * scale + f) * 1_000_000 / (60 * scale);
    match hemisphere {
        "N" | "E" => Some(v),
        "S" | "W" => Some(-v),
        _ => None,
    }
}

/// `545.4` (or `-12`) in decimetres.
fn decimetres(text: &str) -> Option<i64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text),
    };
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || whole.len() > 11 {
        return None;
    }
    let tenth = match frac.bytes().next() {
        None => 0,
        Some(b) if b.is_ascii_digit() => i64::from(b - b'0'),
        Some(_) => return None,
    };
    let v = digits(whole)? * 10 + tenth;
    Some(if negative { -v } else { v })
}

kiln_guest::reactor!(Nmea);
