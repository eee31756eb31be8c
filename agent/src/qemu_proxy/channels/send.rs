//! The send side: QEMU's further connections to the send proxy, each
//! classified and, if a multifd channel, parsed and sent deduplicated on a
//! WAN connection of its own.

use std::{
    io::{BufReader, BufWriter},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{ChannelTotals, Failure};
use crate::{
    compression::Gauge,
    net::{self, Timeouts, tls},
    qemu_proxy::{
        CONNECT_RETRY,
        chunks::{Chunks, Wan},
        templates::TemplateLookup,
    },
    qemu_stream::{
        Page, Sink, SinkError,
        multifd::{self, ChannelSummary},
    },
    transport::qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind},
};

/// How the send proxy reaches the receive proxy for a channel.
pub struct SendLink<'a> {
    pub to: &'a str,
    pub security: &'a tls::Client,
    pub timeouts: Timeouts,
    /// How chunks are compressed (None: never).
    pub zstd: Option<&'a Gauge>,
    pub offered: &'a (dyn TemplateLookup + Sync),
    /// The offer's length, session and digest seed, as the main
    /// connection got them.
    pub templates: u64,
    pub session: String,
    pub digest_seed: u64,
}

/// How long a new connection to the send proxy has to show its first
/// four bytes (QEMU writes a channel's hello as soon as it connected).
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// The send proxy's multifd channels: accepted from its listener by a
/// thread of `scope`, each relayed by a thread of its own.
pub struct SendChannels<'scope> {
    stop: &'scope AtomicBool,
    counts: &'scope ChannelCounts,
    failure: &'scope Failure,
    acceptor: Option<thread::ScopedJoinHandle<'scope, Vec<SendRelay<'scope>>>>,
    relays: Vec<SendRelay<'scope>>,
}

type SendRelay<'scope> =
    thread::ScopedJoinHandle<'scope, anyhow::Result<Option<(ChannelSummary, u64, u64)>>>;

/// Connections the send proxy accepted besides the main stream, and what
/// became of them so far.
#[derive(Default)]
pub struct ChannelCounts {
    accepted: AtomicU32,
    classified: AtomicU32,
    multifd: AtomicU32,
}

impl<'scope> SendChannels<'scope> {
    pub fn start(
        scope: &'scope thread::Scope<'scope, '_>,
        listener: TcpListener,
        link: &'scope SendLink<'scope>,
        stop: &'scope AtomicBool,
        counts: &'scope ChannelCounts,
        failure: &'scope Failure,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let acceptor = thread::Builder::new()
            .name("multifd-accept".into())
            .spawn_scoped(scope, move || {
                let mut relays = Vec::new();
                loop {
                    // Stop only once the backlog is empty.
                    let stopping = stop.load(Ordering::SeqCst);
                    match listener.accept() {
                        Ok((qemu, peer)) => {
                            counts.accepted.fetch_add(1, Ordering::SeqCst);
                            let spawned = thread::Builder::new()
                                .name("multifd-send".into())
                                .spawn_scoped(scope, move || {
                                    send_channel(qemu, &peer.to_string(), link, counts)
                                });
                            match spawned {
                                Ok(relay) => relays.push(relay),
                                Err(e) => {
                                    counts.classified.fetch_add(1, Ordering::SeqCst);
                                    failure.set(format!("cannot start a multifd relay: {e}"));
                                }
                            }
                        }
                        Err(_) if stopping => return relays,
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })?;
        Ok(Self {
            stop,
            counts,
            failure,
            acceptor: Some(acceptor),
            relays: Vec::new(),
        })
    }

    pub fn failure(&self) -> &'scope Failure {
        self.failure
    }

    /// Stops accepting (QEMU has connected all its channels once its main
    /// stream ended) and tells how many were multifd channels.
    pub fn close(&mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            match acceptor.join() {
                Ok(relays) => self.relays = relays,
                Err(_) => self.failure.set("the multifd acceptor panicked".into()),
            }
        }
        let give_up = Instant::now() + CLASSIFY_TIMEOUT + Duration::from_secs(1);
        while self.counts.classified.load(Ordering::SeqCst)
            < self.counts.accepted.load(Ordering::SeqCst)
            && Instant::now() < give_up
        {
            thread::sleep(Duration::from_millis(2));
        }
        self.counts.multifd.load(Ordering::SeqCst)
    }

    /// Waits for every relay to end; their totals.
    pub fn finish(mut self) -> ChannelTotals {
        self.close();
        let mut totals = ChannelTotals::default();
        for relay in self.relays.drain(..) {
            match relay.join() {
                Ok(Ok(Some((summary, template_pages, wire_bytes)))) => {
                    totals.channels += 1;
                    totals.stream_bytes += summary.stream_bytes;
                    totals.template_pages += template_pages;
                    totals.wire_bytes += wire_bytes;
                    totals.add_summary(&summary);
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) => self.failure.set(format!("{err:#}")),
                Err(_) => self.failure.set("a multifd relay panicked".into()),
            }
        }
        totals
    }
}

/// One connection to the send proxy besides the main stream: relayed if
/// it is a multifd channel (its summary, template pages and WAN bytes),
/// else closed with a reset.
fn send_channel(
    qemu: TcpStream,
    peer: &str,
    link: &SendLink,
    counts: &ChannelCounts,
) -> anyhow::Result<Option<(ChannelSummary, u64, u64)>> {
    let multifd = qemu
        .set_nonblocking(false)
        .and_then(|()| first_bytes_are_multifd(&qemu));
    if matches!(multifd, Ok(true)) {
        counts.multifd.fetch_add(1, Ordering::SeqCst);
    }
    counts.classified.fetch_add(1, Ordering::SeqCst);
    if !multifd? {
        log::warn!("closed a connection from {peer} to the send proxy: not a QEMU multifd channel");
        reset(&qemu);
        return Ok(None);
    }
    qemu.set_read_timeout(Some(link.timeouts.io_timeout()))?;
    let channel = net::connect(link.to, link.security, CONNECT_RETRY).with_context(|| {
        format!(
            "multifd channel: cannot reach the receive proxy at {}",
            link.to
        )
    })?;
    let (mut read_half, mut write_half) = channel.split(Some(link.timeouts.io_timeout()));
    let deadline = Some(Instant::now() + link.timeouts.deadline());
    read_half.set_deadline(deadline);
    write_half.set_deadline(deadline);
    let mut reader = FrameReader::new(BufReader::new(read_half));
    let mut writer: Wan = FrameWriter::new(BufWriter::with_capacity(1 << 20, write_half));
    writer.preamble()?;
    writer.json(
        Kind::Hello,
        &wire::Hello {
            sender: format!("pagefp-{}", std::process::id()),
            zstd: link.zstd.is_some(),
            multifd: Some(link.session.clone()),
            query_hashes: 0,
        },
    )?;
    writer.flush()?;
    reader.preamble()?;
    let answer: wire::OfferEnd = reader.expect(Kind::OfferEnd)?.json()?;
    if answer.templates != link.templates
        || answer.session != link.session
        || answer.digest_seed != link.digest_seed
    {
        bail!(
            "the receive proxy answered a multifd channel with {} templates (session {:?}, seed {:#x}), the main stream with {} ({:?}, {:#x})",
            answer.templates,
            answer.session,
            answer.digest_seed,
            link.templates,
            link.session,
            link.digest_seed
        );
    }
    let mut sink = ChannelSink {
        out: Chunks::new(&mut writer, link.offered, link.zstd, link.digest_seed),
        qemu: &qemu,
    };
    let summary = multifd::parse_channel(&qemu, &mut sink)
        .with_context(|| format!("multifd channel from {peer}"))?;
    sink.out.send().map_err(|e| anyhow::anyhow!(e))?;
    let template_pages = sink.out.template_pages;
    writer.json(
        Kind::End,
        &wire::End {
            stream_bytes: summary.stream_bytes,
            channels: 0,
        },
    )?;
    writer.flush().context("sending to the receive proxy")?;
    let done: wire::Done = reader.expect(Kind::Done)?.json()?;
    if done.stream_bytes != summary.stream_bytes {
        bail!(
            "multifd channel {}: the receive proxy delivered {} bytes of {}",
            summary.id,
            done.stream_bytes,
            summary.stream_bytes
        );
    }
    log::info!(
        "multifd channel {} done: {} packets, {} pages ({} as templates), {} zero",
        summary.id,
        summary.packets,
        summary.pages,
        template_pages,
        summary.zero_pages
    );
    Ok(Some((summary, template_pages, writer.bytes + reader.bytes)))
}

struct ChannelSink<'a> {
    out: Chunks<'a>,
    qemu: &'a TcpStream,
}

impl Sink for ChannelSink<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.out.raw(bytes);
        self.out.send_if_full()
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        self.out.page(page.data);
        self.out.send_if_full()
    }

    fn idle(&mut self) -> Result<(), SinkError> {
        self.out.send_when_idle(self.qemu)
    }
}

/// Waits (bounded) for a connection's first four bytes: a multifd channel's
/// magic?
fn first_bytes_are_multifd(stream: &TcpStream) -> std::io::Result<bool> {
    let give_up = Instant::now() + CLASSIFY_TIMEOUT;
    stream.set_read_timeout(Some(CLASSIFY_TIMEOUT))?;
    let mut first = [0u8; 4];
    loop {
        let n = match stream.peek(&mut first) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                0
            }
            Err(e) => return Err(e),
        };
        if n == 4 {
            return Ok(multifd::is_multifd(first));
        }
        if Instant::now() >= give_up {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Closes with a reset (SO_LINGER 0), so the peer's next write fails.
pub fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket `stream` owns, with a pointer to a
    // live `linger` and its exact size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Both);
}
