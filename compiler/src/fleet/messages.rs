//! What devices say, judged once: the reader is kiln-protocol's
//! ([`kiln_protocol::heard`], pure, fuzzed); this is how commands say what it skipped.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use kiln_protocol::fleet::{DeviceFacts, Scope, StatusV2, Topics};
use kiln_protocol::trust::Registry;

use crate::fleet::broker::Session;
use crate::fleet::preflight;
use crate::fleet::Error;

pub use kiln_protocol::heard::{Body, Heard, Reader, Skipped};

/// Says on stderr what was skipped, one line each (at most `limit`, then a count).
pub fn warn_skipped(skipped: &[Skipped], limit: usize) {
    for s in skipped.iter().take(limit) {
        eprintln!("warning: skipped {s}");
    }
    if skipped.len() > limit {
        eprintln!(
            "warning: {} more device messages skipped",
            skipped.len() - limit
        );
    }
}

/// The facts of the devices of `scope`, from their retained status (an offline
/// device's last will keeps them).
pub fn device_facts(
    session: &mut Session,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<DeviceFacts>> {
    Ok(statuses(session, topics, scope)?
        .into_iter()
        .filter_map(|(_, s)| s.facts)
        .collect())
}

/// The retained status of every device of `scope`: the device, or the devices whose
/// status names the group.
pub fn statuses(
    session: &mut Session,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<(String, StatusV2)>> {
    let filter = match scope {
        Scope::Device(d) => topics.status(d),
        Scope::Group(_) => topics.all_devices("status"),
    };
    let retained = session.retained(&filter).map_err(Error::Broker)?;
    // Facts only (which targets, who is online): no identity is judged from them.
    let registry = Registry::default();
    let (heard, skipped) = Reader::new(topics, &registry).all(&retained);
    warn_skipped(&skipped, 5);
    Ok(heard
        .into_iter()
        .filter_map(|h| {
            let s = h.status()?.clone();
            let targeted = match scope {
                Scope::Device(d) => *d == h.device,
                Scope::Group(g) => s.facts.as_ref().is_some_and(|f| f.groups.contains(g)),
            };
            targeted.then_some((h.device, s))
        })
        .collect())
}

/// The devices targeted by `scope` that are online now, by their retained status.
pub fn online_targets(
    session: &mut Session,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<String>> {
    Ok(statuses(session, topics, scope)?
        .into_iter()
        .filter(|(_, s)| s.online)
        .map(|(device, _)| device)
        .collect())
}

/// Every device the broker retains anything for, with its facts and reported state
/// (judged by the one reader). Where the fleet enrolls devices (`registry` holds any),
/// a device whose status or report is not signed by its enrolled key is left out and
/// named: one lying device cannot block every push. Where nobody is enrolled, what is
/// retained counts as it is.
pub fn seen(
    session: &mut Session,
    topics: &Topics,
    registry: Option<&Registry>,
) -> Result<Vec<preflight::Seen>> {
    let unavailable = |e| Error::Broker(e);
    let empty = Registry::default();
    let registry = registry.unwrap_or(&empty);
    let enrolling = !registry.devices.is_empty();
    let mut left_out = BTreeSet::new();
    let reader = Reader::new(topics, registry);
    let mut by_device: BTreeMap<String, preflight::Seen> = BTreeMap::new();
    for kind in ["status", "reported"] {
        let retained = session
            .retained(&topics.all_devices(kind))
            .map_err(unavailable)?;
        let (heard, skipped) = reader.all(&retained);
        warn_skipped(&skipped, 5);
        for h in heard {
            if enrolling && !h.is_verified() {
                left_out.insert(h.device.clone());
                continue;
            }
            let entry = by_device
                .entry(h.device.clone())
                .or_insert_with(|| preflight::Seen {
                    device: h.device.clone(),
                    ..Default::default()
                });
            match h.body {
                Body::Status(st) => entry.facts = st.facts,
                Body::Reported(r) => entry.reported = Some(r),
                Body::Event(_) => {}
            }
        }
    }
    if !left_out.is_empty() {
        let names: Vec<String> = left_out.into_iter().collect();
        eprintln!(
            "warning: not signed by an enrolled key, so left out of the checks: {}",
            kiln_protocol::rollout::short_list(&names)
        );
    }
    Ok(by_device.into_values().collect())
}
