//! The migration wire format, version 1 (see `docs/migration-protocol.md`).
//!
//! A stream is a preamble, then frames:
//!
//! ```text
//! preamble: b"PAGEFPMG", u32 LE version
//! frame:    u8 kind, u8 flags, u16 LE reserved (0), u32 LE payload length,
//!           payload, u32 LE CRC-32 (IEEE) of the 8 header bytes + payload
//! ```
//!
//! Control messages carry JSON; pages, offers and digests are binary.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::api::report::Mode;

pub const PREAMBLE_MAGIC: [u8; 8] = *b"PAGEFPMG";
pub const VERSION: u32 = 1;
pub const PREAMBLE_LEN: usize = 12;
pub const FRAME_HEADER_LEN: usize = 8;
pub const FRAME_TRAILER_LEN: usize = 4;
/// Largest payload accepted (a batch of pages, a state blob, an offer).
pub const MAX_PAYLOAD: usize = 32 << 20;
pub const PAGE: usize = crate::page::PAGE_SIZE;
/// Length of a template id: a prefix of the page's blake3 hash.
pub const TEMPLATE_ID_LEN: usize = 16;
pub type TemplateId = [u8; TEMPLATE_ID_LEN];

/// Frame flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u8 = 1;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// S→R, JSON [`Hello`].
    Hello = 1,
    /// R→S, binary template offer.
    Offer = 2,
    /// S→R, binary page records.
    Pages = 3,
    /// S→R, JSON [`RoundEnd`].
    RoundEnd = 4,
    /// S→R, the VMM's opaque vCPU and device state.
    State = 5,
    /// S→R, binary memory digest.
    Verify = 6,
    /// R→S, JSON [`Ready`].
    Ready = 7,
    /// S→R, empty: resume the destination.
    Go = 8,
    /// R→S, JSON [`Resumed`].
    Resumed = 9,
    /// Either way, JSON [`Abort`].
    Abort = 10,
    /// R→S, JSON [`RoundEnd`] echoed: every byte of the round arrived.
    RoundAck = 11,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Kind::Hello,
            2 => Kind::Offer,
            3 => Kind::Pages,
            4 => Kind::RoundEnd,
            5 => Kind::State,
            6 => Kind::Verify,
            7 => Kind::Ready,
            8 => Kind::Go,
            9 => Kind::Resumed,
            10 => Kind::Abort,
            11 => Kind::RoundAck,
            _ => return None,
        })
    }
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error(
        "not a pagefp migration stream (the first bytes are {0:02x?}); is the sender `pagefp migrate send`?"
    )]
    NotAMigrationStream([u8; 8]),
    #[error(
        "migration stream version {0} is not supported: this pagefp speaks version {VERSION}; run the same pagefp release on both hosts"
    )]
    Version(u32),
    #[error(
        "unknown message kind {0} at stream offset {1}: the stream is corrupt or from a newer pagefp"
    )]
    UnknownKind(u8, u64),
    #[error(
        "message at stream offset {offset} announces {len} bytes, more than the {MAX_PAYLOAD} allowed"
    )]
    TooLarge { offset: u64, len: usize },
    #[error("message at stream offset {0} has non-zero reserved bits or unknown flags")]
    Reserved(u64),
    #[error(
        "checksum mismatch in the {kind:?} message at stream offset {offset}: the data was corrupted in transit"
    )]
    Checksum { kind: Kind, offset: u64 },
    #[error("malformed {kind:?} message at stream offset {offset}: {what}")]
    Malformed {
        kind: Kind,
        offset: u64,
        what: String,
    },
    #[error("expected a {expected} message, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// Stream offset of the frame header.
    pub offset: u64,
    /// Bytes the frame took on the wire.
    pub wire_len: usize,
}

impl Frame {
    pub fn malformed(&self, what: impl Into<String>) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            offset: self.offset,
            what: what.into(),
        }
    }

    /// The payload, decompressed if it was sent compressed.
    pub fn body(&self) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
        if self.flags & FLAG_ZSTD == 0 {
            return Ok(std::borrow::Cow::Borrowed(&self.payload));
        }
        let mut out = Vec::new();
        let decoder = zstd::stream::read::Decoder::new(&self.payload[..])
            .map_err(|e| self.malformed(format!("zstd: {e}")))?;
        decoder
            .take(MAX_PAYLOAD as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.malformed(format!("zstd: {e}")))?;
        if out.len() > MAX_PAYLOAD {
            return Err(self.malformed("decompresses to more than the maximum message size"));
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.payload).map_err(|e| self.malformed(e.to_string()))
    }
}

/// Writes frames, counting bytes.
pub struct FrameWriter<W: Write> {
    inner: W,
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, bytes: 0 }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn preamble(&mut self) -> io::Result<()> {
        let mut bytes = [0u8; PREAMBLE_LEN];
        bytes[..8].copy_from_slice(&PREAMBLE_MAGIC);
        bytes[8..].copy_from_slice(&VERSION.to_le_bytes());
        self.inner.write_all(&bytes)?;
        self.bytes += PREAMBLE_LEN as u64;
        Ok(())
    }

    /// Writes one frame; returns its size on the wire.
    pub fn frame(&mut self, kind: Kind, flags: u8, payload: &[u8]) -> io::Result<usize> {
        assert!(payload.len() <= MAX_PAYLOAD, "frame payload over the limit");
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0] = kind as u8;
        header[1] = flags;
        header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        self.inner.write_all(&header)?;
        self.inner.write_all(payload)?;
        self.inner.write_all(&crc.finalize().to_le_bytes())?;
        let len = FRAME_HEADER_LEN + payload.len() + FRAME_TRAILER_LEN;
        self.bytes += len as u64;
        Ok(len)
    }

    pub fn json<T: Serialize>(&mut self, kind: Kind, value: &T) -> io::Result<usize> {
        let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.frame(kind, 0, &payload)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads and checks frames, counting bytes.
pub struct FrameReader<R: Read> {
    inner: R,
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, bytes: 0 }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn preamble(&mut self) -> Result<(), WireError> {
        let mut bytes = [0u8; PREAMBLE_LEN];
        self.inner.read_exact(&mut bytes)?;
        self.bytes += PREAMBLE_LEN as u64;
        let magic: [u8; 8] = bytes[..8].try_into().unwrap();
        if magic != PREAMBLE_MAGIC {
            return Err(WireError::NotAMigrationStream(magic));
        }
        let version = u32::from_le_bytes(bytes[8..].try_into().unwrap());
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        Ok(())
    }

    /// The next frame, checked; an `Abort` from the peer becomes an error.
    pub fn frame(&mut self) -> Result<Frame, WireError> {
        let frame = self.raw_frame()?;
        if frame.kind == Kind::Abort {
            let abort: Abort = frame.json().unwrap_or(Abort {
                reason: String::from_utf8_lossy(&frame.payload).into_owned(),
            });
            return Err(WireError::PeerAborted(abort.reason));
        }
        Ok(frame)
    }

    fn raw_frame(&mut self) -> Result<Frame, WireError> {
        let offset = self.bytes;
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.inner.read_exact(&mut header)?;
        let kind = Kind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0], offset))?;
        let flags = header[1];
        if header[2] != 0 || header[3] != 0 || flags & !FLAG_ZSTD != 0 {
            return Err(WireError::Reserved(offset));
        }
        let len = u32::from_le_bytes(header[4..].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge { offset, len });
        }
        let mut payload = vec![0u8; len];
        self.inner.read_exact(&mut payload)?;
        let mut trailer = [0u8; FRAME_TRAILER_LEN];
        self.inner.read_exact(&mut trailer)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&payload);
        if crc.finalize() != u32::from_le_bytes(trailer) {
            return Err(WireError::Checksum { kind, offset });
        }
        let wire_len = FRAME_HEADER_LEN + len + FRAME_TRAILER_LEN;
        self.bytes += wire_len as u64;
        Ok(Frame {
            kind,
            flags,
            payload,
            offset,
            wire_len,
        })
    }

    /// The next frame, which must be of `kind`.
    pub fn expect(&mut self, kind: Kind, name: &'static str) -> Result<Frame, WireError> {
        let frame = self.frame()?;
        if frame.kind != kind {
            return Err(WireError::Unexpected {
                expected: name,
                got: frame.kind,
            });
        }
        Ok(frame)
    }
}

/// One guest memory region, in guest physical address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub read_only: bool,
}

/// The first message: what is being migrated, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub id: String,
    pub mode: Mode,
    pub page_size: u32,
    pub regions: Vec<Region>,
    /// The source VMM's process name (informational).
    pub source: String,
    /// Pages per digest in the final [`Kind::Verify`] message.
    pub digest_chunk_pages: u32,
}

impl Hello {
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.size / PAGE as u64).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundEnd {
    pub round: u32,
    /// The round sent with the VM paused (not acknowledged).
    #[serde(default)]
    pub last: bool,
    pub pages_sent: u64,
    /// Pages the source will send next (0 after the final round).
    pub pages_remaining: u64,
    pub dirty_pages_per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Memory checked byte-identical to the source's digest.
    pub verified: bool,
    /// Digest chunks that differ (empty when verified).
    pub mismatched_chunks: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    /// The destination VMM's pid.
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
}

/// Page record kinds inside a [`Kind::Pages`] message.
pub mod record {
    /// `u32 first page, u32 count`: pages all zero.
    pub const ZERO_RUN: u8 = 1;
    /// `u32 page, u32 template index`.
    pub const TEMPLATE: u8 = 2;
    /// `u32 page`, then the page's 4096 bytes.
    pub const FULL: u8 = 3;
}

/// Bytes of each record on the wire (before compression).
pub const ZERO_RUN_LEN: usize = 9;
pub const TEMPLATE_LEN: usize = 9;
pub const FULL_LEN: usize = 5 + PAGE;

/// One decoded page record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRecord<'a> {
    Zero { first: u32, count: u32 },
    Template { page: u32, index: u32 },
    Full { page: u32, data: &'a [u8] },
}

/// Appends records to a [`Kind::Pages`] payload.
#[derive(Default)]
pub struct PagesBuilder {
    pub buf: Vec<u8>,
    pub records: usize,
}

impl PagesBuilder {
    pub fn zero_run(&mut self, first: u32, count: u32) {
        self.buf.push(record::ZERO_RUN);
        self.buf.extend_from_slice(&first.to_le_bytes());
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.records += 1;
    }

    pub fn template(&mut self, page: u32, index: u32) {
        self.buf.push(record::TEMPLATE);
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.extend_from_slice(&index.to_le_bytes());
        self.records += 1;
    }

    pub fn full(&mut self, page: u32, data: &[u8]) {
        assert_eq!(data.len(), PAGE);
        self.buf.push(record::FULL);
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.records += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.records = 0;
    }
}

/// Decodes a [`Kind::Pages`] body; the first error stops it.
pub fn parse_pages(body: &[u8]) -> impl Iterator<Item = Result<PageRecord<'_>, String>> + '_ {
    let mut rest = body;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let kind = rest[0];
        let need = match kind {
            record::ZERO_RUN => ZERO_RUN_LEN,
            record::TEMPLATE => TEMPLATE_LEN,
            record::FULL => FULL_LEN,
            other => {
                failed = true;
                return Some(Err(format!("unknown page record kind {other}")));
            }
        };
        if rest.len() < need {
            failed = true;
            return Some(Err(format!(
                "page record of kind {kind} cut short: {} of {need} bytes",
                rest.len()
            )));
        }
        let a = u32::from_le_bytes(rest[1..5].try_into().unwrap());
        let record = match kind {
            record::ZERO_RUN => PageRecord::Zero {
                first: a,
                count: u32::from_le_bytes(rest[5..9].try_into().unwrap()),
            },
            record::TEMPLATE => PageRecord::Template {
                page: a,
                index: u32::from_le_bytes(rest[5..9].try_into().unwrap()),
            },
            _ => PageRecord::Full {
                page: a,
                data: &rest[5..5 + PAGE],
            },
        };
        rest = &rest[need..];
        Some(Ok(record))
    })
}

/// The template offer: `u32 count`, then `count` template ids; a page refers
/// to a template by its position in this list.
pub fn encode_offer(ids: &[TemplateId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + ids.len() * TEMPLATE_ID_LEN);
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        out.extend_from_slice(id);
    }
    out
}

pub fn decode_offer(frame: &Frame) -> Result<Vec<TemplateId>, WireError> {
    let body = &frame.payload;
    if body.len() < 4 {
        return Err(frame.malformed("offer shorter than its count"));
    }
    let count = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    if body.len() != 4 + count * TEMPLATE_ID_LEN {
        return Err(frame.malformed(format!(
            "offer of {count} templates has {} bytes",
            body.len()
        )));
    }
    Ok(body[4..]
        .chunks_exact(TEMPLATE_ID_LEN)
        .map(|c| c.try_into().unwrap())
        .collect())
}

/// The final memory digest: `u32 chunk_pages, u32 count`, then `count`
/// blake3 digests (see [`super::digest`]).
pub fn encode_digest(chunk_pages: u32, digests: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + digests.len() * 32);
    out.extend_from_slice(&chunk_pages.to_le_bytes());
    out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
    for d in digests {
        out.extend_from_slice(d);
    }
    out
}

pub fn decode_digest(frame: &Frame) -> Result<(u32, Vec<[u8; 32]>), WireError> {
    let body = &frame.payload;
    if body.len() < 8 {
        return Err(frame.malformed("digest shorter than its header"));
    }
    let chunk_pages = u32::from_le_bytes(body[..4].try_into().unwrap());
    let count = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
    if body.len() != 8 + count * 32 {
        return Err(frame.malformed(format!("digest of {count} chunks has {} bytes", body.len())));
    }
    Ok((
        chunk_pages,
        body[8..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(kind: Kind, flags: u8, payload: &[u8]) -> Frame {
        let mut writer = FrameWriter::new(Vec::new());
        writer.preamble().unwrap();
        writer.frame(kind, flags, payload).unwrap();
        let bytes = writer.get_mut().clone();
        let mut reader = FrameReader::new(&bytes[..]);
        reader.preamble().unwrap();
        let frame = reader.frame().unwrap();
        assert_eq!(reader.bytes, bytes.len() as u64);
        frame
    }

    #[test]
    fn every_page_encoding_round_trips() {
        let mut page = vec![0u8; PAGE];
        page.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let mut builder = PagesBuilder::default();
        builder.zero_run(3, 7);
        builder.template(11, 42);
        builder.full(12, &page);
        let frame = round_trip(Kind::Pages, 0, &builder.buf);
        let records: Vec<_> = parse_pages(&frame.body().unwrap())
            .map(Result::unwrap)
            .map(|r| match r {
                PageRecord::Full { page, data } => (page, data.to_vec()),
                PageRecord::Zero { first, count } => (first, vec![count as u8]),
                PageRecord::Template { page, index } => (page, vec![index as u8, 0xFF]),
            })
            .collect();
        assert_eq!(
            records,
            vec![(3, vec![7]), (11, vec![42, 0xFF]), (12, page.clone())]
        );
        // zstd-compressed payloads decode to the same records.
        let compressed = zstd::bulk::compress(&builder.buf, 3).unwrap();
        let frame = round_trip(Kind::Pages, FLAG_ZSTD, &compressed);
        assert_eq!(frame.body().unwrap().as_ref(), &builder.buf[..]);
    }

    #[test]
    fn offers_and_digests_round_trip() {
        let ids = vec![[1u8; 16], [2u8; 16]];
        let frame = round_trip(Kind::Offer, 0, &encode_offer(&ids));
        assert_eq!(decode_offer(&frame).unwrap(), ids);
        let digests = vec![[9u8; 32]; 3];
        let frame = round_trip(Kind::Verify, 0, &encode_digest(1024, &digests));
        assert_eq!(decode_digest(&frame).unwrap(), (1024, digests));
    }

    #[test]
    fn foreign_and_future_streams_are_refused_clearly() {
        let mut reader = FrameReader::new(&b"GET / HTTP/1.1\r\n"[..]);
        let err = reader.preamble().unwrap_err().to_string();
        assert!(err.contains("not a pagefp migration stream"), "{err}");
        let mut bytes = PREAMBLE_MAGIC.to_vec();
        bytes.extend_from_slice(&2u32.to_le_bytes());
        let err = FrameReader::new(&bytes[..])
            .preamble()
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 2 is not supported"), "{err}");
    }

    #[test]
    fn an_aborting_peer_is_an_error_with_its_reason() {
        let mut writer = FrameWriter::new(Vec::new());
        writer
            .json(
                Kind::Abort,
                &Abort {
                    reason: "disk full".into(),
                },
            )
            .unwrap();
        let bytes = writer.get_mut().clone();
        let err = FrameReader::new(&bytes[..]).frame().unwrap_err();
        assert!(err.to_string().contains("disk full"));
    }

    proptest! {
        /// Any corruption of a frame is caught: by the checksum, the
        /// header checks, or a short read; never a panic, never a frame
        /// with other contents.
        #[test]
        fn corrupted_frames_are_refused(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                        at in any::<prop::sample::Index>(),
                                        xor in 1u8..) {
            let mut writer = FrameWriter::new(Vec::new());
            writer.frame(Kind::Pages, 0, &payload).unwrap();
            let mut bytes = writer.get_mut().clone();
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
            if let Ok(frame) = FrameReader::new(&bytes[..]).frame() {
                prop_assert!(false, "corrupted frame accepted: {frame:?}");
            }
        }

        #[test]
        fn truncated_frames_are_refused(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                        cut in any::<prop::sample::Index>()) {
            let mut writer = FrameWriter::new(Vec::new());
            writer.frame(Kind::Pages, 0, &payload).unwrap();
            let bytes = writer.get_mut().clone();
            let cut = cut.index(bytes.len());
            prop_assert!(FrameReader::new(&bytes[..cut]).frame().is_err());
        }

        /// The page parser never panics on arbitrary bytes.
        #[test]
        fn page_parser_survives_garbage(body in proptest::collection::vec(any::<u8>(), 0..5000)) {
            for record in parse_pages(&body) {
                if let Ok(PageRecord::Full { data, .. }) = record {
                    prop_assert_eq!(data.len(), PAGE);
                }
            }
        }
    }
}
