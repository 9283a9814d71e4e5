//! Which broker of a list to try next, and how long to wait first: the decision a
//! device's link makes each time its connection drops or cannot be made. Pure (the
//! randomness is a seeded generator), so it is tested here and kilnd only carries it
//! out.
//!
//! - A lost connection moves on to the next broker of the list, after a short random
//!   wait: when a cluster node dies, the devices it held spread their reconnections
//!   over [`FIRST_MS`] instead of arriving at the next node at once.
//! - Each time the whole list has failed once more, the wait doubles, up to
//!   [`CAP_MS`]: a cluster restarting is not hammered by every device every second.
//! - On the first pass over the list the wait is anywhere from nothing to the ceiling
//!   (the widest spread); from the second pass on it is at least half the ceiling, so
//!   a device whose every broker is down does not spin.
//! - A connection made resets the wait, and the device stays on that broker (it does
//!   not go back to the first: that would move every device twice per node loss).
//!
//! ```
//! use kiln_protocol::mqtt::failover::Failover;
//!
//! let mut f = Failover::new(3, 42);
//! assert_eq!(f.current(), 0);
//! let (next, wait) = f.failed();
//! assert_eq!(next, 1);
//! assert!(wait.as_millis() < 1000);
//! f.connected();
//! assert_eq!(f.current(), 1, "stays where it connected");
//! ```

use std::time::Duration;

/// The ceiling of the first wait, in milliseconds.
pub const FIRST_MS: u64 = 1_000;
/// The greatest wait, in milliseconds.
pub const CAP_MS: u64 = 30_000;

/// The state of one client's failover over `brokers` brokers.
#[derive(Debug, Clone)]
pub struct Failover {
    brokers: usize,
    current: usize,
    /// Failures since the last connection.
    failures: u32,
    /// splitmix64's state.
    random: u64,
}

impl Failover {
    /// Over `brokers` brokers (at least one), starting with the first; `seed` makes
    /// its waits (kilnd seeds it from the OS, tests from a number).
    pub fn new(brokers: usize, seed: u64) -> Self {
        Failover {
            brokers: brokers.max(1),
            current: 0,
            failures: 0,
            random: seed,
        }
    }

    /// The broker to connect to now, by its index in the list.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The connection to the current broker dropped, or could not be made: the
    /// broker to try next and how long to wait before trying it.
    pub fn failed(&mut self) -> (usize, Duration) {
        self.failures = self.failures.saturating_add(1);
        self.current = (self.current + 1) % self.brokers;
        let ceiling = self.ceiling_ms();
        let floor = self.floor_ms();
        let wait = floor + self.next_random() % (ceiling - floor + 1);
        (self.current, Duration::from_millis(wait))
    }

    /// A connection was made: the next failure starts from the first wait again.
    pub fn connected(&mut self) {
        self.failures = 0;
    }

    /// The longest the next wait may be: [`FIRST_MS`] while the list has not failed
    /// as a whole, doubled for each time it has, at most [`CAP_MS`].
    pub fn ceiling_ms(&self) -> u64 {
        let rounds = (self.failures.saturating_sub(1) as usize / self.brokers).min(16) as u32;
        FIRST_MS.saturating_mul(1 << rounds).min(CAP_MS)
    }

    /// The least the next wait may be: nothing on the first pass over the list, half
    /// the ceiling after.
    pub fn floor_ms(&self) -> u64 {
        match self.failures.saturating_sub(1) as usize >= self.brokers {
            true => self.ceiling_ms() / 2,
            false => 0,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every wait is within its ceiling's upper half, never above the cap, and
        /// the list is walked in order from where the client is.
        #[test]
        fn waits_stay_within_their_ceiling_and_the_list_is_walked_in_order(
            brokers in 1usize..8,
            seed: u64,
            events in prop::collection::vec(any::<bool>(), 1..200),
        ) {
            let mut f = Failover::new(brokers, seed);
            for up in events {
                if up {
                    f.connected();
                    prop_assert_eq!(f.ceiling_ms(), FIRST_MS);
                    continue;
                }
                let before = f.current();
                let (floor, ceiling) = {
                    let mut peek = f.clone();
                    peek.failures += 1;
                    (peek.floor_ms(), peek.ceiling_ms())
                };
                let (next, wait) = f.failed();
                prop_assert_eq!(next, (before + 1) % brokers);
                prop_assert_eq!(f.current(), next);
                let ms = wait.as_millis() as u64;
                prop_assert!(ms >= floor && ms <= ceiling, "{} outside {}..={}", ms, floor, ceiling);
                prop_assert!(floor == 0 || floor == ceiling / 2);
                prop_assert!(ms <= CAP_MS);
            }
        }

        /// With some brokers up, a client reaches one within one pass over the
        /// list, and the time it waits in all is bounded by the ceilings.
        #[test]
        fn a_client_reaches_a_live_broker_within_one_pass(
            up in prop::collection::vec(any::<bool>(), 1..8),
            start in 0usize..8,
            seed: u64,
        ) {
            prop_assume!(up.iter().any(|u| *u));
            let brokers = up.len();
            let mut f = Failover::new(brokers, seed);
            // Where the client was when its broker went down.
            for _ in 0..start % brokers {
                f.failed();
            }
            f.connected();
            let mut waited = 0;
            let mut tries = 0;
            loop {
                let (next, wait) = f.failed();
                waited += wait.as_millis() as u64;
                tries += 1;
                if up[next] {
                    break;
                }
            }
            prop_assert!(tries <= brokers);
            prop_assert!(waited <= brokers as u64 * FIRST_MS);
        }
    }

    /// A node of three dies and the thousand devices it held move on: their first
    /// waits spread over the whole first second (every tenth of it gets between half
    /// and twice its share), where without jitter they would all arrive together.
    #[test]
    fn a_thousand_devices_spread_their_reconnections() {
        let mut buckets = [0u32; 10];
        for device in 0..1000u64 {
            let mut f = Failover::new(3, device.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let (next, wait) = f.failed();
            assert_eq!(next, 1);
            let ms = wait.as_millis() as u64;
            assert!(ms <= FIRST_MS);
            buckets[(ms * 10 / (FIRST_MS + 1)) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=200).contains(&n)),
            "{buckets:?}"
        );
    }

    /// A whole cluster down: the waits grow each time the list has failed, up to
    /// the cap, and a connection brings them back to the first.
    #[test]
    fn waits_grow_per_failed_pass_up_to_the_cap_and_reset_on_a_connection() {
        let mut f = Failover::new(3, 7);
        let ceilings: Vec<u64> = (0..24)
            .map(|_| {
                f.failed();
                f.ceiling_ms()
            })
            .collect();
        assert_eq!(
            &ceilings[..9],
            [1000, 1000, 1000, 2000, 2000, 2000, 4000, 4000, 4000]
        );
        assert_eq!(ceilings[23], CAP_MS);
        f.connected();
        f.failed();
        assert_eq!(f.ceiling_ms(), FIRST_MS);
    }
}
