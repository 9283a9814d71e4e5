//! Any message on any topic, judged by the host's one reader of device messages
//! (`kiln_protocol::heard::Reader`, used by every kiln command and the dashboard): the
//! first byte picks the topic (a device's status, reported state or events, another
//! device's, or not a device's at all), the rest is the payload. The reader never
//! panics, never takes a payload over `MAX_REPORT`, names the device of the topic,
//! and counts a message as verified only when it verifies under the enrolled key.
#![no_main]

use std::sync::OnceLock;

use kiln_protocol::fleet::{Topics, MAX_REPORT};
use kiln_protocol::heard::Reader;
use kiln_protocol::keys::PublicKey;
use kiln_protocol::trust::{Identity, Registry};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 6] = [
    kiln_fuzz::STATUS_TOPIC,
    kiln_fuzz::REPORTED_TOPIC,
    kiln_fuzz::EVENTS_TOPIC,
    "kiln/v1/devices/other/reported",
    "kiln/v1/devices/d/desired",
    "kiln/v1/registry",
];

/// Device `d` enrolled with the fixed device key: built once, not per input.
fn registry() -> &'static (Registry, PublicKey) {
    static REGISTRY: OnceLock<(Registry, PublicKey)> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let key = kiln_fuzz::device_key().public();
        let mut registry = Registry::default();
        registry.enroll("d", &key);
        (registry, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let topic = TOPICS[pick as usize % TOPICS.len()];
    let topics = Topics::new("kiln/v1");
    let (registry, device_key) = registry();
    match Reader::new(&topics, registry).open(topic, payload) {
        Ok(Some(heard)) => {
            assert!(payload.len() <= MAX_REPORT);
            assert!(topic.contains(&format!("/devices/{}/", heard.device)));
            if heard.identity == Identity::Verified {
                assert_eq!(heard.device, "d");
                assert_eq!(heard.signer.as_ref(), Some(device_key));
            }
        }
        Ok(None) => assert!(
            payload.is_empty() || !topic.contains("/devices/") || topic.ends_with("/desired")
        ),
        Err(skipped) => assert_eq!(skipped.topic, topic),
    }
});
