//! The send side's page path, the same for QEMU's main stream and for each
//! multifd channel: stream bytes and pages in, chunks out on one WAN
//! connection. A page travels as a template reference when the blake3 of
//! the bytes read from QEMU is one the receiver offered; every chunk ends
//! with the digest the receiver checks before QEMU sees any of it.

use std::{io::BufWriter, net::TcpStream, os::fd::AsFd as _, time::Instant};

use anyhow::Context as _;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::templates::TemplateLookup;
use crate::{
    compression::{Gauge, LinkSample},
    net::ChannelWriter,
    qemu_stream::SinkError,
    transport::qemu_proxy::{ChunkBuilder, FrameWriter, Kind},
};

/// Ops bytes per chunk before it is sent.
const CHUNK_OPS: usize = 256 << 10;
/// QEMU stream bytes per chunk before it is sent (template pages count 4 KiB).
const CHUNK_STREAM: usize = 1 << 20;

pub(super) type Wan = FrameWriter<BufWriter<ChannelWriter>>;

pub(super) struct Chunks<'a> {
    /// Written through [`Chunks::send`] and [`Chunks::flush`] only, so
    /// that what is buffered is known.
    wan: &'a mut Wan,
    lookup: &'a dyn TemplateLookup,
    /// Whether and how chunks are compressed (None: never).
    zstd: Option<&'a Gauge>,
    chunk: ChunkBuilder,
    /// Chunk bytes written and the time the writes took, since the gauge
    /// last heard of the link.
    link_sample: LinkSample,
    /// Chunks were written to the WAN's buffer since it was last flushed.
    unflushed: bool,
    pub template_pages: u64,
    /// QEMU stream bytes so far.
    pub stream_bytes: u64,
}

impl<'a> Chunks<'a> {
    /// Chunks whose digests are seeded with `digest_seed` (the receive
    /// proxy's OfferEnd).
    pub fn new(
        wan: &'a mut Wan,
        lookup: &'a dyn TemplateLookup,
        zstd: Option<&'a Gauge>,
        digest_seed: u64,
    ) -> Self {
        Self {
            wan,
            lookup,
            zstd,
            chunk: ChunkBuilder::new(digest_seed),
            link_sample: LinkSample::default(),
            unflushed: false,
            template_pages: 0,
            stream_bytes: 0,
        }
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.stream_bytes += bytes.len() as u64;
        self.chunk.raw(bytes);
    }

    pub fn page(&mut self, data: &[u8; crate::page::PAGE_SIZE]) {
        self.stream_bytes += data.len() as u64;
        let template = if self.lookup.is_empty() {
            None
        } else {
            self.lookup.template(blake3::hash(data).as_bytes())
        };
        match template {
            Some(index) => {
                self.chunk.template(index, data);
                self.template_pages += 1;
            }
            None => self.chunk.raw(data),
        }
    }

    /// Sends what the chunk holds, compressed if the gauge says it pays.
    pub fn send(&mut self) -> Result<(), SinkError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let zstd = self.zstd;
        let payload = self
            .chunk
            .finish(|ops| zstd.map_or(Ok(None), |gauge| gauge.compress(ops)))?;
        let started = Instant::now();
        let wire = self
            .wan
            .frame(Kind::Chunk, 0, &payload)
            .context("sending to the receive proxy")?;
        self.unflushed = true;
        if let Some(gauge) = self.zstd {
            self.link_sample
                .add(gauge, wire, started.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// Sends the chunk once it is full.
    pub fn send_if_full(&mut self) -> Result<(), SinkError> {
        if self.chunk.ops_len() >= CHUNK_OPS || self.chunk.stream_bytes >= CHUNK_STREAM {
            self.send()?;
        }
        Ok(())
    }

    /// Sends what the chunk holds and flushes every chunk still in the
    /// WAN's buffer when QEMU has nothing more to read right now, so
    /// nothing waits for QEMU's next write (QEMU may be waiting for the
    /// destination's answer to what it wrote). A chunk that filled up just
    /// before QEMU paused sits in the buffer, not in the builder: flushed
    /// too (it once stalled migrations until the I/O timeout).
    pub fn send_when_idle(&mut self, qemu: &TcpStream) -> Result<(), SinkError> {
        if (self.unflushed || !self.chunk.is_empty()) && !readable(qemu)? {
            self.send()?;
            self.flush()?;
        }
        Ok(())
    }

    /// Flushes the WAN's buffer. The time it takes is the link's too:
    /// when QEMU sends in bursts, the proxy flushes at every pause, and
    /// those flushes (not the frame writes into the buffer) are where it
    /// waits for a slow link. Left out, they made a 100 Mbit/s link look
    /// fast, and the gauge sent most chunks raw (×2.2 the bytes of a run
    /// that compressed them).
    pub fn flush(&mut self) -> Result<(), SinkError> {
        let started = Instant::now();
        self.wan.flush().context("sending to the receive proxy")?;
        if let Some(gauge) = self.zstd {
            self.link_sample
                .add(gauge, 0, started.elapsed().as_nanos() as u64);
        }
        self.unflushed = false;
        Ok(())
    }
}

/// Whether `stream` has data (or EOF) to read right now.
fn readable(stream: &TcpStream) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).map_err(std::io::Error::from)?;
    Ok(n > 0)
}
