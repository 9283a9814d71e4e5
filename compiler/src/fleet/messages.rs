//! What devices say, judged once: the reader is kiln-protocol's
//! ([`kiln_protocol::heard`], pure, fuzzed); this is how commands say what it skipped.

pub use kiln_protocol::heard::{Body, Heard, Reader, Skipped};

/// Says on stderr what was skipped, one line each (at most `limit`, then a count).
pub fn warn_skipped(skipped: &[Skipped], limit: usize) {
    for s in skipped.iter().take(limit) {
        eprintln!("warning: skipped {s}");
    }
    if skipped.len() > limit {
        eprintln!(
            "warning: {} more device messages skipped",
            skipped.len() - limit
        );
    }
}
