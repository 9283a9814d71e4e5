//! A device's operator tags (`canary`, `rack-3`): retained on
//! `{prefix}/devices/{id}/tags`, written by `kiln tag` and signed by a threshold of
//! the fleet's release keys, as a desired state is. A rollout's cohort may select on
//! them (`kiln rollout --where tag=canary`), so the fleet tool takes only a record
//! that verifies under the current root, for this fleet and this device; anything
//! else selects nothing. The device never writes it (`kiln acl` gives it no write on
//! the topic) and never reads it.
//!
//! Each record has a serial above the one it replaces ([`Tags::next_serial`]); a
//! record is refused as a replacement of one with a serial as high
//! ([`Tags::replaces`]), and one whose serial is more than a day ahead of its issue
//! time is refused outright (a fast-forward no later record could pass).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::MAX_SERIAL_AHEAD_MS;
use crate::keys::SecretKey;
use crate::names::{check, Kind};
use crate::trust::{open_body, sign_all, unwrap_envelope, OpenError, Root, Sig};

/// Tags one device may have.
pub const MAX_TAGS: usize = 32;
/// A signed tags record: 32 tags of 64 bytes and a few signatures fit well within.
pub const MAX_TAGS_RECORD: usize = 8 * 1024;

const CONTEXT: &[u8] = b"kiln tags v1\0";

/// One device's tags, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    pub fleet: String,
    pub device: String,
    /// Above the serial of the record it replaced.
    pub serial: u64,
    /// When it was signed (Unix milliseconds).
    pub issued_ms: u64,
    /// Each a name ([`Kind::Tag`]), at most [`MAX_TAGS`].
    pub tags: BTreeSet<String>,
}

/// The signed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedTags {
    V1 { body: Vec<u8>, signatures: Vec<Sig> },
}

impl Tags {
    /// The serial of a record replacing `before` at `now_ms`: the clock, or one above
    /// `before`'s when that is ahead.
    pub fn next_serial(before: Option<&Tags>, now_ms: u64) -> u64 {
        before.map_or(now_ms, |b| now_ms.max(b.serial.saturating_add(1)))
    }

    /// Whether it may replace `held` (a newer serial).
    pub fn replaces(&self, held: &Tags) -> Result<(), String> {
        if self.serial <= held.serial {
            return Err(format!(
                "tags of {} serial {} is not newer than the held serial {}",
                self.device, self.serial, held.serial
            ));
        }
        Ok(())
    }

    /// Refuses a record no one should act on: too many tags, a tag that is not a
    /// name, a device name that is not one, a fast-forwarded serial.
    pub fn check(&self) -> Result<(), String> {
        check(Kind::Device, &self.device)?;
        if self.tags.len() > MAX_TAGS {
            return Err(format!(
                "{} has {} tags (at most {MAX_TAGS})",
                self.device,
                self.tags.len()
            ));
        }
        for t in &self.tags {
            check(Kind::Tag, t)?;
        }
        if self.serial > self.issued_ms.saturating_add(MAX_SERIAL_AHEAD_MS) {
            return Err(format!(
                "tags of {} serial {} is more than a day ahead of its issue time (a fast-forward)",
                self.device, self.serial
            ));
        }
        Ok(())
    }

    /// Checks it, and signs it with `keys` (release keys).
    pub fn seal(&self, keys: &[&SecretKey]) -> Result<Vec<u8>, String> {
        self.check()?;
        let body = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let signatures = sign_all(CONTEXT, &body, keys);
        let bytes =
            postcard::to_stdvec(&SignedTags::V1 { body, signatures }).map_err(|e| e.to_string())?;
        if bytes.len() > MAX_TAGS_RECORD {
            return Err(format!(
                "the tags record of {} would be {} bytes (limit {MAX_TAGS_RECORD})",
                self.device,
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// The record on `device`'s tags topic, if a threshold of `root`'s release keys
    /// signed it for this fleet and this device, and it holds ([`Tags::check`]).
    pub fn open(bytes: &[u8], root: &Root, device: &str) -> Result<Self, OpenError> {
        let SignedTags::V1 { body, signatures } =
            unwrap_envelope(bytes, MAX_TAGS_RECORD, "tags record")?;
        let (tags, _): (Tags, _) = open_body(
            &root.release,
            CONTEXT,
            (&body, &signatures),
            "the tags record",
            "tags record",
        )?;
        if tags.fleet != root.fleet || tags.device != device {
            return Err(OpenError::WrongFleet(format!(
                "the tags record is for device {} of fleet {}, not {device} of {}",
                tags.device, tags.fleet, root.fleet
            )));
        }
        tags.check().map_err(OpenError::Malformed)?;
        Ok(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(device: &str, serial: u64, tags: &[&str]) -> Tags {
        Tags {
            fleet: "acme".into(),
            device: device.into(),
            serial,
            issued_ms: serial,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_tags_record_opens_for_its_device_under_the_release_keys() {
        let key = SecretKey::generate().unwrap();
        let t = tags("dev-01", 1_000, &["canary", "rack-3"]);
        let bytes = t.seal(&[&key]).unwrap();
        assert_eq!(
            Tags::open(&bytes, &Root::of_one_key(&key), "dev-01").unwrap(),
            t
        );
        // Moved to another device's topic, or read in another fleet: refused.
        let e = Tags::open(&bytes, &Root::of_one_key(&key), "dev-02").unwrap_err();
        assert!(matches!(e, OpenError::WrongFleet(_)), "{e}");
        let mut other = Root::of_one_key(&key);
        other.fleet = "staging".into();
        assert!(Tags::open(&bytes, &other, "dev-01").is_err());
    }

    #[test]
    fn a_forged_tags_record_does_not_open() {
        let key = SecretKey::generate().unwrap();
        let forger = SecretKey::generate().unwrap();
        let bytes = tags("dev-01", 1_000, &["canary"]).seal(&[&forger]).unwrap();
        let e = Tags::open(&bytes, &Root::of_one_key(&key), "dev-01").unwrap_err();
        assert!(matches!(e, OpenError::Untrusted(_)), "{e}");
        // The body changed after signing.
        let good = tags("dev-01", 1_000, &["canary"]).seal(&[&key]).unwrap();
        let SignedTags::V1 {
            mut body,
            signatures,
        } = postcard::from_bytes(&good).unwrap();
        let last = body.len() - 1;
        body[last] ^= 1;
        let bytes = postcard::to_stdvec(&SignedTags::V1 { body, signatures }).unwrap();
        assert!(Tags::open(&bytes, &Root::of_one_key(&key), "dev-01").is_err());
        // Not a record at all, or too large.
        assert!(Tags::open(b"\xff\xff", &Root::of_one_key(&key), "dev-01").is_err());
        let huge = vec![0u8; MAX_TAGS_RECORD + 1];
        assert!(matches!(
            Tags::open(&huge, &Root::of_one_key(&key), "dev-01"),
            Err(OpenError::Malformed(_))
        ));
    }

    #[test]
    fn an_older_serial_does_not_replace_a_newer() {
        let held = tags("dev-01", 5_000, &["canary"]);
        assert!(tags("dev-01", 4_000, &[]).replaces(&held).is_err());
        assert!(tags("dev-01", 5_000, &[]).replaces(&held).is_err());
        assert!(tags("dev-01", 5_001, &[]).replaces(&held).is_ok());
        // The next serial is above the held one even when the clock is behind it.
        assert_eq!(Tags::next_serial(Some(&held), 1_000), 5_001);
        assert_eq!(Tags::next_serial(Some(&held), 9_000), 9_000);
        assert_eq!(Tags::next_serial(None, 9_000), 9_000);
    }

    #[test]
    fn tags_are_bounded_names_and_a_fast_forward_is_refused() {
        let key = SecretKey::generate().unwrap();
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let mut t = tags("dev-01", 1, &[]);
        t.tags = many.into_iter().collect();
        assert!(t.seal(&[&key]).unwrap_err().contains("at most 32"));
        for bad in ["a/b", "", "+", &"x".repeat(65)] {
            let e = tags("dev-01", 1, &[bad]).seal(&[&key]).unwrap_err();
            assert!(e.starts_with("tag name"), "{bad}: {e}");
        }
        let mut ahead = tags("dev-01", 1, &["canary"]);
        ahead.serial = u64::MAX;
        assert!(ahead.seal(&[&key]).unwrap_err().contains("fast-forward"));
        // The largest record fits its bound.
        let mut full = tags("dev-01", 1, &[]);
        full.tags = (0..MAX_TAGS).map(|i| format!("{i:0>64}")).collect();
        assert!(full.seal(&[&key, &key, &key]).is_ok());
    }
}
