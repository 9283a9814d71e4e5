//! kilnd's own log on stderr. `KILN_LOG=trace|debug|info|warn|error` sets the level;
//! `kilnd run` is silent by default so the module's output is all the user sees, and
//! `serve` logs at info. Colour only on a terminal and never with `NO_COLOR`. Under
//! systemd, when stderr is the journal's stream (`JOURNAL_STREAM`), each line starts
//! with its syslog priority (`<3>` error ... `<7>` debug) so `journalctl -p` filters it.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub fn init(serving: bool) {
    let level = match std::env::var("KILN_LOG").as_deref() {
        Ok("trace") => Level::TRACE,
        Ok("debug") => Level::DEBUG,
        Ok("info") => Level::INFO,
        Ok("warn") => Level::WARN,
        Ok("error") => Level::ERROR,
        _ if serving => Level::INFO,
        _ => return,
    };
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = tracing_subscriber::fmt::format()
        .without_time()
        .with_ansi(color);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        builder.event_format(Priority(format)).init();
    } else {
        builder.event_format(format).init();
    }
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for a service whose stderr is the
/// journal; the variable is inherited, so it counts only if stderr is that stream.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    // SAFETY: fstat fills the zeroed stat for fd 2; nothing is read on failure.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().is_ok_and(|d| d == st.st_dev as u64)
        && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino as u64)
}

/// Prefixes each line with its syslog priority for the journal.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
