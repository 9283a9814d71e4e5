//! Desired states: the next signed state of a device or a group, built from the one
//! retained on its topic (if trusted, or adopted) and the serials its devices claim,
//! with a caller's edit of its module list. `push`, `rollout`, `refresh` and `remove`
//! all build theirs here.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use kiln_protocol::fleet::{Desired, DesiredModule, Scope, Topics, MAX_DESIRED};

use crate::fleet::broker::{now_ms, Session};
use crate::fleet::messages::{warn_skipped, Heard, Reader};
use crate::fleet::release::Release;
use crate::fleet::serial::{next_serial, warn_ignored, Claim};
use crate::fleet::trust::{describe_state, Opened, Signing};
use crate::fleet::Error;

impl Release {
    /// The desired state of `scope` with this release as its module's entry (the
    /// other modules kept), signed and ready to publish.
    pub fn next_desired(&self, session: &mut Session, scope: &Scope) -> Result<NextDesired> {
        let module = self.module.clone();
        let mirrors = self.mirrors.clone();
        prepare(
            session,
            &self.signing,
            &self.topics,
            scope,
            mirrors,
            |modules| {
                modules.retain(|m| m.name != module.name);
                modules.push(module);
            },
        )
    }

    /// Makes this release the desired version of its module for `scope`; returns the
    /// new serial.
    pub fn set_desired(&self, session: &mut Session, scope: &Scope) -> Result<u64> {
        let next = self.next_desired(session, scope)?;
        next.publish(session)
    }
}

/// A signed desired state, not published yet.
pub struct NextDesired {
    pub topic: String,
    pub desired: Desired,
    pub signed: Vec<u8>,
}

impl NextDesired {
    /// Publishes it retained and waits for the broker's acknowledgement; returns the
    /// serial.
    pub fn publish(self, session: &mut Session) -> Result<u64> {
        session
            .publish_all(vec![(self.topic, self.signed)], |_| {})
            .map_err(Error::Broker)?;
        Ok(self.desired.serial)
    }
}

/// `device ID` or `group NAME`, as messages name a scope.
pub fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Device(d) => format!("device {d}"),
        Scope::Group(g) => format!("group {g}"),
    }
}

/// Reads the current desired state of `scope`, lets `edit` change its module list,
/// and signs the result under a new serial (see [`crate::fleet::serial`]).
/// The mirrors the retained state names are kept.
pub fn prepare_desired(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    scope: &Scope,
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    prepare(session, signing, topics, scope, None, edit)
}

/// [`prepare_desired`] naming `mirrors` (`None`: those the retained state names).
fn prepare(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    scope: &Scope,
    mirrors: Option<Vec<String>>,
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let unavailable = |e| Error::Broker(e);
    let topic = match scope {
        Scope::Device(d) => topics.desired(d),
        Scope::Group(g) => topics.group_desired(g),
    };
    let current = session.retained(&topic).map_err(unavailable)?;
    let heard = device_reports(session, signing, topics, scope)?;
    build_desired(
        signing,
        scope,
        topic.clone(),
        current.get(&topic).map(Vec::as_slice),
        &crate::fleet::serial::claims(&heard, scope),
        mirrors,
        edit,
    )
}

/// [`prepare_desired`] for many devices with a few retained reads in all (a rollout's
/// wave of a thousand devices would otherwise make thousands of round trips).
pub fn prepare_for_devices(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    devices: &[String],
    mut edit: impl FnMut(&str, &mut Vec<DesiredModule>),
) -> Result<Vec<NextDesired>> {
    let unavailable = |e| Error::Broker(e);
    let current = session
        .retained(&topics.all_devices("desired"))
        .map_err(unavailable)?;
    let heard = device_reports(session, signing, topics, &Scope::Group(String::new()))?;
    devices
        .iter()
        .map(|device| {
            let topic = topics.desired(device);
            let scope = Scope::Device(device.clone());
            build_desired(
                signing,
                &scope,
                topic.clone(),
                current.get(&topic).map(Vec::as_slice),
                &crate::fleet::serial::claims(&heard, &scope),
                None,
                |m| edit(device, m),
            )
        })
        .collect()
}

/// The retained statuses and reports of the devices `scope` may hold (a group's
/// members say so in their statuses), judged by the one reader.
fn device_reports(
    session: &mut Session,
    signing: &Signing,
    topics: &Topics,
    scope: &Scope,
) -> Result<Vec<Heard>> {
    let unavailable = |e| Error::Broker(e);
    let registry = signing.registry(session, topics)?;
    let mut retained = BTreeMap::new();
    let kinds: &[&str] = match scope {
        Scope::Device(d) => {
            retained.extend(session.retained(&topics.reported(d)).map_err(unavailable)?);
            &[]
        }
        Scope::Group(_) => &["status", "reported"],
    };
    for kind in kinds {
        retained.extend(
            session
                .retained(&topics.all_devices(kind))
                .map_err(unavailable)?,
        );
    }
    let (heard, skipped) = Reader::new(topics, registry).all(&retained);
    warn_skipped(&skipped, 5);
    Ok(heard)
}

/// The next desired state of `scope`, from the one retained on its topic (if it is
/// trusted under the current root, or adopted) and what its devices claim.
fn build_desired(
    signing: &Signing,
    scope: &Scope,
    topic: String,
    current: Option<&[u8]>,
    claims: &[Claim],
    mirrors: Option<Vec<String>>,
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let target = describe(scope);
    let fresh = mirrors.clone().unwrap_or_default();
    let (retained_serial, modules, mirrors) = match current {
        Some(payload) => {
            let d = match signing.fleet.open_desired(payload) {
                Ok(Opened::Trusted(d)) => d,
                Ok(Opened::Revoked { doc, root }) if signing.adopt => {
                    eprintln!(
                        "adopting the desired state of {target} signed under root v{root} (keys since rotated out): {}",
                        describe_state(&doc)
                    );
                    doc
                }
                Ok(Opened::Revoked { root, .. }) if signing.replace_untrusted => {
                    eprintln!(
                        "replacing the desired state of {target} signed under root v{root} (keys since rotated out): its modules are dropped"
                    );
                    return finish_desired(signing, scope, topic, None, (Vec::new(), fresh), claims, edit);
                }
                Err(e) if signing.replace_untrusted => {
                    eprintln!("replacing the untrusted desired state of {target} ({e}): its modules are dropped");
                    return finish_desired(signing, scope, topic, None, (Vec::new(), fresh), claims, edit);
                }
                Ok(Opened::Revoked { doc, root }) => bail!(Error::trust(anyhow!(
                        "the current desired state of {target} was signed under root v{root} by keys since rotated out ({}); building on it would re-sign it with today's keys: review it and pass --adopt, or --replace-untrusted to start from no modules",
                        describe_state(&doc)
                    )
                )),
                Err(e) => bail!(Error::Trust(format!("the current desired state of {target} is not trusted ({e}); refusing to build on it (--replace-untrusted starts from no modules)"),
                )),
            };
            // Not this target's state (a stray or mis-addressed message): start over,
            // above its serial so devices do not take ours for an old one.
            let (modules, kept) = if d.scope == *scope {
                (d.modules, d.mirrors)
            } else {
                (Vec::new(), Vec::new())
            };
            (Some(d.serial), modules, mirrors.unwrap_or(kept))
        }
        None => (None, Vec::new(), fresh),
    };
    finish_desired(
        signing,
        scope,
        topic,
        retained_serial,
        (modules, mirrors),
        claims,
        edit,
    )
}

/// The new state: `modules` edited, naming `mirrors`, under the next serial, signed.
fn finish_desired(
    signing: &Signing,
    scope: &Scope,
    topic: String,
    retained_serial: Option<u64>,
    (mut modules, mirrors): (Vec<DesiredModule>, Vec<String>),
    claims: &[Claim],
    edit: impl FnOnce(&mut Vec<DesiredModule>),
) -> Result<NextDesired> {
    let target = describe(scope);
    let next = next_serial(retained_serial, claims, now_ms());
    warn_ignored(&next, &target);
    let serial = next.serial;
    edit(&mut modules);
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    let now = now_ms();
    let desired = Desired {
        fleet: signing.fleet.root().fleet.clone(),
        scope: scope.clone(),
        serial,
        issued_ms: now,
        expires_ms: now.saturating_add(signing.valid_ms),
        mirrors,
        modules,
    };
    let signed = signing.sign(&desired)?;
    if signed.len() > MAX_DESIRED {
        bail!(Error::invalid(anyhow!(
                "the desired state of {target} would be {} bytes, more than devices read ({MAX_DESIRED}); fewer modules or a smaller config",
                signed.len()
            )
        ));
    }
    Ok(NextDesired {
        topic,
        desired,
        signed,
    })
}

/// `{"device": ID}` or `{"group": NAME}`.
pub fn scope_json(scope: &Scope) -> serde_json::Value {
    match scope {
        Scope::Device(d) => serde_json::json!({ "device": d }),
        Scope::Group(g) => serde_json::json!({ "group": g }),
    }
}
