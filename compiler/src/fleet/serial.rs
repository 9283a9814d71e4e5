//! The serial of a new desired state, decided from what is known to be true.
//!
//! A device refuses a serial lower than the one it applied, so kiln signs one above
//! what the scope's devices applied, above the state retained on the topic, and no
//! lower than the clock (a broker restarted without persistence forgets the retained
//! state; the reports, or the clock, keep the serial from going back). What a device
//! *says* it applied counts only if the report is signed by its enrolled key and the
//! device is in the scope (for a group: its verified status names the group), and no
//! input counts that is more than [`MAX_SERIAL_AHEAD_MS`] ahead of the clock: one
//! lying device, or a leaked key's fast-forward, cannot move what kiln signs.

use kiln_protocol::fleet::{Scope, MAX_SERIAL_AHEAD_MS};

use super::messages::Heard;

/// A serial a device reported, with what the reader found about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub device: String,
    pub serial: u64,
    /// Signed by its enrolled key.
    pub verified: bool,
    /// The device is in the state's scope.
    pub in_scope: bool,
}

/// The serial to sign, and the inputs that were left out with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    pub serial: u64,
    /// `(who, serial, why)`: `who` is a device or `retained state`.
    pub ignored: Vec<(String, u64, &'static str)>,
}

/// The next serial: above the retained state's (verified by the caller) and every
/// verified, in-scope claim within the bound; at least `now_ms` (and 1). Never more
/// than `now_ms + MAX_SERIAL_AHEAD_MS`.
pub fn next_serial(retained: Option<u64>, claims: &[Claim], now_ms: u64) -> Next {
    let bound = now_ms.saturating_add(MAX_SERIAL_AHEAD_MS);
    let mut serial = now_ms.max(1);
    let mut ignored = Vec::new();
    let within = |who: &str, s: u64, ignored: &mut Vec<_>| {
        if s >= bound {
            ignored.push((who.to_string(), s, "more than a day ahead of the clock"));
            false
        } else {
            true
        }
    };
    if let Some(s) = retained {
        if within("retained state", s, &mut ignored) {
            serial = serial.max(s + 1);
        }
    }
    for c in claims {
        if !c.in_scope {
            continue;
        }
        if !c.verified {
            ignored.push((c.device.clone(), c.serial, "not signed by its enrolled key"));
            continue;
        }
        if within(&c.device, c.serial, &mut ignored) {
            serial = serial.max(c.serial + 1);
        }
    }
    Next { serial, ignored }
}

/// The serials the devices of `scope` reported, from the reader's judgement of their
/// retained statuses and reports: a group's members are the devices whose verified
/// status names it.
pub fn claims(heard: &[Heard], scope: &Scope) -> Vec<Claim> {
    let member = |device: &str| match scope {
        Scope::Device(d) => d == device,
        Scope::Group(g) => heard.iter().any(|h| {
            h.device == device
                && h.is_verified()
                && h.status()
                    .and_then(|s| s.facts.as_ref())
                    .is_some_and(|f| f.groups.contains(g))
        }),
    };
    heard
        .iter()
        .filter_map(|h| {
            let r = h.reported()?;
            Some(Claim {
                device: h.device.clone(),
                serial: r.serial,
                verified: h.is_verified(),
                in_scope: member(&h.device),
            })
        })
        .collect()
}

/// Says on stderr which claims were left out, one line each (verified devices and the
/// retained state first: those are what an operator must look into).
pub fn warn_ignored(next: &Next, target: &str) {
    let mut shown = 0;
    for (who, serial, why) in next
        .ignored
        .iter()
        .filter(|(_, _, why)| !why.starts_with("not signed"))
    {
        eprintln!("warning: {target}: serial {serial} of {who} ignored: {why}");
        shown += 1;
    }
    let unsigned = next.ignored.len() - shown;
    if unsigned > 0 {
        eprintln!(
            "note: {target}: {unsigned} reported serial(s) not signed by an enrolled key ignored (`kiln enroll`)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::messages::Body;
    use crate::fleet::trust::Identity;
    use kiln_protocol::fleet::{DeviceFacts, ReportedV1, StatusV2};
    use kiln_protocol::keys::SecretKey;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000;

    fn claim(device: &str, serial: u64, verified: bool) -> Claim {
        Claim {
            device: device.into(),
            serial,
            verified,
            in_scope: true,
        }
    }

    #[test]
    fn an_absurd_or_unverified_serial_moves_nothing() {
        // The audit's reproduction: an unsigned report of 2^64 - 2.
        let next = next_serial(Some(NOW - 5), &[claim("evil", u64::MAX - 1, false)], NOW);
        assert_eq!(next.serial, NOW);
        // Enrolled, but absurd: still ignored, and said.
        let next = next_serial(None, &[claim("dev", u64::MAX - 1, true)], NOW);
        assert_eq!(next.serial, NOW);
        assert_eq!(next.ignored[0].2, "more than a day ahead of the clock");
        // A retained state fast-forwarded by a leaked key is not built on either.
        let next = next_serial(Some(u64::MAX), &[], NOW);
        assert_eq!(next.serial, NOW);
        // Honest inputs still count: a device that applied a serial above the clock
        // (pushes faster than one a millisecond) is passed.
        let next = next_serial(Some(NOW + 3), &[claim("dev", NOW + 7, true)], NOW);
        assert_eq!(next.serial, NOW + 8);
        assert_eq!(next_serial(None, &[], 0).serial, 1);
    }

    fn facts(groups: Vec<String>) -> DeviceFacts {
        DeviceFacts {
            triple: "t".into(),
            cpu_features: Vec::new(),
            kilnd: "0".into(),
            wasmer: "0".into(),
            kiln_abi: 1,
            groups,
            boot_id: 0,
        }
    }

    /// One device's retained messages, as the reader judged them.
    #[derive(Debug, Clone)]
    struct Device {
        name: String,
        serial: u64,
        in_group: bool,
        /// 0 verified, 1 unsigned, 2 unenrolled, 3 signed by another key.
        who: u8,
        /// The status is from another signer than the report (a forger's status).
        forged_status: bool,
    }

    fn identity(who: u8) -> Identity {
        let k = || SecretKey::generate().unwrap().public();
        match who {
            0 => Identity::Verified,
            1 => Identity::Unsigned,
            2 => Identity::Unenrolled(k()),
            _ => Identity::Mismatch(k()),
        }
    }

    fn heard(devices: &[Device]) -> Vec<Heard> {
        let mut out = Vec::new();
        for d in devices {
            let groups = if d.in_group {
                vec!["g".to_string()]
            } else {
                Vec::new()
            };
            out.push(Heard {
                device: d.name.clone(),
                topic: format!("kiln/v1/devices/{}/status", d.name),
                identity: if d.forged_status {
                    identity(1)
                } else {
                    identity(d.who)
                },
                signer: None,
                body: Body::Status(StatusV2 {
                    device: d.name.clone(),
                    online: true,
                    facts: Some(facts(groups)),
                    trust: None,
                }),
            });
            out.push(Heard {
                device: d.name.clone(),
                topic: format!("kiln/v1/devices/{}/reported", d.name),
                identity: identity(d.who),
                signer: None,
                body: Body::Reported(ReportedV1 {
                    serial: d.serial,
                    modules: Vec::new(),
                }),
            });
        }
        out
    }

    fn device() -> impl Strategy<Value = Device> {
        (
            0u8..8,
            prop_oneof![
                Just(0u64),
                NOW - 10_000..NOW + 10_000,
                NOW..u64::MAX,
                Just(u64::MAX)
            ],
            any::<bool>(),
            0u8..4,
            any::<bool>(),
        )
            .prop_map(|(n, serial, in_group, who, forged_status)| Device {
                name: format!("d{n}"),
                serial,
                in_group,
                who,
                forged_status,
            })
    }

    proptest! {
        /// For any mix of honest and lying devices and any retained serial, the serial
        /// kiln signs never exceeds the bound, is above every honest in-scope input
        /// within it, and is what the honest inputs alone give: the unverified ones
        /// could be removed, or changed, without changing it.
        #[test]
        fn the_serial_is_bounded_and_never_depends_on_an_unverified_message(
            devices in proptest::collection::vec(device(), 0..12),
            retained in proptest::option::of(prop_oneof![NOW - 5..NOW + 5, Just(u64::MAX)]),
            group in any::<bool>(),
        ) {
            let scope = if group { Scope::Group("g".into()) } else { Scope::Device("d0".into()) };
            let all = heard(&devices);
            let next = next_serial(retained, &claims(&all, &scope), NOW);
            prop_assert!(next.serial <= NOW + MAX_SERIAL_AHEAD_MS);
            prop_assert!(next.serial >= NOW);
            // The honest view: only devices whose report and status are verified.
            let honest: Vec<Heard> = all.iter().filter(|h| h.is_verified()).cloned().collect();
            let alone = next_serial(retained, &claims(&honest, &scope), NOW);
            prop_assert_eq!(next.serial, alone.serial);
            for c in claims(&honest, &scope) {
                if c.in_scope && c.serial < NOW + MAX_SERIAL_AHEAD_MS {
                    prop_assert!(next.serial > c.serial);
                }
            }
            // The liars, with their serials raised to the maximum: nothing changes.
            let lied: Vec<Heard> = all
                .iter()
                .cloned()
                .map(|mut h| {
                    if !h.is_verified() {
                        if let Body::Reported(r) = &mut h.body {
                            r.serial = u64::MAX - 1;
                        }
                    }
                    h
                })
                .collect();
            prop_assert_eq!(next_serial(retained, &claims(&lied, &scope), NOW).serial, next.serial);
        }
    }
}
