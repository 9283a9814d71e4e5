//! The invariants, as a pure checker: observations go in with the time they were made,
//! violations come out. No process, socket or clock in here, so every rule is unit
//! tested on hand-written histories.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Milliseconds since the start of the soak.
pub type Ms = u64;

/// The bounds the soak states and checks.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// How long a device may run no version of `app` after kilnd (re)started or after
    /// the app stopped, per device.
    pub down_ms: Vec<Ms>,
    /// kilnd's resident memory (the qemu process for emulated devices), per device.
    pub rss_kib: Vec<u64>,
    /// How long a record may wait in kilnd before it is spooled: a SIGKILL may lose
    /// the records made this long before it (the open batch), and nothing older.
    pub tail_ms: Ms,
    /// A drop report must come within this long after the soak saw that device's spool
    /// full.
    pub drop_after_full_ms: Ms,
    /// A record a SIGKILLed broker had acknowledged may be lost if it was made this
    /// long before the kill (mosquitto persists every `autosave_interval`).
    pub broker_loss_ms: Ms,
}

/// What the soak saw, with the device's index where it is about one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obs {
    /// kilnd started; `boot` counts kilnd starts on this device from 0.
    KilndStarted {
        device: usize,
        boot: u32,
    },
    /// kilnd ended: SIGKILLed (by the soak or its own fault hook), or stopped cleanly.
    KilndEnded {
        device: usize,
        boot: u32,
        killed: bool,
    },
    /// A module's worker started (kilnd's `started` record).
    Started {
        device: usize,
        module: String,
        version: u64,
    },
    /// A module's worker stopped (kilnd's `stopped` record).
    Stopped {
        device: usize,
        module: String,
    },
    /// A record kilnd made on stream `n` (its stdout), at the device's clock `at_ms`
    /// translated to the soak's.
    Published {
        device: usize,
        boot: u32,
        module: String,
        text: String,
        made: Ms,
    },
    /// A record on stream `n` that reached `kiln watch`.
    Delivered {
        device: usize,
        module: String,
        text: String,
    },
    /// Records dropped by the device, from a drop report that reached `kiln watch`.
    DropReport {
        device: usize,
        records: u64,
    },
    /// Records of a checked module the device discarded (rate, queue, oversize).
    Discarded {
        device: usize,
        module: String,
        records: u64,
    },
    /// The device's spool reached its bound.
    SpoolFull {
        device: usize,
    },
    /// The soak filled the device's data dir (`full`), or gave it room again.
    Disk {
        device: usize,
        full: bool,
    },
    /// A version the soak pushed, signed with the fleet key.
    Pushed {
        device: usize,
        version: u64,
    },
    /// A committed version, from an event or a live (not retained) reported state.
    Committed {
        device: usize,
        version: u64,
    },
    /// The broker was SIGKILLed.
    BrokerKilled,
    Memory {
        device: usize,
        rss_kib: u64,
    },
    /// kilnd's proportional set size: reported, not bounded (RSS is).
    Pss {
        device: usize,
        pss_kib: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub at_ms: Ms,
    pub what: String,
}

#[derive(Debug, Default)]
struct Device {
    /// Versions of `app` signed with the fleet key and pushed to this device.
    trusted: BTreeSet<u64>,
    floor: u64,
    /// Whether a version of `app` has been committed yet (before that, nothing runs).
    armed: bool,
    app_running: bool,
    /// Since when no `app` runs, counted from the later of its stop and kilnd's start.
    down_since: Option<Ms>,
    alive: bool,
    boot: u32,
    boots_killed: BTreeMap<u32, Ms>,
    last_full: Option<Ms>,
    /// Spans with the data dir full: from, and until (None while it still is).
    disk_full: Vec<(Ms, Option<Ms>)>,
    dropped: u64,
    peak_rss_kib: u64,
    longest_down_ms: Ms,
}

/// Where a record went.
#[derive(Debug, Clone)]
struct Made {
    boot: u32,
    made: Ms,
}

/// The running account of every invariant.
pub struct Checker {
    bounds: Bounds,
    devices: Vec<Device>,
    /// Records made, by (device, module, text).
    published: HashMap<(usize, String, String), Made>,
    delivered: BTreeSet<(usize, String, String)>,
    broker_kills: Vec<Ms>,
    /// The modules whose records are counted; the soak's own numbered modules.
    pub checked: Vec<String>,
}

/// What the telemetry account came to at the end.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Account {
    pub published: u64,
    pub delivered: u64,
    /// Delivered, though kilnd's stdout (a bounded queue) did not show them.
    pub delivered_unseen: u64,
    pub lost_in_open_batch: u64,
    pub lost_with_broker: u64,
    /// Held in memory through a full disk, and lost with a kilnd SIGKILLed before
    /// the disk had room to take them.
    pub lost_with_full_disk: u64,
    pub covered_by_drops: u64,
    pub dropped_reported: u64,
}

impl Checker {
    pub fn new(bounds: Bounds, devices: usize) -> Self {
        Self {
            bounds,
            devices: (0..devices).map(|_| Device::default()).collect(),
            published: HashMap::new(),
            delivered: BTreeSet::new(),
            broker_kills: Vec::new(),
            checked: vec!["counter".into(), "app".into()],
        }
    }

    pub fn peak_rss_kib(&self, device: usize) -> u64 {
        self.devices[device].peak_rss_kib
    }

    pub fn longest_down_ms(&self, device: usize) -> Ms {
        self.devices[device].longest_down_ms
    }

    pub fn floor(&self, device: usize) -> u64 {
        self.devices[device].floor
    }

    /// Takes one observation; returns the first invariant it breaks.
    pub fn observe(&mut self, at: Ms, obs: &Obs) -> Option<Violation> {
        let fail = |what: String| Some(Violation { at_ms: at, what });
        match obs {
            Obs::KilndStarted { device, boot } => {
                let d = &mut self.devices[*device];
                d.alive = true;
                d.boot = *boot;
                d.app_running = false;
                // A restart gets the whole bound to bring app back.
                if d.armed {
                    d.down_since = Some(at);
                }
            }
            Obs::KilndEnded {
                device,
                boot,
                killed,
            } => {
                let d = &mut self.devices[*device];
                d.alive = false;
                d.app_running = false;
                d.down_since = None;
                if *killed {
                    d.boots_killed.insert(*boot, at);
                }
            }
            Obs::Started {
                device,
                module,
                version,
            } if module == "app" => {
                let d = &mut self.devices[*device];
                if !d.trusted.contains(version) {
                    return fail(format!(
                        "dev{device} started app v{version}, which was never pushed signed by the fleet key"
                    ));
                }
                if *version < d.floor {
                    return fail(format!(
                        "dev{device} started app v{version}, below its anti-rollback floor v{}",
                        d.floor
                    ));
                }
                if let Some(since) = d.down_since.take() {
                    d.longest_down_ms = d.longest_down_ms.max(at - since.min(at));
                }
                d.app_running = true;
            }
            Obs::Stopped { device, module } if module == "app" => {
                let d = &mut self.devices[*device];
                d.app_running = false;
                if d.armed && d.alive {
                    d.down_since = Some(at);
                }
            }
            Obs::Started { .. } | Obs::Stopped { .. } => {}
            Obs::Published {
                device,
                boot,
                module,
                text,
                made,
            } => {
                self.published.insert(
                    (*device, module.clone(), text.clone()),
                    Made {
                        boot: *boot,
                        made: *made,
                    },
                );
            }
            Obs::Delivered {
                device,
                module,
                text,
            } => {
                if !self
                    .delivered
                    .insert((*device, module.clone(), text.clone()))
                {
                    return fail(format!(
                        "dev{device} record `{text}` of {module} reached kiln watch twice"
                    ));
                }
            }
            Obs::DropReport { device, records } => {
                let d = &mut self.devices[*device];
                let justified = d
                    .last_full
                    .is_some_and(|full| at.saturating_sub(full) <= self.bounds.drop_after_full_ms);
                if !justified {
                    return fail(format!(
                        "dev{device} reported {records} records dropped, but its spool was not seen full in the {} ms before",
                        self.bounds.drop_after_full_ms
                    ));
                }
                d.dropped += records;
            }
            Obs::Discarded {
                device,
                module,
                records,
            } if self.checked.contains(module) => {
                return fail(format!(
                    "dev{device} discarded {records} records of {module}, which publishes far below its rate"
                ));
            }
            Obs::Discarded { .. } => {}
            Obs::SpoolFull { device } => self.devices[*device].last_full = Some(at),
            Obs::Disk { device, full: true } => self.devices[*device].disk_full.push((at, None)),
            Obs::Disk {
                device,
                full: false,
            } => {
                if let Some((_, end @ None)) = self.devices[*device].disk_full.last_mut() {
                    *end = Some(at);
                }
            }
            Obs::Pushed { device, version } => {
                self.devices[*device].trusted.insert(*version);
            }
            Obs::Committed { device, version } => {
                let d = &mut self.devices[*device];
                if *version < d.floor {
                    return fail(format!(
                        "dev{device} reports app v{version} committed, below the floor v{} it had reached",
                        d.floor
                    ));
                }
                d.floor = *version;
                if !d.armed {
                    d.armed = true;
                    if !d.app_running && d.alive {
                        d.down_since = Some(at);
                    }
                }
            }
            Obs::BrokerKilled => self.broker_kills.push(at),
            Obs::Pss { .. } => {}
            Obs::Memory { device, rss_kib } => {
                let d = &mut self.devices[*device];
                d.peak_rss_kib = d.peak_rss_kib.max(*rss_kib);
                let bound = self.bounds.rss_kib[*device];
                if *rss_kib > bound {
                    return fail(format!(
                        "dev{device} kilnd uses {rss_kib} KiB, over its bound of {bound} KiB"
                    ));
                }
            }
        }
        None
    }

    /// The time-driven invariants, as of `now`.
    pub fn tick(&mut self, now: Ms) -> Option<Violation> {
        for (i, d) in self.devices.iter().enumerate() {
            if let Some(since) = d.down_since {
                if d.alive && !d.app_running && now.saturating_sub(since) > self.bounds.down_ms[i] {
                    return Some(Violation {
                        at_ms: now,
                        what: format!(
                            "dev{i} has run no version of app for {} ms (bound {} ms)",
                            now - since,
                            self.bounds.down_ms[i]
                        ),
                    });
                }
            }
        }
        None
    }

    /// Whether a record made at `made` was held in memory through a full disk when
    /// kilnd was SIGKILLed at `killed`: it was sealed while the disk was full, and
    /// the kill came before a write could succeed again (within `tail_ms` of the
    /// disk having room: the next batch sealed writes the held ones back first).
    fn held_when_killed(&self, device: usize, made: Ms, killed: Ms) -> bool {
        self.devices[device].disk_full.iter().any(|&(from, until)| {
            let until = until.unwrap_or(Ms::MAX);
            made + self.bounds.tail_ms >= from
                && made <= until
                && from <= killed
                && killed <= until.saturating_add(self.bounds.tail_ms)
        })
    }

    /// The telemetry account once every device has stopped cleanly and `kiln watch`
    /// has had its chance to receive what they sent: every record made was delivered,
    /// or was in the open batch of a boot that was SIGKILLed, or was acknowledged by a
    /// broker that was then SIGKILLed, or is covered by a drop report of its device.
    pub fn account(&self) -> (Account, Vec<Violation>) {
        let mut account = Account::default();
        let mut violations = Vec::new();
        let mut uncovered: Vec<u64> = vec![0; self.devices.len()];
        let mut first_uncovered: Vec<Option<String>> = vec![None; self.devices.len()];
        for ((device, module, text), made) in &self.published {
            account.published += 1;
            if self
                .delivered
                .contains(&(*device, module.clone(), text.clone()))
            {
                continue;
            }
            let killed_at = self.devices[*device].boots_killed.get(&made.boot);
            if killed_at.is_some_and(|&k| made.made + self.bounds.tail_ms >= k) {
                account.lost_in_open_batch += 1;
            } else if killed_at.is_some_and(|&k| self.held_when_killed(*device, made.made, k)) {
                account.lost_with_full_disk += 1;
            } else if self
                .broker_kills
                .iter()
                .any(|&k| made.made <= k && made.made + self.bounds.broker_loss_ms >= k)
            {
                account.lost_with_broker += 1;
            } else {
                uncovered[*device] += 1;
                first_uncovered[*device].get_or_insert_with(|| {
                    format!(
                        "{module} `{text}` made at {} ms in boot {}",
                        made.made, made.boot
                    )
                });
            }
        }
        account.delivered = self.delivered.len() as u64;
        account.delivered_unseen = self
            .delivered
            .iter()
            .filter(|k| !self.published.contains_key(*k))
            .count() as u64;
        for (i, d) in self.devices.iter().enumerate() {
            account.dropped_reported += d.dropped;
            if uncovered[i] > d.dropped {
                violations.push(Violation {
                    at_ms: 0,
                    what: format!(
                        "dev{i} lost {} records that no drop report covers ({} reported dropped); first: {}",
                        uncovered[i],
                        d.dropped,
                        first_uncovered[i].clone().unwrap_or_default()
                    ),
                });
            } else {
                account.covered_by_drops += uncovered[i];
            }
        }
        (account, violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            down_ms: vec![1_000],
            rss_kib: vec![1_000],
            tail_ms: 500,
            drop_after_full_ms: 10_000,
            broker_loss_ms: 2_000,
        }
    }

    fn app(version: u64) -> Obs {
        Obs::Started {
            device: 0,
            module: "app".into(),
            version,
        }
    }

    fn published(boot: u32, text: &str, made: Ms) -> Obs {
        Obs::Published {
            device: 0,
            boot,
            module: "counter".into(),
            text: text.into(),
            made,
        }
    }

    fn delivered(text: &str) -> Obs {
        Obs::Delivered {
            device: 0,
            module: "counter".into(),
            text: text.into(),
        }
    }

    /// A device that booted, was pushed v1..=`pushed` and committed v`committed`.
    fn running(pushed: u64, committed: u64) -> Checker {
        let mut c = Checker::new(bounds(), 1);
        assert_eq!(
            c.observe(0, &Obs::KilndStarted { device: 0, boot: 0 }),
            None
        );
        for v in 1..=pushed {
            assert_eq!(
                c.observe(
                    0,
                    &Obs::Pushed {
                        device: 0,
                        version: v
                    }
                ),
                None
            );
        }
        assert_eq!(c.observe(1, &app(committed)), None);
        assert_eq!(
            c.observe(
                2,
                &Obs::Committed {
                    device: 0,
                    version: committed
                }
            ),
            None
        );
        c
    }

    #[test]
    fn a_version_never_pushed_with_the_fleet_key_must_not_start() {
        let mut c = running(2, 2);
        let v = c.observe(10, &app(7)).expect("violation");
        assert!(v.what.contains("never pushed"), "{v:?}");
    }

    #[test]
    fn the_floor_never_goes_down_and_nothing_below_it_runs() {
        let mut c = running(3, 3);
        assert_eq!(
            c.observe(5, &app(3)),
            None,
            "a revert runs the committed version"
        );
        assert!(c
            .observe(6, &app(2))
            .unwrap()
            .what
            .contains("below its anti-rollback floor"));
        let mut c = running(3, 3);
        let v = c
            .observe(
                7,
                &Obs::Committed {
                    device: 0,
                    version: 2,
                },
            )
            .unwrap();
        assert!(v.what.contains("below the floor"), "{v:?}");
    }

    #[test]
    fn app_down_longer_than_a_restart_takes_is_a_violation() {
        let mut c = running(1, 1);
        c.observe(
            100,
            &Obs::Stopped {
                device: 0,
                module: "app".into(),
            },
        );
        assert_eq!(c.tick(1_000), None);
        assert!(c.tick(1_101).is_some());
        // Started again in time: fine, and the longest gap is remembered.
        let mut c = running(1, 1);
        c.observe(
            100,
            &Obs::Stopped {
                device: 0,
                module: "app".into(),
            },
        );
        c.observe(900, &app(1));
        assert_eq!(c.tick(5_000), None);
        assert_eq!(c.longest_down_ms(0), 800);
    }

    #[test]
    fn a_dead_kilnd_is_not_down_time_and_a_restart_gets_the_whole_bound() {
        let mut c = running(1, 1);
        c.observe(
            100,
            &Obs::KilndEnded {
                device: 0,
                boot: 0,
                killed: true,
            },
        );
        assert_eq!(c.tick(10_000), None, "nothing is expected of a dead kilnd");
        c.observe(10_000, &Obs::KilndStarted { device: 0, boot: 1 });
        assert_eq!(c.tick(10_900), None);
        assert!(c.tick(11_001).is_some());
    }

    #[test]
    fn before_the_first_commit_nothing_needs_to_run() {
        let mut c = Checker::new(bounds(), 1);
        c.observe(0, &Obs::KilndStarted { device: 0, boot: 0 });
        assert_eq!(c.tick(60_000), None);
    }

    #[test]
    fn a_record_delivered_twice_is_a_violation() {
        let mut c = running(1, 1);
        assert_eq!(c.observe(1, &delivered("a-1")), None);
        assert!(c
            .observe(2, &delivered("a-1"))
            .unwrap()
            .what
            .contains("twice"));
    }

    #[test]
    fn only_the_open_batch_of_a_killed_boot_may_be_lost() {
        let mut c = running(1, 1);
        c.observe(0, &published(0, "a-1", 1_000));
        c.observe(0, &published(0, "a-2", 1_700));
        c.observe(0, &delivered("a-1"));
        c.observe(
            2_000,
            &Obs::KilndEnded {
                device: 0,
                boot: 0,
                killed: true,
            },
        );
        let (account, violations) = c.account();
        assert_eq!(violations, vec![]);
        assert_eq!(account.lost_in_open_batch, 1);

        // A record older than the open batch is a loss.
        let mut c = running(1, 1);
        c.observe(0, &published(0, "a-1", 1_000));
        c.observe(
            2_000,
            &Obs::KilndEnded {
                device: 0,
                boot: 0,
                killed: true,
            },
        );
        assert_eq!(c.account().1.len(), 1);

        // A clean stop loses nothing.
        let mut c = running(1, 1);
        c.observe(0, &published(0, "a-1", 1_900));
        c.observe(
            2_000,
            &Obs::KilndEnded {
                device: 0,
                boot: 0,
                killed: false,
            },
        );
        assert!(c.account().1[0].what.contains("lost 1 records"));
    }

    #[test]
    fn drops_must_follow_a_full_spool_and_cover_every_loss() {
        let mut c = running(1, 1);
        let v = c.observe(
            5_000,
            &Obs::DropReport {
                device: 0,
                records: 3,
            },
        );
        assert!(v.unwrap().what.contains("not seen full"));

        let mut c = running(1, 1);
        c.observe(1_000, &Obs::SpoolFull { device: 0 });
        assert_eq!(
            c.observe(
                5_000,
                &Obs::DropReport {
                    device: 0,
                    records: 2
                }
            ),
            None
        );
        c.observe(0, &published(1, "a-1", 100));
        c.observe(0, &published(1, "a-2", 100));
        let (account, violations) = c.account();
        assert_eq!(violations, vec![]);
        assert_eq!(account.covered_by_drops, 2);
        c.observe(0, &published(1, "a-3", 100));
        assert_eq!(c.account().1.len(), 1, "three lost, two dropped");
    }

    #[test]
    fn what_a_full_disk_held_in_memory_may_be_lost_only_to_a_kill_before_the_disk_had_room() {
        let full = |at, full| (at, Obs::Disk { device: 0, full });
        let killed = Obs::KilndEnded {
            device: 0,
            boot: 0,
            killed: true,
        };
        // Full from 10 s to 20 s, kilnd killed at 15 s: what was made while the
        // disk was full is counted apart, what was made before it is lost.
        let mut c = running(1, 1);
        for (at, obs) in [full(10_000, true), full(20_000, false)] {
            c.observe(at, &obs);
        }
        c.observe(0, &published(0, "a-1", 12_000));
        c.observe(15_000, &killed);
        let (account, violations) = c.account();
        assert_eq!(violations, vec![]);
        assert_eq!(account.lost_with_full_disk, 1);
        c.observe(0, &published(0, "a-2", 3_000));
        assert!(c.account().1[0].what.contains("lost 1 records"));

        // Killed long after the disk had room: the held batches were on disk by then.
        let mut c = running(1, 1);
        for (at, obs) in [full(10_000, true), full(20_000, false)] {
            c.observe(at, &obs);
        }
        c.observe(0, &published(0, "a-1", 12_000));
        c.observe(60_000, &killed);
        assert_eq!(c.account().1.len(), 1);
    }

    #[test]
    fn what_a_killed_broker_had_acknowledged_is_counted_apart() {
        let mut c = running(1, 1);
        c.observe(0, &published(0, "a-1", 9_000));
        c.observe(10_000, &Obs::BrokerKilled);
        let (account, violations) = c.account();
        assert_eq!(violations, vec![]);
        assert_eq!(account.lost_with_broker, 1);
    }

    #[test]
    fn discards_of_a_quiet_module_and_memory_over_its_bound_are_violations() {
        let mut c = running(1, 1);
        let d = |module: &str| Obs::Discarded {
            device: 0,
            module: module.into(),
            records: 1,
        };
        assert_eq!(c.observe(1, &d("flood")), None);
        assert!(c.observe(1, &d("counter")).is_some());
        assert_eq!(
            c.observe(
                1,
                &Obs::Memory {
                    device: 0,
                    rss_kib: 1_000
                }
            ),
            None
        );
        assert!(c
            .observe(
                1,
                &Obs::Memory {
                    device: 0,
                    rss_kib: 1_001
                }
            )
            .is_some());
        assert_eq!(c.peak_rss_kib(0), 1_001);
    }
}
