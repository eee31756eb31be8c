//! The migration protocol, version 2 (see `docs/migration-protocol.md`):
//! its messages, on the framing of [`crate::transport`].
//!
//! The source opens with the preamble (`b"PAGEFPMG"`, version); then both
//! sides send frames. Control messages carry JSON; pages, offers and
//! digests are binary.

use std::io::Read as _;

use serde::{Deserialize, Serialize};

use crate::{
    api::report::Mode,
    content::{TEMPLATE_ID_LEN, TemplateId},
    page::PAGE_SIZE,
    transport::{self, Protocol, WireError},
};

pub const PREAMBLE_MAGIC: [u8; 8] = *b"PAGEFPMG";
/// Version 2: the shared transport framing (Abort is kind 0xFF) and
/// 32-byte template ids. Version 3: the destination may ask for the VM's
/// contents instead of offering its catalog ([`Kind::WantHashes`]).
pub const VERSION: u32 = 4;
/// Largest payload accepted (a batch of pages, a state blob, an offer).
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Most templates one offer can hold.
pub const MAX_OFFER: usize = (MAX_PAYLOAD - 4) / TEMPLATE_ID_LEN;

/// Frame flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u8 = 1;

/// The native migration protocol.
pub struct Migration;

impl Protocol for Migration {
    const NAME: &'static str = "migration";
    const PEER: &'static str = "`pagefp migrate send` or `pagefp migrate receive`";
    const MAGIC: [u8; 8] = PREAMBLE_MAGIC;
    const VERSION: u32 = VERSION;
    const MAX_PAYLOAD: usize = MAX_PAYLOAD;
    const FLAGS: u8 = FLAG_ZSTD;
    type Kind = Kind;
}

impl transport::query::Queries for Migration {
    const QUERY: transport::query::QueryKinds<Kind> = transport::query::QueryKinds {
        want: Kind::WantHashes,
        hashes: Kind::Hashes,
        held: Kind::Held,
    };
}

pub type Frame = transport::Frame<Kind>;
pub type FrameReader<R> = transport::FrameReader<Migration, R>;
pub type FrameWriter<W> = transport::FrameWriter<Migration, W>;

crate::message_kinds! {
/// Message kinds (Abort is the transport's, [`transport::ABORT`]).
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
    // 10 was Abort in version 1.
    /// R→S, JSON [`RoundEnd`] echoed: every byte of the round arrived.
    RoundAck = 11,
    /// R→S, empty, instead of an Offer: send the VM's content hashes.
    WantHashes = 12,
    /// S→R, binary: distinct 32-byte hashes of the VM's non-zero pages;
    /// each answered by one Held before the next ([`transport::query`]).
    Hashes = 13,
    /// R→S, binary: one bit per hash of the last Hashes frame, set if the
    /// destination can rebuild that content ([`transport::query`]).
    Held = 14,
}
}

/// A Pages frame's payload, decompressed if it was sent compressed (at
/// most [`MAX_PAYLOAD`] bytes either way).
pub fn body(frame: &Frame) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
    if frame.flags & FLAG_ZSTD == 0 {
        return Ok(std::borrow::Cow::Borrowed(&frame.payload));
    }
    let mut out = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(&frame.payload[..])
        .map_err(|e| frame.malformed(format!("zstd: {e}")))?;
    decoder
        .take(MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| frame.malformed(format!("zstd: {e}")))?;
    if out.len() > MAX_PAYLOAD {
        return Err(frame.malformed("decompresses to more than the maximum message size"));
    }
    Ok(std::borrow::Cow::Owned(out))
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
    /// The seed of the digest's page checks, fresh for each migration.
    pub digest_seed: u64,
    /// Distinct content hashes the source can list if asked
    /// ([`Kind::WantHashes`]); at most the VM's pages.
    #[serde(default)]
    pub query_hashes: u64,
}

impl Hello {
    /// Pages over every region (saturating: a hostile hello cannot
    /// overflow it).
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().fold(0u64, |total, r| {
            total.saturating_add(r.size / PAGE_SIZE as u64)
        })
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
pub const FULL_LEN: usize = 5 + PAGE_SIZE;

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
        assert_eq!(data.len(), PAGE_SIZE);
        self.buf.push(record::FULL);
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.records += 1;
    }

    /// Appends a full-page record whose page the caller writes into the
    /// returned slice (guest memory read straight into the frame).
    pub fn full_in_place(&mut self, page: u32) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.push(record::FULL);
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.resize(start + FULL_LEN, 0);
        self.records += 1;
        &mut self.buf[start + FULL_LEN - PAGE_SIZE..]
    }

    /// Takes back the record [`PagesBuilder::full_in_place`] just appended.
    pub fn pop_full(&mut self) {
        self.buf.truncate(self.buf.len().saturating_sub(FULL_LEN));
        self.records = self.records.saturating_sub(1);
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
        // Present: `need` bytes were checked above.
        let a = transport::le_u32(rest, 1).unwrap_or_default();
        let b = transport::le_u32(rest, 5).unwrap_or_default();
        let record = match kind {
            record::ZERO_RUN => PageRecord::Zero { first: a, count: b },
            record::TEMPLATE => PageRecord::Template { page: a, index: b },
            _ => PageRecord::Full {
                page: a,
                data: &rest[5..5 + PAGE_SIZE],
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
    let count = transport::le_u32(body, 0)
        .ok_or_else(|| frame.malformed("offer shorter than its count"))? as usize;
    match transport::hashes(&body[4..]) {
        Some(ids) if ids.len() == count => Ok(ids),
        _ => Err(frame.malformed(format!(
            "offer of {count} templates has {} bytes",
            body.len()
        ))),
    }
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
    let (Some(chunk_pages), Some(count)) = (transport::le_u32(body, 0), transport::le_u32(body, 4))
    else {
        return Err(frame.malformed("digest shorter than its header"));
    };
    match transport::hashes(&body[8..]) {
        Some(digests) if digests.len() == count as usize => Ok((chunk_pages, digests)),
        _ => Err(frame.malformed(format!("digest of {count} chunks has {} bytes", body.len()))),
    }
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
        let mut page = vec![0u8; PAGE_SIZE];
        page.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let mut builder = PagesBuilder::default();
        builder.zero_run(3, 7);
        builder.template(11, 42);
        builder.full(12, &page);
        let frame = round_trip(Kind::Pages, 0, &builder.buf);
        let records: Vec<_> = parse_pages(&body(&frame).unwrap())
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
        assert_eq!(body(&frame).unwrap().as_ref(), &builder.buf[..]);
    }

    #[test]
    fn offers_and_digests_round_trip() {
        let ids: Vec<TemplateId> = vec![[1u8; 32], [2u8; 32]];
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
        for other in [1u32, VERSION + 1] {
            let mut bytes = PREAMBLE_MAGIC.to_vec();
            bytes.extend_from_slice(&other.to_le_bytes());
            let err = FrameReader::new(&bytes[..])
                .preamble()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("version {other} is not supported")),
                "{err}"
            );
            assert!(err.contains("upgrade both ends"), "{err}");
        }
    }

    #[test]
    fn kinds_round_trip_and_leave_abort_to_the_transport() {
        let mut known = 0;
        for value in 0..=u8::MAX {
            if let Ok(kind) = Kind::try_from(value) {
                assert_eq!(u8::from(kind), value);
                known += 1;
            }
        }
        assert_eq!(known, 13);
        assert!(Kind::try_from(transport::ABORT).is_err());
        assert!(Kind::try_from(10).is_err(), "version 1's Abort is retired");
    }

    #[test]
    fn an_oversized_state_is_an_error_not_a_panic() {
        let mut writer = FrameWriter::new(Vec::new());
        let err = writer
            .frame(Kind::State, 0, &vec![0u8; MAX_PAYLOAD + 1])
            .unwrap_err();
        assert!(matches!(err, WireError::PayloadTooLarge { .. }), "{err}");
    }

    #[test]
    fn the_largest_offer_fits_one_frame() {
        let ids = vec![[7u8; 32]; MAX_OFFER];
        let frame = round_trip(Kind::Offer, 0, &encode_offer(&ids));
        assert_eq!(decode_offer(&frame).unwrap().len(), MAX_OFFER);
    }

    #[test]
    fn an_aborting_peer_is_an_error_with_its_reason() {
        let mut writer = FrameWriter::new(Vec::new());
        writer.abort("disk full").unwrap();
        let bytes = writer.get_mut().clone();
        let err = FrameReader::new(&bytes[..]).frame().unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(err.to_string().contains("migration peer aborted"), "{err}");
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
                    prop_assert_eq!(data.len(), PAGE_SIZE);
                }
            }
        }
    }
}
