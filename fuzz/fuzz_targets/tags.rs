//! A device's tags record from the broker, opened as `kiln` opens it: against the
//! fixed root (its release role signs tags), for the device whose topic it came on.
//! What opens is bounded and valid, is that device's, and seals and opens again the
//! same; a newer serial replaces it and the same one does not.
#![no_main]

use kiln_protocol::fleet::{Tags, MAX_TAGS, MAX_TAGS_RECORD};
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "dev-01";

fuzz_target!(|data: &[u8]| {
    let root = kiln_fuzz::root();
    let Ok(tags) = Tags::open(data, &root, DEVICE) else {
        return;
    };
    assert!(data.len() <= MAX_TAGS_RECORD);
    assert_eq!(tags.device, DEVICE);
    assert_eq!(tags.fleet, root.fleet);
    assert!(tags.tags.len() <= MAX_TAGS);
    assert_eq!(tags.check(), Ok(()));
    let key = kiln_fuzz::key();
    let again = tags.seal(&[&key]).expect("an opened record seals");
    assert_eq!(Tags::open(&again, &root, DEVICE).as_ref(), Ok(&tags));
    assert!(
        Tags::open(&again, &root, "dev-02").is_err(),
        "another device's"
    );
    assert!(tags.replaces(&tags).is_err());
    let newer = Tags {
        serial: Tags::next_serial(Some(&tags), 0),
        ..tags.clone()
    };
    assert_eq!(newer.replaces(&tags), Ok(()));
});
