//! What devices answer after a desired state goes out: whether they took it
//! ([`Confirmation`]: they report its serial, or reject it) and whether they run the new
//! version ([`Convergence`]). Both are pure; [`await_answers`] feeds them what the
//! broker delivers, judged by the one reader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use kiln_protocol::fleet::{EventKind, EventV1, ModuleState, ReportedV1, Topics};
use kiln_protocol::trust::Registry;

use crate::fleet::broker::Session;
use crate::fleet::messages::{Body, Reader};
use crate::fleet::trust::Identity;
use crate::fleet::Error;

/// What the devices said about a new desired state. Pure: the driver feeds it what
/// the broker delivers on their `reported` and `events` topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub serial: u64,
    pending: BTreeSet<String>,
    pub confirmed: Vec<String>,
    /// `(device, reason)` for every device that refused the state.
    pub refused: Vec<(String, String)>,
    /// Pending devices whose report names a serial above this state's: a newer state,
    /// or a fast-forward (never counted as confirmed).
    pub above: BTreeMap<String, u64>,
}

/// One message from a device, decoded.
pub enum Answer {
    Reported(ReportedV1),
    Event(EventV1),
}

impl Confirmation {
    pub fn new(serial: u64, devices: impl IntoIterator<Item = String>) -> Self {
        Self {
            serial,
            pending: devices.into_iter().collect(),
            confirmed: Vec::new(),
            refused: Vec::new(),
            above: BTreeMap::new(),
        }
    }

    /// A device confirms by reporting exactly the new serial; it refuses with
    /// a rejection of the desired state as a whole (module `*`: a stale serial, an
    /// untrusted signature, a wrong address). Other devices and messages are ignored.
    pub fn heard(&mut self, device: &str, message: Answer) {
        if !self.pending.contains(device) {
            return;
        }
        match message {
            // Exactly this serial. A report of a higher one is not this state taken:
            // a newer state, or one a leaked key fast-forwarded, which makes the
            // device refuse this one. Said as such, never as "took".
            Answer::Reported(r) if r.serial == self.serial => {
                self.pending.remove(device);
                self.confirmed.push(device.to_string());
            }
            // Still pending (the retained report may predate this state), but said
            // if nothing else comes.
            Answer::Reported(r) if r.serial > self.serial => {
                self.above.insert(device.to_string(), r.serial);
            }
            Answer::Event(e) if e.module == "*" => {
                if let EventKind::Rejected { reason } = e.kind {
                    self.pending.remove(device);
                    self.refused.push((device.to_string(), reason));
                }
            }
            _ => {}
        }
    }

    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Devices that have said nothing about the new state yet.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.pending.iter().map(String::as_str)
    }
}

/// What waits on devices' answers: a confirmation of a state, or `--wait`'s convergence.
pub trait Answers {
    fn done(&self) -> bool;
    fn heard(&mut self, device: &str, message: Answer);
}

impl Answers for Confirmation {
    fn done(&self) -> bool {
        Confirmation::done(self)
    }
    fn heard(&mut self, device: &str, message: Answer) {
        Confirmation::heard(self, device, message)
    }
}

impl Answers for Convergence {
    fn done(&self) -> bool {
        Convergence::done(self)
    }
    fn heard(&mut self, device: &str, message: Answer) {
        Convergence::heard(self, device, message)
    }
}

/// Feeds the devices' answers to `answers` until all have answered or `limit` has
/// passed. A message signed by another key than the device's enrolled one is forged
/// (or from a re-provisioned device) and never counts (said on stderr where `warn`);
/// the devices whose answers could not be verified are returned.
pub fn await_answers(
    session: &mut Session,
    topics: &Topics,
    registry: &Registry,
    answers: &mut impl Answers,
    limit: Duration,
    warn: bool,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + limit;
    let mut unverified = BTreeSet::new();
    while !answers.done() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some((topic, payload)) = session.next_message(left).map_err(Error::Broker)? else {
            continue;
        };
        let heard = match Reader::new(topics, registry).open(&topic, &payload) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(skipped) => {
                if warn {
                    eprintln!("warning: skipped {skipped}");
                }
                continue;
            }
        };
        let device = heard.device.as_str();
        match &heard.identity {
            Identity::Verified => {}
            Identity::Mismatch(key) => {
                if warn {
                    eprintln!(
                        "warning: a message for {device} is signed by key {}, not its enrolled key: ignored",
                        key.id()
                    );
                }
                continue;
            }
            Identity::Unenrolled(_) | Identity::Unsigned => {
                unverified.insert(device.to_string());
            }
        }
        let answer = match heard.body {
            Body::Reported(r) => Answer::Reported(r),
            Body::Event(e) => Answer::Event(e),
            Body::Status(_) => continue,
        };
        answers.heard(&heard.device, answer);
    }
    Ok(unverified)
}

/// Whether the devices that took a state run the new version: a report of the module
/// at the version, running, is success; a rollback or rejection of the module (or a
/// report of it failed) is failure. Pure, like [`Confirmation`].
pub struct Convergence {
    module: String,
    version: u64,
    pending: BTreeSet<String>,
    outcomes: BTreeMap<String, Result<(), String>>,
}

impl Convergence {
    pub fn new(module: &str, version: u64, devices: impl IntoIterator<Item = String>) -> Self {
        Self {
            module: module.to_string(),
            version,
            pending: devices.into_iter().collect(),
            outcomes: BTreeMap::new(),
        }
    }

    pub fn heard(&mut self, device: &str, message: Answer) {
        if !self.pending.contains(device) {
            return;
        }
        let outcome = match message {
            Answer::Reported(r) => r
                .modules
                .iter()
                .find(|m| m.name == self.module)
                .and_then(|m| match m.state {
                    // A command that ran to its end and exited 0 did what it was for.
                    ModuleState::Running | ModuleState::Exited if m.version == self.version => {
                        Some(Ok(()))
                    }
                    // Only the version it tried: a first version still downloading is
                    // reported as v0, not failed yet.
                    ModuleState::Failed if m.version == self.version => {
                        Some(Err(format!("failed: {}", m.last_event)))
                    }
                    _ => None,
                }),
            Answer::Event(e)
                if (e.module == self.module && e.version == self.version) || e.module == "*" =>
            {
                match e.kind {
                    EventKind::RolledBack { reason } => Some(Err(format!("rolled back: {reason}"))),
                    EventKind::Rejected { reason } => Some(Err(format!("rejected: {reason}"))),
                    _ => None,
                }
            }
            Answer::Event(_) => None,
        };
        if let Some(o) = outcome {
            self.pending.remove(device);
            self.outcomes.insert(device.to_string(), o);
        }
    }

    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn outcome(&self, device: &str) -> Option<Result<(), &str>> {
        self.outcomes
            .get(device)
            .map(|o| o.as_ref().map(|_| ()).map_err(String::as_str))
    }
}

/// One device's answer to a push, as printed and in `--json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceResult {
    pub device: String,
    /// `took`, `running`, `failed`, `refused` or `pending`.
    pub result: &'static str,
    pub reason: Option<String>,
    pub verified: bool,
}

impl DeviceResult {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "result": self.result,
            "reason": self.reason,
            "verified": self.verified,
        })
    }
}

/// Each device's answer to a push, by device: what `confirmation` heard within
/// `confirm_for`, and with `--wait` what `convergence` heard within `wait_for` of the
/// devices that took it (`version` is what they should run). `unverified`: devices
/// whose answers were not signed by an enrolled key.
pub fn results(
    confirmation: &Confirmation,
    convergence: Option<&Convergence>,
    unverified: &BTreeSet<String>,
    confirm_for: Duration,
    wait_for: Duration,
    version: u64,
) -> Vec<DeviceResult> {
    let mut rows: Vec<DeviceResult> = Vec::new();
    for device in &confirmation.confirmed {
        let mut row = DeviceResult {
            device: device.clone(),
            result: "took",
            reason: None,
            verified: !unverified.contains(device),
        };
        if let Some(convergence) = convergence {
            match convergence.outcome(device) {
                Some(Ok(())) => row.result = "running",
                Some(Err(why)) => {
                    row.result = "failed";
                    row.reason = Some(why.to_string());
                }
                None => {
                    row.result = "pending";
                    row.reason = Some(format!(
                        "took the state but did not run v{version} within {}s",
                        wait_for.as_secs()
                    ));
                }
            }
        }
        rows.push(row);
    }
    for device in confirmation.pending() {
        let reason = match confirmation.above.get(device) {
            Some(above) => format!(
                "not confirmed after {}s: it reports serial {above}, above this state's {} (a newer state, or a fast-forward it keeps until the key that signed it is rotated out)",
                confirm_for.as_secs(),
                confirmation.serial
            ),
            None => format!(
                "not confirmed after {}s (offline or busy); it converges when it takes the retained state",
                confirm_for.as_secs()
            ),
        };
        rows.push(DeviceResult {
            device: device.to_string(),
            result: "pending",
            reason: Some(reason),
            verified: false,
        });
    }
    for (device, reason) in &confirmation.refused {
        rows.push(DeviceResult {
            device: device.clone(),
            result: "refused",
            reason: Some(reason.clone()),
            verified: !unverified.contains(device),
        });
    }
    rows.sort_by(|a, b| a.device.cmp(&b.device));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(serial: u64) -> Answer {
        Answer::Reported(ReportedV1 {
            serial,
            modules: Vec::new(),
        })
    }

    fn event(module: &str, kind: EventKind) -> Answer {
        Answer::Event(EventV1 {
            at_ms: 0,
            module: module.into(),
            version: 0,
            kind,
        })
    }

    fn app(version: u64, state: ModuleState, last_event: &str) -> Answer {
        Answer::Reported(ReportedV1 {
            serial: 5,
            modules: vec![kiln_protocol::fleet::ModuleReport {
                name: "app".into(),
                version,
                sha256: [0; 32],
                state,
                last_event: last_event.into(),
            }],
        })
    }

    #[test]
    fn a_device_converges_by_running_the_version_and_fails_by_rolling_it_back() {
        let mut c = Convergence::new("app", 2, ["a", "b", "c", "d"].map(String::from));
        // Still downloading its first version: reported as v0 failed, not an answer.
        c.heard("a", app(0, ModuleState::Failed, "downloading 0/2 chunks"));
        c.heard("a", app(1, ModuleState::Running, ""));
        c.heard("a", app(2, ModuleState::Updating, "activated"));
        assert!(c.outcome("a").is_none());
        c.heard("a", app(2, ModuleState::Running, "committed"));
        assert_eq!(c.outcome("a"), Some(Ok(())));
        // A late rollback of another version says nothing about this one.
        let old = EventKind::RolledBack {
            reason: "old".into(),
        };
        c.heard(
            "b",
            Answer::Event(EventV1 {
                at_ms: 0,
                module: "app".into(),
                version: 1,
                kind: old,
            }),
        );
        assert!(c.outcome("b").is_none());
        let crash = EventKind::RolledBack {
            reason: "trap".into(),
        };
        c.heard(
            "b",
            Answer::Event(EventV1 {
                at_ms: 0,
                module: "app".into(),
                version: 2,
                kind: crash,
            }),
        );
        assert_eq!(c.outcome("b"), Some(Err("rolled back: trap")));
        c.heard("c", app(2, ModuleState::Exited, "exited with code 0"));
        assert_eq!(c.outcome("c"), Some(Ok(())));
        assert!(!c.done());
        c.heard(
            "d",
            app(2, ModuleState::Failed, "failed, not restarted: trap"),
        );
        assert!(c.done());
    }

    #[test]
    fn devices_confirm_by_reporting_the_serial_and_refuse_with_a_rejection_of_the_state() {
        let mut c = Confirmation::new(100, ["a", "b", "c"].map(String::from));
        c.heard("a", reported(99)); // the old retained report
        c.heard("x", reported(100)); // not a target
        c.heard("b", event("app", EventKind::Staged));
        let module_level = EventKind::Rejected {
            reason: "version 1 is lower than committed version 2".into(),
        };
        c.heard("b", event("app", module_level));
        assert!(!c.done());
        c.heard("a", reported(100));
        let stale = "desired state serial 100 is older than 200 already applied";
        c.heard(
            "b",
            event(
                "*",
                EventKind::Rejected {
                    reason: stale.into(),
                },
            ),
        );
        // Later messages from a device that has answered change nothing.
        c.heard("b", reported(300));
        assert_eq!(c.confirmed, ["a"]);
        assert_eq!(c.refused, [("b".to_string(), stale.to_string())]);
        assert_eq!(c.pending().collect::<Vec<_>>(), ["c"]);
        // A report above the serial is not this state taken (a newer state, or a
        // fast-forward): noted, never counted as confirmed.
        c.heard("c", reported(u64::MAX - 1));
        assert!(!c.done());
        assert_eq!(c.confirmed, ["a"]);
        assert_eq!(c.above.get("c"), Some(&(u64::MAX - 1)));
        c.heard("c", reported(100));
        assert_eq!(c.confirmed, ["a", "c"]);
    }

    #[test]
    fn each_device_has_one_result_in_order() {
        let mut c = Confirmation::new(7, ["d", "c", "b", "a"].map(String::from));
        c.heard("a", reported(7));
        c.heard("b", reported(7));
        c.heard(
            "c",
            event(
                "*",
                EventKind::Rejected {
                    reason: "stale".into(),
                },
            ),
        );
        c.heard("d", reported(9));
        let mut v = Convergence::new("app", 2, ["a".to_string(), "b".to_string()]);
        v.heard("a", app(2, ModuleState::Running, "committed"));
        let unverified = BTreeSet::from(["b".to_string()]);
        let (confirm, wait) = (Duration::from_secs(5), Duration::from_secs(300));
        let took = results(&c, None, &unverified, confirm, wait, 2);
        let words: Vec<(&str, &str, bool)> = took
            .iter()
            .map(|r| (r.device.as_str(), r.result, r.verified))
            .collect();
        assert_eq!(
            words,
            [
                ("a", "took", true),
                ("b", "took", false),
                ("c", "refused", true),
                ("d", "pending", false)
            ]
        );
        assert!(took[3]
            .reason
            .as_deref()
            .unwrap()
            .contains("reports serial 9"));
        let waited = results(&c, Some(&v), &unverified, confirm, wait, 2);
        assert_eq!(waited[0].result, "running");
        assert_eq!(waited[1].result, "pending");
        assert_eq!(
            waited[1].reason.as_deref(),
            Some("took the state but did not run v2 within 300s")
        );
    }
}
