//! Operator tags as the fleet tool reads and writes them: one signed retained record
//! per device on `{prefix}/devices/{id}/tags` ([`kiln_protocol::fleet::Tags`]). Only
//! a record that verifies under the current root counts; any other is named on
//! stderr and selects nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Result};
use kiln_protocol::fleet::{Tags, Topics};
use kiln_protocol::keys::SecretKey;

use crate::fleet::broker::{now_ms, Session};
use crate::fleet::trust::Fleet;
use crate::fleet::Error;

/// Every device's verified tags, by device; the others are warned of and left out.
pub fn read_all(
    session: &mut Session,
    topics: &Topics,
    fleet: &Fleet,
) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let retained = session
        .retained(&topics.all_devices("tags"))
        .map_err(Error::Broker)?;
    let mut out = BTreeMap::new();
    let mut ignored = 0usize;
    for (topic, bytes) in retained {
        let Some((device, _)) = topics.parse_device(&topic) else {
            continue;
        };
        match Tags::open(&bytes, fleet.root(), device) {
            Ok(t) => {
                out.insert(device.to_string(), t.tags);
            }
            // Named up to a few: whoever can write to the broker could plant thousands.
            Err(why) => {
                ignored += 1;
                if ignored <= WARNED {
                    eprintln!(
                        "kiln: warning: ignoring the tags of {device} on {topic}: {why}; they select nothing"
                    );
                }
            }
        }
    }
    if ignored > WARNED {
        eprintln!(
            "kiln: warning: ignoring the tags of {} more devices",
            ignored - WARNED
        );
    }
    Ok(out)
}

/// Tags records that do not verify named one by one; the rest are counted.
const WARNED: usize = 5;

/// `device`'s record if one verifies; an unverifiable one is warned of and counts as
/// none (a new record replaces it).
pub fn read_one(
    session: &mut Session,
    topics: &Topics,
    fleet: &Fleet,
    device: &str,
) -> Result<Option<Tags>> {
    let topic = topics.tags(device);
    let retained = session.retained(&topic).map_err(Error::Broker)?;
    let Some(bytes) = retained.get(&topic) else {
        return Ok(None);
    };
    match Tags::open(bytes, fleet.root(), device) {
        Ok(t) => Ok(Some(t)),
        Err(why) => {
            eprintln!("kiln: warning: ignoring the tags record on {topic}: {why}; it is replaced");
            Ok(None)
        }
    }
}

/// `device`'s tags after adding `add` and removing `remove`, signed with `keys` under
/// a serial above the held record's, and published retained. Returns the new record.
pub fn write(
    session: &mut Session,
    topics: &Topics,
    fleet: &Fleet,
    keys: &[&SecretKey],
    device: &str,
    add: &[String],
    remove: &[String],
) -> Result<Tags> {
    let held = read_one(session, topics, fleet, device)?;
    let now = now_ms();
    let mut tags = held.as_ref().map(|t| t.tags.clone()).unwrap_or_default();
    tags.extend(add.iter().cloned());
    for t in remove {
        tags.remove(t);
    }
    let record = Tags {
        fleet: fleet.root().fleet.clone(),
        device: device.to_string(),
        serial: Tags::next_serial(held.as_ref(), now),
        issued_ms: now,
        tags,
    };
    if let Some(h) = &held {
        record.replaces(h).map_err(Error::Invalid)?;
    }
    let bytes = record
        .seal(keys)
        .map_err(|e| Error::Invalid(format!("{device}: {e}")))?;
    // What devices would never count is refused before it is published.
    Tags::open(&bytes, fleet.root(), device).map_err(|e| {
        Error::trust(anyhow!(
            "the tags of {device} would not verify: {e}; sign with release keys of {}",
            fleet.root().describe()
        ))
    })?;
    session
        .publish_all(vec![(topics.tags(device), bytes)], |_| {})
        .map_err(Error::Broker)?;
    Ok(record)
}
