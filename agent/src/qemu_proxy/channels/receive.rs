//! The receive side: the migration's further WAN connections, each
//! authenticated, checked for the main connection's session, rebuilt and
//! fed to the destination QEMU after the main stream's connection.

use std::{
    io::{BufReader, BufWriter, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Condvar, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{ChannelTotals, Failure};
use crate::{
    catalog::agreement::Agreed,
    net::{self, ChannelReader, SecureListener, Timeouts},
    qemu_proxy::CONNECT_RETRY,
    transport::{
        accept::{Opened, accept_peer},
        qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind, QemuProxy},
    },
};

/// Set once the main stream's connection to the destination QEMU exists.
#[derive(Default)]
pub struct MainConnected {
    connected: Mutex<bool>,
    changed: Condvar,
}

impl MainConnected {
    pub fn set(&self) {
        *self.connected.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        // A bool cannot be left half-written: a poisoned lock still holds
        // the truth.
        let guard = self.connected.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |connected| !*connected)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// What a channel's relay on the receive side needs.
pub struct ReceiveLink<'a> {
    pub qemu: &'a str,
    pub timeouts: Timeouts,
    /// The templates agreed on the main connection, its session and the
    /// seed of its chunk digests.
    pub templates: &'a Agreed,
    pub session: String,
    pub digest_seed: u64,
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
            templates: link.templates.len() as u64,
            session: link.session.clone(),
            digest_seed: link.digest_seed,
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
                let bytes = wire::decode_chunk(&frame, link.digest_seed, stream_bytes, |index| {
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
