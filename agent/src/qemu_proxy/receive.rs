//! The receive proxy: chunks in, QEMU's exact stream out to the
//! destination QEMU's `-incoming tcp:`.

use std::{
    collections::VecDeque,
    io::{BufReader, BufWriter, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{ProxyReport, templates::TemplatePages};
use crate::{
    net::{ChannelReader, ChannelWriter, SecureListener, Timeouts, tls},
    transport::{
        accept::accept_peer,
        qemu_proxy::{self as wire, FrameReader, FrameWriter, Kind},
    },
};

/// Stream bytes kept from the destination QEMU until the sender's digest of
/// the whole stream matched: they hold `QEMU_VM_EOF` (after the device
/// state, before the VM description), without which QEMU never starts the
/// VM, so a stream that fails the check is never run.
const HOLD_BACK: usize = 4 << 20;
/// How long the destination QEMU may take to start listening.
const QEMU_CONNECT_RETRY: Duration = Duration::from_secs(10);

pub struct ReceiveOptions {
    pub listen: String,
    /// The destination QEMU's `-incoming tcp:` address.
    pub qemu: String,
    /// Give up if no send proxy connects within this time.
    pub timeout: Option<Duration>,
    pub timeouts: Timeouts,
    /// Who may send the stream.
    pub security: tls::Server,
}

/// The destination QEMU, connected when the first stream bytes arrive (a
/// refused migration never touches it).
struct Destination<'a> {
    addr: &'a str,
    /// Longest wait for QEMU to take more of the stream.
    io_timeout: Duration,
    conn: Option<(TcpStream, BufWriter<TcpStream>)>,
    /// Where QEMU's return-path bytes go (the send proxy), and the thread
    /// that carries them, stopped when this is dropped.
    wan: Wan,
    answers: Option<(thread::JoinHandle<()>, Arc<AtomicBool>)>,
    held: VecDeque<Vec<u8>>,
    held_bytes: usize,
    written: u64,
}

impl Destination<'_> {
    fn push(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.held_bytes += bytes.len();
        self.held.push_back(bytes);
        while self
            .held
            .front()
            .is_some_and(|f| self.held_bytes - f.len() >= HOLD_BACK)
        {
            let front = self.held.pop_front().unwrap();
            self.held_bytes -= front.len();
            self.write(&front)?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if self.conn.is_none() {
            let stream =
                crate::net::connect_tcp(self.addr, QEMU_CONNECT_RETRY).with_context(|| {
                    format!(
                        "cannot reach the destination QEMU at {} (started with -incoming tcp:...?)",
                        self.addr
                    )
                })?;
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(self.io_timeout))?;
            log::info!("feeding the destination QEMU at {}", self.addr);
            self.answers = Some(relay_answers(stream.try_clone()?, self.wan.clone())?);
            self.conn = Some((
                stream.try_clone()?,
                BufWriter::with_capacity(1 << 20, stream),
            ));
        }
        let (_, writer) = self.conn.as_mut().unwrap();
        writer.write_all(bytes).context(
            "writing to the destination QEMU (did it fail to load the stream? see its log)",
        )?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Everything held back, now (the stream so far was checked).
    fn release(&mut self) -> anyhow::Result<()> {
        while let Some(bytes) = self.held.pop_front() {
            self.write(&bytes)?;
        }
        self.held_bytes = 0;
        if let Some((_, writer)) = self.conn.as_mut() {
            writer.flush().context("writing to the destination QEMU")?;
        }
        Ok(())
    }

    /// Everything held back, then end of stream.
    fn finish(&mut self) -> anyhow::Result<()> {
        self.release()?;
        if let Some((stream, _)) = self.conn.as_mut() {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

impl Drop for Destination<'_> {
    fn drop(&mut self) {
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

/// Waits for one proxied migration and feeds it to the destination QEMU.
pub fn receive(
    options: &ReceiveOptions,
    templates: &dyn TemplatePages,
) -> anyhow::Result<ProxyReport> {
    let listener = SecureListener::bind(&options.listen, options.security.clone())?;
    log::info!(
        "waiting for a proxied QEMU migration on {} ({} templates)",
        listener.local_addr()?,
        templates.hashes().len()
    );
    let opened = accept_peer(
        &listener,
        options.timeout,
        &options.timeouts,
        "the send proxy (pagefp qemu-proxy send)",
        |reader: &mut FrameReader<_>| reader.expect(Kind::Hello)?.json::<wire::Hello>(),
    )
    .context("waiting for the send proxy")?;
    drop(listener);
    log::info!(
        "send proxy {} connected from {}: {}",
        opened.opening.sender,
        opened.peer,
        opened.protection.describe()
    );
    let started = Instant::now();
    let mut reader = opened.reader;
    let writer: Wan = Arc::new(Mutex::new(FrameWriter::new(BufWriter::new(opened.writer))));
    let mut destination = Destination {
        addr: &options.qemu,
        io_timeout: options.timeouts.io_timeout(),
        wan: writer.clone(),
        answers: None,
        conn: None,
        held: VecDeque::new(),
        held_bytes: 0,
        written: 0,
    };
    let result = relay(&mut reader, &writer, &mut destination, templates);
    let lock = || writer.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(mut report) => {
            report.wire_bytes = reader.bytes + lock().bytes;
            report.tls = opened.protection.is_tls();
            report.channel = opened.protection.describe();
            report.seconds = started.elapsed().as_secs_f64();
            Ok(report)
        }
        Err(err) => {
            let _ = lock().abort(&format!("{err:#}"));
            let _ = lock().flush();
            if destination.conn.is_none() {
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

fn relay(
    reader: &mut FrameReader<BufReader<ChannelReader>>,
    wan: &Wan,
    destination: &mut Destination,
    templates: &dyn TemplatePages,
) -> anyhow::Result<ProxyReport> {
    let mut writer = wan.lock().unwrap_or_else(|p| p.into_inner());
    writer.preamble()?;
    let mut hashes = templates.hashes();
    if hashes.len() > wire::MAX_OFFER {
        log::warn!(
            "offering {} of {} templates (the protocol's limit)",
            wire::MAX_OFFER,
            hashes.len()
        );
        hashes = &hashes[..wire::MAX_OFFER];
    }
    for batch in hashes.chunks(wire::OFFER_PER_FRAME) {
        writer.frame(Kind::Offer, 0, &wire::encode_offer(batch))?;
    }
    writer.json(
        Kind::OfferEnd,
        &wire::OfferEnd {
            templates: hashes.len() as u64,
        },
    )?;
    writer.flush()?;
    // The destination QEMU's return path writes on the link from now on.
    drop(writer);
    let mut digest = blake3::Hasher::new();
    let mut report = ProxyReport {
        templates_offered: hashes.len() as u64,
        ..ProxyReport::default()
    };
    loop {
        let frame = reader.frame()?;
        match frame.kind {
            Kind::Chunk => {
                let mut templates_used = 0;
                let bytes = wire::decode_chunk(&frame, |index| {
                    templates_used += 1;
                    templates.page(index)
                })?;
                report.template_pages += templates_used;
                digest.update(&bytes);
                report.stream_bytes += bytes.len() as u64;
                destination.push(bytes)?;
            }
            Kind::Checkpoint => {
                let at: wire::End = frame.json()?;
                let so_far = digest.clone().finalize().to_hex().to_string();
                if at.stream_bytes != report.stream_bytes || at.blake3 != so_far {
                    bail!(
                        "the rebuilt QEMU stream differs from the source's at its checkpoint ({} of {} bytes, blake3 {so_far} vs {}); the rest was held back",
                        report.stream_bytes,
                        at.stream_bytes,
                        at.blake3
                    );
                }
                destination.release()?;
            }
            Kind::End => {
                let end: wire::End = frame.json()?;
                let rebuilt = digest.finalize().to_hex().to_string();
                if end.stream_bytes != report.stream_bytes || end.blake3 != rebuilt {
                    bail!(
                        "the rebuilt QEMU stream differs from the source's ({} of {} bytes, blake3 {rebuilt} vs {}); its end was held back",
                        report.stream_bytes,
                        end.stream_bytes,
                        end.blake3
                    );
                }
                destination.finish()?;
                let mut writer = wan.lock().unwrap_or_else(|p| p.into_inner());
                writer.json(
                    Kind::Done,
                    &wire::Done {
                        stream_bytes: destination.written,
                    },
                )?;
                writer.flush()?;
                return Ok(report);
            }
            other => bail!(frame.malformed(format!("expected a chunk or the end, got {other:?}"))),
        }
    }
}
