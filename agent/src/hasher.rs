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
    registry::{HashJob, JobPages, ReadPlan, Registry},
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
        }
    }
}

/// Mapped slots, keyed by (pid, uaddr, epoch); `None` means "not mappable".
type MappedCache = RwLock<HashMap<(u32, u64, u64), Option<Arc<GuestMapping>>>>;

pub struct HashPool {
    tx: Option<Sender<HashJob>>,
    workers: Vec<JoinHandle<()>>,
    pub stats: Arc<HashStats>,
    mapped: Arc<MappedCache>,
}

impl HashPool {
    pub fn new(threads: usize, registry: Arc<Mutex<Registry>>, zero_copy: bool) -> Self {
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
                };
                std::thread::Builder::new()
                    .name(format!("pagefp-hash-{i}"))
                    .spawn(move || worker.run())
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

    /// Forgets mappings of processes that are gone.
    pub fn forget(&self, pid: u32) {
        self.mapped
            .write()
            .unwrap()
            .retain(|(p, _, _), _| *p != pid);
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
}

impl Worker {
    fn run(self) {
        let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
        while let Ok(job) = self.rx.recv() {
            // Busy time covers the whole job (plan, read, hash, commit): the
            // benchmark divides pages by it for the per-core throughput.
            let started = std::time::Instant::now();
            let plan = self.registry.lock().unwrap().plan(&job);
            if let Some(plan) = plan {
                let hashes = self.hash(&job, &plan, &mut buf);
                self.registry.lock().unwrap().commit(&job, &plan, &hashes);
            }
            self.stats
                .busy_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.jobs_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn mapping(&self, job: &HashJob, plan: &ReadPlan) -> Option<Arc<GuestMapping>> {
        if !self.zero_copy {
            return None;
        }
        let key = (plan.pid, plan.uaddr, job.epoch);
        if let Some(found) = self.mapped.read().unwrap().get(&key) {
            return found.clone();
        }
        let size = {
            let registry = self.registry.lock().unwrap();
            registry
                .vm(plan.pid)
                .and_then(|vm| vm.slots.get(&job.slot))
                .map(|slot| slot.size)
        }?;
        let mapped = GuestMapping::open_sealed(plan.pid, plan.uaddr, size)
            .ok()
            .flatten()
            .map(Arc::new);
        self.mapped.write().unwrap().insert(key, mapped.clone());
        mapped
    }

    fn hash(&self, job: &HashJob, plan: &ReadPlan, buf: &mut [u8]) -> Vec<Option<PageHash>> {
        let pages: Vec<u32> = plan.pages.iter().map(|(page, _)| *page).collect();
        let n = pages.len() as u64;
        self.stats.pages_read.fetch_add(n, Ordering::Relaxed);
        if let Some(mapped) = self.mapping(job, plan) {
            self.stats.reads_mapped.fetch_add(n, Ordering::Relaxed);
            return pages
                .iter()
                .map(|page| mapped.page(*page).map(|bytes| self.hash_page(bytes)))
                .collect();
        }
        self.stats.reads_copied.fetch_add(n, Ordering::Relaxed);
        let buf = &mut buf[..pages.len() * PAGE_SIZE];
        let ok = read_copied(plan.pid, plan.uaddr, &pages, buf);
        ok.iter()
            .zip(buf.chunks_exact(PAGE_SIZE))
            .map(|(ok, bytes)| {
                if *ok {
                    Some(self.hash_page(bytes))
                } else {
                    self.stats.pages_unreadable.fetch_add(1, Ordering::Relaxed);
                    None
                }
            })
            .collect()
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
    use super::*;

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
