//! The consumer's gap/duplicate tracker under any sequence of forged batches and drop
//! reports: 17 bytes per step (a kind/boot byte, then two little-endian u64 seqs).
#![no_main]

use kiln_protocol::telemetry::{Dropped, Tracker, MAX_RANGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tracker = Tracker::default();
    for step in data.chunks_exact(17) {
        let boot = u64::from(step[0] & 0x7f);
        let a = u64::from_le_bytes(step[1..9].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(step[9..17].try_into().expect("8 bytes"));
        if step[0] & 0x80 == 0 {
            tracker.batch("d", boot, a, 1);
        } else {
            let d = Dropped {
                boot_id: boot,
                first_seq: a,
                last_seq: b,
                batches: 1,
                records: 1,
            };
            tracker.dropped("d", &d);
        }
    }
    for account in tracker.accounts() {
        assert!(account.unexplained.len() <= 2 * MAX_RANGES);
    }
});
