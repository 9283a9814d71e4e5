use kiln_protocol::abi::{Level, MAX_LOG, MAX_PUBLISH};
use kiln_protocol::telemetry::Cause;
use kiln_protocol::worker::LogSource;

use super::report::check;
use super::*;

#[test]
fn frames_out_of_the_abis_bounds_are_cut_or_dropped_and_counted() {
    let telemetry = |stream: &str, n: usize| Body::Telemetry {
        stream: stream.into(),
        data: vec![1; n],
    };
    let ok = check(telemetry("temp", MAX_PUBLISH));
    assert_eq!(ok.discard, None);
    assert_eq!(ok.forward.unwrap().1, MAX_PUBLISH);
    for (stream, n, cause) in [
        ("temp", MAX_PUBLISH + 1, Cause::Oversized),
        ("a/b", 3, Cause::Invalid),
        ("#", 3, Cause::Invalid),
        ("", 3, Cause::Invalid),
    ] {
        let dropped = check(telemetry(stream, n));
        assert_eq!(dropped.forward, None, "{stream}");
        assert_eq!(dropped.discard, Some((cause, n as u64)), "{stream}");
    }
    let long = check(Body::Log {
        level: Level::Info,
        source: LogSource::Abi,
        line: "x".repeat(3 << 20),
    });
    let (Body::Log { line, .. }, bytes) = long.forward.unwrap() else {
        panic!("a log line stays a log line");
    };
    assert!(line.len() <= MAX_LOG && bytes == line.len());
    let (cause, cut) = long.discard.unwrap();
    assert_eq!(cause, Cause::Oversized);
    assert!(
        line.ends_with(&format!(" [cut: {cut} bytes]")),
        "{}",
        &line[4000..]
    );
}
