//! The supervisor: one thread per module keeps that module's worker process alive.
//! It starts the worker, drives it (ticks on schedule, messages from its inbox), holds
//! every call to a wall-clock deadline, and when the worker dies says why and restarts
//! it after an exponential backoff, until too many crashes in the window mark the
//! module failed. A worker's death never touches the supervisor or other modules.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use kiln_protocol::command::Outcome;
use kiln_protocol::telemetry::Body;
use kiln_protocol::worker::Stop;

use crate::daemon::config::ModulePlan;
use crate::daemon::rate::RateLimit;
use crate::daemon::spawn::Workers;

mod report;
mod restart;
mod worker;

pub use report::{Counters, Queued, Reporter, Slot};
use restart::{Decision, Ending, Event, Restarts};
use worker::{run_worker, stopped};

/// A message for a module's `kiln_on_message`: topic and bytes.
pub type Message = (String, Vec<u8>);

/// Told once what became of a command: answered by the module, or why not.
pub struct Answer(Box<dyn FnOnce(Outcome) + Send>);

impl Answer {
    pub fn new(f: impl FnOnce(Outcome) + Send + 'static) -> Self {
        Self(Box::new(f))
    }
    pub fn give(self, outcome: Outcome) {
        (self.0)(outcome)
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

/// What a module's supervisor thread acts on between calls.
#[derive(Debug)]
pub enum Input {
    Message(Message),
    /// A command from the fleet (topic `command/<topic>`), answered through `Answer`
    /// whatever happens to it.
    Command(Message, Answer),
    /// Replace the running worker with one for this plan (new artifact or config).
    Swap(Box<ModulePlan>),
    /// End the worker and the module.
    Stop,
    /// New rate limits, taken at once without restarting the worker.
    Limit(RateLimit),
}

pub struct Supervised {
    pub plan: ModulePlan,
    pub trusted_keys: Vec<String>,
    pub inbox: Receiver<Input>,
    pub counters: Arc<Counters>,
    pub rate: RateLimit,
}

/// Keeps `module` running until it ends cleanly, is stopped, or is marked failed. What
/// to do after each run is [`Restarts`]'s decision; this drives workers and reports.
pub fn supervise(mut module: Supervised, workers: Arc<Workers>, sink: SyncSender<Queued>) {
    let name = module.plan.name.clone();
    let reporter = Reporter::new(name.clone(), sink, module.counters.clone(), module.rate);
    let report = |body: Body| reporter.event(body);
    let mut restarts = Restarts::new(module.plan.restart);
    let mut attempt = 0;
    let mut next: Option<ModulePlan> = None;
    loop {
        if let Some(plan) = next.take() {
            restarts.handle(Event::Swap(plan.restart));
            module.plan = plan;
        }
        attempt += 1;
        let started = Instant::now();
        let (reason, peak_rss_kib) = run_worker(&module, &workers, attempt, &mut next, &reporter);
        reporter.flush(true);
        let uptime_ms = started.elapsed().as_millis() as u64;
        let how = match reason {
            _ if reason.is_clean() => Ending::Clean,
            Stop::LoadFailed { .. } => Ending::Refused,
            _ => Ending::Crash,
        };
        if matches!(
            reason,
            Stop::Trap { .. } | Stop::FuelExhausted { .. } | Stop::Watchdog { .. }
        ) {
            module.counters.traps.fetch_add(1, Relaxed);
        }
        let decision = restarts.handle(Event::Ended {
            at: Instant::now(),
            how,
            swap: next.is_some(),
        });
        let n = restarts.crashes();
        if how != Ending::Clean {
            tracing::warn!(module = %name, %reason, crashes = n, "worker stopped");
        }
        let ended = |restart_in_ms| stopped(&reason, uptime_ms, peak_rss_kib, n, restart_in_ms);
        let delay = match decision {
            // A clean end, for a swap: the new plan starts at once.
            Decision::Start => {
                report(ended(Some(0)));
                continue;
            }
            Decision::Backoff { delay } => {
                report(ended(Some(delay.as_millis() as u64)));
                delay
            }
            Decision::GiveUp => {
                report(ended(None));
                tracing::error!(module = %name, crashes = n, "module failed; not restarting");
                report(Body::Failed {
                    crashes: n,
                    window_s: restarts.policy().window_s,
                });
                return;
            }
            Decision::Done | Decision::Stay => {
                report(ended(None));
                return;
            }
        };
        // Wait out the backoff, still listening for a swap or a stop; messages for a
        // module that is down are dropped.
        let until = Instant::now() + delay;
        loop {
            match module
                .inbox
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(Input::Message(_)) => continue,
                Ok(Input::Command(_, answer)) => {
                    answer.give(Outcome::Failed(format!(
                        "module {name} is restarting after its worker stopped"
                    )));
                    continue;
                }
                Ok(Input::Limit(rate)) => {
                    reporter.set_rate(rate);
                    continue;
                }
                // Taken at the top of the loop: a swap starts the new plan at once.
                Ok(Input::Swap(plan)) => next = Some(*plan),
                // Removed: the policy never starts it again.
                Ok(Input::Stop) => {
                    restarts.handle(Event::Stop);
                    report(stopped(&Stop::Requested { swap: false }, 0, None, n, None));
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    restarts.handle(Event::Elapsed);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    restarts.handle(Event::Elapsed);
                }
            }
            break;
        }
        // A restart after a crash; a swap is not one.
        module.counters.restarts.fetch_add(1, Relaxed);
    }
}

/// A bounded inbox per module: a slow module drops messages instead of growing the
/// supervisor's memory.
pub fn inbox() -> (SyncSender<Input>, Receiver<Input>) {
    mpsc::sync_channel(64)
}

#[cfg(test)]
mod tests;
