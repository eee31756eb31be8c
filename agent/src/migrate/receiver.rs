//! `pagefp migrate receive`: takes one migration into an incoming VMM.
//!
//! Templates are loaded before the connection is accepted (their cost is
//! reported on its own). Pages are written into the incoming VMM's memory,
//! which KVM does not see yet. At the end the memory is checked against the
//! source's digest, the VM state is loaded, and the VM resumes only when the
//! source says go. Any failure discards the incoming VM: the source keeps
//! running.

use std::{
    io::{BufReader, BufWriter, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    digest::{DigestKey, fill_digests},
    progress::Progress,
    read_ahead::{Incoming, ReadAhead},
    read_back::{BackgroundReader, ChunkDigests, IN_FLIGHT, QUIET},
    vm_memory::{DestMemory, Layout},
    vmm::{self, MemoryRegion, VmmControl},
};
use crate::{
    api::report::{MigrationReport, Mode, Phase, Role},
    catalog::{
        agreement::{Agreed, Negotiation},
        sources::TemplateSources,
        store::TemplateStore,
    },
    net::{ChannelReader, ChannelWriter, SecureListener, Timeouts, tls},
    page::PAGE_SIZE,
    transport::{
        Protocol as _, WireError,
        accept::accept_peer,
        migration::{
            self as wire, FLAG_ZSTD, FrameReader, FrameWriter, Hello, Kind, MAX_OFFER, PageRecord,
            Ready, Resumed, RoundEnd,
        },
        query,
    },
};

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub listen: String,
    pub vmm_socket: PathBuf,
    /// Where the offered templates come from (its agent socket is also
    /// where progress is reported).
    pub templates: TemplateSources,
    /// Resume the VM when the source says go (tests may leave it paused).
    pub resume: bool,
    pub progress: bool,
    /// Give up if no source connects within this time.
    pub accept_timeout: Option<Duration>,
    pub negotiation: Negotiation,
    pub timeouts: Timeouts,
    /// Who may send the VM.
    pub security: tls::Server,
}

/// Loaded templates and what loading them cost.
pub struct LoadedTemplates {
    pub store: TemplateStore,
    pub bytes: u64,
    pub seconds: f64,
}

/// Loads every template source named in `options`.
pub fn load_templates(options: &ReceiveOptions) -> anyhow::Result<LoadedTemplates> {
    let started = Instant::now();
    let loaded = options.templates.load()?;
    let mut store = TemplateStore::default();
    for (source, catalog) in &loaded.catalogs {
        let added = store.add(catalog);
        log::info!("{source}: {} templates ({added} new)", catalog.len());
    }
    Ok(LoadedTemplates {
        store,
        bytes: loaded.file_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Receives one migration; the final report on success.
pub fn receive(options: &ReceiveOptions) -> anyhow::Result<MigrationReport> {
    let templates = load_templates(options)?;
    let mut vmm = vmm::connect(&options.vmm_socket)?;
    let info = vmm.info()?;
    if info.state != "incoming" {
        bail!(
            "the VMM at {} is {}, not waiting for an incoming VM: start it with --incoming",
            options.vmm_socket.display(),
            info.state
        );
    }
    let listener = SecureListener::bind(&options.listen, options.security.clone())?;
    log::info!(
        "waiting for a migration on {} into VMM pid {} ({} templates loaded in {:.2} s from {} bytes of catalogs)",
        listener.local_addr()?,
        info.pid,
        templates.store.len(),
        templates.seconds,
        templates.bytes
    );
    let opened = accept_peer(
        &listener,
        options.accept_timeout,
        &options.timeouts,
        "the migration source (pagefp migrate send)",
        |_| Ok(()),
    )?;
    // One migration per receiver: later connections are refused, not queued.
    drop(listener);
    let (reader, write_half, peer, protection) =
        (opened.reader, opened.writer, opened.peer, opened.protection);
    let mut receiver = Receiver {
        read_bytes: 0,
        writer: FrameWriter::new(BufWriter::new(write_half)),
        templates: Agreed::new(templates.store),
        site: &options.templates.site,
        negotiation: options.negotiation,
        report: MigrationReport {
            phase: Phase::Negotiating,
            catalog_bytes: templates.bytes,
            tls: protection.is_tls(),
            channel: protection.describe(),
            // Until the source's hello names the migration.
            ..MigrationReport::new(
                format!("incoming-{}-{}", info.pid, std::process::id()),
                Role::Destination,
                Mode::Baseline,
                info.pid,
                peer,
            )
        },
        progress: Progress::new(
            options.progress,
            Some(options.templates.agent_socket.clone()),
        ),
        started: Instant::now(),
        memory: None,
        state_loaded: false,
        chunks: ChunkDigests::new(0, 1),
        reader: None,
        owned: false,
        ready_sent: None,
    };
    match receiver.run(reader, vmm.as_mut(), options, &info.memory) {
        Ok(()) => {
            receiver.report.phase = Phase::Completed;
            receiver.sync();
            receiver.progress.update(&receiver.report);
            Ok(receiver.report)
        }
        Err(err) if receiver.owned => {
            // The source was told to go: it waits, paused, for "resumed". The
            // VM here is the one to keep (running, unless resuming it failed
            // or was not asked for), so it is not discarded.
            receiver.report.phase = Phase::Failed;
            receiver.report.error = Some(format!("{err:#}"));
            receiver.sync();
            receiver.progress.update(&receiver.report);
            Err(err.context(
                "the source said go, so this host owns the VM now and keeps it; the source \
                 could not be told and stays paused. Check the VM here: once it runs, stop the \
                 source VMM (never resume both)",
            ))
        }
        Err(err) => {
            let _ = receiver.writer.abort(&format!("{err:#}"));
            let _ = receiver.writer.flush();
            receiver.report.phase = Phase::Failed;
            receiver.report.error = Some(format!("{err:#}"));
            receiver.sync();
            receiver.progress.update(&receiver.report);
            // Unmap before the VMM goes away.
            receiver.reader = None;
            receiver.memory = None;
            let discarded = vmm.exit();
            match discarded {
                Ok(()) => Err(err.context("migration failed; the incoming VM was discarded")),
                Err(exit_err) => Err(err.context(format!(
                    "migration failed, and discarding the incoming VM failed too ({exit_err:#}); stop that VMM by hand"
                ))),
            }
        }
    }
}

type Reader = FrameReader<BufReader<ChannelReader>>;

struct Receiver<'a> {
    /// Bytes read from the source so far.
    read_bytes: u64,
    writer: FrameWriter<BufWriter<ChannelWriter>>,
    templates: Agreed,
    site: &'a crate::config::SiteStoreConfig,
    negotiation: Negotiation,
    report: MigrationReport,
    progress: Progress,
    started: Instant,
    memory: Option<DestMemory>,
    /// The source's VM state arrived and is loaded into the incoming VMM,
    /// which stays paused: nothing may be written after it.
    state_loaded: bool,
    /// Each chunk's digest as read back from guest memory after the last
    /// write into it ([`ChunkDigests`]).
    chunks: ChunkDigests,
    /// Reads chunks back while pages still arrive; `None` before the hello
    /// or where the memory cannot be mapped twice (then each pre-copy
    /// round's chunks are read at its end).
    reader: Option<BackgroundReader>,
    /// "go" arrived after the memory was verified: from then on this host
    /// owns the VM, and nothing that fails may discard it.
    owned: bool,
    /// When "ready" went out: the wait for "go" is the source's part of
    /// the downtime that this end sees.
    ready_sent: Option<Instant>,
}

impl Receiver<'_> {
    fn sync(&mut self) {
        self.report.wire_bytes = self.read_bytes + self.writer.bytes;
        self.report.elapsed_seconds = self.started.elapsed().as_secs_f64();
        self.report.cpu_seconds = crate::clock::process_cpu_ns() as f64 / 1e9;
    }

    /// Agrees on the templates: offers the catalog, or, when the source
    /// can list the VM's contents and that is cheaper (or a site store may
    /// hold what this host lacks), asks for them and answers which it holds.
    fn negotiate(&mut self, reader: &mut Reader, hello: &Hello) -> anyhow::Result<()> {
        let asked = hello.query_hashes;
        if asked > hello.total_pages() {
            bail!(
                "the source offers to list {asked} contents of a VM of {} pages: not a pagefp this release speaks with",
                hello.total_pages()
            );
        }
        let site = !self.site.nodes.is_empty();
        if !(hello.mode.uses_templates()
            && self
                .negotiation
                .asks(asked, self.templates.store().len(), site))
        {
            let max = if hello.mode.uses_templates() {
                MAX_OFFER
            } else {
                0
            };
            let offer = self.templates.offer(max);
            self.writer
                .frame(Kind::Offer, 0, &wire::encode_offer(offer))?;
            self.writer.flush()?;
            self.report.templates_agreed = offer.len() as u64;
            self.report.negotiation = Some(format!("offer: {} templates", offer.len()));
            return Ok(());
        }
        let mut answers = self.templates.query(self.site);
        query::answer(reader, &mut self.writer, asked, |hashes| {
            answers.holds(hashes)
        })?;
        self.report.site = answers.finish();
        self.report.templates_agreed = self.templates.len() as u64;
        self.report.negotiation = Some(format!(
            "query: {} of the VM's {asked} contents held",
            self.templates.len()
        ));
        Ok(())
    }

    fn run(
        &mut self,
        mut reader: Reader,
        vmm: &mut dyn VmmControl,
        options: &ReceiveOptions,
        regions: &[MemoryRegion],
    ) -> anyhow::Result<()> {
        let hello: Hello = reader.expect(Kind::Hello)?.json()?;
        self.report.id = hello.id.clone();
        self.report.mode = hello.mode;
        if hello.page_size as usize != PAGE_SIZE {
            bail!(
                "the source uses {}-byte pages; this host uses {PAGE_SIZE}",
                hello.page_size
            );
        }
        if !(1..=1 << 20).contains(&hello.digest_chunk_pages) {
            bail!(
                "the source's digest chunk of {} pages is outside 1..=2^20: not a pagefp this release speaks with",
                hello.digest_chunk_pages
            );
        }
        // The incoming VMM must have the source's memory layout.
        let mut mine: Vec<_> = regions.iter().map(|r| (r.gpa, r.size)).collect();
        let mut theirs: Vec<_> = hello.regions.iter().map(|r| (r.gpa, r.size)).collect();
        mine.sort_unstable();
        theirs.sort_unstable();
        if mine != theirs {
            // The incoming VMM's layout stays in this host's log: the
            // reason is also sent to the peer, which is not yet trusted.
            log::error!(
                "memory layouts differ: the source has (gpa, bytes) {theirs:x?}, the incoming VMM {mine:x?}"
            );
            bail!(
                "memory layouts differ (both are in the destination's log); \
                 start the destination VMM with the source's memory size and slots"
            );
        }
        // The sizes are the incoming VMM's own now: no overflow.
        self.report.mem_bytes = hello.total_pages() * PAGE_SIZE as u64;
        let layout = Layout::new(hello.regions.clone())?;
        let uaddrs: Vec<u64> = layout
            .regions
            .iter()
            .map(|r| regions.iter().find(|m| m.gpa == r.gpa).unwrap().uaddr)
            .collect();
        self.memory = Some(DestMemory::open(self.report.vm_pid, layout, &uaddrs)?);
        let key = DigestKey {
            chunk_pages: hello.digest_chunk_pages,
            seed: hello.digest_seed,
        };
        self.chunks = ChunkDigests::new(hello.total_pages(), key.chunk_pages);
        self.reader = match self.memory.as_ref().map(DestMemory::reader) {
            Some(Ok(view)) => Some(BackgroundReader::start(view, key)?),
            Some(Err(err)) => {
                log::warn!(
                    "reading memory back at the end of each round instead of while pages arrive: {err:#}"
                );
                None
            }
            None => None,
        };
        self.negotiate(&mut reader, &hello)?;
        self.read_bytes = reader.bytes;
        self.report.negotiation_bytes = self.read_bytes + self.writer.bytes;
        // From here frames are read (and decrypted, and decompressed) on a
        // thread of their own while this one writes guest memory.
        let frames = ReadAhead::start(reader)?;
        self.report.phase = Phase::Precopy;
        self.sync();
        self.progress.update(&self.report);

        loop {
            let incoming = frames.next()?;
            self.read_bytes = incoming.read_bytes;
            let frame = &incoming.frame;
            match frame.kind {
                Kind::Pages if self.state_loaded => {
                    return Err(frame
                        .malformed("pages after the VM state: the final round is over")
                        .into());
                }
                Kind::Pages => {
                    self.apply_pages(&incoming)?;
                    self.ask_read_back(QUIET, IN_FLIGHT)?;
                }
                Kind::RoundEnd => {
                    let round: RoundEnd = frame.json()?;
                    self.report.round = round.round;
                    self.report.dirty_pages_per_second = round.dirty_pages_per_second;
                    // Pre-copy rounds are acknowledged; the final one is
                    // followed by the state and the digest instead.
                    if !round.last {
                        self.writer.json(Kind::RoundAck, &round)?;
                        self.writer.flush()?;
                        // The round is whole: every chunk it wrote is read
                        // back now, while the source asks for its next hash
                        // list and sends on.
                        if self.reader.is_some() {
                            self.ask_read_back(Duration::ZERO, usize::MAX)?;
                        } else {
                            self.refresh_digests(key)?;
                        }
                        // Unmapped now, while the source still sends: the
                        // paused unmap then has only what the final
                        // round's read-back maps.
                        if let Some(memory) = &self.memory {
                            memory.drop_page_tables();
                        }
                    }
                }
                Kind::State => {
                    if self.state_loaded {
                        return Err(frame.malformed("a second VM state").into());
                    }
                    self.report.phase = Phase::StopAndCopy;
                    // Nothing is written after the state: read the memory
                    // back and load the state now, while the source
                    // computes its digest. The VMM stays paused until "go",
                    // and is discarded if the digests differ.
                    self.read_back_and_load(key, vmm, &incoming.frame.payload)?;
                }
                Kind::Verify => {
                    self.report.phase = Phase::Verifying;
                    self.progress.update(&self.report);
                    self.verify(frame, hello.digest_chunk_pages)?;
                }
                Kind::Go => {
                    if !self.report.verified {
                        bail!("the source said go before the memory was verified");
                    }
                    self.owned = true;
                    let go_ms = self
                        .ready_sent
                        .map_or(0.0, |sent| sent.elapsed().as_secs_f64() * 1000.0);
                    let resuming = Instant::now();
                    if options.resume {
                        vmm.resume().context("resuming the migrated VM")?;
                    }
                    self.report.downtime_parts_ms.extend([
                        ("ready_to_go".to_string(), go_ms),
                        (
                            "resume".to_string(),
                            resuming.elapsed().as_secs_f64() * 1000.0,
                        ),
                    ]);
                    self.writer.json(
                        Kind::Resumed,
                        &Resumed {
                            pid: self.report.vm_pid,
                        },
                    )?;
                    self.writer.flush()?;
                    return Ok(());
                }
                other => {
                    return Err(WireError::Unexpected {
                        protocol: wire::Migration::NAME,
                        expected: "Pages, RoundEnd, State, Verify or Go".into(),
                        got: format!("{other:?}"),
                        offset: frame.offset,
                    }
                    .into());
                }
            }
            self.sync();
            self.progress.update(&self.report);
        }
    }

    /// Hands the read-back answers ready to the book and asks for up to
    /// `limit` more chunks in all, those not written in the last `quiet`.
    fn ask_read_back(&mut self, quiet: Duration, limit: usize) -> anyhow::Result<()> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(());
        };
        reader.collect(&mut self.chunks)?;
        let room = limit.saturating_sub(reader.in_flight());
        for (chunk, generation) in self.chunks.to_ask(quiet, room) {
            reader.ask(chunk, generation);
        }
        Ok(())
    }

    /// Reads back, here, the digest of every chunk written since its
    /// digest was last read. A chunk's digest is read from the mapping the
    /// VMM will run after the last write into it (every write forgets its
    /// chunk's digest), so it is the digest of what the VM gets.
    fn refresh_digests(&mut self, key: DigestKey) -> anyhow::Result<usize> {
        let memory = self
            .memory
            .as_ref()
            .context("the source sent pages before the memory was opened")?;
        let missing = self.chunks.missing();
        let holes = memory.holes();
        fill_digests(
            memory.layout.pages(),
            key,
            &holes,
            &mut self.chunks.digests,
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
            |page, _| {
                let data = memory
                    .page(page)
                    .with_context(|| format!("page {page} is outside the guest memory"))?;
                Ok(key.page(data))
            },
        )?;
        Ok(missing)
    }

    /// Chunk digests of the memory as it is now, read back from the mapping
    /// the VMM will run (not what was received: a page lost, misplaced or
    /// changed after it was written shows): the background reader's
    /// answers, then, here, every chunk written since.
    fn read_back(&mut self, key: DigestKey) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut in_background = 0;
        if let Some(reader) = self.reader.take() {
            in_background = reader.read;
            reader.finish(&mut self.chunks)?;
        }
        let waited_ms = started.elapsed().as_secs_f64() * 1000.0;
        let read = self.refresh_digests(key)?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.report.downtime_parts_ms.push(("read_back".into(), ms));
        log::info!(
            "read back {read} of {} chunks in {ms:.1} ms ({waited_ms:.1} ms waiting for the \
             background reader, which read {in_background} chunks while pages arrived; \
             {} of its reads were of chunks written again)",
            self.chunks.digests.len(),
            self.chunks.discarded,
        );
        Ok(())
    }

    /// Reads the memory back (on a thread of its own) while the incoming
    /// VMM loads the source's VM state (it stays paused), then unmaps the
    /// memory: the final round was written, so neither changes what the
    /// other sees, and the destination's part of the downtime is the
    /// longer of the two, not their sum (at 1 Gbit/s on the bench's
    /// guests, read-back 8 ms and the test VMM's load 10, medians).
    fn read_back_and_load(
        &mut self,
        key: DigestKey,
        vmm: &mut dyn VmmControl,
        state: &[u8],
    ) -> anyhow::Result<()> {
        let (read, (loaded, load_ms)) = std::thread::scope(|scope| {
            let reading = scope.spawn(|| self.read_back(key));
            let started = Instant::now();
            let loaded = vmm
                .load_state(state)
                .context("loading the VM state into the incoming VMM");
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            let read = reading
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the read-back thread panicked")));
            (read, (loaded, load_ms))
        });
        read?;
        loaded?;
        let started = Instant::now();
        self.memory = None;
        let unmap_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.report.downtime_parts_ms.extend([
            ("load_state".to_string(), load_ms),
            ("unmap".to_string(), unmap_ms),
        ]);
        log::info!(
            "VM state loaded in {load_ms:.1} ms (beside the read-back), unmapped in {unmap_ms:.1} ms"
        );
        self.state_loaded = true;
        Ok(())
    }

    fn apply_pages(&mut self, incoming: &Incoming) -> anyhow::Result<()> {
        let (frame, body) = (&incoming.frame, incoming.body());
        // Unmapped once the state is loaded: pages after that are a
        // protocol violation.
        let memory = self
            .memory
            .as_mut()
            .ok_or_else(|| frame.malformed("pages after the VM state"))?;
        let total = memory.layout.pages();
        // Consecutive pages are written together (one system call per
        // run), in the frame's order: a zero run writes what came before
        // it first.
        let mut run = PageRun::default();
        for record in wire::parse_pages(body) {
            let record = record.map_err(|what| frame.malformed(what))?;
            let (page, data): (u32, &[u8]) = match record {
                PageRecord::Zero { first, count } => {
                    run.flush(memory)?;
                    self.chunks.forget(first, count);
                    if !memory.zero_run(first, count) {
                        return Err(frame
                            .malformed(format!("zero run {first}+{count} beyond {total} pages"))
                            .into());
                    }
                    self.report.pages.zero += u64::from(count);
                    continue;
                }
                PageRecord::Template { page, index } => {
                    let data = self
                        .templates
                        .page(index)
                        .filter(|_| self.report.mode.uses_templates())
                        .ok_or_else(|| {
                            frame.malformed(format!("template {index} was not offered"))
                        })?;
                    self.report.pages.template += 1;
                    (page, data)
                }
                PageRecord::Full { page, data } => {
                    if frame.flags & FLAG_ZSTD != 0 {
                        self.report.pages.zstd += 1;
                    } else {
                        self.report.pages.full += 1;
                    }
                    (page, data)
                }
            };
            if page >= total {
                return Err(frame
                    .malformed(format!("page {page} beyond {total} pages"))
                    .into());
            }
            self.chunks.forget(page, 1);
            run.push(memory, page, data)?;
        }
        run.flush(memory)
    }

    fn verify(&mut self, frame: &wire::Frame, chunk_pages: u32) -> anyhow::Result<()> {
        let (frame_chunk, expected) = wire::decode_digest(frame)?;
        if frame_chunk != chunk_pages || frame_chunk == 0 {
            return Err(frame
                .malformed("digest chunk size differs from the hello")
                .into());
        }
        // The memory as read back once the final round was written (see
        // `read_back`, which the VM state's arrival ran); the source hashed
        // its memory itself, independently of its tracking.
        if !self.state_loaded {
            bail!("the source sent the digest before the VM state");
        }
        let actual: Vec<[u8; 32]> = self.chunks.digests.iter().flatten().copied().collect();
        if actual.len() != expected.len() {
            return Err(frame
                .malformed(format!(
                    "{} digests for {} chunks",
                    expected.len(),
                    actual.len()
                ))
                .into());
        }
        let mismatched: Vec<u32> = (0..actual.len() as u32)
            .filter(|&i| actual[i as usize] != expected[i as usize])
            .collect();
        if !mismatched.is_empty() {
            self.writer.json(
                Kind::Ready,
                &Ready {
                    verified: false,
                    mismatched_chunks: mismatched.clone(),
                },
            )?;
            self.writer.flush()?;
            bail!(
                "memory differs from the source's in {} chunk(s) (first {}); discarding",
                mismatched.len(),
                mismatched[0]
            );
        }
        log::info!("memory verified against the source's digest");
        self.report.verified = true;
        self.writer.json(
            Kind::Ready,
            &Ready {
                verified: true,
                mismatched_chunks: Vec::new(),
            },
        )?;
        self.writer.flush()?;
        self.ready_sent = Some(Instant::now());
        Ok(())
    }
}

/// Writes `report` as one JSON line (for `--json`).
pub fn print_json(report: &MigrationReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, report)?;
    writeln!(out)?;
    Ok(())
}

/// Pages of a frame waiting to be written, consecutive from `first`.
#[derive(Default)]
struct PageRun<'a> {
    first: u32,
    pages: Vec<&'a [u8]>,
}

impl<'a> PageRun<'a> {
    /// At most this many pages per write.
    const MAX: usize = 64;

    /// Adds `data` at `page`, writing what is held first unless `page`
    /// continues it.
    fn push(&mut self, memory: &mut DestMemory, page: u32, data: &'a [u8]) -> anyhow::Result<()> {
        let continues = self.first.checked_add(self.pages.len() as u32) == Some(page);
        if !self.pages.is_empty() && (!continues || self.pages.len() == Self::MAX) {
            self.flush(memory)?;
        }
        if self.pages.is_empty() {
            self.first = page;
        }
        self.pages.push(data);
        Ok(())
    }

    fn flush(&mut self, memory: &mut DestMemory) -> anyhow::Result<()> {
        if !self.pages.is_empty() && !memory.write_pages(self.first, &self.pages) {
            anyhow::bail!(
                "writing pages {}..{} into the destination VM's memory failed: did the VMM exit?",
                self.first,
                self.first as usize + self.pages.len()
            );
        }
        self.pages.clear();
        Ok(())
    }
}
