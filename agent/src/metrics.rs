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
    ] {
        prom.register(collector)?;
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
