//! The restart policy, decided here and nowhere else: a pure state machine the
//! supervisor feeds with how each worker ended, a new plan, a stop and the end of a
//! backoff, and that answers what to do next. No clock, no threads, no I/O: the model
//! test below drives it through any sequence of events.
//!
//! A crash restarts the module after a backoff that doubles with each crash in the
//! window (`backoff_ms`, capped at `backoff_max_ms`); the `max_crashes`th crash within
//! `window_s` marks it failed, and so does the first refused artifact (it would be
//! refused again on every attempt). Crashes older than the window are forgotten, so a
//! module that ran healthy for a window starts counting afresh. A new plan (a swap)
//! starts afresh too. A module that ended cleanly or was stopped is never started again.

use std::time::{Duration, Instant};

use crate::daemon::config::RestartPolicy;

/// How a worker's run ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exited 0, or stopped on request (to be swapped, or for good).
    Clean,
    /// Trapped, was killed, missed its deadline, lost its pipes: worth another try.
    Crash,
    /// Its artifact was refused at load: refused again on every try.
    Refused,
}

/// What the supervisor tells the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The worker ended at `at`; `swap`: a new plan is waiting to replace it.
    Ended {
        at: Instant,
        how: Ending,
        swap: bool,
    },
    /// A new plan (artifact or config) with its own policy takes over the module.
    Swap(RestartPolicy),
    /// The module is removed (or kilnd stops).
    Stop,
    /// The backoff is over.
    Elapsed,
}

/// What the supervisor does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a worker now.
    Start,
    /// Wait `delay`, then start again (unless stopped meanwhile).
    Backoff { delay: Duration },
    /// Too many crashes in the window, or a refused artifact: the module is failed.
    GiveUp,
    /// The module ended (cleanly, or stopped): no worker again.
    Done,
    /// Nothing changes (an event the current phase has no use for).
    Stay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A worker runs (or is about to).
    Running,
    /// Waiting out a backoff.
    BackingOff,
    /// Ended, failed or stopped: absorbing.
    Over,
}

/// One module's restart state.
#[derive(Debug, Clone)]
pub struct Restarts {
    policy: RestartPolicy,
    /// When each crash in the window happened, oldest first.
    crashes: Vec<Instant>,
    phase: Phase,
}

impl Restarts {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            crashes: Vec::new(),
            phase: Phase::Running,
        }
    }

    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Crashes counted in the window at the last crash (what `Stopped` and `Failed`
    /// report as `crashes_in_window`).
    pub fn crashes(&self) -> u32 {
        self.crashes.len() as u32
    }

    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    pub fn handle(&mut self, event: Event) -> Decision {
        match (self.phase, event) {
            (Phase::Over, _) => Decision::Done,
            (_, Event::Stop) => {
                self.phase = Phase::Over;
                Decision::Done
            }
            (_, Event::Swap(policy)) => {
                self.policy = policy;
                self.crashes.clear();
                self.phase = Phase::Running;
                Decision::Start
            }
            (Phase::BackingOff, Event::Elapsed) => {
                self.phase = Phase::Running;
                Decision::Start
            }
            (Phase::Running, Event::Ended { how, swap, at }) => self.ended(at, how, swap),
            (Phase::Running, Event::Elapsed) | (Phase::BackingOff, Event::Ended { .. }) => {
                Decision::Stay
            }
        }
    }

    fn ended(&mut self, at: Instant, how: Ending, swap: bool) -> Decision {
        if how == Ending::Clean {
            // A swap replaces the worker at once; the new plan's `Swap` follows.
            if swap {
                return Decision::Start;
            }
            self.phase = Phase::Over;
            return Decision::Done;
        }
        let window = self.policy.window();
        self.crashes
            .retain(|t| at.saturating_duration_since(*t) < window);
        self.crashes.push(at);
        let n = self.crashes();
        if n >= self.policy.max_crashes || how == Ending::Refused {
            self.phase = Phase::Over;
            return Decision::GiveUp;
        }
        self.phase = Phase::BackingOff;
        Decision::Backoff {
            delay: self.policy.delay(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> impl Strategy<Value = RestartPolicy> {
        (0u64..2_000, 0u64..60_000, 0u32..8, 0u64..20).prop_map(
            |(backoff_ms, backoff_max_ms, max_crashes, window_s)| RestartPolicy {
                backoff_ms,
                backoff_max_ms,
                max_crashes,
                window_s,
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The worker ran this long (ms), then ended so.
        Ran(u64, Ending, bool),
        Swap(RestartPolicy),
        Stop,
        Elapsed,
    }

    fn step() -> impl Strategy<Value = Step> {
        let ending = prop_oneof![
            3 => Just(Ending::Crash),
            1 => Just(Ending::Clean),
            1 => Just(Ending::Refused),
        ];
        prop_oneof![
            6 => (0u64..30_000, ending, proptest::bool::weighted(0.2))
                .prop_map(|(ms, how, swap)| Step::Ran(ms, how, swap)),
            1 => policy().prop_map(Step::Swap),
            1 => Just(Step::Stop),
            4 => Just(Step::Elapsed),
        ]
    }

    proptest! {
        /// The policy's properties, checked against a plain reading of the crash
        /// history over any sequence of runs, swaps, stops and backoffs.
        #[test]
        fn the_restart_policy_holds(start in policy(), steps in proptest::collection::vec(step(), 1..60)) {
            let origin = Instant::now();
            let mut now = origin;
            let mut r = Restarts::new(start);
            let mut policy = start;
            // The crashes since the last swap, as the model sees them.
            let mut history: Vec<Instant> = Vec::new();
            let mut over = false;
            let mut last_delay: Option<(u32, Duration)> = None;
            for step in steps {
                let decision = match step {
                    Step::Ran(ms, how, swap) => {
                        now += Duration::from_millis(ms);
                        r.handle(Event::Ended { at: now, how, swap })
                    }
                    Step::Swap(p) => r.handle(Event::Swap(p)),
                    Step::Stop => r.handle(Event::Stop),
                    Step::Elapsed => {
                        if let Some((_, d)) = last_delay {
                            now += d;
                        }
                        r.handle(Event::Elapsed)
                    }
                };
                // Nothing ever starts a module that ended, failed or was removed.
                if over {
                    prop_assert_eq!(decision, Decision::Done);
                    continue;
                }
                match step {
                    Step::Stop => {
                        prop_assert_eq!(decision, Decision::Done);
                        over = true;
                        last_delay = None;
                    }
                    Step::Swap(p) => {
                        // A new plan starts at once, with its policy and a clean slate.
                        prop_assert_eq!(decision, Decision::Start);
                        prop_assert_eq!(r.crashes(), 0);
                        policy = p;
                        history.clear();
                        last_delay = None;
                    }
                    Step::Elapsed => {
                        let waiting = last_delay.take().is_some();
                        prop_assert_eq!(decision, if waiting { Decision::Start } else { Decision::Stay });
                    }
                    Step::Ran(_, how, swap) => {
                        if last_delay.is_some() {
                            // No worker runs during a backoff: nothing can end.
                            prop_assert_eq!(decision, Decision::Stay);
                            continue;
                        }
                        if how == Ending::Clean {
                            // A clean end restarts only to swap; it counts no crash.
                            prop_assert_eq!(decision, if swap { Decision::Start } else { Decision::Done });
                            over = !swap;
                            continue;
                        }
                        // Crashes within the window, this one included; older ones
                        // are forgotten (a healthy window resets the count).
                        history.retain(|t| now.duration_since(*t) < policy.window());
                        history.push(now);
                        let n = history.len() as u32;
                        prop_assert_eq!(r.crashes(), n);
                        if n >= policy.max_crashes || how == Ending::Refused {
                            prop_assert_eq!(decision, Decision::GiveUp);
                            over = true;
                        } else {
                            let Decision::Backoff { delay } = decision else {
                                return Err(TestCaseError::fail(format!("{decision:?} after crash {n}")));
                            };
                            // Capped, and the first crash waits backoff_ms.
                            prop_assert!(delay <= Duration::from_millis(policy.backoff_max_ms));
                            if n == 1 {
                                prop_assert_eq!(delay, Duration::from_millis(policy.backoff_ms.min(policy.backoff_max_ms)));
                            }
                            last_delay = Some((n, delay));
                        }
                    }
                }
                prop_assert_eq!(r.phase() == Phase::Over, over);
                prop_assert_eq!(r.phase() == Phase::BackingOff, last_delay.is_some());
            }
        }

        /// More crashes in the window never wait less, up to the cap.
        #[test]
        fn backoff_is_monotone_and_capped(p in policy(), n in 1u32..64) {
            prop_assert!(p.delay(n) <= p.delay(n + 1));
            prop_assert!(p.delay(n) <= Duration::from_millis(p.backoff_max_ms));
        }
    }

    #[test]
    fn five_crashes_in_five_minutes_fail_the_module() {
        let policy = RestartPolicy::default();
        let mut r = Restarts::new(policy);
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..4u64 {
            let at = t0 + Duration::from_secs(i * 10);
            match r.handle(Event::Ended {
                at,
                how: Ending::Crash,
                swap: false,
            }) {
                Decision::Backoff { delay } => delays.push(delay.as_millis()),
                other => panic!("{other:?}"),
            }
            assert_eq!(r.handle(Event::Elapsed), Decision::Start);
        }
        assert_eq!(delays, [500, 1000, 2000, 4000]);
        let at = t0 + Duration::from_secs(50);
        assert_eq!(
            r.handle(Event::Ended {
                at,
                how: Ending::Crash,
                swap: false
            }),
            Decision::GiveUp
        );
        assert_eq!(r.crashes(), 5);
        assert_eq!(r.handle(Event::Swap(policy)), Decision::Done);
    }

    #[test]
    fn a_crash_after_a_healthy_window_counts_as_the_first() {
        let mut r = Restarts::new(RestartPolicy::default());
        let t0 = Instant::now();
        for i in 0..4u64 {
            let at = t0 + Duration::from_secs(i);
            r.handle(Event::Ended {
                at,
                how: Ending::Crash,
                swap: false,
            });
            r.handle(Event::Elapsed);
        }
        let later = t0 + Duration::from_secs(3 + 300);
        let decision = r.handle(Event::Ended {
            at: later,
            how: Ending::Crash,
            swap: false,
        });
        assert_eq!(
            decision,
            Decision::Backoff {
                delay: Duration::from_millis(500)
            }
        );
        assert_eq!(r.crashes(), 1);
    }

    #[test]
    fn a_stop_during_a_backoff_never_restarts() {
        let mut r = Restarts::new(RestartPolicy::default());
        let at = Instant::now();
        r.handle(Event::Ended {
            at,
            how: Ending::Crash,
            swap: false,
        });
        assert_eq!(r.phase(), Phase::BackingOff);
        assert_eq!(r.handle(Event::Stop), Decision::Done);
        assert_eq!(r.handle(Event::Elapsed), Decision::Done);
    }
}
