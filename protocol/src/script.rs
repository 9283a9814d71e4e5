//! A conformance script compiled for one target: the host turns a `.wast` file into
//! this (every module a signed artifact), `kilnd conformance` replays it with the
//! headless loader on the device and prints one outcome line per command:
//!
//! ```text
//! ok 120
//! fail 133 expected i32 7, got i32 6
//! ```
//!
//! Host-only checks (`assert_invalid`, `assert_malformed`) never reach the device.

use serde::{Deserialize, Serialize};

/// Top-level message, tagged by version (postcard is not self-describing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Script {
    V1(ScriptV1),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptV1 {
    /// The `.wast` file name, for messages.
    pub source: String,
    pub commands: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Load a signed artifact and instantiate it; `name` is its `$id` in the script.
    Module {
        line: u32,
        name: Option<String>,
        artifact: Vec<u8>,
        expect: Instantiation,
    },
    /// Make a module's exports importable under `as_name`.
    Register {
        line: u32,
        module: Option<String>,
        as_name: String,
    },
    Action {
        line: u32,
        action: Action,
        expect: Expect,
    },
    /// A module the host could not compile: the device forgets `name` (and the
    /// current module) so later commands cannot silently use a stale one.
    Broken {
        line: u32,
        name: Option<String>,
        why: String,
    },
}

impl Command {
    pub fn line(&self) -> u32 {
        match self {
            Command::Module { line, .. }
            | Command::Register { line, .. }
            | Command::Action { line, .. }
            | Command::Broken { line, .. } => *line,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Instantiation {
    Succeeds,
    /// `assert_unlinkable`: linking fails with this message.
    Unlinkable(String),
    /// `assert_trap` on a module: the start function traps.
    Traps(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    Invoke {
        module: Option<String>,
        field: String,
        args: Vec<Value>,
    },
    Get {
        module: Option<String>,
        global: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Expect {
    /// A bare `invoke`: anything but a trap.
    Completes,
    Returns(Vec<Pattern>),
    Traps(String),
    /// `assert_exhaustion`: the call stack runs out.
    Exhausts(String),
    /// `assert_exception`: the call ends in an uncaught wasm exception.
    Throws,
}

/// An argument. Floats are carried as bits so NaN payloads survive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    V128(u128),
    NullFuncRef,
    NullExternRef,
    ExternRef(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Pattern {
    I32(i32),
    I64(i64),
    F32(Float<u32>),
    F64(Float<u64>),
    /// Lanes in order; their widths add up to 128 bits.
    V128(Vec<Lane>),
    NullRef,
    /// Any non-null funcref.
    FuncRef,
    /// A non-null externref, holding this host value if given.
    ExternRef(Option<u32>),
    Either(Vec<Pattern>),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Float<T> {
    Bits(T),
    CanonicalNan,
    ArithmeticNan,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Lane {
    I8(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(Float<u32>),
    F64(Float<u64>),
}

impl Float<u32> {
    pub fn matches(&self, bits: u32) -> bool {
        let nan = bits & 0x7f80_0000 == 0x7f80_0000 && bits & 0x007f_ffff != 0;
        match *self {
            Float::Bits(b) => b == bits,
            Float::CanonicalNan => bits & 0x7fff_ffff == 0x7fc0_0000,
            Float::ArithmeticNan => nan && bits & 0x0040_0000 != 0,
        }
    }
}

impl Float<u64> {
    pub fn matches(&self, bits: u64) -> bool {
        let exp = 0x7ff0_0000_0000_0000;
        let nan = bits & exp == exp && bits & 0x000f_ffff_ffff_ffff != 0;
        match *self {
            Float::Bits(b) => b == bits,
            Float::CanonicalNan => bits & 0x7fff_ffff_ffff_ffff == 0x7ff8_0000_0000_0000,
            Float::ArithmeticNan => nan && bits & 0x0008_0000_0000_0000 != 0,
        }
    }
}

impl Lane {
    /// Does this lane match the little-endian `bytes` of its width?
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let le = |n: usize| {
            bytes[..n]
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        };
        match self {
            Lane::I8(v) => *v as u8 as u64 == le(1),
            Lane::I16(v) => *v as u16 as u64 == le(2),
            Lane::I32(v) => *v as u32 as u64 == le(4),
            Lane::I64(v) => *v as u64 == le(8),
            Lane::F32(f) => f.matches(le(4) as u32),
            Lane::F64(f) => f.matches(le(8)),
        }
    }

    pub fn width(&self) -> usize {
        match self {
            Lane::I8(_) => 1,
            Lane::I16(_) => 2,
            Lane::I32(_) | Lane::F32(_) => 4,
            Lane::I64(_) | Lane::F64(_) => 8,
        }
    }
}

/// Does `v128` (as the little-endian u128 wasmer returns) match `lanes`?
pub fn v128_matches(lanes: &[Lane], v128: u128) -> bool {
    let bytes = v128.to_le_bytes();
    let mut at = 0;
    for lane in lanes {
        let w = lane.width();
        if at + w > 16 || !lane.matches(&bytes[at..at + w]) {
            return false;
        }
        at += w;
    }
    at == 16
}

/// One line of `kilnd conformance` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(u32),
    Fail(u32, String),
}

impl Outcome {
    pub fn to_line(&self) -> String {
        match self {
            Outcome::Ok(line) => format!("ok {line}"),
            Outcome::Fail(line, why) => format!("fail {line} {}", why.replace('\n', " ")),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once(' ')?;
        let (line, why) = rest.split_once(' ').unwrap_or((rest, ""));
        let line = line.parse().ok()?;
        match kind {
            "ok" => Some(Outcome::Ok(line)),
            "fail" => Some(Outcome::Fail(line, why.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_patterns() {
        assert!(Float::<u32>::CanonicalNan.matches(0x7fc0_0000));
        assert!(Float::<u32>::CanonicalNan.matches(0xffc0_0000));
        assert!(!Float::<u32>::CanonicalNan.matches(0x7fc0_0001));
        assert!(Float::<u32>::ArithmeticNan.matches(0x7fc0_0001));
        assert!(!Float::<u32>::ArithmeticNan.matches(0x7f80_0001));
        assert!(Float::<u64>::CanonicalNan.matches(0x7ff8_0000_0000_0000));
        assert!(!Float::<u64>::ArithmeticNan.matches(0x7ff0_0000_0000_0000));
    }

    #[test]
    fn v128_lanes_are_little_endian() {
        let v = u128::from_le_bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(v128_matches(
            &[Lane::I32(1), Lane::I32(2), Lane::I32(3), Lane::I32(-1)],
            v
        ));
        assert!(!v128_matches(
            &[Lane::I32(1), Lane::I32(2), Lane::I32(3), Lane::I32(1)],
            v
        ));
        assert!(v128_matches(
            &[
                Lane::I64(0x2_0000_0001),
                Lane::I64(0xffff_ffff_0000_0003u64 as i64)
            ],
            v
        ));
    }

    #[test]
    fn outcome_lines_round_trip() {
        for o in [
            Outcome::Ok(12),
            Outcome::Fail(40, "expected i32 1, got i32 2".into()),
        ] {
            assert_eq!(Outcome::parse(&o.to_line()), Some(o));
        }
    }
}
