//! A shard: one thread that runs many simulated devices' update agents and telemetry
//! pipelines (kilnd's own `fleet::Driver` and `telemetry::Pipeline`, one input at a
//! time through their `turn`), where kilnd gives each its own thread. Their links are
//! polled on one tokio runtime beside the shards. So a device costs no thread: 10,000
//! of them fit in one process.
//!
//! Everything a device is sent (its link's events, its simulated workers' records,
//! its deliveries) comes through the shard's one channel, tagged with the device's
//! place; the shard keeps each device's next deadline (the agent's clock, the
//! pipeline's batch age and stats) in one timer heap, and the models' ticks and
//! health periods on its own clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_runtime::daemon::fleet::{AgentIn, Driver};
use kiln_runtime::daemon::telemetry::{Pipeline, TelemetryIn};

use crate::workers::Workers;

/// What a shard is sent for one of its devices.
pub enum Msg {
    /// A new device, at the place it was given.
    Add(Box<Device>),
    Agent(AgentIn),
    Telemetry(TelemetryIn),
    /// For the agent, once the time comes.
    Later(Instant, AgentIn),
}

/// One simulated device: kilnd's agent and pipeline, and its simulated workers.
pub struct Device {
    pub driver: Driver,
    pub pipeline: Pipeline,
    pub workers: Arc<Mutex<Workers>>,
}

/// Which of a device's clocks a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Clock {
    Agent,
    Pipeline,
}

/// A device and the earliest time its clocks have a timer in the heap for.
struct Slot {
    device: Device,
    stopped: bool,
    agent_at: Instant,
    pipeline_at: Instant,
}

pub struct Shard {
    rx: Receiver<(u32, Msg)>,
    devices: Vec<Option<Slot>>,
    timers: BinaryHeap<Reverse<(Instant, u32, Clock)>>,
    /// Inputs held until their time, by order of arrival.
    later: BinaryHeap<Reverse<(Instant, u64)>>,
    held: HashMap<u64, (u32, AgentIn)>,
    next_held: u64,
    /// The models' telemetry and health periods, for every device of the shard.
    telemetry_every: Duration,
    health_every: Option<Duration>,
}

impl Shard {
    pub fn new(
        rx: Receiver<(u32, Msg)>,
        telemetry_every: Duration,
        health_every: Option<Duration>,
    ) -> Self {
        Shard {
            rx,
            devices: Vec::new(),
            timers: BinaryHeap::new(),
            later: BinaryHeap::new(),
            held: HashMap::new(),
            next_held: 0,
            telemetry_every,
            health_every,
        }
    }

    /// Serves its devices until every sender is gone.
    pub fn run(mut self) {
        let start = Instant::now();
        let mut next_telemetry = start + self.telemetry_every;
        let mut last_health = start;
        loop {
            let now = Instant::now();
            let next_health = self.health_every.map(|every| last_health + every);
            let mut wake = next_telemetry.min(next_health.unwrap_or(next_telemetry));
            if let Some(Reverse((at, ..))) = self.timers.peek() {
                wake = wake.min(*at);
            }
            if let Some(Reverse((at, _))) = self.later.peek() {
                wake = wake.min(*at);
            }
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok((at, msg)) => self.take(at, msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            self.due(now);
            if now >= next_telemetry {
                next_telemetry += self.telemetry_every;
                self.each(|w| w.tick());
            }
            if let Some(h) = next_health.filter(|h| now >= *h) {
                let period_ms = h.duration_since(last_health).as_millis() as u64;
                last_health = h;
                self.each(|w| w.health(period_ms));
            }
        }
    }

    fn each(&self, f: impl Fn(&mut Workers)) {
        for slot in self.devices.iter().flatten() {
            f(&mut lock(&slot.device.workers));
        }
    }

    fn take(&mut self, at: u32, msg: Msg) {
        match msg {
            Msg::Add(device) => {
                let i = at as usize;
                if self.devices.len() <= i {
                    self.devices.resize_with(i + 1, || None);
                }
                let far = Instant::now() + Duration::from_secs(86_400);
                self.devices[i] = Some(Slot {
                    device: *device,
                    stopped: false,
                    agent_at: far,
                    pipeline_at: far,
                });
                // The pipeline publishes what its spool holds, as `run` does first.
                self.pipeline(at, None);
                self.agent(at, None);
            }
            Msg::Agent(input) => self.agent(at, Some(input)),
            Msg::Telemetry(input) => self.pipeline(at, Some(input)),
            Msg::Later(when, input) => {
                let n = self.next_held;
                self.next_held += 1;
                self.held.insert(n, (at, input));
                self.later.push(Reverse((when, n)));
            }
        }
    }

    /// Every timer and held input whose time has come.
    fn due(&mut self, now: Instant) {
        while let Some(Reverse((when, n))) = self.later.peek().copied() {
            if when > now {
                break;
            }
            self.later.pop();
            if let Some((at, input)) = self.held.remove(&n) {
                self.agent(at, Some(input));
            }
        }
        while let Some(Reverse((when, at, clock))) = self.timers.peek().copied() {
            if when > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.devices.get_mut(at as usize).and_then(Option::as_mut) else {
                continue;
            };
            // Only the device's earliest timer for this clock counts; a later one
            // left behind when an earlier one was set is stale.
            let live = match clock {
                Clock::Agent => &mut slot.agent_at,
                Clock::Pipeline => &mut slot.pipeline_at,
            };
            if *live != when {
                continue;
            }
            *live = now + Duration::from_secs(86_400);
            match clock {
                Clock::Agent => self.agent(at, None),
                Clock::Pipeline => self.pipeline(at, None),
            }
        }
    }

    /// One turn of a device's agent, and its next deadline.
    fn agent(&mut self, at: u32, input: Option<AgentIn>) {
        let Some(slot) = self.devices.get_mut(at as usize).and_then(Option::as_mut) else {
            return;
        };
        if slot.stopped {
            return;
        }
        if !slot.device.driver.turn(input) {
            slot.stopped = true;
            return;
        }
        let when = Instant::now() + Duration::from_millis(slot.device.driver.wait_ms());
        if when < slot.agent_at {
            slot.agent_at = when;
            self.timers.push(Reverse((when, at, Clock::Agent)));
        }
    }

    /// One turn of a device's telemetry pipeline, and its next deadline.
    fn pipeline(&mut self, at: u32, input: Option<TelemetryIn>) {
        let Some(slot) = self.devices.get_mut(at as usize).and_then(Option::as_mut) else {
            return;
        };
        slot.device.pipeline.turn(input);
        let when = slot.device.pipeline.until();
        if when < slot.pipeline_at {
            slot.pipeline_at = when;
            self.timers.push(Reverse((when, at, Clock::Pipeline)));
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
