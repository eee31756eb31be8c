//! Publishes this host's content counts to the site store (a Redis
//! cluster, [`crate::catalog::site`]) and stores the pages that become
//! common across the site. One thread, woken every `publish_ms`:
//!
//! 1. renew the host's lease (its counts vanish from site counts when it
//!    ends: the host stopped or died);
//! 2. take the content table's journal under the registry lock (the
//!    contents whose VM count changed, the ones released) and send it in
//!    pipelined batches; after a failure, or when the journal overflowed,
//!    the host's published counts are deleted and everything is sent again;
//! 3. for contents this host newly holds that enough hosts now hold and
//!    whose page is not stored, read one copy from a guest, check its hash
//!    and store it (`SET NX`: the first host wins);
//! 4. once a lease period, delete the counts of one host whose lease ended;
//! 5. once a curate period, if this host is the site's curator (a lease in
//!    the store, held by one host at a time), keep the stored pages within
//!    the site's budget, the best ranked kept.
//!
//! The store being down costs the site its catalog, never the host: errors
//! are logged once per change of state and counted, and the thread retries.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    catalog::site::{HostPublisher, SiteStore, StoreTraffic},
    clock,
    config::SiteConfig,
    content::PageHash,
    guest_memory::read_copied,
    page::PAGE_SIZE,
    registry::Registry,
};

/// What the publisher did, for `GET /v1/status` and the metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SiteStatus {
    pub host_id: String,
    pub nodes: Vec<String>,
    /// Connected, and the last publication went through.
    pub healthy: bool,
    pub last_error: Option<String>,
    /// Content counts sent (held, with their VM count).
    pub held_sent: u64,
    /// Contents reported no longer held.
    pub released_sent: u64,
    /// Full republications (start, journal overflow, after a failure).
    pub resyncs: u64,
    /// Pages this host stored for the site.
    pub pages_stored: u64,
    /// Dead hosts whose counts this host deleted.
    pub hosts_reaped: u64,
    /// This host was the site's curator at its last pass, and what the
    /// pass found (pages stored, evicted to stay within the budget).
    #[serde(default)]
    pub curator: bool,
    #[serde(default)]
    pub site_pages: u64,
    #[serde(default)]
    pub pages_evicted: u64,
    pub traffic: StoreTraffic,
    /// CPU time of the publishing thread.
    pub cpu_seconds: f64,
}

pub struct SitePublisher {
    pub status: Arc<Mutex<SiteStatus>>,
    thread: JoinHandle<()>,
}

impl SitePublisher {
    /// Starts publishing, if a site store is configured.
    pub fn start(
        config: &SiteConfig,
        registry: Arc<Mutex<Registry>>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<Self>> {
        if config.nodes.is_empty() {
            return Ok(None);
        }
        // Refuse a configuration that can never work (plaintext not
        // accepted, a bad URL) at start; a store that is down is retried.
        let host = match &config.host_id {
            Some(host) => host.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context(
                    "reading the hostname for the site store's host id; set host_id under [site]",
                )?
                .trim()
                .to_owned(),
        };
        SiteStore::check(&config.store())?;
        let first = match SiteStore::connect(&config.store()) {
            Ok(store) => Some(store),
            Err(err) => {
                log::warn!("{err:#}; retrying every {} ms", config.publish_ms);
                None
            }
        };
        registry.lock().unwrap().contents.start_journal();
        let status = Arc::new(Mutex::new(SiteStatus {
            host_id: host.clone(),
            nodes: config.nodes.clone(),
            ..SiteStatus::default()
        }));
        let mut worker = Worker {
            config: config.clone(),
            host,
            registry,
            status: status.clone(),
            publisher: None,
            resync: true,
            last_reap: Instant::now(),
            last_curation: None,
        };
        if let Some(store) = first {
            worker.publisher = Some(worker.publisher_over(store)?);
        }
        let thread = std::thread::Builder::new()
            .name("pagefp-site".into())
            .spawn(move || worker.run(&stop))
            .context("spawning the site publisher thread")?;
        Ok(Some(Self { status, thread }))
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

struct Worker {
    config: SiteConfig,
    host: String,
    registry: Arc<Mutex<Registry>>,
    status: Arc<Mutex<SiteStatus>>,
    publisher: Option<HostPublisher>,
    /// Delete what this host published and send everything again.
    resync: bool,
    last_reap: Instant,
    /// When this host last tried to curate (`None`: not yet).
    last_curation: Option<Instant>,
}

impl Worker {
    fn publisher_over(&self, store: SiteStore) -> anyhow::Result<HostPublisher> {
        HostPublisher::new(
            store,
            self.host.clone(),
            Duration::from_secs(self.config.lease_secs),
            self.config.min_hosts,
            Duration::from_secs(self.config.page_ttl_secs),
        )
    }

    fn run(&mut self, stop: &AtomicBool) {
        let period = Duration::from_millis(self.config.publish_ms);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let result = self.cycle();
            self.note(result);
            next += period;
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
            }
            next = next.max(Instant::now());
        }
        // A clean stop takes this host out of the site counts at once
        // (bounded: each call has the store's timeout).
        if let Some(publisher) = self.publisher.as_mut() {
            let host = self.host.clone();
            match publisher.reap(&host) {
                Ok(n) => log::info!("site store: withdrew this host's {n} content counts"),
                Err(err) => log::warn!(
                    "site store: withdrawing this host's counts: {err}; its lease ends them"
                ),
            }
        }
    }

    fn note(&mut self, result: anyhow::Result<()>) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.cpu_seconds = clock::thread_cpu_ns() as f64 / 1e9;
        if let Some(publisher) = &self.publisher {
            status.traffic = publisher.store.traffic.clone();
        }
        match result {
            Ok(()) => {
                if !status.healthy {
                    log::info!("site store: publishing as host {}", self.host);
                }
                status.healthy = true;
                status.last_error = None;
            }
            Err(err) => {
                let text = format!("{err:#}");
                if status.healthy || status.last_error.as_deref() != Some(&text) {
                    log::warn!("site store: {text}; retrying");
                }
                status.healthy = false;
                status.last_error = Some(text);
                // What was taken from the journal may not have arrived.
                self.resync = true;
            }
        }
    }

    fn cycle(&mut self) -> anyhow::Result<()> {
        if self.publisher.is_none() {
            let store = SiteStore::connect(&self.config.store())?;
            self.publisher = Some(self.publisher_over(store)?);
        }
        let publisher = self.publisher.as_mut().expect("connected above");
        publisher
            .renew_lease()
            .context("renewing this host's lease")?;
        let changes = {
            let mut registry = self.registry.lock().unwrap();
            if self.resync {
                registry.contents.start_journal();
            }
            registry.contents.take_changes()
        };
        if changes.resync {
            let host = self.host.clone();
            publisher
                .forget_host(&host)
                .context("deleting this host's earlier counts")?;
            self.status.lock().unwrap().resyncs += 1;
        }
        self.resync = false;
        let new = publisher
            .publish(&changes.held, &changes.released)
            .context("publishing content counts")?;
        {
            let mut status = self.status.lock().unwrap();
            status.held_sent += changes.held.len() as u64;
            status.released_sent += changes.released.len() as u64;
        }
        let wanted = publisher
            .pages_wanted(&new)
            .context("asking which pages the site lacks")?;
        if !wanted.is_empty() {
            let pages = self.read_pages(&wanted);
            let refs: Vec<(PageHash, &[u8; PAGE_SIZE])> =
                pages.iter().map(|(hash, page)| (*hash, &**page)).collect();
            let publisher = self.publisher.as_mut().expect("connected above");
            let stored = publisher
                .store_pages(&refs)
                .context("storing template pages")?;
            self.status.lock().unwrap().pages_stored += stored;
        }
        if self.last_reap.elapsed() >= Duration::from_secs(self.config.lease_secs) {
            self.last_reap = Instant::now();
            let publisher = self.publisher.as_mut().expect("connected above");
            if let Some(dead) = publisher.dead_hosts().context("listing hosts")?.first() {
                let forgotten = publisher
                    .reap(dead)
                    .context("deleting a dead host's counts")?;
                log::info!("site store: host {dead}'s lease ended; deleted its {forgotten} counts");
                self.status.lock().unwrap().hosts_reaped += 1;
            }
        }
        let period = Duration::from_secs(self.config.curate_secs.max(1));
        if self.config.budget_bytes > 0
            && self.last_curation.is_none_or(|at| at.elapsed() >= period)
        {
            self.last_curation = Some(Instant::now());
            let publisher = self.publisher.as_mut().expect("connected above");
            let cap = self.config.budget_bytes / PAGE_SIZE as u64;
            let curation = publisher
                .curate(cap, 2 * period)
                .context("keeping the site within its budget")?;
            let mut status = self.status.lock().unwrap();
            status.curator = curation.is_some();
            if let Some(curation) = curation {
                status.site_pages = curation
                    .stored
                    .saturating_sub(curation.evicted + curation.expired);
                status.pages_evicted += curation.evicted;
                if curation.evicted > 0 {
                    log::info!(
                        "site store: {} pages stored, over the budget of {cap}: evicted the {} ranked lowest",
                        curation.stored,
                        curation.evicted
                    );
                }
            }
        }
        Ok(())
    }

    /// One copy of each of `hashes` read from a guest (pages that moved
    /// since, or whose VM is gone, are left out; the store checks again).
    fn read_pages(&self, hashes: &[PageHash]) -> Vec<(PageHash, Box<[u8; PAGE_SIZE]>)> {
        let located = {
            let registry = self.registry.lock().unwrap();
            let ids: Vec<_> = hashes
                .iter()
                .filter_map(|hash| registry.contents.lookup(hash).map(|id| (id, *hash)))
                .collect();
            let pids: Vec<u32> = registry.vms().map(|vm| vm.pid).collect();
            let at = registry.locate_contents(&pids, ids.iter().map(|(id, _)| *id));
            ids.into_iter()
                .filter_map(|(id, hash)| at.get(&id).map(|at| (hash, *at)))
                .collect::<Vec<_>>()
        };
        let mut pages = Vec::with_capacity(located.len());
        let mut buf = vec![0u8; PAGE_SIZE];
        for (hash, (pid, uaddr)) in located {
            if read_copied(pid, uaddr, &[0], &mut buf)[0] && *blake3::hash(&buf).as_bytes() == hash
            {
                let page: [u8; PAGE_SIZE] = buf[..].try_into().expect("one page");
                pages.push((hash, Box::new(page)));
            }
        }
        pages
    }
}
