//! A module's rate limit on what it publishes and logs: a token bucket in records and
//! one in bytes, refilled continuously, each holding at most `burst_ms` worth of its
//! rate. A record is admitted only if both buckets hold enough; otherwise it is
//! dropped and counted, so a module that floods only loses its own records.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use kiln_runtime::daemon::rate::{Bucket, RateLimit};
//!
//! let t0 = Instant::now();
//! let mut b = Bucket::new(RateLimit { records_per_s: 10, bytes_per_s: 1000, burst_ms: 1000 }, t0);
//! assert!((0..10).all(|_| b.admit(10, t0)));
//! assert!(!b.admit(10, t0), "the burst is spent");
//! assert!(b.admit(10, t0 + Duration::from_millis(100)), "refilled by one record");
//! ```

use std::time::{Duration, Instant};

use serde::Deserialize;

/// `rate = { records_per_s = 2000, bytes_per_s = 262144, burst_ms = 1000 }` in a
/// `[[module]]` of kilnd.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Records (`publish` calls and log lines) per second.
    pub records_per_s: u64,
    /// Payload bytes (telemetry data, log line) per second.
    pub bytes_per_s: u64,
    /// How long a burst at any speed may last after a quiet spell: the buckets hold
    /// this much of their rate.
    pub burst_ms: u64,
}

impl Default for RateLimit {
    /// Twice what a 1 kHz sensor publishing 100-byte records needs, with a second of
    /// burst: four such modules stay within a typical uplink's 1 MiB/s.
    fn default() -> Self {
        Self {
            records_per_s: 2000,
            bytes_per_s: 256 * 1024,
            burst_ms: 1000,
        }
    }
}

/// Why a `rate` in kilnd.toml is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("rate needs records_per_s, bytes_per_s and burst_ms above 0")]
    Zero,
    #[error(
        "rate allows a burst of {0} bytes, less than one largest record ({max} bytes): raise bytes_per_s or burst_ms",
        max = kiln_protocol::abi::MAX_PUBLISH
    )]
    BurstTooSmall(u64),
}

impl From<RateError> for String {
    fn from(e: RateError) -> Self {
        e.to_string()
    }
}

impl RateLimit {
    pub fn check(&self) -> Result<(), RateError> {
        if self.records_per_s == 0 || self.bytes_per_s == 0 || self.burst_ms == 0 {
            return Err(RateError::Zero);
        }
        if self.burst_bytes() < kiln_protocol::abi::MAX_PUBLISH as u64 {
            return Err(RateError::BurstTooSmall(self.burst_bytes()));
        }
        Ok(())
    }

    fn burst_records(&self) -> u64 {
        (self.records_per_s.saturating_mul(self.burst_ms) / 1000).max(1)
    }

    fn burst_bytes(&self) -> u64 {
        self.bytes_per_s.saturating_mul(self.burst_ms) / 1000
    }
}

/// Tokens are kept in millionths so that refills of a few microseconds add up
/// exactly, without floating point.
const SCALE: u128 = 1_000_000;

#[derive(Debug, Clone)]
pub struct Bucket {
    limit: RateLimit,
    records: u128,
    bytes: u128,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            records: u128::from(limit.burst_records()) * SCALE,
            bytes: u128::from(limit.burst_bytes()) * SCALE,
            last: now,
        }
    }

    /// New limits; what the bucket holds is kept, within the new bounds.
    pub fn set(&mut self, limit: RateLimit) {
        self.limit = limit;
        self.records = self.records.min(u128::from(limit.burst_records()) * SCALE);
        self.bytes = self.bytes.min(u128::from(limit.burst_bytes()) * SCALE);
    }

    /// Takes one record of `bytes` if both buckets hold enough at `now`.
    pub fn admit(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        let need = bytes as u128 * SCALE;
        if self.records >= SCALE && self.bytes >= need {
            self.records -= SCALE;
            self.bytes -= need;
            true
        } else {
            false
        }
    }

    /// How long from `now` until a record of `bytes` would be admitted (zero if it
    /// would be now; `Duration::MAX` for a record larger than the byte bucket holds).
    pub fn wait(&self, bytes: usize, now: Instant) -> Duration {
        if bytes as u64 > self.limit.burst_bytes() {
            return Duration::MAX;
        }
        let mut b = self.clone();
        b.refill(now);
        let need = bytes as u128 * SCALE;
        let records_us = SCALE
            .saturating_sub(b.records)
            .div_ceil(u128::from(self.limit.records_per_s));
        let bytes_us = need
            .saturating_sub(b.bytes)
            .div_ceil(u128::from(self.limit.bytes_per_s));
        Duration::from_micros(records_us.max(bytes_us).min(u128::from(u64::MAX)) as u64)
    }

    fn refill(&mut self, now: Instant) {
        let us = now.saturating_duration_since(self.last).as_micros();
        if us == 0 {
            return;
        }
        self.last = now;
        // rate per second * µs = millionths of a token.
        let cap_records = u128::from(self.limit.burst_records()) * SCALE;
        let cap_bytes = u128::from(self.limit.burst_bytes()) * SCALE;
        self.records = (self.records + u128::from(self.limit.records_per_s) * us).min(cap_records);
        self.bytes = (self.bytes + u128::from(self.limit.bytes_per_s) * us).min(cap_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_1khz_sensor_stays_under_the_defaults() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RateLimit::default(), t0);
        for i in 0..10_000u64 {
            assert!(b.admit(100, t0 + Duration::from_millis(i)), "record {i}");
        }
    }

    #[test]
    fn limits_below_one_largest_record_are_refused() {
        let tiny = RateLimit {
            records_per_s: 10,
            bytes_per_s: 1000,
            burst_ms: 1000,
        };
        assert_eq!(tiny.check(), Err(RateError::BurstTooSmall(1000)));
        assert!(tiny
            .check()
            .unwrap_err()
            .to_string()
            .contains("burst of 1000 bytes"));
        assert!(RateLimit::default().check().is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Over any stretch of time, what the bucket admits is at most a burst plus the
        /// rate times the stretch, in records and in bytes; and a request that both
        /// buckets cover is never refused.
        #[test]
        fn admits_no_more_than_burst_plus_rate(
            records_per_s in 1u64..5000,
            bytes_per_s in 1u64..2_000_000,
            burst_ms in 1u64..3000,
            steps in prop::collection::vec((0u64..5000, 0usize..70_000), 1..300),
        ) {
            let limit = RateLimit { records_per_s, bytes_per_s, burst_ms };
            let t0 = Instant::now();
            let mut b = Bucket::new(limit, t0);
            let mut now_us = 0u64;
            let mut admitted: Vec<(u64, usize)> = Vec::new();
            for (gap_us, bytes) in steps {
                now_us += gap_us;
                let before = (b.records, b.bytes);
                let now = t0 + Duration::from_micros(now_us);
                let mut probe = b.clone();
                probe.refill(now);
                let covered = probe.records >= SCALE && probe.bytes >= bytes as u128 * SCALE;
                let wait = b.wait(bytes, now);
                prop_assert_eq!(wait.is_zero(), covered);
                if !covered && bytes as u64 <= limit.burst_bytes() {
                    // Waiting as long as it says is enough.
                    let mut later = b.clone();
                    prop_assert!(later.admit(bytes, now + wait), "wait {:?}", wait);
                }
                let ok = b.admit(bytes, now);
                prop_assert_eq!(ok, covered, "before {:?}", before);
                if ok {
                    admitted.push((now_us, bytes));
                }
            }
            // Every window that starts at an admitted record.
            for (i, (start, _)) in admitted.iter().enumerate() {
                let mut n = 0u128;
                let mut bytes = 0u128;
                for (at, size) in &admitted[i..] {
                    n += 1;
                    bytes += *size as u128;
                    let span = u128::from(at - start);
                    prop_assert!(n * SCALE <= u128::from(limit.burst_records()) * SCALE + u128::from(records_per_s) * span);
                    prop_assert!(bytes * SCALE <= u128::from(limit.burst_bytes()) * SCALE + u128::from(bytes_per_s) * span);
                }
            }
        }
    }
}
