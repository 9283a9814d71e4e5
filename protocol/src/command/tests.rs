use proptest::prelude::*;

use super::*;
use crate::fleet::{open_report, seal_report};

/// Three keys, the same for every test in a run.
fn key(n: usize) -> &'static SecretKey {
    static KEYS: std::sync::OnceLock<Vec<SecretKey>> = std::sync::OnceLock::new();
    &KEYS.get_or_init(|| (0..3).map(|_| SecretKey::generate().unwrap()).collect())[n]
}

fn command(id: u64) -> Command {
    Command {
        fleet: "acme".into(),
        to: To::Device("pump-1".into()),
        module: "valve".into(),
        topic: "open".into(),
        data: b"42".to_vec(),
        id,
        issued_ms: 1_000_000,
        expires_ms: 1_030_000,
        reply: true,
    }
}

fn device(now_ms: u64) -> Device<'static> {
    static GROUPS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    Device {
        fleet: "acme",
        device: "pump-1",
        groups: GROUPS.get_or_init(|| vec!["lab".into()]),
        started_ms: 900_000,
        now_ms,
    }
}

#[test]
fn a_signed_command_opens_under_its_role_only() {
    let role = Role::new(&[key(1).public()], 1);
    let bytes = command(7).sign(&[key(1)]).unwrap();
    let (opened, signers) = open(&bytes, &role).unwrap();
    assert_eq!((opened, signers), (command(7), vec![key(1).public().id()]));

    let forged = command(7).sign(&[key(2)]).unwrap();
    assert!(matches!(open(&forged, &role), Err(OpenError::Untrusted(_))));
    let mut flipped = bytes.clone();
    let n = flipped.len() / 2;
    flipped[n] ^= 1;
    assert!(open(&flipped, &role).is_err());
    let huge = vec![0u8; MAX_COMMAND + 1];
    assert!(matches!(open(&huge, &role), Err(OpenError::Malformed(e)) if e.contains("limit")));
}

#[test]
fn a_command_out_of_bounds_is_never_signed() {
    let mut big = command(1);
    big.data = vec![0; MAX_DATA + 1];
    assert!(big.sign(&[key(1)]).unwrap_err().contains("limit 16384"));
    let mut long = command(1);
    long.expires_ms = long.issued_ms + MAX_VALID_MS + 1;
    assert!(long.sign(&[key(1)]).is_err());
    let mut topic = command(1);
    topic.topic = "a/b".into();
    assert!(topic.sign(&[key(1)]).is_err());
}

#[test]
fn a_device_takes_its_own_fresh_commands_once() {
    let mut seen = Seen::default();
    let now = 1_010_000;
    seen.admit(&command(1), &device(now)).unwrap();
    assert!(seen
        .admit(&command(1), &device(now))
        .unwrap_err()
        .contains("replay"));

    let mut group = command(2);
    group.to = To::Group("lab".into());
    seen.admit(&group, &device(now)).unwrap();
    let mut other = command(3);
    other.to = To::Group("prod".into());
    assert!(seen
        .admit(&other, &device(now))
        .unwrap_err()
        .contains("group prod"));
    let mut fleet = command(4);
    fleet.fleet = "staging".into();
    assert!(seen
        .admit(&fleet, &device(now))
        .unwrap_err()
        .contains("fleet staging"));

    assert!(seen
        .admit(&command(5), &device(1_030_000))
        .unwrap_err()
        .contains("expired"));
    let mut early = command(6);
    early.issued_ms = 800_000;
    early.expires_ms = 1_100_000;
    assert!(seen
        .admit(&early, &device(now))
        .unwrap_err()
        .contains("before this kilnd started"));
    let mut future = command(8);
    future.issued_ms = now + SKEW_MS + 1;
    future.expires_ms = future.issued_ms + 1000;
    assert!(seen
        .admit(&future, &device(now))
        .unwrap_err()
        .contains("from now"));
}

#[test]
fn ids_are_forgotten_when_they_expire_and_too_many_in_flight_are_refused() {
    let mut seen = Seen::default();
    for id in 0..MAX_SEEN as u64 {
        seen.admit(&command(id), &device(1_010_000)).unwrap();
    }
    let full = seen
        .admit(&command(u64::MAX), &device(1_010_000))
        .unwrap_err();
    assert!(full.contains("in flight"), "{full}");
    // Once they expire, their ids are dropped and new commands are taken.
    let mut later = command(u64::MAX);
    later.issued_ms = 1_030_000;
    later.expires_ms = 1_040_000;
    seen.admit(&later, &device(1_030_000)).unwrap();
    assert_eq!(seen.until.len(), 1);
}

#[test]
fn a_reply_verifies_for_its_topic_only() {
    let reply = Reply::V1(ReplyV1 {
        device: "pump-1".into(),
        id: 9,
        at_ms: 5,
        outcome: Outcome::Answered {
            status: 0,
            data: b"ok".to_vec(),
        },
    });
    let bytes = seal_report(&reply, "kiln/v1/devices/pump-1/replies", key(2));
    let (opened, signer) = open_report::<Reply>("kiln/v1/devices/pump-1/replies", &bytes).unwrap();
    assert_eq!((opened, signer), (reply, Some(key(2).public())));
    assert!(open_report::<Reply>("kiln/v1/devices/pump-2/replies", &bytes).is_err());
}

proptest! {
    /// Any bytes: an error or a command that checks, never a panic.
    #[test]
    fn arbitrary_bytes_never_open_unsigned(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let role = Role::new(&[key(1).public()], 1);
        prop_assert!(open(&bytes, &role).is_err());
    }

    /// However commands arrive, each id runs at most once while it is valid.
    #[test]
    fn no_id_is_taken_twice_while_valid(ids in proptest::collection::vec((0u64..16, 0u64..40_000), 1..64)) {
        let mut seen = Seen::default();
        let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
        let mut now = 1_000_000;
        for (id, step) in ids {
            now += step / 8;
            let c = command(id);
            if seen.admit(&c, &device(now)).is_ok() {
                prop_assert!(taken.get(&id).is_none_or(|until| *until <= now), "{id} twice");
                taken.insert(id, c.expires_ms);
            }
        }
    }
}
