//! The devices' health messages, as a rollout's gates take them: each one on
//! `{prefix}/devices/{id}/health` is opened ([`Health::open`]: bounded before it is
//! decoded, its signature checked over its topic), its signer compared with the
//! registry, and only what the rollout can judge is kept, as an [`Input::Health`] for
//! [`Rollout::step`]. Anything else is counted and never fed. And what the gates
//! said of each wave, read back from the record's history ([`verdicts`]).

use std::collections::BTreeMap;

use kiln_protocol::fleet::{Health, HealthV1, Topics};
use kiln_protocol::rollout::gate::{Gate, HealthSummary};
use kiln_protocol::rollout::{Input, Outcome, Rollout};
use kiln_protocol::trust::{Identity, Registry};

/// What became of one message on a device's topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// Not a health message (another kind of topic, or a cleared retained one).
    NotHealth,
    /// Feed it to the step.
    Input(Input),
    /// A message of a device the rollout does not take, or the period the record
    /// counted last again (its `seq`: a retained message read by a resubscription, or
    /// by a driver taking the rollout up): nothing to judge, nothing wrong.
    Ignored,
    /// Refused: forged, unsigned, not signed by the device's enrolled key, malformed
    /// or oversized. Counted, never fed.
    Refused { device: String, why: String },
}

/// The health messages a driver has taken and refused.
#[derive(Debug, Default)]
pub struct HealthFeed {
    /// Refused messages by device: how many, and why the last one was.
    pub refused: BTreeMap<String, (u64, String)>,
}

impl HealthFeed {
    /// Judges the message on `topic` for `record`'s gates.
    pub fn take(
        &mut self,
        topics: &Topics,
        registry: &Registry,
        record: &Rollout,
        topic: &str,
        payload: &[u8],
    ) -> Taken {
        let Some((device, "health")) = topics.parse_device(topic) else {
            return Taken::NotHealth;
        };
        if payload.is_empty() {
            return Taken::NotHealth;
        }
        let refuse = |why: String| Taken::Refused {
            device: device.to_string(),
            why,
        };
        let (health, signer) = match Health::open(topic, payload) {
            Ok(opened) => opened,
            Err(e) => return self.count(refuse(e.to_string())),
        };
        match Identity::of(registry, device, signer.as_ref()) {
            Identity::Verified => {}
            Identity::Unsigned => return self.count(refuse("not signed".into())),
            Identity::Unenrolled(k) => {
                return self.count(refuse(format!("signed by {}, not enrolled", k.id())))
            }
            Identity::Mismatch(k) => {
                return self.count(refuse(format!(
                    "signed by {}, not the key it is enrolled with",
                    k.id()
                )))
            }
        }
        let Some(d) = record.devices.get(device) else {
            return Taken::Ignored;
        };
        if d.health_seq == Some(health.seq) {
            return Taken::Ignored;
        }
        Taken::Input(Input::Health {
            device: device.to_string(),
            seq: health.seq,
            summaries: judged(record, device, &health),
        })
    }

    fn count(&mut self, taken: Taken) -> Taken {
        if let Taken::Refused { device, why } = &taken {
            let entry = self.refused.entry(device.clone()).or_default();
            entry.0 += 1;
            entry.1 = why.clone();
        }
        taken
    }

    /// Refused messages in all.
    pub fn refused_count(&self) -> u64 {
        self.refused.values().map(|(n, _)| n).sum()
    }
}

/// The summaries of `health` the gates may judge `device` on: of the rollout's
/// module, the release's version once the device committed it and any other version
/// while it waits (the control, then its baseline); of other modules (named by
/// `MODULE.METRIC` gates), every version. Nothing of the rollout's module while it is
/// sent the release or failed (the step keeps nothing then either).
pub fn judged(record: &Rollout, device: &str, health: &HealthV1) -> Vec<HealthSummary> {
    let release = &record.module;
    let outcome = record.devices.get(device).map(|d| &d.outcome);
    let mut out = Vec::new();
    for m in &health.modules {
        if m.summary.module == release.name {
            let keep = match outcome {
                Some(Outcome::Committed { .. }) => m.version == release.version,
                Some(Outcome::Waiting) => m.version != release.version,
                _ => false,
            };
            if !keep {
                continue;
            }
        }
        // Two versions of another module in one period: the step adds them up.
        out.push(m.summary.clone());
    }
    out
}

/// What the gates said of one wave.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub wave: u32,
    pub at_ms: u64,
    /// `pass`, `wait` (it went on unjudged) or `breach`.
    pub verdict: &'static str,
    /// The history's words: the breach line(s), or the gates short of their sample.
    pub lines: Vec<String>,
}

/// The gates' verdict on each judged wave, from the history the record keeps (its
/// newest 64 lines: an early wave's verdict may have left it).
pub fn verdicts(r: &Rollout) -> Vec<Judged> {
    let wave_of = |line: &str, after: &str| -> Option<u32> {
        let n = line.strip_prefix("wave ")?.split(' ').next()?;
        let n: u32 = n.trim_end_matches(':').parse().ok()?;
        line.contains(after).then(|| n.saturating_sub(1))
    };
    let mut out: Vec<Judged> = Vec::new();
    let mut soaking: Option<u32> = None;
    for (at_ms, line) in &r.history {
        let at_ms = *at_ms;
        if let Some(w) = wave_of(line, " soaks ") {
            soaking = Some(w);
        } else if let Some(w) = wave_of(line, " passed its gates") {
            out.push(Judged {
                wave: w,
                at_ms,
                verdict: "pass",
                lines: Vec::new(),
            });
        } else if let Some(w) = wave_of(line, " goes on unjudged") {
            let why = line.split_once(": ").map_or(line.as_str(), |(_, w)| w);
            out.push(Judged {
                wave: w,
                at_ms,
                verdict: "wait",
                lines: vec![format!("went on unjudged: {why}")],
            });
        } else if let (Some(gate), Some(w)) = (line.strip_prefix("gate "), soaking) {
            // A breach of several gates: the others come first, then the halt.
            match out.last_mut() {
                Some(j) if j.verdict == "breach" && j.wave == w && j.at_ms == at_ms => {
                    j.lines.push(gate.to_string())
                }
                _ => out.push(Judged {
                    wave: w,
                    at_ms,
                    verdict: "breach",
                    lines: vec![gate.to_string()],
                }),
            }
        } else if let (Some(gate), Some(w)) = (line.strip_prefix("halted: gate "), soaking) {
            match out.last_mut() {
                Some(j) if j.verdict == "breach" && j.wave == w && j.at_ms == at_ms => {
                    j.lines.insert(0, gate.to_string())
                }
                _ => out.push(Judged {
                    wave: w,
                    at_ms,
                    verdict: "breach",
                    lines: vec![gate.to_string()],
                }),
            }
        }
    }
    out
}

impl Judged {
    /// What this judgment says of `gate`: `breach` (a breach line names it), `wait`
    /// (the wave went on unjudged and it was short of its sample), `pass` (the wave
    /// passed, or went on with this gate not short), or `not breached` (the wave
    /// breached on other gates, or went on short of more gates than the history
    /// names, and the record does not say whether this one had its sample).
    pub fn of_gate(&self, gate: &Gate) -> &'static str {
        let text = gate.to_string();
        match self.verdict {
            "breach" if self.breach_of(gate).is_some() => "breach",
            "breach" => "not breached",
            "wait" => {
                let short = self
                    .lines
                    .iter()
                    .filter_map(|l| l.split_once("too few devices for ").map(|(_, g)| g))
                    .collect::<Vec<_>>();
                if short
                    .iter()
                    .any(|g| g.split(", ").any(|g| names_gate(g, &text)))
                {
                    "wait"
                } else if short.iter().any(|g| g.contains(" more")) {
                    "not breached"
                } else {
                    "pass"
                }
            }
            _ => "pass",
        }
    }

    /// The history's line of `gate`'s breach (`{gate}: ...`, with the values it was
    /// judged on), if it breached.
    pub fn breach_of(&self, gate: &Gate) -> Option<&str> {
        let text = format!("{gate}: ");
        let breach = self.verdict == "breach";
        self.lines
            .iter()
            .find(|l| breach && l.starts_with(&text))
            .map(String::as_str)
    }
}

/// An item of a short list of gates: the gate, or the last before ` and N more`.
fn names_gate(item: &str, gate: &str) -> bool {
    item == gate
        || item
            .strip_prefix(gate)
            .is_some_and(|r| r.starts_with(" and "))
}

#[cfg(test)]
pub(crate) mod tests {
    use kiln_protocol::fleet::{seal_report, ModuleHealth, MAX_HEALTH};
    use kiln_protocol::keys::SecretKey;
    use kiln_protocol::rollout::gate::Sketch;
    use kiln_protocol::rollout::{Action, Phase, Policy, Threshold};

    use super::*;

    const T0: u64 = 1_800_000_000_000;
    const SOAK: u64 = 60_000;

    struct Fleet {
        topics: Topics,
        registry: Registry,
        keys: BTreeMap<String, SecretKey>,
        feed: HealthFeed,
        record: Rollout,
    }

    /// `d1` in wave 1, `d2` and `d3` in wave 2, all enrolled; `app` goes from v1 to
    /// v2, gated on its traps and on the mean of `sensor.error_rate`.
    fn fleet() -> Fleet {
        let mut registry = Registry::default();
        let mut keys = BTreeMap::new();
        for d in ["d1", "d2", "d3", "other"] {
            let k = SecretKey::generate().unwrap();
            registry.enroll(d, &k.public());
            keys.insert(d.to_string(), k);
        }
        let mut policy = Policy::new(Threshold::Count(0), Threshold::Count(0), 600_000, true);
        policy.gates = vec![
            "traps <= 2x control".into(),
            "sensor.error_rate <= 1.5x baseline".into(),
        ];
        policy.soak_ms = SOAK;
        let module = crate::fleet::rollout::tests::module();
        let waves = vec![vec!["d1".to_string()], vec!["d2".into(), "d3".into()]];
        let record = Rollout::new(
            "fleet",
            "lab",
            "alice",
            T0,
            module,
            policy,
            waves,
            BTreeMap::new(),
            Vec::new(),
        );
        Fleet {
            topics: Topics::new("kiln/v1"),
            registry,
            keys,
            feed: HealthFeed::default(),
            record,
        }
    }

    /// A period of `app` at `version` with `traps` in 1000 calls, and of `sensor`
    /// with an error rate of `error_rate`.
    fn period(seq: u64, version: u64, traps: u64, error_rate: f64) -> HealthV1 {
        HealthV1 {
            seq,
            period_ms: 60_000,
            modules: vec![
                ModuleHealth {
                    version,
                    summary: HealthSummary {
                        calls: 1000,
                        traps,
                        ..HealthSummary::new("app")
                    },
                },
                ModuleHealth {
                    version: 7,
                    summary: HealthSummary {
                        calls: 10,
                        metrics: [("error_rate".to_string(), Sketch::of(&[error_rate]))].into(),
                        ..HealthSummary::new("sensor")
                    },
                },
            ],
        }
    }

    impl Fleet {
        fn sealed(&self, device: &str, signer: &str, h: &HealthV1) -> (String, Vec<u8>) {
            let topic = self.topics.health(device);
            let bytes = h.seal(&topic, &self.keys[signer]).unwrap();
            (topic, bytes)
        }

        fn take(&mut self, (topic, bytes): (String, Vec<u8>)) -> Taken {
            self.feed
                .take(&self.topics, &self.registry, &self.record, &topic, &bytes)
        }

        /// What the driver does with a device's message: judge it, feed what is taken.
        fn hear(&mut self, at: u64, device: &str, h: &HealthV1) -> Taken {
            let taken = self.take(self.sealed(device, device, h));
            if let Taken::Input(input) = &taken {
                self.record.step(at, input.clone());
            }
            taken
        }
    }

    #[test]
    fn only_health_signed_by_the_enrolled_key_is_taken_and_the_rest_is_counted() {
        let mut f = fleet();
        let h = period(1, 1, 0, 1.0);
        // Another device's key, a key nobody enrolled, no signature at all, a message
        // moved from another device's topic, an oversized one, garbage.
        let forged = f.sealed("d1", "d2", &h);
        assert!(
            matches!(f.take(forged), Taken::Refused { why, .. } if why.contains("not the key it is enrolled with"))
        );
        let stranger = SecretKey::generate().unwrap();
        let topic = f.topics.health("d1");
        let bytes = h.seal(&topic, &stranger).unwrap();
        f.registry = {
            let mut r = f.registry.clone();
            r.devices.retain(|d| d.device != "d1");
            r
        };
        assert!(
            matches!(f.take((topic.clone(), bytes)), Taken::Refused { why, .. } if why.contains("not enrolled"))
        );
        f.registry.enroll("d1", &f.keys["d1"].public());
        let unsigned = postcard::to_stdvec(&Health::V1(h.clone())).unwrap();
        assert!(
            matches!(f.take((topic.clone(), unsigned)), Taken::Refused { why, .. } if why == "not signed")
        );
        let (_, moved) = f.sealed("d2", "d2", &h);
        assert!(
            matches!(f.take((topic.clone(), moved)), Taken::Refused { why, .. } if why.contains("does not verify"))
        );
        let huge = vec![0u8; MAX_HEALTH + 1];
        assert!(
            matches!(f.take((topic.clone(), huge)), Taken::Refused { why, .. } if why.contains("not decoded"))
        );
        assert!(matches!(
            f.take((topic.clone(), vec![0xff; 8])),
            Taken::Refused { .. }
        ));
        // A valid signature over an invalid message (a module name with a slash).
        let mut bad = h.clone();
        bad.modules[0].summary.module = "a/b".into();
        let bytes = seal_report(&Health::V1(bad), &topic, &f.keys["d1"]);
        assert!(matches!(
            f.take((topic.clone(), bytes)),
            Taken::Refused { .. }
        ));
        assert_eq!(f.feed.refused_count(), 7);
        assert_eq!(f.feed.refused["d1"].0, 7);
        // None of it reached the record.
        assert!(f.record.devices.values().all(|d| d.health.is_empty()));

        // Not health, a cleared retained message, a device outside the rollout.
        let reported = f.topics.reported("d1");
        assert_eq!(f.take((reported, vec![1, 2, 3])), Taken::NotHealth);
        assert_eq!(f.take((topic.clone(), Vec::new())), Taken::NotHealth);
        let other = f.sealed("other", "other", &h);
        assert_eq!(f.take(other), Taken::Ignored);
        // The driver's own: taken once; the same period again ignored, by this driver
        // or by one that takes the rollout up (the record knows the period counted).
        let own = f.sealed("d1", "d1", &h);
        assert!(
            matches!(f.hear(T0, "d1", &h), Taken::Input(Input::Health { device, .. }) if device == "d1")
        );
        assert_eq!(f.take(own.clone()), Taken::Ignored);
        // kilnd restarted: its periods count from 1 again.
        let restarted = f.sealed("d1", "d1", &period(0, 1, 0, 1.0));
        assert!(matches!(f.take(restarted), Taken::Input(_)));
        assert_eq!(f.feed.refused_count(), 7);
        f.feed = HealthFeed::default();
        assert_eq!(f.take(own), Taken::Ignored);
    }

    #[test]
    fn only_the_version_a_device_should_run_counts_for_the_rollouts_module() {
        let mut f = fleet();
        let both = HealthV1 {
            modules: vec![
                period(1, 1, 3, 1.0).modules[0].clone(),
                period(1, 2, 9, 1.0).modules[0].clone(),
                period(1, 2, 9, 1.0).modules[1].clone(),
            ],
            ..period(1, 1, 0, 1.0)
        };
        let traps = |s: &[HealthSummary]| -> Vec<(String, u64)> {
            s.iter().map(|s| (s.module.clone(), s.traps)).collect()
        };
        let app = |t: u64| ("app".to_string(), t);
        let sensor = || ("sensor".to_string(), 0);
        // Waiting: the version before; sent: nothing of it; committed: the release's.
        assert_eq!(traps(&judged(&f.record, "d1", &both)), [app(3), sensor()]);
        f.record.step(T0, Input::Start);
        assert_eq!(traps(&judged(&f.record, "d1", &both)), [sensor()]);
        f.record.step(
            T0,
            Input::Committed {
                device: "d1".into(),
            },
        );
        assert_eq!(traps(&judged(&f.record, "d1", &both)), [app(9), sensor()]);
    }

    /// Health read before the start is the first wave's baseline and the control;
    /// after its soak the wave is judged on what it sent since it committed (`d1`'s
    /// `traps_after` traps in 1000 calls a period, its `sensor.error_rate` readings).
    pub(crate) fn roll_out(traps_after: u64, error_rate_after: f64) -> Rollout {
        let mut f = fleet();
        for d in ["d1", "d2", "d3"] {
            f.hear(T0, d, &period(1, 1, 0, 1.0));
        }
        let sent = f.record.step(T0, Input::Start);
        assert_eq!(sent, [Action::Send(vec!["d1".into()])]);
        // While it is sent the release, its health is nobody's.
        f.hear(T0 + 1000, "d1", &period(2, 1, 100, 9.0));
        f.record.step(
            T0 + 2000,
            Input::Committed {
                device: "d1".into(),
            },
        );
        assert!(f.record.hold.is_some(), "wave 1 soaks");
        // Its period spanning the update: the old version's part is not the wave's.
        let mut mixed = period(3, 2, traps_after, error_rate_after);
        mixed
            .modules
            .push(period(3, 1, 100, 1.0).modules[0].clone());
        f.hear(T0 + 3000, "d1", &mixed);
        for (at, seq) in [(T0 + 30_000, 4), (T0 + 50_000, 5)] {
            f.hear(at, "d1", &period(seq, 2, traps_after, error_rate_after));
            f.hear(at, "d2", &period(seq, 1, 0, 1.0));
            f.hear(at, "d3", &period(seq, 1, 0, 1.0));
        }
        let deadline = f.record.deadline_ms().unwrap();
        assert_eq!(
            deadline,
            T0 + 2000 + SOAK,
            "the driver ticks at the soak's end"
        );
        f.record.step(deadline, Input::Tick);
        f.record
    }

    #[test]
    fn a_wave_whose_module_traps_more_or_moves_its_metric_halts_and_a_good_one_goes_on() {
        let good = roll_out(0, 1.1);
        assert!(
            matches!(good.phase, Phase::Running { wave: 1, .. }),
            "{}",
            good.phase
        );
        assert!(good
            .history
            .iter()
            .any(|(_, l)| l == "wave 1 passed its gates"));

        let traps = roll_out(5, 1.0);
        let Phase::Halted { wave: 0, why } = &traps.phase else {
            panic!("{}", traps.phase);
        };
        assert!(why.starts_with("gate traps <= 2x control: "), "{why}");
        assert!(why.contains("worst d1"), "{why}");

        let metric = roll_out(0, 1.6);
        let Phase::Halted { wave: 0, why } = &metric.phase else {
            panic!("{}", metric.phase);
        };
        assert!(
            why.starts_with("gate sensor.error_rate <= 1.5x baseline: "),
            "{why}"
        );
    }

    #[test]
    fn a_judgment_says_what_it_knows_of_each_gate() {
        let gate = |t: &str| Gate::parse(t).unwrap();
        let judged = |verdict, lines: &[&str]| Judged {
            wave: 0,
            at_ms: T0,
            verdict,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        };
        let traps = gate("traps <= 2x control");
        let min5 = gate("traps <= 2x control min 5");
        let offline = gate("offline <= 20%");
        let breach = judged("breach", &["traps <= 2x control min 5: 3 in the wave ..."]);
        assert_eq!(breach.of_gate(&min5), "breach");
        assert_eq!(breach.breach_of(&min5), Some(breach.lines[0].as_str()));
        assert_eq!(
            (breach.of_gate(&traps), breach.breach_of(&traps)),
            ("not breached", None)
        );
        let wait = judged(
            "wait",
            &["went on unjudged: too few devices for traps <= 2x control min 5"],
        );
        assert_eq!(
            (wait.of_gate(&min5), wait.of_gate(&offline)),
            ("wait", "pass")
        );
        assert_eq!(wait.breach_of(&min5), None);
        // Six short gates: the history names five and counts the sixth.
        let many = judged(
            "wait",
            &["went on unjudged: too few devices for a.b <= 1, a.c <= 1, a.d <= 1, a.e <= 1, offline <= 20% and 1 more"],
        );
        assert_eq!(
            (many.of_gate(&offline), many.of_gate(&traps)),
            ("wait", "not breached")
        );
        assert_eq!(judged("pass", &[]).of_gate(&traps), "pass");
    }
}
