//! Frames between the `kilnd` supervisor and a worker (`kilnd worker`, one process per
//! module) over the worker's stdin/stdout: a little-endian `u32` length, then a postcard
//! message tagged by version. The supervisor asks ([`ToWorker`]), the worker answers
//! each call with exactly one `Done`, possibly after `Telemetry`/`Log` frames the
//! call produced ([`FromWorker`]).

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::abi::Level;

/// Largest frame either side accepts; a larger length prefix means a broken peer.
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;

/// What [`read_frame`] reserves before a body's bytes arrive.
const FIRST_READ: usize = 64 * 1024;

/// Largest frame a worker sends: a record at its largest (`abi::MAX_PUBLISH` bytes of
/// data and a stream name), or a `Fatal` whose texts are cut by [`Stop::bounded`]. The
/// supervisor reads replies under this bound, so even a broken worker cannot make it
/// buffer `MAX_FRAME`s.
pub const MAX_REPLY: u32 = (crate::abi::MAX_PUBLISH + 4 * crate::abi::MAX_LOG) as u32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    V1(Request),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    V1(Reply),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First frame: verify and load the artifact, instantiate, call `kiln_init`.
    Start(Box<StartSpec>),
    /// Call `kiln_tick`.
    Tick,
    /// Call `kiln_on_message` with this message.
    Message { topic: String, data: Vec<u8> },
    /// Run a command module's `_start`.
    Run,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartSpec {
    pub artifact: String,
    /// Public keys in their text form (what [`crate::keys::PublicKey::to_text`] writes
    /// and `from_text` reads); the worker verifies the artifact itself, right before
    /// it maps it.
    pub trusted_keys: Vec<String>,
    pub config: Vec<u8>,
    pub limits: Limits,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Host directory and where the module sees it.
    pub dirs: Vec<(String, String)>,
    /// For a fleet module: exactly which artifact the agent staged. A signed file of
    /// another version copied into the slot is refused, floor or no floor.
    pub expect: Option<Expect>,
    /// The hardware granted to the module (serial ports, GPIO lines, I2C devices):
    /// opened before the worker confines itself (`crate::capability`).
    pub grants: crate::capability::Grants,
    /// A reactor with `kiln_tick` ticks once right after its `Ready`, without a `Tick`
    /// request, and the tick's `Done` follows: a start that ends with the first tick
    /// (as `kilnd serve`'s do) is then one round trip between the processes shorter.
    pub first_tick: bool,
}

/// The artifact a worker must find at `StartSpec::artifact`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    /// sha256 of the whole `.kiln` file.
    pub sha256: [u8; 32],
    pub name: String,
    pub version: u64,
}

/// Limits the worker enforces itself; the wall-clock watchdog is the supervisor's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Cap on linear memory in 64 KiB pages; growth beyond fails inside the guest.
    pub memory_pages: Option<u32>,
    /// Fuel for each call; only for artifacts compiled with metering.
    pub fuel_per_call: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Ready(Ready),
    Telemetry {
        stream: String,
        data: Vec<u8>,
    },
    Log {
        level: Level,
        source: LogSource,
        line: String,
    },
    Done(Done),
    /// The worker cannot go on and exits after this frame.
    Fatal(Stop),
    /// The module's reply to the command being delivered (the `reply` import).
    Answer {
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub name: String,
    pub version: u64,
    pub command: bool,
    /// A reactor that exports `kiln_tick`.
    pub ticks: bool,
    /// Time spent reading + verifying, deserializing, instantiating, in `kiln_init`.
    pub verify_us: u64,
    pub deserialize_us: u64,
    pub instantiate_us: u64,
    pub init_us: u64,
    pub memory_pages: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// What the export returned (0 = fine); for `_start`, the WASI exit code.
    pub status: i32,
    pub elapsed_us: u64,
    /// Fuel the call used, when the artifact was compiled with metering.
    pub fuel_used: Option<u64>,
    pub memory_pages: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogSource {
    /// `kiln.log`.
    Abi,
    Stdout,
    Stderr,
}

/// Why a worker stopped. Shown to people with `Display`; kept structured so telemetry
/// can count reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stop {
    /// A command module's `_start` returned (0) or called `proc_exit`.
    Exited(i32),
    /// The artifact was refused or could not be instantiated (kilnd exit code + why).
    LoadFailed {
        code: u8,
        message: String,
    },
    /// `kiln_init` returned non-zero.
    InitFailed(i32),
    Trap {
        call: String,
        message: String,
    },
    FuelExhausted {
        call: String,
        budget: u64,
    },
    /// A call exceeded the wall-clock limit and the supervisor killed the worker.
    Watchdog {
        call: String,
        limit_ms: u64,
    },
    /// The worker process died on a signal (a wasmer fault, the OOM killer, ...).
    Signal {
        signal: i32,
        name: String,
    },
    /// The worker exited without saying why, or broke the frame protocol.
    Lost(String),
    /// The supervisor ended the worker between calls: to stop the module, or to swap
    /// in a new artifact or config.
    Requested {
        swap: bool,
    },
    /// `kiln_self_test` returned non-zero.
    SelfTestFailed(i32),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Exited(code) => write!(f, "exited with code {code}"),
            Stop::LoadFailed { message, .. } => write!(f, "cannot start: {message}"),
            Stop::InitFailed(code) => write!(f, "kiln_init returned {code}"),
            Stop::Trap { call, message } => write!(f, "trapped in {call}: {message}"),
            Stop::FuelExhausted { call, budget } => {
                write!(f, "fuel exhausted in {call} (budget {budget} per call)")
            }
            Stop::Watchdog { call, limit_ms } => {
                write!(f, "watchdog: {call} did not return within {limit_ms} ms")
            }
            Stop::Signal { signal, name } => write!(f, "killed by signal {signal} ({name})"),
            Stop::Lost(why) => write!(f, "worker lost: {why}"),
            Stop::Requested { swap: true } => f.write_str("replaced between calls"),
            Stop::Requested { swap: false } => f.write_str("stopped on request"),
            Stop::SelfTestFailed(code) => write!(f, "kiln_self_test returned {code}"),
        }
    }
}

impl Stop {
    /// The same stop with every text cut to `abi::MAX_LOG` bytes, so that its `Fatal`
    /// frame stays under [`MAX_REPLY`].
    pub fn bounded(self) -> Self {
        let cut = |mut s: String| {
            let mut end = s.len().min(crate::abi::MAX_LOG);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s
        };
        match self {
            Stop::LoadFailed { code, message } => Stop::LoadFailed {
                code,
                message: cut(message),
            },
            Stop::Trap { call, message } => Stop::Trap {
                call: cut(call),
                message: cut(message),
            },
            Stop::FuelExhausted { call, budget } => Stop::FuelExhausted {
                call: cut(call),
                budget,
            },
            Stop::Watchdog { call, limit_ms } => Stop::Watchdog {
                call: cut(call),
                limit_ms,
            },
            Stop::Signal { signal, name } => Stop::Signal {
                signal,
                name: cut(name),
            },
            Stop::Lost(why) => Stop::Lost(cut(why)),
            other => other,
        }
    }

    /// Short stable name for counting and matching.
    pub fn kind(&self) -> &'static str {
        match self {
            Stop::Exited(_) => "exited",
            Stop::LoadFailed { .. } => "load-failed",
            Stop::InitFailed(_) => "init-failed",
            Stop::Trap { .. } => "trap",
            Stop::FuelExhausted { .. } => "fuel-exhausted",
            Stop::Watchdog { .. } => "watchdog",
            Stop::Signal { .. } => "signal",
            Stop::Lost(_) => "lost",
            Stop::Requested { swap: true } => "swapped",
            Stop::Requested { swap: false } => "stopped",
            Stop::SelfTestFailed(_) => "self-test-failed",
        }
    }

    /// Not a crash: a command that exited 0, or an end the supervisor asked for.
    pub fn is_clean(&self) -> bool {
        matches!(self, Stop::Exited(0) | Stop::Requested { .. })
    }
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    write_frame_unflushed(out, message)?;
    out.flush()
}

/// Writes one frame into `out` without flushing it: for a buffered writer that the
/// caller flushes when a batch of frames is complete.
pub fn write_frame_unflushed<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    let body = postcard::to_stdvec(message)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|n| *n <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&body)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> io::Result<Option<T>> {
    read_frame_within(input, MAX_FRAME)
}

/// Reads one frame of at most `max` bytes (at most `MAX_FRAME`).
pub fn read_frame_within<T: DeserializeOwned>(
    input: &mut impl Read,
    max: u32,
) -> io::Result<Option<T>> {
    let max = max.min(MAX_FRAME);
    let mut len = [0u8; 4];
    let mut have = 0;
    while have < len.len() {
        match input.read(&mut len[have..]) {
            Ok(0) if have == 0 => return Ok(None),
            // A peer that stops inside a length prefix is broken, not done.
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("frame length cut off after {have} of 4 bytes"),
                ))
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    // Grow with the bytes that actually arrive: a peer that declares 4 MiB and sends
    // nothing costs nothing.
    let mut body = Vec::with_capacity((len as usize).min(FIRST_READ));
    input.take(u64::from(len)).read_to_end(&mut body)?;
    if body.len() != len as usize {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame of {len} bytes ends after {}", body.len()),
        ));
    }
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut pipe = Vec::new();
        let tick = ToWorker::V1(Request::Tick);
        let msg = ToWorker::V1(Request::Message {
            topic: "sensor/temp".into(),
            data: vec![1, 2, 3],
        });
        write_frame(&mut pipe, &tick).unwrap();
        write_frame(&mut pipe, &msg).unwrap();
        let mut r = pipe.as_slice();
        assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), Some(tick));
        assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), Some(msg));
        assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_or_garbage_frames_are_errors() {
        let mut r: &[u8] = &(MAX_FRAME + 1).to_le_bytes();
        assert!(read_frame::<ToWorker>(&mut r).is_err());
        let mut r: &[u8] = &[2, 0, 0, 0, 9, 9];
        assert!(read_frame::<ToWorker>(&mut r).is_err());
        // A truncated body is an error, not a clean end.
        let mut r: &[u8] = &[8, 0, 0, 0, 0];
        assert!(read_frame::<ToWorker>(&mut r).is_err());
    }

    #[test]
    fn a_stream_ending_inside_a_length_prefix_is_an_error_not_a_clean_end() {
        let mut r: &[u8] = &[5, 0];
        let err = read_frame::<ToWorker>(&mut r).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("after 2 of 4 bytes"), "{err}");
    }

    #[test]
    fn the_largest_replies_fit_max_reply() {
        use crate::abi::{MAX_LOG, MAX_PUBLISH, MAX_STREAM};
        let record = FromWorker::V1(Reply::Telemetry {
            stream: "s".repeat(MAX_STREAM),
            data: vec![0xff; MAX_PUBLISH],
        });
        let line = FromWorker::V1(Reply::Log {
            level: Level::Error,
            source: LogSource::Stderr,
            line: "é".repeat(MAX_LOG / 2),
        });
        let trap = FromWorker::V1(Reply::Fatal(
            Stop::Trap {
                call: "c".repeat(1 << 20),
                message: "é".repeat(1 << 20),
            }
            .bounded(),
        ));
        for reply in [record, line, trap] {
            let mut pipe = Vec::new();
            write_frame(&mut pipe, &reply).unwrap();
            let mut r = pipe.as_slice();
            let back = read_frame_within::<FromWorker>(&mut r, MAX_REPLY).unwrap();
            assert_eq!(back, Some(reply));
        }
        let mut pipe = Vec::new();
        write_frame(&mut pipe, &vec![0u8; MAX_REPLY as usize]).unwrap();
        let err = read_frame_within::<Vec<u8>>(&mut pipe.as_slice(), MAX_REPLY).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    /// Version 1 frames written by this release; later releases must keep decoding them.
    #[test]
    fn v1_fixture_still_decodes() {
        let done = FromWorker::V1(Reply::Done(Done {
            status: 0,
            elapsed_us: 5,
            fuel_used: Some(7),
            memory_pages: 17,
        }));
        let bytes = postcard::to_stdvec(&done).unwrap();
        assert_eq!(bytes, [0, 3, 0, 5, 1, 7, 17]);
        assert_eq!(postcard::from_bytes::<FromWorker>(&bytes).unwrap(), done);
    }
}
