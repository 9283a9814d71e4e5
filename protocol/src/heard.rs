//! The one reader of what devices say (their status, reported state and events) on
//! the host (`kiln`'s commands and dashboard; pure, so the fuzzer drives it too). Every message on a device's topic is hostile until this has judged it:
//! bounded before it is decoded, its signature checked over its topic, and its signer
//! compared with the registry, once, here. A message that is too large or does not
//! decode is skipped and named, never a reason for a command to fail.

use crate::fleet::{Event, EventV1, Reported, ReportedV1, Status, StatusV2, Topics, MAX_REPORT};
use crate::keys::PublicKey;
use crate::trust::{Identity, Registry};

/// What a device said, decoded, with who it is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub device: String,
    pub topic: String,
    /// Judged against the registry (see [`Identity`]); `Unenrolled` for every
    /// signed message where no registry is known.
    pub identity: Identity,
    /// The key that signed it (`None`: unsigned).
    pub signer: Option<PublicKey>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Status(StatusV2),
    Reported(ReportedV1),
    Event(EventV1),
}

/// A message on a device's topic that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub topic: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.topic, self.reason)
    }
}

impl Heard {
    pub fn is_verified(&self) -> bool {
        self.identity.is_verified()
    }

    pub fn status(&self) -> Option<&StatusV2> {
        match &self.body {
            Body::Status(s) => Some(s),
            _ => None,
        }
    }

    pub fn reported(&self) -> Option<&ReportedV1> {
        match &self.body {
            Body::Reported(r) => Some(r),
            _ => None,
        }
    }

    pub fn event(&self) -> Option<&EventV1> {
        match &self.body {
            Body::Event(e) => Some(e),
            _ => None,
        }
    }
}

/// Judges device messages for one fleet: its topics and its registry.
pub struct Reader<'a> {
    topics: &'a Topics,
    registry: &'a Registry,
}

impl<'a> Reader<'a> {
    pub fn new(topics: &'a Topics, registry: &'a Registry) -> Self {
        Self { topics, registry }
    }

    /// The message on `topic`: `Ok(None)` if the topic is not a device's status,
    /// reported state or events (or the payload is a cleared retained message),
    /// `Err` if it is one but cannot be taken.
    pub fn open(&self, topic: &str, payload: &[u8]) -> Result<Option<Heard>, Skipped> {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return Ok(None);
        };
        if !matches!(kind, "status" | "reported" | "events") || payload.is_empty() {
            return Ok(None);
        }
        let skip = |reason: String| Skipped {
            topic: topic.to_string(),
            reason,
        };
        if payload.len() > MAX_REPORT {
            return Err(skip(format!(
                "{} bytes, more than a device message may be ({MAX_REPORT}); not decoded",
                payload.len()
            )));
        }
        let (body, signer) = match kind {
            "status" => Status::open(topic, payload).map(|(s, k)| (Body::Status(s), k)),
            "reported" => Reported::open(topic, payload).map(|(r, k)| (Body::Reported(r), k)),
            _ => Event::open(topic, payload).map(|(e, k)| (Body::Event(e), k)),
        }
        .map_err(|e| skip(e.into()))?;
        if let Body::Status(s) = &body {
            if s.device != device {
                return Err(skip(format!(
                    "a status naming device `{}` on {device}'s topic",
                    s.device
                )));
            }
        }
        Ok(Some(Heard {
            device: device.to_string(),
            topic: topic.to_string(),
            identity: Identity::of(self.registry, device, signer.as_ref()),
            signer,
            body,
        }))
    }

    /// Every message of `retained` (topic to payload), judged: what was taken, and
    /// what was skipped.
    pub fn all<'b>(
        &self,
        retained: impl IntoIterator<Item = (&'b String, &'b Vec<u8>)>,
    ) -> (Vec<Heard>, Vec<Skipped>) {
        let (mut heard, mut skipped) = (Vec::new(), Vec::new());
        for (topic, payload) in retained {
            match self.open(topic, payload) {
                Ok(Some(h)) => heard.push(h),
                Ok(None) => {}
                Err(s) => skipped.push(s),
            }
        }
        (heard, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{seal_report, DeviceFacts, Status, StatusV2};
    use crate::keys::SecretKey;

    fn status(device: &str, groups: &[&str]) -> Status {
        Status::V2(StatusV2 {
            device: device.into(),
            online: true,
            facts: Some(DeviceFacts {
                triple: "x86_64-unknown-linux-gnu".into(),
                cpu_features: Vec::new(),
                kilnd: "0".into(),
                wasmer: "0".into(),
                kiln_abi: 1,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                boot_id: 1,
            }),
            trust: None,
        })
    }

    #[test]
    fn identity_is_judged_once_and_bad_messages_are_skipped_not_fatal() {
        let topics = Topics::new("kiln/v1");
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let mut registry = Registry::default();
        registry.enroll("a", &a.public());
        let reader = Reader::new(&topics, &registry);
        let t = topics.status("a");
        let own = seal_report(&status("a", &[]), &t, &a);
        let h = reader.open(&t, &own).unwrap().unwrap();
        assert_eq!(h.identity, Identity::Verified);
        // Signed by another device's key, or moved to another topic.
        let other = seal_report(&status("a", &[]), &t, &b);
        assert!(matches!(
            reader.open(&t, &other).unwrap().unwrap().identity,
            Identity::Mismatch(_)
        ));
        let moved = reader.open(&topics.status("c"), &own).unwrap_err();
        assert!(moved.reason.contains("does not verify"), "{moved}");
        // Unsigned, oversized, garbage, and a status naming another device.
        let unsigned = postcard::to_stdvec(&status("a", &[])).unwrap();
        assert_eq!(
            reader.open(&t, &unsigned).unwrap().unwrap().identity,
            Identity::Unsigned
        );
        let huge = vec![0u8; MAX_REPORT + 1];
        assert!(reader
            .open(&t, &huge)
            .unwrap_err()
            .reason
            .contains("not decoded"));
        assert!(reader.open(&t, b"\xff\xff\xff").is_err());
        let liar = seal_report(&status("x", &[]), &t, &a);
        assert!(reader
            .open(&t, &liar)
            .unwrap_err()
            .reason
            .contains("naming device `x`"));
        // Not a device message at all.
        assert_eq!(reader.open(&topics.desired("a"), &own), Ok(None));
        assert_eq!(reader.open(&t, b""), Ok(None));
    }
}
