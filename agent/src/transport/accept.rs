//! The receiving end's wait for its peer, for both protocols: an
//! authenticated connection that opens the protocol in time, or the next
//! one. Nothing the receiver serves (the incoming VMM, the destination QEMU)
//! is touched until a connection passes.

use std::{
    io::BufReader,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{FrameReader, FrameWriter, Protocol, WireError};
use crate::net::{ChannelReader, ChannelWriter, Protection, SecureListener, Timeouts};

/// How long an authenticated connection has to open the protocol (the
/// preamble and the first message, in full) before it is dropped and the
/// receiver waits for the next one.
pub const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer that opened the protocol.
pub struct Opened<P, T> {
    pub reader: FrameReader<P, BufReader<ChannelReader>>,
    pub writer: ChannelWriter,
    pub peer: String,
    pub protection: Protection,
    /// What `open` read.
    pub opening: T,
}

/// Waits until `accept_timeout` (none: forever) for a connection that
/// authenticates and on which `open` succeeds within [`OPENING_TIMEOUT`];
/// every other connection is answered with an Abort (when it got that far)
/// and dropped with a warning. From then on the connection runs with
/// `timeouts`.
pub fn accept_peer<P: Protocol, T>(
    listener: &SecureListener,
    accept_timeout: Option<Duration>,
    timeouts: &Timeouts,
    waiting_for: &str,
    mut open: impl FnMut(&mut FrameReader<P, BufReader<ChannelReader>>) -> Result<T, WireError>,
) -> anyhow::Result<Opened<P, T>> {
    let deadline = accept_timeout.map(|t| Instant::now() + t);
    loop {
        let channel = listener.accept(deadline, waiting_for).with_context(|| {
            format!(
                "nobody connected within {} s",
                accept_timeout.unwrap_or_default().as_secs()
            )
        })?;
        let peer = channel.peer.clone();
        let protection = channel.protection.clone();
        let (mut read_half, mut writer) = channel.split(Some(timeouts.io_timeout()));
        read_half.set_deadline(Some(Instant::now() + OPENING_TIMEOUT));
        let mut reader = FrameReader::<P, _>::new(BufReader::with_capacity(1 << 20, read_half));
        match reader.preamble().and_then(|()| open(&mut reader)) {
            Ok(opening) => {
                let overall = Some(Instant::now() + timeouts.deadline());
                reader.get_mut().get_mut().set_deadline(overall);
                writer.set_deadline(overall);
                return Ok(Opened {
                    reader,
                    writer,
                    peer,
                    protection,
                    opening,
                });
            }
            Err(err) => {
                log::warn!("ignoring a connection from {peer}: {err}");
                let _ = FrameWriter::<P, _>::new(&mut writer).abort(&err.to_string());
                writer.finish();
            }
        }
    }
}
