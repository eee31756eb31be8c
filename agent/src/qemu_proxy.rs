//! `pagefp qemu-proxy send|receive`: template deduplication for unmodified
//! QEMU. The source QEMU migrates to the local send proxy (`migrate
//! tcp:127.0.0.1:PORT`); the send proxy parses QEMU's stream
//! ([`crate::qemu_stream`]), replaces every RAM page whose content the
//! destination holds as a template by a reference, and carries the rest
//! unchanged (zstd-compressed) over the WAN to the receive proxy, which
//! rebuilds QEMU's exact stream for the destination QEMU (`-incoming
//! tcp:...`). Pages are matched by the blake3 of the bytes the proxy saw in
//! the stream, so correctness never depends on the agent; the receive proxy
//! checks the length and blake3 of the whole rebuilt stream.
//!
//! Wire: the migration wire format's preamble and framing
//! ([`crate::migrate::wire`]), messages `QemuHello`, `Offer`, `QemuBytes`,
//! `QemuTemplate`, `QemuEnd`, `QemuDone`. See `docs/qemu-proxy.md`.

use std::{
    collections::HashMap,
    io::{BufReader, BufWriter, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    config::DEFAULT_SOCKET,
    migrate::{
        catalog::{self, BuildOptions, template_id},
        receiver::{ReceiveOptions, load_templates},
        wire::{self, FLAG_ZSTD, FrameReader, FrameWriter, Kind, TemplateId},
    },
    qemu_stream::{Parser, PassThroughReason, Piece},
};

/// QEMU stream bytes per `QemuBytes` message.
const CHUNK: usize = 256 << 10;

#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Beside the source QEMU: accept its migration stream, send it deduplicated.
    Send(SendArgs),
    /// Beside the destination QEMU: rebuild the stream and feed QEMU's -incoming.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where the source QEMU migrates to (`migrate tcp:THIS`).
    #[arg(long)]
    pub listen: String,
    /// The receive proxy, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Do not compress the pages and bytes that travel unchanged.
    #[arg(long)]
    pub no_zstd: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address the send proxy connects to.
    #[arg(long)]
    pub listen: String,
    /// The destination QEMU's `-incoming tcp:` address.
    #[arg(long)]
    pub qemu: String,
    /// A template catalog to offer (repeatable).
    #[arg(long = "templates")]
    pub catalogs: Vec<PathBuf>,
    /// Also every catalog installed by `pagefp templates import`.
    #[arg(long, default_value = catalog::DEFAULT_DIR)]
    pub catalog_dir: PathBuf,
    /// Do not load the installed catalogs.
    #[arg(long)]
    pub no_installed: bool,
    /// Also templates built from the VMs the local agent tracks.
    #[arg(long)]
    pub local_templates: bool,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Give up when no stream arrives within this many seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

/// What one proxied migration did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Bytes of QEMU's own stream.
    pub stream_bytes: u64,
    /// Bytes on the WAN (both directions).
    pub wire_bytes: u64,
    pub pages: u64,
    pub template_pages: u64,
    pub zero_pages: u64,
    pub templates_offered: u64,
    /// Why deduplication stopped before the end of the stream, if it did
    /// (normal: the RAM section ended).
    pub pass_through: Option<String>,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct QemuHello {
    id: String,
}

#[derive(Serialize, Deserialize)]
struct QemuEnd {
    stream_bytes: u64,
    blake3: String,
}

#[derive(Serialize, Deserialize)]
struct QemuDone {
    stream_bytes: u64,
}

pub fn run(command: ProxyCommand) -> anyhow::Result<()> {
    let (report, json) = match command {
        ProxyCommand::Send(args) => (send(&args)?, args.json),
        ProxyCommand::Receive(args) => (receive(&args)?, args.json),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "proxied {} bytes of QEMU stream as {} bytes ({:.1}%): {} pages, {} as templates, {} zero",
            report.stream_bytes,
            report.wire_bytes,
            100.0 * report.wire_bytes as f64 / report.stream_bytes.max(1) as f64,
            report.pages,
            report.template_pages,
            report.zero_pages
        );
    }
    Ok(())
}

fn send(args: &SendArgs) -> anyhow::Result<ProxyReport> {
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {} for the source QEMU", args.listen))?;
    log::info!(
        "waiting for QEMU's migration on {} (QMP: migrate tcp:{})",
        args.listen,
        args.listen
    );
    let (qemu, _) = listener.accept()?;
    // One connection only: multifd channels would be further connections.
    drop(listener);
    let started = Instant::now();
    let wan = TcpStream::connect(&args.to)
        .with_context(|| format!("cannot reach the receive proxy at {}", args.to))?;
    wan.set_nodelay(true)?;
    let mut reader = FrameReader::new(BufReader::new(wan.try_clone()?));
    let mut writer = FrameWriter::new(BufWriter::with_capacity(1 << 20, wan));
    writer.preamble()?;
    writer.json(
        Kind::QemuHello,
        &QemuHello {
            id: format!("qemu-{}", std::process::id()),
        },
    )?;
    writer.flush()?;
    let offer = wire::decode_offer(&reader.expect(Kind::Offer, "template offer")?)?;
    let index: HashMap<TemplateId, u32> = offer
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let mut parser = Parser::new(BufReader::with_capacity(1 << 20, qemu));
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK + 8192);
    let mut digest = blake3::Hasher::new();
    let mut report = ProxyReport {
        templates_offered: offer.len() as u64,
        ..ProxyReport::default()
    };
    let zstd = !args.no_zstd;
    let flush = |writer: &mut FrameWriter<BufWriter<TcpStream>>,
                 pending: &mut Vec<u8>|
     -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        if zstd {
            let compressed = zstd::bulk::compress(pending, 3)?;
            writer.frame(Kind::QemuBytes, FLAG_ZSTD, &compressed)?;
        } else {
            writer.frame(Kind::QemuBytes, 0, pending)?;
        }
        pending.clear();
        Ok(())
    };
    while let Some(piece) = parser.next_piece()? {
        match piece {
            Piece::Bytes(bytes) => {
                digest.update(&bytes);
                pending.extend_from_slice(&bytes);
            }
            Piece::Page(page) => {
                digest.update(&page[..]);
                let hash = blake3::hash(&page[..]);
                match index.get(&template_id(hash.as_bytes())) {
                    Some(&template) => {
                        // The bytes before the page, then the reference.
                        if pending.len() > 64 {
                            flush(&mut writer, &mut pending)?;
                        }
                        pending.extend_from_slice(&template.to_le_bytes());
                        writer.frame(Kind::QemuTemplate, 0, &pending)?;
                        pending.clear();
                        report.template_pages += 1;
                    }
                    None => pending.extend_from_slice(&page[..]),
                }
            }
        }
        if pending.len() >= CHUNK {
            flush(&mut writer, &mut pending)?;
        }
    }
    flush(&mut writer, &mut pending)?;
    report.stream_bytes = parser.offset();
    report.pages = parser.pages;
    report.zero_pages = parser.zero_pages;
    report.pass_through = parser.pass_through.as_ref().map(describe);
    writer.json(
        Kind::QemuEnd,
        &QemuEnd {
            stream_bytes: report.stream_bytes,
            blake3: digest.finalize().to_hex().to_string(),
        },
    )?;
    writer.flush()?;
    let done: QemuDone = reader.expect(Kind::QemuDone, "done")?.json()?;
    if done.stream_bytes != report.stream_bytes {
        bail!(
            "the receive proxy rebuilt {} bytes of {}",
            done.stream_bytes,
            report.stream_bytes
        );
    }
    report.wire_bytes = writer.bytes + reader.bytes;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn describe(reason: &PassThroughReason) -> String {
    match reason {
        PassThroughReason::RamSectionEnded => "ram section ended".into(),
        PassThroughReason::NoRamSection => "no ram section found".into(),
        PassThroughReason::Unsupported(what) => what.clone(),
    }
}

fn receive(args: &ReceiveArgs) -> anyhow::Result<ProxyReport> {
    let templates = load_templates(&ReceiveOptions {
        listen: args.listen.clone(),
        vmm_socket: PathBuf::new(),
        catalogs: args.catalogs.clone(),
        catalog_dir: (!args.no_installed).then(|| args.catalog_dir.clone()),
        local_templates: args.local_templates.then(BuildOptions::default),
        agent_socket: args.agent_socket.clone(),
        resume: true,
        progress: false,
        accept_timeout: None,
    })?;
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    log::info!(
        "waiting for a proxied QEMU migration on {} ({} templates)",
        args.listen,
        templates.store.len()
    );
    if let Some(timeout) = args.timeout_s {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        loop {
            match listener.accept() {
                Ok((stream, _)) => return relay_in(stream, args, &templates.store),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("no proxied migration arrived: {e}"),
            }
        }
    }
    let (stream, _) = listener.accept()?;
    relay_in(stream, args, &templates.store)
}

fn relay_in(
    stream: TcpStream,
    args: &ReceiveArgs,
    store: &catalog::TemplateStore,
) -> anyhow::Result<ProxyReport> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    let mut reader = FrameReader::new(BufReader::with_capacity(1 << 20, stream.try_clone()?));
    let mut writer = FrameWriter::new(BufWriter::new(stream));
    reader.preamble()?;
    let _hello: QemuHello = reader.expect(Kind::QemuHello, "QEMU proxy hello")?.json()?;
    writer.frame(Kind::Offer, 0, &wire::encode_offer(&store.ids))?;
    writer.flush()?;
    let qemu = connect_retrying(&args.qemu)?;
    let mut qemu = BufWriter::with_capacity(1 << 20, qemu);
    let mut digest = blake3::Hasher::new();
    let mut report = ProxyReport {
        templates_offered: store.len() as u64,
        ..ProxyReport::default()
    };
    let mut put = |bytes: &[u8], report: &mut ProxyReport| -> anyhow::Result<()> {
        qemu.write_all(bytes)
            .context("writing to the destination QEMU")?;
        digest.update(bytes);
        report.stream_bytes += bytes.len() as u64;
        Ok(())
    };
    loop {
        let frame = reader.frame()?;
        match frame.kind {
            Kind::QemuBytes => put(&frame.body()?, &mut report)?,
            Kind::QemuTemplate => {
                let body = &frame.payload;
                if body.len() < 4 {
                    return Err(frame
                        .malformed("template reference shorter than its index")
                        .into());
                }
                let (prefix, index) = body.split_at(body.len() - 4);
                let index = u32::from_le_bytes(index.try_into().unwrap());
                let page = store
                    .page(index)
                    .ok_or_else(|| frame.malformed(format!("template {index} was not offered")))?;
                put(prefix, &mut report)?;
                put(page, &mut report)?;
                report.template_pages += 1;
            }
            Kind::QemuEnd => {
                let end: QemuEnd = frame.json()?;
                qemu.flush().context("writing to the destination QEMU")?;
                let rebuilt = digest.finalize().to_hex().to_string();
                if end.stream_bytes != report.stream_bytes || end.blake3 != rebuilt {
                    bail!(
                        "the rebuilt QEMU stream differs from the source's ({} of {} bytes, blake3 {rebuilt} vs {})",
                        report.stream_bytes,
                        end.stream_bytes,
                        end.blake3
                    );
                }
                writer.json(
                    Kind::QemuDone,
                    &QemuDone {
                        stream_bytes: report.stream_bytes,
                    },
                )?;
                writer.flush()?;
                report.wire_bytes = reader.bytes + writer.bytes;
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(report);
            }
            other => {
                return Err(wire::WireError::Unexpected {
                    expected: "QEMU stream bytes, template or end",
                    got: other,
                }
                .into());
            }
        }
    }
}

fn connect_retrying(addr: &str) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() < deadline => {
                log::debug!("destination QEMU at {addr} not ready: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!(
                "cannot reach the destination QEMU at {addr} (started with -incoming tcp:{addr}?): {e}"
            ),
        }
    }
}
