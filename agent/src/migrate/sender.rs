//! `pagefp migrate send`: pre-copy migration of one VM.
//!
//! 1. Connect, say hello (layout, mode), receive the destination's template
//!    offer.
//! 2. Round 1 sends every page; each later round sends the pages whose
//!    content may differ from what the destination holds. The agent's hash
//!    list (taken after it applied every eBPF event the kernel produced)
//!    says which: a page is skipped only if the agent reports it clean with
//!    the very hash the destination holds. Every other page is read and
//!    hashed here.
//! 3. When what is left fits the downtime target at the measured bandwidth
//!    (or after `max_rounds`), the VM is paused; the last pages, the vCPU
//!    state and a digest of all memory follow. The destination checks its
//!    memory against the digest, loads the state and says ready; the source
//!    says go; the destination resumes and confirms; the source VMM exits.
//!
//! Any failure before "go" resumes the source VM: nothing is lost.

use std::{
    collections::HashMap,
    io::{BufReader, BufWriter},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use super::{
    digest::{CHUNK_PAGES, DigestJob, DigestKey},
    encode::{Batch, Encoder, PageHints, Small},
    interrupt,
    pacing::Paced,
    progress::Progress,
    vm_memory::{Layout, SourceMemory},
    vmm::{self, VmmControl},
};
use crate::{
    api::{
        client,
        report::{MigrationReport, Mode, Phase, Role},
        wire::{parse_hash_list, state},
    },
    catalog::agreement::listed_contents,
    compression::{Gauge, LinkSample, ZstdPolicy},
    content::{TemplateId, zero_page_hash},
    net::{self, ChannelReader, ChannelWriter, Timeouts, tls},
    page::PAGE_SIZE,
    transport::{
        WireError,
        migration::{
            self as wire, FLAG_ZSTD, FULL_LEN, FrameReader, FrameWriter, Hello, Kind, PagesBuilder,
            Ready, Region, Resumed, RoundEnd, TEMPLATE_LEN, ZERO_RUN_LEN,
        },
        query,
    },
};

/// Rounds in a row that leave at least 95% of the previous round's pages
/// before the sender gives up converging and pauses the VM.
const STALLED_ROUNDS: u32 = 3;

#[derive(Clone, Debug)]
pub struct SendOptions {
    pub pid: u32,
    pub vmm_socket: PathBuf,
    pub to: String,
    pub mode: Mode,
    pub agent_socket: PathBuf,
    /// Bytes per second; `None`: as fast as the link goes.
    pub max_bandwidth: Option<u64>,
    pub downtime_ms: u64,
    pub max_rounds: u32,
    /// Leave the paused source VMM running after success (for inspection).
    pub keep_source: bool,
    pub progress: bool,
    pub zstd_level: i32,
    /// Threads reading, hashing and compressing pages (at least 1).
    pub threads: usize,
    /// `templates+zstd`: compress every frame, or when it pays.
    pub zstd_policy: ZstdPolicy,
    /// Longest a write may block or an answer take, and the whole
    /// migration's deadline.
    pub timeouts: Timeouts,
    /// How the connection to the destination is secured.
    pub security: tls::Client,
}

/// The first hash list, asked for while the connection is made, and when
/// the agent's answer was in.
type FirstList = std::thread::JoinHandle<(anyhow::Result<PageStates>, Instant)>;

/// What the agent reports about each page, by global page index.
struct PageStates {
    state: Vec<u8>,
    hash: Vec<[u8; 32]>,
    /// The agent's token for this list: the next asks only for the changes.
    token: String,
    /// When the agent's bytes were in (before they were parsed).
    received: Instant,
}

impl PageHints for PageStates {
    fn clean_hash(&self, page: u32) -> Option<[u8; 32]> {
        let page = page as usize;
        (self.state.get(page) == Some(&state::CLEAN)).then(|| self.hash[page])
    }
}

/// The sender's state: what the destination holds, what was sent.
struct Sender<'a> {
    options: &'a SendOptions,
    memory: Arc<SourceMemory>,
    writer: FrameWriter<BufWriter<Paced<ChannelWriter>>>,
    reader: FrameReader<BufReader<ChannelReader>>,
    offer: HashMap<TemplateId, u32>,
    /// blake3 of the content the destination holds, per page.
    held: Vec<Option<[u8; 32]>>,
    report: MigrationReport,
    progress: Progress,
    started: Instant,
    small: PagesBuilder,
    zero_run: Option<(u32, u32)>,
    zero_hash: [u8; 32],
    /// How both ends compute the final digest.
    digest_key: DigestKey,
    pause_started: Option<Instant>,
    /// Bytes per second the link carried in the last long enough round.
    bandwidth: Option<f64>,
    /// The current round's estimated bytes, and the stream position it began at.
    round_estimate: (u64, u64),
    /// `templates+zstd`: when compressing pays.
    gauge: Arc<Gauge>,
    /// Full-page frame bytes written and the time the writes took, since
    /// the gauge last heard of the link.
    link_sample: LinkSample,
}

/// Runs one migration; the final report on success.
pub fn send(options: &SendOptions) -> anyhow::Result<MigrationReport> {
    let started = Instant::now();
    let mut vmm = vmm::connect(&options.vmm_socket)?;
    let info = vmm.info()?;
    if info.pid != options.pid {
        bail!(
            "the VMM at {} is pid {}, not {}: check --pid and --vmm-socket",
            options.vmm_socket.display(),
            info.pid,
            options.pid
        );
    }
    if info.state != "running" {
        bail!(
            "the source VM is {}, not running: nothing to migrate",
            info.state
        );
    }
    // The agent must track the VM: its hash lists drive the rounds.
    client::get_blocking(&options.agent_socket, &format!("/v1/vms/{}", options.pid)).with_context(|| {
        format!(
            "the agent does not track VM pid {}; migration needs its dirty tracking (see `pagefp status`)",
            options.pid
        )
    })?;
    let regions: Vec<Region> = info
        .memory
        .iter()
        .map(|m| Region {
            slot: m.slot,
            gpa: m.gpa,
            size: m.size,
            read_only: m.read_only,
        })
        .collect();
    let layout = Layout::new(regions)?;
    let uaddrs: Vec<u64> = layout
        .regions
        .iter()
        .map(|r| info.memory.iter().find(|m| m.slot == r.slot).unwrap().uaddr)
        .collect();
    let memory = SourceMemory::open(options.pid, layout.clone(), &uaddrs)?;
    let opened = started.elapsed().as_secs_f64();

    let id = format!(
        "{}-{}",
        options.pid,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let mut report = MigrationReport {
        mem_bytes: layout.bytes(),
        remaining_bytes: layout.bytes(),
        ..MigrationReport::new(
            id.clone(),
            Role::Source,
            options.mode,
            options.pid,
            options.to.clone(),
        )
    };
    report.timeline.push(("memory_opened".into(), opened));
    let mut progress = Progress::new(options.progress, Some(options.agent_socket.clone()));
    progress.update(&report);

    // The first hash list (a whole one) while the connection is made.
    let first_list = {
        let (socket, pid, layout) = (options.agent_socket.clone(), options.pid, layout.clone());
        std::thread::spawn(move || (page_states(&socket, pid, &layout, None), Instant::now()))
    };
    report
        .timeline
        .push(("connecting".into(), started.elapsed().as_secs_f64()));
    let connected = net::connect(&options.to, &options.security, Duration::ZERO)
        .with_context(|| format!("cannot reach `pagefp migrate receive` at {}", options.to));
    let (read_half, write_half) = match connected {
        Ok(channel) => {
            report.tls = channel.protection.is_tls();
            report.channel = channel.protection.describe();
            log::info!("connected to {}: {}", options.to, report.channel);
            let deadline = Some(started + options.timeouts.deadline());
            let (mut read_half, mut write_half) =
                channel.split(Some(options.timeouts.io_timeout()));
            read_half.set_deadline(deadline);
            write_half.set_deadline(deadline);
            (read_half, write_half)
        }
        Err(err) => {
            report.phase = Phase::Failed;
            report.error = Some(format!("{err:#}"));
            progress.update(&report);
            return Err(
                err.context("migration failed before it started; the source VM keeps running")
            );
        }
    };
    let mut sender = Sender {
        options,
        memory: Arc::new(memory),
        writer: FrameWriter::new(BufWriter::with_capacity(
            512 << 10,
            Paced::new(write_half, options.max_bandwidth),
        )),
        reader: FrameReader::new(BufReader::new(read_half)),
        offer: HashMap::new(),
        held: vec![None; layout.pages() as usize],
        report,
        progress,
        started,
        small: PagesBuilder::default(),
        zero_run: None,
        zero_hash: zero_page_hash(),
        digest_key: DigestKey::fresh(CHUNK_PAGES)?,
        pause_started: None,
        bandwidth: options.max_bandwidth.map(|b| b as f64),
        round_estimate: (0, 0),
        gauge: Arc::new(Gauge::new(
            options.zstd_policy,
            options.threads,
            options.zstd_level,
        )),
        link_sample: LinkSample::default(),
    };
    let mut paused = false;
    let outcome = sender.run(vmm.as_mut(), &mut paused, first_list);
    sender.report.elapsed_seconds = sender.started.elapsed().as_secs_f64();
    sender.report.cpu_seconds = crate::clock::process_cpu_ns() as f64 / 1e9;
    if options.mode.uses_zstd() {
        sender.report.compression = Some(sender.gauge.describe());
    }
    match outcome {
        Ok(()) => {
            sender.report.phase = Phase::Completed;
            sender.report.remaining_bytes = 0;
            sender.progress.update(&sender.report);
            if !options.keep_source {
                vmm.exit()
                    .context("the migration succeeded, but the source VMM did not exit")?;
            }
            Ok(sender.report)
        }
        Err(Failure::BeforeGo(err)) => {
            let _ = sender.writer.abort(&format!("{err:#}"));
            let _ = sender.writer.flush();
            let resumed = if paused { vmm.resume() } else { Ok(()) };
            sender.report.phase = Phase::Failed;
            sender.report.error = Some(format!("{err:#}"));
            sender.progress.update(&sender.report);
            match resumed {
                Ok(()) => Err(err.context("migration failed; the source VM keeps running")),
                Err(resume_err) => Err(err.context(format!(
                    "migration failed, and resuming the source VM failed too ({resume_err:#}); resume it by hand"
                ))),
            }
        }
        Err(Failure::AfterGo(err)) => {
            sender.report.phase = Phase::Failed;
            sender.report.error = Some(format!("{err:#}"));
            sender.progress.update(&sender.report);
            Err(err.context(
                "the destination was told to resume but did not confirm; the source VM stays paused. \
                 Check the destination: if its VM runs, stop the source VMM; if not, resume the source",
            ))
        }
    }
}

/// The agent's view of every page, after it applied all events so far:
/// `previous` (the last list) updated with what changed since, or a
/// whole list.
fn page_states(
    agent_socket: &std::path::Path,
    pid: u32,
    layout: &Layout,
    previous: Option<PageStates>,
) -> anyhow::Result<PageStates> {
    let path = match &previous {
        Some(previous) => format!("/v1/vms/{pid}/hashes?since={}", previous.token),
        None => format!("/v1/vms/{pid}/hashes"),
    };
    let asked = Instant::now();
    let bytes = client::get_blocking(agent_socket, &path)
        .with_context(|| format!("asking the agent for the pages of VM pid {pid}"))?;
    let received = Instant::now();
    let got = received.duration_since(asked);
    let list = parse_hash_list(&bytes).map_err(anyhow::Error::msg)?;
    log::debug!(
        "hash list of {} bytes: {:.1} ms from the agent, {:.1} ms to parse",
        bytes.len(),
        got.as_secs_f64() * 1e3,
        asked.elapsed().saturating_sub(got).as_secs_f64() * 1e3
    );
    let pages = layout.pages() as usize;
    let mut states = match previous {
        Some(previous) if list.is_delta() => previous,
        None if list.is_delta() => {
            bail!("the agent sent changes to a hash list this migration never asked for")
        }
        // Whole: what it does not name is unknown.
        _ => PageStates {
            state: vec![state::UNKNOWN; pages],
            hash: vec![[0; 32]; pages],
            token: String::new(),
            received,
        },
    };
    for record in &list.records {
        if let Some(page) = layout.page_of_gpa(record.gpa) {
            states.state[page as usize] = record.state;
            states.hash[page as usize] = record.hash;
        }
    }
    states.token = list.token;
    states.received = received;
    Ok(states)
}

enum Failure {
    BeforeGo(anyhow::Error),
    AfterGo(anyhow::Error),
}

impl Sender<'_> {
    fn run(
        &mut self,
        vmm: &mut dyn VmmControl,
        paused: &mut bool,
        first_list: FirstList,
    ) -> Result<(), Failure> {
        self.precopy(vmm, paused, first_list)
            .map_err(Failure::BeforeGo)?;
        // The last moment a signal can still keep the VM here.
        interrupt::check().map_err(Failure::BeforeGo)?;
        // Go: from here the destination owns the VM, and the source never
        // resumes on its own (a lost "go" cannot be told from a lost answer).
        self.writer
            .frame(Kind::Go, 0, &[])
            .and_then(|_| self.writer.flush())
            .context("sending go")
            // Part of "go" may have left: the destination may run the VM.
            .map_err(Failure::AfterGo)?;
        let resumed: Resumed = self
            .reader
            .expect(Kind::Resumed)
            .and_then(|f| f.json())
            .context("waiting for the destination to resume")
            .map_err(Failure::AfterGo)?;
        let before = self
            .report
            .downtime_parts_ms
            .iter()
            .map(|p| p.1)
            .sum::<f64>();
        let downtime = self
            .pause_started
            .map(|t| t.elapsed().as_secs_f64() * 1000.0);
        if let Some(total) = downtime {
            self.report
                .downtime_parts_ms
                .push(("go_resumed".into(), total - before));
        }
        self.report.downtime_ms = downtime;
        self.mark("resumed");
        log::info!(
            "destination VM resumed (pid {}); downtime {:.0} ms",
            resumed.pid,
            downtime.unwrap_or(0.0)
        );
        Ok(())
    }
}

impl Sender<'_> {
    fn negotiate(&mut self, states: &PageStates) -> anyhow::Result<()> {
        let started = Instant::now();
        self.report.phase = Phase::Negotiating;
        self.progress.update(&self.report);
        // The VM's distinct non-zero contents the agent knows, in page
        // order: what a destination that asks is told.
        let query: Vec<TemplateId> = if self.options.mode.uses_templates() {
            listed_contents(states.state.iter().copied().zip(&states.hash))
        } else {
            Vec::new()
        };
        let hello = Hello {
            id: self.report.id.clone(),
            mode: self.options.mode,
            page_size: PAGE_SIZE as u32,
            regions: self.memory.layout.regions.clone(),
            source: self.report.vm_name.clone(),
            digest_chunk_pages: self.digest_key.chunk_pages,
            digest_seed: self.digest_key.seed,
            query_hashes: query.len() as u64,
        };
        self.writer.preamble()?;
        self.writer.json(Kind::Hello, &hello)?;
        self.writer.flush()?;
        let frame = self.reader.frame()?;
        match frame.kind {
            Kind::Offer => {
                let ids = wire::decode_offer(&frame)?;
                if self.options.mode.uses_templates() {
                    self.offer = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| (*id, i as u32))
                        .collect();
                } else if !ids.is_empty() {
                    bail!("the destination offered templates to a baseline migration");
                }
                self.report.negotiation = Some(format!("offer: {} templates", ids.len()));
            }
            Kind::WantHashes if !query.is_empty() => {
                self.offer = query::ask(&mut self.reader, &mut self.writer, &query)?;
                self.report.negotiation = Some(format!(
                    "query: {} of the VM's {} contents held",
                    self.offer.len(),
                    query.len()
                ));
            }
            _ => {
                return Err(WireError::Unexpected {
                    protocol: "migration",
                    expected: "Offer (or WantHashes after a Hello with hashes)".into(),
                    got: format!("{:?}", frame.kind),
                    offset: frame.offset,
                }
                .into());
            }
        }
        self.report.templates_agreed = self.offer.len() as u64;
        self.report.negotiation_bytes = self.writer.bytes + self.reader.bytes;
        self.report.negotiation_seconds = started.elapsed().as_secs_f64();
        self.sync_bytes();
        log::info!(
            "{} ({} bytes of negotiation)",
            self.report.negotiation.as_deref().unwrap_or_default(),
            self.report.negotiation_bytes
        );
        Ok(())
    }

    /// Notes in the report's timeline that `step` ended now.
    fn mark(&mut self, step: impl Into<String>) {
        let at = self.started.elapsed().as_secs_f64();
        self.report.timeline.push((step.into(), at));
    }

    fn sync_bytes(&mut self) {
        self.report.wire_bytes = self.writer.bytes + self.reader.bytes;
        self.report.elapsed_seconds = self.started.elapsed().as_secs_f64();
        self.report.cpu_seconds = crate::clock::process_cpu_ns() as f64 / 1e9;
    }

    /// [`page_states`] of this migration's VM.
    fn page_states(&self, previous: Option<PageStates>) -> anyhow::Result<PageStates> {
        page_states(
            &self.options.agent_socket,
            self.options.pid,
            &self.memory.layout,
            previous,
        )
    }

    /// Pages whose content may differ from what the destination holds.
    fn candidates(&self, states: &PageStates) -> Vec<u32> {
        (0..self.memory.layout.pages())
            .filter(|&p| {
                let p = p as usize;
                !(states.state[p] == state::CLEAN && self.held[p] == Some(states.hash[p]))
            })
            .collect()
    }

    /// Wire bytes per non-zero page sent so far (4 KiB before any): the
    /// pages left after the first round are written ones, rarely zero.
    fn bytes_per_page(&self) -> f64 {
        let (pages, bytes) = (&self.report.pages, &self.report.bytes);
        let sent = pages.template + pages.full + pages.zstd;
        if sent == 0 {
            FULL_LEN as f64
        } else {
            ((bytes.template + bytes.full + bytes.zstd) as f64 / sent as f64)
                .max(TEMPLATE_LEN as f64)
        }
    }

    fn precopy(
        &mut self,
        vmm: &mut dyn VmmControl,
        paused: &mut bool,
        first_list: FirstList,
    ) -> anyhow::Result<()> {
        self.mark("connected");
        let (states, answered) = first_list.join().map_err(|_| {
            anyhow::anyhow!("the thread asking the agent for the hash list panicked")
        })?;
        let mut states = states?;
        let mut taken = Instant::now();
        // When the agent's answer was in (the connection was made
        // meanwhile), and when the sender took it.
        let since_start = |at: Instant| at.duration_since(self.started).as_secs_f64();
        self.report
            .timeline
            .push(("hash_list_received".into(), since_start(states.received)));
        self.report
            .timeline
            .push(("hash_list_answered".into(), since_start(answered)));
        self.mark("hash_list");
        self.negotiate(&states)?;
        self.mark("negotiated");
        // The page tables of the whole memory, filled while round 1 waits
        // on the link: the digest while paused reads every page.
        let memory = Arc::clone(&self.memory);
        std::thread::spawn(move || memory.populate());
        self.report.phase = Phase::Precopy;
        let target = Duration::from_millis(self.options.downtime_ms).as_secs_f64();
        // What the guest wrote while the negotiation ran is in the next
        // list: the first round sends from the list taken before it.
        let mut previous = usize::MAX;
        let mut stalled = 0;
        // Where the memory's files have holes, found on a thread while the
        // last round drains from the socket buffers: at the pause only
        // these are looked at again. Found after the round's
        // acknowledgment, they held up the pause by 5-10 ms (8 guests at
        // 1 Gbit/s).
        let mut holes_ahead: Option<std::thread::JoinHandle<Vec<bool>>> = None;
        loop {
            interrupt::check()?;
            let candidates = self.candidates(&states);
            // Rounds that barely shrink what is left: the guest dirties as
            // fast as the link carries.
            stalled = if (candidates.len() as u64) * 20 >= (previous as u64).saturating_mul(19) {
                stalled + 1
            } else {
                0
            };
            previous = candidates.len();
            let estimate = candidates.len() as f64 * self.bytes_per_page();
            self.report.remaining_bytes = estimate as u64;
            if self.report.round >= 1 {
                let seconds = self.bandwidth.map_or(f64::INFINITY, |bw| estimate / bw);
                if seconds <= target {
                    break;
                }
                if stalled >= STALLED_ROUNDS {
                    log::warn!(
                        "pre-copy is not converging ({} pages left after {} rounds that did not shrink it): pausing now, ~{:.0} ms of data left (downtime target {} ms)",
                        candidates.len(),
                        STALLED_ROUNDS,
                        seconds * 1000.0,
                        self.options.downtime_ms
                    );
                    break;
                }
                if self.report.round >= self.options.max_rounds {
                    log::warn!(
                        "the guest dirties memory faster than the link carries it: stopping after {} rounds with ~{:.0} ms of data left (downtime target {} ms)",
                        self.report.round,
                        seconds * 1000.0,
                        self.options.downtime_ms
                    );
                    break;
                }
            }
            self.report.round += 1;
            let round_start = Instant::now();
            let bytes_before = self.writer.bytes;
            self.round_estimate = (estimate as u64, bytes_before);
            self.send_pages(&candidates, &states)?;
            self.mark(format!("round {} sent", self.report.round));
            let round = RoundEnd {
                round: self.report.round,
                last: false,
                pages_sent: candidates.len() as u64,
                pages_remaining: 0,
                dirty_pages_per_second: self.report.dirty_pages_per_second,
            };
            self.writer.json(Kind::RoundEnd, &round)?;
            self.writer.flush()?;
            let memory = Arc::clone(&self.memory);
            holes_ahead = Some(std::thread::spawn(move || memory.holes()));
            // The next hash list, while the round drains from the socket
            // buffers (the final list, after the pause, is the one that
            // counts; this one decides whether to pause).
            let since = taken.elapsed().as_secs_f64();
            states = self.page_states(Some(states))?;
            taken = Instant::now();
            // Wait until the round arrived: data still queued in socket
            // buffers would otherwise be sent during the downtime, and the
            // bandwidth would be overestimated.
            let ack: RoundEnd = self.reader.expect(Kind::RoundAck)?.json()?;
            if ack.round != round.round {
                bail!(
                    "the destination acknowledged round {} instead of {}",
                    ack.round,
                    round.round
                );
            }
            self.mark(format!("round {} acknowledged", self.report.round));
            let seconds = round_start.elapsed().as_secs_f64();
            let sent = (self.writer.bytes - bytes_before) as f64;
            // Short rounds mostly fill socket buffers: no bandwidth signal.
            if seconds > 0.25 && sent > 1e6 {
                let measured = sent / seconds;
                self.bandwidth = Some(
                    self.options
                        .max_bandwidth
                        .map_or(measured, |m| measured.min(m as f64)),
                );
            }
            let dirtied = self.candidates(&states).len();
            self.report.dirty_pages_per_second = dirtied as f64 / since.max(1e-3);
            self.sync_bytes();
            self.report.remaining_bytes = (dirtied as f64 * self.bytes_per_page()) as u64;
            self.progress
                .round(&self.report, candidates.len() as u64, seconds);
            self.progress.update(&self.report);
        }

        // Stop and copy.
        self.report.phase = Phase::StopAndCopy;
        self.progress.update(&self.report);
        // The holes while the VM still runs (a thread that died left none:
        // found here then).
        let holes_before = holes_ahead
            .and_then(|found| found.join().ok())
            .unwrap_or_else(|| self.memory.holes());
        vmm.pause().context("pausing the source VM")?;
        *paused = true;
        self.pause_started = Some(Instant::now());
        self.mark("paused");
        // The memory's holes now, from those found just before the pause:
        // found afresh, they took 5.2 ms of the downtime (median, 8 guests
        // at 1 Gbit/s).
        let holes = self.memory.holes_since(&holes_before);
        // The digest of all memory, independent of the tracking, computed
        // while the last pages go out: on `--threads` threads, as the
        // pages (the host's other guests keep the rest of its cores, and
        // here the agent's final hash list and the last pages need one),
        // then this one joins in.
        let memory = Arc::clone(&self.memory);
        let key = self.digest_key;
        let digest = Arc::new(DigestJob::new(
            memory.layout.pages(),
            key,
            holes.into(),
            move |page, buf: &mut [u8]| memory.with_page(page, buf, |data| key.page(data)),
        ));
        let helpers: Vec<_> = (0..self.options.threads.max(1))
            .map(|_| {
                let job = Arc::clone(&digest);
                std::thread::spawn(move || job.work())
            })
            .collect();
        // The parts add up to the downtime: the first is the digest's
        // set-up (the holes checked again, its threads started).
        let mut mark = self.pause_started.unwrap_or_else(Instant::now);
        let mut part = |report: &mut MigrationReport, name: &str| {
            report
                .downtime_parts_ms
                .push((name.to_string(), mark.elapsed().as_secs_f64() * 1000.0));
            mark = Instant::now();
        };
        part(&mut self.report, "digest_start");
        let states = self.page_states(Some(states))?;
        let candidates = self.candidates(&states);
        part(&mut self.report, "hash_list");
        self.report.round += 1;
        self.report.final_pages = candidates.len() as u64;
        self.send_pages(&candidates, &states)?;
        let round = RoundEnd {
            round: self.report.round,
            last: true,
            pages_sent: candidates.len() as u64,
            pages_remaining: 0,
            dirty_pages_per_second: self.report.dirty_pages_per_second,
        };
        self.writer.json(Kind::RoundEnd, &round)?;
        let vm_state = vmm.save_state().context("saving the source VM's state")?;
        self.writer.frame(Kind::State, 0, &vm_state)?;
        // Out now, not with the digest: the destination reads its memory
        // back and loads the state while the digest is computed here.
        self.writer.flush()?;
        part(&mut self.report, "last_pages");

        self.report.phase = Phase::Verifying;
        self.progress.update(&self.report);
        digest.work()?;
        for helper in helpers {
            helper
                .join()
                .map_err(|_| anyhow::anyhow!("a digest thread panicked"))??;
        }
        let digests = Arc::into_inner(digest)
            .context("a digest thread still holds the digest")?
            .digests()?;
        part(&mut self.report, "source_digest");
        self.writer.frame(
            Kind::Verify,
            0,
            &wire::encode_digest(self.digest_key.chunk_pages, &digests),
        )?;
        self.writer.flush()?;
        let ready: Ready = self.reader.expect(Kind::Ready)?.json()?;
        part(&mut self.report, "destination_check");
        self.sync_bytes();
        if !ready.verified {
            bail!(
                "the destination's memory differs from the source in {} chunk(s) of {} pages (first: {:?}); \
                 this is a pagefp bug, please report it",
                ready.mismatched_chunks.len(),
                self.digest_key.chunk_pages,
                ready.mismatched_chunks.first()
            );
        }
        self.report.verified = true;
        self.mark("verified");
        self.report.remaining_bytes = 0;
        log::info!(
            "final round: {} pages; destination memory verified against the source",
            candidates.len()
        );
        Ok(())
    }

    /// Sends `pages`, each in the encoding it needs: the per-page work on
    /// the encoding threads ([`encode`]), written here in order.
    fn send_pages(&mut self, pages: &[u32], states: &PageStates) -> anyhow::Result<()> {
        let memory = self.memory.clone();
        let offer = std::mem::take(&mut self.offer);
        let gauge = self.gauge.clone();
        let encoder = Encoder {
            memory: &memory,
            hints: states,
            offer: &offer,
            zero_hash: self.zero_hash,
            zstd: self.options.mode.uses_zstd().then_some(&*gauge),
            threads: self.options.threads,
        };
        let sent = encoder.run(pages, |batch| self.write_batch(batch));
        self.offer = offer;
        sent?;
        self.flush_zero_run();
        self.flush_small()
    }

    fn write_batch(&mut self, batch: Batch) -> anyhow::Result<()> {
        interrupt::check()?;
        for (page, hash) in batch.held {
            self.held[page as usize] = Some(hash);
        }
        for small in batch.small {
            match small {
                Small::Zero(page) => self.zero(page),
                Small::Template { page, index } => self.template(page, index)?,
            }
        }
        // The batch's zero and template records go out before its full
        // pages, so the destination writes every page in about the order
        // of its address (a batch spans fewer pages than a digest chunk):
        // its read-back takes a chunk as soon as the writes have passed
        // it. Held for 8192 records, they reached the destination up to
        // eight chunks behind the full pages around them, and the
        // read-back of most of a templates migration's memory was left for
        // the round's end and the pause (53 of 65 chunks at round 1's end).
        self.flush_zero_run();
        self.flush_small()?;
        for frame in batch.frames {
            let flags = if frame.zstd { FLAG_ZSTD } else { 0 };
            let started = Instant::now();
            let wire = self.writer.frame(Kind::Pages, flags, &frame.body)? as u64;
            self.link_sample.add(
                &self.gauge,
                wire as usize,
                started.elapsed().as_nanos() as u64,
            );
            if frame.zstd {
                self.report.pages.zstd += frame.pages;
                self.report.bytes.zstd += wire;
            } else {
                self.report.pages.full += frame.pages;
                self.report.bytes.full += wire;
            }
            self.after_write();
        }
        Ok(())
    }

    fn zero(&mut self, page: u32) {
        self.report.pages.zero += 1;
        match &mut self.zero_run {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => {
                self.flush_zero_run();
                self.zero_run = Some((page, 1));
            }
        }
    }

    fn flush_zero_run(&mut self) {
        if let Some((first, count)) = self.zero_run.take() {
            self.small.zero_run(first, count);
            self.report.bytes.zero += ZERO_RUN_LEN as u64;
        }
    }

    fn template(&mut self, page: u32, index: u32) -> anyhow::Result<()> {
        self.small.template(page, index);
        self.report.pages.template += 1;
        self.report.bytes.template += TEMPLATE_LEN as u64;
        Ok(())
    }

    fn flush_small(&mut self) -> anyhow::Result<()> {
        if !self.small.is_empty() {
            let framing =
                self.writer.frame(Kind::Pages, 0, &self.small.buf)? - self.small.buf.len();
            // Frame overhead goes to the encodings by share; keep it simple:
            // count it as zero/template bytes, split evenly.
            self.report.bytes.template += framing as u64 / 2;
            self.report.bytes.zero += framing as u64 - framing as u64 / 2;
            self.small.clear();
            self.after_write();
        }
        Ok(())
    }

    fn after_write(&mut self) {
        self.sync_bytes();
        let (estimate, start) = self.round_estimate;
        self.report.remaining_bytes = estimate.saturating_sub(self.writer.bytes - start);
        self.progress.update(&self.report);
    }
}
