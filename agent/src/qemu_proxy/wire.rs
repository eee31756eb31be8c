//! The proxies' WAN protocol (version 1), kept apart from `migrate::wire`
//! so the page encoding can change without touching QEMU stream parsing.
//!
//! ```text
//! each side first: b"PFQP", u32 LE version
//! frame: u8 kind, u32 LE payload length (<= 8 MiB), payload,
//!        u32 LE CRC-32 of kind, length and payload
//! S→R Hello     JSON {sender, zstd}
//! R→S Offer     n × 32-byte blake3 hashes (template index = position
//!               across all Offer frames), at most 65,536 per frame
//! R→S OfferEnd  JSON {templates}
//! S→R Chunk     u8 encoding (0 plain, 1 zstd), u32 LE decoded length
//!               (<= 4 MiB), body; decoded: ops
//!               0x01 RAW, u32 LE n, n stream bytes
//!               0x02 TEMPLATE, u32 LE index: the 4096 stream bytes are
//!                    that template's page
//!               (at most 16 MiB of QEMU stream per chunk)
//! S→R End       JSON {stream_bytes, blake3} of QEMU's whole stream
//! R→S Done      JSON {stream_bytes}: the destination QEMU has it all
//! either Abort  JSON {reason}
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub const MAGIC: [u8; 4] = *b"PFQP";
pub const VERSION: u32 = 1;
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Largest decoded chunk (its ops).
pub const MAX_DECODED: usize = 4 << 20;
/// Most QEMU stream bytes one chunk may stand for.
pub const MAX_CHUNK_STREAM: usize = 16 << 20;
pub const OFFER_PER_FRAME: usize = 65_536;

pub const OP_RAW: u8 = 0x01;
pub const OP_TEMPLATE: u8 = 0x02;
pub const ENCODING_PLAIN: u8 = 0;
pub const ENCODING_ZSTD: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Offer = 2,
    OfferEnd = 3,
    Chunk = 4,
    End = 5,
    Done = 6,
    Abort = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Offer,
            3 => Kind::OfferEnd,
            4 => Kind::Chunk,
            5 => Kind::End,
            6 => Kind::Done,
            7 => Kind::Abort,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection {while_}")]
    Closed { while_: &'static str },
    #[error("connection error {while_}: {source}")]
    Io {
        while_: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a pagefp QEMU proxy on the other end (preamble {0:02x?})")]
    Preamble([u8; 8]),
    #[error("the peer speaks QEMU proxy protocol version {0}, this one {VERSION}")]
    Version(u32),
    #[error("frame {number}: {what}")]
    Malformed { number: u64, what: String },
    #[error("the other proxy aborted: {0}")]
    Aborted(String),
}

pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
    /// Frames read before this one on the connection.
    pub number: u64,
}

impl Frame {
    pub fn malformed(&self, what: impl Into<String>) -> WireError {
        WireError::Malformed {
            number: self.number,
            what: what.into(),
        }
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| self.malformed(format!("{:?} message: {e}", self.kind)))
    }
}

pub struct FrameWriter<W> {
    inner: W,
    /// Bytes written, preamble included.
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, bytes: 0 }
    }

    pub fn preamble(&mut self) -> io::Result<()> {
        self.inner.write_all(&MAGIC)?;
        self.inner.write_all(&VERSION.to_le_bytes())?;
        self.bytes += 8;
        Ok(())
    }

    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        assert!(payload.len() <= MAX_PAYLOAD, "frame payload too large");
        let mut header = [0u8; 5];
        header[0] = kind as u8;
        header[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        self.inner.write_all(&header)?;
        self.inner.write_all(payload)?;
        self.inner.write_all(&crc.finalize().to_le_bytes())?;
        self.bytes += 9 + payload.len() as u64;
        Ok(())
    }

    pub fn json<T: Serialize>(&mut self, kind: Kind, value: &T) -> io::Result<()> {
        let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.frame(kind, &payload)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub struct FrameReader<R> {
    inner: R,
    pub bytes: u64,
    frames: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            bytes: 0,
            frames: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn read_exact(&mut self, buf: &mut [u8], while_: &'static str) -> Result<(), WireError> {
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                WireError::Closed { while_ }
            } else {
                WireError::Io { while_, source }
            }
        })?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    pub fn preamble(&mut self) -> Result<(), WireError> {
        let mut bytes = [0u8; 8];
        self.read_exact(&mut bytes, "reading the proxy preamble")?;
        if bytes[..4] != MAGIC {
            return Err(WireError::Preamble(bytes));
        }
        let version = u32::from_le_bytes(bytes[4..].try_into().unwrap());
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        Ok(())
    }

    /// The next frame, its CRC checked. An `Abort` becomes an error.
    pub fn frame(&mut self) -> Result<Frame, WireError> {
        let number = self.frames;
        let mut header = [0u8; 5];
        self.read_exact(&mut header, "reading a frame")?;
        let malformed = |what: String| WireError::Malformed { number, what };
        let kind = Kind::from_u8(header[0])
            .ok_or_else(|| malformed(format!("unknown frame kind {}", header[0])))?;
        let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return Err(malformed(format!(
                "{len}-byte payload (at most {MAX_PAYLOAD})"
            )));
        }
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload, "reading a frame")?;
        let mut crc = [0u8; 4];
        self.read_exact(&mut crc, "reading a frame")?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header);
        hasher.update(&payload);
        if hasher.finalize() != u32::from_le_bytes(crc) {
            return Err(malformed(format!(
                "{kind:?} frame fails its CRC: the connection corrupted it"
            )));
        }
        self.frames += 1;
        let frame = Frame {
            kind,
            payload,
            number,
        };
        if kind == Kind::Abort {
            let abort: Abort = frame.json()?;
            return Err(WireError::Aborted(abort.reason));
        }
        Ok(frame)
    }

    pub fn expect(&mut self, kind: Kind) -> Result<Frame, WireError> {
        let frame = self.frame()?;
        if frame.kind != kind {
            return Err(frame.malformed(format!("expected {kind:?}, got {:?}", frame.kind)));
        }
        Ok(frame)
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

#[derive(Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
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
        self.stream_bytes += crate::qemu_stream::format::PAGE_SIZE;
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
    mut page: impl FnMut(u32) -> Option<&'t [u8; crate::qemu_stream::format::PAGE_SIZE]>,
) -> Result<Vec<u8>, WireError> {
    let payload = &frame.payload;
    if payload.len() < 5 {
        return Err(frame.malformed("chunk shorter than its header"));
    }
    let decoded_len = u32::from_le_bytes(payload[1..5].try_into().unwrap()) as usize;
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
        let arg = ops
            .get(at + 1..at + 5)
            .ok_or_else(|| frame.malformed(format!("op at {at} cut short")))?;
        let arg = u32::from_le_bytes(arg.try_into().unwrap());
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
