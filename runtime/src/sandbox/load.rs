//! Verify, then load. The order is the security boundary:
//! envelope header -> signature by a trusted key -> manifest -> payload length and
//! sha256 -> target, CPU features, wasmer version, ABI -> `Module::deserialize` of
//! exactly the bytes that were hashed (the file is read once, never re-read).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_protocol::artifact::Envelope;
use kiln_protocol::compat;
use kiln_protocol::keys::{PublicKey, TrustedKeys};
use kiln_protocol::manifest::Manifest;
use kiln_protocol::trust::{Chain, MAX_ROOT};
use kiln_protocol::worker::Expect;
use sha2::{Digest, Sha256};
use wasmer::{Engine, Module};

use crate::exit::{Code, Failure};
use crate::host;

/// A verified, deserialized module and the manifest it was signed with.
pub struct Loaded {
    pub manifest: Manifest,
    pub module: Module,
    pub engine: Engine,
    /// Reading the file (zero when the caller had the bytes), verification, and
    /// `Module::deserialize`.
    pub read_time: Duration,
    pub verify_time: Duration,
    pub deserialize_time: Duration,
}

/// The keys `--trust` or a config's `trust` names: public key files, and a root
/// document (`*.root`), which stands for its release keys.
pub fn read_trusted_keys(paths: &[PathBuf]) -> Result<TrustedKeys, Failure> {
    let mut keys = Vec::new();
    for path in key_files(paths).map_err(|e| Failure::new(Code::NoInput, e))? {
        if is_root(&path) {
            keys.extend(read_root(&path)?.root().release.public_keys());
            continue;
        }
        let text = read_bounded(&path, MAX_KEY_FILE)
            .and_then(|b| String::from_utf8(b).map_err(std::io::Error::other))
            .map_err(|e| {
                Failure::new(
                    Code::NoInput,
                    format!("cannot read trusted key `{}`: {e}", path.display()),
                )
            })?;
        let key = PublicKey::from_text(&text).map_err(|e| {
            Failure::new(
                Code::Untrusted,
                format!("invalid trusted key `{}`: {e}", path.display()),
            )
        })?;
        keys.push(key);
    }
    // A key named twice (as a *.pub and in the root document) is one key.
    let mut seen = std::collections::BTreeSet::new();
    keys.retain(|k| seen.insert(k.id()));
    Ok(TrustedKeys::new(keys))
}

/// A root document, by its name: `fleet.root`.
pub fn is_root(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "root")
}

/// Reads a root document the operator provisioned (checked whole and signed by its own
/// root keys).
pub fn read_root(path: &Path) -> Result<Chain, Failure> {
    let bytes = read_bounded(path, MAX_ROOT as u64).map_err(|e| {
        Failure::new(
            Code::NoInput,
            format!("cannot read root document `{}`: {e}", path.display()),
        )
    })?;
    Chain::new(bytes).map_err(|e| {
        Failure::new(
            Code::Untrusted,
            format!("root document `{}`: {e}", path.display()),
        )
    })
}

pub use kiln_protocol::files::{read_bounded, MAX_LOCAL_ARTIFACT};

/// Largest trusted key file: a key's text form is one short line.
const MAX_KEY_FILE: u64 = 4096;

/// The files that `--trust` or a config's `trust` names: a file is itself, and a
/// directory (such as /etc/kiln/trust) stands for every `*.pub` key and `*.root`
/// document in it, in name order. A directory without one is an error, not an empty
/// trust.
pub fn key_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path)
            .map_err(|e| format!("cannot read trust directory `{}`: {e}", path.display()))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| format!("cannot read trust directory `{}`: {e}", path.display()))?;
            let file = entry.path();
            if (file.extension().is_some_and(|x| x == "pub") || is_root(&file)) && file.is_file() {
                found.push(file);
            }
        }
        if found.is_empty() {
            return Err(format!(
                "trust directory `{}` holds no `*.pub` key and no `*.root` document",
                path.display()
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Reads, verifies and loads the artifact at `path`; `engine_for` picks the engine
/// (and so the memory cap) from the verified manifest. With `expect`, the file must
/// also be exactly that artifact (hash, name and version).
pub fn load_artifact(
    path: &Path,
    trust: &TrustedKeys,
    expect: Option<&Expect>,
    engine_for: impl FnOnce(&Manifest) -> Engine,
) -> Result<Loaded, Failure> {
    let file = path.display();
    let started = Instant::now();
    let bytes = read_bounded(path, MAX_LOCAL_ARTIFACT)
        .map_err(|e| Failure::new(Code::NoInput, format!("cannot read artifact `{file}`: {e}")))?;
    let read_time = started.elapsed();
    let mut loaded = load_bytes(bytes, trust, expect, engine_for)
        .map_err(|f| Failure::new(f.code, format!("artifact `{file}`: {}", f.message)))?;
    loaded.read_time = read_time;
    Ok(loaded)
}

/// Does once, in the zygote after its first fork, what every worker's load would
/// otherwise do first: the CPU feature probes of sha2, curve25519 and wasmer (`cpuid`
/// traps to the hypervisor on a VM), and the verifier's code and tables paged in. A
/// forked worker inherits all of it, and its verify step is what the signature costs.
/// It checks a published signature (RFC 8032's first ed25519 test vector), so it needs
/// no key and reads no file.
pub fn warm() {
    const KEY: [u8; 32] = [
        0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07,
        0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07,
        0x51, 0x1a,
    ];
    const SIGNATURE: [u8; 64] = [
        0xe5, 0x56, 0x43, 0x00, 0xc3, 0x60, 0xac, 0x72, 0x90, 0x86, 0xe2, 0xcc, 0x80, 0x6e, 0x82,
        0x8a, 0x84, 0x87, 0x7f, 0x1e, 0xb8, 0xe5, 0xd9, 0x74, 0xd8, 0x73, 0xe0, 0x65, 0x22, 0x49,
        0x01, 0x55, 0x5f, 0xb8, 0x82, 0x15, 0x90, 0xa3, 0x3b, 0xac, 0xc6, 0x1e, 0x39, 0x70, 0x1c,
        0xf9, 0xb4, 0x6b, 0xd2, 0x5b, 0xf5, 0xf0, 0x59, 0x5b, 0xbe, 0x24, 0x65, 0x51, 0x41, 0x43,
        0x8e, 0x7a, 0x10, 0x0b,
    ];
    let _ = host::facts();
    std::hint::black_box(Sha256::digest(b"kiln"));
    let verified = PublicKey::from_bytes(&KEY).is_ok_and(|key| key.verify_strict(b"", &SIGNATURE));
    debug_assert!(verified, "RFC 8032 test 1 must verify");
}

/// Verifies `bytes` completely, then deserializes the verified payload into the
/// engine `engine_for` returns for the verified manifest. The payload is handed to
/// wasmer in `bytes` itself, not a copy (a copy of an artifact is a page fault per
/// 4 KiB on the start path).
pub fn load_bytes(
    bytes: Vec<u8>,
    trust: &TrustedKeys,
    expect: Option<&Expect>,
    engine_for: impl FnOnce(&Manifest) -> Engine,
) -> Result<Loaded, Failure> {
    let started = Instant::now();
    if let Some(e) = expect {
        if <[u8; 32]>::from(Sha256::digest(&bytes)) != e.sha256 {
            return Err(Failure::new(
                Code::Corrupt,
                format!(
                    "is not the artifact staged for {} v{} (sha256 differs)",
                    e.name, e.version
                ),
            ));
        }
    }
    let verified = Envelope::parse(&bytes)
        .and_then(|envelope| envelope.verify(trust))
        .map_err(|e| Failure::new(Code::from(&e), e.to_string()))?;
    if let Some(e) = expect {
        let m = &verified.manifest;
        if m.name != e.name || m.version != e.version {
            return Err(Failure::new(
                Code::Corrupt,
                format!(
                    "is {} v{}, expected {} v{}",
                    m.name, m.version, e.name, e.version
                ),
            ));
        }
    }
    compat::check(&verified.manifest, host::facts())
        .map_err(|e| Failure::new(Code::from(&e), e.to_string()))?;
    let verify_time = started.elapsed();
    let engine = engine_for(&verified.manifest);

    tracing::info!(
        module = %verified.manifest.name,
        version = verified.manifest.version,
        signer = %verified.signer,
        bytes = verified.payload.len(),
        "deserializing verified payload"
    );
    // SAFETY: the payload is exactly the byte range whose sha256 is in a manifest signed
    // by a trusted key, and that manifest names this wasmer version, this target and
    // CPU features present here; the bytes were produced by `Module::serialize`.
    let started = Instant::now();
    let offset = verified.payload.as_ptr() as usize - bytes.as_ptr() as usize;
    let manifest = verified.manifest;
    let payload = aligned_payload(bytes, offset);
    let module = unsafe { Module::deserialize(&engine, payload) }.map_err(|e| {
        Failure::new(
            Code::LoadFailed,
            format!("cannot load the verified payload: {e}"),
        )
    })?;
    Ok(Loaded {
        manifest,
        module,
        engine,
        read_time: Duration::ZERO,
        verify_time,
        deserialize_time: started.elapsed(),
    })
}

/// wasmer reads its payload in place and wants it aligned (its metadata header
/// checks 8 bytes; 16 is what its serializer keeps). The payload starts where the
/// signed manifest ends, at any offset, so the verified bytes are moved up by the few
/// bytes that align it, within the buffer they were read into: no second copy of the
/// artifact. Moving them changes no byte.
fn aligned_payload(mut bytes: Vec<u8>, offset: usize) -> bytes::Bytes {
    const ALIGN: usize = 16;
    bytes.reserve_exact(ALIGN);
    let pad = (ALIGN - (bytes.as_ptr() as usize + offset) % ALIGN) % ALIGN;
    if pad > 0 {
        let len = bytes.len();
        bytes.resize(len + pad, 0);
        bytes.copy_within(0..len, pad);
    }
    bytes::Bytes::from(bytes).slice(offset + pad..)
}

#[cfg(test)]
mod tests {
    /// The zygote's warm-up checks a real signature, so it runs the verifier's whole
    /// path (a vector that failed early would warm nothing); `warm` asserts it.
    #[test]
    fn the_warm_up_verifies_rfc_8032s_first_vector() {
        super::warm();
    }

    /// Whatever the payload's offset, it comes out aligned and unchanged.
    #[test]
    fn a_payload_at_any_offset_is_aligned_in_place() {
        for offset in 0..40 {
            let bytes: Vec<u8> = (0..200u8).collect();
            let want = bytes[offset..].to_vec();
            let payload = super::aligned_payload(bytes, offset);
            assert_eq!(payload.as_ptr() as usize % 16, 0, "offset {offset}");
            assert_eq!(&payload[..], &want[..], "offset {offset}");
        }
    }
}
