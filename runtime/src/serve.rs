//! `kilnd serve`: supervise every module of the config, each in its own worker, and
//! report what happens as JSON lines on stdout (one record per line: telemetry, logs,
//! starts, stops with their reason, failures). Telemetry a module publishes on a
//! stream is also delivered to modules whose `inbox` lists `module/stream`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use kiln_protocol::worker::Stop;
use serde_json::{json, Value};

use crate::config::Config;
use crate::exit::{Code, Failure};
use crate::supervisor::{self, Event, Message, Record, Supervised, WorkerCommand};

/// Runs until every module has ended; fails if any module was marked failed.
pub fn serve(config_path: &Path) -> Result<i32, Failure> {
    let (config, plans) = Config::load(config_path).map_err(|e| Failure::new(Code::Config, e))?;
    let mut trusted_keys = Vec::new();
    for path in &config.trust {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Failure::new(
                Code::NoInput,
                format!("cannot read trusted key `{}`: {e}", path.display()),
            )
        })?;
        // Parsed here only to fail early with the file's name; workers get the text.
        crate::load::read_trusted_keys(std::slice::from_ref(path))?;
        trusted_keys.push(text);
    }
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(
            Code::Internal,
            format!("cannot find kilnd's own executable: {e}"),
        )
    })?;
    let workers = WorkerCommand {
        launcher: config.worker_launcher.clone(),
        exe,
    };

    let (sink, records) = mpsc::channel::<Record>();
    let mut routes: HashMap<String, Vec<(String, SyncSender<Message>)>> = HashMap::new();
    let mut threads = Vec::new();
    for plan in plans {
        let (tx, inbox) = supervisor::inbox();
        for topic in &plan.inbox {
            routes
                .entry(topic.clone())
                .or_default()
                .push((plan.name.clone(), tx.clone()));
        }
        tracing::info!(module = %plan.name, artifact = %plan.artifact.display(), "supervising");
        let module = Supervised {
            plan,
            trusted_keys: trusted_keys.clone(),
            inbox,
        };
        let (workers, sink) = (workers.clone(), sink.clone());
        threads.push(std::thread::spawn(move || {
            supervisor::supervise(module, workers, sink)
        }));
    }
    drop(sink);

    let mut failed = 0;
    let mut stdout = std::io::stdout().lock();
    // Ends when every supervisor thread has returned and dropped its sender.
    for record in records {
        if let Event::Telemetry { stream, data } = &record.event {
            route(&routes, &record.module, stream, data);
        }
        if matches!(record.event, Event::Failed { .. }) {
            failed += 1;
        }
        let line = to_json(&record);
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // Nobody reads our reports any more; keep supervising regardless.
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(if failed > 0 {
        Code::ModuleFailed as i32
    } else {
        0
    })
}

fn route(
    routes: &HashMap<String, Vec<(String, SyncSender<Message>)>>,
    module: &str,
    stream: &str,
    data: &[u8],
) {
    let topic = format!("{module}/{stream}");
    for (to, tx) in routes.get(&topic).into_iter().flatten() {
        match tx.try_send((topic.clone(), data.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(module = %to, %topic, "inbox full; message dropped")
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// One record as a JSON object; telemetry bytes as `text` when they are UTF-8,
/// else as `hex`.
pub fn to_json(record: &Record) -> Value {
    let mut v = match &record.event {
        Event::Telemetry { stream, data } => {
            let mut v = json!({ "kind": "telemetry", "stream": stream });
            match std::str::from_utf8(data) {
                Ok(text) => v["text"] = json!(text),
                Err(_) => v["hex"] = json!(hex(data)),
            }
            v
        }
        Event::Log {
            level,
            source,
            line,
        } => json!({
            "kind": "log",
            "level": level.as_str(),
            "source": format!("{source:?}").to_lowercase(),
            "line": line,
        }),
        Event::Started {
            attempt,
            pid,
            ready,
            start_us,
            first_tick,
            rss_kib,
        } => json!({
            "kind": "started",
            "attempt": attempt,
            "pid": pid,
            "version": ready.version,
            "command": ready.command,
            "start_ms": ms(*start_us),
            "verify_ms": ms(ready.verify_us),
            "deserialize_ms": ms(ready.deserialize_us),
            "instantiate_ms": ms(ready.instantiate_us),
            "init_ms": ms(ready.init_us),
            "first_tick_ms": first_tick.as_ref().map(|d| ms(d.elapsed_us)),
            "fuel_used": first_tick.as_ref().and_then(|d| d.fuel_used),
            "memory_pages": ready.memory_pages,
            "rss_kib": rss_kib,
        }),
        Event::TickFailed { status } => json!({ "kind": "tick-failed", "status": status }),
        Event::Stopped {
            reason,
            uptime_ms,
            peak_rss_kib,
            crashes_in_window,
            restart_in_ms,
        } => json!({
            "kind": "stopped",
            "reason": reason.kind(),
            "why": reason.to_string(),
            "exit_code": match reason { Stop::Exited(c) => Some(*c), _ => None },
            "uptime_ms": uptime_ms,
            "peak_rss_kib": peak_rss_kib,
            "crashes_in_window": crashes_in_window,
            "restart_in_ms": restart_in_ms,
        }),
        Event::Failed { crashes, window_s } => json!({
            "kind": "failed",
            "crashes": crashes,
            "window_s": window_s,
        }),
    };
    v["at_ms"] = json!(record.at_ms);
    v["module"] = json!(record.module);
    v
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
