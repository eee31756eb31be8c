//! The site-wide template catalog on a real Redis cluster (three masters on
//! loopback, started here): agents acting as different hosts publish their
//! content counts, the pages common across hosts are stored once, and a
//! destination host that holds none of a VM's pages rebuilds them from the
//! site. Each agent is one "host": it tracks only the VMM processes started
//! with `PAGEFP_TEST_HOST=<its host id>` (`--only-vms-with-env`) and
//! publishes under that id (`--host-id`).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use agent::{
    api::report::MigrationReport,
    catalog::site::{HostPublisher, SiteStore, site_counts},
    config::SiteStoreConfig,
};
use pagefp_tests::{
    agent_process::{AgentProcess, TempDir, free_port},
    guest_images,
    link_security::{LinkSecurity, make_pki, test_pki},
    migration::{KeptSourceMigration, ReceiveSpec},
    privileged,
    qemu::QemuGuest,
    qemu_proxy_run::{Ends, Proxies, Templates},
    redis_cluster::{self, RedisCluster},
    site_hosts::{self, HostSettings, contents, qemu_on},
    vmm_client::VmmProcess,
};

const MEM_MIB: u32 = 32;
const LEASE_SECS: u64 = 3;

fn ready(test: &str) -> bool {
    if !privileged::check(test) {
        return false;
    }
    if let Err(missing) = redis_cluster::available() {
        panic!("{test}: {missing}");
    }
    true
}

fn host_agent(host: &str, cluster: &RedisCluster) -> AgentProcess {
    site_hosts::host_agent(
        host,
        &cluster.urls(),
        &HostSettings {
            lease_secs: LEASE_SECS,
            publish_ms: 200,
            min_hosts: 2,
            tls_dir: cluster.tls_dir(),
        },
    )
    .expect("starting a host agent")
}

fn vm_on(dir: &TempDir, host: &str, agent: &AgentProcess, vm: usize) -> VmmProcess {
    site_hosts::vm_on(&dir.0, host, agent, vm, MEM_MIB).expect("starting a VMM")
}

/// A publisher for `host` that stores what it is given (min_hosts 1).
fn publisher(cluster: &RedisCluster, host: &str) -> HostPublisher {
    HostPublisher::new(
        store(cluster),
        host.into(),
        Duration::from_secs(30),
        1,
        Duration::from_secs(600),
    )
    .unwrap()
}

fn wait_published(agent: &AgentProcess, at_least: u64) {
    site_hosts::wait_published(agent, at_least).unwrap();
}

fn store(cluster: &RedisCluster) -> SiteStore {
    SiteStore::connect(&SiteStoreConfig {
        nodes: cluster.urls(),
        plaintext: true,
        tls_dir: cluster.tls_dir(),
    })
    .expect("connecting to the test cluster")
}

#[test]
fn hosts_publish_counts_that_end_with_their_lease() {
    if !ready("hosts_publish_counts_that_end_with_their_lease") {
        return;
    }
    let cluster = RedisCluster::start(3, 0).expect("starting a Redis cluster");
    let dir = TempDir::new("pagefp-site");
    let a = host_agent("a", &cluster);
    let b = host_agent("b", &cluster);
    let vm_a = vm_on(&dir, "a", &a, 0);
    let vm_b = vm_on(&dir, "b", &b, 2);
    // Each agent sees only its own host's VM.
    assert!(a.vm(vm_b.pid()).is_none() && b.vm(vm_a.pid()).is_none());
    let on_a = contents(&a, vm_a.pid());
    let on_b = contents(&b, vm_b.pid());
    wait_published(&a, on_a.len() as u64);
    wait_published(&b, on_b.len() as u64);
    // Let one more publication cycle store the pages both hosts hold.
    std::thread::sleep(Duration::from_millis(800));
    // One host of the two keeps the site within its budget.
    let curators = [&a, &b]
        .iter()
        .filter(|agent| agent.status()["site"]["curator"] == true)
        .count();
    assert_eq!(curators, 1, "exactly one curator");
    let mut site = store(&cluster);
    let counts = site_counts(&mut site, &on_a).unwrap();
    let shared: Vec<[u8; 32]> = on_a
        .iter()
        .filter(|hash| on_b.binary_search(hash).is_ok())
        .copied()
        .collect();
    assert!(!shared.is_empty() && shared.len() < on_a.len());
    for (hash, count) in on_a.iter().zip(&counts) {
        let hosts = if on_b.binary_search(hash).is_ok() {
            2
        } else {
            1
        };
        assert_eq!(count.hosts, hosts, "hosts holding {hash:02x?}");
        assert!(count.vms >= 1);
    }
    // Pages held by two hosts are stored, each checked; pages of one host are not.
    let fetched = site.fetch_pages(&shared, Instant::now() + Duration::from_secs(30));
    assert_eq!(
        fetched.missing + fetched.failed,
        0,
        "every shared page stored"
    );
    let only_a: Vec<[u8; 32]> = on_a
        .iter()
        .filter(|hash| on_b.binary_search(hash).is_err())
        .copied()
        .collect();
    let unshared = site.fetch_pages(&only_a, Instant::now() + Duration::from_secs(30));
    assert_eq!(
        unshared.missing,
        only_a.len() as u64,
        "no page of one host stored"
    );

    // Host b dies: its counts stop counting when its lease ends, and host
    // a deletes them within a lease period after that.
    b.kill();
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 1));
    let counts = site_counts(&mut site, &shared).unwrap();
    assert!(
        counts.iter().all(|count| count.hosts == 1),
        "b's counts ended with its lease"
    );
    let deadline = Instant::now() + Duration::from_secs(4 * LEASE_SECS + 10);
    while cluster.count_keys("pagefp:hc:b:*").unwrap() > 0 {
        assert!(Instant::now() < deadline, "host a never reaped dead host b");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(a.status()["site"]["hosts_reaped"].as_u64() >= Some(1));

    // A clean stop withdraws the host's counts at once.
    drop(a);
    let counts = site_counts(&mut site, &on_a).unwrap();
    assert!(
        counts.iter().all(|count| count.hosts == 0),
        "a withdrew its counts"
    );
    drop(vm_a);
    drop(vm_b);
}

struct Hosts {
    dir: TempDir,
    cluster: RedisCluster,
    a: AgentProcess,
    b: AgentProcess,
    source: VmmProcess,
    sibling: VmmProcess,
}

/// Host a runs fleet VM 0, host b its sibling fleet VM 2; both published
/// to a cluster of 3 masters with `replicas` replicas each, speaking TLS
/// only (with client certificates) if `tls`.
fn two_hosts(replicas: usize, tls: bool) -> Hosts {
    let cluster = if tls {
        RedisCluster::start_tls(test_pki(), 3, replicas)
    } else {
        RedisCluster::start(3, replicas)
    }
    .expect("starting a Redis cluster");
    let dir = TempDir::new("pagefp-site");
    let a = host_agent("a", &cluster);
    let b = host_agent("b", &cluster);
    let source = vm_on(&dir, "a", &a, 0);
    let sibling = vm_on(&dir, "b", &b, 2);
    wait_published(&a, contents(&a, source.pid()).len() as u64);
    wait_published(&b, contents(&b, sibling.pid()).len() as u64);
    std::thread::sleep(Duration::from_millis(800));
    if replicas > 0 {
        cluster.wait_replicas_listed().unwrap();
    }
    Hosts {
        dir,
        cluster,
        a,
        b,
        source,
        sibling,
    }
}

/// Migrates host a's VM to a fresh destination VMM (host c, no agent of its
/// own) whose templates come from `catalogs` and the site store `site`;
/// checks the memory is identical; returns both ends' reports. `during`
/// runs on its own thread as the sender starts.
fn migrate_to_c(
    hosts: &Hosts,
    catalogs: Vec<PathBuf>,
    site: Vec<String>,
    during: Option<Box<dyn FnOnce() + Send>>,
) -> (MigrationReport, MigrationReport) {
    let listen = format!("127.0.0.1:{}", free_port());
    let (sent, received, identical) = KeptSourceMigration {
        dir: &hosts.dir.0,
        source: &hosts.source,
        agent_socket: &hosts.a.socket,
        mem_mib: MEM_MIB,
        receive: ReceiveSpec {
            listen: listen.clone(),
            catalogs,
            timeout_s: 60,
            site_store: site,
            site_store_tls_dir: hosts.cluster.tls_dir(),
            ..ReceiveSpec::default()
        },
        to: listen,
        wraps: (None, None),
        during,
    }
    .run()
    .unwrap();
    assert!(sent.success, "sender failed:\n{}", sent.stderr);
    assert!(received.success, "receiver failed:\n{}", received.stderr);
    assert!(sent.report().verified && received.report().verified);
    assert!(identical, "pages differ after the migration");
    (sent.report().clone(), received.report().clone())
}

#[test]
fn a_destination_holding_nothing_rebuilds_the_vm_from_the_site() {
    if !ready("a_destination_holding_nothing_rebuilds_the_vm_from_the_site") {
        return;
    }
    let mut hosts = two_hosts(0, true);
    // Reference: host c holds the sibling's contents itself, as a catalog.
    let catalog = hosts.dir.0.join("sibling.pftc");
    hosts
        .b
        .export_templates(&catalog, &[hosts.sibling.pid()], &["--min-vms", "1"])
        .unwrap();
    let (local, _) = migrate_to_c(&hosts, vec![catalog], Vec::new(), None);
    // Host c holds nothing; the site does.
    let (from_site, received) = migrate_to_c(&hosts, Vec::new(), hosts.cluster.urls(), None);
    let (none, _) = migrate_to_c(&hosts, Vec::new(), Vec::new(), None);
    let negotiation = from_site.negotiation.clone().unwrap_or_default();
    assert!(negotiation.starts_with("query"), "{negotiation}");
    let site = received.site.clone().expect("the destination's site fetch");
    assert!(site.pages > 0 && site.failed == 0, "{site:?}");
    assert!(from_site.pages.template > 0);
    assert_eq!(none.pages.template, 0);
    eprintln!(
        "wire bytes: site {} local catalog {} nothing {}; negotiation {} bytes ({negotiation}); site fetch {site:?}",
        from_site.wire_bytes, local.wire_bytes, none.wire_bytes, from_site.negotiation_bytes
    );
    assert!(
        from_site.wire_bytes as f64 <= 1.1 * local.wire_bytes as f64,
        "the site saves what a local catalog saves"
    );
    assert!(from_site.wire_bytes * 10 < none.wire_bytes * 8);
    // Negotiation: 32 bytes and a bit per distinct content, far under 2%
    // of the VM's non-zero memory.
    let nonzero = (from_site.pages.template + from_site.pages.full + from_site.pages.zstd) * 4096;
    assert!(from_site.negotiation_bytes * 50 < nonzero);

    // A master killed just before the migration (no replicas): the pages of
    // its shard travel in full, the other shards' pages are still fetched;
    // the migration completes, byte-identical.
    let masters = hosts.cluster.master_ports().unwrap();
    assert_eq!(masters.len(), 3);
    hosts.cluster.kill(masters[1]).unwrap();
    let (degraded, received) = migrate_to_c(&hosts, Vec::new(), hosts.cluster.urls(), None);
    let site = received.site.clone().expect("the destination's site fetch");
    eprintln!(
        "with a master down: wire {} bytes; site fetch {site:?}",
        degraded.wire_bytes
    );
    assert!(site.failed > 0 && site.pages > 0, "{site:?}");
    assert!(degraded.wire_bytes > from_site.wire_bytes);
    // Two shards of three still answer: at least half the saving is kept.
    assert!(
        2 * (none.wire_bytes - degraded.wire_bytes) > none.wire_bytes - from_site.wire_bytes,
        "a dead master cost more than its own shard: {} vs {} (site) and {} (nothing)",
        degraded.wire_bytes,
        from_site.wire_bytes,
        none.wire_bytes
    );
}

/// The QEMU proxy path: hosts a and b each run a guest of one OS (QEMU
/// TCG, its RAM in shared memory, which each host's agent finds and
/// hashes) and publish; the pages both hold are stored in the site. Host
/// a's guest migrates through the proxies to host c, whose receive proxy
/// holds no template of its own, only the site store: the send proxy lists
/// the guest's contents from host a's agent (finding QEMU by its
/// connection), the receive proxy answers which the site holds and fetches
/// them. The paused destination's memory equals the source's, and the
/// guest runs on.
#[test]
fn a_qemu_guest_migrates_through_the_proxies_with_the_sites_templates() {
    let test = "a_qemu_guest_migrates_through_the_proxies_with_the_sites_templates";
    if !ready(test) {
        return;
    }
    let images = guest_images::ensure_images().expect("building the guest images");
    let image = |w: &str| images.iter().find(|i| i.workload == w).unwrap();
    let cluster = RedisCluster::start_tls(test_pki(), 3, 0).expect("starting a Redis cluster");
    let dir = TempDir::new("pagefp-site-qemu");
    let shm = TempDir::new_in(std::path::Path::new("/dev/shm"), "pagefp-site-qemu");
    let a = host_agent("a", &cluster);
    let b = host_agent("b", &cluster);
    let mut source = qemu_on(&dir.0, &shm.0, "a", &a, image("httpd")).unwrap();
    let sibling = qemu_on(&dir.0, &shm.0, "b", &b, image("idle")).unwrap();
    assert!(a.vm(sibling.pid()).is_none() && b.vm(source.pid()).is_none());
    wait_published(&a, contents(&a, source.pid()).len() as u64 / 2);
    wait_published(&b, contents(&b, sibling.pid()).len() as u64 / 2);
    std::thread::sleep(Duration::from_secs(2));

    // Host c: the destination QEMU (its RAM a memory backend too: QEMU
    // migrates RAM blocks by name), paused once loaded (-S) so its memory
    // can be compared; no agent, no catalog.
    let port = free_port();
    let mut dest = QemuGuest::boot(
        &image("httpd")
            .spec()
            .shared_memory(&shm.0.join("c-dst.ram"))
            .incoming(&format!("tcp:127.0.0.1:{port}"))
            .with_args(["-S"]),
        &dir.0,
        "c-dst",
        None,
    )
    .unwrap();
    source.qmp.uncap_migration().unwrap();
    let site = Templates::Site {
        nodes: cluster.urls(),
        tls_dir: cluster.tls_dir(),
    };
    let agent_socket = a.socket.display().to_string();
    let proxies = Proxies::start(
        &Ends::LOOPBACK,
        port,
        &[site],
        &["--agent-socket", &agent_socket],
        &LinkSecurity::default(),
    )
    .unwrap();
    source.qmp.migrate(&proxies.uri).unwrap();
    let info = source.qmp.wait_migration(Duration::from_secs(300));
    let outcome = proxies.wait().unwrap();
    let (sent, received) = match (outcome.send, outcome.receive) {
        (Ok(sent), Ok(received)) => (sent, received),
        (send, receive) => panic!(
            "the proxies failed:\nsend: {}\nreceive: {}",
            send.err().unwrap_or_default(),
            receive.err().unwrap_or_default()
        ),
    };
    let info = info.unwrap();
    eprintln!("{sent:?}\n{received:?}\nQEMU: {}", info["ram"]);
    assert_eq!(info["status"], "completed", "{info:?}");
    let negotiation = sent.negotiation.clone().unwrap_or_default();
    assert!(negotiation.starts_with("query: "), "{negotiation}");
    assert_eq!(sent.negotiation, received.negotiation);
    let fetched = received
        .site
        .clone()
        .expect("the receive proxy's site fetch");
    assert!(
        fetched.pages > 1_000 && fetched.error.is_none(),
        "{fetched:?}"
    );
    assert!(sent.template_pages > 1_000, "{sent:?}");
    assert_eq!(received.template_pages, sent.template_pages);
    assert!(
        sent.wire_bytes * 10 < sent.stream_bytes * 8,
        "{} WAN bytes for a {}-byte QEMU stream",
        sent.wire_bytes,
        sent.stream_bytes
    );
    // 32 bytes and a bit per listed content: far under 2% of the stream.
    assert!(sent.negotiation_bytes * 50 < sent.stream_bytes, "{sent:?}");

    let deadline = Instant::now() + Duration::from_secs(120);
    while dest.qmp.status().unwrap() == "inmigrate" {
        assert!(Instant::now() < deadline, "the destination never loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = u64::from(image("httpd").mem_mib) << 20;
    let (at_a, at_c) = (dir.0.join("a.mem"), dir.0.join("c.mem"));
    source.qmp.pmemsave(&at_a, size).unwrap();
    dest.qmp.pmemsave(&at_c, size).unwrap();
    assert!(
        std::fs::read(&at_a).unwrap() == std::fs::read(&at_c).unwrap(),
        "the destination's memory differs from the source's"
    );
    dest.qmp.cont().unwrap();
    let first = dest.wait_heartbeat(0, Duration::from_secs(30)).unwrap();
    dest.wait_heartbeat(first, Duration::from_secs(30))
        .expect("the guest's counter goes on at the destination");
    drop(sibling);
}

/// Pages numbered `numbers`, told apart from other tests' by `tag`, and
/// their hashes.
fn distinct_pages(
    numbers: std::ops::RangeInclusive<u32>,
    tag: &[u8; 8],
) -> (Vec<[u8; 4096]>, Vec<[u8; 32]>) {
    let pages: Vec<[u8; 4096]> = numbers
        .map(|i| {
            let mut page = [0u8; 4096];
            page[..4].copy_from_slice(&i.to_le_bytes());
            page[4096 - 8..].copy_from_slice(tag);
            page
        })
        .collect();
    let hashes = pages.iter().map(|p| *blake3::hash(p).as_bytes()).collect();
    (pages, hashes)
}

/// The site's budget: 40 pages stored, held by more and more VMs; with
/// room for 20, the curator keeps the 18 held by the most VMs (90% of the
/// budget) and deletes the others. One host curates at a time.
#[test]
fn the_site_keeps_its_best_ranked_pages_within_its_budget() {
    if !ready("the_site_keeps_its_best_ranked_pages_within_its_budget") {
        return;
    }
    let cluster = RedisCluster::start(3, 0).expect("starting a Redis cluster");
    let (pages, hashes) = distinct_pages(1..=40, b"pagefp-b");
    let mut x = publisher(&cluster, "x");
    let mut y = publisher(&cluster, "y");
    x.renew_lease().unwrap();
    y.renew_lease().unwrap();
    // Page i is held by i VMs of host x; y holds the first ten in one VM.
    let held: Vec<([u8; 32], u32)> = hashes.iter().copied().zip(1..).collect();
    x.publish(&held, &[]).unwrap();
    let y_held: Vec<([u8; 32], u32)> = hashes[..10].iter().map(|h| (*h, 1)).collect();
    y.publish(&y_held, &[]).unwrap();
    let batch: Vec<([u8; 32], &[u8; 4096])> = hashes.iter().copied().zip(&pages).collect();
    assert_eq!(x.store_pages(&batch).unwrap(), 40);
    let lease = Duration::from_secs(30);
    let pass = x
        .curate(20, lease)
        .unwrap()
        .expect("x takes the curator lease");
    assert_eq!((pass.stored, pass.evicted, pass.expired), (40, 22, 0));
    assert_eq!(y.curate(20, lease).unwrap(), None, "x curates, not y");
    let within = x.curate(20, lease).unwrap().expect("x renews its lease");
    assert_eq!((within.stored, within.evicted), (18, 0));
    let fetched = store(&cluster).fetch_pages(&hashes, Instant::now() + Duration::from_secs(20));
    let kept: Vec<bool> = fetched.pages.iter().map(Option::is_some).collect();
    assert_eq!(kept[..22], [false; 22], "the pages held by fewest VMs go");
    assert_eq!(kept[22..], [true; 18], "the 18 held by most VMs stay");
}

/// Pages of every shard stored, one master killed: the next fetch reads
/// that shard from its replica (or its promoted replica) and gets them all.
#[test]
fn a_shard_whose_master_dies_is_read_from_its_replica() {
    if !ready("a_shard_whose_master_dies_is_read_from_its_replica") {
        return;
    }
    let mut cluster = RedisCluster::start(3, 1).expect("starting a Redis cluster");
    let (pages, hashes) = distinct_pages(0..=599, b"pagefp-r");
    let mut publisher = publisher(&cluster, "r");
    let batch: Vec<([u8; 32], &[u8; 4096])> = hashes.iter().copied().zip(&pages).collect();
    assert_eq!(publisher.store_pages(&batch).unwrap(), 600);
    cluster.wait_replicas_listed().unwrap();
    let masters = cluster.master_ports().unwrap();
    cluster.kill(masters[0]).unwrap();
    let mut reader = store(&cluster);
    let deadline = Instant::now() + Duration::from_secs(20);
    let fetched = reader.fetch_pages(&hashes, deadline);
    eprintln!(
        "master down: {} pages fetched, {} missing, {} failed, from replicas: {}",
        fetched.pages.iter().flatten().count(),
        fetched.missing,
        fetched.failed,
        fetched.from_replicas
    );
    assert_eq!((fetched.failed, fetched.missing, fetched.late), (0, 0, 0));
    for (page, expected) in fetched.pages.iter().zip(&pages) {
        assert_eq!(page.as_deref(), Some(expected));
    }
}

/// Host a's VM migrates to host c, rebuilt from the site, while one
/// master of the cluster (3 masters, 1 replica each) is killed: the
/// migration completes byte-identical, and the replicas keep the saving.
#[test]
fn a_master_killed_during_a_migration_costs_nothing_with_replicas() {
    if !ready("a_master_killed_during_a_migration_costs_nothing_with_replicas") {
        return;
    }
    let hosts = two_hosts(1, false);
    let (reference, _) = migrate_to_c(&hosts, Vec::new(), hosts.cluster.urls(), None);
    let master = hosts.cluster.master_ports().unwrap()[2];
    let pid = hosts.cluster.pid(master).expect("the master's process");
    let kill = Box::new(move || {
        std::thread::sleep(Duration::from_millis(150));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("killing a Redis master");
    });
    let (during, received) = migrate_to_c(&hosts, Vec::new(), hosts.cluster.urls(), Some(kill));
    let site = received.site.clone().expect("the destination's site fetch");
    eprintln!(
        "master killed during the migration: wire {} bytes (reference {}); site fetch {site:?}",
        during.wire_bytes, reference.wire_bytes
    );
    assert_eq!(site.failed, 0, "{site:?}");
    assert!(
        during.wire_bytes as f64 <= 1.1 * reference.wire_bytes as f64,
        "the replicas kept the saving"
    );
}

/// A site store that speaks only TLS and requires client certificates: a
/// host with the site's certificates stores and fetches pages; a plaintext
/// client, a client trusting another CA, and a client without a
/// certificate are all refused.
#[test]
fn a_tls_site_store_serves_only_clients_with_the_sites_certificates() {
    if !ready("a_tls_site_store_serves_only_clients_with_the_sites_certificates") {
        return;
    }
    let cluster = RedisCluster::start_tls(test_pki(), 3, 0).expect("starting a TLS Redis cluster");
    let page = [0x5au8; 4096];
    let hash = *blake3::hash(&page).as_bytes();
    let mut publisher = publisher(&cluster, "t");
    assert_eq!(publisher.store_pages(&[(hash, &page)]).unwrap(), 1);
    let fetched = store(&cluster).fetch_pages(&[hash], Instant::now() + Duration::from_secs(10));
    assert_eq!(fetched.pages[0].as_deref(), Some(&page));

    let connect = |nodes: Vec<String>, tls_dir: Option<PathBuf>| {
        SiteStore::connect(&SiteStoreConfig {
            nodes,
            plaintext: true,
            tls_dir,
        })
        .map(|_| ())
    };
    let plaintext: Vec<String> = cluster
        .urls()
        .iter()
        .map(|url| url.replacen("rediss://", "redis://", 1))
        .collect();
    assert!(connect(plaintext, None).is_err(), "a plaintext client");
    let dir = TempDir::new("pagefp-site-pki");
    let other = dir.0.join("other");
    make_pki(&other, 30, None);
    let err = connect(cluster.urls(), Some(other)).unwrap_err();
    eprintln!("another CA: {err:#}");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let no_cert = dir.0.join("ca-only");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(test_pki().join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    let err = connect(cluster.urls(), Some(no_cert)).unwrap_err();
    eprintln!("no client certificate: {err:#}");
    assert!(format!("{err:#}").contains("Certificate"), "{err:#}");
}
