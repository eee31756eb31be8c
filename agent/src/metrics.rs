//! Prometheus metrics over HTTP (hyper): `/metrics` and a landing page at `/`.
//! Values are read from the registry at scrape time.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry,
    TextEncoder,
};

use crate::{
    api::{routes::AppState, views::vm_view},
    registry::Tracking,
};

/// Renders the exposition for one scrape.
pub fn render(state: &AppState) -> Result<String, prometheus::Error> {
    let prom = PromRegistry::new();
    let build_info = IntGaugeVec::new(
        Opts::new("pagefp_build_info", "pagefp build information (always 1)"),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    let vms_tracked = IntGaugeVec::new(
        Opts::new("pagefp_vms", "VMs known to the agent by tracking state"),
        &["tracking"],
    )?;
    let pages = IntGaugeVec::new(
        Opts::new("pagefp_vm_pages", "Guest pages by state"),
        &["vm", "state"],
    )?;
    let dirty_rate = GaugeVec::new(
        Opts::new(
            "pagefp_vm_dirty_pages_per_second",
            "Dirty events per second",
        ),
        &["vm"],
    )?;
    let template_pages = IntGaugeVec::new(
        Opts::new(
            "pagefp_vm_template_pages",
            "Guest pages whose content is a template",
        ),
        &["vm"],
    )?;
    let events = IntCounterVec::new(
        Opts::new("pagefp_ebpf_events_total", "eBPF events applied, by kind"),
        &["kind"],
    )?;
    let lost = IntCounterVec::new(
        Opts::new(
            "pagefp_ebpf_lost_events_total",
            "Times eBPF events were lost",
        ),
        &["scope"],
    )?;
    let hashed = IntCounterVec::new(
        Opts::new("pagefp_pages_hashed_total", "Pages hashed"),
        &["reason"],
    )?;
    let templates = IntGauge::new("pagefp_templates", "Templates selected")?;
    let template_bytes = IntGauge::new(
        "pagefp_template_bytes",
        "Bytes the selected templates occupy",
    )?;
    let contents = IntGauge::new(
        "pagefp_distinct_contents",
        "Distinct page contents host-wide",
    )?;
    let programs = IntGauge::new("pagefp_ebpf_programs_attached", "eBPF programs attached")?;
    let vm_info = IntGaugeVec::new(
        Opts::new(
            "pagefp_vm_info",
            "A VM the agent knows (always 1): its process name, tracking and dirty-log source",
        ),
        &["vm", "comm", "tracking", "dirty_log"],
    )?;
    let wan_saving = IntGaugeVec::new(
        Opts::new(
            "pagefp_vm_estimated_wan_saving_bytes",
            "Bytes a template migration of the VM would not send compared with zero-page detection alone (template pages x page size)",
        ),
        &["vm"],
    )?;
    let covered = IntGauge::new(
        "pagefp_template_covered_pages",
        "Guest pages host-wide whose content is a template",
    )?;
    let hashed_bytes = IntCounterVec::new(
        Opts::new("pagefp_hashed_bytes_total", "Bytes of guest memory hashed"),
        &["reason"],
    )?;
    let running = IntGauge::new(
        "pagefp_migrations_running",
        "Migrations in progress on this host",
    )?;
    let remaining = GaugeVec::new(
        Opts::new(
            "pagefp_migration_remaining_bytes",
            "Estimated bytes a running migration still has to send",
        ),
        &["id", "role", "vm"],
    )?;
    let migration_dirty = GaugeVec::new(
        Opts::new(
            "pagefp_migration_dirty_pages_per_second",
            "Pages the guest of a running migration dirtied per second in its last round",
        ),
        &["id", "role", "vm"],
    )?;
    let migration_round = IntGaugeVec::new(
        Opts::new(
            "pagefp_migration_round",
            "Pre-copy round of a running migration",
        ),
        &["id", "role", "vm"],
    )?;
    let migration_sent = IntGaugeVec::new(
        Opts::new(
            "pagefp_migration_sent_bytes",
            "Bytes a running migration has put on the wire so far",
        ),
        &["id", "role", "vm"],
    )?;
    for collector in [
        Box::new(build_info.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(vms_tracked.clone()),
        Box::new(pages.clone()),
        Box::new(dirty_rate.clone()),
        Box::new(template_pages.clone()),
        Box::new(events.clone()),
        Box::new(lost.clone()),
        Box::new(hashed.clone()),
        Box::new(templates.clone()),
        Box::new(template_bytes.clone()),
        Box::new(contents.clone()),
        Box::new(programs.clone()),
        Box::new(vm_info.clone()),
        Box::new(wan_saving.clone()),
        Box::new(covered.clone()),
        Box::new(hashed_bytes.clone()),
        Box::new(running.clone()),
        Box::new(remaining.clone()),
        Box::new(migration_dirty.clone()),
        Box::new(migration_round.clone()),
        Box::new(migration_sent.clone()),
    ] {
        prom.register(collector)?;
    }
    {
        let book = state.migrations.lock().unwrap();
        for collector in [
            Box::new(book.started.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(book.completed.clone()),
            Box::new(book.failed.clone()),
            Box::new(book.pages.clone()),
            Box::new(book.bytes.clone()),
            Box::new(book.duration.clone()),
            Box::new(book.downtime.clone()),
        ] {
            prom.register(collector)?;
        }
        running.set(book.running().count() as i64);
        for report in book.running() {
            let role = match report.role {
                crate::migrate::report::Role::Source => "source",
                crate::migrate::report::Role::Destination => "destination",
            };
            let labels = [report.id.as_str(), role, &report.vm_pid.to_string()];
            remaining
                .with_label_values(&labels)
                .set(report.remaining_bytes as f64);
            migration_dirty
                .with_label_values(&labels)
                .set(report.dirty_pages_per_second);
            migration_round
                .with_label_values(&labels)
                .set(i64::from(report.round));
            migration_sent
                .with_label_values(&labels)
                .set(report.wire_bytes as i64);
        }
    }
    {
        let registry = state.registry.lock().unwrap();
        let catalog = state.catalog(&registry);
        for tracking in ["tracked", "syncing", "untracked"] {
            vms_tracked.with_label_values(&[tracking]).set(0);
        }
        for vm in registry.vms() {
            let view = vm_view(&registry, vm, &catalog);
            let label = view.pid.to_string();
            let tracking = match view.tracking {
                Tracking::Tracked => "tracked",
                Tracking::Syncing => "syncing",
                Tracking::Untracked => "untracked",
            };
            vms_tracked.with_label_values(&[tracking]).inc();
            let dirty_log = match view.dirty_mode {
                crate::registry::vm::DirtyMode::Unknown => "unknown",
                crate::registry::vm::DirtyMode::Ring => "ring",
                crate::registry::vm::DirtyMode::Bitmap { .. } => "bitmap",
            };
            vm_info
                .with_label_values(&[&label, &view.comm, tracking, dirty_log])
                .set(1);
            wan_saving
                .with_label_values(&[&label])
                .set((view.template_pages * crate::PAGE_SIZE as u64) as i64);
            for (state_name, n) in [
                ("unknown", view.unknown),
                ("clean", view.clean),
                ("dirty", view.dirty),
                ("unverified", view.unverified),
                ("zero", view.zero_pages),
            ] {
                pages.with_label_values(&[&label, state_name]).set(n as i64);
            }
            dirty_rate
                .with_label_values(&[&label])
                .set(view.stats.dirty_per_sec);
            template_pages
                .with_label_values(&[&label])
                .set(view.template_pages as i64);
        }
        for (kind, n) in &registry.stats.events {
            events.with_label_values(&[kind]).inc_by(*n);
        }
        lost.with_label_values(&["vm"])
            .inc_by(registry.stats.losses_attributed);
        lost.with_label_values(&["host"])
            .inc_by(registry.stats.losses_unattributed);
        hashed
            .with_label_values(&["full_pass"])
            .inc_by(registry.stats.pages_hashed - registry.stats.pages_rehashed);
        hashed
            .with_label_values(&["dirty"])
            .inc_by(registry.stats.pages_rehashed);
        let page = crate::PAGE_SIZE as u64;
        hashed_bytes
            .with_label_values(&["full_pass"])
            .inc_by((registry.stats.pages_hashed - registry.stats.pages_rehashed) * page);
        hashed_bytes
            .with_label_values(&["dirty"])
            .inc_by(registry.stats.pages_rehashed * page);
        covered.set(catalog.pages_covered as i64);
        templates.set(catalog.templates.len() as i64);
        template_bytes.set(catalog.bytes() as i64);
        contents.set(registry.contents.len() as i64);
    }
    programs.set(state.sources.attached.len() as i64);
    let _ = state.tracker.events.load(Ordering::Relaxed);
    let mut families = prom.gather();
    families.extend(prometheus::gather());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

const LANDING: &str = "<html><head><title>pagefp</title></head><body><h1>pagefp</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>";

/// Serves `/metrics` and `/` on `addr`.
pub async fn serve(addr: SocketAddr, state: Arc<AppState>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for metrics on {addr}: {e}. Pick another with --metrics-addr"
        )
    })?;
    log::info!("metrics on http://{addr}/metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let response = match request.uri().path() {
                        "/metrics" => {
                            let text = tokio::task::spawn_blocking(move || render(&state)).await;
                            match text {
                                Ok(Ok(text)) => Response::builder()
                                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                                    .body(Full::new(Bytes::from(text))),
                                _ => Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::from("metrics failed\n"))),
                            }
                        }
                        "/" => Response::builder()
                            .header(header::CONTENT_TYPE, "text/html")
                            .body(Full::new(Bytes::from(LANDING))),
                        _ => Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from("not found: try /metrics\n"))),
                    };
                    Ok::<_, std::convert::Infallible>(response.unwrap())
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
