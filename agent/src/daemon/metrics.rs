//! Prometheus metrics over HTTP (hyper): `/metrics` and a landing page at `/`.
//!
//! Values are read from the registry, the hash pool and the migration book
//! at scrape time, into a registry built for that scrape: the series of a VM
//! or of a running migration end with it. Every metric is described in
//! `docs/metrics.md`.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry,
    TextEncoder, core::Collector,
};

use crate::{
    daemon::state::AppState,
    registry::{DirtyMode, Discovery, Registry, Tracking, Vm},
    templates::Selection,
    transport::migration::{FULL_LEN, TEMPLATE_LEN},
};

/// Content type of the text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn dirty_log_name(mode: DirtyMode) -> &'static str {
    match mode {
        DirtyMode::Unknown => "unknown",
        DirtyMode::Ring => "ring",
        DirtyMode::Bitmap { .. } => "bitmap",
        DirtyMode::None => "none",
    }
}

/// The collectors of one scrape, registered as they are made.
struct Scrape {
    registry: PromRegistry,
}

impl Scrape {
    fn add<C: Collector + Clone + 'static>(&self, collector: C) -> Result<C, prometheus::Error> {
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }

    fn gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }

    fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One VM as the metrics show it (from the page counts the registry keeps:
/// a scrape walks no page under the registry lock).
struct VmFigures {
    tracking: Tracking,
    /// unknown, dirty, clean, unverified, zero: a partition of its pages.
    pages: [u64; 5],
    template_pages: u64,
}

const PAGE_STATES: [&str; 5] = ["unknown", "dirty", "clean", "unverified", "zero"];

fn vm_figures(registry: &Registry, vm: &Vm, catalog: &Selection) -> VmFigures {
    let counts = vm.page_counts();
    let pages = [
        counts.unknown,
        counts.dirty,
        counts.clean,
        counts.unverified,
        counts.zero_clean + counts.zero_unverified,
    ];
    let mut tracking: Option<Tracking> = None;
    for slot in vm.slots.values() {
        let slot_tracking = registry.tracking(vm, slot);
        let rank = |t: Tracking| match t {
            Tracking::Tracked => 0,
            Tracking::Syncing => 1,
            Tracking::Untracked => 2,
        };
        if tracking.is_none_or(|t| rank(slot_tracking) > rank(t)) {
            tracking = Some(slot_tracking);
        }
    }
    VmFigures {
        tracking: tracking.unwrap_or(Tracking::Untracked),
        pages,
        template_pages: catalog.covered_pages(&vm.counts),
    }
}

/// Renders the exposition for one scrape.
pub fn render(state: &AppState) -> Result<String, prometheus::Error> {
    let scrape = Scrape {
        registry: PromRegistry::new(),
    };
    scrape
        .gauges(
            "pagefp_build_info",
            "pagefp build information (always 1)",
            &["version"],
        )?
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    agent_metrics(&scrape, state)?;
    {
        let catalog = state.template_selection();
        let registry = state.registry.lock().unwrap();
        vm_metrics(&scrape, &registry, &catalog)?;
        host_metrics(&scrape, &registry, &catalog)?;
    }
    {
        let mut book = state.migrations.lock().unwrap();
        book.sweep();
        for collector in book.collectors()? {
            scrape.registry.register(collector)?;
        }
    }
    let mut families = scrape.registry.gather();
    // The process collector (CPU, memory, file descriptors, start time).
    families.extend(prometheus::gather());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// eBPF programs and the hash pool.
fn agent_metrics(scrape: &Scrape, state: &AppState) -> Result<(), prometheus::Error> {
    scrape
        .gauge("pagefp_ebpf_programs_attached", "eBPF programs attached")?
        .set(state.sources.attached.len() as i64);
    let programs = scrape.gauges(
        "pagefp_ebpf_program_info",
        "An eBPF program the agent attached (always 1)",
        &["program"],
    )?;
    for program in &state.sources.attached {
        programs.with_label_values(&[program]).set(1);
    }
    // Counted by the kernel only while its run-time statistics are on.
    let costs = crate::tracking::ebpf::cost::program_costs(&state.sources.programs);
    let runs = scrape.counters(
        "pagefp_ebpf_program_runs_total",
        "Runs of each eBPF program while the kernel's run-time statistics were on (ebpf_run_stats)",
        &["program"],
    )?;
    let seconds = scrape.add(prometheus::CounterVec::new(
        Opts::new(
            "pagefp_ebpf_program_run_seconds_total",
            "CPU time of each eBPF program while the kernel's run-time statistics were on (ebpf_run_stats)",
        ),
        &["program"],
    )?)?;
    for cost in &costs {
        runs.with_label_values(&[&cost.program]).inc_by(cost.runs);
        seconds
            .with_label_values(&[&cost.program])
            .inc_by(cost.run_ns as f64 / 1e9);
    }
    let stats = state
        .pool
        .as_ref()
        .map(|pool| pool.stats.view())
        .unwrap_or_default();
    scrape
        .add(prometheus::Counter::new(
            "pagefp_hasher_busy_seconds_total",
            "CPU time the hash workers spent on jobs (reading, hashing, committing): the CPU cost of hashing",
        )?)?
        .inc_by(Duration::from_nanos(stats.busy_ns).as_secs_f64());
    let read = scrape.counters(
        "pagefp_hasher_read_pages_total",
        "Guest pages the hash workers read, by method (mapped: sealed memfd mapped in place; copied: process_vm_readv)",
        &["method"],
    )?;
    read.with_label_values(&["mapped"])
        .inc_by(stats.reads_mapped);
    read.with_label_values(&["copied"])
        .inc_by(stats.reads_copied);
    scrape
        .counter(
            "pagefp_hashed_bytes_total",
            "Bytes of guest memory hashed with blake3 (all-zero pages are recognised without hashing)",
        )?
        .inc_by(stats.bytes_hashed);
    scrape
        .counter(
            "pagefp_hasher_zero_pages_total",
            "Pages read that were all zero (not hashed)",
        )?
        .inc_by(stats.pages_zero);
    scrape
        .counter(
            "pagefp_hasher_unreadable_pages_total",
            "Pages that could not be read from the VMM's memory",
        )?
        .inc_by(stats.pages_unreadable);
    scrape
        .add(prometheus::Counter::new(
            "pagefp_rescan_busy_seconds_total",
            "CPU time the hash workers spent rescanning VMs whose writes are not reported: the CPU cost of rescans",
        )?)?
        .inc_by(Duration::from_nanos(stats.rescan_busy_ns).as_secs_f64());
    scrape
        .counter(
            "pagefp_rescan_pages_total",
            "Pages read by rescans of VMs whose writes are not reported",
        )?
        .inc_by(stats.rescan_pages);
    scrape
        .counter(
            "pagefp_rescan_unchanged_pages_total",
            "Rescanned pages whose xxh3-64 showed them unchanged (no blake3)",
        )?
        .inc_by(stats.rescan_unchanged);
    scrape
        .gauge("pagefp_hasher_pending_jobs", "Hash jobs queued or running")?
        .set(clamp(stats.jobs_pending));
    Ok(())
}

/// Series labelled with `vm` (the VMM's pid): built from the VMs known now.
fn vm_metrics(
    scrape: &Scrape,
    registry: &Registry,
    catalog: &Selection,
) -> Result<(), prometheus::Error> {
    let vms = scrape.gauges(
        "pagefp_vms",
        "VMs known to the agent, by tracking state and dirty-log source",
        &["tracking", "dirty_log"],
    )?;
    for tracking in [Tracking::Tracked, Tracking::Syncing, Tracking::Untracked] {
        for dirty_log in [
            DirtyMode::Ring,
            DirtyMode::Bitmap {
                manual_protect: false,
            },
            DirtyMode::Unknown,
            DirtyMode::None,
        ] {
            vms.with_label_values(&[Tracking::name(tracking), dirty_log_name(dirty_log)])
                .set(0);
        }
    }
    let info = scrape.gauges(
        "pagefp_vm_info",
        "A VM the agent knows (always 1): its process name, tracking state, dirty-log source and how it was found",
        &["vm", "comm", "tracking", "dirty_log", "discovery"],
    )?;
    let pages = scrape.gauges(
        "pagefp_vm_pages",
        "Guest pages by state: unknown, dirty (written, rehash pending), clean (hash valid), unverified (hashed, VM not dirty-tracked), zero (hashed and all zero); the states partition the pages",
        &["vm", "state"],
    )?;
    let template_pages = scrape.gauges(
        "pagefp_vm_template_pages",
        "Guest pages whose content is one of the host's templates",
        &["vm"],
    )?;
    let wan_saving = scrape.gauges(
        "pagefp_vm_estimated_wan_saving_bytes",
        "Wire bytes a template migration of the VM would save over the baseline mode (zero pages detected, others sent raw), if the destination holds this host's templates",
        &["vm"],
    )?;
    let dirty_events = scrape.counters(
        "pagefp_vm_dirty_events_total",
        "Dirty-page events of the VM the agent applied (all sources)",
        &["vm"],
    )?;
    let hashed = scrape.counters(
        "pagefp_vm_hashed_pages_total",
        "Pages of the VM hashed (first pass, rescans and rehashes of written pages)",
        &["vm"],
    )?;
    let changed = scrape.counters(
        "pagefp_vm_changed_pages_total",
        "Rehashes of written pages of the VM that found a new content",
        &["vm"],
    )?;
    let losses = scrape.counters(
        "pagefp_vm_event_losses_total",
        "Times eBPF events of the VM were lost (its pages become unknown until resynced)",
        &["vm"],
    )?;
    let resyncs = scrape.counters(
        "pagefp_vm_resyncs_total",
        "Times the VM's tracking was resynchronised after a loss or adoption",
        &["vm"],
    )?;
    let saving_per_page = (FULL_LEN - TEMPLATE_LEN) as u64;
    for vm in registry.vms() {
        let figures = vm_figures(registry, vm, catalog);
        let label = vm.pid.to_string();
        let tracking = Tracking::name(figures.tracking);
        let dirty_log = dirty_log_name(vm.dirty_mode);
        vms.with_label_values(&[tracking, dirty_log]).inc();
        let discovery = match vm.discovery {
            Discovery::AtCreation => "at_creation",
            Discovery::Adopted => "adopted",
            Discovery::SharedMemory => "shared_memory",
        };
        info.with_label_values(&[&label, &vm.comm, tracking, dirty_log, discovery])
            .set(1);
        for (state, n) in PAGE_STATES.iter().zip(figures.pages) {
            pages
                .with_label_values(&[label.as_str(), state])
                .set(clamp(n));
        }
        template_pages
            .with_label_values(&[&label])
            .set(clamp(figures.template_pages));
        wan_saving
            .with_label_values(&[&label])
            .set(clamp(figures.template_pages * saving_per_page));
        let stats = &vm.stats;
        dirty_events
            .with_label_values(&[&label])
            .inc_by(stats.dirty_events);
        hashed
            .with_label_values(&[&label])
            .inc_by(stats.pages_hashed);
        changed
            .with_label_values(&[&label])
            .inc_by(stats.pages_rehashed);
        losses.with_label_values(&[&label]).inc_by(stats.losses);
        resyncs.with_label_values(&[&label]).inc_by(stats.resyncs);
    }
    Ok(())
}

/// Host-wide counters of the registry and the template catalog.
fn host_metrics(
    scrape: &Scrape,
    registry: &Registry,
    catalog: &Selection,
) -> Result<(), prometheus::Error> {
    let stats = &registry.stats;
    let events = scrape.counters(
        "pagefp_ebpf_events_total",
        "eBPF events applied, by kind: dirty pages by source (dirty_ring_push, dirty_gfn, write_fault) and VM life-cycle events",
        &["kind"],
    )?;
    // The dirty-page sources exist from the start (at 0), used or not.
    for kind in ["dirty_ring_push", "dirty_gfn", "write_fault"] {
        events.with_label_values(&[kind]);
    }
    for (kind, n) in &stats.events {
        events.with_label_values(&[kind]).inc_by(*n);
    }
    let losses = scrape.counters(
        "pagefp_ebpf_event_losses_total",
        "Times eBPF events were found lost, by scope (vm: one VM's; host: of an unknown VM, so every VM resyncs)",
        &["scope"],
    )?;
    losses
        .with_label_values(&["vm"])
        .inc_by(stats.losses_attributed);
    losses
        .with_label_values(&["host"])
        .inc_by(stats.losses_unattributed);
    scrape
        .counter(
            "pagefp_ebpf_unknown_vm_events_total",
            "Events of VMs the agent did not know yet (adopted on the spot)",
        )?
        .inc_by(stats.events_unknown_vm);
    scrape
        .counter(
            "pagefp_ebpf_rejected_events_total",
            "Events of a kind this agent does not know (the eBPF object and the agent are from different builds: reinstall pagefp)",
        )?
        .inc_by(stats.events_rejected);
    scrape
        .counter(
            "pagefp_hashed_pages_total",
            "Guest pages hashed (first pass, rescans and rehashes of written pages)",
        )?
        .inc_by(stats.pages_hashed);
    scrape
        .counter(
            "pagefp_changed_pages_total",
            "Rehashes of written pages that found a new content",
        )?
        .inc_by(stats.pages_rehashed);
    scrape
        .counter(
            "pagefp_hashes_discarded_total",
            "Hashes thrown away because their page was written while it was read",
        )?
        .inc_by(stats.hashes_dropped_stale);
    scrape
        .gauge(
            "pagefp_distinct_contents",
            "Distinct page contents host-wide",
        )?
        .set(registry.contents.len() as i64);
    scrape
        .gauge(
            "pagefp_template_candidates",
            "Distinct non-zero contents held by enough VMs to be templates (before the memory budget)",
        )?
        .set(clamp(catalog.eligible));
    scrape
        .gauge("pagefp_templates", "Templates selected")?
        .set(catalog.templates.len() as i64);
    scrape
        .gauge(
            "pagefp_template_bytes",
            "Memory the selected templates occupy",
        )?
        .set(clamp(catalog.bytes()));
    scrape
        .gauge(
            "pagefp_template_covered_pages",
            "Guest pages host-wide whose content is a template",
        )?
        .set(clamp(catalog.pages_covered));
    Ok(())
}

fn landing_page() -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><title>pagefp agent</title></head><body>\n\
         <h1>pagefp agent {version}</h1>\n\
         <p>Page fingerprints of the KVM guests of this host.</p>\n\
         <ul>\n\
         <li><a href=\"/metrics\">/metrics</a>: Prometheus text exposition (every metric: docs/metrics.md)</li>\n\
         </ul>\n\
         <p>Scrape job: <code>- job_name: pagefp</code> with <code>targets: ['HOST:9641']</code> \
         (the default port; <code>--metrics-addr</code> or <code>metrics_addr</code> in /etc/pagefp/pagefp.toml). \
         Grafana dashboards: <code>grafana/</code> in the pagefp sources.</p>\n\
         </body></html>\n",
        version = env!("CARGO_PKG_VERSION")
    )
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

pub async fn answer(request: Request<Incoming>, state: Arc<AppState>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET: try /metrics\n");
    }
    match request.uri().path() {
        "/metrics" => match tokio::task::spawn_blocking(move || render(&state)).await {
            Ok(Ok(exposition)) => Response::builder()
                .header(header::CONTENT_TYPE, TEXT_FORMAT)
                .body(Full::new(Bytes::from(exposition)))
                .expect("a valid response"),
            Ok(Err(err)) => {
                log::error!("rendering metrics failed: {err}");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("rendering metrics failed: {err}\n"),
                )
            }
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("rendering metrics failed: {err}\n"),
            ),
        },
        "/" => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::new(Bytes::from(landing_page())))
            .expect("a valid response"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_without_vms_exposes_its_metrics() {
        let state = AppState::empty();
        let text = render(&state).unwrap();
        for line in [
            "# TYPE pagefp_build_info gauge",
            "pagefp_vms{dirty_log=\"ring\",tracking=\"tracked\"} 0",
            "pagefp_templates 0",
            "pagefp_hashed_pages_total 0",
            "pagefp_ebpf_events_total{kind=\"dirty_gfn\"} 0",
            "pagefp_hasher_busy_seconds_total 0",
            "pagefp_ebpf_rejected_events_total 0",
            "pagefp_migrations_running 0",
            "pagefp_migrations_completed_total{mode=\"templates\",role=\"source\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("vm=\""), "no VM series without VMs:\n{text}");
        // Base units and _total suffixes.
        for line in text.lines().filter(|l| l.starts_with("# TYPE pagefp_")) {
            let mut words = line.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert_eq!(
                name.ends_with("_total"),
                kind == "counter",
                "{name} ({kind})"
            );
            assert!(
                !["_milliseconds", "_kilobytes", "_megabytes", "_percent"]
                    .iter()
                    .any(|unit| name.contains(unit)),
                "{name}: base units"
            );
        }
    }

    #[test]
    fn the_landing_page_links_the_metrics() {
        assert!(landing_page().contains("href=\"/metrics\""));
    }
}
