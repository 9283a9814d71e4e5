//! One part of a document kept in parts (the registry, see `kiln_protocol::parts`), as
//! if a signed head named its hash: the length and hash checks pass, so the bytes
//! reach the decoder. What joins holds only names of its own part, each once, in
//! order, and splits back into a part of the same entries.
#![no_main]

use std::collections::BTreeMap;

use kiln_protocol::parts::{self, PartRef};
use kiln_protocol::transfer::sha256;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let digest = sha256(data);
    let first = data.get(1).copied().unwrap_or(0);
    for part in [0, first] {
        for entries in [1, 2, u32::from(first)] {
            let refs = [PartRef {
                part,
                entries,
                sha256: digest,
            }];
            let Ok(got) = parts::join::<[u8; 32]>(&refs, |_| Some(data), parts::MAX_PART) else {
                continue;
            };
            assert_eq!(got.len(), entries as usize);
            assert!(got.iter().all(|(name, _)| parts::part_of(name) == part));
            let map: BTreeMap<String, [u8; 32]> = got.into_iter().collect();
            assert_eq!(map.len(), entries as usize);
            let again = parts::split(&map, "fuzz", parts::MAX_PART).expect("what joined splits");
            assert_eq!(again.refs.len(), 1);
            assert_eq!(again.refs[0].part, part);
        }
    }
});
