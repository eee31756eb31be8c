//! The tracker thread: owns the eBPF maps, turns kernel events into registry
//! changes, watches for losses, and feeds the hash pool.
//!
//! Readers of the registry that must not see anything older than "now" (the
//! API's hash lists) ask it for a sync: it drains the ring buffer and applies
//! every event before answering.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::LossRecord;
use crossbeam::channel::{Receiver, Sender};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::eventfd::{EfdFlags, EventFd},
};

use super::ebpf::{Probes, Record};
use crate::{
    clock::monotonic_ns,
    hasher::HashPool,
    registry::{HashJob, JobPages, Purpose, Registry},
};

/// Tuning of the tracker loop.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Pages per second the rescan of untracked VMs may read.
    pub rescan_pages_per_sec: u32,
    /// How long a re-protected page must stay unwritten before it is
    /// rehashed: pages the guest keeps writing are not hashed over and over.
    pub rehash_delay: Duration,
    /// How often to look for QEMU guests without KVM on shared memory
    /// ([`crate::tracking::qemu_guests`]); never if `None`.
    pub qemu_scan: Option<Duration>,
    /// Track only the VMs whose process environment holds this
    /// `NAME=VALUE` (every VM if `None`).
    pub only_vms_with_env: Option<String>,
}

/// Which processes' VMs this agent tracks: all, or those started with an
/// environment entry (one agent per simulated host, or per tenant). The
/// answer is read once per process from `/proc/PID/environ`.
#[derive(Debug, Default)]
struct VmSelection {
    entry: Option<String>,
    known: std::collections::HashMap<u32, bool>,
}

impl VmSelection {
    fn selects(&mut self, pid: u32) -> bool {
        let Some(entry) = &self.entry else {
            return true;
        };
        *self
            .known
            .entry(pid)
            .or_insert_with(|| crate::procfs::environ_has(pid, entry))
    }

    /// Forgets processes that are gone (their pid may be reused).
    fn prune(&mut self) {
        self.known.retain(|pid, _| crate::procfs::exists(*pid));
    }
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct TrackerStats {
    pub events: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
}

/// A handle to ask the tracker to apply every pending event.
#[derive(Clone)]
pub struct SyncHandle {
    tx: Sender<Sender<()>>,
    /// Wakes the tracker from its wait for kernel events (without it, a
    /// request waits for the wait's timeout: up to 10 ms of a migration's
    /// downtime, at each hash list).
    wake: Option<Arc<EventFd>>,
}

impl SyncHandle {
    /// Returns once every event the kernel had produced before the call has
    /// been applied (or the tracker is gone).
    pub fn sync(&self) {
        let (done_tx, done_rx) = crossbeam::channel::bounded(1);
        if self.tx.send(done_tx).is_ok() {
            if let Some(wake) = &self.wake {
                // Fails only when the counter is saturated: awake anyway.
                let _ = wake.write(1);
            }
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

pub struct Tracker {
    probes: Probes,
    registry: Arc<Mutex<Registry>>,
    pool: Arc<HashPool>,
    config: TrackerConfig,
    sync_rx: Receiver<Sender<()>>,
    /// Written by [`SyncHandle::sync`]: ends [`Tracker::wait`] early.
    wake: Option<Arc<EventFd>>,
    stop: Arc<AtomicBool>,
    pub stats: Arc<TrackerStats>,
    seen_losses: HashMap<u32, LossRecord>,
    seen_unattributed: LossRecord,
    /// [`Probes::loss_count`] when the records were last read.
    seen_loss_count: u64,
    selection: VmSelection,
}

impl Tracker {
    pub fn new(
        probes: Probes,
        registry: Arc<Mutex<Registry>>,
        pool: Arc<HashPool>,
        config: TrackerConfig,
        stop: Arc<AtomicBool>,
    ) -> (Self, SyncHandle) {
        let (tx, sync_rx) = crossbeam::channel::unbounded();
        let wake = match EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        ) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(err) => {
                log::warn!(
                    "no eventfd ({err}): hash lists wait up to 10 ms for the tracker to notice them"
                );
                None
            }
        };
        let selection = VmSelection {
            entry: config.only_vms_with_env.clone(),
            known: Default::default(),
        };
        let mut tracker = Self {
            probes,
            registry,
            pool,
            config,
            sync_rx,
            wake: wake.clone(),
            stop,
            stats: Arc::default(),
            seen_losses: HashMap::new(),
            seen_unattributed: LossRecord::default(),
            seen_loss_count: 0,
            selection,
        };
        // Losses from before the start concern VMs adopted as unsynced anyway.
        tracker.seen_loss_count = tracker.probes.loss_count();
        let (per_pid, unattributed) = tracker.probes.losses();
        tracker.seen_losses = per_pid.into_iter().collect();
        tracker.seen_unattributed = unattributed;
        (tracker, SyncHandle { tx, wake })
    }

    /// Registers VMs found running at start and lets the kernel side report
    /// their exit.
    pub fn adopt_running(&mut self, pids: &[u32]) {
        let now = monotonic_ns();
        let mut registry = self.registry.lock().unwrap();
        for pid in pids {
            if !self.selection.selects(*pid) {
                continue;
            }
            registry.adopt(*pid, now);
            let _ = self.probes.vm_pids.insert(pid, 1, 0);
        }
        registry.name_new_vms(crate::procfs::process_name);
    }

    pub fn run(mut self) {
        let mut batch: Vec<Record> = Vec::with_capacity(4096);
        let mut delayed: std::collections::VecDeque<(Instant, HashJob)> =
            std::collections::VecDeque::new();
        let mut last_rescan = Instant::now();
        let mut last_reap = Instant::now();
        let mut last_qemu_scan: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let shared_ram = self.config.qemu_scan.and_then(|every| {
                if last_qemu_scan.is_some_and(|at| at.elapsed() < every) {
                    return None;
                }
                last_qemu_scan = Some(Instant::now());
                // Read /proc outside the registry lock.
                let mut guests = crate::tracking::qemu_guests::find();
                guests.retain(|guest| self.selection.selects(guest.pid));
                Some(guests)
            });
            self.wait(Duration::from_millis(10));
            if let Some(logger) = &mut self.probes.logger {
                logger.flush();
            }
            let waiting: Vec<Sender<()>> =
                std::iter::from_fn(|| self.sync_rx.try_recv().ok()).collect();
            batch.clear();
            self.probes.drain(&mut batch);
            if self.selection.entry.is_some() {
                let selection = &mut self.selection;
                batch.retain(|record| {
                    selection.selects(match record {
                        Record::Event(event) => event.pid(),
                        Record::Bitmap(chunk) => chunk.pid(),
                    })
                });
            }
            let registry_handle = self.registry.clone();
            let jobs = {
                let mut registry = registry_handle.lock().unwrap();
                for record in &mut batch {
                    match record {
                        Record::Event(event) => registry.apply(event),
                        Record::Bitmap(chunk) => registry.apply_bitmap(chunk),
                    }
                }
                if let Some(guests) = &shared_ram {
                    for guest in guests {
                        if registry.vm(guest.pid).is_none() {
                            log::info!(
                                "QEMU guest pid {} without KVM: {} MiB of shared RAM adopted, rescanned (unverified)",
                                guest.pid,
                                guest.regions.iter().map(|r| r.size).sum::<u64>() >> 20
                            );
                        }
                        registry.adopt_shared_ram(guest);
                        let _ = self.probes.vm_pids.insert(guest.pid, 1, 0);
                    }
                    let found: Vec<u32> = guests.iter().map(|guest| guest.pid).collect();
                    registry.drop_shared_ram_except(&found);
                }
                self.check_losses(&mut registry);
                registry.name_new_vms(crate::procfs::process_name);
                if last_reap.elapsed() >= Duration::from_secs(1) {
                    if self.pool.pending() == 0 {
                        release_free_memory();
                    }
                    registry.sample_rates(last_reap.elapsed().as_secs_f64());
                    last_reap = Instant::now();
                    registry.reap_gone(crate::procfs::exists);
                    self.selection.prune();
                    // Slots deleted or registered anew since.
                    self.pool.prune(&registry);
                }
                // VMs gone (exit event or reaped): drop their mappings, or
                // their RAM stays allocated for as long as the agent runs.
                let removed = registry.take_removed();
                for pid in &removed {
                    self.probes.forget_vm(*pid);
                }
                if !removed.is_empty() {
                    self.pool.prune(&registry);
                }
                let mut jobs = registry.take_jobs();
                let elapsed = last_rescan.elapsed();
                if elapsed >= Duration::from_millis(100) && self.pool.pending() == 0 {
                    last_rescan = Instant::now();
                    let budget = (f64::from(self.config.rescan_pages_per_sec)
                        * elapsed.as_secs_f64()) as u32;
                    jobs.extend(registry.rescan_jobs(budget));
                }
                jobs
            };
            self.stats
                .events
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let mut ready = Vec::new();
            for job in jobs {
                if matches!(job.pages, JobPages::List(_))
                    && job.purpose == Purpose::Track
                    && !self.config.rehash_delay.is_zero()
                {
                    delayed.push_back((now + self.config.rehash_delay, job));
                } else {
                    ready.push(job);
                }
            }
            while delayed.front().is_some_and(|(due, _)| *due <= now) {
                ready.push(delayed.pop_front().unwrap().1);
            }
            self.pool.submit(ready);
            for done in waiting {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                let _ = done.send(());
            }
        }
    }

    fn wait(&self, timeout: Duration) {
        let events = self.probes.events.as_fd();
        let mut fds = vec![PollFd::new(events, PollFlags::POLLIN)];
        let logger_fd;
        if let Some(logger) = &self.probes.logger {
            logger_fd = logger.as_raw_fd();
            // SAFETY: the logger (and its fd) outlives this poll call.
            fds.push(PollFd::new(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(logger_fd) },
                PollFlags::POLLIN,
            ));
        }
        if let Some(wake) = &self.wake {
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
        }
        if !self.sync_rx.is_empty() {
            return;
        }
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(timeout.as_millis() as i32).unwrap_or(PollTimeout::ZERO),
        );
        if let Some(wake) = &self.wake {
            // Non-blocking: EAGAIN when nobody asked.
            let _ = wake.read();
        }
    }

    fn check_losses(&mut self, registry: &mut Registry) {
        // Read before the records: a loss recorded meanwhile moves it again.
        let count = self.probes.loss_count();
        if count == self.seen_loss_count {
            return;
        }
        self.seen_loss_count = count;
        let (per_pid, unattributed) = self.probes.losses();
        for (pid, record) in per_pid {
            if self.seen_losses.get(&pid) != Some(&record) {
                let quiet = self.seen_losses.get(&pid).is_some_and(|seen| {
                    record.last_ktime_ns.saturating_sub(seen.last_ktime_ns) < 5_000_000_000
                });
                if !quiet {
                    log::warn!(
                        "{} eBPF events of pid {pid} lost so far: its pages are unknown until resynced (raise ring_buffer_bytes if this repeats)",
                        record.count
                    );
                }
                registry.note_loss(Some(pid), record.last_ktime_ns);
                self.seen_losses.insert(pid, record);
            }
        }
        if unattributed != self.seen_unattributed {
            log::warn!(
                "eBPF events of unknown VMs were lost: every VM's pages are unknown until resynced"
            );
            registry.note_loss(None, unattributed.last_ktime_ns);
            self.seen_unattributed = unattributed;
        }
    }
}

/// Gives memory freed by finished hash jobs back to the system (glibc keeps
/// it in per-thread arenas otherwise).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer changes.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Pids of processes that hold a KVM VM fd now.
pub fn find_running_vms() -> Vec<u32> {
    let mut pids: Vec<u32> = crate::procfs::pids()
        .filter(|pid| crate::procfs::holds_kvm_vm(*pid))
        .collect();
    pids.sort_unstable();
    pids
}
