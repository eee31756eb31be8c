//! `--only scale` (target/pagefp-bench/scale.json): the site catalog at the
//! size of a data center.
//!
//! - **Fleet**: host a runs the migrating guest (fleet VM 0), host b its
//!   sibling (fleet VM 2) and publishes to the site's Redis cluster. Host a's
//!   VM migrates over a WAN link (rate and round trip through the TUN
//!   delayer) to a destination host c that holds nothing itself: once with
//!   nothing, once with the sibling's catalog installed locally, once with
//!   the site store, and once with the site store after a master died.
//! - **Negotiation**: the same migration against catalogs of 10⁴, 10⁵ and
//!   10⁶ templates (the sibling's templates, then synthetic pages), agreed
//!   by the whole-catalog offer and by the query, and against a site store
//!   holding 10⁶ pages.
//! - **Publishing**: 1, 4 and 16 simulated hosts publishing to one cluster
//!   at once, each a real [`HostPublisher`] driven by a steady rate of
//!   content changes; the cost per host (its thread's CPU and the bytes it
//!   sends) per guest GiB per hour.
//!
//! The site store is on the destination site's LAN ([`SiteLan`]): reached
//! by host c's receiver without crossing the WAN link, and by host b.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent::{
    api::report::SiteFetch,
    catalog::{Catalog, site::HostPublisher},
    config::SiteStoreConfig,
};
use anyhow::bail;
use pagefp_tests::{
    agent_process::{AgentProcess, TempDir},
    migration::{KeptSourceMigration, ReceiveSpec},
    netns::{LinkSpec, ShapedLink, SiteLan},
    redis_cluster::RedisCluster,
    site_hosts::{self, HostSettings, contents},
    vmm_client::VmmProcess,
};
use serde::Serialize;
use serde_json::json;

/// What the scale part measures.
#[derive(Clone, Debug)]
pub struct Settings {
    pub guest_mib: u32,
    pub link: LinkSpec,
    pub catalog_sizes: Vec<usize>,
    /// Pages the site store is filled to for the query against the site.
    pub site_pages: usize,
    pub host_counts: Vec<usize>,
    pub publish: PublishSettings,
}

/// One simulated host's guest and how fast its contents change.
#[derive(Clone, Debug, Serialize)]
pub struct PublishSettings {
    pub guest_pages: usize,
    /// Fraction of the guest's pages whose content every host holds (the OS).
    pub shared_fraction: f64,
    /// Pages per second and guest GiB that take a new content (the old
    /// one released): the steady dirty rate, in what publishing sees.
    pub changes_per_second_per_gib: usize,
    /// The publisher's period (`publish_ms`), simulated back to back.
    pub cycle_ms: u64,
    pub cycles: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            guest_mib: 256,
            link: LinkSpec::new(100, 50),
            catalog_sizes: vec![10_000, 100_000, 1_000_000],
            site_pages: 1_000_000,
            host_counts: vec![1, 4, 16],
            publish: PublishSettings {
                guest_pages: 32_768,
                shared_fraction: 0.5,
                changes_per_second_per_gib: 1000,
                cycle_ms: 2000,
                cycles: 15,
            },
        }
    }
}

impl Settings {
    /// A small run (`--quick`): smaller guest and catalogs, fewer hosts.
    pub fn quick() -> Self {
        let mut settings = Self {
            guest_mib: 64,
            catalog_sizes: vec![10_000, 100_000],
            site_pages: 100_000,
            host_counts: vec![1, 4],
            ..Self::default()
        };
        settings.publish.guest_pages = 8192;
        settings.publish.cycles = 5;
        settings
    }
}

/// One migration of host a's guest to host c.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationRun {
    /// What host c held: "nothing", "local catalog", "site", ...
    pub destination: String,
    /// Templates host c could rebuild from (catalog or site store).
    pub templates: usize,
    pub negotiation: Option<String>,
    pub negotiation_bytes: u64,
    pub negotiation_seconds: f64,
    /// Negotiation bytes ÷ the guest's non-zero memory.
    pub negotiation_fraction: f64,
    pub wire_bytes: u64,
    pub total_seconds: f64,
    pub templates_agreed: u64,
    pub pages_template: u64,
    pub site: Option<SiteFetch>,
    /// Both ends verified and every page equal after the migration.
    pub verified: bool,
    pub error: Option<String>,
}

/// What publishing cost one simulated host (its thread's CPU, the bytes
/// of its commands).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostCost {
    pub initial_cpu_seconds: f64,
    pub initial_bytes: u64,
    /// Steady cycles with every host publishing at once.
    pub concurrent_cpu_seconds: f64,
    pub concurrent_bytes: u64,
    /// The same number of steady cycles with the other hosts idle (their
    /// counts in the store, their leases live): the cost of one host in a
    /// site of this size, without this 2-core machine's contention.
    pub alone_cpu_seconds: f64,
    pub alone_bytes: u64,
    pub errors: u64,
}

/// `hosts` hosts publishing to one cluster.
#[derive(Clone, Debug, Serialize)]
pub struct PublishRun {
    pub hosts: usize,
    pub per_host: Vec<HostCost>,
    /// Medians over the hosts, per guest GiB per hour of steady changes:
    /// each host alone (the target's figure) and all at once.
    pub cpu_seconds_per_gib_hour: f64,
    pub concurrent_cpu_seconds_per_gib_hour: f64,
    pub bytes_per_gib_hour: f64,
    /// The store's own CPU (all nodes) during the concurrent cycles, per
    /// host per guest GiB per hour.
    pub store_cpu_seconds_per_host_gib_hour: f64,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub machine: String,
    pub link: LinkSpec,
    pub guest_mib: u32,
    pub guest_nonzero_bytes: u64,
    pub fleet: Vec<MigrationRun>,
    pub negotiation: Vec<MigrationRun>,
    pub store_failure: Option<MigrationRun>,
    pub publish_settings: PublishSettings,
    pub publishing: Vec<PublishRun>,
    pub summary: serde_json::Value,
}

/// Hosts a and b, the link between a and c, and the site's cluster.
struct Site {
    dir: TempDir,
    cluster: RedisCluster,
    _lan: SiteLan,
    link: ShapedLink,
    a: AgentProcess,
    b: AgentProcess,
    source: VmmProcess,
    sibling: VmmProcess,
    guest_mib: u32,
    nonzero_bytes: u64,
}

pub fn run(settings: &Settings) -> anyhow::Result<ScaleReport> {
    let site = Site::start(settings)?;
    println!(
        "-- guest {} MiB ({} non-zero bytes); link {}",
        settings.guest_mib, site.nonzero_bytes, settings.link
    );
    let catalog = site.dir.0.join("sibling.pftc");
    site.b
        .export_templates(&catalog, &[site.sibling.pid()], &["--min-vms", "1"])?;
    let sibling = Catalog::load(&catalog)?;
    let stored = site.cluster.count_keys("pagefp:p:*")? as usize;

    let mut fleet = Vec::new();
    for (destination, catalogs, site_store, templates) in [
        ("nothing", vec![], false, 0),
        ("local catalog", vec![catalog.clone()], false, sibling.len()),
        ("site", vec![], true, stored),
    ] {
        let run = site.migrate(destination, catalogs, site_store, None, templates);
        print_run(&run);
        fleet.push(run);
    }

    let mut negotiation = Vec::new();
    for &size in &settings.catalog_sizes {
        let path = site.dir.0.join(format!("catalog-{size}.pftc"));
        let started = Instant::now();
        catalog_of(&sibling, size).save(&path)?;
        println!(
            "-- catalog of {size} templates written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for protocol in ["offer", "query"] {
            let run = site.migrate(
                &format!("catalog of {size}, {protocol}"),
                vec![path.clone()],
                false,
                Some(protocol),
                size,
            );
            print_run(&run);
            negotiation.push(run);
        }
        std::fs::remove_file(&path)?;
    }
    let started = Instant::now();
    let filled = site.fill_store(settings.site_pages)?;
    println!(
        "-- site store filled to {filled} pages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let run = site.migrate(
        &format!("site of {filled}, query"),
        vec![],
        true,
        None,
        filled,
    );
    print_run(&run);
    negotiation.push(run);

    // A master of the (replica-less) cluster dies: its shard's pages
    // travel in full, the migration completes.
    let mut site = site;
    let master = site.cluster.master_ports()?[1];
    site.cluster.kill(master)?;
    let failure = site.migrate(
        "site, one master of three killed",
        vec![],
        true,
        None,
        filled,
    );
    print_run(&failure);
    let guest_nonzero_bytes = site.nonzero_bytes;
    drop(site);

    let mut publishing = Vec::new();
    for &hosts in &settings.host_counts {
        let run = publish_run(hosts, &settings.publish)?;
        println!(
            "-- {hosts:>2} hosts publishing: per host {:.3} CPU s alone ({:.3} all at once) and {:.0} bytes per guest GiB-hour; store CPU {:.3} s per host GiB-hour",
            run.cpu_seconds_per_gib_hour,
            run.concurrent_cpu_seconds_per_gib_hour,
            run.bytes_per_gib_hour,
            run.store_cpu_seconds_per_host_gib_hour
        );
        publishing.push(run);
    }
    let summary = summarise(&fleet, &negotiation, &failure, &publishing);
    Ok(ScaleReport {
        machine: crate::machine(),
        link: settings.link,
        guest_mib: settings.guest_mib,
        guest_nonzero_bytes,
        fleet,
        negotiation,
        store_failure: Some(failure),
        publish_settings: settings.publish.clone(),
        publishing,
        summary,
    })
}

fn print_run(run: &MigrationRun) {
    println!(
        "{:<34} {:>8} templates  negotiation {:>10} B {:>6.2} s ({:.2}% of non-zero)  wire {:>11} B  {:>6.1} s  {}",
        run.destination,
        run.templates,
        run.negotiation_bytes,
        run.negotiation_seconds,
        run.negotiation_fraction * 100.0,
        run.wire_bytes,
        run.total_seconds,
        match (&run.error, run.verified) {
            (Some(err), _) => format!("FAILED: {err}"),
            (None, true) => "verified".into(),
            (None, false) => "NOT VERIFIED".into(),
        }
    );
}

impl Site {
    fn start(settings: &Settings) -> anyhow::Result<Self> {
        let link = ShapedLink::from_spec("sc", 50, settings.link)?;
        let lan = SiteLan::new(&link, "sc", 50)?;
        let cluster = RedisCluster::start_on(&lan.host_ip, 3, 0)?;
        let dir = TempDir::new("pagefp-scale");
        let a = site_hosts::host_agent("a", &[], &HOST_SETTINGS)?;
        let b = site_hosts::host_agent("b", &cluster.urls(), &HOST_SETTINGS)?;
        let source = site_hosts::vm_on(&dir.0, "a", &a, 0, settings.guest_mib)?;
        let sibling = site_hosts::vm_on(&dir.0, "b", &b, 2, settings.guest_mib)?;
        let held = contents(&b, sibling.pid()).len() as u64;
        site_hosts::wait_published(&b, held)?;
        wait_stored(&b, held)?;
        let zero = agent::content::zero_page_hash();
        let nonzero_pages = a
            .hashes(source.pid())
            .iter()
            .filter(|record| record.hash != zero)
            .count() as u64;
        Ok(Self {
            dir,
            cluster,
            _lan: lan,
            link,
            a,
            b,
            source,
            sibling,
            guest_mib: settings.guest_mib,
            nonzero_bytes: nonzero_pages * 4096,
        })
    }

    /// Migrates host a's VM to a new incoming VMM of host c; never fails
    /// (a failed run says why in `error`).
    fn migrate(
        &self,
        destination: &str,
        catalogs: Vec<PathBuf>,
        site_store: bool,
        negotiation: Option<&'static str>,
        templates: usize,
    ) -> MigrationRun {
        let failed = |err: anyhow::Error| MigrationRun {
            destination: destination.into(),
            templates,
            negotiation: None,
            negotiation_bytes: 0,
            negotiation_seconds: 0.0,
            negotiation_fraction: 0.0,
            wire_bytes: 0,
            total_seconds: 0.0,
            templates_agreed: 0,
            pages_template: 0,
            site: None,
            verified: false,
            error: Some(format!("{err:#}")),
        };
        match self.try_migrate(catalogs, site_store, negotiation) {
            Ok((sent, received, identical)) => MigrationRun {
                destination: destination.into(),
                templates,
                negotiation: sent.negotiation.clone(),
                negotiation_bytes: sent.negotiation_bytes,
                negotiation_seconds: sent.negotiation_seconds,
                negotiation_fraction: sent.negotiation_bytes as f64
                    / self.nonzero_bytes.max(1) as f64,
                wire_bytes: sent.wire_bytes,
                total_seconds: sent.elapsed_seconds,
                templates_agreed: sent.templates_agreed,
                pages_template: sent.pages.template,
                site: received.site.clone(),
                verified: sent.verified && received.verified && identical,
                error: (!identical).then(|| "pages differ after the migration".to_string()),
            },
            Err(err) => failed(err),
        }
    }

    fn try_migrate(
        &self,
        catalogs: Vec<PathBuf>,
        site_store: bool,
        negotiation: Option<&'static str>,
    ) -> anyhow::Result<(
        agent::api::report::MigrationReport,
        agent::api::report::MigrationReport,
        bool,
    )> {
        let address = format!("{}:7600", self.link.dest_ip);
        let (sent, received, identical) = KeptSourceMigration {
            dir: &self.dir.0,
            source: &self.source,
            agent_socket: &self.a.socket,
            mem_mib: self.guest_mib,
            receive: ReceiveSpec {
                listen: address.clone(),
                catalogs,
                timeout_s: 120,
                site_store: if site_store {
                    self.cluster.urls()
                } else {
                    Vec::new()
                },
                negotiation,
                ..ReceiveSpec::default()
            },
            to: address,
            wraps: (Some(self.link.in_source()), Some(self.link.in_dest())),
            during: None,
        }
        .run()?;
        if !sent.success {
            bail!("sender failed: {}", last_line(&sent.stderr));
        }
        if !received.success {
            bail!("receiver failed: {}", last_line(&received.stderr));
        }
        Ok((sent.report().clone(), received.report().clone(), identical))
    }

    /// Adds synthetic pages to the site store until it holds `total`
    /// pages; returns how many it holds.
    fn fill_store(&self, total: usize) -> anyhow::Result<usize> {
        let have = self.cluster.count_keys("pagefp:p:*")? as usize;
        let nodes = self.cluster.urls();
        let wanted = total.saturating_sub(have);
        let store = agent::catalog::site::SiteStore::connect(&SiteStoreConfig {
            nodes,
            plaintext: true,
            tls_dir: None,
        })?;
        let mut publisher = HostPublisher::new(
            store,
            "filler".into(),
            Duration::from_secs(3600),
            1,
            Duration::from_secs(3600),
        )?;
        let mut pages = Vec::with_capacity(1024);
        for start in (0..wanted).step_by(1024) {
            pages.clear();
            pages.extend((start..(start + 1024).min(wanted)).map(|i| {
                let page = synthetic_page(i as u64);
                (*blake3::hash(&page).as_bytes(), page)
            }));
            let refs: Vec<_> = pages.iter().map(|(hash, page)| (*hash, page)).collect();
            publisher.store_pages(&refs)?;
        }
        Ok(self.cluster.count_keys("pagefp:p:*")? as usize)
    }
}

const HOST_SETTINGS: HostSettings = HostSettings {
    lease_secs: 30,
    publish_ms: 500,
    // One host (b) holds the sibling: its pages are the site's.
    min_hosts: 1,
    tls_dir: None,
};

/// Waits until `agent` has stored about all of its `held` contents' pages.
fn wait_stored(agent: &AgentProcess, held: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let stored = agent.status()["site"]["pages_stored"].as_u64().unwrap_or(0);
        // Pages the guest rewrote meanwhile are not stored, by design.
        if stored * 100 >= held * 99 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("host b stored {stored} of its {held} pages within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A page no guest holds: `i`, a tag, and zeroes.
fn synthetic_page(i: u64) -> [u8; 4096] {
    let mut page = [0u8; 4096];
    page[..8].copy_from_slice(&i.to_le_bytes());
    page[8..24].copy_from_slice(b"pagefp-synthetic");
    page
}

/// The first `size` of `sibling`'s templates, then synthetic ones up to
/// `size`.
fn catalog_of(sibling: &Catalog, size: usize) -> Catalog {
    let real = sibling.len().min(size);
    let mut catalog = Catalog {
        hashes: Vec::with_capacity(size),
        pages: Vec::with_capacity(size * 4096),
    };
    catalog.hashes.extend_from_slice(&sibling.hashes[..real]);
    catalog
        .pages
        .extend_from_slice(&sibling.pages[..real * 4096]);
    for i in 0..(size - real) as u64 {
        let page = synthetic_page(i);
        catalog.hashes.push(*blake3::hash(&page).as_bytes());
        catalog.pages.extend_from_slice(&page);
    }
    catalog
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// `hosts` simulated hosts: they publish their contents at once, run the
/// steady cycles at once, then each runs them again alone.
fn publish_run(hosts: usize, settings: &PublishSettings) -> anyhow::Result<PublishRun> {
    let cluster = RedisCluster::start(3, 0)?;
    let nodes = cluster.urls();
    let mut sims = (0..hosts)
        .map(|host| SimHost::new(host, &nodes, settings))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut costs = vec![HostCost::default(); hosts];
    let at_once = |sims: &mut [SimHost], phase: fn(&mut SimHost) -> anyhow::Result<(f64, u64)>| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = sims
                .iter_mut()
                .map(|sim| scope.spawn(move || phase(sim)))
                .collect();
            threads
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .map_err(|_| anyhow::anyhow!("a simulated host panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
    };
    for (cost, (cpu, bytes)) in costs.iter_mut().zip(at_once(&mut sims, SimHost::initial)?) {
        (cost.initial_cpu_seconds, cost.initial_bytes) = (cpu, bytes);
    }
    let store_before = cluster.cpu_seconds()?;
    for (cost, (cpu, bytes)) in costs.iter_mut().zip(at_once(&mut sims, SimHost::steady)?) {
        (cost.concurrent_cpu_seconds, cost.concurrent_bytes) = (cpu, bytes);
    }
    let store_cpu = cluster.cpu_seconds()? - store_before;
    for (cost, sim) in costs.iter_mut().zip(&mut sims) {
        (cost.alone_cpu_seconds, cost.alone_bytes) = sim.steady()?;
        cost.errors = sim.publisher.store.traffic.errors;
    }
    for sim in &mut sims {
        let host = sim.host_id();
        sim.publisher.reap(&host)?;
    }
    let gib = settings.guest_pages as f64 * 4096.0 / f64::from(1u32 << 30);
    let hours = (settings.cycles as f64 * settings.cycle_ms as f64 / 1000.0) / 3600.0;
    let per_gib_hour = |value: f64| value / gib / hours;
    let median_of = |value: fn(&HostCost) -> f64| {
        let mut values: Vec<f64> = costs.iter().map(|c| per_gib_hour(value(c))).collect();
        crate::median(&mut values)
    };
    Ok(PublishRun {
        hosts,
        cpu_seconds_per_gib_hour: median_of(|c| c.alone_cpu_seconds),
        concurrent_cpu_seconds_per_gib_hour: median_of(|c| c.concurrent_cpu_seconds),
        bytes_per_gib_hour: median_of(|c| c.alone_bytes as f64),
        store_cpu_seconds_per_host_gib_hour: per_gib_hour(store_cpu / hosts as f64),
        per_host: costs,
    })
}

/// A content id → its page: shared contents are the same on every host.
fn content_page(host: usize, id: u64, shared: bool) -> [u8; 4096] {
    let mut page = [0u8; 4096];
    page[..8].copy_from_slice(&id.to_le_bytes());
    if !shared {
        page[8..16].copy_from_slice(&(host as u64 + 1).to_le_bytes());
    }
    page[16..32].copy_from_slice(b"pagefp-host-page");
    page
}

/// One simulated host: its guest's pages (a content id each, the first
/// `shared_fraction` common to every host) and its publisher. Each cycle
/// does what the agent's publisher does (lease, counts, pages wanted,
/// pages stored).
struct SimHost {
    host: usize,
    publisher: HostPublisher,
    settings: PublishSettings,
    /// Page → (content id, shared).
    pages: Vec<(u64, bool)>,
    by_hash: std::collections::HashMap<[u8; 32], (u64, bool)>,
    shared: usize,
    next_id: u64,
    /// The next page the workload changes (the application's pages, after
    /// the OS's).
    at: usize,
}

impl SimHost {
    fn new(host: usize, nodes: &[String], settings: &PublishSettings) -> anyhow::Result<Self> {
        let store = agent::catalog::site::SiteStore::connect(&SiteStoreConfig {
            nodes: nodes.to_vec(),
            plaintext: true,
            tls_dir: None,
        })?;
        let publisher = HostPublisher::new(
            store,
            format!("sim{host}"),
            Duration::from_secs(600),
            2,
            Duration::from_secs(3600),
        )?;
        let shared = (settings.guest_pages as f64 * settings.shared_fraction) as usize;
        Ok(Self {
            host,
            publisher,
            settings: settings.clone(),
            pages: (0..settings.guest_pages as u64)
                .map(|page| (page, (page as usize) < shared))
                .collect(),
            by_hash: std::collections::HashMap::new(),
            shared,
            next_id: settings.guest_pages as u64,
            at: shared,
        })
    }

    fn host_id(&self) -> String {
        format!("sim{}", self.host)
    }

    fn hash_of(&self, (id, shared): (u64, bool)) -> [u8; 32] {
        *blake3::hash(&content_page(self.host, id, shared)).as_bytes()
    }

    /// (CPU seconds of this thread, bytes to the store) of `work`.
    fn measured(
        &mut self,
        work: impl FnOnce(&mut Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<(f64, u64)> {
        let (cpu, bytes) = (
            agent::clock::thread_cpu_ns(),
            self.publisher.store.traffic.bytes_sent,
        );
        work(self)?;
        Ok((
            (agent::clock::thread_cpu_ns() - cpu) as f64 / 1e9,
            self.publisher.store.traffic.bytes_sent - bytes,
        ))
    }

    /// The first publication: every content of the guest.
    fn initial(&mut self) -> anyhow::Result<(f64, u64)> {
        self.measured(|sim| {
            let held: Vec<([u8; 32], u32)> = (0..sim.pages.len())
                .map(|page| {
                    let hash = sim.hash_of(sim.pages[page]);
                    sim.by_hash.insert(hash, sim.pages[page]);
                    (hash, 1)
                })
                .collect();
            sim.cycle(&held, &[])
        })
    }

    /// `cycles` cycles of content changes at the steady rate.
    fn steady(&mut self) -> anyhow::Result<(f64, u64)> {
        let per_cycle = self.settings.changes_per_second_per_gib * self.settings.guest_pages
            / 262_144
            * self.settings.cycle_ms as usize
            / 1000;
        self.measured(|sim| {
            for _ in 0..sim.settings.cycles {
                let mut held = Vec::with_capacity(per_cycle);
                let mut released = Vec::with_capacity(per_cycle);
                for _ in 0..per_cycle {
                    if sim.at >= sim.pages.len() {
                        sim.at = sim.shared;
                    }
                    let old = sim.pages[sim.at];
                    let new = (sim.next_id, false);
                    sim.next_id += 1;
                    sim.pages[sim.at] = new;
                    sim.at += 1;
                    let old_hash = sim.hash_of(old);
                    sim.by_hash.remove(&old_hash);
                    released.push(old_hash);
                    let new_hash = sim.hash_of(new);
                    sim.by_hash.insert(new_hash, new);
                    held.push((new_hash, 1));
                }
                sim.cycle(&held, &released)?;
            }
            Ok(())
        })
    }

    fn cycle(&mut self, held: &[([u8; 32], u32)], released: &[[u8; 32]]) -> anyhow::Result<()> {
        self.publisher.renew_lease()?;
        let new = self.publisher.publish(held, released)?;
        let wanted = self.publisher.pages_wanted(&new)?;
        let pages: Vec<([u8; 32], [u8; 4096])> = wanted
            .iter()
            .filter_map(|hash| {
                let (id, shared) = *self.by_hash.get(hash)?;
                Some((*hash, content_page(self.host, id, shared)))
            })
            .collect();
        let refs: Vec<_> = pages.iter().map(|(hash, page)| (*hash, page)).collect();
        self.publisher.store_pages(&refs)?;
        Ok(())
    }
}

/// The targets, as measured.
fn summarise(
    fleet: &[MigrationRun],
    negotiation: &[MigrationRun],
    failure: &MigrationRun,
    publishing: &[PublishRun],
) -> serde_json::Value {
    let find =
        |runs: &[MigrationRun], name: &str| runs.iter().find(|r| r.destination == name).cloned();
    let site_vs_local = match (find(fleet, "site"), find(fleet, "local catalog")) {
        (Some(site), Some(local)) if site.error.is_none() && local.error.is_none() => {
            Some(site.wire_bytes as f64 / local.wire_bytes as f64)
        }
        _ => None,
    };
    // The run against the most templates agreed by `protocol`.
    let largest = |protocol: &str| {
        negotiation
            .iter()
            .filter(|r| {
                r.negotiation
                    .as_deref()
                    .is_some_and(|n| n.starts_with(protocol))
            })
            .max_by_key(|r| r.templates)
    };
    let (largest_query, largest_offer) = (largest("query"), largest("offer"));
    let (fewest, most) = (
        publishing.iter().map(|r| r.hosts).min(),
        publishing.iter().map(|r| r.hosts).max(),
    );
    // A publishing cost at the most hosts ÷ at the fewest.
    let most_over_fewest = |cost: fn(&PublishRun) -> f64| {
        let at = |hosts| publishing.iter().find(|r| Some(r.hosts) == hosts).map(cost);
        match (at(fewest), at(most)) {
            (Some(one), Some(many)) if one > 0.0 => Some(many / one),
            _ => None,
        }
    };
    let publish_ratio = most_over_fewest(|r| r.cpu_seconds_per_gib_hour);
    let concurrent_ratio = most_over_fewest(|r| r.concurrent_cpu_seconds_per_gib_hour);
    let wrong = fleet
        .iter()
        .chain(negotiation)
        .chain(std::iter::once(failure))
        .filter(|r| !r.verified)
        .count();
    json!({
        "negotiation_fraction_at_largest": largest_query.map(|r| json!({
            "templates": r.templates, "fraction": r.negotiation_fraction,
            "bytes": r.negotiation_bytes, "seconds": r.negotiation_seconds,
            "target_max": 0.02, "met": r.negotiation_fraction <= 0.02})),
        "offer_at_largest": largest_offer.map(|r| json!({
            "templates": r.templates, "bytes": r.negotiation_bytes,
            "seconds": r.negotiation_seconds, "fraction": r.negotiation_fraction})),
        "site_vs_local_wire_bytes": site_vs_local.map(|ratio| json!({
            "ratio": ratio, "target_max": 1.1, "met": ratio <= 1.1})),
        "publishing_cost_ratio": publish_ratio.map(|ratio| json!({
            "hosts": [fewest, most], "ratio": ratio, "target_max": 1.2, "met": ratio <= 1.2,
            "all_at_once_ratio": concurrent_ratio})),
        "store_failure": {
            "completed": failure.error.is_none(), "verified": failure.verified,
            "wire_bytes": failure.wire_bytes, "site": failure.site},
        "runs_not_verified": wrong,
    })
}

/// Writes the report as JSON.
pub fn write(report: &ScaleReport, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    Ok(())
}
