//! A command from the broker, as kilnd opens it (`kiln_protocol::command`): the first
//! byte picks the raw envelope (it must fail at the signatures unless it is one), or
//! the rest signed by the fleet's release key as a command's body, so the bytes reach
//! the body's decoder. What opens checks, signs again to the same command, and is
//! admitted at most once by a device whatever its names and times; a reply on the
//! device's topic never panics the decoder kiln uses.
#![no_main]

use kiln_protocol::command::{self, Device, Reply, Seen, MAX_COMMAND};
use kiln_protocol::fleet::open_report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let root = kiln_fuzz::root();
    let key = kiln_fuzz::key();
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        command::sign_body(rest.to_vec(), &[&key])
    };
    let _ = open_report::<Reply>("kiln/v1/devices/d/replies", rest);
    let Ok((opened, signers)) = command::open(&bytes, &root.release) else {
        return;
    };
    assert!(bytes.len() <= MAX_COMMAND);
    assert_eq!(signers, vec![key.public().id()]);
    assert_eq!(opened.check(), Ok(()));
    let again = opened.sign(&[&key]).expect("an opened command signs");
    assert_eq!(
        command::open(&again, &root.release).map(|c| c.0).as_ref(),
        Ok(&opened)
    );
    // Whatever device and clock: once at most.
    let groups = vec!["g".to_string()];
    let device = Device {
        fleet: &opened.fleet,
        device: "d",
        groups: &groups,
        started_ms: opened.issued_ms.saturating_sub(u64::from(mode)),
        now_ms: opened.issued_ms.saturating_add(u64::from(mode) * 1000),
    };
    let mut seen = Seen::default();
    if seen.admit(&opened, &device).is_ok() {
        assert!(seen.admit(&opened, &device).is_err(), "taken twice");
    }
});
