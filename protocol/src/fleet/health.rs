//! What a device's modules did over a period (`health`): per module and version, the
//! counts and sketches a rollout's health gates judge ([`HealthSummary`]), signed with
//! the device's identity key like its reports, and bounded before and after decoding.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{open_report, seal_report, DeviceMessage, DeviceSigned, ReportError, MAX_REPORT};
use crate::keys::{PublicKey, SecretKey};
use crate::rollout::gate::{HealthSummary, MAX_MODULES};

/// Largest health message (signed, as on the broker): the same bound as every other
/// device message, so a reader of a device's topics needs one. A message within the
/// limits of [`HealthV1::validate`] is far below it (64 of the largest summaries are
/// under 45 KiB; see the tests).
pub const MAX_HEALTH: usize = MAX_REPORT;

/// Summaries one health message may carry: as many as one device may report to a
/// rollout's cohort ([`MAX_MODULES`]).
pub const MAX_HEALTH_MODULES: usize = MAX_MODULES;

/// Retained on `health`: the device's last period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Health {
    V1(HealthV1),
    /// Signed by the device's identity key (see [`seal_report`]).
    Signed(DeviceSigned),
}

/// One period of a device's modules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthV1 {
    /// Counts the device's periods since kilnd started (from 1): a fleet tool that
    /// sees the same `seq` again (a retained message read twice) counts it once; a
    /// lower one means kilnd restarted.
    pub seq: u64,
    /// How long the period was, in milliseconds (the counts are over this time).
    pub period_ms: u64,
    /// A module updated during the period has one entry per version it ran.
    pub modules: Vec<ModuleHealth>,
}

/// One module's period at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleHealth {
    /// The version that ran (the one on trial while it was updating), so the fleet
    /// tool knows which release the summary is of.
    pub version: u64,
    pub summary: HealthSummary,
}

impl DeviceMessage for Health {
    const CONTEXT: &'static [u8] = b"kiln health v1\0";
    fn wrap(signed: DeviceSigned) -> Self {
        Health::Signed(signed)
    }
    fn as_signed(&self) -> Option<&DeviceSigned> {
        match self {
            Health::Signed(s) => Some(s),
            _ => None,
        }
    }
}

impl HealthV1 {
    /// Refuses what a device must not send: more than [`MAX_HEALTH_MODULES`]
    /// summaries, a summary that fails [`HealthSummary::validate`], or two of one
    /// module at one version.
    pub fn validate(&self) -> Result<(), String> {
        if self.modules.len() > MAX_HEALTH_MODULES {
            return Err(format!(
                "health of {} modules (at most {MAX_HEALTH_MODULES})",
                self.modules.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for m in &self.modules {
            m.summary.validate()?;
            if !seen.insert((m.summary.module.as_str(), m.version)) {
                return Err(format!(
                    "health of module {} version {} twice",
                    m.summary.module, m.version
                ));
            }
        }
        Ok(())
    }

    /// The message for `topic` (the device's [`health`](super::Topics::health)
    /// topic), signed with the device's identity `key`; refused if it is not valid or
    /// larger than [`MAX_HEALTH`].
    pub fn seal(&self, topic: &str, key: &SecretKey) -> Result<Vec<u8>, String> {
        self.validate()?;
        let bytes = seal_report(&Health::V1(self.clone()), topic, key);
        if bytes.len() > MAX_HEALTH {
            return Err(format!(
                "health message of {} bytes (at most {MAX_HEALTH})",
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}

impl Health {
    /// The period, and who signed it (see [`open_report`]): refused if larger than
    /// [`MAX_HEALTH`] (not decoded), malformed, forged, signed twice, or not valid
    /// ([`HealthV1::validate`]).
    pub fn open(topic: &str, bytes: &[u8]) -> Result<(HealthV1, Option<PublicKey>), ReportError> {
        if bytes.len() > MAX_HEALTH {
            return Err(ReportError::Malformed(format!(
                "health message of {} bytes, more than {MAX_HEALTH}; not decoded",
                bytes.len()
            )));
        }
        let (health, signer) = match open_report::<Health>(topic, bytes)? {
            (Health::V1(h), signer) => (h, signer),
            (Health::Signed(_), _) => {
                return Err(ReportError::Malformed("health signed twice".into()))
            }
        };
        health
            .validate()
            .map_err(|e| ReportError::Malformed(format!("invalid health: {e}")))?;
        Ok((health, signer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Topics;
    use crate::names;
    use crate::rollout::gate::tests::largest_of;
    use crate::rollout::gate::{Sketch, MAX_METRICS};
    use proptest::prelude::*;

    fn key() -> SecretKey {
        SecretKey::from_text(
            "kiln-secret-key-v1 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
        )
        .unwrap()
    }

    fn topic() -> String {
        Topics::new("kiln/v1").health("dev-01")
    }

    fn summary(module: &str) -> HealthSummary {
        HealthSummary {
            calls: 1000,
            traps: 2,
            restarts: 1,
            records_sent: 40,
            records_dropped: 3,
            fuel_used: 123_456,
            peak_memory_bytes: 4 << 20,
            metrics: [("error_rate".to_string(), Sketch::of(&[0.5, 1.5, 1.0]))].into(),
            ..HealthSummary::new(module)
        }
    }

    fn health() -> HealthV1 {
        HealthV1 {
            seq: 3,
            period_ms: 60_000,
            modules: vec![
                ModuleHealth {
                    version: 4,
                    summary: summary("sensor"),
                },
                ModuleHealth {
                    version: 5,
                    summary: summary("sensor"),
                },
                ModuleHealth {
                    version: 1,
                    summary: HealthSummary::new("filter"),
                },
            ],
        }
    }

    /// The largest summary `validate` lets through, of module `i`.
    fn largest(i: usize) -> HealthSummary {
        largest_of(&format!("{i:02}{}", "m".repeat(names::MAX_NAME - 2)))
    }

    #[test]
    fn a_sealed_health_opens_with_its_signer() {
        let h = health();
        let bytes = h.seal(&topic(), &key()).unwrap();
        assert_eq!(
            Health::open(&topic(), &bytes),
            Ok((h, Some(key().public())))
        );
    }

    #[test]
    fn an_unsigned_health_opens_without_a_signer() {
        let bytes = postcard::to_stdvec(&Health::V1(health())).unwrap();
        assert_eq!(Health::open(&topic(), &bytes), Ok((health(), None)));
    }

    #[test]
    fn a_health_moved_to_another_device_or_kind_is_forged() {
        let bytes = health().seal(&topic(), &key()).unwrap();
        let topics = Topics::new("kiln/v1");
        for other in [topics.health("dev-02"), topics.reported("dev-01")] {
            let e = Health::open(&other, &bytes).unwrap_err();
            assert!(matches!(e, ReportError::Forged(_)), "{e}");
        }
        // A signed report does not open as health, even on its own topic's bytes.
        let reported = seal_report(
            &crate::fleet::Reported::V1(Default::default()),
            &topic(),
            &key(),
        );
        assert!(Health::open(&topic(), &reported).is_err());
    }

    #[test]
    fn a_tampered_body_does_not_verify() {
        let mut bytes = health().seal(&topic(), &key()).unwrap();
        // The body starts after the enum tag and its length; the seq is its second byte.
        bytes[4] ^= 1;
        assert!(Health::open(&topic(), &bytes).is_err());
    }

    #[test]
    fn the_largest_valid_health_is_well_within_its_bound() {
        let h = HealthV1 {
            seq: u64::MAX,
            period_ms: u64::MAX,
            modules: (0..MAX_HEALTH_MODULES)
                .map(|i| ModuleHealth {
                    version: u64::MAX,
                    summary: largest(i),
                })
                .collect(),
        };
        assert_eq!(h.validate(), Ok(()));
        let bytes = h.seal(&topic(), &key()).unwrap();
        assert!(bytes.len() <= 45 * 1024, "{} bytes", bytes.len());
        assert_eq!(Health::open(&topic(), &bytes).unwrap().0, h);
    }

    #[test]
    fn open_refuses_oversized_and_invalid_messages() {
        let huge = vec![0u8; MAX_HEALTH + 1];
        let e = Health::open(&topic(), &huge).unwrap_err().to_string();
        assert!(e.contains("not decoded"), "{e}");

        let invalid = |f: &dyn Fn(&mut HealthV1), why: &str| {
            let mut h = health();
            f(&mut h);
            assert!(h.seal(&topic(), &key()).unwrap_err().contains(why));
            // A device that signs it anyway is still refused.
            let bytes = seal_report(&Health::V1(h), &topic(), &key());
            let e = Health::open(&topic(), &bytes).unwrap_err();
            assert!(
                matches!(&e, ReportError::Malformed(m) if m.contains(why)),
                "{e}"
            );
        };
        invalid(
            &|h| {
                h.modules = (0..=MAX_HEALTH_MODULES)
                    .map(|i| ModuleHealth {
                        version: 1,
                        summary: HealthSummary::new(&format!("m{i}")),
                    })
                    .collect()
            },
            "at most 64",
        );
        invalid(&|h| h.modules[1].version = 4, "version 4 twice");
        invalid(
            &|h| h.modules[0].summary.module = "a/b".into(),
            "contains `/`",
        );
        invalid(
            &|h| {
                h.modules[0]
                    .summary
                    .metrics
                    .insert("bad".into(), Sketch::of(&[f64::NAN]));
            },
            "not a finite number",
        );
        invalid(
            &|h| {
                h.modules[0].summary.metrics = (0..=MAX_METRICS)
                    .map(|i| (format!("m{i}"), Sketch::of(&[1.0])))
                    .collect()
            },
            "metrics (at most 8)",
        );

        let twice = seal_report(
            &Health::Signed(DeviceSigned {
                body: vec![],
                key: [0; 32],
                signature: vec![],
            }),
            &topic(),
            &key(),
        );
        let e = Health::open(&topic(), &twice).unwrap_err().to_string();
        assert!(e.contains("signed twice"), "{e}");
        assert!(Health::open(&topic(), &[0xff, 0xff]).is_err());
    }

    /// Health messages written by this release; later releases must keep opening them.
    #[test]
    fn health_v1_fixture_still_decodes() {
        let h = HealthV1 {
            seq: 1,
            period_ms: 1000,
            modules: vec![ModuleHealth {
                version: 2,
                summary: HealthSummary {
                    calls: 3,
                    metrics: [("t".to_string(), Sketch::of(&[0.5]))].into(),
                    ..HealthSummary::new("m")
                },
            }],
        };
        let bytes = postcard::to_stdvec(&Health::V1(h.clone())).unwrap();
        let mut fixture = vec![
            0, 1, 232, 7, 1, 2, 1, b'm', 3, 0, 0, 0, 0, 0, 0, 1, 1, b't', 1,
        ];
        fixture.extend([0.5f64.to_le_bytes(); 3].concat());
        assert_eq!(bytes, fixture);
        assert_eq!(Health::open(&topic(), &fixture), Ok((h, None)));
    }

    fn sketch() -> impl Strategy<Value = Sketch> {
        proptest::collection::vec(-1e6f64..1e6, 0..5).prop_map(|v| Sketch::of(&v))
    }

    fn module_health() -> impl Strategy<Value = ModuleHealth> {
        (
            "[a-z][a-z0-9_-]{0,10}",
            any::<u64>(),
            proptest::array::uniform7(any::<u64>()),
            proptest::collection::btree_map("[A-Za-z0-9_-]{1,12}", sketch(), 0..=MAX_METRICS),
        )
            .prop_map(|(module, version, c, metrics)| ModuleHealth {
                version,
                summary: HealthSummary {
                    module,
                    calls: c[0],
                    traps: c[1],
                    restarts: c[2],
                    records_sent: c[3],
                    records_dropped: c[4],
                    fuel_used: c[5],
                    peak_memory_bytes: c[6],
                    metrics,
                },
            })
    }

    proptest! {
        #[test]
        fn every_valid_health_round_trips_signed(
            seq in any::<u64>(),
            period_ms in any::<u64>(),
            modules in proptest::collection::vec(module_health(), 0..8),
        ) {
            let mut seen = BTreeSet::new();
            let modules: Vec<_> = modules
                .into_iter()
                .filter(|m| seen.insert((m.summary.module.clone(), m.version)))
                .collect();
            let h = HealthV1 { seq, period_ms, modules };
            let bytes = h.seal(&topic(), &key()).unwrap();
            prop_assert!(bytes.len() <= MAX_HEALTH);
            prop_assert_eq!(Health::open(&topic(), &bytes), Ok((h, Some(key().public()))));
        }

        #[test]
        fn open_never_panics_and_what_opens_is_valid(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok((h, _)) = Health::open(&topic(), &bytes) {
                prop_assert_eq!(h.validate(), Ok(()));
            }
        }
    }
}
