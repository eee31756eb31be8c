//! The proxies' WAN protocol (version 6): its messages, on the framing of
//! [`crate::transport`]. Kept apart from [`super::migration`] so the page
//! encoding can change without touching QEMU stream parsing.
//!
//! One WAN connection per QEMU connection: the main stream's, then one per
//! multifd channel, each opened with its own Hello.
//!
//! ```text
//! each side first: b"PAGEFPQP", u32 LE version
//! frames: the transport's (payload <= 8 MiB, no flags defined)
//! S→R Hello     JSON {sender, zstd, multifd, query_hashes}: multifd absent
//!               on the main stream's connection, the session of OfferEnd
//!               on a multifd channel's; query_hashes: how many distinct
//!               contents of the VM the send proxy can list (0: none)
//! R→S Offer     n × 32-byte template ids (blake3 of the page; template
//!               index = position across all Offer frames), at most
//!               65,536 per frame (main connection only)
//!  or WantHashes, then S→R Hashes / R→S Held until every listed content
//!               was answered: the query negotiation of
//!               [`crate::transport::query`] (template index = place among
//!               the held contents, in the order listed)
//! R→S OfferEnd  JSON {templates, session, digest_seed}: a multifd
//!               channel's connection gets OfferEnd alone, with the main's
//!               count and seed
//! S→R Chunk     u8 encoding (0 plain, 1 zstd), u32 LE decoded length
//!               (<= 4 MiB), body, 16-byte digest; decoded: ops
//!               0x01 RAW, u32 LE n, n stream bytes
//!               0x02 TEMPLATE, u32 LE index: the 4096 stream bytes are
//!                    that template's page
//!               (at most 16 MiB of QEMU stream per chunk); digest:
//!               xxh3-128 seeded with OfferEnd's digest_seed, of u64 LE
//!               stream offset of the chunk's first byte, then the stream
//!               bytes it stands for (LE)
//! S→R End       JSON {stream_bytes, channels}: the connection's whole
//!               stream; on the main one, the multifd channels opened
//! R→S Done      JSON {stream_bytes}: the destination QEMU has it all
//! R→S ReturnPath  bytes the destination QEMU wrote back (main only)
//! either Abort  the transport's (kind 0xFF, JSON {reason})
//! ```

use std::io;

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_128;

use crate::{
    content::{TEMPLATE_ID_LEN, TemplateId},
    transport::{self, PREAMBLE_LEN, Protocol, WireError},
};

pub const MAGIC: [u8; 8] = *b"PAGEFPQP";
/// Version 2: the shared transport framing (an 8-byte header with flags,
/// Abort as kind 0xFF, an 8-byte magic). Version 3: QEMU's return path
/// (`ReturnPath`) and stream checkpoints. Version 4: a digest in every
/// chunk instead of checkpoints, and multifd channels. Version 5: the
/// query negotiation (`Hello.query_hashes`, `WantHashes`, `Hashes`, `Held`).
/// Version 6: chunk digests are seeded xxh3-128 (`OfferEnd.digest_seed`),
/// not blake3.
pub const VERSION: u32 = 6;
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Largest decoded chunk (its ops).
pub const MAX_DECODED: usize = 4 << 20;
/// Most QEMU stream bytes one chunk may stand for.
pub const MAX_CHUNK_STREAM: usize = 16 << 20;
pub const OFFER_PER_FRAME: usize = 65_536;
/// Template ids one offer may hold in all (32 MiB of ids): the send proxy
/// keeps the offer, so its size is bounded before it is stored.
pub const MAX_OFFER: usize = 1 << 20;
const _: () = assert!(OFFER_PER_FRAME * TEMPLATE_ID_LEN <= MAX_PAYLOAD);

pub const OP_RAW: u8 = 0x01;
pub const OP_TEMPLATE: u8 = 0x02;
pub const ENCODING_PLAIN: u8 = 0;
pub const ENCODING_ZSTD: u8 = 1;

/// The QEMU proxies' protocol.
pub struct QemuProxy;

impl Protocol for QemuProxy {
    const NAME: &'static str = "QEMU proxy";
    const PEER: &'static str = "`pagefp qemu-proxy send` or `pagefp qemu-proxy receive`";
    const MAGIC: [u8; 8] = MAGIC;
    const VERSION: u32 = VERSION;
    const MAX_PAYLOAD: usize = MAX_PAYLOAD;
    type Kind = Kind;

    /// Version 1 opened with a 4-byte `b"PFQP"` and its version; a version
    /// 1 receive proxy that refused this side's preamble answers instead
    /// with its Abort (kind 7, u32 length, `{"reason":...}`).
    fn former_version(found: &[u8; PREAMBLE_LEN]) -> Option<u32> {
        if found[..4] == *b"PFQP" {
            return transport::le_u32(found, 4);
        }
        (found[0] == 7 && found[5..] == *br#"{"reaso"#).then_some(1)
    }
}

pub type Frame = transport::Frame<Kind>;
pub type FrameReader<R> = transport::FrameReader<QemuProxy, R>;
pub type FrameWriter<W> = transport::FrameWriter<QemuProxy, W>;

crate::message_kinds! {
/// Message kinds (Abort is the transport's, [`transport::ABORT`]).
pub enum Kind {
    Hello = 1,
    Offer = 2,
    OfferEnd = 3,
    Chunk = 4,
    End = 5,
    Done = 6,
    /// R→S: bytes the destination QEMU wrote on its return path (PONG,
    /// SHUT...), for the source QEMU.
    ReturnPath = 7,
    /// R→S, empty, instead of an Offer: list the VM's contents.
    WantHashes = 8,
    /// S→R: distinct 32-byte content hashes ([`crate::transport::query`]).
    Hashes = 9,
    /// R→S: one bit per hash of the last Hashes frame, set if held.
    Held = 10,
}
}

impl transport::query::Queries for QemuProxy {
    const QUERY: transport::query::QueryKinds<Kind> = transport::query::QueryKinds {
        want: Kind::WantHashes,
        hashes: Kind::Hashes,
        held: Kind::Held,
    };
}

/// Bytes of one ReturnPath frame at most.
pub const RETURN_PATH_CHUNK: usize = 64 << 10;

/// The send proxy's side of the main connection after the offer: every
/// ReturnPath frame's bytes go to `to_qemu` as they come, in order, until
/// Done (returned, with the return-path bytes relayed). Anything else is
/// malformed. A source QEMU that does not take its bytes is only logged:
/// its own migration fails then, and Done still tells how the stream went.
pub fn relay_return_path<R: io::Read, W: io::Write>(
    reader: &mut FrameReader<R>,
    to_qemu: &mut W,
) -> Result<(Done, u64), WireError> {
    let mut relayed = 0u64;
    loop {
        let frame = reader.frame()?;
        match frame.kind {
            Kind::ReturnPath => {
                if frame.payload.len() > RETURN_PATH_CHUNK {
                    return Err(frame.malformed(format!(
                        "{} return-path bytes in one frame (at most {RETURN_PATH_CHUNK})",
                        frame.payload.len()
                    )));
                }
                relayed += frame.payload.len() as u64;
                if let Err(e) = to_qemu
                    .write_all(&frame.payload)
                    .and_then(|()| to_qemu.flush())
                {
                    log::warn!("the source QEMU did not take its return-path bytes: {e}");
                }
            }
            Kind::Done => return Ok((frame.json::<Done>()?, relayed)),
            other => {
                return Err(
                    frame.malformed(format!("expected return-path bytes or Done, got {other:?}"))
                );
            }
        }
    }
}

/// One Offer frame's payload: the ids, one after another.
pub fn encode_offer(ids: &[TemplateId]) -> Vec<u8> {
    ids.as_flattened().to_vec()
}

/// The ids of one Offer frame.
pub fn decode_offer(frame: &Frame) -> Result<Vec<TemplateId>, WireError> {
    let payload = &frame.payload;
    match transport::hashes(payload) {
        Some(ids) if ids.len() <= OFFER_PER_FRAME => Ok(ids),
        _ => Err(frame.malformed(format!(
            "offer of {} bytes is not a list of at most {OFFER_PER_FRAME} {TEMPLATE_ID_LEN}-byte template ids",
            payload.len()
        ))),
    }
}

#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub sender: String,
    pub zstd: bool,
    /// A multifd channel's connection: the session its main connection's
    /// OfferEnd named.
    #[serde(default)]
    pub multifd: Option<String>,
    /// Distinct non-zero contents of the VM the send proxy can list when
    /// asked (its agent's hash list; 0 on a multifd channel's connection).
    #[serde(default)]
    pub query_hashes: u64,
}

#[derive(Serialize, Deserialize)]
pub struct OfferEnd {
    pub templates: u64,
    /// What the migration's multifd channels present in their Hello.
    #[serde(default)]
    pub session: String,
    /// The seed of every chunk's digest, fresh for each migration.
    pub digest_seed: u64,
}

#[derive(Serialize, Deserialize)]
pub struct End {
    pub stream_bytes: u64,
    /// On the main stream: how many multifd channels the send proxy
    /// opened (the receive proxy waits for them all).
    #[serde(default)]
    pub channels: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub stream_bytes: u64,
}

/// Length of the digest that ends a chunk.
pub const CHUNK_DIGEST_LEN: usize = 16;

/// The digest a chunk carries: xxh3-128 with the migration's seed over the
/// stream offset of its first byte (u64 LE) and the stream bytes it stands
/// for. The receive proxy hands a chunk to QEMU only when its rebuilt bytes
/// give the same. Like the native migration's final digest
/// ([`crate::migrate::digest`]) it catches the proxies' own faults (a wrong
/// template index, a misassembled chunk): TLS authenticates the bytes, and
/// the sender picks a template only when the page's blake3 is the
/// template's address.
pub fn chunk_digest_start(seed: u64, start: u64) -> XxHash3_128 {
    let mut hasher = XxHash3_128::with_seed(seed);
    hasher.write(&start.to_le_bytes());
    hasher
}

/// Builds chunk ops: runs of raw stream bytes and template references,
/// and the chunk's digest.
pub struct ChunkBuilder {
    seed: u64,
    ops: Vec<u8>,
    /// Where the open RAW op's length field is.
    raw_at: Option<usize>,
    /// QEMU stream bytes the ops stand for.
    pub stream_bytes: usize,
    /// Stream offset of the chunk's first byte.
    start: u64,
    digest: XxHash3_128,
}

impl ChunkBuilder {
    /// Chunks of a stream whose digests are seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ops: Vec::new(),
            raw_at: None,
            stream_bytes: 0,
            start: 0,
            digest: chunk_digest_start(seed, 0),
        }
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.digest.write(bytes);
        if self.raw_at.is_none() {
            self.ops.push(OP_RAW);
            self.raw_at = Some(self.ops.len());
            self.ops.extend_from_slice(&[0; 4]);
        }
        self.ops.extend_from_slice(bytes);
        self.stream_bytes += bytes.len();
    }

    /// `page` travels as template `index` (the receiver's page of that
    /// index must be `page`: the digest says whether it was).
    pub fn template(&mut self, index: u32, page: &[u8; crate::page::PAGE_SIZE]) {
        self.digest.write(page);
        self.close_raw();
        self.ops.push(OP_TEMPLATE);
        self.ops.extend_from_slice(&index.to_le_bytes());
        self.stream_bytes += crate::page::PAGE_SIZE;
    }

    fn close_raw(&mut self) {
        if let Some(at) = self.raw_at.take() {
            let len = (self.ops.len() - at - 4) as u32;
            self.ops[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
    }

    pub fn ops_len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The chunk frame's payload, its ops as `compress` gives them (`None`:
    /// plain) when that makes them smaller; the builder is empty
    /// afterwards, its next chunk starting where this one ended.
    pub fn finish(
        &mut self,
        compress: impl FnOnce(&[u8]) -> io::Result<Option<Vec<u8>>>,
    ) -> io::Result<Vec<u8>> {
        self.close_raw();
        let ops = std::mem::take(&mut self.ops);
        self.start += self.stream_bytes as u64;
        self.stream_bytes = 0;
        let next = chunk_digest_start(self.seed, self.start);
        let digest = std::mem::replace(&mut self.digest, next).finish_128();
        let mut payload = Vec::with_capacity(ops.len() / 2 + 5 + CHUNK_DIGEST_LEN);
        let compressed = compress(&ops)?.filter(|c| c.len() < ops.len());
        match compressed {
            Some(compressed) => {
                payload.push(ENCODING_ZSTD);
                payload.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                payload.extend_from_slice(&compressed);
            }
            None => {
                payload.push(ENCODING_PLAIN);
                payload.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                payload.extend_from_slice(&ops);
            }
        }
        payload.extend_from_slice(&digest.to_le_bytes());
        Ok(payload)
    }
}

/// Decodes a chunk frame into the QEMU stream bytes it stands for, with
/// `page(index)` giving template pages, and checks them against the
/// chunk's digest (seeded with `seed`) for a chunk starting at stream
/// offset `start`.
pub fn decode_chunk<'t>(
    frame: &Frame,
    seed: u64,
    start: u64,
    mut page: impl FnMut(u32) -> Option<&'t [u8; crate::page::PAGE_SIZE]>,
) -> Result<Vec<u8>, WireError> {
    let Some(split) = frame
        .payload
        .len()
        .checked_sub(CHUNK_DIGEST_LEN)
        .filter(|&n| n >= 5)
    else {
        return Err(frame.malformed("chunk shorter than its header and digest"));
    };
    let (payload, digest) = frame.payload.split_at(split);
    let decoded_len = transport::le_u32(payload, 1)
        .ok_or_else(|| frame.malformed("chunk shorter than its header"))?
        as usize;
    if decoded_len > MAX_DECODED {
        return Err(frame.malformed(format!(
            "chunk of {decoded_len} bytes (at most {MAX_DECODED})"
        )));
    }
    let body = &payload[5..];
    let decompressed;
    let ops: &[u8] = match payload[0] {
        ENCODING_PLAIN => body,
        ENCODING_ZSTD => {
            decompressed = zstd::bulk::decompress(body, decoded_len)
                .map_err(|e| frame.malformed(format!("chunk does not decompress: {e}")))?;
            &decompressed
        }
        other => return Err(frame.malformed(format!("unknown chunk encoding {other}"))),
    };
    if ops.len() != decoded_len {
        return Err(frame.malformed(format!(
            "chunk decodes to {} bytes, {decoded_len} announced",
            ops.len()
        )));
    }
    let mut out = Vec::with_capacity(decoded_len);
    let mut at = 0;
    while at < ops.len() {
        let op = ops[at];
        let arg = transport::le_u32(ops, at + 1)
            .ok_or_else(|| frame.malformed(format!("op at {at} cut short")))?;
        at += 5;
        match op {
            OP_RAW => {
                let bytes = ops.get(at..at + arg as usize).ok_or_else(|| {
                    frame.malformed(format!("raw run of {arg} bytes at {at} cut short"))
                })?;
                out.extend_from_slice(bytes);
                at += arg as usize;
            }
            OP_TEMPLATE => {
                let data = page(arg)
                    .ok_or_else(|| frame.malformed(format!("template {arg} was not offered")))?;
                out.extend_from_slice(data);
            }
            other => return Err(frame.malformed(format!("unknown op {other:#x} at {}", at - 5))),
        }
        if out.len() > MAX_CHUNK_STREAM {
            return Err(frame.malformed(format!(
                "chunk stands for more than {MAX_CHUNK_STREAM} bytes"
            )));
        }
    }
    let mut rebuilt = chunk_digest_start(seed, start);
    rebuilt.write(&out);
    if rebuilt.finish_128().to_le_bytes() != digest {
        return Err(frame.malformed(format!(
            "the {} stream bytes rebuilt from offset {start} differ from the source's (chunk digest); none of them went to QEMU",
            out.len()
        )));
    }
    Ok(out)
}
