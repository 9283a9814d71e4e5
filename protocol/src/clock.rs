//! The one wall clock kiln and kilnd read: milliseconds since the Unix epoch, as every
//! timestamp on the wire (records, statuses, serials, rollouts) carries it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is set before it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn after_2020() {
        assert!(super::now_ms() > 1_577_836_800_000);
    }
}
