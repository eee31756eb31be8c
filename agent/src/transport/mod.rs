//! The one framing both WAN protocols speak: native migration
//! ([`crate::transport::migration`]) and the QEMU proxies
//! ([`crate::transport::qemu_proxy`]). Each protocol keeps only its messages;
//! the stream's layout, checks and error reporting live here, once.
//!
//! ```text
//! preamble: [u8; 8] magic, u32 LE version              (both per protocol)
//! frame:    u8 kind, u8 flags, u16 LE reserved (= 0), u32 LE payload length,
//!           payload, u32 LE CRC-32 (IEEE) of the 8 header bytes + payload
//! ```
//!
//! - A [`Protocol`] names its magic, version, largest payload, the flag bits
//!   it defines and its message kinds (a `TryFrom<u8>` enum). Unknown kinds,
//!   undefined flags and non-zero reserved bits are refused: a change to any
//!   of them is a new protocol version.
//! - Kind [`ABORT`] (`0xFF`) is reserved in every protocol: JSON
//!   `{"reason": ...}`, sent by either side that gives up. The reader turns
//!   it into [`WireError::PeerAborted`]; protocols number their own kinds
//!   below it.
//! - Reading is bounded: a frame's announced length is checked against the
//!   protocol's maximum before its payload is allocated. Writing an
//!   oversized payload or an undefined flag is an error, never a panic.
//! - The byte stream below the framing is any [`Read`] / [`Write`]; on the
//!   WAN it is a [`crate::net::Channel`] (TLS 1.3 with both ends
//!   authenticated, unless the operator asked for plaintext by name), and
//!   [`accept::accept_peer`] is the receiving end's one way in.

// Not in the fuzz targets, which compile the framing alone.
#[cfg(not(fuzzing))]
pub mod accept;
mod error;
pub mod migration;
pub mod qemu_proxy;
pub mod query;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    io::{self, Read, Write},
    marker::PhantomData,
};

pub use error::WireError;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Bytes of the preamble: 8 bytes of magic, a u32 version.
pub const PREAMBLE_LEN: usize = 12;
/// Bytes before a frame's payload.
pub const FRAME_HEADER_LEN: usize = 8;
/// Bytes after a frame's payload (its CRC).
pub const FRAME_TRAILER_LEN: usize = 4;
/// Bytes a frame adds to its payload.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + FRAME_TRAILER_LEN;
/// The message kind reserved for Abort in every protocol.
pub const ABORT: u8 = 0xFF;

/// The little-endian `u32` at `at` of `bytes`, if it is all there.
pub fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let (word, _) = bytes.get(at..)?.split_first_chunk::<4>()?;
    Some(u32::from_le_bytes(*word))
}

/// The little-endian `u64` at `at` of `bytes`, if it is all there.
pub fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let (word, _) = bytes.get(at..)?.split_first_chunk::<8>()?;
    Some(u64::from_le_bytes(*word))
}

/// `bytes` as 32-byte hashes, if it is a whole number of them.
pub fn hashes(bytes: &[u8]) -> Option<Vec<[u8; 32]>> {
    let (hashes, rest) = bytes.as_chunks::<32>();
    rest.is_empty().then(|| hashes.to_vec())
}
/// Longest abort reason sent (longer ones are cut at a character boundary).
pub const MAX_ABORT_REASON: usize = 16 << 10;

/// One protocol on top of the framing.
pub trait Protocol {
    /// The protocol's name in error messages ("migration", "QEMU proxy").
    const NAME: &'static str;
    /// What the operator should run on the other end, for a stream that is
    /// not this protocol at all.
    const PEER: &'static str;
    const MAGIC: [u8; 8];
    /// Bumped whenever the bytes on the wire change.
    const VERSION: u32;
    /// Largest payload of one frame; at most `u32::MAX`.
    const MAX_PAYLOAD: usize;
    /// The flag bits this protocol defines; frames with others are refused.
    const FLAGS: u8 = 0;
    /// The protocol's message kinds, numbered below [`ABORT`].
    type Kind: Copy + Eq + fmt::Debug + Into<u8> + TryFrom<u8>;

    /// The version of an older release whose preamble is `found` though its
    /// magic differs, so the operator is told to upgrade rather than that
    /// the peer is not pagefp.
    fn former_version(_found: &[u8; PREAMBLE_LEN]) -> Option<u32> {
        None
    }
}

/// A protocol's message kinds: a `#[repr(u8)]` enum with the conversions
/// [`Protocol::Kind`] needs (`u8::from(kind)`, `Kind::try_from(byte)`,
/// which gives back an unknown byte as the error). Kind [`ABORT`] is the
/// transport's and must not be listed.
#[macro_export]
macro_rules! message_kinds {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$variant_meta:meta])* $variant:ident = $value:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant = $value,)+
        }

        impl From<$name> for u8 {
            fn from(kind: $name) -> u8 {
                kind as u8
            }
        }

        impl TryFrom<u8> for $name {
            type Error = u8;

            fn try_from(value: u8) -> Result<Self, u8> {
                $(const _: () = assert!($value != $crate::transport::ABORT);)+
                match value {
                    $($value => Ok($name::$variant),)+
                    other => Err(other),
                }
            }
        }
    };
}

/// The payload of an [`ABORT`] frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
}

/// One frame, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<K> {
    pub kind: K,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// Stream offset of the frame header (the preamble counts).
    pub offset: u64,
}

impl<K: fmt::Debug> Frame<K> {
    /// Bytes the frame took on the wire.
    pub fn wire_len(&self) -> usize {
        FRAME_OVERHEAD + self.payload.len()
    }

    /// An error about this frame's contents.
    pub fn malformed(&self, what: impl Into<String>) -> WireError {
        WireError::Malformed {
            kind: format!("{:?}", self.kind),
            offset: self.offset,
            what: what.into(),
        }
    }

    /// The payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.payload).map_err(|e| self.malformed(e.to_string()))
    }
}

/// Writes the preamble and frames of protocol `P` to `W`, counting bytes.
pub struct FrameWriter<P, W> {
    inner: W,
    /// Bytes written, preamble included.
    pub bytes: u64,
    protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol, W: Write> FrameWriter<P, W> {
    pub fn new(inner: W) -> Self {
        const { assert!(P::MAX_PAYLOAD <= u32::MAX as usize) };
        Self {
            inner,
            bytes: 0,
            protocol: PhantomData,
        }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn preamble(&mut self) -> Result<(), WireError> {
        let mut bytes = [0u8; PREAMBLE_LEN];
        bytes[..8].copy_from_slice(&P::MAGIC);
        bytes[8..].copy_from_slice(&P::VERSION.to_le_bytes());
        self.write(&bytes)
    }

    /// Writes one frame; returns its size on the wire.
    pub fn frame(&mut self, kind: P::Kind, flags: u8, payload: &[u8]) -> Result<usize, WireError> {
        let code: u8 = kind.into();
        if code == ABORT {
            return Err(WireError::ReservedKind {
                protocol: P::NAME,
                kind: format!("{kind:?}"),
            });
        }
        if flags & !P::FLAGS != 0 {
            return Err(WireError::UndefinedFlags {
                protocol: P::NAME,
                kind: format!("{kind:?}"),
                flags,
            });
        }
        self.raw_frame(code, flags, payload, || format!("{kind:?}"))
    }

    /// Writes one frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(&mut self, kind: P::Kind, value: &T) -> Result<usize, WireError> {
        let payload = serde_json::to_vec(value).map_err(|e| WireError::Encode {
            protocol: P::NAME,
            kind: format!("{kind:?}"),
            what: e.to_string(),
        })?;
        self.frame(kind, 0, &payload)
    }

    /// Tells the peer why this side gives up (the reason is cut to
    /// [`MAX_ABORT_REASON`] bytes). Callers usually ignore the result: the
    /// connection may be what failed.
    pub fn abort(&mut self, reason: &str) -> Result<usize, WireError> {
        let mut end = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let abort = Abort {
            reason: reason[..end].to_owned(),
        };
        let payload = serde_json::to_vec(&abort).map_err(|e| WireError::Encode {
            protocol: P::NAME,
            kind: "Abort".into(),
            what: e.to_string(),
        })?;
        self.raw_frame(ABORT, 0, &payload, || "Abort".into())
    }

    fn raw_frame(
        &mut self,
        kind: u8,
        flags: u8,
        payload: &[u8],
        name: impl FnOnce() -> String,
    ) -> Result<usize, WireError> {
        if payload.len() > P::MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge {
                protocol: P::NAME,
                kind: name(),
                len: payload.len(),
                max: P::MAX_PAYLOAD,
            });
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0] = kind;
        header[1] = flags;
        // The length fits: MAX_PAYLOAD <= u32::MAX (checked in `new`).
        header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        self.write(&header)?;
        self.write(payload)?;
        self.write(&crc.finalize().to_le_bytes())?;
        Ok(FRAME_OVERHEAD + payload.len())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.inner
            .write_all(bytes)
            .map_err(|error| WireError::io(P::NAME, "writing", self.bytes, error))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner
            .flush()
            .map_err(|error| WireError::io(P::NAME, "writing", self.bytes, error))
    }
}

/// Reads and checks the preamble and frames of protocol `P` from `R`,
/// counting bytes.
pub struct FrameReader<P, R> {
    inner: R,
    /// Bytes read, preamble included.
    pub bytes: u64,
    protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol, R: Read> FrameReader<P, R> {
    pub fn new(inner: R) -> Self {
        const { assert!(P::MAX_PAYLOAD <= u32::MAX as usize) };
        Self {
            inner,
            bytes: 0,
            protocol: PhantomData,
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the peer's preamble: this protocol, this version.
    pub fn preamble(&mut self) -> Result<(), WireError> {
        let mut bytes = [0u8; PREAMBLE_LEN];
        self.read(&mut bytes, "the preamble")?;
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 of 12 bytes");
        if magic != P::MAGIC {
            if let Some(theirs) = P::former_version(&bytes) {
                return Err(WireError::Version {
                    protocol: P::NAME,
                    theirs,
                    ours: P::VERSION,
                });
            }
            return Err(WireError::NotOurStream {
                protocol: P::NAME,
                peer: P::PEER,
                found: magic,
            });
        }
        let theirs = u32::from_le_bytes(bytes[8..].try_into().expect("4 of 12 bytes"));
        if theirs != P::VERSION {
            return Err(WireError::Version {
                protocol: P::NAME,
                theirs,
                ours: P::VERSION,
            });
        }
        Ok(())
    }

    /// The next frame, checked; an Abort from the peer becomes
    /// [`WireError::PeerAborted`].
    pub fn frame(&mut self) -> Result<Frame<P::Kind>, WireError> {
        let offset = self.bytes;
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.read(&mut header, "a frame header")?;
        let code = header[0];
        let kind = if code == ABORT {
            None
        } else {
            Some(P::Kind::try_from(code).map_err(|_| WireError::UnknownKind {
                protocol: P::NAME,
                kind: code,
                offset,
            })?)
        };
        let flags = header[1];
        let allowed = if kind.is_some() { P::FLAGS } else { 0 };
        if header[2] != 0 || header[3] != 0 || flags & !allowed != 0 {
            return Err(WireError::Reserved {
                protocol: P::NAME,
                offset,
                header: header[..4].try_into().expect("4 of 8 bytes"),
            });
        }
        let len = u32::from_le_bytes(header[4..].try_into().expect("4 of 8 bytes")) as usize;
        // Checked before anything is allocated for the payload.
        if len > P::MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                protocol: P::NAME,
                offset,
                len,
                max: P::MAX_PAYLOAD,
            });
        }
        let mut payload = vec![0u8; len];
        self.read(&mut payload, "a frame payload")?;
        let mut trailer = [0u8; FRAME_TRAILER_LEN];
        self.read(&mut trailer, "a frame checksum")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&payload);
        let name = || kind.map_or_else(|| "Abort".to_owned(), |k| format!("{k:?}"));
        if crc.finalize() != u32::from_le_bytes(trailer) {
            return Err(WireError::Checksum {
                protocol: P::NAME,
                kind: name(),
                offset,
            });
        }
        let Some(kind) = kind else {
            let reason = match serde_json::from_slice::<Abort>(&payload) {
                Ok(abort) => abort.reason,
                Err(_) => String::from_utf8_lossy(&payload).into_owned(),
            };
            return Err(WireError::PeerAborted {
                protocol: P::NAME,
                reason,
            });
        };
        Ok(Frame {
            kind,
            flags,
            payload,
            offset,
        })
    }

    /// The next frame, which must be of `kind`.
    pub fn expect(&mut self, kind: P::Kind) -> Result<Frame<P::Kind>, WireError> {
        let frame = self.frame()?;
        if frame.kind != kind {
            return Err(WireError::Unexpected {
                protocol: P::NAME,
                expected: format!("{kind:?}"),
                got: format!("{:?}", frame.kind),
                offset: frame.offset,
            });
        }
        Ok(frame)
    }

    fn read(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
        self.inner.read_exact(buf).map_err(|error| {
            if error.kind() == io::ErrorKind::UnexpectedEof {
                WireError::Closed {
                    protocol: P::NAME,
                    what,
                    offset: self.bytes,
                }
            } else {
                WireError::io(P::NAME, "reading", self.bytes, error)
            }
        })?;
        self.bytes += buf.len() as u64;
        Ok(())
    }
}
