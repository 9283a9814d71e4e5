//! Records as JSON (feature `json`), for `kilnd serve`'s stdout and `kiln watch --json`.

use serde_json::{json, Value};

use super::{Body, Record};

/// One record as a JSON object: `kind`, `module`, `at_ms` and the kind's fields.
/// Telemetry bytes appear as `text` when they are UTF-8, else as `hex`.
pub fn to_json(record: &Record) -> Value {
    let mut v = match &record.body {
        Body::Telemetry { stream, data } => {
            let mut v = json!({ "stream": stream });
            match std::str::from_utf8(data) {
                Ok(text) => v["text"] = json!(text),
                Err(_) => v["hex"] = json!(hex::encode(data)),
            }
            v
        }
        Body::Log {
            level,
            source,
            line,
        } => json!({
            "level": level.as_str(),
            "source": format!("{source:?}").to_lowercase(),
            "line": line,
        }),
        Body::Started(s) => json!({
            "attempt": s.attempt,
            "pid": s.pid,
            "version": s.version,
            "command": s.command,
            "start_ms": ms(s.start_us),
            "verify_ms": ms(s.verify_us),
            "deserialize_ms": ms(s.deserialize_us),
            "instantiate_ms": ms(s.instantiate_us),
            "init_ms": ms(s.init_us),
            "first_tick_ms": s.first_tick_us.map(ms),
            "fuel_used": s.fuel_used,
            "memory_pages": s.memory_pages,
            "rss_kib": s.rss_kib,
        }),
        Body::TickFailed { status } => json!({ "status": status }),
        Body::Stopped(s) => json!({
            "reason": s.reason,
            "why": s.why,
            "exit_code": s.exit_code,
            "uptime_ms": s.uptime_ms,
            "peak_rss_kib": s.peak_rss_kib,
            "crashes_in_window": s.crashes_in_window,
            "restart_in_ms": s.restart_in_ms,
        }),
        Body::Failed { crashes, window_s } => {
            json!({ "crashes": crashes, "window_s": window_s })
        }
        Body::ModuleStats(s) => serde_json::to_value(s).unwrap_or_default(),
        Body::DeviceStats(s) => serde_json::to_value(s).unwrap_or_default(),
        Body::Dropped(d) => json!({
            "boot_id": format!("{:016x}", d.boot_id),
            "first_seq": d.first_seq,
            "last_seq": d.last_seq,
            "batches": d.batches,
            "records": d.records,
        }),
        Body::Discarded(d) => json!({
            "cause": d.cause.as_str(),
            "records": d.records,
            "bytes": d.bytes,
        }),
    };
    v["kind"] = json!(record.body.kind());
    v["at_ms"] = json!(record.at_ms);
    v["module"] = json!(record.module);
    v
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}
