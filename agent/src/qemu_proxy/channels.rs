//! QEMU's multifd channels through the proxies (the `multifd` capability:
//! `multifd-channels` connections besides the main stream, carrying the
//! RAM pages). Each channel gets a WAN connection of its own, so channels
//! flow and stall independently, as they do between two QEMUs:
//!
//! - the send proxy takes every further connection to its address, tells a
//!   multifd channel by its first four bytes, parses it
//!   ([`crate::qemu_stream::multifd`]) and sends it deduplicated against
//!   the main connection's offer;
//! - the receive proxy accepts those connections (authenticated like the
//!   main one, and presenting the main connection's session), rebuilds
//!   each channel and connects it to the destination QEMU once the main
//!   stream's connection is there (QEMU 7.2 takes its first connection as
//!   the main stream).
//!
//! Every chunk is checked against its digest before QEMU gets it, on every
//! channel, so the destination never loads a page the source did not send.
//! A channel that fails fails the migration.

use std::{
    io::{BufReader, BufWriter, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Condvar, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    chunks::{Chunks, Wan},
    templates::{TemplateLookup, TemplatePages},
};
use crate::{
    net::{self, ChannelReader, SecureListener, Timeouts, tls},
    qemu_stream::{
        Page, Sink, SinkError,
        multifd::{self, ChannelSummary},
    },
    transport::{
        accept::{Opened, accept_peer},
        qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind, QemuProxy},
    },
};

/// What the multifd channels of one migration carried, summed.
#[derive(Clone, Debug, Default)]
pub struct ChannelTotals {
    pub channels: u32,
    pub stream_bytes: u64,
    pub wire_bytes: u64,
    pub pages: u64,
    pub template_pages: u64,
    pub zero_pages: u64,
    pub compressed_pages: u64,
    pub compression: Option<multifd::Compression>,
    pub pass_through: Option<String>,
}

impl ChannelTotals {
    fn add_summary(&mut self, summary: &ChannelSummary) {
        self.pages += summary.pages;
        self.zero_pages += summary.zero_pages;
        self.compressed_pages += summary.compressed_pages;
        self.compression = self.compression.or(summary.compression);
        if let Some(pass) = &summary.pass_through {
            self.pass_through.get_or_insert_with(|| {
                format!(
                    "multifd channel {} from byte {}: {}",
                    summary.id, pass.offset, pass.reason
                )
            });
        }
    }
}

/// The first failure of any channel, for the main stream to stop on.
#[derive(Default)]
pub struct Failure(Mutex<Option<String>>);

impl Failure {
    fn set(&self, why: String) {
        self.0.lock().unwrap().get_or_insert(why);
    }

    pub fn check(&self) -> Result<(), SinkError> {
        match &*self.0.lock().unwrap() {
            None => Ok(()),
            Some(why) => Err(why.clone().into()),
        }
    }
}

// The send side.

/// How the send proxy reaches the receive proxy for a channel.
pub struct SendLink<'a> {
    pub to: &'a str,
    pub security: &'a tls::Client,
    pub timeouts: Timeouts,
    pub zstd: bool,
    pub offered: &'a (dyn TemplateLookup + Sync),
    /// The offer's length and session, as the main connection got them.
    pub templates: u64,
    pub session: String,
}

/// How long a new connection to the send proxy has to show its first
/// four bytes (QEMU writes a channel's hello as soon as it connected).
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_RETRY: Duration = Duration::from_secs(10);

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
            zstd: link.zstd,
            multifd: Some(link.session.clone()),
        },
    )?;
    writer.flush()?;
    reader.preamble()?;
    let answer: wire::OfferEnd = reader.expect(Kind::OfferEnd)?.json()?;
    if answer.templates != link.templates || answer.session != link.session {
        bail!(
            "the receive proxy answered a multifd channel with {} templates (session {:?}), the main stream with {} ({:?})",
            answer.templates,
            answer.session,
            link.templates,
            link.session
        );
    }
    let mut sink = ChannelSink {
        out: Chunks::new(&mut writer, link.offered, link.zstd),
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

// The receive side.

/// Set once the main stream's connection to the destination QEMU exists.
#[derive(Default)]
pub struct MainConnected {
    connected: Mutex<bool>,
    changed: Condvar,
}

impl MainConnected {
    pub fn set(&self) {
        *self.connected.lock().unwrap() = true;
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.connected.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |connected| !*connected)
            .unwrap();
        *guard
    }
}

/// What a channel's relay on the receive side needs.
pub struct ReceiveLink<'a> {
    pub qemu: &'a str,
    pub timeouts: Timeouts,
    pub templates: &'a (dyn TemplatePages + Sync),
    /// The offer's length and the session, as the main connection got them.
    pub offered: u64,
    pub session: String,
    pub main: &'a MainConnected,
}

/// Most multifd channels of one migration (`multifd-channels` is a u8).
const MAX_CHANNELS: u32 = 255;

/// The receive proxy's multifd channels: accepted on its listener by a
/// thread of `scope` (authenticated, presenting the session), each
/// relayed by a thread of its own.
pub struct ReceiveChannels<'scope> {
    stop: &'scope AtomicBool,
    opened: &'scope AtomicU32,
    failure: &'scope Failure,
    acceptor: thread::ScopedJoinHandle<'scope, Vec<ReceiveRelay<'scope>>>,
}

type ReceiveRelay<'scope> = thread::ScopedJoinHandle<'scope, anyhow::Result<(u64, u64, u64)>>;

impl<'scope> ReceiveChannels<'scope> {
    pub fn start(
        scope: &'scope thread::Scope<'scope, '_>,
        listener: SecureListener,
        link: &'scope ReceiveLink<'scope>,
        stop: &'scope AtomicBool,
        opened: &'scope AtomicU32,
        failure: &'scope Failure,
    ) -> std::io::Result<Self> {
        let acceptor = thread::Builder::new()
            .name("multifd-accept".into())
            .spawn_scoped(scope, move || {
                let mut relays = Vec::new();
                while !stop.load(Ordering::SeqCst) && relays.len() < MAX_CHANNELS as usize {
                    let Ok(channel) = accept_peer(
                        &listener,
                        Some(Duration::from_millis(200)),
                        &link.timeouts,
                        "a multifd channel",
                        |reader: &mut FrameReader<_>| open_channel(reader, &link.session),
                    ) else {
                        continue;
                    };
                    opened.fetch_add(1, Ordering::SeqCst);
                    let spawned = thread::Builder::new()
                        .name("multifd-receive".into())
                        .spawn_scoped(scope, move || receive_channel(channel, link));
                    match spawned {
                        Ok(relay) => relays.push(relay),
                        Err(e) => failure.set(format!("cannot start a multifd relay: {e}")),
                    }
                }
                relays
            })?;
        Ok(Self {
            stop,
            opened,
            failure,
            acceptor,
        })
    }

    pub fn failure(&self) -> &'scope Failure {
        self.failure
    }

    /// Waits (at most `timeout`) until the `expected` channels the send
    /// proxy opened have connected.
    pub fn wait_opened(&self, expected: u32, timeout: Duration) -> anyhow::Result<()> {
        let give_up = Instant::now() + timeout;
        while self.opened.load(Ordering::SeqCst) < expected {
            if Instant::now() >= give_up {
                bail!(
                    "the send proxy opened {expected} multifd channels, {} connected here",
                    self.opened.load(Ordering::SeqCst)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops accepting and waits for every relay to end; their totals.
    pub fn finish(self) -> ChannelTotals {
        self.stop.store(true, Ordering::SeqCst);
        let relays = match self.acceptor.join() {
            Ok(relays) => relays,
            Err(_) => {
                self.failure.set("the multifd acceptor panicked".into());
                Vec::new()
            }
        };
        let mut totals = ChannelTotals::default();
        for relay in relays {
            match relay.join() {
                Ok(Ok((stream_bytes, template_pages, wire_bytes))) => {
                    totals.channels += 1;
                    totals.stream_bytes += stream_bytes;
                    totals.template_pages += template_pages;
                    totals.wire_bytes += wire_bytes;
                }
                Ok(Err(err)) => self.failure.set(format!("{err:#}")),
                Err(_) => self.failure.set("a multifd relay panicked".into()),
            }
        }
        totals
    }
}

/// A multifd channel's Hello: it must name this migration's session.
fn open_channel(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    session: &str,
) -> Result<wire::Hello, crate::transport::WireError> {
    let frame = reader.expect(Kind::Hello)?;
    let hello: wire::Hello = frame.json()?;
    match hello.multifd.as_deref() {
        Some(named) if named == session => Ok(hello),
        Some(_) => Err(frame.malformed("a multifd channel of another migration")),
        None => Err(frame.malformed("a second main stream while a migration runs")),
    }
}

/// Rebuilds one channel for the destination QEMU: its stream bytes,
/// template pages and WAN bytes.
fn receive_channel(
    opened: Opened<QemuProxy, wire::Hello>,
    link: &ReceiveLink,
) -> anyhow::Result<(u64, u64, u64)> {
    let peer = opened.peer.clone();
    let mut reader = opened.reader;
    let mut writer: FrameWriter<_> = FrameWriter::new(BufWriter::new(opened.writer));
    let result = relay_channel(&mut reader, &mut writer, link);
    if let Err(err) = &result {
        let _ = writer.abort(&format!("{err:#}"));
        let _ = writer.flush();
    }
    result
        .map(|(stream, templates)| (stream, templates, reader.bytes + writer.bytes))
        .with_context(|| format!("multifd channel from {peer}"))
}

fn relay_channel(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    writer: &mut FrameWriter<BufWriter<crate::net::ChannelWriter>>,
    link: &ReceiveLink,
) -> anyhow::Result<(u64, u64)> {
    writer.preamble()?;
    writer.json(
        Kind::OfferEnd,
        &wire::OfferEnd {
            templates: link.offered,
            session: link.session.clone(),
        },
    )?;
    writer.flush()?;
    let mut qemu: Option<TcpStream> = None;
    let mut stream_bytes = 0u64;
    let mut template_pages = 0u64;
    loop {
        let frame = reader.frame()?;
        match frame.kind {
            Kind::Chunk => {
                let bytes = wire::decode_chunk(&frame, stream_bytes, |index| {
                    template_pages += 1;
                    link.templates.page(index)
                })?;
                stream_bytes += bytes.len() as u64;
                if qemu.is_none() {
                    qemu = Some(connect_qemu(link)?);
                }
                qemu.as_mut().unwrap().write_all(&bytes).context(
                    "writing a multifd channel to the destination QEMU (did it fail the migration? see its log)",
                )?;
            }
            Kind::End => {
                let end: wire::End = frame.json()?;
                if end.stream_bytes != stream_bytes {
                    bail!(
                        "the send proxy ended a multifd channel at {} bytes, {stream_bytes} arrived",
                        end.stream_bytes
                    );
                }
                if let Some(qemu) = &qemu {
                    let _ = qemu.shutdown(Shutdown::Write);
                }
                writer.json(Kind::Done, &wire::Done { stream_bytes })?;
                writer.flush()?;
                return Ok((stream_bytes, template_pages));
            }
            other => bail!(frame.malformed(format!("expected a chunk or the end, got {other:?}"))),
        }
    }
}

/// A channel's connection to the destination QEMU, made after the main
/// stream's.
fn connect_qemu(link: &ReceiveLink) -> anyhow::Result<TcpStream> {
    if !link.main.wait(link.timeouts.io_timeout()) {
        bail!("a multifd channel came, but no main stream reached the destination QEMU");
    }
    let stream = net::connect_tcp(link.qemu, CONNECT_RETRY)
        .with_context(|| format!("cannot reach the destination QEMU at {}", link.qemu))?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(link.timeouts.io_timeout()))?;
    Ok(stream)
}
