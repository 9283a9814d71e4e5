//! A telemetry batch from the broker, through everything `kiln watch` does with it:
//! decode, the gap/duplicate tracker (drop reports included), JSON.
#![no_main]

use kiln_protocol::telemetry::{self, Batch, Body, Tracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::decode(data) else {
        return;
    };
    assert_eq!(Batch::decode(&Batch::encode(&batch)).as_ref(), Ok(&batch));
    let mut tracker = Tracker::default();
    tracker.batch(&batch.device, batch.boot_id, batch.seq, batch.records.len());
    for record in &batch.records {
        if let Body::Dropped(d) = &record.body {
            tracker.dropped(&batch.device, d);
        }
        let _ = telemetry::to_json(record);
    }
    for account in tracker.accounts() {
        assert!(account.first_seq <= account.last_seq);
    }
});
