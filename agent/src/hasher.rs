//! The hashing pipeline: a crossbeam worker pool that reads guest pages and
//! commits their blake3 hashes to the registry.
//!
//! A worker takes the page list and generations under the registry lock,
//! reads and hashes without it, then commits under the lock again; the
//! registry drops every hash whose page was written meanwhile.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use crossbeam::channel::{Receiver, Sender, unbounded};

use crate::{
    content::{PageHash, zero_page_hash},
    guest_memory::{GuestMapping, read_copied},
    page::{PAGE_SIZE, is_zero_page},
    registry::{ChangeCheck, HashJob, JobPages, Purpose, ReadPlan, Registry},
};

/// Pages one worker handles between two lock acquisitions.
pub const CHUNK_PAGES: u32 = 256;

/// Counters of the pool's work.
#[derive(Debug, Default)]
pub struct HashStats {
    pub pages_read: AtomicU64,
    pub pages_zero: AtomicU64,
    pub pages_unreadable: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub busy_ns: AtomicU64,
    pub reads_mapped: AtomicU64,
    pub reads_copied: AtomicU64,
    pub jobs_pending: AtomicU64,
    /// Pages read by rescans of untracked VMs, those whose xxh3 showed them
    /// unchanged (no blake3), and the busy time of rescan jobs.
    pub rescan_pages: AtomicU64,
    pub rescan_unchanged: AtomicU64,
    pub rescan_busy_ns: AtomicU64,
}

/// A copy of [`HashStats`] for the API.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct HashStatsView {
    pub pages_read: u64,
    pub pages_zero: u64,
    pub pages_unreadable: u64,
    pub bytes_hashed: u64,
    pub busy_ns: u64,
    pub reads_mapped: u64,
    pub reads_copied: u64,
    pub jobs_pending: u64,
    pub rescan_pages: u64,
    pub rescan_unchanged: u64,
    pub rescan_busy_ns: u64,
}

impl HashStats {
    pub fn view(&self) -> HashStatsView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HashStatsView {
            pages_read: get(&self.pages_read),
            pages_zero: get(&self.pages_zero),
            pages_unreadable: get(&self.pages_unreadable),
            bytes_hashed: get(&self.bytes_hashed),
            busy_ns: get(&self.busy_ns),
            reads_mapped: get(&self.reads_mapped),
            reads_copied: get(&self.reads_copied),
            jobs_pending: get(&self.jobs_pending),
            rescan_pages: get(&self.rescan_pages),
            rescan_unchanged: get(&self.rescan_unchanged),
            rescan_busy_ns: get(&self.rescan_busy_ns),
        }
    }
}

/// Mapped slots, keyed by (pid, uaddr, epoch); `None` means "not mappable".
type MappedCache = RwLock<HashMap<(u32, u64, u64), Option<Arc<GuestMapping>>>>;

/// Caches `mapped` under `key` = (pid, uaddr, epoch) if the VM still has
/// slot `slot` at that epoch, checked under the registry lock. The tracker
/// removes VMs and slots from the registry, and drops their cached
/// mappings ([`HashPool::prune`]), under that lock too: so a mapping made
/// while its VM exited is never cached after the VM's mappings were
/// dropped, and the exited VM's memory is released with the last reader's
/// reference.
fn cache_if_registered(
    registry: &Mutex<Registry>,
    cache: &MappedCache,
    key: (u32, u64, u64),
    slot: u32,
    mapped: Option<Arc<GuestMapping>>,
) {
    let registry = registry.lock().unwrap();
    let (pid, _, epoch) = key;
    let current = registry
        .vm(pid)
        .and_then(|vm| vm.slots.get(&slot))
        .is_some_and(|s| s.epoch == epoch);
    if current {
        cache.write().unwrap().insert(key, mapped);
    }
}

pub struct HashPool {
    tx: Option<Sender<HashJob>>,
    workers: Vec<JoinHandle<()>>,
    pub stats: Arc<HashStats>,
    mapped: Arc<MappedCache>,
}

impl HashPool {
    /// `threads` workers, each at nice value `nice` (0: the agent's own).
    pub fn new(
        threads: usize,
        nice: i32,
        registry: Arc<Mutex<Registry>>,
        zero_copy: bool,
        change_detection: bool,
    ) -> Self {
        let (tx, rx) = unbounded::<HashJob>();
        let stats = Arc::new(HashStats::default());
        let mapped: Arc<MappedCache> = Arc::default();
        let workers = (0..threads.max(1))
            .map(|i| {
                let worker = Worker {
                    rx: rx.clone(),
                    registry: registry.clone(),
                    stats: stats.clone(),
                    mapped: mapped.clone(),
                    zero_copy,
                    change_detection,
                };
                std::thread::Builder::new()
                    .name(format!("pagefp-hash-{i}"))
                    .spawn(move || {
                        if nice != 0 {
                            set_nice(nice);
                        }
                        worker.run()
                    })
                    .expect("spawning a hash worker thread")
            })
            .collect();
        Self {
            tx: Some(tx),
            workers,
            stats,
            mapped,
        }
    }

    /// Queues jobs, split into chunks.
    pub fn submit(&self, jobs: impl IntoIterator<Item = HashJob>) {
        let Some(tx) = &self.tx else { return };
        for job in jobs {
            for chunk in split(job) {
                self.stats.jobs_pending.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(chunk);
            }
        }
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> u64 {
        self.stats.jobs_pending.load(Ordering::Relaxed)
    }

    /// Drops the cached mappings of VMs and slots `registry` no longer
    /// has (the VM exited, the slot was deleted or registered anew): each
    /// holds its guest's memory for as long as it is cached. Called with
    /// the registry locked, after the changes.
    pub fn prune(&self, registry: &Registry) {
        self.mapped
            .write()
            .unwrap()
            .retain(|&(pid, uaddr, epoch), _| {
                registry.vm(pid).is_some_and(|vm| {
                    vm.slots
                        .values()
                        .any(|slot| slot.uaddr == uaddr && slot.epoch == epoch)
                })
            });
    }

    /// Mappings cached now (for tests and the agent's own figures).
    pub fn cached_mappings(&self) -> usize {
        self.mapped.read().unwrap().len()
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        self.tx.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Sets the calling thread's nice value (Linux: per thread). A worker that
/// cannot only hashes at the agent's priority.
fn set_nice(nice: i32) {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; PRIO_PROCESS with a thread id names only this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        log::warn!(
            "hash worker: cannot set nice {nice}: {}; it hashes at the agent's priority",
            std::io::Error::last_os_error()
        );
    }
}

fn split(job: HashJob) -> Vec<HashJob> {
    match &job.pages {
        JobPages::Range { first, count } if *count > CHUNK_PAGES => (0..count
            .div_ceil(CHUNK_PAGES))
            .map(|i| {
                let start = first + i * CHUNK_PAGES;
                HashJob {
                    pages: JobPages::Range {
                        first: start,
                        count: CHUNK_PAGES.min(first + count - start),
                    },
                    ..job.clone()
                }
            })
            .collect(),
        JobPages::List(list) if list.len() > CHUNK_PAGES as usize => list
            .chunks(CHUNK_PAGES as usize)
            .map(|pages| HashJob {
                pages: JobPages::List(pages.to_vec()),
                ..job.clone()
            })
            .collect(),
        _ => vec![job],
    }
}

struct Worker {
    rx: Receiver<HashJob>,
    registry: Arc<Mutex<Registry>>,
    stats: Arc<HashStats>,
    mapped: Arc<MappedCache>,
    zero_copy: bool,
    /// Rescans skip blake3 for pages whose xxh3 did not change.
    change_detection: bool,
}

impl Worker {
    fn run(self) {
        let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
        while let Ok(job) = self.rx.recv() {
            // Busy time is the worker's CPU time over the whole job (plan,
            // read, hash, commit; not time spent waiting for a core): the
            // benchmark divides pages by it for the per-core throughput.
            let started = crate::clock::thread_cpu_ns();
            let plan = self.registry.lock().unwrap().plan(&job);
            if let Some(mut plan) = plan {
                let hashes = self.hash(&job, &mut plan, &mut buf);
                plan.read_end_ns = crate::clock::monotonic_ns();
                self.registry.lock().unwrap().commit(&job, &plan, &hashes);
            }
            let busy = crate::clock::thread_cpu_ns().saturating_sub(started);
            self.stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
            if job.purpose == Purpose::Rescan {
                self.stats.rescan_busy_ns.fetch_add(busy, Ordering::Relaxed);
            }
            self.stats.jobs_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn mapping(&self, job: &HashJob, pid: u32, uaddr: u64) -> Option<Arc<GuestMapping>> {
        if !self.zero_copy {
            return None;
        }
        let key = (pid, uaddr, job.epoch);
        if let Some(found) = self.mapped.read().unwrap().get(&key) {
            return found.clone();
        }
        let size = {
            let registry = self.registry.lock().unwrap();
            registry
                .vm(pid)
                .and_then(|vm| vm.slots.get(&job.slot))
                .map(|slot| slot.size)
        }?;
        // Mapping a large slot takes a while: the VM may exit meanwhile.
        // Kept only if it is still registered then.
        let mapped = GuestMapping::open_sealed(pid, uaddr, size)
            .ok()
            .flatten()
            .map(Arc::new);
        cache_if_registered(&self.registry, &self.mapped, key, job.slot, mapped.clone());
        mapped
    }

    /// Hashes the pages of `plan` (a rescan's checks updated: see
    /// [`ReadPlan::checks`]).
    fn hash(&self, job: &HashJob, plan: &mut ReadPlan, buf: &mut [u8]) -> Vec<Option<PageHash>> {
        let pages: Vec<u32> = plan.pages.iter().map(|(page, _)| *page).collect();
        let n = pages.len() as u64;
        self.stats.pages_read.fetch_add(n, Ordering::Relaxed);
        if job.purpose == Purpose::Rescan {
            self.stats.rescan_pages.fetch_add(n, Ordering::Relaxed);
        }
        let checks = &mut plan.checks;
        let mut hash = |index: usize, bytes: &[u8]| match checks.get_mut(index) {
            Some(check) if self.change_detection => self.hash_unless_unchanged(bytes, check),
            _ => Some(self.hash_page(bytes)),
        };
        if let Some(mapped) = self.mapping(job, plan.pid, plan.uaddr) {
            self.stats.reads_mapped.fetch_add(n, Ordering::Relaxed);
            // A job whose pages all lie in a hole of the guest's memory
            // file reads as zeros; reading them through the mapping would
            // allocate memory the guest never used. (A guest write after
            // this look lands after the plan's read start, so its event
            // discards these hashes as for any read.)
            let first = pages.iter().copied().min().unwrap_or(0);
            let last = pages.iter().copied().max().map_or(0, |p| p + 1);
            if mapped.is_hole(first..last) {
                return (0..pages.len())
                    .map(|index| hash(index, &crate::page::ZERO_PAGE))
                    .collect();
            }
            if pages.len() as u32 == last - first {
                mapped.populate(first..last);
            }
            // Otherwise hashed in place, without a software prefetch of the
            // next page: over whole passes of 512 MiB (more than the caches
            // hold) it never helped, and on a fresh mapping, whose next
            // page has no page-table entry yet, it cost (hashing bench,
            // `read_strategies`, three runs: fresh 0.841, 0.778 and 0.893
            // of blake3 over a buffer without it, 0.794, 0.766 and 0.800
            // with it).
            return pages
                .iter()
                .enumerate()
                .map(|(index, page)| hash(index, mapped.page(*page)?))
                .collect();
        }
        self.stats.reads_copied.fetch_add(n, Ordering::Relaxed);
        let buf = &mut buf[..pages.len() * PAGE_SIZE];
        let ok = read_copied(plan.pid, plan.uaddr, &pages, buf);
        ok.iter()
            .zip(buf.chunks_exact(PAGE_SIZE))
            .enumerate()
            .map(|(index, (ok, bytes))| {
                if *ok {
                    hash(index, bytes)
                } else {
                    self.stats.pages_unreadable.fetch_add(1, Ordering::Relaxed);
                    None
                }
            })
            .collect()
    }

    /// A rescanned page: `None` (and `check.unchanged`) if its xxh3-64 did
    /// not change since its content was hashed, else its new blake3;
    /// `check` gets the new checksum.
    fn hash_unless_unchanged(&self, bytes: &[u8], check: &mut ChangeCheck) -> Option<PageHash> {
        let checksum = twox_hash::XxHash3_64::oneshot(bytes);
        check.unchanged = check.checksum != 0 && check.checksum == checksum;
        check.checksum = checksum;
        if check.unchanged {
            self.stats.rescan_unchanged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.hash_page(bytes))
    }

    fn hash_page(&self, bytes: &[u8]) -> PageHash {
        if is_zero_page(bytes) {
            self.stats.pages_zero.fetch_add(1, Ordering::Relaxed);
            return zero_page_hash();
        }
        self.stats
            .bytes_hashed
            .fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
        *blake3::hash(bytes).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use agent_common::{PendingIoctl, SlotRegion};

    use super::*;

    /// A registry with VM `pid` and its slot 0 at `uaddr` (events as the
    /// eBPF programs build them).
    fn registry_with_slot(pid: u32, uaddr: u64) -> Registry {
        let mut registry = Registry::new(false);
        let created = PendingIoctl::create_vm(3, 10)
            .completed(pid, 10, 5)
            .unwrap();
        registry.apply(&created);
        let slot = |uaddr| SlotRegion {
            slot: 0,
            flags: 0,
            gpa: 0,
            size: 16 * 4096,
            uaddr,
        };
        let set = PendingIoctl::set_memory_region(5, 11, slot(uaddr))
            .completed(pid, 11, 0)
            .unwrap();
        registry.apply(&set);
        registry
    }

    fn epoch(registry: &Registry, pid: u32) -> u64 {
        registry.vm(pid).unwrap().slots[&0].epoch
    }

    /// A mapping made while its VM exits is not cached once the VM is gone,
    /// and pruning drops the mappings of exited VMs and of replaced slots:
    /// no cached mapping keeps a dead guest's memory alive.
    #[test]
    fn mappings_of_exited_vms_and_replaced_slots_are_not_kept() {
        let registry = Mutex::new(registry_with_slot(100, 0x7000_0000));
        let cache = MappedCache::default();
        let first = epoch(&registry.lock().unwrap(), 100);
        cache_if_registered(&registry, &cache, (100, 0x7000_0000, first), 0, None);
        assert_eq!(cache.read().unwrap().len(), 1);
        // A stale epoch (the slot was registered anew since) is not cached.
        cache_if_registered(&registry, &cache, (100, 0x7000_0000, first + 99), 0, None);
        assert_eq!(cache.read().unwrap().len(), 1);
        // The VM exits while a worker maps its slot: not cached after.
        registry.lock().unwrap().remove_vm(100);
        cache_if_registered(&registry, &cache, (100, 0x7000_0000, first), 0, None);
        let pool = HashPool {
            tx: None,
            workers: Vec::new(),
            stats: Arc::default(),
            mapped: Arc::new(std::mem::take(&mut *cache.write().unwrap()).into()),
        };
        assert_eq!(
            pool.cached_mappings(),
            1,
            "only the one cached before the exit"
        );
        pool.prune(&registry.lock().unwrap());
        assert_eq!(pool.cached_mappings(), 0);
        // A live VM whose slot moved: the old mapping goes, the new stays.
        let mut moved = registry_with_slot(200, 0x7000_0000);
        let old = epoch(&moved, 200);
        pool.mapped
            .write()
            .unwrap()
            .insert((200, 0x7000_0000, old), None);
        let set = PendingIoctl::set_memory_region(
            5,
            12,
            SlotRegion {
                slot: 0,
                flags: 0,
                gpa: 0,
                size: 16 * 4096,
                uaddr: 0x9000_0000,
            },
        )
        .completed(200, 12, 0)
        .unwrap();
        moved.apply(&set);
        let new = epoch(&moved, 200);
        assert_ne!(old, new);
        pool.mapped
            .write()
            .unwrap()
            .insert((200, 0x9000_0000, new), None);
        pool.prune(&moved);
        let kept: Vec<_> = pool.mapped.read().unwrap().keys().copied().collect();
        assert_eq!(kept, vec![(200, 0x9000_0000, new)]);
    }

    /// Rescans of this process's own memory as an untracked VM's slot:
    /// pages whose xxh3 did not change keep their hash without blake3; a
    /// changed page is hashed anew.
    #[test]
    fn rescans_hash_only_the_pages_that_changed() {
        let pages = 16;
        let mut memory = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page[0] = i as u8 + 1;
        }
        let pid = std::process::id();
        let uaddr = memory.as_ptr() as u64;
        for change_detection in [true, false] {
            let registry = Arc::new(Mutex::new(registry_with_slot(pid, uaddr)));
            let stats = Arc::new(HashStats::default());
            let worker = Worker {
                rx: unbounded().1,
                registry: registry.clone(),
                stats: stats.clone(),
                mapped: Arc::default(),
                zero_copy: false,
                change_detection,
            };
            let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
            let mut pass = |memory: &[u8]| {
                std::hint::black_box(memory);
                let jobs = registry.lock().unwrap().rescan_jobs(pages as u32);
                for job in jobs {
                    let mut plan = registry.lock().unwrap().plan(&job).unwrap();
                    let hashes = worker.hash(&job, &mut plan, &mut buf);
                    registry.lock().unwrap().commit(&job, &plan, &hashes);
                }
            };
            pass(&memory);
            assert_eq!(stats.rescan_unchanged.load(Ordering::Relaxed), 0);
            pass(&memory);
            let unchanged = stats.rescan_unchanged.load(Ordering::Relaxed);
            assert_eq!(unchanged, if change_detection { 16 } else { 0 });
            memory[3 * PAGE_SIZE + 7] = 0xee;
            pass(&memory);
            assert_eq!(
                stats.rescan_unchanged.load(Ordering::Relaxed) - unchanged,
                if change_detection { 15 } else { 0 }
            );
            let registry = registry.lock().unwrap();
            let slot = &registry.vm(pid).unwrap().slots[&0];
            for (i, page) in memory.chunks_exact(PAGE_SIZE).enumerate() {
                let entry = slot.pages.get(i as u32).unwrap();
                assert_eq!(entry.state(), crate::registry::PageState::Unverified);
                assert_eq!(
                    registry.contents.get(entry.content).hash,
                    *blake3::hash(page).as_bytes(),
                    "page {i}"
                );
            }
        }
    }

    #[test]
    fn split_covers_every_page_once() {
        let job = HashJob {
            pid: 1,
            slot: 0,
            epoch: 1,
            pages: JobPages::Range {
                first: 10,
                count: 600,
            },
            purpose: crate::registry::Purpose::Track,
        };
        let parts = split(job);
        let covered: Vec<u32> = parts
            .iter()
            .flat_map(|j| match j.pages {
                JobPages::Range { first, count } => first..first + count,
                JobPages::List(_) => unreachable!(),
            })
            .collect();
        assert_eq!(covered, (10..610).collect::<Vec<_>>());
    }
}
