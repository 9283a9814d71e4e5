//! The fault schedule: a pure function of the seed, the duration and the fleet size.
//! Everything random in the soak comes from here, so a failing seed replays the same
//! faults at the same offsets. What a fault finds when it runs (which version is
//! committed, whether the broker is up) is the fleet's business, not the schedule's.

use std::fmt;

pub use kiln_e2e::rng::Rng;

/// A step `KILN_FAULT` can kill kilnd right after: the update steps, and `spool`, a
/// telemetry spool write cut short halfway (the first one after kilnd starts).
pub const STEPS: [&str; 5] = ["download", "stage", "activate", "commit", "spool"];

/// What a flood module does while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// `kiln.log` in a tight loop.
    Log,
    /// 64 KiB `kiln.publish` in a tight loop.
    Publish,
    /// 3 MiB and 5 MiB lines on stdout every tick.
    LongLines,
}

impl Flood {
    pub fn fixture(self) -> &'static str {
        match self {
            Flood::Log => "fixtures/flood-log.wat",
            Flood::Publish => "fixtures/flood-publish.wat",
            Flood::LongLines => "fixtures/long-lines.wat",
        }
    }
}

/// One fault. `device` is an index into the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of kilnd now; the keeper restarts it like systemd would.
    KillKilnd {
        device: usize,
    },
    /// SIGKILL of kilnd, which stays down for `off_ms` (a device that lost power):
    /// the fleet may move on meanwhile.
    PowerOff {
        device: usize,
        off_ms: u64,
    },
    /// A good release, then SIGKILL of kilnd `after_ms` later: mid-download, mid-stage
    /// or mid-trial, depending on where the update has got to.
    PushThenKill {
        device: usize,
        after_ms: u64,
    },
    /// Restart kilnd with `KILN_FAULT=step` and push a good release (an update step):
    /// kilnd kills itself right after that step.
    KillAtStep {
        device: usize,
        step: &'static str,
    },
    /// SIGKILL of one worker of the local counter module.
    KillWorker {
        device: usize,
    },
    /// SIGTERM of the broker; it comes back `down_ms` later.
    BrokerStop {
        down_ms: u64,
    },
    /// SIGKILL of the broker; it comes back `down_ms` later from its persistence.
    BrokerKill {
        down_ms: u64,
    },
    /// SIGSTOP of the broker for `pause_ms`: the network between every device and the
    /// broker stalls, connections stay open.
    BrokerPause {
        pause_ms: u64,
    },
    PushGood {
        device: usize,
    },
    /// A release that traps on its third tick, inside its trial.
    PushCrashing {
        device: usize,
    },
    /// A good release, then the committed version again `after_ms` later: a revert
    /// during the download or the trial.
    PushThenRevert {
        device: usize,
        after_ms: u64,
    },
    /// A release signed by a key the devices do not trust.
    PushUntrusted {
        device: usize,
    },
    /// `kiln gc --grace-s 0`.
    Gc,
    /// The device's data dir runs full for `full_ms`.
    DiskFull {
        device: usize,
        full_ms: u64,
    },
    /// A flood module runs on the device for `flood_ms`.
    Flood {
        device: usize,
        kind: Flood,
        flood_ms: u64,
    },
}

impl Fault {
    /// The name the report counts faults by.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillKilnd { .. } => "kill-kilnd",
            Fault::PowerOff { .. } => "power-off",
            Fault::PushThenKill { .. } => "push-then-kill-kilnd",
            Fault::KillAtStep { .. } => "kill-kilnd-at-step",
            Fault::KillWorker { .. } => "kill-worker",
            Fault::BrokerStop { .. } => "broker-stop",
            Fault::BrokerKill { .. } => "broker-kill",
            Fault::BrokerPause { .. } => "broker-pause",
            Fault::PushGood { .. } => "push-good",
            Fault::PushCrashing { .. } => "push-crashing",
            Fault::PushThenRevert { .. } => "push-then-revert",
            Fault::PushUntrusted { .. } => "push-untrusted",
            Fault::Gc => "gc",
            Fault::DiskFull { .. } => "disk-full",
            Fault::Flood { .. } => "flood",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillKilnd { device }
            | Fault::KillWorker { device }
            | Fault::PushGood { device }
            | Fault::PushCrashing { device }
            | Fault::PushUntrusted { device } => write!(f, "{} dev{device}", self.name()),
            Fault::PushThenKill { device, after_ms }
            | Fault::PushThenRevert { device, after_ms } => {
                write!(f, "{} dev{device} after {after_ms} ms", self.name())
            }
            Fault::KillAtStep { device, step } => write!(f, "{} dev{device} {step}", self.name()),
            Fault::BrokerStop { down_ms } | Fault::BrokerKill { down_ms } => {
                write!(f, "{} for {down_ms} ms", self.name())
            }
            Fault::BrokerPause { pause_ms } => write!(f, "{} for {pause_ms} ms", self.name()),
            Fault::Gc => f.write_str("gc"),
            Fault::DiskFull {
                device,
                full_ms: ms,
            }
            | Fault::PowerOff { device, off_ms: ms } => {
                write!(f, "{} dev{device} for {ms} ms", self.name())
            }
            Fault::Flood {
                device,
                kind,
                flood_ms,
            } => write!(f, "{} dev{device} {kind:?} for {flood_ms} ms", self.name()),
        }
    }
}

/// Every fault name, in the order the report lists them.
pub const NAMES: [&str; 15] = [
    "kill-kilnd",
    "power-off",
    "push-then-kill-kilnd",
    "kill-kilnd-at-step",
    "kill-worker",
    "broker-stop",
    "broker-kill",
    "broker-pause",
    "push-good",
    "push-crashing",
    "push-then-revert",
    "push-untrusted",
    "gc",
    "disk-full",
    "flood",
];

/// A fault and when it starts, in milliseconds from the start of the soak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub at_ms: u64,
    pub fault: Fault,
}

/// The share of the soak with faults; the rest is for healing and convergence, so
/// every fault (and what it holds down) has ended before the final release.
pub const FAULT_SHARE: f64 = 0.8;

/// The faults of a soak of `duration_ms` over `devices` devices, from `seed`: gaps
/// of 1 to 6 s between faults, none after `FAULT_SHARE` of the duration, and every
/// fault's own span (an outage, a flood, a full disk) ending before then too.
pub fn plan(seed: u64, duration_ms: u64, devices: usize) -> Vec<Planned> {
    assert!(devices > 0, "a fleet of at least one device");
    let mut rng = Rng::new(seed);
    let end = (duration_ms as f64 * FAULT_SHARE) as u64;
    let mut at = 3_000; // the fleet's first commit comes first
    let mut out = Vec::new();
    loop {
        at += rng.range(1_000, 6_000);
        let fault = pick(&mut rng, devices);
        if at + span_ms(&fault) > end {
            // The last gap decides where the faults stop; a long fault that does not
            // fit is left out so the sequence stays a prefix of a longer soak's.
            if at > end {
                break;
            }
            continue;
        }
        out.push(Planned { at_ms: at, fault });
    }
    out
}

/// How long a fault holds something down after it starts.
pub fn span_ms(fault: &Fault) -> u64 {
    match fault {
        Fault::BrokerStop { down_ms } | Fault::BrokerKill { down_ms } => *down_ms,
        Fault::BrokerPause { pause_ms } => *pause_ms,
        Fault::DiskFull { full_ms, .. } => *full_ms,
        Fault::PowerOff { off_ms, .. } => *off_ms,
        Fault::Flood { flood_ms, .. } => *flood_ms,
        Fault::PushThenKill { after_ms, .. } | Fault::PushThenRevert { after_ms, .. } => *after_ms,
        _ => 0,
    }
}

fn pick(rng: &mut Rng, devices: usize) -> Fault {
    let device = rng.below(devices);
    // Weights: kills and pushes most often, the heavy faults less.
    match rng.below(100) {
        0..=6 => Fault::KillKilnd { device },
        7..=11 => Fault::PowerOff {
            device,
            off_ms: rng.range(1_000, 15_000),
        },
        12..=19 => Fault::PushThenKill {
            device,
            after_ms: rng.range(0, 3_000),
        },
        20..=25 => Fault::KillAtStep {
            device,
            step: STEPS[rng.below(STEPS.len())],
        },
        26..=33 => Fault::KillWorker { device },
        34..=38 => Fault::BrokerStop {
            down_ms: rng.range(500, 8_000),
        },
        39..=43 => Fault::BrokerKill {
            down_ms: rng.range(500, 8_000),
        },
        44..=49 => Fault::BrokerPause {
            pause_ms: rng.range(500, 10_000),
        },
        50..=61 => Fault::PushGood { device },
        62..=69 => Fault::PushCrashing { device },
        70..=77 => Fault::PushThenRevert {
            device,
            after_ms: rng.range(0, 3_000),
        },
        78..=81 => Fault::PushUntrusted { device },
        82..=86 => Fault::Gc,
        87..=92 => Fault::DiskFull {
            device,
            full_ms: rng.range(1_000, 10_000),
        },
        _ => Fault::Flood {
            device,
            kind: [Flood::Log, Flood::Publish, Flood::LongLines][rng.below(3)],
            flood_ms: rng.range(2_000, 12_000),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_same_seed_plans_the_same_faults(seed: u64, secs in 10u64..3_600, devices in 1usize..5) {
            prop_assert_eq!(plan(seed, secs * 1000, devices), plan(seed, secs * 1000, devices));
        }

        #[test]
        fn faults_are_in_order_on_real_devices_and_end_before_the_healing(
            seed: u64, secs in 10u64..3_600, devices in 1usize..5,
        ) {
            let planned = plan(seed, secs * 1000, devices);
            let end = (secs as f64 * 1000.0 * FAULT_SHARE) as u64;
            for w in planned.windows(2) {
                prop_assert!(w[0].at_ms < w[1].at_ms);
            }
            for p in &planned {
                prop_assert!(p.at_ms + span_ms(&p.fault) <= end, "{p:?} ends after {end}");
                let device = match p.fault {
                    Fault::KillKilnd { device } | Fault::PowerOff { device, .. }
                    | Fault::PushThenKill { device, .. }
                    | Fault::KillAtStep { device, .. } | Fault::KillWorker { device }
                    | Fault::PushGood { device } | Fault::PushCrashing { device }
                    | Fault::PushThenRevert { device, .. } | Fault::PushUntrusted { device }
                    | Fault::DiskFull { device, .. } | Fault::Flood { device, .. } => device,
                    _ => 0,
                };
                prop_assert!(device < devices);
            }
        }

        #[test]
        fn a_longer_soak_starts_with_the_faults_of_a_shorter_one(seed: u64, secs in 10u64..600) {
            // What decides a fault does not depend on the duration, so a seed that
            // fails at minute 3 of a long soak fails the same way in a 4-minute one.
            let short = plan(seed, secs * 1000, 3);
            let long = plan(seed, secs * 4000, 3);
            let cut = short.last().map_or(0, |p| p.at_ms);
            let prefix: Vec<_> = long.into_iter().filter(|p| p.at_ms <= cut).collect();
            // The long soak may fit a long fault the short one had to leave out.
            for p in &short {
                prop_assert!(prefix.contains(p), "{p:?} missing from the longer soak");
            }
        }
    }

    #[test]
    fn different_seeds_plan_different_faults() {
        assert_ne!(plan(1, 600_000, 3), plan(2, 600_000, 3));
    }

    #[test]
    fn a_ten_minute_soak_injects_every_kind_of_fault() {
        let planned = plan(20261130, 600_000, 3);
        for name in NAMES {
            assert!(
                planned.iter().any(|p| p.fault.name() == name),
                "no {name} in {planned:#?}"
            );
        }
    }
}
