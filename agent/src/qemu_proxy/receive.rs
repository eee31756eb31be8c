//! The receive proxy: chunks in, QEMU's exact stream out to the
//! destination QEMU's `-incoming tcp:`.

use std::{
    io::{BufReader, BufWriter, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc::{SyncSender, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    CONNECT_RETRY, ProxyReport,
    channels::{self, Failure, MainConnected, ReceiveChannels, ReceiveLink},
};
use crate::{
    catalog::{
        agreement::{Agreed, Negotiation},
        store::TemplateStore,
    },
    config::SiteStoreConfig,
    net::{ChannelReader, ChannelWriter, SecureListener, Timeouts, tls},
    transport::{
        accept::accept_peer,
        qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind},
        query,
    },
};

pub struct ReceiveOptions {
    pub listen: String,
    /// The destination QEMU's `-incoming tcp:` address.
    pub qemu: String,
    /// Give up if no send proxy connects within this time.
    pub timeout: Option<Duration>,
    pub timeouts: Timeouts,
    /// Who may send the stream.
    pub security: tls::Server,
    /// Offer the catalog, or ask for the VM's contents.
    pub negotiation: Negotiation,
    /// The site store asked for what this host lacks (no nodes: none).
    pub site: SiteStoreConfig,
}

/// Checked chunks queued for the destination QEMU while the WAN is read on,
/// so the link keeps flowing while QEMU loads what came before (at most
/// this many chunks of at most [`wire::MAX_CHUNK_STREAM`] bytes each: the
/// send proxy cuts them at 1 MiB).
const QUEUED_CHUNKS: usize = 4;

const WRITE_FAILED: &str =
    "writing to the destination QEMU (did it fail to load the stream? see its log)";

/// The destination QEMU's main connection, made when the first stream
/// bytes arrive (a refused migration never touches it).
struct Destination<'a> {
    addr: &'a str,
    /// Longest wait for QEMU to take more of the stream.
    io_timeout: Duration,
    feed: Option<Feed>,
    /// Where QEMU's return-path bytes go (the send proxy), and the thread
    /// that carries them, stopped when this is dropped.
    wan: Wan,
    answers: Option<(thread::JoinHandle<()>, Arc<AtomicBool>)>,
    /// Told once the connection exists: multifd channels connect after it.
    connected: &'a MainConnected,
    /// Bytes QEMU took (all of them once [`Destination::finish`] returned).
    written: u64,
}

/// The connection, and the thread writing the queued chunks to it.
struct Feed {
    conn: TcpStream,
    queue: Option<SyncSender<Vec<u8>>>,
    writer: Option<thread::JoinHandle<anyhow::Result<u64>>>,
}

impl Destination<'_> {
    /// Queues a checked chunk for QEMU (the first one is written here).
    fn write(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let Some(queue) = self.feed.as_ref().and_then(|feed| feed.queue.as_ref()) else {
            if self.feed.is_some() {
                bail!("the stream to the destination QEMU was already ended");
            }
            return self.start(&bytes);
        };
        if queue.send(bytes).is_err() {
            // The writer stopped: its error says why.
            self.drain()?;
            bail!("the writer to the destination QEMU stopped");
        }
        Ok(())
    }

    /// Connects, writes the first chunk, and starts the writer thread.
    fn start(&mut self, first: &[u8]) -> anyhow::Result<()> {
        let mut stream = crate::net::connect_tcp(self.addr, CONNECT_RETRY).with_context(|| {
            format!(
                "cannot reach the destination QEMU at {} (started with -incoming tcp:...?)",
                self.addr
            )
        })?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(self.io_timeout))?;
        log::info!("feeding the destination QEMU at {}", self.addr);
        self.answers = Some(relay_answers(stream.try_clone()?, self.wan.clone())?);
        stream.write_all(first).context(WRITE_FAILED)?;
        // Its first bytes are there before any multifd channel connects:
        // QEMU 8.0+ reads a new connection's first bytes before it accepts
        // the next, and QEMU 7.2 takes its first connection as the main one.
        self.connected.set();
        self.written = first.len() as u64;
        let (queue, chunks) = sync_channel::<Vec<u8>>(QUEUED_CHUNKS);
        let mut out = stream.try_clone()?;
        let writer = thread::Builder::new().name("to-qemu".into()).spawn(
            move || -> anyhow::Result<u64> {
                let mut written = 0;
                for chunk in chunks {
                    out.write_all(&chunk).context(WRITE_FAILED)?;
                    written += chunk.len() as u64;
                }
                Ok(written)
            },
        )?;
        self.feed = Some(Feed {
            conn: stream,
            queue: Some(queue),
            writer: Some(writer),
        });
        Ok(())
    }

    /// Waits until every queued chunk was written (or the writer failed).
    fn drain(&mut self) -> anyhow::Result<()> {
        let Some(feed) = &mut self.feed else {
            return Ok(());
        };
        feed.queue = None;
        if let Some(writer) = feed.writer.take() {
            let written = writer
                .join()
                .map_err(|_| anyhow::anyhow!("the writer to the destination QEMU panicked"))??;
            self.written += written;
        }
        Ok(())
    }

    /// End of stream: everything queued written, then QEMU's side closed;
    /// the bytes QEMU took.
    fn finish(&mut self) -> anyhow::Result<u64> {
        let drained = self.drain();
        if let Some(feed) = &self.feed {
            let _ = feed.conn.shutdown(Shutdown::Write);
        }
        drained.map(|()| self.written)
    }

    /// A failed migration: QEMU's side closed at once (what is still
    /// queued is dropped), so QEMU sees a truncated stream.
    fn abandon(&mut self) {
        if let Some(feed) = &self.feed {
            let _ = feed.conn.shutdown(Shutdown::Write);
        }
        let _ = self.drain();
    }

    /// The destination QEMU was connected to (its return path is relayed
    /// from then on), even if writing the first chunk failed.
    fn contacted(&self) -> bool {
        self.answers.is_some()
    }
}

impl Drop for Destination<'_> {
    fn drop(&mut self) {
        if self.feed.as_ref().is_some_and(|feed| feed.writer.is_some()) {
            self.abandon();
        }
        if let Some((thread, stop)) = self.answers.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

type Wan = Arc<Mutex<FrameWriter<BufWriter<ChannelWriter>>>>;

/// Carries what the destination QEMU writes back on its connection (its
/// return path: PONG, SHUT...) to the send proxy, until QEMU closes it or
/// `stop` is set.
fn relay_answers(
    mut from_qemu: TcpStream,
    wan: Wan,
) -> anyhow::Result<(thread::JoinHandle<()>, Arc<AtomicBool>)> {
    // Short reads, so `stop` is seen.
    from_qemu.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = thread::Builder::new()
        .name("return-path".into())
        .spawn(move || {
            let mut buf = vec![0u8; wire::RETURN_PATH_CHUNK];
            while !stopped.load(Ordering::Relaxed) {
                match from_qemu.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let mut wan = wan.lock().unwrap_or_else(|p| p.into_inner());
                        let sent = wan
                            .frame(Kind::ReturnPath, 0, &buf[..n])
                            .and_then(|_| wan.flush());
                        if let Err(e) = sent {
                            log::warn!("cannot relay the destination QEMU's return path: {e}");
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok((thread, stop))
}

/// Waits for one proxied migration and feeds it to the destination QEMU,
/// rebuilding pages from `templates` (and the site store's).
pub fn receive(options: &ReceiveOptions, templates: TemplateStore) -> anyhow::Result<ProxyReport> {
    let listener = SecureListener::bind(&options.listen, options.security.clone())?;
    log::info!(
        "waiting for a proxied QEMU migration on {} ({} templates{})",
        listener.local_addr()?,
        templates.len(),
        if options.site.nodes.is_empty() {
            ""
        } else {
            ", and the site store's"
        }
    );
    let opened = accept_peer(
        &listener,
        options.timeout,
        &options.timeouts,
        "the send proxy (pagefp qemu-proxy send)",
        |reader: &mut FrameReader<_>| {
            let frame = reader.expect(Kind::Hello)?;
            let hello: wire::Hello = frame.json()?;
            if hello.multifd.is_some() {
                return Err(frame.malformed("a multifd channel before its main stream"));
            }
            Ok(hello)
        },
    )
    .context("waiting for the send proxy")?;
    log::info!(
        "send proxy {} connected from {}: {}",
        opened.opening.sender,
        opened.peer,
        opened.protection.describe()
    );
    let started = Instant::now();
    let mut reader = opened.reader;
    let writer: Wan = Arc::new(Mutex::new(FrameWriter::new(BufWriter::new(opened.writer))));
    let connected = MainConnected::default();
    let mut destination = Destination {
        addr: &options.qemu,
        io_timeout: options.timeouts.io_timeout(),
        wan: writer.clone(),
        answers: None,
        feed: None,
        connected: &connected,
        written: 0,
    };
    let session = session()?;
    let digest_seed = u64::from_le_bytes(crate::random::bytes()?);
    let mut agreed = Agreed::new(templates);
    let lock = || writer.lock().unwrap_or_else(|p| p.into_inner());
    let agreement = agree(
        &mut reader,
        &mut lock(),
        &mut agreed,
        options,
        opened.opening.query_hashes,
        &session,
        digest_seed,
    );
    let mut report = match agreement {
        Ok(report) => report,
        Err(err) => {
            // Tell the send proxy why, as for any later failure.
            let _ = lock().abort(&format!("{err:#}"));
            let _ = lock().flush();
            return Err(err.context(
                "agreeing on the templates with the send proxy; the destination QEMU was not \
                 contacted and still waits for a migration",
            ));
        }
    };
    report.negotiation_bytes = reader.bytes + lock().bytes;
    let link = ReceiveLink {
        qemu: &options.qemu,
        timeouts: options.timeouts,
        templates: &agreed,
        session,
        digest_seed,
        main: &connected,
    };
    let stop = AtomicBool::new(false);
    let opened_channels = AtomicU32::new(0);
    let failure = Failure::default();
    let result = thread::scope(|scope| {
        let channels =
            ReceiveChannels::start(scope, listener, &link, &stop, &opened_channels, &failure)?;
        let main = relay(
            &mut reader,
            &writer,
            &mut destination,
            &link,
            report,
            &channels,
        );
        // A main stream that failed takes its channels down with it.
        if main.is_err() {
            destination.abandon();
        }
        channels::merge(main, &channels.finish(), &failure)
    });
    match result {
        Ok(mut report) => {
            report.wire_bytes += reader.bytes + lock().bytes;
            report.tls = opened.protection.is_tls();
            report.channel = opened.protection.describe();
            report.seconds = started.elapsed().as_secs_f64();
            Ok(report)
        }
        Err(err) => {
            let _ = lock().abort(&format!("{err:#}"));
            let _ = lock().flush();
            if !destination.contacted() {
                Err(err.context(
                    "the destination QEMU was not contacted and still waits for a migration",
                ))
            } else {
                Err(err.context(
                    "the destination QEMU got an incomplete stream and will fail the migration",
                ))
            }
        }
    }
}

/// The protocol's opening after the Hello: the catalog offered, or the
/// VM's `listed` contents asked for and answered (from this host's
/// templates and the site store), then OfferEnd; the report so far.
fn agree(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    writer: &mut FrameWriter<BufWriter<ChannelWriter>>,
    agreed: &mut Agreed,
    options: &ReceiveOptions,
    listed: u64,
    session: &str,
    digest_seed: u64,
) -> anyhow::Result<ProxyReport> {
    writer.preamble()?;
    let site = !options.site.nodes.is_empty();
    let mut report = ProxyReport {
        channels: 1,
        ..ProxyReport::default()
    };
    if options.negotiation.asks(listed, agreed.store().len(), site) {
        let mut answers = agreed.query(&options.site);
        query::answer(reader, writer, listed, |hashes| answers.holds(hashes))?;
        report.site = answers.finish();
        report.negotiation = Some(format!(
            "query: {} of the VM's {listed} contents held",
            agreed.len()
        ));
    } else {
        let offer = agreed.offer(wire::MAX_OFFER);
        for batch in offer.chunks(wire::OFFER_PER_FRAME) {
            writer.frame(Kind::Offer, 0, &wire::encode_offer(batch))?;
        }
        report.negotiation = Some(format!("offer: {} templates", offer.len()));
    }
    writer.json(
        Kind::OfferEnd,
        &wire::OfferEnd {
            templates: agreed.len() as u64,
            session: session.to_owned(),
            digest_seed,
        },
    )?;
    writer.flush()?;
    report.templates_offered = agreed.len() as u64;
    log::info!("{}", report.negotiation.as_deref().unwrap_or_default());
    Ok(report)
}

/// A fresh session name for this migration's multifd channels.
fn session() -> anyhow::Result<String> {
    let bytes: [u8; 16] = crate::random::bytes()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The main stream's chunks, rebuilt and fed to the destination QEMU,
/// until End; `report` is the negotiation's.
fn relay(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    wan: &Wan,
    destination: &mut Destination,
    link: &ReceiveLink,
    mut report: ProxyReport,
    channels: &ReceiveChannels,
) -> anyhow::Result<ProxyReport> {
    loop {
        let frame = reader.frame()?;
        channels.failure().check().map_err(|e| anyhow::anyhow!(e))?;
        match frame.kind {
            Kind::Chunk => {
                let mut templates_used = 0;
                let bytes =
                    wire::decode_chunk(&frame, link.digest_seed, report.stream_bytes, |index| {
                        templates_used += 1;
                        link.templates.page(index)
                    })?;
                report.template_pages += templates_used;
                report.stream_bytes += bytes.len() as u64;
                destination.write(bytes)?;
            }
            Kind::End => {
                let end: wire::End = frame.json()?;
                if end.stream_bytes != report.stream_bytes {
                    bail!(
                        "the send proxy ended the stream at {} bytes, {} arrived",
                        end.stream_bytes,
                        report.stream_bytes
                    );
                }
                channels.wait_opened(end.channels, link.timeouts.io_timeout())?;
                let written = destination.finish()?;
                let mut writer = wan.lock().unwrap_or_else(|p| p.into_inner());
                writer.json(
                    Kind::Done,
                    &wire::Done {
                        stream_bytes: written,
                    },
                )?;
                writer.flush()?;
                return Ok(report);
            }
            other => bail!(frame.malformed(format!("expected a chunk or the end, got {other:?}"))),
        }
    }
}
