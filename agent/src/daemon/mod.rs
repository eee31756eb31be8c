//! `pagefp agent`: loads the eBPF programs, adopts running VMs, and serves the
//! API and metrics until SIGINT/SIGTERM.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;

pub mod hash_list;
pub mod http;
pub mod metrics;
pub mod migration_book;
pub mod routes;
pub mod site_publisher;
pub mod state;
pub mod views;

use self::{site_publisher::SitePublisher, state::AppState};
use crate::{
    config::Config,
    hasher::HashPool,
    registry::Registry,
    templates::SelectionPolicy,
    tracking::{
        ebpf::Probes,
        tracker::{Tracker, TrackerConfig, find_running_vms},
    },
};

/// Fails with one line naming what is missing when the agent cannot work.
pub fn check_privileges() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "pagefp agent must run as root (it loads eBPF programs and reads guest memory: CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE); run it with sudo or through the systemd unit"
        );
    }
    Ok(())
}

/// glibc gives each thread that allocates its own arena (up to 8 per
/// core) and keeps what they freed: the hash workers' and the runtime's
/// short-lived buffers stayed resident, 14 bytes per guest page in the
/// benchmark (`agent_bytes_per_guest_page` 57 → 42 with one arena). The
/// agent allocates little per job, so one arena costs it no contention.
/// An operator's `MALLOC_ARENA_MAX` is left as it is.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // before the agent starts any thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

pub fn run(config: Config) -> anyhow::Result<()> {
    one_malloc_arena();
    config.validate()?;
    check_privileges()?;
    let probes = Probes::attach(&config)?;
    let sources = probes.sources.clone();
    log::info!("eBPF attached: {}", sources.attached.join(", "));
    let mut registry = Registry::new(sources.fentry);
    registry.harvest_lag = if sources.pml { 2 } else { 1 };
    let registry = Arc::new(Mutex::new(registry));
    let pool = Arc::new(HashPool::new(
        config.threads(),
        config.hash_nice,
        registry.clone(),
        config.zero_copy,
        config.rescan_change_detection,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (mut tracker, sync) = Tracker::new(
        probes,
        registry.clone(),
        pool.clone(),
        TrackerConfig {
            rescan_pages_per_sec: config.rescan_pages_per_sec,
            rehash_delay: std::time::Duration::from_millis(config.rehash_delay_ms),
            qemu_scan: (config.qemu_scan_secs > 0)
                .then(|| std::time::Duration::from_secs(config.qemu_scan_secs)),
            only_vms_with_env: config.only_vms_with_env.clone(),
        },
        stop.clone(),
    );
    let running = find_running_vms();
    if !running.is_empty() {
        log::info!(
            "adopting {} VM(s) that started before the agent: {running:?}",
            running.len()
        );
    }
    tracker.adopt_running(&running);
    let tracker_stats = tracker.stats.clone();
    let tracker_thread = std::thread::Builder::new()
        .name("pagefp-tracker".into())
        .spawn(move || tracker.run())
        .context("spawning the tracker thread")?;

    let site = SitePublisher::start(&config.site, registry.clone(), stop.clone())
        .context("starting the site store publisher")?;
    let mut state = AppState::new(
        registry,
        Some(pool),
        Some(sync),
        sources,
        tracker_stats,
        SelectionPolicy {
            min_vms: config.min_vms,
            budget_bytes: config.template_budget_bytes,
        },
    );
    state.site = site.as_ref().map(|site| site.status.clone());
    let state = Arc::new(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let listener = http::bind_api(&config.socket)?;
        // Bound before "ready": a taken metrics address stops the agent
        // with an error naming --metrics-addr.
        let metrics_listener = http::bind_metrics(config.metrics_addr).await?;
        let shutdown = http::Shutdown::default();
        let api = tokio::spawn(http::serve_api(
            listener,
            state.clone(),
            config.socket.clone(),
            shutdown.clone(),
        ));
        let metrics = tokio::spawn(http::serve_metrics(
            metrics_listener,
            state.clone(),
            shutdown.clone(),
        ));
        println!(
            "pagefp agent ready: API on {}, metrics on http://{}/metrics",
            config.socket.display(),
            config.metrics_addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => log::info!("SIGINT: stopping"),
            _ = term.recv() => log::info!("SIGTERM: stopping"),
        }
        // Stop accepting; requests in flight finish (a bounded wait).
        shutdown.signal();
        let _ = tokio::join!(api, metrics);
        anyhow::Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    let _ = tracker_thread.join();
    if let Some(site) = site {
        site.join();
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}
