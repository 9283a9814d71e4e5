//! What `kiln push` and `kiln rollout` can know will fail, checked before anything is
//! published. Pure: the commands read the broker's retained statuses and reports
//! through the one reader ([`super::messages`]) and hand them here as [`Seen`].
//!
//! Each refusal names the device (or the scope) and the reason, with an exit code of
//! its own; the ones an operator may know better about (a device not started yet, a
//! device about to be re-flashed for another target) yield to `--force`, a version
//! below what devices run yields to `--allow-downgrade`, and what every device refuses
//! whatever the operator knows (limits the artifact cannot meet, a module that is
//! neither a WASI command nor a reactor) yields to nothing. `--force` also publishes a
//! version below what a device reports (it refuses it; a report may be stale).

use std::fmt;

use kiln_protocol::abi;
use kiln_protocol::fleet::{DesiredModule, DeviceFacts, ModuleState, ReportedV1, Scope};
use kiln_protocol::manifest::Manifest;

use crate::fleet::Error;

/// What the broker retains about one device: its facts (from its status) and its
/// reported state, whoever signed them (a refusal from an unverified claim can only
/// stop a publish, which the override flags undo).
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub device: String,
    pub facts: Option<DeviceFacts>,
    pub reported: Option<ReportedV1>,
}

/// One reason not to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No device with that id has been seen, or no status names the group.
    UnknownScope { scope: String },
    /// The release has no artifact this device can run.
    NoArtifact { device: String, why: String },
    /// The device runs a higher version of the module.
    Downgrade {
        device: String,
        running: u64,
        version: u64,
    },
    /// `--fuel-per-call` for an artifact compiled without metering.
    Unmetered { target: String },
    /// `--tick-ms 0`.
    ZeroTick,
    /// The module exports neither `_start` nor a kiln reactor entry.
    NotRunnable { module: String },
}

impl Refusal {
    /// The refusal as the error a command ends with, worded `line`.
    pub fn error(&self, line: String) -> Error {
        match self {
            Refusal::UnknownScope { .. } => Error::NoSuchScope(line),
            Refusal::ZeroTick => Error::Usage(line),
            _ => Error::WouldRefuse(line),
        }
    }

    /// `--force` publishes anyway.
    pub fn forcible(&self) -> bool {
        matches!(
            self,
            Refusal::UnknownScope { .. } | Refusal::NoArtifact { .. } | Refusal::Downgrade { .. }
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownScope { scope } => write!(
                f,
                "{scope}: no such device has been seen on the broker (no retained status or report names it); check the spelling, or pass --force for a device not started yet"
            ),
            Refusal::NoArtifact { device, why } => write!(
                f,
                "{device}: {why}; it would refuse the update (--force publishes anyway)"
            ),
            Refusal::Downgrade {
                device,
                running,
                version,
            } => write!(
                f,
                "{device}: runs v{running}, this is v{version}; it would refuse a lower version (--allow-downgrade to roll back on purpose; --force publishes it to be refused)"
            ),
            Refusal::Unmetered { target } => write!(
                f,
                "--fuel-per-call: the artifact for {target} was compiled without metering (`kiln compile --fuel`); every device would refuse it"
            ),
            Refusal::ZeroTick => f.write_str("--tick-ms 0: a reactor needs a tick of at least 1 ms"),
            Refusal::NotRunnable { module } => write!(
                f,
                "module `{module}` is neither a WASI command (`_start`) nor a kiln reactor (`{}` or `{}`); every device would refuse to start it",
                abi::TICK,
                abi::ON_MESSAGE
            ),
        }
    }
}

/// The devices `scope` holds among `seen`: the device, or the devices whose status
/// names the group.
pub fn members<'a>(scope: &Scope, seen: &'a [Seen]) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| match scope {
            Scope::Device(d) => s.device == *d,
            Scope::Group(g) => s.facts.as_ref().is_some_and(|f| f.groups.contains(g)),
        })
        .collect()
}

/// Whether `scope` exists at all: for a device, anything retained under its id; for a
/// group, a status naming it.
pub fn scope_refusal(scope: &Scope, seen: &[Seen]) -> Option<Refusal> {
    if !members(scope, seen).is_empty() {
        return None;
    }
    let scope = match scope {
        Scope::Device(d) => format!("device {d}"),
        Scope::Group(g) => {
            return Some(Refusal::UnknownScope {
                scope: format!("group {g}: no device's status names this group, so"),
            })
        }
    };
    Some(Refusal::UnknownScope { scope })
}

/// Every reason the devices of `scope` would refuse `module` (built from
/// `manifests`), in a stable order: the module itself first, then device by device.
pub fn check(
    scope: &Scope,
    module: &DesiredModule,
    manifests: &[&Manifest],
    seen: &[Seen],
) -> Vec<Refusal> {
    let mut out = Vec::new();
    if let Some(m) = manifests.first() {
        if !m.is_command() && !m.exports_fn(abi::TICK) && !m.exports_fn(abi::ON_MESSAGE) {
            out.push(Refusal::NotRunnable {
                module: module.name.clone(),
            });
        }
    }
    if module.limits.tick_ms == Some(0) {
        out.push(Refusal::ZeroTick);
    }
    if module.limits.fuel_per_call.is_some() {
        for m in manifests.iter().filter(|m| m.settings.metering.is_none()) {
            out.push(Refusal::Unmetered {
                target: m.target.triple.clone(),
            });
        }
    }
    let mut members = members(scope, seen);
    members.sort_by(|a, b| a.device.cmp(&b.device));
    for s in members {
        if let Some(f) = &s.facts {
            if let Err(why) = module.artifact_for(&f.triple, &f.cpu_features) {
                out.push(Refusal::NoArtifact {
                    device: s.device.clone(),
                    why: why.to_string(),
                });
            } else if let Some(m) = manifests
                .iter()
                .find(|m| m.target.triple == f.triple && m.engine.kiln_abi > f.kiln_abi)
            {
                out.push(Refusal::NoArtifact {
                    device: s.device.clone(),
                    why: format!(
                        "its kilnd has kiln ABI {}, and the module's imports need {} (update kilnd first)",
                        f.kiln_abi, m.engine.kiln_abi
                    ),
                });
            }
        }
        if module.allow_downgrade {
            continue;
        }
        let running = s.reported.as_ref().and_then(|r| {
            r.modules
                .iter()
                .find(|m| m.name == module.name && m.state != ModuleState::Failed)
                .map(|m| m.version)
        });
        if let Some(running) = running.filter(|v| *v > module.version) {
            out.push(Refusal::Downgrade {
                device: s.device.clone(),
                running,
                version: module.version,
            });
        }
    }
    out
}

/// The refusals that stand (`force` waives the forcible ones), as one error: the
/// first refusal's kind, every reason on one line.
pub fn verdict(refusals: &[Refusal], force: bool) -> Option<Error> {
    let standing: Vec<&Refusal> = refusals
        .iter()
        .filter(|r| !(force && r.forcible()))
        .collect();
    let first = standing.first()?;
    let reasons: Vec<String> = standing.iter().map(ToString::to_string).collect();
    Some(first.error(format!("not published: {}", reasons.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::fleet::{ModuleLimits, ModuleReport, TargetArtifact};
    use kiln_protocol::transfer::{Codec, Transfer};

    fn facts(triple: &str, groups: &[&str]) -> DeviceFacts {
        DeviceFacts {
            triple: triple.into(),
            cpu_features: Vec::new(),
            kilnd: "0".into(),
            wasmer: "0".into(),
            kiln_abi: 1,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            boot_id: 0,
        }
    }

    fn seen(device: &str, triple: &str, groups: &[&str], running: Option<u64>) -> Seen {
        Seen {
            device: device.into(),
            facts: Some(facts(triple, groups)),
            reported: running.map(|v| ReportedV1 {
                serial: 1,
                modules: vec![ModuleReport {
                    name: "app".into(),
                    version: v,
                    sha256: [1; 32],
                    state: ModuleState::Running,
                    last_event: String::new(),
                }],
            }),
        }
    }

    fn module(version: u64, triple: &str) -> DesiredModule {
        DesiredModule {
            name: "app".into(),
            version,
            artifacts: vec![TargetArtifact {
                triple: triple.into(),
                cpu_features: Vec::new(),
                sha256: [2; 32],
                len: 1,
                full: Transfer {
                    codec: Codec::Raw,
                    sha256: [2; 32],
                    len: 1,
                    chunk_size: 1024,
                    list: [3; 32],
                },
                patches: Vec::new(),
            }],
            config: Vec::new(),
            limits: ModuleLimits::default(),
            allow_downgrade: false,
            health_window_ms: 1000,
        }
    }

    #[test]
    fn a_misspelt_scope_a_foreign_target_and_a_downgrade_are_refused_and_named() {
        let fleet = [
            seen("dev-01", "x86_64-unknown-linux-gnu", &["lab"], Some(3)),
            seen("dev-02", "aarch64-unknown-linux-gnu", &["lab"], None),
        ];
        let lab = Scope::Group("lab".into());
        assert!(scope_refusal(&lab, &fleet).is_none());
        let typo = scope_refusal(&Scope::Device("dev-1".into()), &fleet).unwrap();
        assert!(matches!(typo.error(String::new()), Error::NoSuchScope(_)));
        assert!(typo.to_string().contains("device dev-1"));
        assert!(scope_refusal(&Scope::Group("lba".into()), &fleet).is_some());

        let m = module(2, "x86_64-unknown-linux-gnu");
        let refusals = check(&lab, &m, &[], &fleet);
        assert_eq!(refusals.len(), 2, "{refusals:?}");
        assert!(
            matches!(&refusals[0], Refusal::Downgrade { device, running: 3, .. } if device == "dev-01")
        );
        assert!(matches!(&refusals[1], Refusal::NoArtifact { device, .. } if device == "dev-02"));
        let Some(Error::WouldRefuse(line)) = verdict(&refusals, false) else {
            panic!("not a refusal of the update");
        };
        assert!(line.contains("dev-01") && line.contains("dev-02"), "{line}");
        assert!(verdict(&refusals, true).is_none());
        // What every device refuses yields to nothing.
        let mut fuel = m.clone();
        fuel.limits.fuel_per_call = Some(5);
        let manifest = Manifest::example(b"x");
        let refusals = check(&lab, &fuel, &[&manifest], &fleet);
        assert!(
            refusals
                .iter()
                .any(|r| matches!(r, Refusal::Unmetered { .. })),
            "{refusals:?}"
        );
        assert!(verdict(&refusals, true).is_some());
        let mut down = m.clone();
        down.allow_downgrade = true;
        assert!(verdict(&check(&lab, &down, &[], &fleet), true).is_none());
    }

    #[test]
    fn a_device_whose_kilnd_has_an_older_abi_than_the_module_needs_is_named() {
        let fleet = [seen("dev-01", "x86_64-unknown-linux-gnu", &["lab"], None)];
        let lab = Scope::Group("lab".into());
        let m = module(2, "x86_64-unknown-linux-gnu");
        let mut manifest = Manifest::example(b"x");
        manifest.target.triple = "x86_64-unknown-linux-gnu".into();
        manifest.engine.kiln_abi = 2;
        let refusals = check(&lab, &m, &[&manifest], &fleet);
        assert!(
            matches!(&refusals[..], [Refusal::NoArtifact { device, why }]
                if device == "dev-01" && why.contains("kiln ABI 1") && why.contains("need 2")),
            "{refusals:?}"
        );
        manifest.engine.kiln_abi = 1;
        assert!(check(&lab, &m, &[&manifest], &fleet).is_empty());
    }
}
