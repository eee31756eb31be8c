//! The receiver's frames, read, checked and decompressed ahead on a thread
//! of their own, so that the socket (and TLS decryption) and the writes
//! into guest memory overlap: the destination keeps reading the link while
//! it applies what came before.
//!
//! At most [`QUEUED`] frames wait, so a sender faster than guest memory
//! is written to is held back by TCP, not by this host's memory: in flight
//! are at most `QUEUED + 2` frames (one being read, one being applied),
//! each within the protocol's payload limit and its decompressed body
//! within the same limit. The thread ends after "go" (nothing follows it),
//! at the first error (passed on in order), or when the receiver stops
//! listening; a read that waits is bounded by the connection's I/O timeout
//! and deadline.

use std::{
    io::Read,
    sync::mpsc::{Receiver, SyncSender, sync_channel},
    thread,
};

use anyhow::Context as _;

use crate::transport::{
    WireError,
    migration::{self as wire, FLAG_ZSTD, FrameReader, Kind},
};

/// Frames read but not yet taken.
pub const QUEUED: usize = 2;

/// One frame as read: its Pages body already decompressed.
pub struct Incoming {
    pub frame: wire::Frame,
    /// A compressed Pages frame's body; `None` for every other frame.
    decompressed: Option<Vec<u8>>,
    /// Bytes read from the connection up to the end of this frame.
    pub read_bytes: u64,
}

impl Incoming {
    /// The Pages records of this frame.
    pub fn body(&self) -> &[u8] {
        self.decompressed.as_deref().unwrap_or(&self.frame.payload)
    }
}

/// The frames of one connection, in order.
pub struct ReadAhead {
    frames: Receiver<Result<Incoming, WireError>>,
}

impl ReadAhead {
    /// Reads the frames of `reader` on a new thread.
    pub fn start<R: Read + Send + 'static>(reader: FrameReader<R>) -> anyhow::Result<Self> {
        let (tx, frames) = sync_channel(QUEUED);
        thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || read_all(reader, &tx))
            .context("starting the receiver's reading thread")?;
        Ok(Self { frames })
    }

    /// The next frame, or why there is none.
    pub fn next(&self) -> anyhow::Result<Incoming> {
        // The thread passes its error on before it ends: a closed channel
        // without one means it panicked.
        let incoming = self
            .frames
            .recv()
            .context("the receiver's reading thread ended without saying why")??;
        Ok(incoming)
    }
}

fn read_all<R: Read>(mut reader: FrameReader<R>, tx: &SyncSender<Result<Incoming, WireError>>) {
    loop {
        let incoming = reader.frame().and_then(|frame| {
            let decompressed = if frame.kind == Kind::Pages && frame.flags & FLAG_ZSTD != 0 {
                Some(wire::body(&frame)?.into_owned())
            } else {
                None
            };
            Ok(Incoming {
                frame,
                decompressed,
                read_bytes: reader.bytes,
            })
        });
        let last = incoming
            .as_ref()
            .map_or(true, |incoming| incoming.frame.kind == Kind::Go);
        if tx.send(incoming).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::migration::FrameWriter;

    fn stream(frames: &[(Kind, u8, Vec<u8>)]) -> Vec<u8> {
        let mut writer = FrameWriter::new(Vec::new());
        for (kind, flags, payload) in frames {
            writer.frame(*kind, *flags, payload).unwrap();
        }
        writer.into_inner()
    }

    #[test]
    fn frames_arrive_in_order_decompressed_and_end_at_go() {
        let plain = vec![7u8; 1000];
        let compressed = zstd::bulk::compress(&[9u8; 5000], 1).unwrap();
        let mut bytes = stream(&[
            (Kind::Pages, 0, plain.clone()),
            (Kind::Pages, FLAG_ZSTD, compressed),
            (Kind::Go, 0, Vec::new()),
        ]);
        // Nothing after go is read.
        bytes.extend_from_slice(b"garbage after go");
        let total = bytes.len() as u64 - 16;
        let ahead = ReadAhead::start(FrameReader::new(std::io::Cursor::new(bytes))).unwrap();
        let first = ahead.next().unwrap();
        assert_eq!(first.body(), &plain[..]);
        let second = ahead.next().unwrap();
        assert_eq!(second.body(), &[9u8; 5000][..]);
        let go = ahead.next().unwrap();
        assert_eq!(go.frame.kind, Kind::Go);
        assert_eq!(go.read_bytes, total);
        assert!(ahead.next().is_err());
    }

    #[test]
    fn a_broken_frame_is_passed_on_after_the_good_ones() {
        let mut bytes = stream(&[(Kind::Pages, 0, vec![1u8; 100])]);
        let good = bytes.len();
        bytes.extend_from_slice(&stream(&[(Kind::Pages, 0, vec![2u8; 100])]));
        // The second frame's payload is corrupted: its checksum fails.
        bytes[good + 20] ^= 0xff;
        let ahead = ReadAhead::start(FrameReader::new(std::io::Cursor::new(bytes))).unwrap();
        assert_eq!(ahead.next().unwrap().body(), &[1u8; 100][..]);
        let err = ahead.next().err().unwrap();
        assert!(format!("{err:#}").contains("checksum"), "{err:#}");
    }

    #[test]
    fn a_bomb_is_refused_on_the_reading_thread() {
        // Compresses to little, decompresses beyond the payload limit.
        let bomb = zstd::bulk::compress(&vec![0u8; wire::MAX_PAYLOAD + 4096], 3).unwrap();
        let bytes = stream(&[(Kind::Pages, FLAG_ZSTD, bomb)]);
        let ahead = ReadAhead::start(FrameReader::new(std::io::Cursor::new(bytes))).unwrap();
        let err = ahead.next().err().unwrap();
        assert!(format!("{err:#}").contains("maximum"), "{err:#}");
    }
}
