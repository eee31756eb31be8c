//! The send proxy: QEMU's stream in, deduplicated chunks out.

use std::{
    io::{BufReader, BufWriter},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    CONNECT_RETRY, ProxyReport,
    channels::{self, ChannelCounts, Failure, SendChannels, SendLink},
    chunks::{Chunks, Wan},
    templates::Offered,
};
use crate::{
    api::{client, wire::parse_hash_list},
    catalog::agreement::listed_contents,
    compression::{Gauge, ZstdPolicy},
    content::TemplateId,
    net::{self, ChannelReader, Timeouts, tls},
    qemu_stream::{self, Options, Page, Preamble, Sink, SinkError},
    transport::{
        WireError,
        qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind},
        query,
    },
};

pub struct SendOptions {
    pub listen: String,
    pub to: String,
    /// When chunks are compressed (None: never), and the strongest zstd
    /// level `auto` uses (the one `always` uses).
    pub zstd: Option<ZstdPolicy>,
    pub zstd_level: i32,
    pub parser: Options,
    /// Give up if QEMU does not connect within this time.
    pub timeout: Option<Duration>,
    pub timeouts: Timeouts,
    /// How the link to the receive proxy is secured.
    pub security: tls::Client,
    /// What the send proxy can tell a receive proxy that asks for the VM's
    /// contents.
    pub listing: Listing,
}

/// Where the send proxy learns the VM's distinct contents, for a receive
/// proxy that asks which of them it holds instead of offering its catalog.
#[derive(Clone, Debug)]
pub enum Listing {
    /// Nothing: the receive proxy offers its catalog.
    Nothing,
    /// The local agent's hash list of the source QEMU: `vm_pid`, or the
    /// process whose connection the proxy accepted.
    Agent {
        socket: PathBuf,
        vm_pid: Option<u32>,
    },
    /// These contents.
    Given(Vec<TemplateId>),
}

impl Listing {
    /// The contents to list for the QEMU connected on `qemu`; nothing (and
    /// the reason logged) when the agent cannot say.
    fn contents(&self, qemu: &TcpStream) -> Vec<TemplateId> {
        match self {
            Listing::Nothing => Vec::new(),
            Listing::Given(contents) => {
                let mut seen = std::collections::HashSet::new();
                contents
                    .iter()
                    .filter(|c| seen.insert(**c))
                    .copied()
                    .collect()
            }
            Listing::Agent { socket, vm_pid } => {
                let pid = vm_pid.or_else(|| {
                    crate::procfs::tcp_peer_process(qemu.local_addr().ok()?, qemu.peer_addr().ok()?)
                });
                let Some(pid) = pid else {
                    log::info!(
                        "the source QEMU's process is not on this host (or not found): \
                         the receive proxy offers its catalog (--vm-pid names it)"
                    );
                    return Vec::new();
                };
                let listed = client::get_blocking(socket, &format!("/v1/vms/{pid}/hashes"))
                    .map_err(anyhow::Error::from)
                    .and_then(|bytes| {
                        let list = parse_hash_list(&bytes).map_err(anyhow::Error::msg)?;
                        Ok(listed_contents(
                            list.records.iter().map(|r| (r.state, &r.hash)),
                        ))
                    });
                match listed {
                    Ok(contents) => {
                        log::info!(
                            "the agent lists {} distinct contents of QEMU pid {pid}",
                            contents.len()
                        );
                        contents
                    }
                    Err(err) => {
                        log::info!(
                            "no hash list of QEMU pid {pid} from the agent at {} ({err:#}): \
                             the receive proxy offers its catalog",
                            socket.display()
                        );
                        Vec::new()
                    }
                }
            }
        }
    }
}

/// The main stream's sink: chunks go out once the preamble was accepted.
struct SendSink<'a> {
    out: Chunks<'a>,
    /// The preamble was accepted: chunks may go out.
    started: bool,
    /// The QEMU connection, polled to flush before waiting on it.
    qemu: &'a TcpStream,
    /// A multifd channel's failure stops the main stream too.
    channels: &'a Failure,
}

impl Sink for SendSink<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.out.raw(bytes);
        if self.started {
            self.out.send_if_full()?;
        }
        Ok(())
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        self.out.page(page.data);
        self.out.send_if_full()
    }

    fn preamble(&mut self, preamble: &Preamble) -> Result<(), SinkError> {
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
        if preamble.return_path {
            log::info!("QEMU opened its return path: the destination's answers are relayed");
        }
        self.out.send()?;
        self.out.flush()?;
        Ok(())
    }

    fn idle(&mut self) -> Result<(), SinkError> {
        self.channels.check()?;
        if self.started {
            self.out.send_when_idle(self.qemu)?;
        }
        Ok(())
    }
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
                let result = wire::relay_return_path(&mut reader, &mut to_qemu).map(
                    |(done, return_path_bytes)| Answered {
                        done,
                        read_bytes: reader.bytes,
                        return_path_bytes,
                    },
                );
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

/// Runs one proxied migration from the source QEMU to the receive proxy.
pub fn send(options: &SendOptions) -> anyhow::Result<ProxyReport> {
    let listener = TcpListener::bind(&options.listen)
        .with_context(|| format!("cannot listen on {} for the source QEMU", options.listen))?;
    log::info!(
        "waiting for QEMU's migration on {0} (QMP: migrate tcp:{0})",
        options.listen
    );
    // QEMU connects its main stream first, then any multifd channels.
    let qemu = crate::net::accept_within(&listener, options.timeout)
        .context("waiting for the source QEMU")?;
    // A source QEMU that stops sending fails the migration too.
    qemu.set_read_timeout(Some(options.timeouts.io_timeout()))?;
    let started = Instant::now();
    let listed = options.listing.contents(&qemu);
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
    let mut writer: Wan = FrameWriter::new(BufWriter::with_capacity(1 << 20, write_half));
    let (offered, offer_end, negotiation) =
        handshake(&mut reader, &mut writer, options.zstd.is_some(), &listed)
            .context("talking to the receive proxy")?;
    let negotiation_bytes = reader.bytes + writer.bytes;
    log::info!("{negotiation} ({negotiation_bytes} bytes of negotiation)");
    // From here on the receive proxy sends only the destination QEMU's
    // return-path bytes (whenever it writes some), then Done.
    let answers = ReturnPath::relay(reader, &qemu, options.timeouts.io_timeout())?;
    // One gauge for every connection: each compares its chunks'
    // compression with the share of the link its own writes see.
    let gauge = options
        .zstd
        .map(|policy| Gauge::new(policy, 1, options.zstd_level));
    let link = SendLink {
        to: &options.to,
        security: &options.security,
        timeouts: options.timeouts,
        zstd: gauge.as_ref(),
        offered: &offered,
        templates: offer_end.templates,
        digest_seed: offer_end.digest_seed,
        session: offer_end.session,
    };
    let stop = AtomicBool::new(false);
    let counts = ChannelCounts::default();
    let failure = Failure::default();
    thread::scope(|scope| {
        let mut channels = SendChannels::start(scope, listener, &link, &stop, &counts, &failure)?;
        let main = send_main(options, &qemu, &mut writer, &link, &answers, &mut channels);
        let mut report = channels::merge(main, &channels.finish(), &failure)?;
        report.seconds = started.elapsed().as_secs_f64();
        report.tls = protection.is_tls();
        report.channel = protection.describe();
        report.negotiation = Some(negotiation);
        report.negotiation_bytes = negotiation_bytes;
        report.compression = gauge.as_ref().map(Gauge::describe);
        Ok(report)
    })
}

/// The protocol's opening: Hello out, then the offer in, or the query
/// asked and answered; what was agreed, and how.
fn handshake(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    writer: &mut Wan,
    zstd: bool,
    listed: &[TemplateId],
) -> anyhow::Result<(Offered, wire::OfferEnd, String)> {
    writer.preamble()?;
    writer.json(
        Kind::Hello,
        &wire::Hello {
            sender: format!("pagefp-{}", std::process::id()),
            zstd,
            multifd: None,
            query_hashes: listed.len() as u64,
        },
    )?;
    writer.flush()?;
    reader.preamble()?;
    let mut hashes = Vec::new();
    let mut queried = None;
    loop {
        let frame = reader.frame()?;
        match frame.kind {
            Kind::Offer if queried.is_none() => {
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
            Kind::WantHashes if hashes.is_empty() && queried.is_none() && !listed.is_empty() => {
                queried = Some(query::ask(reader, writer, listed)?);
            }
            Kind::OfferEnd => {
                let end: wire::OfferEnd = frame.json()?;
                // The listed contents are distinct: one index each.
                let (offered, count, negotiation) = match queried {
                    Some(agreed) => {
                        let held = agreed.len();
                        (
                            Offered::from(agreed),
                            held,
                            format!("query: {held} of the VM's {} contents held", listed.len()),
                        )
                    }
                    None => (
                        Offered::new(&hashes),
                        hashes.len(),
                        format!("offer: {} templates", hashes.len()),
                    ),
                };
                if end.templates != count as u64 {
                    return Err(frame
                        .malformed(format!(
                            "{} templates announced, {count} agreed",
                            end.templates
                        ))
                        .into());
                }
                return Ok((offered, end, negotiation));
            }
            other => {
                return Err(frame
                    .malformed(format!(
                        "expected the template offer or query, got {other:?}"
                    ))
                    .into());
            }
        }
    }
}

/// The main stream, parsed and sent; its report (without the channels).
fn send_main(
    options: &SendOptions,
    qemu: &TcpStream,
    writer: &mut Wan,
    link: &SendLink,
    answers: &ReturnPath,
    channels: &mut SendChannels,
) -> anyhow::Result<ProxyReport> {
    let mut sink = SendSink {
        out: Chunks::new(writer, link.offered, link.zstd, link.digest_seed),
        started: false,
        qemu,
        channels: channels.failure(),
    };
    // The parser buffers its input itself.
    let parsed = qemu_stream::parse(qemu, &mut sink, &options.parser);
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
    sink.out.send().map_err(|e| anyhow::anyhow!(e))?;
    let template_pages = sink.out.template_pages;
    let opened = channels.close();
    writer.json(
        Kind::End,
        &wire::End {
            stream_bytes: summary.stream_bytes,
            channels: opened,
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
        templates_offered: link.offered.len() as u64,
        ram_complete: summary.ram_complete,
        pass_through: summary
            .pass_through
            .map(|p| format!("from byte {}: {}", p.offset, p.reason)),
        return_path_bytes,
        channels: 1,
        ..ProxyReport::default()
    })
}
