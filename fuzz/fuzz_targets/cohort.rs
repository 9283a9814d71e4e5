//! A rollout's `--where` condition, parsed as `kiln` parses it from the command line
//! and from a rollout record: what parses shows as text that parses to the same
//! condition, and judging any device with it never panics.
#![no_main]

use kiln_protocol::rollout::cohort::{Attributes, Condition};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (condition, device) = match text.split_once('\n') {
        Some((c, d)) => (c, d),
        None => (text, ""),
    };
    let Ok(parsed) = Condition::parse(condition) else {
        return;
    };
    let shown = parsed.to_string();
    assert_eq!(Condition::parse(&shown).as_ref(), Ok(&parsed), "{shown}");
    // A device's attributes, from the rest of the input.
    let mut words = device.split(' ');
    let mut next = || words.next().unwrap_or_default().to_string();
    let attributes = Attributes {
        triple: next(),
        cpu_features: vec![next(), next()],
        kilnd: next(),
        groups: vec![next()],
        tags: [next(), next()].into_iter().collect(),
    };
    let _ = parsed.holds(&attributes, &[]);
});
