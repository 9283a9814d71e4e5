//! Frames on a worker pipe, read as kilnd reads them: `FromWorker` until a clean end, an
//! error, or the bytes run out. Whatever is read must write and read back the same.
#![no_main]

use kiln_protocol::worker::{read_frame, write_frame, FromWorker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = std::io::Cursor::new(data);
    while let Ok(Some(frame)) = read_frame::<FromWorker>(&mut input) {
        let mut again = Vec::new();
        write_frame(&mut again, &frame).expect("a frame that was read can be written");
        let back = read_frame::<FromWorker>(&mut again.as_slice()).expect("a written frame reads");
        assert_eq!(back.as_ref(), Some(&frame));
    }
});
