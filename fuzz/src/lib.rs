//! What the fuzz targets share: the one key every target trusts, the root document
//! that names it, and the property every postcard message must keep.

use std::fmt::Debug;
use std::sync::OnceLock;

use kiln_protocol::keys::{SecretKey, TrustedKeys};
use kiln_protocol::rollout::{plan_waves, Input, Policy, Rollout, Threshold};
use kiln_protocol::trust::{Role, Root};
use serde::{de::DeserializeOwned, Serialize};

/// The fleet every fuzz document is for.
pub const FLEET: &str = "fuzz";

/// The topic the device-message targets open their input on.
pub const STATUS_TOPIC: &str = "kiln/v1/devices/d/status";
pub const REPORTED_TOPIC: &str = "kiln/v1/devices/d/reported";
pub const EVENTS_TOPIC: &str = "kiln/v1/devices/d/events";
pub const HEALTH_TOPIC: &str = "kiln/v1/devices/d/health";

/// A fixed key, so a seed signed with it verifies in every run and the fuzzer mutates
/// from a valid signature instead of never getting past it.
pub fn key() -> SecretKey {
    SecretKey::from_text(
        "kiln-secret-key-v1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .expect("the fixed fuzz key parses")
}

/// A second fixed key: the identity of the device whose messages the seeds sign.
pub fn device_key() -> SecretKey {
    SecretKey::from_text(
        "kiln-secret-key-v1 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
    )
    .expect("the fixed fuzz device key parses")
}

/// The artifact target's trust: artifacts are still verified against a key list.
pub fn trust() -> TrustedKeys {
    TrustedKeys::new(vec![key().public()])
}

/// Root v1 of fleet [`FLEET`]: [`key`] holds the root and the release role (1 of 1),
/// and the release role signs the registry.
/// Built once: targets call it on every input.
pub fn root() -> Root {
    static ROOT: OnceLock<Root> = OnceLock::new();
    ROOT.get_or_init(|| {
        let role = Role::new(&[key().public()], 1);
        Root {
            fleet: FLEET.into(),
            version: 1,
            issued_ms: 1_700_000_000_000,
            root: role.clone(),
            release: role,
            registry: None,
            expires_ms: None,
        }
    })
    .clone()
}

/// A rollout record of group `lab`: three devices in two waves (one left out), its
/// first wave sent. Built once.
pub fn rollout() -> Rollout {
    static ROLLOUT: OnceLock<Rollout> = OnceLock::new();
    ROLLOUT
        .get_or_init(|| {
            let module = kiln_protocol::fleet::DesiredModule {
                name: "app".into(),
                version: 2,
                artifacts: Vec::new(),
                config: Vec::new(),
                limits: Default::default(),
                allow_downgrade: false,
                health_window_ms: 1000,
            };
            let devices: Vec<String> = ["d1", "d2", "d3"].map(String::from).to_vec();
            let mut rollout = Rollout::new(
                FLEET,
                "lab",
                "fuzz@seed",
                1,
                module,
                Policy::new(Threshold::Percent(10), Threshold::Count(1), 60_000, true),
                plan_waves(&devices, &[1], None),
                Default::default(),
                vec![("d4".into(), "no artifact for riscv64".into())],
            );
            rollout.step(2, Input::Start);
            rollout
        })
        .clone()
}

/// [`root`], signed by [`key`]: what a device is provisioned with. Ed25519 signing
/// is deterministic, so the bytes are the same in every run; signed once.
pub fn root_bytes() -> Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES
        .get_or_init(|| root().sign(&[&key()]).expect("the fixed fuzz root signs"))
        .clone()
}

/// Decodes `bytes` as a `T` the way the device or `kiln` does; whatever decodes must
/// encode and decode again to the same value.
pub fn decode<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = postcard::from_bytes(bytes).ok()?;
    let again = postcard::to_stdvec(&value).expect("a decoded message encodes");
    assert_eq!(
        postcard::from_bytes::<T>(&again).expect("an encoded message decodes"),
        value
    );
    Some(value)
}

/// Most pieces [`split`] cuts an input into.
pub const MAX_PIECES: usize = 8;

/// Cuts `data` into up to [`MAX_PIECES`] pieces, each a little-endian `u16` length
/// and that many bytes (the last one cut short where the input ends), so one input
/// can carry several documents: [`join`] writes it.
pub fn split(mut data: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    while pieces.len() < MAX_PIECES {
        let [a, b, rest @ ..] = data else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let (piece, after) = rest.split_at(len);
        pieces.push(piece);
        data = after;
    }
    pieces
}

/// The input [`split`] cuts into `pieces` (each under 64 KiB).
pub fn join(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        let len = u16::try_from(piece.len()).expect("a piece under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(piece);
    }
    out
}
