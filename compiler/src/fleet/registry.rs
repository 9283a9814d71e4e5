//! The device registry on the broker: signed under the next serial, checked as a
//! device would check it, and published. `enroll` and `decommission` change it here.

use std::collections::BTreeSet;

use anyhow::{anyhow, Result};
use kiln_protocol::trust::SignedRegistry;

use crate::fleet::trust::Fleet;
use crate::fleet::Error;

/// A registry with `devices` removed, signed and published: what `enroll --remove`
/// and `kiln decommission` share. Returns the new serial and whether any was there.
pub fn remove_from_registry(
    session: &mut crate::fleet::broker::Session,
    topics: &kiln_protocol::fleet::Topics,
    fleet: &Fleet,
    keys: &[kiln_protocol::keys::SecretKey],
    devices: &[String],
    adopt: bool,
) -> Result<(u64, Vec<String>)> {
    let mut registry = fleet.registry(session, topics, adopt)?;
    let removed: Vec<String> = devices
        .iter()
        .filter(|d| registry.key_of(d).is_some())
        .cloned()
        .collect();
    registry.devices.retain(|e| !devices.contains(&e.device));
    publish_registry(session, topics, fleet, keys, &mut registry)?;
    Ok((registry.serial, removed))
}

/// Signs `registry` under the next serial, checks a device would trust it, publishes
/// it: the parts the broker does not hold yet, then the head, then clears the parts
/// no head names any more (so a reader never finds a head whose parts are not there,
/// but for the moment between the last two steps, which it reads again).
pub fn publish_registry(
    session: &mut crate::fleet::broker::Session,
    topics: &kiln_protocol::fleet::Topics,
    fleet: &Fleet,
    keys: &[kiln_protocol::keys::SecretKey],
    registry: &mut kiln_protocol::trust::Registry,
) -> Result<(), Error> {
    registry.fleet = fleet.root().fleet.clone();
    registry.serial += 1;
    let refs: Vec<_> = keys.iter().collect();
    let signed = registry
        .sign(&refs)
        .map_err(|e| Error::invalid(anyhow!(e)))?;
    SignedRegistry::open(&signed.head, |s| signed.part(s), fleet.root())
        .map_err(|e| Error::Trust(format!("the registry would not be trusted: {e}")))?;
    let held: BTreeSet<String> = session
        .retained(&topics.registry_all())
        .map_err(Error::Broker)?
        .into_keys()
        .filter(|t| topics.parse_registry_part(t).is_some())
        .collect();
    let part = |sha: &[u8; 32]| topics.registry_part(sha);
    crate::fleet::parts::publish(session, &topics.registry(), part, (&held, true), signed)
        .map_err(Error::Broker)?;
    Ok(())
}
