//! The proxies' WAN protocol (version 2): its messages, on the framing of
//! [`crate::transport`]. Kept apart from [`super::migration`] so the page
//! encoding can change without touching QEMU stream parsing.
//!
//! ```text
//! each side first: b"PAGEFPQP", u32 LE version
//! frames: the transport's (payload <= 8 MiB, no flags defined)
//! S→R Hello     JSON {sender, zstd}
//! R→S Offer     n × 32-byte template ids (blake3 of the page; template
//!               index = position across all Offer frames), at most
//!               65,536 per frame
//! R→S OfferEnd  JSON {templates}
//! S→R Chunk     u8 encoding (0 plain, 1 zstd), u32 LE decoded length
//!               (<= 4 MiB), body; decoded: ops
//!               0x01 RAW, u32 LE n, n stream bytes
//!               0x02 TEMPLATE, u32 LE index: the 4096 stream bytes are
//!                    that template's page
//!               (at most 16 MiB of QEMU stream per chunk)
//! S→R End       JSON {stream_bytes, blake3} of QEMU's whole stream
//! R→S Done      JSON {stream_bytes}: the destination QEMU has it all
//! either Abort  the transport's (kind 0xFF, JSON {reason})
//! ```

use std::io;

use serde::{Deserialize, Serialize};

use crate::{
    content::{TEMPLATE_ID_LEN, TemplateId},
    transport::{self, PREAMBLE_LEN, Protocol, WireError},
};

pub const MAGIC: [u8; 8] = *b"PAGEFPQP";
/// Version 2: the shared transport framing (an 8-byte header with flags,
/// Abort as kind 0xFF, an 8-byte magic). Version 3: QEMU's return path
/// (`ReturnPath`) and stream checkpoints (`Checkpoint`).
pub const VERSION: u32 = 3;
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
    /// S→R, JSON [`End`]: the stream so far, checked before the receive
    /// proxy hands the destination QEMU what it held back (with the return
    /// path, the source QEMU ends its stream only after the destination
    /// loaded it).
    Checkpoint = 8,
}
}

/// Bytes of one ReturnPath frame at most.
pub const RETURN_PATH_CHUNK: usize = 64 << 10;

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
}

#[derive(Serialize, Deserialize)]
pub struct OfferEnd {
    pub templates: u64,
}

#[derive(Serialize, Deserialize)]
pub struct End {
    pub stream_bytes: u64,
    pub blake3: String,
}

#[derive(Serialize, Deserialize)]
pub struct Done {
    pub stream_bytes: u64,
}

/// Builds chunk ops: runs of raw stream bytes and template references.
#[derive(Default)]
pub struct ChunkBuilder {
    ops: Vec<u8>,
    /// Where the open RAW op's length field is.
    raw_at: Option<usize>,
    /// QEMU stream bytes the ops stand for.
    pub stream_bytes: usize,
}

impl ChunkBuilder {
    pub fn raw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.raw_at.is_none() {
            self.ops.push(OP_RAW);
            self.raw_at = Some(self.ops.len());
            self.ops.extend_from_slice(&[0; 4]);
        }
        self.ops.extend_from_slice(bytes);
        self.stream_bytes += bytes.len();
    }

    pub fn template(&mut self, index: u32) {
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

    /// The chunk frame's payload; the builder is empty afterwards.
    pub fn finish(&mut self, zstd: bool) -> io::Result<Vec<u8>> {
        self.close_raw();
        let ops = std::mem::take(&mut self.ops);
        self.stream_bytes = 0;
        let mut payload = Vec::with_capacity(ops.len() / 2 + 5);
        if zstd {
            let compressed = zstd::bulk::compress(&ops, 3)?;
            if compressed.len() < ops.len() {
                payload.push(ENCODING_ZSTD);
                payload.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                payload.extend_from_slice(&compressed);
                return Ok(payload);
            }
        }
        payload.push(ENCODING_PLAIN);
        payload.extend_from_slice(&(ops.len() as u32).to_le_bytes());
        payload.extend_from_slice(&ops);
        Ok(payload)
    }
}

/// Decodes a chunk frame into the QEMU stream bytes it stands for, with
/// `page(index)` giving template pages.
pub fn decode_chunk<'t>(
    frame: &Frame,
    mut page: impl FnMut(u32) -> Option<&'t [u8; crate::page::PAGE_SIZE]>,
) -> Result<Vec<u8>, WireError> {
    let payload = &frame.payload;
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
    Ok(out)
}
