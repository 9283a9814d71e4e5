//! What the fuzz targets share: the one key every target trusts, and the property every
//! postcard message must keep.

use std::fmt::Debug;

use kiln_protocol::keys::{SecretKey, TrustedKeys};
use serde::{de::DeserializeOwned, Serialize};

/// A fixed key, so a seed signed with it verifies in every run and the fuzzer mutates
/// from a valid signature instead of never getting past it.
pub fn key() -> SecretKey {
    SecretKey::from_text(
        "kiln-secret-key-v1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .expect("the fixed fuzz key parses")
}

pub fn trust() -> TrustedKeys {
    TrustedKeys::new(vec![key().public()])
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
