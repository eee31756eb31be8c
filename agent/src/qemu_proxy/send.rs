//! The send proxy: QEMU's stream in, deduplicated chunks out.

use std::{
    io::{BufReader, BufWriter, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{
    ProxyReport,
    templates::{Offered, TemplateLookup},
};
use crate::{
    net::{self, ChannelReader, ChannelWriter, Timeouts, tls},
    qemu_stream::{self, ADVICE_MULTIFD, Options, Page, Preamble, Sink, SinkError},
    transport::{
        WireError,
        qemu_proxy::{self as wire, ChunkBuilder, FrameReader, FrameWriter, Kind},
    },
};

/// Ops bytes per chunk before it is sent.
const CHUNK_OPS: usize = 1 << 20;
/// QEMU stream bytes per chunk before it is sent (template pages count 4 KiB).
const CHUNK_STREAM: usize = 8 << 20;

pub struct SendOptions {
    pub listen: String,
    pub to: String,
    pub zstd: bool,
    pub parser: Options,
    /// Give up if QEMU does not connect within this time.
    pub timeout: Option<Duration>,
    pub timeouts: Timeouts,
    /// How the link to the receive proxy is secured.
    pub security: tls::Client,
}

/// How long the receive proxy may take to start listening.
const CONNECT_RETRY: Duration = Duration::from_secs(10);

type Wan = FrameWriter<BufWriter<ChannelWriter>>;

struct SendSink<'a> {
    wan: &'a mut Wan,
    lookup: &'a dyn TemplateLookup,
    zstd: bool,
    chunk: ChunkBuilder,
    /// The preamble was accepted: chunks may go out.
    started: bool,
    digest: blake3::Hasher,
    template_pages: u64,
    /// QEMU stream bytes so far, and at the last checkpoint.
    stream_bytes: u64,
    checkpointed: u64,
    /// The source opened the return path, and its RAM section ended: the
    /// receive proxy may deliver what it held back once a checkpoint says
    /// the stream so far is right (the source ends its stream only after
    /// the destination, having loaded it, says so on the return path).
    return_path: bool,
    ram_ended: bool,
    /// The QEMU connection, polled to flush before waiting on it.
    qemu: &'a TcpStream,
    extra: &'a ExtraConnections,
}

impl SendSink<'_> {
    fn send_chunk(&mut self) -> Result<(), SinkError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let payload = self.chunk.finish(self.zstd)?;
        self.wan
            .frame(Kind::Chunk, 0, &payload)
            .context("sending to the receive proxy")?;
        Ok(())
    }

    fn maybe_send(&mut self) -> Result<(), SinkError> {
        if self.started
            && (self.chunk.ops_len() >= CHUNK_OPS || self.chunk.stream_bytes >= CHUNK_STREAM)
        {
            self.send_chunk()?;
        }
        Ok(())
    }
}

impl Sink for SendSink<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.digest.update(bytes);
        self.stream_bytes += bytes.len() as u64;
        self.chunk.raw(bytes);
        self.maybe_send()
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        self.digest.update(page.data);
        self.stream_bytes += page.data.len() as u64;
        let template = if self.lookup.is_empty() {
            None
        } else {
            self.lookup.template(blake3::hash(page.data).as_bytes())
        };
        match template {
            Some(index) => {
                self.chunk.template(index);
                self.template_pages += 1;
            }
            None => self.chunk.raw(page.data),
        }
        self.maybe_send()
    }

    fn preamble(&mut self, preamble: &Preamble) -> Result<(), SinkError> {
        self.extra.check()?;
        log::info!(
            "QEMU stream accepted: machine {}, RAM blocks {:?}{}",
            preamble.machine.as_deref().unwrap_or("?"),
            preamble
                .blocks
                .iter()
                .map(|b| format!("{} ({} KiB)", b.name, b.length >> 10))
                .collect::<Vec<_>>(),
            preamble
                .pass_through
                .as_ref()
                .map(|p| format!("; passed through without deduplication: {}", p.reason))
                .unwrap_or_default()
        );
        self.started = true;
        self.return_path = preamble.return_path;
        if self.return_path {
            log::info!("QEMU opened its return path: the destination's answers are relayed");
        }
        self.send_chunk()?;
        self.wan.flush()?;
        Ok(())
    }

    fn ram_end(&mut self) -> Result<(), SinkError> {
        self.ram_ended = true;
        Ok(())
    }

    fn idle(&mut self) -> Result<(), SinkError> {
        self.extra.check()?;
        if self.started && !self.chunk.is_empty() && !readable(self.qemu)? {
            self.send_chunk()?;
            self.wan.flush().context("sending to the receive proxy")?;
        }
        if self.return_path
            && self.ram_ended
            && self.stream_bytes > self.checkpointed
            && !readable(self.qemu)?
        {
            self.send_chunk()?;
            self.wan
                .json(
                    Kind::Checkpoint,
                    &wire::End {
                        stream_bytes: self.stream_bytes,
                        blake3: self.digest.clone().finalize().to_hex().to_string(),
                    },
                )
                .context("sending to the receive proxy")?;
            self.wan.flush().context("sending to the receive proxy")?;
            self.checkpointed = self.stream_bytes;
        }
        Ok(())
    }
}

/// Connections to the send proxy's address besides QEMU's main one:
/// QEMU's multifd channels (7.2 sends no trace of multifd in the main
/// stream, and its pages go over those channels). A thread accepts and
/// resets them at once, so QEMU's writes on them fail; the proxy refuses the
/// migration as soon as it learns of one, and at the latest before the
/// stream's end would reach the destination.
struct ExtraConnections {
    listener: Arc<TcpListener>,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ExtraConnections {
    fn watch(listener: TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, seen, stop) = (listener.clone(), seen.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !accept_extra(&listener, &seen) {
                        thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        };
        Ok(Self {
            listener,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn check(&self) -> Result<(), SinkError> {
        // Also whatever waits in the backlog right now.
        while accept_extra(&self.listener, &self.seen) {}
        match self.seen.lock().unwrap().first() {
            None => Ok(()),
            Some(what) => Err(format!(
                "refusing this migration: {what} connected to the send proxy besides QEMU's migration stream. {ADVICE_MULTIFD}"
            )
            .into()),
        }
    }
}

impl Drop for ExtraConnections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes one pending extra connection, if any: records it at once, names
/// it by its first bytes, and resets it. Whether there was one.
fn accept_extra(listener: &TcpListener, seen: &Mutex<Vec<String>>) -> bool {
    let Ok((mut stream, peer)) = listener.accept() else {
        return false;
    };
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(format!(
            "a second connection from {peer} (a multifd channel?)"
        ));
        seen.len() - 1
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut magic = [0u8; 4];
    if stream.read_exact(&mut magic).is_ok()
        && u32::from_be_bytes(magic) == qemu_stream::format::MULTIFD_MAGIC
    {
        seen.lock().unwrap()[index] = format!("a multifd channel from {peer}");
    }
    log::warn!(
        "{} connected to the send proxy",
        seen.lock().unwrap()[index]
    );
    // SO_LINGER 0: close with a reset, so QEMU's next write fails.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this function owns, with a pointer to
    // a live `linger` and its exact size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    true
}

/// The receive proxy's side after its offer, read by a thread of its own:
/// return-path bytes go to the source QEMU as they come; Done (or why the
/// link failed) is kept for [`ReturnPath::done`].
struct ReturnPath {
    outcome: std::sync::mpsc::Receiver<Result<Answered, WireError>>,
}

/// How the receive proxy's side ended.
struct Answered {
    done: wire::Done,
    /// Bytes read from the receive proxy, and of them the destination
    /// QEMU's return path.
    read_bytes: u64,
    return_path_bytes: u64,
}

impl ReturnPath {
    fn relay(
        mut reader: FrameReader<BufReader<ChannelReader>>,
        qemu: &TcpStream,
        io_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut to_qemu = qemu.try_clone()?;
        to_qemu.set_write_timeout(Some(io_timeout))?;
        // The receive proxy may have nothing to say for long (no return
        // path): only the migration's deadline bounds this wait.
        reader.get_mut().get_mut().set_idle_timeout(None);
        let (tx, outcome) = std::sync::mpsc::channel();
        thread::Builder::new()
            .name("return-path".into())
            .spawn(move || {
                let mut return_path_bytes = 0;
                let result = loop {
                    match reader.frame() {
                        Ok(frame) if frame.kind == Kind::ReturnPath => {
                            return_path_bytes += frame.payload.len() as u64;
                            if let Err(e) = to_qemu.write_all(&frame.payload) {
                                log::warn!(
                                    "the source QEMU did not take its return-path bytes: {e}"
                                );
                            }
                        }
                        Ok(frame) if frame.kind == Kind::Done => {
                            break frame.json::<wire::Done>().map(|done| Answered {
                                done,
                                read_bytes: reader.bytes,
                                return_path_bytes,
                            });
                        }
                        Ok(frame) => {
                            break Err(frame.malformed(format!(
                                "expected return-path bytes or Done, got {:?}",
                                frame.kind
                            )));
                        }
                        Err(err) => break Err(err),
                    }
                };
                let _ = tx.send(result);
            })?;
        Ok(Self { outcome })
    }

    /// Done (with the bytes read from the receive proxy), waiting at most
    /// `timeout`.
    fn done(&self, timeout: Duration) -> Result<Answered, WireError> {
        match self.outcome.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => Err(WireError::Stalled {
                protocol: <wire::QemuProxy as crate::transport::Protocol>::NAME,
                stalled: "sent nothing",
                offset: 0,
            }),
        }
    }
}

/// Whether `stream` has data (or EOF) to read right now.
fn readable(stream: &TcpStream) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).map_err(std::io::Error::from)?;
    Ok(n > 0)
}

/// Runs one proxied migration from the source QEMU to the receive proxy.
pub fn send(options: &SendOptions) -> anyhow::Result<ProxyReport> {
    let listener = TcpListener::bind(&options.listen)
        .with_context(|| format!("cannot listen on {} for the source QEMU", options.listen))?;
    log::info!(
        "waiting for QEMU's migration on {0} (QMP: migrate tcp:{0})",
        options.listen
    );
    let qemu = crate::net::accept_within(&listener, options.timeout)
        .context("waiting for the source QEMU")?;
    // A source QEMU that stops sending fails the migration too.
    qemu.set_read_timeout(Some(options.timeouts.io_timeout()))?;
    let extra = ExtraConnections::watch(listener)?;
    let started = Instant::now();
    let wan = net::connect(&options.to, &options.security, CONNECT_RETRY)
        .with_context(|| format!("cannot reach the receive proxy at {}", options.to))?;
    let protection = wan.protection.clone();
    log::info!(
        "connected to the receive proxy at {}: {}",
        options.to,
        protection.describe()
    );
    let (mut read_half, mut write_half) = wan.split(Some(options.timeouts.io_timeout()));
    let deadline = Some(started + options.timeouts.deadline());
    read_half.set_deadline(deadline);
    write_half.set_deadline(deadline);
    let mut reader = FrameReader::new(BufReader::new(read_half));
    let mut writer = FrameWriter::new(BufWriter::with_capacity(1 << 20, write_half));
    let handshake = (|| -> anyhow::Result<Offered> {
        writer.preamble()?;
        writer.json(
            Kind::Hello,
            &wire::Hello {
                sender: format!("pagefp-{}", std::process::id()),
                zstd: options.zstd,
            },
        )?;
        writer.flush()?;
        reader.preamble()?;
        let mut hashes = Vec::new();
        loop {
            let frame = reader.frame()?;
            match frame.kind {
                Kind::Offer => {
                    let ids = wire::decode_offer(&frame)?;
                    if hashes.len() + ids.len() > wire::MAX_OFFER {
                        return Err(frame
                            .malformed(format!(
                                "the offer holds more than {} templates",
                                wire::MAX_OFFER
                            ))
                            .into());
                    }
                    hashes.extend(ids);
                }
                Kind::OfferEnd => {
                    let end: wire::OfferEnd = frame.json()?;
                    if end.templates != hashes.len() as u64 {
                        return Err(frame
                            .malformed(format!(
                                "{} templates announced, {} offered",
                                end.templates,
                                hashes.len()
                            ))
                            .into());
                    }
                    return Ok(Offered::new(&hashes));
                }
                other => {
                    return Err(frame
                        .malformed(format!("expected the template offer, got {other:?}"))
                        .into());
                }
            }
        }
    })();
    let offered = handshake.context("talking to the receive proxy")?;
    log::info!("the receive proxy offers {} templates", offered.len());
    // From here on the receive proxy sends only the destination QEMU's
    // return-path bytes (whenever it writes some), then Done.
    let answers = ReturnPath::relay(reader, &qemu, options.timeouts.io_timeout())?;
    let mut sink = SendSink {
        wan: &mut writer,
        lookup: &offered,
        zstd: options.zstd,
        chunk: ChunkBuilder::default(),
        started: false,
        digest: blake3::Hasher::new(),
        template_pages: 0,
        stream_bytes: 0,
        checkpointed: 0,
        return_path: false,
        ram_ended: false,
        qemu: &qemu,
        extra: &extra,
    };
    // The parser buffers its input itself.
    let parsed = qemu_stream::parse(&qemu, &mut sink, &options.parser);
    let summary = match parsed {
        Ok(summary) => summary,
        Err(err) => {
            drop(sink);
            let err = match err {
                qemu_stream::StreamError::Truncated { .. } => anyhow::Error::new(err)
                    .context("QEMU ended its stream early; `query-migrate` on the source says why"),
                qemu_stream::StreamError::Io { ref source, .. }
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    anyhow::Error::new(err).context(format!(
                        "the source QEMU sent nothing for {} s (--io-timeout-s): is it paused \
                         waiting for `migrate-continue` (pause-before-switchover), or hung?",
                        options.timeouts.io_timeout_s
                    ))
                }
                err => err.into(),
            };
            let reason = format!("{err:#}");
            // Best effort: tell the receiver why, so it leaves the
            // destination QEMU alone (or closes it) with the same message.
            let _ = writer.abort(&reason);
            let _ = writer.flush();
            if let Some(qemu_stream::StreamError::Sink(_)) = err.downcast_ref() {
                // A WAN failure: the receiver may have said why.
                if let Err(WireError::PeerAborted { reason: why, .. }) =
                    answers.done(Duration::from_secs(2))
                {
                    bail!("the receive proxy aborted: {why}");
                }
            }
            return Err(err);
        }
    };
    sink.send_chunk().map_err(|e| anyhow::anyhow!(e))?;
    // The last check, before the receiver may let QEMU see the stream's
    // end: multifd channels connect during setup, long before this.
    if let Err(err) = extra.check() {
        let reason = err.to_string();
        let _ = writer.abort(&reason);
        let _ = writer.flush();
        bail!(reason);
    }
    let digest = sink.digest.finalize();
    let template_pages = sink.template_pages;
    writer.json(
        Kind::End,
        &wire::End {
            stream_bytes: summary.stream_bytes,
            blake3: digest.to_hex().to_string(),
        },
    )?;
    writer.flush().context("sending to the receive proxy")?;
    let Answered {
        done,
        read_bytes,
        return_path_bytes,
    } = answers
        .done(options.timeouts.io_timeout())
        .context("waiting for the receive proxy to deliver the stream")?;
    if done.stream_bytes != summary.stream_bytes {
        bail!(
            "the receive proxy delivered {} bytes of {}",
            done.stream_bytes,
            summary.stream_bytes
        );
    }
    Ok(ProxyReport {
        stream_bytes: summary.stream_bytes,
        wire_bytes: writer.bytes + read_bytes,
        pages: summary.pages,
        template_pages,
        zero_pages: summary.zero_pages,
        xbzrle_pages: summary.xbzrle_pages,
        compressed_pages: summary.compressed_pages,
        templates_offered: offered.len() as u64,
        ram_complete: summary.ram_complete,
        pass_through: summary
            .pass_through
            .map(|p| format!("from byte {}: {}", p.offset, p.reason)),
        seconds: started.elapsed().as_secs_f64(),
        tls: protection.is_tls(),
        channel: protection.describe(),
        return_path_bytes,
    })
}
