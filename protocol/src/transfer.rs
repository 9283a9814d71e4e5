//! How an artifact's bytes reach a device. A *transfer* is one byte stream: the artifact
//! itself, the artifact zstd-compressed, or a zstd patch from a version the device
//! already holds. The stream is cut into retained chunks named by the stream's sha256
//! and the chunk's index, and its *chunk list* (every chunk's sha256) is one more
//! retained message named by the stream too. The signed desired state names the
//! transfer by the sha256 of its chunk list, so the desired state stays the same size
//! whatever the artifact's size, and every chunk is checked against a signed hash
//! before it is written to disk.
//!
//! Whatever the transfer, the device checks the artifact it decodes against the
//! artifact's own sha256 and signature, exactly as for one sent whole: a bad patch or a
//! corrupt stream can never install anything that was not signed.

use serde::{Deserialize, Serialize};

/// Chunks are cut at this size unless the pusher says otherwise: one chunk message
/// (64 KiB and a small header) stays far below the smallest publish limit of a common
/// broker service (AWS IoT Core: 128 KB).
pub const DEFAULT_CHUNK: u32 = 64 * 1024;

/// Largest chunk a pusher may cut (`kiln push --chunk-size`), and so the largest chunk
/// message a device takes: the data plus its small postcard header.
pub const MAX_CHUNK: u32 = 1024 * 1024;
const CHUNK_OVERHEAD: usize = 64;

/// Largest artifact a device accepts over MQTT, decoded.
pub const MAX_ARTIFACT: u64 = 128 * 1024 * 1024;

/// Most chunks of one transfer: its chunk list (32 bytes a chunk) then fits one
/// 128 KB publish, with room for the topic.
pub const MAX_CHUNKS: u32 = 4000;

/// Largest chunk-list message a device reads.
pub const MAX_LIST: usize = MAX_CHUNKS as usize * 32 + 64;

/// The zstd level transfers are compressed at: the artifacts are compressed once, on
/// the fleet tool, and sent to every device.
pub const LEVEL: i32 = 19;

/// What the stream of a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Codec {
    /// The artifact's own bytes.
    Raw,
    /// One zstd frame of the artifact.
    Zstd,
    /// One zstd frame of the artifact compressed against the base artifact as a raw
    /// prefix (zstd's `--patch-from`).
    ZstdPatch,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::ZstdPatch => "zstd patch",
        }
    }
}

/// A transfer as the signed desired state names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub codec: Codec,
    /// sha256 of the stream: names its chunk and chunk-list topics.
    pub sha256: [u8; 32],
    pub len: u64,
    pub chunk_size: u32,
    /// sha256 of the chunk-list message.
    pub list: [u8; 32],
}

/// Why a transfer, its chunk list or a chunk is refused, or a stream does not decode
/// to the artifact, by kind; the words are for people (and unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// Sizes or counts out of the bounds a transfer may have.
    #[error("{0}")]
    Bounds(String),
    /// Does not decode.
    #[error("{0}")]
    Malformed(String),
    /// Decodes, but is not what was signed: another transfer, another stream.
    #[error("{0}")]
    Mismatch(String),
    /// The stream does not decode to the artifact the desired state names.
    #[error("{0}")]
    Decode(String),
}

impl From<TransferError> for String {
    fn from(e: TransferError) -> Self {
        e.to_string()
    }
}

impl Transfer {
    /// Compresses (or keeps, for `Codec::Raw`) `artifact` and cuts the stream into
    /// chunks: the transfer, its chunk-list message and its stream.
    pub fn full(artifact: &[u8], codec: Codec, chunk_size: u32) -> Prepared {
        let stream = match codec {
            Codec::Raw => artifact.to_vec(),
            _ => compress(artifact),
        };
        Prepared::of(codec, stream, chunk_size)
    }

    /// A patch that turns `base` into `artifact`.
    pub fn patch(base: &[u8], artifact: &[u8], chunk_size: u32) -> Prepared {
        Prepared::of(Codec::ZstdPatch, patch(base, artifact), chunk_size)
    }

    /// Is the description sane for an artifact of `artifact_len` bytes?
    pub fn check(&self, artifact_len: u64) -> Result<(), TransferError> {
        let n = self.len.div_ceil(u64::from(self.chunk_size.max(1)));
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK || n > u64::from(MAX_CHUNKS) {
            return Err(TransferError::Bounds(format!(
                "{} transfer of {} bytes in chunks of {} (at most {MAX_CHUNKS} chunks of at most {MAX_CHUNK} bytes)",
                self.codec.name(),
                self.len,
                self.chunk_size
            )));
        }
        let limit = match self.codec {
            Codec::Raw => artifact_len,
            // zstd never grows data by more than a small margin.
            Codec::Zstd | Codec::ZstdPatch => artifact_len + artifact_len / 64 + 1024,
        };
        if self.len == 0 || self.len > limit || (self.codec == Codec::Raw && self.len != limit) {
            return Err(TransferError::Bounds(format!(
                "{} transfer of {} bytes for an artifact of {artifact_len} bytes",
                self.codec.name(),
                self.len
            )));
        }
        Ok(())
    }
}

/// A transfer ready to publish: what the desired state names, the chunk-list message
/// and the stream to cut into chunks.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub transfer: Transfer,
    pub list: ChunkList,
    pub list_message: Vec<u8>,
    pub stream: Vec<u8>,
}

impl Prepared {
    pub fn of(codec: Codec, stream: Vec<u8>, chunk_size: u32) -> Self {
        let list = ChunkList::of(&stream, chunk_size);
        let list_message = list.message();
        Self {
            transfer: Transfer {
                codec,
                sha256: list.sha256,
                len: list.len,
                chunk_size,
                list: sha256(&list_message),
            },
            list,
            list_message,
            stream,
        }
    }

    /// Every chunk message with its index.
    pub fn chunk_messages(&self) -> impl Iterator<Item = (u32, Vec<u8>)> + '_ {
        let sha256 = self.list.sha256;
        self.stream
            .chunks(self.transfer.chunk_size.max(1) as usize)
            .enumerate()
            .map(move |(n, data)| {
                let chunk = Chunk::V1 {
                    sha256,
                    index: n as u32,
                    data: data.to_vec(),
                };
                (n as u32, postcard::to_stdvec(&chunk).unwrap_or_default())
            })
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// A stream cut into `chunks.len()` chunks of `chunk_size` bytes (the last may be
/// shorter), each with its own sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    pub sha256: [u8; 32],
    pub len: u64,
    pub chunk_size: u32,
    pub chunks: Vec<[u8; 32]>,
}

/// The retained chunk-list message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum ListMessage {
    V1(ChunkList),
}

impl ChunkList {
    /// Describes `bytes` split into `chunk_size` pieces.
    pub fn of(bytes: &[u8], chunk_size: u32) -> Self {
        Self {
            sha256: sha256(bytes),
            len: bytes.len() as u64,
            chunk_size,
            chunks: bytes
                .chunks(chunk_size.max(1) as usize)
                .map(sha256)
                .collect(),
        }
    }

    pub fn message(&self) -> Vec<u8> {
        postcard::to_stdvec(&ListMessage::V1(self.clone())).unwrap_or_default()
    }

    /// The chunk list of `transfer` from its retained message: bounded before it is
    /// decoded, its hash checked against the signed one before a byte of it is read.
    pub fn open(payload: &[u8], transfer: &Transfer) -> Result<Self, TransferError> {
        if payload.len() > MAX_LIST {
            return Err(TransferError::Bounds(format!(
                "chunk list of {} bytes (limit {MAX_LIST})",
                payload.len()
            )));
        }
        if sha256(payload) != transfer.list {
            return Err(TransferError::Mismatch(
                "chunk list does not match its signed sha256".into(),
            ));
        }
        let ListMessage::V1(list) = postcard::from_bytes(payload)
            .map_err(|e| TransferError::Malformed(format!("malformed chunk list: {e}")))?;
        if list.sha256 != transfer.sha256
            || list.len != transfer.len
            || list.chunk_size != transfer.chunk_size
        {
            return Err(TransferError::Mismatch(
                "chunk list describes another transfer".into(),
            ));
        }
        list.check()?;
        Ok(list)
    }

    /// The chunk list in a retained message, without a signed hash to check it
    /// against: for tools that only look (how a stream on the broker is cut), never
    /// for fetching.
    pub fn peek(payload: &[u8]) -> Result<Self, TransferError> {
        if payload.len() > MAX_LIST {
            return Err(TransferError::Bounds(format!(
                "chunk list of {} bytes",
                payload.len()
            )));
        }
        let ListMessage::V1(list) = postcard::from_bytes(payload)
            .map_err(|e| TransferError::Malformed(format!("malformed chunk list: {e}")))?;
        Ok(list)
    }

    /// Checks the description itself is sane before the device acts on it.
    pub fn check(&self) -> Result<(), TransferError> {
        let n = self.chunks.len() as u64;
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK || n > u64::from(MAX_CHUNKS) {
            return Err(TransferError::Bounds(format!(
                "{n} chunks of {} bytes",
                self.chunk_size
            )));
        }
        if n != self.len.div_ceil(u64::from(self.chunk_size)) {
            return Err(TransferError::Bounds(format!(
                "{n} chunk hashes for {} bytes in chunks of {}",
                self.len, self.chunk_size
            )));
        }
        Ok(())
    }

    /// Expected length of chunk `n`.
    pub fn chunk_len(&self, n: u32) -> u64 {
        let start = u64::from(n) * u64::from(self.chunk_size);
        self.len
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }
}

/// One retained chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    V1 {
        sha256: [u8; 32],
        index: u32,
        data: Vec<u8>,
    },
}

impl Chunk {
    /// Decodes a chunk of `list`'s stream (size bounded before decoding): its index and
    /// data. The caller checks the data against the chunk's own hash.
    pub fn open(payload: &[u8], list: &ChunkList) -> Result<(u32, Vec<u8>), TransferError> {
        let limit = list.chunk_size as usize + CHUNK_OVERHEAD;
        if payload.len() > limit {
            return Err(TransferError::Bounds(format!(
                "{} bytes (limit {limit})",
                payload.len()
            )));
        }
        match postcard::from_bytes(payload)
            .map_err(|e| TransferError::Malformed(format!("malformed: {e}")))?
        {
            Chunk::V1 {
                sha256,
                index,
                data,
            } if sha256 == list.sha256 => Ok((index, data)),
            Chunk::V1 { sha256, index, .. } => Err(TransferError::Mismatch(format!(
                "carries chunk {index} of {}, not this one",
                hex::encode(&sha256[..6])
            ))),
        }
    }
}

/// The artifact compressed as one zstd frame that records its size and a checksum of
/// its content (so a corrupt stream fails to decode, rather than decoding to bytes
/// that only the sha256 check then refuses).
pub fn compress(artifact: &[u8]) -> Vec<u8> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let _ = cctx.set_parameter(CParameter::CompressionLevel(LEVEL));
    let _ = cctx.set_parameter(CParameter::ContentSizeFlag(true));
    let _ = cctx.set_parameter(CParameter::ChecksumFlag(true));
    run(&mut cctx, artifact)
}

/// `artifact` compressed against `base` as a raw prefix, with a window that spans
/// both, so any run it shares with `base` costs a few bytes wherever it moved.
pub fn patch(base: &[u8], artifact: &[u8]) -> Vec<u8> {
    use zstd::zstd_safe::{CCtx, CParameter};
    // zstd quietly drops a prefix that overlaps its input in memory.
    let overlaps = base.as_ptr_range().start < artifact.as_ptr_range().end
        && artifact.as_ptr_range().start < base.as_ptr_range().end;
    if overlaps {
        let copy = base.to_vec();
        return patch(&copy, artifact);
    }
    let span = (base.len() + artifact.len()).max(1 << 10) as u64;
    let window = (64 - (span - 1).leading_zeros()).clamp(10, 30);
    let mut cctx = CCtx::create();
    let _ = cctx.set_parameter(CParameter::CompressionLevel(LEVEL));
    let _ = cctx.set_parameter(CParameter::ContentSizeFlag(true));
    let _ = cctx.set_parameter(CParameter::ChecksumFlag(true));
    let _ = cctx.set_parameter(CParameter::WindowLog(window));
    let _ = cctx.set_parameter(CParameter::EnableLongDistanceMatching(true));
    if cctx.ref_prefix(base).is_err() {
        return compress(artifact);
    }
    run(&mut cctx, artifact)
}

fn run(cctx: &mut zstd::zstd_safe::CCtx<'_>, src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(src.len()));
    match cctx.compress2(&mut out, src) {
        Ok(_) => out,
        // Cannot happen with a buffer of the bound's size; a raw copy is still a frame
        // the device checks like any other.
        Err(_) => zstd::bulk::compress(src, 1).unwrap_or_default(),
    }
}

/// The artifact a stream decodes to, which must be exactly `len` bytes: the output
/// buffer is `len` bytes and never grows, so a stream that would expand beyond it (a
/// decompression bomb) fails without allocating more. `base` is the artifact a patch
/// applies to.
pub fn decode(
    codec: Codec,
    stream: &[u8],
    base: Option<&[u8]>,
    len: u64,
) -> Result<Vec<u8>, TransferError> {
    use zstd::zstd_safe::DCtx;
    if len > MAX_ARTIFACT {
        return Err(TransferError::Decode(format!(
            "an artifact of {len} bytes (limit {MAX_ARTIFACT})"
        )));
    }
    if codec == Codec::Raw {
        return match stream.len() as u64 == len {
            true => Ok(stream.to_vec()),
            false => Err(TransferError::Decode(format!(
                "{} bytes, expected {len}",
                stream.len()
            ))),
        };
    }
    match zstd::zstd_safe::get_frame_content_size(stream) {
        Ok(Some(declared)) if declared == len => {}
        Ok(Some(declared)) => {
            return Err(TransferError::Decode(format!(
                "it declares {declared} bytes, the desired state {len}"
            )))
        }
        Ok(None) => return Err(TransferError::Decode("it does not declare its size".into())),
        Err(_) => return Err(TransferError::Decode("no valid zstd frame header".into())),
    }
    let mut dctx = DCtx::create();
    if codec == Codec::ZstdPatch {
        let base =
            base.ok_or_else(|| TransferError::Decode("a patch needs the base artifact".into()))?;
        dctx.ref_prefix(base)
            .map_err(|_| TransferError::Decode("cannot use the base artifact".into()))?;
    }
    let mut out = Vec::with_capacity(len as usize);
    match dctx.decompress(&mut out, stream) {
        Ok(n) if n as u64 == len => Ok(out),
        Ok(n) => Err(TransferError::Decode(format!(
            "it gives {n} bytes, expected {len}"
        ))),
        Err(code) => Err(TransferError::Decode(format!(
            "it does not decode ({})",
            zstd::zstd_safe::get_error_name(code)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(seed: u8, len: usize) -> Vec<u8> {
        // Code-like bytes: repetitive with variation, so they compress somewhat.
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ ((i / 7) as u8))
            .collect()
    }

    #[test]
    fn every_codec_round_trips_and_checks_its_description() {
        let v1 = artifact(1, 200_000);
        let mut v2 = v1.clone();
        v2.splice(50_000..50_000, [9u8; 300]);
        for p in [
            Transfer::full(&v2, Codec::Raw, 4096),
            Transfer::full(&v2, Codec::Zstd, 4096),
            Transfer::patch(&v1, &v2, 4096),
        ] {
            let t = &p.transfer;
            assert_eq!(t.check(v2.len() as u64), Ok(()), "{t:?}");
            let list = ChunkList::open(&p.list_message, t).unwrap();
            assert_eq!(list, p.list);
            let base = (t.codec == Codec::ZstdPatch).then_some(&v1[..]);
            assert_eq!(
                decode(t.codec, &p.stream, base, v2.len() as u64).unwrap(),
                v2
            );
            for (n, message) in p.chunk_messages() {
                let (index, data) = Chunk::open(&message, &list).unwrap();
                assert_eq!(index, n);
                assert_eq!(sha256(&data), list.chunks[n as usize]);
            }
        }
        let patch = Transfer::patch(&v1, &v2, 4096);
        let full = Transfer::full(&v2, Codec::Zstd, 4096);
        assert!(
            patch.stream.len() * 10 < full.stream.len(),
            "a patch is small"
        );
    }

    #[test]
    fn a_stream_that_lies_about_its_size_or_base_is_refused_without_growing() {
        let v1 = artifact(1, 100_000);
        let v2 = artifact(2, 100_000);
        let full = compress(&v2);
        // Declared 100,000 bytes; the desired state says fewer: refused before decoding.
        assert!(decode(Codec::Zstd, &full, None, 1000)
            .unwrap_err()
            .to_string()
            .contains("declares 100000 bytes"));
        // A bomb: a frame of 64 MiB of zeros that claims nothing about its size cannot
        // write past the buffer of the declared length.
        let zeros = vec![0u8; 64 << 20];
        let mut cctx = zstd::zstd_safe::CCtx::create();
        let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false));
        let bomb = run(&mut cctx, &zeros);
        assert!(bomb.len() < 64 << 10);
        assert!(decode(Codec::Zstd, &bomb, None, 1000)
            .unwrap_err()
            .to_string()
            .contains("does not declare its size"));
        // Truncated and corrupt streams.
        assert!(decode(Codec::Zstd, &full[..full.len() / 2], None, 100_000).is_err());
        let mut corrupt = full.clone();
        let at = corrupt.len() / 2;
        corrupt[at] ^= 0x55;
        assert!(decode(Codec::Zstd, &corrupt, None, 100_000)
            .unwrap_err()
            .to_string()
            .contains("does not decode"));
        // A patch applied to another base decodes to something else (or nothing); the
        // device's sha256 check then refuses it.
        let p = patch(&v1, &v2);
        let other = artifact(3, 100_000);
        assert!(decode(Codec::ZstdPatch, &p, Some(&other), 100_000).map_or(true, |b| b != v2));
        assert!(decode(Codec::ZstdPatch, &p, None, 100_000).is_err());
        assert!(decode(Codec::Raw, &v2, None, 99).is_err());
        assert!(decode(Codec::Raw, &v2, None, MAX_ARTIFACT + 1).is_err());
    }

    #[test]
    fn chunk_lists_open_only_with_their_signed_hash_and_a_sane_shape() {
        let p = Transfer::full(&artifact(4, 150_000), Codec::Raw, DEFAULT_CHUNK);
        assert_eq!(p.list.chunks.len(), 3);
        assert_eq!(p.list.chunk_len(2), 150_000 - 2 * 65_536);
        let mut other = p.transfer.clone();
        other.list[0] ^= 1;
        assert!(ChunkList::open(&p.list_message, &other).is_err());
        let mut short = p.list.clone();
        short.chunks.pop();
        assert!(short.check().is_err());
        let mut lying = p.transfer.clone();
        let forged = short.message();
        lying.list = sha256(&forged);
        assert!(ChunkList::open(&forged, &lying).is_err());
        assert!(ChunkList::open(&vec![0; MAX_LIST + 1], &p.transfer).is_err());
        // A raw transfer is exactly the artifact; a huge chunk count is refused.
        assert!(p.transfer.check(150_001).is_err());
        let mut many = p.transfer.clone();
        many.chunk_size = 1024;
        many.len = 1024 * u64::from(MAX_CHUNKS) + 1;
        assert!(many.check(many.len).is_err());
    }

    #[test]
    fn a_chunk_list_at_the_limit_fits_one_128_kb_publish() {
        let list = ChunkList {
            sha256: [1; 32],
            len: u64::from(MAX_CHUNKS) * 1024,
            chunk_size: 1024,
            chunks: vec![[2; 32]; MAX_CHUNKS as usize],
        };
        let message = list.message();
        assert!(message.len() <= MAX_LIST);
        assert!(message.len() + 200 < 128 * 1024);
    }
}
