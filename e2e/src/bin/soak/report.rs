//! What the soak prints at the end: the faults injected (and skipped because what
//! they act on was already down), the bounds as measured, and the telemetry account.

use std::collections::BTreeMap;

use crate::invariants::{Account, Ms, Obs};
use crate::schedule::NAMES;

pub struct Report {
    seed: u64,
    duration_ms: Ms,
    ids: Vec<String>,
    /// Per fault name: injected, skipped.
    faults: BTreeMap<&'static str, (u64, u64)>,
    pub peak_rss_kib: Vec<u64>,
    pub peak_pss_kib: Vec<u64>,
    pub longest_down_ms: Vec<Ms>,
    pub kilnd_starts: Vec<u64>,
    pub kilnd_killed: Vec<u64>,
    pub converge_ms: Ms,
    pub converge_per_device: Vec<Ms>,
    pub account: Account,
    pub watch_exit: Option<i32>,
}

impl Report {
    pub fn new(seed: u64, duration_ms: Ms, ids: &[String]) -> Self {
        let n = ids.len();
        Self {
            seed,
            duration_ms,
            ids: ids.to_vec(),
            faults: NAMES.iter().map(|n| (*n, (0, 0))).collect(),
            peak_rss_kib: vec![0; n],
            peak_pss_kib: vec![0; n],
            longest_down_ms: vec![0; n],
            kilnd_starts: vec![0; n],
            kilnd_killed: vec![0; n],
            converge_ms: 0,
            converge_per_device: Vec::new(),
            account: Account::default(),
            watch_exit: None,
        }
    }

    pub fn fault(&mut self, name: &'static str, skipped: bool) {
        let e = self.faults.entry(name).or_default();
        if skipped {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    }

    pub fn observe(&mut self, obs: &Obs) {
        match *obs {
            Obs::Pss { device, pss_kib } => {
                self.peak_pss_kib[device] = self.peak_pss_kib[device].max(pss_kib);
            }
            Obs::KilndStarted { device, .. } => self.kilnd_starts[device] += 1,
            Obs::KilndEnded {
                device,
                killed: true,
                ..
            } => self.kilnd_killed[device] += 1,
            _ => {}
        }
    }

    pub fn print(&self) {
        println!(
            "soak: seed {}, {:.1} min, {} devices",
            self.seed,
            self.duration_ms as f64 / 60_000.0,
            self.ids.len()
        );
        println!("soak: faults (injected / skipped because their target was already down):");
        let total: u64 = self.faults.values().map(|(i, _)| i).sum();
        for name in NAMES {
            let (i, s) = self.faults[name];
            println!("  {name:<22} {i:>5} / {s}");
        }
        println!("  {:<22} {total:>5}", "total injected");
        for (i, id) in self.ids.iter().enumerate() {
            println!(
                "soak: {id}: kilnd started {} times, SIGKILLed {} times; peak RSS {} KiB, peak PSS {} KiB; app down at most {} ms",
                self.kilnd_starts[i],
                self.kilnd_killed[i],
                self.peak_rss_kib[i],
                self.peak_pss_kib[i],
                self.longest_down_ms[i]
            );
        }
        println!(
            "soak: converged to the last release in {} ms (per device {:?})",
            self.converge_ms, self.converge_per_device
        );
        let a = &self.account;
        println!(
            "soak: records made {}, delivered {} (each once), lost in the open batch of a SIGKILLed kilnd {}, lost with a SIGKILLed broker {}, lost with a kilnd SIGKILLed while its disk was full {}, covered by drop reports {} (reported dropped {}), delivered but not seen on stdout {}; kiln watch exit {:?}",
            a.published,
            a.delivered,
            a.lost_in_open_batch,
            a.lost_with_broker,
            a.lost_with_full_disk,
            a.covered_by_drops,
            a.dropped_reported,
            a.delivered_unseen,
            self.watch_exit
        );
    }
}
