//! What a device decodes of a transfer: a chunk list from the broker (checked against
//! a signed hash, here the input's own), and a stream decoded to a declared length,
//! with and without a patch base. Nothing may allocate beyond the declared length.
#![no_main]

use kiln_protocol::transfer::{decode, sha256, ChunkList, Codec, Transfer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let transfer = Transfer {
        codec: Codec::Zstd,
        sha256: [0; 32],
        len: rest.len() as u64,
        chunk_size: 4096,
        list: sha256(rest),
    };
    let _ = ChunkList::open(rest, &transfer);
    let _ = ChunkList::peek(rest);
    let len = u64::from(selector) * 1024;
    let (base, stream) = rest.split_at(rest.len() / 3);
    for codec in [Codec::Raw, Codec::Zstd, Codec::ZstdPatch] {
        if let Ok(bytes) = decode(codec, stream, Some(base), len) {
            assert_eq!(bytes.len() as u64, len);
        }
    }
});
